"""Event delivery over the control channel: 8 WebSocket subscribers on a real runtime.

    python -m tests.perf.bench_ws [--reps 5] [--calls 3000] [--rate 100] [--paced 500]
                                  [--restarts 100] [--subscribers 8] [--modes event,batch]
                                  [--set SECTION.KEY=VALUE]

The runtime is ``mt5-supervisor run`` in a **subprocess** (``tests/support/e2e.py``:
simulator, embedded PostgreSQL with event persistence, free ports; here also
``requests_per_second = 0`` so the event generator is not rate-limited, and
``health_interval_s = 30``). This process runs one asyncio loop with the subscriber
connections (``websockets``), each subscribed to every event, and the connections that make
events happen. Four phases, each repeated ``--reps`` times:

* **transitions** (quiet): ``actor.restart cache``, one at a time, ``--restarts`` times. Each
  restart is two state transitions (CONNECTED -> RECONNECTING -> CONNECTED) and a
  ``backoff_scheduled``. Measured: for every ``state_changed``, receive time minus ``ts``.
* **paced** (``degraded_served`` at ``--rate`` events/s): the terminal is crashed for good
  and has escalated to ERROR, so every ``actor.call mt5 symbol_info_tick`` is refused at once
  and answered from the last-known-good cache, and each such answer publishes one
  ``degraded_served`` event. One connection sends ``--paced`` calls at a fixed rate.
  Measured: receive time minus ``ts`` of every such event.
* **burst** (``degraded_served`` as fast as possible): 4 connections keep 32 calls in flight
  each (the per-connection maximum) until ``--calls`` calls are answered. Measured per
  subscriber: events/s delivered (events received / time from its first to its last burst
  event), events missed (``events.overflow``), receive time minus ``ts``; and the runtime
  process's CPU use over the burst. The rate is bounded by how fast the calls make events.
* **catch-up** (fan-out alone): the subscribers resume ``--catch-up`` events back from the
  log at the same moment, nothing generating; events/s delivered in total, from the first
  subscribe to the last ``events.live``.

Every phase runs for each of ``--modes``: ``event`` (one ``events.event`` per event, as
existing clients subscribe) and ``batch`` (``events.subscribe`` with ``batch: true``:
``events.batch`` notifications), alternating within each repetition so that both see the
same machine; the summary gives the ratios.

Clocks: ``ts`` is the runtime's trio clock mapped onto UTC wall time, anchored to
``time.time()`` when the supervisor started (``supervision/clock.py``); subscribers read
``time.time()`` when a message arrives. Same machine, same clock: the difference is the time
from the moment the event happened (the refusal, the transition) through numbering, the log
write, the bus, the connection's forwarder and writer, the socket, to the client's parse.
Each reported figure is the median over the repetitions of that repetition's value.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import ClientConnection, connect

from tests.support.e2e import TOKEN, RuntimeProcess

SUBSCRIBERS = 8
GENERATORS = 4
IN_FLIGHT = 32  # per generator connection: the server's per-connection maximum
TICK = {"actor": "mt5", "op": "symbol_info_tick", "args": {"symbol": "EURUSD"}}
SETTLE_S = 0.3


def epoch(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Subscriber:
    def __init__(self, ws: ClientConnection, batch: bool) -> None:
        self.ws = ws
        self.batch = batch
        self.received: list[tuple[float, dict[str, Any]]] = []  # (time.time(), event)
        self.missed = 0
        self.last_seq = 0
        self.task: asyncio.Task[None] | None = None
        self.started_at = 0.0
        self.live = asyncio.Event()  # events.live: the replay is over
        self.live_at = 0.0

    async def start(self, since_seq: int | None = None) -> None:
        params: dict[str, Any] = {"batch": True} if self.batch else {}
        if since_seq is not None:
            params["since_seq"] = since_seq
        self.started_at = time.time()
        await self.ws.send(json.dumps({"jsonrpc": "2.0", "id": 1,
                                       "method": "events.subscribe", "params": params}))
        reply = json.loads(await self.ws.recv())
        assert "result" in reply, reply
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for text in self.ws:
            now = time.time()
            message = json.loads(text)
            method = message.get("method")
            if method == "events.event":
                self._take_event(now, message["params"])
            elif method == "events.batch":
                for event in message["params"]["events"]:
                    self._take_event(now, event)
            elif method == "events.overflow":
                self.missed += message["params"]["missed"]
            elif method == "events.live":
                self.live_at = now
                self.live.set()

    def _take_event(self, now: float, event: dict[str, Any]) -> None:
        assert event["seq"] > self.last_seq, "out of order"
        self.last_seq = event["seq"]
        self.received.append((now, event))

    def take(self) -> tuple[list[tuple[float, dict[str, Any]]], int]:
        received, self.received = self.received, []
        missed, self.missed = self.missed, 0
        return received, missed


class Rpc:
    """Pipelined JSON-RPC on one connection."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for text in self.ws:
            message = json.loads(text)
            if "id" in message and message["id"] in self.waiting:
                self.waiting.pop(message["id"]).set_result(message)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        request_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = future
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        await self.ws.send(json.dumps(message))
        reply = await asyncio.wait_for(future, 60)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]


