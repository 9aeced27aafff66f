"""The MetaTrader 5 terminal simulator on its own: conventions, market data, trading, faults.

Every test drives the simulator on a fake clock it advances by hand, so nothing sleeps and
every price is reproducible. docs/mt5.md maps each documented behaviour of the real
``MetaTrader5`` package to the test here that checks the simulator copies it.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.mt5 import codes as mt5
from actors.mt5.simulator import (
    COMMENT_MAX_LENGTH,
    DEFAULT_EPOCH,
    MAX_BARS,
    NO_DELAY,
    SIMULATOR_FAULTS,
    CallDelay,
    HangToken,
    TerminalSimulator,
)
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
    field_names,
    make,
)

NO_IPC = (mt5.RES_E_INTERNAL_FAIL_CONNECT, "No IPC connection")
IPC_SEND_FAILED = (mt5.RES_E_INTERNAL_FAIL_SEND, "IPC send failed")
IPC_TIMEOUT = (mt5.RES_E_INTERNAL_FAIL_TIMEOUT, "IPC timeout")
INVALID_ARGUMENTS = (mt5.RES_E_INVALID_PARAMS, "Invalid arguments")
TERMINAL_INVALID_PARAMS = (mt5.RES_E_INVALID_PARAMS, "Terminal: Invalid params")
NOT_FOUND = (mt5.RES_E_NOT_FOUND, "Terminal: Not found")
CALL_FAILED = (mt5.RES_E_FAIL, "Terminal: Call failed")
AUTH_FAILED = (mt5.RES_E_AUTH_FAILED, "Terminal: Authorization failed")

NOW = int(DEFAULT_EPOCH)  # server time when the fake clock reads 0


class FakeClock:
    """A clock the test moves by hand, in seconds (plays trio's virtual clock)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock) -> TerminalSimulator:
    return TerminalSimulator(clock=clock, seed=7, ipc_timeout_s=5.0)


@pytest.fixture
def terminal(sim: TerminalSimulator) -> TerminalSimulator:
    assert sim.initialize() is True
    return sim


def market(
    order_type: int = mt5.ORDER_TYPE_BUY, symbol: str = "EURUSD", volume: float = 0.1, **extra: Any
) -> dict[str, Any]:
    return {
        "action": mt5.TRADE_ACTION_DEAL,
        "symbol": symbol,
        "volume": volume,
        "type": order_type,
        "deviation": 20,
        "magic": 234000,
        "comment": "python script open",
        "type_time": mt5.ORDER_TIME_GTC,
        "type_filling": mt5.ORDER_FILLING_IOC,
        **extra,
    }


def close_request(position: TradePosition, volume: float | None = None) -> dict[str, Any]:
    opposite = mt5.ORDER_TYPE_SELL if position.type == mt5.POSITION_TYPE_BUY else mt5.ORDER_TYPE_BUY
    return market(
        opposite,
        position.symbol,
        position.volume if volume is None else volume,
        position=position.ticket,
        comment="python script close",
    )


# --- constants and record shapes ----------------------------------------------------------


def test_constants_have_the_packages_values() -> None:
    assert (mt5.TIMEFRAME_M1, mt5.TIMEFRAME_M30) == (1, 30)
    assert (mt5.TIMEFRAME_H1, mt5.TIMEFRAME_H4, mt5.TIMEFRAME_D1) == (16385, 16388, 16408)
    assert (mt5.TIMEFRAME_W1, mt5.TIMEFRAME_MN1) == (32769, 49153)
    assert (mt5.COPY_TICKS_ALL, mt5.COPY_TICKS_INFO, mt5.COPY_TICKS_TRADE) == (-1, 1, 2)
    assert (mt5.RES_S_OK, mt5.RES_E_FAIL, mt5.RES_E_INVALID_PARAMS) == (1, -1, -2)
    assert (mt5.RES_E_NOT_FOUND, mt5.RES_E_AUTH_FAILED, mt5.RES_E_AUTO_TRADING_DISABLED) == (
        -4,
        -6,
        -8,
    )
    assert [
        mt5.RES_E_INTERNAL_FAIL,
        mt5.RES_E_INTERNAL_FAIL_SEND,
        mt5.RES_E_INTERNAL_FAIL_RECEIVE,
        mt5.RES_E_INTERNAL_FAIL_INIT,
        mt5.RES_E_INTERNAL_FAIL_CONNECT,
        mt5.RES_E_INTERNAL_FAIL_TIMEOUT,
    ] == [-10000, -10001, -10002, -10003, -10004, -10005]
    assert (mt5.TRADE_ACTION_DEAL, mt5.TRADE_ACTION_PENDING, mt5.TRADE_ACTION_REMOVE) == (1, 5, 8)
    assert (mt5.ORDER_TYPE_SELL_STOP, mt5.ORDER_FILLING_RETURN, mt5.ORDER_TIME_DAY) == (5, 2, 1)
    assert (mt5.DEAL_ENTRY_IN, mt5.DEAL_ENTRY_OUT, mt5.POSITION_TYPE_SELL) == (0, 1, 1)
    retcodes = [
        mt5.TRADE_RETCODE_REQUOTE,
        mt5.TRADE_RETCODE_REJECT,
        mt5.TRADE_RETCODE_PLACED,
        mt5.TRADE_RETCODE_DONE,
        mt5.TRADE_RETCODE_TIMEOUT,
        mt5.TRADE_RETCODE_INVALID,
        mt5.TRADE_RETCODE_INVALID_VOLUME,
        mt5.TRADE_RETCODE_INVALID_PRICE,
        mt5.TRADE_RETCODE_MARKET_CLOSED,
        mt5.TRADE_RETCODE_NO_MONEY,
        mt5.TRADE_RETCODE_SERVER_DISABLES_AT,
        mt5.TRADE_RETCODE_CLIENT_DISABLES_AT,
        mt5.TRADE_RETCODE_CONNECTION,
    ]
    assert retcodes == [10004, 10006, 10008, 10009, 10012, 10013, 10014, 10015, 10018, 10019,
                        10026, 10027, 10031]  # fmt: skip
    assert mt5.LAST_ERROR_MESSAGE[mt5.RES_E_INTERNAL_FAIL_CONNECT] == "No IPC connection"
    assert mt5.SUCCESS == (1, "Success")


def test_named_tuples_have_the_real_fields_in_the_real_order() -> None:
    assert field_names(TradeRequest) == (
        "action", "magic", "order", "symbol", "volume", "price", "stoplimit", "sl", "tp",
        "deviation", "type", "type_filling", "type_time", "expiration", "comment", "position",
        "position_by",
    )  # fmt: skip
    assert field_names(OrderSendResult) == (
        "retcode", "deal", "order", "volume", "price", "bid", "ask", "comment", "request_id",
        "retcode_external", "request",
    )  # fmt: skip
    assert field_names(OrderCheckResult) == (
        "retcode", "balance", "equity", "profit", "margin", "margin_free", "margin_level",
        "comment", "request",
    )  # fmt: skip
    assert field_names(Tick) == (
        "time", "bid", "ask", "last", "volume", "time_msc", "flags", "volume_real",
    )  # fmt: skip
    assert field_names(TradePosition)[:6] == ("ticket", "time", "time_msc", "time_update",
                                         "time_update_msc", "type")  # fmt: skip
    assert field_names(TradePosition)[-4:] == ("profit", "symbol", "comment", "external_id")
    assert field_names(TradeDeal) == (
        "ticket", "order", "time", "time_msc", "type", "entry", "magic", "position_id", "reason",
        "volume", "price", "commission", "swap", "profit", "fee", "symbol", "comment",
        "external_id",
    )  # fmt: skip
    assert len(field_names(TradeOrder)) == 24 and field_names(TradeOrder)[9] == "state"
    assert len(field_names(AccountInfo)) == 28 and field_names(AccountInfo)[-4:] == (
        "name", "server", "currency", "company",
    )  # fmt: skip
    assert len(field_names(TerminalInfo)) == 22 and field_names(TerminalInfo)[2:5] == (
        "connected", "dlls_allowed", "trade_allowed",
    )  # fmt: skip
    assert len(field_names(SymbolInfo)) == 96
    assert field_names(SymbolInfo)[:4] == ("custom", "chart_mode", "select", "visible")
    assert field_names(SymbolInfo)[-3:] == ("name", "page", "path")


def test_arrays_have_the_packages_numpy_dtypes(terminal: TerminalSimulator) -> None:
    rates = terminal.copy_rates_from_pos("EURUSD", mt5.TIMEFRAME_M1, 0, 10)
    ticks = terminal.copy_ticks_range("EURUSD", NOW - 60, NOW, mt5.COPY_TICKS_ALL)
    assert rates.dtype == RATES_DTYPE
    assert rates.dtype.descr == [
        ("time", "<i8"), ("open", "<f8"), ("high", "<f8"), ("low", "<f8"), ("close", "<f8"),
        ("tick_volume", "<u8"), ("spread", "<i4"), ("real_volume", "<u8"),
    ]  # fmt: skip
    assert ticks.dtype == TICKS_DTYPE
    assert ticks.dtype.descr == [
        ("time", "<i8"), ("bid", "<f8"), ("ask", "<f8"), ("last", "<f8"), ("volume", "<u8"),
        ("time_msc", "<i8"), ("flags", "<u4"), ("volume_real", "<f8"),
    ]  # fmt: skip


# --- connection and error conventions -----------------------------------------------------

REQUEST = market()
CALLS_NEEDING_THE_TERMINAL: list[tuple[str, tuple[Any, ...], dict[str, Any], Any]] = [
    ("version", (), {}, None),
    ("terminal_info", (), {}, None),
    ("account_info", (), {}, None),
    ("login", (123,), {"password": "secret"}, False),
    ("symbols_total", (), {}, None),
    ("symbols_get", (), {}, None),
    ("symbol_info", ("EURUSD",), {}, None),
    ("symbol_info_tick", ("EURUSD",), {}, None),
    ("symbol_select", ("EURUSD", True), {}, False),
    ("copy_rates_from", ("EURUSD", mt5.TIMEFRAME_M1, NOW, 10), {}, None),
    ("copy_rates_from_pos", ("EURUSD", mt5.TIMEFRAME_M1, 0, 10), {}, None),
    ("copy_rates_range", ("EURUSD", mt5.TIMEFRAME_M1, NOW - 600, NOW), {}, None),
    ("copy_ticks_from", ("EURUSD", NOW - 60, 10, mt5.COPY_TICKS_ALL), {}, None),
    ("copy_ticks_range", ("EURUSD", NOW - 60, NOW, mt5.COPY_TICKS_ALL), {}, None),
    ("order_check", (REQUEST,), {}, None),
    ("order_send", (REQUEST,), {}, None),
    ("positions_total", (), {}, None),
    ("positions_get", (), {"symbol": "EURUSD"}, None),
    ("orders_total", (), {}, None),
    ("orders_get", (), {}, None),
    ("history_orders_get", (NOW - 60, NOW), {}, None),
    ("history_deals_get", (NOW - 60, NOW), {}, None),
]


@pytest.mark.parametrize(("name", "args", "kwargs", "failure"), CALLS_NEEDING_THE_TERMINAL)
def test_every_call_before_initialize_fails_with_no_ipc_connection(
    sim: TerminalSimulator, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], failure: Any
) -> None:
    assert getattr(sim, name)(*args, **kwargs) is failure
    assert sim.last_error() == NO_IPC


