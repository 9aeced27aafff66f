"""EmbeddedPostgres against the real binaries: start, stop, kill -9, restart, survival."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from actors.questdb.pgserver import EmbeddedPostgres, EmbeddedPostgresError
from tests.support.pg_fixtures import PG_TEST_INITDB_OPTIONS, PG_TEST_PASSWORD

pytestmark = pytest.mark.realserver

T = TypeVar("T")


def run(fn: Callable[[], Awaitable[T]], timeout_s: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(fn(), timeout_s)

    return asyncio.run(bounded())


async def query(server: EmbeddedPostgres, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(server.dsn, timeout=5)
    try:
        return await conn.fetchval(sql, *args, timeout=5)
    finally:
        await conn.close(timeout=5)


def refused(server: EmbeddedPostgres) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((server.host, server.port)) != 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state != "Z"


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == str(pid):
                found.append(int(entry.name))
    return found


def test_start_accepts_sessions_then_stop_frees_the_port(pg_server: EmbeddedPostgres) -> None:
    assert pg_server.is_running()
    assert pg_server.pid is not None
    assert pg_server.dsn == (
        f"postgresql://postgres:{PG_TEST_PASSWORD}@127.0.0.1:{pg_server.port}/postgres"
    )
    assert run(lambda: query(pg_server, "SELECT 1")) == 1
    version = run(lambda: query(pg_server, "SELECT version()"))
    assert version.startswith("PostgreSQL ")

    pid = pg_server.pid
    started = time.monotonic()
    pg_server.stop()
    assert time.monotonic() - started < 5
    assert not pg_server.is_running()
    assert pg_server.pid is None
    assert not pid_alive(pid)
    assert refused(pg_server)
    # Nothing listens any more: the port can be bound again.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((pg_server.host, pg_server.port))
    pg_server.stop()  # idempotent


def test_kill_is_a_crash_and_restart_recovers_on_the_same_port(
    pg_server: EmbeddedPostgres,
) -> None:
    async def write() -> None:
        conn = await asyncpg.connect(pg_server.dsn, timeout=5)
        try:
            await conn.execute("CREATE TABLE kept (id int PRIMARY KEY, note text)")
            await conn.execute("INSERT INTO kept VALUES (1, 'before the crash')")
        finally:
            await conn.close(timeout=5)

    run(write)
    port, pid = pg_server.port, pg_server.pid
    assert pid is not None
    backends = children_of(pid)
    assert backends, "a running postmaster has children (checkpointer, walwriter, ...)"

    pg_server.kill()
    assert not pg_server.is_running()
    assert not pid_alive(pid)
    # PostgreSQL children lead their own process groups; kill() must take them all.
    assert not [child for child in backends if pid_alive(child)]
    assert refused(pg_server)

    pg_server.start()
    assert pg_server.port == port
    assert pg_server.pid != pid
    assert run(lambda: query(pg_server, "SELECT note FROM kept WHERE id = 1")) == (
        "before the crash"
    )
    log = pg_server.log_path.read_text()
    assert "not properly shut down" in log and "automatic recovery" in log


def test_graceful_restart_keeps_data_and_port(pg_server: EmbeddedPostgres) -> None:
    run(lambda: query(pg_server, "CREATE TABLE t AS SELECT 42 AS answer"))
    port = pg_server.port
    pg_server.restart()
    assert pg_server.port == port
    assert run(lambda: query(pg_server, "SELECT answer FROM t")) == 42
    for mode in ("smart", "immediate"):
        pg_server.stop(mode=mode)
        assert refused(pg_server)
        pg_server.start()
        assert run(lambda: query(pg_server, "SELECT answer FROM t")) == 42
    with pytest.raises(ValueError, match="stop mode"):
        pg_server.stop(mode="sideways")


def test_start_is_idempotent_and_close_is_final(pg_server: EmbeddedPostgres) -> None:
    pid = pg_server.pid
    pg_server.start()
    assert pg_server.pid == pid
    pg_server.close()
    pg_server.close()
    assert not pg_server.is_running()
    assert pid is not None and not pid_alive(pid)
    with pytest.raises(EmbeddedPostgresError, match="closed"):
        pg_server.start()


def test_server_does_not_run_as_root(pg_server: EmbeddedPostgres) -> None:
    uid_line = next(
        line
        for line in Path(f"/proc/{pg_server.pid}/status").read_text().splitlines()
        if line.startswith("Uid:")
    )
    server_uid = int(uid_line.split()[1])
    if os.geteuid() == 0:
        assert server_uid != 0
    else:
        assert server_uid == os.geteuid()


def test_failed_start_reports_the_server_log(pg_server_factory: Any) -> None:
    server = pg_server_factory(start=False, server_settings={"shared_buffers": "lots"})
    started = time.monotonic()
    with pytest.raises(EmbeddedPostgresError) as info:
        server.start(timeout_s=10)
    assert time.monotonic() - started < 10
    text = str(info.value)
    assert "exited with status" in text
    assert "shared_buffers" in text  # the log tail says what was wrong
    assert not server.is_running()


def test_an_abandoned_start_gives_up_at_once_and_leaves_nothing_running(
        pg_server_factory: Any) -> None:
    """A start the caller stopped waiting for (shutdown during a start) must not run on for
    its whole timeout: the runtime's final close() waits for it."""
    server = pg_server_factory(start=False)
    abort = threading.Event()
    stopped: list[int] = []

    def hang_then_abandon() -> None:
        # As a hung start: the postmaster is there but never gets ready. Then the caller
        # gives up.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and server.pid is None:
            time.sleep(0.001)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        stopped.append(server.pid)
        time.sleep(0.3)
        abort.set()

    watcher = threading.Thread(target=hang_then_abandon)
    watcher.start()
    started = time.monotonic()
    try:
        with pytest.raises(EmbeddedPostgresError, match="abandoned"):
            server.start(timeout_s=30, abort=abort)
    finally:
        watcher.join()
    assert time.monotonic() - started < 5  # not the 30 s timeout
    assert stopped and not pid_alive(stopped[0])
    assert not server.is_running() and refused(server)
    # Nothing is left half-started: the next start works.
    server.start(timeout_s=30)
    assert run(lambda: query(server, "SELECT 1")) == 1


