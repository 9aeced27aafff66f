"""A soak of the supervision tree on virtual time: random faults, operator restarts and
nudges across a nested tree (one_for_one at the top, rest_for_one and one_for_all below).
Used by tests/test_soak.py (correctness) and tests/perf/soak_rss.py (memory)."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from supervision.actor import Actor
from supervision.eventlog import iter_file
from supervision.settings import ActorSettings
from supervision.supervisor import ChildSpec, Strategy, SupervisorSpec
from tests.support.actors import FlakyActor, FlakyResource, running_supervisor

NAMES = ("cache", "feed", "algo", "x", "y", "mt5")
ACTIONS = ("down", "up", "up", "restart", "nudge", "call", "call")
# Short timings, so a cycle exercises backoff, ERROR and probes in a few virtual seconds.
SETTINGS = ActorSettings(backoff_base_s=0.5, health_interval_s=5.0, probe_timeout_s=1.0,
                         call_timeout_s=2.0, stable_s=3.0, shutdown_timeout_s=1.0)


@attrs.define
class SoakResult:
    cycles: int
    events: int
    instances: int
    seqs_contiguous: bool


def _spec(name: str, res: FlakyResource, made: list[int]) -> ChildSpec:
    def factory() -> Actor:
        made[0] += 1
        return FlakyActor(res)

    return ChildSpec(name, factory, settings=SETTINGS)


def task_count() -> int:
    """Every live trio task, from the root down."""
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for nursery in task.child_nurseries
                       for child in nursery.child_tasks)

    return count(trio.lowlevel.current_root_task())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def thread_count() -> int:
    return threading.active_count()


async def soak(state_dir: Path, cycles: int, *, seed: int = 1, tail_size: int = 10_000,
               after_cycle: Callable[[int], None] | None = None) -> SoakResult:
    """``tail_size``: how many recent events the log keeps in memory (for resuming
    subscribers); a memory measurement sets it small to see the tree itself."""
    rng = random.Random(seed)
    resources = {name: FlakyResource() for name in NAMES}
    made = [0]
    async with running_supervisor(state_dir, log_kwargs={"tail_size": tail_size}) as sup:
        await sup.start_child(_spec("cache", resources["cache"], made))
        await sup.start_child(SupervisorSpec("bot", [
            _spec("feed", resources["feed"], made), _spec("algo", resources["algo"], made)],
            strategy=Strategy.REST_FOR_ONE))
        await sup.start_child(SupervisorSpec("pair", [
            _spec("x", resources["x"], made), _spec("y", resources["y"], made)],
            strategy=Strategy.ONE_FOR_ALL))
        await sup.start_child(_spec("mt5", resources["mt5"], made))
        for cycle in range(cycles):
            name = rng.choice(NAMES)
            action = rng.choice(ACTIONS)
            if action == "down":
                resources[name].up = False
                await sup.ref(name).call("read")
            elif action == "up":
                resources[name].up = True
            elif action == "restart":
                await sup.restart_child(name)
            elif action == "nudge":
                sup.nudge(name)
            else:
                await sup.ref(name).call("read")
            await trio.sleep(rng.expovariate(1.0))
            if after_cycle is not None:
                after_cycle(cycle + 1)
        for res in resources.values():
            res.up = True
        await trio.sleep(3 * SETTINGS.health_interval_s)  # ERROR probes bring all back
        states = {name: str(sup.state(name)) for name in NAMES}
        if set(states.values()) != {"CONNECTED"}:
            raise AssertionError(f"not all recovered: {states}")
    seqs = [event.seq for event in iter_file(state_dir / "events.jsonl")]
    return SoakResult(cycles, len(seqs), made[0], seqs == list(range(1, len(seqs) + 1)))
