"""The supervision core through the Supervisor (DESIGN.md sections 3-5), on trio's virtual
clock: schedules, the call gate, degraded answers, escalation hooks, restart types,
strategies, crashes, shutdown and the circuit breaker."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio

from actors.cache import TtlCache
from supervision.actor import READ, WRITE, Actor, OpSpec
from supervision.breaker import BreakerConfig
from supervision.bus import Missed
from supervision.clock import WallClock
from supervision.errors import ErrorCode, ErrorInfo, Failure, Response
from supervision.eventlog import EventLog, iter_file
from supervision.events import Event
from supervision.ref import cache_key
from supervision.settings import ActorSettings
from supervision.supervisor import ChildSpec, Supervisor
from tests.support.actors import FlakyActor, FlakyResource, ResourceDown

WALL0 = 1_800_000_000.0


# ------------------------------------------------------------------------------ harness
class Tree:
    """A running supervisor plus an in-order view of its events (no polling, no time)."""

    def __init__(self, sup: Supervisor, path: Path) -> None:
        self.sup = sup
        self.path = path
        self.t0 = trio.current_time()
        self._sub = sup.bus.open_subscription(since_seq=0, buffer=1_000_000)
        self.seen: list[Event] = []

    def wall(self, t: float):  # noqa: ANN201 - a datetime
        return self.sup.wallclock.wall(t)

    async def wait(self, actor: str, kind: str, *, to: str | None = None) -> Event:
        """The next event (not yet consumed) matching; virtual time only moves if nothing
        is ready, exactly as it would without the wait."""
        with trio.fail_after(600):
            while True:
                item = await self._sub.get()
                assert not isinstance(item, Missed)
                self.seen.append(item)
                if item.actor == actor and item.kind == kind and (to is None
                                                                 or item.to_state == to):
                    return item

    def drain(self) -> list[Event]:
        while (item := self._sub.get_nowait()) is not None:
            assert not isinstance(item, Missed)
            self.seen.append(item)
        return self.seen

    def of(self, actor: str, *kinds: str) -> list[Event]:
        return [e for e in self.drain() if e.actor == actor and (not kinds or e.kind in kinds)]

    def at(self, event: Event) -> float:
        """The trio time of an event, relative to the start of the test."""
        return round((event.ts - self.wall(self.t0)).total_seconds(), 6)


@contextlib.asynccontextmanager
async def tree(tmp_path: Path, **kwargs: Any) -> AsyncIterator[Tree]:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, fsync="never")
    log.open()
    try:
        async with trio.open_nursery() as nursery:
            sup = Supervisor(log=log, wallclock=WallClock(trio.current_time(), WALL0),
                             **kwargs)
            await nursery.start(sup.run)
            t = Tree(sup, path)
            try:
                yield t
            finally:
                with trio.CancelScope(shield=True), trio.fail_after(120):
                    await sup.shutdown()
    finally:
        log.close()
    # Every message is non-empty, in every event ever logged.
    for event in iter_file(path):
        if event.error is not None:
            assert event.error["message"].strip(), event


def rel(times: list[float], t0: float) -> list[float]:
    return [round(t - t0, 6) for t in times]


def check(resp: Response) -> Response:
    """Every Response is well formed; every error message non-empty."""
    assert resp.status in ("ok", "degraded", "error")
    if resp.status == "ok":
        assert resp.error is None and resp.cached_at is None
    else:
        assert resp.error is not None and resp.error.message.strip()
        assert resp.reason
    if resp.status == "error":
        assert resp.data is None and resp.cached_at is None
    return resp


async def timed_call(ref, op: str, args: Mapping[str, Any] | None = None,
                     **kw: Any) -> tuple[float, Response]:
    t = trio.current_time()
    resp = check(await ref.call(op, args, **kw))
    return round(trio.current_time() - t, 6), resp


def db(res: FlakyResource, name: str = "db", **kw: Any) -> ChildSpec:
    return ChildSpec(name, lambda: FlakyActor(res), **kw)


# ------------------------------------------------------------------- operator restart
async def test_operator_restart_from_error_gives_a_fresh_budget(tmp_path, autojump_clock):
    res = FlakyResource(up=False)
    async with tree(tmp_path) as t:
        await t.sup.start_child(db(res))
        await t.wait("db", "escalated")
        assert rel(res.connects, t.t0) == [0, 1, 3, 7]
        await trio.sleep(3)  # t = 10, the next probe is due at 37
        await t.sup.restart_child("db", "operator")
        changed = await t.wait("db", "state_changed", to="RECONNECTING")
        assert (changed.from_state, changed.attempt, changed.delay_s) == ("ERROR", 1, 0.0)
        assert changed.data["reason"] == "operator"
        await t.wait("db", "escalated")
        # attempt now, then 2 s and 4 s later; ERROR again; probes 30 s after that
        assert rel(res.connects, t.t0) == [0, 1, 3, 7, 10, 12, 16]
        assert t.sup.state("db") == "ERROR"
        await trio.sleep(31)
        assert rel(res.connects, t.t0) == [0, 1, 3, 7, 10, 12, 16, 46]
        failed = t.of("db", "attempt_failed")
        assert [e.attempt for e in failed] == [1, 2, 3, 1, 2, 3]
        # With the resource back, a restart from ERROR reconnects at once.
        res.up = True
        await t.sup.restart_child("db")
        await t.wait("db", "state_changed", to="CONNECTED")
        assert rel(res.connects, t.t0)[-1] == 47
        assert t.sup.status()[0]["restarts"] == 7


# -------------------------------------------------------------- failure detection
async def test_health_probe_detects_a_dead_resource(tmp_path, autojump_clock):
    res = FlakyResource()
    async with tree(tmp_path) as t:
        await t.sup.start_child(db(res))
        await t.wait("db", "state_changed", to="CONNECTED")
        await trio.sleep(10)
        res.up = False  # dies silently: no traffic
        failed = await t.wait("db", "probe_failed")
        assert t.at(failed) == 30.0
        assert failed.error["code"] == "DB_UNAVAILABLE"
        assert rel(res.probes, t.t0) == [30]
        changed = await t.wait("db", "state_changed", to="RECONNECTING")
        assert (t.at(changed), changed.from_state, changed.attempt, changed.delay_s) == (
            30.0, "CONNECTED", 1, 1.0)
        assert changed.error["message"].startswith("probe failed")
        res.up = True
        await t.wait("db", "state_changed", to="CONNECTED")
        assert rel(res.connects, t.t0) == [0, 31]
        # The health probe runs again 30 s after the reconnect.
        await trio.sleep(31)
        assert rel(res.probes, t.t0) == [30, 61]


async def test_a_hung_probe_counts_as_failed_after_probe_timeout(tmp_path, autojump_clock):
    res = FlakyResource()
    hang = trio.Event()

    async def hanging_probe(actor: Actor) -> None:
        res.probes.append(trio.current_time())
        if not res.up:
            await hang.wait()

    async with tree(tmp_path) as t:
        await t.sup.start_child(db(res, probe=hanging_probe,
                                   settings=ActorSettings(probe_timeout_s=5.0)))
        res.up = False
        failed = await t.wait("db", "probe_failed")
        assert t.at(failed) == 35.0  # probed at 30, gave up 5 s later
        assert failed.error["message"]


async def test_a_call_that_sees_a_connection_failure_reconnects(tmp_path, autojump_clock):
    res = FlakyResource()
    async with tree(tmp_path) as t:
        ref = await t.sup.start_child(db(res))
        assert (await ref.call("read")).data == {"value": 0}
        await trio.sleep(5)
        res.up = False
        elapsed, resp = await timed_call(ref, "read")
        assert elapsed == 0
        assert resp.status == "error" and resp.error.code == ErrorCode.DB_UNAVAILABLE
        assert resp.error.message == "read failed: read: connection reset"
        assert resp.reason == "database_unavailable"
        changed = await t.wait("db", "state_changed", to="RECONNECTING")
        assert (t.at(changed), changed.attempt, changed.delay_s) == (5.0, 1, 1.0)
        assert changed.error["code"] == "DB_UNAVAILABLE"
        await t.wait("db", "attempt_failed")
        assert rel(res.connects, t.t0) == [0, 6]


# -------------------------------------------------------------------- the call gate
async def reconnecting(t: Tree, res: FlakyResource, ref) -> float:
    """Take the resource down and let a call notice; returns when RECONNECTING."""
    res.up = False
    await ref.call("read")
    await t.wait("db", "state_changed", to="RECONNECTING")
    return trio.current_time()


async def test_calls_while_reconnecting_wait_and_succeed(tmp_path, autojump_clock):
    res = FlakyResource()
    async with tree(tmp_path) as t:
        ref = await t.sup.start_child(db(res))
        down_at = await reconnecting(t, res, ref)
        res.up = True  # attempt 1 (1 s after the failure) will succeed
        elapsed, resp = await timed_call(ref, "read", timeout_s=5)
        assert resp.status == "ok" and resp.data == {"value": 0}
        assert elapsed == 1.0
        assert rel(res.connects, t.t0) == [0, round(down_at - t.t0 + 1, 6)]


async def test_calls_while_reconnecting_get_unavailable_at_their_deadline(tmp_path,
                                                                          autojump_clock):
    res = FlakyResource()
    async with tree(tmp_path) as t:
        # More attempts than the default, so it stays RECONNECTING for the whole test.
        ref = await t.sup.start_child(db(res, settings=ActorSettings(max_attempts=6)))
        await reconnecting(t, res, ref)
        elapsed, resp = await timed_call(ref, "read", timeout_s=2.5)
        assert elapsed == 2.5
        assert resp.error.code == ErrorCode.ACTOR_UNAVAILABLE
        assert resp.error.state == "RECONNECTING"
        assert "deadline" in resp.error.message
        # attempts at +1 (failed) and +3: 0.5 s to go at the deadline
        assert resp.error.retry_after == pytest.approx(0.5)
        # No call waits without a deadline: the default is call_timeout_s (10 s).
        elapsed, resp = await timed_call(ref, "write", {"value": 1})
        assert elapsed == 10.0 and resp.error.code == ErrorCode.ACTOR_UNAVAILABLE
        assert res.calls == 1  # only the call that found it dead reached the resource


async def test_a_call_queued_when_the_connection_is_lost_waits_for_the_reconnect(
        tmp_path, autojump_clock):
    """A request still in the mailbox when the connection was lost never ran: it waits for
    the reconnect like any call made while RECONNECTING (and tells the breaker nothing)."""
    res = FlakyResource()
    gate = trio.Event()

    class Slow(FlakyActor):
        async def handle(self, op: str, args: Mapping[str, Any]) -> Any:
            if op == "write":
                await gate.wait()
            return await super().handle(op, args)

    results: dict[str, tuple[float, Response]] = {}
    async with tree(tmp_path) as t:
        ref = await t.sup.start_child(ChildSpec("db", lambda: Slow(res)))

        async def call(key: str, op: str) -> None:
            results[key] = await timed_call(ref, op, timeout_s=20)

        async with trio.open_nursery() as n:
            await trio.sleep(20)
            n.start_soon(call, "first", "write")  # holds the mailbox
            await trio.sleep(0.1)
            n.start_soon(call, "queued", "read")  # waits in the mailbox
            await trio.sleep(4.9)
            res.up = False
            await t.wait("db", "probe_failed")  # at 30: RECONNECTING, attempt 1 at 31
            await t.wait("db", "state_changed", to="RECONNECTING")
            res.up = True
            await trio.sleep(0.5)
            gate.set()  # the mailbox moves on to the queued read, while RECONNECTING
        elapsed, resp = results["queued"]
        assert resp.status == "ok", resp
        assert elapsed == pytest.approx(31 - 20.1)
        # The write in flight ended with its instance (restarts are fresh): it is told so,
        # and never reached the resource; the read ran once, on the new connection.
        _, first = results["first"]
        assert first.status == "error" and first.error.code == "ACTOR_UNAVAILABLE", first
        assert "lost its connection while the call ran" in first.error.message
        assert res.calls == 1


async def test_waiting_queue_is_bounded(tmp_path, autojump_clock):
    res = FlakyResource()
    results: list[tuple[float, Response]] = []
    async with tree(tmp_path) as t:
        ref = await t.sup.start_child(db(res, settings=ActorSettings(queue_limit=3)))
        await reconnecting(t, res, ref)

        async def call() -> None:
            results.append(await timed_call(ref, "read", timeout_s=0.5))

        async with trio.open_nursery() as n:
            for _ in range(5):
                n.start_soon(call)
            await trio.sleep(0.25)
            assert t.sup.children["db"].cell.waiting_calls == 3
        refused = [r for r in results if r[0] == 0]
        waited = [r for r in results if r[0] == 0.5]
        assert len(refused) == 2 and len(waited) == 3
        for _, resp in refused:
            assert resp.error.code == ErrorCode.ACTOR_UNAVAILABLE
            assert "3 calls already wait" in resp.error.message
        assert t.sup.children["db"].cell.waiting_calls == 0


async def test_error_state_refuses_at_once_with_time_to_next_probe(tmp_path, autojump_clock):
    res = FlakyResource(up=False)
    async with tree(tmp_path) as t:
        ref = await t.sup.start_child(db(res))
        await t.wait("db", "escalated")  # t = 7, the probe is due at 37
        await trio.sleep(3)
        elapsed, resp = await timed_call(ref, "read")
        assert elapsed == 0
        assert resp.error.code == ErrorCode.ACTOR_UNAVAILABLE
        assert resp.error.state == "ERROR"
        assert resp.error.retry_after == pytest.approx(27.0)
        assert "connection refused" in resp.error.message  # says why
        await trio.sleep(30)  # past the failed probe at 37: the next one is at 67
        _, resp = await timed_call(ref, "read")
        assert resp.error.retry_after == pytest.approx(27.0)


async def test_timeout_must_be_positive_and_unknown_ops_are_refused(tmp_path, autojump_clock):
    res = FlakyResource()
    async with tree(tmp_path) as t:
        ref = await t.sup.start_child(db(res))
        resp = check(await ref.call("read", timeout_s=0))
        assert resp.error.code == ErrorCode.INVALID_REQUEST
        resp = check(await ref.call("drop_everything"))
        assert resp.error.code == ErrorCode.INVALID_REQUEST
        assert res.calls == 0


async def test_a_call_past_its_deadline_is_a_timeout(tmp_path, autojump_clock):
    res = FlakyResource()

    class Hangs(FlakyActor):
        async def handle(self, op: str, args: Mapping[str, Any]) -> Any:
            if op == "write":
                await trio.sleep_forever()
            return await super().handle(op, args)

    async with tree(tmp_path) as t:
        ref = await t.sup.start_child(ChildSpec("db", lambda: Hangs(res)))
        elapsed, resp = await timed_call(ref, "write", {"value": 1}, timeout_s=3)
        assert elapsed == 3 and resp.error.code == ErrorCode.TIMEOUT
        # A plain timeout does not mean the resource is lost (the actor's default).
        assert t.sup.state("db") == "CONNECTED"
        assert (await ref.call("read")).ok


# ------------------------------------------------------------------ degraded answers
async def test_cacheable_reads_fall_back_to_last_known_good(tmp_path, autojump_clock):
    res = FlakyResource()
    cache = TtlCache(ttl_s=120.0)
    async with tree(tmp_path, lkg=cache) as t:
        ref = await t.sup.start_child(db(res))
        res.value = 42
        await trio.sleep(2)
        read_at = trio.current_time()
        assert (await ref.call("read")).data == {"value": 42}
        assert (await ref.call("write", {"value": 7})).ok
        await trio.sleep(8)
        res.up = False

        # The call that finds it dead: degraded at once.
        elapsed, resp = await timed_call(ref, "read")
        assert elapsed == 0
        assert resp.status == "degraded"
        assert resp.data == {"value": 42}
        assert resp.cached_at == t.wall(read_at)  # the wall time of the successful read
        assert resp.reason == "database_unavailable"
        assert resp.error.code == ErrorCode.DB_UNAVAILABLE
        await t.wait("db", "state_changed", to="RECONNECTING")

        # Writes are never served from the cache, even with a value under their key.
        cache.remember(cache_key("db", "write", {"value": 8}), True, trio.current_time())
        elapsed, resp = await timed_call(ref, "write", {"value": 8}, timeout_s=1.5)
        assert resp.status == "error" and elapsed == 1.5
        assert resp.error.code == ErrorCode.ACTOR_UNAVAILABLE

        # RECONNECTING: the read waits to its deadline, then is degraded.
        elapsed, resp = await timed_call(ref, "read", timeout_s=2)
        assert elapsed == 2 and resp.status == "degraded"
        assert resp.error.code == ErrorCode.ACTOR_UNAVAILABLE
        assert resp.cached_at == t.wall(read_at)

        # A read never done before has nothing to fall back on.
        _, resp = await timed_call(ref, "read", {"other": 1}, timeout_s=1)
        assert resp.status == "error"

        await t.wait("db", "escalated")
        elapsed, resp = await timed_call(ref, "read")  # ERROR: refused and degraded at once
        assert elapsed == 0 and resp.status == "degraded" and resp.data == {"value": 42}

        # Past the TTL the value is gone: a plain error.
        await trio.sleep(120)
        _, resp = await timed_call(ref, "read")
        assert resp.status == "error" and resp.error.code == ErrorCode.ACTOR_UNAVAILABLE

        await trio.sleep(0.01)
        served = t.of("db", "degraded_served")
        assert len(served) == 3
        assert [e.error["code"] for e in served] == [
            "DB_UNAVAILABLE", "ACTOR_UNAVAILABLE", "ACTOR_UNAVAILABLE"]
        assert all(e.data["op"] == "read" for e in served)
        assert served[0].data["age_s"] == 8.0
        assert t.sup.children["db"].view.degraded_served == 3


# ------------------------------------------------------------------------ escalation
async def test_on_escalate_is_called_once_per_escalation(tmp_path, autojump_clock):
    res = FlakyResource(up=False)
    tree_calls: list[tuple[str, ErrorInfo | None, float]] = []
    spec_calls: list[tuple[str, ErrorInfo | None, float]] = []

    def sync_hook(name: str, info: ErrorInfo | None) -> None:
        tree_calls.append((name, info, trio.current_time()))

    async def async_hook(name: str, info: ErrorInfo | None) -> None:
        await trio.sleep(0.5)
        spec_calls.append((name, info, trio.current_time()))

    async with tree(tmp_path, on_escalate=sync_hook) as t:
        await t.sup.start_child(db(res, on_escalate=async_hook))
        await trio.sleep(100)  # ERROR at 7, probes at 37, 67, 97 fail: still one escalation
        assert rel([c[2] for c in tree_calls], t.t0) == [7.5]
        assert rel([c[2] for c in spec_calls], t.t0) == [7.5]
        name, info, _ = tree_calls[0]
        assert name == "db" and info.code == ErrorCode.DB_UNAVAILABLE and info.message
        assert info.actor == "db" and info.state == "ERROR"  # the state it escalated to
        t.drain()
        await t.sup.restart_child("db")
        await t.wait("db", "escalated")
        await trio.sleep(1)
        assert rel([c[2] for c in tree_calls], t.t0) == [7.5, 106.5]
        assert len(spec_calls) == 2
        assert len(t.of("db", "escalated")) == 2


async def test_a_hanging_hook_is_bounded(tmp_path, autojump_clock):
    res = FlakyResource(up=False)
    other = FlakyResource()
    cut: list[float] = []

    async def hangs(name: str, info: ErrorInfo | None) -> None:
        try:
            await trio.sleep_forever()
        finally:
            cut.append(trio.current_time())

    async with tree(tmp_path, on_escalate=hangs) as t:
        await t.sup.start_child(db(res, settings=ActorSettings(escalate_timeout_s=5.0)))
        ok = await t.sup.start_child(db(other, "other"))
        await trio.sleep(40)
        assert rel(cut, t.t0) == [12.0]  # escalated at 7, cut off 5 s later
        assert rel(res.connects, t.t0) == [0, 1, 3, 7, 37]  # the probe kept its time
        _, resp = await timed_call(t.sup.ref("db"), "read")
        assert resp.error.code == ErrorCode.ACTOR_UNAVAILABLE  # ERROR, refused at once
        assert (await ok.call("read")).ok


async def test_a_raising_hook_does_not_break_the_tree(tmp_path, autojump_clock):
    res = FlakyResource(up=False)
    other = FlakyResource()

    def raises(name: str, info: ErrorInfo | None) -> None:
        raise RuntimeError("hook bug")

    async with tree(tmp_path, on_escalate=raises) as t:
        await t.sup.start_child(db(res))
        ok = await t.sup.start_child(db(other, "other"))
        await t.wait("db", "escalated")
        await trio.sleep(1)
        assert (await ok.call("read")).ok
        res.up = True
        await t.wait("db", "recovered")
        assert rel(res.connects, t.t0) == [0, 1, 3, 7, 37]
        assert t.sup.state("db") == "CONNECTED" and t.sup.state("other") == "CONNECTED"


# --------------------------------------------------------------------- restart types
class Serving(FlakyActor):
    """serve() ends after ``after`` seconds: returns, or raises."""

    def __init__(self, res: FlakyResource, mode: str, after: float = 5.0) -> None:
        super().__init__(res)
        self.mode, self.after = mode, after

    async def serve(self) -> None:
        await trio.sleep(self.after)
        if self.mode == "raise":
            raise ValueError("strategy blew up")


@pytest.mark.parametrize(("restart", "mode", "restarted"), [
    ("permanent", "return", True),
    ("permanent", "raise", True),
    ("transient", "return", False),
    ("transient", "raise", True),
    ("temporary", "return", False),
    ("temporary", "raise", False),
])
async def test_restart_types(tmp_path, autojump_clock, restart, mode, restarted):
    res = FlakyResource()
    async with tree(tmp_path) as t:
        ref = await t.sup.start_child(ChildSpec("bot", lambda: Serving(res, mode),
                                                restart=restart))
        await trio.sleep(5.5)
        if restarted:
            changed = await t.wait("bot", "state_changed", to="RECONNECTING")
            assert t.at(changed) == 5.0 and changed.from_state == "CONNECTED"
            if mode == "raise":
                assert changed.error["message"] == "serve failed: strategy blew up"
            else:
                assert changed.error["message"] == "serve exited"
            await t.wait("bot", "state_changed", to="CONNECTED")
            assert rel(res.connects, t.t0) == [0, 6]  # attempt 1 after 1 s
            await trio.sleep(7.5)
            # And again: it is restarted, with attempt 2 after 2 s, since it was not up for
            # stable_s (a child that keeps exiting escalates like one that cannot connect).
            assert rel(res.connects, t.t0) == [0, 6, 13]
        else:
            changed = await t.wait("bot", "state_changed", to="DISCONNECTED")
            assert t.at(changed) == 5.0
            stopped = await t.wait("bot", "actor_stopped")
            if mode == "raise":
                assert stopped.error["message"] == "serve failed: strategy blew up"
            else:
                assert stopped.error is None
            await trio.sleep(60)
            assert rel(res.connects, t.t0) == [0]
            assert t.sup.state("bot") == "DISCONNECTED"
            # A stopped actor refuses calls at once.
            elapsed, resp = await timed_call(ref, "read")
            assert elapsed == 0 and resp.error.code == ErrorCode.ACTOR_UNAVAILABLE
            # An operator restart starts a stopped child again (without breaking the tree).
            await t.sup.restart_child("bot")
            assert t.sup.state("bot") == "CONNECTED"
            assert len(res.connects) == 2
            assert (await ref.call("read")).ok


# ------------------------------------------------------------------------ strategies
@pytest.mark.parametrize("strategy", ["one_for_one", "rest_for_one"])
async def test_rest_for_one_restarts_later_children(tmp_path, autojump_clock, strategy):
    resources = {name: FlakyResource() for name in "abc"}
    async with tree(tmp_path, strategy=strategy) as t:
        for name in "abc":
            await t.sup.start_child(db(resources[name], name))
        await trio.sleep(5)
        b = resources["b"]
        b.up = False
        await t.sup.ref("b").call("read")
        await t.wait("b", "state_changed", to="RECONNECTING")
        b.up = True
        await trio.sleep(10)
        conns = {name: rel(r.connects, t.t0) for name, r in resources.items()}
        assert conns["a"] == [0]  # earlier children are never touched
        assert conns["b"] == [0, 6]
        if strategy == "rest_for_one":
            # Stopped at once, started again once b is back (b's attempt 1 at +6): in
            # start order, as OTP restarts the group, so c never runs without b.
            assert conns["c"] == [0, 6]
            changed = [e for e in t.of("c", "state_changed")]
            assert [(e.from_state, e.to_state) for e in changed] == [
                ("DISCONNECTED", "CONNECTED"), ("CONNECTED", "DISCONNECTED"),
                ("DISCONNECTED", "CONNECTED")]
            assert changed[1].data["reason"] == "rest_for_one:b"
        else:
            assert conns["c"] == [0]
        assert all(t.sup.state(n) == "CONNECTED" for n in "abc")


# ------------------------------------------------------------------------- crashes
class CrashingLifetime(FlakyActor):
    """Its lifetime() fails after ``after`` seconds (a background task in it raises)."""

    crash_after: ClassVar[float] = 5.0
    lives = 0

    @contextlib.asynccontextmanager
    async def lifetime(self) -> AsyncIterator[None]:
        type(self).lives += 1
        first = type(self).lives == 1

        async def boom() -> None:
            await trio.sleep(self.crash_after)
            raise RuntimeError("the loop this actor lives in died")

        async with trio.open_nursery() as n:
            if first:
                n.start_soon(boom)
            yield
            n.cancel_scope.cancel()


class Buggy(FlakyActor):
    """classify() itself has a bug: a connection failure crashes the driver."""

    def classify(self, exc: BaseException, op: str) -> Failure:
        raise TypeError("classify is broken")


@pytest.mark.parametrize("strategy", ["one_for_one", "rest_for_one"])
@pytest.mark.parametrize("kind", ["lifetime", "bug"])
async def test_a_crashing_child_never_takes_down_its_siblings(tmp_path, autojump_clock,
                                                              strategy, kind):
    CrashingLifetime.lives = 0
    sib1, crash_res, sib2 = FlakyResource(), FlakyResource(), FlakyResource()
    actor_cls: Callable[[FlakyResource], Actor] = (
        CrashingLifetime if kind == "lifetime" else Buggy)
    async with tree(tmp_path, strategy=strategy) as t:
        first = await t.sup.start_child(db(sib1, "first"))
        ref = await t.sup.start_child(ChildSpec("crashy", lambda: actor_cls(crash_res)))
        last = await t.sup.start_child(db(sib2, "last"))
        await trio.sleep(5)
        if kind == "bug":
            crash_res.up = False
            await ref.call("read")  # the failure makes the driver call classify()
        crashed = await t.wait("crashy", "state_changed", to="ERROR")
        assert crashed.error["code"] == "INTERNAL"
        assert crashed.error["message"].startswith("crashy crashed: ")
        assert t.at(crashed) == 5.0
        assert t.sup.state("crashy") == "ERROR"
        # Calls to the crashed child get an answer at once, never an exception.
        elapsed, resp = await timed_call(ref, "read", timeout_s=2)
        assert elapsed == 0 and resp.error.code == ErrorCode.ACTOR_UNAVAILABLE
        assert resp.error.message == "read refused: crashy is not running"
        # An earlier sibling failing meanwhile (rest_for_one restarts the later ones).
        sib1.up = False
        await first.call("read")
        sib1.up = True
        await trio.sleep(10)
        assert (await first.call("read")).ok and (await last.call("read")).ok
        assert t.sup.state("first") == "CONNECTED" and t.sup.state("last") == "CONNECTED"
        # Started again after health_interval_s.
        crash_res.up = True
        await t.wait("crashy", "state_changed", to="CONNECTED")
        assert rel(crash_res.connects, t.t0)[-1] == 35.0
        assert (await ref.call("read")).ok
        assert t.sup.children["crashy"].crashes == 1


# ------------------------------------------------------------------------- shutdown
class Releasing(FlakyActor):
    def __init__(self, res: FlakyResource, name: str, order: list[tuple[str, float]],
                 hang: bool = False) -> None:
        super().__init__(res)
        self._label, self._order, self._hang = name, order, hang

    async def release(self) -> None:
        self._order.append((self._label, trio.current_time()))
        if self._hang:
            await trio.sleep_forever()
        await trio.sleep(0.25)
        self.connected = False


@pytest.mark.parametrize("hang", [False, True])
async def test_shutdown_in_reverse_start_order_and_bounded(tmp_path, autojump_clock, hang):
    order: list[tuple[str, float]] = []
    settings = ActorSettings(shutdown_timeout_s=2.0)
    path = tmp_path / "events.jsonl"
    log = EventLog(path, fsync="never")
    log.open()
    async with trio.open_nursery() as nursery:
        sup = Supervisor(log=log)
        await nursery.start(sup.run)
        for name in ("cache", "questdb", "mt5", "bot"):
            hangs = hang and name == "mt5"
            await sup.start_child(ChildSpec(
                name, lambda n=name, h=hangs: Releasing(FlakyResource(), n, order, h),
                settings=settings))
        await trio.sleep(1)
        t = trio.current_time()
        await sup.shutdown()
        took = trio.current_time() - t
    log.close()
    assert [name for name, _ in order] == ["bot", "mt5", "questdb", "cache"]
    if hang:
        # mt5's release is cut off after its shutdown_timeout_s; the rest still release.
        assert took == pytest.approx(0.25 + 2.0 + 0.25 + 0.25)
    else:
        assert took == pytest.approx(4 * 0.25)
    stops = [e for e in iter_file(path) if e.kind == "actor_stopped"]
    assert [e.actor for e in stops] == ["bot", "mt5", "questdb", "cache"]
    assert [e.kind for e in iter_file(path)][-1] == "runtime_stopped"


# -------------------------------------------------------------------------- breaker
class Pool(FlakyActor):
    """A pool: connects and probes follow ``up``; requests can fail on their own;
    ``bad`` is a query error (syntax), not a connection error."""

    ops: ClassVar[Mapping[str, OpSpec]] = {"read": READ, "write": WRITE, "bad": READ}

    def __init__(self, res: FlakyResource, handled: list[float]) -> None:
        super().__init__(res)
        self.handled = handled

    async def handle(self, op: str, args: Mapping[str, Any]) -> Any:
        self.handled.append(trio.current_time())
        if op == "bad":
            raise ValueError('syntax error at or near "SELEC"')
        return await super().handle(op, args)

    def classify(self, exc: BaseException, op: str) -> Failure:
        if isinstance(exc, ValueError):
            return Failure(ErrorCode.DB_QUERY_FAILED, f"{op} failed: {exc}")
        return super().classify(exc, op)


BREAKER = ActorSettings(breaker=BreakerConfig(threshold=5, open_s=30.0),
                        retry_delays_s=(0.1, 0.5, 1.0))


async def test_breaker_retries_opens_fails_fast_and_closes(tmp_path, autojump_clock):
    res = FlakyResource()
    handled: list[float] = []
    async with tree(tmp_path) as t:
        ref = await t.sup.start_child(ChildSpec("questdb", lambda: Pool(res, handled),
                                                settings=BREAKER))
        await trio.sleep(10)
        res.up = False
        elapsed, resp = await timed_call(ref, "read")
        # Connection errors of an idempotent read are retried at exactly 0.1, 0.5, 1.0.
        assert rel(handled, t.t0) == [10, 10.1, 10.6, 11.6]
        assert elapsed == pytest.approx(1.6)
        assert resp.error.code == ErrorCode.DB_UNAVAILABLE
        cell = t.sup.children["questdb"].cell
        assert cell.breaker.failures == 4 and cell.breaker.state == "CLOSED"
        # The reconnect attempt 1 s later is the 5th consecutive failure: open.
        opened = await t.wait("questdb", "circuit_opened")
        assert t.at(opened) == pytest.approx(12.6)
        assert opened.data == {"from": "CLOSED", "to": "OPEN", "retry_after": 30.0}
        assert t.sup.children["questdb"].view.breaker == "OPEN"

        # While open, calls fail fast, with the time until it may half-open.
        await trio.sleep(1)
        elapsed, resp = await timed_call(ref, "read")
        assert elapsed == 0 and resp.error.code == ErrorCode.CIRCUIT_OPEN
        assert resp.error.retry_after == pytest.approx(29.0)
        assert resp.reason == "circuit_open"
        elapsed, resp = await timed_call(ref, "write", {"value": 3})
        assert elapsed == 0 and resp.error.code == ErrorCode.CIRCUIT_OPEN
        assert len(handled) == 4  # nothing reached the resource

        # ERROR after the third attempt; the probe 30 s later is the one let through.
        await t.wait("questdb", "escalated")
        res.up = True
        closed = await t.wait("questdb", "circuit_closed")
        assert t.at(closed) == pytest.approx(18.6 + 30.0)  # attempts at 12.6, 14.6, 18.6
        assert t.at(closed) - t.at(opened) >= 30.0
        await trio.sleep(0.01)
        assert [t.at(e) for e in t.of("questdb", "recovered")] == [pytest.approx(48.6)]
        assert (await ref.call("read")).ok
        assert t.sup.children["questdb"].view.breaker == "CLOSED"
        kinds = [e.kind for e in t.of("questdb", "circuit_opened", "circuit_half_open",
                                       "circuit_closed")]
        assert kinds == ["circuit_opened", "circuit_closed"]


@pytest.mark.parametrize("probe_ok", [True, False])
async def test_breaker_half_open_lets_exactly_one_call_through(tmp_path, autojump_clock,
                                                               probe_ok):
    """White box: an actor that is CONNECTED while its breaker is OPEN (as concurrent calls
    leave it between their failures and the driver's reaction) fails fast; after open_s
    exactly one call is let through as the probe; success closes, failure re-opens."""
    res = FlakyResource()
    handled: list[float] = []
    gate = trio.Event()

    class HeldPool(Pool):
        concurrency = 4

        async def handle(self, op: str, args: Mapping[str, Any]) -> Any:
            await gate.wait()
            return await super().handle(op, args)

    # No health probe in the window: an observed success would close the breaker itself.
    settings = ActorSettings(breaker=BreakerConfig(threshold=5, open_s=30.0),
                             health_interval_s=600.0)
    async with tree(tmp_path) as t:
        ref = await t.sup.start_child(ChildSpec("questdb", lambda: HeldPool(res, handled),
                                                settings=settings))
        cell = t.sup.children["questdb"].cell
        b, transitions = cell.breaker, []
        for _ in range(5):
            b, trs = b.record_failure(None, trio.current_time())
            transitions.extend(trs)
        cell.guard.set(b, tuple(transitions))
        elapsed, resp = await timed_call(ref, "read")
        assert elapsed == 0 and resp.error.code == ErrorCode.CIRCUIT_OPEN
        assert resp.error.retry_after == pytest.approx(30.0)
        await trio.sleep(30)
        results: list[Response] = []

        async def probe_call() -> None:
            results.append(check(await ref.call("read")))

        async with trio.open_nursery() as n:
            n.start_soon(probe_call)
            await trio.sleep(0.1)
            assert cell.breaker.state == "HALF_OPEN"
            elapsed, second = await timed_call(ref, "read")  # only one probe at a time
            assert elapsed == 0 and second.error.code == ErrorCode.CIRCUIT_OPEN
            assert second.error.retry_after == pytest.approx(9.9)  # the probe's timeout
            res.up = probe_ok
            gate.set()
        assert len(handled) == 1
        await trio.sleep(0.01)
        kinds = [e.kind for e in t.of("questdb", "circuit_opened", "circuit_half_open",
                                       "circuit_closed")]
        if probe_ok:
            assert results[0].ok and cell.breaker.state == "CLOSED"
            assert kinds == ["circuit_opened", "circuit_half_open", "circuit_closed"]
            assert t.sup.state("questdb") == "CONNECTED"
        else:
            assert results[0].error.code == ErrorCode.DB_UNAVAILABLE
            assert cell.breaker.state == "OPEN"
            assert kinds == ["circuit_opened", "circuit_half_open", "circuit_opened"]
            assert t.sup.state("questdb") == "RECONNECTING"  # the call reported it


async def test_query_errors_are_not_retried_and_do_not_count(tmp_path, autojump_clock):
    res = FlakyResource()
    handled: list[float] = []
    async with tree(tmp_path) as t:
        ref = await t.sup.start_child(ChildSpec("questdb", lambda: Pool(res, handled),
                                                settings=BREAKER))
        cell = t.sup.children["questdb"].cell
        for _ in range(10):
            elapsed, resp = await timed_call(ref, "bad")
            assert elapsed == 0
            assert resp.error.code == ErrorCode.DB_QUERY_FAILED
            assert resp.error.message == 'bad failed: syntax error at or near "SELEC"'
        assert len(handled) == 10  # one attempt each
        assert cell.breaker.state == "CLOSED" and cell.breaker.failures == 0
        assert t.sup.state("questdb") == "CONNECTED"
        assert not t.of("questdb", "circuit_opened")
        # A query error between connection failures resets the consecutive count.
        res.up = False
        await ref.call("write", {"value": 1})  # not idempotent: one attempt, one failure
        assert cell.breaker.failures == 1


async def test_successful_calls_reset_the_consecutive_count(tmp_path, autojump_clock):
    """Blips that a retry recovers from are not consecutive failures: they never add up to
    an open circuit on a healthy resource."""
    res = FlakyResource()
    handled: list[float] = []

    class Blips(Pool):
        async def handle(self, op: str, args: Mapping[str, Any]) -> Any:
            self.handled.append(trio.current_time())
            if len(self.handled) % 2:
                raise ResourceDown("connection reset by peer")
            return {"value": 1}

    async with tree(tmp_path) as t:
        ref = await t.sup.start_child(ChildSpec("questdb", lambda: Blips(res, handled),
                                                settings=BREAKER))
        cell = t.sup.children["questdb"].cell
        for _ in range(10):
            elapsed, resp = await timed_call(ref, "read")
            assert resp.ok and elapsed == pytest.approx(0.1)  # one retry, 0.1 s later
            assert cell.breaker.failures == 0
        assert cell.breaker.state == "CLOSED" and len(handled) == 20
        assert t.sup.state("questdb") == "CONNECTED"
        assert not t.of("questdb", "circuit_opened")


async def test_a_retry_refused_by_the_breaker_still_reports_the_failure(tmp_path,
                                                                       autojump_clock):
    """Five concurrent calls fail at once and open the circuit; their retries are refused.
    The failure they saw must still move the actor to RECONNECTING (not wait for the
    health probe 30 s later)."""
    res = FlakyResource()
    handled: list[float] = []

    class WidePool(Pool):
        concurrency = 8

    results: list[tuple[float, Response]] = []
    async with tree(tmp_path) as t:
        ref = await t.sup.start_child(ChildSpec("questdb", lambda: WidePool(res, handled),
                                                settings=BREAKER))
        await trio.sleep(10)
        res.up = False

        async def call() -> None:
            results.append(await timed_call(ref, "read"))

        async with trio.open_nursery() as n:
            for _ in range(5):
                n.start_soon(call)
        assert rel(handled, t.t0) == [10.0] * 5
        assert {(elapsed, r.error.code) for elapsed, r in results} == {
            (0.1, ErrorCode.CIRCUIT_OPEN)}
        changed = await t.wait("questdb", "state_changed", to="RECONNECTING")
        assert t.at(changed) == pytest.approx(10.1)
        assert changed.error["code"] == "DB_UNAVAILABLE"
