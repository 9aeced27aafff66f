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

from supervision.errors import CallFailed, ErrorInfo, Response
from supervision.events import EventKind
from supervision.messages import Notice

if TYPE_CHECKING:
    from supervision.cell import ActorCell
    from supervision.clock import WallClock


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


class ChildHandle(Protocol):
    """What a ref holds: the child's name and its current cell (the supervisor's
    ``Child``)."""

    name: str

    @property
    def cell(self) -> ActorCell: ...


class ActorRef:
    """A caller's handle on one child. It talks to the child only through the cell's public
    surface (``bind``, ``call``, ``notify``, ``restart``, ``state``): the child's cell is
    replaced when it crashes, so the ref looks it up on every use."""

    def __init__(self, child: ChildHandle, lkg: LastKnownGood | None, wallclock: WallClock,
                 observers: list[CallObserver] | None = None) -> None:
        self._child = child
        self._lkg = lkg
        self._wallclock = wallclock
        self._observers = observers if observers is not None else []
        self.name = child.name

    @property
    def state(self) -> str:
        return str(self._child.cell.state)

    async def restart(self, reason: str = "operator") -> None:
        """Ask the child to reconnect now with a fresh budget (an operator restart)."""
        await self._child.cell.restart(reason)

    async def call(self, op: str, args: Mapping[str, Any] | None = None, *,
                   timeout_s: float | None = None) -> Response:
        cell = self._child.cell
        started = trio.current_time()
        lkg: LastKnownGood | None = None  # where this call's answer is remembered
        try:
            call = cell.bind(op, args or {}, timeout_s, started)
            if call.spec.cacheable:
                lkg = self._lkg
            value = await cell.call(call)
        except CallFailed as exc:
            failure = exc.failure
        else:
            if lkg is not None:
                lkg.remember(cache_key(self.name, op, call.args), value, trio.current_time())
            response = Response(status="ok", data=value)
            return self._observed(op, started, response) if self._observers else response
        info = failure.info(self.name, str(cell.state))
        if lkg is not None:
            degraded = self._degraded(lkg, op, call.args, cell, info)
            if degraded is not None:
                return self._observed(op, started, degraded)
        return self._observed(op, started, Response.failure(info, failure.reason))

    def _degraded(self, lkg: LastKnownGood, op: str, args: Mapping[str, Any],
                  cell: ActorCell, info: ErrorInfo) -> Response | None:
        """The last-known-good answer to a failed cacheable read, if there is one."""
        now = trio.current_time()
        hit = lkg.recall(cache_key(self.name, op, args), now)
        if hit is None:
            return None
        value, fetched_at = hit
        cell.notify(Notice(self.name, str(EventKind.DEGRADED_SERVED), now, error=info,
                           data={"op": op, "age_s": round(now - fetched_at, 6)}))
        return Response.degraded(value, self._wallclock.wall(fetched_at), info)

    def _observed(self, op: str, started: float, response: Response) -> Response:
        """Tell the call observers (metrics) how the call went."""
        if self._observers:
            elapsed = trio.current_time() - started
            for observe in self._observers:
                observe(self.name, op, response.status, elapsed)
        return response
