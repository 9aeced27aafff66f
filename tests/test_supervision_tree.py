"""Supervision semantics on virtual time (DESIGN.md sections 3 and 4, issue 10): reset after
stability, fresh instances on every restart, nested supervisors, OTP strategies, the
breaker agreeing with the supervisor, a hung resource noticed within a probe timeout, and
the ``nudge`` lever."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import trio

from supervision.actor import Actor
from supervision.breaker import BreakerConfig
from supervision.eventlog import iter_file
from supervision.events import Event
from supervision.settings import ActorSettings
from supervision.supervisor import ChildSpec, Strategy, SupervisorSpec
from tests.support.actors import FlakyActor, FlakyResource, ResourceDown
from tests.test_supervisor import rel, timed_call, tree


class DiesAfter(FlakyActor):
    """Connects fine, then its connection dies after ``up_s`` (serve raises)."""

    def __init__(self, res: FlakyResource, up_s: float) -> None:
        super().__init__(res)
        self.up_s = up_s

    async def serve(self) -> None:
        await trio.sleep(self.up_s)
        raise ResourceDown("connection reset by peer")


def schedule(events: list[Event]) -> list[tuple[Any, ...]]:
    """The outage as the supervisor ran it: attempts, delays and the final state."""
    out: list[tuple[Any, ...]] = []
    for e in events:
        if e.kind == "backoff_scheduled":
            out.append(("attempt", e.attempt, e.delay_s))
        elif e.kind == "state_changed" and e.to_state == "ERROR":
            out.append(("ERROR", e.attempt))
    return out


# ---------------------------------------------------------------- reset after stability
async def test_flapping_every_2s_reaches_error_on_the_never_connects_schedule(
        tmp_path, autojump_clock):
    never, flapping = FlakyResource(up=False), FlakyResource()
    async with tree(tmp_path) as t:
        await t.sup.start_child(ChildSpec("never", lambda: FlakyActor(never)))
        await t.sup.start_child(ChildSpec("flap", lambda: DiesAfter(flapping, 2.0)))
        await t.wait("flap", "escalated")
        await trio.sleep(1)
        expected = [("attempt", 1, 1.0), ("attempt", 2, 2.0), ("attempt", 3, 4.0),
                    ("ERROR", 3)]
        assert schedule(t.of("never")) == expected
        assert schedule(t.of("flap")) == expected
        assert t.sup.state("never") == t.sup.state("flap") == "ERROR"
        # Up 2 s, then 1 s, 2 s, 4 s of backoff: connects at 0, 3, 7, 13; ERROR at 15.
        assert rel(flapping.connects, t.t0) == [0, 3, 7, 13]
        assert t.at(t.of("flap", "escalated")[0]) == 15.0
        assert rel(never.connects, t.t0) == [0, 1, 3, 7]


async def test_staying_up_stable_s_gives_a_fresh_budget(tmp_path, autojump_clock):
    res = FlakyResource()
    settings = ActorSettings(stable_s=30.0)
    async with tree(tmp_path) as t:
        await t.sup.start_child(ChildSpec("db", lambda: DiesAfter(res, 30.0),
                                          settings=settings))
        await trio.sleep(5 * 31 + 1)
        # Every loss came after 30 s up: each outage starts again at attempt 1 after 1 s.
        assert schedule(t.of("db")) == [("attempt", 1, 1.0)] * 5
        assert t.sup.state("db") == "CONNECTED"
    res2 = FlakyResource()
    async with tree(tmp_path / "short") as t:
        await t.sup.start_child(ChildSpec("db", lambda: DiesAfter(res2, 29.0),
                                          settings=settings))
        await t.wait("db", "escalated")
        # 29 s is not stable: the schedule continues and escalates.
        assert schedule(t.of("db")) == [("attempt", 1, 1.0), ("attempt", 2, 2.0),
                                        ("attempt", 3, 4.0), ("ERROR", 3)]


# ---------------------------------------------------------------------- fresh restarts
async def test_each_restart_calls_the_factory_and_the_ref_keeps_working(
        tmp_path, autojump_clock):
    res = FlakyResource(up=False)
    made: list[FlakyActor] = []

    def factory() -> FlakyActor:
        actor = FlakyActor(res)
        made.append(actor)
        return actor

    async with tree(tmp_path) as t:
        ref = await t.sup.start_child(ChildSpec("db", factory))
        assert len(made) == 1  # the start
        await t.wait("db", "escalated")  # attempts at 1, 3, 7
        assert len(made) == 4
        await t.wait("db", "probe_failed")  # the ERROR probe at 37
        assert len(made) == 5
        assert len({id(a) for a in made}) == 5  # five distinct instances
        res.up = True
        await t.wait("db", "state_changed", to="CONNECTED")  # probe at 67
        assert len(made) == 6
        assert t.sup.children["db"].actor is made[-1]
        assert all(not a.connected for a in made[:-1])  # every earlier one was released
        assert (await ref.call("read")).ok  # the same ref reaches the new instance
        assert t.sup.status()[0]["restarts"] == 3  # OTP's count: reconnect attempts


# ------------------------------------------------------------------ nesting, strategies
def leaf(name: str, resources: dict[str, FlakyResource], made: dict[str, int]) -> ChildSpec:
    res = resources.setdefault(name, FlakyResource())

    def factory() -> Actor:
        made[name] = made.get(name, 0) + 1
        return FlakyActor(res)

    return ChildSpec(name, factory)


def group_events(t: Any, after_seq: int) -> list[tuple[str, str]]:
    """What the strategy did: stops and starts, in log order."""
    out = []
    for e in t.drain():
        if e.seq <= after_seq:
            continue
        if e.kind == "actor_stopped":
            out.append(("stopped", e.actor))
        elif e.kind == "actor_started":
            out.append(("started", e.actor))
        elif e.kind == "state_changed" and e.from_state == "DISCONNECTED":
            out.append(("connected" if e.to_state == "CONNECTED" else e.to_state, e.actor))
        elif e.kind == "state_changed" and e.to_state == "CONNECTED":
            out.append(("reconnected", e.actor))  # the failed child, on its own backoff
    return out


async def fail(t: Any, name: str, res: FlakyResource) -> int:
    """Make ``name``'s connection fail on a call; returns the seq of its state change."""
    res.up = False
    await t.sup.ref(name).call("read")
    changed = await t.wait(name, "state_changed", to="RECONNECTING")
    res.up = True
    return changed.seq


