"""The database error taxonomy against a real PostgreSQL server (and asyncpg's real errors).

Each real-server test provokes one failure and checks both what asyncpg actually raised and
how ``classify_db_error`` files it. asyncpg runs on plain asyncio (``asyncio.run`` inside sync
tests); every await is bounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import pytest
from asyncpg.exceptions import _base as asyncpg_base

from actors.questdb.errors import classify_db_error, is_connection_error
from actors.questdb.pgserver import EmbeddedPostgres
from supervision.errors import ErrorCode, Failure
from tests.support.pg_fixtures import PG_TEST_PASSWORD

T = TypeVar("T")

SECRETS = (PG_TEST_PASSWORD,)


def run(fn: Callable[[], Awaitable[T]], timeout_s: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(fn(), timeout_s)

    return asyncio.run(bounded())


def assert_unavailable(failure: Failure, operation: str) -> None:
    assert failure.code is ErrorCode.DB_UNAVAILABLE, failure
    assert failure.connection is True
    assert failure.message.startswith(f"{operation} failed: ")
    assert PG_TEST_PASSWORD not in failure.message


def assert_query_failed(failure: Failure, operation: str) -> None:
    assert failure.code is ErrorCode.DB_QUERY_FAILED, failure
    assert failure.connection is False
    assert failure.message.startswith(f"{operation} failed: ")
    assert PG_TEST_PASSWORD not in failure.message


async def connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, timeout=5)


async def wait_until_running_sleep(monitor: asyncpg.Connection, backend_pid: int) -> None:
    """Until the backend is inside ``pg_sleep`` (so the failure hits a query in flight)."""
    for _ in range(500):
        row = await monitor.fetchrow(
            "SELECT state, query FROM pg_stat_activity WHERE pid = $1", backend_pid, timeout=5
        )
        if row is not None and row["state"] == "active" and "pg_sleep" in row["query"]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the query never became active")


async def fail_mid_query(
    server: EmbeddedPostgres, act: Callable[[asyncpg.Connection, int], Awaitable[Any]]
) -> BaseException:
    """Run ``SELECT pg_sleep(10)``, do ``act(monitor, backend_pid)`` while it runs, return the
    exception the query raised."""
    conn = await connect(server.dsn)
    monitor = await connect(server.dsn)
    try:
        query = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(10)"))
        await wait_until_running_sleep(monitor, conn.get_server_pid())
        await act(monitor, conn.get_server_pid())
        try:
            await asyncio.wait_for(query, 5)
        except Exception as exc:  # noqa: BLE001 - the point is to look at it
            return exc
        raise AssertionError("the query survived")
    finally:
        conn.terminate()
        monitor.terminate()


# ------------------------------------------------------------------ connection: real server


@pytest.mark.realserver
def test_connection_refused_when_the_server_is_stopped(pg_server: EmbeddedPostgres) -> None:
    pg_server.stop()

    async def attempt() -> BaseException:
        with pytest.raises(Exception) as info:
            await connect(pg_server.dsn)
        return info.value

    exc = run(attempt)
    assert isinstance(exc, ConnectionRefusedError)
    failure = classify_db_error(exc, "connect", secrets=SECRETS)
    assert_unavailable(failure, "connect")
    assert "Connect call failed" in failure.message


@pytest.mark.realserver
def test_server_killed_mid_query(pg_server: EmbeddedPostgres) -> None:
    async def kill(_monitor: asyncpg.Connection, _pid: int) -> None:
        await asyncio.to_thread(pg_server.kill)

    exc = run(lambda: fail_mid_query(pg_server, kill))
    # No FATAL message: the backend died with the postmaster; the socket just closed.
    assert isinstance(exc, asyncpg.ConnectionDoesNotExistError)
    failure = classify_db_error(exc, "fetch", secrets=SECRETS)
    assert_unavailable(failure, "fetch")
    assert "connection was closed in the middle of operation" in failure.message

    # Afterwards: refused until the server is back, then fine again.
    async def after() -> BaseException:
        with pytest.raises(Exception) as info:
            await connect(pg_server.dsn)
        return info.value

    assert_unavailable(classify_db_error(run(after), "connect"), "connect")
    pg_server.start()

    async def select_one() -> int:
        conn = await connect(pg_server.dsn)
        try:
            return await conn.fetchval("SELECT 1", timeout=5)
        finally:
            await conn.close(timeout=5)

    assert run(select_one) == 1


@pytest.mark.realserver
def test_session_terminated_by_pg_terminate_backend(pg_server: EmbeddedPostgres) -> None:
    async def terminate(monitor: asyncpg.Connection, pid: int) -> None:
        assert await monitor.fetchval("SELECT pg_terminate_backend($1)", pid, timeout=5)

    exc = run(lambda: fail_mid_query(pg_server, terminate))
    # asyncpg reports the lost session; the server's FATAL 57P01 is kept as the cause.
    assert isinstance(exc, asyncpg.ConnectionDoesNotExistError)
    assert isinstance(exc.__cause__, asyncpg.AdminShutdownError)
    failure = classify_db_error(exc, "fetch", secrets=SECRETS)
    assert_unavailable(failure, "fetch")
    assert "terminating connection due to administrator command" in failure.message


@pytest.mark.realserver
def test_fast_shutdown_mid_query(pg_server: EmbeddedPostgres) -> None:
    async def fast_stop(_monitor: asyncpg.Connection, _pid: int) -> None:
        await asyncio.to_thread(pg_server.stop, "fast")

    exc = run(lambda: fail_mid_query(pg_server, fast_stop))
    assert isinstance(exc, asyncpg.ConnectionDoesNotExistError)
    assert isinstance(exc.__cause__, asyncpg.AdminShutdownError)
    assert exc.__cause__.sqlstate == "57P01"
    assert_unavailable(classify_db_error(exc, "fetch", secrets=SECRETS), "fetch")
    # The cause on its own is a connection error too (SQLSTATE 57P01, severity FATAL).
    assert_unavailable(classify_db_error(exc.__cause__, "fetch"), "fetch")


@pytest.mark.realserver
def test_immediate_shutdown_mid_query(pg_server: EmbeddedPostgres) -> None:
    async def immediate_stop(_monitor: asyncpg.Connection, _pid: int) -> None:
        await asyncio.to_thread(pg_server.stop, "immediate")

    exc = run(lambda: fail_mid_query(pg_server, immediate_stop))
    assert isinstance(exc, asyncpg.ConnectionDoesNotExistError)
    assert_unavailable(classify_db_error(exc, "fetch", secrets=SECRETS), "fetch")


@pytest.mark.realserver
def test_pool_across_a_crash(pg_server: EmbeddedPostgres) -> None:
    """What the questdb actor's pool sees: the idle connection dies with the server, new
    connections are refused until it is back, then the same pool works again."""

    async def scenario() -> tuple[list[BaseException], int]:
        seen: list[BaseException] = []
        pool = await asyncpg.create_pool(pg_server.dsn, min_size=1, max_size=2, timeout=5)
        try:
            assert await pool.fetchval("SELECT 1", timeout=5) == 1
            await asyncio.to_thread(pg_server.kill)
            for _ in range(2):
                try:
                    await pool.fetchval("SELECT 1", timeout=5)
                except Exception as exc:  # noqa: BLE001
                    seen.append(exc)
            await asyncio.to_thread(pg_server.start)
            return seen, await pool.fetchval("SELECT 1", timeout=5)
        finally:
            pool.terminate()

    seen, after = run(scenario)
    assert after == 1
    assert len(seen) == 2
    # The idle connection learns of the crash when it is used; the next acquire reconnects.
    assert isinstance(seen[0], asyncpg.ConnectionDoesNotExistError | ConnectionRefusedError)
    assert isinstance(seen[1], ConnectionRefusedError)
    for exc in seen:
        assert_unavailable(classify_db_error(exc, "fetch", secrets=SECRETS), "fetch")


@pytest.mark.realserver
def test_new_session_refused_while_shutting_down(pg_server: EmbeddedPostgres) -> None:
    """Smart shutdown waits for open sessions; meanwhile new ones get 57P03."""

    async def scenario() -> BaseException:
        holder = await connect(pg_server.dsn)
        try:
            assert pg_server.pid is not None
            os.kill(pg_server.pid, signal.SIGTERM)  # smart shutdown, without waiting
            for _ in range(200):
                try:
                    extra = await connect(pg_server.dsn)
                except Exception as exc:  # noqa: BLE001
                    return exc
                await extra.close(timeout=5)
                await asyncio.sleep(0.01)
            raise AssertionError("new sessions were still accepted")
        finally:
            holder.terminate()

    exc = run(scenario)
    assert isinstance(exc, asyncpg.CannotConnectNowError)
    assert exc.sqlstate == "57P03" and exc.severity == "FATAL"
    failure = classify_db_error(exc, "connect", secrets=SECRETS)
    assert_unavailable(failure, "connect")
    assert "shutting down" in failure.message


@pytest.mark.realserver
def test_closed_connection_and_pool_are_connection_errors(pg_server: EmbeddedPostgres) -> None:
    async def scenario() -> list[BaseException]:
        seen: list[BaseException] = []
        conn = await connect(pg_server.dsn)
        monitor = await connect(pg_server.dsn)
        await monitor.fetchval("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        await monitor.close(timeout=5)
        for _ in range(2):  # first use notices the loss, second finds it closed
            try:
                await conn.fetchval("SELECT 1", timeout=5)
            except Exception as exc:  # noqa: BLE001
                seen.append(exc)
        pool = await asyncpg.create_pool(pg_server.dsn, min_size=1, max_size=1, timeout=5)
        async with pool.acquire(timeout=5):
            try:
                await pool.acquire(timeout=0.2)
            except Exception as exc:  # noqa: BLE001
                seen.append(exc)
        await pool.close()
        try:
            await pool.fetchval("SELECT 1")
        except Exception as exc:  # noqa: BLE001
            seen.append(exc)
        return seen

    seen = run(scenario)
    # Usually asyncpg has already seen the FATAL and the close ("connection is closed"). If the
    # query races the server's unsolicited FATAL it gets "closed in the middle of operation",
    # or asyncpg's protocol state machine trips: InternalClientError("cannot switch to state
    # 11; another operation (2) is in progress"). All three mean the session is gone.
    assert isinstance(
        seen[0],
        asyncpg.InterfaceError
        | asyncpg.ConnectionDoesNotExistError
        | asyncpg_base.InternalClientError,
    ), repr(seen[0])
    assert isinstance(seen[1], asyncpg.InterfaceError)
    assert "connection is closed" in str(seen[1])
    for exc in seen[:2]:
        assert_unavailable(classify_db_error(exc, "fetch", secrets=SECRETS), "fetch")

    acquire_timeout = seen[2]
    assert isinstance(acquire_timeout, TimeoutError) and str(acquire_timeout) == ""
    failure = classify_db_error(acquire_timeout, "acquire")
    assert_unavailable(failure, "acquire")
    assert failure.message == "acquire failed: TimeoutError"  # empty str -> type name

    pool_closed = seen[3]
    assert isinstance(pool_closed, asyncpg.InterfaceError)
    assert "pool is closed" in str(pool_closed)
    assert_unavailable(classify_db_error(pool_closed, "fetch"), "fetch")


@pytest.mark.realserver
def test_refused_startups_wrong_password_and_unknown_database(
    pg_server: EmbeddedPostgres,
) -> None:
    wrong = "not-the-Password-91"
    wrong_dsn = pg_server.dsn.replace(PG_TEST_PASSWORD, wrong)
    no_db_dsn = pg_server.dsn.rsplit("/", 1)[0] + "/no_such_db"

    async def attempt(dsn: str) -> BaseException:
        with pytest.raises(Exception) as info:
            await connect(dsn)
        return info.value

    bad_password = run(lambda: attempt(wrong_dsn))
    assert isinstance(bad_password, asyncpg.InvalidPasswordError)
    assert bad_password.severity == "FATAL"
    failure = classify_db_error(bad_password, "connect", secrets=(PG_TEST_PASSWORD, wrong))
    assert_unavailable(failure, "connect")
    assert wrong not in failure.message
    assert "password authentication failed" in failure.message

    no_db = run(lambda: attempt(no_db_dsn))
    assert isinstance(no_db, asyncpg.InvalidCatalogNameError)
    assert_unavailable(classify_db_error(no_db, "connect", secrets=SECRETS), "connect")


# ------------------------------------------------------------------ query failures: real server


@pytest.mark.realserver
def test_query_errors_are_not_connection_errors(pg_server: EmbeddedPostgres) -> None:
    async def scenario() -> dict[str, BaseException]:
        seen: dict[str, BaseException] = {}
        conn = await connect(pg_server.dsn)
        try:
            await conn.execute("CREATE TABLE items (id int PRIMARY KEY)")
            await conn.execute("INSERT INTO items VALUES (1)")
            cases: dict[str, tuple[str, tuple[Any, ...]]] = {
                "syntax": ("SELEC 1", ()),
                "missing table": ("SELECT * FROM no_such_table", ()),
                "unique violation": ("INSERT INTO items VALUES (1)", ()),
                "division by zero": ("SELECT 1 / 0", ()),
                "bad argument": ("INSERT INTO items VALUES ($1)", ("not a number",)),
                "statement timeout": ("SET statement_timeout = 50; SELECT pg_sleep(2)", ()),
            }
            for label, (sql, args) in cases.items():
                try:
                    await conn.execute(sql, *args, timeout=5)
                except Exception as exc:  # noqa: BLE001
                    seen[label] = exc
                await conn.execute("RESET statement_timeout", timeout=5)
            # The session survived every one of them.
            assert await conn.fetchval("SELECT 1", timeout=5) == 1
        finally:
            await conn.close(timeout=5)
        return seen

    seen = run(scenario)
    assert isinstance(seen["syntax"], asyncpg.PostgresSyntaxError)
    assert isinstance(seen["missing table"], asyncpg.UndefinedTableError)
    assert isinstance(seen["unique violation"], asyncpg.UniqueViolationError)
    assert isinstance(seen["division by zero"], asyncpg.DivisionByZeroError)
    assert isinstance(seen["bad argument"], asyncpg.DataError)  # client side (InterfaceError)
    assert isinstance(seen["statement timeout"], asyncpg.QueryCanceledError)
    for label, exc in seen.items():
        failure = classify_db_error(exc, "execute", secrets=SECRETS)
        assert_query_failed(failure, "execute")
        assert not is_connection_error(exc), label
    assert "no_such_table" in classify_db_error(seen["missing table"], "execute").message


@pytest.mark.realserver
def test_questdb_style_error_with_sqlstate_00000_is_a_query_failure() -> None:
    """QuestDB answers errors with SQLSTATE 00000 and severity ERROR (PGPipelineEntry
    .outError in questdb/questdb). A minimal PG-wire server that does exactly that shows what
    real asyncpg makes of it: ``UnknownPostgresError``, and the session survives."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def message(kind: bytes, body: bytes) -> bytes:
            return kind + struct.pack("!i", len(body) + 4) + body

        try:
            length, code = struct.unpack("!ii", await reader.readexactly(8))
            if code == 80877103:  # SSLRequest: no
                writer.write(b"N")
                length, code = struct.unpack("!ii", await reader.readexactly(8))
            await reader.readexactly(length - 8)  # startup parameters
            writer.write(message(b"R", struct.pack("!i", 0)))  # AuthenticationOk
            for key, value in (
                ("server_version", "12.3"),
                ("client_encoding", "UTF8"),
                ("integer_datetimes", "on"),
                ("DateStyle", "ISO"),
                ("TimeZone", "UTC"),
                ("standard_conforming_strings", "on"),
            ):
                writer.write(message(b"S", f"{key}\0{value}\0".encode()))
            writer.write(message(b"K", struct.pack("!ii", 4242, 1)))
            writer.write(message(b"Z", b"I"))
            await writer.drain()
            while True:
                kind = await reader.readexactly(1)
                (size,) = struct.unpack("!i", await reader.readexactly(4))
                await reader.readexactly(size - 4)
                if kind == b"X":
                    break
                if kind in (b"P", b"Q"):
                    writer.write(
                        message(
                            b"E",
                            b"C00000\0Mtable does not exist [table=nope]\0SERROR\0P15\0\0",
                        )
                    )
                if kind in (b"S", b"Q"):
                    writer.write(message(b"Z", b"I"))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    async def scenario() -> tuple[list[BaseException], bool]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        errors: list[BaseException] = []
        try:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=port, user="admin", password="quest", timeout=5
            )
            for _ in range(2):
                try:
                    await conn.fetch("SELECT * FROM nope", timeout=5)
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
            still_open = not conn.is_closed()
            await conn.close(timeout=5)
        finally:
            server.close()
            await server.wait_closed()
        return errors, still_open

    errors, still_open = run(scenario)
    assert still_open
    assert len(errors) == 2
    for exc in errors:
        assert isinstance(exc, asyncpg_base.UnknownPostgresError)
        assert exc.sqlstate == "00000" and exc.severity == "ERROR"
        failure = classify_db_error(exc, "fetch", secrets=("quest",))
        assert_query_failed(failure, "fetch")
        assert failure.message == "fetch failed: table does not exist [table=nope]"


