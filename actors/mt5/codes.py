"""Constants of the ``MetaTrader5`` Python package, with their real names and values.

The values are those the package itself defines (its ``__init__.py`` declares them as plain
module constants, e.g. ``TIMEFRAME_H1 = 1 | 0x4000``) and that the MQL5 reference documents
(https://www.mql5.com/en/docs/python_metatrader5 and, for trade results,
https://www.mql5.com/en/docs/constants/errorswarnings/enum_trade_return_codes).
Code that talks to the real package and code that talks to the simulator can therefore share
one set of names: ``from actors.mt5 import codes as mt5`` reads like ``import MetaTrader5 as mt5``.

The ``last_error()`` messages are the strings of the compiled module (its error setter and
argument parser, read in the disassembly of the 5.0.6231 wheel by
``tools/extract_mt5_reference.py``). Only the upper-case integer names are package
constants; ``PACKAGE_CONSTANTS`` lists them, and ``tests/test_mt5_fidelity.py`` checks they
are exactly the package's (no more, no fewer, same values). Helpers here are lower-case or
containers (``TIMEFRAME_SECONDS``, ``LAST_ERROR_MESSAGE``...).
"""

from __future__ import annotations

# --- last_error() codes -------------------------------------------------------------------
RES_S_OK = 1  # generic success
RES_E_FAIL = -1  # generic fail
RES_E_INVALID_PARAMS = -2  # invalid arguments/parameters
RES_E_NO_MEMORY = -3  # no memory condition
RES_E_NOT_FOUND = -4  # no history
RES_E_INVALID_VERSION = -5  # invalid version
RES_E_AUTH_FAILED = -6  # authorization failed
RES_E_UNSUPPORTED = -7  # unsupported method
RES_E_AUTO_TRADING_DISABLED = -8  # auto-trading disabled
RES_E_INTERNAL_FAIL = -10000  # internal IPC general error
RES_E_INTERNAL_FAIL_SEND = -10001  # internal IPC send failed
RES_E_INTERNAL_FAIL_RECEIVE = -10002  # internal IPC recv failed
RES_E_INTERNAL_FAIL_INIT = -10003  # internal IPC initialization fail
# The online docs print -10003 here too; that is a typo in the docs: the package defines -10004
# and returns it with 'No IPC connection' (the message no other code carries).
RES_E_INTERNAL_FAIL_CONNECT = -10004  # internal IPC no ipc
RES_E_INTERNAL_FAIL_TIMEOUT = -10005  # internal timeout

# Messages that go with each code. Several codes come with more than one message in the real
# package, depending on which layer refused (the Python argument parser or the terminal);
# these are the default messages, and the ``MSG_*`` strings below are the variants.
LAST_ERROR_MESSAGE: dict[int, str] = {
    RES_S_OK: "Success",
    RES_E_FAIL: "Terminal: Call failed",
    RES_E_INVALID_PARAMS: "Terminal: Invalid params",
    RES_E_NO_MEMORY: "Terminal: Out of memory",
    RES_E_NOT_FOUND: "Terminal: Not found",
    RES_E_INVALID_VERSION: "Terminal: Incompatible versions, please install the latest version "
    "of Terminal and Python module",
    RES_E_AUTH_FAILED: "Terminal: Authorization failed",
    RES_E_UNSUPPORTED: "Terminal: Unsupported function",
    # -8 has no default text of its own (the error setter falls through to 'Call failed');
    # order_send and order_check set MSG_AUTO_TRADING_DISABLED explicitly.
    RES_E_AUTO_TRADING_DISABLED: "Terminal: Call failed",
    RES_E_INTERNAL_FAIL: "IPC call failed",
    RES_E_INTERNAL_FAIL_SEND: "IPC send failed",
    RES_E_INTERNAL_FAIL_RECEIVE: "IPC recv failed",
    # Always followed by the reason (see msg_ipc_initialize_failed).
    RES_E_INTERNAL_FAIL_INIT: "IPC initialize failed, %S",
    RES_E_INTERNAL_FAIL_CONNECT: "No IPC connection",
    RES_E_INTERNAL_FAIL_TIMEOUT: "IPC timeout",
}

