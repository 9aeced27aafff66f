"""A deterministic stand-in for the ``MetaTrader5`` package: a terminal you can break on purpose.

``TerminalSimulator`` has the package's functions as methods, with the same names, argument
conventions, return types and ``last_error()`` codes (see ``docs/mt5.md`` for each function,
what the real package does and which test checks the simulator does the same), plus the
package's constants, ``__version__``/``__author__`` and its Python helpers ``Buy``, ``Sell``,
``Close`` (``tests/test_mt5_fidelity.py`` compares all of it with the real 5.0.6231 wheel).
Like the real package, failures return None (False for the bool functions) and set
``last_error()``; it raises only where the package raises: TypeError for arguments a C
function does not take, SystemError where the package's argument parser leaves an error set.

Three things make it usable on trio's virtual clock:

* It reads time only from the ``clock`` it is given. Server time is ``epoch + clock()``, and
  prices are a seeded function of server time, so a test run is reproducible.
* It never sleeps or blocks. A slow call, an IPC timeout or a hang is *described* by
  ``before_call(name)``, and the worker that runs calls does the waiting (``trio.sleep`` in an
  inline trio worker, ``time.sleep`` in a thread) before making the call.
* Faults are injected from the control side with ``inject()``; the ones with a duration heal
  by themselves when the clock passes their end.

All state is guarded by one lock, so a worker thread may call functions while another thread
injects faults or releases a hang.
"""

from __future__ import annotations

import enum
import functools
import math
import numbers
import operator
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Concatenate, Final, ParamSpec, TypeVar, cast

import attrs
import numpy as np

from actors.mt5 import codes as mt5
from actors.mt5.types import (
    RATES_DTYPE,
    TICKS_DTYPE,
    AccountInfo,
    BookInfo,
    OrderCheckResult,
    OrderSendResult,
    SymbolInfo,
    TerminalInfo,
    Tick,
    TradeDeal,
    TradeOrder,
    TradePosition,
    TradeRequest,
    make,
    replace,
)

SIMULATOR_FAULTS: frozenset[str] = frozenset(
    {
        "terminal_crash",
        "ipc_timeout",
        "hang",
        "broker_disconnect",
        "auth_failure",
        "autotrading_off",
        "market_retcode",
        "slow",
        "lost_reply",
        "clear",
    }
)

# Keyword parameters each fault accepts besides duration_s.
_FAULT_PARAMS: Final[dict[str, frozenset[str]]] = {
    name: frozenset() for name in SIMULATOR_FAULTS
} | {
    "market_retcode": frozenset({"retcode", "count"}),
    "slow": frozenset({"delay_s"}),
    "lost_reply": frozenset({"count"}),
}

# 2024-01-08 00:00:00 UTC, a Monday: a fixed origin so that server time, and with it every
# price, is the same on every run.
DEFAULT_EPOCH: Final = 1_704_672_000.0
# A broker connection drop heals by itself (the terminal reconnects) after this long unless
# the injection says otherwise.
BROKER_RECONNECT_S: Final = 10.0
# The package copies symbol names and request comments into 31-wchar buffers after asking
# PyUnicode_AsWideChar for the size *including* the terminating NUL: 29 characters is the
# most it takes; a longer comment is refused with (-2, 'Invalid "comment" argument'), a
# longer symbol with (-2, 'Invalid arguments').
STRING_MAX_CHARS: Final = 29
COMMENT_MAX_LENGTH: Final = STRING_MAX_CHARS
GROUP_MAX_CHARS: Final = 1998  # `cmp $0x7cf` on the same count
CREDENTIAL_MAX_CHARS: Final = 254  # server and password: `cmp $0xff`
PATH_MAX_CHARS: Final = 259  # MAX_PATH
PACKAGE_VERSION: Final = "5.0.6231"
PACKAGE_AUTHOR: Final = "MetaQuotes Ltd."
TERMINAL_EXE: Final = "C:\\Program Files\\MetaTrader 5\\terminal64.exe"
TERMINAL_VERSION: Final = (500, 4755, "24 Jan 2025")
MAX_BARS: Final = 100_000
_BOOK_DEPTH: Final = 10  # SymbolInfo.ticks_bookdepth

# Functions that never reach the terminal, so a slow or hung terminal cannot delay them:
# last_error() reads a variable of the package, shutdown() drops the local end of the pipe.
_LOCAL_FUNCTIONS: Final = frozenset({"last_error", "shutdown"})

_SECONDS_PER_DAY: Final = 86_400
_SECONDS_PER_WEEK: Final = 7 * _SECONDS_PER_DAY
_FIRST_SUNDAY: Final = 3 * _SECONDS_PER_DAY  # 1970-01-04, weekly bars open on Sunday
_VOLUME_EPSILON: Final = 1e-8

_BUY_TYPES: Final = frozenset(
    {mt5.ORDER_TYPE_BUY, mt5.ORDER_TYPE_BUY_LIMIT, mt5.ORDER_TYPE_BUY_STOP}
)
_MARKET_TYPES: Final = frozenset({mt5.ORDER_TYPE_BUY, mt5.ORDER_TYPE_SELL})
_PENDING_TYPES: Final = frozenset(
    {
        mt5.ORDER_TYPE_BUY_LIMIT,
        mt5.ORDER_TYPE_SELL_LIMIT,
        mt5.ORDER_TYPE_BUY_STOP,
        mt5.ORDER_TYPE_SELL_STOP,
    }
)
_COPY_TICKS_FLAGS: Final = frozenset(
    {mt5.COPY_TICKS_ALL, mt5.COPY_TICKS_INFO, mt5.COPY_TICKS_TRADE}
)


# --- the control-side values handed to the worker -----------------------------------------


class HangToken:
    """A hang of the terminal: calls given this token must wait until it is released.

    Released once, by ``TerminalSimulator.release_hang()`` or ``inject("clear")``, from any
    thread. Listeners run in the releasing thread; one added after the release runs at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._listeners: list[Callable[[], None]] = []

    @property
    def released(self) -> bool:
        return self._event.is_set()

    def add_listener(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._event.is_set():
                self._listeners.append(callback)
                return
        callback()

    def wait(self, timeout: float | None = None) -> bool:
        """Block this thread until released (for thread workers); False on timeout."""
        return self._event.wait(timeout)

    def _release(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            listeners, self._listeners = self._listeners, []
        # Outside the lock: a listener may add another listener or inspect the token.
        for callback in listeners:
            callback()


@attrs.frozen
class CallDelay:
    """What the worker must wait before making a call: ``seconds``, then the hang if any."""

    seconds: float = 0.0
    hang: HangToken | None = None


NO_DELAY: Final = CallDelay()


# --- instruments and prices ---------------------------------------------------------------


@attrs.frozen
class SymbolSpec:
    """The contract of one simulated instrument and the shape of its price path."""

    name: str
    description: str
    digits: int
    spread_points: int
    base_price: float
    # Standard deviation of the relative price change over one minute.
    volatility: float
    contract_size: float
    currency_base: str
    currency_profit: str
    currency_margin: str
    calc_mode: int = mt5.SYMBOL_CALC_MODE_FOREX
    volume_min: float = 0.01
    volume_max: float = 500.0
    volume_step: float = 0.01
    path: str = ""

    @property
    def point(self) -> float:
        return round(10.0**-self.digits, self.digits)


DEFAULT_SYMBOLS: Final[tuple[SymbolSpec, ...]] = (
    SymbolSpec(
        name="EURUSD",
        description="Euro vs US Dollar",
        digits=5,
        spread_points=10,
        base_price=1.0850,
        volatility=1.0e-4,
        contract_size=100_000.0,
        currency_base="EUR",
        currency_profit="USD",
        currency_margin="EUR",
        path="Forex\\EURUSD",
    ),
    SymbolSpec(
        name="GBPUSD",
        description="Great Britain Pound vs US Dollar",
        digits=5,
        spread_points=12,
        base_price=1.2700,
        volatility=1.2e-4,
        contract_size=100_000.0,
        currency_base="GBP",
        currency_profit="USD",
        currency_margin="GBP",
        path="Forex\\GBPUSD",
    ),
    SymbolSpec(
        name="USDJPY",
        description="US Dollar vs Japanese Yen",
        digits=3,
        spread_points=12,
        base_price=148.00,
        volatility=1.0e-4,
        contract_size=100_000.0,
        currency_base="USD",
        currency_profit="JPY",
        currency_margin="USD",
        path="Forex\\USDJPY",
    ),
    SymbolSpec(
        name="XAUUSD",
        description="Gold vs US Dollar",
        digits=2,
        spread_points=25,
        base_price=2050.00,
        volatility=1.5e-4,
        contract_size=100.0,
        currency_base="XAU",
        currency_profit="USD",
        currency_margin="XAU",
        calc_mode=mt5.SYMBOL_CALC_MODE_CFD,
        volume_max=100.0,
        path="Metals\\XAUUSD",
    ),
)

_U64: Final = np.uint64
_OCTAVES: Final = 17  # the slowest octave moves over 2**16 minutes, about 45 days


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash, element-wise (uint64 arithmetic wraps, as intended)."""
    z = values + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


