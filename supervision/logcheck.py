"""``mt5-supervisor log check`` / ``log repair``: explain a damaged event log and mend it.

The runtime already skips unreadable lines (supervision/eventlog.py), so a damaged log
never stops it. These functions are for the operator: ``check_log`` reads the whole file
and says what is wrong, line by line; ``repair_log`` moves every unreadable line (and a torn
last line) to ``events.jsonl.corrupt``, keeping every readable event in order, then points
the high-water mark at the repaired file so the next start sees it as intact. Nothing is
thrown away: the bad lines are kept, byte for byte, in the ``.corrupt`` file.

Repair needs the runtime stopped: it takes an exclusive lock on the state directory, which
a running runtime holds shared.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import attrs

from supervision.eventlog import parse_line
from supervision.events import Event
from supervision.loghwm import HighWaterMark, MarkUnreadable, mark_path, read_mark, write_mark

MAX_LISTED = 50


class LogInUse(Exception):
    """A runtime is writing this log."""


@attrs.frozen
class BadLine:
    lineno: int
    offset: int
    length: int
    reason: str


@attrs.define
class LogReport:
    path: Path
    exists: bool = True
    events: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    bad: list[BadLine] = attrs.Factory(list)
    bad_count: int = 0
    gaps: list[tuple[int, int]] = attrs.Factory(list)  # (seq before, seq after) jumps
    torn_bytes: int = 0
    mark: str | None = None

    @property
    def damaged(self) -> bool:
        return self.bad_count > 0 or self.torn_bytes > 0


@attrs.frozen
class RepairReport:
    kept: int
    moved: int
    corrupt_path: Path | None


def _why(line: bytes, last: int) -> tuple[Event | None, str | None]:
    event = parse_line(line)
    if event is not None:
        if event.seq <= last:
            return None, f"seq {event.seq} does not follow seq {last} (duplicate or out of order)"
        return event, None
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None, "not JSON"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    missing = [k for k in ("seq", "ts", "actor", "kind") if k not in obj]
    if missing:
        return None, f"not an event (no {', '.join(missing)})"
    return None, "not an event (a field has the wrong type)"


def _walk(path: Path, report: LogReport, good: list[bytes] | None,
          bad: list[bytes] | None) -> None:
    last = 0
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            length = len(line)
            if not line.endswith(b"\n"):
                report.torn_bytes = length
                if bad is not None:
                    bad.append(line + b"\n")
                break
            if line.strip():
                event, reason = _why(line, last)
                if event is None:
                    report.bad_count += 1
                    if len(report.bad) < MAX_LISTED:
                        report.bad.append(BadLine(lineno, offset, length, reason or "?"))
                    if bad is not None:
                        bad.append(line)
                else:
                    if last and event.seq != last + 1:
                        report.gaps.append((last, event.seq))
                    if report.first_seq is None:
                        report.first_seq = event.seq
                    report.last_seq = last = event.seq
                    report.events += 1
                    if good is not None:
                        good.append(line)
            offset += length


def check_log(path: Path) -> LogReport:
    """Read the whole log; say what is wrong with it."""
    report = LogReport(path)
    if not path.exists():
        report.exists = False
    else:
        _walk(path, report, None, None)
    mpath = mark_path(path)
    try:
        mark = read_mark(mpath)
    except MarkUnreadable as exc:
        report.mark = f"damaged ({exc})"
        return report
    if mark is None:
        report.mark = None
    elif not report.exists:
        report.mark = (f"seq {mark.seq} was written, up to {mark.reserved} reserved; the log "
                       f"is missing: the runtime continues at seq {mark.reserved + 1}")
    else:
        same = mark.describes(os.stat(path))
        intact = same and (report.last_seq or 0) >= mark.seq
        report.mark = (f"seq {mark.seq} written, up to {mark.reserved} reserved; "
                       + ("the log is intact" if intact else
                          "the log was replaced or truncated: the runtime continues at seq "
                          f"{max(mark.reserved, report.last_seq or 0) + 1}"))
    return report


def repair_log(path: Path) -> RepairReport:
    """Move unreadable lines to ``<log>.corrupt`` (appended), keep the rest in order."""
    lock = os.open(path.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LogInUse(f"{path} is in use by a running mt5-supervisor: stop it first "
                           "(its log is repaired while it is stopped)") from None
        report = LogReport(path)
        good: list[bytes] = []
        bad: list[bytes] = []
        _walk(path, report, good, bad)
        if not bad:
            return RepairReport(report.events, 0, None)
        old_mark = _mark_or_none(path)
        if old_mark is not None and not old_mark.describes(os.stat(path)):
            old_mark = None  # it speaks of another file: leave it, the runtime will judge
        corrupt = path.with_name(path.name + ".corrupt")
        with open(corrupt, "ab") as f:
            f.write(b"".join(bad))
            f.flush()
            os.fsync(f.fileno())
        tmp = path.with_name(path.name + ".repair")
        with open(tmp, "wb") as f:
            f.write(b"".join(good))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old_mark is not None:
            # The repaired file is a new file: point the mark at it, keeping its numbers,
            # so the next start sees an intact log (or, if lines at the end were lost,
            # still continues above everything written).
            st = os.stat(path)
            write_mark(mark_path(path), attrs.evolve(old_mark, dev=st.st_dev, ino=st.st_ino),
                       fsync=True)
        return RepairReport(report.events, len(bad), corrupt)
    finally:
        os.close(lock)


def _mark_or_none(path: Path) -> HighWaterMark | None:
    try:
        return read_mark(mark_path(path))
    except MarkUnreadable:
        return None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def format_report(report: LogReport) -> str:
    lines = [f"event log: {report.path}"]
    if not report.exists:
        lines.append("  the file does not exist")
    else:
        span = (f", seq {report.first_seq}..{report.last_seq}" if report.events else "")
        lines.append(f"  {report.events} readable event(s){span}")
        for before, after in report.gaps[:10]:
            lines.append(f"  seq jumps from {before} to {after} (events in between are not "
                         "in this file; after a lost log this is expected)")
        if report.bad_count:
            lines.append(f"  {report.bad_count} unreadable line(s), skipped by the runtime and "
                         "by `events`:")
            for bad in report.bad:
                lines.append(f"    line {bad.lineno} (byte {bad.offset}, {bad.length} bytes): "
                             f"{bad.reason}")
            if report.bad_count > len(report.bad):
                lines.append(f"    ... and {report.bad_count - len(report.bad)} more")
        if report.torn_bytes:
            lines.append(f"  a torn last line ({report.torn_bytes} bytes, an interrupted "
                         "write): the runtime cuts it at start")
    if report.mark is not None:
        lines.append(f"  high-water mark: {report.mark}")
    if report.damaged:
        lines.append("to repair (with the runtime stopped): mt5-supervisor log repair "
                     f"--state-dir {report.path.parent}")
        lines.append(f"  unreadable lines are moved to {report.path.name}.corrupt; every "
                     "readable event is kept")
    else:
        lines.append("no unreadable lines")
    return "\n".join(lines)
