"""The path of one call, in the caller's own task: gate, breaker, mailbox, retries.

A ``Call`` is bound once (``ActorCell.bind``): the operation's ``OpSpec`` looked up and
the deadline computed a single time, then carried unchanged through every step. A call
that ends without a value raises ``CallFailed`` with the ``Failure`` the caller will see;
``ActorRef.call`` turns it into the ``Response``.

Steps (DESIGN section 4): the gate admits it (waiting while RECONNECTING, refusing in
ERROR), the breaker admits it, one mailbox round trip runs it. A connection failure is
retried (idempotent operations, ``retry_delays_s``) while the deadline allows, then
reported to the driver; every result is a verdict for the breaker. A call past its deadline
asks the actor what that means (``deadline_failure``): a lost resource is reported, a slow
one is probed at once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import trio

from supervision.actor import OpSpec
from supervision.errors import CallFailed, ErrorCode, Failure
from supervision.reply import NoAnswer

if TYPE_CHECKING:
    from supervision.cell import ActorCell

log = logging.getLogger("mt5_supervisor.cell")


class Call(NamedTuple):  # immutable, and 3x cheaper to build than a frozen attrs class
    op: str
    args: Mapping[str, Any]
    spec: OpSpec
    deadline: float  # trio time
    timeout_s: float


async def perform(cell: ActorCell, call: Call) -> Any:
    """Run ``call`` against the resource: its value, or ``CallFailed``."""
    op, deadline = call.op, call.deadline
    gate, guard, mailbox = cell.gate, cell.guard, cell.mailbox
    delays = cell.settings.retry_delays_s if call.spec.idempotent else ()
    attempt = 0
    seen: tuple[Failure, int] | None = None  # the connection failure a retry follows
    while True:
        try:
            session = await gate.admit(op, deadline)
            ticket = guard.admit(op)
        except CallFailed:
            if seen is not None:  # a retry was refused: still report what the call saw
                cell.report_failure(*seen)
            raise
        try:
            answer = await mailbox.request(op, call.args, deadline, session)
        except CallFailed as exc:
            error = exc
        except BaseException:
            guard.release(ticket)  # no verdict on the resource
            raise
        else:
            if answer.__class__ is not NoAnswer:
                guard.result(ticket, ok=True)  # closes a half-open breaker
                return answer
            if answer is NoAnswer.NOT_RUN:
                guard.release(ticket)  # it never reached the resource: back to the gate
                continue
            failure = _unanswered(cell, call, answer, session)
            guard.release(ticket)
            raise CallFailed(failure)
        failure = error.failure
        if not failure.connection:
            guard.result(ticket, ok=True)  # the resource answered
            if failure.code is ErrorCode.TIMEOUT:
                cell.probe_soon(session)  # slow, or hung? the probe tells
            raise error
        if session == gate.session:  # every failure of this outage counts
            guard.result(ticket, ok=False)
        else:  # from a session before the last reconnect: that outage is over
            guard.release(ticket)
        now = trio.current_time()
        if attempt < len(delays) and now + delays[attempt] < deadline:
            log.warning("%s: %s (retry %d in %.3f s)", cell.name, failure.message,
                        attempt + 1, delays[attempt])
            seen = (failure, session)
            await trio.sleep(delays[attempt])
            attempt += 1
            continue
        cell.report_failure(failure, session)
        raise error


def _unanswered(cell: ActorCell, call: Call, answer: NoAnswer, session: int) -> Failure:
    """What a call that got no answer tells its caller (and the driver)."""
    op = call.op
    if answer is NoAnswer.CELL_ENDED:
        return Failure(ErrorCode.ACTOR_UNAVAILABLE, f"{op} refused: {cell.name} has stopped")
    seen = cell.actor.deadline_failure(op, call.timeout_s)
    if seen.connection:
        if session == cell.gate.session:
            cell.guard.result(None, ok=False)
        cell.report_failure(seen, session)
    else:
        # Only this call timed out, as far as we know. A query that merely runs long is
        # not a lost connection, but a hung server must be noticed now: probe.
        cell.probe_soon(session)
    # TIMEOUT, unless the actor says what that means for this operation (an order_send
    # cut off mid-flight: its outcome is unknown).
    code = (seen.code if seen.code is ErrorCode.ORDER_STATE_UNKNOWN else ErrorCode.TIMEOUT)
    return Failure(code, f"{op} failed: no answer before the call's deadline"
                   + ("" if seen.code is code else f" ({seen.code})"))
