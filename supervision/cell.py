"""The cell: the trio code around one actor, and the driver of its connection machine.

The driver is thin on purpose. It feeds inputs to ``supervision.states.step``, performs
the actions it returns (attempt a connect, sleep until the next attempt or probe, release,
escalate) and sends what ``messages.transition_messages`` says about each step to the
supervisor; nothing else learns the state by polling.

Restarts are fresh (OTP): every connect attempt — the first, each reconnect attempt, each
probe in ERROR, an operator restart — calls the spec's factory for a new ``Actor`` instance
and runs it inside its own ``lifetime()``; nothing of a broken instance is carried over. What
must survive (budget, breaker, session numbering, the refs' view) lives in the cell; what an
actor must keep (e.g. MT5 orders whose outcome is unknown) is handed to its factory.

The cell is assembled from one part per idea:

* ``gate.Gate`` / ``gate.BreakerGuard`` — may a call go now? (state, queue, breaker);
* ``mailbox.Mailbox`` — one round trip to the actor, bounded by ``watchdog.DeadlineWatchdog``;
* ``call.perform`` — the path of one call in the caller's task (gate, breaker, mailbox,
  retries); a ``call.Call`` is bound once by ``bind``;
* this module — the driver, and the surface the supervisor and the refs use.

Tasks (all owned by the cell's nursery, which the supervisor owns): the driver
(``_drive``); the notice task; the deadline watchdog; per instance, an *incarnation* nursery
inside the instance's ``lifetime()`` with the mailbox loop and, while CONNECTED, a *session*
nursery with the actor's ``serve()`` and the health probe loop. Leaving CONNECTED cancels
the session; the instance ends after its release.

A hung resource is noticed within about one probe timeout: a call that passes its deadline
(or times out) while CONNECTED wakes the health loop, which probes at once instead of
waiting up to ``health_interval_s``. ``nudge()`` is the lever for "the resource is back":
a scheduled attempt or ERROR probe is made now (while CONNECTED: a probe now).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio

from supervision.actor import Actor, RestartType
from supervision.breaker import Breaker
from supervision.call import Call, perform
from supervision.errors import CallFailed, ErrorCode, ErrorInfo, Failure
from supervision.events import EventKind
from supervision.gate import BreakerGuard, Gate
from supervision.mailbox import Mailbox
from supervision.messages import Message, Notice, transition_messages
from supervision.settings import ActorSettings
from supervision.states import Action, ConnectionState, ConnectionStatus, Input, initial, step

log = logging.getLogger("mt5_supervisor.cell")

S = ConnectionState
Emit = Callable[[Message], Awaitable[None]]
ActorFactory = Callable[[], Actor]
EscalateHook = Callable[[str, ErrorInfo | None], Awaitable[None] | None]


# Commands to the driver.
@attrs.frozen
class _FailureReport:
    failure: Failure
    session: int


@attrs.frozen
class _ServeExited:
    session: int
    error: BaseException | None


@attrs.frozen
class _Restart:
    reason: str


@attrs.frozen
class _Stop:
    reason: str


@attrs.frozen
class _Nudge:
    reason: str


_Command = _FailureReport | _ServeExited | _Restart | _Stop | _Nudge


class ActorCell:
    def __init__(
        self,
        factory: ActorFactory,
        settings: ActorSettings,
        emit: Emit,
        *,
        name: str | None = None,
        restart: RestartType | str = RestartType.PERMANENT,
        on_escalate: EscalateHook | None = None,
        probe: Callable[[Actor], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._factory = factory
        self.instances = 0  # how many times the factory was called
        self.actor = self._build()
        self._unused = True  # the instance built here serves the first connect
        self.name = name or self.actor.name
        self.actor.attach(self.name, self.notify)
        self.settings = settings
        self.restart_type = RestartType(restart)
        self._emit = emit
        self._on_escalate = on_escalate
        self._probe_fn = probe
        self._rng = rng or random.Random()
        self._policy = settings.backoff
        self.status: ConnectionStatus = initial(self._policy,
                                                       stable_s=settings.stable_s)
        self.last_error: ErrorInfo | None = None
        self.restarts = 0
        self.guard = BreakerGuard(self.name,
                                  Breaker(settings.breaker) if settings.breaker else None,
                                  self.notify)
        self.gate = Gate(self)
        self.mailbox = Mailbox(self, max(64, settings.queue_limit))
        self._cmd_send, self._cmd_recv = trio.open_memory_channel[_Command](256)
        self._done = trio.Event()
        # Breaker transitions and degraded answers happen in callers' tasks; their notices
        # are queued here and sent by the notice task, so a caller never waits on events.
        self._pending_notices: list[Notice] = []
        self._notices_ready = trio.Event()
        self._probe_soon = trio.Event()  # set: the health loop probes now
        self._holding = False  # between a connect and its release

    def _build(self) -> Actor:
        actor = self._factory()
        if not isinstance(actor, Actor):
            raise TypeError(f"the factory returned {type(actor).__name__}, not an Actor")
        self.instances += 1
        return actor

    def _next_instance(self) -> Actor:
        """A fresh instance for this connect (the first connect uses the one built at
        construction, which the refs have seen)."""
        if self._unused:
            self._unused = False
            return self.actor
        actor = self._build()
        actor.attach(self.name, self.notify)
        self.actor = actor
        return actor

    # ------------------------------------------------------------------ public surface
    @property
    def state(self) -> ConnectionState:
        return self.status.state

    @property
    def breaker(self) -> Breaker | None:
        return self.guard.breaker

    @property
    def ended(self) -> bool:
        """``run`` has returned (stopped, exited or crashed)."""
        return self._done.is_set()

    @property
    def waiting_calls(self) -> int:
        return self.gate.waiting

    def bind(self, op: str, args: Mapping[str, Any], timeout_s: float | None,
             now: float) -> Call:
        """The call, bound once: its ``OpSpec`` and its deadline. Raises ``CallFailed``
        (``INVALID_REQUEST``) for a bad timeout or an unknown operation."""
        timeout = self.settings.call_timeout_s if timeout_s is None else timeout_s
        if not timeout > 0:
            raise CallFailed(Failure(ErrorCode.INVALID_REQUEST,
                                     f"{op} failed: timeout_s must be > 0"))
        spec = self.actor.ops.get(op)
        if spec is None:
            raise CallFailed(Failure(
                ErrorCode.INVALID_REQUEST, f"{op} failed: {self.name} has no operation {op!r}"))
        return Call(op, args, spec, now + timeout, timeout)

    # ``await cell.call(call)``: run a bound call against the resource; its value, or
    # ``CallFailed``. The path itself is call.py's (bound here: no extra frame per call).
    call = perform

    def notify(self, notice: Notice) -> None:
        """Queue a supervision event about this actor (from any task; never blocks)."""
        self._pending_notices.append(notice)
        self._notices_ready.set()

    def report_failure(self, failure: Failure, session: int | None = None) -> None:
        """A connection failure seen outside the driver (a call, an actor's own task).

        The session is marked failed at once, before the driver has run: calls admitted
        from now on wait for the reconnect instead of reaching the dead session."""
        gate = self.gate
        session = gate.session if session is None else session
        if session == gate.session:
            gate.failed_session = session
        try:
            self._cmd_send.send_nowait(_FailureReport(failure, session))
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass  # the driver already has failure reports queued, or is gone

    def probe_soon(self, session: int | None = None) -> None:
        """Doubt about the live connection (a call passed its deadline or timed out): run
        the liveness probe now rather than at the next health interval."""
        if session is None or self.gate.is_live(session):
            self._probe_soon.set()

    def nudge(self, reason: str = "nudge") -> None:
        """The resource is probably back (e.g. a supervised database was restarted): make
        the scheduled reconnect attempt or ERROR probe now; while CONNECTED, probe now.
        Never blocks; a nudge while the driver is busy is dropped (it is a hint)."""
        try:
            self._cmd_send.send_nowait(_Nudge(reason))
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass

    async def restart(self, reason: str = "operator") -> None:
        try:
            await self._cmd_send.send(_Restart(reason))
        except trio.ClosedResourceError:
            pass  # the cell has ended (stopped, or crashed and about to be replaced)

    async def stop(self, reason: str = "stop") -> None:
        if self.gate.stopped:
            return
        self.gate.stopped = True
        try:
            await self._cmd_send.send(_Stop(reason))
        except trio.ClosedResourceError:
            pass

    # ------------------------------------------------------------------ the cell's life
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The cell's whole life. ``task_status.started()`` fires after the first connect
        attempt has resolved, so the supervisor can start dependants in order."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._notice_pump)
                nursery.start_soon(self.mailbox.watchdog.run)
                await self._drive(task_status)
                await self._flush_notices()
                nursery.cancel_scope.cancel()
        finally:
            self.mailbox.close()
            self._cmd_send.close()
            self._done.set()
            self.gate.ended = True
            self.gate.changed()  # calls waiting at the gate are refused now, not at deadline
            self.mailbox.watchdog.expire_all()  # calls waiting for a reply, likewise

    async def _notice_pump(self) -> None:
        while True:
            await self._notices_ready.wait()
            self._notices_ready = trio.Event()
            await self._flush_notices()

    async def _flush_notices(self) -> None:
        while self._pending_notices:
            batch, self._pending_notices = self._pending_notices, []
            for notice in batch:
                await self._emit(notice)

    # ------------------------------------------------------------------ the driver
    async def _drive(self, task_status: trio.TaskStatus[None]) -> None:
        """Between instances: wait for the scheduled attempt or probe (or a stop, an
        operator restart, a nudge), then run the next instance."""
        await self._emit(Notice(self.name, str(EventKind.ACTOR_STARTED), trio.current_time()))
        await self._incarnation("connect", task_status)
        while self.status.state is not S.DISCONNECTED:
            command = await self._wait_until(self.status.next_at)
            if isinstance(command, _Stop):
                await self._stop_machine(command.reason, None)
                return
            if isinstance(command, _Restart):
                await self._apply(Input.OPERATOR_RESTART, command.reason, None)
            await self._incarnation("reconnect" if self.status.state is S.RECONNECTING
                                    else "probe")

    async def _incarnation(self, what: str,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                           ) -> None:
        """One fresh instance: its lifetime, a connect attempt (``what``: the first
        ``connect``, a ``reconnect`` attempt, or the ERROR ``probe``), and while that
        succeeds its CONNECTED session. Returns once the instance has been released."""
        actor = self._next_instance()
        async with actor.lifetime(), trio.open_nursery() as nursery:
            nursery.start_soon(self.mailbox.run)
            try:
                await self._connect_step(what)
                task_status.started()
                if self.status.state is S.CONNECTED:
                    await self._connected_step()
            except BaseException:
                # A crash (or a cancellation) mid-flight: still let go of the resource,
                # inside lifetime() where the actor can reach it.
                if self._holding:
                    await self._release()
                raise
            finally:
                nursery.cancel_scope.cancel()

    async def _connect_step(self, what: str) -> None:
        failure = await self._attempt(what)
        if what == "connect":
            await self._apply(Input.CONNECT_OK if failure is None else Input.CONNECT_FAILED,
                              "start", failure)
        elif what == "reconnect":
            attempt = self.status.attempt
            if failure is None:
                await self._apply(Input.ATTEMPT_OK, f"attempt {attempt} ok", None)
            else:
                await self._emit(Notice(self.name, str(EventKind.ATTEMPT_FAILED),
                                        trio.current_time(), attempt=attempt,
                                        error=self._failure_info(failure)))
                await self._apply(Input.ATTEMPT_FAILED, f"attempt {attempt} failed", failure)
        elif failure is None:  # ERROR: the probe connected and found it alive
            await self._apply(Input.PROBE_OK, "probe ok", None)
        else:
            await self._apply(Input.PROBE_FAILED, "probe failed", failure)

    async def _connected_step(self) -> None:
        """The CONNECTED session until something ends it; leaves the machine elsewhere."""
        command = await self._connected_session()
        if isinstance(command, _Stop):
            await self._stop_machine(command.reason, None)
            return
        if isinstance(command, _Restart):
            await self._apply(Input.OPERATOR_RESTART, command.reason, None)
            return
        if isinstance(command, _ServeExited):
            # permanent: always restarted; transient: only after a failure; temporary: never.
            restart = self.restart_type is RestartType.PERMANENT or (
                self.restart_type is RestartType.TRANSIENT and command.error is not None)
            if not restart:
                self.gate.stopped = True  # calls are refused at once from now on
                exited = (None if command.error is None
                          else self.actor.classify(command.error, "serve"))
                await self._stop_machine("exited", exited)
                return
            failure = (Failure(ErrorCode.INTERNAL, "serve exited", connection=True)
                       if command.error is None
                       else self.actor.classify(command.error, "serve"))
        elif isinstance(command, _FailureReport):
            failure = command.failure
        else:  # pragma: no cover - the session only ends with a command
            raise AssertionError(command)
        await self._apply(Input.FAILURE_DETECTED, "failure_detected", failure)

    async def _stop_machine(self, reason: str, failure: Failure | None) -> None:
        await self._apply(Input.STOP, reason, failure)
        await self._emit(Notice(self.name, str(EventKind.ACTOR_STOPPED), trio.current_time(),
                                error=self._failure_info(failure)))

    async def _wait_until(self, when: float | None) -> _Command | None:
        """Sleep until ``when`` unless a stop, restart or nudge arrives first. Failure
        reports that arrive meanwhile are stale (the resource is already known to be down)."""
        with trio.move_on_at(math.inf if when is None else when):
            while True:
                command = await self._cmd_recv.receive()
                if isinstance(command, _Nudge):
                    log.info("%s: nudged (%s): trying now", self.name, command.reason)
                if isinstance(command, _Stop | _Restart | _Nudge):
                    return command
        return None

    async def _connected_session(self) -> _Command:
        session = self.gate.session
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve, session)
            nursery.start_soon(self._health_loop, session)
            while True:
                command = await self._cmd_recv.receive()
                if isinstance(command, _Nudge):
                    self._probe_soon.set()  # "it is back" while we think it is up: check
                elif not (isinstance(command, _FailureReport | _ServeExited)
                          and command.session != session):  # else: an older session's
                    break
            nursery.cancel_scope.cancel()
        return command

    async def _serve(self, session: int) -> None:
        error: BaseException | None = None
        try:
            await self.actor.serve()
        except Exception as exc:
            error = exc
        self._cmd_send.send_nowait(_ServeExited(session, error))

    async def _health_loop(self, session: int) -> None:
        interval = self.settings.health_interval_s
        self._probe_soon = trio.Event()  # a doubt from an older session is settled
        while True:
            with trio.move_on_after(interval):
                await self._probe_soon.wait()
            self._probe_soon = trio.Event()
            failure = await self._probe_once()
            if failure is not None:
                await self._emit(Notice(self.name, str(EventKind.PROBE_FAILED),
                                        trio.current_time(), error=self._failure_info(failure)))
                self.report_failure(failure, session)
                return

    async def _probe_once(self) -> Failure | None:
        """The liveness probe, bounded by ``probe_timeout_s``; counts for the breaker."""
        timeout = self.settings.probe_timeout_s
        failure: Failure | None = None
        with trio.move_on_after(timeout) as scope:
            try:
                if self._probe_fn is not None:
                    await self._probe_fn(self.actor)
                else:
                    await self.actor.probe()
            except Exception as exc:
                failure = self.actor.classify(exc, "probe")
        if scope.cancelled_caught:
            failure = attrs.evolve(self.actor.deadline_failure("probe", timeout),
                                   connection=True)
        self.guard.observe(failure)
        return failure

    async def _attempt(self, what: str) -> Failure | None:
        """One connect, bounded by ``connect_timeout_s``; in ERROR (``what == "probe"``)
        followed by the liveness probe. Every outcome counts for the breaker."""
        if what == "reconnect":
            self.restarts += 1
        timeout = self.settings.connect_timeout_s
        failure: Failure | None = None
        self._holding = True
        with trio.move_on_after(timeout) as scope:
            try:
                await self.actor.connect()
            except Exception as exc:
                failure = attrs.evolve(self.actor.classify(exc, what), connection=True)
        if scope.cancelled_caught:  # what a hang means is the actor's to say
            failure = attrs.evolve(self.actor.deadline_failure(what, timeout), connection=True)
        if failure is None and what == "probe":
            failure = await self._probe_once()  # counts for the breaker itself
        else:
            self.guard.observe(failure)
        if failure is not None:
            await self._release()
        return failure

    async def _release(self) -> None:
        self._holding = False
        with trio.CancelScope(shield=True), trio.move_on_after(self.settings.shutdown_timeout_s):
            try:
                await self.actor.release()
            except Exception:
                log.exception("%s: release failed", self.name)

    def _failure_info(self, failure: Failure | None) -> ErrorInfo | None:
        if failure is None:
            return None
        return ErrorInfo(failure.code, failure.message, self.name, str(self.status.state))

    async def _apply(self, event: Input, reason: str, failure: Failure | None) -> None:
        # What led here (a breaker closed by this reconnect, ...) is logged before it.
        await self._flush_notices()
        now = trio.current_time()
        old = self.status
        new, actions = step(old, event, now, self._policy,
                                   health_interval_s=self.settings.health_interval_s,
                                   rand=self._rng.random())
        info = self._failure_info(failure)
        if info is not None:
            self.last_error = info
        if new.state is S.CONNECTED and old.state is not S.CONNECTED:
            self.gate.session += 1  # calls admitted from now on belong to the new session
        # Calls must stop reaching the resource before it is released.
        self.status = new
        self.gate.changed()
        if Action.RELEASE in actions:
            await self._release()
        for message in transition_messages(self.name, old, new, event, actions, reason,
                                           info, now):
            await self._emit(message)
        if Action.ESCALATE in actions:
            # The hook hears of the escalation: the state it names is the one just entered
            # (the failure itself happened in the state before, as its events say).
            await self._run_escalate_hook(
                None if info is None else attrs.evolve(info, state=str(new.state)))

    async def _run_escalate_hook(self, info: ErrorInfo | None) -> None:
        hook = self._on_escalate
        if hook is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(
            self.settings.escalate_timeout_s
        ) as scope:
            try:
                result = hook(self.name, info)
                if result is not None:
                    await result
            except Exception:
                log.exception("%s: on_escalate hook failed", self.name)
        if scope.cancelled_caught:
            log.error("%s: on_escalate hook did not finish within %.1f s", self.name,
                      self.settings.escalate_timeout_s)