# In start order, as OTP restarts the group: what came before the failed child starts at
# once; the failed child reconnects on its own backoff (attempt 1 at +1 s), and only then do
# its dependants start, so none comes up before what it depends on.
@pytest.mark.parametrize(("strategy", "expected"), [
    (Strategy.ONE_FOR_ALL, [("stopped", "d"), ("stopped", "c"), ("stopped", "a"),
                            ("started", "a"), ("connected", "a"),
                            ("reconnected", "b"),
                            ("started", "c"), ("connected", "c"),
                            ("started", "d"), ("connected", "d")]),
    (Strategy.REST_FOR_ONE, [("stopped", "d"), ("stopped", "c"),
                             ("reconnected", "b"),
                             ("started", "c"), ("connected", "c"),
                             ("started", "d"), ("connected", "d")]),
    (Strategy.ONE_FOR_ONE, [("reconnected", "b")]),
])
async def test_strategies_stop_and_start_exactly_the_right_siblings_in_order(
        tmp_path, autojump_clock, strategy, expected):
    resources: dict[str, FlakyResource] = {}
    made: dict[str, int] = {}
    async with tree(tmp_path, strategy=str(strategy)) as t:  # the old string form works
        assert t.sup.strategy is strategy
        for name in "abcd":
            await t.sup.start_child(leaf(name, resources, made))
        await trio.sleep(5)
        seq = await fail(t, "b", resources["b"])
        await trio.sleep(0.5)  # before b's attempt 1 at +1 s: its dependants still wait
        if strategy is not Strategy.ONE_FOR_ONE:
            assert t.sup.state("c") == t.sup.state("d") == "DISCONNECTED"
        await trio.sleep(1)
        assert group_events(t, seq) == expected
        stopped = [e for e in t.of("c", "state_changed") if e.to_state == "DISCONNECTED"]
        if strategy is not Strategy.ONE_FOR_ONE:
            assert stopped[0].data["reason"] == f"{strategy}:b"
            assert made["c"] == 2 and made["d"] == 2  # started again: fresh instances
        assert made["b"] == 2  # the failed child reconnected on its own schedule
        assert all(t.sup.state(n) == "CONNECTED" for n in "abcd")


