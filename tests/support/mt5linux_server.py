"""An mt5linux bridge server with our simulator in place of the Windows ``MetaTrader5``.

    python -m tests.support.mt5linux_server --port PORT

What ``python -m mt5linux`` runs under Wine is rpyc's classic server, in whose process the
client's code strings (``mt5.symbol_info_tick(*('EURUSD',),**{})``) are evaluated after
``import MetaTrader5 as mt5``. This is the same server (``rpyc.utils.server.ThreadedServer``
with ``ClassicService``) and the same evaluation; only ``MetaTrader5`` is a module made from
a ``TerminalSimulator`` on the real clock. Each function first waits as the simulator says
(``slow``, ``ipc_timeout``, ``hang``), as the terminal would. A test drives faults through
the classic connection itself: ``conn.modules.MetaTrader5.simulator.inject("slow", ...)``.

Prints ``ready PORT`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import functools
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

from rpyc.core.service import ClassicService
from rpyc.utils.server import ThreadedServer

from actors.mt5 import codes
from actors.mt5.simulator import PACKAGE_FUNCTIONS, TerminalSimulator


def _delayed(sim: TerminalSimulator, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        delay = sim.before_call(name)
        if delay.seconds:
            time.sleep(delay.seconds)
        if delay.hang is not None and not delay.hang.released:
            released = threading.Event()
            delay.hang.add_listener(released.set)
            released.wait()
        return fn(*args, **kwargs)

    return call


def simulator_module(sim: TerminalSimulator) -> types.ModuleType:
    module = types.ModuleType("MetaTrader5")
    for name in dir(codes):
        if name.isupper():
            setattr(module, name, getattr(codes, name))
    for name in PACKAGE_FUNCTIONS:
        setattr(module, name, _delayed(sim, name, getattr(sim, name)))
    module.simulator = sim  # type: ignore[attr-defined]  # the test's fault lever
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    sys.modules["MetaTrader5"] = simulator_module(TerminalSimulator(clock=time.monotonic))
    server = ThreadedServer(ClassicService, hostname="127.0.0.1", port=args.port,
                            reuse_addr=True)
    print(f"ready {args.port}", flush=True)
    server.start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
