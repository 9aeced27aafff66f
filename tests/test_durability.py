"""Durability of the event log (DESIGN.md section 5, issue 9 findings 2 and 3), in process:
a real full or read-only disk (a small tmpfs), a failing fsync, a log deleted, replaced or
truncated under the writer, restarts after that, unreadable lines, `log check`/`log repair`.
End-to-end versions through a real `mt5-supervisor run`: tests/test_durability_e2e.py."""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from supervision.bus import Missed
from supervision.eventlog import (
    KIND_REPLACED,
    KIND_WRITE_FAILED,
    KIND_WRITE_RESUMED,
    WRITE_RETRY,
    EventLog,
    ReadStats,
    iter_file,
)
from supervision.events import Event
from supervision.logcheck import LogInUse, check_log, repair_log
from supervision.loghwm import read_mark
from supervision.messages import Notice
from supervision.shell import cli
from tests.support.actors import running_supervisor
from tests.support.small_disk import SmallDisk, mount_small_disk, unmount

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
BIG = "x" * 6000  # larger than a page: cannot slip into the last page's slack


def ev(seq: int, blob: str = "") -> Event:
    return Event(seq, T0 + timedelta(seconds=seq), "db", "state_changed", "CONNECTED",
                 "RECONNECTING", data={"blob": blob} if blob else None)


def seqs(events: list[Event]) -> list[int]:
    return [e.seq for e in events]


def file_seqs(path: Path) -> list[int]:
    stats = ReadStats()
    out = [e.seq for e in iter_file(path, stats)]
    assert stats.bad_lines == 0 and not stats.torn_tail
    return out


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    small = mount_small_disk(tmp_path / "disk", "512k")
    try:
        yield small
    finally:
        unmount(small.path)


# ------------------------------------------------------------------------------ full disk
def test_full_disk_buffers_in_order_and_resumes_gap_free(disk: SmallDisk) -> None:
    path = disk.path / "events.jsonl"
    log = EventLog(path, fsync="always")
    log.open()
    assert seqs(log.append([ev(1), ev(2)], 0.0)) == [1, 2]
    disk.fill()
    size_before = path.stat().st_size

    assert log.append([ev(3, BIG)], 1.0) == []  # not durable: must not be published
    cond = log.condition()
    assert cond.status == "fail" and cond.pending == 1
    assert "ENOSPC" in cond.output and "not yet published" in cond.output
    assert [k for k, _ in log.take_notices()] == [KIND_WRITE_FAILED]
    assert path.stat().st_size == size_before  # nothing half-written is left behind
    assert log.last_seq == 2

    first_retry = log.wake_at
    assert first_retry == pytest.approx(1.0 + WRITE_RETRY.delay(1))
    assert log.append([ev(4)], 1.01) == []  # before the retry time: only buffered
    assert log.append([], first_retry) == []  # retried, still full: backs off further
    assert log.wake_at == pytest.approx(first_retry + WRITE_RETRY.delay(2))
    assert log.condition().pending == 2

    disk.free()
    written = log.append([ev(5)], log.wake_at)
    assert seqs(written) == [3, 4, 5]  # in order, all at once, nothing lost
    assert log.condition().status == "pass" and log.wake_at > log.last_seq * 0  # idle check
    notices = log.take_notices()
    assert [k for k, _ in notices] == [KIND_WRITE_RESUMED]
    assert notices[0][1]["failures"] == 2
    log.close()
    assert file_seqs(path) == [1, 2, 3, 4, 5]


def test_a_write_cut_short_by_a_full_disk_is_taken_back(disk: SmallDisk) -> None:
    path = disk.path / "events.jsonl"
    log = EventLog(path, fsync="never")
    log.open()
    log.append([ev(1)], 0.0)
    disk.fill()
    disk.free(keep_full_but=8192)  # room for part of the next batch only
    size_before = path.stat().st_size
    assert log.append([ev(n, BIG) for n in range(2, 6)], 1.0) == []
    assert path.stat().st_size == size_before  # the partial write was cut back
    disk.free()
    assert seqs(log.append([], log.wake_at)) == [2, 3, 4, 5]
    log.close()
    assert file_seqs(path) == [1, 2, 3, 4, 5]


