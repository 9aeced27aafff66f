"""The per-cell deadline watchdog that bounds every call (supervision/cell.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import trio

from supervision.actor import READ_UNCACHED, Actor, OpSpec
from supervision.cell import DeadlineWatchdog
from supervision.errors import ErrorCode
from supervision.reply import Reply
from supervision.supervisor import ChildSpec
from tests.helpers import running_supervisor


class Sleeper(Actor):
    """Answers after ``seconds``; runs requests concurrently, like a pool."""

    ops: ClassVar[Mapping[str, OpSpec]] = {"sleep": READ_UNCACHED}
    concurrency = 64

    async def handle(self, op: str, args: Mapping[str, Any]) -> Any:
        await trio.sleep(args["seconds"])
        return args["seconds"]


async def test_a_shorter_deadline_wakes_the_watchdog_early_and_exactly(tmp_path, autojump_clock):
    async with running_supervisor(tmp_path) as sup:
        ref = await sup.start_child(ChildSpec("sleeper", Sleeper))
        results: dict[str, tuple[float, Any]] = {}

        async def call(name: str, seconds: float, timeout_s: float) -> None:
            start = trio.current_time()
            resp = await ref.call("sleep", {"seconds": seconds}, timeout_s=timeout_s)
            results[name] = (trio.current_time() - start, resp)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "long", 100.0, 50.0)  # the watchdog sleeps until +50
            await trio.sleep(1)
            nursery.start_soon(call, "short", 100.0, 2.0)  # must wake it for +3
            nursery.start_soon(call, "quick", 0.5, 2.0)
        assert results["short"][0] == 2.0 and results["short"][1].error.code is ErrorCode.TIMEOUT
        assert results["long"][0] == 50.0 and results["long"][1].error.code is ErrorCode.TIMEOUT
        assert results["quick"][0] == 0.5 and results["quick"][1].data == 0.5


async def test_answered_calls_do_not_pile_up_in_the_watchdog(tmp_path, autojump_clock):
    async with running_supervisor(tmp_path) as sup:
        ref = await sup.start_child(ChildSpec("sleeper", Sleeper))
        watchdog = sup.children["sleeper"].cell._deadlines
        for _ in range(20_000):  # long deadlines, quick answers: all done, none expired
            assert (await ref.call("sleep", {"seconds": 0.0}, timeout_s=3600)).ok
        assert len(watchdog._heap) < 2 * DeadlineWatchdog.COMPACT_AT


async def test_expire_all_answers_every_waiting_reply():
    watchdog = DeadlineWatchdog()
    replies = [Reply() for _ in range(3)]
    for n, reply in enumerate(replies):
        watchdog.watch(100.0 + n, reply)
    replies[1].set_value("answered")
    watchdog.expire_all()
    assert all(reply.done for reply in replies)
    assert watchdog._heap == []