# Where the messages come from: the compiled module's error setter, read in its disassembly
# (tools/extract_mt5_reference.py keeps them in actors/mt5/reference/mt5_reference.json and
# tests/test_mt5_fidelity.py compares). The argument-parser variants of -2:
MSG_INVALID_ARGUMENTS = "Invalid arguments"
MSG_UNNAMED_ARGUMENTS = "Unnamed arguments not allowed"
MSG_INVALID_NUMBER_OF_ARGUMENTS = "Invalid number of arguments"
MSG_AUTO_TRADING_DISABLED = "Auto-Trading using Python API disabled in Terminal"
MSG_ORDINAL_ARGUMENT = ("Invalid 1st unnamed argument", "Invalid 2nd unnamed argument",
                        "Invalid 3rd unnamed argument")


def msg_invalid_request_field(field: str) -> str:
    """The -2 message for a bad trade-request field, e.g. 'Invalid "volume" argument'."""
    return f'Invalid "{field}" argument'


def msg_ipc_initialize_failed(reason: str) -> str:
    """The -10003 message: 'IPC initialize failed, ' and why (the package's %S)."""
    return f"IPC initialize failed, {reason}"


# -10003 reasons the package formats in (strings of the compiled module).


def msg_process_create_failed(terminal_exe: str) -> str:
    """-10003 when the terminal could not be started (the path is the package's %s)."""
    return msg_ipc_initialize_failed(f"Process create failed '{terminal_exe}'")

MSG_IPC_INIT_NOT_FOUND = msg_ipc_initialize_failed("MetaTrader 5 x64 not found")

SUCCESS: tuple[int, str] = (RES_S_OK, LAST_ERROR_MESSAGE[RES_S_OK])

# --- timeframes (ENUM_TIMEFRAMES as the Python package spells them) ------------------------
TIMEFRAME_M1 = 1
TIMEFRAME_M2 = 2
TIMEFRAME_M3 = 3
TIMEFRAME_M4 = 4
TIMEFRAME_M5 = 5
TIMEFRAME_M6 = 6
TIMEFRAME_M10 = 10
TIMEFRAME_M12 = 12
TIMEFRAME_M15 = 15
TIMEFRAME_M20 = 20
TIMEFRAME_M30 = 30
TIMEFRAME_H1 = 1 | 0x4000  # 16385
TIMEFRAME_H2 = 2 | 0x4000
TIMEFRAME_H3 = 3 | 0x4000
TIMEFRAME_H4 = 4 | 0x4000
TIMEFRAME_H6 = 6 | 0x4000
TIMEFRAME_H8 = 8 | 0x4000
TIMEFRAME_H12 = 12 | 0x4000
TIMEFRAME_D1 = 24 | 0x4000  # 16408
TIMEFRAME_W1 = 1 | 0x8000  # 32769
TIMEFRAME_MN1 = 1 | 0xC000  # 49153

# Length in seconds of the timeframes whose bars all have the same length. W1 and MN1 are
# calendar-aligned (weeks start on Sunday, months on the 1st) and are handled separately.
TIMEFRAME_SECONDS: dict[int, int] = {
    TIMEFRAME_M1: 60,
    TIMEFRAME_M2: 120,
    TIMEFRAME_M3: 180,
    TIMEFRAME_M4: 240,
    TIMEFRAME_M5: 300,
    TIMEFRAME_M6: 360,
    TIMEFRAME_M10: 600,
    TIMEFRAME_M12: 720,
    TIMEFRAME_M15: 900,
    TIMEFRAME_M20: 1200,
    TIMEFRAME_M30: 1800,
    TIMEFRAME_H1: 3600,
    TIMEFRAME_H2: 7200,
    TIMEFRAME_H3: 10800,
    TIMEFRAME_H4: 14400,
    TIMEFRAME_H6: 21600,
    TIMEFRAME_H8: 28800,
    TIMEFRAME_H12: 43200,
    TIMEFRAME_D1: 86400,
}
TIMEFRAMES: frozenset[int] = frozenset(TIMEFRAME_SECONDS) | {TIMEFRAME_W1, TIMEFRAME_MN1}

