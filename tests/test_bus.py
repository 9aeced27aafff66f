"""Event fan-out (DESIGN.md section 5): a slow subscriber never slows the supervisor or the
others; it is told what it missed and resumes from the log without gap or duplicate."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trio

from supervision.bus import EventBus, Missed, Subscription
from supervision.clock import WallClock
from supervision.eventlog import iter_file
from supervision.events import Event
from supervision.settings import ActorSettings
from supervision.supervisor import ChildSpec, Supervisor
from tests.support.actors import FlakyActor, FlakyResource, running_supervisor

WALL0 = 1_800_000_000.0  # a fixed wall anchor, so two runs give byte-identical events


def tree(path: Path, **log_kwargs: Any) -> AbstractAsyncContextManager[Supervisor]:
    return running_supervisor(path.parent, log_path=path, log_kwargs=log_kwargs,
                              wallclock=WallClock(trio.current_time(), WALL0))


async def flap(sup: Supervisor, res: FlakyResource, *, flaps: int = 6) -> None:
    """The resource goes down and comes back, over and over; calls notice it."""
    # Up 20 s between outages: stable (stable_s 10), so each outage gets a fresh budget.
    ref = await sup.start_child(ChildSpec("db", lambda: FlakyActor(res),
                                          settings=ActorSettings(stable_s=10.0)))
    for k in range(flaps):
        await trio.sleep(20)
        await ref.call("read")
        res.up = False
        await ref.call("read")  # sees the failure: RECONNECTING
        await trio.sleep(2 + 3 * (k % 3))  # 1 to 3 failed attempts, ERROR once in a while
        res.up = True
        if sup.state("db") == "ERROR":
            await trio.sleep(30)  # the ERROR probe brings it back
    await trio.sleep(5)


def without_ts(events: list[Event]) -> list[tuple[Any, ...]]:
    return [(e.seq, e.actor, e.kind, e.from_state, e.to_state, e.attempt, e.delay_s,
             e.error, e.data) for e in events]


async def test_stalled_subscriber_costs_nobody_anything(tmp_path, autojump_clock):
    # The reference run: no subscriber at all.
    ref_res = FlakyResource()
    t0 = trio.current_time()
    async with tree(tmp_path / "ref" / "events.jsonl") as sup:
        await flap(sup, ref_res)
    reference_connects = [t - t0 for t in ref_res.connects]
    reference_events = list(iter_file(tmp_path / "ref" / "events.jsonl"))
    assert len(reference_events) > 40
    assert any(e.kind == "escalated" for e in reference_events)

    # The same story with one stalled and one active subscriber.
    res = FlakyResource()
    t1 = trio.current_time()
    path = tmp_path / "run" / "events.jsonl"
    active: list[Event | Missed] = []
    async with tree(path) as sup:
        stalled = sup.bus.open_subscription(buffer=5)  # never reads until the end
        start = sup.bus.head_seq
        live = sup.bus.open_subscription(buffer=10_000)

        async def read_live() -> None:
            async for item in live:
                active.append(item)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_live)
            await flap(sup, res)
            await trio.lowlevel.checkpoint()  # let the reader drain the last batch
            nursery.cancel_scope.cancel()

        # The supervisor kept time exactly as with nobody listening.
        assert [t - t1 for t in res.connects] == reference_connects
        logged = list(iter_file(path))
        # The same events, except the shutdown that has not happened yet in this run.
        assert [e.kind for e in reference_events[len(logged):]] == [
            "state_changed", "actor_stopped", "runtime_stopped"]
        reference_events = reference_events[:len(logged)]
        assert without_ts(logged) == without_ts(reference_events)
        # Event timestamps are offset by exactly the trio time between the two runs.
        shift = logged[0].ts - reference_events[0].ts
        assert all(a.ts - b.ts == shift for a, b in zip(logged, reference_events, strict=True))

        # The active subscriber got every event, in order, no gap, no Missed.
        assert all(isinstance(e, Event) for e in active)
        expected = logged[start:]
        assert [e.seq for e in active] == list(range(start + 1, len(logged) + 1))
        assert active == expected

        # The stalled one: its 5 buffered events, then how many it missed.
        first = start + 1
        got = [stalled.get_nowait() for _ in range(5)]
        assert [e.seq for e in got] == [first, first + 1, first + 2, first + 3, first + 4]
        missed = stalled.get_nowait()
        head = sup.bus.head_seq
        assert missed == Missed(count=head - (first + 4), after_seq=first + 4)
        assert stalled.get_nowait() is None

        # Resuming from after_seq yields the rest, no gap, no duplicate.
        sup.bus.close_subscription(stalled)
        async with sup.bus.subscribe(since_seq=missed.after_seq, buffer=10_000) as resumed:
            rest = []
            while resumed.pending:
                rest.append(resumed.get_nowait())
        assert [e.seq for e in got + rest] == list(range(first, head + 1))
        assert got + rest == expected


async def test_overflowed_subscriber_keeps_receiving_after_the_notice(tmp_path, autojump_clock):
    res = FlakyResource()
    async with tree(tmp_path / "events.jsonl") as sup:
        sub = sup.bus.open_subscription(buffer=3)
        await flap(sup, res, flaps=1)
        head = sup.bus.head_seq
        items = [sub.get_nowait() for _ in range(4)]
        assert isinstance(items[3], Missed)
        assert items[3].after_seq == items[2].seq
        assert items[3].count == head - items[2].seq
        # After the notice, live events flow again into the same subscription.
        res.up = False
        await sup.ref("db").call("read")
        await trio.sleep(0.5)
        nxt = await sub.get()
        assert isinstance(nxt, Event) and nxt.seq == head + 1


async def drain(bus: EventBus, since: int, *, buffer: int, **filters: Any) -> list[Event]:
    """Follow the log from ``since`` to the head, resuming after every Missed notice."""
    out: list[Event] = []
    while True:
        async with bus.subscribe(since_seq=since, buffer=buffer, **filters) as sub:
            missed = None
            while True:
                item = sub.get_nowait()
                if item is None:
                    break
                if isinstance(item, Missed):
                    missed = item
                    break
                out.append(item)
        if missed is None:
            return out
        since = missed.after_seq


async def test_resume_from_an_old_seq_is_served_from_the_file(tmp_path, autojump_clock):
    res = FlakyResource()
    path = tmp_path / "events.jsonl"
    async with tree(path, tail_size=4) as sup:
        await flap(sup, res, flaps=3)
        log = sup.log
        head = sup.bus.head_seq
        assert head > 20 and not log.tail_covers(2)
        with pytest.raises(LookupError):  # the memory-only path refuses...
            sup.bus.open_subscription(since_seq=2)
        # ...subscribe() reads the file.
        everything = list(iter_file(path))
        # One step: the buffer holds it all.
        got = await drain(sup.bus, 2, buffer=1000)
        assert got == everything[2:]
        # Many steps: a small buffer makes it resume from the file several times.
        got = await drain(sup.bus, 2, buffer=5)
        assert [e.seq for e in got] == list(range(3, head + 1))
        assert got == everything[2:]


async def test_filters_by_actor_and_kind(tmp_path, autojump_clock):
    a, b = FlakyResource(), FlakyResource(up=False)
    path = tmp_path / "events.jsonl"
    async with tree(path, tail_size=8) as sup:
        async with sup.bus.subscribe(actors=["a"], kinds=["state_changed"]) as sub_a, \
                sup.bus.subscribe(kinds=["attempt_failed", "escalated"]) as sub_kinds:
            await sup.start_child(ChildSpec("a", lambda: FlakyActor(a)))
            await sup.start_child(ChildSpec("b", lambda: FlakyActor(b)))
            a.up = False
            await sup.ref("a").call("read")
            await trio.sleep(2)
            a.up = True
            await trio.sleep(10)
            items_a = [sub_a.get_nowait() for _ in range(sub_a.pending)]
            items_k = [sub_kinds.get_nowait() for _ in range(sub_kinds.pending)]
        logged = list(iter_file(path))
        assert items_a == [e for e in logged if e.actor == "a" and e.kind == "state_changed"]
        assert [(e.from_state, e.to_state) for e in items_a] == [
            ("DISCONNECTED", "CONNECTED"), ("CONNECTED", "RECONNECTING"),
            ("RECONNECTING", "CONNECTED")]
        assert items_k == [e for e in logged if e.kind in ("attempt_failed", "escalated")]
        assert {e.actor for e in items_k} == {"a", "b"}
        assert [e.kind for e in items_k if e.actor == "b"] == ["attempt_failed"] * 3 + [
            "escalated"]
        # Filters apply to replays too, from memory and from the file.
        for since in (len(logged) - 3, 0):
            async with sup.bus.subscribe(since_seq=since, actors=["b"],
                                         kinds=["escalated"]) as sub:
                replay = [sub.get_nowait() for _ in range(sub.pending)]
            assert replay == [e for e in logged[since:] if e.actor == "b"
                              and e.kind == "escalated"]


async def test_subscription_ends_when_the_bus_closes(tmp_path, autojump_clock):
    res = FlakyResource()
    path = tmp_path / "events.jsonl"
    seen: list[Event | Missed] = []
    sub: Subscription
    async with tree(path) as sup:
        sub = sup.bus.open_subscription()
        start = sup.bus.head_seq

        async def reader() -> None:
            async for item in sub:
                seen.append(item)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await sup.start_child(ChildSpec("db", lambda: FlakyActor(res)))
            await sup.shutdown()  # closes the bus: the reader's loop ends by itself
    assert [e.kind for e in seen][-1] == "runtime_stopped"
    assert seen == list(iter_file(path))[start:]
