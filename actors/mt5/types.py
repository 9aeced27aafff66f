"""The records the ``MetaTrader5`` package returns, with the real type names and field order.

The real package returns C struct sequences (``PyStructSequence``, like ``os.stat_result``):
tuples with named fields, ``n_fields``/``n_sequence_fields``/``n_unnamed_fields``, one extra
method ``_asdict()``, and no ``_replace``/``_fields``/``_make`` (they are not namedtuples).
The types below are built the same way, through CPython's own ``PyStructSequence_NewType``,
so they behave exactly like the real ones; their names, docstrings and field order are those
of the compiled module (``actors/mt5/reference/mt5_reference.json``, checked by
``tests/test_mt5_fidelity.py``). Build one with ``make(Type, field=value, ...)`` (missing
fields take the defaults below) and derive one with ``replace(record, field=value)``.

Arrays (``copy_rates_*``, ``copy_ticks_*``) are numpy structured arrays with the dtypes below.
"""

from __future__ import annotations

import ctypes
import warnings
from typing import Any, NamedTuple, TypeVar

import numpy as np

# copy_rates_from / copy_rates_from_pos / copy_rates_range
RATES_DTYPE = np.dtype(
    [
        ("time", "<i8"),
        ("open", "<f8"),
        ("high", "<f8"),
        ("low", "<f8"),
        ("close", "<f8"),
        ("tick_volume", "<u8"),
        ("spread", "<i4"),
        ("real_volume", "<u8"),
    ]
)

# copy_ticks_from / copy_ticks_range
TICKS_DTYPE = np.dtype(
    [
        ("time", "<i8"),
        ("bid", "<f8"),
        ("ask", "<f8"),
        ("last", "<f8"),
        ("volume", "<u8"),
        ("time_msc", "<i8"),
        ("flags", "<u4"),
        ("volume_real", "<f8"),
    ]
)


# Field specifications (names in the real order, types, defaults for ``make``); the record
# types themselves are built from them at the end of this module.


class _TerminalInfoFields(NamedTuple):
    community_account: bool
    community_connection: bool
    connected: bool
    dlls_allowed: bool
    trade_allowed: bool
    tradeapi_disabled: bool
    email_enabled: bool
    ftp_enabled: bool
    notifications_enabled: bool
    mqid: bool
    build: int
    maxbars: int
    codepage: int
    ping_last: int
    community_balance: float
    retransmission: float
    company: str
    name: str
    language: str
    path: str
    data_path: str
    commondata_path: str


class _AccountInfoFields(NamedTuple):
    login: int
    trade_mode: int
    leverage: int
    limit_orders: int
    margin_so_mode: int
    trade_allowed: bool
    trade_expert: bool
    margin_mode: int
    currency_digits: int
    fifo_close: bool
    balance: float
    credit: float
    profit: float
    equity: float
    margin: float
    margin_free: float
    margin_level: float
    margin_so_call: float
    margin_so_so: float
    margin_initial: float
    margin_maintenance: float
    assets: float
    liabilities: float
    commission_blocked: float
    name: str
    server: str
    currency: str
    company: str


