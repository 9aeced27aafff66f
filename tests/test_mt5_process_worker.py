"""The process worker in real time: the simulator in its own OS process, over a pipe.

A hung terminal call is killed at its deadline (the process, not a thread), a fresh process
takes over, the actor is CONNECTED again and nothing is left behind: no process, not even a
zombie (checked in /proc), no thread (``threading.enumerate``). A lost
order reply is reconciled in the worker process and never becomes a second order.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from pathlib import Path

import pytest
import trio

from actors.mt5 import codes
from actors.mt5.actor import Mt5Ref
from actors.mt5.process_worker import FaultLedger, TerminalHost
from actors.mt5.terminal_process import BackendRecipe
from actors.mt5.worker import ABANDONED
from supervision.errors import ErrorCode
from supervision.events import Event
from supervision.settings import ActorSettings
from supervision.supervisor import Supervisor
from tests.support.actors import Recorder
from tests.support.mt5 import hosted_terminal

DEADLINE_S = 0.5
SETTINGS = ActorSettings(backoff_base_s=0.2, shutdown_timeout_s=2.0, connect_timeout_s=30.0,
                         health_interval_s=3600.0)
BUY = {"action": codes.TRADE_ACTION_DEAL, "symbol": "EURUSD", "volume": 0.1,
       "type": codes.ORDER_TYPE_BUY, "deviation": 20, "type_filling": codes.ORDER_FILLING_IOC}


def pid_exists(pid: int) -> bool:
    """Also true for a zombie: a killed process must have been reaped too."""
    return Path(f"/proc/{pid}").exists()


def our_threads() -> set[threading.Thread]:
    """Live threads, less trio's idle worker cache (``to_thread``, reused, exits when idle):
    what a worker could have left behind."""
    return {t for t in threading.enumerate() if not t.name.startswith("Trio thread")}


def child_pids() -> set[int]:
    """This process's children (any state, zombies included), from /proc."""
    me = os.getpid()
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == me:
            children.add(int(stat.parent.name))
    return children


def terminal(tmp_path: Path, name: str = "mt5"
             ) -> contextlib.AbstractAsyncContextManager[
                 tuple[Supervisor, Mt5Ref, TerminalHost, Recorder]]:
    return hosted_terminal(tmp_path, BackendRecipe("simulator"), SETTINGS, name)


def first_recovery(e: Event) -> bool:
    return e.kind == "state_changed" and e.data["reason"] == "attempt 1 ok"


def a_recovery(e: Event) -> bool:
    """Back to CONNECTED after any attempt ("attempt 2 ok" the second time: within
    stable_s of a recovery, the budget goes on)."""
    return e.kind == "state_changed" and bool(
        re.fullmatch(r"attempt \d ok", e.data["reason"] or ""))


async def kill_the_process(host: TerminalHost, ref: Mt5Ref) -> int:
    """SIGKILL the terminal's process (a crash); the next call finds the pipe gone.
    Returns the killed pid."""
    pid = host.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    r = await ref.symbol_info_tick("EURUSD")
    assert r.error is not None and r.error.code is ErrorCode.MT5_IPC_FAILED
    return pid


async def test_a_hung_call_kills_the_process_and_a_fresh_one_takes_over(tmp_path):
    threads_before = our_threads()
    # Process-global (a real runtime has one): earlier tests' thread workers may count.
    abandoned_before = ABANDONED.total
    async with terminal(tmp_path) as (sup, ref, host, rec):
        assert ref.state == "CONNECTED"
        first_pid = host.pid
        assert first_pid is not None and first_pid != os.getpid()
        assert (await ref.symbol_info_tick("EURUSD")).ok

        await host.inject("hang")  # reaches the simulator in the child, over the pipe
        r = await ref.symbol_info_tick("EURUSD", timeout_s=DEADLINE_S)
        assert r.error is not None and r.error.code is ErrorCode.TIMEOUT
        # A hang lasts until released, whichever process meets it: release it.
        await host.inject("clear")
        # The deadline is a lost terminal: the running call is cancelled, its process
        # killed and reaped before the reconnect starts.
        await rec.wait_for(first_recovery, timeout=30.0)
        assert not pid_exists(first_pid)
        assert host.killed == 1
        assert ref.state == "CONNECTED"
        second_pid = host.pid
        assert second_pid is not None and second_pid != first_pid
        assert host.started == 2
        assert child_pids() == {second_pid}
        extra = sup.status()[0]["extra"]
        assert extra["worker_processes_killed"] == 1
        assert extra["worker_pid"] == second_pid
        assert extra["abandoned_threads"] == abandoned_before  # none: a process was killed
        killed = rec.of("mt5", "worker_abandoned")
        assert [e.data for e in killed] == [{"worker": "process", "killed_processes": 1}]
        assert (await ref.symbol_info_tick("EURUSD")).ok
    # Nothing left: the process is reaped, and no thread was started on this side.
    assert not pid_exists(second_pid)
    assert child_pids() == set()
    assert our_threads() <= threads_before


