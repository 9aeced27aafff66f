"""A deterministic stand-in for the ``MetaTrader5`` package: a terminal you can break on purpose.

``TerminalSimulator`` has the package's functions as methods, with the same names, argument
conventions, return types and ``last_error()`` codes (see ``docs/mt5.md`` for each function,
what the real package does and which test checks the simulator does the same). Like the real
package it never raises for a bad call: failures return None (False for the bool functions)
and set ``last_error()``.

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
import inspect
import math
import numbers
import re
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Concatenate, Final, ParamSpec, TypeVar, cast

import attrs
import numpy as np

from actors.mt5 import codes as mt5
from actors.mt5.types import (
    RATES_DTYPE,
    TICKS_DTYPE,
    AccountInfo,
    OrderCheckResult,
    OrderSendResult,
    SymbolInfo,
    TerminalInfo,
    Tick,
    TradeDeal,
    TradeOrder,
    TradePosition,
    TradeRequest,
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
# MqlTradeRequest.comment is a 31-character field: the package refuses longer comments with
# (-2, 'Invalid "comment" argument') rather than cutting them (users report the cut-off
# anywhere from 27 to 31 characters depending on build; we take the documented field size).
COMMENT_MAX_LENGTH: Final = 31
TERMINAL_VERSION: Final = (500, 4755, "24 Jan 2025")
MAX_BARS: Final = 100_000

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
    """Seconds since 1970 from a datetime or a number, as the package accepts; else None.

    A naive datetime is read as UTC: the terminal keeps all times in UTC and the docs tell
    callers to build datetimes in UTC.
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


