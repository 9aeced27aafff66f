"""The QuestDB actor and event persistence against a real QuestDB 9.3 (``../shared/questdb``).

What the PostgreSQL suite (test_questdb_actor, test_event_persistence, test_db_errors) proves,
proven again on QuestDB itself, plus QuestDB's own semantics (SQLSTATE 00000 errors, WAL
visibility, suspended WAL tables, DEDUP). What landed is read back through QuestDB's HTTP
``/exec`` (``QuestdbServer.rows``), never through asyncpg.

Tests that leave the server running share one per module (``questdb``); tests that stop,
kill or pause it start their own (``questdb_factory``). Real time throughout.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trio

from actors.questdb import persistence
from actors.questdb.errors import classify_db_error
from supervision.breaker import BreakerState
from supervision.errors import ErrorCode, Response
from supervision.shell.config import RuntimeConfig
from supervision.shell.health import health_document
from supervision.shell.runtime import Runtime, open_runtime
from supervision.supervisor import ChildSpec
from tests.support.questdb_server import PASSWORD, QuestdbServer
from tests.support.waiting import eventually, in_thread
from tests.test_event_persistence import flapper, log_lines, runtime_config, store_of
from tests.test_questdb_actor import (
    RETRY_DELAYS,
    assert_unavailable,
    fast_settings,
    on_time,
    questdb_tree,
    retry_records,
    timed,
)

pytestmark = [pytest.mark.realserver, pytest.mark.slow]

TABLE = "supervision_events"
UNAVAILABLE = {ErrorCode.DB_UNAVAILABLE, ErrorCode.ACTOR_UNAVAILABLE, ErrorCode.CIRCUIT_OPEN,
               ErrorCode.TIMEOUT}


async def exec_rows(server: QuestdbServer, sql: str) -> list[dict[str, Any]]:
    return await in_thread(lambda: server.rows(sql))


async def table_seqs(server: QuestdbServer) -> list[int]:
    return await in_thread(lambda: server.seqs(TABLE))


async def drop_events_table(server: QuestdbServer) -> None:
    await in_thread(lambda: server.exec(f"DROP TABLE IF EXISTS {TABLE}"))


@contextlib.asynccontextmanager
async def questdb_runtime(state_dir: Path, dsn: str, children: Sequence[ChildSpec] = (),
                          ) -> AsyncIterator[Runtime]:
    async with open_runtime(runtime_config(state_dir, dsn), children=children) as rt:
        yield rt


async def persisted_up_to_log(rt: Runtime, server: QuestdbServer, limit_s: float = 20.0
                              ) -> list[int]:
    """Until the table (read over HTTP, WAL applied) holds every seq the log has, quietly."""
    log = rt.supervisor.log
    with trio.fail_after(limit_s):
        while True:
            last = log.last_seq
            seqs = await table_seqs(server)
            if seqs and max(seqs) >= last and store_of(rt).persisted_seq >= last:
                await trio.sleep(0.3)
                if log.last_seq == last:
                    return await table_seqs(server)
            await trio.sleep(0.1)


def assert_exactly_once(seqs: list[int], last: int) -> None:
    assert len(seqs) == len(set(seqs)), "a seq is doubled"
    assert seqs == list(range(1, last + 1)), "a seq is missing"


def health_check(rt: Runtime, key: str) -> dict[str, Any] | None:
    _, doc = health_document(rt)
    entries = doc["checks"].get(key)
    return entries[0] if entries else None


# ============================================================================ shared server
async def test_each_op_then_other_statements_on_the_same_pooled_connection(
        tmp_path: Path, questdb: QuestdbServer) -> None:
    """QuestDB left unnamed portals behind after fetchval/fetchrow with the statement cache
    off; with the actor's settings every op is followed by others on one connection."""
    async with questdb_tree(tmp_path, questdb.dsn, fast_settings(),
                            pool_max_size=1) as t:
        ref = t.ref
        assert t.actor.dialect.is_questdb and "QuestDB" in t.actor.server_version
        assert (await ref.execute("CREATE TABLE quotes (sym SYMBOL, px DOUBLE, n LONG, "
                                  "ts TIMESTAMP) TIMESTAMP(ts) PARTITION BY DAY WAL")).ok
        rows = [("EURUSD", 1.0 + i / 100, i) for i in range(20)]
        many = await ref.executemany(
            "INSERT INTO quotes VALUES ($1, $2, $3, now())", [list(r) for r in rows])
        assert many.ok and many.data == 20, many
        assert (await ref.fetchval("SELECT wait_wal_table('quotes')")).ok
        after_many = await ref.fetchval("SELECT count() FROM quotes")
        assert after_many.ok and after_many.data == 20
        value = await ref.fetchval("SELECT max(n) FROM quotes WHERE sym = $1", "EURUSD")
        assert value.ok and value.data == 19
        row = await ref.fetchrow("SELECT sym, n FROM quotes WHERE n = $1", 7)
        assert row.ok and row.data == {"sym": "EURUSD", "n": 7}
        # After fetchrow: a different statement, different parameters, a different shape.
        many_rows = await ref.fetch("SELECT n, px FROM quotes WHERE n < $1 ORDER BY n", 3)
        assert many_rows.ok and [r["n"] for r in many_rows.data] == [0, 1, 2]
        executed = await ref.execute("INSERT INTO quotes VALUES ($1, $2, $3, now())",
                                     "GBPUSD", 1.25, 100)
        assert executed.ok and executed.data == "INSERT 0 1"
        assert (await ref.fetchval("SELECT wait_wal_table('quotes')")).ok
        again = await ref.fetchval("SELECT count() FROM quotes")
        assert again.ok and again.data == 21
        one = await ref.fetchrow("SELECT count() c, max(n) m FROM quotes")
        assert one.ok and one.data == {"c": 21, "m": 100}
        assert t.actor.status_extra()["pool_size"] == 1  # all of it on one connection
    # What landed, read independently over HTTP.
    rows_http = await exec_rows(questdb, "SELECT sym, n FROM quotes ORDER BY n")
    assert [r["n"] for r in rows_http] == [*range(20), 100]


