"""The QuestDB pool actor: asyncpg over PostgreSQL wire, inside a trio-asyncio loop it owns.

Why it is shaped like this:

* asyncpg is asyncio-only. The actor's ``lifetime()`` opens one ``trio_asyncio`` loop; the
  pool is created, used and closed inside it, and only this actor's tasks (which inherit the
  loop) ever touch it.
* Pool settings suit QuestDB: a small pool with a lazy ``min_size`` of 0; idle connections
  retired after 240 s, under QuestDB's 5-minute idle close; connect and command timeouts; a
  bounded statement cache; and an empty reset, since QuestDB rejects asyncpg's default reset
  query (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``).
* When the database is lost, ``release()`` only marks the pool's connections expired and
  ``connect()`` proves the server with ``SELECT 1``: on recovery stale connections are
  replaced one by one, the pool is not rebuilt. The pool is closed when the actor stops.
* Errors are classified in one place (``actors.questdb.errors``); connection errors are
  retried by the cell (0.1 s, 0.5 s, 1.0 s) and count for the breaker, query errors are not.
* The SQL dialect (QuestDB or PostgreSQL) is detected from ``SELECT version()`` on connect.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import asyncpg
import trio
import trio_asyncio

from actors.questdb.dialect import (
    EVENTS_COLUMNS,
    POSTGRESQL,
    Dialect,
    detect_dialect,
    verify_questdb_table,
)
from actors.questdb.errors import classify_db_error, dsn_passwords
from supervision.actor import READ_UNCACHED, WRITE, Actor, OpSpec
from supervision.errors import Failure, Response
from supervision.ref import ActorRef

log = logging.getLogger("mt5_supervisor.questdb")

QUESTDB_IDLE_CLOSE_S = 300.0
# How long events_table waits for QuestDB to apply pending WAL transactions before it reads
# max(seq): rows not applied yet are invisible, and must not look like a lost table.
WAL_APPLY_WAIT_S = 2.0
_PAYLOAD = EVENTS_COLUMNS.index("payload")


async def _no_reset(connection: Any) -> None:
    """QuestDB rejects asyncpg's default reset query; there is no session state to reset."""


def _no_nul(value: Any) -> Any:
    """PostgreSQL refuses NUL in text (``invalid byte sequence for encoding "UTF8": 0x00``):
    one such character in an error message would stop persistence at that event for ever.
    The payload column keeps the exact text (JSON escapes it as ``\\u0000``)."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


# Free-form SQL: cacheable and retried like a read, but never open to a control-channel client
# without the token (``read=False``): a SELECT can still call functions, sleep, or lock.
SQL_READ = OpSpec(cacheable=True, idempotent=True, read=False)

# Set by the runtime on SQL that arrives over the control channel (never by the caller): it
# runs on its own small pool, as the least-privilege query role when there is one.
VIA_CONTROL = "_via_control"


def mark_via_control(args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` of a control-channel call, marked so the actor uses the query pool."""
    return {**args, VIA_CONTROL: True}


class QueryTimeout(Exception):
    """A statement ran past its timeout on a live session: a query failure (``TIMEOUT``),
    not a lost database. (A hung server is the liveness probe's business.)"""


class QueryPoolBusy(Exception):
    """Every connection of the control channel's pool is in use: refused (``TIMEOUT``)
    without touching the bot's pool or the connection state."""


def _sql_args(args: Mapping[str, Any]) -> tuple[str, list[Any]]:
    sql = args.get("sql")
    if not isinstance(sql, str) or not sql.strip():
        raise TypeError("sql must be a non-empty string")
    params = args.get("params") or []
    if not isinstance(params, list | tuple):
        raise TypeError("params must be a list")
    return sql, list(params)


