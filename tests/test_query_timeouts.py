"""A slow statement on a live database is a query failure, not a lost database (issue 9,
finding 1): ``TIMEOUT``, no retries, no breaker count, the actor stays CONNECTED. Against
a real PostgreSQL server, in real time."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from actors.questdb.pgserver import EmbeddedPostgres
from supervision.errors import ErrorCode, Response
from supervision.shell.config import RuntimeConfig
from supervision.shell.runtime import open_runtime

pytestmark = pytest.mark.realserver


def config_for(tmp_path: Path, dsn: str, command_timeout_s: float = 0.5) -> RuntimeConfig:
    return RuntimeConfig.from_mapping({
        "runtime": {"state_dir": str(tmp_path / "var"), "fsync": "never"},
        "control": {"enabled": False},
        "health": {"enabled": False},
        "mt5": {"enabled": False},
        "questdb": {"dsn": dsn, "command_timeout_s": command_timeout_s, "call_timeout_s": 5.0,
                    "persist_events": False},
    }, env={})


async def test_a_statement_past_its_timeout_is_a_query_timeout(
        tmp_path: Path, pg_server: EmbeddedPostgres) -> None:
    async with open_runtime(config_for(tmp_path, pg_server.dsn)) as rt:
        assert rt.state("questdb") == "CONNECTED"
        for _ in range(6):  # more than the breaker's threshold (5)
            slow = await rt.questdb.fetchval("SELECT pg_sleep(3)")
            assert slow.status == "error" and slow.error is not None, slow
            assert slow.error.code is ErrorCode.TIMEOUT, slow
            assert slow.error.message.startswith("fetchval failed: ")
            assert rt.state("questdb") == "CONNECTED"
        row = rt.status()["actors"]
        questdb = next(a for a in row if a["name"] == "questdb")
        assert questdb["state"] == "CONNECTED" and questdb["breaker"] in ("CLOSED", "closed")
        with trio.fail_after(5):
            assert (await rt.questdb.fetchval("SELECT 1")).data == 1


async def test_control_channel_sql_has_a_pool_of_its_own(
        tmp_path: Path, pg_server: EmbeddedPostgres) -> None:
    async with open_runtime(config_for(tmp_path, pg_server.dsn, 10.0)) as rt:
        answers: list[Response] = []
        finished: list[str] = []

        async def control_sleep() -> None:
            answers.append(await rt.call("questdb", "fetchval",
                                         {"sql": "SELECT pg_sleep(2)"}, 5.0))
            finished.append("control")

        async with trio.open_nursery() as nursery:
            for _ in range(6):  # more than the bot's pool (4) and the control pool (2)
                nursery.start_soon(control_sleep)
            await trio.sleep(0.2)  # let them all reach the database
            # The bot's own call is not queued behind them.
            bot = await rt.questdb.fetchval("SELECT 1")
            finished.append("bot")
            assert bot.data == 1, bot
            assert finished.count("control") == 4  # only the refusals came back before it
        codes = sorted(str(a.error.code if a.error else a.status) for a in answers)
        # Two ran (pg_sleep(2) returns NULL), four were refused at once: the pool was busy.
        assert codes == ["TIMEOUT"] * 4 + ["ok"] * 2, answers
        assert all(a.reason == "busy" for a in answers if a.error), answers
        actor = rt.supervisor.children["questdb"].actor
        assert actor.query_pool is not None and actor.query_pool.get_size() <= 2
        assert rt.state("questdb") == "CONNECTED"


async def test_with_an_external_dsn_control_sql_runs_as_the_query_dsn_user(
        tmp_path: Path, pg_server: EmbeddedPostgres) -> None:
    # questdb.query_dsn: the control channel's free-form SQL connects as its own
    # least-privilege user; the bot's own SQL keeps the runtime's.
    async with open_runtime(config_for(tmp_path, pg_server.dsn)) as rt:
        made = await rt.questdb.execute(
            "CREATE ROLE sup_reader LOGIN PASSWORD 'reader-pw' NOSUPERUSER")
        assert made.ok, made
    parts = pg_server.dsn.split("@", 1)
    query_dsn = "postgresql://sup_reader:reader-pw@" + parts[1]
    config = config_for(tmp_path, pg_server.dsn)
    values = {s: dict(v) for s, v in config.values.items()}
    values["questdb"]["query_dsn"] = query_dsn
    config = RuntimeConfig.from_mapping(values, env={})
    async with open_runtime(config) as rt:
        control = await rt.call("questdb", "fetchval", {"sql": "SELECT current_user"}, 5.0)
        bot = await rt.questdb.fetchval("SELECT current_user")
        assert control.ok and control.data == "sup_reader", control
        assert bot.ok and bot.data != "sup_reader", bot
        # Its password is never shown.
        assert "reader-pw" not in repr(rt.status())