def test_a_restart_on_a_full_disk_comes_up_degraded(disk: SmallDisk) -> None:
    path = disk.path / "events.jsonl"
    with EventLog(path) as log:
        log.append([ev(n) for n in range(1, 4)], 0.0)
    disk.fill()
    log = EventLog(path)
    log.open()  # does not raise
    assert log.last_seq == 3
    assert seqs(log.append([ev(4, BIG)], 0.0)) == []
    assert log.condition().status == "fail"
    disk.free()
    assert seqs(log.append([], log.wake_at)) == [4]
    log.close()
    assert file_seqs(path) == [1, 2, 3, 4]


def test_a_read_only_disk_at_start_comes_up_degraded_and_recovers(disk: SmallDisk) -> None:
    path = disk.path / "events.jsonl"
    with EventLog(path) as log:
        log.append([ev(1), ev(2)], 0.0)
    disk.remount("ro")
    log = EventLog(path)
    log.open()
    assert log.last_seq == 2  # the floor is read from the read-only log
    assert log.append([ev(3)], 0.0) == []
    cond = log.condition()
    assert cond.status == "fail" and "EROFS" in cond.output
    disk.remount("rw")
    assert seqs(log.append([], log.wake_at)) == [3]
    log.close()
    assert file_seqs(path) == [1, 2, 3]


def test_a_failing_fsync_keeps_the_batch_unpublished(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, fsync="always")
    log.open()
    log.append([ev(1)], 0.0)
    real = os.fsync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    size = path.stat().st_size
    assert log.append([ev(2)], 1.0) == []  # written but not durable: not published
    assert path.stat().st_size == size  # taken back, so the retry writes it once
    assert "EIO" in log.condition().output
    monkeypatch.setattr(os, "fsync", real)
    assert seqs(log.append([], log.wake_at)) == [2]
    log.close()
    assert file_seqs(path) == [1, 2]


def test_append_beyond_room_is_refused(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "e.jsonl", buffer=2)
    log.open()
    from supervision.eventlog import BufferFull

    with pytest.raises(BufferFull):
        log.append([ev(1), ev(2), ev(3)], 0.0)
    log.close()


async def test_supervisor_publishes_only_durable_events_and_drops_past_the_bound(
        disk: SmallDisk, autojump_clock) -> None:
    """Full disk under a running supervisor: the status view keeps going, subscribers get
    nothing undurable; past the bound messages are not numbered; when space returns every
    buffered event is published in order, followed by eventlog_write_resumed (with the drop
    count), and seq has no hole and no reuse."""
    path = disk.path / "events.jsonl"
    bound = 5
    async with running_supervisor(disk.path, log_path=path,
                                  log_kwargs={"buffer": bound}) as sup:
        sub = sup.bus.open_subscription(since_seq=0, buffer=1000)
        await trio.sleep(1)
        before = sup.log.last_seq
        assert before >= 1  # runtime_started
        while sub.get_nowait() is not None:
            pass
        disk.fill()
        for n in range(3 + bound):
            await sup.emit(Notice("bot", "probe_failed", trio.current_time(),
                                  data={"n": n, "blob": BIG}))
            await trio.sleep(0.01)
        await trio.sleep(2)
        assert sub.get_nowait() is None  # nothing published while nothing is durable
        cond = sup.log.condition()
        assert cond.status == "fail" and cond.pending == bound and cond.dropped >= 3
        disk.free()
        await trio.sleep(WRITE_RETRY.cap_s + 1)
        items = []
        while (item := sub.get_nowait()) is not None:
            items.append(item)
        assert not any(isinstance(i, Missed) for i in items)
        got = [i.seq for i in items]
        assert got == list(range(before + 1, before + 1 + len(got)))  # no hole
        # The first event failed and the log reported it (numbered right behind it); the
        # buffer then held `bound` events; the rest were dropped, never numbered.
        kinds = [i.kind for i in items]
        assert kinds == ["probe_failed", KIND_WRITE_FAILED] + ["probe_failed"] * (bound - 2) \
            + [KIND_WRITE_RESUMED]
        assert [i.data["n"] for i in items if i.kind == "probe_failed"] == list(range(bound - 1))
        assert cond.dropped == 3 + bound - (bound - 1)
        resumed = [i for i in items if i.kind == KIND_WRITE_RESUMED]
        assert len(resumed) == 1 and resumed[0].data["dropped"] == cond.dropped
        assert sup.log.condition().status == "warn"  # the drop stays visible
        assert "dropped" in sup.log.condition().output
    assert file_seqs(path) == list(range(1, file_seqs(path)[-1] + 1))


