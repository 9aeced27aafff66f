"""The cache's budgets: the bot's entries apart from remembered answers, one namespace per
actor, and remembered answers bounded in bytes (issue 9, finding 1)."""

from __future__ import annotations

from actors.cache import TtlCache, approx_size
from supervision.ref import cache_key


def answer_key(actor: str, n: int) -> object:
    return cache_key(actor, "fetch", {"sql": f"SELECT {n}", "params": []})


def test_remembered_answers_never_evict_the_bots_entries() -> None:
    store = TtlCache(ttl_s=60.0, max_entries=10)
    for n in range(10):
        store.put(f"bot-{n}", n, now=0.0)
    for n in range(1000):
        store.remember(answer_key("questdb", n), [{"n": n}], now=1.0)
    assert [store.get(f"bot-{n}", now=2.0) for n in range(10)] == [
        (n, 0.0) for n in range(10)]
    # The answers' own namespace keeps only its newest max_entries.
    assert store.recall(answer_key("questdb", 999), now=2.0) == ([{"n": 999}], 1.0)
    assert store.recall(answer_key("questdb", 0), now=2.0) is None


def test_one_actors_answers_do_not_evict_anothers() -> None:
    store = TtlCache(ttl_s=60.0, max_entries=5)
    tick = cache_key("mt5", "symbol_info_tick", {"symbol": "EURUSD"})
    store.remember(tick, {"bid": 1.1}, now=0.0)
    for n in range(100):
        store.remember(answer_key("questdb", n), n, now=1.0)
    assert store.recall(tick, now=2.0) == ({"bid": 1.1}, 0.0)


def test_remembered_answers_are_bounded_in_bytes() -> None:
    store = TtlCache(ttl_s=60.0, max_entries=10_000, max_bytes=1_000_000,
                     max_entry_bytes=200_000)
    for n in range(50):
        store.remember(answer_key("questdb", n), "x" * 100_000, now=0.0)
    assert store.bytes <= 1_000_000
    assert store.stats.evictions >= 40
    assert store.recall(answer_key("questdb", 49), now=1.0) is not None
    # An answer over max_entry_bytes is not kept, and takes its older value with it.
    key = answer_key("questdb", 49)
    store.remember(key, "y" * 5_000_000, now=2.0)
    assert store.recall(key, now=3.0) is None
    assert store.stats.too_large == 1
    assert store.bytes <= 1_000_000


def test_size_estimate_counts_nested_rows_and_stops_at_the_limit() -> None:
    rows = [{"sym": "EURUSD", "px": 1.1, "note": "z" * 1000} for _ in range(100)]
    size = approx_size(rows, limit=10**9)
    assert size > 100 * 1000
    assert approx_size(rows, limit=5_000) <= 5_000 + 2_000  # stopped early


def test_forget_clear_and_purge_keep_the_byte_count_right() -> None:
    store = TtlCache(ttl_s=10.0, max_entries=100, max_bytes=10_000_000)
    store.remember(answer_key("questdb", 1), "a" * 1000, now=0.0)
    store.remember(answer_key("questdb", 2), "b" * 1000, now=5.0)
    store.remember(answer_key("questdb", 2), "c" * 2000, now=6.0)  # replaced, not added
    assert 3000 <= store.bytes < 3400
    assert store.purge_expired(now=12.0) == 1
    assert 2000 <= store.bytes < 2200
    assert store.forget(answer_key("questdb", 2))
    assert store.bytes == 0 and len(store) == 0
    store.put("k", "v", now=0.0)
    store.remember(answer_key("questdb", 3), "d", now=0.0)
    store.clear()
    assert len(store) == 0 and store.bytes == 0