@pytest.mark.parametrize(("name", "args", "kwargs", "failure"), CALLS_NEEDING_THE_TERMINAL)
def test_every_call_after_shutdown_fails_with_no_ipc_connection(
    terminal: TerminalSimulator,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    failure: Any,
) -> None:
    assert terminal.shutdown() is True
    assert getattr(terminal, name)(*args, **kwargs) is failure
    assert terminal.last_error() == NO_IPC


@pytest.mark.parametrize(("name", "args", "kwargs", "failure"), CALLS_NEEDING_THE_TERMINAL)
def test_every_call_succeeds_once_initialized(
    terminal: TerminalSimulator,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    failure: Any,
) -> None:
    result = getattr(terminal, name)(*args, **kwargs)
    assert result is not None and result is not False
    assert terminal.last_error() == (1, "Success")


def test_initialize_returns_true_and_sets_success(sim: TerminalSimulator) -> None:
    assert sim.initialize("C:\\MT5\\terminal64.exe", login=1234, password="pw", server="Demo")
    assert sim.last_error() == (1, "Success")
    assert sim.account_info().login == 1234
    assert sim.account_info().server == "Demo"
    assert sim.version() == (500, 4755, "24 Jan 2025")


def test_the_password_is_not_kept_anywhere(sim: TerminalSimulator) -> None:
    sim.initialize(login=1234, password="hunter2-secret", server="Demo")
    assert "hunter2-secret" not in repr(vars(sim))


def test_last_error_belongs_to_one_simulator(clock: FakeClock) -> None:
    first = TerminalSimulator(clock=clock)
    second = TerminalSimulator(clock=clock)
    second.initialize()
    assert first.symbol_info("EURUSD") is None
    assert first.last_error() == NO_IPC
    assert second.symbol_info("EURUSD") is not None
    assert second.last_error() == (1, "Success")
    assert first.last_error() == NO_IPC


def test_last_error_is_not_reset_by_reading_it(terminal: TerminalSimulator) -> None:
    terminal.symbol_info("NOPE")
    assert terminal.last_error() == NOT_FOUND
    assert terminal.last_error() == NOT_FOUND


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda t: t.symbol_info(123), INVALID_ARGUMENTS),
        (lambda t: t.symbol_info(), INVALID_ARGUMENTS),  # wrong arity: no TypeError
        (lambda t: t.symbol_info("EURUSD", "extra"), INVALID_ARGUMENTS),
        (lambda t: t.symbol_info_tick(None), INVALID_ARGUMENTS),
        (lambda t: t.symbol_info("X" * 30), INVALID_ARGUMENTS),  # 29 characters at most
        (lambda t: t.copy_rates_from_pos("EURUSD", 12345, 0, 10), TERMINAL_INVALID_PARAMS),
        (lambda t: t.copy_rates_from_pos("EURUSD", 1, 0, 0), TERMINAL_INVALID_PARAMS),
        (lambda t: t.copy_rates_from_pos("EURUSD", 1, -1, 10), TERMINAL_INVALID_PARAMS),
        (lambda t: t.copy_rates_from_pos("EURUSD", 1, 0, MAX_BARS + 1), TERMINAL_INVALID_PARAMS),
        (lambda t: t.copy_rates_range("EURUSD", 1, "yesterday", NOW), INVALID_ARGUMENTS),
        (lambda t: t.copy_ticks_range("EURUSD", NOW - 5, NOW, 99), TERMINAL_INVALID_PARAMS),
        (lambda t: t.copy_ticks_range("EURUSD", float("nan"), NOW, -1), INVALID_ARGUMENTS),
        (lambda t: t.history_deals_get(), INVALID_ARGUMENTS),
        (lambda t: t.history_deals_get(NOW, NOW, "*EUR*"), (-2, "Unnamed arguments not allowed")),
        (lambda t: t.positions_get(ticket="1"), (-2, 'Invalid "ticket" argument')),
        (lambda t: t.symbol_select("EURUSD", "yes", 1), INVALID_ARGUMENTS),
        (lambda t: t.login("123"), (-2, "Invalid 1st unnamed argument")),
    ],
)
def test_bad_arguments_fail_with_invalid_params(
    terminal: TerminalSimulator, call: Any, expected: tuple[int, str]
) -> None:
    assert call(terminal) in (None, False)
    assert terminal.last_error() == expected


