"""The mt5linux bridge, driven for real: the real ``mt5linux`` client (0.1.x, rpyc classic)
in the terminal's worker process, against an rpyc classic server that serves our simulator
in place of the Windows package (``tests/support/mt5linux_server.py``). Real time.

The bridge's own failure modes: the server gone (a lost terminal, then a reconnect once it
is back), the server slow (the call's deadline kills the worker process), and rpyc's
``result expired`` (the bridge's own timeout, ``terminal_timeout_ms``, shorter than the
call's deadline: MT5_IPC_TIMEOUT and a fresh connection, the process kept).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from actors.mt5 import codes
from actors.mt5.actor import Mt5Ref
from actors.mt5.process_worker import TerminalHost
from actors.mt5.terminal_process import BackendRecipe
from supervision.errors import ErrorCode
from supervision.settings import ActorSettings
from tests.support.actors import Recorder
from tests.support.e2e import free_port
from tests.support.mt5 import hosted_terminal
from tests.support.waiting import eventually

if os.environ.get("CI", "").lower() in ("true", "1"):
    import mt5linux  # noqa: F401
    import rpyc  # CI installs both (.ci/run): a missing one fails there, never skips
else:
    rpyc = pytest.importorskip("rpyc", reason="the bridge extra is not installed")
    pytest.importorskip("mt5linux", reason="pip install --no-deps 'mt5linux>=0.1.9,<0.2'")

REPO = Path(__file__).resolve().parents[1]
# Constant backoff, many attempts: the actor keeps trying while a test restarts the server.
SETTINGS = ActorSettings(backoff_base_s=0.2, backoff_factor=1.0, max_attempts=1000,
                         connect_timeout_s=30.0, shutdown_timeout_s=3.0,
                         health_interval_s=3600.0, call_timeout_s=20.0)
BUY = {"action": codes.TRADE_ACTION_DEAL, "symbol": "EURUSD", "volume": 0.1,
       "type": codes.ORDER_TYPE_BUY, "deviation": 20, "type_filling": codes.ORDER_FILLING_IOC}


@contextlib.asynccontextmanager
async def bridge_server(port: int) -> AsyncIterator[trio.Process]:
    """``python -m tests.support.mt5linux_server`` until the block ends (killed and reaped)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.support.mt5linux_server", "--port", str(port)],
        stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert process.stdout is not None
        with trio.fail_after(60):
            line = b""
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(1)
                assert chunk, "the bridge server exited before it was ready"
                line += chunk
        assert line.decode().strip() == f"ready {port}"
        yield process
    finally:
        with trio.CancelScope(shield=True):
            process.kill()
            await process.wait()
            await process.stdout.aclose()  # type: ignore[union-attr]


async def simulator_inject(port: int, fault: str, **params: Any) -> None:
    """A fault in the server's simulator, through a classic connection of the test's own."""
    def inject() -> None:
        conn = rpyc.classic.connect("127.0.0.1", port)
        try:
            conn.modules.MetaTrader5.simulator.inject(fault, **params)
        finally:
            conn.close()

    await trio.to_thread.run_sync(inject)


@contextlib.asynccontextmanager
async def bridged_terminal(tmp_path: Path, port: int, *, ipc_timeout_s: float = 60.0
                           ) -> AsyncIterator[tuple[Mt5Ref, TerminalHost, Recorder]]:
    recipe = BackendRecipe("mt5linux", port=port, ipc_timeout_s=ipc_timeout_s)
    async with hosted_terminal(tmp_path, recipe, SETTINGS) as (_sup, ref, host, rec):
        yield ref, host, rec


async def test_the_real_client_trades_through_the_bridge(tmp_path):
    port = free_port()
    async with bridge_server(port), bridged_terminal(tmp_path, port) as (ref, _host, _rec):
        assert ref.state == "CONNECTED"
        assert (await ref.account_info()).data.login > 0
        tick = await ref.symbol_info_tick("EURUSD")
        assert tick.ok and tick.data.ask > tick.data.bid > 0
        sent = await ref.order_send(BUY)
        assert sent.ok and sent.data.retcode == codes.TRADE_RETCODE_DONE
        positions = await ref.positions_get(symbol="EURUSD")
        assert positions.ok and len(positions.data) == 1
        # Dates cross as source text: the client's `datetime.datetime(...)` must evaluate.
        now = datetime.now(UTC)
        deals = await ref.history_deals_get(now - timedelta(days=3650),
                                            now + timedelta(days=3650))
        assert deals.ok, deals.error
        refused = await ref.symbol_info_tick("NOSUCH")
        assert refused.error is not None and refused.error.code is ErrorCode.NOT_FOUND


async def test_the_server_gone_is_a_lost_terminal_and_its_return_a_reconnect(tmp_path):
    port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(bridge_server(port))
        ref, host, _rec = await stack.enter_async_context(bridged_terminal(tmp_path, port))
        assert (await ref.symbol_info_tick("EURUSD")).ok
        pid = host.pid
        server.kill()
        await server.wait()
        gone = await ref.symbol_info_tick("EURUSD")
        assert gone.error is not None and gone.error.code is ErrorCode.MT5_IPC_FAILED
        await eventually(lambda: ref.state == "RECONNECTING", within_s=30.0)
        async with bridge_server(port):  # back, on the same port
            await eventually(lambda: ref.state == "CONNECTED", within_s=60.0)
            assert (await ref.symbol_info_tick("EURUSD")).ok
        # The bridge reconnected inside the same worker process: no kill was needed.
        assert host.pid == pid and host.killed == 0


async def test_a_slow_server_meets_the_call_deadline_and_the_process_is_replaced(tmp_path):
    port = free_port()
    async with bridge_server(port), bridged_terminal(tmp_path, port) as (ref, host, rec):
        await simulator_inject(port, "slow", delay_s=30.0)
        r = await ref.symbol_info_tick("EURUSD", timeout_s=1.0)
        assert r.error is not None and r.error.code is ErrorCode.TIMEOUT
        await simulator_inject(port, "clear")
        await rec.wait_for(lambda e: e.kind == "state_changed"
                           and e.data["reason"] == "attempt 1 ok", timeout=60.0)
        assert host.killed == 1 and host.started == 2
        assert (await ref.symbol_info_tick("EURUSD")).ok


async def test_result_expired_is_an_ipc_timeout_and_a_fresh_connection(tmp_path):
    port = free_port()
    async with bridge_server(port), bridged_terminal(
            tmp_path, port, ipc_timeout_s=1.0) as (ref, host, rec):
        pid = host.pid
        await simulator_inject(port, "slow", delay_s=3.0)
        r = await ref.symbol_info_tick("EURUSD", timeout_s=15.0)
        assert r.error is not None and r.error.code is ErrorCode.MT5_IPC_TIMEOUT
        assert "result expired" in r.error.message
        await simulator_inject(port, "clear")
        await rec.wait_for(lambda e: e.kind == "state_changed"
                           and e.data["reason"] == "attempt 1 ok", timeout=60.0)
        assert (await ref.symbol_info_tick("EURUSD")).ok
        assert host.pid == pid and host.killed == 0  # the bridge's own timeout: no kill