async def test_a_nested_supervisors_child_crash_stays_inside_its_subtree(
        tmp_path, autojump_clock):
    resources: dict[str, FlakyResource] = {}
    made: dict[str, int] = {}
    async with tree(tmp_path, strategy=Strategy.ONE_FOR_ALL) as t:
        await t.sup.start_child(leaf("cache", resources, made))
        bot = await t.sup.start_child(SupervisorSpec(
            "bot", [leaf("feed", resources, made), leaf("algo", resources, made)],
            strategy=Strategy.ONE_FOR_ALL))
        await t.sup.start_child(leaf("tail", resources, made))
        assert [row["name"] for row in t.sup.status()] == ["cache", "feed", "algo", "tail"]
        # The bot builds more of its own subtree.
        await bot.start_child(leaf("extra", resources, made))
        await trio.sleep(5)
        seq = await fail(t, "feed", resources["feed"])
        await trio.sleep(1.5)
        assert group_events(t, seq) == [
            ("stopped", "extra"), ("stopped", "algo"), ("reconnected", "feed"),
            ("started", "algo"), ("connected", "algo"),
            ("started", "extra"), ("connected", "extra")]
        # Nothing outside the subtree was touched, although the top is one_for_all too.
        assert made["cache"] == made["tail"] == 1
        assert rel(resources["cache"].connects, t.t0) == [0]
        assert {row["name"]: row["state"] for row in t.sup.status()} == {
            "cache": "CONNECTED", "feed": "CONNECTED", "algo": "CONNECTED",
            "extra": "CONNECTED", "tail": "CONNECTED"}
    # One numbering for the whole runtime, nested children included: gap-free.
    seqs = [e.seq for e in iter_file(tmp_path / "events.jsonl")]
    assert seqs == list(range(1, len(seqs) + 1))
    # Shutdown stopped the nested children too, in reverse start order.
    stops = [e.actor for e in iter_file(tmp_path / "events.jsonl") if e.kind == "actor_stopped"]
    assert stops[-5:] == ["tail", "extra", "algo", "feed", "cache"]


async def test_restart_types_and_strategies_are_enums_and_bad_values_refused():
    spec = ChildSpec("x", lambda: FlakyActor(FlakyResource()), restart="transient")
    assert spec.restart == "transient" and spec.restart.name == "TRANSIENT"
    with pytest.raises(ValueError):
        ChildSpec("x", lambda: FlakyActor(FlakyResource()), restart="sometimes")
    with pytest.raises(ValueError):
        SupervisorSpec("bot", strategy="all_for_none")


# ------------------------------------------------------------------ breaker agreement
async def test_breaker_is_closed_once_a_reconnect_succeeds(tmp_path, autojump_clock):
    res = FlakyResource()
    settings = ActorSettings(breaker=BreakerConfig(threshold=2, open_s=30.0))
    async with tree(tmp_path) as t:
        ref = await t.sup.start_child(ChildSpec("questdb", lambda: FlakyActor(res),
                                                settings=settings))
        await trio.sleep(1)
        res.up = False
        await ref.call("read")  # 1 failure (the call) ...
        await t.wait("questdb", "circuit_opened")  # ... + the failed attempt 1: open
        res.up = True
        back = await t.wait("questdb", "state_changed", to="CONNECTED")  # attempt 2
        closed = t.of("questdb", "circuit_closed")
        assert closed and closed[0].seq < back.seq  # closed before CONNECTED is published
        assert t.sup.children["questdb"].view.breaker == "CLOSED"
        elapsed, resp = await timed_call(ref, "read")
        assert resp.ok and elapsed == 0  # not refused for the rest of open_s


# ------------------------------------------------------------------------ hung resource
class Hangs(FlakyActor):
    """``hung``: calls and probes never answer. ``slow``: calls take 20 s, probes answer."""

    def __init__(self, res: FlakyResource) -> None:
        super().__init__(res)
        self.mode = "ok"

    async def probe(self) -> None:
        if MODE["now"] == "hung":
            await trio.sleep_forever()
        await super().probe()

    async def handle(self, op: str, args: Mapping[str, Any]) -> Any:
        if MODE["now"] == "hung":
            await trio.sleep_forever()
        if MODE["now"] == "slow":
            await trio.sleep(20)
        return await super().handle(op, args)


MODE = {"now": "ok"}