async def test_a_lost_order_reply_never_becomes_a_second_order(tmp_path):
    async with terminal(tmp_path) as (_sup, ref, host, _rec):
        await host.inject("lost_reply")  # filled by the terminal, the answer lost
        first = await ref.order_send(BUY)
        assert first.error is not None and first.error.code is ErrorCode.ORDER_STATE_UNKNOWN
        again = await ref.order_send(BUY)  # the bot retries the same order
        assert again.ok and again.data.comment.startswith("reconciled")
        positions = await ref.positions_get(symbol="EURUSD")
        assert positions.ok and len(positions.data) == 1
        assert (await ref.history_deals_get(0, 2**31 - 1)).data is not None


async def test_inject_reaches_the_simulator_in_its_process_and_bad_faults_are_refused(
        tmp_path):
    async with terminal(tmp_path) as (_sup, ref, host, _rec):
        with pytest.raises(ValueError, match="unknown fault"):
            await host.inject("no_such_fault")
        await host.inject("autotrading_off")
        r = await ref.order_send(BUY)
        assert r.error is not None and r.error.code is ErrorCode.AUTOTRADING_DISABLED
        await host.inject("clear")
        assert (await ref.order_send(BUY)).ok


async def test_a_process_that_dies_by_itself_is_reaped_and_replaced(tmp_path):
    async with terminal(tmp_path) as (_sup, ref, host, rec):
        first_pid = await kill_the_process(host, ref)
        await rec.wait_for(first_recovery, timeout=30.0)
        assert host.pid not in (None, first_pid)
        assert not pid_exists(first_pid)
        assert (await ref.symbol_info_tick("EURUSD")).ok


async def test_arguments_refused_by_the_package_raise_in_the_child_and_come_back(tmp_path):
    async with terminal(tmp_path) as (_sup, ref, host, _rec):
        pid = host.pid
        r = await ref.copy_rates_from_pos("EURUSD", "H1", 0, 10)  # a str timeframe
        assert r.error is not None and r.error.code is ErrorCode.INVALID_REQUEST
        assert host.pid == pid  # an exception is an answer: the process is kept
        assert (await ref.copy_rates_from_pos("EURUSD", codes.TIMEFRAME_H1, 0, 10)).ok


