"""A terminal call that hangs forever, in real time, with the dedicated worker thread.

On the virtual clock a thread's work is invisible, so this one runs on the real clock: the
production ``ThreadWorker``, the simulator on ``time.monotonic``, the whole supervisor. One
call into the terminal never returns. The caller must get TIMEOUT at its deadline, the actor
must carry on with a fresh thread, and shutdown must not wait for the stuck one; when the
terminal finally lets go, the abandoned thread must exit without running the call.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import trio

from actors.cache import TtlCache
from actors.mt5.actor import SIGNATURES, Mt5Actor, Mt5Ref, TerminalLedger
from actors.mt5.simulator import CallDelay, TerminalSimulator
from actors.mt5.worker import ABANDONED
from supervision.errors import ErrorCode
from supervision.settings import ActorSettings
from supervision.supervisor import ChildSpec
from tests.support.actors import Recorder, running_supervisor

MT5_FUNCTIONS = set(SIGNATURES) | {"initialize", "shutdown"}
DEADLINE_S = 0.5
SETTINGS = ActorSettings(backoff_base_s=0.2, shutdown_timeout_s=1.0)


class Gate:
    """A hang the test releases (the ``HangToken`` protocol: ``released``, ``add_listener``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._released = False
        self._listeners: list[Any] = []

    @property
    def released(self) -> bool:
        return self._released

    def add_listener(self, callback: Any) -> None:
        with self._lock:
            if not self._released:
                self._listeners.append(callback)
                return
        callback()

    def release(self) -> None:
        with self._lock:
            self._released = True
            listeners, self._listeners = self._listeners, []
        for callback in listeners:
            callback()


class OneCallHangs:
    """The simulator, except that one armed call gets stuck in the terminal until released,
    while every other call (from a fresh thread) goes through: a terminal wedged in one call.
    Records which thread made each terminal call."""

    def __init__(self, sim: TerminalSimulator) -> None:
        self.sim = sim
        self.gate = Gate()
        self.armed: str | None = None
        self.hung_in: str | None = None
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()

    def before_call(self, name: str) -> CallDelay:
        if name == self.armed:
            self.armed = None
            self.hung_in = threading.current_thread().name
            return CallDelay(hang=self.gate)  # type: ignore[arg-type]
        return self.sim.before_call(name)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.sim, name)
        if name not in MT5_FUNCTIONS:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[(threading.current_thread().name, name)] += 1
            return attr(*args, **kwargs)

        return counted


async def test_a_hung_terminal_call_is_abandoned_and_a_fresh_thread_takes_over(tmp_path):
    sim = TerminalSimulator(clock=time.monotonic)
    backend = OneCallHangs(sim)
    abandoned_before = ABANDONED.total
    async with running_supervisor(tmp_path, lkg=TtlCache()) as sup:
        rec = Recorder(sup)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rec.run)
            ledger = TerminalLedger()  # shared by the fresh instance of every restart
            ref = await sup.start_child(ChildSpec(
                "mt5", lambda: Mt5Actor(lambda: backend, inline=False, ledger=ledger),
                settings=SETTINGS,
                ref_class=Mt5Ref))
            assert isinstance(ref, Mt5Ref)
            actor = sup.children["mt5"].actor
            assert isinstance(actor, Mt5Actor)
            old_thread = actor.worker.thread
            assert (await ref.symbol_info_tick("EURUSD")).ok

            backend.armed = "symbol_info_tick"
            started = trio.current_time()
            r = await ref.symbol_info_tick("EURUSD", timeout_s=DEADLINE_S)
            took = trio.current_time() - started
            assert r.error.code is ErrorCode.TIMEOUT
            assert DEADLINE_S <= took < DEADLINE_S + 0.25
            assert backend.hung_in == old_thread.name

            await rec.wait_for(lambda e: e.kind == "state_changed"
                               and e.data["reason"] == "attempt 1 ok", timeout=5.0)
            assert ref.state == "CONNECTED"
            actor = sup.children["mt5"].actor  # restarts are fresh: a new instance
            assert isinstance(actor, Mt5Actor) and actor.worker is not None
            new_thread = actor.worker.thread
            assert new_thread.name != old_thread.name and new_thread.is_alive()
            assert old_thread.is_alive()  # still stuck in the terminal
            assert ABANDONED.total == abandoned_before + 1
            extra = sup.status()[0]["extra"]
            assert extra["abandoned_threads"] == ABANDONED.total
            assert extra["abandoned_threads_alive"] >= 1
            assert extra["workers_started"] == 2
            abandoned = [e for e in rec.of("mt5", "worker_abandoned")]
            assert len(abandoned) == 1
            assert abandoned[0].data == {"abandoned_threads": ABANDONED.total}

            r = await ref.symbol_info_tick("EURUSD", timeout_s=DEADLINE_S)
            assert r.ok
            assert backend.calls[(new_thread.name, "symbol_info_tick")] == 1

            # Shutdown is bounded and does not wait for the stuck thread.
            started = trio.current_time()
            await sup.shutdown()
            took = trio.current_time() - started
            assert took < SETTINGS.shutdown_timeout_s + 1.0
            assert old_thread.is_alive()
            nursery.cancel_scope.cancel()

    # The terminal lets go at last: the abandoned thread exits without making the call.
    backend.gate.release()
    old_thread.join(2.0)
    assert not old_thread.is_alive()
    assert backend.calls[(old_thread.name, "symbol_info_tick")] == 1  # only the first one
    new_thread.join(1.0)  # retired at shutdown: it has stopped too
    assert not new_thread.is_alive()
