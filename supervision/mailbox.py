"""The mailbox: one round trip from a caller's task to the actor and back.

The caller sends a ``Request`` and parks on its one-shot ``Reply``; the per-cell deadline
watchdog answers it if its deadline passes first. On the actor's side the mailbox loop runs
inside the current instance's ``lifetime()`` and ends with it; requests still queued then
wait for the next instance, which sends those of an older session back to the gate
(``NoAnswer.NOT_RUN``): they never reached the resource.

A serial actor (``concurrency == 1``: the terminal, the cache) runs requests one at a time
with no cancel scope per request — entering a scope (or moving its deadline) is a large
share of a round trip. Instead the caller, whose deadline bounds every call, cancels the
handler when that deadline passes while its request still runs (``_cut_off``); the loop's
one long-lived scope is then spent and replaced. A concurrent actor (the pool) runs each
request in its own task under its own deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
import trio

from supervision.errors import CallFailed, ErrorCode, Failure
from supervision.reply import NoAnswer, Reply
from supervision.watchdog import DeadlineWatchdog

if TYPE_CHECKING:
    from supervision.actor import Actor
    from supervision.cell import ActorCell

log = logging.getLogger("mt5_supervisor.cell")


@attrs.frozen(eq=False)  # identity: a request is a capacity-limiter borrower
class Request:
    op: str
    args: Mapping[str, Any]
    deadline: float
    session: int
    reply: Reply


class Mailbox:
    def __init__(self, cell: ActorCell, size: int) -> None:
        self._cell = cell
        self._send, self._recv = trio.open_memory_channel[Request](size)
        self.watchdog = DeadlineWatchdog()  # run by the cell, for as long as it lives
        self._running: Request | None = None  # the serial loop's request in progress
        self._serial_scope: trio.CancelScope | None = None

    def close(self) -> None:
        self._send.close()

    # ------------------------------------------------------------------ caller's side
    async def request(self, op: str, args: Mapping[str, Any], deadline: float,
                      session: int) -> Any:
        """The handler's value, or a ``NoAnswer``; raises ``CallFailed`` with the
        handler's classified failure."""
        reply = Reply()
        request = Request(op, args, deadline, session, reply)
        try:
            try:
                self._send.send_nowait(request)
            except trio.WouldBlock:  # a full mailbox: wait for room, up to the deadline
                with trio.move_on_at(deadline):
                    await self._send.send(request)
                if trio.current_time() >= deadline and not reply.done:
                    reply.set_value(NoAnswer.DEADLINE_PASSED)
        except trio.ClosedResourceError:
            return NoAnswer.CELL_ENDED
        if not reply.done:
            self.watchdog.watch(deadline, reply)
        answer = await reply.wait()
        if answer is NoAnswer.DEADLINE_PASSED:
            self._cut_off(request)
        return answer

    def _cut_off(self, request: Request) -> None:
        """A caller's deadline passed: stop the serial handler if it is still running that
        request, or any request already past its own deadline (its caller may have been
        cancelled for another reason and not cut it off)."""
        running, scope = self._running, self._serial_scope
        if running is None or scope is None:
            return
        if running is request or running.deadline <= trio.current_time():
            scope.cancel()

    # ------------------------------------------------------------------ actor's side
    async def run(self) -> None:
        """Runs inside the current instance's lifetime; ends with it."""
        if self._cell.actor.concurrency <= 1:
            await self._run_serial()
            return
        limiter = trio.CapacityLimiter(self._cell.actor.concurrency)
        async with trio.open_nursery() as nursery:
            async for request in self._recv:
                await limiter.acquire_on_behalf_of(request)
                nursery.start_soon(self._execute_limited, request, limiter)

    async def _run_serial(self) -> None:
        while True:
            with trio.CancelScope() as scope:
                self._serial_scope = scope
                while True:
                    try:
                        request = await self._recv.receive()
                    except trio.EndOfChannel:
                        return
                    if not self._ready(request):
                        continue
                    self._running = request
                    await self._handle(request)
                    self._running = None
            self._running = None  # cut off: that caller has answered itself (TIMEOUT)

    async def _execute_limited(self, request: Request, limiter: trio.CapacityLimiter) -> None:
        try:
            if self._ready(request):
                with trio.move_on_at(request.deadline):
                    await self._handle(request)
                # Past the deadline the caller has already answered itself (TIMEOUT).
        finally:
            limiter.release_on_behalf_of(request)

    def _ready(self, request: Request) -> bool:
        """Should this request run? A caller that gave up is skipped; one admitted to a
        session that has since ended is sent back to the gate."""
        if request.reply.abandoned:
            return False
        if not self._cell.gate.is_live(request.session):
            request.reply.set_value(NoAnswer.NOT_RUN)
            return False
        return True

    async def _handle(self, request: Request) -> None:
        actor = self._cell.actor
        reply = request.reply
        try:
            value = await actor.handle(request.op, request.args)
        except CallFailed as exc:  # already classified by the actor
            reply.set_error(exc)
        except Exception as exc:
            log.debug("%s.%s raised", self._cell.name, request.op, exc_info=True)
            reply.set_error(CallFailed(actor.classify(exc, request.op)))
        else:
            reply.set_value(value)
        finally:
            # Cancelled before its deadline: its instance ended while it ran. (Past the
            # deadline the watchdog answers the caller with TIMEOUT.)
            if not reply.done and trio.current_time() < request.deadline:
                reply.set_error(CallFailed(self._interrupted(actor, request.op)))

    def _interrupted(self, actor: Actor, op: str) -> Failure:
        """A request cut short because its instance ended (the connection was lost or the
        actor stopped). It may have reached the resource: a write's outcome is unknown."""
        seen = actor.deadline_failure(op, 0.0)
        code = (ErrorCode.ORDER_STATE_UNKNOWN if seen.code is ErrorCode.ORDER_STATE_UNKNOWN
                else ErrorCode.ACTOR_UNAVAILABLE)
        return Failure(code, f"{op} failed: {self._cell.name} lost its connection while the "
                       "call ran", connection=True)
