"""What an actor is: the interface every supervised child implements.

An actor owns one resource and is the only code that touches it. The supervision core
drives it through five hooks and never looks inside:

* ``lifetime()`` — an async context around the actor's whole life in the tree (e.g. the
  ``trio_asyncio`` loop the QuestDB pool lives in). Entered once per instance: restarts
  are fresh, so every connect attempt runs a new instance from the child's factory.
* ``connect()`` / ``release()`` — acquire and drop the resource. ``connect`` raises on
  failure; ``release`` must not raise and is bounded by the supervisor.
* ``probe()`` — a cheap liveness check run every ``health_interval_s`` while CONNECTED, and
  (after ``connect()``) as the recovery probe in ERROR. Raises on failure.
* ``serve()`` — the actor's own long-running work while CONNECTED (a bot's strategy loop).
  Returning means the actor exited normally; raising means it failed.
* ``handle(op, args)`` — perform one request against the live resource. Raises on failure.
* ``classify(exc, op)`` — turn an exception into a ``Failure`` (code, message, whether the
  resource is lost). One place per actor, so one breaker and one backoff serve every actor.

Operations are declared in ``ops``: which are cacheable reads (answered from the
last-known-good cache while the resource is down) and which are idempotent (retried on
connection errors when the actor has ``retry_delays_s``). Writes are neither by default.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, ClassVar

import attrs
import trio

from supervision.errors import ErrorCode, Failure, describe, operation_message
from supervision.messages import Notice


class RestartType(enum.StrEnum):
    """When a child whose ``serve()`` ended is started again (OTP's restart types)."""

    PERMANENT = "permanent"  # always
    TRANSIENT = "transient"  # only after a failure (serve raised)
    TEMPORARY = "temporary"  # never


@attrs.frozen
class OpSpec:
    cacheable: bool = False
    idempotent: bool = False
    # Changes nothing: open to unauthenticated loopback clients of the control channel.
    read: bool = False


READ = OpSpec(cacheable=True, idempotent=True, read=True)
READ_UNCACHED = OpSpec(cacheable=False, idempotent=True, read=True)
WRITE = OpSpec()


class Actor:
    name: str = "actor"
    ops: ClassVar[Mapping[str, OpSpec]] = {}
    # How many requests run at once. 1: strictly in mailbox order.
    concurrency: int = 1
    _notify: Callable[[Notice], None] | None = None  # set by ``attach``

    @contextlib.asynccontextmanager
    async def lifetime(self) -> AsyncIterator[None]:
        yield

    async def connect(self) -> None:
        """Acquire the resource."""

    async def release(self) -> None:
        """Drop the resource. Must not raise."""

    async def probe(self) -> None:
        """Raise if the resource is not alive."""

    async def serve(self) -> None:
        await trio.sleep_forever()

    async def handle(self, op: str, args: Mapping[str, Any]) -> Any:
        raise NotImplementedError(op)

    def classify(self, exc: BaseException, op: str) -> Failure:
        return Failure(ErrorCode.INTERNAL, operation_message(op, describe(exc)))

    def deadline_failure(self, op: str, timeout_s: float) -> Failure:
        """What a request that ran past its deadline means for this resource. Default: only
        this call timed out; a terminal actor overrides it (a hung terminal is lost)."""
        return Failure(ErrorCode.TIMEOUT, f"{op} failed: no answer within {timeout_s:g} s")

    def attach(self, name: str, notify: Callable[[Notice], None]) -> None:
        """Called by the cell before the instance runs: its name in the tree, and where
        its notices go."""
        self.name = name
        self._notify = notify

    def notify(self, notice: Notice) -> None:
        """Publish a supervision event about this actor (a no-op until the cell attaches
        it). Never blocks: the event is queued and sent by the cell's notice task."""
        sink = self._notify
        if sink is not None:
            sink(notice)

    def status_extra(self) -> dict[str, Any]:
        """Actor-specific figures for status and health (no I/O)."""
        return {}
