"""The durable event log (DESIGN.md section 5): seq continuity, fsync policies, reading back,
torn tails, unreadable lines, and a real SIGKILL crash test. Full disks, lost logs and repair:
tests/test_durability.py."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from supervision.eventlog import FSYNC_POLICIES, EventLog, ReadStats, iter_file
from supervision.events import Event

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def ev(seq: int, **data: object) -> Event:
    return Event(seq, T0 + timedelta(seconds=seq), "db", "state_changed", "CONNECTED",
                 "RECONNECTING", 1, 1.0, {"code": "DB_UNAVAILABLE", "message": "x"},
                 dict(data) or None)


def fill(path: Path, n: int, **kwargs: object) -> EventLog:
    log = EventLog(path, fsync="never", **kwargs)
    log.open()
    log.append([ev(i) for i in range(1, n + 1)], 0.0)
    return log


def seqs(events: list[Event]) -> list[int]:
    return [e.seq for e in events]


def test_append_reopen_continues_seq(tmp_path):
    path = tmp_path / "events.jsonl"
    log = fill(path, 3)
    log.append([ev(4)], 1.0)
    log.close()
    with EventLog(path) as again:
        assert again.last_seq == 4
        assert seqs(again.read_since(0)) == [1, 2, 3, 4]
        again.append([ev(5), ev(6)], 2.0)
        with pytest.raises(ValueError, match="seq gap"):
            again.append([ev(8)], 3.0)
        with pytest.raises(ValueError, match="seq gap"):
            again.append([ev(6)], 3.0)  # no duplicates either
        assert again.last_seq == 6
    lines = path.read_bytes().splitlines()
    assert [json.loads(x)["seq"] for x in lines] == [1, 2, 3, 4, 5, 6]
    # The line is the event schema.
    first = json.loads(lines[0])
    assert set(first) >= {"seq", "ts", "actor", "kind", "from", "to", "attempt", "delay_s",
                          "error"}
    assert first["ts"].endswith("Z")
    assert Event.from_json(first) == ev(1)


def test_append_needs_open(tmp_path):
    log = EventLog(tmp_path / "e.jsonl")
    with pytest.raises(RuntimeError):
        log.append([ev(1)], 0.0)


@pytest.mark.parametrize("policy", FSYNC_POLICIES)
def test_fsync_policies_accepted(tmp_path, policy, monkeypatch):
    synced: list[int] = []
    real = os.fsync
    # Only the log file's own fsyncs (its high-water mark is synced once per reservation).
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real(fd)))
    log = EventLog(tmp_path / "e.jsonl", fsync=policy, batch_interval_s=1.0)
    log.open()
    ino = os.stat(tmp_path / "e.jsonl").st_ino
    log.append([ev(1)], 0.0)
    log.append([ev(2)], 0.5)
    log.append([ev(3)], 1.0)
    during = synced.count(ino)
    log.close()
    synced = [i for i in synced if i == ino]
    expected_during = {"always": 3, "batch": 2, "never": 0}[policy]
    assert during == expected_during
    if policy == "batch":
        assert len(synced) == 2  # nothing dirty at close: no extra fsync
    if policy == "never":
        assert synced == []
    with EventLog(tmp_path / "e.jsonl") as again:
        assert again.last_seq == 3


def test_batch_policy_sync_due(tmp_path):
    log = EventLog(tmp_path / "e.jsonl", fsync="batch", batch_interval_s=1.0)
    log.open()
    log.append([ev(1)], 0.0)  # first append syncs
    assert not log.sync_due(0.5)
    log.append([ev(2)], 0.5)  # within the interval: not synced
    assert not log.sync_due(0.9) and log.sync_due(1.5)
    log.sync(1.5)
    assert not log.sync_due(5.0)
    log.close()


@pytest.mark.parametrize("policy", ["sometimes", "", "ALWAYS", None])
def test_fsync_policy_refused(tmp_path, policy):
    with pytest.raises(ValueError, match="fsync"):
        EventLog(tmp_path / "e.jsonl", fsync=policy)


def test_read_since_from_memory_and_from_file(tmp_path, monkeypatch):
    path = tmp_path / "e.jsonl"
    log = fill(path, 20, tail_size=5)
    assert log.tail_covers(15) and log.tail_covers(20) and not log.tail_covers(14)
    import supervision.eventlog as mod

    opened: list[object] = []
    real_iter = mod.iter_file
    monkeypatch.setattr(mod, "iter_file",
                        lambda p, *rest: (opened.append(p), real_iter(p, *rest))[1])
    assert seqs(log.read_since(17)) == [18, 19, 20]
    assert seqs(log.read_since(15, limit=2)) == [16, 17]
    assert opened == []  # served from memory
    assert seqs(log.read_since(3, limit=4)) == [4, 5, 6, 7]
    assert seqs(log.read_since(0)) == list(range(1, 21))
    assert len(opened) == 2  # served from the file
    assert log.read_since(20) == []
    log.close()
    # After a reopen the tail is rebuilt from the end of the file.
    with EventLog(path, tail_size=5) as again:
        assert seqs(again.read_tail(0)) == [16, 17, 18, 19, 20]
        assert seqs(again.read_since(10, limit=3)) == [11, 12, 13]


def test_torn_last_line_is_cut_on_open(tmp_path):
    path = tmp_path / "e.jsonl"
    fill(path, 5).close()
    whole = path.read_bytes()
    line6 = (ev(6, blob="y" * 500).to_line() + "\n").encode()
    for cut in (1, 17, len(line6) // 2, len(line6) - 1):  # every kind of prefix
        path.write_bytes(whole + line6[:cut])
        with EventLog(path) as log:
            assert log.last_seq == 5
            assert log.truncated_bytes == cut
            log.append([ev(6)], 0.0)
        assert [e.seq for e in iter_file(path)] == [1, 2, 3, 4, 5, 6]
        assert path.read_bytes().endswith(b"\n")
        path.write_bytes(whole)
        # Rewinding the file by hand is a truncation its high-water mark would report
        # (tests/test_durability.py); this test is about torn lines only.
        path.with_name(path.name + ".hwm").unlink()


def test_torn_batch_keeps_its_complete_lines(tmp_path):
    path = tmp_path / "e.jsonl"
    fill(path, 2).close()
    batch = "".join(ev(i).to_line() + "\n" for i in (3, 4, 5)).encode()
    cut = batch.index(b'{"seq":5') + 9  # events 3 and 4 complete, 5 torn
    with open(path, "ab") as f:
        f.write(batch[:cut])
    with EventLog(path) as log:
        assert log.last_seq == 4
        log.append([ev(5)], 0.0)


def test_zero_filled_tail_is_cut(tmp_path):
    path = tmp_path / "e.jsonl"
    fill(path, 3).close()
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)
    with EventLog(path) as log:
        assert log.last_seq == 3 and log.truncated_bytes == 4096


def test_whole_file_one_torn_line(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_bytes(ev(1).to_line().encode()[:30])
    with EventLog(path) as log:
        assert log.last_seq == 0
        log.append([ev(1)], 0.0)
    assert [e.seq for e in iter_file(path)] == [1]


def test_garbage_in_the_middle_is_skipped_and_counted(tmp_path):
    path = tmp_path / "e.jsonl"
    fill(path, 3).close()
    lines = path.read_bytes().splitlines(keepends=True)
    # Not JSON, JSON but not an event, an event out of seq order: all skipped, all counted.
    path.write_bytes(lines[0] + b"not json at all\n" + lines[1] + b'{"hello": 1}\n'
                     + b"[1, 2]\n" + lines[2] + lines[0])
    with EventLog(path) as log:
        assert log.last_seq == 3
        assert log.bad_lines == 4
        assert log.condition().status == "warn"
        assert "4 unreadable line(s)" in log.condition().output
        log.append([ev(4)], 0.0)
    stats = ReadStats()
    assert seqs(list(iter_file(path, stats))) == [1, 2, 3, 4]
    assert stats.bad_lines == 4


def test_garbage_beyond_the_tail_window_does_not_break_reading(tmp_path):
    path = tmp_path / "e.jsonl"
    fill(path, 30).close()
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:5]) + b"\x00\xffgarbage\n" + b"".join(lines[5:]))
    with EventLog(path, tail_size=5) as log:
        assert log.last_seq == 30 and log.bad_lines == 0  # not seen yet: outside the window
        assert seqs(log.read_since(0)) == list(range(1, 31))
        assert log.bad_lines == 1  # a full read counts it
        assert log.condition().status == "warn"


def test_only_garbage_at_the_end_finds_the_last_event_further_back(tmp_path):
    path = tmp_path / "e.jsonl"
    fill(path, 4).close()
    with open(path, "ab") as f:
        f.write(b"garbage\n" * 6)
    with EventLog(path, tail_size=3) as log:
        assert log.last_seq == 4
        log.append([ev(5)], 0.0)


def test_seq_jump_up_is_kept(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_bytes("".join(ev(i).to_line() + "\n" for i in (1, 2, 4)).encode())
    with EventLog(path) as log:
        assert log.last_seq == 4 and log.bad_lines == 0
        assert seqs(log.read_since(0)) == [1, 2, 4]


# ------------------------------------------------------------------------------ the crash
CHILD = textwrap.dedent("""
    import sys
    from datetime import UTC, datetime
    from supervision.eventlog import EventLog
    from supervision.events import Event

    log = EventLog(sys.argv[1], fsync="never", tail_size=4)
    log.open()
    blob = "x" * int(sys.argv[2])
    ts = datetime.now(UTC)
    seq = log.last_seq
    print(seq, flush=True)
    while True:
        batch = []
        for _ in range(int(sys.argv[3])):
            seq += 1
            batch.append(Event(seq, ts, "crash", "state_changed", "A", "B",
                               data={"blob": blob}))
        log.append(batch, 0.0)
