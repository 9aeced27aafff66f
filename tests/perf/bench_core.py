"""What the supervision core costs: an actor round trip, and a breaker-guarded call.

    python -m tests.perf.bench_core [--calls 10000] [--reps 7] [--guards 100000]

(a) Request/reply, one call after another, in real time, in one trio run:

* ``pingpong``   — the floor: a raw trio memory-channel ping-pong (two channels, a server
                   task echoing), ``send`` then ``receive``
* ``pp+scopes``  — the ping-pong with a deadline cancel scope on each side, as every actor
                   call needs (the caller's deadline; the actor's bound on the work): the
                   floor for any design with deadlines on both sides
* ``cell.call``  — ``ActorCell.bind`` + ``ActorCell.call`` on a trivial actor: gate, breaker
                   check, one mailbox round trip (``Request`` + ``Reply``), the deadline
* ``ref.call``   — ``ActorRef.call``: the same plus the ``Response`` and the deadline

(b) The breaker's guarded-call overhead around a no-op, in the same process:

* ``ours``       — ``Breaker.admit(now)`` + no-op + ``record_success(ticket, now)``
                   (``now`` from ``time.monotonic()``, as a caller would read a clock)
* ``ours_async`` — the same around an awaited async no-op, inside trio
* ``pybreaker``  — ``pybreaker.CircuitBreaker.call(noop)``
* ``aiobreaker`` — ``await aiobreaker.CircuitBreaker.call_async(async_noop)``, inside trio
                   (it never touches asyncio while closed)

Variants are interleaved within each repetition so drift hits them alike; each figure is
the median over repetitions of the mean time per call. Times are this thread's CPU time
(``time.thread_time``), which a busy machine does not inflate; (a) also shows wall time.
Goals (docs/benchmarks.md): the actor round trip at most 1.5x the ping-pong; our breaker
cheaper than both libraries.
"""

from __future__ import annotations

import argparse
import collections
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

import aiobreaker
import pybreaker
import trio

from supervision.actor import READ_UNCACHED, Actor, OpSpec
from supervision.breaker import Breaker, BreakerConfig
from supervision.eventlog import EventLog
from supervision.supervisor import ChildSpec, Supervisor


class Echo(Actor):
    ops: ClassVar[Mapping[str, OpSpec]] = {"echo": READ_UNCACHED}

    async def handle(self, op: str, args: Mapping[str, Any]) -> Any:
        return args


# ------------------------------------------------------------------------ (a) round trip
async def round_trip(calls: int, reps: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        log = EventLog(Path(tmp) / "events.jsonl", fsync="never")
        log.open()
        async with trio.open_nursery() as nursery:
            sup = Supervisor(log=log)
            await nursery.start(sup.run)
            ref = await sup.start_child(ChildSpec("echo", Echo))
            cell = sup.children["echo"].cell

            req_send, req_recv = trio.open_memory_channel[Any](0)
            resp_send, resp_recv = trio.open_memory_channel[Any](0)

            async def echo_server() -> None:
                async for item in req_recv:
                    await resp_send.send(item)

            nursery.start_soon(echo_server)
            sreq_send, sreq_recv = trio.open_memory_channel[Any](0)
            sresp_send, sresp_recv = trio.open_memory_channel[Any](0)

            async def scoped_echo_server() -> None:
                async for item in sreq_recv:
                    with trio.move_on_at(trio.current_time() + 10.0):
                        await sresp_send.send(item)

            nursery.start_soon(scoped_echo_server)
            args: dict[str, Any] = {}

            async def pingpong() -> None:
                for _ in range(calls):
                    await req_send.send(args)
                    await resp_recv.receive()

            async def pingpong_scoped() -> None:
                for _ in range(calls):
                    with trio.move_on_at(trio.current_time() + 10.0):
                        await sreq_send.send(args)
                        await sresp_recv.receive()

            async def via_cell() -> None:
                for _ in range(calls):
                    await cell.call(cell.bind("echo", args, 10.0, trio.current_time()))

            async def via_ref() -> None:
                for _ in range(calls):
                    await ref.call("echo", args)

            variants: dict[str, Callable[[], Awaitable[None]]] = {
                "pingpong": pingpong, "pp+scopes": pingpong_scoped, "cell.call": via_cell,
                "ref.call": via_ref}
            for fn in variants.values():  # warm up
                await fn()
            for _ in range(reps):
                for name, fn in variants.items():
                    w, c = time.perf_counter(), time.thread_time()
                    await fn()
                    results[name].append((time.thread_time() - c) / calls)
                    results[name + " wall"].append((time.perf_counter() - w) / calls)
            await sup.shutdown()
            nursery.cancel_scope.cancel()
        log.close()
    return results


# ------------------------------------------------------------------- (b) guarded call
clock = time.thread_time  # CPU time of this thread: what the guard costs, not the machine's load
def noop() -> None:
    return None


async def async_noop() -> None:
    return None


def guard_ours(n: int) -> float:
    b = Breaker(BreakerConfig())
    monotonic = time.monotonic
    t = clock()
    for _ in range(n):
        admission = b.admit(monotonic())
        noop()
        b, _ = admission.breaker.record_success(admission.ticket, monotonic())
    return (clock() - t) / n


def guard_pybreaker(n: int) -> float:
    cb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)
    t = clock()
    for _ in range(n):
        cb.call(noop)
    return (clock() - t) / n