async def test_an_inject_reaches_the_simulator_while_a_call_hangs_in_it(tmp_path):
    async with terminal(tmp_path) as (_sup, ref, host, _rec):
        pid = host.pid
        await host.inject("hang")
        answers: list[object] = []

        async def hung_call() -> None:
            answers.append(await ref.symbol_info_tick("EURUSD", timeout_s=60.0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hung_call)
            await trio.sleep(0.5)  # the call is in the child, waiting on the hang
            assert answers == []
            await host.inject("clear")  # read by the child while it waits
        assert answers[0].ok  # type: ignore[attr-defined]
        assert host.pid == pid and host.killed == 0


# ---------------------------------------------------------------------------- the terminal's
# world outlives a killed process: faults in force and the trade server's account
async def test_a_hang_lasts_its_duration_though_the_process_meeting_it_was_killed(tmp_path):
    async with terminal(tmp_path) as (_sup, ref, host, rec):
        injected_at = trio.current_time()
        await host.inject("hang", duration_s=5.0)
        r = await ref.symbol_info_tick("EURUSD", timeout_s=DEADLINE_S)
        assert r.error is not None and r.error.code is ErrorCode.TIMEOUT
        await rec.wait_for(first_recovery, timeout=30.0)
        back_after = trio.current_time() - injected_at
        assert host.killed == 1 and host.started == 2
        # The new process met the same hang (for what was left of it): the reconnect could
        # not succeed before the 5 s were up, though the first process died at 0.5 s (and a
        # respawn takes well under a second, even on a loaded machine).
        assert back_after >= 5.0 - 0.05, back_after
        assert (await ref.symbol_info_tick("EURUSD")).ok


async def test_a_fault_injected_while_the_process_is_replaced_is_kept_for_the_next(tmp_path):
    async with terminal(tmp_path) as (_sup, ref, host, rec):
        await kill_the_process(host, ref)
        # No process, or a new one starting: either way the fault is taken, not refused,
        # and a counted fault injected now is used by the next process.
        await host.inject("market_retcode", retcode=codes.TRADE_RETCODE_REQUOTE)
        await rec.wait_for(first_recovery, timeout=30.0)
        r = await ref.order_send(BUY)
        assert r.error is not None and r.reason == "retcode_10004", r  # a requote
        assert (await ref.order_send(BUY)).ok  # used up: once


async def test_the_account_survives_a_killed_terminal_process(tmp_path):
    """Positions, orders, deals and the balance live on the broker's server: a terminal
    process killed (here by a hang at a call's deadline, then by SIGKILL) loses none."""
    async with terminal(tmp_path) as (_sup, ref, host, rec):
        opened = [await ref.order_send(BUY) for _ in range(2)]
        assert all(r.ok for r in opened)
        before = await ref.positions_get(symbol="EURUSD")
        deals = await ref.history_deals_get(0, 2**31 - 1)
        account = await ref.account_info()
        assert before.ok and len(before.data) == 2 and deals.ok and account.ok

        await host.inject("hang")
        r = await ref.symbol_info_tick("EURUSD", timeout_s=DEADLINE_S)
        assert r.error is not None and r.error.code is ErrorCode.TIMEOUT
        await host.inject("clear")
        first = await rec.wait_for(a_recovery, timeout=30.0)
        await kill_the_process(host, ref)
        await rec.wait_for(lambda e: a_recovery(e) and e.seq > first.seq, timeout=30.0)
        assert host.started == 3

        def held(positions: tuple) -> list[tuple]:
            # What the broker holds (price_current and profit move with the market).
            return [(p.ticket, p.type, p.volume, p.price_open, p.time_msc) for p in positions]

        after = await ref.positions_get(symbol="EURUSD")
        assert after.ok and held(after.data) == held(before.data)
        assert (await ref.history_deals_get(0, 2**31 - 1)).data == deals.data
        assert (await ref.account_info()).data.balance == account.data.balance
        # Tickets go on from where they were: never a ticket the broker already gave.
        third = await ref.order_send(BUY)
        assert third.ok and third.data.order > max(r.data.order for r in opened)
        assert len((await ref.positions_get(symbol="EURUSD")).data) == 3


def test_the_fault_ledger_replays_conditions_with_what_is_left_and_counted_faults_once():
    now = [100.0]
    ledger = FaultLedger(clock=lambda: now[0])
    ledger.record("hang", None, {})
    ledger.record("ipc_timeout", 5.0, {})
    ledger.record("lost_reply", None, {"count": 2})
    ledger.record("market_retcode", None, {"retcode": 10004})
    # Three reached a running process; the retcode fault was injected while none ran.
    ledger.delivered(["hang", "ipc_timeout", "lost_reply"])
    now[0] = 102.0
    due = ledger.replay()
    assert due == [("hang", None, {}), ("ipc_timeout", 3.0, {}),
                   ("market_retcode", None, {"retcode": 10004})]
    # Not yet sent (the new process died first, say): offered again to the one after.
    assert ledger.replay() == due
    ledger.delivered([fault for fault, _, _ in due])
    # The counted fault reached that process: it is not handed to the one after.
    now[0] = 106.0  # and the timed one has ended
    assert ledger.replay() == [("hang", None, {})]
    ledger.record("broker_disconnect", None, {})  # heals by itself
    assert ledger.replay() == [("hang", None, {}), ("broker_disconnect", 10.0, {})]
    ledger.record("clear", None, {})
    assert ledger.replay() == []