class _SymbolInfoFields(NamedTuple):
    custom: bool = False
    chart_mode: int = 0
    select: bool = False
    visible: bool = False
    session_deals: int = 0
    session_buy_orders: int = 0
    session_sell_orders: int = 0
    volume: int = 0
    volumehigh: int = 0
    volumelow: int = 0
    time: int = 0
    digits: int = 0
    spread: int = 0
    spread_float: bool = False
    ticks_bookdepth: int = 0
    trade_calc_mode: int = 0
    trade_mode: int = 0
    start_time: int = 0
    expiration_time: int = 0
    trade_stops_level: int = 0
    trade_freeze_level: int = 0
    trade_exemode: int = 0
    swap_mode: int = 0
    swap_rollover3days: int = 0
    margin_hedged_use_leg: bool = False
    expiration_mode: int = 0
    filling_mode: int = 0
    order_mode: int = 0
    order_gtc_mode: int = 0
    option_mode: int = 0
    option_right: int = 0
    bid: float = 0.0
    bidhigh: float = 0.0
    bidlow: float = 0.0
    ask: float = 0.0
    askhigh: float = 0.0
    asklow: float = 0.0
    last: float = 0.0
    lasthigh: float = 0.0
    lastlow: float = 0.0
    volume_real: float = 0.0
    volumehigh_real: float = 0.0
    volumelow_real: float = 0.0
    option_strike: float = 0.0
    point: float = 0.0
    trade_tick_value: float = 0.0
    trade_tick_value_profit: float = 0.0
    trade_tick_value_loss: float = 0.0
    trade_tick_size: float = 0.0
    trade_contract_size: float = 0.0
    trade_accrued_interest: float = 0.0
    trade_face_value: float = 0.0
    trade_liquidity_rate: float = 0.0
    volume_min: float = 0.0
    volume_max: float = 0.0
    volume_step: float = 0.0
    volume_limit: float = 0.0
    swap_long: float = 0.0
    swap_short: float = 0.0
    margin_initial: float = 0.0
    margin_maintenance: float = 0.0
    session_volume: float = 0.0
    session_turnover: float = 0.0
    session_interest: float = 0.0
    session_buy_orders_volume: float = 0.0
    session_sell_orders_volume: float = 0.0
    session_open: float = 0.0
    session_close: float = 0.0
    session_aw: float = 0.0
    session_price_settlement: float = 0.0
    session_price_limit_min: float = 0.0
    session_price_limit_max: float = 0.0
    margin_hedged: float = 0.0
    price_change: float = 0.0
    price_volatility: float = 0.0
    price_theoretical: float = 0.0
    price_greeks_delta: float = 0.0
    price_greeks_theta: float = 0.0
    price_greeks_gamma: float = 0.0
    price_greeks_vega: float = 0.0
    price_greeks_rho: float = 0.0
    price_greeks_omega: float = 0.0
    price_sensitivity: float = 0.0
    basis: str = ""
    category: str = ""
    currency_base: str = ""
    currency_profit: str = ""
    currency_margin: str = ""
    bank: str = ""
    description: str = ""
    exchange: str = ""
    formula: str = ""
    isin: str = ""
    name: str = ""
    page: str = ""
    path: str = ""


class _BookInfoFields(NamedTuple):
    type: int = 0
    price: float = 0.0
    volume: int = 0
    volume_dbl: float = 0.0


class _TickFields(NamedTuple):
    time: int
    bid: float
    ask: float
    last: float
    volume: int
    time_msc: int
    flags: int
    volume_real: float


class _TradeRequestFields(NamedTuple):
    action: int = 0
    magic: int = 0
    order: int = 0
    symbol: str = ""
    volume: float = 0.0
    price: float = 0.0
    stoplimit: float = 0.0
    sl: float = 0.0
    tp: float = 0.0
    deviation: int = 0
    type: int = 0
    type_filling: int = 0
    type_time: int = 0
    expiration: int = 0
    comment: str = ""
    position: int = 0
    position_by: int = 0


class _OrderCheckResultFields(NamedTuple):
    retcode: int
    balance: float
    equity: float
    profit: float
    margin: float
    margin_free: float
    margin_level: float
    comment: str
    request: Any


class _OrderSendResultFields(NamedTuple):
    retcode: int
    deal: int
    order: int
    volume: float
    price: float
    bid: float
    ask: float
    comment: str
    request_id: int
    retcode_external: int
    request: Any


class _TradePositionFields(NamedTuple):
    ticket: int
    time: int
    time_msc: int
    time_update: int
    time_update_msc: int
    type: int
    magic: int
    identifier: int
    reason: int
    volume: float
    price_open: float
    sl: float
    tp: float
    price_current: float
    swap: float
    profit: float
    symbol: str
    comment: str
    external_id: str


class _TradeOrderFields(NamedTuple):
    ticket: int
    time_setup: int
    time_setup_msc: int
    time_done: int
    time_done_msc: int
    time_expiration: int
    type: int
    type_time: int
    type_filling: int
    state: int
    magic: int
    position_id: int
    position_by_id: int
    reason: int
    volume_initial: float
    volume_current: float
    price_open: float
    sl: float
    tp: float
    price_current: float
    price_stoplimit: float
    symbol: str
    comment: str
    external_id: str


class _TradeDealFields(NamedTuple):
    ticket: int
    order: int
    time: int
    time_msc: int
    type: int
    entry: int
    magic: int
    position_id: int
    reason: int
    volume: float
    price: float
    commission: float
    swap: float
    profit: float
    fee: float
    symbol: str
    comment: str
    external_id: str


# --- struct sequences -----------------------------------------------------------------------