def test_positions_and_orders_refuse_unnamed_filters(terminal: TerminalSimulator) -> None:
    assert terminal.positions_get("EURUSD") is None
    assert terminal.last_error() == (-2, "Unnamed arguments not allowed")
    assert terminal.orders_get("EURUSD") is None
    assert terminal.last_error() == (-2, "Unnamed arguments not allowed")


def test_initialize_with_bad_arguments_fails(sim: TerminalSimulator) -> None:
    assert sim.initialize("path", 123) is False
    assert sim.last_error() == (-2, "Invalid number of arguments")
    assert sim.initialize(login="123") is False
    assert sim.last_error() == (-2, 'Invalid "login" argument')
    assert sim.symbol_info("EURUSD") is None  # still not attached
    assert sim.last_error() == NO_IPC


def test_unknown_symbols_are_not_found(terminal: TerminalSimulator) -> None:
    for call in (
        lambda: terminal.symbol_info("NOPE"),
        lambda: terminal.symbol_info_tick("NOPE"),
        lambda: terminal.copy_rates_from_pos("NOPE", mt5.TIMEFRAME_M1, 0, 5),
        lambda: terminal.copy_rates_range("NOPE", mt5.TIMEFRAME_M1, NOW - 300, NOW),
        lambda: terminal.copy_ticks_range("NOPE", NOW - 5, NOW, mt5.COPY_TICKS_ALL),
    ):
        assert call() is None
        assert terminal.last_error() == NOT_FOUND
    assert terminal.symbol_select("NOPE", True) is False
    assert terminal.last_error() == CALL_FAILED


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from([c[0] for c in CALLS_NEEDING_THE_TERMINAL] + ["initialize"]),
    args=st.lists(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(min_value=-(10**30), max_value=10**30),
            st.floats(allow_nan=True, allow_infinity=True),
            st.text(max_size=40),
            st.sampled_from(["EURUSD", "XAUUSD", mt5.TIMEFRAME_H1, NOW, 10]),
            st.datetimes(timezones=st.just(UTC)),
            st.dictionaries(
                st.sampled_from(list(field_names(TradeRequest)) + ["bogus"]),
                st.one_of(st.integers(-5, 10**20), st.floats(), st.text(max_size=40)),
            ),
        ),
        max_size=5,
    ),
    kwargs=st.dictionaries(
        st.sampled_from(["symbol", "group", "ticket", "position", "login", "password", "nope"]),
        st.one_of(st.none(), st.integers(), st.text(max_size=10)),
        max_size=3,
    ),
)
def test_no_call_ever_raises(name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Only the exceptions the package raises: TypeError for keywords to a function that
    takes none, SystemError (from the argument parser's TypeError/OverflowError) with -2."""
    clock = FakeClock()
    terminal = TerminalSimulator(clock=clock, history_days=1)
    terminal.initialize()
    clock.advance(120)
    try:
        getattr(terminal, name)(*args, **kwargs)
    except TypeError as error:
        assert "takes no" in str(error)  # noqa: PT017
        return
    except SystemError as error:
        assert isinstance(error.__cause__, TypeError | OverflowError)  # noqa: PT017
        assert terminal.last_error()[0] == mt5.RES_E_INVALID_PARAMS
        return
    code, message = terminal.last_error()
    assert code in mt5.LAST_ERROR_MESSAGE and message


# --- symbols and prices -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("symbol", "digits", "point", "contract", "base", "profit"),
    [
        ("EURUSD", 5, 1e-05, 100_000.0, "EUR", "USD"),
        ("GBPUSD", 5, 1e-05, 100_000.0, "GBP", "USD"),
        ("USDJPY", 3, 0.001, 100_000.0, "USD", "JPY"),
        ("XAUUSD", 2, 0.01, 100.0, "XAU", "USD"),
    ],
)
def test_symbol_info_describes_the_instrument(
    terminal: TerminalSimulator,
    symbol: str,
    digits: int,
    point: float,
    contract: float,
    base: str,
    profit: str,
) -> None:
    info = terminal.symbol_info(symbol)
    assert isinstance(info, SymbolInfo)
    assert (info.name, info.digits, info.point, info.trade_contract_size) == (
        symbol, digits, point, contract,
    )  # fmt: skip
    assert (info.currency_base, info.currency_profit) == (base, profit)
    assert (info.volume_min, info.volume_step) == (0.01, 0.01) and info.volume_max > 1
    assert info.visible and info.select and info.trade_mode == mt5.SYMBOL_TRADE_MODE_FULL
    assert info.ask == pytest.approx(info.bid + info.spread * info.point)
    assert info.bidlow <= info.bid <= info.bidhigh
    assert round(info.bid, digits) == info.bid
    tick = terminal.symbol_info_tick(symbol)
    assert (tick.bid, tick.ask, tick.time) == (info.bid, info.ask, info.time)


def test_symbol_tick_is_the_current_second(terminal: TerminalSimulator, clock: FakeClock) -> None:
    clock.advance(12.7)
    tick = terminal.symbol_info_tick("EURUSD")
    assert tick.time == NOW + 12
    assert tick.time_msc == tick.time * 1000
    assert tick.flags == mt5.TICK_FLAG_BID | mt5.TICK_FLAG_ASK
    assert (tick.last, tick.volume, tick.volume_real) == (0.0, 0, 0.0)


def test_symbols_get_filters_with_group_masks(terminal: TerminalSimulator) -> None:
    assert terminal.symbols_total() == 4
    assert [s.name for s in terminal.symbols_get()] == ["EURUSD", "GBPUSD", "USDJPY", "XAUUSD"]
    assert [s.name for s in terminal.symbols_get("*USD*,!*JPY*,!XAU*")] == ["EURUSD", "GBPUSD"]
    assert [s.name for s in terminal.symbols_get(group="EUR*")] == ["EURUSD"]


def test_symbol_select_adds_and_removes_from_market_watch(terminal: TerminalSimulator) -> None:
    assert terminal.symbol_select("GBPUSD", False) is True
    assert terminal.symbol_info("GBPUSD").visible is False
    assert terminal.symbol_select("GBPUSD") is True  # enable defaults to selecting
    assert terminal.symbol_info("GBPUSD").visible is True
    terminal.order_send(market(symbol="GBPUSD"))
    assert terminal.symbol_select("GBPUSD", False) is False  # it has an open position
    assert terminal.last_error() == CALL_FAILED


def test_same_seed_gives_the_same_prices_and_another_seed_does_not(clock: FakeClock) -> None:
    def history(seed: int) -> np.ndarray:
        terminal = TerminalSimulator(clock=clock, seed=seed)
        terminal.initialize()
        return terminal.copy_rates_from_pos("XAUUSD", mt5.TIMEFRAME_M5, 0, 500)

    clock.advance(3 * 3600)
    assert np.array_equal(history(11), history(11))
    assert not np.array_equal(history(11), history(12))


def test_prices_move_with_the_clock_like_a_random_walk(clock: FakeClock) -> None:
    terminal = TerminalSimulator(clock=clock, seed=3)
    terminal.initialize()
    closes = terminal.copy_rates_from_pos("EURUSD", mt5.TIMEFRAME_M1, 0, 20_000)["close"]
    minute_returns = np.diff(np.log(closes))
    assert 0.5e-4 < minute_returns.std() < 2e-4  # about the symbol's 1e-4 per minute
    hour_returns = np.diff(np.log(closes[::60]))
    assert 3e-4 < hour_returns.std() < 1.6e-3  # spreads like sqrt(time): ~7.7e-4 per hour
    first = terminal.symbol_info_tick("EURUSD").bid
    clock.advance(600)
    assert terminal.symbol_info_tick("EURUSD").bid != first


# --- bars and ticks -----------------------------------------------------------------------


def test_copy_rates_from_pos_counts_back_from_the_forming_bar(
    terminal: TerminalSimulator, clock: FakeClock
) -> None:
    clock.advance(3 * 3600 + 125)
    rates = terminal.copy_rates_from_pos("EURUSD", mt5.TIMEFRAME_M15, 0, 8)
    assert len(rates) == 8
    assert list(np.diff(rates["time"])) == [900] * 7  # oldest first
    assert rates["time"][-1] == NOW + 3 * 3600  # the bar now forming
    assert rates["close"][-1] == terminal.symbol_info_tick("EURUSD").bid
    assert rates["tick_volume"][-1] == 126  # seconds 0..125 of the bar
    shifted = terminal.copy_rates_from_pos("EURUSD", mt5.TIMEFRAME_M15, 2, 6)
    assert np.array_equal(shifted, rates[:6])
    assert np.all(rates["high"] >= np.maximum(rates["open"], rates["close"]))
    assert np.all(rates["low"] <= np.minimum(rates["open"], rates["close"]))
    assert np.all(rates["spread"] == 10) and np.all(rates["real_volume"] == 0)


def test_minute_bars_are_exact_aggregates_of_the_ticks(
    terminal: TerminalSimulator, clock: FakeClock
) -> None:
    clock.advance(3600 + 30)
    bars = terminal.copy_rates_range("USDJPY", mt5.TIMEFRAME_M1, NOW, NOW + 3600)
    ticks = terminal.copy_ticks_range("USDJPY", NOW, NOW + 3600 + 59, mt5.COPY_TICKS_ALL)
    assert len(bars) == 61
    for bar in bars:
        inside = ticks[(ticks["time"] >= bar["time"]) & (ticks["time"] < bar["time"] + 60)]
        assert bar["open"] == inside["bid"][0] and bar["close"] == inside["bid"][-1]
        assert bar["high"] == inside["bid"].max() and bar["low"] == inside["bid"].min()
        assert bar["tick_volume"] == len(inside)


def test_longer_bars_are_exact_aggregates_of_minute_bars(
    terminal: TerminalSimulator, clock: FakeClock
) -> None:
    clock.advance(5 * 3600)
    hours = terminal.copy_rates_range("GBPUSD", mt5.TIMEFRAME_H1, NOW, NOW + 4 * 3600)
    minutes = terminal.copy_rates_range("GBPUSD", mt5.TIMEFRAME_M1, NOW, NOW + 5 * 3600 - 1)
    assert len(hours) == 5
    for hour in hours:
        inside = minutes[
            (minutes["time"] >= hour["time"]) & (minutes["time"] < hour["time"] + 3600)
        ]
        assert len(inside) == 60
        assert hour["open"] == inside["open"][0] and hour["close"] == inside["close"][-1]
        assert hour["high"] == inside["high"].max() and hour["low"] == inside["low"].min()
        assert hour["tick_volume"] == inside["tick_volume"].sum() == 3600


def test_copy_rates_range_includes_both_ends(terminal: TerminalSimulator, clock: FakeClock) -> None:
    clock.advance(7200)
    rates = terminal.copy_rates_range("EURUSD", mt5.TIMEFRAME_M5, NOW + 600, NOW + 1200)
    assert list(rates["time"]) == [NOW + 600, NOW + 900, NOW + 1200]
    as_datetimes = terminal.copy_rates_range(
        "EURUSD",
        mt5.TIMEFRAME_M5,
        datetime.fromtimestamp(NOW + 600, UTC),
        datetime.fromtimestamp(NOW + 1200, UTC).replace(tzinfo=None),  # naive means UTC
    )
    assert np.array_equal(rates, as_datetimes)
    future = terminal.copy_rates_range("EURUSD", mt5.TIMEFRAME_M5, NOW + 10**6, NOW + 2 * 10**6)
    assert len(future) == 0 and terminal.last_error() == (1, "Success")


def test_copy_rates_from_ends_at_the_bar_holding_the_date(
    terminal: TerminalSimulator, clock: FakeClock
) -> None:
    clock.advance(7200)
    rates = terminal.copy_rates_from("EURUSD", mt5.TIMEFRAME_M30, NOW + 3000, 3)
    assert list(rates["time"]) == [NOW - 1800, NOW, NOW + 1800]  # NOW + 1800 holds NOW + 3000
    later = terminal.copy_rates_from("EURUSD", mt5.TIMEFRAME_M30, NOW + 10**6, 2)
    assert list(later["time"]) == [NOW + 5400, NOW + 7200]  # ends at the forming bar


def test_history_has_a_beginning(clock: FakeClock) -> None:
    terminal = TerminalSimulator(clock=clock, history_days=2)
    terminal.initialize()
    days = terminal.copy_rates_from_pos("EURUSD", mt5.TIMEFRAME_D1, 0, 50)
    assert len(days) == 3  # two days of history and today
    assert terminal.copy_rates_from_pos("EURUSD", mt5.TIMEFRAME_D1, 10, 5) is None
    assert terminal.last_error() == CALL_FAILED
    assert terminal.copy_rates_from("EURUSD", mt5.TIMEFRAME_D1, NOW - 30 * 86400, 5) is None
    assert terminal.last_error() == CALL_FAILED


def test_calendar_bars_open_on_day_week_and_month_boundaries(
    terminal: TerminalSimulator, clock: FakeClock
) -> None:
    clock.advance(3 * 86400 + 5000)
    for timeframe, check in (
        (mt5.TIMEFRAME_D1, lambda d: (d.hour, d.minute) == (0, 0)),
        (mt5.TIMEFRAME_H4, lambda d: d.hour % 4 == 0 and d.minute == 0),
        (mt5.TIMEFRAME_W1, lambda d: d.weekday() == 6 and d.hour == 0),  # Sunday
        (mt5.TIMEFRAME_MN1, lambda d: (d.day, d.hour) == (1, 0)),
    ):
        rates = terminal.copy_rates_from_pos("EURUSD", timeframe, 0, 5)
        assert len(rates) >= 2
        assert all(check(datetime.fromtimestamp(int(t), UTC)) for t in rates["time"])


def test_copy_ticks_range_gives_the_ticks_in_range(
    terminal: TerminalSimulator, clock: FakeClock
) -> None:
    clock.advance(100)
    ticks = terminal.copy_ticks_range("XAUUSD", NOW + 10, NOW + 40, mt5.COPY_TICKS_ALL)
    assert list(ticks["time"]) == list(range(NOW + 10, NOW + 41))
    assert np.array_equal(ticks["time_msc"], ticks["time"] * 1000)
    assert np.allclose(ticks["ask"] - ticks["bid"], 0.25)
    assert np.all(ticks["flags"] == mt5.TICK_FLAG_BID | mt5.TICK_FLAG_ASK)
    info = terminal.copy_ticks_range("XAUUSD", NOW + 10, NOW + 40, mt5.COPY_TICKS_INFO)
    assert np.array_equal(ticks, info)
    trade = terminal.copy_ticks_range("XAUUSD", NOW + 10, NOW + 40, mt5.COPY_TICKS_TRADE)
    assert len(trade) == 0  # forex-style quotes have no trade ticks
    latest = terminal.copy_ticks_range("XAUUSD", NOW, NOW + 10**6, mt5.COPY_TICKS_ALL)
    assert latest["time"][-1] == NOW + 100  # nothing from the future
    assert latest["bid"][-1] == terminal.symbol_info_tick("XAUUSD").bid
    from_ = terminal.copy_ticks_from("XAUUSD", NOW + 10, 5, mt5.COPY_TICKS_ALL)
    assert np.array_equal(from_, ticks[:5])


# --- trading ------------------------------------------------------------------------------


def test_market_buy_fills_at_ask_and_opens_a_position(terminal: TerminalSimulator) -> None:
    tick = terminal.symbol_info_tick("EURUSD")
    result = terminal.order_send(market(comment="bot-7f3a", magic=42))
    assert terminal.last_error() == (1, "Success")
    assert isinstance(result, OrderSendResult)
    assert result.retcode == mt5.TRADE_RETCODE_DONE and result.comment == "Request executed"
    assert result.price == result.ask == tick.ask and result.bid == tick.bid
    assert result.volume == 0.1
    assert result.deal > 0 and result.order > 0 and result.request_id == 1
    assert result.request == make(TradeRequest, **market(comment="bot-7f3a", magic=42))
    (position,) = terminal.positions_get()
    assert position.ticket == position.identifier == result.order
    assert (position.type, position.volume, position.price_open) == (0, 0.1, tick.ask)
    assert (position.magic, position.comment) == (42, "bot-7f3a")
    assert position.reason == mt5.POSITION_REASON_EXPERT
    (deal,) = terminal.history_deals_get(ticket=result.order)
    assert (deal.ticket, deal.order, deal.position_id) == (result.deal, result.order, result.order)
    assert (deal.type, deal.entry, deal.price) == (mt5.DEAL_TYPE_BUY, mt5.DEAL_ENTRY_IN, tick.ask)
    assert (deal.magic, deal.comment) == (42, "bot-7f3a")
    (order,) = terminal.history_orders_get(ticket=result.order)
    assert (order.state, order.position_id) == (mt5.ORDER_STATE_FILLED, result.order)
    assert terminal.orders_sent_count == 1


def test_market_sell_fills_at_bid(terminal: TerminalSimulator) -> None:
    tick = terminal.symbol_info_tick("USDJPY")
    result = terminal.order_send(market(mt5.ORDER_TYPE_SELL, "USDJPY", 0.2))
    assert result.price == tick.bid
    assert terminal.positions_get(symbol="USDJPY")[0].type == mt5.POSITION_TYPE_SELL


def test_closing_by_position_ticket_realizes_the_profit(
    terminal: TerminalSimulator, clock: FakeClock
) -> None:
    terminal.order_send(market(volume=0.5))
    (position,) = terminal.positions_get()
    clock.advance(4 * 3600)
    bid = terminal.symbol_info_tick("EURUSD").bid
    marked = terminal.positions_get(ticket=position.ticket)[0]
    expected = round((bid - position.price_open) * 0.5 * 100_000, 2)
    assert (marked.price_current, marked.profit) == (bid, expected)
    assert terminal.account_info().equity == round(10_000 + expected, 2)
    result = terminal.order_send(close_request(position))
    assert result.retcode == mt5.TRADE_RETCODE_DONE and result.price == bid
    assert terminal.positions_get() == ()
    opening, closing = terminal.history_deals_get(position=position.ticket)
    assert (opening.entry, closing.entry) == (mt5.DEAL_ENTRY_IN, mt5.DEAL_ENTRY_OUT)
    assert (closing.type, closing.profit, closing.comment) == (
        mt5.DEAL_TYPE_SELL, expected, "python script close",
    )  # fmt: skip
    assert terminal.account_info().balance == round(10_000 + expected, 2)
    assert terminal.orders_sent_count == 2


def test_partial_close_reduces_the_position(terminal: TerminalSimulator) -> None:
    terminal.order_send(market(mt5.ORDER_TYPE_SELL, volume=0.3))
    (position,) = terminal.positions_get()
    assert terminal.order_send(close_request(position, 0.1)).retcode == mt5.TRADE_RETCODE_DONE
    assert terminal.positions_get()[0].volume == pytest.approx(0.2)


def test_profit_in_another_currency_is_converted_to_the_account_currency(
    terminal: TerminalSimulator, clock: FakeClock
) -> None:
    terminal.order_send(market(symbol="USDJPY", volume=1.0))
    clock.advance(7200)
    position = terminal.positions_get()[0]
    in_yen = (position.price_current - position.price_open) * 100_000
    assert position.profit == round(in_yen / terminal.symbol_info_tick("USDJPY").bid, 2)


@pytest.mark.parametrize(
    ("request_change", "retcode"),
    [
        ({"position": 999}, mt5.TRADE_RETCODE_POSITION_CLOSED),
        ({"volume": 5.0}, mt5.TRADE_RETCODE_INVALID_CLOSE_VOLUME),
        ({"type": mt5.ORDER_TYPE_BUY}, mt5.TRADE_RETCODE_INVALID),  # same direction
        ({"symbol": "GBPUSD"}, mt5.TRADE_RETCODE_INVALID),
    ],
)
def test_bad_close_requests_are_refused(
    terminal: TerminalSimulator, request_change: dict[str, Any], retcode: int
) -> None:
    terminal.order_send(market(volume=1.0))
    (position,) = terminal.positions_get()
    result = terminal.order_send({**close_request(position), **request_change})
    assert result.retcode == retcode
    assert (result.deal, result.order) == (0, 0)
    assert terminal.positions_get()[0].volume == 1.0


def test_order_check_answers_zero_done_and_executes_nothing(terminal: TerminalSimulator) -> None:
    result = terminal.order_check(market(symbol="USDJPY", volume=1.0))
    assert isinstance(result, OrderCheckResult)
    assert (result.retcode, result.comment) == (0, "Done")
    assert result.margin == 1000.0  # 1 lot of USDJPY at 1:100 is 1000 USD
    assert (result.balance, result.equity) == (10_000.0, 10_000.0)
    assert result.margin_free == 9000.0 and result.margin_level == 1000.0
    assert result.request.symbol == "USDJPY"
    assert terminal.positions_get() == () and terminal.orders_sent_count == 0


@pytest.mark.parametrize("volume", [0.0, 0.001, 0.015, 501.0, -1.0])
def test_bad_volumes_are_refused_by_check_and_send(
    terminal: TerminalSimulator, volume: float
) -> None:
    check = terminal.order_check(market(volume=volume))
    assert (check.retcode, check.comment) == (mt5.TRADE_RETCODE_INVALID_VOLUME, "Invalid volume")
    sent = terminal.order_send(market(volume=volume))
    assert sent.retcode == mt5.TRADE_RETCODE_INVALID_VOLUME and sent.request_id == 1
    assert terminal.positions_get() == () and terminal.deals == ()
    assert terminal.orders_sent_count == 0


def test_orders_beyond_the_free_margin_get_no_money(terminal: TerminalSimulator) -> None:
    result = terminal.order_send(market(volume=100.0))  # ~1.1 million USD of margin
    assert (result.retcode, result.comment) == (mt5.TRADE_RETCODE_NO_MONEY, "No money")


def test_stops_on_the_wrong_side_are_invalid(terminal: TerminalSimulator) -> None:
    bid = terminal.symbol_info_tick("EURUSD").bid
    assert terminal.order_send(market(sl=bid + 0.001)).retcode == mt5.TRADE_RETCODE_INVALID_STOPS
    ok = terminal.order_send(market(sl=bid - 0.001, tp=bid + 0.002))
    assert ok.retcode == mt5.TRADE_RETCODE_DONE
    assert terminal.positions_get()[0].sl == pytest.approx(bid - 0.001)


def test_unknown_symbols_and_actions_are_invalid_requests(terminal: TerminalSimulator) -> None:
    assert terminal.order_send(market(symbol="NOPE")).retcode == mt5.TRADE_RETCODE_INVALID
    assert terminal.order_send({"action": 99}).retcode == mt5.TRADE_RETCODE_INVALID
    close_by = {"action": mt5.TRADE_ACTION_CLOSE_BY, "position": 1, "position_by": 2}
    assert terminal.order_send(close_by).retcode == mt5.TRADE_RETCODE_INVALID


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ("not a dict", "Invalid arguments"),
        ({**market(), "action": "deal"}, 'Invalid "action" argument'),
        ({**market(), "volume": 1}, 'Invalid "volume" argument'),  # an int volume is refused
        ({**market(), "volume": "0.1"}, 'Invalid "volume" argument'),
        ({**market(), "magic": "7"}, 'Invalid "magic" argument'),
        ({**market(), "price": 1}, 'Invalid "price" argument'),
        ({**market(), "sl": 0}, 'Invalid "sl" argument'),
        ({**market(), "expiration": datetime(2030, 1, 1, tzinfo=UTC)},
         'Invalid "expiration" argument'),
        ({**market(), "comment": "x" * (COMMENT_MAX_LENGTH + 1)}, 'Invalid "comment" argument'),
    ],
)
def test_malformed_requests_fail_before_reaching_the_server(
    terminal: TerminalSimulator, request_: Any, message: str
) -> None:
    assert terminal.order_send(request_) is None
    assert terminal.last_error() == (-2, message)
    assert terminal.order_check(request_) is None
    assert terminal.last_error() == (-2, message)
    assert terminal.deals == () and terminal.orders_sent_count == 0


