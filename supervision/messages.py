"""Messages that actors send to their supervisor over memory channels.

Nothing learns an actor's state by polling a shared variable: every transition and every
notable happening travels as one of these frozen values. The supervisor numbers them
(``seq``), writes them to the log, then publishes them as ``Event``s.
"""

from __future__ import annotations

from typing import Any

import attrs

from supervision.errors import ErrorInfo


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


Message = StateChanged | Notice
