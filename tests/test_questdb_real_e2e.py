"""``mt5-supervisor run`` against a real QuestDB, driven only from outside.

The runtime is a real subprocess configured with ``[questdb] dsn =
"postgresql://admin:quest@127.0.0.1:PORT/qdb"``; it is driven through the control channel
(WebSocket JSON-RPC) and HTTP ``/health`` and ``/metrics``; what landed in
``supervision_events`` is read through QuestDB's HTTP ``/exec``. Along the way: status, a
terminal crash and its recovery (``sim.inject``), a QuestDB SIGKILL and restart, a runtime
SIGKILL and restart; at the end every logged ``seq`` is in the table exactly once.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.e2e import (
    TOKEN,
    Rpc,
    RuntimeProcess,
    http_get,
    metric_samples,
    status_of,
    wait_all_connected,
)
from tests.support.questdb_server import QuestdbServer

pytestmark = [pytest.mark.realserver, pytest.mark.slow]

TABLE = "supervision_events"


def questdb_sections(server: QuestdbServer) -> dict[str, dict[str, object]]:
    return {"questdb": {"dsn": server.dsn, "breaker_open_s": 2.0}}


def wait_until(what: str, done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def health_check(runtime: RuntimeProcess, key: str) -> dict[str, object]:
    doc = json.loads(http_get(runtime.http_base + "/health")[2])
    entries = doc["checks"].get(key) or [{"status": None}]
    return entries[0]


def persisted_everything(runtime: RuntimeProcess, server: QuestdbServer) -> bool:
    """The table (WAL applied, read over HTTP) holds every seq the log holds."""
    last = max(e["seq"] for e in runtime.log_events())
    seqs = server.seqs(TABLE)
    return bool(seqs) and max(seqs) >= last


def test_run_against_questdb_crash_kill_and_restart_persist_every_seq_exactly_once(
        tmp_path: Path, questdb_factory: Callable[..., QuestdbServer]) -> None:
    server = questdb_factory(env={"QDB_DEV_MODE_ENABLED": "true"})  # allows SUSPEND WAL
    runtime = RuntimeProcess(tmp_path / "rt", sections=questdb_sections(server))
    try:
        runtime.start()
        doc = runtime.wait_ready()
        assert doc["checks"]["questdb:connection"][0]["status"] == "pass"
        with Rpc(runtime.ws_url) as rpc, Rpc(runtime.ws_url, token=TOKEN) as admin:
            wait_all_connected(rpc)
            # Status: the questdb actor speaks QuestDB's dialect; persistence is healthy.
            row = status_of(rpc, "questdb")
            assert row["state"] == "CONNECTED" and row["extra"]["dialect"] == "questdb"
            store = status_of(rpc, "events_store")
            assert store["state"] == "CONNECTED" and store["extra"]["last_error"] is None
            answer = admin.call("questdb", "fetchval", {"sql": "SELECT 40 + 2"})
            assert answer["status"] == "ok" and answer["data"] == 42

            # A terminal crash and its recovery.
            assert admin.result("sim.inject", {"fault": "terminal_crash",
                                               "duration_s": 2.0}) == {"ok": True}
            runtime.wait_log(lambda evs: any(
                e["actor"] == "mt5" and e["kind"] == "state_changed" and e["to"] == "CONNECTED"
                and e["from"] in ("RECONNECTING", "ERROR") for e in evs), timeout=20)

            # QuestDB SIGKILL: the runtime notices, events wait in the log.
            server.kill()
            runtime.wait_log(lambda evs: any(
                e["actor"] == "questdb" and e["kind"] == "state_changed"
                and e["from"] == "CONNECTED" for e in evs), timeout=10)
            assert admin.result("sim.inject", {"fault": "terminal_crash",
                                               "duration_s": 0.5}) == {"ok": True}
            wait_until("persistence reports the outage", lambda: status_of(
                rpc, "events_store")["extra"]["lag"] > 0, timeout=10)
            samples = metric_samples(http_get(runtime.http_base + "/metrics")[2].decode())
            assert samples['mt5sup_actor_figure{actor="events_store",figure="lag"}'] > 0
            # Never silently: the failure is in status and health, with what failed.
            wait_until("persistence reported failing", lambda: health_check(
                runtime, "events_store:persistence")["status"] == "warn", timeout=20)
            last_error = status_of(rpc, "events_store")["extra"]["last_error"]
            assert last_error["code"] in ("DB_UNAVAILABLE", "CIRCUIT_OPEN",
                                          "ACTOR_UNAVAILABLE", "TIMEOUT"), last_error
            assert last_error["operation"] and last_error["message"]
            assert "events not persisted yet" in str(health_check(
                runtime, "events_store:persistence")["output"])
            server.restart()
            wait_until("questdb back", lambda: status_of(rpc, "questdb")["state"]
                       == "CONNECTED", timeout=30)
            wait_until("the backlog replayed", lambda: persisted_everything(runtime, server),
                       timeout=30)
            assert status_of(rpc, "events_store")["extra"]["skipped"] == 0
            wait_until("persistence healthy again", lambda: health_check(
                runtime, "events_store:persistence")["status"] == "pass", timeout=20)

            # A suspended WAL table: /health says so, with the remedy, and status shows it.
            server.exec(f"ALTER TABLE {TABLE} SUSPEND WAL")
            wait_until("health reports the suspended table", lambda: health_check(
                runtime, "events_store:table")["status"] == "fail", timeout=15)
            check = health_check(runtime, "events_store:table")
            assert f"ALTER TABLE {TABLE} RESUME WAL" in check["output"], check
            assert status_of(rpc, "events_store")["checks"]["table"]["status"] == "fail"
            status, _, body = http_get(runtime.http_base + "/health")
            assert status == 200 and json.loads(body)["status"] == "warn"
            server.exec(f"ALTER TABLE {TABLE} RESUME WAL")
            wait_until("health back to pass", lambda: health_check(
                runtime, "events_store:table")["status"] == "pass", timeout=15)

        # A runtime SIGKILL mid-stream, then a restart on the same state directory.
        runtime.signal(signal.SIGKILL)
        runtime.wait_exit(timeout=10)
        runtime.start()
        runtime.wait_ready()
        with Rpc(runtime.ws_url) as rpc:
            wait_all_connected(rpc)
            wait_until("caught up after the restart",
                       lambda: persisted_everything(runtime, server), timeout=30)
            wait_until("lag back to 0", lambda: status_of(
                rpc, "events_store")["extra"]["lag"] == 0, timeout=15)
            status, _, body = http_get(runtime.http_base + "/health")
            doc = json.loads(body)
            assert doc["checks"]["events_store:table"][0]["status"] == "pass", doc
            # Every logged seq, exactly once (read while the runtime runs and is quiet).
            logged = sorted(e["seq"] for e in runtime.log_events())
            seqs = server.seqs(TABLE)
        assert logged == list(range(1, len(logged) + 1))
        assert len(seqs) == len(set(seqs)), "a seq is doubled"
        assert seqs[:len(logged)] == logged, "a seq is missing"
        kinds = {e["kind"] for e in runtime.log_events()}
        assert {"state_changed", "check_changed"} <= kinds
        assert runtime.stop() == 0, runtime.output()
    finally:
        runtime.close()
