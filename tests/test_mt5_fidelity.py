"""The simulator against the real ``MetaTrader5`` package, point by point.

The reference (``actors/mt5/reference/mt5_reference.json``) is extracted from the official
wheel by ``tools/extract_mt5_reference.py``: its function table, record types, constants,
Python helpers and messages. Regenerate it for a new package version and these tests say
what changed. Each test compares a whole table, so any difference fails.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import actors.mt5
from actors.mt5 import codes
from actors.mt5 import types as records
from actors.mt5.actor import TAG_MAX_CHARS, order_tag
from actors.mt5.simulator import (
    _POSITIONAL,
    _REQUEST_FIELDS,
    COMMENT_MAX_LENGTH,
    PACKAGE_FUNCTIONS,
    TerminalSimulator,
)

REFERENCE: dict[str, Any] = json.loads(
    (Path(actors.mt5.__file__).parent / "reference" / "mt5_reference.json").read_text())
FUNCTIONS: dict[str, dict[str, Any]] = {f["name"]: f for f in REFERENCE["functions"]}
NOW = 1_704_672_000 + 3_600  # an hour after the simulator's epoch

# Arguments that work, per function (to vary one at a time).
GOOD_ARGS: dict[str, tuple[Any, ...]] = {
    "copy_ticks_from": ("EURUSD", NOW - 60, 10, codes.COPY_TICKS_ALL),
    "copy_ticks_range": ("EURUSD", NOW - 60, NOW, codes.COPY_TICKS_ALL),
    "copy_rates_from": ("EURUSD", codes.TIMEFRAME_M1, NOW, 10),
    "copy_rates_from_pos": ("EURUSD", codes.TIMEFRAME_M1, 0, 10),
    "copy_rates_range": ("EURUSD", codes.TIMEFRAME_M1, NOW - 600, NOW),
    "history_orders_total": (NOW - 600, NOW),
    "history_deals_total": (NOW - 600, NOW),
    "order_calc_margin": (codes.ORDER_TYPE_BUY, "EURUSD", 0.1, 1.1),
    "order_calc_profit": (codes.ORDER_TYPE_BUY, "EURUSD", 0.1, 1.1, 1.2),
    "symbol_info": ("EURUSD",),
    "symbol_info_tick": ("EURUSD",),
    "symbol_select": ("EURUSD", True),
    "market_book_add": ("EURUSD",),
    "market_book_release": ("EURUSD",),
    "market_book_get": ("EURUSD",),
}


class Clock:
    def __init__(self) -> None:
        self.now = 3_600.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sim() -> TerminalSimulator:
    terminal = TerminalSimulator(clock=Clock(), history_days=1)
    assert terminal.initialize() is True
    return terminal


def market(**fields: Any) -> dict[str, Any]:
    return {"action": codes.TRADE_ACTION_DEAL, "symbol": "EURUSD", "volume": 0.1,
            "type": codes.ORDER_TYPE_BUY, **fields}


# --- the surface ---------------------------------------------------------------------------


def test_fidelity_counts() -> None:
    """The headline: functions, constants and record types the simulator has like the
    package (same name; same value; same name, doc and fields in order)."""
    functions = [n for n in FUNCTIONS if n in PACKAGE_FUNCTIONS
                 and callable(getattr(TerminalSimulator, n, None))]
    constants = [n for n, v in REFERENCE["constants"].items()
                 if getattr(TerminalSimulator, n, None) == v]
    types = [t["name"] for t in REFERENCE["record_types"]
             if records.field_names(getattr(records, t["name"], None) or ()) == tuple(t["fields"])]
    counts = (f"functions {len(functions)}/{len(FUNCTIONS)}, "
              f"constants {len(constants)}/{len(REFERENCE['constants'])}, "
              f"record types {len(types)}/{len(REFERENCE['record_types'])}")
    print(counts)
    assert (len(functions), len(constants), len(types)) == (32, 223, 11), counts
    assert len(FUNCTIONS) == 32 and len(REFERENCE["constants"]) == 223


def test_the_simulator_has_exactly_the_package_functions() -> None:
    assert sorted(PACKAGE_FUNCTIONS) == sorted(FUNCTIONS)


def test_the_python_helpers_have_the_package_signatures() -> None:
    for helper in REFERENCE["helpers"]:
        signature = inspect.signature(getattr(TerminalSimulator, helper["name"]))
        parameters = list(signature.parameters.values())[1:]  # self
        seen = [{"name": p.name, "kind": p.kind.name.lower(),
                 "default": None if p.default is inspect.Parameter.empty else p.default,
                 "required": p.default is inspect.Parameter.empty}
                for p in parameters]
        assert seen == helper["parameters"], helper["name"]


def test_constants_are_exactly_the_package_constants() -> None:
    simulated = {name: getattr(TerminalSimulator, name) for name in dir(TerminalSimulator)
                 if name.isupper() and type(getattr(TerminalSimulator, name)) is int}
    assert simulated == REFERENCE["constants"]
    assert codes.PACKAGE_CONSTANTS == REFERENCE["constants"]  # codes reads like the package


def test_version_and_author_are_the_packages(sim: TerminalSimulator) -> None:
    assert sim.__version__ == REFERENCE["version"] == "5.0.6231"  # type: ignore[attr-defined]
    assert sim.__author__ == REFERENCE["author"]  # type: ignore[attr-defined]


# --- records -------------------------------------------------------------------------------


def test_record_types_have_the_real_names_docs_and_fields_in_order() -> None:
    assert [t.__name__ for t in records.RECORD_TYPES] == [
        t["name"] for t in REFERENCE["record_types"]]
    for spec in REFERENCE["record_types"]:
        record_type = getattr(records, spec["name"])
        assert record_type.__name__ == spec["name"]
        assert record_type.__doc__ == spec["doc"]
        assert records.field_names(record_type) == tuple(spec["fields"])
        assert record_type.n_fields == record_type.n_sequence_fields == spec["n_in_sequence"]
        assert record_type.n_unnamed_fields == 0


def test_records_are_struct_sequences_not_namedtuples(sim: TerminalSimulator) -> None:
    tick = sim.symbol_info_tick("EURUSD")
    assert type(tick) is records.Tick and isinstance(tick, tuple)
    for missing in ("_replace", "_fields", "_make", "_field_defaults"):
        assert not hasattr(tick, missing), missing
    methods = {name for name in vars(type(tick)) if not name.startswith("__")
               and callable(getattr(type(tick), name))}
    assert methods == set(REFERENCE["record_methods"])
    assert tick._asdict() == dict(zip(records.field_names(records.Tick), tick, strict=True))
    assert repr(tick).startswith("Tick(time=")
    with pytest.raises(AttributeError):
        tick.bid = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        records.Tick(time=1)  # struct sequences take one sequence, not fields
    assert records.Tick(tuple(tick)) == tick


def test_every_function_returns_the_real_record_types(sim: TerminalSimulator) -> None:
    assert type(sim.terminal_info()) is records.TerminalInfo
    assert type(sim.account_info()) is records.AccountInfo
    assert type(sim.symbol_info("EURUSD")) is records.SymbolInfo
    assert {type(s) for s in sim.symbols_get()} == {records.SymbolInfo}
    result = sim.order_send(market())
    assert type(result) is records.OrderSendResult
    assert type(result.request) is records.TradeRequest
    assert type(sim.order_check(market())) is records.OrderCheckResult
    assert {type(p) for p in sim.positions_get()} == {records.TradePosition}
    assert {type(d) for d in sim.history_deals_get(NOW - 60, NOW + 60)} == {records.TradeDeal}
    assert {type(o) for o in sim.history_orders_get(NOW - 60, NOW + 60)} == {records.TradeOrder}
    assert sim.market_book_add("EURUSD") is True
    book = sim.market_book_get("EURUSD")
    assert book and {type(level) for level in book} == {records.BookInfo}
    assert {level.type for level in book} == {codes.BOOK_TYPE_SELL, codes.BOOK_TYPE_BUY}


# --- argument conventions ------------------------------------------------------------------


def test_functions_without_parameters_refuse_any_argument(sim: TerminalSimulator) -> None:
    noargs = [n for n, f in FUNCTIONS.items() if f["convention"] == "noargs"]
    assert len(noargs) == 8
    for name in noargs:
        with pytest.raises(TypeError, match="takes no arguments"):
            getattr(sim, name)(1)
        with pytest.raises(TypeError, match="takes no keyword arguments"):
            getattr(sim, name)(x=1)


def test_positional_only_functions_refuse_keywords(sim: TerminalSimulator) -> None:
    varargs = [n for n, f in FUNCTIONS.items() if f["convention"] == "varargs"]
    assert sorted(varargs) == sorted(GOOD_ARGS)
    for name in varargs:
        with pytest.raises(TypeError, match="takes no keyword arguments"):
            getattr(sim, name)(symbol="EURUSD")


def test_keyword_functions_ignore_unknown_keywords(sim: TerminalSimulator) -> None:
    keywords = [n for n, f in FUNCTIONS.items() if f["convention"] == "varargs_keywords"]
    assert sorted(keywords) == sorted([
        "initialize", "login", "positions_get", "orders_get", "history_orders_get",
        "history_deals_get", "order_check", "order_send", "symbols_get"])
    assert sim.positions_get(nonsense=1) == ()
    assert sim.symbols_get(nonsense=1) is not None
    assert sim.last_error() == (1, "Success")


def test_positional_conventions_are_the_packages() -> None:
    for name, (counts, kinds) in _POSITIONAL.items():
        positional = FUNCTIONS[name]["positional"]
        assert (list(counts), list(kinds)) == (positional["counts"], positional["args"]), name


def test_a_wrong_number_of_arguments_is_minus_2_not_an_exception(
    sim: TerminalSimulator,
) -> None:
    for name, args in GOOD_ARGS.items():
        assert getattr(sim, name)(*args, "extra") in (None, False), name
        assert sim.last_error() == (-2, "Invalid arguments"), name


def test_parser_type_errors_raise_SystemError(sim: TerminalSimulator) -> None:
    """An 'i', 'k' or 'd' argument of the wrong type: PyArg_ParseTuple's TypeError is left
    set while the function returns None, so Python raises SystemError from it."""
    for name, args in GOOD_ARGS.items():
        for index, kind in enumerate(FUNCTIONS[name]["positional"]["args"]):
            if kind not in ("i", "k", "d"):
                continue
            bad = list(args)
            bad[index] = "1"
            with pytest.raises(SystemError) as raised:
                getattr(sim, name)(*bad)
            assert isinstance(raised.value.__cause__, TypeError), (name, index)
            assert sim.last_error() == (-2, "Invalid arguments")


def test_symbols_and_dates_of_the_wrong_type_are_minus_2(sim: TerminalSimulator) -> None:
    for name, args in GOOD_ARGS.items():
        for index, kind in enumerate(FUNCTIONS[name]["positional"]["args"]):
            if kind not in ("str", "date"):
                continue
            bad = list(args)
            bad[index] = b"EURUSD" if kind == "str" else "2024-01-08"
            assert getattr(sim, name)(*bad) in (None, False), (name, index)
            assert sim.last_error() == (-2, "Invalid arguments"), (name, index)


def test_symbol_names_and_comments_fit_in_29_characters(sim: TerminalSimulator) -> None:
    assert REFERENCE["string_argument_max_chars"] == COMMENT_MAX_LENGTH == 29
    assert sim.symbol_info("X" * 30) is None
    assert sim.last_error() == (-2, "Invalid arguments")
    assert sim.order_send(market(comment="c" * 29)).comment == "Request executed"
    assert sim.order_send(market(comment="c" * 30)) is None
    assert sim.last_error() == (-2, 'Invalid "comment" argument')
    assert sim.order_check(market(comment="c" * 30)) is None


def test_request_fields_are_read_in_the_packages_order(sim: TerminalSimulator) -> None:
    assert [[field, kind.removesuffix("32")] for field, kind in _REQUEST_FIELDS] == \
        REFERENCE["request_fields"]
    assert sim.order_send(market(volume=1, comment="c" * 40)) is None
    assert sim.last_error() == (-2, 'Invalid "volume" argument')  # volume comes first
    assert sim.order_send(market(bogus=1)) is not None  # unknown keys are ignored
    assert sim.order_send(**market()).retcode == codes.TRADE_RETCODE_DONE  # fields as kwargs
    assert sim.order_send(market(), magic=1) is None
    assert sim.last_error() == (-2, "Unnamed arguments not allowed")
    assert sim.order_send() is None
    assert sim.last_error() == (-2, "Invalid number of arguments")
    with pytest.raises(SystemError):  # a negative unsigned field leaves OverflowError set
        sim.order_send(market(magic=-1))


def test_every_minus_2_message_the_simulator_uses_is_in_the_package() -> None:
    used = {codes.MSG_INVALID_ARGUMENTS, codes.MSG_UNNAMED_ARGUMENTS,
            codes.MSG_INVALID_NUMBER_OF_ARGUMENTS, *codes.MSG_ORDINAL_ARGUMENT}
    used |= {codes.msg_invalid_request_field(f) for f, _kind in _REQUEST_FIELDS}
    used |= {codes.msg_invalid_request_field(f) for f in (
        "login", "server", "password", "timeout", "path", "ticket", "group", "position")}
    assert used <= set(REFERENCE["argument_messages"])


# --- errors and messages -------------------------------------------------------------------


def test_last_error_before_any_call_is_zero_and_empty() -> None:
    terminal = TerminalSimulator(clock=Clock())
    assert terminal.last_error() == tuple(REFERENCE["last_error"]["initial"]) == (0, "")


def test_shutdown_returns_true(sim: TerminalSimulator) -> None:
    assert sim.shutdown() is True
    assert sim.symbol_info("EURUSD") is None
    assert sim.last_error() == (-10004, "No IPC connection")


def test_default_messages_are_the_packages() -> None:
    defaults = {int(code): message
                for code, message in REFERENCE["last_error"]["defaults"].items()}
    assert codes.LAST_ERROR_MESSAGE == defaults


def test_a_terminal_that_cannot_start_names_its_path(sim: TerminalSimulator) -> None:
    sim.inject("terminal_crash")
    assert sim.initialize("D:\\MT5\\terminal64.exe") is False
    assert sim.last_error() == (
        -10003, "IPC initialize failed, Process create failed 'D:\\MT5\\terminal64.exe'")


# --- dates ---------------------------------------------------------------------------------


@pytest.fixture
def tokyo_time() -> Iterator[None]:
    """The host in UTC+9, so a naive datetime read as local differs from one read as UTC."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Tokyo"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


