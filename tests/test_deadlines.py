"""The per-cell deadline watchdog that bounds every call (supervision/watchdog.py), and the
straight call path (supervision/call.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import pytest
import trio

from supervision.actor import READ_UNCACHED, WRITE, Actor, OpSpec
from supervision.backoff import BackoffPolicy
from supervision.errors import CallFailed, ErrorCode, ErrorInfo, Failure
from supervision.messages import Notice, StateChanged, transition_messages
from supervision.reply import NoAnswer, Reply
from supervision.settings import ActorSettings
from supervision.states import Input, initial, step
from supervision.supervisor import ChildSpec
from supervision.watchdog import DeadlineWatchdog
from tests.support.actors import FlakyActor, FlakyResource, running_supervisor


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
        watchdog = sup.children["sleeper"].cell.mailbox.watchdog
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
    assert [r._outcome.unwrap() for r in replies] == [
        NoAnswer.CELL_ENDED, "answered", NoAnswer.CELL_ENDED]
    assert watchdog._heap == []


# ------------------------------------------------------------------ the straight call path
class CountingOps(dict[str, OpSpec]):
    """An ``ops`` table that counts its look-ups."""

    lookups = 0

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        CountingOps.lookups += 1
        return super().get(key, default)

    def __getitem__(self, key: str) -> OpSpec:
        CountingOps.lookups += 1
        return super().__getitem__(key)


class Classified(Actor):
    """Fails in every way a call can: already classified, a lost connection (retried),
    or not at all."""

    ops: ClassVar[Mapping[str, OpSpec]] = CountingOps(
        {"refuse": WRITE, "flaky": READ_UNCACHED, "ok": READ_UNCACHED})

    def __init__(self) -> None:
        self.flaky_calls = 0

    async def handle(self, op: str, args: Mapping[str, Any]) -> Any:
        if op == "refuse":
            raise CallFailed(Failure(ErrorCode.INVALID_REQUEST, "refuse failed: no",
                                     reason="retcode_10018"))
        if op == "flaky":
            self.flaky_calls += 1
            raise ConnectionResetError("reset")
        return "fine"

    def classify(self, exc: BaseException, op: str) -> Failure:
        if isinstance(exc, ConnectionError):
            return Failure(ErrorCode.DB_UNAVAILABLE, f"{op} failed: {exc}", connection=True)
        return super().classify(exc, op)


async def test_an_actors_own_failure_reaches_the_caller_unchanged(tmp_path, autojump_clock):
    async with running_supervisor(tmp_path) as sup:
        ref = await sup.start_child(ChildSpec("classified", Classified))
        resp = await ref.call("refuse")
        assert resp.status == "error" and resp.reason == "retcode_10018"
        assert resp.error == ErrorInfo(ErrorCode.INVALID_REQUEST, "refuse failed: no",
                                       "classified", "CONNECTED", None)


async def test_the_opspec_is_looked_up_once_per_call_even_across_retries(
        tmp_path, autojump_clock):
    settings = ActorSettings(retry_delays_s=(0.1, 0.5, 1.0), health_interval_s=3600.0,
                             backoff_base_s=3600.0)
    async with running_supervisor(tmp_path) as sup:
        ref = await sup.start_child(ChildSpec("classified", Classified, settings=settings))
        CountingOps.lookups = 0
        assert (await ref.call("ok")).data == "fine"
        assert CountingOps.lookups == 1
        CountingOps.lookups = 0
        resp = await ref.call("flaky", timeout_s=10.0)
        assert resp.error.code is ErrorCode.DB_UNAVAILABLE
        assert sup.children["classified"].actor.flaky_calls == 4  # the call and 3 retries
        assert CountingOps.lookups == 1


async def test_bad_calls_are_refused_before_anything_runs(tmp_path, autojump_clock):
    async with running_supervisor(tmp_path) as sup:
        ref = await sup.start_child(ChildSpec("classified", Classified))
        unknown = await ref.call("nope")
        assert unknown.error.code is ErrorCode.INVALID_REQUEST
        assert unknown.error.message == "nope failed: classified has no operation 'nope'"
        bad_timeout = await ref.call("ok", timeout_s=0)
        assert bad_timeout.error.code is ErrorCode.INVALID_REQUEST
        assert bad_timeout.error.state == "CONNECTED"


async def test_a_refusal_carries_retry_after_to_the_response(tmp_path, autojump_clock):
    resource = FlakyResource(up=False)
    settings = ActorSettings(health_interval_s=30.0)
    async with running_supervisor(tmp_path) as sup:
        ref = await sup.start_child(ChildSpec("db", lambda: FlakyActor(resource),
                                              settings=settings))
        await trio.sleep(8)  # attempts at +1, +3, +7 fail: ERROR, next probe at +37
        resp = await ref.call("write", {"value": 1})
        assert resp.error.code is ErrorCode.ACTOR_UNAVAILABLE and resp.error.state == "ERROR"
        assert resp.error.retry_after == pytest.approx(29.0)


async def test_a_queued_call_is_refused_when_its_cell_ends_not_timed_out(
        tmp_path, autojump_clock):
    async with running_supervisor(tmp_path) as sup:
        ref = await sup.start_child(ChildSpec("slow", Slow))
        results: dict[str, Any] = {}

        async def call(name: str) -> None:
            results[name] = await ref.call("wait", timeout_s=60.0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "running")
            await trio.sleep(1)
            nursery.start_soon(call, "queued")
            await trio.sleep(1)
            await sup.stop_child("slow")
        assert results["running"].error.code is ErrorCode.ACTOR_UNAVAILABLE
        assert "lost its connection" in results["running"].error.message
        assert results["queued"].error.code is ErrorCode.ACTOR_UNAVAILABLE
        assert trio.current_time() < 60.0


class Slow(Actor):
    ops: ClassVar[Mapping[str, OpSpec]] = {"wait": WRITE}

    async def handle(self, op: str, args: Mapping[str, Any]) -> Any:
        await trio.sleep_forever()


async def test_a_ref_restarts_its_child_through_the_public_surface(tmp_path, autojump_clock):
    resource = FlakyResource()
    async with running_supervisor(tmp_path) as sup:
        ref = await sup.start_child(ChildSpec("db", lambda: FlakyActor(resource)))
        await ref.restart("test")
        await trio.sleep(1)
        assert len(resource.connects) == 2 and ref.state == "CONNECTED"
        assert sup.children["db"].cell.instances == 2


def test_a_transition_is_told_as_the_machine_says():
    policy = BackoffPolicy()
    start = initial(policy)
    up, actions = step(start, Input.CONNECT_OK, 0.0, policy, health_interval_s=30.0)
    down, down_actions = step(up, Input.FAILURE_DETECTED, 5.0, policy, health_interval_s=30.0)
    told = transition_messages("db", up, down, Input.FAILURE_DETECTED, down_actions,
                               "failure_detected", None, 5.0)
    assert [type(m).__name__ for m in told] == ["StateChanged", "Notice"]
    assert told[1].kind == "backoff_scheduled" and told[1].delay_s == 1.0
    again, again_actions = step(down, Input.ATTEMPT_FAILED, 6.0, policy,
                                health_interval_s=30.0)
    told = transition_messages("db", down, again, Input.ATTEMPT_FAILED, again_actions,
                               "attempt 1 failed", None, 6.0)
    assert [m.kind for m in told if isinstance(m, Notice)] == ["backoff_scheduled"]
    assert not any(isinstance(m, StateChanged) for m in told)
