"""Many terminals: ``[mt5.terminals.NAME]`` adds an actor ``mt5-NAME`` with its own worker
process, breaker, backoff, health check, ledger and metrics.

In real time through ``open_runtime`` (the process worker): one terminal crashes and
escalates while the other keeps trading; the ``on_escalate`` hook is told which one; the
accounts never see each other's positions. Plus the configuration rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from actors.mt5 import codes
from supervision.errors import ErrorCode, ErrorInfo
from supervision.shell.config import ConfigError, RuntimeConfig
from supervision.shell.runtime import open_runtime
from tests.support.waiting import eventually
from tests.test_mt5_process_worker import child_pids

FAST = {"backoff_base_s": 0.1, "health_interval_s": 0.5, "call_timeout_s": 5.0,
        "connect_timeout_s": 30.0, "shutdown_timeout_s": 2.0}
BUY = {"action": codes.TRADE_ACTION_DEAL, "symbol": "EURUSD", "volume": 0.1,
       "type": codes.ORDER_TYPE_BUY, "deviation": 20, "type_filling": codes.ORDER_FILLING_IOC}


def two_terminals(tmp_path: Path, env: dict[str, str] | None = None) -> RuntimeConfig:
    return RuntimeConfig.from_mapping({
        "runtime": {"state_dir": str(tmp_path), "fsync": "never"},
        "control": {"enabled": False},
        "health": {"enabled": False},
        "questdb": {"enabled": False},
        "mt5": {"login": 1001, **FAST, "terminals": {"acct2": {"login": 2002}}},
    }, source="test.toml", env=env or {})


async def wait_state(rt: Any, name: str, state: str, limit_s: float = 30.0) -> None:
    await eventually(lambda: rt.state(name) == state, within_s=limit_s)


async def test_one_terminal_crashes_and_escalates_while_the_other_keeps_trading(tmp_path):
    escalated: list[tuple[str, ErrorInfo | None]] = []

    def on_escalate(actor: str, error: ErrorInfo | None) -> None:
        escalated.append((actor, error))

    async with open_runtime(two_terminals(tmp_path), on_escalate=on_escalate) as rt:
        acct2 = rt.ref("mt5-acct2")
        assert rt.state("mt5") == rt.state("mt5-acct2") == "CONNECTED"
        # Each its own process, its own account.
        hosts = {h.name: h for h in rt.terminal_hosts}
        assert hosts["mt5"].pid != hosts["mt5-acct2"].pid
        assert (await rt.mt5.account_info()).data.login == 1001
        assert (await acct2.account_info()).data.login == 2002

        await rt.inject("terminal_crash", actor="mt5-acct2")
        assert (await acct2.symbol_info_tick("EURUSD")).status in ("error", "degraded")
        trades = 0
        with trio.fail_after(30):
            # The hook runs just after the state change is published: wait for both.
            while rt.state("mt5-acct2") != "ERROR" or not escalated:
                r = await rt.mt5.order_send(BUY)  # the other account trades all along
                assert r.ok, r.error
                trades += 1
                await trio.sleep(0.05)
        assert trades >= 1
        assert rt.state("mt5") == "CONNECTED"
        assert [a for a, _ in escalated] == ["mt5-acct2"]
        refused = await acct2.order_send(BUY)
        assert refused.error is not None
        assert refused.error.code is ErrorCode.ACTOR_UNAVAILABLE
        assert refused.error.actor == "mt5-acct2"

        # Status shows both; the crashed one recovers on its own once the terminal is back.
        names = {a["name"] for a in rt.status()["actors"]}
        assert {"mt5", "mt5-acct2"} <= names
        await rt.inject("clear", actor="mt5-acct2")
        await wait_state(rt, "mt5-acct2", "CONNECTED")

        # Different accounts never see each other's positions.
        mine = await rt.mt5.positions_get(symbol="EURUSD")
        theirs = await acct2.positions_get(symbol="EURUSD")
        assert mine.ok and len(mine.data) == trades
        assert theirs.ok and theirs.data == ()
    assert child_pids() == set()


async def test_health_and_metrics_show_every_terminal(tmp_path):
    async with open_runtime(two_terminals(tmp_path)) as rt:
        status, document = rt.health()
        text = repr(document)
        assert "mt5-acct2" in text and "'mt5'" in text
        extras = {a["name"]: a["extra"] for a in rt.status()["actors"]
                  if a["name"].startswith("mt5")}
        assert extras["mt5"]["worker_pid"] != extras["mt5-acct2"]["worker_pid"]


def test_terminal_sections_inherit_mt5_and_take_their_own_password():
    config = RuntimeConfig.from_mapping({
        "mt5": {"login": 1, "call_timeout_s": 3.0,
                "terminals": {"acct2": {"login": 2}, "acct3": {"password_env": "PW3",
                                                               "worker": "thread"}}},
    }, source="x.toml", env={"MT5_PASSWORD": "main", "MT5_PASSWORD_ACCT2": "two",
                             "PW3": "three"})
    assert config.terminals["acct2"]["login"] == 2
    assert config.terminals["acct2"]["call_timeout_s"] == 3.0
    assert config.terminals["acct3"]["login"] == 1
    assert config.terminals["acct3"]["worker"] == "thread"
    assert config.mt5_password == "main"
    assert config.terminal_password("acct2") == "two"
    assert config.terminal_password("acct3") == "three"
    assert config.terminal_settings("acct2").call_timeout_s == 3.0


def test_environment_overrides_reach_a_terminal_the_file_declares():
    config = RuntimeConfig.from_mapping({
        "mt5": {"login": 1, "terminals": {"acct2": {"login": 2}, "acct2_b": {"login": 3}}},
    }, source="x.toml", env={"MT5SUP_MT5_TERMINALS_ACCT2_LOGIN": "20",
                             "MT5SUP_MT5_TERMINALS_ACCT2_B_CALL_TIMEOUT_S": "4.5",
                             "MT5SUP_MT5_CALL_TIMEOUT_S": "7.0"})
    assert config.terminals["acct2"]["login"] == 20
    assert config.terminals["acct2"]["call_timeout_s"] == 7.0  # [mt5]'s, from its variable
    assert config.terminals["acct2_b"]["login"] == 3  # a longer name is its own terminal
    assert config.terminals["acct2_b"]["call_timeout_s"] == 4.5
    assert config["mt5"]["login"] == 1


@pytest.mark.parametrize(("env", "words"), [
    ({"MT5SUP_MT5_TERMINALS_ACCT9_LOGIN": "9"},
     ["MT5SUP_MT5_TERMINALS_ACCT9_LOGIN", "acct2"]),  # env adjusts, never creates
    ({"MT5SUP_MT5_TERMINALS_ACCT2_LOGON": "9"}, ["MT5SUP_MT5_TERMINALS_ACCT2_LOGON"]),
    ({"MT5SUP_MT5_TERMINALS_ACCT2_LOGIN": "two"}, ["MT5SUP_MT5_TERMINALS_ACCT2_LOGIN"]),
    ({"MT5SUP_MT5_TERMINALS_ACCT2_LOGIN": "2"},
     ["MT5SUP_MT5_TERMINALS_ACCT2_LOGIN", "Acct2 and acct2"]),  # which one? refused
])
def test_bad_terminal_environment_overrides_are_refused_naming_the_variable(env, words):
    with pytest.raises(ConfigError) as refused:
        RuntimeConfig.from_mapping({"mt5": {"terminals": {"acct2": {"login": 2},
                                                          "Acct2": {"login": 3}}}},
                                   source="x.toml", env=env)
    for word in words:
        assert word in str(refused.value)


@pytest.mark.parametrize(("table", "words"), [
    ({"acct2": {"pasword_env": "X"}}, ["mt5.terminals.acct2.pasword_env", "x.toml"]),
    ({"acct2": {"worker": "fiber"}}, ["mt5.terminals.acct2.worker", "x.toml"]),
    ({"acct2": {"login": "two"}}, ["mt5.terminals.acct2.login", "x.toml"]),
    ({"bad name": {}}, ["bad name", "x.toml"]),
    ({"acct2": 3}, ["mt5.terminals.acct2", "x.toml"]),
])
def test_bad_terminal_sections_are_refused_naming_the_key_and_the_file(table, words):
    with pytest.raises(ConfigError) as refused:
        RuntimeConfig.from_mapping({"mt5": {"terminals": table}}, source="x.toml", env={})
    for word in words:
        assert word in str(refused.value)


@pytest.mark.parametrize(("mt5", "words"), [
    ({"backend": "metatrader5", "path": "C:/MT5/terminal64.exe"},
     ["[mt5.terminals.acct2] and [mt5]", "C:/MT5/terminal64.exe", "x.toml"]),
    ({"backend": "mt5linux", "host": "10.0.0.5", "port": 18812},
     ["[mt5.terminals.acct2] and [mt5]", "10.0.0.5:18812"]),
])
def test_two_accounts_on_one_real_terminal_are_refused(mt5, words):
    # A section that sets only its login inherits [mt5]'s terminal: the second initialize()
    # would switch the shared terminal's account under the first actor.
    with pytest.raises(ConfigError) as refused:
        RuntimeConfig.from_mapping({"mt5": {**mt5, "login": 1, "terminals": {
            "acct2": {"login": 2}}}}, source="x.toml", env={})
    for word in words:
        assert word in str(refused.value)
    # Their own terminals: accepted.
    own = ({"path": "C:/MT5-2/terminal64.exe"} if mt5["backend"] == "metatrader5"
           else {"port": 18813})
    config = RuntimeConfig.from_mapping({"mt5": {**mt5, "login": 1, "terminals": {
        "acct2": {"login": 2, **own}}}}, source="x.toml", env={})
    assert config.terminals["acct2"]["login"] == 2


def test_a_toml_file_with_terminal_sections_loads(tmp_path):
    path = tmp_path / "runtime.toml"
    path.write_text('[mt5]\nworker = "process"\n\n[mt5.terminals.acct2]\nbackend = '
                    '"simulator"\nlogin = 7\n', encoding="utf-8")
    config = RuntimeConfig.load(path, env={})
    assert list(config.terminals) == ["acct2"]
    assert config.terminals["acct2"]["login"] == 7


async def test_thread_and_inline_workers_still_run_terminals(tmp_path):
    config = RuntimeConfig.from_mapping({
        "runtime": {"state_dir": str(tmp_path), "fsync": "never"},
        "control": {"enabled": False},
        "health": {"enabled": False},
        "questdb": {"enabled": False},
        "mt5": {"worker": "thread", **FAST, "terminals": {"acct2": {"worker": "inline"}}},
    }, source="test.toml", env={})
    async with open_runtime(config) as rt:
        assert rt.terminal_hosts == []  # no worker process for these
        for name in ("mt5", "mt5-acct2"):
            assert rt.state(name) == "CONNECTED"
            assert (await rt.terminal(name).symbol_info_tick("EURUSD")).ok
        await rt.inject("autotrading_off", actor="mt5-acct2")
        refused = await rt.terminal("acct2").order_send(BUY)
        assert refused.error is not None
        assert refused.error.code is ErrorCode.AUTOTRADING_DISABLED
        assert (await rt.mt5.order_send(BUY)).ok  # the other account is untouched
        with pytest.raises(ValueError, match="no MT5 terminal actor named 'mt5-nope'"):
            await rt.inject("clear", actor="mt5-nope")


def test_the_inline_worker_is_refused_for_a_real_terminal():
    from actors.mt5.actor import make_mt5_actor

    config = RuntimeConfig.from_mapping(
        {"mt5": {"backend": "metatrader5", "worker": "inline"}}, env={})
    with pytest.raises(ValueError, match="inline"):
        make_mt5_actor(config)


async def test_a_lost_reply_on_one_account_is_reconciled_there_and_never_sent_twice(tmp_path):
    async with open_runtime(two_terminals(tmp_path)) as rt:
        acct2 = rt.terminal("acct2")
        await rt.inject("lost_reply", actor="mt5-acct2")
        lost = await acct2.order_send(BUY)
        assert lost.error is not None and lost.error.code is ErrorCode.ORDER_STATE_UNKNOWN
        assert (await rt.mt5.order_send(BUY)).ok  # the other account: its own ledger
        again = await acct2.order_send(BUY)
        assert again.ok and again.data.comment.startswith("reconciled")
        assert len((await acct2.positions_get(symbol="EURUSD")).data) == 1
        assert len((await rt.mt5.positions_get(symbol="EURUSD")).data) == 1
        extras = {a["name"]: a["extra"] for a in rt.status()["actors"]}
        assert extras["mt5-acct2"]["reconciled_orders"] == 1
        assert extras["mt5"]["reconciled_orders"] == 0