# ------------------------------------------------------------------ the rules, without a server


def _server_error(fields: dict[str, str]) -> asyncpg.PostgresError:
    """An error as asyncpg builds it from a server's ErrorResponse fields."""
    return asyncpg.PostgresError.new(fields)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ConnectionResetError(104, "Connection reset by peer"), ErrorCode.DB_UNAVAILABLE),
        (BrokenPipeError(), ErrorCode.DB_UNAVAILABLE),
        (OSError(113, "No route to host"), ErrorCode.DB_UNAVAILABLE),
        (TimeoutError(), ErrorCode.DB_UNAVAILABLE),  # asyncio.TimeoutError is this class
        (asyncpg.ConnectionFailureError("lost"), ErrorCode.DB_UNAVAILABLE),
        (asyncpg.CannotConnectNowError("starting up"), ErrorCode.DB_UNAVAILABLE),
        (asyncpg.AdminShutdownError("admin"), ErrorCode.DB_UNAVAILABLE),
        (asyncpg.CrashShutdownError("crash"), ErrorCode.DB_UNAVAILABLE),
        (asyncpg.IdleSessionTimeoutError("idle"), ErrorCode.DB_UNAVAILABLE),
        (asyncpg.TooManyConnectionsError("too many"), ErrorCode.DB_UNAVAILABLE),
        (asyncpg.InterfaceError("connection is closed"), ErrorCode.DB_UNAVAILABLE),
        (asyncpg.InterfaceError("pool is closing"), ErrorCode.DB_UNAVAILABLE),
        (
            asyncpg_base.TargetServerAttributeNotMatched("no primary"),
            ErrorCode.DB_UNAVAILABLE,
        ),
        (
            _server_error({"C": "XX000", "S": "FATAL", "M": "internal, session ends"}),
            ErrorCode.DB_UNAVAILABLE,
        ),
        (
            _server_error({"C": "XX000", "S": "ERROR", "M": "internal, session lives"}),
            ErrorCode.DB_QUERY_FAILED,
        ),
        (_server_error({"C": "00000", "S": "ERROR", "M": "questdb"}), ErrorCode.DB_QUERY_FAILED),
        (asyncpg.QueryCanceledError("statement timeout"), ErrorCode.DB_QUERY_FAILED),
        (asyncpg.DiskFullError("disk full"), ErrorCode.DB_QUERY_FAILED),
        (asyncpg.InterfaceError("another operation is in progress"), ErrorCode.DB_QUERY_FAILED),
        (asyncpg.ClientConfigurationError("bad option"), ErrorCode.DB_QUERY_FAILED),
        (
            asyncpg_base.InternalClientError(
                "cannot switch to state 11; another operation (2) is in progress"
            ),
            ErrorCode.DB_UNAVAILABLE,
        ),
        (
            asyncpg_base.InternalClientError(
                'cannot switch to state 12; protocol is in the "failed" state'
            ),
            ErrorCode.DB_UNAVAILABLE,
        ),
        (asyncpg_base.InternalClientError("not connected"), ErrorCode.DB_UNAVAILABLE),
        (
            asyncpg_base.InternalClientError("no binary format encoder for type x (OID 1)"),
            ErrorCode.DB_QUERY_FAILED,
        ),
        (asyncpg_base.ProtocolError("array length overflow"), ErrorCode.DB_QUERY_FAILED),
        (asyncpg_base.OutdatedSchemaCacheError("schema changed"), ErrorCode.DB_QUERY_FAILED),
        (ValueError("invalid literal for int()"), ErrorCode.INTERNAL),
        (KeyError("x"), ErrorCode.INTERNAL),
        (RuntimeError(), ErrorCode.INTERNAL),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None,
)
def test_classification_rules(exc: BaseException, code: ErrorCode) -> None:
    failure = classify_db_error(exc, "op")
    assert failure.code is code
    assert failure.connection is (code is ErrorCode.DB_UNAVAILABLE)
    assert failure.message.startswith("op failed: ")
    assert failure.message != "op failed: "


