"""The trio code around one actor: its mailbox and the driver of its connection machine.

The driver is thin on purpose. It feeds inputs to ``supervision.states.step`` and performs
the actions it returns: attempt a connect, sleep until the next attempt or probe, release,
escalate. Every transition leaves as a ``StateChanged`` message to the supervisor; nothing
else learns the state by polling.

Tasks (all owned by the cell's nursery, which the supervisor owns):

* the driver (``_drive``) — the state machine loop;
* the mailbox loop — runs requests against the live resource, at most ``concurrency`` at once;
* while CONNECTED, a *session* nursery with the actor's ``serve()`` and the health probe loop.
  Leaving CONNECTED cancels the session.

Calls come in through ``call()`` in the caller's own task: the gate (wait while RECONNECTING
up to the deadline, refuse in ERROR), the breaker, call-level retries, then one mailbox round
trip. A connection failure seen by a call is reported to the driver on the command channel.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import outcome
import trio

from supervision import states
from supervision.actor import Actor, OpSpec
from supervision.breaker import Breaker, BreakerState, Ticket
from supervision.breaker import Transition as BreakerTransition
from supervision.errors import ActorFailure, ErrorCode, ErrorInfo, Failure
from supervision.events import EventKind
from supervision.messages import Message, Notice, StateChanged
from supervision.reply import Reply
from supervision.settings import ActorSettings
from supervision.states import ConnectionState, ConnectionStatus, Input

log = logging.getLogger("mt5_supervisor.cell")

S = ConnectionState
Emit = Callable[[Message], Awaitable[None]]


class _DeadlinePassed(Exception):
    """A call's deadline passed before its reply (set by the deadline watchdog)."""


class DeadlineWatchdog:
    """Expires replies whose deadline has passed, for every call of one cell.

    Why not a cancel scope per call: entering and leaving a deadline scope is the single
    largest cost of a round trip. Callers instead push ``(deadline, reply)`` on a heap and
    park; one task sleeps until the earliest deadline and answers the replies still waiting
    with ``_DeadlinePassed``. Answered replies are dropped lazily, and the heap is compacted
    when it grows, so its size stays near the number of calls in flight.
    """

    COMPACT_AT = 4096

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Reply]] = []
        self._order = itertools.count()
        self._scope: trio.CancelScope | None = None
        self._sleeping_until = math.inf
        self._compact_at = self.COMPACT_AT

    def watch(self, deadline: float, reply: Reply) -> None:
        heapq.heappush(self._heap, (deadline, next(self._order), reply))
        if deadline < self._sleeping_until and self._scope is not None:
            self._sleeping_until = deadline
            self._scope.deadline = deadline  # wake earlier than planned
        if len(self._heap) >= self._compact_at:
            self._heap = [item for item in self._heap if not item[2].done]
            heapq.heapify(self._heap)
            self._compact_at = max(self.COMPACT_AT, 2 * len(self._heap))

    def expire_all(self) -> None:
        """The cell is gone: nobody will answer these."""
        heap, self._heap = self._heap, []
        for _, _, reply in heap:
            reply.set_error(_DeadlinePassed())

    async def run(self) -> None:
        while True:
            while self._heap and self._heap[0][2].done:
                heapq.heappop(self._heap)
            heap = self._heap
            with trio.CancelScope() as scope:
                self._sleeping_until = heap[0][0] if heap else math.inf
                scope.deadline = self._sleeping_until
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            now = trio.current_time()
            while self._heap and self._heap[0][0] <= now:
                _, _, reply = heapq.heappop(self._heap)
                reply.set_error(_DeadlinePassed())


class CallRejected(Exception):
    """A call ended without a value; carries the ``ErrorInfo`` for the caller."""

    def __init__(self, info: ErrorInfo, *, deadline: bool = False,
                 reason: str | None = None) -> None:
        super().__init__(info.message)
        self.info = info
        self.deadline = deadline
        self.reason = reason


class _NotRun(Exception):
    """The request reached the front of the mailbox after its session ended: it never ran,
    so the call goes back to the gate (and waits for the reconnect) instead of failing."""


@attrs.frozen(eq=False)  # identity: a request is a capacity-limiter borrower
class Request:
    op: str
    args: Mapping[str, Any]
    deadline: float
    session: int
    reply: Reply


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


_Command = _FailureReport | _ServeExited | _Restart | _Stop