def test_a_31_character_comment_is_kept_whole(terminal: TerminalSimulator) -> None:
    comment = "c" * COMMENT_MAX_LENGTH
    terminal.order_send(market(comment=comment))
    assert terminal.positions_get()[0].comment == comment
    assert terminal.deals[0].comment == comment


def test_pending_orders_wait_in_orders_get_and_can_be_removed(terminal: TerminalSimulator) -> None:
    ask = terminal.symbol_info_tick("EURUSD").ask
    limit = {
        "action": mt5.TRADE_ACTION_PENDING,
        "symbol": "EURUSD",
        "volume": 0.2,
        "type": mt5.ORDER_TYPE_BUY_LIMIT,
        "price": round(ask - 0.005, 5),
        "magic": 9,
        "comment": "limit order",
    }
    result = terminal.order_send(limit)
    assert result.retcode == mt5.TRADE_RETCODE_DONE
    assert (result.deal, result.price, result.volume) == (0, 0.0, 0.2) and result.order > 0
    (order,) = terminal.orders_get(symbol="EURUSD")
    assert (order.ticket, order.state, order.type) == (result.order, mt5.ORDER_STATE_PLACED, 2)
    assert (order.price_open, order.magic, order.comment) == (limit["price"], 9, "limit order")
    assert terminal.orders_total() == 1 and terminal.positions_get() == ()
    assert [o.ticket for o in terminal.pending_orders] == [order.ticket]

    moved = {
        "action": mt5.TRADE_ACTION_MODIFY,
        "order": order.ticket,
        "price": round(ask - 0.006, 5),
    }
    assert terminal.order_send(moved).retcode == mt5.TRADE_RETCODE_DONE
    assert terminal.orders_get(ticket=order.ticket)[0].price_open == moved["price"]

    removal = {"action": mt5.TRADE_ACTION_REMOVE, "order": order.ticket}
    assert terminal.order_send(removal).retcode == mt5.TRADE_RETCODE_DONE
    assert terminal.orders_get() == ()
    (history,) = terminal.history_orders_get(ticket=order.ticket)
    assert history.state == mt5.ORDER_STATE_CANCELED
    assert terminal.order_send(removal).retcode == mt5.TRADE_RETCODE_INVALID