# ------------------------------------------------------------------------------ lost logs
def test_a_log_deleted_while_running_is_detected_and_seq_continues(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, fsync="never")
    log.open()
    log.append([ev(1), ev(2), ev(3)], 0.0)
    path.unlink()
    assert seqs(log.append([ev(4)], 1.0)) == [4]
    cond = log.condition()
    assert cond.status == "warn" and "deleted" in cond.output
    [(kind, data)] = log.take_notices()
    assert kind == KIND_REPLACED and data == {"what": "deleted", "continues_at": 4}
    assert file_seqs(path) == [4]
    mark = read_mark(log.mark_path)
    assert mark is not None and mark.describes(path.stat())  # the mark follows the new file
    log.close()
    with EventLog(path) as again:  # a clean restart on the new file: intact, no warning
        assert again.last_seq == 4 and again.condition().status == "pass"


def test_an_idle_log_is_checked_too(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, fsync="never", check_interval_s=5.0)
    log.open()
    log.append([ev(1)], 0.0)
    path.unlink()
    assert log.wake_at == pytest.approx(5.0)
    assert log.append([], 5.0) == []
    assert "deleted" in log.condition().output
    assert path.exists()  # a fresh file is ready for the next event
    log.close()


@pytest.mark.parametrize("how", ["replaced", "truncated", "appended to by another writer"])
def test_a_log_changed_behind_the_writer_is_detected(tmp_path: Path, how: str) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, fsync="never")
    log.open()
    log.append([ev(1), ev(2), ev(3)], 0.0)
    if how == "replaced":
        other = tmp_path / "backup.jsonl"
        other.write_text(ev(1).to_line() + "\n")
        os.replace(other, path)
    elif how == "truncated":
        os.truncate(path, 10)  # mid-line: the torn piece is cut before writing
    else:
        with open(path, "ab") as f:
            f.write(b"someone else's line\n")
    assert seqs(log.append([ev(4)], 1.0)) == [4]
    assert how in log.condition().output
    log.close()
    stats = ReadStats()
    assert [e.seq for e in iter_file(path, stats)][-1] == 4
    assert not stats.torn_tail