class ActorCell:
    def __init__(
        self,
        actor: Actor,
        settings: ActorSettings,
        emit: Emit,
        *,
        restart: str = "permanent",
        on_escalate: Callable[[str, ErrorInfo | None], Awaitable[None] | None] | None = None,
        probe: Callable[[Actor], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.actor = actor
        self.name = actor.name
        self.settings = settings
        self.restart_type = restart
        self._emit = emit
        self._on_escalate = on_escalate
        self._probe_fn = probe
        self._rng = rng or random.Random()
        self._policy = settings.backoff
        self.status: ConnectionStatus = states.initial(self._policy)
        self.breaker: Breaker | None = Breaker(settings.breaker) if settings.breaker else None
        self.last_error: ErrorInfo | None = None
        self.restarts = 0
        self._session = 0
        self._failed_session = -1  # a session a call has reported dead, not yet processed
        self._running: Request | None = None  # the serial mailbox's request in progress
        self._deadlines = DeadlineWatchdog()
        self._serial_scope: trio.CancelScope | None = None
        self._stopped = False
        self._state_changed = trio.Event()
        self._waiters = 0
        self._cmd_send, self._cmd_recv = trio.open_memory_channel[_Command](256)
        self._mail_send, self._mail_recv = trio.open_memory_channel[Request](
            max(64, settings.queue_limit)
        )
        self._done = trio.Event()
        # Breaker transitions happen in callers' tasks; their events are queued here and sent
        # by the cell's notice task, so a caller never waits on the event pipeline.
        self._pending_notices: list[Notice] = []
        self._notices_ready = trio.Event()
        actor.notify = self._notice_nowait  # type: ignore[method-assign]

    # ------------------------------------------------------------------ public surface
    @property
    def state(self) -> ConnectionState:
        return self.status.state

    def error_info(self, code: ErrorCode, message: str, retry_after: float | None = None
                   ) -> ErrorInfo:
        return ErrorInfo(code, message, self.name, str(self.status.state), retry_after)

    async def call(self, op: str, args: Mapping[str, Any], deadline: float) -> Any:
        """Run ``op`` against the resource; raise ``CallRejected`` with the reason if not."""
        spec: OpSpec | None = self.actor.ops.get(op)
        if spec is None:
            raise CallRejected(self.error_info(
                ErrorCode.INVALID_REQUEST, f"{op} failed: {self.name} has no operation {op!r}"))
        delays = self.settings.retry_delays_s if spec.idempotent else ()
        timeout_s = max(0.0, deadline - trio.current_time())
        attempt = 0
        seen: tuple[Failure, int] | None = None  # the connection failure a retry follows
        while True:
            try:
                session = await self._admit(op, deadline)
                ticket = self._breaker_admit(op)
            except CallRejected:
                if seen is not None:  # a retry was refused: still report what the call saw
                    self.report_failure(*seen)
                raise
            try:
                value = await self._request(op, args, deadline, session, timeout_s)
            except ActorFailure as exc:
                failure = exc.failure
            except _NotRun:
                self._breaker_release(ticket)  # it never reached the resource
                continue
            except BaseException:
                self._breaker_release(ticket)  # no verdict on the resource
                raise
            else:
                self._breaker_result(ticket, ok=True)  # closes a half-open breaker
                return value
            if not failure.connection:
                self._breaker_result(ticket, ok=True)  # the resource answered
                raise CallRejected(self.error_info(failure.code, failure.message),
                                   reason=failure.reason)
            self._breaker_result(ticket, ok=False)
            now = trio.current_time()
            if attempt < len(delays) and now + delays[attempt] < deadline:
                log.warning("%s: %s (retry %d in %.3f s)", self.name, failure.message,
                            attempt + 1, delays[attempt])
                seen = (failure, session)
                await trio.sleep(delays[attempt])
                attempt += 1
                continue
            self.report_failure(failure, session)
            raise CallRejected(self.error_info(failure.code, failure.message))

    def report_failure(self, failure: Failure, session: int | None = None) -> None:
        """A connection failure seen outside the driver (a call, an actor's own task).

        The session is marked failed at once, before the driver has run: calls admitted
        from now on wait for the reconnect instead of reaching the dead session."""
        session = self._session if session is None else session
        if session == self._session:
            self._failed_session = session
        try:
            self._cmd_send.send_nowait(_FailureReport(failure, session))
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass  # the driver already has failure reports queued, or is gone

    async def restart(self, reason: str = "operator") -> None:
        try:
            await self._cmd_send.send(_Restart(reason))
        except trio.ClosedResourceError:
            pass  # the cell has ended (stopped, or crashed and about to be replaced)

    async def stop(self, reason: str = "stop") -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            await self._cmd_send.send(_Stop(reason))
        except trio.ClosedResourceError:
            pass

    @property
    def waiting_calls(self) -> int:
        return self._waiters

    # ------------------------------------------------------------------ gate and breaker
    async def _admit(self, op: str, deadline: float) -> int:
        while True:
            state = self.status.state
            if (state is S.CONNECTED and not self._done.is_set()
                    and self._failed_session != self._session):
                return self._session
            now = trio.current_time()
            if state is S.ERROR:
                retry = None if self.status.next_at is None else max(0.0,
                                                                     self.status.next_at - now)
                raise CallRejected(self.error_info(
                    ErrorCode.ACTOR_UNAVAILABLE,
                    f"{op} refused: {self.name} is in ERROR"
                    + (f" ({self.last_error.message})" if self.last_error else ""),
                    retry_after=retry))
            if self._stopped or self._done.is_set():
                raise CallRejected(self.error_info(
                    ErrorCode.ACTOR_UNAVAILABLE, f"{op} refused: {self.name} is "
                    + ("stopped" if self._stopped else "not running")))
            breaker = self.breaker
            if breaker is not None and breaker.state is BreakerState.OPEN:
                retry = breaker.retry_after(now)
                if retry:  # fail fast while open, rather than wait for the reconnect
                    raise CallRejected(self.error_info(
                        ErrorCode.CIRCUIT_OPEN, f"{op} refused: circuit open for {self.name}",
                        retry_after=retry))
            if self._waiters >= self.settings.queue_limit:
                raise CallRejected(self.error_info(
                    ErrorCode.ACTOR_UNAVAILABLE,
                    f"{op} refused: {self.settings.queue_limit} calls already wait for "
                    f"{self.name}"))
            self._waiters += 1
            try:
                with trio.move_on_at(deadline):
                    await self._state_changed.wait()
                    continue
            finally:
                self._waiters -= 1
            raise CallRejected(self.error_info(
                ErrorCode.ACTOR_UNAVAILABLE,
                f"{op} failed: {self.name} still {self.status.state} at the call's deadline",
                retry_after=None if self.status.next_at is None
                else max(0.0, self.status.next_at - trio.current_time())), deadline=True)

    def _breaker_admit(self, op: str) -> Ticket | None:
        if self.breaker is None:
            return None
        now = trio.current_time()
        admission = self.breaker.admit(now)
        self._set_breaker(admission.breaker, admission.transitions)
        if admission.ticket is None:
            raise CallRejected(self.error_info(
                ErrorCode.CIRCUIT_OPEN, f"{op} refused: circuit open for {self.name}",
                retry_after=admission.retry_after))
        return admission.ticket

    def _breaker_result(self, ticket: Ticket | None, *, ok: bool) -> None:
        if self.breaker is None:
            return
        now = trio.current_time()
        if ok:
            b, transitions = self.breaker.record_success(ticket, now)
        else:
            b, transitions = self.breaker.record_failure(ticket, now)
        self._set_breaker(b, transitions)

    def _breaker_release(self, ticket: Ticket | None) -> None:
        if self.breaker is not None:
            self.breaker = self.breaker.release(ticket)

    def _set_breaker(self, breaker: Breaker, transitions: tuple[BreakerTransition, ...]) -> None:
        self.breaker = breaker
        for tr in transitions:
            kind = {
                "OPEN": EventKind.CIRCUIT_OPENED,
                "HALF_OPEN": EventKind.CIRCUIT_HALF_OPEN,
                "CLOSED": EventKind.CIRCUIT_CLOSED,
            }[str(tr.to_state)]
            data: dict[str, Any] = {"from": str(tr.from_state), "to": str(tr.to_state)}
            retry = breaker.retry_after(tr.at)
            if retry is not None:
                data["retry_after"] = retry
            self._notice_nowait(Notice(self.name, str(kind), tr.at, data=data))

    def _notice_nowait(self, notice: Notice) -> None:
        self._pending_notices.append(notice)
        self._notices_ready.set()

    # ------------------------------------------------------------------ mailbox
    async def _request(self, op: str, args: Mapping[str, Any], deadline: float,
                       session: int, timeout_s: float) -> Any:
        reply = Reply()
        request = Request(op, args, deadline, session, reply)
        try:
            try:
                self._mail_send.send_nowait(request)
            except trio.WouldBlock:  # a full mailbox: wait for room, up to the deadline
                with trio.move_on_at(deadline):
                    await self._mail_send.send(request)
                if trio.current_time() >= deadline and not reply.done:
                    reply.set_error(_DeadlinePassed())
        except trio.ClosedResourceError:
            raise CallRejected(self.error_info(
                ErrorCode.ACTOR_UNAVAILABLE, f"{op} refused: {self.name} has stopped")) from None
        if not reply.done:
            self._deadlines.watch(deadline, reply)
        try:
            return await reply.wait()
        except _DeadlinePassed:
            pass
        self._cut_off(request)
        failure = self.actor.deadline_failure(op, timeout_s)
        if failure.connection:
            self._breaker_result(None, ok=False)
            self.report_failure(failure, session)
        # The caller's deadline passed: TIMEOUT, unless the actor says what that means for
        # this operation (an order_send cut off mid-flight: its outcome is unknown).
        code = (failure.code if failure.code is ErrorCode.ORDER_STATE_UNKNOWN
                else ErrorCode.TIMEOUT)
        raise CallRejected(self.error_info(
            code, f"{op} failed: no answer before the call's deadline"
            + ("" if failure.code is code else f" ({failure.code})")),
            deadline=True)

    async def _mailbox_loop(self) -> None:
        if self.actor.concurrency <= 1:
            await self._serial_mailbox_loop()
            return
        limiter = trio.CapacityLimiter(self.actor.concurrency)
        async with trio.open_nursery() as nursery:
            async for request in self._mail_recv:
                await limiter.acquire_on_behalf_of(request)
                nursery.start_soon(self._execute_limited, request, limiter)

    async def _serial_mailbox_loop(self) -> None:
        """Requests one at a time. No per-request deadline scope here: entering a cancel
        scope (or moving its deadline) is a large share of a round trip's cost. Instead the
        caller, whose own deadline bounds every call, cancels the handler when that
        deadline passes while its request is still running (``_cut_off``). The scope is
        then spent, and the loop continues in a fresh one."""
        while True:
            with trio.CancelScope() as scope:
                self._serial_scope = scope
                while True:
                    try:
                        request = await self._mail_recv.receive()
                    except trio.EndOfChannel:
                        return
                    if not self._ready(request):
                        continue
                    self._running = request
                    await self._handle(request)
                    self._running = None
            self._running = None  # cut off: that caller has answered itself (TIMEOUT)

    def _cut_off(self, request: Request) -> None:
        """A caller's deadline passed: stop the serial handler if it is still running that
        request, or any request already past its own deadline (its caller may have been
        cancelled for another reason and not cut it off)."""
        running, scope = self._running, self._serial_scope
        if running is None or scope is None:
            return
        if running is request or running.deadline <= trio.current_time():
            scope.cancel()

    async def _execute_limited(self, request: Request, limiter: trio.CapacityLimiter) -> None:
        try:
            await self._execute(request)
        finally:
            limiter.release_on_behalf_of(request)

    def _ready(self, request: Request) -> bool:
        """Should this request run? A caller that gave up is skipped; one admitted to a
        session that has since ended is sent back to the gate."""
        if request.reply.abandoned:
            return False
        if request.session != self._session or self.status.state is not S.CONNECTED:
            request.reply.set_error(_NotRun())
            return False
        return True

    async def _handle(self, request: Request) -> None:
        try:
            value = await self.actor.handle(request.op, request.args)
        except Exception as exc:
            log.debug("%s.%s raised", self.name, request.op, exc_info=True)
            request.reply.set_error(ActorFailure(self.actor.classify(exc, request.op)))
        else:
            request.reply.set(outcome.Value(value))

    async def _execute(self, request: Request) -> None:
        if not self._ready(request):
            return
        with trio.move_on_at(request.deadline):
            await self._handle(request)
        # Past the deadline the caller has already answered itself (TIMEOUT).

    # ------------------------------------------------------------------ driver
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The cell's whole life. ``task_status.started()`` fires after the first connect
        attempt has resolved, so the supervisor can start dependants in order."""
        try:
            async with self.actor.lifetime(), trio.open_nursery() as nursery:
                nursery.start_soon(self._mailbox_loop)
                nursery.start_soon(self._notice_pump)
                nursery.start_soon(self._deadlines.run)
                try:
                    await self._drive(task_status)
                except BaseException:
                    # A crash (or a cancellation) mid-flight: still let go of the resource,
                    # inside lifetime() where the actor can reach it.
                    if self.status.state is not S.DISCONNECTED:
                        await self._release()
                    raise
                await self._flush_notices()
                nursery.cancel_scope.cancel()
        finally:
            self._mail_send.close()
            self._cmd_send.close()
            self._done.set()
            self._wake_waiters()  # calls waiting at the gate are refused now, not at deadline
            self._deadlines.expire_all()  # calls waiting for a reply, likewise

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

    async def _drive(self, task_status: trio.TaskStatus[None]) -> None:
        now = trio.current_time()
        await self._emit(Notice(self.name, str(EventKind.ACTOR_STARTED), now))
        failure = await self._attempt("connect")
        await self._apply(Input.CONNECT_OK if failure is None else Input.CONNECT_FAILED,
                          "start", failure)
        task_status.started()
        while True:
            state = self.status.state
            if state is S.DISCONNECTED:
                return
            if state is S.CONNECTED:
                command = await self._connected_session()
            else:
                command = await self._wait_until(self.status.next_at)
            if isinstance(command, _Stop):
                await self._apply(Input.STOP, command.reason, None)
                await self._emit(Notice(self.name, str(EventKind.ACTOR_STOPPED),
                                        trio.current_time()))
                return
            if isinstance(command, _Restart):
                await self._apply(Input.OPERATOR_RESTART, command.reason, None)
                continue
            if state is S.CONNECTED:
                if isinstance(command, _ServeExited):
                    # permanent: always restarted; transient: only after a failure;
                    # temporary: never.
                    restart = self.restart_type == "permanent" or (
                        self.restart_type == "transient" and command.error is not None)
                    if not restart:
                        self._stopped = True  # calls are refused at once from now on
                        info = (None if command.error is None
                                else self._failure_info(self.actor.classify(command.error,
                                                                            "serve")))
                        self.last_error = info or self.last_error
                        await self._apply(Input.STOP, "exited", info)
                        await self._emit(Notice(self.name, str(EventKind.ACTOR_STOPPED),
                                                trio.current_time(), error=info))
                        return
                    failure = (Failure(ErrorCode.INTERNAL, "serve exited", connection=True)
                               if command.error is None
                               else self.actor.classify(command.error, "serve"))
                elif isinstance(command, _FailureReport):
                    failure = command.failure
                else:  # pragma: no cover - the session only ends with a command
                    raise AssertionError(command)
                await self._apply(Input.FAILURE_DETECTED, "failure_detected", failure)
                continue
            # RECONNECTING or ERROR: the scheduled attempt or probe is due.
            if state is S.RECONNECTING:
                attempt = self.status.attempt
                self.restarts += 1
                failure = await self._attempt("reconnect")
                if failure is None:
                    await self._apply(Input.ATTEMPT_OK, f"attempt {attempt} ok", None)
                else:
                    await self._emit(Notice(self.name, str(EventKind.ATTEMPT_FAILED),
                                            trio.current_time(), attempt=attempt,
                                            error=self._failure_info(failure)))
                    await self._apply(Input.ATTEMPT_FAILED, f"attempt {attempt} failed",
                                      failure)
            else:  # ERROR: probe by connecting and checking liveness
                failure = await self._attempt("probe")
                if failure is None:
                    await self._apply(Input.PROBE_OK, "probe ok", None)
                else:
                    self.last_error = self._failure_info(failure)
                    await self._apply(Input.PROBE_FAILED, "probe failed", failure)

    async def _wait_until(self, when: float | None) -> _Command | None:
        """Sleep until ``when`` unless a stop or restart arrives first. Failure reports that
        arrive meanwhile are stale (the resource is already known to be down)."""
        deadline = math.inf if when is None else when
        with trio.move_on_at(deadline):
            while True:
                command = await self._cmd_recv.receive()
                if isinstance(command, _Stop | _Restart):
                    return command
        return None

    async def _connected_session(self) -> _Command:
        session = self._session
        result: list[_Command] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve, session)
            nursery.start_soon(self._health_loop, session)
            while True:
                command = await self._cmd_recv.receive()
                if isinstance(command, _FailureReport | _ServeExited) and (
                    command.session != session
                ):
                    continue  # from an older session: stale
                result.append(command)
                break
            nursery.cancel_scope.cancel()
        return result[0]

    async def _serve(self, session: int) -> None:
        error: BaseException | None = None
        try:
            await self.actor.serve()
        except Exception as exc:
            error = exc
        self._cmd_send.send_nowait(_ServeExited(session, error))

    async def _health_loop(self, session: int) -> None:
        interval = self.settings.health_interval_s
        while True:
            await trio.sleep(interval)
            failure = await self._probe_once()
            if failure is not None:
                info = self._failure_info(failure)
                await self._emit(Notice(self.name, str(EventKind.PROBE_FAILED),
                                        trio.current_time(), error=info))
                self.report_failure(failure, session)
                return

    async def _probe_once(self) -> Failure | None:
        timeout = self.settings.probe_timeout_s
        with trio.move_on_after(timeout):
            try:
                if self._probe_fn is not None:
                    await self._probe_fn(self.actor)
                else:
                    await self.actor.probe()
            except Exception as exc:
                failure = self.actor.classify(exc, "probe")
                self._observe(ok=False, failure=failure)
                return failure
            self._observe(ok=True)
            return None
        failure = self.actor.deadline_failure("probe", timeout)
        failure = attrs.evolve(failure, connection=True)
        self._observe(ok=False, failure=failure)
        return failure

    async def _attempt(self, what: str) -> Failure | None:
        """One connect, bounded by ``connect_timeout_s``; in ERROR (``what == "probe"``)
        followed by the liveness probe. Every outcome counts for the breaker."""
        timeout = self.settings.connect_timeout_s
        failure: Failure | None = None
        with trio.move_on_after(timeout) as scope:
            try:
                await self.actor.connect()
            except Exception as exc:
                failure = attrs.evolve(self.actor.classify(exc, what), connection=True)
        if scope.cancelled_caught:  # what a hang means is the actor's to say
            failure = attrs.evolve(self.actor.deadline_failure(what, timeout), connection=True)
        if failure is None:
            if what != "probe":
                self._observe(ok=True)
                return None
            failure = await self._probe_once()  # counts for the breaker itself
            if failure is None:
                return None
        else:
            self._observe(ok=False, failure=failure)
        await self._release()
        return failure

    def _observe(self, *, ok: bool, failure: Failure | None = None) -> None:
        """A reconnect attempt or probe result counts for the breaker, like a call's."""
        if self.breaker is None:
            return
        if failure is not None and not failure.connection:
            ok = True
        self._breaker_result(None, ok=ok)

    async def _release(self) -> None:
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
        now = trio.current_time()
        old = self.status
        new, actions = states.step(old, event, now, self._policy,
                                   health_interval_s=self.settings.health_interval_s,
                                   rand=self._rng.random())
        info = self._failure_info(failure)
        if info is not None:
            self.last_error = info
        if new.state is S.CONNECTED and old.state is not S.CONNECTED:
            self._session += 1  # calls admitted from now on belong to the new session
        # Calls must stop reaching the resource before it is released.
        self.status = new
        self._wake_waiters()
        if states.Action.RELEASE in actions:
            await self._release()
        if new.state is not old.state:
            # RECONNECTING: the attempt scheduled next; ERROR: the attempts spent.
            attempt = new.budget.used if new.state is S.ERROR else new.attempt
            await self._emit(StateChanged(
                self.name, str(old.state), str(new.state), reason, info, now,
                attempt=attempt or None, delay_s=new.delay_s, next_at=new.next_at))
        if (states.Action.SCHEDULE_ATTEMPT in actions
                or states.Action.ATTEMPT_NOW in actions):
            await self._emit(Notice(self.name, str(EventKind.BACKOFF_SCHEDULED), now,
                                    attempt=new.attempt, delay_s=new.delay_s,
                                    next_at=new.next_at))
        if event is Input.PROBE_FAILED:
            await self._emit(Notice(self.name, str(EventKind.PROBE_FAILED), now, error=info,
                                    delay_s=new.delay_s, next_at=new.next_at))
        if states.Action.ESCALATE in actions:
            await self._emit(Notice(self.name, str(EventKind.ESCALATED), now, error=info,
                                    next_at=new.next_at))
            await self._run_escalate_hook(info)
        if states.Action.RECOVERED in actions:
            await self._emit(Notice(self.name, str(EventKind.RECOVERED), now))

    def _wake_waiters(self) -> None:
        self._state_changed.set()
        self._state_changed = trio.Event()

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
