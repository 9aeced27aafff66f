"""The supervision event: one schema for the log, QuestDB, the control channel and subscribers.

``{"seq", "ts", "actor", "kind", "from", "to", "attempt", "delay_s", "error", "data"}``
(DESIGN.md section 5). ``seq`` is assigned by the supervisor only, gap-free and strictly
increasing across runtime restarts. Fields a kind does not use are null; ``data`` holds
kind-specific detail (breaker name, missed counts...) and is omitted when empty.
"""

from __future__ import annotations

import enum
import json
import re
from datetime import datetime
from typing import Any

import attrs

from supervision.clock import iso, parse_iso

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class EventKind(enum.StrEnum):
    ACTOR_STARTED = "actor_started"
    ACTOR_STOPPED = "actor_stopped"
    STATE_CHANGED = "state_changed"
    ATTEMPT_FAILED = "attempt_failed"
    BACKOFF_SCHEDULED = "backoff_scheduled"
    ESCALATED = "escalated"
    RECOVERED = "recovered"
    PROBE_FAILED = "probe_failed"
    CIRCUIT_OPENED = "circuit_opened"
    CIRCUIT_HALF_OPEN = "circuit_half_open"
    CIRCUIT_CLOSED = "circuit_closed"
    DEGRADED_SERVED = "degraded_served"
    WORKER_ABANDONED = "worker_abandoned"
    ORDER_RECONCILED = "order_reconciled"
    RUNTIME_STARTED = "runtime_started"
    RUNTIME_STOPPED = "runtime_stopped"


@attrs.frozen
class Event:
    seq: int
    ts: datetime
    actor: str
    kind: str
    from_state: str | None = None
    to_state: str | None = None
    attempt: int | None = None
    delay_s: float | None = None
    error: dict[str, str] | None = None
    data: dict[str, Any] | None = None
    _line: str | None = attrs.field(default=None, init=False, eq=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seq": self.seq,
            "ts": iso(self.ts),
            "actor": self.actor,
            "kind": self.kind,
            "from": self.from_state,
            "to": self.to_state,
            "attempt": self.attempt,
            "delay_s": self.delay_s,
            "error": self.error,
        }
        if self.data:
            out["data"] = self.data
        return out

    def to_line(self) -> str:
        """The compact JSON text, encoded once per event (the log, the control channel's
        notifications and persistence all reuse it)."""
        text = self._line
        if text is None:
            text = json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False)
            if not text.isascii() and _LONE_SURROGATE.search(text):
                # Not UTF-8 (a file name decoded with surrogateescape in an error message):
                # escaped, the line can still be written, sent and stored.
                text = json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=True)
            object.__setattr__(self, "_line", text)
        return text

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Event:
        return cls(
            seq=int(obj["seq"]),
            ts=parse_iso(obj["ts"]),
            actor=obj["actor"],
            kind=obj["kind"],
            from_state=obj.get("from"),
            to_state=obj.get("to"),
            attempt=obj.get("attempt"),
            delay_s=obj.get("delay_s"),
            error=obj.get("error"),
            data=obj.get("data"),
        )