async def settle(subscribers: list[Subscriber]) -> None:
    """Until no subscriber has received anything for ``SETTLE_S``."""
    while True:
        counts = [len(s.received) for s in subscribers]
        await asyncio.sleep(SETTLE_S)
        if counts == [len(s.received) for s in subscribers]:
            return


async def fresh(subscribers: list[Subscriber]) -> None:
    await settle(subscribers)
    for s in subscribers:
        s.take()


async def wait_for(subscriber: Subscriber, predicate: Any, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not any(predicate(e) for _, e in subscriber.received):  # noqa: ASYNC110 - a poll
        if time.monotonic() > deadline:
            raise TimeoutError("event not seen")
        await asyncio.sleep(0.02)


def latency_summary(latencies: list[float]) -> dict[str, Any]:
    return {"lat_median": statistics.median(latencies), "lat_p99": percentile(latencies, 0.99),
            "samples": len(latencies)}


# ---------------------------------------------------------------------------- phases
async def transitions(admin: Rpc, subscribers: list[Subscriber], restarts: int
                      ) -> dict[str, Any]:
    await fresh(subscribers)
    watcher = subscribers[0]
    for i in range(restarts):
        await admin.call("actor.restart", {"actor": "cache"})
        # One at a time: wait until the cache is back before the next restart.
        while sum(1 for _, e in watcher.received if e["actor"] == "cache"  # noqa: ASYNC110
                  and e["kind"] == "state_changed" and e["to"] == "CONNECTED") <= i:
            await asyncio.sleep(0.001)
    await settle(subscribers)
    latencies = []
    for s in subscribers:
        received, missed = s.take()
        assert not missed
        latencies += [t - epoch(e["ts"]) for t, e in received
                      if e["kind"] == "state_changed" and e["actor"] == "cache"]
    assert len(latencies) == 2 * restarts * len(subscribers), len(latencies)
    return latency_summary(latencies)


async def paced(gen: Rpc, subscribers: list[Subscriber], calls: int, rate: float
                ) -> dict[str, Any]:
    await fresh(subscribers)
    start = time.monotonic()
    pending = []
    for i in range(calls):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(gen.call("actor.call", TICK)))
    responses = await asyncio.gather(*pending)
    assert all(r["status"] == "degraded" for r in responses)
    await settle(subscribers)
    latencies, missed = [], 0
    for s in subscribers:
        received, lost = s.take()
        missed += lost
        latencies += [t - epoch(e["ts"]) for t, e in received
                      if e["kind"] == "degraded_served"]
    return {**latency_summary(latencies), "missed": missed}