# --- tick copy flags and tick flags --------------------------------------------------------
COPY_TICKS_ALL = -1
COPY_TICKS_INFO = 1
COPY_TICKS_TRADE = 2

TICK_FLAG_BID = 0x02
TICK_FLAG_ASK = 0x04
TICK_FLAG_LAST = 0x08
TICK_FLAG_VOLUME = 0x10
TICK_FLAG_BUY = 0x20
TICK_FLAG_SELL = 0x40

# --- trade request actions (ENUM_TRADE_REQUEST_ACTIONS) ------------------------------------
TRADE_ACTION_DEAL = 1
TRADE_ACTION_PENDING = 5
TRADE_ACTION_SLTP = 6
TRADE_ACTION_MODIFY = 7
TRADE_ACTION_REMOVE = 8
TRADE_ACTION_CLOSE_BY = 10

# --- order types (ENUM_ORDER_TYPE) ---------------------------------------------------------
ORDER_TYPE_BUY = 0
ORDER_TYPE_SELL = 1
ORDER_TYPE_BUY_LIMIT = 2
ORDER_TYPE_SELL_LIMIT = 3
ORDER_TYPE_BUY_STOP = 4
ORDER_TYPE_SELL_STOP = 5
ORDER_TYPE_BUY_STOP_LIMIT = 6
ORDER_TYPE_SELL_STOP_LIMIT = 7
ORDER_TYPE_CLOSE_BY = 8

# --- order states (ENUM_ORDER_STATE) -------------------------------------------------------
ORDER_STATE_STARTED = 0
ORDER_STATE_PLACED = 1
ORDER_STATE_CANCELED = 2
ORDER_STATE_PARTIAL = 3
ORDER_STATE_FILLED = 4
ORDER_STATE_REJECTED = 5
ORDER_STATE_EXPIRED = 6
ORDER_STATE_REQUEST_ADD = 7
ORDER_STATE_REQUEST_MODIFY = 8
ORDER_STATE_REQUEST_CANCEL = 9

# --- filling and expiration (ENUM_ORDER_TYPE_FILLING, ENUM_ORDER_TYPE_TIME) -----------------
ORDER_FILLING_FOK = 0
ORDER_FILLING_IOC = 1
ORDER_FILLING_RETURN = 2
ORDER_FILLING_BOC = 3

ORDER_TIME_GTC = 0
ORDER_TIME_DAY = 1
ORDER_TIME_SPECIFIED = 2
ORDER_TIME_SPECIFIED_DAY = 3

# --- reasons (who placed it); the Python API counts as an expert ---------------------------
ORDER_REASON_CLIENT = 0
ORDER_REASON_MOBILE = 1
ORDER_REASON_WEB = 2
ORDER_REASON_EXPERT = 3
ORDER_REASON_SL = 4
ORDER_REASON_TP = 5
ORDER_REASON_SO = 6

POSITION_REASON_CLIENT = 0
POSITION_REASON_MOBILE = 1
POSITION_REASON_WEB = 2
POSITION_REASON_EXPERT = 3

DEAL_REASON_CLIENT = 0
DEAL_REASON_MOBILE = 1
DEAL_REASON_WEB = 2
DEAL_REASON_EXPERT = 3
DEAL_REASON_SL = 4
DEAL_REASON_TP = 5
DEAL_REASON_SO = 6
DEAL_REASON_ROLLOVER = 7
DEAL_REASON_VMARGIN = 8
DEAL_REASON_SPLIT = 9

# --- positions and deals -------------------------------------------------------------------
POSITION_TYPE_BUY = 0
POSITION_TYPE_SELL = 1

