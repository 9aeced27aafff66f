"""The MT5 actor under every simulator fault, through the supervisor, on trio's virtual clock.

Each test runs the whole tree (a ``Supervisor`` with a last-known-good cache and one ``mt5``
child over a ``TerminalSimulator`` and the inline worker), injects one fault, and asserts
what the caller gets (``Response``), the exact supervision events with their times relative
to the injection, and the state. Defaults of DESIGN.md section 3: backoff 1/2/4 s, 3
attempts, probe every 30 s, connect timeout 10 s.

Events come from two tasks: the cell's driver (state changes, backoff, attempts, probes,
escalation) emits them in a fixed order; notices the actor queues (``worker_abandoned``,
``order_reconciled``) and ``degraded_served`` go through the cell's notice task and may
interleave with the driver's at the same instant. So ``timeline()`` lists the driver's
events and ``notices()`` the others, each in exact order.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from actors.cache import TtlCache
from actors.mt5 import codes as mt5
from actors.mt5.actor import SIGNATURES, Mt5Actor, Mt5Ref, TerminalLedger
from actors.mt5.simulator import MAX_BARS, TerminalSimulator
from actors.mt5.types import OrderSendResult, Tick
from actors.mt5.worker import WorkerLost
from supervision.errors import ErrorCode
from supervision.settings import ActorSettings
from supervision.supervisor import ChildSpec, Supervisor
from tests.support.actors import Recorder, running_supervisor

E = ErrorCode
# DESIGN.md section 3 defaults, spelled out: the expected schedules below depend on them.
SETTINGS = ActorSettings(backoff_base_s=1.0, backoff_factor=2.0, max_attempts=3, jitter=0.0,
                         health_interval_s=30.0, probe_timeout_s=5.0, call_timeout_s=10.0,
                         connect_timeout_s=10.0)
IPC_TIMEOUT_S = 3.0
ORDER = {"action": mt5.TRADE_ACTION_DEAL, "symbol": "EURUSD", "volume": 0.1,
         "type": mt5.ORDER_TYPE_BUY}
NOTICE_KINDS = {"worker_abandoned", "order_reconciled", "degraded_served"}
MT5_FUNCTIONS = set(SIGNATURES) | {"initialize", "shutdown", "login"}


class CountingBackend:
    """The simulator as the actor sees it, counting the MetaTrader5 calls that reach it."""

    def __init__(self, sim: TerminalSimulator) -> None:
        self.sim = sim
        self.calls: collections.Counter[str] = collections.Counter()
        # name -> last_error: the next call of that function fails with it (a test's knife)
        self.fail_next: dict[str, tuple[int, str]] = {}
        self._error: tuple[int, str] | None = None

    def last_error(self) -> tuple[int, str]:
        error, self._error = self._error, None
        return error if error is not None else self.sim.last_error()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.sim, name)
        if name not in MT5_FUNCTIONS:
            return attr  # before_call, server_time: not terminal calls

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            if name in self.fail_next:
                self._error = self.fail_next.pop(name)
                return None
            return attr(*args, **kwargs)

        return counted


@attrs.define
class Tree:
    sup: Supervisor
    rec: Recorder
    ref: Mt5Ref
    actor: Mt5Actor
    sim: TerminalSimulator
    backend: CountingBackend
    log_path: Path
    begun_at: float  # before the child was started
    started_at: float  # after its first connect attempt resolved

    def _rel(self, event: Any, t0: float) -> float:
        return round((event.ts - self.sup.wallclock.wall(t0)).total_seconds(), 6)

    def timeline(self, t0: float) -> list[str]:
        """The driver's events from ``t0`` on, as ``+<s> kind from->to attempt delay code``."""
        out = []
        for e in self.rec.of("mt5"):
            rel = self._rel(e, t0)
            if rel < 0 or e.kind in NOTICE_KINDS:
                continue
            parts = [f"+{rel:g}", e.kind]
            if e.from_state is not None:
                parts.append(f"{e.from_state}->{e.to_state}")
            if e.attempt is not None:
                parts.append(f"attempt={e.attempt}")
            if e.delay_s is not None:
                parts.append(f"delay={e.delay_s:g}")
            if e.error is not None:
                parts.append(e.error["code"])
            if e.kind == "state_changed":
                parts.append(f"({e.data['reason']})")
            out.append(" ".join(parts))
        return out

    def notices(self, t0: float) -> list[str]:
        out = []
        for e in self.rec.of("mt5", *NOTICE_KINDS):
            rel = self._rel(e, t0)
            if rel < 0:
                continue
            detail = ""
            if e.kind == "order_reconciled":
                detail = f" {e.data['symbol']} {e.data['outcome']}"
            elif e.kind == "degraded_served":
                detail = f" {e.data['op']} age={e.data['age_s']:g} {e.error['code']}"
            out.append(f"+{rel:g} {e.kind}{detail}")
        return out

    def event(self, t0: float, kind: str, n: int = 0) -> Any:
        return [e for e in self.rec.of("mt5", kind) if self._rel(e, t0) >= 0][n]


def new_sim(**kwargs: Any) -> TerminalSimulator:
    return TerminalSimulator(clock=trio.current_time, ipc_timeout_s=IPC_TIMEOUT_S, **kwargs)