class _PricePath:
    """Bid prices as a seeded function of time: a random walk with closed-form access.

    A true random walk would have to be summed from its start for every query. Instead the
    log-price at each whole minute is a sum of octaves of value noise (octave k interpolates
    seeded random values 2**k minutes apart, with amplitude growing like sqrt(2**k)), which
    has a random walk's sqrt-of-time spread and costs O(octaves) to evaluate anywhere.
    Between two whole minutes the bid moves in a straight line, one tick per second, so the
    highest and lowest bid over any span are at its whole-minute points or its last second:
    bars of every timeframe are exact aggregates of the ticks, computed without touching
    every second.
    """

    def __init__(self, seed: int) -> None:
        self._seed = seed
        spans = 2.0 ** np.arange(_OCTAVES)
        # Increments over n minutes then have a standard deviation of about sqrt(n) when the
        # amplitudes are scaled this way (1.15 ~ sqrt(4/3) from the octave sum).
        self._unit_amplitudes = np.sqrt(spans) / 1.15

    def _octave_key(self, symbol_index: int, octave: int) -> np.uint64:
        # Python ints are unbounded: fold any seed (negative, huge) into 64 bits first.
        stream = (self._seed * 1_000_003 + symbol_index * 97 + octave) & 0xFFFF_FFFF_FFFF_FFFF
        return _splitmix64(np.array([stream], dtype=_U64))[0]

    def _noise(self, cells: np.ndarray, key: np.uint64) -> np.ndarray:
        hashed = _splitmix64(cells.astype(_U64) ^ key)
        return (hashed >> _U64(11)).astype(np.float64) * (2.0 / 2**53) - 1.0

    def minute_bids(self, symbol_index: int, spec: SymbolSpec, minutes: np.ndarray) -> np.ndarray:
        """Unrounded bid at the start of each whole minute (minutes since 1970)."""
        log_offset = np.zeros(minutes.shape, dtype=np.float64)
        for octave in range(_OCTAVES):
            span = 1 << octave
            cells = np.floor_divide(minutes, span)
            fraction = (minutes - cells * span) / span
            key = self._octave_key(symbol_index, octave)
            start = self._noise(cells, key)
            end = self._noise(cells + 1, key)
            amplitude = self._unit_amplitudes[octave] * spec.volatility
            log_offset += amplitude * (start + (end - start) * fraction)
        return spec.base_price * np.exp(log_offset)

    def bids(self, symbol_index: int, spec: SymbolSpec, seconds: np.ndarray) -> np.ndarray:
        """Bid, rounded to the symbol's digits, at each second (seconds since 1970)."""
        seconds = np.asarray(seconds, dtype=np.int64)
        if seconds.size == 0:
            return np.zeros(0, dtype=np.float64)
        minutes = np.floor_divide(seconds, 60)
        first = int(minutes.min())
        grid = np.arange(first, int(minutes.max()) + 2, dtype=np.int64)
        knots = self.minute_bids(symbol_index, spec, grid)
        left = knots[minutes - first]
        right = knots[minutes - first + 1]
        fraction = (seconds - minutes * 60) / 60.0
        return np.round(left + (right - left) * fraction, spec.digits)

    def bars(
        self, symbol_index: int, spec: SymbolSpec, starts: np.ndarray, ends: np.ndarray
    ) -> np.ndarray:
        """OHLC bars opening at ``starts`` and ending (inclusive) at ``ends``.

        ``starts`` are consecutive bar openings, each on a whole minute; ``ends[i]`` is the
        second before ``starts[i + 1]``, except that the last bar may end earlier (it is still
        forming).
        """
        rates = np.zeros(len(starts), dtype=RATES_DTYPE)
        if len(starts) == 0:
            return rates
        first_minute = int(starts[0]) // 60
        last_minute = int(ends[-1]) // 60
        grid = np.arange(first_minute, last_minute + 1, dtype=np.int64)
        minute_bids = np.round(self.minute_bids(symbol_index, spec, grid), spec.digits)
        block_starts = (starts // 60 - first_minute).astype(np.intp)
        closes = self.bids(symbol_index, spec, ends)
        rates["time"] = starts
        rates["open"] = minute_bids[block_starts]
        rates["high"] = np.maximum(np.maximum.reduceat(minute_bids, block_starts), closes)
        rates["low"] = np.minimum(np.minimum.reduceat(minute_bids, block_starts), closes)
        rates["close"] = closes
        rates["tick_volume"] = ends - starts + 1  # one tick per second
        rates["spread"] = spec.spread_points
        return rates


# --- helpers for arguments ----------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_float(value: object) -> float | None:
    """A finite float from a real number (not a bool), else None; never raises."""
    if not _is_number(value):
        return None
    try:
        number = float(cast(float, value))
    except (OverflowError, ValueError):  # e.g. an int too large for a double
        return None
    return number if math.isfinite(number) else None


def _as_timestamp(value: object) -> float | None:
    """Seconds since 1970 from a datetime or a number; else None.

    Package functions get their dates already read by ``_parse_date`` (a naive datetime is
    local time there, as in the package); this is a safety net for internal callers.
    """
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        try:
            return value.timestamp()
        except (OverflowError, ValueError):
            return None
    return _as_float(value)


def _group_matcher(group: str) -> Callable[[str], bool]:
    """The package's symbol filter: comma-separated masks, '*' wildcards, '!' excludes.

    Conditions apply in order and the last one that matches a name decides, so
    ``"*,!*EUR*"`` means every symbol except those containing EUR.
    """
    conditions: list[tuple[bool, re.Pattern[str]]] = []
    for raw in group.split(","):
        condition = raw.strip()
        if not condition:
            continue
        exclude = condition.startswith("!")
        mask = condition[1:] if exclude else condition
        pattern = re.compile(".*".join(re.escape(part) for part in mask.split("*")))
        conditions.append((exclude, pattern))

    def matches(name: str) -> bool:
        selected = False
        for exclude, pattern in conditions:
            if pattern.fullmatch(name):
                selected = not exclude
        return selected

    return matches


def _month_start(timestamp: int) -> int:
    moment = datetime.fromtimestamp(timestamp, UTC)
    return int(datetime(moment.year, moment.month, 1, tzinfo=UTC).timestamp())


def _next_month_start(month_start: int) -> int:
    moment = datetime.fromtimestamp(month_start, UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return int(datetime(year, month, 1, tzinfo=UTC).timestamp())


def _bar_start(timeframe: int, second: int) -> int:
    if timeframe == mt5.TIMEFRAME_W1:
        return second - (second - _FIRST_SUNDAY) % _SECONDS_PER_WEEK
    if timeframe == mt5.TIMEFRAME_MN1:
        return _month_start(second)
    length = mt5.TIMEFRAME_SECONDS[timeframe]
    return second - second % length


def _next_bar_start(timeframe: int, start: int) -> int:
    if timeframe == mt5.TIMEFRAME_W1:
        return start + _SECONDS_PER_WEEK
    if timeframe == mt5.TIMEFRAME_MN1:
        return _next_month_start(start)
    return start + mt5.TIMEFRAME_SECONDS[timeframe]


def _previous_bar_start(timeframe: int, start: int) -> int:
    return _bar_start(timeframe, start - 1)


# --- the simulator ------------------------------------------------------------------------


class _Session(enum.Enum):
    DETACHED = "detached"  # never initialized, or shut down: no pipe at all
    ATTACHED = "attached"
    BROKEN = "broken"  # the terminal died under an open pipe; only initialize() mends it


_P = ParamSpec("_P")
_R = TypeVar("_R")

# Names of the package's functions, filled in by @_mt5_function (the fidelity test compares).
PACKAGE_FUNCTIONS: list[str] = []

_INT32_RANGE: Final = range(-(2**31), 2**31)
_UINT32_RANGE: Final = range(2**32)
_UINT64_RANGE: Final = range(2**64)


class _ArgumentError(Exception):
    """A -2 refusal found while parsing arguments: the call returns its failure value."""

    def __init__(self, message: str, *, raises: BaseException | None = None) -> None:
        super().__init__(message)
        self.message = message
        # The package leaves a Python exception set while returning None: SystemError.
        self.raises = raises


def _wide_length(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _parse_str(value: object, message: str, limit: int = STRING_MAX_CHARS) -> str:
    if not isinstance(value, str) or _wide_length(value) > limit:
        raise _ArgumentError(message)
    return value


def _parse_date(value: object, message: str = mt5.MSG_INVALID_ARGUMENTS) -> int:
    """Seconds since 1970 as the package reads them: int, float (truncated) or datetime.

    A datetime is read with its own ``timestamp()``: a naive one is the host's local time.
    """
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _ArgumentError(message)
        return int(value)
    if isinstance(value, datetime):
        try:
            return int(value.timestamp())
        except (OverflowError, ValueError, OSError):
            raise _ArgumentError(message) from None
    raise _ArgumentError(message)


def _parse_unsigned(value: object, message: str, bounds: range = _UINT64_RANGE) -> int:
    """An int field the package reads with PyLong_AsUnsigned*: out of range leaves
    OverflowError set (SystemError); not an int is a plain -2."""
    if not isinstance(value, int):
        raise _ArgumentError(message)
    if int(value) not in bounds:
        raise _ArgumentError(message, raises=OverflowError(
            "can't convert negative int to unsigned" if value < 0 else "int too big to convert"))
    return int(value)


def _parse_format(code: str, value: object) -> object:
    """One PyArg_ParseTuple code; its TypeError/OverflowError becomes a SystemError."""
    if code == "O":
        return value
    if code == "p":
        return bool(value)
    if code == "d":
        if isinstance(value, float | int) or hasattr(value, "__float__") \
                or hasattr(value, "__index__"):
            try:
                return float(cast(float, value))
            except (TypeError, ValueError, OverflowError) as error:
                raise _ArgumentError(mt5.MSG_INVALID_ARGUMENTS, raises=error) from None
        raise _ArgumentError(mt5.MSG_INVALID_ARGUMENTS, raises=TypeError(
            f"must be real number, not {type(value).__name__}"))
    if code == "k":  # unsigned long, bits masked: any int, nothing else
        if not isinstance(value, int):
            raise _ArgumentError(mt5.MSG_INVALID_ARGUMENTS, raises=TypeError(
                f"integer argument expected, got {type(value).__name__}"))
        return int(value) & 0xFFFF_FFFF
    try:  # "i": a C int, from anything with __index__
        number = operator.index(cast(int, value))
    except TypeError as error:
        raise _ArgumentError(mt5.MSG_INVALID_ARGUMENTS, raises=error) from None
    if number not in _INT32_RANGE:
        raise _ArgumentError(mt5.MSG_INVALID_ARGUMENTS, raises=OverflowError(
            "signed integer is greater than maximum" if number > 0
            else "signed integer is less than minimum"))
    return number


# The positional arguments of the METH_VARARGS functions: counts accepted and how each is
# read ("str"/"date" by hand: a bad one is -2; "i"/"k"/"d"/"p": PyArg_ParseTuple codes).
_POSITIONAL: Final[dict[str, tuple[tuple[int, ...], tuple[str, ...]]]] = {
    "copy_ticks_from": ((4,), ("str", "date", "i", "i")),
    "copy_ticks_range": ((4,), ("str", "date", "date", "i")),
    "copy_rates_from": ((4,), ("str", "i", "date", "i")),
    "copy_rates_from_pos": ((4,), ("str", "i", "i", "i")),
    "copy_rates_range": ((4,), ("str", "i", "date", "date")),
    "history_orders_total": ((2,), ("date", "date")),
    "history_deals_total": ((2,), ("date", "date")),
    "order_calc_margin": ((4,), ("k", "str", "d", "d")),
    "order_calc_profit": ((5,), ("k", "str", "d", "d", "d")),
    "symbol_info": ((1,), ("str",)),
    "symbol_info_tick": ((1,), ("str",)),
    "symbol_select": ((1, 2), ("str", "p")),
    "market_book_add": ((1,), ("str",)),
    "market_book_release": ((1,), ("str",)),
    "market_book_get": ((1,), ("str",)),
}


def _parse_positional(name: str, args: tuple[object, ...]) -> tuple[object, ...]:
    counts, kinds = _POSITIONAL[name]
    if len(args) not in counts:
        raise _ArgumentError(mt5.MSG_INVALID_ARGUMENTS)
    # PyArg_ParseTuple runs first over every argument; then str and dates are checked.
    parsed = [value if kind in ("str", "date") else _parse_format(kind, value)
              for kind, value in zip(kinds, args, strict=False)]
    for i, kind in enumerate(kinds[: len(args)]):
        if kind == "str":
            parsed[i] = _parse_str(args[i], mt5.MSG_INVALID_ARGUMENTS)
        elif kind == "date":
            parsed[i] = _parse_date(args[i])
    return tuple(parsed)


_Parser = Callable[[tuple[object, ...], dict[str, object]], tuple[tuple[object, ...],
                                                                   dict[str, object]]]


def _mt5_function(
    *, failure: object, ipc: bool = True, convention: str = "varargs",
    parse: _Parser | None = None,
) -> Callable[
    [Callable[Concatenate[TerminalSimulator, _P], _R]],
    Callable[Concatenate[TerminalSimulator, _P], _R],
]:
    """Wrap a package function: refuse and parse arguments exactly as the package does.

    ``convention`` is the C function's: "noargs" (any argument is a TypeError), "varargs"
    (keywords are a TypeError; positional arguments are read per ``_POSITIONAL``) or
    "keywords" (``parse`` reads positional and keyword arguments, ignoring unknown keywords).
    A refusal sets (-2, message) and returns ``failure``; a refusal the package makes with a
    Python exception left set raises SystemError from it, as CPython does. Then, with
    ``ipc``, the call needs a live pipe to the terminal (see ``_enter_terminal_call``).
    """

    def decorate(
        function: Callable[Concatenate[TerminalSimulator, _P], _R],
    ) -> Callable[Concatenate[TerminalSimulator, _P], _R]:
        name = function.__name__
        PACKAGE_FUNCTIONS.append(name)

        @functools.wraps(function)
        def call(self: TerminalSimulator, /, *args: Any, **kwargs: Any) -> _R:
            if convention == "noargs" and args:
                raise TypeError(f"{name}() takes no arguments ({len(args)} given)")
            if convention != "keywords" and kwargs:
                raise TypeError(f"{name}() takes no keyword arguments")
            with self._lock:
                if name != "last_error":
                    self._last_error = mt5.SUCCESS  # every function starts with Success
                try:
                    if convention == "varargs":
                        args = _parse_positional(name, args)
                    elif parse is not None:
                        args, kwargs = parse(args, kwargs)
                except _ArgumentError as refused:
                    self._fail(mt5.RES_E_INVALID_PARAMS, refused.message)
                    if refused.raises is not None:
                        raise SystemError(f"<built-in function {name}> returned a result "
                                          f"with an exception set") from refused.raises
                    return cast(_R, failure)
                if ipc and not self._enter_terminal_call(name):
                    return cast(_R, failure)
                return function(self, *args, **kwargs)

        return call

    return decorate


# --- argument parsers of the METH_VARARGS|METH_KEYWORDS functions --------------------------

_Args = tuple[tuple[object, ...], dict[str, object]]


def _parse_initialize(args: tuple[object, ...], kwargs: dict[str, object]) -> _Args:
    if len(args) > 1:
        raise _ArgumentError(mt5.MSG_INVALID_NUMBER_OF_ARGUMENTS)
    parsed: dict[str, object] = {}
    if args:
        parsed["path"] = _parse_str(args[0], mt5.MSG_ORDINAL_ARGUMENT[0], PATH_MAX_CHARS)
    if "login" in kwargs:
        parsed["login"] = _parse_unsigned(kwargs["login"], mt5.msg_invalid_request_field("login"))
    for key in ("server", "password"):
        if key in kwargs:
            parsed[key] = _parse_str(kwargs[key], mt5.msg_invalid_request_field(key),
                                      CREDENTIAL_MAX_CHARS)
    if "timeout" in kwargs:
        parsed["timeout"] = _parse_unsigned(kwargs["timeout"],
                                            mt5.msg_invalid_request_field("timeout"))
    if "path" in kwargs:
        parsed["path"] = _parse_str(kwargs["path"], mt5.msg_invalid_request_field("path"),
                                    PATH_MAX_CHARS)
    if "portable" in kwargs:
        parsed["portable"] = bool(kwargs["portable"])
    return (), parsed


def _parse_login(args: tuple[object, ...], kwargs: dict[str, object]) -> _Args:
    if len(args) > 3 or (not args and "login" not in kwargs):
        raise _ArgumentError(mt5.MSG_INVALID_NUMBER_OF_ARGUMENTS)
    parsed: dict[str, object] = {}
    if args:
        parsed["login"] = _parse_unsigned(args[0], mt5.MSG_ORDINAL_ARGUMENT[0])
    else:
        parsed["login"] = _parse_unsigned(kwargs["login"], mt5.msg_invalid_request_field("login"))
    for position, key in ((1, "password"), (2, "server")):
        if len(args) > position:
            parsed[key] = _parse_str(args[position], mt5.MSG_ORDINAL_ARGUMENT[position],
                                     CREDENTIAL_MAX_CHARS)
    for key in ("server", "password"):
        if key in kwargs:
            parsed[key] = _parse_str(kwargs[key], mt5.msg_invalid_request_field(key),
                                      CREDENTIAL_MAX_CHARS)
    if "timeout" in kwargs:
        parsed["timeout"] = _parse_unsigned(kwargs["timeout"],
                                            mt5.msg_invalid_request_field("timeout"))
    return (), parsed


def _parse_filters(args: tuple[object, ...], kwargs: dict[str, object]) -> _Args:
    """positions_get / orders_get: keywords only."""
    if args:
        raise _ArgumentError(mt5.MSG_UNNAMED_ARGUMENTS)
    parsed: dict[str, object] = {}
    if "ticket" in kwargs:
        parsed["ticket"] = _parse_unsigned(kwargs["ticket"], mt5.msg_invalid_request_field(
            "ticket"))
    if "symbol" in kwargs:
        parsed["symbol"] = _parse_str(kwargs["symbol"], mt5.msg_invalid_request_field("symbol"))
    if "group" in kwargs:
        parsed["group"] = _parse_str(kwargs["group"], mt5.msg_invalid_request_field("group"),
                                     GROUP_MAX_CHARS)
    return (), parsed


def _parse_history(args: tuple[object, ...], kwargs: dict[str, object]) -> _Args:
    """history_*_get: (date_from, date_to[, group=]) or (ticket=) or (position=)."""
    if len(args) == 2:
        dates = (_parse_date(args[0]), _parse_date(args[1]))
        parsed: dict[str, object] = {}
        if "group" in kwargs:
            parsed["group"] = _parse_str(kwargs["group"], mt5.msg_invalid_request_field(
                "group"), GROUP_MAX_CHARS)
        return dates, parsed
    if args:
        raise _ArgumentError(mt5.MSG_UNNAMED_ARGUMENTS)
    for key in ("ticket", "position"):
        if key in kwargs:
            return (), {key: _parse_unsigned(kwargs[key], mt5.msg_invalid_request_field(key))}
    raise _ArgumentError(mt5.MSG_INVALID_ARGUMENTS)


def _parse_request_argument(args: tuple[object, ...], kwargs: dict[str, object]) -> _Args:
    """order_check / order_send: one dict, or the request's fields as keywords."""
    if kwargs:
        if args:
            raise _ArgumentError(mt5.MSG_UNNAMED_ARGUMENTS)
        request: object = kwargs
    elif len(args) != 1:
        raise _ArgumentError(mt5.MSG_INVALID_NUMBER_OF_ARGUMENTS)
    else:
        request = args[0]
    if not isinstance(request, dict):
        raise _ArgumentError(mt5.MSG_INVALID_ARGUMENTS)
    return (make(TradeRequest, **_parse_request_fields(request)),), {}


def _parse_symbols_get(args: tuple[object, ...], kwargs: dict[str, object]) -> _Args:
    if len(args) > 1:
        raise _ArgumentError(mt5.MSG_INVALID_NUMBER_OF_ARGUMENTS)
    if args:
        return (_parse_str(args[0], mt5.MSG_ORDINAL_ARGUMENT[0], GROUP_MAX_CHARS),), {}
    if "group" in kwargs:
        return (_parse_str(kwargs["group"], mt5.msg_invalid_request_field("group"),
                           GROUP_MAX_CHARS),), {}
    return (), {}


# order_send/order_check read the request's keys in this order (the first bad one is named);
# missing keys stay zero and unknown keys are ignored. "uint" fields take an int, "float"
# fields a float only (an int volume is refused), "int" an int (expiration: no datetime).
_REQUEST_FIELDS: Final[tuple[tuple[str, str], ...]] = (
    ("action", "uint32"), ("magic", "uint"), ("order", "uint"), ("symbol", "str"),
    ("volume", "float"), ("price", "float"), ("stoplimit", "float"), ("sl", "float"),
    ("tp", "float"), ("deviation", "uint"), ("type", "uint32"), ("type_filling", "uint32"),
    ("type_time", "uint32"), ("expiration", "int"), ("comment", "str"), ("position", "uint"),
    ("position_by", "uint"),
)


def _parse_request_fields(request: dict[Any, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for field, kind in _REQUEST_FIELDS:
        if field not in request:
            continue
        value = request[field]
        message = mt5.msg_invalid_request_field(field)
        if kind == "str":
            values[field] = _parse_str(value, message)
        elif kind == "float":
            if not isinstance(value, float):
                raise _ArgumentError(message)
            values[field] = float(value)
        elif kind == "int":
            if not isinstance(value, int):
                raise _ArgumentError(message)
            values[field] = int(value)
        else:
            bounds = _UINT32_RANGE if kind == "uint32" else _UINT64_RANGE
            values[field] = _parse_unsigned(value, message, bounds)
    return values


class TerminalSimulator:
    """The ``MetaTrader5`` package and the terminal behind it, on a given clock."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        seed: int = 0,
        epoch: float = DEFAULT_EPOCH,
        ipc_timeout_s: float = 60.0,
        history_days: int = 30,
        balance: float = 10_000.0,
        leverage: int = 100,
        login: int = 5_000_001,
        server: str = "Simulator-Demo",
        symbols: Iterable[SymbolSpec] = DEFAULT_SYMBOLS,
    ) -> None:
        self._clock = clock
        self._epoch = float(epoch)
        self._ipc_timeout_s = float(ipc_timeout_s)
        self._history_start = int(self._epoch) - history_days * _SECONDS_PER_DAY
        self._prices = _PricePath(seed)
        self._specs = {spec.name: spec for spec in symbols}
        self._symbol_index = {name: index for index, name in enumerate(self._specs)}
        self._selected = dict.fromkeys(self._specs, True)
        self._quotes: dict[str, tuple[int, tuple[float, float]]] = {}  # name -> (second, quote)

        self._lock = threading.RLock()
        # Before any call the package's error variables are zero and empty.
        self._last_error: tuple[int, str] = (0, "")
        self._books: set[str] = set()  # symbols with an open Depth of Market
        self._session = _Session.DETACHED

        # Active faults: name -> clock time at which it heals by itself (None: until clear).
        self._faults: dict[str, float | None] = {}
        self._hang_token: HangToken | None = None
        self._slow_delay_s = 0.0
        self._market_retcode = 0
        self._market_retcodes_left = 0
        self._lost_replies_left = 0
        self._broker_down_since: float | None = None
        # Calls whose before_call() promised an IPC timeout: they fail with -10005 even if the
        # fault has healed while the worker was waiting, as a real timed-out call would.
        self._timed_out_calls: set[str] = set()

        self._login = login
        self._server = server
        self._balance = float(balance)
        self._leverage = leverage
        self._positions: dict[int, TradePosition] = {}
        self._pending_orders: dict[int, TradeOrder] = {}
        self._history_orders: list[TradeOrder] = []
        self._deals: list[TradeDeal] = []
        self._next_order_ticket = 500_000_001
        self._next_deal_ticket = 400_000_001
        self._next_request_id = 1
        self._orders_sent_count = 0

    # ----------------------------------------------------------------- control side

    def inject(self, fault: str, *, duration_s: float | None = None, **params: Any) -> None:
        """Start a fault (see ``SIMULATOR_FAULTS`` and docs/mt5.md); ``clear`` ends them all.

        Raises ValueError for an unknown fault or bad parameters: this is the operator's
        interface, not the MetaTrader5 surface.
        """
        if fault not in SIMULATOR_FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {sorted(SIMULATOR_FAULTS)}")
        unknown = set(params) - _FAULT_PARAMS[fault]
        if unknown:
            raise ValueError(f"fault {fault!r} takes no parameter(s) {sorted(unknown)}")
        if duration_s is not None and not (_is_number(duration_s) and duration_s > 0):
            raise ValueError(f"duration_s must be a positive number, not {duration_s!r}")
        count = params.get("count", 1)
        if not (_is_int(count) and count >= 1):
            raise ValueError(f"count must be a positive integer, not {count!r}")
        if fault == "market_retcode" and not _is_int(params.get("retcode")):
            raise ValueError("market_retcode needs an integer retcode=, e.g. 10004")
        delay_s = params.get("delay_s")
        if fault == "slow" and not (_is_number(delay_s) and float(delay_s) > 0):  # type: ignore[arg-type]
            raise ValueError("slow needs a positive delay_s=")

        released: HangToken | None = None
        with self._lock:
            self._expire_faults()
            until = None if duration_s is None else self._clock() + duration_s
            if fault == "clear":
                released = self._clear_faults()
            elif fault == "terminal_crash":
                if self._session is _Session.ATTACHED:
                    self._session = _Session.BROKEN
                # A call hung in a dead terminal comes back (with an IPC error).
                released = self._take_hang()
                self._faults[fault] = until
            elif fault == "hang":
                released = self._take_hang()
                if until is None:
                    self._hang_token = HangToken()
                self._faults[fault] = until
            elif fault == "broker_disconnect":
                if self._broker_down_since is None:
                    self._broker_down_since = self._server_now()
                self._faults[fault] = self._clock() + (duration_s or BROKER_RECONNECT_S)
            elif fault == "market_retcode":
                self._market_retcode = int(params["retcode"])
                self._market_retcodes_left = int(count)
                self._faults[fault] = until
            elif fault == "slow":
                self._slow_delay_s = float(delay_s)  # type: ignore[arg-type]  # checked above
                self._faults[fault] = until
            elif fault == "lost_reply":
                self._lost_replies_left = int(count)
                self._faults[fault] = until
            else:  # ipc_timeout, auth_failure, autotrading_off: pure conditions
                self._faults[fault] = until
        if released is not None:
            released._release()

    def release_hang(self) -> None:
        """End a ``hang``: calls waiting on its token go ahead, new calls are not hung."""
        with self._lock:
            self._faults.pop("hang", None)
            token = self._take_hang()
        if token is not None:
            token._release()

    def before_call(self, name: str) -> CallDelay:
        """How long the worker must wait before calling ``name`` under the current faults.

        A terminal that is dead, or a call that fails locally (no pipe), answers at once.
        """
        with self._lock:
            self._expire_faults()
            if name in _LOCAL_FUNCTIONS or "terminal_crash" in self._faults:
                return NO_DELAY
            if name != "initialize" and self._session is not _Session.ATTACHED:
                return NO_DELAY
            seconds = self._slow_delay_s if "slow" in self._faults else 0.0
            if "ipc_timeout" in self._faults:
                seconds += self._ipc_timeout_s
                self._timed_out_calls.add(name)
            else:
                self._timed_out_calls.discard(name)
            hang: HangToken | None = None
            if "hang" in self._faults:
                hang_until = self._faults["hang"]
                if hang_until is None:
                    hang = self._hang_token
                else:
                    # A hang with a known end is, for the caller, just a very slow call.
                    seconds += max(0.0, hang_until - self._clock())
            if seconds == 0.0 and hang is None:
                return NO_DELAY
            return CallDelay(seconds=seconds, hang=hang)

    # ----------------------------------------------------------------- the trade server's side

    def account_state(self, *, history_from: tuple[int, int] = (0, 0)) -> dict[str, Any]:
        """What the trade server keeps for the account, as plain picklable data.

        A real terminal that dies loses nothing of the account: positions, orders, deals and
        the balance live on the broker's server. The simulator plays both, so when the
        process worker kills a wedged terminal, its host restores this into the next one
        (``restore_account``). ``history_from`` = (history orders, deals) already taken:
        only newer ones are included, so that an update stays small however long the
        history grows (``history_lengths`` says where the next one starts)."""
        orders_from, deals_from = history_from
        with self._lock:
            return {
                "balance": self._balance,
                "positions": tuple(self._positions.values()),
                "pending_orders": tuple(self._pending_orders.values()),
                "history_orders": tuple(self._history_orders[orders_from:]),
                "deals": tuple(self._deals[deals_from:]),
                "history_lengths": (len(self._history_orders), len(self._deals)),
                "next_order_ticket": self._next_order_ticket,
                "next_deal_ticket": self._next_deal_ticket,
                "next_request_id": self._next_request_id,
                "orders_sent_count": self._orders_sent_count,
            }

    def restore_account(self, state: Mapping[str, Any]) -> None:
        """The account as ``account_state()`` (from 0, or merged updates) described it."""
        with self._lock:
            self._balance = float(state["balance"])
            self._positions = {p.ticket: p for p in state["positions"]}
            self._pending_orders = {o.ticket: o for o in state["pending_orders"]}
            self._history_orders = list(state["history_orders"])
            self._deals = list(state["deals"])
            self._next_order_ticket = int(state["next_order_ticket"])
            self._next_deal_ticket = int(state["next_deal_ticket"])
            self._next_request_id = int(state["next_request_id"])
            self._orders_sent_count = int(state["orders_sent_count"])

    @property
    def faults(self) -> frozenset[str]:
        with self._lock:
            self._expire_faults()
            return frozenset(self._faults)

    @property
    def positions(self) -> tuple[TradePosition, ...]:
        """Open positions as the terminal holds them, whatever the faults (for tests/health)."""
        with self._lock:
            return tuple(self._marked_position(p) for p in self._positions.values())

    @property
    def pending_orders(self) -> tuple[TradeOrder, ...]:
        with self._lock:
            return tuple(self._pending_orders.values())

    @property
    def deals(self) -> tuple[TradeDeal, ...]:
        with self._lock:
            return tuple(self._deals)

    @property
    def orders_sent_count(self) -> int:
        """order_send calls the trade server accepted (a lost reply counts: it was executed)."""
        with self._lock:
            return self._orders_sent_count

    def server_time(self) -> float:
        """Server time in seconds since 1970 (UTC): the epoch plus the clock."""
        return self._server_now()

    # ----------------------------------------------------------------- connection

    @_mt5_function(failure=False, ipc=False, convention="keywords", parse=_parse_initialize)
    def initialize(
        self,
        path: str | None = None,
        *,
        login: int | None = None,
        password: str | None = None,
        server: str | None = None,
        timeout: int | None = None,
        portable: bool = False,
    ) -> bool:
        self._expire_faults()
        timed_out = self._pop_timed_out("initialize")
        if "terminal_crash" in self._faults:
            self._session = _Session.DETACHED
            return self._fail(
                mt5.RES_E_INTERNAL_FAIL_INIT, mt5.msg_process_create_failed(path or TERMINAL_EXE),
                False,
            )
        if timed_out or "ipc_timeout" in self._faults:
            self._session = _Session.DETACHED
            return self._fail(mt5.RES_E_INTERNAL_FAIL_TIMEOUT, result=False)
        if login is not None and "auth_failure" in self._faults:
            self._session = _Session.DETACHED
            return self._fail(mt5.RES_E_AUTH_FAILED, result=False)
        if login is not None:
            self._switch_account(int(login), server)
        # The password is checked by the (simulated) broker and deliberately not kept.
        self._session = _Session.ATTACHED
        return self._succeed(True)

    @_mt5_function(failure=False, convention="keywords", parse=_parse_login)
    def login(
        self,
        *,
        login: int,
        password: str | None = None,
        server: str | None = None,
        timeout: int | None = None,
    ) -> bool:
        if "auth_failure" in self._faults:
            return self._fail(mt5.RES_E_AUTH_FAILED, result=False)
        self._switch_account(int(login), server)
        return self._succeed(True)

    @_mt5_function(failure=None, ipc=False, convention="noargs")
    def shutdown(self) -> bool:
        self._session = _Session.DETACHED
        self._timed_out_calls.clear()
        self._books.clear()
        return True

    @_mt5_function(failure=None, ipc=False, convention="noargs")
    def last_error(self) -> tuple[int, str]:
        return self._last_error

    @_mt5_function(failure=None, convention="noargs")
    def version(self) -> tuple[int, int, str] | None:
        return self._succeed(TERMINAL_VERSION)

    @_mt5_function(failure=None, convention="noargs")
    def terminal_info(self) -> TerminalInfo | None:
        return self._succeed(
            make(
                TerminalInfo,
                community_account=False,
                community_connection=False,
                connected="broker_disconnect" not in self._faults,
                dlls_allowed=False,
                trade_allowed="autotrading_off" not in self._faults,
                tradeapi_disabled=False,
                email_enabled=False,
                ftp_enabled=False,
                notifications_enabled=False,
                mqid=False,
                build=TERMINAL_VERSION[1],
                maxbars=MAX_BARS,
                codepage=0,
                ping_last=25_000,
                community_balance=0.0,
                retransmission=0.0,
                company="MetaQuotes Ltd.",
                name="MetaTrader 5 (simulated)",
                language="English",
                path="C:\\Program Files\\MetaTrader 5",
                data_path="C:\\Program Files\\MetaTrader 5",
                commondata_path="C:\\Users\\sim\\AppData\\Roaming\\MetaQuotes\\Terminal\\Common",
            )
        )

    @_mt5_function(failure=None, convention="noargs")
    def account_info(self) -> AccountInfo | None:
        profit = self._floating_profit()
        equity = round(self._balance + profit, 2)
        margin = self._used_margin()
        return self._succeed(
            make(
                AccountInfo,
                login=self._login,
                trade_mode=mt5.ACCOUNT_TRADE_MODE_DEMO,
                leverage=self._leverage,
                limit_orders=200,
                margin_so_mode=mt5.ACCOUNT_STOPOUT_MODE_PERCENT,
                trade_allowed=True,
                trade_expert=True,
                margin_mode=mt5.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING,
                currency_digits=2,
                fifo_close=False,
                balance=round(self._balance, 2),
                credit=0.0,
                profit=profit,
                equity=equity,
                margin=margin,
                margin_free=round(equity - margin, 2),
                margin_level=round(equity / margin * 100.0, 2) if margin else 0.0,
                margin_so_call=50.0,
                margin_so_so=30.0,
                margin_initial=0.0,
                margin_maintenance=0.0,
                assets=0.0,
                liabilities=0.0,
                commission_blocked=0.0,
                name="Simulated Account",
                server=self._server,
                currency="USD",
                company="mt5-supervisor simulator",
            )
        )

    # ----------------------------------------------------------------- symbols

    @_mt5_function(failure=None, convention="noargs")
    def symbols_total(self) -> int | None:
        return self._succeed(len(self._specs))

    @_mt5_function(failure=None, convention="keywords", parse=_parse_symbols_get)
    def symbols_get(self, group: str | None = None) -> tuple[SymbolInfo, ...] | None:
        matches = _group_matcher(group) if group else None
        return self._succeed(
            tuple(
                self._symbol_info(spec)
                for spec in self._specs.values()
                if matches is None or matches(spec.name)
            )
        )

    @_mt5_function(failure=None)
    def symbol_info(self, symbol: str) -> SymbolInfo | None:
        spec = self._lookup_symbol(symbol)
        return None if spec is None else self._succeed(self._symbol_info(spec))

    @_mt5_function(failure=None)
    def symbol_info_tick(self, symbol: str) -> Tick | None:
        spec = self._lookup_symbol(symbol)
        if spec is None:
            return None
        second = self._market_second()
        bid, ask = self._quote(spec)
        flags = mt5.TICK_FLAG_BID | mt5.TICK_FLAG_ASK
        return self._succeed(Tick((second, bid, ask, 0.0, 0, second * 1000, flags, 0.0)))

    @_mt5_function(failure=False)
    def symbol_select(self, symbol: str, enable: bool = True) -> bool:
        if symbol not in self._specs:
            return self._fail(mt5.RES_E_FAIL, result=False)
        # 'p' in PyArg_ParseTuple: any falsy value (None too) removes; a symbol with open
        # positions stays.
        select = bool(enable)
        if not select and any(p.symbol == symbol for p in self._positions.values()):
            return self._fail(mt5.RES_E_FAIL, result=False)
        self._selected[symbol] = select
        return self._succeed(True)

    # ----------------------------------------------------------------- history

    @_mt5_function(failure=None)
    def copy_rates_from(
        self, symbol: str, timeframe: int, date_from: datetime | int | float, count: int
    ) -> np.ndarray | None:
        moment = _as_timestamp(date_from)
        if not (isinstance(symbol, str) and _is_int(timeframe) and _is_int(count)):
            moment = None
        if moment is None:
            return self._fail(mt5.RES_E_INVALID_PARAMS, mt5.MSG_INVALID_ARGUMENTS)
        if not self._rates_request_ok(timeframe, count):
            return None
        spec = self._lookup_symbol(symbol)
        if spec is None:
            return None
        last = min(math.floor(moment), self._market_second())
        if last < self._history_start:
            return self._fail(mt5.RES_E_FAIL)
        starts = self._bar_starts_back(timeframe, _bar_start(timeframe, last), count)
        return self._rates_or_fail(spec, timeframe, starts)

    @_mt5_function(failure=None)
    def copy_rates_from_pos(
        self, symbol: str, timeframe: int, start_pos: int, count: int
    ) -> np.ndarray | None:
        if not (
            isinstance(symbol, str) and _is_int(timeframe) and _is_int(start_pos) and _is_int(count)
        ):
            return self._fail(mt5.RES_E_INVALID_PARAMS, mt5.MSG_INVALID_ARGUMENTS)
        if start_pos < 0:
            return self._fail(mt5.RES_E_INVALID_PARAMS)
        if not self._rates_request_ok(timeframe, count):
            return None
        spec = self._lookup_symbol(symbol)
        if spec is None:
            return None
        newest = _bar_start(timeframe, self._market_second())
        oldest_allowed = self._first_bar_start(timeframe)
        if timeframe in mt5.TIMEFRAME_SECONDS:
            newest -= int(start_pos) * mt5.TIMEFRAME_SECONDS[timeframe]
        else:
            for _ in range(int(start_pos)):
                if newest < oldest_allowed:
                    break
                newest = _previous_bar_start(timeframe, newest)
        if newest < oldest_allowed:
            return self._fail(mt5.RES_E_FAIL)
        starts = self._bar_starts_back(timeframe, newest, count)
        return self._rates_or_fail(spec, timeframe, starts)

    @_mt5_function(failure=None)
    def copy_rates_range(
        self,
        symbol: str,
        timeframe: int,
        date_from: datetime | int | float,
        date_to: datetime | int | float,
    ) -> np.ndarray | None:
        start, end = _as_timestamp(date_from), _as_timestamp(date_to)
        if not (isinstance(symbol, str) and _is_int(timeframe)) or start is None or end is None:
            return self._fail(mt5.RES_E_INVALID_PARAMS, mt5.MSG_INVALID_ARGUMENTS)
        if timeframe not in mt5.TIMEFRAMES:
            return self._fail(mt5.RES_E_INVALID_PARAMS)
        spec = self._lookup_symbol(symbol)
        if spec is None:
            return None
        # Bars whose opening time lies in [date_from, date_to] (the docs' wording).
        first = max(math.ceil(start), self._first_bar_start(timeframe))
        bar = _bar_start(timeframe, first)
        if bar < first:
            bar = _next_bar_start(timeframe, bar)
        last = min(math.floor(end), self._market_second())
        starts: list[int] = []
        if timeframe in mt5.TIMEFRAME_SECONDS:
            starts = list(range(bar, last + 1, mt5.TIMEFRAME_SECONDS[timeframe]))
        else:
            while bar <= last:
                starts.append(bar)
                bar = _next_bar_start(timeframe, bar)
        if len(starts) > MAX_BARS:
            return self._fail(mt5.RES_E_INVALID_PARAMS)
        return self._succeed(self._rates(spec, timeframe, starts))

    @_mt5_function(failure=None)
    def copy_ticks_from(
        self, symbol: str, date_from: datetime | int | float, count: int, flags: int
    ) -> np.ndarray | None:
        start = _as_timestamp(date_from)
        if not (isinstance(symbol, str) and _is_int(count) and _is_int(flags)) or start is None:
            return self._fail(mt5.RES_E_INVALID_PARAMS, mt5.MSG_INVALID_ARGUMENTS)
        if flags not in _COPY_TICKS_FLAGS or count < 0:
            return self._fail(mt5.RES_E_INVALID_PARAMS)
        spec = self._lookup_symbol(symbol)
        if spec is None:
            return None
        first = max(math.ceil(start), self._history_start)
        last = min(first + int(count) - 1, self._market_second())
        return self._succeed(self._ticks(spec, first, last, flags))

    @_mt5_function(failure=None)
    def copy_ticks_range(
        self,
        symbol: str,
        date_from: datetime | int | float,
        date_to: datetime | int | float,
        flags: int,
    ) -> np.ndarray | None:
        start, end = _as_timestamp(date_from), _as_timestamp(date_to)
        if not (isinstance(symbol, str) and _is_int(flags)) or start is None or end is None:
            return self._fail(mt5.RES_E_INVALID_PARAMS, mt5.MSG_INVALID_ARGUMENTS)
        if flags not in _COPY_TICKS_FLAGS:
            return self._fail(mt5.RES_E_INVALID_PARAMS)
        spec = self._lookup_symbol(symbol)
        if spec is None:
            return None
        first = max(math.ceil(start), self._history_start)
        last = min(math.floor(end), self._market_second())
        return self._succeed(self._ticks(spec, first, last, flags))

    # ----------------------------------------------------------------- trading

    @_mt5_function(failure=None, convention="keywords", parse=_parse_request_argument)
    def order_check(self, request: dict[str, Any]) -> OrderCheckResult | None:
        trade: Any = request  # parsed into a TradeRequest by _parse_request_argument
        retcode = self._terminal_refusal()
        if retcode is None:
            retcode = self._check_request(trade)
        profit = self._floating_profit()
        equity = round(self._balance + profit, 2)
        margin = self._used_margin()
        if retcode == mt5.order_check_ok and trade.action == mt5.TRADE_ACTION_DEAL:
            if not trade.position:
                margin = round(margin + self._margin(self._specs[trade.symbol], trade.volume), 2)
        return self._succeed(
            make(
                OrderCheckResult,
                retcode=retcode,
                balance=round(self._balance, 2),
                equity=equity,
                profit=profit,
                margin=margin,
                margin_free=round(equity - margin, 2),
                margin_level=round(equity / margin * 100.0, 2) if margin else 0.0,
                comment=mt5.trade_retcode_comment(retcode),
                request=trade,
            )
        )

    @_mt5_function(failure=None, convention="keywords", parse=_parse_request_argument)
    def order_send(self, request: dict[str, Any]) -> OrderSendResult | None:
        trade: Any = request  # parsed into a TradeRequest by _parse_request_argument
        refusal = self._terminal_refusal()
        if refusal is not None:
            # Refused inside the terminal: the request never reached the server.
            return self._succeed(self._send_result(trade, refusal))
        request_id = self._next_request_id
        self._next_request_id += 1
        if self._market_retcodes_left > 0:
            self._market_retcodes_left -= 1
            if self._market_retcodes_left == 0:
                self._faults.pop("market_retcode", None)
            bid, ask = self._quote_for(trade)
            result = self._send_result(
                trade, self._market_retcode, bid=bid, ask=ask, request_id=request_id
            )
        else:
            retcode = self._check_request(trade)
            if retcode == mt5.order_check_ok:
                result = self._execute(trade, request_id)
                self._orders_sent_count += 1
            else:
                result = self._send_result(trade, retcode, request_id=request_id)
        if self._lost_replies_left > 0:
            self._lost_replies_left -= 1
            if self._lost_replies_left == 0:
                self._faults.pop("lost_reply", None)
            # The server has done whatever it did; only the answer is gone.
            return self._fail(mt5.RES_E_INTERNAL_FAIL_TIMEOUT)
        return self._succeed(result)

    @_mt5_function(failure=None, convention="noargs")
    def positions_total(self) -> int | None:
        return self._succeed(len(self._positions))

    @_mt5_function(failure=None, convention="keywords", parse=_parse_filters)
    def positions_get(
        self,
        *,
        symbol: str | None = None,
        group: str | None = None,
        ticket: int | None = None,
    ) -> tuple[TradePosition, ...] | None:
        return self._select(self._positions.values(), self._marked_position,
                            symbol, group, ticket)

    @_mt5_function(failure=None, convention="noargs")
    def orders_total(self) -> int | None:
        return self._succeed(len(self._pending_orders))

    @_mt5_function(failure=None, convention="keywords", parse=_parse_filters)
    def orders_get(
        self,
        *,
        symbol: str | None = None,
        group: str | None = None,
        ticket: int | None = None,
    ) -> tuple[TradeOrder, ...] | None:
        return self._select(self._pending_orders.values(), self._marked_order,
                            symbol, group, ticket)

    def _select(self, items: Iterable[Any], mark: Callable[[Any], Any],
                symbol: str | None, group: str | None,
                ticket: int | None) -> tuple[Any, ...] | None:
        """positions_get / orders_get: the same filters over open positions or orders."""
        return self._succeed(tuple(mark(item) for item in items
                                   if self._passes(item.symbol, item.ticket, symbol, group,
                                                   ticket)))

    @_mt5_function(failure=None, convention="keywords", parse=_parse_history)
    def history_orders_get(
        self,
        date_from: datetime | int | float | None = None,
        date_to: datetime | int | float | None = None,
        *,
        group: str | None = None,
        ticket: int | None = None,
        position: int | None = None,
    ) -> tuple[TradeOrder, ...] | None:
        selector = self._history_selector(date_from, date_to, group, ticket, position)
        if selector is None:
            return None
        return self._succeed(
            tuple(
                o
                for o in self._history_orders
                if selector(o.symbol, o.time_setup, o.ticket, o.position_id)
            )
        )

    @_mt5_function(failure=None, convention="keywords", parse=_parse_history)
    def history_deals_get(
        self,
        date_from: datetime | int | float | None = None,
        date_to: datetime | int | float | None = None,
        *,
        group: str | None = None,
        ticket: int | None = None,
        position: int | None = None,
    ) -> tuple[TradeDeal, ...] | None:
        selector = self._history_selector(date_from, date_to, group, ticket, position)
        if selector is None:
            return None
        # For deals, ticket= is the ticket of the order that made the deal (DEAL_ORDER).
        return self._succeed(
            tuple(d for d in self._deals if selector(d.symbol, d.time, d.order, d.position_id))
        )

    @_mt5_function(failure=None)
    def history_orders_total(
        self, date_from: datetime | int | float, date_to: datetime | int | float
    ) -> int | None:
        start, end = cast(int, date_from), cast(int, date_to)
        return self._succeed(sum(1 for o in self._history_orders if start <= o.time_setup <= end))

    @_mt5_function(failure=None)
    def history_deals_total(
        self, date_from: datetime | int | float, date_to: datetime | int | float
    ) -> int | None:
        start, end = cast(int, date_from), cast(int, date_to)
        return self._succeed(sum(1 for d in self._deals if start <= d.time <= end))

    # ----------------------------------------------------------------- calculations

    @_mt5_function(failure=None)
    def order_calc_margin(
        self, action: int, symbol: str, volume: float, price: float
    ) -> float | None:
        """Margin in the account currency for ``action`` (ORDER_TYPE_BUY/SELL)."""
        spec = self._lookup_symbol(symbol)
        if spec is None:
            return None
        if action not in _MARKET_TYPES or volume <= 0 or price <= 0:
            return self._fail(mt5.RES_E_INVALID_PARAMS)
        return self._succeed(self._margin(spec, volume))

    @_mt5_function(failure=None)
    def order_calc_profit(
        self, action: int, symbol: str, volume: float, price_open: float, price_close: float
    ) -> float | None:
        """Profit in the account currency of ``action`` (ORDER_TYPE_BUY/SELL) between prices."""
        spec = self._lookup_symbol(symbol)
        if spec is None:
            return None
        if action not in _MARKET_TYPES or volume <= 0 or price_open <= 0 or price_close <= 0:
            return self._fail(mt5.RES_E_INVALID_PARAMS)
        return self._succeed(self._profit(spec, action, price_open, price_close, volume))

    # ----------------------------------------------------------------- depth of market

    @_mt5_function(failure=False)
    def market_book_add(self, symbol: str) -> bool:
        if self._lookup_symbol(symbol) is None:
            return False
        self._books.add(symbol)
        return self._succeed(True)

    @_mt5_function(failure=False)
    def market_book_release(self, symbol: str) -> bool:
        if symbol not in self._books:
            return self._fail(mt5.RES_E_FAIL, result=False)
        self._books.discard(symbol)
        return self._succeed(True)

    @_mt5_function(failure=None)
    def market_book_get(self, symbol: str) -> tuple[BookInfo, ...] | None:
        """The book opened by ``market_book_add``: sell levels from the top, then buy levels."""
        spec = self._lookup_symbol(symbol)
        if spec is None:
            return None
        if symbol not in self._books:
            return self._fail(mt5.RES_E_FAIL)
        bid, ask = self._quote(spec)
        step = spec.point * max(1, spec.spread_points // 2)
        depth = _BOOK_DEPTH // 2
        sells = [make(
            BookInfo, type=mt5.BOOK_TYPE_SELL, price=round(ask + i * step, spec.digits),
                      volume=10 * (i + 1), volume_dbl=10.0 * (i + 1))
                 for i in reversed(range(depth))]
        buys = [make(
            BookInfo, type=mt5.BOOK_TYPE_BUY, price=round(bid - i * step, spec.digits),
                     volume=10 * (i + 1), volume_dbl=10.0 * (i + 1))
                for i in range(depth)]
        return self._succeed(tuple(sells + buys))

    # ----------------------------------------------------------------- Python helpers
    # Buy, Sell and Close are written in Python in the package's __init__.py, on top of
    # order_send, positions_get and symbol_info_tick; these are the same code.

    def _raw_order(self, order_type: int, symbol: str, volume: Any, price: Any,
                   comment: str | None = None, ticket: int | None = None) -> Any:
        order: dict[str, Any] = {
            "action": mt5.TRADE_ACTION_DEAL,
            "symbol": symbol,
            "volume": volume,
            "type": order_type,
            "price": price,
            "deviation": 10,
        }
        if comment is not None:
            order["comment"] = comment
        if ticket is not None:
            order["position"] = ticket
        return self.order_send(order)

    def Close(  # noqa: N802 - the package's name
        self, symbol: str, *, comment: str | None = None, ticket: int | None = None
    ) -> bool | str | None:
        """Close the positions on ``symbol`` (or the one ``ticket``): True, "Partially",
        False, or None when a tick or an answer is missing."""
        if ticket is not None:
            positions = self.positions_get(ticket=ticket)
        else:
            positions = self.positions_get(symbol=symbol)
        tried = 0
        done = 0
        for pos in positions:  # type: ignore[union-attr]  # None raises TypeError, as in the package
            if pos.type in (mt5.ORDER_TYPE_BUY, mt5.ORDER_TYPE_SELL):
                tried += 1
                for _ in range(10):
                    info = self.symbol_info_tick(symbol)
                    if info is None:
                        return None
                    if pos.type == mt5.ORDER_TYPE_BUY:
                        r = self._raw_order(mt5.ORDER_TYPE_SELL, symbol, pos.volume, info.bid,
                                            comment, pos.ticket)
                    else:
                        r = self._raw_order(mt5.ORDER_TYPE_BUY, symbol, pos.volume, info.ask,
                                            comment, pos.ticket)
                    if r is None:
                        return None
                    if r.retcode not in (mt5.TRADE_RETCODE_REQUOTE, mt5.TRADE_RETCODE_PRICE_OFF):
                        if r.retcode == mt5.TRADE_RETCODE_DONE:
                            done += 1
                        break
        if done > 0:
            return True if done == tried else "Partially"
        return False

    def Buy(  # noqa: N802 - the package's name
        self, symbol: str, volume: Any, price: Any = None, *, comment: str | None = None,
        ticket: int | None = None,
    ) -> Any:
        """A market buy; without a price, retried at the current ask on requotes."""
        return self._market_helper(mt5.ORDER_TYPE_BUY, symbol, volume, price, comment, ticket)

    def Sell(  # noqa: N802 - the package's name
        self, symbol: str, volume: Any, price: Any = None, *, comment: str | None = None,
        ticket: int | None = None,
    ) -> Any:
        """A market sell; without a price, retried at the current bid on requotes."""
        return self._market_helper(mt5.ORDER_TYPE_SELL, symbol, volume, price, comment, ticket)

    def _market_helper(self, order_type: int, symbol: str, volume: Any, price: Any,
                       comment: str | None, ticket: int | None) -> Any:
        if price is not None:
            return self._raw_order(order_type, symbol, volume, price, comment, ticket)
        r = None
        for _ in range(10):
            info = self.symbol_info_tick(symbol)  # None raises AttributeError, as in the package
            # None raises AttributeError above, as in the package.
            quote = info.ask if order_type == mt5.ORDER_TYPE_BUY else info.bid  # type: ignore[union-attr]
            r = self._raw_order(order_type, symbol, volume, quote, comment, ticket)
            if r is None:
                return None
            if r.retcode not in (mt5.TRADE_RETCODE_REQUOTE, mt5.TRADE_RETCODE_PRICE_OFF):
                break
        return r

    # ================================================================= internals

    # --- last_error bookkeeping

    def _succeed(self, result: _R) -> _R:
        self._last_error = mt5.SUCCESS
        return result

    def _fail(self, code: int, message: str | None = None, result: Any = None) -> Any:
        self._last_error = (code, message or mt5.LAST_ERROR_MESSAGE[code])
        return result

    # --- faults and the pipe

    def _server_now(self) -> float:
        return self._epoch + self._clock()

    def _expire_faults(self) -> None:
        now = self._clock()
        for name, until in list(self._faults.items()):
            if until is not None and now >= until:
                del self._faults[name]
                if name == "broker_disconnect":
                    self._broker_down_since = None
                elif name == "market_retcode":
                    self._market_retcodes_left = 0
                elif name == "lost_reply":
                    self._lost_replies_left = 0
                elif name == "slow":
                    self._slow_delay_s = 0.0

    def _take_hang(self) -> HangToken | None:
        token, self._hang_token = self._hang_token, None
        return token

    def _clear_faults(self) -> HangToken | None:
        # The terminal comes back, but a pipe broken by a crash stays broken until initialize().
        self._faults.clear()
        self._broker_down_since = None
        self._market_retcodes_left = 0
        self._lost_replies_left = 0
        self._slow_delay_s = 0.0
        self._timed_out_calls.clear()
        return self._take_hang()

    def _pop_timed_out(self, name: str) -> bool:
        timed_out = name in self._timed_out_calls
        self._timed_out_calls.discard(name)
        return timed_out

    def _enter_terminal_call(self, name: str) -> bool:
        """Whether a call can reach the terminal; if not, last_error says why."""
        self._expire_faults()
        timed_out = self._pop_timed_out(name)
        if self._session is _Session.DETACHED:
            return self._fail(mt5.RES_E_INTERNAL_FAIL_CONNECT, result=False)
        if self._session is _Session.BROKEN:
            return self._fail(mt5.RES_E_INTERNAL_FAIL_SEND, result=False)
        if timed_out or "ipc_timeout" in self._faults:
            return self._fail(mt5.RES_E_INTERNAL_FAIL_TIMEOUT, result=False)
        return True

    def _switch_account(self, login: int, server: str | None) -> None:
        # One simulated account: a new login number keeps the balance and the positions.
        self._login = login
        if server:
            self._server = server

    # --- market data

    def _lookup_symbol(self, symbol: object) -> SymbolSpec | None:
        if not isinstance(symbol, str):
            return self._fail(mt5.RES_E_INVALID_PARAMS, mt5.MSG_INVALID_ARGUMENTS)
        spec = self._specs.get(symbol)
        if spec is None:
            return self._fail(mt5.RES_E_NOT_FOUND)
        return spec

    def _market_second(self) -> int:
        """The last second the terminal has quotes for: frozen while the broker is away."""
        moment = self._broker_down_since
        return math.floor(self._server_now() if moment is None else moment)

    def _bids(self, spec: SymbolSpec, seconds: np.ndarray) -> np.ndarray:
        return self._prices.bids(self._symbol_index[spec.name], spec, seconds)

    def _quote(self, spec: SymbolSpec) -> tuple[float, float]:
        # A quote is a pure function of the symbol and the second, and takes ~1 ms of numpy:
        # account_info and order_send mark every open position (and convert currencies)
        # at one second, so without this they cost a quote per position.
        second = self._market_second()
        cached = self._quotes.get(spec.name)
        if cached is not None and cached[0] == second:
            return cached[1]
        bid = float(self._bids(spec, np.array([second]))[0])
        quote = (bid, round(bid + spec.spread_points * spec.point, spec.digits))
        self._quotes[spec.name] = (second, quote)
        return quote

    def _quote_for(self, trade: TradeRequest) -> tuple[float, float]:
        spec = self._specs.get(trade.symbol)
        return self._quote(spec) if spec is not None else (0.0, 0.0)

    def _symbol_info(self, spec: SymbolSpec) -> SymbolInfo:
        second = self._market_second()
        bid, ask = self._quote(spec)
        day_start = _bar_start(mt5.TIMEFRAME_D1, second)
        day = self._prices.bars(
            self._symbol_index[spec.name], spec, np.array([day_start]), np.array([second])
        )[0]
        spread = spec.spread_points * spec.point
        tick_value = self._to_account_currency(
            spec.point * spec.contract_size, spec.currency_profit
        )
        selected = self._selected[spec.name]
        return make(
            SymbolInfo,
            select=selected,
            visible=selected,
            time=second,
            digits=spec.digits,
            spread=spec.spread_points,
            spread_float=True,
            ticks_bookdepth=10,
            trade_calc_mode=spec.calc_mode,
            trade_mode=mt5.SYMBOL_TRADE_MODE_FULL,
            trade_exemode=mt5.SYMBOL_TRADE_EXECUTION_MARKET,
            swap_mode=1,
            swap_rollover3days=3,
            expiration_mode=15,
            filling_mode=mt5.symbol_filling_fok | mt5.symbol_filling_ioc,
            order_mode=127,
            bid=bid,
            bidhigh=float(day["high"]),
            bidlow=float(day["low"]),
            ask=ask,
            askhigh=round(float(day["high"]) + spread, spec.digits),
            asklow=round(float(day["low"]) + spread, spec.digits),
            point=spec.point,
            trade_tick_value=tick_value,
            trade_tick_value_profit=tick_value,
            trade_tick_value_loss=tick_value,
            trade_tick_size=spec.point,
            trade_contract_size=spec.contract_size,
            volume_min=spec.volume_min,
            volume_max=spec.volume_max,
            volume_step=spec.volume_step,
            margin_hedged=spec.contract_size,
            session_open=float(day["open"]),
            currency_base=spec.currency_base,
            currency_profit=spec.currency_profit,
            currency_margin=spec.currency_margin,
            description=spec.description,
            name=spec.name,
            path=spec.path,
        )

    def _first_bar_start(self, timeframe: int) -> int:
        return _bar_start(timeframe, self._history_start)

    def _rates_request_ok(self, timeframe: int, count: int) -> bool:
        # Refused by the terminal (not by the argument parser): 'Terminal: Invalid params'.
        if timeframe not in mt5.TIMEFRAMES or count <= 0 or count > MAX_BARS:
            return self._fail(mt5.RES_E_INVALID_PARAMS, result=False)
        return True

    def _bar_starts_back(self, timeframe: int, newest: int, count: int) -> list[int]:
        """Up to ``count`` bar openings ending with ``newest``, oldest first, within history."""
        oldest_allowed = self._first_bar_start(timeframe)
        if timeframe in mt5.TIMEFRAME_SECONDS:
            length = mt5.TIMEFRAME_SECONDS[timeframe]
            available = (newest - oldest_allowed) // length + 1
            n = max(0, min(int(count), available))
            return list(range(newest - (n - 1) * length, newest + 1, length))
        starts: list[int] = []
        bar = newest
        while len(starts) < count and bar >= oldest_allowed:
            starts.append(bar)
            bar = _previous_bar_start(timeframe, bar)
        return starts[::-1]

    def _rates(self, spec: SymbolSpec, timeframe: int, starts: list[int]) -> np.ndarray:
        if not starts:
            return np.zeros(0, dtype=RATES_DTYPE)
        now = self._market_second()
        ends = [min(_next_bar_start(timeframe, s) - 1, now) for s in starts]
        return self._prices.bars(
            self._symbol_index[spec.name],
            spec,
            np.array(starts, dtype=np.int64),
            np.array(ends, dtype=np.int64),
        )

    def _rates_or_fail(
        self, spec: SymbolSpec, timeframe: int, starts: list[int]
    ) -> np.ndarray | None:
        # Asking by count for bars that do not exist fails ('Terminal: Call failed'), while
        # asking by range for an empty range answers an empty array.
        if not starts:
            return self._fail(mt5.RES_E_FAIL)
        return self._succeed(self._rates(spec, timeframe, starts))

    def _ticks(self, spec: SymbolSpec, first: int, last: int, flags: int) -> np.ndarray:
        # Forex quotes carry bid and ask only, so there are no 'trade' ticks to copy.
        if last < first or flags == mt5.COPY_TICKS_TRADE:
            return np.zeros(0, dtype=TICKS_DTYPE)
        seconds = np.arange(first, last + 1, dtype=np.int64)
        bids = self._bids(spec, seconds)
        ticks = np.zeros(len(seconds), dtype=TICKS_DTYPE)
        ticks["time"] = seconds
        ticks["bid"] = bids
        ticks["ask"] = np.round(bids + spec.spread_points * spec.point, spec.digits)
        ticks["time_msc"] = seconds * 1000
        ticks["flags"] = mt5.TICK_FLAG_BID | mt5.TICK_FLAG_ASK
        return ticks

    # --- money

    def _to_account_currency(self, amount: float, currency: str) -> float:
        """Convert to the account currency (USD) at the current bid of a matching pair."""
        if currency == "USD":
            return amount
        for spec in self._specs.values():
            if spec.currency_base == currency and spec.currency_profit == "USD":
                return amount * self._quote(spec)[0]
            if spec.currency_base == "USD" and spec.currency_profit == currency:
                return amount / self._quote(spec)[0]
        return amount  # no pair quotes it: treat as par (never the case for the defaults)

    def _margin(self, spec: SymbolSpec, volume: float) -> float:
        units = volume * spec.contract_size / self._leverage
        return round(self._to_account_currency(units, spec.currency_margin), 2)

    def _used_margin(self) -> float:
        margins = (self._margin(self._specs[p.symbol], p.volume) for p in self._positions.values())
        return round(sum(margins, 0.0), 2)

    def _profit(
        self, spec: SymbolSpec, position_type: int, price_open: float, price: float, volume: float
    ) -> float:
        direction = 1.0 if position_type == mt5.POSITION_TYPE_BUY else -1.0
        in_profit_currency = (price - price_open) * direction * volume * spec.contract_size
        return round(self._to_account_currency(in_profit_currency, spec.currency_profit), 2)

    def _marked_position(self, position: TradePosition) -> TradePosition:
        """The position with its current price and floating profit."""
        spec = self._specs[position.symbol]
        bid, ask = self._quote(spec)
        current = bid if position.type == mt5.POSITION_TYPE_BUY else ask
        profit = self._profit(spec, position.type, position.price_open, current, position.volume)
        return replace(position, price_current=current, profit=profit)

    def _marked_order(self, order: TradeOrder) -> TradeOrder:
        bid, ask = self._quote(self._specs[order.symbol])
        return replace(order, price_current=ask if order.type in _BUY_TYPES else bid)

    def _floating_profit(self) -> float:
        profits = (self._marked_position(p).profit for p in self._positions.values())
        return round(sum(profits, 0.0), 2)

    # --- trade requests

    def _terminal_refusal(self) -> int | None:
        """A retcode the terminal answers itself, without asking the trade server."""
        if "autotrading_off" in self._faults:
            return mt5.TRADE_RETCODE_CLIENT_DISABLES_AT
        if "broker_disconnect" in self._faults:
            return mt5.TRADE_RETCODE_CONNECTION
        return None

    def _volume_ok(self, spec: SymbolSpec, volume: float) -> bool:
        steps = volume / spec.volume_step
        return (
            spec.volume_min - _VOLUME_EPSILON <= volume <= spec.volume_max + _VOLUME_EPSILON
            and abs(steps - round(steps)) * spec.volume_step < _VOLUME_EPSILON
        )

    @staticmethod
    def _stops_ok(order_type: int, reference: float, sl: float, tp: float) -> bool:
        """Stop loss on the losing side of ``reference``, take profit on the winning side."""
        if order_type in _BUY_TYPES:
            return (sl == 0.0 or sl < reference) and (tp == 0.0 or tp > reference)
        return (sl == 0.0 or sl > reference) and (tp == 0.0 or tp < reference)

    @staticmethod
    def _pending_price_ok(order_type: int, price: float, bid: float, ask: float) -> bool:
        if price <= 0.0:
            return False
        if order_type == mt5.ORDER_TYPE_BUY_LIMIT:
            return price < ask
        if order_type == mt5.ORDER_TYPE_SELL_LIMIT:
            return price > bid
        if order_type == mt5.ORDER_TYPE_BUY_STOP:
            return price > ask
        return price < bid  # SELL_STOP

    def _check_request(self, trade: TradeRequest) -> int:
        """What the trade server would answer: ORDER_CHECK_OK or the retcode refusing it."""
        if trade.action == mt5.TRADE_ACTION_DEAL:
            if trade.position:
                return self._check_close(trade)
            spec = self._specs.get(trade.symbol)
            if spec is None or trade.type not in _MARKET_TYPES:
                return mt5.TRADE_RETCODE_INVALID
            if not self._volume_ok(spec, trade.volume):
                return mt5.TRADE_RETCODE_INVALID_VOLUME
            bid, ask = self._quote(spec)
            reference = bid if trade.type == mt5.ORDER_TYPE_BUY else ask
            if not self._stops_ok(trade.type, reference, trade.sl, trade.tp):
                return mt5.TRADE_RETCODE_INVALID_STOPS
            equity = self._balance + self._floating_profit()
            if self._margin(spec, trade.volume) > equity - self._used_margin():
                return mt5.TRADE_RETCODE_NO_MONEY
            return mt5.order_check_ok
        if trade.action == mt5.TRADE_ACTION_PENDING:
            spec = self._specs.get(trade.symbol)
            if spec is None or trade.type not in _PENDING_TYPES:
                return mt5.TRADE_RETCODE_INVALID
            if not self._volume_ok(spec, trade.volume):
                return mt5.TRADE_RETCODE_INVALID_VOLUME
            if not self._pending_price_ok(trade.type, trade.price, *self._quote(spec)):
                return mt5.TRADE_RETCODE_INVALID_PRICE
            if not self._stops_ok(trade.type, trade.price, trade.sl, trade.tp):
                return mt5.TRADE_RETCODE_INVALID_STOPS
            return mt5.order_check_ok
        if trade.action == mt5.TRADE_ACTION_SLTP:
            position = self._positions.get(trade.position)
            if position is None and not trade.position:
                return mt5.TRADE_RETCODE_INVALID
            if position is None:
                return mt5.TRADE_RETCODE_POSITION_CLOSED
            bid, ask = self._quote(self._specs[position.symbol])
            reference = bid if position.type == mt5.POSITION_TYPE_BUY else ask
            if not self._stops_ok(position.type, reference, trade.sl, trade.tp):
                return mt5.TRADE_RETCODE_INVALID_STOPS
            if (trade.sl, trade.tp) == (position.sl, position.tp):
                return mt5.TRADE_RETCODE_NO_CHANGES
            return mt5.order_check_ok
        if trade.action == mt5.TRADE_ACTION_MODIFY:
            order = self._pending_orders.get(trade.order)
            if order is None:
                return mt5.TRADE_RETCODE_INVALID
            quote = self._quote(self._specs[order.symbol])
            if not self._pending_price_ok(order.type, trade.price, *quote):
                return mt5.TRADE_RETCODE_INVALID_PRICE
            if not self._stops_ok(order.type, trade.price, trade.sl, trade.tp):
                return mt5.TRADE_RETCODE_INVALID_STOPS
            return mt5.order_check_ok
        if trade.action == mt5.TRADE_ACTION_REMOVE:
            if trade.order not in self._pending_orders:
                return mt5.TRADE_RETCODE_INVALID
            return mt5.order_check_ok
        return mt5.TRADE_RETCODE_INVALID  # CLOSE_BY and unknown actions are not simulated

    def _check_close(self, trade: TradeRequest) -> int:
        position = self._positions.get(trade.position)
        if position is None:
            return mt5.TRADE_RETCODE_POSITION_CLOSED
        spec = self._specs[position.symbol]
        if (trade.symbol and trade.symbol != position.symbol) or trade.type not in _MARKET_TYPES:
            return mt5.TRADE_RETCODE_INVALID
        if trade.type == position.type:  # closing takes the opposite direction
            return mt5.TRADE_RETCODE_INVALID
        if not self._volume_ok(spec, trade.volume):
            return mt5.TRADE_RETCODE_INVALID_VOLUME
        if trade.volume > position.volume + _VOLUME_EPSILON:
            return mt5.TRADE_RETCODE_INVALID_CLOSE_VOLUME
        return mt5.order_check_ok

    def _send_result(
        self,
        trade: TradeRequest,
        retcode: int,
        *,
        deal: int = 0,
        order: int = 0,
        volume: float = 0.0,
        price: float = 0.0,
        bid: float = 0.0,
        ask: float = 0.0,
        request_id: int = 0,
    ) -> OrderSendResult:
        return make(
            OrderSendResult,
            retcode=retcode,
            deal=deal,
            order=order,
            volume=volume,
            price=price,
            bid=bid,
            ask=ask,
            comment=mt5.trade_retcode_comment(retcode),
            request_id=request_id,
            retcode_external=0,
            request=trade,
        )

    def _stamp(self) -> tuple[int, int]:
        now = self._server_now()
        return math.floor(now), math.floor(now * 1000)

    def _new_order_ticket(self) -> int:
        ticket, self._next_order_ticket = self._next_order_ticket, self._next_order_ticket + 1
        return ticket

    def _new_deal_ticket(self) -> int:
        ticket, self._next_deal_ticket = self._next_deal_ticket, self._next_deal_ticket + 1
        return ticket

    def _execute(self, trade: TradeRequest, request_id: int) -> OrderSendResult:
        """Carry out a request that ``_check_request`` accepted."""
        done = mt5.TRADE_RETCODE_DONE
        if trade.action == mt5.TRADE_ACTION_DEAL:
            return self._fill(trade, request_id)
        if trade.action == mt5.TRADE_ACTION_PENDING:
            return self._place(trade, request_id)
        if trade.action == mt5.TRADE_ACTION_SLTP:
            position = self._positions[trade.position]
            seconds, msc = self._stamp()
            self._positions[trade.position] = replace(position,
                sl=trade.sl, tp=trade.tp, time_update=seconds, time_update_msc=msc
            )
            # The real answer to an SL/TP change carries no order, deal or prices.
            return self._send_result(trade, done, request_id=request_id)
        order = self._pending_orders[trade.order]
        if trade.action == mt5.TRADE_ACTION_MODIFY:
            self._pending_orders[trade.order] = replace(order,
                price_open=trade.price, sl=trade.sl, tp=trade.tp, time_expiration=trade.expiration
            )
        else:  # REMOVE: the order leaves for the history as canceled
            seconds, msc = self._stamp()
            del self._pending_orders[trade.order]
            self._history_orders.append(
                replace(self._marked_order(order),
                    state=mt5.ORDER_STATE_CANCELED, time_done=seconds, time_done_msc=msc
                )
            )
        return self._send_result(trade, done, order=trade.order, request_id=request_id)

    def _fill(self, trade: TradeRequest, request_id: int) -> OrderSendResult:
        """A market order: one order, one deal, and a new or reduced position."""
        closing = self._positions.get(trade.position) if trade.position else None
        symbol = closing.symbol if closing is not None else trade.symbol
        spec = self._specs[symbol]
        bid, ask = self._quote(spec)
        price = ask if trade.type == mt5.ORDER_TYPE_BUY else bid
        seconds, msc = self._stamp()
        order_ticket = self._new_order_ticket()
        deal_ticket = self._new_deal_ticket()
        position_id = closing.identifier if closing is not None else order_ticket
        profit = 0.0
        if closing is None:
            self._positions[order_ticket] = make(
                TradePosition,
                ticket=order_ticket,
                time=seconds,
                time_msc=msc,
                time_update=seconds,
                time_update_msc=msc,
                type=trade.type,  # ORDER_TYPE_BUY/SELL equal POSITION_TYPE_BUY/SELL
                magic=trade.magic,
                identifier=order_ticket,
                reason=mt5.POSITION_REASON_EXPERT,
                volume=trade.volume,
                price_open=price,
                sl=trade.sl,
                tp=trade.tp,
                price_current=price,
                swap=0.0,
                profit=0.0,
                symbol=symbol,
                comment=trade.comment,
                external_id="",
            )
        else:
            profit = self._profit(spec, closing.type, closing.price_open, price, trade.volume)
            self._balance += profit
            remaining = round(closing.volume - trade.volume, 8)
            if remaining <= _VOLUME_EPSILON:
                del self._positions[closing.ticket]
            else:
                self._positions[closing.ticket] = replace(closing,
                    volume=remaining, time_update=seconds, time_update_msc=msc
                )
        self._history_orders.append(
            make(
                TradeOrder,
                ticket=order_ticket,
                time_setup=seconds,
                time_setup_msc=msc,
                time_done=seconds,
                time_done_msc=msc,
                time_expiration=0,
                type=trade.type,
                type_time=trade.type_time,
                type_filling=trade.type_filling,
                state=mt5.ORDER_STATE_FILLED,
                magic=trade.magic,
                position_id=position_id,
                position_by_id=0,
                reason=mt5.ORDER_REASON_EXPERT,
                volume_initial=trade.volume,
                volume_current=0.0,
                price_open=trade.price,
                sl=trade.sl,
                tp=trade.tp,
                price_current=price,
                price_stoplimit=0.0,
                symbol=symbol,
                comment=trade.comment,
                external_id="",
            )
        )
        self._deals.append(
            make(
                TradeDeal,
                ticket=deal_ticket,
                order=order_ticket,
                time=seconds,
                time_msc=msc,
                type=trade.type,  # ORDER_TYPE_BUY/SELL equal DEAL_TYPE_BUY/SELL
                entry=mt5.DEAL_ENTRY_IN if closing is None else mt5.DEAL_ENTRY_OUT,
                magic=trade.magic,
                position_id=position_id,
                reason=mt5.DEAL_REASON_EXPERT,
                volume=trade.volume,
                price=price,
                commission=0.0,
                swap=0.0,
                profit=profit,
                fee=0.0,
                symbol=symbol,
                comment=trade.comment,
                external_id="",
            )
        )
        return self._send_result(
            trade,
            mt5.TRADE_RETCODE_DONE,
            deal=deal_ticket,
            order=order_ticket,
            volume=trade.volume,
            price=price,
            bid=bid,
            ask=ask,
            request_id=request_id,
        )

    def _place(self, trade: TradeRequest, request_id: int) -> OrderSendResult:
        """A pending order: it waits in orders_get(); the simulator never triggers it."""
        spec = self._specs[trade.symbol]
        bid, ask = self._quote(spec)
        seconds, msc = self._stamp()
        ticket = self._new_order_ticket()
        self._pending_orders[ticket] = make(
            TradeOrder,
            ticket=ticket,
            time_setup=seconds,
            time_setup_msc=msc,
            time_done=0,
            time_done_msc=0,
            time_expiration=trade.expiration,
            type=trade.type,
            type_time=trade.type_time,
            type_filling=trade.type_filling,
            state=mt5.ORDER_STATE_PLACED,
            magic=trade.magic,
            position_id=0,
            position_by_id=0,
            reason=mt5.ORDER_REASON_EXPERT,
            volume_initial=trade.volume,
            volume_current=trade.volume,
            price_open=trade.price,
            sl=trade.sl,
            tp=trade.tp,
            price_current=ask if trade.type in _BUY_TYPES else bid,
            price_stoplimit=trade.stoplimit,
            symbol=trade.symbol,
            comment=trade.comment,
            external_id="",
        )
        # Real answers to a pending order carry its ticket and retcode 10009, price 0.
        return self._send_result(
            trade,
            mt5.TRADE_RETCODE_DONE,
            order=ticket,
            volume=trade.volume,
            bid=bid,
            ask=ask,
            request_id=request_id,
        )

    # --- filters for positions, orders and history

    @staticmethod
    def _passes(
        name: str, item_ticket: int, symbol: str | None, group: str | None, ticket: int | None
    ) -> bool:
        # The docs: with symbol= given, ticket= is ignored.
        if symbol is not None:
            return name == symbol
        if group is not None and not _group_matcher(group)(name):
            return False
        return ticket is None or item_ticket == ticket

    def _history_selector(
        self,
        date_from: object,
        date_to: object,
        group: object,
        ticket: object,
        position: object,
    ) -> Callable[[str, int, int, int], bool] | None:
        """A predicate on (symbol, time, ticket, position id), or None with last_error set."""
        if not (
            (group is None or isinstance(group, str))
            and (ticket is None or _is_int(ticket))
            and (position is None or _is_int(position))
        ):
            return self._fail(mt5.RES_E_INVALID_PARAMS, mt5.MSG_INVALID_ARGUMENTS)
        if ticket is not None:
            return lambda _symbol, _time, item_ticket, _position: item_ticket == ticket
        if position is not None:
            return lambda _symbol, _time, _ticket, item_position: item_position == position
        start, end = _as_timestamp(date_from), _as_timestamp(date_to)
        if start is None or end is None:
            return self._fail(mt5.RES_E_INVALID_PARAMS, mt5.MSG_INVALID_ARGUMENTS)
        matches = _group_matcher(group) if group else None

        def selected(symbol: str, time: int, _ticket: int, _position: int) -> bool:
            return start <= time <= end and (matches is None or matches(symbol))

        return selected


# The package's module constants and identity, as attributes: a simulator instance reads like
# ``import MetaTrader5 as mt5`` (``sim.TIMEFRAME_H1``, ``sim.__version__``).
for _name, _value in mt5.PACKAGE_CONSTANTS.items():
    setattr(TerminalSimulator, _name, _value)
TerminalSimulator.__version__ = PACKAGE_VERSION  # type: ignore[attr-defined]
TerminalSimulator.__author__ = PACKAGE_AUTHOR  # type: ignore[attr-defined]
