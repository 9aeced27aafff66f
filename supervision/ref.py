"""The caller's handle on an actor: every call returns a ``Response``, never raises for a
resource failure.

Rules (DESIGN.md section 4): a cacheable read that succeeds is remembered as last-known-good;
one that fails or is refused is answered from it (``degraded`` with ``cached_at``) if it is
there, else with the error. Writes are never served from the cache. Every call has a
deadline (``timeout_s``, default ``call_timeout_s``); none waits without one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import trio

from supervision.cell import CallRejected
from supervision.errors import ErrorCode, ErrorInfo, Response
from supervision.events import EventKind
from supervision.messages import Notice

if TYPE_CHECKING:
    from supervision.clock import WallClock
    from supervision.supervisor import Child


class LastKnownGood(Protocol):
    """Where successful reads are remembered (the cache actor's store)."""

    def remember(self, key: Hashable, value: Any, now: float) -> None: ...

    def recall(self, key: Hashable, now: float) -> tuple[Any, float] | None:
        """The value and the trio time it was fetched, or None (absent or expired)."""
        ...


def cache_key(actor: str, op: str, args: Mapping[str, Any]) -> Hashable:
    """One key per (actor, op, arguments). Flat arguments (the common case: a symbol, a
    key) make a tuple, which is cheap; nested ones (an order request) go through JSON."""
    try:
        key = (actor, op, tuple(sorted(args.items())))
        hash(key)
        return key
    except TypeError:
        return f"{actor}:{op}:" + json.dumps(args, sort_keys=True, default=repr,
                                            separators=(",", ":"))


CallObserver = Callable[[str, str, str, float], None]  # actor, op, status, seconds


class ActorRef:
    def __init__(self, child: Child, lkg: LastKnownGood | None, wallclock: WallClock,
                 observers: list[CallObserver] | None = None) -> None:
        self._child = child
        self._lkg = lkg
        self._wallclock = wallclock
        self._observers = observers if observers is not None else []
        self.name = child.name

    @property
    def state(self) -> str:
        return str(self._child.cell.state)

    async def call(self, op: str, args: Mapping[str, Any] | None = None, *,
                   timeout_s: float | None = None) -> Response:
        cell = self._child.cell
        args = args or {}
        now = trio.current_time()
        timeout = cell.settings.call_timeout_s if timeout_s is None else timeout_s
        if not timeout > 0:
            return self._observed(op, now, Response.failure(ErrorInfo(
                ErrorCode.INVALID_REQUEST, f"{op} failed: timeout_s must be > 0",
                self.name, str(cell.state))))
        spec = cell.actor.ops.get(op)
        remember = spec is not None and spec.cacheable and self._lkg is not None
        try:
            value = await cell.call(op, args, now + timeout)
        except CallRejected as rejected:
            info = rejected.info
            reason = rejected.reason
        else:
            if remember:
                self._lkg.remember(cache_key(self.name, op, args), value,  # type: ignore[union-attr]
                                   trio.current_time())
            response = Response(status="ok", data=value)
            return self._observed(op, now, response) if self._observers else response
        if remember:
            later = trio.current_time()
            hit = self._lkg.recall(cache_key(self.name, op, args), later)  # type: ignore[union-attr]
            if hit is not None:
                value, fetched_at = hit
                cell._notice_nowait(Notice(
                    self.name, str(EventKind.DEGRADED_SERVED), later,
                    error=info, data={"op": op, "age_s": round(later - fetched_at, 6)}))
                return self._observed(op, now, Response.degraded(
                    value, self._wallclock.wall(fetched_at), info))
        return self._observed(op, now, Response.failure(info, reason))

    def _observed(self, op: str, started: float, response: Response) -> Response:
        """Tell the call observers (metrics) how the call went."""
        if self._observers:
            elapsed = trio.current_time() - started
            for observe in self._observers:
                observe(self.name, op, response.status, elapsed)
        return response