DEAL_TYPE_BUY = 0
DEAL_TYPE_SELL = 1
DEAL_TYPE_BALANCE = 2
DEAL_TYPE_CREDIT = 3
DEAL_TYPE_CHARGE = 4
DEAL_TYPE_CORRECTION = 5
DEAL_TYPE_BONUS = 6
DEAL_TYPE_COMMISSION = 7
DEAL_TYPE_COMMISSION_DAILY = 8
DEAL_TYPE_COMMISSION_MONTHLY = 9
DEAL_TYPE_COMMISSION_AGENT_DAILY = 10
DEAL_TYPE_COMMISSION_AGENT_MONTHLY = 11
DEAL_TYPE_INTEREST = 12
DEAL_TYPE_BUY_CANCELED = 13
DEAL_TYPE_SELL_CANCELED = 14

DEAL_ENTRY_IN = 0
DEAL_ENTRY_OUT = 1
DEAL_ENTRY_INOUT = 2
DEAL_ENTRY_OUT_BY = 3

# --- symbol and account enumerations the simulator fills in --------------------------------
SYMBOL_CALC_MODE_FOREX = 0
SYMBOL_CALC_MODE_CFD = 2
SYMBOL_TRADE_MODE_DISABLED = 0
SYMBOL_TRADE_MODE_FULL = 4
SYMBOL_TRADE_EXECUTION_INSTANT = 1
SYMBOL_TRADE_EXECUTION_MARKET = 2

ACCOUNT_TRADE_MODE_DEMO = 0
ACCOUNT_TRADE_MODE_CONTEST = 1
ACCOUNT_TRADE_MODE_REAL = 2
ACCOUNT_STOPOUT_MODE_PERCENT = 0
ACCOUNT_STOPOUT_MODE_MONEY = 1
ACCOUNT_MARGIN_MODE_RETAIL_NETTING = 0
ACCOUNT_MARGIN_MODE_EXCHANGE = 1
ACCOUNT_MARGIN_MODE_RETAIL_HEDGING = 2

# --- the rest of the package's constants (enumerations the simulator does not use) -------
DEAL_DIVIDEND = 15
DEAL_DIVIDEND_FRANKED = 16
DEAL_TAX = 17
SYMBOL_CHART_MODE_BID = 0
SYMBOL_CHART_MODE_LAST = 1
SYMBOL_CALC_MODE_FUTURES = 1
SYMBOL_CALC_MODE_CFDINDEX = 3
SYMBOL_CALC_MODE_CFDLEVERAGE = 4
SYMBOL_CALC_MODE_FOREX_NO_LEVERAGE = 5
SYMBOL_CALC_MODE_EXCH_STOCKS = 32
SYMBOL_CALC_MODE_EXCH_FUTURES = 33
SYMBOL_CALC_MODE_EXCH_OPTIONS = 34
SYMBOL_CALC_MODE_EXCH_OPTIONS_MARGIN = 36
SYMBOL_CALC_MODE_EXCH_BONDS = 37
SYMBOL_CALC_MODE_EXCH_STOCKS_MOEX = 38
SYMBOL_CALC_MODE_EXCH_BONDS_MOEX = 39
SYMBOL_CALC_MODE_SERV_COLLATERAL = 64
SYMBOL_TRADE_MODE_LONGONLY = 1
SYMBOL_TRADE_MODE_SHORTONLY = 2
SYMBOL_TRADE_MODE_CLOSEONLY = 3
SYMBOL_TRADE_EXECUTION_REQUEST = 0
SYMBOL_TRADE_EXECUTION_EXCHANGE = 3
SYMBOL_SWAP_MODE_DISABLED = 0
SYMBOL_SWAP_MODE_POINTS = 1
SYMBOL_SWAP_MODE_CURRENCY_SYMBOL = 2
SYMBOL_SWAP_MODE_CURRENCY_MARGIN = 3
SYMBOL_SWAP_MODE_CURRENCY_DEPOSIT = 4
SYMBOL_SWAP_MODE_INTEREST_CURRENT = 5
SYMBOL_SWAP_MODE_INTEREST_OPEN = 6
SYMBOL_SWAP_MODE_REOPEN_CURRENT = 7
SYMBOL_SWAP_MODE_REOPEN_BID = 8
DAY_OF_WEEK_SUNDAY = 0
DAY_OF_WEEK_MONDAY = 1
DAY_OF_WEEK_TUESDAY = 2
DAY_OF_WEEK_WEDNESDAY = 3
DAY_OF_WEEK_THURSDAY = 4
DAY_OF_WEEK_FRIDAY = 5
DAY_OF_WEEK_SATURDAY = 6
SYMBOL_ORDERS_GTC = 0
SYMBOL_ORDERS_DAILY = 1
SYMBOL_ORDERS_DAILY_NO_STOPS = 2
SYMBOL_OPTION_RIGHT_CALL = 0
SYMBOL_OPTION_RIGHT_PUT = 1
SYMBOL_OPTION_MODE_EUROPEAN = 0
SYMBOL_OPTION_MODE_AMERICAN = 1
BOOK_TYPE_SELL = 1
BOOK_TYPE_BUY = 2
BOOK_TYPE_SELL_MARKET = 3
BOOK_TYPE_BUY_MARKET = 4