async def burst(gens: list[Rpc], subscribers: list[Subscriber], calls: int,
                server: psutil.Process) -> dict[str, Any]:
    await fresh(subscribers)
    counter = itertools.count()
    statuses: dict[str, int] = {}

    async def worker(rpc: Rpc) -> None:
        while next(counter) < calls:
            response = await rpc.call("actor.call", TICK)
            statuses[response["status"]] = statuses.get(response["status"], 0) + 1

    cpu0, wall0 = server.cpu_times(), time.monotonic()
    await asyncio.gather(*(worker(g) for g in gens for _ in range(IN_FLIGHT)))
    generated_s = time.monotonic() - wall0
    await settle(subscribers)
    busy_s = time.monotonic() - wall0 - SETTLE_S  # until the last delivery
    cpu1 = server.cpu_times()
    server_cpu = ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / busy_s
    rates, latencies, counts, missed = [], [], [], 0
    for s in subscribers:
        received, lost = s.take()
        missed += lost
        events = [(t, e) for t, e in received if e["kind"] == "degraded_served"]
        counts.append(len(events))
        rates.append(len(events) / (events[-1][0] - events[0][0]))
        latencies += [t - epoch(e["ts"]) for t, e in events]
    return {**latency_summary(latencies), "generated_per_s": calls / generated_s,
            "statuses": statuses, "per_sub_rate": rates, "total_rate": sum(rates),
            "counts": counts, "missed": missed, "server_cpu": server_cpu}


async def open_subscribers(rt: RuntimeProcess, n: int, batch: bool) -> list[Subscriber]:
    subs = [Subscriber(await connect(rt.ws_url, max_queue=None), batch) for _ in range(n)]
    for s in subs:
        await s.start()
    return subs


async def close_subscribers(subs: list[Subscriber]) -> None:
    for s in subs:
        await s.ws.close()
        if s.task is not None:
            await s.task


def report(mode: str, phase: str, rep: int, r: dict[str, Any], args: argparse.Namespace
           ) -> None:
    if phase == "burst":
        print(f"[{mode}] burst {rep + 1}: generated {r['generated_per_s']:.0f}/s, per "
              f"subscriber {statistics.median(r['per_sub_rate']):.0f}/s, total "
              f"{r['total_rate']:.0f}/s, received {min(r['counts'])}..{max(r['counts'])} of "
              f"{args.calls}, missed {r['missed']}, latency median "
              f"{r['lat_median'] * 1e3:.1f} ms p99 {r['lat_p99'] * 1e3:.1f} ms, runtime CPU "
              f"{r['server_cpu']:.2f}", flush=True)
    else:
        print(f"[{mode}] {phase} {rep + 1}: median {r['lat_median'] * 1e3:.2f} ms, "
              f"p99 {r['lat_p99'] * 1e3:.2f} ms ({r['samples']} samples"
              f"{', missed ' + str(r['missed']) if 'missed' in r else ''})", flush=True)


async def catch_up(rt: RuntimeProcess, admin: Rpc, n: int, batch: bool, count: int
                   ) -> dict[str, Any]:
    """``n`` subscribers resume ``count`` events back at the same moment (a page and a few
    CLIs reconnecting after a storm): the server sends from its log tail as fast as it can,
    with nothing generating events. Measured: events delivered per second in total, from
    the first subscribe sent to the last ``events.live`` received."""
    probe = await admin.call("events.subscribe", {})
    await admin.call("events.unsubscribe", {"subscription": probe["subscription"]})
    since = probe["head_seq"] - count
    assert since >= 0, "run the other phases first: the log is too short"
    subs = [Subscriber(await connect(rt.ws_url, max_queue=None), batch) for _ in range(n)]
    started = time.time()
    await asyncio.gather(*(s.start(since_seq=since) for s in subs))
    await asyncio.wait_for(asyncio.gather(*(s.live.wait() for s in subs)), 120)
    finished = max(s.live_at for s in subs)
    counts = [sum(1 for _, e in s.received if e["seq"] <= probe["head_seq"]) for s in subs]
    missed = sum(s.missed for s in subs)
    await close_subscribers(subs)
    assert counts == [count] * n and not missed, (counts, missed)
    return {"total_rate": sum(counts) / (finished - started), "seconds": finished - started}