async def test_query_errors_are_classified_from_the_message_not_retried_no_breaker(
        tmp_path: Path, questdb: QuestdbServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with questdb_tree(tmp_path, questdb.dsn, fast_settings()) as t:
        before = t.last_seq
        cases = [
            (t.ref.fetch("SELEC 1"), "fetch failed: table does not exist [table=SELEC]"),
            (t.ref.fetchval("SELECT * FROM no_such_table"),
             "fetchval failed: table does not exist [table=no_such_table]"),
            (t.ref.fetchrow("SELECT nocol FROM tables()"), "fetchrow failed: Invalid column: "
                                                           "nocol"),
            (t.ref.execute("INSERT INTO no_such_table VALUES (1)"),
             "execute failed: table does not exist [table=no_such_table]"),
        ]
        for call, message in cases:
            elapsed, resp = await timed(call)
            assert resp.status == "error" and resp.error is not None, resp
            assert resp.error.code is ErrorCode.DB_QUERY_FAILED, resp
            assert resp.error.message == message
            assert elapsed < RETRY_DELAYS[0]  # not retried
        assert not retry_records(caplog, "fetch") and not retry_records(caplog, "fetchval")
        assert t.cell.breaker.state is BreakerState.CLOSED and t.cell.breaker.failures == 0
        assert t.ref.state == "CONNECTED"
        await trio.sleep(0.6)  # a probe later: nothing happened to the connection
        assert not t.events("state_changed", "probe_failed", after=before)
        assert (await t.ref.fetchval("SELECT 1")).data == 1


async def test_wrong_credentials_are_a_connection_failure(
        tmp_path: Path, questdb: QuestdbServer) -> None:
    bad_password = "Wrong-Secret-91c"
    dsn = questdb.dsn.replace(f":{PASSWORD}@", f":{bad_password}@")
    with pytest.raises(asyncpg.PostgresError) as caught:
        await trio.to_thread.run_sync(_connect_sync, dsn)
    failure = classify_db_error(caught.value, "connect", secrets=(bad_password,))
    assert failure.code is ErrorCode.DB_UNAVAILABLE and failure.connection
    assert failure.message == "connect failed: invalid username/password"

    async with questdb_tree(tmp_path, dsn, fast_settings(health_interval_s=60.0)) as t:
        down = await t.wait(lambda e: e.kind == "attempt_failed")
        assert down.error is not None and down.error["code"] == "DB_UNAVAILABLE"
        assert "invalid username/password" in down.error["message"]
        assert bad_password not in down.error["message"]
        resp = await t.ref.fetchval("SELECT 1", timeout_s=0.5)
        assert resp.error is not None and resp.error.code in UNAVAILABLE


def _connect_sync(dsn: str) -> None:
    import asyncio

    async def go() -> None:
        conn = await asyncpg.connect(dsn, timeout=5)
        await conn.close()

    asyncio.run(go())


async def test_schema_change_under_a_cached_statement(
        tmp_path: Path, questdb: QuestdbServer) -> None:
    async with questdb_tree(tmp_path, questdb.dsn, fast_settings(), pool_max_size=1) as t:
        assert (await t.ref.execute("CREATE TABLE shapes (a LONG, ts TIMESTAMP) "
                                    "TIMESTAMP(ts) PARTITION BY DAY WAL")).ok
        assert (await t.ref.execute("INSERT INTO shapes VALUES (1, now())")).ok
        assert (await t.ref.fetchval("SELECT wait_wal_table('shapes')")).ok
        first = await t.ref.fetch("SELECT * FROM shapes")  # prepared and cached
        assert first.ok and list(first.data[0]) == ["a", "ts"]
        assert (await t.ref.execute("ALTER TABLE shapes ADD COLUMN b VARCHAR")).ok
        assert (await t.ref.fetchval("SELECT wait_wal_table('shapes')")).ok
        second = await t.ref.fetch("SELECT * FROM shapes")  # same text, new shape
        assert second.ok, second
        assert list(second.data[0]) == ["a", "ts", "b"]
        assert t.cell.breaker.failures == 0 and t.ref.state == "CONNECTED"


async def test_the_events_table_is_created_wal_dedup_and_verified(
        tmp_path: Path, questdb: QuestdbServer) -> None:
    await drop_events_table(questdb)
    async with questdb_tree(tmp_path, questdb.dsn, fast_settings()) as t:
        resp = await t.ref.call("events_table")
        assert resp.ok, resp
        assert resp.data["problems"] == [] and resp.data["repaired"] == []
        assert resp.data["suspended"] is False and resp.data["max_seq"] == 0
    [info] = [r for r in await exec_rows(questdb, "tables()") if r["table_name"] == TABLE]
    assert info["walEnabled"] and info["dedup"] and info["designatedTimestamp"] == "ts"
    keys = {r["column"] for r in await exec_rows(questdb, f"table_columns('{TABLE}')")
            if r["upsertKey"]}
    assert keys == {"ts", "seq"}


async def test_a_table_that_lost_its_dedup_is_repaired_and_reported(
        tmp_path: Path, questdb: QuestdbServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(persistence, "CHECK_INTERVAL_S", 0.3)
    await drop_events_table(questdb)
    state_dir = tmp_path / "var"
    async with questdb_runtime(state_dir, questdb.dsn) as rt:
        await persisted_up_to_log(rt, questdb)
    await in_thread(lambda: questdb.exec(f"ALTER TABLE {TABLE} DEDUP DISABLE"))
    await in_thread(lambda: questdb.wait_wal(TABLE))  # ALTERs go through the WAL too
    [info] = [r for r in await exec_rows(questdb, "tables()") if r["table_name"] == TABLE]
    assert not info["dedup"]
    # A restart of the runtime: the table is verified and DEDUP put back before any write.
    async with questdb_runtime(state_dir, questdb.dsn) as rt:
        await eventually(lambda: "table" in (_checks(rt, "events_store")), within_s=10)
        first = _check_events(rt, "table")[0]
        assert first["status"] == "warn"
        assert f"ALTER TABLE {TABLE} DEDUP ENABLE UPSERT KEYS(ts, seq)" in first["output"]
        seqs = await persisted_up_to_log(rt, questdb)
        assert_exactly_once(seqs, rt.supervisor.log.last_seq)
        await eventually(lambda: _checks(rt, "events_store").get("table", {}).get("status")
                   == "pass", within_s=10)
    assert any("repairing table" in r.getMessage() for r in caplog.records)
    [info] = [r for r in await exec_rows(questdb, "tables()") if r["table_name"] == TABLE]
    assert info["dedup"]


async def test_a_table_that_cannot_deduplicate_holds_persistence_loudly(
        tmp_path: Path, questdb: QuestdbServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A non-WAL table cannot DEDUP: nothing is written (nothing doubled), nothing skipped,
    and the operator sees why in status, health and the log; fixed, it catches up."""
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(persistence, "CHECK_INTERVAL_S", 0.3)
    await drop_events_table(questdb)
    await in_thread(lambda: questdb.exec(
        f"CREATE TABLE {TABLE} (seq LONG, ts TIMESTAMP, actor SYMBOL, kind SYMBOL, "
        "from_state SYMBOL, to_state SYMBOL, attempt INT, delay_s DOUBLE, error_code SYMBOL, "
        "error_message VARCHAR, payload VARCHAR) TIMESTAMP(ts) PARTITION BY DAY BYPASS WAL"))
    async with questdb_runtime(tmp_path / "var", questdb.dsn) as rt:
        store = store_of(rt)
        await eventually(lambda: store.last_error is not None, within_s=10)
        extra = store.status_extra()
        assert extra["last_error"]["code"] == "TABLE_UNUSABLE"
        assert "is not a WAL table" in extra["last_error"]["message"]
        assert extra["persisted_seq"] == 0 and extra["lag"] == rt.supervisor.log.last_seq
        assert extra["skipped"] == 0
        await eventually(lambda: health_check(rt, "events_store:table") is not None, within_s=10)
        check = health_check(rt, "events_store:table")
        assert check is not None and check["status"] == "fail"
        assert "SET TYPE WAL" in check["output"]
        _, doc = health_document(rt)
        assert doc["status"] == "warn"
        assert any("not a WAL table" in r.getMessage() for r in caplog.records)
        assert await exec_rows(questdb, f"SELECT count() c FROM {TABLE}") == [{"c": 0}]
    # The operator drops it (QuestDB refuses to drop a non-WAL table while a connection
    # holds a prepared statement on it: "could not lock ... busyReader", so with the runtime
    # stopped); the next start creates it right and catches up from the log.
    await drop_events_table(questdb)
    async with questdb_runtime(tmp_path / "var", questdb.dsn) as rt:
        seqs = await persisted_up_to_log(rt, questdb)
        assert_exactly_once(seqs, rt.supervisor.log.last_seq)
        await eventually(lambda: (health_check(rt, "events_store:table") or {}).get("status")
                   == "pass", within_s=10)
        await eventually(lambda: (health_check(rt, "events_store:persistence") or {}).get("status")
                   == "pass", within_s=10)


async def test_a_suspended_wal_table_is_reported_with_its_remedy_and_persistence_resumes(
        tmp_path: Path, questdb: QuestdbServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Also: while suspended, max(seq) stays behind what was written; that is WAL lag, not a
    lost table, so nothing is refilled (replayed) from the log."""
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(persistence, "CHECK_INTERVAL_S", 0.3)
    await drop_events_table(questdb)
    children = [flapper("bot", 0.2, times=6)]
    async with questdb_runtime(tmp_path / "var", questdb.dsn, children) as rt:
        await persisted_up_to_log(rt, questdb)
        await in_thread(lambda: questdb.exec(f"ALTER TABLE {TABLE} SUSPEND WAL"))
        await eventually(lambda: (health_check(rt, "events_store:table") or {}).get("status")
                   == "fail", within_s=10)
        check = health_check(rt, "events_store:table")
        assert check is not None
        assert f"ALTER TABLE {TABLE} RESUME WAL" in check["output"]
        assert "suspended" in check["output"]
        _, doc = health_document(rt)
        assert doc["status"] == "warn" and "events_store:table fail" in doc["output"]
        [row] = [r for r in rt.supervisor.status() if r["name"] == "events_store"]
        assert row["checks"]["table"]["status"] == "fail"
        assert row["extra"]["table"]["suspended"] is True
        # Events go on being written while it is suspended: they wait in QuestDB's WAL.
        suspended_at = store_of(rt).persisted_seq
        await eventually(lambda: store_of(rt).persisted_seq > suspended_at, within_s=10)
        assert store_of(rt).status_extra()["skipped"] == 0
        await trio.sleep(1.0)  # a few table checks see max(seq) behind what was written
        applied = await exec_rows(questdb, f"SELECT max(seq) m FROM {TABLE}")
        assert applied[0]["m"] <= suspended_at < store_of(rt).persisted_seq
        await in_thread(lambda: questdb.exec(f"ALTER TABLE {TABLE} RESUME WAL"))
        await eventually(lambda: (health_check(rt, "events_store:table") or {}).get("status")
                   == "pass", within_s=10)
        seqs = await persisted_up_to_log(rt, questdb)
        assert_exactly_once(seqs, rt.supervisor.log.last_seq)
    assert not [r for r in caplog.records if "refilling" in r.getMessage()]


async def test_every_event_reaches_questdb_exactly_once_and_matches_the_log(
        tmp_path: Path, questdb: QuestdbServer) -> None:
    await drop_events_table(questdb)
    state_dir = tmp_path / "var"
    children = [flapper("nul_bot", 0.05, message="bad\x00byte", times=1),
                flapper("bot", 0.05, times=3)]
    async with questdb_runtime(state_dir, questdb.dsn, children) as rt:
        await eventually(lambda: len(rt.supervisor.status()) >= 6, within_s=10)
        seqs = await persisted_up_to_log(rt, questdb)
        last = rt.supervisor.log.last_seq
        assert_exactly_once(seqs, last)
        extra = store_of(rt).status_extra()
        assert extra["lag"] == 0 and extra["skipped"] == 0 and extra["last_error"] is None
    lines = log_lines(state_dir)
    rows = await exec_rows(questdb, f"SELECT seq, actor, kind, payload FROM {TABLE} "
                                    f"WHERE seq <= {last} ORDER BY seq")
    for row in rows:
        assert row["payload"] == lines[row["seq"]]
    # A second runtime on the same log replays from max(seq): nothing doubled.
    async with questdb_runtime(state_dir, questdb.dsn) as rt:
        seqs = await persisted_up_to_log(rt, questdb)
        assert_exactly_once(seqs, rt.supervisor.log.last_seq)


async def test_a_fresh_state_directory_numbers_above_what_questdb_holds(
        tmp_path: Path, questdb: QuestdbServer) -> None:
    """A runtime whose state directory was lost (or a new one) on a QuestDB that kept the
    table: its first event is numbered above the table, so every event lands exactly once
    (numbering from 1 would reuse stored seqs, and those events would never land)."""
    await drop_events_table(questdb)
    async with questdb_runtime(tmp_path / "first", questdb.dsn) as rt:
        await persisted_up_to_log(rt, questdb)
        first_last = rt.supervisor.log.last_seq
    async with questdb_runtime(tmp_path / "second", questdb.dsn) as rt:
        seqs = await persisted_up_to_log(rt, questdb)
        second_last = rt.supervisor.log.last_seq
        assert_exactly_once(seqs, second_last)
    second = log_lines(tmp_path / "second")
    assert min(second) == first_last + 1, (first_last, min(second))
    rows = await exec_rows(questdb, f"SELECT seq, payload FROM {TABLE} WHERE seq > "
                                    f"{first_last} AND seq <= {second_last} ORDER BY seq")
    assert [r["seq"] for r in rows] == list(range(first_last + 1, second_last + 1))
    assert all(r["payload"] == second[r["seq"]] for r in rows)


async def test_a_dropped_table_is_created_again_and_refilled_from_the_log(
        tmp_path: Path, questdb: QuestdbServer) -> None:
    await drop_events_table(questdb)
    children = [flapper("bot", 0.3, times=4)]
    async with questdb_runtime(tmp_path / "var", questdb.dsn, children) as rt:
        await persisted_up_to_log(rt, questdb)
        await drop_events_table(questdb)  # the bot's next failures write to a lost table
        seqs = await persisted_up_to_log(rt, questdb)
        assert_exactly_once(seqs, rt.supervisor.log.last_seq)
        assert store_of(rt).status_extra()["skipped"] == 0


def _checks(rt: Runtime, actor: str) -> dict[str, Any]:
    return dict(rt.supervisor.children[actor].view.checks)


def _check_events(rt: Runtime, check: str) -> list[dict[str, Any]]:
    """This runtime's check_changed events for ``check`` (after its runtime_started)."""
    events = rt.supervisor.log.read_since(0)
    start = max(e.seq for e in events if e.kind == "runtime_started")
    return [e.data for e in events if e.seq > start and e.kind == "check_changed"
            and e.data and e.data.get("check") == check]


# ============================================================================ own server
async def test_stopped_retries_breaker_degraded_then_recovers_and_calls_pass(
        tmp_path: Path, questdb_factory: Callable[..., QuestdbServer],
        caplog: pytest.LogCaptureFixture) -> None:
    """QuestDB stopped (SIGTERM) while idle, twice on one server (one restart in between).

    1. Probing every 0.5 s: the probe notices, the actor escalates to ERROR, a cached read
       answers degraded with its cached_at; QuestDB restarted on the same data, the ERROR
       probe recovers it, and CONNECTED means calls pass at once (DESIGN section 4: the
       supervisor's successful probe closes the breaker, no 30 s of CIRCUIT_OPEN).
    2. No probe in the way (health every 60 s): an idempotent read is retried at 100/500/
       1000 ms, a write is not; the four failed calls and the reconnect attempt open the
       breaker, and calls then fail fast with CIRCUIT_OPEN."""
    caplog.set_level(logging.WARNING)
    server = questdb_factory()
    # The breaker exactly as the runtime configures it for questdb (5 failures, 30 s open).
    breaker = RuntimeConfig.from_mapping({}, env={}).actor_settings("questdb").breaker
    assert breaker is not None and (breaker.threshold, breaker.open_s) == (5, 30.0)
    settings = fast_settings(backoff_base_s=0.1, health_interval_s=0.5, breaker=breaker)
    async with questdb_tree(tmp_path / "recovery", server.dsn, settings) as t:
        wall = t.sup.wallclock
        sql = "SELECT x, x * 2 AS y FROM long_sequence(3)"
        before = wall.wall(trio.current_time())
        ok = await t.ref.fetch(sql)
        assert ok.ok and [r["y"] for r in ok.data] == [2, 4, 6]
        mark = t.last_seq
        await in_thread(server.terminate)
        probe = await t.wait_kind("probe_failed", after=mark, limit_s=5)
        assert probe.error is not None and probe.error["code"] == "DB_UNAVAILABLE"
        await t.wait_state("ERROR", after=mark, limit_s=10)
        elapsed, resp = await timed(t.ref.fetch(sql))
        assert resp.status == "degraded" and resp.data == ok.data, resp
        assert resp.cached_at is not None and before <= resp.cached_at
        assert elapsed < RETRY_DELAYS[0]
        assert_unavailable(resp, "fetch", allow_degraded=True)

        mark = t.last_seq
        await in_thread(server.restart)
        await t.wait_kind("recovered", after=mark, limit_s=15)
        assert t.ref.state == "CONNECTED"
        resp = await t.ref.fetchval("SELECT 7")
        assert resp.ok and resp.data == 7, resp  # CONNECTED: calls pass
        resp = await t.ref.fetch(sql)
        assert resp.ok and resp.cached_at is None

    # The server is up again: now the first call after it stops meets no probe.
    caplog.clear()
    settings = fast_settings(backoff_base_s=0.3, health_interval_s=60.0, breaker=breaker)
    async with questdb_tree(tmp_path / "retries", server.dsn, settings) as t:
        assert (await t.ref.fetchval("SELECT 1")).ok
        mark = t.last_seq
        await in_thread(server.terminate)
        elapsed, resp = await timed(t.ref.fetchval("SELECT 2"))
        assert resp.error is not None and resp.error.code is ErrorCode.DB_UNAVAILABLE, resp
        assert resp.error.message.startswith("fetchval failed: ")
        records = retry_records(caplog, "fetchval")
        assert [r.getMessage().rsplit("(", 1)[1] for r in records] == [
            "retry 1 in 0.100 s)", "retry 2 in 0.500 s)", "retry 3 in 1.000 s)"]
        gaps = [b.created - a.created for a, b in zip(records, records[1:], strict=False)]
        assert on_time(gaps[0], 0.1) and on_time(gaps[1], 0.5), gaps
        assert t.cell.breaker.failures == 4 and t.cell.breaker.state is BreakerState.CLOSED
        resp = await t.ref.execute("INSERT INTO nowhere VALUES (1)")
        assert resp.error is not None and resp.error.code in UNAVAILABLE
        assert not retry_records(caplog, "execute")  # writes are never retried
        opened = await t.wait_kind("circuit_opened", after=mark, limit_s=10)
        assert opened.data is not None and opened.data["to"] == "OPEN"
        elapsed, resp = await timed(t.ref.fetchval("SELECT 3"))
        assert resp.error is not None and resp.error.code is ErrorCode.CIRCUIT_OPEN
        assert elapsed < RETRY_DELAYS[0]


async def test_killed_mid_query_answers_promptly_and_recovers_on_the_same_data(
        tmp_path: Path, questdb_factory: Callable[..., QuestdbServer]) -> None:
    server = questdb_factory()
    async with questdb_tree(tmp_path, server.dsn, fast_settings()) as t:
        assert (await t.ref.execute("CREATE TABLE kept (n LONG, ts TIMESTAMP) "
                                    "TIMESTAMP(ts) PARTITION BY DAY WAL")).ok
        assert (await t.ref.executemany("INSERT INTO kept VALUES ($1, now())",
                                        [[i] for i in range(50)])).ok
        assert (await t.ref.fetchval("SELECT wait_wal_table('kept')")).ok
        results: dict[str, tuple[float, Response]] = {}
        long_sql = "SELECT sum(x * x) FROM long_sequence(2000000000)"

        async def run(name: str, call: Any) -> None:
            results[name] = (trio.current_time(), await call)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "read", t.ref.fetchval(long_sql, timeout_s=8.0))
            nursery.start_soon(run, "write", t.ref.execute(long_sql, timeout_s=8.0))
            await trio.sleep(0.7)  # both queries are running on the server
            assert not results
            mark = t.last_seq
            await in_thread(server.kill)
            killed_at = trio.current_time()
        done, write = results["write"]
        assert done - killed_at < 1.0
        assert write.error is not None and write.error.code is ErrorCode.DB_UNAVAILABLE, write
        assert write.error.message.startswith("execute failed: ")
        done, read = results["read"]
        assert done - killed_at < sum(RETRY_DELAYS) + 1.5
        assert_unavailable(read, "fetchval")
        await t.wait_state("RECONNECTING", after=mark)

        mark = t.last_seq
        await in_thread(server.restart)
        await t.wait_state("CONNECTED", after=mark, limit_s=15)
        resp = await t.ref.fetchval("SELECT count() FROM kept")
        assert resp.ok and resp.data == 50  # the WAL table survived SIGKILL


async def test_a_hung_server_is_noticed_by_the_probe_and_recovers(
        tmp_path: Path, questdb_factory: Callable[..., QuestdbServer]) -> None:
    """SIGSTOP: sockets stay open and nothing answers. The liveness probe notices within
    about one probe timeout (DESIGN section 3), calls are bounded by their deadline, and
    SIGCONT brings it back."""
    server = questdb_factory()
    settings = fast_settings(health_interval_s=0.5, probe_timeout_s=1.0,
                             connect_timeout_s=1.0, call_timeout_s=2.0)
    async with questdb_tree(tmp_path, server.dsn, settings) as t:
        assert (await t.ref.fetchval("SELECT 1")).ok
        mark = t.last_seq
        await in_thread(server.pause)
        paused_at = trio.current_time()
        try:
            elapsed, resp = await timed(t.ref.fetchval("SELECT 2", timeout_s=2.0))
            assert resp.error is not None and resp.error.code in UNAVAILABLE, resp
            assert elapsed < 2.0 + 0.5  # the caller's deadline holds
            down = await t.wait_state("RECONNECTING", after=mark, limit_s=5)
            assert t.at(down) - paused_at < 0.5 + 1.0 + 1.0  # interval + probe timeout
            assert down.error is not None and down.error["code"] == "DB_UNAVAILABLE"
        finally:
            await in_thread(server.resume)
        mark = t.last_seq
        await t.wait_state("CONNECTED", after=mark, limit_s=20)
        resp = await t.ref.fetchval("SELECT 3")
        assert resp.ok and resp.data == 3, resp
