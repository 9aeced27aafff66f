"""The supervisor: owns the children's tasks, numbers their messages, logs and publishes them.

Shape of the tree (all structured; every task has an owner nursery):

    Supervisor.run
    ├── event pump           numbers messages (seq), updates the status view, appends to the
    │                        log, then publishes to the bus; it never waits for subscribers
    └── Subtree.run          the top supervisor node: its children nursery
        ├── child "cache"    its own cancel scope; ActorCell.run (driver, instances, session)
        ├── child "questdb"
        ├── child "mt5"      ...started in order, each after the previous one's first
        │                    connect attempt resolved
        └── Subtree "bot"    a nested supervisor (``SupervisorSpec``): its own children
            ├── child "feed"   nursery and strategy; events go through the one pump above,
            └── child "algo"   so ``seq`` stays gap-free runtime-wide

Strategies (OTP's, ``Strategy``): ``one_for_one`` (default) leaves siblings alone;
``one_for_all`` stops every other running sibling, ``rest_for_one`` every sibling started
after the failed one, in reverse start order, then starts them again (fresh instances from
their factories) in start order. The trigger is a child leaving CONNECTED for a failure. The
failed child itself reconnects on its own backoff schedule rather than being started afresh:
its restart budget must survive, or a flapping child would never escalate. A failure stays
inside its node: a nested supervisor's child never stops the parent's other children.

A child's crash — even a bug in the cell — never takes down a sibling or the tree: the child
task catches it, reports it as an ERROR with ``INTERNAL`` and starts a fresh cell after
``health_interval_s``.

Shutdown is ordered and bounded: children stop in reverse start order (a nested node stops
its own children the same way), each given its ``shutdown_timeout_s`` to release its
resource, then cancelled.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, overload

import attrs
import trio

from supervision.actor import Actor, RestartType
from supervision.bus import EventBus
from supervision.cell import ActorCell
from supervision.clock import WallClock, iso
from supervision.errors import ErrorCode, ErrorInfo
from supervision.eventlog import EventLog
from supervision.events import Event, EventKind
from supervision.messages import CHECK_CHANGED, Message, Notice, StateChanged
from supervision.ref import ActorRef, CallObserver, LastKnownGood
from supervision.settings import ActorSettings
from supervision.states import ConnectionState

log = logging.getLogger("mt5_supervisor.supervisor")

RESTART_TYPES = tuple(str(t) for t in RestartType)
RESOURCE_ERROR_KINDS = frozenset({
    EventKind.STATE_CHANGED, EventKind.ATTEMPT_FAILED, EventKind.PROBE_FAILED,
    EventKind.ESCALATED, EventKind.ACTOR_STOPPED})


class Strategy(enum.StrEnum):
    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


STRATEGIES = tuple(str(s) for s in Strategy)
EscalateHook = Callable[[str, ErrorInfo | None], Awaitable[None] | None]


@attrs.frozen
class ChildSpec:
    name: str
    # Called for every (re)start: each connect attempt runs a fresh instance.
    factory: Callable[[], Actor]
    # The enum, or its value as a string (accepted for compatibility).
    restart: RestartType = attrs.field(default=RestartType.PERMANENT, converter=RestartType)
    settings: ActorSettings = attrs.field(factory=ActorSettings)
    # Overrides the actor's own probe() (e.g. a bot's custom liveness check).
    probe: Callable[[Actor], Awaitable[None]] | None = None
    on_escalate: EscalateHook | None = None
    ref_class: type[ActorRef] = ActorRef


@attrs.frozen
class SupervisorSpec:
    """A nested supervisor: its children (leaves or nodes) start in order under its own
    strategy. Actor names are unique across the whole runtime."""

    name: str
    children: Sequence[ChildSpec | SupervisorSpec] = attrs.field(default=(), converter=tuple)
    strategy: Strategy = attrs.field(default=Strategy.ONE_FOR_ONE, converter=Strategy)


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
    # The actor's own named checks (check_changed notices): name -> {status, output, since}.
    checks: dict[str, dict[str, Any]] = attrs.field(factory=dict)


class Child:
    def __init__(self, spec: ChildSpec, cell: ActorCell, node: Subtree) -> None:
        self.spec = spec
        self.name = spec.name
        self.cell = cell
        self.node = node  # the supervisor node it belongs to
        self.earlier_restarts = 0  # reconnect attempts made by its earlier cells
        self.view = ChildStatus(spec.name, breaker="CLOSED" if cell.breaker else None)
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.ref: ActorRef | None = None
        self.crashes = 0
        self.state_changed = trio.Event()  # set (and replaced) on every state change seen

    @property
    def actor(self) -> Actor:
        """The current instance (a new one on every connect attempt)."""
        return self.cell.actor

    @property
    def restarts(self) -> int:
        return self.earlier_restarts + self.cell.restarts

    @property
    def running(self) -> bool:
        """Its cell is live (not stopped, exited, or crashed and waiting to start again)."""
        return not self.done.is_set() and not self.cell.ended


class Supervisor:
    def __init__(
        self,
        *,
        log: EventLog,
        wallclock: WallClock | None = None,
        strategy: Strategy | str = Strategy.ONE_FOR_ONE,
        on_escalate: EscalateHook | None = None,
        lkg: LastKnownGood | None = None,
        subscriber_buffer: int = 1000,
        name: str = "supervisor",
    ) -> None:
        try:
            strategy = Strategy(strategy)
        except ValueError:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}") from None
        self.log = log
        self.bus = EventBus(log, default_buffer=subscriber_buffer)
        self.wallclock = wallclock or WallClock.anchored_now()
        self.on_escalate = on_escalate
        self.lkg = lkg
        self.name = name
        # Every actor of the tree (nested ones too), by name, in start order.
        self.children: dict[str, Child] = {}
        self.tree = Subtree(self, name, strategy)  # the top node
        self.subtrees: dict[str, Subtree] = {}  # nested nodes, by name
        self._next_seq = log.last_seq + 1
        self._send, self._recv = trio.open_memory_channel[Message](4096)
        self._stop_requested = trio.Event()
        self._stopped = trio.Event()
        self.events_total = 0
        # Called after every ActorRef call: (actor, op, status, seconds). For metrics.
        self.call_observers: list[CallObserver] = []

    # ------------------------------------------------------------------ queries (no I/O)
    def state(self, name: str) -> ConnectionState:
        return self.children[name].view.state

    @property
    def strategy(self) -> Strategy:
        return self.tree.strategy

    def ref(self, name: str) -> ActorRef:
        ref = self.children[name].ref
        assert ref is not None
        return ref

    def status(self) -> list[dict[str, Any]]:
        out = []
        for name, child in list(self.children.items()):
            v = child.view
            out.append({
                "name": name,
                "state": str(v.state),
                "restarts": child.restarts,
                "attempt": v.attempt,
                "last_error": v.last_error,
                "since": v.since,
                "next_retry_at": v.next_retry_at,
                "breaker": v.breaker,
                **({"extra": child.actor.status_extra()} if child.actor.status_extra() else {}),
                **({"checks": {k: dict(c) for k, c in v.checks.items()}} if v.checks else {}),
            })
        return out

    # ------------------------------------------------------------------ lifecycle
    async def run(self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as outer:
            outer.start_soon(self._pump)
            try:
                async with trio.open_nursery() as nodes:
                    await self.emit(Notice(self.name, str(EventKind.RUNTIME_STARTED),
                                           trio.current_time()))
                    await nodes.start(self.tree.run)
                    task_status.started(self)
                    await self._stop_requested.wait()
                    await self.tree.stop()
                    nodes.cancel_scope.cancel()
            finally:
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

    @overload
    async def start_child(self, spec: ChildSpec) -> ActorRef: ...
    @overload
    async def start_child(self, spec: SupervisorSpec) -> Subtree: ...

    async def start_child(self, spec: ChildSpec | SupervisorSpec) -> ActorRef | Subtree:
        """Start a child of the top node: an actor (returns its ``ActorRef``) or a nested
        supervisor (returns its ``Subtree``; ``subtree.start_child`` adds to it)."""
        return await self.tree.start_child(spec)

    def subtree(self, name: str) -> Subtree:
        return self.subtrees[name]

    async def restart_child(self, name: str, reason: str = "operator") -> None:
        """Operator restart: a running child reconnects with a fresh budget; a child that
        has stopped (a temporary or transient child that exited, or after ``stop_child``)
        is started again, as a fresh instance."""
        child = self.children[name]
        if not child.done.is_set():
            await child.cell.restart(reason)
            return
        if not child.node.running:
            raise RuntimeError("the supervisor is not running")
        await child.node.start_member(child)

    async def stop_child(self, name: str, reason: str = "shutdown") -> None:
        await self._stop_one(self.children[name], reason)

    def nudge(self, name: str, reason: str = "nudge") -> None:
        """The resource behind ``name`` is probably back: try now instead of waiting for the
        scheduled attempt or probe (while CONNECTED: probe now). Never blocks."""
        child = self.children[name]
        if child.running:
            child.cell.nudge(reason)

    def _claim(self, name: str) -> None:
        if name in self.children or name in self.subtrees:
            raise ValueError(f"a child named {name!r} already exists")

    def _new_child(self, spec: ChildSpec, node: Subtree) -> Child:
        child = Child(spec, self._new_cell(spec), node)
        child.ref = spec.ref_class(child, self.lkg, self.wallclock, self.call_observers)
        return child

    def _renew(self, child: Child) -> None:
        """A fresh cell (and so a fresh instance) for a child that has ended."""
        child.earlier_restarts += child.cell.restarts
        child.cell = self._new_cell(child.spec)
        child.scope = trio.CancelScope()
        child.done = trio.Event()

    def _new_cell(self, spec: ChildSpec) -> ActorCell:
        return ActorCell(spec.factory, spec.settings, self.emit, name=spec.name,
                         restart=spec.restart, on_escalate=self._escalate_hook(spec),
                         probe=spec.probe)

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

        class _Status(trio.TaskStatus[None]):
            def started(self, value: None = None) -> None:
                mark_started()

        try:
            with child.scope:
                while True:
                    try:
                        await child.cell.run(task_status=_Status())
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
                        if (child.node.stopping
                                or child.spec.restart is RestartType.TEMPORARY):
                            return
                        await trio.sleep(interval)
                        child.earlier_restarts += child.cell.restarts
                        child.cell = self._new_cell(child.spec)
        finally:
            mark_started()
            child.done.set()

    async def _stop_one(self, child: Child, reason: str = "shutdown") -> None:
        bound = child.spec.settings.shutdown_timeout_s + 1.0
        if child.cell.ended:  # crashed, waiting to start again: nothing to release
            child.scope.cancel()
        with trio.move_on_after(bound):
            await child.cell.stop(reason)
            await child.done.wait()
            return
        log.warning("child %s did not stop within %.1f s; cancelling", child.name, bound)
        child.scope.cancel()
        with trio.move_on_after(bound):
            await child.done.wait()

    # ------------------------------------------------------------------ the event pump
    async def _pump(self) -> None:
        async with self._recv:
            while True:
                batch: list[Message] = []
                # Wake for the log too: a retry while the disk refuses writes, or an idle
                # check that the file is still there.
                with trio.move_on_at(self.log.wake_at):
                    try:
                        first = await self._recv.receive()
                    except trio.EndOfChannel:
                        break
                    batch = [first]
                if not batch:
                    self._publish([])
                    continue
                while len(batch) < 512:
                    try:
                        batch.append(self._recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                self._publish(batch)
        self.log.sync(trio.current_time())

    def _publish(self, batch: list[Message]) -> None:
        now = trio.current_time()
        durable = self._log_batch(batch, now)
        # What the log reports about itself (write failed/resumed, file replaced) is logged
        # like any other event, right behind the batch that revealed it.
        notices: list[Message] = [Notice(self.name, kind, now, data=data)
                                  for kind, data in self.log.take_notices()]
        if notices:
            durable += self._log_batch(notices, now)
        # Only what the log holds is published (DESIGN.md section 5): while the disk refuses
        # writes, events wait in the log's bounded buffer and are published, in order, once
        # written. The status view is updated regardless, so health stays truthful.
        self.bus.publish(durable)
        for message in batch:
            if _is_failure(message):
                child = self.children.get(message.actor)
                if child is not None:
                    child.node.child_failed(child)

    def raise_seq_floor(self, seq: int, why: str) -> None:
        """Number events above ``seq`` from now on (``EventLog.raise_floor``): something
        outside the log, the events table, already holds seqs up to it. ``seq`` never
        goes back below what was persisted; the jump is logged as ``eventlog_replaced``."""
        if self.log.raise_floor(seq, why):
            self._next_seq = seq + 1

    def _log_batch(self, batch: list[Message], now: float) -> list[Event]:
        """Number, view, append; returns what became durable. Past the log's memory bound
        a message updates the view but is not numbered (counted as dropped): seq never has
        a hole and is never reused."""
        events: list[Event] = []
        room = self.log.room()
        for message in batch:
            event = self._number(message)
            self._apply_view(message, event)
            if len(events) < room:
                events.append(event)
                self._next_seq += 1
            else:
                self.log.drop(event)
        self.events_total += len(events)
        return self.log.append(events, now)

    def _number(self, message: Message) -> Event:
        """The event ``message`` becomes at the next seq (taken by the caller)."""
        seq = self._next_seq
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
            child.state_changed.set()
            child.state_changed = trio.Event()
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
        elif kind == CHECK_CHANGED and message.data and "check" in message.data:
            d = message.data
            view.checks[str(d["check"])] = {"status": d.get("status", "warn"),
                                            "output": d.get("output", ""),
                                            "since": iso(event.ts)}


def _is_failure(message: Message) -> bool:
    """Did a child just leave CONNECTED because of a failure (the strategies' trigger)?"""
    return (isinstance(message, StateChanged) and message.from_state == "CONNECTED"
            and message.to_state in ("RECONNECTING", "ERROR"))


class Subtree:
    """One supervisor node (OTP's supervisor): its direct children in start order, its
    strategy and the nursery their tasks live in. The top node belongs to ``Supervisor``;
    nested ones come from a ``SupervisorSpec``. Every node sends through the root's pump."""

    def __init__(self, root: Supervisor, name: str, strategy: Strategy | str,
                 specs: Sequence[ChildSpec | SupervisorSpec] = ()) -> None:
        self.root = root
        self.name = name
        self.strategy = Strategy(strategy)
        self.members: list[Member] = []
        self._pending = list(specs)
        self.nursery: trio.Nursery | None = None
        self.stopping = False
        self.done = trio.Event()
        self._stop_requested = trio.Event()
        self._group = trio.Lock()  # one strategy restart at a time
        self._group_scopes: set[trio.CancelScope] = set()
        self._stop_reason = "shutdown"

    @property
    def running(self) -> bool:
        return self.nursery is not None and not self.stopping

    async def run(self, *, task_status: trio.TaskStatus[Subtree] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The node's life: (re)start its members in order, wait for ``stop()``, stop them
        in reverse order."""
        self.stopping = False
        self.done = trio.Event()
        self._stop_requested = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                for member in list(self.members):  # a node started again: same members
                    if not self.stopping:
                        await self.start_member(member)
                pending, self._pending = self._pending, []
                for spec in pending:
                    if not self.stopping:
                        await self.start_child(spec)
                task_status.started(self)
                await self._stop_requested.wait()
                await self._stop_members()
                nursery.cancel_scope.cancel()
        finally:
            self.nursery = None
            self.done.set()

    async def stop(self, reason: str = "shutdown") -> None:
        """Stop the members in reverse start order (each bounded), then end ``run``."""
        if self.nursery is None:
            return
        self.stopping = True
        self._stop_reason = reason
        for scope in list(self._group_scopes):
            scope.cancel()
        self._stop_requested.set()
        await self.done.wait()

    @overload
    async def start_child(self, spec: ChildSpec) -> ActorRef: ...
    @overload
    async def start_child(self, spec: SupervisorSpec) -> Subtree: ...

    async def start_child(self, spec: ChildSpec | SupervisorSpec) -> ActorRef | Subtree:
        if self.nursery is None or self.stopping:
            raise RuntimeError("the supervisor is not running")
        root = self.root
        root._claim(spec.name)
        if isinstance(spec, SupervisorSpec):
            node = Subtree(root, spec.name, spec.strategy, spec.children)
            self.members.append(node)
            root.subtrees[spec.name] = node
            await self.nursery.start(node.run)
            return node
        child = root._new_child(spec, self)
        self.members.append(child)
        root.children[spec.name] = child  # before it runs: its first event names it
        await self.nursery.start(root._child_main, child)
        assert child.ref is not None
        return child.ref

    def ref(self, name: str) -> ActorRef:
        return self.root.ref(name)

    async def start_member(self, member: Member) -> None:
        """Start a member that has ended, fresh: a new cell and instance for an actor, the
        same members started again for a node."""
        if self.nursery is None:
            raise RuntimeError("the supervisor is not running")
        if isinstance(member, Subtree):
            await self.nursery.start(member.run)
            return
        if not member.done.is_set():
            return  # still live (or about to start itself again after a crash)
        self.root._renew(member)
        await self.nursery.start(self.root._child_main, member)

    async def _stop_member(self, member: Member, reason: str) -> None:
        if isinstance(member, Subtree):
            await member.stop(reason)
        else:
            await self.root._stop_one(member, reason)

    async def _stop_members(self) -> None:
        reason = self._stop_reason
        for member in reversed(self.members):
            await self._stop_member(member, reason)

    def child_failed(self, child: Child) -> None:
        """The pump saw ``child`` leave CONNECTED for a failure: apply the strategy."""
        if self.strategy is Strategy.ONE_FOR_ONE or not self.running or child not in self.members:
            return
        if self.strategy is Strategy.ONE_FOR_ALL:
            affected = [m for m in self.members if m is not child]
        else:
            affected = self.members[self.members.index(child) + 1:]
        affected = [m for m in affected if m.running]
        if affected and self.nursery is not None:
            self.nursery.start_soon(self._restart_group, child, affected)

    async def _restart_group(self, failed: Child, affected: list[Member]) -> None:
        """Stop ``affected`` in reverse start order, then start them in start order, the
        failed child in its place: those started after it (its dependants) wait until it is
        CONNECTED again (it reconnects on its own backoff, so a flapping child still
        escalates), or until it is no longer running. As OTP restarts the group in order."""
        reason = f"{self.strategy}:{failed.name}"
        after_failed = set(map(id, self.members[self.members.index(failed) + 1:]))
        with trio.CancelScope() as scope:
            self._group_scopes.add(scope)
            try:
                async with self._group:
                    for member in reversed(affected):
                        await self._stop_member(member, reason)
                    for member in affected:
                        if id(member) in after_failed:
                            await self._until_up(failed)
                        if self.stopping:
                            return
                        await self.start_member(member)
            finally:
                self._group_scopes.discard(scope)

    @staticmethod
    async def _until_up(child: Child) -> None:
        """Until ``child`` is CONNECTED or has stopped running. No deadline on purpose: its
        dependants stay stopped while it is down (ERROR included); the group's cancel scope
        (a supervisor stop, a newer group restart) ends the wait."""
        while child.running and child.view.state is not ConnectionState.CONNECTED:
            await child.state_changed.wait()


Member = Child | Subtree