async def guard_ours_async(n: int) -> float:
    b = Breaker(BreakerConfig())
    monotonic = time.monotonic
    t = clock()
    for _ in range(n):
        admission = b.admit(monotonic())
        await async_noop()
        b, _ = admission.breaker.record_success(admission.ticket, monotonic())
    return (clock() - t) / n


async def guard_aiobreaker(n: int) -> float:
    cb = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=30))
    t = clock()
    for _ in range(n):
        await cb.call_async(async_noop)
    return (clock() - t) / n


async def guarded(n: int, reps: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"ours": [], "ours_async": [], "pybreaker": [],
                                       "aiobreaker": []}
    guard_ours(n // 10)
    guard_pybreaker(n // 10)
    await guard_ours_async(n // 10)
    await guard_aiobreaker(n // 10)
    for _ in range(reps):
        results["ours"].append(guard_ours(n))
        results["ours_async"].append(await guard_ours_async(n))
        results["pybreaker"].append(guard_pybreaker(n))
        results["aiobreaker"].append(await guard_aiobreaker(n))
    return results


# --------------------------------------------------------------------------------- main
def us(seconds: float) -> str:
    return f"{seconds * 1e6:8.3f} us"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--guards", type=int, default=100_000)
    parser.add_argument("--part", choices=["a", "b", "ab"], default="ab")
    opts = parser.parse_args(argv)

    async def run() -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        trips = await round_trip(opts.calls, opts.reps) if "a" in opts.part else {}
        guards = await guarded(opts.guards, opts.reps) if "b" in opts.part else {}
        return trips, guards

    trips, guards = trio.run(run)
    libs = ", ".join(f"{m} {version(m)}" for m in ("trio", "pybreaker", "aiobreaker"))
    print(f"python {platform.python_version()} ({sys.implementation.name}), {libs}, "
          f"{platform.machine()}, {platform.system()}")
    if trips:
        print(f"\n(a) round trip: {opts.calls} calls x {opts.reps} reps, "
              "median of per-call means")
        med = {k: statistics.median(v) for k, v in trips.items()}
        print(f"  {'':<10} {'cpu':>11}   {'ratio':>5}   {'wall':>11}   {'ratio':>5}")
        for name in ("pingpong", "pp+scopes", "cell.call", "ref.call"):
            cpu, wall = med[name], med[name + " wall"]
            print(f"  {name:<10} {us(cpu)}   {cpu / med['pingpong']:5.2f}   {us(wall)}   "
                  f"{wall / med['pingpong wall']:5.2f}")
    if guards:
        print(f"\n(b) guarded no-op: {opts.guards} calls x {opts.reps} reps, median")
        gmed = {k: statistics.median(v) for k, v in guards.items()}
        for name, value in gmed.items():
            print(f"  {name:<10} {us(value)}   pybreaker/x {gmed['pybreaker'] / value:5.2f}"
                  f"   aiobreaker/x {gmed['aiobreaker'] / value:5.2f}")


if __name__ == "__main__":
    main()