def test_initdb_on_an_empty_directory_and_a_named_database(pg_base_dir: Path) -> None:
    data = pg_base_dir / "fresh-initdb"
    server = EmbeddedPostgres(
        data, database="events", durable=False, initdb_options=PG_TEST_INITDB_OPTIONS
    )
    assert server.dsn == f"postgresql://postgres@127.0.0.1:{server.port}/events"
    with server:
        assert (data / "PG_VERSION").exists()
        assert run(lambda: query(server, "SELECT current_database()")) == "events"
    assert not server.is_running()


def test_from_template_refuses_a_non_empty_target(pg_template: Path, pg_base_dir: Path) -> None:
    target = pg_base_dir / "not-empty"
    target.mkdir()
    (target / "something").write_text("x")
    with pytest.raises(EmbeddedPostgresError, match="not empty"):
        EmbeddedPostgres.from_template(pg_template, target)
    with pytest.raises(EmbeddedPostgresError, match="not an initialised"):
        EmbeddedPostgres.from_template(target, pg_base_dir / "other")


def test_a_leftover_postmaster_is_stopped_before_starting(pg_server: EmbeddedPostgres) -> None:
    """A server left running by a previous owner (our process died) does not block start."""
    orphan_pid = pg_server.pid
    assert orphan_pid is not None
    heir = EmbeddedPostgres(
        pg_server.data_dir,
        port=pg_server.port,
        password=PG_TEST_PASSWORD,
        durable=False,
    )
    orphan = pg_server._proc
    pg_server._proc = None  # forget it, as a crashed owner would (the process keeps running)
    try:
        heir.start()
        assert heir.pid != orphan_pid
        assert not pid_alive(orphan_pid)
        assert run(lambda: query(heir, "SELECT 1")) == 1
    finally:
        heir.close()
        if orphan is not None:
            orphan.wait(timeout=10)


# ---------------------------------------------------------------------------- locked down
def test_locked_server_refuses_the_superuser_over_tcp_and_serves_the_unix_socket(
    pg_server_factory: Callable[..., EmbeddedPostgres],
) -> None:
    server = pg_server_factory(superuser_over_tcp=False)
    # Even with its right password: pg_hba rejects the superuser on every TCP address.
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="rejects"):
        run(lambda: query(server, "SELECT 1"))
    assert server.psql("SELECT 40 + 2").strip() == "42"
    hba = (server.data_dir / "pg_hba.conf").read_text()
    assert "trust" not in [line.split()[-1] for line in hba.splitlines()
                           if line.startswith("host")]
    with pytest.raises(EmbeddedPostgresError, match="psql failed"):
        server.psql("SELECT * FROM no_such_table")


def test_the_unix_socket_lives_in_the_data_directory_across_crashes(
    pg_server_factory: Callable[..., EmbeddedPostgres],
) -> None:
    server = pg_server_factory()
    assert (server.data_dir / f".s.PGSQL.{server.port}").is_socket()
    server.kill()
    server.start()
    assert (server.data_dir / f".s.PGSQL.{server.port}").is_socket()
    assert server.psql("SELECT 1").strip() == "1"


def test_a_long_data_directory_gets_one_fixed_private_socket_directory(
    pg_template: Path, pg_base_dir: Path
) -> None:
    deep = pg_base_dir / ("d" * 60) / ("e" * 60)
    server = EmbeddedPostgres.from_template(pg_template, deep / "data",
                                            password=PG_TEST_PASSWORD, durable=False)
    try:
        server.start()
        first = server._socket_dir
        assert first is not None and first != server.data_dir
        assert first.stat().st_mode & 0o777 == 0o700
        server.kill()
        server.start()
        assert server._socket_dir == first  # reused after a crash: nothing leaks per start
        again = EmbeddedPostgres(deep / "data", port=server.port, password=PG_TEST_PASSWORD)
        assert again._ensure_socket_dir() == first  # and by the next owner of the data
        again._closed = True
    finally:
        server.close()
    assert not first.exists()
