"""One MT5 terminal in its own worker process under a running supervisor (real time)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from actors.cache import TtlCache
from actors.mt5.actor import Mt5Actor, Mt5Ref, TerminalLedger
from actors.mt5.process_worker import TerminalHost
from actors.mt5.terminal_process import BackendRecipe
from supervision.settings import ActorSettings
from supervision.supervisor import ChildSpec, Supervisor
from tests.support.actors import Recorder, running_supervisor


@contextlib.asynccontextmanager
async def hosted_terminal(tmp_path: Path, recipe: BackendRecipe, settings: ActorSettings,
                          name: str = "mt5"
                          ) -> AsyncIterator[tuple[Supervisor, Mt5Ref, TerminalHost, Recorder]]:
    """The actor ``name`` over a ``TerminalHost`` running ``recipe``; yields the supervisor,
    the typed ref, the host (to inject, kill, count processes) and an event recorder. The
    host's process is closed (killed and reaped) whatever happens."""
    host = TerminalHost(recipe, name=name)
    ledger = TerminalLedger()
    try:
        async with running_supervisor(tmp_path, lkg=TtlCache()) as sup:
            rec = Recorder(sup)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rec.run)
                ref = await sup.start_child(ChildSpec(
                    name, lambda: Mt5Actor(None, inline=False, name=name, ledger=ledger,
                                           host=host),
                    settings=settings, ref_class=Mt5Ref))
                assert isinstance(ref, Mt5Ref)
                yield sup, ref, host, rec
                await sup.shutdown()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await host.aclose()
