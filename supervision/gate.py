"""Admission: may a call reach the resource now? The gate and the breaker glue.

The gate answers by connection state (DESIGN section 4): CONNECTED passes at once;
RECONNECTING waits, in a bounded queue, until the state changes or the call's deadline
passes; ERROR, a stopped cell or an open breaker refuse at once. It also keeps the
*session* — the number of the CONNECTED period calls are admitted to — so that a report
from a call admitted before the last reconnect is recognised as stale.

``BreakerGuard`` is the one place the cell's calls, reconnect attempts and probes meet the
pure ``Breaker``: it applies each result, and turns the breaker's transitions into notices
without waiting (they happen in callers' tasks).

Refusals raise ``CallFailed`` with the ``Failure`` the caller will see.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from supervision.breaker import Breaker, BreakerState, Ticket
from supervision.breaker import Transition as BreakerTransition
from supervision.errors import CallFailed, ErrorCode, Failure
from supervision.events import EventKind
from supervision.messages import Notice
from supervision.states import ConnectionState

if TYPE_CHECKING:
    from supervision.cell import ActorCell

S = ConnectionState
_CIRCUIT_KINDS = {
    "OPEN": str(EventKind.CIRCUIT_OPENED),
    "HALF_OPEN": str(EventKind.CIRCUIT_HALF_OPEN),
    "CLOSED": str(EventKind.CIRCUIT_CLOSED),
}


class BreakerGuard:
    """The cell's breaker (None: the actor has none) and what its transitions tell."""

    def __init__(self, name: str, breaker: Breaker | None,
                 notify: Callable[[Notice], None]) -> None:
        self.name = name
        self.breaker = breaker
        self._notify = notify

    def admit(self, op: str) -> Ticket | None:
        if self.breaker is None:
            return None
        admission = self.breaker.admit(trio.current_time())
        self.set(admission.breaker, admission.transitions)
        if admission.ticket is None:
            raise CallFailed(Failure(
                ErrorCode.CIRCUIT_OPEN, f"{op} refused: circuit open for {self.name}",
                retry_after=admission.retry_after))
        return admission.ticket

    def result(self, ticket: Ticket | None, *, ok: bool) -> None:
        """A verdict on the resource. ``ticket`` None: observed outside a call (a
        reconnect attempt, a probe, a deadline)."""
        if self.breaker is None:
            return
        now = trio.current_time()
        if ok:
            b, transitions = self.breaker.record_success(ticket, now)
        else:
            b, transitions = self.breaker.record_failure(ticket, now)
        self.set(b, transitions)

    def observe(self, failure: Failure | None) -> None:
        """A reconnect attempt or probe counts like a call; a query error proves the
        server alive."""
        self.result(None, ok=failure is None or not failure.connection)

    def release(self, ticket: Ticket | None) -> None:
        """No verdict (the call never reached the resource, or was cancelled)."""
        if self.breaker is not None:
            self.breaker = self.breaker.release(ticket)

    def set(self, breaker: Breaker, transitions: tuple[BreakerTransition, ...]) -> None:
        self.breaker = breaker
        for tr in transitions:
            data: dict[str, Any] = {"from": str(tr.from_state), "to": str(tr.to_state)}
            retry = breaker.retry_after(tr.at)
            if retry is not None:
                data["retry_after"] = retry
            self._notify(Notice(self.name, _CIRCUIT_KINDS[str(tr.to_state)], tr.at,
                                data=data))


class Gate:
    def __init__(self, cell: ActorCell) -> None:
        self._cell = cell
        self.session = 0  # the CONNECTED period calls are admitted to
        self.failed_session = -1  # reported dead by a call; the driver has not run yet
        self.stopped = False  # stopping or stopped: refuse, do not wait
        self.ended = False  # the cell's run has returned
        self.waiting = 0
        self._changed = trio.Event()

    def is_live(self, session: int) -> bool:
        return session == self.session and self._cell.status.state is S.CONNECTED

    def changed(self) -> None:
        """The state changed (or the cell ended): waiting calls look again."""
        self._changed.set()
        self._changed = trio.Event()

    async def admit(self, op: str, deadline: float) -> int:
        """Wait until the call may go; returns the session it is admitted to."""
        cell = self._cell
        while True:
            status = cell.status
            if (status.state is S.CONNECTED and not self.ended
                    and self.failed_session != self.session):
                return self.session
            now = trio.current_time()
            if status.state is S.ERROR:
                last = cell.last_error
                raise CallFailed(Failure(
                    ErrorCode.ACTOR_UNAVAILABLE,
                    f"{op} refused: {cell.name} is in ERROR"
                    + (f" ({last.message})" if last else ""),
                    retry_after=_until(status.next_at, now)))
            if self.stopped or self.ended:
                raise CallFailed(Failure(
                    ErrorCode.ACTOR_UNAVAILABLE, f"{op} refused: {cell.name} is "
                    + ("stopped" if self.stopped else "not running")))
            breaker = cell.guard.breaker
            if breaker is not None and breaker.state is BreakerState.OPEN:
                retry = breaker.retry_after(now)
                if retry:  # fail fast while open, rather than wait for the reconnect
                    raise CallFailed(Failure(
                        ErrorCode.CIRCUIT_OPEN, f"{op} refused: circuit open for {cell.name}",
                        retry_after=retry))
            limit = cell.settings.queue_limit
            if self.waiting >= limit:
                raise CallFailed(Failure(
                    ErrorCode.ACTOR_UNAVAILABLE,
                    f"{op} refused: {limit} calls already wait for {cell.name}"))
            self.waiting += 1
            try:
                with trio.move_on_at(deadline):
                    await self._changed.wait()
                    continue
            finally:
                self.waiting -= 1
            status = cell.status
            raise CallFailed(Failure(
                ErrorCode.ACTOR_UNAVAILABLE,
                f"{op} failed: {cell.name} still {status.state} at the call's deadline",
                retry_after=_until(status.next_at, trio.current_time())))


def _until(when: float | None, now: float) -> float | None:
    return None if when is None else max(0.0, when - now)