# --- trade server return codes (MqlTradeResult.retcode) ------------------------------------
TRADE_RETCODE_REQUOTE = 10004
TRADE_RETCODE_REJECT = 10006
TRADE_RETCODE_CANCEL = 10007
TRADE_RETCODE_PLACED = 10008
TRADE_RETCODE_DONE = 10009
TRADE_RETCODE_DONE_PARTIAL = 10010
TRADE_RETCODE_ERROR = 10011
TRADE_RETCODE_TIMEOUT = 10012
TRADE_RETCODE_INVALID = 10013
TRADE_RETCODE_INVALID_VOLUME = 10014
TRADE_RETCODE_INVALID_PRICE = 10015
TRADE_RETCODE_INVALID_STOPS = 10016
TRADE_RETCODE_TRADE_DISABLED = 10017
TRADE_RETCODE_MARKET_CLOSED = 10018
TRADE_RETCODE_NO_MONEY = 10019
TRADE_RETCODE_PRICE_CHANGED = 10020
TRADE_RETCODE_PRICE_OFF = 10021
TRADE_RETCODE_INVALID_EXPIRATION = 10022
TRADE_RETCODE_ORDER_CHANGED = 10023
TRADE_RETCODE_TOO_MANY_REQUESTS = 10024
TRADE_RETCODE_NO_CHANGES = 10025
TRADE_RETCODE_SERVER_DISABLES_AT = 10026
TRADE_RETCODE_CLIENT_DISABLES_AT = 10027
TRADE_RETCODE_LOCKED = 10028
TRADE_RETCODE_FROZEN = 10029
TRADE_RETCODE_INVALID_FILL = 10030
TRADE_RETCODE_CONNECTION = 10031
TRADE_RETCODE_ONLY_REAL = 10032
TRADE_RETCODE_LIMIT_ORDERS = 10033
TRADE_RETCODE_LIMIT_VOLUME = 10034
TRADE_RETCODE_INVALID_ORDER = 10035
TRADE_RETCODE_POSITION_CLOSED = 10036
TRADE_RETCODE_INVALID_CLOSE_VOLUME = 10038
TRADE_RETCODE_CLOSE_ORDER_EXIST = 10039
TRADE_RETCODE_LIMIT_POSITIONS = 10040
TRADE_RETCODE_REJECT_CANCEL = 10041
TRADE_RETCODE_LONG_ONLY = 10042
TRADE_RETCODE_SHORT_ONLY = 10043
TRADE_RETCODE_CLOSE_ONLY = 10044
TRADE_RETCODE_FIFO_CLOSE = 10045

# order_check() answers 0 with comment 'Done' when the request would be accepted; it is not a
# named constant in the package (the docs' example prints ``OrderCheckResult(retcode=0, ...)``),
# so it is lower-case here: only the package's own names are upper-case module constants.
order_check_ok = 0
# SYMBOL_FILLING_MODE bit flags (symbol_info().filling_mode): MQL5 names, not in the package.
symbol_filling_fok = 1
symbol_filling_ioc = 2