@pytest.mark.parametrize(
    ("order_type", "offset"),
    [
        (mt5.ORDER_TYPE_BUY_LIMIT, +0.01),  # a buy limit must be below the ask
        (mt5.ORDER_TYPE_SELL_LIMIT, -0.01),
        (mt5.ORDER_TYPE_BUY_STOP, -0.01),
        (mt5.ORDER_TYPE_SELL_STOP, +0.01),
    ],
)
def test_pending_prices_on_the_wrong_side_are_invalid(
    terminal: TerminalSimulator, order_type: int, offset: float
) -> None:
    bid = terminal.symbol_info_tick("EURUSD").bid
    request = {
        "action": mt5.TRADE_ACTION_PENDING,
        "symbol": "EURUSD",
        "volume": 0.1,
        "type": order_type,
        "price": round(bid + offset, 5),
    }
    result = terminal.order_send(request)
    assert (result.retcode, result.comment) == (mt5.TRADE_RETCODE_INVALID_PRICE, "Invalid price")
    assert terminal.orders_get() == ()


def test_sltp_changes_stops_of_an_open_position(terminal: TerminalSimulator) -> None:
    terminal.order_send(market())
    (position,) = terminal.positions_get()
    bid = terminal.symbol_info_tick("EURUSD").bid
    change = {
        "action": mt5.TRADE_ACTION_SLTP,
        "position": position.ticket,
        "sl": round(bid - 0.002, 5),
        "tp": round(bid + 0.003, 5),
    }
    result = terminal.order_send(change)
    assert result.retcode == mt5.TRADE_RETCODE_DONE
    assert (result.deal, result.order, result.price) == (0, 0, 0.0)
    updated = terminal.positions_get()[0]
    assert (updated.sl, updated.tp) == (change["sl"], change["tp"])
    assert terminal.order_send(change).retcode == mt5.TRADE_RETCODE_NO_CHANGES


