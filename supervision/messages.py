"""Messages that actors send to their supervisor over memory channels.

Nothing learns an actor's state by polling a shared variable: every transition and every
notable happening travels as one of these frozen values. The supervisor numbers them
(``seq``), writes them to the log, then publishes them as ``Event``s.
"""

from __future__ import annotations

from typing import Any

import attrs

from supervision.errors import ErrorInfo
from supervision.events import EventKind
from supervision.states import Action, ConnectionState, ConnectionStatus, Input


@attrs.frozen
class StateChanged:
    actor: str
    from_state: str
    to_state: str
    reason: str
    error: ErrorInfo | None
    at: float  # trio time
    attempt: int | None = None
    delay_s: float | None = None
    next_at: float | None = None  # trio time of the next attempt/probe, if any


@attrs.frozen
class Notice:
    """Everything that is not a state change: attempt_failed, circuit_opened, ..."""

    actor: str
    kind: str
    at: float
    attempt: int | None = None
    delay_s: float | None = None
    error: ErrorInfo | None = None
    data: dict[str, Any] | None = None
    next_at: float | None = None


CHECK_CHANGED = "check_changed"
CHECK_STATUSES = ("pass", "warn", "fail")


def check_notice(actor: str, check: str, status: str, output: str, at: float,
                 observed: Any = None) -> Notice:
    """An actor's own named health check changed (e.g. ``events_store`` ``table``: fail,
    "suspended..."). The supervisor keeps the latest per ``(actor, check)`` in its status
    view; health shows it as ``<actor>:<check>``. Send it when the status or output changes,
    not on every evaluation: each one is a logged event."""
    if status not in CHECK_STATUSES:
        raise ValueError(f"check status must be one of {CHECK_STATUSES}, not {status!r}")
    data: dict[str, Any] = {"check": check, "status": status, "output": output}
    if observed is not None:
        data["observed"] = observed
    return Notice(actor, CHECK_CHANGED, at, data=data)


Message = StateChanged | Notice


def transition_messages(actor: str, old: ConnectionStatus,
                        new: ConnectionStatus, event: Input,
                        actions: tuple[Action, ...],
                        reason: str, error: ErrorInfo | None, now: float) -> list[Message]:
    """What the supervisor is told about one step of the connection machine, in order
    (pure: the driver sends them). A RECONNECTING -> RECONNECTING step is no state change:
    it is told as ``backoff_scheduled`` only."""
    out: list[Message] = []
    if new.state is not old.state:
        # RECONNECTING: the attempt scheduled next; ERROR: the attempts spent.
        attempt = new.budget.used if new.state is ConnectionState.ERROR else new.attempt
        out.append(StateChanged(actor, str(old.state), str(new.state), reason, error, now,
                                attempt=attempt or None, delay_s=new.delay_s,
                                next_at=new.next_at))
    if Action.SCHEDULE_ATTEMPT in actions or Action.ATTEMPT_NOW in actions:
        out.append(Notice(actor, str(EventKind.BACKOFF_SCHEDULED), now, attempt=new.attempt,
                          delay_s=new.delay_s, next_at=new.next_at))
    if event is Input.PROBE_FAILED:
        out.append(Notice(actor, str(EventKind.PROBE_FAILED), now, error=error,
                          delay_s=new.delay_s, next_at=new.next_at))
    if Action.ESCALATE in actions:
        out.append(Notice(actor, str(EventKind.ESCALATED), now, error=error,
                          next_at=new.next_at))
    if Action.RECOVERED in actions:
        out.append(Notice(actor, str(EventKind.RECOVERED), now))
    return out
