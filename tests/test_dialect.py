"""The SQL dialect layer: PostgreSQL statements run on a real server; QuestDB's are checked as
text (QuestDB cannot run here; docs/questdb.md lists what was verified how)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar

import asyncpg
import pytest

from actors.questdb.dialect import (
    EVENTS_COLUMNS,
    EVENTS_TABLE,
    POSTGRESQL,
    QUESTDB,
    Dialect,
    detect_dialect,
    dialect_named,
    event_row,
    parse_event_ts,
)
from actors.questdb.pgserver import EmbeddedPostgres

T = TypeVar("T")

QUESTDB_VERSION = "PostgreSQL 12.3, compiled by Visual C++ build 1914, 64-bit, QuestDB"


def run(fn: Callable[[], Awaitable[T]], timeout_s: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(fn(), timeout_s)

    return asyncio.run(bounded())


def make_event(seq: int, **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "seq": seq,
        "ts": f"2026-11-22T10:00:{seq % 60:02d}.123456Z",
        "actor": "mt5",
        "kind": "state_changed",
        "from": "CONNECTED",
        "to": "RECONNECTING",
        "attempt": 1,
        "delay_s": 1.0,
        "error": {"code": "MT5_IPC_FAILED", "message": "No IPC connection"},
    }
    event.update(overrides)
    return event


# ------------------------------------------------------------------ detection


def test_detect_dialect() -> None:
    assert detect_dialect(QUESTDB_VERSION) == QUESTDB
    assert detect_dialect("PostgreSQL 18.6 on x86_64-pc-linux-gnu, compiled by gcc") == POSTGRESQL
    # QuestDB before 2023 (no ", QuestDB" suffix) is indistinguishable and unsupported.
    assert detect_dialect("PostgreSQL 12.3, compiled by Visual C++ build 1914, 64-bit").name == (
        "postgresql"
    )
    assert detect_dialect("").name == "postgresql"
    assert detect_dialect(QUESTDB_VERSION, table="events_test").table == "events_test"
    assert dialect_named(" QuestDB ") == QUESTDB
    with pytest.raises(ValueError, match="questdb"):
        dialect_named("mysql")
    with pytest.raises(ValueError, match="identifier"):
        Dialect("postgresql", table="events; DROP TABLE x")


@pytest.mark.realserver
def test_detect_dialect_on_the_real_server(pg_server: EmbeddedPostgres) -> None:
    async def version() -> str:
        conn = await asyncpg.connect(pg_server.dsn, timeout=5)
        try:
            return await conn.fetchval("SELECT version()", timeout=5)
        finally:
            await conn.close(timeout=5)

    assert detect_dialect(run(version)) == POSTGRESQL


# ------------------------------------------------------------------ PostgreSQL, for real


@pytest.mark.realserver
def test_postgresql_statements_on_a_real_server(pg_server: EmbeddedPostgres) -> None:
    dialect = POSTGRESQL
    events = [make_event(seq) for seq in range(1, 6)]
    events.append({"seq": 6, "ts": "2026-11-22T12:00:00+02:00", "actor": "cache", "kind": "x"})

    async def scenario() -> dict[str, Any]:
        conn = await asyncpg.connect(pg_server.dsn, timeout=5)
        try:
            await conn.execute(dialect.create_events_table, timeout=5)
            await conn.execute(dialect.create_events_table, timeout=5)  # twice is fine
            empty_max = await conn.fetchval(dialect.max_persisted_seq, timeout=5)
            rows = [dialect.event_row(event) for event in events]
            await conn.executemany(dialect.insert_events, rows[:4], timeout=5)
            # A replay overlapping what is stored (as after an outage) doubles nothing.
            await conn.executemany(dialect.insert_events, rows, timeout=5)
            await conn.executemany(dialect.insert_events, rows, timeout=5)
            stored = await conn.fetch(f"SELECT * FROM {EVENTS_TABLE} ORDER BY seq", timeout=5)
            return {
                "empty_max": empty_max,
                "count": await conn.fetchval(dialect.count_events, timeout=5),
                "max": await conn.fetchval(dialect.max_persisted_seq, timeout=5),
                "per_seq": await conn.fetch(
                    f"SELECT seq, count(*) AS n FROM {EVENTS_TABLE} GROUP BY seq", timeout=5
                ),
                "stored": stored,
            }
        finally:
            await conn.close(timeout=5)

    result = run(scenario)
    assert result["empty_max"] is None
    assert result["count"] == 6
    assert result["max"] == 6
    assert {row["n"] for row in result["per_seq"]} == {1}
    first, last = result["stored"][0], result["stored"][-1]
    assert first["ts"] == datetime(2026, 11, 22, 10, 0, 1, 123456, tzinfo=UTC)
    assert dialect.from_db_timestamp(first["ts"]) == first["ts"]
    assert (first["actor"], first["kind"], first["from_state"], first["to_state"]) == (
        "mt5",
        "state_changed",
        "CONNECTED",
        "RECONNECTING",
    )
    assert (first["attempt"], first["delay_s"]) == (1, 1.0)
    assert (first["error_code"], first["error_message"]) == ("MT5_IPC_FAILED", "No IPC connection")
    assert json.loads(first["payload"]) == events[0]
    # An event without the optional fields: NULLs; an offset timestamp lands in UTC.
    assert last["ts"] == datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    assert [last[c] for c in ("from_state", "to_state", "attempt", "delay_s", "error_code")] == [
        None
    ] * 5


@pytest.mark.realserver
def test_a_custom_table_name(pg_server: EmbeddedPostgres) -> None:
    dialect = POSTGRESQL.with_table("events_copy")

    async def scenario() -> tuple[int, int]:
        conn = await asyncpg.connect(pg_server.dsn, timeout=5)
        try:
            await conn.execute(dialect.create_events_table, timeout=5)
            await conn.executemany(
                dialect.insert_events, [dialect.event_row(make_event(9))], timeout=5
            )
            return (
                await conn.fetchval(dialect.count_events, timeout=5),
                await conn.fetchval(dialect.max_persisted_seq, timeout=5),
            )
        finally:
            await conn.close(timeout=5)

    assert run(scenario) == (1, 9)


# ------------------------------------------------------------------ QuestDB, as text


def _squash(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip()


def test_questdb_create_table_text() -> None:
    sql = _squash(QUESTDB.create_events_table)
    assert sql.startswith(f"CREATE TABLE IF NOT EXISTS {EVENTS_TABLE} (")
    assert sql.endswith(") TIMESTAMP(ts) PARTITION BY DAY WAL DEDUP UPSERT KEYS(ts, seq)")
    body = sql[sql.index("(") + 1 : sql.index(") TIMESTAMP(ts)")]
    columns = dict(column.strip().split(" ") for column in body.split(","))
    assert columns == {
        "seq": "LONG",
        "ts": "TIMESTAMP",
        "actor": "SYMBOL",
        "kind": "SYMBOL",
        "from_state": "SYMBOL",
        "to_state": "SYMBOL",
        "attempt": "INT",
        "delay_s": "DOUBLE",
        "error_code": "SYMBOL",
        "error_message": "VARCHAR",
        "payload": "VARCHAR",
    }
    assert tuple(columns) == EVENTS_COLUMNS
    # Nothing PostgreSQL-only slipped in.
    for word in ("PRIMARY KEY", "NOT NULL", "TIMESTAMPTZ", "TEXT", "BIGINT"):
        assert word not in sql


def test_questdb_insert_and_queries_text() -> None:
    insert = QUESTDB.insert_events
    assert "ON CONFLICT" not in insert  # QuestDB has no ON CONFLICT; DEDUP does the job
    assert insert == (
        f"INSERT INTO {EVENTS_TABLE} ({', '.join(EVENTS_COLUMNS)}) VALUES "
        f"({', '.join(f'${i}' for i in range(1, 12))})"
    )
    assert QUESTDB.max_persisted_seq == f"SELECT max(seq) FROM {EVENTS_TABLE}"
    assert QUESTDB.count_events == f"SELECT count(*) FROM {EVENTS_TABLE}"
    assert POSTGRESQL.insert_events == insert + " ON CONFLICT (seq) DO NOTHING"


# ------------------------------------------------------------------ rows


def test_event_row_per_dialect() -> None:
    event = make_event(42)
    pg_row = event_row(event)
    qdb_row = event_row(event, QUESTDB)
    assert len(pg_row) == len(qdb_row) == len(EVENTS_COLUMNS)
    assert pg_row[1] == datetime(2026, 11, 22, 10, 0, 42, 123456, tzinfo=UTC)
    # QuestDB binds TIMESTAMP as "timestamp without time zone" holding UTC.
    assert qdb_row[1] == datetime(2026, 11, 22, 10, 0, 42, 123456)
    assert qdb_row[1].tzinfo is None
    assert pg_row[:1] == qdb_row[:1] and pg_row[2:] == qdb_row[2:]
    assert pg_row == (
        42,
        pg_row[1],
        "mt5",
        "state_changed",
        "CONNECTED",
        "RECONNECTING",
        1,
        1.0,
        "MT5_IPC_FAILED",
        "No IPC connection",
        pg_row[10],
    )
    assert json.loads(pg_row[10]) == event
    assert QUESTDB.event_row(event) == qdb_row
    assert QUESTDB.from_db_timestamp(qdb_row[1]) == pg_row[1]


def test_event_row_payload_and_validation() -> None:
    line = '{"seq": 7, "ts": "2026-11-22T10:00:00Z", "actor": "db", "kind": "recovered"}'
    row = event_row(json.loads(line), payload=line)
    assert row[10] == line  # the exact log line is kept when given
    assert row[4:10] == (None, None, None, None, None, None)

    for missing in ("seq", "ts", "actor", "kind"):
        event = make_event(1)
        del event[missing]
        with pytest.raises(ValueError, match=missing):
            event_row(event)
    with pytest.raises(ValueError, match="integer"):
        event_row({**make_event(1), "seq": True})
    with pytest.raises(ValueError, match="ISO 8601"):
        event_row(make_event(1, ts="yesterday"))


def test_parse_event_ts() -> None:
    expected = datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC)
    assert parse_event_ts("2026-11-22T10:00:00.123456Z") == expected
    assert parse_event_ts("2026-11-22T12:00:00.123456+02:00") == expected
    assert parse_event_ts("2026-11-22T10:00:00.123456") == expected  # naive means UTC
    tz = timezone(timedelta(hours=-5))
    assert parse_event_ts(datetime(2026, 11, 22, 5, 0, 0, 123456, tzinfo=tz)) == expected
    assert parse_event_ts("2026-11-22T10:00:00.123456Z").tzinfo is UTC
