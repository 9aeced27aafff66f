"""Memory over a long soak: RSS after 100 cycles vs after 10,000 (issue 10).

    python -m tests.perf.soak_rss [--cycles 10000] [--seed 10] [--tail-size 100]

Runs the virtual-time soak of tests/support/soak.py (random faults, operator restarts and nudges
across a nested tree; a fresh actor instance on every connect attempt) under trio's
``MockClock`` with autojump, and reads the process's resident set size (``VmRSS``) after
cycle 100 and after the last cycle, each after a full garbage collection. The goal: the
second within 5 % of the first. The event log keeps its last ``tail_size`` events in memory by
design (10,000 by default, for subscribers that resume); that bounded tail fills during the
first few thousand cycles, so the measurement uses a small tail (``--tail-size``, default 100)
to see whether the tree itself holds on to anything.
"""

from __future__ import annotations

import argparse
import gc
import platform
import tempfile
from functools import partial
from pathlib import Path

import trio
import trio.testing

from tests.support.soak import soak


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--tail-size", type=int, default=100)
    args = parser.parse_args()
    samples: dict[int, int] = {}

    def sample(cycle: int) -> None:
        if cycle in (100, args.cycles // 2, args.cycles):
            gc.collect()
            samples[cycle] = rss_kib()

    with tempfile.TemporaryDirectory() as tmp:
        result = trio.run(partial(soak, Path(tmp), args.cycles, seed=args.seed,
                                  tail_size=args.tail_size, after_cycle=sample),
                          clock=trio.testing.MockClock(autojump_threshold=0))
    first, half, last = samples[100], samples[args.cycles // 2], samples[args.cycles]
    print(f"python {platform.python_version()}, trio {trio.__version__}, "
          f"{platform.machine()}, {platform.system()}")
    print(f"cycles {result.cycles}, events {result.events}, actor instances "
          f"{result.instances}, seq contiguous {result.seqs_contiguous}")
    print(f"event log tail in memory: {args.tail_size} events")
    print(f"RSS after 100 cycles:    {first / 1024:8.1f} MiB")
    print(f"RSS after {args.cycles // 2} cycles:  {half / 1024:8.1f} MiB "
          f"({100.0 * (half - first) / first:+.1f} %)")
    print(f"RSS after {args.cycles} cycles: {last / 1024:8.1f} MiB "
          f"({100.0 * (last - first) / first:+.1f} %)")


if __name__ == "__main__":
    main()
