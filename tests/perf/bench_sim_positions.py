"""What an open position costs the simulator's account reads and orders.

    python -m tests.perf.bench_sim_positions [--positions 10 50 200] [--calls 30]

``account_info``, ``positions_get`` and ``order_send`` mark every open position to the
market (and convert currencies through other pairs' quotes). A quote is ~1 ms of numpy
work from the price path, and a pure function of the symbol and the second, so the
simulator keeps the last one per symbol. Side by side in one run, on simulators holding
the same number of positions (alternating calls, so drift hits both alike):

* ``cached``   — the simulator as shipped;
* ``uncached`` — the same with every quote computed afresh (the code before the cache).

Per variant and size: the median time per call. Then, for the process worker, what the
account update the child sends after each ``order_send`` costs it (``account_state`` with
only the new history, pickled into a frame), next to the ``order_send`` itself.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from actors.mt5 import codes
from actors.mt5.simulator import SymbolSpec, TerminalSimulator
from actors.mt5.terminal_process import frame

BUY = {"action": codes.TRADE_ACTION_DEAL, "symbol": "EURUSD", "volume": 0.01,
       "type": codes.ORDER_TYPE_BUY, "deviation": 20, "type_filling": codes.ORDER_FILLING_IOC}
OPS = ("account_info", "positions_get", "order_send")


class Uncached(TerminalSimulator):
    def _quote(self, spec: SymbolSpec) -> tuple[float, float]:
        bid = float(self._bids(spec, np.array([self._market_second()]))[0])
        return bid, round(bid + spec.spread_points * spec.point, spec.digits)


def holding(cls: type[TerminalSimulator], positions: int) -> TerminalSimulator:
    sim = cls(clock=time.monotonic, balance=10_000_000.0)
    assert sim.initialize()
    for _ in range(positions):
        assert sim.order_send(BUY) is not None
    return sim


def call(sim: TerminalSimulator, op: str) -> float:
    started = time.perf_counter()
    if op == "order_send":
        sim.order_send(BUY)
    else:
        getattr(sim, op)()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    print("| open positions | call | cached median ms | uncached median ms | uncached / cached |")
    print("|---|---|---|---|---|")
    for n in args.positions:
        sims = {"cached": holding(TerminalSimulator, n), "uncached": holding(Uncached, n)}
        for op in OPS:
            times: dict[str, list[float]] = {name: [] for name in sims}
            for _ in range(args.calls):
                for name, sim in sims.items():
                    times[name].append(call(sim, op))
            cached = statistics.median(times["cached"]) * 1e3
            uncached = statistics.median(times["uncached"]) * 1e3
            print(f"| {n} | `{op}` | {cached:.3f} | {uncached:.2f} | {uncached / cached:.0f}x |")
    print()
    print("| open positions | `order_send` median ms | account update median ms | frame bytes |")
    print("|---|---|---|---|")
    for n in args.positions:
        sim = holding(TerminalSimulator, n)
        sent = sim.account_state()["history_lengths"]
        orders, updates, size = [], [], 0
        for _ in range(args.calls):
            orders.append(call(sim, "order_send"))
            started = time.perf_counter()
            update = sim.account_state(history_from=sent)
            size = len(frame(("account", 1, update)))
            updates.append(time.perf_counter() - started)
            sent = update["history_lengths"]
        print(f"| {n} | {statistics.median(orders) * 1e3:.3f} | "
              f"{statistics.median(updates) * 1e3:.3f} | {size} |")


if __name__ == "__main__":
    main()