class QuestdbActor(Actor):
    ops: ClassVar[Mapping[str, OpSpec]] = {
        "fetch": SQL_READ,
        "fetchrow": SQL_READ,
        "fetchval": SQL_READ,
        "execute": WRITE,
        "executemany": WRITE,
        # Replays are deduplicated by the table's key, so persisting is safe to retry.
        "persist_events": OpSpec(cacheable=False, idempotent=True),
        "max_persisted_seq": READ_UNCACHED,
        # The events table verified (and repaired where safe), its WAL state and max(seq).
        "events_table": OpSpec(cacheable=False, idempotent=True),
    }

    def __init__(self, dsn: str, config: Any = None, *, name: str = "questdb",
                 pool_min_size: int = 0, pool_max_size: int = 4,
                 command_timeout_s: float = 10.0, connect_timeout_s: float = 10.0,
                 statement_cache_size: int = 100, query_dsn: str | None = None,
                 query_pool_size: int = 2) -> None:
        if config is not None:
            q = config["questdb"]
            pool_min_size, pool_max_size = q["pool_min_size"], q["pool_max_size"]
            command_timeout_s, connect_timeout_s = q["command_timeout_s"], q["connect_timeout_s"]
        self.name = name
        self.dsn = dsn
        # Control-channel SQL: its own pool (so it can never starve the bot's calls or the
        # liveness probe), under its own role when the embedded server provides one.
        self.query_dsn = query_dsn or dsn
        self.query_pool_size = max(1, query_pool_size)
        self.query_pool: asyncpg.Pool | None = None  # made on the first control-channel call
        self._query_pool_lock = trio.Lock()
        self._control_in_flight = 0
        self._secrets = tuple(dict.fromkeys(dsn_passwords(dsn) + dsn_passwords(self.query_dsn)))
        self.pool_min_size = pool_min_size
        self.pool_max_size = max(1, pool_max_size)
        # Control-channel SQL never waits for its pool (that would hold one of the cell's
        # request slots, which the bot's calls need): it gets slots of its own on top.
        self.concurrency = self.pool_max_size + self.query_pool_size
        self.command_timeout_s = command_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.statement_cache_size = statement_cache_size
        self.pool: asyncpg.Pool | None = None
        self.dialect: Dialect = POSTGRESQL
        self.server_version = ""
        self.events_table_ready = False

    # ------------------------------------------------------------------ lifecycle
    @contextlib.asynccontextmanager
    async def lifetime(self) -> AsyncIterator[None]:
        async with trio_asyncio.open_loop():
            try:
                yield
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                    await self._close_pool()

    async def _close_pool(self) -> None:
        query_pool, self.query_pool = self.query_pool, None
        for pool in (self.pool, query_pool):
            if pool is not None:
                await self._close_one_pool(pool)
        self.pool = None

    async def _close_one_pool(self, pool: asyncpg.Pool) -> None:
        try:
            with trio.move_on_after(3.0) as scope:
                await trio_asyncio.aio_as_trio(pool.close)()
            if scope.cancelled_caught:
                pool.terminate()
        except Exception:
            log.debug("closing the pool failed", exc_info=True)
            pool.terminate()

    async def connect(self) -> None:
        # The server may have lost the table while we were away (a fresh QuestDB, a restored
        # backup): re-run the idempotent CREATE on the first persist after every connect.
        self.events_table_ready = False
        if self.pool is None:
            self.pool = await trio_asyncio.aio_as_trio(asyncpg.create_pool)(
                self.dsn,
                min_size=self.pool_min_size,
                max_size=self.pool_max_size,
                max_inactive_connection_lifetime=QUESTDB_IDLE_CLOSE_S * 0.8,
                command_timeout=self.command_timeout_s,
                timeout=self.connect_timeout_s,
                statement_cache_size=self.statement_cache_size,
                max_cached_statement_lifetime=QUESTDB_IDLE_CLOSE_S,
                reset=_no_reset,
            )
        version = await self._run(lambda pool: pool.fetchval(
            "SELECT version()", timeout=self.connect_timeout_s))
        self.server_version = str(version)
        self.dialect = detect_dialect(self.server_version)

    async def release(self) -> None:
        # Not a rebuild: connections are replaced lazily as they are next acquired.
        for pool in (self.pool, self.query_pool):
            if pool is not None:
                await trio_asyncio.aio_as_trio(pool.expire_connections)()

    async def probe(self) -> None:
        await self._run(lambda pool: pool.fetchval("SELECT 1", timeout=self.command_timeout_s))

    async def _run(self, work: Any) -> Any:
        pool = self.pool
        if pool is None:
            raise ConnectionError("the connection pool is not open")
        return await trio_asyncio.aio_as_trio(work)(pool)

    # ------------------------------------------------------------------ requests
    async def handle(self, op: str, args: Mapping[str, Any]) -> Any:
        if op in ("persist_events", "max_persisted_seq", "events_table"):
            try:
                if op == "persist_events":
                    return await self._persist(args)
                if op == "events_table":
                    return await self._events_table()
                await self._ensure_events_table()
                return await self._run(
                    lambda p: p.fetchval(self.dialect.max_persisted_seq)) or 0
            except Exception:
                # e.g. the table was dropped behind our back: CREATE it again next time.
                self.events_table_ready = False
                raise
        sql, params = _sql_args(args)
        timeout = self.command_timeout_s
        via_control = bool(args.get(VIA_CONTROL))
        try:
            if op == "fetch":
                rows = await self._query(via_control,
                                         lambda c: c.fetch(sql, *params, timeout=timeout))
                return [dict(r) for r in rows]
            if op == "fetchrow":
                row = await self._query(via_control,
                                        lambda c: c.fetchrow(sql, *params, timeout=timeout))
                return None if row is None else dict(row)
            if op == "fetchval":
                return await self._query(via_control,
                                         lambda c: c.fetchval(sql, *params, timeout=timeout))
            if op == "execute":
                return await self._query(via_control,
                                         lambda c: c.execute(sql, *params, timeout=timeout))
            if op == "executemany":
                if not all(isinstance(row, list | tuple) for row in params):
                    raise TypeError("executemany params must be a list of rows")
                await self._query(via_control,
                                  lambda c: c.executemany(sql, params, timeout=timeout))
                return len(params)
        except Exception:
            log.debug("%s failed for query %r", op, sql[:100], exc_info=True)
            raise
        raise ValueError(f"unknown operation {op!r}")

    async def _query(self, via_control: bool, work: Any) -> Any:
        """``work(connection)`` on a connection of the bot's pool or the control channel's.

        Acquiring and running are timed apart: a connection that cannot be had from the bot's
        pool in time is a connection failure (DESIGN: acquire timeout), a statement that runs
        past its timeout on a live session is a query failure (``QueryTimeout``), and a busy
        control pool only refuses control-channel SQL (``QueryPoolBusy``)."""
        if via_control:
            if self._control_in_flight >= self.query_pool_size:
                raise QueryPoolBusy(f"all {self.query_pool_size} connections for "
                                    "control-channel SQL are busy; try again later")
            self._control_in_flight += 1
            try:
                pool = await self._ensure_query_pool()
                return await self._on_pool(pool, True, work)
            finally:
                self._control_in_flight -= 1
        return await self._on_pool(self.pool, False, work)

    async def _on_pool(self, pool: asyncpg.Pool | None, via_control: bool, work: Any) -> Any:
        if pool is None:
            raise ConnectionError("the connection pool is not open")
        acquire_timeout = self.connect_timeout_s
        timeout_text = f"{self.command_timeout_s:g} s"

        async def on_connection() -> Any:
            try:
                connection = await pool.acquire(timeout=acquire_timeout)
            except TimeoutError as exc:
                if via_control:
                    raise QueryPoolBusy(
                        f"all {self.query_pool_size} connections for control-channel SQL are "
                        "busy") from exc
                raise
            try:
                return await work(connection)
            except TimeoutError as exc:
                raise QueryTimeout(f"the statement ran past {timeout_text}") from exc
            finally:
                await pool.release(connection)

        return await trio_asyncio.aio_as_trio(on_connection)()

    async def _ensure_query_pool(self) -> asyncpg.Pool | None:
        if self.pool is None:
            return None  # not connected: the same error as for the bot's pool
        async with self._query_pool_lock:
            if self.query_pool is None:
                self.query_pool = await trio_asyncio.aio_as_trio(asyncpg.create_pool)(
                    self.query_dsn,
                    min_size=0,
                    max_size=self.query_pool_size,
                    max_inactive_connection_lifetime=QUESTDB_IDLE_CLOSE_S * 0.8,
                    command_timeout=self.command_timeout_s,
                    timeout=self.connect_timeout_s,
                    statement_cache_size=0,  # ad-hoc statements: nothing worth caching
                    reset=_no_reset,
                )
            return self.query_pool

    async def _ensure_events_table(self) -> None:
        if not self.events_table_ready:
            await self._run(lambda p: p.execute(self.dialect.create_events_table))
            self.events_table_ready = True

    async def _events_table(self) -> dict[str, Any]:
        """The events table as persistence needs to know it (no exception for a table that is
        wrong: that is reported, so persistence can hold off instead of skipping events).

        ``max_seq`` is read once every committed WAL transaction is applied (waiting at most
        ``WAL_APPLY_WAIT_S``), else ``pending_txns`` > 0 says it is a lower bound."""
        await self._ensure_events_table()
        table = self.dialect.table
        state: dict[str, Any] = {"table": table, "dialect": self.dialect.name,
                                 "problems": [], "repaired": [], "suspended": False,
                                 "wal_error": "", "pending_txns": 0}
        if self.dialect.is_questdb:
            info = await self._table_info(table)
            if info is None:  # dropped behind our back: create it again
                self.events_table_ready = False
                await self._ensure_events_table()
                info = await self._table_info(table)
            columns = await self._run(lambda p: p.fetch(
                f"SELECT \"column\", type, upsertKey FROM table_columns('{table}')"))
            verdict = verify_questdb_table(table, None if info is None else dict(info),
                                           [dict(c) for c in columns])
            state["problems"] = list(verdict.problems)
            for statement in verdict.repairs:
                log.warning("repairing table %s: %s", table, statement)
                await self._run(lambda p, sql=statement: p.execute(sql))
                state["repaired"].append(statement)
            state.update(await self._wal_state(table))
        state["max_seq"] = await self._run(
            lambda p: p.fetchval(self.dialect.max_persisted_seq)) or 0
        return state

    async def _table_info(self, table: str) -> Any:
        return await self._run(lambda p: p.fetchrow(
            "SELECT walEnabled, dedup, designatedTimestamp FROM tables() "
            "WHERE table_name = $1", table))

    async def _wal_state(self, table: str) -> dict[str, Any]:
        # Polled, never cancelled mid-query: the deadline is checked between queries.
        deadline = trio.current_time() + WAL_APPLY_WAIT_S
        while True:
            row = await self._run(lambda p: p.fetchrow(
                "SELECT suspended, writerTxn, sequencerTxn, errorTag, errorMessage "
                "FROM wal_tables() WHERE name = $1", table))
            if row is None:
                return {}
            pending = max(0, int(row["sequencerTxn"]) - int(row["writerTxn"]))
            wal = {"suspended": bool(row["suspended"]), "pending_txns": pending,
                   "wal_error": " ".join(filter(None, (row["errorTag"], row["errorMessage"])))}
            if wal["suspended"] or pending == 0 or trio.current_time() >= deadline:
                return wal
            await trio.sleep(0.02)

    async def _persist(self, args: Mapping[str, Any]) -> int:
        events = args.get("events")
        if not isinstance(events, list):
            raise TypeError("events must be a list of event objects")
        await self._ensure_events_table()
        rows = [self.dialect.event_row(e) for e in events]
        # The JSON payload escapes a NUL anywhere in the event as \u0000: a cheap test per row.
        rows = [tuple(_no_nul(v) for v in row) if "\\u0000" in row[_PAYLOAD] else row
                for row in rows]
        if rows:
            sql = self.dialect.insert_events
            await self._run(lambda p: p.executemany(sql, rows, timeout=self.command_timeout_s))
        return len(rows)

    def classify(self, exc: BaseException, op: str) -> Failure:
        if isinstance(exc, TypeError | ValueError) and not isinstance(exc, asyncpg.PostgresError):
            from supervision.errors import ErrorCode, describe, operation_message

            return Failure(ErrorCode.INVALID_REQUEST, operation_message(op, describe(exc)))
        if isinstance(exc, QueryTimeout | QueryPoolBusy):
            from supervision.errors import ErrorCode, operation_message

            return Failure(ErrorCode.TIMEOUT, operation_message(op, str(exc)),
                           reason="busy" if isinstance(exc, QueryPoolBusy) else "timeout")
        return classify_db_error(exc, op, secrets=self._secrets)

    def deadline_failure(self, op: str, timeout_s: float) -> Failure:
        if op in ("connect", "reconnect", "probe"):
            from supervision.errors import ErrorCode

            return Failure(ErrorCode.DB_UNAVAILABLE,
                           f"{op} failed: the database did not answer within {timeout_s:g} s",
                           connection=True)
        return super().deadline_failure(op, timeout_s)

    def status_extra(self) -> dict[str, Any]:
        pool = self.pool
        return {
            "dialect": self.dialect.name,
            "pool_size": pool.get_size() if pool is not None else 0,
            "pool_idle": pool.get_idle_size() if pool is not None else 0,
            "query_pool_size": (self.query_pool.get_size()
                                if self.query_pool is not None else 0),
        }


class QuestdbRef(ActorRef):
    """``rt.questdb``: asyncpg-style methods returning ``Response``."""

    async def fetch(self, sql: str, *params: Any, timeout_s: float | None = None) -> Response:
        return await self.call("fetch", {"sql": sql, "params": list(params)},
                               timeout_s=timeout_s)

    async def fetchrow(self, sql: str, *params: Any, timeout_s: float | None = None
                       ) -> Response:
        return await self.call("fetchrow", {"sql": sql, "params": list(params)},
                               timeout_s=timeout_s)

    async def fetchval(self, sql: str, *params: Any, timeout_s: float | None = None
                       ) -> Response:
        return await self.call("fetchval", {"sql": sql, "params": list(params)},
                               timeout_s=timeout_s)

    async def execute(self, sql: str, *params: Any, timeout_s: float | None = None
                      ) -> Response:
        return await self.call("execute", {"sql": sql, "params": list(params)},
                               timeout_s=timeout_s)

    async def executemany(self, sql: str, rows: list[Any], *, timeout_s: float | None = None
                          ) -> Response:
        return await self.call("executemany", {"sql": sql, "params": [list(r) for r in rows]},
                               timeout_s=timeout_s)
