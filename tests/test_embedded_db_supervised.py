"""The embedded PostgreSQL server is a supervised resource (issue 9, findings 4 and 6),
driven from outside: a real ``mt5-supervisor run`` subprocess, signals sent straight to its
postmaster as a crash or a hang would, the control channel and the CLI's exit status.

No test here uses ``sim.inject`` or ``actor.restart`` to bring the database back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.db_attack import postmaster, server_setting
from tests.support.e2e import (
    REPO_ROOT,
    TOKEN,
    Rpc,
    RuntimeProcess,
    status_of,
    toml_text,
    wait_all_connected,
)

pytestmark = pytest.mark.realserver


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    with RuntimeProcess(tmp_path_factory.mktemp("embedded-db")).serving() as rt:
        yield rt


@pytest.fixture
def admin(runtime: RuntimeProcess) -> Iterator[Rpc]:
    with Rpc(runtime.ws_url, token=TOKEN) as client:
        wait_all_connected(client)
        yield client


def subscribe(client: Rpc, actors: list[str]) -> str:
    return client.result("events.subscribe", {"actors": actors})["subscription"]


def back_to_connected(client: Rpc, sub: str, actor: str, timeout: float = 30.0) -> list[dict]:
    """Events up to ``actor`` returning to CONNECTED after it left it."""
    left = False

    def until(event: dict) -> bool:
        nonlocal left
        if event["actor"] == actor and event["kind"] == "state_changed":
            left = left or event["from"] == "CONNECTED"
            return left and event["to"] == "CONNECTED"
        return False

    return client.events(sub, until, timeout=timeout)


def test_kill_9_of_the_postmaster_is_restarted_without_operator_action(
        runtime: RuntimeProcess, admin: Rpc) -> None:
    admin.call("questdb", "execute", {"sql": "CREATE TABLE IF NOT EXISTS kept (x int)"})
    admin.call("questdb", "execute", {"sql": "INSERT INTO kept VALUES (7)"})
    sub = subscribe(admin, ["embedded_db", "questdb"])
    old = postmaster(runtime)
    old.send_signal(signal.SIGKILL)
    events = back_to_connected(admin, sub, "embedded_db")
    crash = next(e for e in events if e["actor"] == "embedded_db"
                 and e["kind"] == "state_changed" and e["from"] == "CONNECTED")
    assert crash["to"] == "RECONNECTING" and crash["error"]["code"] == "DB_UNAVAILABLE"
    assert postmaster(runtime).pid != old.pid
    # questdb follows without anyone touching it.
    deadline = time.monotonic() + 20
    while status_of(admin, "questdb")["state"] != "CONNECTED":
        assert time.monotonic() < deadline, admin.result("runtime.status")
        time.sleep(0.1)
    answer = admin.call("questdb", "fetchval", {"sql": "SELECT x FROM kept"})
    assert answer == {**answer, "status": "ok", "data": 7}
    kinds = {e["kind"] for e in events} | {n["params"]["kind"] for n in admin.notifications
                                           if n.get("method") == "events.event"}
    assert not {"escalated"} & kinds or status_of(admin, "embedded_db")["state"] == "CONNECTED"


def test_a_hung_postmaster_is_noticed_and_replaced(
        runtime: RuntimeProcess, admin: Rpc) -> None:
    sub = subscribe(admin, ["embedded_db"])
    hung = postmaster(runtime)
    hung.send_signal(signal.SIGSTOP)
    try:
        events = back_to_connected(admin, sub, "embedded_db")
    finally:
        # It was killed and replaced; should it not have been, let it go on.
        if hung.is_running():
            hung.send_signal(signal.SIGCONT)
    noticed = next(e for e in events if e["kind"] == "state_changed"
                   and e["from"] == "CONNECTED")
    assert noticed["error"]["code"] == "DB_UNAVAILABLE", noticed
    assert postmaster(runtime).pid != hung.pid
    deadline = time.monotonic() + 20
    while status_of(admin, "questdb")["state"] != "CONNECTED":
        assert time.monotonic() < deadline, admin.result("runtime.status")
        time.sleep(0.1)
    assert admin.call("questdb", "fetchval", {"sql": "SELECT 1"})["data"] == 1


def test_inject_db_stop_holds_the_database_down_until_db_start(
        runtime: RuntimeProcess, admin: Rpc) -> None:
    sub = subscribe(admin, ["questdb"])
    admin.result("sim.inject", {"fault": "db_stop", "actor": "questdb"})
    try:
        admin.events(sub, lambda e: e["kind"] == "escalated", timeout=20)
        # Still down: the supervisor does not undo a deliberate stop.
        assert status_of(admin, "embedded_db")["state"] != "CONNECTED"
        assert not [p for p in runtime.postgres_processes() if p.is_running()
                    and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        admin.result("sim.inject", {"fault": "db_start", "actor": "questdb"})
    admin.events(sub, lambda e: e["kind"] == "state_changed" and e["to"] == "CONNECTED",
                 timeout=30)
    assert admin.call("questdb", "fetchval", {"sql": "SELECT 1"})["data"] == 1


def test_kill_9_of_the_runtime_leaks_no_socket_directory_and_keeps_its_secret(
        tmp_path: Path) -> None:
    rt = RuntimeProcess(tmp_path / "work")
    try:
        socket_dirs = set()
        secrets = None
        for _ in range(2):
            rt.start()
            rt.wait_ready()
            server = postmaster(rt)
            socket_dirs.add(server_setting(server, "unix_socket_directories"))
            stored = (rt.state_dir / "db-secrets.json").read_text()
            assert secrets in (None, stored)  # generated once, reused after a crash
            secrets = stored
            rt.signal(signal.SIGKILL)
            rt.wait_exit(10)
        rt.start()
        rt.wait_ready()  # the postmaster left by the killed runtime is dealt with
        socket_dirs.add(server_setting(postmaster(rt), "unix_socket_directories"))
        with Rpc(rt.ws_url, token=TOKEN) as client:
            assert client.call("questdb", "fetchval", {"sql": "SELECT 1"})["data"] == 1
    finally:
        assert rt.close() is not None
    # One socket directory for every start: inside the state directory, nothing in /tmp.
    assert len(socket_dirs) == 1, socket_dirs
    (only,) = socket_dirs
    assert Path(only).resolve().is_relative_to(rt.state_dir.resolve()) or not Path(
        only).exists(), only


@pytest.mark.parametrize("dsn, says", [
    ("mysql://trader:hunter2-secret@127.0.0.1:3306/qdb", "postgresql://"),
    ("postgresql://trader:hunter2-secret@127.0.0.1:99999/qdb", "not a valid DSN"),
    ("postgresql://trader:hunter2-secret@/qdb", "no host"),
])
def test_an_invalid_dsn_is_a_configuration_error_at_start(
        tmp_path: Path, dsn: str, says: str) -> None:
    config = tmp_path / "runtime.toml"
    config.write_text(toml_text({"runtime": {"state_dir": str(tmp_path / "var")},
                                 "control": {"port": 0}, "health": {"port": 0},
                                 "questdb": {"dsn": dsn}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MT5SUP_")}
    result = subprocess.run(
        [sys.executable, "-m", "supervision.shell.cli", "run", "--config", str(config)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    assert result.returncode not in (0, None), output
    assert "questdb.dsn" in output and str(config) in output and says in output, output
    assert "hunter2-secret" not in output
    assert "Traceback" not in output
    # It never ran: no event log was written.
    events = tmp_path / "var" / "events.jsonl"
    assert not events.exists() or not [json.loads(x) for x in events.read_text().splitlines()]


# ---------------------------------------------------------------------------- the secret file
def test_the_secret_file_is_made_private_once_and_refused_when_damaged(tmp_path: Path) -> None:
    from actors.questdb.embedded_db import load_or_create_secrets
    from actors.questdb.pgserver import EmbeddedPostgresError

    path = tmp_path / "db-secrets.json"
    made = load_or_create_secrets(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_secrets(path) == made  # reused, not regenerated
    path.chmod(0o644)
    assert load_or_create_secrets(path) == made
    assert path.stat().st_mode & 0o777 == 0o600  # tightened
    path.write_text('{"mt5sup_runtime": "only-one"}')
    with pytest.raises(EmbeddedPostgresError, match="db-secrets.json") as caught:
        load_or_create_secrets(path)
    assert "only-one" not in str(caught.value)


def test_a_damaged_secret_file_stops_the_start_with_its_name(tmp_path: Path) -> None:
    state_dir = tmp_path / "var"
    state_dir.mkdir()
    (state_dir / "db-secrets.json").write_text("{not json")
    config = tmp_path / "runtime.toml"
    config.write_text(toml_text({"runtime": {"state_dir": str(state_dir)},
                                 "control": {"port": 0}, "health": {"port": 0}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MT5SUP_")}
    result = subprocess.run(
        [sys.executable, "-m", "supervision.shell.cli", "run", "--config", str(config)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "db-secrets.json" in output and "Traceback" not in output, output
    assert (state_dir / "db-secrets.json").read_text() == "{not json"  # left for the operator


async def test_a_cancelled_start_is_not_waited_for_and_is_told_to_give_up() -> None:
    """Shutdown during a database start: the caller returns at once (not after the start's
    30 s), and the start in its thread is told to give up."""
    import threading

    import trio

    from actors.questdb.embedded_db import start_abandonably

    class HangingStart:
        def __init__(self) -> None:
            self.abort: threading.Event | None = None
            self.gave_up = threading.Event()

        def start(self, timeout_s: float, abort: threading.Event | None = None) -> None:
            self.abort = abort
            assert abort is not None
            if abort.wait(timeout_s):
                self.gave_up.set()

    db = HangingStart()
    started = time.monotonic()
    with trio.move_on_after(0.2):
        await start_abandonably(db, 30.0)  # type: ignore[arg-type]
    assert time.monotonic() - started < 2.0
    assert db.abort is not None and db.abort.is_set()
    assert await trio.to_thread.run_sync(db.gave_up.wait, 5.0)
