"""The durable event log: an append-only JSON-lines file, the source of truth for ``seq``.

Why it is shaped like this:

* An event is written and flushed to the OS *before* it is published, so a consumer never
  sees an event that a crash could take back. ``fsync`` decides how far past the OS it goes:
  ``always`` fsyncs every append before publication, ``batch`` at most once per
  ``batch_interval_s`` (and on close), ``never`` leaves it to the OS.
* A process killed mid-write leaves at most one torn line at the end (a prefix of one
  ``write``). ``open()`` cuts it off, so the log reopens with every complete event and a
  contiguous ``seq``; numbering continues from the last complete event. Damage anywhere else
  is refused loudly (``LogCorrupted``) rather than papered over.
* The writes are small and synchronous on the trio thread: a buffered write plus flush takes
  microseconds, and keeping it off worker threads keeps trio's virtual clock exact in tests.
  ``fsync="always"`` therefore blocks the loop for one fsync per batch of events; that is the
  price of that policy and the reason ``batch`` is the default.
* The last ``tail_size`` events are kept in memory so subscribers resuming from a recent
  ``seq`` are served without touching the disk.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from supervision.events import Event

FSYNC_POLICIES = ("always", "batch", "never")
_BLOCK = 64 * 1024


class LogCorrupted(Exception):
    pass


class EventLog:
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: str = "batch",
        batch_interval_s: float = 1.0,
        tail_size: int = 10_000,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, got {fsync!r}")
        self.path = Path(path)
        self.fsync = fsync
        self.batch_interval_s = batch_interval_s
        self._tail: collections.deque[Event] = collections.deque(maxlen=tail_size)
        self._file: BinaryIO | None = None
        self._last_seq = 0
        self._last_fsync: float | None = None
        self._dirty = False
        self.truncated_bytes = 0  # how much a torn tail cost at open (for logs/tests)

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch(exist_ok=True)
        self._recover()
        self._file = open(self.path, "ab")  # noqa: SIM115 - owned for the log's lifetime

    def close(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        if self.fsync != "never" and self._dirty:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def __enter__(self) -> EventLog:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def last_seq(self) -> int:
        return self._last_seq

    # -- writing -----------------------------------------------------------------------------
    def append(self, events: Iterable[Event], now: float) -> None:
        if self._file is None:
            raise RuntimeError("event log is not open")
        batch = list(events)
        if not batch:
            return
        expected = self._last_seq + 1
        for event in batch:
            if event.seq != expected:
                raise ValueError(f"seq gap: expected {expected}, got {event.seq}")
            expected += 1
        self._file.write("".join(e.to_line() + "\n" for e in batch).encode())
        self._file.flush()
        self._dirty = True
        if self.fsync == "always" or (
            self.fsync == "batch"
            and (self._last_fsync is None or now - self._last_fsync >= self.batch_interval_s)
        ):
            os.fsync(self._file.fileno())
            self._last_fsync = now
            self._dirty = False
        self._last_seq = batch[-1].seq
        self._tail.extend(batch)

    def sync_due(self, now: float) -> bool:
        """A batch-policy log has unsynced writes older than the interval."""
        return (
            self.fsync == "batch"
            and self._dirty
            and (self._last_fsync is None or now - self._last_fsync >= self.batch_interval_s)
        )

    def sync(self, now: float) -> None:
        if self._file is not None and self._dirty:
            os.fsync(self._file.fileno())
            self._last_fsync = now
            self._dirty = False

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
        """Events with seq > after_seq, from memory when possible, else from the file."""
        if self.tail_covers(after_seq):
            return self.read_tail(after_seq, limit)
        out: list[Event] = []
        for event in iter_file(self.path):
            if event.seq > after_seq:
                out.append(event)
                if limit is not None and len(out) >= limit:
                    break
        return out

    # -- recovery ----------------------------------------------------------------------------
    def _recover(self) -> None:
        size = self.path.stat().st_size
        if size == 0:
            return
        with open(self.path, "rb+") as f:
            lines, keep = _read_tail_lines(f, size, self._tail.maxlen or 1)
            events: list[Event] = []
            # Drop unparseable lines only at the very end (a torn or zero-filled last write).
            while lines:
                try:
                    events = [_parse(line) for line in lines]
                    break
                except (ValueError, KeyError, TypeError):
                    bad = lines.pop()
                    try:
                        _parse(bad)
                    except (ValueError, KeyError, TypeError):
                        keep -= len(bad) + 1
                        continue
                    raise LogCorrupted(f"{self.path}: an unreadable event before the end") from None
            if keep != size:
                f.truncate(keep)
                self.truncated_bytes = size - keep
        for a, b in zip(events, events[1:], strict=False):
            if b.seq != a.seq + 1:
                raise LogCorrupted(f"{self.path}: seq jumps from {a.seq} to {b.seq}")
        self._tail.extend(events)
        self._last_seq = events[-1].seq if events else 0
        if not events and keep > 0:
            # Complete lines exist but none in the tail window parsed: not a torn write.
            raise LogCorrupted(f"{self.path}: no readable event at the end of the log")


def _parse(line: bytes) -> Event:
    return Event.from_json(json.loads(line))


def _read_tail_lines(f: BinaryIO, size: int, want: int) -> tuple[list[bytes], int]:
    """The last ``want`` complete lines, and the offset just past the last newline."""
    pos, buf = size, b""
    while pos > 0 and buf.count(b"\n") <= want:
        step = min(_BLOCK, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
    end = buf.rfind(b"\n")
    if end < 0:
        return [], 0  # not one complete line: the whole file is a torn write
    keep = pos + end + 1
    complete = buf[: end + 1].split(b"\n")[:-1]
    if pos > 0:
        complete = complete[1:]  # the first piece may be the middle of a line
    return [c for c in complete if c.strip()][-want:], keep


def iter_file(path: str | os.PathLike[str]) -> Iterator[Event]:
    """Every complete event in a log file, in order (a torn last line is skipped)."""
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return
            if line.strip():
                yield _parse(line)
