"""What the servers need of a runtime: the control channel, ``/health``, ``/metrics`` and
the operator's page depend on this protocol, not on the concrete ``Runtime``.

That keeps the dependency one way (``runtime`` starts the servers; the servers never import
``runtime``) and lets a test serve a hand-made runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from supervision.bus import EventBus
    from supervision.errors import Response
    from supervision.shell.config import RuntimeConfig
    from supervision.supervisor import Supervisor


class RuntimeSurface(Protocol):
    config: RuntimeConfig
    supervisor: Supervisor
    events: EventBus
    store: Any  # the cache's store: health reports its size
    started_at: float  # trio time
    endpoints: dict[str, tuple[str, int]]  # "control" / "health" -> the bound (host, port)
    # Health fails (503) when every one of these present is in ERROR: the runtime can then
    # serve nothing but cached answers.
    essential: frozenset[str]

    def status(self) -> dict[str, Any]:
        """The ``runtime.status`` result."""
        ...

    def health(self) -> tuple[int, dict[str, Any]]:
        """``(http_status, document)`` of DESIGN section 7; does no I/O."""
        ...

    async def call(self, actor: str, op: str, args: dict[str, Any] | None = None,
                   timeout_s: float | None = None) -> Response:
        """``actor.call`` from outside the process (free-form SQL is marked as such)."""
        ...

    async def restart(self, name: str) -> None:
        """``actor.restart``: a fresh budget and an attempt now."""
        ...

    async def inject(self, fault: str, *, actor: str = "mt5", duration_s: float | None = None,
                     **params: Any) -> None:
        """``sim.inject``; ``ValueError`` for what cannot be done."""
        ...

    def request_shutdown(self) -> None:
        """``runtime.shutdown``: ask the runtime to stop, in order."""
        ...

    async def wait_shutdown(self) -> None:
        ...
