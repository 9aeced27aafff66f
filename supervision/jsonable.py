"""Turn call results (namedtuples, numpy arrays, datetimes, records) into JSON values.

Results cross the control channel as JSON; inside the process they stay native objects.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import uuid
from collections.abc import Mapping
from typing import Any


def to_jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(_dt.UTC)
            return value.isoformat().replace("+00:00", "Z")
        return value.isoformat()
    if isinstance(value, _dt.date | _dt.time):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if hasattr(value, "_asdict"):  # namedtuple (MetaTrader5 results)
        return {k: to_jsonable(v) for k, v in value._asdict().items()}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if hasattr(value, "to_json") and callable(value.to_json):
        return value.to_json()
    # numpy arrays (structured or plain) and numpy scalars, without importing numpy here.
    if hasattr(value, "dtype") and hasattr(value, "tolist"):
        names = getattr(value.dtype, "names", None)
        if names and getattr(value, "ndim", 0) >= 1:
            return [{n: to_jsonable(row[n]) for n in names} for row in value]
        return to_jsonable(value.tolist())
    if hasattr(value, "items") and hasattr(value, "keys"):  # asyncpg.Record
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    return str(value)
