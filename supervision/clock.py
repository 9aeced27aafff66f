"""Wall-clock timestamps derived from trio's clock.

Timings are driven by ``trio.current_time()`` (virtual under ``MockClock``). Event and status
timestamps must be UTC wall time, yet agree with the schedule exactly: ``WallClock`` anchors
trio time to the wall clock once, then maps every later trio time onto it. Under a virtual
clock, a 30 s probe interval is exactly 30 s apart in the event ``ts`` as well.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import attrs


@attrs.frozen
class WallClock:
    trio_anchor: float
    wall_anchor: float  # seconds since the epoch at trio_anchor

    @classmethod
    def anchored_now(cls) -> WallClock:
        import trio

        return cls(trio_anchor=trio.current_time(), wall_anchor=time.time())

    def wall(self, trio_time: float) -> datetime:
        seconds = self.wall_anchor + (trio_time - self.trio_anchor)
        # Build from whole microseconds so 30.0 s apart stays exactly 30.0 s apart.
        micros = round(seconds * 1_000_000)
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
