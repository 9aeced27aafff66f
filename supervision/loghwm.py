"""The event log's high-water mark: a small sidecar file (``events.jsonl.hwm``) that lets
``seq`` survive the loss of the log itself.

Why a sidecar: the log is the source of truth for ``seq``, but a log that is deleted,
replaced or truncated would make numbering start again below seqs already published and
persisted (the database would then drop new events as duplicates of old rows). The mark
records, for the log file it describes (device and inode):

* ``seq``: the last seq durably written when the mark was made;
* ``reserved``: a seq the writer may use up to without writing the mark again.

The writer reserves ahead (``seq + reserve``) *before* writing past the old reservation, so
the mark costs one small atomic write per ``reserve`` events, yet every seq ever written is
at most ``reserved``. At open, a log that is the same file and reaches at least ``seq`` is
intact and numbering continues from its last event (gap-free); otherwise the floor is
``reserved`` (a jump, never a reuse). A clean close records the exact last seq.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs


@attrs.frozen
class HighWaterMark:
    seq: int
    reserved: int
    dev: int
    ino: int

    def describes(self, st: os.stat_result) -> bool:
        return (self.dev, self.ino) == (st.st_dev, st.st_ino)


class MarkUnreadable(ValueError):
    pass


def mark_path(log_path: Path) -> Path:
    return log_path.with_name(log_path.name + ".hwm")


def read_mark(path: Path) -> HighWaterMark | None:
    """The mark, or None when there is none. ``MarkUnreadable`` when it is damaged."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(raw)
        mark = HighWaterMark(int(obj["seq"]), int(obj["reserved"]), int(obj["dev"]),
                             int(obj["ino"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise MarkUnreadable(f"{path}: not a high-water mark ({exc})") from None
    if mark.seq < 0 or mark.reserved < mark.seq:
        raise MarkUnreadable(f"{path}: inconsistent high-water mark {mark}")
    return mark


def write_mark(path: Path, mark: HighWaterMark, *, fsync: bool) -> None:
    """Atomically replace the mark (write a temporary file, then rename). Raises OSError
    (a full or read-only disk): the caller must not use seqs past the old reservation."""
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(attrs.asdict(mark), separators=(",", ":")).encode() + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