""")


def check_log(path: Path, start: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """Every complete line (from byte ``start[0]``, where seq ``start[1]`` ended) parses and
    seq runs on without a gap. Returns (offset after the last complete line, its seq)."""
    offset, n = start
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    for line in complete.splitlines():
        event = Event.from_json(json.loads(line))
        n += 1
        assert event.seq == n
    return offset + len(complete), n


ROUNDS = 8


def test_sigkill_mid_append_loses_nothing_complete(tmp_path):
    """A writer killed with SIGKILL at random moments: the log reopens with every complete
    event, seq 1..N without a gap, and appending continues at N+1. Large events make a kill
    inside write() (a torn line) possible; the deterministic variants above force one."""
    path = tmp_path / "events.jsonl"
    rng = random.Random()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    verified = (0, 0)
    torn = 0
    for _round in range(ROUNDS):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(32 * 1024), "8"],
            stdout=subprocess.PIPE, env=env)
        try:
            started_at = int(child.stdout.readline())  # the child has reopened the log
            assert started_at == verified[1]  # ...and continues after our own event
            time.sleep(rng.uniform(0.01, 0.1))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        raw_tail_torn = not path.read_bytes()[-1:] == b"\n"
        torn += raw_tail_torn
        offset, n = check_log(path, verified)
        assert n > verified[1]  # it did write
        with EventLog(path, fsync="never", tail_size=8) as log:
            assert log.last_seq == n
            assert (log.truncated_bytes > 0) == raw_tail_torn
            assert path.stat().st_size == offset  # only the torn tail was cut
            log.append([ev(n + 1)], 0.0)  # appending continues at N+1
        verified = check_log(path, (offset, n))
        assert verified[1] == n + 1
        assert path.stat().st_size == verified[0]
    assert check_log(path) == verified  # the whole file, once more from the start
    print(f"{torn} of {ROUNDS} kills left a torn line")


def test_an_event_with_text_that_is_not_utf8_is_logged_escaped(tmp_path: Path) -> None:
    # An OSError about a file whose name is not UTF-8 carries a lone surrogate
    # (surrogateescape); such a message must not stop the log (UnicodeEncodeError).
    path = tmp_path / "events.jsonl"
    log = fill(path, 1)
    message = "open failed: " + os.fsdecode(b"bad-\xff-name")
    event = Event(2, T0, "bot", "probe_failed", error={"code": "INTERNAL", "message": message})
    assert seqs(log.append([event], 1.0)) == [2]
    log.close()
    line = path.read_bytes().splitlines()[-1]
    assert b"\\udcff" in line
    assert json.loads(line)["error"]["message"] == message
