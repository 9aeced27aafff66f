"""What the MT5 actor costs per call, against calling the terminal from a thread directly.

    python -m tests.perf.bench_mt5 [--op symbol_info_tick|terminal_info] [--calls N] [--reps R]

All variants make the same call (``symbol_info_tick("EURUSD")`` by default) one after
another, in real time, on the same simulator, in the same process. The variants take turns
in chunks of ``--chunk`` calls, so that drift and bursts of load from other processes hit
every variant alike. Per variant: the median (and the minimum) over all chunks of the mean
time per call. The simulator computes a tick from its price path
(about 1 ms of numpy work), which hides the hop and the actor; ``--op terminal_info`` (a
cheap call) shows what the hop and the actor themselves cost.

* ``direct``          — the simulator function called on the trio thread (no hop at all)
* ``to_thread``       — ``trio.to_thread.run_sync(sim.symbol_info_tick, "EURUSD")``
* ``pingpong``        — a dedicated thread fed by a queue, answering with
                        ``run_sync_soon`` + ``reschedule``: the bare thread hop
* ``thread_worker``   — the actor's ``ThreadWorker`` alone (the hop plus ``last_error()``)
* ``actor_thread``    — ``Mt5Ref.symbol_info_tick`` through the supervisor: gate, mailbox,
                        actor, ``ThreadWorker``, last-known-good store (production path)
* ``actor_inline``    — the same with the inline worker (virtual-time tests' worker)
* ``process_worker``  — the actor's ``ProcessWorker`` alone: the simulator in its own OS
                        process, the call and its result pickled over the pipe
* ``actor_process``   — ``Mt5Ref.symbol_info_tick`` with the ``ProcessWorker`` (the default,
                        ``[mt5] worker = "process"``)

The goals (docs/benchmarks.md): ``actor_thread`` at most 1.3x ``to_thread``, and
``actor_process`` at most 1.3x ``actor_thread``. The fixed per-call cost of the process path
is ``actor_process`` minus ``direct`` (run with ``--op terminal_info`` to see it alone).
"""

from __future__ import annotations

import argparse
import platform
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import outcome
import trio

from actors.cache import TtlCache
from actors.mt5.actor import Mt5Actor, Mt5Ref
from actors.mt5.process_worker import TerminalHost
from actors.mt5.simulator import TerminalSimulator
from actors.mt5.terminal_process import BackendRecipe
from actors.mt5.worker import ThreadWorker
from supervision.eventlog import EventLog
from supervision.settings import ActorSettings
from supervision.supervisor import ChildSpec, Supervisor

SYMBOL = "EURUSD"
OPS: dict[str, tuple[Any, ...]] = {"symbol_info_tick": (SYMBOL,), "terminal_info": ()}


