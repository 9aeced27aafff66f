"""``events.subscribe`` with ``batch: true``: the events that are ready go out together in
``events.batch`` notifications (docs/protocol.md), in ``seq`` order, with nothing lost,
doubled or reordered around ``events.live`` and ``events.overflow``; without it, clients get
exactly what they got before (one ``events.event`` per event)."""

from __future__ import annotations

import json
from typing import Any

from supervision.shell.control import server as control_server
from tests.support.inprocess import Client, control_url, emit_events, running, wait_head
from tests.support.waiting import in_thread


def notifications_until_live(c: Client, sub: str) -> list[dict[str, Any]]:
    """Every notification of ``sub`` before its ``events.live``."""
    seen = []
    while True:
        message = c.notification()
        assert message["params"]["subscription"] == sub, message
        if message["method"] == "events.live":
            return seen
        seen.append(message)


def replay(url: str, params: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Subscribe with ``params`` on a new connection; the reply and the notifications up to
    ``events.live``."""
    c = Client(url)
    try:
        result = c.result("events.subscribe", params)
        return result, notifications_until_live(c, result["subscription"])
    finally:
        c.close()


def seqs_of(messages: list[dict[str, Any]]) -> list[int]:
    out = []
    for m in messages:
        if m["method"] == "events.batch":
            out += [e["seq"] for e in m["params"]["events"]]
        elif m["method"] == "events.event":
            out.append(m["params"]["seq"])
    return out


async def test_a_replay_comes_in_batches_in_seq_order_then_live(tmp_path) -> None:
    async with running(tmp_path) as rt:
        await emit_events(rt, 300)
        head = rt.events.head_seq
        await wait_head(rt, head)

        def subscribe() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            c = Client(control_url(rt))
            try:
                result = c.result("events.subscribe", {"since_seq": 0, "batch": True})
                return result, notifications_until_live(c, result["subscription"])
            finally:
                c.close()

        result, messages = await in_thread(subscribe)
        assert result["head_seq"] >= head
        assert {m["method"] for m in messages} == {"events.batch"}
        assert seqs_of(messages) == list(range(1, result["head_seq"] + 1))
        # Everything was buffered before the forwarder started: far fewer frames than events.
        assert len(messages) < head / 10, [len(m["params"]["events"]) for m in messages]
        for m in messages:
            assert set(m["params"]) == {"subscription", "events"}
            for event in m["params"]["events"]:
                assert "subscription" not in event
                assert set(event) >= {"seq", "ts", "actor", "kind", "from", "to", "attempt",
                                      "delay_s", "error"}
        # The events are the log's, byte for byte the same JSON.
        by_seq = {e.seq: e for e in rt.supervisor.log.read_tail(0)}
        for event in messages[0]["params"]["events"][:20]:
            assert json.loads(by_seq[event["seq"]].to_line()) == event


async def test_live_events_keep_coming_in_batches_without_gap(tmp_path) -> None:
    async with running(tmp_path) as rt:
        def subscribe() -> tuple[Client, str]:
            c = Client(control_url(rt), max_queue=None)
            sub = c.result("events.subscribe", {"batch": True})["subscription"]
            notifications_until_live(c, sub)
            return c, sub

        c, sub = await in_thread(subscribe)
        start = rt.events.head_seq
        await emit_events(rt, 500)

        def receive() -> list[dict[str, Any]]:
            seen: list[dict[str, Any]] = []
            while not seen or seqs_of(seen)[-1] < start + 500:
                seen.append(c.notification())
            c.close()
            return seen

        messages = await in_thread(receive)
        assert {m["method"] for m in messages} == {"events.batch"}
        assert seqs_of(messages) == list(range(start + 1, start + 501))


async def test_without_batch_every_event_is_its_own_notification(tmp_path) -> None:
    async with running(tmp_path) as rt:
        await emit_events(rt, 50)
        head = rt.events.head_seq
        await wait_head(rt, head)

        def subscribe() -> list[dict[str, Any]]:
            c = Client(control_url(rt))
            try:
                for params in ({"since_seq": 0}, {"since_seq": 0, "batch": False}):
                    result = c.result("events.subscribe", params)
                    messages = notifications_until_live(c, result["subscription"])
                    assert {m["method"] for m in messages} == {"events.event"}
                    assert seqs_of(messages) == list(range(1, result["head_seq"] + 1))
                    assert result["head_seq"] >= head
                return messages
            finally:
                c.close()

        await in_thread(subscribe)


async def test_an_overflow_comes_after_the_batch_it_cut_short(tmp_path) -> None:
    async with running(tmp_path, runtime={"subscriber_buffer": 10}) as rt:
        await emit_events(rt, 50)
        head = rt.events.head_seq
        await wait_head(rt, head)

        result, messages = await in_thread(
            lambda: replay(control_url(rt), {"since_seq": 0, "batch": True}))
        head = result["head_seq"]
        # The replay filled the buffer (10 events) and missed the rest: one batch, then the
        # overflow notice saying where to resume.
        assert [m["method"] for m in messages] == ["events.batch", "events.overflow"]
        assert seqs_of(messages) == list(range(1, 11))
        assert messages[1]["params"]["missed"] >= head - 10  # more may have come since
        assert messages[1]["params"]["resume_after_seq"] == 10


async def test_a_batch_is_bounded_in_events(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(control_server, "BATCH_MAX_EVENTS", 7)
    async with running(tmp_path) as rt:
        await emit_events(rt, 40)
        head = rt.events.head_seq
        await wait_head(rt, head)

        result, messages = await in_thread(
            lambda: replay(control_url(rt), {"since_seq": 0, "batch": True}))
        head = result["head_seq"]
        sizes = [len(m["params"]["events"]) for m in messages]
        assert max(sizes) == 7 and sum(sizes) == head, sizes
        assert seqs_of(messages) == list(range(1, head + 1))


async def test_a_batch_is_bounded_in_size(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(control_server, "BATCH_MAX_CHARS", 2000)
    async with running(tmp_path) as rt:
        await emit_events(rt, 30, pad=500)
        head = rt.events.head_seq
        await wait_head(rt, head)

        result, messages = await in_thread(
            lambda: replay(control_url(rt), {"since_seq": 0, "batch": True}))
        head = result["head_seq"]

        def length(event: dict[str, Any]) -> int:
            return len(json.dumps(event, separators=(",", ":"), ensure_ascii=False))

        # A batch stops growing once it holds the bound's worth: all but its last event
        # stay under it. 30 events of ~600 characters cannot fit in fewer than 9 frames.
        for m in messages:
            assert sum(length(e) for e in m["params"]["events"][:-1]) < 2000
        assert len(messages) >= 9, [len(m["params"]["events"]) for m in messages]
        assert seqs_of(messages) == list(range(1, head + 1))


async def test_batch_must_be_a_boolean(tmp_path) -> None:
    async with running(tmp_path) as rt:
        def ask() -> dict[str, Any]:
            c = Client(control_url(rt))
            try:
                return c.error("events.subscribe", {"batch": "yes"})
            finally:
                c.close()

        error = await in_thread(ask)
        assert error["code"] == -32602
        assert "'batch' must be true or false" in error["message"], error