@pytest.mark.parametrize("mode", ["hung", "slow"])
async def test_a_call_past_its_deadline_probes_at_once(tmp_path, autojump_clock, mode):
    res = FlakyResource()
    MODE["now"] = "ok"
    settings = ActorSettings(call_timeout_s=10.0, probe_timeout_s=5.0,
                             breaker=BreakerConfig(threshold=1, open_s=30.0))
    async with tree(tmp_path) as t:
        ref = await t.sup.start_child(ChildSpec("db", lambda: Hangs(res), settings=settings))
        await trio.sleep(1)
        MODE["now"] = mode
        elapsed, resp = await timed_call(ref, "read")
        assert elapsed == 10 and resp.error.code == "TIMEOUT"
        if mode == "hung":
            # Noticed within one probe timeout of the deadline, not at the 30 s probe.
            failed = await t.wait("db", "probe_failed")
            changed = await t.wait("db", "state_changed", to="RECONNECTING")
            assert t.at(failed) == t.at(changed) == 1 + 10 + 5
            assert t.of("db", "circuit_opened")  # the timed-out probe counted
        else:
            await trio.sleep(6)
            # The probe answered: a long query is not a lost connection.
            assert rel(res.probes, t.t0) == [11.0]
            assert t.sup.state("db") == "CONNECTED"
            assert not t.of("db", "probe_failed") and not t.of("db", "circuit_opened")
    MODE["now"] = "ok"


# ------------------------------------------------------------------------------ nudge
async def test_nudge_tries_at_once_instead_of_waiting_for_the_probe(tmp_path, autojump_clock):
    res = FlakyResource(up=False)
    async with tree(tmp_path) as t:
        await t.sup.start_child(ChildSpec("db", lambda: FlakyActor(res)))
        await t.wait("db", "escalated")  # ERROR at 7; next probe at 37
        await trio.sleep(3)
        res.up = True
        t.sup.nudge("db")
        back = await t.wait("db", "state_changed", to="CONNECTED")
        assert t.at(back) == 10.0
        # While CONNECTED a nudge asks for a probe now.
        t.sup.nudge("db")
        await trio.sleep(0.1)
        assert rel(res.probes, t.t0)[-1] == 10.0


async def test_operator_restart_and_group_restart_use_fresh_instances(tmp_path, autojump_clock):
    res = FlakyResource()
    made: list[FlakyActor] = []

    def factory() -> FlakyActor:
        made.append(FlakyActor(res))
        return made[-1]

    async with tree(tmp_path) as t:
        ref = await t.sup.start_child(ChildSpec("db", factory))
        await trio.sleep(1)
        await t.wait("db", "state_changed", to="CONNECTED")  # the start
        await t.sup.restart_child("db")  # operator restart of a running child
        await t.wait("db", "state_changed", to="RECONNECTING")
        await t.wait("db", "state_changed", to="CONNECTED")
        assert len(made) == 2 and not made[0].connected and made[1].connected
        await t.sup.stop_child("db")
        await t.sup.restart_child("db")  # a stopped child is started again, fresh
        assert len(made) == 3 and t.sup.state("db") == "CONNECTED"
        assert (await ref.call("read")).ok


def test_stable_s_is_configurable_in_supervisor_and_per_actor(tmp_path):
    from supervision.shell.config import ConfigError, RuntimeConfig

    path = tmp_path / "runtime.toml"
    path.write_text("[supervisor]\nstable_s = 12.0\n[mt5]\nstable_s = 5.0\n")
    config = RuntimeConfig.load(path)
    assert config.actor_settings("mt5").stable_s == 5.0
    assert config.actor_settings("questdb").stable_s == 12.0
    path.write_text("[supervisor]\nstable_s = -1.0\n")
    with pytest.raises(ConfigError, match="stable_s"):
        RuntimeConfig.load(path)


async def test_one_for_all_stops_and_starts_a_nested_subtree_as_one_sibling(
        tmp_path, autojump_clock):
    resources: dict[str, FlakyResource] = {}
    made: dict[str, int] = {}
    async with tree(tmp_path, strategy=Strategy.ONE_FOR_ALL) as t:
        await t.sup.start_child(leaf("a", resources, made))
        await t.sup.start_child(SupervisorSpec(
            "bot", [leaf("x", resources, made), leaf("y", resources, made)]))
        await t.sup.start_child(leaf("z", resources, made))
        await trio.sleep(5)
        seq = await fail(t, "a", resources["a"])
        await trio.sleep(1.5)
        assert group_events(t, seq) == [
            ("stopped", "z"), ("stopped", "y"), ("stopped", "x"), ("reconnected", "a"),
            ("started", "x"), ("connected", "x"), ("started", "y"), ("connected", "y"),
            ("started", "z"), ("connected", "z")]
        assert made == {"a": 2, "x": 2, "y": 2, "z": 2}
