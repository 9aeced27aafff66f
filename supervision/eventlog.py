"""The durable event log: an append-only JSON-lines file, the source of truth for ``seq``.

Why it is shaped like this:

* An event is written and flushed to the OS *before* it is published, so a consumer never
  sees an event that a crash could take back. ``fsync`` decides how far past the OS it goes:
  ``always`` fsyncs every append before publication, ``batch`` at most once per
  ``batch_interval_s`` (and on close), ``never`` leaves it to the OS.
* A disk that is full, read-only or failing never takes the runtime down. ``append`` keeps
  the events it cannot write in a bounded memory buffer (``buffer`` events) and returns only
  what is durable, in order; the caller publishes exactly that. Writing is retried with
  backoff (0.1 s doubling to 5 s) and resumes, in order and gap-free, when space returns. A
  failed write is cut back to the last complete line, so a retry never leaves a torn line.
  Past the bound the caller stops numbering (``room()``) and counts what it drops, so ``seq``
  never has a hole and is never reused (docs/operations.md, "Runbook").
* The file we write is watched: before each write (and every ``check_interval_s`` when idle)
  its path is compared with the file we hold. A log deleted, replaced, truncated or appended
  to by someone else is reported (``incidents``, a warn in health, an ``eventlog_replaced``
  event) and writing continues in whatever file is at the path, numbering above everything
  already written. A high-water mark beside the log (supervision/loghwm.py) carries that
  floor across restarts, so a lost log never makes ``seq`` start again.
* A process killed mid-write leaves at most one torn line at the end; it is cut before the
  next write. An unreadable line anywhere else (garbage, a line out of ``seq`` order) is
  skipped and counted by every reader, never fatal; ``mt5-supervisor log check`` lists such
  lines and ``log repair`` moves them aside (supervision/logcheck.py).
* The writes are small and synchronous on the trio thread: one ``write`` syscall per batch,
  which keeps trio's virtual clock exact in tests. ``fsync="always"`` therefore blocks the
  loop for one fsync per batch of events; that is the price of that policy and the reason
  ``batch`` is the default.
* The last ``tail_size`` durable events are kept in memory so subscribers resuming from a
  recent ``seq`` are served without touching the disk.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import attrs

from supervision.backoff import BackoffPolicy
from supervision.events import Event
from supervision.loghwm import HighWaterMark, MarkUnreadable, mark_path, read_mark, write_mark

log = logging.getLogger("mt5_supervisor.eventlog")

FSYNC_POLICIES = ("always", "batch", "never")
DEFAULT_BUFFER = 10_000
DEFAULT_RESERVE = 1_000
WRITE_RETRY = BackoffPolicy(base_s=0.1, factor=2.0, cap_s=5.0)
# Events the log reports about itself (numbered and logged like any other).
KIND_WRITE_FAILED = "eventlog_write_failed"
KIND_WRITE_RESUMED = "eventlog_write_resumed"
KIND_REPLACED = "eventlog_replaced"
_BLOCK = 64 * 1024
_PARSE_ERRORS = (ValueError, KeyError, TypeError, AttributeError, OverflowError)


class LogUnreadable(Exception):
    """The log exists but cannot be read: the seq floor cannot be known, so we do not start."""


class BufferFull(Exception):
    """More events were appended than ``room()`` allowed (a caller bug)."""


@attrs.frozen
class LogCondition:
    """What health says about the log: ``pass``, ``warn`` (something happened that an
    operator should know) or ``fail`` (events are not being written)."""

    status: str
    output: str | None
    pending: int
    dropped: int
    last_seq: int


@attrs.define
class ReadStats:
    bad_lines: int = 0
    torn_tail: bool = False


@attrs.frozen
class _Scan:
    exists: bool
    events: list[Event]
    last_seq: int
    bad_lines: int
    stat: os.stat_result | None


def parse_line(line: bytes) -> Event | None:
    """The event on one line, or None when the line is not one."""
    try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
            return None
        return Event.from_json(obj)
    except _PARSE_ERRORS:
        return None


class EventLog:
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: str = "batch",
        batch_interval_s: float = 1.0,
        tail_size: int = 10_000,
        buffer: int = DEFAULT_BUFFER,
        reserve: int = DEFAULT_RESERVE,
        check_interval_s: float = 5.0,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, got {fsync!r}")
        if buffer < 1 or reserve < 1:
            raise ValueError("buffer and reserve must be >= 1")
        self.path = Path(path)
        self.mark_path = mark_path(self.path)
        self.fsync = fsync
        self.batch_interval_s = batch_interval_s
        self.buffer = buffer
        self.reserve = reserve
        self.check_interval_s = check_interval_s
        self._tail: collections.deque[Event] = collections.deque(maxlen=tail_size)
        self._pending: collections.deque[Event] = collections.deque()
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._ident: tuple[int, int] | None = None  # (dev, ino) of the file we write
        self._size = 0  # bytes of complete lines in that file
        self._own_partial = False  # a failed write of ours may have left bytes past _size
        self._last_seq = 0  # last durable seq, or the floor after a lost log
        self._accepted_seq = 0  # last seq accepted (durable or pending)
        self._reserved = 0  # seqs up to here are covered by the high-water mark
        self._last_fsync: float | None = None
        self._dirty = False
        self._error: str | None = None
        self._failures = 0
        self._retry_at: float | None = None
        self._next_check = -math.inf
        self._dropped = 0  # dropped past the bound during the current outage
        self._notices: list[tuple[str, dict[str, Any]]] = []
        self.is_open = False
        self.truncated_bytes = 0  # how much torn tails cost (for logs/tests)
        self.bad_lines = 0  # unreadable lines met (at open, and by full reads)
        self.dropped_total = 0
        self.incidents: collections.deque[str] = collections.deque(maxlen=10)

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> None:
        """Read the log and its high-water mark, fix the seq floor, open for appending.
        A disk that cannot be written is not an error here: the log starts degraded and
        retries. Only a log that exists but cannot be read raises ``LogUnreadable``."""
        mark = self._load_mark()
        scan = self._scan()
        self._tail.extend(scan.events)
        self.bad_lines = scan.bad_lines
        if scan.bad_lines:
            self._incident(f"{scan.bad_lines} unreadable line(s) near the end of {self.path} "
                           "are skipped; see `mt5-supervisor log check`")
        floor = self._floor(scan, mark)
        self._last_seq = self._accepted_seq = floor
        self._lock_directory()
        self.is_open = True
        try:
            self._ensure_file()
        except OSError as exc:
            self._fail(exc, -math.inf)

    def close(self) -> None:
        if not self.is_open:
            return
        if self._pending or self._error is not None:
            self._attempt(math.inf)  # one last try; nothing waits behind it
        if self._pending:
            log.warning("%d event(s) could not be written to %s before shutdown and are "
                        "lost (they were never published): %s", len(self._pending),
                        self.path, self._error)
        if self._fd is not None:
            try:
                if self.fsync != "never" and self._dirty:
                    os.fsync(self._fd)
                    self._dirty = False
                if self._error is None and self._ident is not None:
                    # A clean close records the exact last seq: a restart continues gap-free
                    # even if the log is lost meanwhile.
                    self._write_mark(self._last_seq)
            except OSError as exc:
                log.warning("closing the event log %s: %s", self.path, _describe(exc))
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.is_open = False

    def __enter__(self) -> EventLog:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def last_seq(self) -> int:
        """The last durable seq (what has been, or may be, published)."""
        return self._last_seq

    def raise_floor(self, seq: int, why: str) -> bool:
        """Number above ``seq`` from now on; True when that moved the floor.

        For what the log alone cannot know: the database already holds events up to
        ``seq`` (the log and its mark were both lost while the database kept its rows).
        Numbering on below it would reuse those seqs, and persistence would skip the new
        events as already stored. The caller numbers events and must move with it
        (``Supervisor.raise_seq_floor``)."""
        if seq <= self._accepted_seq:
            return False
        self._incident(f"seq continues at {seq + 1}: {why}")
        self._notices.append((KIND_REPLACED, {"what": "behind_database",
                                              "continues_at": seq + 1}))
        self._accepted_seq = seq
        if not self._pending:
            self._last_seq = seq
            if self._ident is not None and self._error is None:
                try:  # so that a restart before the next event still starts above it
                    self._write_mark(seq + self.reserve)
                except OSError as exc:
                    self._fail(exc, -math.inf)
        return True

    # -- writing -----------------------------------------------------------------------------
    def room(self) -> int:
        """How many more events ``append`` accepts now (the memory buffer's free space)."""
        return self.buffer - len(self._pending)

    def drop(self, event: Event) -> None:
        """The caller could not append ``event`` (no room) and did not number it."""
        self._dropped += 1
        self.dropped_total += 1

    @property
    def wake_at(self) -> float:
        """When ``append([], now)`` has work to do: a retry, or an idle identity check."""
        if self._retry_at is not None:
            return self._retry_at
        return self._next_check if self.is_open else math.inf

    def append(self, events: Iterable[Event], now: float) -> list[Event]:
        """Accept ``events`` (numbered right after the last accepted one) and return the
        events that became durable by this call, in order: possibly older buffered ones,
        possibly none. Only those may be published."""
        if not self.is_open:
            raise RuntimeError("event log is not open")
        batch = list(events)
        expected = self._accepted_seq + 1
        for event in batch:
            if event.seq != expected:
                raise ValueError(f"seq gap: expected {expected}, got {event.seq}")
            expected += 1
        if len(batch) > self.room():
            raise BufferFull(f"{len(batch)} events, room for {self.room()}")
        if batch:
            self._pending.extend(batch)
            self._accepted_seq = batch[-1].seq
        if self._retry_at is not None and now < self._retry_at:
            return []
        if not self._pending and self._error is None and now < self._next_check:
            return []
        return self._attempt(now)

    def sync_due(self, now: float) -> bool:
        """A batch-policy log has unsynced writes older than the interval."""
        return (
            self.fsync == "batch"
            and self._dirty
            and (self._last_fsync is None or now - self._last_fsync >= self.batch_interval_s)
        )

    def sync(self, now: float) -> None:
        if self._fd is not None and self._dirty:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._fail(exc, now)
                return
            self._last_fsync = now
            self._dirty = False

    def take_notices(self) -> list[tuple[str, dict[str, Any]]]:
        """Events the log has to report about itself: ``(kind, data)``, to be numbered and
        appended by the caller like any other event."""
        notices, self._notices = self._notices, []
        return notices

    # -- health ------------------------------------------------------------------------------
    def condition(self) -> LogCondition:
        """No I/O: built from what the writer already knows."""
        pending, dropped = len(self._pending), self._dropped
        if self._error is not None:
            parts = [f"event log not writable: {self._error}",
                     f"{pending} event(s) waiting in memory (bound {self.buffer}), "
                     "not yet published"]
            if dropped:
                parts.append(f"{dropped} event(s) dropped past the bound (never numbered)")
            parts.append("writing resumes by itself when the disk accepts it again")
            return LogCondition("fail", "; ".join(parts), pending, dropped, self._last_seq)
        warnings = list(self.incidents)
        if self.bad_lines and not any("unreadable line" in w for w in warnings):
            warnings.append(f"{self.bad_lines} unreadable line(s) in {self.path} are "
                            "skipped; see `mt5-supervisor log check`")
        if warnings:
            return LogCondition("warn", "; ".join(warnings), pending, dropped, self._last_seq)
        return LogCondition("pass", None, pending, dropped, self._last_seq)

    # -- reading -----------------------------------------------------------------------------
    def tail_covers(self, after_seq: int) -> bool:
        """Can every event with seq > after_seq be served from memory?"""
        if after_seq >= self._last_seq:
            return True
        return bool(self._tail) and self._tail[0].seq <= after_seq + 1

    def read_tail(self, after_seq: int, limit: int | None = None) -> list[Event]:
        out = [e for e in self._tail if e.seq > after_seq]
        return out if limit is None else out[:limit]

    def read_since(self, after_seq: int, limit: int | None = None) -> list[Event]:
        """Events with seq > after_seq, from memory when possible, else from the file.
        Unreadable lines are skipped (and counted in ``bad_lines``)."""
        if self.tail_covers(after_seq):
            return self.read_tail(after_seq, limit)
        out: list[Event] = []
        stats = ReadStats()
        try:
            for event in iter_file(self.path, stats):
                if event.seq > after_seq:
                    out.append(event)
                    if limit is not None and len(out) >= limit:
                        break
        except FileNotFoundError:
            pass  # deleted: what memory holds is all there is (the writer will notice)
        self.bad_lines = max(self.bad_lines, stats.bad_lines)
        if out and out[-1].seq < self._last_seq and (limit is None or len(out) < limit):
            out.extend(e for e in self._tail if e.seq > out[-1].seq)
        elif not out:
            out = self.read_tail(after_seq, limit)
        return out if limit is None else out[:limit]

    # -- internals: opening ------------------------------------------------------------------
    def _load_mark(self) -> HighWaterMark | None:
        try:
            return read_mark(self.mark_path)
        except MarkUnreadable as exc:
            self._incident(f"the high-water mark is damaged ({exc}); seq continues from the "
                           "log alone")
        except OSError as exc:
            self._incident(f"the high-water mark cannot be read ({_describe(exc)}); seq "
                           "continues from the log alone")
        return None

    def _scan(self) -> _Scan:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return _Scan(False, [], 0, 0, None)
        except OSError as exc:
            raise LogUnreadable(f"cannot read the event log: {_describe(exc)}") from exc
        try:
            with open(self.path, "rb") as f:
                lines, whole = _read_tail_lines(f, st.st_size, self._tail.maxlen or 1)
            events, bad = _ordered(lines)
            if not events and not whole:
                # Nothing readable at the end: find the last good event the long way.
                stats = ReadStats()
                last = None
                for last in iter_file(self.path, stats):  # noqa: B007 - we want the last
                    pass
                events, bad = ([last] if last is not None else []), stats.bad_lines
        except OSError as exc:
            raise LogUnreadable(f"cannot read the event log: {_describe(exc)}") from exc
        return _Scan(True, events, events[-1].seq if events else 0, bad, st)

    def _floor(self, scan: _Scan, mark: HighWaterMark | None) -> int:
        """Where numbering continues: after the log's last event when the log is the file
        the mark describes and reaches the mark; else above the mark's reservation."""
        if mark is None:
            return scan.last_seq
        if not scan.exists:
            short, what = "missing", f"{self.path} is missing"
        elif scan.stat is not None and not mark.describes(scan.stat):
            short, what = "replaced", f"{self.path} is not the file written before (replaced)"
        elif scan.last_seq < mark.seq:
            short, what = "truncated", (f"{self.path} ends at seq {scan.last_seq} but seq "
                                        f"{mark.seq} was already written (truncated)")
        else:
            self._reserved = max(mark.reserved, scan.last_seq)
            return scan.last_seq
        floor = max(scan.last_seq, mark.reserved)
        self._incident(f"at start: {what}; seq continues at {floor + 1}, above everything "
                       "written before; earlier events are in the database")
        self._notices.append((KIND_REPLACED, {"what": short, "continues_at": floor + 1,
                                              "at_start": True}))
        return floor

    def _lock_directory(self) -> None:
        """A shared lock on the state directory: ``log repair`` (exclusive) refuses to run
        while a runtime writes here. Best effort: a directory we cannot open is reported
        by the writer anyway."""
        try:
            fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return
        self._lock_fd = fd

    def _ensure_file(self) -> None:
        """Open the file at the path for appending, cutting a torn last line first."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            st = os.fstat(fd)
            keep = _complete_length(self.path, st.st_size)
            if keep < st.st_size:
                os.ftruncate(fd, keep)
                self.truncated_bytes += st.st_size - keep
                log.info("cut a torn last line (%d bytes) from %s", st.st_size - keep,
                         self.path)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._size, self._ident = fd, keep, (st.st_dev, st.st_ino)
        self._own_partial = False

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
            self._ident = None

    # -- internals: writing ------------------------------------------------------------------
    def _attempt(self, now: float) -> list[Event]:
        try:
            self._ensure_file()
            self._check_identity()
            written = self._write_pending(now) if self._pending else []
            if self._error is not None and self._dirty and self.fsync != "never":
                self.sync(now)  # a failed fsync is what degraded us: it must pass now
                if self._dirty:
                    return written
        except OSError as exc:
            self._fail(exc, now)
            return []
        self._next_check = now + self.check_interval_s
        if self._error is not None:
            self._resumed()
        return written

    def _check_identity(self) -> None:
        """Is the file at the path still the one we write, as we left it?"""
        assert self._fd is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            what = "deleted"
        else:
            if (st.st_dev, st.st_ino) != self._ident:
                what = "replaced"
            elif st.st_size == self._size:
                self._own_partial = False
                return
            elif self._own_partial and st.st_size > self._size:
                # Our own failed write left bytes (even complete lines): take them back
                # before writing those events again. Fails (and is retried) as a write does.
                os.ftruncate(self._fd, self._size)
                self._own_partial = False
                return
            elif st.st_size < self._size:
                what = "truncated"
            else:
                what = "appended to by another writer"
        self._close_fd()
        next_seq = self._last_seq + 1
        self._incident(f"{self.path} was {what} while running; writing continues in the "
                       f"file now at that path from seq {next_seq}, above everything "
                       "written before; earlier events are in the database")
        self._notices.append((KIND_REPLACED, {"what": what, "continues_at": next_seq}))
        self._reserved = self._last_seq  # re-reserve: the mark must name the new file
        self._ensure_file()

    def _write_pending(self, now: float) -> list[Event]:
        assert self._fd is not None
        batch = list(self._pending)
        if batch[-1].seq > self._reserved:
            self._write_mark(batch[-1].seq + self.reserve)
        data = "".join(e.to_line() + "\n" for e in batch).encode()
        start = self._size
        synced = False
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            if self.fsync == "always" or (self.fsync == "batch" and (
                    self._last_fsync is None or now - self._last_fsync >= self.batch_interval_s)):
                os.fsync(self._fd)
                synced = True
        except OSError:
            # Not written (or not durable): take back whatever part reached the file, so
            # the retry writes the same events again without a torn line before them.
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                self._own_partial = True
            raise
        self._size = start + len(data)
        if synced:
            self._last_fsync = now
            self._dirty = False
        else:
            self._dirty = True
        self._pending.clear()
        self._last_seq = batch[-1].seq
        self._tail.extend(batch)
        return batch

    def _write_mark(self, reserved: int) -> None:
        assert self._ident is not None
        dev, ino = self._ident
        write_mark(self.mark_path, HighWaterMark(self._last_seq, reserved, dev, ino),
                   fsync=self.fsync != "never")
        self._reserved = reserved

    def _fail(self, exc: OSError, now: float) -> None:
        first = self._error is None
        self._failures += 1
        self._error = _describe(exc)
        self._retry_at = (now + WRITE_RETRY.delay(min(self._failures, 30))
                          if math.isfinite(now) else -math.inf)
        if first:
            log.warning("event log not writable (%s): events wait in memory (up to %d) and "
                        "are published once written; retrying", self._error, self.buffer)
            self._notices.append((KIND_WRITE_FAILED, {"reason": self._error}))

    def _resumed(self) -> None:
        data: dict[str, Any] = {"failures": self._failures, "reason": self._error}
        if self._dropped:
            data["dropped"] = self._dropped
            self._incident(f"{self._dropped} event(s) were dropped, never numbered, while "
                           f"the log was not writable (bound {self.buffer} reached)")
        log.warning("event log writable again after %d failed attempt(s)", self._failures)
        self._notices.append((KIND_WRITE_RESUMED, data))
        self._error = None
        self._failures = 0
        self._retry_at = None
        self._dropped = 0

    def _incident(self, text: str) -> None:
        self.incidents.append(text)
        log.warning("event log: %s", text)


def _describe(exc: OSError) -> str:
    """``ENOSPC: No space left on device: /path`` (no secrets: the path is state_dir)."""
    name = errno.errorcode.get(exc.errno or 0, "OSError")
    where = f": {exc.filename}" if exc.filename else ""
    return f"{name}: {exc.strerror or exc}{where}"


def _ordered(lines: list[bytes]) -> tuple[list[Event], int]:
    """The readable events among ``lines`` in strictly increasing seq, and how many lines
    were not (garbage, or a seq not above the one before)."""
    events: list[Event] = []
    bad = 0
    for line in lines:
        event = parse_line(line)
        if event is None or (events and event.seq <= events[-1].seq):
            bad += 1
            continue
        events.append(event)
    return events, bad


def _read_tail_lines(f: BinaryIO, size: int, want: int) -> tuple[list[bytes], bool]:
    """The last ``want`` complete non-blank lines, and whether they start at the file's
    beginning (nothing older exists)."""
    pos, buf = size, b""
    while pos > 0 and buf.count(b"\n") <= want:
        step = min(_BLOCK, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
    end = buf.rfind(b"\n")
    if end < 0:
        return [], pos == 0
    complete = buf[: end + 1].split(b"\n")[:-1]
    if pos > 0:
        complete = complete[1:]  # the first piece may be the middle of a line
    lines = [c for c in complete if c.strip()]
    return lines[-want:], pos == 0 and len(lines) <= want


def _complete_length(path: Path, size: int) -> int:
    """The offset just past the file's last newline (0 if there is none)."""
    with open(path, "rb") as f:
        pos = size
        while pos > 0:
            step = min(_BLOCK, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step)
            end = chunk.rfind(b"\n")
            if end >= 0:
                return pos + end + 1
    return 0


def iter_file(path: str | os.PathLike[str], stats: ReadStats | None = None) -> Iterator[Event]:
    """Every readable event in a log file, in order. Unreadable lines and lines whose seq is
    not above the previous event's are skipped and counted in ``stats``; a torn last line
    is skipped."""
    stats = stats if stats is not None else ReadStats()
    last = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                stats.torn_tail = True
                return
            if not line.strip():
                continue
            event = parse_line(line)
            if event is None or event.seq <= last:
                stats.bad_lines += 1
                continue
            last = event.seq
            yield event
