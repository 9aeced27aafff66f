"""The typed MT5 API: real methods with the package's signatures, checked by a type checker.

``Mt5Ref`` has one async method per function the actor serves, positional-only where the
package is, ``-> Response``; mypy (run on a bot snippet) catches a misspelt function and a
keyword the package refuses; the distribution ships ``py.typed``. Then every method is
called once through the actor (inline worker, virtual time) to show the names it sends are
the ones the actor binds.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import trio

from actors.cache import TtlCache
from actors.mt5 import codes
from actors.mt5.actor import Mt5Actor
from actors.mt5.api import SIGNATURES, Mt5Ref
from actors.mt5.simulator import PACKAGE_FUNCTIONS, TerminalSimulator
from supervision.errors import Response
from supervision.supervisor import ChildSpec
from tests.support.actors import running_supervisor

REPO = Path(__file__).resolve().parents[1]


def test_every_served_function_is_a_real_method_with_the_package_signature():
    for op, (positional, keywords) in SIGNATURES.items():
        assert op in PACKAGE_FUNCTIONS, op  # a real MetaTrader5 function
        method = Mt5Ref.__dict__.get(op)
        assert method is not None and inspect.iscoroutinefunction(method), op
        assert method.__doc__ and op in method.__doc__, op
        params = list(inspect.signature(method).parameters.values())[1:]  # less self
        assert [p.name for p in params if p.kind is p.POSITIONAL_ONLY] == list(positional), op
        assert [p.name for p in params if p.kind is p.KEYWORD_ONLY] == [
            *keywords, "timeout_s"], op
        assert inspect.signature(method).return_annotation in ("Response", Response), op
    assert not hasattr(Mt5Ref, "__getattr__")  # a misspelt name is an AttributeError


def test_the_distribution_ships_py_typed():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_data = data["tool"]["setuptools"]["package-data"]
    for package in ("supervision", "actors"):
        assert "py.typed" in package_data[package]
        assert (REPO / package / "py.typed").is_file()


BOT = '''
from supervision import RuntimeConfig, open_runtime


async def bot() -> None:
    async with open_runtime(RuntimeConfig()) as rt:
        tick = await rt.mt5.symbol_info_tick("EURUSD")
        reveal_type(tick)
        await rt.mt5.symbol_info_tik("EURUSD")
        await rt.terminal("acct2").symbol_info(symbol="EURUSD")
        await rt.mt5.copy_rates_from_pos("EURUSD", 16385, 0)
'''


def test_mypy_catches_a_misspelt_function_and_a_refused_keyword(tmp_path):
    bot = tmp_path / "bot.py"
    bot.write_text(BOT)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--follow-imports=silent",
         "--cache-dir", str(tmp_path / "cache"), str(bot)],
        capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    out = result.stdout
    assert 'Revealed type is "supervision.errors.Response"' in out, out
    assert '"Mt5Ref" has no attribute "symbol_info_tik"' in out, out
    assert 'Unexpected keyword argument "symbol"' in out, out
    assert 'Too few arguments for "copy_rates_from_pos"' in out, out
    assert out.count("error:") == 3, out


async def test_every_method_reaches_the_terminal_through_the_actor(tmp_path, autojump_clock):
    sim = TerminalSimulator(clock=trio.current_time)
    day = datetime(2024, 1, 5, tzinfo=UTC)
    week = (datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 9, tzinfo=UTC))
    buy = {"action": codes.TRADE_ACTION_DEAL, "symbol": "EURUSD", "volume": 0.1,
           "type": codes.ORDER_TYPE_BUY, "type_filling": codes.ORDER_FILLING_IOC}
    async with running_supervisor(tmp_path, lkg=TtlCache()) as sup:
        ref = await sup.start_child(ChildSpec(
            "mt5", lambda: Mt5Actor(lambda: sim, inline=True), ref_class=Mt5Ref))
        assert isinstance(ref, Mt5Ref)
        calls = {
            "version": ref.version(),
            "terminal_info": ref.terminal_info(),
            "account_info": ref.account_info(),
            "symbols_total": ref.symbols_total(),
            "symbols_get": ref.symbols_get(group="EUR*"),
            "symbol_info": ref.symbol_info("EURUSD"),
            "symbol_select": ref.symbol_select("EURUSD", True),
            "symbol_info_tick": ref.symbol_info_tick("EURUSD"),
            "market_book_add": ref.market_book_add("EURUSD"),
            "market_book_get": ref.market_book_get("EURUSD"),
            "market_book_release": ref.market_book_release("EURUSD"),
            "copy_rates_from": ref.copy_rates_from("EURUSD", codes.TIMEFRAME_H1, day, 5),
            "copy_rates_from_pos": ref.copy_rates_from_pos("EURUSD", codes.TIMEFRAME_H1, 0, 5),
            "copy_rates_range": ref.copy_rates_range("EURUSD", codes.TIMEFRAME_H1, *week),
            "copy_ticks_from": ref.copy_ticks_from("EURUSD", day, 5, codes.COPY_TICKS_ALL),
            "copy_ticks_range": ref.copy_ticks_range(
                "EURUSD", day, datetime(2024, 1, 5, 0, 1, tzinfo=UTC), codes.COPY_TICKS_ALL),
            "order_calc_margin": ref.order_calc_margin(
                codes.ORDER_TYPE_BUY, "EURUSD", 0.1, 1.1),
            "order_calc_profit": ref.order_calc_profit(
                codes.ORDER_TYPE_BUY, "EURUSD", 0.1, 1.1, 1.2),
            "order_check": ref.order_check(buy),
            "order_send": ref.order_send(buy),
            "positions_total": ref.positions_total(),
            "positions_get": ref.positions_get(symbol="EURUSD"),
            "orders_total": ref.orders_total(),
            "orders_get": ref.orders_get(),
            "history_orders_total": ref.history_orders_total(*week),
            "history_orders_get": ref.history_orders_get(*week, group="*"),
            "history_deals_total": ref.history_deals_total(*week),
            "history_deals_get": ref.history_deals_get(*week),
        }
        assert set(calls) == set(SIGNATURES)
        for op, call in calls.items():
            response = await call
            assert response.ok, (op, response.error)
        positions = await ref.positions_get(symbol="EURUSD")
        assert len(positions.data) == 1