def _mt5_function(
    *, failure: object, ipc: bool = True
) -> Callable[
    [Callable[Concatenate[TerminalSimulator, _P], _R]],
    Callable[Concatenate[TerminalSimulator, _P], _R],
]:
    """Wrap a package function: take the lock, refuse bad calls the way the package does.

    A call whose arguments do not fit the signature gets (-2, 'Invalid arguments') instead of
    a TypeError, because the real package parses its own arguments and never raises. With
    ``ipc`` the call then needs a live pipe to the terminal (see ``_enter_terminal_call``).
    """

    def decorate(
        function: Callable[Concatenate[TerminalSimulator, _P], _R],
    ) -> Callable[Concatenate[TerminalSimulator, _P], _R]:
        signature = inspect.signature(function)
        name = function.__name__

        @functools.wraps(function)
        def call(self: TerminalSimulator, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            with self._lock:
                try:
                    signature.bind(self, *args, **kwargs)
                except TypeError:
                    self._fail(mt5.RES_E_INVALID_PARAMS, mt5.MSG_INVALID_ARGUMENTS)
                    return cast(_R, failure)
                if ipc and not self._enter_terminal_call(name):
                    return cast(_R, failure)
                return function(self, *args, **kwargs)

        return call

    return decorate


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

        self._lock = threading.RLock()
        self._last_error: tuple[int, str] = mt5.SUCCESS
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
        if fault == "slow" and not (_is_number(delay_s) and delay_s > 0):
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
                self._slow_delay_s = float(delay_s)
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

    @_mt5_function(failure=False, ipc=False)
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
        if not (
            (path is None or isinstance(path, str))
            and (login is None or _is_int(login))
            and (password is None or isinstance(password, str))
            and (server is None or isinstance(server, str))
            and (timeout is None or _is_int(timeout))
            and isinstance(portable, bool)
        ):
            return self._fail(mt5.RES_E_INVALID_PARAMS, mt5.MSG_INVALID_ARGUMENTS, False)
        if "terminal_crash" in self._faults:
            self._session = _Session.DETACHED
            return self._fail(
                mt5.RES_E_INTERNAL_FAIL_INIT, mt5.MSG_IPC_INIT_PROCESS_CREATE_FAILED, False
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

    @_mt5_function(failure=False)
    def login(
        self,
        login: int,
        password: str | None = None,
        server: str | None = None,
        timeout: int | None = None,
    ) -> bool:
        if not (
            _is_int(login)
            and (password is None or isinstance(password, str))
            and (server is None or isinstance(server, str))
            and (timeout is None or _is_int(timeout))
        ):
            return self._fail(mt5.RES_E_INVALID_PARAMS, mt5.MSG_INVALID_ARGUMENTS, False)
        if "auth_failure" in self._faults:
            return self._fail(mt5.RES_E_AUTH_FAILED, result=False)
        self._switch_account(int(login), server)
        return self._succeed(True)

    @_mt5_function(failure=None, ipc=False)
    def shutdown(self) -> None:
        self._session = _Session.DETACHED
        self._timed_out_calls.clear()
        self._last_error = mt5.SUCCESS

    @_mt5_function(failure=None, ipc=False)
    def last_error(self) -> tuple[int, str]:
        return self._last_error

    @_mt5_function(failure=None)
    def version(self) -> tuple[int, int, str] | None:
        return self._succeed(TERMINAL_VERSION)

    @_mt5_function(failure=None)
    def terminal_info(self) -> TerminalInfo | None:
        return self._succeed(
            TerminalInfo(
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

    @_mt5_function(failure=None)
    def account_info(self) -> AccountInfo | None:
        profit = self._floating_profit()
        equity = round(self._balance + profit, 2)
        margin = self._used_margin()
        return self._succeed(
            AccountInfo(
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

    @_mt5_function(failure=None)
    def symbols_total(self) -> int | None:
        return self._succeed(len(self._specs))

    @_mt5_function(failure=None)
    def symbols_get(self, group: str | None = None) -> tuple[SymbolInfo, ...] | None:
        if group is not None and not isinstance(group, str):
            return self._fail(mt5.RES_E_INVALID_PARAMS, mt5.MSG_INVALID_ARGUMENTS)
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
        return self._succeed(Tick(second, bid, ask, 0.0, 0, second * 1000, flags, 0.0))

    @_mt5_function(failure=False)
    def symbol_select(self, symbol: str, enable: bool | None = True) -> bool:
        if not isinstance(symbol, str) or not (enable is None or isinstance(enable, bool)):
            return self._fail(mt5.RES_E_INVALID_PARAMS, mt5.MSG_INVALID_ARGUMENTS, False)
        if symbol not in self._specs:
            return self._fail(mt5.RES_E_FAIL, result=False)
        # The docs: only an explicit False removes; a symbol with open positions stays.
        select = enable is not False
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

    @_mt5_function(failure=None)
    def order_check(self, request: dict[str, Any]) -> OrderCheckResult | None:
        trade = self._parse_request(request)
        if trade is None:
            return None
        retcode = self._terminal_refusal()
        if retcode is None:
            retcode = self._check_request(trade)
        profit = self._floating_profit()
        equity = round(self._balance + profit, 2)
        margin = self._used_margin()
        if retcode == mt5.ORDER_CHECK_OK and trade.action == mt5.TRADE_ACTION_DEAL:
            if not trade.position:
                margin = round(margin + self._margin(self._specs[trade.symbol], trade.volume), 2)
        return self._succeed(
            OrderCheckResult(
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

    @_mt5_function(failure=None)
    def order_send(self, request: dict[str, Any]) -> OrderSendResult | None:
        trade = self._parse_request(request)
        if trade is None:
            return None
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
            if retcode == mt5.ORDER_CHECK_OK:
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

    @_mt5_function(failure=None)
    def positions_total(self) -> int | None:
        return self._succeed(len(self._positions))

    @_mt5_function(failure=None)
    def positions_get(
        self,
        *unnamed: object,
        symbol: str | None = None,
        group: str | None = None,
        ticket: int | None = None,
    ) -> tuple[TradePosition, ...] | None:
        return self._select(self._positions.values(), self._marked_position,
                            unnamed, symbol, group, ticket)

    @_mt5_function(failure=None)
    def orders_total(self) -> int | None:
        return self._succeed(len(self._pending_orders))

    @_mt5_function(failure=None)
    def orders_get(
        self,
        *unnamed: object,
        symbol: str | None = None,
        group: str | None = None,
        ticket: int | None = None,
    ) -> tuple[TradeOrder, ...] | None:
        return self._select(self._pending_orders.values(), self._marked_order,
                            unnamed, symbol, group, ticket)

    def _select(self, items: Iterable[Any], mark: Callable[[Any], Any],
                unnamed: tuple[object, ...], symbol: str | None, group: str | None,
                ticket: int | None) -> tuple[Any, ...] | None:
        """positions_get / orders_get: the same filters over open positions or orders."""
        if not self._filters_ok(unnamed, symbol, group, ticket):
            return None
        return self._succeed(tuple(mark(item) for item in items
                                   if self._passes(item.symbol, item.ticket, symbol, group,
                                                   ticket)))

    @_mt5_function(failure=None)
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

    @_mt5_function(failure=None)
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
        bid = float(self._bids(spec, np.array([self._market_second()]))[0])
        return bid, round(bid + spec.spread_points * spec.point, spec.digits)

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
        return SymbolInfo(
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
            filling_mode=mt5.SYMBOL_FILLING_FOK | mt5.SYMBOL_FILLING_IOC,
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
        return position._replace(price_current=current, profit=profit)

    def _marked_order(self, order: TradeOrder) -> TradeOrder:
        bid, ask = self._quote(self._specs[order.symbol])
        return order._replace(price_current=ask if order.type in _BUY_TYPES else bid)

    def _floating_profit(self) -> float:
        profits = (self._marked_position(p).profit for p in self._positions.values())
        return round(sum(profits, 0.0), 2)

    # --- trade requests

    def _parse_request(self, request: object) -> TradeRequest | None:
        """The request as a TradeRequest, or None with the package's -2 error."""
        if not isinstance(request, dict):
            return self._fail(mt5.RES_E_INVALID_PARAMS, mt5.MSG_INVALID_ARGUMENTS)
        values: dict[str, Any] = {}
        for field, value in request.items():
            default = TradeRequest._field_defaults.get(field)
            if default is None:
                return self._bad_field(str(field))
            if field == "expiration":
                moment = _as_timestamp(value)
                if moment is None or moment < 0:
                    return self._bad_field(field)
                values[field] = int(moment)
            elif isinstance(default, str):
                if not isinstance(value, str):
                    return self._bad_field(field)
                values[field] = value
            elif isinstance(default, float):
                number = _as_float(value)
                if number is None:
                    return self._bad_field(field)
                values[field] = number
            else:
                if not _is_int(value) or value < 0:
                    return self._bad_field(field)
                values[field] = int(value)
        if "action" not in values:
            return self._bad_field("action")
        if len(values.get("comment", "")) > COMMENT_MAX_LENGTH:
            return self._bad_field("comment")
        needs_volume = values["action"] in (mt5.TRADE_ACTION_DEAL, mt5.TRADE_ACTION_PENDING)
        if needs_volume and "volume" not in values:
            return self._bad_field("volume")
        return TradeRequest(**values)

    def _bad_field(self, field: str) -> None:
        return self._fail(mt5.RES_E_INVALID_PARAMS, mt5.msg_invalid_request_field(field))

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
            return mt5.ORDER_CHECK_OK
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
            return mt5.ORDER_CHECK_OK
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
            return mt5.ORDER_CHECK_OK
        if trade.action == mt5.TRADE_ACTION_MODIFY:
            order = self._pending_orders.get(trade.order)
            if order is None:
                return mt5.TRADE_RETCODE_INVALID
            quote = self._quote(self._specs[order.symbol])
            if not self._pending_price_ok(order.type, trade.price, *quote):
                return mt5.TRADE_RETCODE_INVALID_PRICE
            if not self._stops_ok(order.type, trade.price, trade.sl, trade.tp):
                return mt5.TRADE_RETCODE_INVALID_STOPS
            return mt5.ORDER_CHECK_OK
        if trade.action == mt5.TRADE_ACTION_REMOVE:
            if trade.order not in self._pending_orders:
                return mt5.TRADE_RETCODE_INVALID
            return mt5.ORDER_CHECK_OK
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
        return mt5.ORDER_CHECK_OK

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
        return OrderSendResult(
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
            self._positions[trade.position] = position._replace(
                sl=trade.sl, tp=trade.tp, time_update=seconds, time_update_msc=msc
            )
            # The real answer to an SL/TP change carries no order, deal or prices.
            return self._send_result(trade, done, request_id=request_id)
        order = self._pending_orders[trade.order]
        if trade.action == mt5.TRADE_ACTION_MODIFY:
            self._pending_orders[trade.order] = order._replace(
                price_open=trade.price, sl=trade.sl, tp=trade.tp, time_expiration=trade.expiration
            )
        else:  # REMOVE: the order leaves for the history as canceled
            seconds, msc = self._stamp()
            del self._pending_orders[trade.order]
            self._history_orders.append(
                self._marked_order(order)._replace(
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
            self._positions[order_ticket] = TradePosition(
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
                self._positions[closing.ticket] = closing._replace(
                    volume=remaining, time_update=seconds, time_update_msc=msc
                )
        self._history_orders.append(
            TradeOrder(
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
            TradeDeal(
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
        self._pending_orders[ticket] = TradeOrder(
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

    def _filters_ok(
        self, unnamed: tuple[object, ...], symbol: object, group: object, ticket: object
    ) -> bool:
        if unnamed:
            return self._fail(mt5.RES_E_INVALID_PARAMS, mt5.MSG_UNNAMED_ARGUMENTS, False)
        if not (
            (symbol is None or isinstance(symbol, str))
            and (group is None or isinstance(group, str))
            and (ticket is None or _is_int(ticket))
        ):
            return self._fail(mt5.RES_E_INVALID_PARAMS, mt5.MSG_INVALID_ARGUMENTS, False)
        return True

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