@contextlib.asynccontextmanager
async def mt5_tree(tmp_path: Path, sim: TerminalSimulator, settings: ActorSettings = SETTINGS,
                   **actor_kwargs: Any) -> AsyncIterator[Tree]:
    backend = CountingBackend(sim)
    actors: list[Mt5Actor] = []
    ledger = TerminalLedger()  # what outlives each fresh instance

    def factory() -> Mt5Actor:
        actor = Mt5Actor(lambda: backend, inline=True, ledger=ledger, **actor_kwargs)
        actors.append(actor)
        return actor

    async with running_supervisor(tmp_path, lkg=TtlCache()) as sup:
        rec = Recorder(sup)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rec.run)
            begun = trio.current_time()
            ref = await sup.start_child(ChildSpec("mt5", factory, settings=settings,
                                                  ref_class=Mt5Ref))
            assert isinstance(ref, Mt5Ref)
            yield Tree(sup, rec, ref, actors[0], sim, backend, tmp_path / "events.jsonl",
                       begun, trio.current_time())
            await trio.sleep(0.001)  # let the last events reach the recorder
            nursery.cancel_scope.cancel()


async def settle() -> None:
    """Let every task run (and the recorder catch up) without reaching the next schedule."""
    await trio.sleep(0.001)


def now() -> float:
    return trio.current_time()