def test_positions_get_filters_by_symbol_group_and_ticket(terminal: TerminalSimulator) -> None:
    euro = terminal.order_send(market(symbol="EURUSD")).order
    gold = terminal.order_send(market(symbol="XAUUSD")).order
    assert terminal.positions_total() == 2
    assert [p.ticket for p in terminal.positions_get(symbol="XAUUSD")] == [gold]
    assert [p.ticket for p in terminal.positions_get(group="*USD*,!XAU*")] == [euro]
    assert [p.ticket for p in terminal.positions_get(ticket=gold)] == [gold]
    assert terminal.positions_get(ticket=12345) == ()
    # The docs: with symbol= given, ticket= is ignored.
    assert [p.ticket for p in terminal.positions_get(symbol="EURUSD", ticket=gold)] == [euro]


def test_history_deals_get_selects_by_dates_and_group(
    terminal: TerminalSimulator, clock: FakeClock
) -> None:
    terminal.order_send(market(symbol="EURUSD"))
    clock.advance(3600)
    terminal.order_send(market(symbol="XAUUSD"))
    everything = terminal.history_deals_get(NOW - 10, NOW + 7200)
    assert [d.symbol for d in everything] == ["EURUSD", "XAUUSD"]
    assert [d.symbol for d in terminal.history_deals_get(NOW + 60, NOW + 7200)] == ["XAUUSD"]
    dated = terminal.history_deals_get(
        datetime.fromtimestamp(NOW - 10, UTC), datetime.fromtimestamp(NOW + 7200, UTC), group="EUR*"
    )
    assert [d.symbol for d in dated] == ["EURUSD"]
    assert terminal.history_deals_get(NOW + 8000, NOW + 9000) == ()
    assert terminal.last_error() == (1, "Success")
    assert len(terminal.history_orders_get(NOW - 10, NOW + 7200, group="*")) == 2