class _Field(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("doc", ctypes.c_char_p)]


class _Desc(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("doc", ctypes.c_char_p),
                ("fields", ctypes.POINTER(_Field)), ("n_in_sequence", ctypes.c_int)]


_new_type = ctypes.pythonapi.PyStructSequence_NewType
_new_type.restype = ctypes.py_object
_new_type.argtypes = [ctypes.POINTER(_Desc)]
# The type keeps pointers into its description (names), so they must live as long as it.
_KEEP_ALIVE: list[object] = []
_SPECS: dict[type, type] = {}


def _asdict(self: tuple[Any, ...]) -> dict[str, Any]:
    """Convert named tuple object to dictionary"""
    names: tuple[str, ...] = type(self).__match_args__  # type: ignore[attr-defined]
    return dict(zip(names, self, strict=True))


def _struct_sequence(name: str, doc: str, spec: type) -> type:
    fields = spec._fields  # type: ignore[attr-defined]
    names = [field.encode() for field in fields]
    table = (_Field * (len(names) + 1))(*(_Field(n, None) for n in names), _Field(None, None))
    desc = _Desc(name.encode(), doc.encode(), table, len(names))
    with warnings.catch_warnings():  # "builtin type X has no __module__": set just below
        warnings.simplefilter("ignore", DeprecationWarning)
        record_type = _new_type(ctypes.byref(desc))
    _KEEP_ALIVE.append((names, table, desc))
    # The real types live in no module; ours say where they are so a record can be pickled
    # (e.g. across a worker process pipe). Repr and type name stay the real ones.
    record_type.__module__ = __name__
    record_type._asdict = _asdict
    _SPECS[record_type] = spec
    return record_type


TerminalInfo: Any = _struct_sequence(
    "TerminalInfo", "This is a structure for storing terminal information", _TerminalInfoFields)
AccountInfo: Any = _struct_sequence(
    "AccountInfo", "This is a structure for storing account information", _AccountInfoFields)
SymbolInfo: Any = _struct_sequence(
    "SymbolInfo", "This is a structure for storing symbol information", _SymbolInfoFields)
Tick: Any = _struct_sequence(
    "Tick", "This is a structure for storing latest symbol prices", _TickFields)
BookInfo: Any = _struct_sequence(
    "BookInfo", "This is a structure for storing Depth of Market information", _BookInfoFields)
TradeRequest: Any = _struct_sequence("TradeRequest", "Trade request structure", _TradeRequestFields)
OrderCheckResult: Any = _struct_sequence(
    "OrderCheckResult", "order_check result structure", _OrderCheckResultFields)
OrderSendResult: Any = _struct_sequence(
    "OrderSendResult", "order_send result structure", _OrderSendResultFields)
TradePosition: Any = _struct_sequence(
    "TradePosition", "Trade position structure", _TradePositionFields)
TradeOrder: Any = _struct_sequence("TradeOrder", "Trade order structure", _TradeOrderFields)
TradeDeal: Any = _struct_sequence("TradeDeal", "Trade deal structure", _TradeDealFields)

RECORD_TYPES: tuple[Any, ...] = (
    Tick, OrderSendResult, TradePosition, BookInfo, AccountInfo, TradeOrder, OrderCheckResult,
    SymbolInfo, TerminalInfo, TradeDeal, TradeRequest)

_R = TypeVar("_R")


def field_names(record_type: Any) -> tuple[str, ...]:
    """The field names of a record type, in order (the real types have no ``_fields``)."""
    return tuple(record_type.__match_args__)


def field_defaults(record_type: Any) -> dict[str, Any]:
    """The value each field takes when ``make`` is not given it (absent: required)."""
    return dict(_SPECS[record_type]._field_defaults)  # type: ignore[attr-defined]


def make(record_type: Any, /, **values: Any) -> Any:
    """A record from field values; fields not given take their defaults."""
    spec = _SPECS[record_type]
    return record_type(tuple(spec(**values)))


def replace(record: _R, /, **changes: Any) -> _R:
    """A copy of ``record`` with some fields changed (what ``_replace`` is to a namedtuple)."""
    values = record._asdict()  # type: ignore[attr-defined]
    unknown = set(changes) - set(values)
    if unknown:
        raise TypeError(f"{type(record).__name__} has no field(s) {sorted(unknown)}")
    values.update(changes)
    return type(record)(tuple(values.values()))  # type: ignore[call-arg]
