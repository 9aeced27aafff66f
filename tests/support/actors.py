"""Shared test helpers: a supervised tree on a temporary log, and scriptable actors."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import trio

from supervision.actor import READ, WRITE, Actor, OpSpec
from supervision.errors import ErrorCode, Failure
from supervision.eventlog import EventLog
from supervision.events import Event
from supervision.supervisor import Supervisor


class ResourceDown(ConnectionError):
    pass


class FlakyResource:
    """A pretend external resource the tests switch on and off."""

    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.connects: list[float] = []  # trio times of connect attempts
        self.probes: list[float] = []
        self.calls = 0
        self.value = 0


class FlakyActor(Actor):
    ops: ClassVar[Mapping[str, OpSpec]] = {"read": READ, "write": WRITE}

    def __init__(self, resource: FlakyResource) -> None:
        self.resource = resource
        self.connected = False

    async def connect(self) -> None:
        self.resource.connects.append(trio.current_time())
        if not self.resource.up:
            raise ResourceDown("connection refused")
        self.connected = True

    async def release(self) -> None:
        self.connected = False

    async def probe(self) -> None:
        self.resource.probes.append(trio.current_time())
        if not self.resource.up:
            raise ResourceDown("probe: connection refused")

    async def handle(self, op: str, args: Mapping[str, Any]) -> Any:
        self.resource.calls += 1
        if not self.resource.up:
            raise ResourceDown(f"{op}: connection reset")
        if op == "read":
            return {"value": self.resource.value}
        self.resource.value = args.get("value", 0)
        return True

    def classify(self, exc: BaseException, op: str) -> Failure:
        if isinstance(exc, ConnectionError):
            return Failure(ErrorCode.DB_UNAVAILABLE, f"{op} failed: {exc}", connection=True)
        return super().classify(exc, op)


@contextlib.asynccontextmanager
async def running_supervisor(tmp_path: Path, *, log_path: Path | None = None,
                             log_kwargs: dict[str, Any] | None = None,
                             **kwargs: Any) -> AsyncIterator[Supervisor]:
    """A supervisor on a fresh log (fsync "never": tests do not need durability), shut
    down in order when the block ends."""
    log = EventLog(log_path or tmp_path / "events.jsonl", fsync="never", **(log_kwargs or {}))
    log.open()
    try:
        async with trio.open_nursery() as nursery:
            sup = Supervisor(log=log, **kwargs)
            await nursery.start(sup.run)
            try:
                yield sup
            finally:
                with trio.CancelScope(shield=True), trio.fail_after(60):
                    await sup.shutdown()
    finally:
        log.close()


class Recorder:
    """Collects every published event (an in-process subscriber)."""

    def __init__(self, sup: Supervisor) -> None:
        self.events: list[Event] = []
        self._sub = sup.bus.open_subscription(since_seq=0, buffer=100_000)

    async def run(self) -> None:
        async for item in self._sub:
            if isinstance(item, Event):
                self.events.append(item)

    def of(self, actor: str, *kinds: str) -> list[Event]:
        return [e for e in self.events if e.actor == actor and (not kinds or e.kind in kinds)]

    async def wait_for(  # type: ignore[no-untyped-def]
        self, predicate, timeout: float = 600.0  # noqa: ASYNC109 - a test helper's bound
    ) -> Event:
        with trio.fail_after(timeout):
            while True:
                for e in self.events:
                    if predicate(e):
                        return e
                await trio.sleep(0.001)
