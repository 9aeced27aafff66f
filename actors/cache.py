"""The cache actor: last-known-good values with a TTL and a size bound.

Two users: the bot (``rt.cache.get/put/delete/stats`` through the actor's mailbox, like any
actor) and the other actors' call path, which remembers successful cacheable reads and
answers from them while a resource is down. The second path reads and writes the store
directly on the trio thread (``LastKnownGood`` protocol): it is in-process memory owned by
this actor, and a mailbox hop on every successful read would only add latency.

Entries expire ``ttl_s`` after they were stored; beyond ``max_entries`` the least recently
used entry is evicted. Times are trio times given by the caller, so tests run on a virtual
clock.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

import attrs
import trio

from supervision.actor import READ_UNCACHED, WRITE, Actor, OpSpec
from supervision.errors import ErrorCode, Failure, Response, describe, operation_message
from supervision.ref import ActorRef


@attrs.define
class CacheStats:
    hits: int = 0
    misses: int = 0
    expired: int = 0
    evictions: int = 0
    stores: int = 0

    def to_json(self) -> dict[str, int]:
        return attrs.asdict(self)


class TtlCache:
    def __init__(self, *, ttl_s: float = 300.0, max_entries: int = 10_000) -> None:
        if ttl_s <= 0 or max_entries < 1:
            raise ValueError("ttl_s must be > 0 and max_entries >= 1")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[Hashable, tuple[Any, float]] = (
            collections.OrderedDict())
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, key: Hashable, value: Any, now: float) -> None:
        entries = self._entries
        if key in entries:
            entries.move_to_end(key)
        entries[key] = (value, now)
        self.stats.stores += 1
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
            self.stats.evictions += 1

    def recall(self, key: Hashable, now: float) -> tuple[Any, float] | None:
        hit = self._entries.get(key)
        if hit is None:
            self.stats.misses += 1
            return None
        if now - hit[1] > self.ttl_s:
            del self._entries[key]
            self.stats.expired += 1
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return hit

    def forget(self, key: Hashable) -> bool:
        return self._entries.pop(key, None) is not None

    def clear(self) -> None:
        self._entries.clear()

    def purge_expired(self, now: float) -> int:
        stale = [k for k, (_, at) in self._entries.items() if now - at > self.ttl_s]
        for key in stale:
            del self._entries[key]
        self.stats.expired += len(stale)
        return len(stale)


class CacheMiss(KeyError):
    pass


def _user_key(key: str) -> tuple[str, str]:
    return ("user", key)


class CacheActor(Actor):
    """Serves ``get``/``put``/``delete``/``stats``/``clear``; purges expired entries on its
    health interval."""

    ops: ClassVar[Mapping[str, OpSpec]] = {
        "get": READ_UNCACHED,
        "put": WRITE,
        "delete": WRITE,
        "stats": READ_UNCACHED,
        "clear": WRITE,
    }

    def __init__(self, store: TtlCache, name: str = "cache") -> None:
        self.store = store
        self.name = name

    async def probe(self) -> None:
        self.store.purge_expired(trio.current_time())

    async def handle(self, op: str, args: Mapping[str, Any]) -> Any:
        now = trio.current_time()
        store = self.store
        if op == "get":
            hit = store.recall(_user_key(_key(args)), now)
            if hit is None:
                raise CacheMiss(args.get("key"))
            return hit[0]
        if op == "put":
            store.remember(_user_key(_key(args)), args.get("value"), now)
            return True
        if op == "delete":
            return store.forget(_user_key(_key(args)))
        if op == "stats":
            return {"entries": len(store), "ttl_s": store.ttl_s,
                    "max_entries": store.max_entries, **store.stats.to_json()}
        if op == "clear":
            store.clear()
            return True
        raise ValueError(f"unknown operation {op!r}")

    def classify(self, exc: BaseException, op: str) -> Failure:
        if isinstance(exc, CacheMiss):
            return Failure(ErrorCode.NOT_FOUND, f"{op} failed: no entry for key {exc.args[0]!r}")
        if isinstance(exc, TypeError | ValueError):
            return Failure(ErrorCode.INVALID_REQUEST, operation_message(op, describe(exc)))
        return Failure(ErrorCode.INTERNAL, operation_message(op, describe(exc)))

    def status_extra(self) -> dict[str, Any]:
        return {"entries": len(self.store), **self.store.stats.to_json()}


def _key(args: Mapping[str, Any]) -> str:
    key = args.get("key")
    if not isinstance(key, str) or not key:
        raise TypeError("key must be a non-empty string")
    return key


class CacheRef(ActorRef):
    async def get(self, key: str, *, timeout_s: float | None = None) -> Response:
        return await self.call("get", {"key": key}, timeout_s=timeout_s)

    async def put(self, key: str, value: Any, *, timeout_s: float | None = None) -> Response:
        return await self.call("put", {"key": key, "value": value}, timeout_s=timeout_s)

    async def delete(self, key: str, *, timeout_s: float | None = None) -> Response:
        return await self.call("delete", {"key": key}, timeout_s=timeout_s)

    async def stats(self) -> Response:
        return await self.call("stats")