def test_account_info_tracks_margin_and_equity(terminal: TerminalSimulator) -> None:
    before = terminal.account_info()
    assert (before.balance, before.equity, before.margin, before.margin_level) == (
        10_000.0, 10_000.0, 0.0, 0.0,
    )  # fmt: skip
    assert before.margin_mode == mt5.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING
    terminal.order_send(market(symbol="USDJPY", volume=0.5))
    after = terminal.account_info()
    assert after.margin == 500.0
    assert after.equity == round(after.balance + after.profit, 2)
    assert after.margin_free == round(after.equity - after.margin, 2)


# --- the worker protocol: before_call, CallDelay, HangToken --------------------------------


def test_a_healthy_terminal_asks_for_no_delay(terminal: TerminalSimulator) -> None:
    assert terminal.before_call("symbol_info_tick") == NO_DELAY == CallDelay(0.0, None)


def test_local_calls_and_calls_without_a_pipe_are_never_delayed(sim: TerminalSimulator) -> None:
    sim.inject("slow", delay_s=2.0)
    sim.inject("hang")
    assert sim.before_call("symbol_info_tick") == NO_DELAY  # not attached: fails locally
    delay = sim.before_call("initialize")
    assert delay.seconds == 2.0 and delay.hang is not None  # attaching talks to the terminal
    assert sim.before_call("last_error") == NO_DELAY
    assert sim.before_call("shutdown") == NO_DELAY


def test_hang_token_listeners_run_once_on_release(terminal: TerminalSimulator) -> None:
    terminal.inject("hang")
    token = terminal.before_call("account_info").hang
    assert isinstance(token, HangToken) and not token.released
    assert terminal.before_call("order_send").hang is token  # one hang, one token
    calls: list[str] = []
    token.add_listener(lambda: calls.append("first"))
    terminal.release_hang()
    assert token.released and calls == ["first"]
    token.add_listener(lambda: calls.append("late"))  # already released: runs at once
    assert calls == ["first", "late"]
    terminal.release_hang()  # a second release is harmless
    assert calls == ["first", "late"]
    assert terminal.before_call("account_info") == NO_DELAY
    assert terminal.account_info() is not None


def test_a_listener_runs_in_the_thread_that_releases(terminal: TerminalSimulator) -> None:
    terminal.inject("hang")
    token = terminal.before_call("account_info").hang
    ran_in: list[int] = []
    token.add_listener(lambda: ran_in.append(threading.get_ident()))
    releaser = threading.Thread(target=terminal.release_hang)
    releaser.start()
    releaser.join(timeout=5)
    assert ran_in == [releaser.ident]


def test_a_thread_worker_waits_for_the_hang_then_calls(terminal: TerminalSimulator) -> None:
    terminal.inject("hang")
    waiting = threading.Event()
    results: list[Any] = []

    def worker() -> None:
        delay = terminal.before_call("symbol_info_tick")
        waiting.set()
        assert delay.hang is not None and delay.hang.wait(timeout=5)
        results.append(terminal.symbol_info_tick("EURUSD"))

    thread = threading.Thread(target=worker)
    thread.start()
    assert waiting.wait(timeout=5)
    assert results == []
    terminal.inject("clear")  # clear releases the hang too
    thread.join(timeout=5)
    assert len(results) == 1 and isinstance(results[0], Tick)


def test_a_hang_with_a_duration_is_a_long_call(
    terminal: TerminalSimulator, clock: FakeClock
) -> None:
    terminal.inject("hang", duration_s=30)
    clock.advance(10)
    assert terminal.before_call("positions_get") == CallDelay(seconds=20.0, hang=None)
    clock.advance(20)
    assert terminal.before_call("positions_get") == NO_DELAY
    assert "hang" not in terminal.faults


# --- faults -------------------------------------------------------------------------------


def test_terminal_crash_breaks_the_pipe_until_the_terminal_is_back_and_reattached(
    terminal: TerminalSimulator, clock: FakeClock
) -> None:
    terminal.inject("terminal_crash", duration_s=30)
    assert terminal.faults == {"terminal_crash"}
    assert terminal.before_call("symbol_info_tick") == NO_DELAY  # a dead terminal fails fast
    assert terminal.symbol_info_tick("EURUSD") is None
    assert terminal.last_error() == IPC_SEND_FAILED
    assert terminal.before_call("initialize") == NO_DELAY
    assert terminal.initialize() is False
    assert terminal.last_error() == (
        -10003, "IPC initialize failed, Process create failed "
        "'C:\\Program Files\\MetaTrader 5\\terminal64.exe'")
    assert terminal.account_info() is None
    assert terminal.last_error() == NO_IPC  # the failed initialize left no pipe at all
    clock.advance(30)
    assert terminal.faults == frozenset()
    assert terminal.initialize() is True
    assert terminal.symbol_info_tick("EURUSD") is not None


def test_a_broken_pipe_stays_broken_after_the_terminal_returns(
    terminal: TerminalSimulator, clock: FakeClock
) -> None:
    terminal.order_send(market())
    terminal.inject("terminal_crash", duration_s=5)
    clock.advance(6)
    assert terminal.positions_get() is None
    assert terminal.last_error() == IPC_SEND_FAILED  # only initialize() mends the pipe
    terminal.shutdown()
    assert terminal.positions_get() is None and terminal.last_error() == NO_IPC
    assert terminal.initialize() is True
    assert len(terminal.positions_get()) == 1  # the account survived the crash


def test_clear_brings_a_crashed_terminal_back(terminal: TerminalSimulator) -> None:
    terminal.inject("terminal_crash")
    assert terminal.initialize() is False
    terminal.inject("clear")
    assert terminal.initialize() is True and terminal.account_info() is not None


