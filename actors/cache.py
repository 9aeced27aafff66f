"""The cache actor: last-known-good values with a TTL and a size bound.

Two users: the bot (``rt.cache.get/put/delete/stats`` through the actor's mailbox, like any
actor) and the other actors' call path, which remembers successful cacheable reads and
answers from them while a resource is down. The second path reads and writes the store
directly on the trio thread (``LastKnownGood`` protocol): it is in-process memory owned by
this actor, and a mailbox hop on every successful read would only add latency.

Entries expire ``ttl_s`` after they were stored; beyond ``max_entries`` the least recently
used entry is evicted. The bot's entries and each actor's remembered answers are separate
namespaces with separate budgets, and remembered answers are bounded in bytes too, so
ad-hoc queries from the control channel can neither evict what the bot cached nor grow
memory without bound. Times are trio times given by the caller, so tests run on a virtual
clock.
"""

from __future__ import annotations

import collections
import sys
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
    too_large: int = 0  # answers not kept: bigger than max_entry_bytes

    def to_json(self) -> dict[str, int]:
        return attrs.asdict(self)


def approx_size(value: Any, limit: int) -> int:
    """Bytes ``value`` holds, estimated with ``sys.getsizeof`` over its containers (shared
    objects counted once per reference: an upper bound). Stops counting past ``limit``, so
    measuring a huge answer costs no more than measuring ``limit`` bytes of it."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        total += sys.getsizeof(item)
        if total > limit:
            return total
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
    return total


class _Partition:
    """One LRU namespace: bounded in entries and, when ``max_bytes`` is set, in bytes."""

    def __init__(self, stats: CacheStats, max_entries: int, max_bytes: int | None,
                 max_entry_bytes: int | None) -> None:
        self.stats = stats
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.entries: collections.OrderedDict[Hashable, tuple[Any, float, int]] = (
            collections.OrderedDict())
        self.bytes = 0

    def remember(self, key: Hashable, value: Any, now: float) -> None:
        size = 0
        if self.max_bytes is not None:
            limit = min(self.max_bytes, self.max_entry_bytes or self.max_bytes)
            size = approx_size(value, limit)
            if size > limit:
                # Too big to keep: an older, smaller answer for the same key would now be
                # stale, so it goes too.
                self.forget(key)
                self.stats.too_large += 1
                return
        self.forget(key)
        self.entries[key] = (value, now, size)
        self.bytes += size
        self.stats.stores += 1
        while len(self.entries) > self.max_entries or (
                self.max_bytes is not None and self.bytes > self.max_bytes):
            _, (_, _, dropped) = self.entries.popitem(last=False)
            self.bytes -= dropped
            self.stats.evictions += 1

    def recall(self, key: Hashable, now: float, ttl_s: float) -> tuple[Any, float] | None:
        hit = self.entries.get(key)
        if hit is None:
            self.stats.misses += 1
            return None
        if now - hit[1] > ttl_s:
            self.forget(key)
            self.stats.expired += 1
            self.stats.misses += 1
            return None
        self.entries.move_to_end(key)
        self.stats.hits += 1
        return hit[0], hit[1]

    def forget(self, key: Hashable) -> bool:
        hit = self.entries.pop(key, None)
        if hit is None:
            return False
        self.bytes -= hit[2]
        return True

    def purge_expired(self, now: float, ttl_s: float) -> int:
        stale = [k for k, (_, at, _) in self.entries.items() if now - at > ttl_s]
        for key in stale:
            self.forget(key)
        return len(stale)


def _partition_name(key: Hashable) -> str:
    """The actor a last-known-good key belongs to (``supervision.ref.cache_key``'s shapes:
    ``(actor, op, args)`` or ``"actor:op:json"``)."""
    if isinstance(key, tuple) and key and isinstance(key[0], str):
        return key[0]
    if isinstance(key, str):
        return key.split(":", 1)[0]
    return ""


class TtlCache:
    """The cache actor's store: the bot's own entries and, apart from them, one
    last-known-good namespace per actor.

    The bot's entries (``put``/``get``) are bounded by ``max_entries`` and are never
    evicted to make room for remembered answers. Each actor's remembered answers
    (``remember``/``recall``, the ``LastKnownGood`` protocol) have their own
    ``max_entries`` and ``max_bytes``; an answer over ``max_entry_bytes`` is not kept. So
    a flood of ad-hoc queries evicts only older ad-hoc answers of the same actor."""

    def __init__(self, *, ttl_s: float = 300.0, max_entries: int = 10_000,
                 max_bytes: int = 64 * 1024 * 1024, max_entry_bytes: int = 1024 * 1024) -> None:
        if ttl_s <= 0 or max_entries < 1 or max_bytes < 1 or max_entry_bytes < 1:
            raise ValueError("ttl_s must be > 0, max_entries, max_bytes and max_entry_bytes "
                             ">= 1")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.stats = CacheStats()
        self.user = _Partition(self.stats, max_entries, None, None)
        self._answers: dict[str, _Partition] = {}

    def __len__(self) -> int:
        return len(self.user.entries) + sum(len(p.entries) for p in self._answers.values())

    @property
    def bytes(self) -> int:
        """Estimated bytes held by remembered answers (the bot's entries are not sized)."""
        return sum(p.bytes for p in self._answers.values())

    # ------------------------------------------------------------------ last-known-good
    def remember(self, key: Hashable, value: Any, now: float) -> None:
        name = _partition_name(key)
        partition = self._answers.get(name)
        if partition is None:
            partition = self._answers[name] = _Partition(
                self.stats, self.max_entries, self.max_bytes, self.max_entry_bytes)
        partition.remember(key, value, now)

    def recall(self, key: Hashable, now: float) -> tuple[Any, float] | None:
        partition = self._answers.get(_partition_name(key))
        if partition is None:
            self.stats.misses += 1
            return None
        return partition.recall(key, now, self.ttl_s)

    def forget(self, key: Hashable) -> bool:
        partition = self._answers.get(_partition_name(key))
        return partition is not None and partition.forget(key)

    # ------------------------------------------------------------------ the bot's entries
    def put(self, key: str, value: Any, now: float) -> None:
        self.user.remember(key, value, now)

    def get(self, key: str, now: float) -> tuple[Any, float] | None:
        return self.user.recall(key, now, self.ttl_s)

    def delete(self, key: str) -> bool:
        return self.user.forget(key)

    # ------------------------------------------------------------------ both
    def clear(self) -> None:
        self.user.entries.clear()
        self.user.bytes = 0
        self._answers.clear()

    def purge_expired(self, now: float) -> int:
        purged = self.user.purge_expired(now, self.ttl_s) + sum(
            p.purge_expired(now, self.ttl_s) for p in self._answers.values())
        self.stats.expired += purged
        return purged


class CacheMiss(KeyError):
    pass


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
            hit = store.get(_key(args), now)
            if hit is None:
                raise CacheMiss(args.get("key"))
            return hit[0]
        if op == "put":
            store.put(_key(args), args.get("value"), now)
            return True
        if op == "delete":
            return store.delete(_key(args))
        if op == "stats":
            return {"entries": len(store), "ttl_s": store.ttl_s,
                    "max_entries": store.max_entries, "bytes": store.bytes,
                    "max_bytes": store.max_bytes, **store.stats.to_json()}
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
        return {"entries": len(self.store), "bytes": self.store.bytes,
                **self.store.stats.to_json()}


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