# The ``comment`` the terminal puts in a trade result. 'Request executed', 'Done' and
# 'AutoTrading disabled by client' and the 10031 text are observed in real results; the others
# are the descriptions from the MQL5 trade-return-codes page.
TRADE_RETCODE_COMMENT: dict[int, str] = {
    order_check_ok: "Done",
    TRADE_RETCODE_REQUOTE: "Requote",
    TRADE_RETCODE_REJECT: "Request rejected",
    TRADE_RETCODE_CANCEL: "Request canceled by trader",
    TRADE_RETCODE_PLACED: "Order placed",
    TRADE_RETCODE_DONE: "Request executed",
    TRADE_RETCODE_DONE_PARTIAL: "Only part of the request was completed",
    TRADE_RETCODE_ERROR: "Request processing error",
    TRADE_RETCODE_TIMEOUT: "Request canceled by timeout",
    TRADE_RETCODE_INVALID: "Invalid request",
    TRADE_RETCODE_INVALID_VOLUME: "Invalid volume",
    TRADE_RETCODE_INVALID_PRICE: "Invalid price",
    TRADE_RETCODE_INVALID_STOPS: "Invalid stops",
    TRADE_RETCODE_TRADE_DISABLED: "Trade is disabled",
    TRADE_RETCODE_MARKET_CLOSED: "Market is closed",
    TRADE_RETCODE_NO_MONEY: "No money",
    TRADE_RETCODE_PRICE_CHANGED: "Prices changed",
    TRADE_RETCODE_PRICE_OFF: "Off quotes",
    TRADE_RETCODE_INVALID_EXPIRATION: "Invalid expiration",
    TRADE_RETCODE_ORDER_CHANGED: "Order state changed",
    TRADE_RETCODE_TOO_MANY_REQUESTS: "Too frequent requests",
    TRADE_RETCODE_NO_CHANGES: "No changes in request",
    TRADE_RETCODE_SERVER_DISABLES_AT: "AutoTrading disabled by server",
    TRADE_RETCODE_CLIENT_DISABLES_AT: "AutoTrading disabled by client",
    TRADE_RETCODE_LOCKED: "Request locked for processing",
    TRADE_RETCODE_FROZEN: "Order or position frozen",
    TRADE_RETCODE_INVALID_FILL: "Unsupported filling mode",
    TRADE_RETCODE_CONNECTION: "Request rejected due to absence of network connection",
    TRADE_RETCODE_ONLY_REAL: "Operation is allowed only for live accounts",
    TRADE_RETCODE_LIMIT_ORDERS: "The number of pending orders has reached the limit",
    TRADE_RETCODE_LIMIT_VOLUME: "The volume of orders and positions has reached the limit",
    TRADE_RETCODE_INVALID_ORDER: "Incorrect or prohibited order type",
    TRADE_RETCODE_POSITION_CLOSED: "Position with the specified identifier has already been closed",
    TRADE_RETCODE_INVALID_CLOSE_VOLUME: "Close volume exceeds the current position volume",
    TRADE_RETCODE_CLOSE_ORDER_EXIST: "A close order already exists for the position",
    TRADE_RETCODE_LIMIT_POSITIONS: "The number of open positions has reached the limit",
    TRADE_RETCODE_REJECT_CANCEL: "The pending order activation request is rejected",
    TRADE_RETCODE_LONG_ONLY: "Only long positions are allowed",
    TRADE_RETCODE_SHORT_ONLY: "Only short positions are allowed",
    TRADE_RETCODE_CLOSE_ONLY: "Only position closing is allowed",
    TRADE_RETCODE_FIFO_CLOSE: "Position closing is allowed only by FIFO rule",
}


def trade_retcode_comment(retcode: int) -> str:
    """The terminal's comment for ``retcode`` (a generic one for codes it has no text for)."""
    return TRADE_RETCODE_COMMENT.get(retcode, f"Retcode {retcode}")


# Every constant of the package (name -> value): the upper-case int names of this module.
PACKAGE_CONSTANTS: dict[str, int] = {
    name: value for name, value in dict(globals()).items()
    if name.isupper() and type(value) is int
}