async def bench(rt: RuntimeProcess, args: argparse.Namespace
                ) -> dict[str, dict[str, list[Any]]]:
    """Every phase for each mode (``event``: one ``events.event`` per event, as existing
    clients subscribe; ``batch``: ``events.batch``), the modes alternating within each
    repetition so both see the same machine."""
    server = psutil.Process(rt.proc.pid)  # type: ignore[union-attr]
    admin = Rpc(await connect(rt.ws_url, additional_headers={
        "Authorization": f"Bearer {TOKEN}"}))
    gens = [Rpc(await connect(rt.ws_url)) for _ in range(GENERATORS)]
    for gen in gens:  # a client without the token must speak first, or is closed as idle
        await gen.call("runtime.status")
    results = {mode: {"transitions": [], "paced": [], "burst": [], "catch_up": []}
               for mode in args.modes}
    n = args.subscribers

    for rep in range(args.reps):
        for mode in args.modes:
            subs = await open_subscribers(rt, n, mode == "batch")
            if rep == 0:
                await transitions(admin, subs, 10)  # warm-up
            r = await transitions(admin, subs, args.restarts)
            results[mode]["transitions"].append(r)
            report(mode, "transitions", rep, r, args)
            await close_subscribers(subs)

    # The terminal down for good: every read is answered degraded, with an event.
    first = await gens[0].call("actor.call", TICK)  # a last-known-good value to serve
    assert first["status"] == "ok", first
    watcher = (await open_subscribers(rt, 1, False))[0]
    await admin.call("sim.inject", {"fault": "terminal_crash"})
    await wait_for(watcher, lambda e: e["actor"] == "mt5" and e["kind"] == "escalated")
    await close_subscribers([watcher])
    for rep in range(args.reps):
        for mode in args.modes:
            subs = await open_subscribers(rt, n, mode == "batch")
            r = await paced(gens[0], subs, args.paced, args.rate)
            results[mode]["paced"].append(r)
            report(mode, "paced", rep, r, args)
            if rep == 0:
                await burst(gens, subs, max(200, args.calls // 5), server)  # warm-up
            r = await burst(gens, subs, args.calls, server)
            results[mode]["burst"].append(r)
            report(mode, "burst", rep, r, args)
            await close_subscribers(subs)
            r = await catch_up(rt, admin, n, mode == "batch", args.catch_up)
            results[mode]["catch_up"].append(r)
            print(f"[{mode}] catch-up {rep + 1}: {n} x {args.catch_up} events in "
                  f"{r['seconds'] * 1e3:.0f} ms: {r['total_rate']:.0f} events/s in total",
                  flush=True)
    await admin.call("sim.inject", {"fault": "clear"})
    for conn in [admin.ws, *(g.ws for g in gens)]:
        await conn.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--subscribers", type=int, default=SUBSCRIBERS)
    parser.add_argument("--restarts", type=int, default=100,
                        help="cache restarts (2 state_changed each) per transitions rep")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="events/s in the paced phase")
    parser.add_argument("--paced", type=int, default=500, help="events per paced rep")
    parser.add_argument("--calls", type=int, default=3000, help="events per burst rep")
    parser.add_argument("--catch-up", type=int, default=1000,
                        help="events each subscriber replays in the catch-up phase (at most "
                             "runtime.subscriber_buffer, 1000 by default)")
    parser.add_argument("--modes", default="event,batch",
                        help="comma-separated: event (events.event, one per event), batch "
                             "(events.batch); run side by side")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra configuration (a TOML value), e.g. "
                             "questdb.persist_events=false; repeatable")
    args = parser.parse_args()
    args.modes = args.modes.split(",")
    assert set(args.modes) <= {"event", "batch"}, args.modes
    sections: dict[str, dict[str, Any]] = {
        "control": {"requests_per_second": 0.0},
        "supervisor": {"health_interval_s": 30.0, "call_timeout_s": 10.0},
    }
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = tomllib.loads(f"v = {value}")["v"]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-ws-") as tmp:
        rt = RuntimeProcess(Path(tmp), sections=sections)
        rt.start()
        try:
            rt.wait_ready()
            results = asyncio.run(bench(rt, args))
        finally:
            code = rt.close()
        assert code == 0, rt.output()

    n = args.subscribers
    print()
    print(f"python {platform.python_version()}, {platform.system()} {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print(f"command: {' '.join(['python -m tests.perf.bench_ws', *sys.argv[1:]])}")
    print(f"{n} subscribers; each figure the median of {args.reps} repetitions")
    for mode in args.modes:
        summary(mode, results[mode], args)
    if len(args.modes) == 2:
        event, batch = results["event"], results["batch"]
        ratio = (statistics.median(r["total_rate"] for r in batch["burst"])
                 / statistics.median(r["total_rate"] for r in event["burst"]))
        print(f"batch / event, burst delivered in total: {ratio:.2f}x")
        ratio = (statistics.median(r["total_rate"] for r in batch["catch_up"])
                 / statistics.median(r["total_rate"] for r in event["catch_up"]))
        print(f"batch / event, catch-up delivered in total: {ratio:.2f}x")


def summary(mode: str, results: dict[str, list[Any]], args: argparse.Namespace) -> None:
    def med(part: str, key: str) -> float:
        return statistics.median(r[key] for r in results[part])

    per_sub = [statistics.median(r["per_sub_rate"][i] for r in results["burst"])
               for i in range(args.subscribers)]
    print(f"== {mode} ({'events.batch' if mode == 'batch' else 'events.event'}) ==")
    print(f"transitions ({args.restarts} cache restarts = {2 * args.restarts} state_changed, "
          f"quiet runtime):")
    print(f"  latency ts -> received:  median {med('transitions', 'lat_median') * 1e3:.2f} ms, "
          f"p99 {med('transitions', 'lat_p99') * 1e3:.2f} ms")
    print(f"paced ({args.paced} degraded_served at {args.rate:g}/s):")
    print(f"  latency ts -> received:  median {med('paced', 'lat_median') * 1e3:.2f} ms, "
          f"p99 {med('paced', 'lat_p99') * 1e3:.2f} ms, missed "
          f"{max(r['missed'] for r in results['paced'])}")
    print(f"burst ({args.calls} degraded_served, as fast as 4 x 32 calls in flight go):")
    print(f"  generated:               {med('burst', 'generated_per_s'):.0f} events/s")
    print(f"  delivered per subscriber: {statistics.median(per_sub):.0f} events/s "
          f"(each: {', '.join(f'{r:.0f}' for r in per_sub)})")
    print(f"  delivered in total:      {med('burst', 'total_rate'):.0f} events/s")
    print(f"  received per subscriber: "
          f"{statistics.median(min(r['counts']) for r in results['burst']):.0f} of "
          f"{args.calls} (missed, told by events.overflow: "
          f"{statistics.median(r['missed'] for r in results['burst']):.0f} in all)")
    print(f"  latency ts -> received:  median {med('burst', 'lat_median') * 1e3:.1f} ms, "
          f"p99 {med('burst', 'lat_p99') * 1e3:.1f} ms")
    print(f"  runtime process CPU:     {med('burst', 'server_cpu'):.2f} cores")
    print(f"catch-up ({args.subscribers} subscribers resume {args.catch_up} events back at "
          f"once):")
    print(f"  delivered in total:      {med('catch_up', 'total_rate'):.0f} events/s "
          f"({med('catch_up', 'seconds') * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
