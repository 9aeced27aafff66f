"""The SQL dialect layer: QuestDB in production, PostgreSQL as its stand-in.

Both speak the PostgreSQL wire protocol (asyncpg talks to either), but their SQL differs.
Everything that differs for the ``supervision_events`` table lives here, so the actor code
never branches on the server kind:

============================  ======================================  ==========================
                              QuestDB (>= 8.0)                        PostgreSQL
============================  ======================================  ==========================
``SELECT version()``          ``PostgreSQL 12.3, compiled by Visual   ``PostgreSQL 18.6 on ...``
                              C++ build 1914, 64-bit, QuestDB``
idempotent replay             ``DEDUP UPSERT KEYS(ts, seq)`` on a     ``seq BIGINT PRIMARY KEY``
                              ``WAL`` table (identical rows skipped)  + ``ON CONFLICT (seq) DO
                                                                      NOTHING``
``ts`` column                 ``TIMESTAMP`` (designated, UTC,         ``TIMESTAMPTZ``: an aware
                              microseconds, sent/returned as          ``datetime`` in UTC
                              ``timestamp without time zone``): a
                              naive ``datetime`` in UTC
actor/kind/states/code        ``SYMBOL``                              ``TEXT``
message, payload              ``VARCHAR``                             ``TEXT``
============================  ======================================  ==========================

The detection string: QuestDB's ``version()`` returns the constant
``"PostgreSQL 12.3, compiled by Visual C++ build 1914, 64-bit, QuestDB"`` (``Constants
.PG_CATALOG_VERSION_CONSTANT`` in questdb/questdb, ``", QuestDB"`` appended by PR #3239 in
2023 so tools can tell it from PostgreSQL). Releases before that said the same without
``QuestDB``; they also lack ``DEDUP`` (7.3) and ``VARCHAR`` (8.0), which this schema needs, so
they are not supported. See ``docs/questdb.md`` for the sources.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import attrs

__all__ = [
    "DEDUP_KEYS",
    "EVENTS_COLUMNS",
    "EVENTS_TABLE",
    "POSTGRESQL",
    "QUESTDB",
    "QUESTDB_COLUMN_TYPES",
    "Dialect",
    "TableVerdict",
    "detect_dialect",
    "dialect_named",
    "event_row",
    "parse_event_ts",
    "verify_questdb_table",
]

EVENTS_TABLE = "supervision_events"

# Column order of every row tuple and of the INSERT statement.
EVENTS_COLUMNS: tuple[str, ...] = (
    "seq",
    "ts",
    "actor",
    "kind",
    "from_state",
    "to_state",
    "attempt",
    "delay_s",
    "error_code",
    "error_message",
    "payload",
)

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_identifier(_instance: Any, _attribute: Any, value: str) -> None:
    if not _IDENTIFIER.match(value):
        raise ValueError(f"not a plain SQL identifier: {value!r}")


def _check_name(_instance: Any, _attribute: Any, value: str) -> None:
    if value not in ("questdb", "postgresql"):
        raise ValueError(f"dialect must be 'questdb' or 'postgresql', not {value!r}")


@attrs.frozen
class Dialect:
    """The statements for one server kind. ``table`` is a plain identifier (default
    ``supervision_events``); statements use ``$1..$n`` placeholders (asyncpg)."""

    name: str = attrs.field(validator=_check_name)
    table: str = attrs.field(default=EVENTS_TABLE, validator=_check_identifier)

    @property
    def is_questdb(self) -> bool:
        return self.name == "questdb"

    @property
    def naive_utc_timestamps(self) -> bool:
        """QuestDB sends and expects ``timestamp without time zone`` holding UTC."""
        return self.is_questdb

    def with_table(self, table: str) -> Dialect:
        return attrs.evolve(self, table=table)

    @property
    def create_events_table(self) -> str:
        """Idempotent (``IF NOT EXISTS``): safe to run on every connect."""
        if self.is_questdb:
            return (
                f"CREATE TABLE IF NOT EXISTS {self.table} (\n"
                "    seq LONG,\n"
                "    ts TIMESTAMP,\n"
                "    actor SYMBOL,\n"
                "    kind SYMBOL,\n"
                "    from_state SYMBOL,\n"
                "    to_state SYMBOL,\n"
                "    attempt INT,\n"
                "    delay_s DOUBLE,\n"
                "    error_code SYMBOL,\n"
                "    error_message VARCHAR,\n"
                "    payload VARCHAR\n"
                ") TIMESTAMP(ts) PARTITION BY DAY WAL\n"
                "DEDUP UPSERT KEYS(ts, seq)"
            )
        return (
            f"CREATE TABLE IF NOT EXISTS {self.table} (\n"
            "    seq BIGINT PRIMARY KEY,\n"
            "    ts TIMESTAMPTZ NOT NULL,\n"
            "    actor TEXT NOT NULL,\n"
            "    kind TEXT NOT NULL,\n"
            "    from_state TEXT,\n"
            "    to_state TEXT,\n"
            "    attempt INTEGER,\n"
            "    delay_s DOUBLE PRECISION,\n"
            "    error_code TEXT,\n"
            "    error_message TEXT,\n"
            "    payload TEXT NOT NULL\n"
            ")"
        )

    @property
    def insert_events(self) -> str:
        """One row per call; run with ``executemany(sql, [event_row(e, dialect), ...])``.

        Replaying rows that are already there is a no-op on both servers: PostgreSQL skips
        them (``ON CONFLICT (seq) DO NOTHING``), QuestDB's ``DEDUP UPSERT KEYS(ts, seq)``
        replaces each with itself (an identical row is skipped).
        """
        columns = ", ".join(EVENTS_COLUMNS)
        placeholders = ", ".join(f"${i}" for i in range(1, len(EVENTS_COLUMNS) + 1))
        sql = f"INSERT INTO {self.table} ({columns}) VALUES ({placeholders})"
        if not self.is_questdb:
            sql += " ON CONFLICT (seq) DO NOTHING"
        return sql

    @property
    def max_persisted_seq(self) -> str:
        """One value: the highest stored ``seq``, NULL for an empty table.

        On QuestDB a WAL table's rows become visible once the WAL is applied (normally
        milliseconds later), so this is a lower bound right after an insert; replaying from it
        is still exact because replays are deduplicated.
        """
        return f"SELECT max(seq) FROM {self.table}"

    @property
    def count_events(self) -> str:
        return f"SELECT count(*) FROM {self.table}"

    def event_row(self, event: Mapping[str, Any], payload: str | None = None) -> tuple[Any, ...]:
        return event_row(event, self, payload=payload)

    def to_db_timestamp(self, value: datetime) -> datetime:
        """An aware UTC ``datetime`` as this server wants it bound."""
        value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return value.replace(tzinfo=None) if self.naive_utc_timestamps else value

    def from_db_timestamp(self, value: datetime) -> datetime:
        """A ``ts`` read back from this server, as an aware UTC ``datetime``."""
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# What a QuestDB events table must look like for exactly-once replay (tables() and
# table_columns() report these type names).
QUESTDB_COLUMN_TYPES: dict[str, str] = {
    "seq": "LONG", "ts": "TIMESTAMP", "actor": "SYMBOL", "kind": "SYMBOL",
    "from_state": "SYMBOL", "to_state": "SYMBOL", "attempt": "INT", "delay_s": "DOUBLE",
    "error_code": "SYMBOL", "error_message": "VARCHAR", "payload": "VARCHAR",
}
DEDUP_KEYS = ("ts", "seq")


@attrs.frozen
class TableVerdict:
    """What is wrong with an existing QuestDB events table: ``problems`` (no safe repair: an
    operator must act; persisting is held until then) and ``repairs`` (statements that make
    it right without losing rows)."""

    problems: tuple[str, ...] = ()
    repairs: tuple[str, ...] = ()


def verify_questdb_table(table: str, info: Mapping[str, Any] | None,
                         columns: list[Mapping[str, Any]]) -> TableVerdict:
    """Judge a QuestDB table from its ``tables()`` row and ``table_columns()`` rows (pure).

    Exactly-once replay rests on a WAL table with designated timestamp ``ts`` and
    ``DEDUP UPSERT KEYS(ts, seq)``. A lost DEDUP is repaired (``ALTER TABLE ... DEDUP ENABLE
    UPSERT KEYS(ts, seq)``: rows already doubled stay doubled, later ones are not). A non-WAL
    table, another designated timestamp or missing/mistyped columns cannot be repaired in
    place: the verdict names the problem and the remedy."""
    if info is None:
        return TableVerdict(problems=(f"table {table} does not exist",))
    problems: list[str] = []
    repairs: list[str] = []
    by_name = {str(c["column"]): c for c in columns}
    for name, wanted in QUESTDB_COLUMN_TYPES.items():
        column = by_name.get(name)
        if column is None:
            problems.append(f"table {table} has no column {name} ({wanted}): add it with "
                            f"ALTER TABLE {table} ADD COLUMN {name} {wanted}")
        elif str(column["type"]).upper() != wanted:
            problems.append(f"table {table} column {name} is {column['type']}, not {wanted}: "
                            f"rename the table and let the runtime create it again")
    designated = info.get("designatedTimestamp")
    if designated != "ts":
        problems.append(f"table {table} has designated timestamp {designated!r}, not 'ts': "
                        f"rename the table and let the runtime create it again")
    if not info.get("walEnabled"):
        problems.append(f"table {table} is not a WAL table, so it cannot deduplicate replays: "
                        f"ALTER TABLE {table} SET TYPE WAL, then restart QuestDB")
    keys = {name for name, c in by_name.items() if c.get("upsertKey")}
    if info.get("walEnabled") and designated == "ts" and not (
            info.get("dedup") and keys == set(DEDUP_KEYS)):
        repairs.append(f"ALTER TABLE {table} DEDUP ENABLE UPSERT KEYS({', '.join(DEDUP_KEYS)})")
    return TableVerdict(tuple(problems), tuple(repairs))


QUESTDB = Dialect("questdb")
POSTGRESQL = Dialect("postgresql")


def detect_dialect(version_string: str, *, table: str = EVENTS_TABLE) -> Dialect:
    """The dialect for a server, from its ``SELECT version()``.

    QuestDB (since 2023) reports ``"PostgreSQL 12.3, compiled by Visual C++ build 1914,
    64-bit, QuestDB"``; anything without ``QuestDB`` in it is treated as PostgreSQL.
    """
    name = "questdb" if "questdb" in (version_string or "").lower() else "postgresql"
    return Dialect(name, table=table)


def dialect_named(name: str, *, table: str = EVENTS_TABLE) -> Dialect:
    """``"questdb"`` or ``"postgresql"`` (case-insensitive), e.g. from configuration."""
    return Dialect(name.strip().lower(), table=table)


def parse_event_ts(value: str | datetime) -> datetime:
    """An event's ``ts`` (ISO 8601, ``Z`` or an offset; naive means UTC) as aware UTC."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError as exc:
            raise ValueError(f"event ts is not an ISO 8601 timestamp: {value!r}") from exc
    else:
        raise ValueError(f"event ts must be a string, not {type(value).__name__}")
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def event_row(
    event: Mapping[str, Any],
    dialect: Dialect | None = None,
    *,
    payload: str | None = None,
) -> tuple[Any, ...]:
    """The ``supervision_events`` row (``EVENTS_COLUMNS`` order) for one event (DESIGN s.5).

    ``ts`` is an aware UTC ``datetime`` (PostgreSQL, and the default), or a naive one holding
    UTC for QuestDB. ``payload`` is the event's JSON text: pass the exact log line if you have
    it, else the event is serialised compactly (keys in their order). Raises ``ValueError`` for
    an event without an integer ``seq``, a ``ts``, an ``actor`` or a ``kind``.
    """
    dialect = dialect or POSTGRESQL
    try:
        seq, ts, actor, kind = event["seq"], event["ts"], event["actor"], event["kind"]
    except KeyError as exc:
        raise ValueError(f"event has no {exc.args[0]!r}: {dict(event)!r}") from None
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise ValueError(f"event seq must be an integer, not {seq!r}")
    error = event.get("error") or {}
    if not isinstance(error, Mapping):
        error = {"message": str(error)}
    attempt = event.get("attempt")
    delay_s = event.get("delay_s")
    if payload is None:
        payload = json.dumps(dict(event), ensure_ascii=False, separators=(",", ":"), default=str)
    return (
        seq,
        dialect.to_db_timestamp(parse_event_ts(ts)),
        str(actor),
        str(kind),
        _opt_str(event.get("from")),
        _opt_str(event.get("to")),
        int(attempt) if attempt is not None else None,
        float(delay_s) if delay_s is not None else None,
        _opt_str(error.get("code")),
        _opt_str(error.get("message")),
        payload,
    )


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)