def test_an_empty_message_becomes_the_type_name() -> None:
    assert classify_db_error(TimeoutError(), "connect").message == "connect failed: TimeoutError"
    assert (
        classify_db_error(asyncpg.ConnectionDoesNotExistError(""), "fetch").message
        == "fetch failed: ConnectionDoesNotExistError"
    )
    assert classify_db_error(ValueError("   "), "x").message == "x failed: ValueError"


def test_credentials_never_appear_in_messages() -> None:
    password = "Hunter2-very-secret"
    dsn = f"postgresql://admin:{password}@db.example:8812/qdb"
    cases = [
        OSError(f"could not connect to {dsn}"),
        asyncpg.ClientConfigurationError(f"invalid DSN {dsn}"),
        asyncpg.PostgresError(f"password={password} rejected"),
        ValueError(f"bad configuration: {password}"),
    ]
    for exc in cases:
        message = classify_db_error(exc, "connect", secrets=(password,)).message
        assert password not in message, message
        assert "***" in message
    # DSN credentials are scrubbed even when the caller forgot to pass the secret.
    message = classify_db_error(OSError(f"cannot reach {dsn}"), "connect").message
    assert password not in message and "admin" not in message


def test_exception_groups_are_classified_by_their_leaves() -> None:
    group = ExceptionGroup(
        "several", [ValueError("a bug"), ExceptionGroup("inner", [ConnectionResetError("gone")])]
    )
    failure = classify_db_error(group, "fetch")
    assert failure.code is ErrorCode.DB_UNAVAILABLE and failure.connection
    assert failure.message == "fetch failed: gone"

    only_queries = ExceptionGroup("q", [asyncpg.PostgresSyntaxError("syntax error at or near")])
    failure = classify_db_error(only_queries, "fetch")
    assert failure.code is ErrorCode.DB_QUERY_FAILED and not failure.connection
    assert failure.message == "fetch failed: syntax error at or near"
