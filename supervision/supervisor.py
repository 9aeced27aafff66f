"""The supervisor: owns the children's tasks, numbers their messages, logs and publishes them.

Shape of the tree (all structured; every task has an owner nursery):

    Supervisor.run
    ├── event pump           numbers messages (seq), updates the status view, appends to the
    │                        log, then publishes to the bus; it never waits for subscribers
    └── children nursery
        ├── child "cache"    its own cancel scope; ActorCell.run (driver, mailbox, session)
        ├── child "questdb"
        └── child "mt5"      ...started in order, each after the previous one's first
                             connect attempt resolved

Strategies: ``one_for_one`` (default) restarts only the failed child; ``rest_for_one`` also
restarts every child started after it (its dependants). A child's crash — even a bug in
the cell — never takes down a sibling or the tree: the child task catches it, reports it as
an ERROR with ``INTERNAL`` and is started again after ``health_interval_s``.

Shutdown is ordered and bounded: children stop in reverse start order, each given its
``shutdown_timeout_s`` to release its resource, then cancelled.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from supervision.actor import Actor
from supervision.bus import EventBus
from supervision.cell import ActorCell
from supervision.clock import WallClock, iso
from supervision.errors import ErrorCode, ErrorInfo
from supervision.eventlog import EventLog
from supervision.events import Event, EventKind
from supervision.messages import Message, Notice, StateChanged
from supervision.ref import ActorRef, CallObserver, LastKnownGood
from supervision.settings import ActorSettings
from supervision.states import ConnectionState

log = logging.getLogger("mt5_supervisor.supervisor")

RESTART_TYPES = ("permanent", "transient", "temporary")
RESOURCE_ERROR_KINDS = frozenset({
    EventKind.STATE_CHANGED, EventKind.ATTEMPT_FAILED, EventKind.PROBE_FAILED,
    EventKind.ESCALATED, EventKind.ACTOR_STOPPED})
STRATEGIES = ("one_for_one", "rest_for_one")
EscalateHook = Callable[[str, ErrorInfo | None], Awaitable[None] | None]


@attrs.frozen
class ChildSpec:
    name: str
    factory: Callable[[], Actor]
    restart: str = attrs.field(default="permanent",
                               validator=attrs.validators.in_(RESTART_TYPES))
    settings: ActorSettings = attrs.field(factory=ActorSettings)
    # Overrides the actor's own probe() (e.g. a bot's custom liveness check).
    probe: Callable[[Actor], Awaitable[None]] | None = None
    on_escalate: EscalateHook | None = None
    ref_class: type[ActorRef] = ActorRef


@attrs.define
class ChildStatus:
    """The supervisor's view of one child, built only from the messages it received."""

    name: str
    state: ConnectionState = ConnectionState.DISCONNECTED
    attempt: int = 0
    last_error: dict[str, Any] | None = None
    since: str | None = None
    next_retry_at: str | None = None
    breaker: str | None = None
    degraded_served: int = 0


class Child:
    def __init__(self, spec: ChildSpec, actor: Actor, cell: ActorCell) -> None:
        self.spec = spec
        self.name = spec.name
        self.actor = actor
        self.cell = cell
        self.view = ChildStatus(spec.name, breaker="CLOSED" if cell.breaker else None)
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.ref: ActorRef | None = None
        self.crashes = 0


