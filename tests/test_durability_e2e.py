"""Durability of the event log driven from outside (issue 9, findings 2 and 3): a real
`mt5-supervisor run` whose state directory fills up, whose log is deleted while it runs, and
whose log holds garbage lines; observed only through the control channel, HTTP /health, the
CLI and the files, and read back from the database."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.e2e import (
    REPO_ROOT,
    TOKEN,
    Rpc,
    RuntimeProcess,
    contiguous,
    http_get,
    scratch_state_dir,
    wait_all_connected,
)
from tests.support.small_disk import bind_mount, mount_small_disk, unmount

pytestmark = [pytest.mark.realserver, pytest.mark.slow]

STOP_S = 60.0
# These tests are about the event log, not the terminal's worker: the simulator runs inline,
# so the terminal crashes that make events do not depend on the worker process.
SECTIONS = {"mt5": {"worker": "inline"}}


def health(rt: RuntimeProcess) -> tuple[int, dict[str, Any]]:
    status, _, body = http_get(rt.http_base + "/health", timeout=5.0)
    return status, json.loads(body)


def eventlog_check(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["checks"]["eventlog:writable"][0]


def wait_for(what: str, condition: Callable[[], Any], timeout: float = 30.0,
             between: Callable[[], None] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        if between is not None:
            between()
        time.sleep(0.2)


def wait_up(rt: RuntimeProcess, timeout: float = 60.0) -> None:
    """The control and health ports answer (whatever the health status)."""
    def up() -> bool:
        assert rt.running(), rt.output()
        try:
            health(rt)
        except OSError:
            return False
        return True
    wait_for("the runtime's ports", up, timeout)


def table(admin: Rpc) -> dict[str, Any]:
    rows = admin.call("questdb", "fetch", {"sql": (
        "SELECT count(*) AS n, count(DISTINCT seq) AS d, min(seq) AS lo, max(seq) AS hi "
        "FROM supervision_events")})["data"]
    return rows[0]


def assert_every_logged_event_persisted_once(rt: RuntimeProcess, admin: Rpc) -> None:
    """The table holds seq 1..hi, each once, and hi reaches the log's last event (events
    keep coming meanwhile: the table may be ahead of what was read from the log)."""
    last = rt.log_events()[-1]["seq"]
    row = wait_for("every logged event in the table",
                   lambda: (lambda r: r if r["hi"] is not None and r["hi"] >= last else None)(
                       table(admin)))
    assert row["n"] == row["d"], f"a seq is doubled in the table: {row}"
    assert row["lo"] == 1 and row["n"] == row["hi"], f"a seq is missing in the table: {row}"


def crash_terminal(admin: Rpc) -> None:
    """Some events: the simulated terminal crashes and comes back."""
    admin.result("sim.inject", {"fault": "terminal_crash", "duration_s": 0.3})


# ------------------------------------------------------------------------------ full disk
def test_full_state_dir_degrades_and_recovers_gap_free(tmp_path: Path) -> None:
    scratch = scratch_state_dir()
    state_dir = scratch / "var"
    disk = mount_small_disk(state_dir, "4m")
    # The embedded database lives on another filesystem (as it would on its own volume):
    # only the event log's disk fills up.
    (scratch / "pgdata").mkdir(mode=0o755)
    bind_mount(scratch / "pgdata", state_dir / "postgres")
    rt = RuntimeProcess(tmp_path / "run1", state_dir=state_dir, sections=SECTIONS)
    second: RuntimeProcess | None = None
    try:
        rt.start()
        rt.wait_ready()
        with Rpc(rt.ws_url, token=TOKEN) as admin:
            wait_all_connected(admin)
            before = rt.log_events()[-1]["seq"]
            disk.fill()
            # Small events may still fit in the log's last page: make events until one
            # does not. Throughout, both ports answer.
            status, doc = wait_for(
                "health failing on the full disk",
                lambda: (lambda s, d: (s, d) if s == 503 else None)(*health(rt)),
                between=lambda: crash_terminal(admin))
            check = eventlog_check(doc)
            assert check["status"] == "fail"
            assert "ENOSPC" in check["output"] and "not yet published" in check["output"]
            assert "event log not writable" in doc["output"]
            for _ in range(5):  # ports up throughout: health, status, calls
                crash_terminal(admin)
                assert health(rt)[0] == 503
                assert {a["name"] for a in admin.result("runtime.status")["actors"]} >= {
                    "mt5", "questdb", "cache"}
                time.sleep(0.2)
            waiting = eventlog_check(health(rt)[1])["observedValue"]
            assert waiting > 0

            disk.free()
            wait_for("the log writable again",
                     lambda: eventlog_check(health(rt)[1])["status"] == "pass", 30)
            events = rt.log_events()
            seqs = [e["seq"] for e in events]
            assert seqs == list(range(1, seqs[-1] + 1)), "the log has a hole or a repeat"
            kinds = [e["kind"] for e in events if e["seq"] > before]
            assert kinds.count("eventlog_write_failed") == 1
            assert kinds.count("eventlog_write_resumed") == 1
            assert seqs[-1] - before >= waiting
            wait_all_connected(admin)
            assert_every_logged_event_persisted_once(rt, admin)
            last_good = seqs[-1]

            # Full again, then a restart on the still-full disk: it comes up, degraded.
            disk.fill()
            wait_for("health failing again", lambda: health(rt)[0] == 503,
                     between=lambda: crash_terminal(admin))
        assert rt.stop(STOP_S) == 0, rt.output()
        second = RuntimeProcess(tmp_path / "run2", state_dir=state_dir, sections=SECTIONS)
        second.start()
        wait_up(second)
        with Rpc(second.ws_url, token=TOKEN) as admin:
            wait_for("health failing on the restart", lambda: health(second)[0] == 503,
                     between=lambda: crash_terminal(admin))
            assert "ENOSPC" in eventlog_check(health(second)[1])["output"]
            disk.free()
            wait_for("the log writable after the restart",
                     lambda: eventlog_check(health(second)[1])["status"] == "pass", 30)
            seqs = [e["seq"] for e in second.log_events()]
            # Events that never reached the disk before the stop were never published or
            # persisted: the new run numbers on from the last written one, without a hole.
            assert seqs == list(range(1, seqs[-1] + 1))
            assert seqs[-1] > last_good
            wait_all_connected(admin)
            assert_every_logged_event_persisted_once(second, admin)
    finally:
        for proc in (second, rt):
            if proc is not None:
                proc.stop(STOP_S)
        unmount(state_dir / "postgres")
        unmount(state_dir)
        shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------------------ lost log
def test_a_log_deleted_while_running_is_detected_and_seq_continues(tmp_path: Path) -> None:
    rt = RuntimeProcess(tmp_path / "run1", sections=SECTIONS)
    second: RuntimeProcess | None = None
    try:
        rt.start()
        rt.wait_ready()
        with Rpc(rt.ws_url, token=TOKEN) as admin:
            wait_all_connected(admin)
            last = rt.log_events()[-1]["seq"]
            assert_every_logged_event_persisted_once(rt, admin)
            rt.log_path.unlink()
            crash_terminal(admin)
            check = wait_for("the deletion reported by health",
                             lambda: (lambda c: c if c["status"] == "warn" else None)(
                                 eventlog_check(health(rt)[1])))
            assert "deleted" in check["output"]
            new = wait_for("events in the new log", lambda: rt.log_path.exists()
                           and rt.log_events())
            assert new[0]["seq"] == last + 1, "seq must continue, never restart at 1"
            assert contiguous(e["seq"] for e in new)
            assert any(e["kind"] == "eventlog_replaced" for e in new)
            wait_all_connected(admin)
            # Every event of the run reached the table once: the new ones were not dropped
            # as duplicates of old rows.
            assert_every_logged_event_persisted_once(rt, admin)
        assert rt.stop(STOP_S) == 0, rt.output()
        second = RuntimeProcess(tmp_path / "run2", state_dir=rt.state_dir, sections=SECTIONS)
        second.start()
        second.wait_ready()  # a clean stop on the new log: an intact start, status pass
        events = second.log_events()
        assert events[0]["seq"] == last + 1
        assert contiguous(e["seq"] for e in events)
    finally:
        if second is not None:
            second.stop(STOP_S)
        rt.close()


# ------------------------------------------------------------------------------ garbage
def synthetic_log(path: Path, count: int, garbage_at: dict[int, bytes]) -> None:
    """``count`` valid events, with garbage lines inserted before the given line numbers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for seq in range(1, count + 1):
            if seq in garbage_at:
                f.write(garbage_at[seq])
            f.write(json.dumps({
                "seq": seq, "ts": "2026-11-22T10:00:00.000000Z", "actor": "bot",
                "kind": "probe_failed", "from": None, "to": None, "attempt": None,
                "delay_s": None, "error": None}, separators=(",", ":")).encode() + b"\n")


def cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervision.shell.cli", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_garbage_lines_start_read_check_and_repair(tmp_path: Path) -> None:
    # Garbage far back (outside the runtime's 10k-event memory tail: `events --since 0`
    # reads it from the file) and near the end (seen at start-up).
    count = 10_200
    scratch = scratch_state_dir()
    state_dir = scratch / "var"
    synthetic_log(state_dir / "events.jsonl", count,
                  {5: b"this is not an event\n", count - 3: b'{"seq": "torn\n'})
    rt = RuntimeProcess(tmp_path / "run1", state_dir=state_dir, sections=SECTIONS)
    second: RuntimeProcess | None = None
    try:
        rt.start()
        wait_up(rt)
        with Rpc(rt.ws_url, token=TOKEN) as admin:
            wait_all_connected(admin)
        check = eventlog_check(health(rt)[1])
        assert check["status"] == "warn" and "unreadable line" in check["output"]
        assert "event log WARN" in rt.stdout()
        out = cli("events", "--since", "0", "--json", "--url", rt.ws_url)
        assert out.returncode == 0, out.stderr
        seqs = [json.loads(line)["seq"] for line in out.stdout.splitlines()]
        assert seqs[:count] == list(range(1, count + 1))
        assert contiguous(seqs)
        assert rt.stop(STOP_S) == 0, rt.output()

        checked = cli("log", "check", "--config", str(rt.config_path))
        assert checked.returncode == 3, checked.stdout + checked.stderr
        assert "line 5 " in checked.stdout and "log repair" in checked.stdout
        repaired = cli("log", "repair", "--config", str(rt.config_path))
        assert repaired.returncode == 0, repaired.stderr
        assert "moved 2 unreadable line(s)" in repaired.stdout
        corrupt = (state_dir / "events.jsonl.corrupt").read_bytes()
        assert b"this is not an event\n" in corrupt and b'{"seq": "torn\n' in corrupt
        assert cli("log", "check", "--config", str(rt.config_path)).returncode == 0
        logged = rt.log_events()  # every line parses now
        assert contiguous(e["seq"] for e in logged)

        second = RuntimeProcess(tmp_path / "run2", state_dir=state_dir, sections=SECTIONS)
        second.start()
        second.wait_ready()  # no warning left: status pass
        events = second.log_events()
        assert events[-1]["seq"] > logged[-1]["seq"]
        assert contiguous(e["seq"] for e in events)
    finally:
        if second is not None:
            second.stop(STOP_S)
        rt.stop(STOP_S)
        shutil.rmtree(scratch, ignore_errors=True)