class PingPong:
    """One dedicated thread, a queue in, ``run_sync_soon`` out: the cheapest thread hop."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="bench-pingpong")
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, task = job
            self._token.run_sync_soon(trio.lowlevel.reschedule, task,
                                      outcome.capture(fn, *args))

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        self._jobs.put((fn, args, trio.lowlevel.current_task()))
        return await trio.lowlevel.wait_task_rescheduled(
            lambda _: trio.lowlevel.Abort.FAILED)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


async def timed(n: int, one: Callable[[], Awaitable[Any]]) -> float:
    """Mean seconds per call over ``n`` sequential calls."""
    start = time.perf_counter()
    for _ in range(n):
        await one()
    return (time.perf_counter() - start) / n


async def run(op: str, calls: int, reps: int, chunk: int) -> dict[str, list[float]]:
    sim = TerminalSimulator(clock=time.monotonic)
    assert sim.initialize()
    args = OPS[op]
    fn = getattr(sim, op)
    settings = ActorSettings(health_interval_s=3600.0)
    with tempfile.TemporaryDirectory() as tmp:
        log = EventLog(Path(tmp) / "events.jsonl", fsync="never")
        log.open()
        try:
            async with trio.open_nursery() as nursery:
                sup = Supervisor(log=log, lkg=TtlCache())
                await nursery.start(sup.run)
                thread_ref = await sup.start_child(ChildSpec(
                    "mt5", lambda: Mt5Actor(lambda: sim, inline=False), settings=settings,
                    ref_class=Mt5Ref))
                inline_ref = await sup.start_child(ChildSpec(
                    "mt5_inline", lambda: Mt5Actor(lambda: sim, inline=True),
                    settings=settings, ref_class=Mt5Ref))
                # Two hosts, two child processes: the bare worker and the actor's.
                host = TerminalHost(BackendRecipe("simulator"), name="mt5_process")
                bare_host = TerminalHost(BackendRecipe("simulator"), name="bare")
                process_ref = await sup.start_child(ChildSpec(
                    "mt5_process", lambda: Mt5Actor(None, inline=False, name="mt5_process",
                                                    host=host),
                    settings=settings, ref_class=Mt5Ref))
                assert isinstance(thread_ref, Mt5Ref) and isinstance(inline_ref, Mt5Ref)
                assert isinstance(process_ref, Mt5Ref)
                pingpong = PingPong()
                worker = ThreadWorker(sim)
                process_worker = bare_host.worker()
                assert (await process_worker.call("initialize", (), {}))[0]

                thread_op = getattr(thread_ref, op)
                inline_op = getattr(inline_ref, op)
                process_op = getattr(process_ref, op)

                async def direct() -> Any:
                    await trio.lowlevel.checkpoint()
                    return fn(*args)

                async def via_actor_thread() -> Any:
                    r = await thread_op(*args)
                    assert r.ok, r
                    return r

                async def via_actor_inline() -> Any:
                    r = await inline_op(*args)
                    assert r.ok, r
                    return r

                async def via_actor_process() -> Any:
                    r = await process_op(*args)
                    assert r.ok, r
                    return r

                variants: dict[str, Callable[[], Awaitable[Any]]] = {
                    "direct": direct,
                    "to_thread": lambda: trio.to_thread.run_sync(fn, *args),
                    "pingpong": lambda: pingpong.call(fn, *args),
                    "thread_worker": lambda: worker.call(op, args, {}),
                    "actor_thread": via_actor_thread,
                    "actor_inline": via_actor_inline,
                    "process_worker": lambda: process_worker.call(op, args, {}),
                    "actor_process": via_actor_process,
                }
                for one in variants.values():  # warm up: thread caches, code paths
                    await timed(max(50, calls // 20), one)
                results: dict[str, list[float]] = {name: [] for name in variants}
                for _ in range(reps):
                    for _ in range(max(1, calls // chunk)):
                        for name, one in variants.items():
                            results[name].append(await timed(chunk, one))
                pingpong.close()
                worker.retire()
                await sup.shutdown()
                await host.aclose()
                await bare_host.aclose()
        finally:
            log.close()
    return results


def report(results: dict[str, list[float]], op: str, calls: int, reps: int,
           chunk: int) -> str:
    median = {name: statistics.median(v) for name, v in results.items()}
    base = median["to_thread"]
    lines = [
        f"{op}: python {platform.python_version()}, trio {trio.__version__}, "
        f"{platform.machine()} {platform.system()}; {calls} calls x {reps} repetitions "
        f"per variant, in chunks of {chunk}",
        "",
        "| variant | median us/call | min us/call | vs to_thread |",
        "|---|---:|---:|---:|",
    ]
    for name, values in results.items():
        lines.append(f"| {name} | {median[name] * 1e6:.1f} | {min(values) * 1e6:.1f} | "
                     f"{median[name] / base:.2f}x |")
    ratio = median["actor_thread"] / base
    process_ratio = median["actor_process"] / median["actor_thread"]
    fixed_us = (median["actor_process"] - median["direct"]) * 1e6
    hop_us = (median["process_worker"] - median["direct"]) * 1e6
    lines += ["", f"actor_thread / to_thread = {ratio:.2f}x (goal <= 1.30x): "
              + ("met" if ratio <= 1.3 else "NOT met"),
              f"actor_process / actor_thread = {process_ratio:.2f}x (goal <= 1.30x): "
              + ("met" if process_ratio <= 1.3 else "NOT met"),
              f"fixed per-call cost of the process path: actor_process - direct = "
              f"{fixed_us:.0f} us (the pipe hop alone, process_worker - direct: "
              f"{hop_us:.0f} us)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=sorted(OPS), default="symbol_info_tick")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--chunk", type=int, default=100)
    args = parser.parse_args(argv)
    results = trio.run(run, args.op, args.calls, args.reps, args.chunk)
    print(report(results, args.op, args.calls, args.reps, args.chunk))
    return 0


if __name__ == "__main__":
    sys.exit(main())