def test_naive_datetimes_are_the_hosts_local_time(
    sim: TerminalSimulator, tokyo_time: None
) -> None:
    naive = datetime.fromtimestamp(NOW - 30)  # local wall time of that instant
    ticks = sim.copy_ticks_range("EURUSD", naive, NOW, codes.COPY_TICKS_ALL)
    assert ticks is not None and len(ticks) == 31
    assert int(ticks["time"][0]) == NOW - 30
    as_if_utc = sim.copy_ticks_range("EURUSD", naive.replace(hour=(naive.hour - 9) % 24), NOW,
                                     codes.COPY_TICKS_ALL)
    assert as_if_utc is not None and len(as_if_utc) != 31


def test_float_dates_are_truncated(sim: TerminalSimulator) -> None:
    ticks = sim.copy_ticks_range("EURUSD", NOW - 9.9, NOW, codes.COPY_TICKS_ALL)
    assert int(ticks["time"][0]) == NOW - 10  # cut to whole seconds, not rounded up


# --- helpers and the actor -----------------------------------------------------------------


def test_buy_sell_and_close_behave_as_the_packages_helpers(sim: TerminalSimulator) -> None:
    bought = sim.Buy("EURUSD", 0.1, comment="helper")
    assert bought.retcode == codes.TRADE_RETCODE_DONE
    assert bought.request.deviation == 10 and bought.request.comment == "helper"
    assert sim.Sell("EURUSD", 0.2).retcode == codes.TRADE_RETCODE_DONE
    assert sim.Buy("EURUSD", 1) is None  # an int volume, as with the package
    assert sim.last_error() == (-2, 'Invalid "volume" argument')
    assert sim.Close("EURUSD") is True
    assert sim.positions_get(symbol="EURUSD") == ()
    assert sim.Close("EURUSD") is False  # nothing to close