def test_a_crash_ends_a_hang(terminal: TerminalSimulator) -> None:
    terminal.inject("hang")
    token = terminal.before_call("account_info").hang
    terminal.inject("terminal_crash")
    assert token.released
    assert terminal.account_info() is None and terminal.last_error() == IPC_SEND_FAILED


def test_ipc_timeout_delays_calls_then_fails_them(
    terminal: TerminalSimulator, clock: FakeClock
) -> None:
    terminal.inject("ipc_timeout", duration_s=2)
    assert terminal.before_call("account_info") == CallDelay(seconds=5.0)
    clock.advance(5)  # the worker waited; meanwhile the fault healed
    assert terminal.account_info() is None
    assert terminal.last_error() == IPC_TIMEOUT  # a call that timed out stays timed out
    assert terminal.before_call("account_info") == NO_DELAY
    assert terminal.account_info() is not None


def test_ipc_timeout_also_fails_initialize(sim: TerminalSimulator) -> None:
    sim.inject("ipc_timeout")
    assert sim.before_call("initialize").seconds == 5.0
    assert sim.initialize() is False and sim.last_error() == IPC_TIMEOUT
    sim.inject("clear")
    assert sim.initialize() is True


def test_broker_disconnect_keeps_ipc_but_stops_trading_and_quotes(
    terminal: TerminalSimulator, clock: FakeClock
) -> None:
    clock.advance(50)
    terminal.inject("broker_disconnect")  # heals by itself after 10 s by default
    frozen = terminal.symbol_info_tick("EURUSD")
    assert terminal.terminal_info().connected is False
    assert terminal.last_error() == (1, "Success")
    result = terminal.order_send(market())
    assert result.retcode == mt5.TRADE_RETCODE_CONNECTION and result.request_id == 0
    assert result.comment == "Request rejected due to absence of network connection"
    assert terminal.order_check(market()).retcode == mt5.TRADE_RETCODE_CONNECTION
    clock.advance(5)
    assert terminal.symbol_info_tick("EURUSD") == frozen  # stale quotes
    assert terminal.copy_rates_from_pos("EURUSD", mt5.TIMEFRAME_M1, 0, 1)["time"][0] <= frozen.time
    clock.advance(5)
    assert terminal.terminal_info().connected is True
    assert terminal.symbol_info_tick("EURUSD").time == NOW + 60
    assert terminal.order_send(market()).retcode == mt5.TRADE_RETCODE_DONE


def test_auth_failure_refuses_credentials_until_it_heals(
    sim: TerminalSimulator, clock: FakeClock
) -> None:
    sim.inject("auth_failure", duration_s=60)
    assert sim.initialize(login=777, password="pw", server="Demo") is False
    assert sim.last_error() == AUTH_FAILED
    assert sim.initialize() is True  # attaching without credentials still works
    assert sim.login(777, password="pw") is False
    assert sim.last_error() == AUTH_FAILED
    clock.advance(60)
    assert sim.login(777, password="pw", server="Demo") is True
    assert sim.account_info().login == 777


def test_autotrading_off_refuses_orders_in_the_terminal(terminal: TerminalSimulator) -> None:
    terminal.inject("autotrading_off")
    assert terminal.terminal_info().trade_allowed is False
    check = terminal.order_check(market())
    assert (check.retcode, check.comment) == (10027, "AutoTrading disabled by client")
    sent = terminal.order_send(market())
    assert (sent.retcode, sent.comment) == (10027, "AutoTrading disabled by client")
    assert terminal.positions_get() == () and terminal.orders_sent_count == 0
    terminal.inject("clear")
    assert terminal.terminal_info().trade_allowed is True


@pytest.mark.parametrize("retcode", [10004, 10006, 10018])
def test_market_retcode_answers_the_next_sends_without_executing(
    terminal: TerminalSimulator, retcode: int
) -> None:
    terminal.inject("market_retcode", retcode=retcode, count=2)
    assert terminal.order_check(market()).retcode == 0  # checking does not reach the market
    first, second = terminal.order_send(market()), terminal.order_send(market())
    assert first.retcode == second.retcode == retcode
    assert first.comment == mt5.trade_retcode_comment(retcode)
    assert first.bid > 0 and (first.deal, first.order) == (0, 0)
    assert terminal.positions_get() == ()
    assert "market_retcode" not in terminal.faults
    assert terminal.order_send(market()).retcode == mt5.TRADE_RETCODE_DONE


def test_slow_calls_take_the_delay_and_still_succeed(terminal: TerminalSimulator) -> None:
    terminal.inject("slow", delay_s=0.75)
    assert terminal.before_call("copy_rates_from_pos") == CallDelay(seconds=0.75)
    assert terminal.copy_rates_from_pos("EURUSD", mt5.TIMEFRAME_M1, 0, 3) is not None
    terminal.inject("ipc_timeout")
    assert terminal.before_call("account_info").seconds == 0.75 + 5.0


def test_a_lost_reply_executes_exactly_once_and_can_be_reconciled(
    terminal: TerminalSimulator, clock: FakeClock
) -> None:
    terminal.inject("lost_reply")
    request = market(comment="bot-7f3a-0001", magic=777)
    assert terminal.order_send(request) is None
    assert terminal.last_error() == IPC_TIMEOUT
    assert terminal.orders_sent_count == 1 and len(terminal.deals) == 1
    assert "lost_reply" not in terminal.faults
    # The terminal is still attached: a client reconciles by magic and comment.
    mine = [p for p in terminal.positions_get(symbol="EURUSD") if p.magic == 777]
    assert [p.comment for p in mine] == ["bot-7f3a-0001"]
    deals = terminal.history_deals_get(NOW - 60, NOW + 60)
    assert [(d.comment, d.magic, d.entry) for d in deals] == [("bot-7f3a-0001", 777, 0)]
    clock.advance(1)
    assert terminal.order_send(market()).retcode == mt5.TRADE_RETCODE_DONE
    assert len(terminal.deals) == 2


def test_faults_with_a_duration_heal_by_themselves(
    terminal: TerminalSimulator, clock: FakeClock
) -> None:
    terminal.inject("autotrading_off", duration_s=3)
    terminal.inject("slow", delay_s=1, duration_s=6)
    terminal.inject("lost_reply", count=2)
    assert terminal.faults == {"autotrading_off", "slow", "lost_reply"}
    clock.advance(3)
    assert terminal.faults == {"slow", "lost_reply"}
    clock.advance(3)
    assert terminal.faults == {"lost_reply"}
    terminal.inject("clear")
    assert terminal.faults == frozenset()


def test_inject_refuses_unknown_faults_and_bad_parameters(terminal: TerminalSimulator) -> None:
    assert SIMULATOR_FAULTS >= {
        "terminal_crash", "ipc_timeout", "hang", "broker_disconnect", "auth_failure",
        "autotrading_off", "market_retcode", "slow", "lost_reply", "clear",
    }  # fmt: skip
    for bad in (
        lambda: terminal.inject("meteor"),
        lambda: terminal.inject("market_retcode"),
        lambda: terminal.inject("market_retcode", retcode=10004, count=0),
        lambda: terminal.inject("slow"),
        lambda: terminal.inject("slow", delay_s=-1),
        lambda: terminal.inject("hang", delay_s=1),
        lambda: terminal.inject("ipc_timeout", duration_s=0),
    ):
        with pytest.raises(ValueError):
            bad()
    assert terminal.faults == frozenset()