# ---------------------------------------------------------------------------- terminal_crash
async def test_terminal_crash_outlasting_the_backoff_escalates_then_recovers_on_the_probe(
        tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        assert t.ref.state == "CONNECTED"
        await trio.sleep(1)
        t0 = now()
        sim.inject("terminal_crash", duration_s=20)

        r = await t.ref.symbol_info_tick("EURUSD")
        assert now() == t0  # at once: the pipe is broken, nothing to wait for
        assert (r.status, r.data, r.cached_at, r.reason) == ("error", None, None,
                                                              "terminal_unavailable")
        assert r.error.code is E.MT5_IPC_FAILED
        assert r.error.message == "symbol_info_tick failed: IPC send failed (-10001)"

        await trio.sleep_until(t0 + 8)
        assert t.sup.state("mt5") == "ERROR"
        r = await t.ref.symbol_info_tick("EURUSD")
        assert now() == t0 + 8  # refused at once in ERROR
        assert r.error.code is E.ACTOR_UNAVAILABLE
        assert r.error.retry_after == pytest.approx(29.0)  # the next probe is at +37
        assert r.error.message == (
            "symbol_info_tick refused: mt5 is in ERROR (initialize failed: IPC initialize "
            "failed, Process create failed 'C:\\Program Files\\MetaTrader 5\\terminal64.exe' "
            "(-10003))")

        await trio.sleep_until(t0 + 38)
        assert t.sup.state("mt5") == "CONNECTED"
        assert (await t.ref.symbol_info_tick("EURUSD")).ok
        await settle()
        assert t.timeline(t0) == [
            "+0 state_changed CONNECTED->RECONNECTING attempt=1 delay=1 MT5_IPC_FAILED "
            "(failure_detected)",
            "+0 backoff_scheduled attempt=1 delay=1",
            "+1 attempt_failed attempt=1 MT5_INIT_FAILED",
            "+1 backoff_scheduled attempt=2 delay=2",
            "+3 attempt_failed attempt=2 MT5_INIT_FAILED",
            "+3 backoff_scheduled attempt=3 delay=4",
            "+7 attempt_failed attempt=3 MT5_INIT_FAILED",
            "+7 state_changed RECONNECTING->ERROR attempt=3 delay=30 "
            "MT5_INIT_FAILED (attempt 3 failed)",
            "+7 escalated MT5_INIT_FAILED",
            "+37 state_changed ERROR->CONNECTED (probe ok)",
            "+37 recovered",
        ]
        assert t.notices(t0) == []
        assert t.event(t0, "attempt_failed").error["message"] == (
            "initialize failed: IPC initialize failed, Process create failed "
            "'C:\\Program Files\\MetaTrader 5\\terminal64.exe' (-10003)")
        # start, three attempts, the probe; one shutdown, when the failure was detected
        assert t.backend.calls["initialize"] == 5
        assert t.backend.calls["shutdown"] == 1
        assert t.actor.workers_started == 5


async def test_short_terminal_crash_recovers_on_attempt_2_and_waiting_calls_get_through(
        tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep(1)
        t0 = now()
        sim.inject("terminal_crash", duration_s=2)
        r = await t.ref.symbol_info_tick("EURUSD")
        assert r.error.code is E.MT5_IPC_FAILED

        await trio.sleep_until(t0 + 0.5)
        assert t.ref.state == "RECONNECTING"
        # RECONNECTING: a call waits up to its deadline, then ACTOR_UNAVAILABLE...
        r = await t.ref.symbol_info_tick("EURUSD", timeout_s=1)
        assert now() == t0 + 1.5
        assert r.error.code is E.ACTOR_UNAVAILABLE
        assert r.error.message == (
            "symbol_info_tick failed: mt5 still RECONNECTING at the call's deadline")
        assert r.error.retry_after == pytest.approx(1.5)  # attempt 2 is at +3
        # ...and one whose deadline outlasts the outage is answered once it reconnects.
        r = await t.ref.symbol_info_tick("EURUSD", timeout_s=5)
        assert now() == t0 + 3
        assert r.ok and isinstance(r.data, Tick)

        await settle()
        assert t.timeline(t0) == [
            "+0 state_changed CONNECTED->RECONNECTING attempt=1 delay=1 MT5_IPC_FAILED "
            "(failure_detected)",
            "+0 backoff_scheduled attempt=1 delay=1",
            "+1 attempt_failed attempt=1 MT5_INIT_FAILED",
            "+1 backoff_scheduled attempt=2 delay=2",
            "+3 state_changed RECONNECTING->CONNECTED (attempt 2 ok)",
        ]
        assert t.actor.workers_started == 3


# ------------------------------------------------------------------------------- ipc_timeout
async def test_ipc_timeout_longer_than_the_calls_deadline_is_a_TIMEOUT(tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep(1)
        t0 = now()
        sim.inject("ipc_timeout", duration_s=4)
        r = await t.ref.symbol_info_tick("EURUSD", timeout_s=1)
        assert now() == t0 + 1  # the caller's deadline, not the terminal's 3 s
        assert (r.status, r.reason) == ("error", "timeout")
        assert r.error.code is E.TIMEOUT
        assert r.error.message == (
            "symbol_info_tick failed: no answer before the call's deadline (MT5_IPC_TIMEOUT)")

        await trio.sleep_until(t0 + 8)
        assert t.ref.state == "CONNECTED"
        await settle()
        assert t.timeline(t0) == [
            "+1 state_changed CONNECTED->RECONNECTING attempt=1 delay=1 MT5_IPC_TIMEOUT "
            "(failure_detected)",
            "+1 backoff_scheduled attempt=1 delay=1",
            # attempt 1 at +2: initialize takes the terminal's 3 s and fails with -10005
            "+5 attempt_failed attempt=1 MT5_IPC_TIMEOUT",
            "+5 backoff_scheduled attempt=2 delay=2",
            "+7 state_changed RECONNECTING->CONNECTED (attempt 2 ok)",
        ]
        # the call was abandoned inside the worker: it is never reused
        assert t.notices(t0) == ["+1 worker_abandoned"]
        assert t.event(t0, "state_changed").error["message"] == (
            "symbol_info_tick failed: the terminal did not answer within 1 s")
        assert t.event(t0, "attempt_failed").error["message"] == (
            "initialize failed: IPC timeout (-10005)")
        assert t.backend.calls["shutdown"] == 0  # a wedged terminal is not asked
        assert t.actor.workers_started == 3


async def test_ipc_timeout_shorter_than_the_calls_deadline_is_MT5_IPC_TIMEOUT(
        tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep(1)
        t0 = now()
        sim.inject("ipc_timeout", duration_s=6)
        r = await t.ref.symbol_info_tick("EURUSD", timeout_s=5)
        assert now() == t0 + IPC_TIMEOUT_S  # the terminal gave up first, with -10005
        assert (r.status, r.reason) == ("error", "terminal_timeout")
        assert r.error.code is E.MT5_IPC_TIMEOUT
        assert r.error.message == "symbol_info_tick failed: IPC timeout (-10005)"

        await trio.sleep_until(t0 + 10)
        await settle()
        assert t.timeline(t0) == [
            "+3 state_changed CONNECTED->RECONNECTING attempt=1 delay=1 MT5_IPC_TIMEOUT "
            "(failure_detected)",
            "+3 backoff_scheduled attempt=1 delay=1",
            "+7 attempt_failed attempt=1 MT5_IPC_TIMEOUT",
            "+7 backoff_scheduled attempt=2 delay=2",
            "+9 state_changed RECONNECTING->CONNECTED (attempt 2 ok)",
        ]
        assert t.notices(t0) == []  # the worker answered: nothing abandoned
        assert t.backend.calls["shutdown"] == 1
        assert t.actor.workers_started == 3


# -------------------------------------------------------------------------------------- hang
async def test_hang_times_out_at_the_deadline_and_a_fresh_worker_takes_over(
        tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep(1)
        t0 = now()
        hung_worker = t.actor.worker
        ticks_before = t.backend.calls["symbol_info_tick"]
        sim.inject("hang")
        r = await t.ref.symbol_info_tick("EURUSD", timeout_s=2)
        assert now() == t0 + 2  # exactly the caller's deadline
        assert r.error.code is E.TIMEOUT
        assert r.error.message == (
            "symbol_info_tick failed: no answer before the call's deadline (MT5_IPC_TIMEOUT)")

        await trio.sleep_until(t0 + 2.5)
        assert t.ref.state == "RECONNECTING"
        assert t.actor.worker is None and hung_worker.wedged
        with pytest.raises(WorkerLost):  # the hung worker refuses everything from now on
            await hung_worker.call("symbol_info_tick", ("EURUSD",), {})
        sim.release_hang()  # the terminal answers again before attempt 1 (+3)

        await trio.sleep_until(t0 + 4)
        assert t.ref.state == "CONNECTED"
        assert t.actor.worker is not hung_worker
        assert t.actor.workers_started == 2
        assert (await t.ref.symbol_info_tick("EURUSD")).ok
        # Only that last call reached the terminal: the hung one never ran.
        assert t.backend.calls["symbol_info_tick"] == ticks_before + 1
        assert t.backend.calls["shutdown"] == 0  # a hung terminal is not asked to shut down
        await settle()
        assert t.timeline(t0) == [
            "+2 state_changed CONNECTED->RECONNECTING attempt=1 delay=1 MT5_IPC_TIMEOUT "
            "(failure_detected)",
            "+2 backoff_scheduled attempt=1 delay=1",
            "+3 state_changed RECONNECTING->CONNECTED (attempt 1 ok)",
        ]
        assert t.notices(t0) == ["+2 worker_abandoned"]
        assert t.actor.status_extra()["workers_started"] == 2


async def test_a_terminal_that_stays_hung_abandons_a_worker_per_attempt_and_escalates(
        tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep(1)
        t0 = now()
        sim.inject("hang")
        r = await t.ref.symbol_info_tick("EURUSD", timeout_s=2)
        assert r.error.code is E.TIMEOUT
        await trio.sleep_until(t0 + 50)
        assert t.ref.state == "ERROR"
        sim.release_hang()
        await trio.sleep_until(t0 + 70)
        assert t.ref.state == "CONNECTED"
        await settle()
        assert t.timeline(t0) == [
            "+2 state_changed CONNECTED->RECONNECTING attempt=1 delay=1 MT5_IPC_TIMEOUT "
            "(failure_detected)",
            "+2 backoff_scheduled attempt=1 delay=1",
            # each attempt's initialize hangs until connect_timeout_s (10 s)
            "+13 attempt_failed attempt=1 MT5_IPC_TIMEOUT",
            "+13 backoff_scheduled attempt=2 delay=2",
            "+25 attempt_failed attempt=2 MT5_IPC_TIMEOUT",
            "+25 backoff_scheduled attempt=3 delay=4",
            "+39 attempt_failed attempt=3 MT5_IPC_TIMEOUT",
            "+39 state_changed RECONNECTING->ERROR attempt=3 delay=30 "
            "MT5_IPC_TIMEOUT (attempt 3 failed)",
            "+39 escalated MT5_IPC_TIMEOUT",
            "+69 state_changed ERROR->CONNECTED (probe ok)",
            "+69 recovered",
        ]
        assert t.event(t0, "attempt_failed").error["message"] == (
            "reconnect failed: the terminal did not answer within 10 s")
        assert t.notices(t0) == ["+2 worker_abandoned", "+13 worker_abandoned",
                                 "+25 worker_abandoned", "+39 worker_abandoned"]
        assert t.actor.workers_started == 5


# ------------------------------------------------------------------------- broker_disconnect
async def test_broker_disconnect_is_BROKER_UNAVAILABLE_and_heals_without_reinitializing(
        tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep(1)
        t0 = now()
        sim.inject("broker_disconnect", duration_s=5)
        r = await t.ref.order_send(ORDER)
        assert now() == t0
        assert (r.status, r.reason) == ("error", "broker_unavailable")
        assert r.error.code is E.BROKER_UNAVAILABLE
        assert r.error.message == ("order_send failed: retcode 10031 (Request rejected due "
                                   "to absence of network connection)")
        assert sim.orders_sent_count == 0

        await trio.sleep_until(t0 + 8)
        assert t.ref.state == "CONNECTED"
        await settle()
        assert t.timeline(t0) == [
            "+0 state_changed CONNECTED->RECONNECTING attempt=1 delay=1 BROKER_UNAVAILABLE "
            "(failure_detected)",
            "+0 backoff_scheduled attempt=1 delay=1",
            "+1 attempt_failed attempt=1 BROKER_UNAVAILABLE",
            "+1 backoff_scheduled attempt=2 delay=2",
            "+3 attempt_failed attempt=2 BROKER_UNAVAILABLE",
            "+3 backoff_scheduled attempt=3 delay=4",
            "+7 state_changed RECONNECTING->CONNECTED (attempt 3 ok)",
        ]
        assert t.event(t0, "attempt_failed").error["message"] == (
            "initialize failed: terminal is not connected to the trade server")
        # Restarts are fresh (DESIGN 3): each attempt is a new instance with a new worker,
        # which initializes and asks terminal_info whether the broker is back; a broker-only
        # loss never shuts the terminal's IPC down.
        assert t.backend.calls["initialize"] == 1 + 3
        assert t.backend.calls["shutdown"] == 0
        assert t.backend.calls["terminal_info"] == 1 + 3
        assert t.actor.workers_started == 1 + 3
        r = await t.ref.order_send(ORDER)
        assert r.ok and r.data.retcode == mt5.TRADE_RETCODE_DONE
        assert sim.orders_sent_count == 1


async def test_broker_disconnect_without_traffic_is_found_by_the_probe_and_heals_itself(
        tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep_until(t.started_at + 25)
        t0 = now()
        sim.inject("broker_disconnect")  # the simulator's default: back after 10 s
        await trio.sleep_until(t0 + 15)
        assert t.ref.state == "CONNECTED"
        await settle()
        assert t.timeline(t0) == [
            "+5 probe_failed BROKER_UNAVAILABLE",
            "+5 state_changed CONNECTED->RECONNECTING attempt=1 delay=1 BROKER_UNAVAILABLE "
            "(failure_detected)",
            "+5 backoff_scheduled attempt=1 delay=1",
            "+6 attempt_failed attempt=1 BROKER_UNAVAILABLE",
            "+6 backoff_scheduled attempt=2 delay=2",
            "+8 attempt_failed attempt=2 BROKER_UNAVAILABLE",
            "+8 backoff_scheduled attempt=3 delay=4",
            "+12 state_changed RECONNECTING->CONNECTED (attempt 3 ok)",
        ]
        assert t.event(t0, "probe_failed").error["message"] == (
            "terminal_info failed: terminal is not connected to the trade server")
        assert t.backend.calls["initialize"] == 1 + 3  # the start + a fresh instance per attempt
        assert t.backend.calls["shutdown"] == 0


# ------------------------------------------------------------------------------ auth_failure
async def test_auth_failure_fails_every_attempt_escalates_and_keeps_the_password_out(
        tmp_path, autojump_clock):
    password = "hunter2-very-secret"
    sim = new_sim()
    sim.inject("auth_failure")
    async with mt5_tree(tmp_path, sim, login=5_000_123, password=password,
                        server="Simulator-Demo") as t:
        t0 = t.begun_at
        await trio.sleep_until(t0 + 10)
        assert t.ref.state == "ERROR"
        r = await t.ref.account_info()
        assert r.error.code is E.ACTOR_UNAVAILABLE
        assert r.error.retry_after == pytest.approx(27.0)
        assert r.error.message == ("account_info refused: mt5 is in ERROR (initialize failed: "
                                   "Terminal: Authorization failed (-6))")
        await trio.sleep_until(t0 + 40)
        sim.inject("clear")  # the credentials are accepted again
        await trio.sleep_until(t0 + 70)
        assert t.ref.state == "CONNECTED"
        r = await t.ref.account_info()
        assert r.ok and r.data.login == 5_000_123
        await settle()
        assert t.timeline(t0) == [
            "+0 actor_started",
            "+0 state_changed DISCONNECTED->RECONNECTING attempt=1 delay=1 AUTH_FAILED (start)",
            "+0 backoff_scheduled attempt=1 delay=1",
            "+1 attempt_failed attempt=1 AUTH_FAILED",
            "+1 backoff_scheduled attempt=2 delay=2",
            "+3 attempt_failed attempt=2 AUTH_FAILED",
            "+3 backoff_scheduled attempt=3 delay=4",
            "+7 attempt_failed attempt=3 AUTH_FAILED",
            "+7 state_changed RECONNECTING->ERROR attempt=3 delay=30 "
            "AUTH_FAILED (attempt 3 failed)",
            "+7 escalated AUTH_FAILED",
            "+37 probe_failed delay=30 AUTH_FAILED",
            "+67 state_changed ERROR->CONNECTED (probe ok)",
            "+67 recovered",
        ]
        assert t.event(t0, "attempt_failed").error["message"] == (
            "initialize failed: Terminal: Authorization failed (-6)")
        # The password never appears in events, the log, or status.
        everything = "\n".join(e.to_line() for e in t.rec.events)
        everything += t.log_path.read_text() + repr(t.sup.status())
        assert password not in everything


# --------------------------------------------------------------------------- autotrading_off
async def test_autotrading_off_refuses_orders_and_leaves_the_connection_alone(
        tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep(1)
        t0 = now()
        sim.inject("autotrading_off")
        r = await t.ref.order_send(ORDER)
        assert (r.status, r.reason) == ("error", "autotrading_disabled")
        assert r.error.code is E.AUTOTRADING_DISABLED
        assert r.error.message == (
            "order_send failed: retcode 10027 (AutoTrading disabled by client)")
        r = await t.ref.order_check(ORDER)
        assert r.error.code is E.AUTOTRADING_DISABLED
        assert (await t.ref.symbol_info_tick("EURUSD")).ok
        await trio.sleep_until(t0 + 40)  # past a health probe
        assert t.ref.state == "CONNECTED"
        assert t.timeline(t0) == [] and t.notices(t0) == []
        assert sim.orders_sent_count == 0
        assert t.actor.status_extra()["unresolved_orders"] == []
        sim.inject("clear")
        assert (await t.ref.order_send(ORDER)).ok


# ---------------------------------------------------------------------------- market_retcode
@pytest.mark.parametrize(("retcode", "comment"), [(10004, "Requote"),
                                                  (10018, "Market is closed")])
async def test_a_market_retcode_is_an_error_never_retried(tmp_path, autojump_clock,
                                                          retcode, comment):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep(1)
        t0 = now()
        # count=1: only the first send is refused, so a retry would fill.
        sim.inject("market_retcode", retcode=retcode, count=1)
        r = await t.ref.order_send(ORDER)
        assert r.status == "error"
        assert r.reason == f"retcode_{retcode}"
        assert r.error.code is E.INVALID_REQUEST
        assert r.error.message == f"order_send failed: retcode {retcode} ({comment})"
        await trio.sleep_until(t0 + 40)
        assert t.ref.state == "CONNECTED"
        assert t.timeline(t0) == [] and t.notices(t0) == []
        assert t.backend.calls["order_send"] == 1
        assert sim.orders_sent_count == 0  # never retried
        r = await t.ref.order_send(ORDER)  # the caller decides to send again
        assert r.ok and sim.orders_sent_count == 1


# -------------------------------------------------------------------------------------- slow
async def test_slow_calls_beyond_their_deadline_time_out_faster_ones_succeed(
        tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep(1)
        t0 = now()
        sim.inject("slow", delay_s=2)
        r = await t.ref.symbol_info_tick("EURUSD", timeout_s=3)
        assert r.ok and now() == t0 + 2
        r = await t.ref.symbol_info_tick("GBPUSD", timeout_s=1)
        assert now() == t0 + 3
        assert r.error.code is E.TIMEOUT
        # As implemented, a call past its deadline means a hung terminal: the worker is
        # replaced; reconnecting takes initialize (2 s) and terminal_info (2 s).
        await trio.sleep_until(t0 + 8.5)
        assert t.ref.state == "CONNECTED"
        r = await t.ref.symbol_info_tick("GBPUSD", timeout_s=3)
        assert r.ok and now() == t0 + 10.5
        await settle()
        assert t.timeline(t0) == [
            "+3 state_changed CONNECTED->RECONNECTING attempt=1 delay=1 MT5_IPC_TIMEOUT "
            "(failure_detected)",
            "+3 backoff_scheduled attempt=1 delay=1",
            "+8 state_changed RECONNECTING->CONNECTED (attempt 1 ok)",
        ]
        assert t.notices(t0) == ["+3 worker_abandoned"]
        # the timed-out call never reached the terminal (it was still in its delay)
        assert t.backend.calls["symbol_info_tick"] == 2


async def test_the_health_probe_waits_its_turn_behind_a_slow_call(tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep_until(t.started_at + 29)
        t0 = now()
        sim.inject("slow", delay_s=2)
        probes = t.backend.calls["terminal_info"]
        # The probe is due at +1, while this call runs (+0..+2): it queues behind it.
        r = await t.ref.symbol_info_tick("EURUSD", timeout_s=5)
        assert r.ok and now() == t0 + 2
        await trio.sleep_until(t0 + 10)
        assert t.backend.calls["terminal_info"] == probes + 1
        assert t.ref.state == "CONNECTED"
        assert t.timeline(t0) == []


# ------------------------------------------------------------------------------- lost_reply
async def test_a_lost_reply_is_unknown_and_the_same_request_returns_the_fill_not_a_new_order(
        tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep(1)
        t0 = now()
        sim.inject("lost_reply")
        r = await t.ref.order_send(ORDER)
        assert (r.status, r.reason) == ("error", "order_state_unknown")
        assert r.error.code is E.ORDER_STATE_UNKNOWN
        assert r.error.message == (
            "order_send failed: no reply from the terminal (IPC timeout, -10005); the order "
            "may have been executed - it will be reconciled, not re-sent")
        assert sim.orders_sent_count == 1  # it was executed; only the answer is gone
        assert t.actor.status_extra()["unresolved_orders"] == ["EURUSD"]

        await trio.sleep_until(t0 + 2)  # an IPC timeout: the terminal is re-attached first
        r = await t.ref.order_send(ORDER)  # the bot tries again
        assert r.ok
        deal = sim.deals[0]
        assert isinstance(r.data, OrderSendResult)
        assert r.data.retcode == mt5.TRADE_RETCODE_DONE
        assert (r.data.deal, r.data.order, r.data.volume, r.data.price) == (
            deal.ticket, deal.order, deal.volume, deal.price)
        assert r.data.comment == "reconciled: filled before its reply was lost"
        assert sim.orders_sent_count == 1  # no second order
        assert t.backend.calls["order_send"] == 1
        assert len(sim.positions) == 1
        extra = t.actor.status_extra()
        assert extra["unresolved_orders"] == [] and extra["reconciled_orders"] == 1
        await settle()
        assert t.timeline(t0) == [
            "+0 state_changed CONNECTED->RECONNECTING attempt=1 delay=1 ORDER_STATE_UNKNOWN "
            "(failure_detected)",
            "+0 backoff_scheduled attempt=1 delay=1",
            "+1 state_changed RECONNECTING->CONNECTED (attempt 1 ok)",
        ]
        assert t.notices(t0) == ["+2 order_reconciled EURUSD filled"]
        assert t.event(t0, "order_reconciled").data["tag"] == deal.comment


async def test_a_different_request_after_a_lost_reply_is_sent_after_reconciliation(
        tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep(1)
        t0 = now()
        sim.inject("lost_reply")
        assert (await t.ref.order_send(ORDER)).error.code is E.ORDER_STATE_UNKNOWN
        await trio.sleep_until(t0 + 2)
        r = await t.ref.order_send({**ORDER, "volume": 0.2})
        assert r.ok and r.data.comment == "Request executed" and r.data.volume == 0.2
        assert sim.orders_sent_count == 2
        assert sorted(p.volume for p in sim.positions) == [0.1, 0.2]
        await settle()
        assert t.notices(t0) == ["+2 order_reconciled EURUSD filled"]
        assert t.actor.status_extra()["unresolved_orders"] == []


async def test_a_lost_reply_whose_order_did_not_fill_lets_the_next_order_through(
        tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep(1)
        t0 = now()
        # The server rejects it (nothing executed) and the rejection is lost on the way back.
        sim.inject("market_retcode", retcode=mt5.TRADE_RETCODE_REJECT)
        sim.inject("lost_reply")
        assert (await t.ref.order_send(ORDER)).error.code is E.ORDER_STATE_UNKNOWN
        assert sim.orders_sent_count == 0
        await trio.sleep_until(t0 + 2)
        r = await t.ref.order_send(ORDER)
        assert r.ok and r.data.comment == "Request executed"
        assert sim.orders_sent_count == 1 and len(sim.positions) == 1
        await settle()
        assert t.notices(t0) == ["+2 order_reconciled EURUSD not_filled"]


async def test_a_bots_constant_comment_never_makes_an_old_deal_look_like_this_orders_fill(
        tmp_path, autojump_clock):
    # Bots often put one comment on every order. Reconciling by that comment would take the
    # first order's deal for the second order's fill, and the second order would never be
    # sent: the tag the actor adds is what identifies an order, the bot's comment rides after.
    sim = new_sim()
    grid = {**ORDER, "comment": "grid bot"}
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep(1)
        first = await t.ref.order_send(grid)
        assert first.ok and sim.orders_sent_count == 1
        tagged = sim.deals[0].comment
        assert tagged.startswith("mt5sup-") and tagged.endswith(" grid bot")
        assert len(tagged) <= 29
        t0 = now()
        # The second one is rejected and the rejection lost: nothing of it executed.
        sim.inject("market_retcode", retcode=mt5.TRADE_RETCODE_REJECT)
        sim.inject("lost_reply")
        assert (await t.ref.order_send(grid)).error.code is E.ORDER_STATE_UNKNOWN
        await trio.sleep_until(t0 + 2)
        again = await t.ref.order_send(grid)
        assert again.ok and again.data.comment == "Request executed"  # sent, not "reconciled"
        assert sim.orders_sent_count == 2 and len(sim.deals) == 2
        await settle()
        assert t.notices(t0) == ["+2 order_reconciled EURUSD not_filled"]


async def test_an_order_that_cannot_be_reconciled_stays_unresolved_and_is_not_sent(
        tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep(1)
        t0 = now()
        sim.inject("market_retcode", retcode=mt5.TRADE_RETCODE_REJECT)
        sim.inject("lost_reply")
        assert (await t.ref.order_send(ORDER)).error.code is E.ORDER_STATE_UNKNOWN
        await trio.sleep_until(t0 + 2)
        # The deal history answers (no deal), but the open positions cannot be read: the
        # order might be an open position, so the outcome is still unknown.
        t.backend.fail_next["positions_get"] = (mt5.RES_E_INTERNAL_FAIL_SEND, "IPC send failed")
        r = await t.ref.order_send(ORDER)
        assert r.error.code is E.ORDER_STATE_UNKNOWN
        assert r.error.message == (
            "order_send failed: previous order on EURUSD is unresolved and cannot be "
            "reconciled yet (IPC send failed, -10001)")
        assert t.backend.calls["order_send"] == 1  # not sent
        assert t.actor.status_extra()["unresolved_orders"] == ["EURUSD"]
        await trio.sleep_until(t0 + 5)  # -10001: the terminal was re-attached meanwhile
        r = await t.ref.order_send(ORDER)
        assert r.ok and sim.orders_sent_count == 1
        await settle()
        # The second loss came 1 s after the reconnect (not stable_s): attempt 2, after 2 s.
        assert t.timeline(t0) == [
            "+0 state_changed CONNECTED->RECONNECTING attempt=1 delay=1 ORDER_STATE_UNKNOWN "
            "(failure_detected)",
            "+0 backoff_scheduled attempt=1 delay=1",
            "+1 state_changed RECONNECTING->CONNECTED (attempt 1 ok)",
            "+2 state_changed CONNECTED->RECONNECTING attempt=2 delay=2 ORDER_STATE_UNKNOWN "
            "(failure_detected)",
            "+2 backoff_scheduled attempt=2 delay=2",
            "+4 state_changed RECONNECTING->CONNECTED (attempt 2 ok)",
        ]
        assert t.notices(t0) == ["+5 order_reconciled EURUSD not_filled"]


async def test_an_order_past_its_deadline_is_unknown_and_reconciled_before_the_next(
        tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep(1)
        t0 = now()
        sim.inject("slow", delay_s=2, duration_s=2)
        r = await t.ref.order_send(ORDER, timeout_s=1)
        assert now() == t0 + 1
        # Cut off mid-flight, the order may have been executed: not TIMEOUT but unknown.
        assert (r.error.code, r.reason) == (E.ORDER_STATE_UNKNOWN, "order_state_unknown")
        assert r.error.message == "order_send failed: no answer before the call's deadline"
        assert t.actor.status_extra()["unresolved_orders"] == ["EURUSD"]
        await trio.sleep_until(t0 + 3)
        assert t.ref.state == "CONNECTED"
        r = await t.ref.order_send(ORDER)  # reconciled first: it was not executed
        assert r.ok and r.data.comment == "Request executed"
        assert sim.orders_sent_count == 1
        await settle()
        assert t.timeline(t0) == [
            "+1 state_changed CONNECTED->RECONNECTING attempt=1 delay=1 ORDER_STATE_UNKNOWN "
            "(failure_detected)",
            "+1 backoff_scheduled attempt=1 delay=1",
            "+2 state_changed RECONNECTING->CONNECTED (attempt 1 ok)",
        ]
        assert t.event(t0, "state_changed").error["message"] == (
            "order_send failed: the terminal did not answer within 1 s; the order may have "
            "been executed - it will be reconciled, not re-sent")
        assert t.notices(t0) == ["+1 worker_abandoned", "+3 order_reconciled EURUSD not_filled"]


# --------------------------------------------------------------- request errors (-4, -2, args)
async def test_not_found_and_invalid_requests_leave_the_connection_alone(
        tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep(1)
        t0 = now()
        r = await t.ref.symbol_info_tick("NOSUCH")
        assert (r.error.code, r.reason) == (E.NOT_FOUND, "not_found")
        assert r.error.message == "symbol_info_tick failed: Terminal: Not found (-4)"

        r = await t.ref.copy_rates_from_pos("EURUSD", mt5.TIMEFRAME_H1, 0, MAX_BARS + 1)
        assert (r.error.code, r.reason) == (E.INVALID_REQUEST, "invalid_request")
        assert r.error.message.startswith("copy_rates_from_pos failed: ")
        assert r.error.message.endswith("(-2)")

        r = await t.ref.call("symbol_info_tick", {"symbol": ""})
        assert r.error.code is E.INVALID_REQUEST
        assert r.error.message == "symbol_info_tick failed: symbol must be a non-empty string"
        r = await t.ref.call("symbol_info_tick", {"sym": "EURUSD"})
        assert r.error.message == ("symbol_info_tick failed: 1 unexpected argument(s); "
                                   "symbol_info_tick takes symbol")
        r = await t.ref.call("no_such_op")
        assert r.error.code is E.INVALID_REQUEST

        # A request the package refuses (-2, before it reaches the terminal) was never sent:
        # INVALID_REQUEST, not ORDER_STATE_UNKNOWN, and nothing is left to reconcile.
        r = await t.ref.order_send({**ORDER, "volume": 1})  # the package wants a float
        assert r.error.code is E.INVALID_REQUEST
        assert r.error.message == 'order_send failed: Invalid "volume" argument (-2)'
        assert t.actor.status_extra()["unresolved_orders"] == []

        await trio.sleep_until(t0 + 40)
        assert t.ref.state == "CONNECTED"
        assert t.timeline(t0) == []
        assert t.backend.calls["initialize"] == 1


# ------------------------------------------------------------------------------------ cache
async def test_reads_fall_back_to_the_cache_while_the_terminal_is_down_orders_never(
        tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        fetched_at = now()
        first = await t.ref.symbol_info_tick("EURUSD")
        assert first.ok
        assert (await t.ref.order_send(ORDER)).ok  # a successful write is not remembered
        await trio.sleep(1)
        t0 = now()
        sim.inject("terminal_crash", duration_s=100)
        cached_at = t.sup.wallclock.wall(fetched_at)

        r = await t.ref.symbol_info_tick("EURUSD")  # the failing call itself
        assert (r.status, r.data, r.cached_at) == ("degraded", first.data, cached_at)
        assert (r.reason, r.error.code) == ("terminal_unavailable", E.MT5_IPC_FAILED)

        await trio.sleep_until(t0 + 0.5)
        r = await t.ref.symbol_info_tick("EURUSD", timeout_s=0.25)  # RECONNECTING
        assert now() == t0 + 0.75
        assert (r.status, r.data, r.cached_at) == ("degraded", first.data, cached_at)
        assert r.error.code is E.ACTOR_UNAVAILABLE
        r = await t.ref.symbol_info_tick("GBPUSD", timeout_s=0.25)  # never read: nothing
        assert (r.status, r.data, r.error.code) == ("error", None, E.ACTOR_UNAVAILABLE)
        r = await t.ref.order_send(ORDER, timeout_s=0.25)
        assert (r.status, r.data, r.cached_at) == ("error", None, None)

        await trio.sleep_until(t0 + 8)  # ERROR: refused at once, still degraded for reads
        r = await t.ref.symbol_info_tick("EURUSD")
        assert now() == t0 + 8
        assert (r.status, r.data, r.cached_at) == ("degraded", first.data, cached_at)
        assert r.error.code is E.ACTOR_UNAVAILABLE
        assert r.error.retry_after == pytest.approx(29.0)
        r = await t.ref.order_send(ORDER)
        assert (r.status, r.data) == ("error", None)
        assert sim.orders_sent_count == 1

        await settle()
        assert t.notices(t0) == [
            "+0 degraded_served symbol_info_tick age=1 MT5_IPC_FAILED",
            "+0.75 degraded_served symbol_info_tick age=1.75 ACTOR_UNAVAILABLE",
            "+8 degraded_served symbol_info_tick age=9 ACTOR_UNAVAILABLE",
        ]
        assert t.sup.children["mt5"].view.degraded_served == 3


# -------------------------------------------------------------------------------- the probe
async def test_a_terminal_that_dies_without_traffic_is_found_by_the_30s_probe(
        tmp_path, autojump_clock):
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep_until(t.started_at + 1)
        t0 = now()
        sim.inject("terminal_crash", duration_s=31)
        await trio.sleep_until(t0 + 29.5)
        assert t.ref.state == "RECONNECTING"
        await trio.sleep_until(t0 + 35)
        assert t.ref.state == "CONNECTED"
        await settle()
        assert t.timeline(t0) == [
            "+29 probe_failed MT5_IPC_FAILED",
            "+29 state_changed CONNECTED->RECONNECTING attempt=1 delay=1 MT5_IPC_FAILED "
            "(failure_detected)",
            "+29 backoff_scheduled attempt=1 delay=1",
            "+30 attempt_failed attempt=1 MT5_INIT_FAILED",
            "+30 backoff_scheduled attempt=2 delay=2",
            "+32 state_changed RECONNECTING->CONNECTED (attempt 2 ok)",
        ]
        assert t.event(t0, "probe_failed").error["message"] == (
            "terminal_info failed: IPC send failed (-10001)")
        assert t.backend.calls["symbol_info_tick"] == 0  # no traffic at all


# ------------------------------------------------------------- a call right after a failure
async def test_a_call_right_after_a_failure_waits_for_the_reconnect(tmp_path, autojump_clock):
    """The failing call's report reaches the driver only when it next runs; a call made in
    between must not be let into the dead session (it would fail at once on the abandoned
    worker) but wait at the gate like any call while RECONNECTING."""
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep(1)
        t0 = now()
        sim.inject("hang", duration_s=2.5)
        assert (await t.ref.symbol_info_tick("EURUSD", timeout_s=2)).error.code is E.TIMEOUT
        r = await t.ref.symbol_info_tick("EURUSD", timeout_s=5)  # at once, same instant
        assert r.ok and now() == t0 + 3  # answered when attempt 1 reconnects


async def test_initialize_on_an_attached_terminal_answers_true_and_restarts_nothing(
        tmp_path, autojump_clock):
    # Bots written against the package call initialize() at start and after failures; it
    # must not tear down a healthy connection (nor give a flapping terminal a fresh budget).
    sim = new_sim()
    async with mt5_tree(tmp_path, sim) as t:
        await trio.sleep(1)
        attached = t.backend.calls["initialize"]
        t0 = now()
        r = await t.ref.initialize()
        assert r.ok and r.data is True
        assert t.backend.calls["initialize"] == attached
        await settle()
        assert t.timeline(t0) == []