def test_the_actors_order_tag_fits_the_comment_limit(sim: TerminalSimulator) -> None:
    assert TAG_MAX_CHARS == COMMENT_MAX_LENGTH
    longest = order_tag(99_999, 10**40)
    assert len(longest) <= TAG_MAX_CHARS
    assert sim.order_send(market(comment=longest)).retcode == codes.TRADE_RETCODE_DONE
    assert sim.positions_get(symbol="EURUSD")[0].comment == longest


def test_login_takes_password_then_server_positionally(sim: TerminalSimulator) -> None:
    assert FUNCTIONS["login"]["keywords"]["positional"] == ["login", "password", "server"]
    assert sim.login(7_000_001, "secret", "Other-Server") is True
    assert (sim.account_info().login, sim.account_info().server) == (7_000_001, "Other-Server")
    assert sim.login(7_000_001, "secret", "S" * (REFERENCE["credential_max_chars"] + 1)) is False
    assert sim.last_error() == (-2, "Invalid 3rd unnamed argument")
    assert sim.login() is False
    assert sim.last_error() == (-2, "Invalid number of arguments")


async def test_a_worker_survives_the_exceptions_the_package_raises() -> None:
    from actors.mt5.worker import InlineWorker, ThreadWorker

    for worker_type in (InlineWorker, ThreadWorker):
        terminal = TerminalSimulator(clock=Clock(), history_days=1)
        worker = worker_type(terminal)
        try:
            assert (await worker.call("initialize", (), {}))[0] is True
            with pytest.raises(TypeError):
                await worker.call("symbol_info_tick", (), {"symbol": "EURUSD"})
            with pytest.raises(SystemError):
                await worker.call("copy_rates_from_pos", ("EURUSD", "H1", 0, 10), {})
            tick, error = await worker.call("symbol_info_tick", ("EURUSD",), {})
            assert type(tick) is records.Tick and error == (1, "Success")
        finally:
            worker.retire()


def test_records_pickle_for_a_worker_process(sim: TerminalSimulator) -> None:
    """Our one departure: the types name their module, so records cross a process pipe."""
    import pickle

    result = sim.order_send(market())
    again = pickle.loads(pickle.dumps(result))
    assert again == result and type(again.request) is records.TradeRequest