def test_a_restart_after_the_log_was_deleted_continues_above_it(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        log.append([ev(n) for n in range(1, 6)], 0.0)
    path.unlink()
    with EventLog(path) as log:
        assert log.last_seq == 5  # clean close: the mark holds the exact last seq
        assert "missing" in log.condition().output
        assert log.take_notices() == [
            (KIND_REPLACED, {"what": "missing", "continues_at": 6, "at_start": True})]
        log.append([ev(6)], 0.0)
    assert file_seqs(path) == [6]


def test_after_a_crash_a_lost_log_continues_above_the_reservation(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, reserve=100)
    log.open()
    log.append([ev(n) for n in range(1, 8)], 0.0)
    os.close(log._fd)  # a crash: no clean close, the mark still holds a reservation
    os.close(log._lock_fd)
    path.unlink()
    with EventLog(path) as again:
        assert again.last_seq == 107  # above every seq that may have been written
        assert again.condition().status == "warn"


def test_a_restart_on_an_old_backup_never_goes_back(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    backup = tmp_path / "backup.jsonl"
    with EventLog(path) as log:
        log.append([ev(n) for n in range(1, 4)], 0.0)
    backup.write_bytes(path.read_bytes())
    with EventLog(path) as log:
        log.append([ev(n) for n in range(4, 11)], 0.0)
    os.replace(backup, path)
    with EventLog(path) as log:
        assert log.last_seq >= 10
        assert "replaced" in log.condition().output
        log.append([ev(log.last_seq + 1)], 0.0)
    assert file_seqs(path)[-1] > 10


def test_a_crash_restart_on_an_intact_log_stays_gap_free(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.open()
    log.append([ev(n) for n in range(1, 5)], 0.0)
    os.close(log._fd)  # killed: no clean close
    os.close(log._lock_fd)
    with EventLog(path) as again:
        assert again.last_seq == 4 and again.condition().status == "pass"


def test_no_mark_trusts_the_log_and_a_damaged_mark_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("".join(ev(n).to_line() + "\n" for n in (1, 2, 3)))
    with EventLog(path) as log:  # an older runtime's state_dir: no mark yet
        assert log.last_seq == 3 and log.condition().status == "pass"
    log.mark_path.write_text("{not a mark")
    with EventLog(path) as log:
        assert log.last_seq == 3
        assert "high-water mark is damaged" in log.condition().output


# ------------------------------------------------------------------------------ check, repair
def damaged_log(tmp_path: Path) -> Path:
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        log.append([ev(n) for n in range(1, 7)], 0.0)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"\xffgarbage\n" + b"".join(lines[1:4]) + b'{"seq": "x"}\n'
                     + lines[4] + lines[5] + b'{"seq": 7, "ts": "2026-')
    return path


def test_check_explains_every_bad_line(tmp_path: Path) -> None:
    report = check_log(damaged_log(tmp_path))
    assert report.events == 6 and (report.first_seq, report.last_seq) == (1, 6)
    assert [b.lineno for b in report.bad] == [2, 6]
    assert report.bad[0].reason == "not JSON"
    assert report.bad[1].reason.startswith("not an event")
    assert report.torn_bytes > 0 and report.damaged


def test_repair_moves_bad_lines_aside_and_keeps_every_event(tmp_path: Path) -> None:
    path = damaged_log(tmp_path)
    result = repair_log(path)
    assert result.kept == 6 and result.moved == 3
    corrupt = path.with_name("events.jsonl.corrupt").read_bytes()
    assert b"\xffgarbage\n" in corrupt and b'{"seq": "x"}\n' in corrupt
    assert file_seqs(path) == [1, 2, 3, 4, 5, 6]
    assert not check_log(path).damaged
    with EventLog(path) as log:  # the mark follows the repaired file: an intact start
        assert log.last_seq == 6 and log.condition().status == "pass"
    assert repair_log(path).moved == 0


def test_repair_refuses_while_a_runtime_writes_the_log(tmp_path: Path) -> None:
    path = damaged_log(tmp_path)
    with EventLog(path), pytest.raises(LogInUse):
        repair_log(path)
    assert check_log(path).damaged  # untouched


def test_cli_log_check_and_repair(tmp_path: Path, capsys) -> None:
    damaged_log(tmp_path)
    assert cli.main(["log", "check", "--state-dir", str(tmp_path)]) == cli.EXIT_LOG_DAMAGED
    out = capsys.readouterr().out
    assert "line 2" in out and "not JSON" in out and "log repair" in out
    assert cli.main(["log", "repair", "--state-dir", str(tmp_path)]) == cli.EXIT_OK
    assert "moved 3 unreadable line(s)" in capsys.readouterr().out
    assert cli.main(["log", "check", "--state-dir", str(tmp_path)]) == cli.EXIT_OK
    assert "no unreadable lines" in capsys.readouterr().out
    config = tmp_path / "runtime.toml"
    config.write_text(f"[runtime]\nstate_dir = {json.dumps(str(tmp_path))}\n")
    assert cli.main(["log", "check", "--config", str(config)]) == cli.EXIT_OK


def test_wake_at_is_infinite_until_open(tmp_path: Path) -> None:
    assert EventLog(tmp_path / "e.jsonl").wake_at == math.inf


def test_bytes_left_by_our_own_failed_write_are_taken_back_before_the_retry(
        tmp_path: Path, monkeypatch) -> None:
    """A write cut short whose take-back also failed leaves complete lines behind: they are
    cut before the same events are written again, so no line appears twice."""
    path = tmp_path / "events.jsonl"
    log = EventLog(path, fsync="never")
    log.open()
    log.append([ev(1)], 0.0)
    real_write, real_truncate = os.write, os.ftruncate

    def half_write(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data[: len(data) // 2 + 200]))  # two whole lines and a piece
        raise OSError(errno.ENOSPC, "No space left on device")

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "write", half_write)
    monkeypatch.setattr(os, "ftruncate", no_truncate)
    assert log.append([ev(n) for n in range(2, 6)], 1.0) == []
    monkeypatch.setattr(os, "write", real_write)
    monkeypatch.setattr(os, "ftruncate", real_truncate)
    assert seqs(log.append([], log.wake_at)) == [2, 3, 4, 5]
    assert log.condition().status == "pass"  # our own debris is not someone else's doing
    log.close()
    assert file_seqs(path) == [1, 2, 3, 4, 5]


async def test_the_supervisor_notices_a_deleted_log_while_idle(tmp_path: Path,
                                                               autojump_clock) -> None:
    """No event needs to happen: the pump wakes for the log's idle check."""
    path = tmp_path / "events.jsonl"
    async with running_supervisor(tmp_path, log_path=path) as sup:
        await trio.sleep(1)
        last = sup.log.last_seq
        path.unlink()
        await trio.sleep(sup.log.check_interval_s + 1)
        assert "deleted" in sup.log.condition().output
        # The detection is itself an event, first in the new file, numbered on.
        [replaced] = list(iter_file(path))
        assert replaced.kind == KIND_REPLACED and replaced.seq == last + 1
