"""The exact supervision schedule on trio's virtual clock (DESIGN.md section 3)."""

from __future__ import annotations

import trio

from supervision.supervisor import ChildSpec
from tests.support.actors import FlakyActor, FlakyResource, Recorder, running_supervisor


async def test_never_returning_resource_schedule(tmp_path, autojump_clock):
    res = FlakyResource(up=False)
    async with running_supervisor(tmp_path) as sup:
        rec = Recorder(sup)
        async with trio.open_nursery() as n:
            n.start_soon(rec.run)
            t0 = trio.current_time()
            await sup.start_child(ChildSpec("db", lambda: FlakyActor(res)))
            await trio.sleep(100)
            offsets = [round(t - t0, 6) for t in res.connects]
            # start, attempts at +1, +3, +7, then ERROR probes every 30 s
            assert offsets == [0, 1, 3, 7, 37, 67, 97]
            assert sup.state("db") == "ERROR"
            res.up = True
            await trio.sleep(30)
            assert round(res.connects[-1] - t0, 6) == 127
            assert sup.state("db") == "CONNECTED"
            kinds = [(e.kind, e.from_state, e.to_state) for e in rec.of("db")]
            assert ("escalated", None, None) in kinds
            assert ("recovered", None, None) in kinds
            n.cancel_scope.cancel()
