"""Where numbering starts when the event log starts from nothing: above the events table.

The log and its high-water mark carry ``seq`` across restarts (supervision/loghwm.py). When
both are gone (a fresh state directory) while an external database kept the table, the
runtime would number its first events from 1 again, reusing seqs the table holds; those
events would never be persisted (the table already has their seq). The event store raises
the floor once it reads the table, but only after its first events are out. So before the
first event, the runtime reads the table's ``max(seq)`` once, with a short deadline: found,
numbering starts above it; not found in time (the database is down, there is no table yet),
it starts as before and the event store's check is the fallback.
"""

from __future__ import annotations

import logging

import asyncpg
import trio
import trio_asyncio

from actors.questdb.dialect import POSTGRESQL
from actors.questdb.errors import dsn_passwords
from supervision.errors import describe, operation_message

log = logging.getLogger(__name__)


async def persisted_max_seq(dsn: str, *, timeout_s: float) -> int | None:
    """The events table's highest ``seq`` (0 for an empty table); None when it cannot be
    read within ``timeout_s`` (no server, no table, no permission): the caller goes on."""
    with trio.move_on_after(timeout_s):
        async with trio_asyncio.open_loop():
            try:
                conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(dsn, timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - any failure means "not known now"
                _not_read(exc, dsn)
                return None
            try:
                await _wal_applied(conn, deadline=trio.current_time() + timeout_s / 2)
                value = await trio_asyncio.aio_as_trio(conn.fetchval)(
                    POSTGRESQL.max_persisted_seq, timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001
                _not_read(exc, dsn)
                return None
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                    try:
                        await trio_asyncio.aio_as_trio(conn.close)(timeout=2.0)
                    except Exception:  # noqa: BLE001 - closing is best effort
                        conn.terminate()
            return int(value or 0)
    log.warning("event log: the events table's max(seq) was not read within %.1f s; "
                "numbering starts from the log (the event store checks again later)",
                timeout_s)
    return None


async def _wal_applied(conn: asyncpg.Connection, *, deadline: float) -> None:
    """On QuestDB, rows count in ``max(seq)`` once their WAL is applied (milliseconds after
    the insert, normally): wait for that, briefly, or a runtime that stopped a moment ago
    would leave its last events out of the floor. PostgreSQL has no ``wal_tables()``."""
    while trio.current_time() < deadline:
        try:
            row = await trio_asyncio.aio_as_trio(conn.fetchrow)(
                "SELECT suspended, writerTxn, sequencerTxn FROM wal_tables() WHERE name = $1",
                POSTGRESQL.table, timeout=1.0)
        except asyncpg.PostgresError:
            return  # not QuestDB
        if row is None or row["suspended"] or row["writerTxn"] >= row["sequencerTxn"]:
            return
        await trio.sleep(0.02)


def _not_read(exc: BaseException, dsn: str) -> None:
    # PostgreSQL: undefined_table; QuestDB: "table does not exist [table=...]". A missing
    # database or role is a misconfiguration, and stays a warning.
    if (isinstance(exc, asyncpg.UndefinedTableError)
            or "table does not exist" in str(exc)):
        log.info("event log: no events table yet; numbering starts from 1")
        return
    log.warning("event log: %s; numbering starts from the log (the event store checks "
                "again later)", operation_message("reading the events table's max(seq)",
                                                  describe(exc), dsn_passwords(dsn)))