class Supervisor:
    def __init__(
        self,
        *,
        log: EventLog,
        wallclock: WallClock | None = None,
        strategy: str = "one_for_one",
        on_escalate: EscalateHook | None = None,
        lkg: LastKnownGood | None = None,
        subscriber_buffer: int = 1000,
        name: str = "supervisor",
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.log = log
        self.bus = EventBus(log, default_buffer=subscriber_buffer)
        self.wallclock = wallclock or WallClock.anchored_now()
        self.strategy = strategy
        self.on_escalate = on_escalate
        self.lkg = lkg
        self.name = name
        self.children: dict[str, Child] = {}
        self._order: list[str] = []
        self._next_seq = log.last_seq + 1
        self._send, self._recv = trio.open_memory_channel[Message](4096)
        self._children_nursery: trio.Nursery | None = None
        self._stop_requested = trio.Event()
        self._stopped = trio.Event()
        self._stopping = False
        self.events_total = 0
        # Called after every ActorRef call: (actor, op, status, seconds). For metrics.
        self.call_observers: list[CallObserver] = []

    # ------------------------------------------------------------------ queries (no I/O)
    def state(self, name: str) -> ConnectionState:
        return self.children[name].view.state

    def ref(self, name: str) -> ActorRef:
        ref = self.children[name].ref
        assert ref is not None
        return ref

    def status(self) -> list[dict[str, Any]]:
        out = []
        for name in self._order:
            child = self.children[name]
            v = child.view
            out.append({
                "name": name,
                "state": str(v.state),
                "restarts": child.cell.restarts,
                "attempt": v.attempt,
                "last_error": v.last_error,
                "since": v.since,
                "next_retry_at": v.next_retry_at,
                "breaker": v.breaker,
                **({"extra": child.actor.status_extra()} if child.actor.status_extra() else {}),
            })
        return out

    # ------------------------------------------------------------------ lifecycle
    async def run(self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as outer:
            outer.start_soon(self._pump)
            try:
                async with trio.open_nursery() as children:
                    self._children_nursery = children
                    await self.emit(Notice(self.name, str(EventKind.RUNTIME_STARTED),
                                           trio.current_time()))
                    task_status.started(self)
                    await self._stop_requested.wait()
                    await self._stop_children()
                    children.cancel_scope.cancel()
            finally:
                self._children_nursery = None
                try:
                    self._send.send_nowait(Notice(self.name, str(EventKind.RUNTIME_STOPPED),
                                                  trio.current_time()))
                except trio.WouldBlock:
                    log.warning("event pipeline full at shutdown: runtime_stopped not logged")
                self._send.close()  # the pump drains what is queued, then ends
        self.bus.close()
        self._stopped.set()

    async def shutdown(self) -> None:
        """Stop every child in reverse start order (bounded), then the pump."""
        self._stop_requested.set()
        await self._stopped.wait()

    async def emit(self, message: Message) -> None:
        await self._send.send(message)

    async def start_child(self, spec: ChildSpec) -> ActorRef:
        if self._children_nursery is None or self._stopping:
            raise RuntimeError("the supervisor is not running")
        if spec.name in self.children:
            raise ValueError(f"a child named {spec.name!r} already exists")
        child = self._new_child(spec)
        self.children[spec.name] = child
        self._order.append(spec.name)
        child.ref = spec.ref_class(child, self.lkg, self.wallclock, self.call_observers)
        await self._children_nursery.start(self._child_main, child)
        return child.ref

    async def restart_child(self, name: str, reason: str = "operator") -> None:
        """Operator restart: a running child reconnects with a fresh budget; a child that
        has stopped (a temporary or transient child that exited, or after ``stop_child``)
        is started again."""
        child = self.children[name]
        if not child.done.is_set():
            await child.cell.restart(reason)
            return
        if self._children_nursery is None or self._stopping:
            raise RuntimeError("the supervisor is not running")
        child.cell = self._new_cell(child.spec, child.actor)
        child.scope = trio.CancelScope()
        child.done = trio.Event()
        await self._children_nursery.start(self._child_main, child)

    async def stop_child(self, name: str) -> None:
        child = self.children[name]
        await self._stop_one(child)

    def _new_child(self, spec: ChildSpec) -> Child:
        actor = spec.factory()
        actor.name = spec.name
        return Child(spec, actor, self._new_cell(spec, actor))

    def _new_cell(self, spec: ChildSpec, actor: Actor) -> ActorCell:
        return ActorCell(actor, spec.settings, self.emit, restart=spec.restart,
                         on_escalate=self._escalate_hook(spec), probe=spec.probe)

    def _escalate_hook(self, spec: ChildSpec) -> EscalateHook | None:
        hooks = [h for h in (spec.on_escalate, self.on_escalate) if h is not None]
        if not hooks:
            return None

        async def run_hooks(name: str, info: ErrorInfo | None) -> None:
            for hook in hooks:
                result = hook(name, info)
                if result is not None:
                    await result

        return run_hooks

    async def _child_main(self, child: Child, *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False

        def mark_started() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        class _Status:
            def started(self, value: object = None) -> None:
                mark_started()

        try:
            with child.scope:
                while True:
                    try:
                        await child.cell.run(task_status=_Status())  # type: ignore[arg-type]
                        return
                    except Exception as exc:  # a bug in the cell or in actor.lifetime()
                        child.crashes += 1
                        log.exception("child %s crashed", child.name)
                        info = ErrorInfo(ErrorCode.INTERNAL,
                                         f"{child.name} crashed: {str(exc) or type(exc).__name__}",
                                         child.name, str(child.cell.state))
                        now = trio.current_time()
                        interval = child.spec.settings.health_interval_s
                        await self.emit(StateChanged(child.name, str(child.cell.state), "ERROR",
                                                     "crashed", info, now,
                                                     next_at=now + interval))
                        mark_started()
                        if self._stopping or child.spec.restart == "temporary":
                            return
                        await trio.sleep(interval)
                        child.cell = self._new_cell(child.spec, child.actor)
        finally:
            mark_started()
            child.done.set()

    async def _stop_one(self, child: Child) -> None:
        bound = child.spec.settings.shutdown_timeout_s + 1.0
        with trio.move_on_after(bound):
            await child.cell.stop("shutdown")
            await child.done.wait()
            return
        log.warning("child %s did not stop within %.1f s; cancelling", child.name, bound)
        child.scope.cancel()
        with trio.move_on_after(bound):
            await child.done.wait()

    async def _stop_children(self) -> None:
        self._stopping = True
        for name in reversed(self._order):
            await self._stop_one(self.children[name])

    # ------------------------------------------------------------------ the event pump
    async def _pump(self) -> None:
        async with self._recv:
            while True:
                try:
                    first = await self._recv.receive()
                except trio.EndOfChannel:
                    break
                batch = [first]
                while len(batch) < 512:
                    try:
                        batch.append(self._recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                self._publish(batch)
        self.log.sync(trio.current_time())

    def _publish(self, batch: list[Message]) -> None:
        now = trio.current_time()
        events = []
        for message in batch:
            event = self._number(message)
            self._apply_view(message, event)
            events.append(event)
        self.log.append(events, now)
        self.events_total += len(events)
        self.bus.publish(events)
        if self.strategy == "rest_for_one":
            for message in batch:
                self._rest_for_one(message)

    def _number(self, message: Message) -> Event:
        seq = self._next_seq
        self._next_seq += 1
        # ts is when it happened. Notices queued from callers' tasks can be logged a moment
        # after a later state change, so ts may step back slightly in seq order: seq is the
        # order, ts the time (exact, so schedules can be read off the log).
        ts = self.wallclock.wall(message.at)
        error = ({"code": str(message.error.code), "message": message.error.message}
                 if message.error is not None else None)
        if isinstance(message, StateChanged):
            data = {"reason": message.reason}
            if message.next_at is not None:
                data["next_at"] = iso(self.wallclock.wall(message.next_at))
            return Event(seq, ts, message.actor, str(EventKind.STATE_CHANGED),
                         message.from_state, message.to_state, message.attempt,
                         message.delay_s, error, data)
        data = dict(message.data or {})
        if message.next_at is not None:
            data["next_at"] = iso(self.wallclock.wall(message.next_at))
        return Event(seq, ts, message.actor, message.kind, None, None, message.attempt,
                     message.delay_s, error, data or None)

    def _apply_view(self, message: Message, event: Event) -> None:
        child = self.children.get(message.actor)
        if child is None:
            return
        view = child.view
        # last_error is about the resource: a refused or degraded call (degraded_served)
        # repeats an older cause and must not replace it.
        if event.error is not None and event.kind in RESOURCE_ERROR_KINDS:
            view.last_error = {**event.error, "at": iso(event.ts)}
        next_at = (event.data or {}).get("next_at")
        if isinstance(message, StateChanged):
            view.state = ConnectionState(message.to_state)
            view.since = iso(event.ts)
            view.attempt = message.attempt or 0
            view.next_retry_at = next_at
            return
        kind = message.kind
        if kind == EventKind.BACKOFF_SCHEDULED:
            view.attempt = message.attempt or 0
            view.next_retry_at = next_at
        elif kind == EventKind.PROBE_FAILED and next_at is not None:
            view.next_retry_at = next_at
        elif kind in (EventKind.CIRCUIT_OPENED, EventKind.CIRCUIT_HALF_OPEN,
                      EventKind.CIRCUIT_CLOSED):
            view.breaker = (message.data or {}).get("to")
        elif kind == EventKind.DEGRADED_SERVED:
            view.degraded_served += 1

    def _rest_for_one(self, message: Message) -> None:
        if not (isinstance(message, StateChanged) and message.from_state == "CONNECTED"
                and message.to_state in ("RECONNECTING", "ERROR")):
            return
        if message.actor not in self._order or self._children_nursery is None:
            return
        later = self._order[self._order.index(message.actor) + 1:]
        for name in later:
            cell = self.children[name].cell
            if cell.state is ConnectionState.CONNECTED:
                self._children_nursery.start_soon(cell.restart, f"rest_for_one:{message.actor}")
