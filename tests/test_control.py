"""The control channel over a real socket, against an in-process runtime (real time).

The runtime runs the cache actor only (``mt5`` and ``questdb`` disabled) plus, where a test
needs it, a ``slow`` actor; the client is the ``websockets`` library's blocking client, run
in worker threads so the trio loop keeps serving.
"""

from __future__ import annotations

import base64
import hmac
import json
import threading
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import pytest
import trio
from websockets.exceptions import InvalidStatus

from supervision.actor import READ, Actor, OpSpec
from supervision.settings import ActorSettings
from supervision.shell.control import server as control_server
from supervision.shell.httpserver import metrics_for
from supervision.supervisor import ChildSpec
from tests.support.inprocess import TOKEN, Client, control_url, emit_events, running, wait_head
from tests.support.waiting import eventually, in_thread

pytestmark = pytest.mark.realserver


class SlowActor(Actor):
    ops: ClassVar[Mapping[str, OpSpec]] = {"sleep": READ}
    concurrency = 8

    async def handle(self, op: str, args: Mapping[str, Any]) -> Any:
        await trio.sleep(float(args.get("s", 0)))
        return {"slept": args.get("s", 0)}


def slow_child() -> ChildSpec:
    return ChildSpec("slow", SlowActor, settings=ActorSettings(call_timeout_s=5.0))


# ---------------------------------------------------------------------------- reads
async def test_status_and_health_are_open_to_loopback_reads(tmp_path) -> None:
    async with running(tmp_path) as rt:
        def client() -> None:
            c = Client(control_url(rt))
            status = c.result("runtime.status")
            assert [a["name"] for a in status["actors"]] == ["cache"]
            cache = status["actors"][0]
            assert cache["state"] == "CONNECTED"
            assert set(cache) >= {"name", "state", "restarts", "attempt", "last_error", "since",
                                  "next_retry_at", "breaker"}
            health = c.result("runtime.health")
            assert health["status"] == "pass"
            assert "cache:entries" in health["checks"]
            c.close()

        await in_thread(client)


async def test_reads_need_the_token_when_open_reads_is_off(tmp_path) -> None:
    async with running(tmp_path, control={"open_reads": False}) as rt:
        def client() -> None:
            c = Client(control_url(rt))
            err = c.error("runtime.status")
            assert (err["code"], err["data"]["code"]) == (-32001, "UNAUTHORIZED")
            assert c.result("auth", {"token": TOKEN}) == {"ok": True}
            assert c.result("runtime.status")["actors"]
            c.close()
            with_header = Client(control_url(rt), token=TOKEN)
            assert with_header.result("runtime.status")["actors"]
            with_header.close()

        await in_thread(client)


# ---------------------------------------------------------------------------- auth
async def test_mutating_methods_need_the_token(tmp_path) -> None:
    async with running(tmp_path) as rt:
        def client() -> None:
            c = Client(control_url(rt))
            for method, params in (("actor.restart", {"actor": "cache"}),
                                   ("sim.inject", {"fault": "hang"}),
                                   ("runtime.shutdown", None),
                                   ("actor.call", {"actor": "cache", "op": "put",
                                                   "args": {"key": "k", "value": 1}})):
                err = c.error(method, params)
                assert err["code"] == -32001, (method, err)
                assert err["data"]["code"] == "UNAUTHORIZED"
                assert "Authorization: Bearer" in err["message"]
            # A wrong token is refused and the connection stays usable.
            err = c.error("auth", {"token": "wrong"})
            assert (err["code"], err["message"]) == (-32001, "invalid token")
            assert c.error("actor.restart", {"actor": "cache"})["code"] == -32001
            assert c.result("auth", {"token": TOKEN}) == {"ok": True}
            assert c.result("actor.restart", {"actor": "cache"}) == {"ok": True}
            c.close()

            header = Client(control_url(rt), token=TOKEN)
            assert header.result("actor.call", {"actor": "cache", "op": "put",
                                                "args": {"key": "k", "value": 1}})["status"] == "ok"
            header.close()

        await in_thread(client)
        assert not rt.shutdown_requested


async def test_a_wrong_bearer_header_is_refused_at_the_handshake(tmp_path) -> None:
    async with running(tmp_path) as rt:
        def client() -> None:
            for header_token in ("wrong", TOKEN + "x"):
                with pytest.raises(InvalidStatus) as info:
                    Client(control_url(rt), token=header_token)
                assert info.value.response.status_code == 401
                assert b"invalid bearer token" in info.value.response.body

        await in_thread(client)
        assert metrics_for(rt).control_rejected == 2


async def test_tokens_are_compared_in_constant_time(tmp_path, monkeypatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    async with running(tmp_path) as rt:
        def client() -> None:
            c = Client(control_url(rt), token=TOKEN)
            c.error("auth", {"token": "nope"})
            c.close()

        await in_thread(client)
    assert (TOKEN.encode(), TOKEN.encode()) in calls  # the handshake header
    assert (TOKEN.encode(), b"nope") in calls  # the auth call


async def test_without_a_configured_token_mutating_methods_are_refused(tmp_path) -> None:
    async with running(tmp_path, token=None) as rt:
        def client() -> None:
            c = Client(control_url(rt))
            err = c.error("runtime.shutdown")
            assert err["code"] == -32001 and "MT5SUP_TOKEN" in err["message"]
            err = c.error("auth", {"token": "anything"})
            assert err["code"] == -32001 and "no token is configured" in err["message"]
            assert c.result("runtime.status")["actors"]  # reads still work on loopback
            c.close()
            with pytest.raises(InvalidStatus) as info:
                Client(control_url(rt), token="anything")
            assert info.value.response.status_code == 401

        await in_thread(client)
        assert not rt.shutdown_requested


async def test_repeated_auth_failures_close_the_connection(tmp_path) -> None:
    async with running(tmp_path) as rt:
        def client() -> None:
            c = Client(control_url(rt))
            for _ in range(control_server.MAX_AUTH_FAILURES):
                assert c.error("auth", {"token": "guess"})["code"] == -32001
            assert c.closed_code() == 1008

        await in_thread(client)


# ---------------------------------------------------------------------------- methods
async def test_actor_call_restart_inject_and_shutdown(tmp_path) -> None:
    async with running(tmp_path) as rt:
        def client() -> None:
            c = Client(control_url(rt), token=TOKEN)
            put = c.result("actor.call", {"actor": "cache", "op": "put",
                                          "args": {"key": "eur", "value": {"bid": 1.1}}})
            assert put == {"status": "ok", "data": True, "cached_at": None, "reason": None,
                           "error": None}
            got = c.result("actor.call", {"actor": "cache", "op": "get",
                                          "args": {"key": "eur"}, "timeout_s": 2})
            assert got["status"] == "ok" and got["data"] == {"bid": 1.1}
            missing = c.result("actor.call", {"actor": "cache", "op": "get",
                                              "args": {"key": "nope"}})
            assert missing["status"] == "error"
            assert missing["error"]["code"] == "NOT_FOUND"
            nobody = c.result("actor.call", {"actor": "ghost", "op": "get"})
            assert nobody["error"]["code"] == "INVALID_REQUEST"
            assert "ghost" in nobody["error"]["message"]

            err = c.error("actor.restart", {"actor": "ghost"})
            assert err["code"] == -32602 and "ghost" in err["message"]
            assert c.result("actor.restart", {"actor": "cache"}) == {"ok": True}

            err = c.error("sim.inject", {"fault": "terminal_crash"})
            assert err["code"] == -32602 and "simulator" in err["message"]
            err = c.error("sim.inject", {"fault": "x", "actor": "cache"})
            assert err["code"] == -32602 and "cache" in err["message"]
            err = c.error("sim.inject", {"fault": "hang", "params": {"actor": "mt5"}})
            assert err["code"] == -32602 and "top-level" in err["message"]

            assert c.result("runtime.shutdown") == {"ok": True}
            c.close()

        await in_thread(client)
        assert rt.shutdown_requested
        restarted = [e for e in rt.supervisor.log.read_tail(0)
                     if e.actor == "cache" and e.to_state == "RECONNECTING"]
        assert restarted and restarted[0].data["reason"] == "operator"


async def test_a_slow_call_does_not_hold_up_the_connection(tmp_path) -> None:
    async with running(tmp_path, children=[slow_child()]) as rt:
        def client() -> None:
            c = Client(control_url(rt))
            started = time.monotonic()
            c.send({"jsonrpc": "2.0", "id": "slow", "method": "actor.call",
                    "params": {"actor": "slow", "op": "sleep", "args": {"s": 3.0}}})
            c.send({"jsonrpc": "2.0", "id": "fast", "method": "runtime.status"})
            first = c.recv()
            assert first["id"] == "fast"
            # Well before the slow call could have ended: it did not wait behind it.
            assert time.monotonic() - started < 2.0
            second = c.recv()
            assert second["id"] == "slow" and second["result"]["data"] == {"slept": 3.0}
            # The call's own deadline is honoured and answered as a Response.
            late = c.result("actor.call", {"actor": "slow", "op": "sleep", "args": {"s": 4},
                                           "timeout_s": 0.2})
            assert late["status"] == "error" and late["error"]["code"] == "TIMEOUT"
            c.close()

        await in_thread(client)
        assert metrics_for(rt).call_latency[("slow", "ok")].counts


async def test_request_deadline_answers_timeout(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(control_server, "REQUEST_TIMEOUT_S", 0.2)

    async def stuck_restart(name: str) -> None:
        await trio.sleep(5)

    async with running(tmp_path) as rt:
        monkeypatch.setattr(rt, "restart", stuck_restart)

        def client() -> None:
            c = Client(control_url(rt), token=TOKEN)
            err = c.error("actor.restart", {"actor": "cache"})
            assert (err["code"], err["data"]["code"]) == (-32003, "TIMEOUT")
            assert c.result("runtime.status")["actors"]
            c.close()

        await in_thread(client)


async def test_a_notification_request_gets_no_reply(tmp_path) -> None:
    async with running(tmp_path) as rt:
        def client() -> None:
            c = Client(control_url(rt))
            c.send({"jsonrpc": "2.0", "method": "runtime.status"})
            c.send({"jsonrpc": "2.0", "method": "no.such.method"})
            c.send({"jsonrpc": "2.0", "id": 5, "method": "runtime.health"})
            assert c.recv()["id"] == 5
            c.close()

        await in_thread(client)


# ---------------------------------------------------------------------------- bad input
BAD_INPUT = [
    ("{not json", -32700, None),
    ('{"jsonrpc":"2.0","id":1,"method":"runtime.status","params":{"x":NaN}}', -32700, None),
    ("[" * 50_000 + "]" * 50_000, -32700, None),
    ("[]", -32600, None),
    ('[{"jsonrpc":"2.0","id":1,"method":"runtime.status"}]', -32600, None),
    ("42", -32600, None),
    ("null", -32600, None),
    ('{"jsonrpc":"1.0","id":11,"method":"runtime.status"}', -32600, 11),
    ('{"jsonrpc":"2.0","id":12}', -32600, 12),
    ('{"jsonrpc":"2.0","id":[1],"method":"runtime.status"}', -32600, None),
    ('{"jsonrpc":"2.0","id":13,"method":"runtime.reboot"}', -32601, 13),
    ('{"jsonrpc":"2.0","id":14,"method":"events.subscribe","params":{"since_seq":"x"}}',
     -32602, 14),
    ('{"jsonrpc":"2.0","id":15,"method":"actor.call","params":{"actor":1,"op":"get"}}',
     -32602, 15),
    ('{"jsonrpc":"2.0","id":16,"method":"runtime.status","params":[1,2]}', -32602, 16),
    ('{"jsonrpc":"2.0","id":17,"method":"actor.call","params":{"actor":"cache"}}', -32602, 17),
    (b"\x00\x01binary", -32600, None),
]


async def test_bad_input_gets_an_error_and_the_connection_stays_up(tmp_path) -> None:
    async with running(tmp_path) as rt:
        def client() -> None:
            c = Client(control_url(rt))
            for raw, code, request_id in BAD_INPUT:
                c.send(raw)
                reply = c.recv()
                assert reply["jsonrpc"] == "2.0"
                assert reply["id"] == request_id, (raw[:40], reply)
                assert reply["error"]["code"] == code, (raw[:40], reply)
                assert reply["error"]["message"]
                assert reply["error"]["data"]["code"]
                assert c.result("runtime.status")["actors"], raw[:40]
            c.close()

        await in_thread(client)


async def test_params_errors_name_the_parameter(tmp_path) -> None:
    async with running(tmp_path) as rt:
        def client() -> None:
            c = Client(control_url(rt))
            err = c.error("events.subscribe", {"since_seq": "x"})
            assert "since_seq" in err["message"] and "integer" in err["message"]
            err = c.error("actor.call", {"actor": "cache", "op": "get", "timeout_s": -1})
            assert "timeout_s" in err["message"]
            c.close()

        await in_thread(client)


# ---------------------------------------------------------------------------- limits
async def test_an_oversized_message_closes_only_that_client(tmp_path) -> None:
    async with running(tmp_path, control={"max_message_bytes": 4096}) as rt:
        def client() -> None:
            bystander = Client(control_url(rt))
            big = Client(control_url(rt))
            big.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "auth",
                                 "params": {"token": "x" * 10_000}}))
            assert big.closed_code() == 1009
            assert bystander.result("runtime.status")["actors"]
            # Just under the limit is fine.
            ok = Client(control_url(rt))
            padded = {"jsonrpc": "2.0", "id": 2, "method": "auth", "params": {"token": ""}}
            padded["params"]["token"] = "y" * (4096 - len(json.dumps(padded)))
            ok.send(json.dumps(padded))
            assert ok.recv()["error"]["message"] == "invalid token"
            ok.close()
            bystander.close()

        await in_thread(client)
        assert metrics_for(rt).control_oversized == 1


async def test_a_flood_is_rate_limited_while_another_client_is_served(tmp_path) -> None:
    async with running(tmp_path, control={"requests_per_second": 20.0}) as rt:
        flood_done = threading.Event()

        def flooder() -> dict[str, int]:
            c = Client(control_url(rt))
            for i in range(300):
                c.send({"jsonrpc": "2.0", "id": i, "method": "runtime.status"})
            outcome = {"ok": 0, "limited": 0}
            for _ in range(300):
                reply = c.recv()
                if "result" in reply:
                    outcome["ok"] += 1
                else:
                    assert reply["error"]["code"] == -32002
                    assert reply["error"]["data"]["code"] == "RATE_LIMITED"
                    assert reply["error"]["data"]["retry_after"] >= 0
                    outcome["limited"] += 1
            flood_done.set()
            time.sleep(1.1)  # the bucket refills: the connection is still good
            assert c.result("runtime.status")["actors"]
            c.close()
            return outcome

        def polite() -> int:
            c = Client(control_url(rt))
            served = 0
            while not flood_done.is_set() or served < 5:
                assert c.result("runtime.status")["actors"]
                served += 1
                time.sleep(0.06)
            c.close()
            return served

        results: dict[str, Any] = {}

        async def run(name: str, fn: Any) -> None:
            results[name] = await in_thread(fn)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "polite", polite)
            nursery.start_soon(run, "flood", flooder)
        assert results["flood"]["limited"] >= 250
        assert 20 <= results["flood"]["ok"] <= 45
        assert results["polite"] >= 5
        assert metrics_for(rt).control_rate_limited == results["flood"]["limited"]


async def test_connections_beyond_the_limit_are_refused(tmp_path) -> None:
    async with running(tmp_path, control={"max_connections": 2}) as rt:
        def client() -> None:
            a, b = Client(control_url(rt)), Client(control_url(rt))
            with pytest.raises(InvalidStatus) as info:
                Client(control_url(rt))
            assert info.value.response.status_code == 503
            a.close()
            time.sleep(0.2)
            c = Client(control_url(rt))
            assert c.result("runtime.status")["actors"]
            b.close()
            c.close()

        await in_thread(client)


# ---------------------------------------------------------------------------- events
async def test_subscribe_replays_then_streams_live(tmp_path) -> None:
    async with running(tmp_path) as rt:
        head = rt.events.head_seq

        def subscribe() -> tuple[Client, str, list[dict[str, Any]]]:
            c = Client(control_url(rt))
            result = c.result("events.subscribe", {"since_seq": 0})
            assert result["head_seq"] == head
            replay = c.events_until_live(result["subscription"])
            return c, result["subscription"], replay

        c, sub, replay = await in_thread(subscribe)
        assert [m["params"]["seq"] for m in replay] == list(range(1, head + 1))
        first = replay[0]
        assert first["method"] == "events.event"
        assert set(first["params"]) >= {"seq", "ts", "actor", "kind", "from", "to", "attempt",
                                        "delay_s", "error", "subscription"}
        await emit_events(rt, 3)

        def live() -> list[int]:
            seqs = [c.notification()["params"]["seq"] for _ in range(3)]
            c.close()
            return seqs

        assert await in_thread(live) == [head + 1, head + 2, head + 3]


async def test_resume_after_reconnect_has_no_gap(tmp_path) -> None:
    async with running(tmp_path) as rt:
        await emit_events(rt, 5)
        await wait_head(rt, 5)

        def first_session() -> int:
            c = Client(control_url(rt))
            sub = c.result("events.subscribe", {"since_seq": 0})["subscription"]
            seqs = [m["params"]["seq"] for m in c.events_until_live(sub)]
            assert seqs == list(range(1, seqs[-1] + 1))
            c.close()
            return seqs[-1]

        last = await in_thread(first_session)
        await emit_events(rt, 7)  # published while nobody is connected
        await wait_head(rt, last + 7)

        def second_session() -> list[int]:
            c = Client(control_url(rt))
            sub = c.result("events.subscribe", {"since_seq": last})["subscription"]
            seqs = [m["params"]["seq"] for m in c.events_until_live(sub)]
            c.close()
            return seqs

        assert await in_thread(second_session) == list(range(last + 1, last + 8))


async def test_resume_from_older_than_the_memory_tail_reads_the_log(tmp_path) -> None:
    async with running(tmp_path) as rt:
        rt.supervisor.log._tail.clear()  # as if the events had left the in-memory tail
        head = rt.events.head_seq + 4
        await emit_events(rt, 4)
        await wait_head(rt, head)

        def client() -> list[int]:
            c = Client(control_url(rt))
            sub = c.result("events.subscribe", {"since_seq": 1})["subscription"]
            seqs = [m["params"]["seq"] for m in c.events_until_live(sub)]
            c.close()
            return seqs

        assert await in_thread(client) == list(range(2, head + 1))


async def test_subscription_filters_and_unsubscribe(tmp_path) -> None:
    async with running(tmp_path) as rt:
        await emit_events(rt, 2, actor="feed")

        def client() -> None:
            c = Client(control_url(rt))
            r = c.result("events.subscribe", {"since_seq": 0, "actors": ["cache"],
                                              "kinds": ["state_changed"]})
            events = c.events_until_live(r["subscription"])
            assert events and all(m["params"]["actor"] == "cache" and
                                  m["params"]["kind"] == "state_changed" for m in events)
            err = c.error("events.unsubscribe", {"subscription": "s99"})
            assert err["code"] == -32602 and "s99" in err["message"]
            assert c.result("events.unsubscribe", {"subscription": r["subscription"]}) == {
                "ok": True}
            c.close()

        await in_thread(client)
        await trio.sleep(0.1)
        assert rt.events.subscriber_count == 0


async def test_a_stalled_subscriber_overflows_while_others_keep_receiving(tmp_path) -> None:
    async with running(tmp_path, runtime={"subscriber_buffer": 50}) as rt:
        def connect() -> tuple[Client, Client]:
            # The stalled client reads nothing after subscribing: a tiny receive window and
            # a one-message client queue make the server's sends block quickly.
            stalled = Client(control_url(rt), rcvbuf=4096, max_queue=1)
            stalled.send({"jsonrpc": "2.0", "id": 1, "method": "events.subscribe"})
            healthy = Client(control_url(rt))
            sub = healthy.result("events.subscribe")["subscription"]
            assert healthy.events_until_live(sub) == []
            return stalled, healthy

        stalled, healthy = await in_thread(connect)
        head = rt.events.head_seq
        count = 1000
        received: list[int] = []

        def healthy_receives_everything() -> None:
            for _ in range(count):
                message = healthy.notification()
                assert message["method"] == "events.event", message
                received.append(message["params"]["seq"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_thread, healthy_receives_everything)
            # A generous bound, only so a hang fails instead of blocking: speed is measured
            # in tests/perf, not asserted here.
            with trio.fail_after(60):
                # Paced so that a client that does read keeps up with its 50-event buffer.
                for _ in range(count // 25):
                    await emit_events(rt, 25, pad=4000)
                    await trio.sleep(0.02)
                await wait_head(rt, head + count)
        assert received == list(range(head + 1, head + count + 1))

        def stalled_is_told_what_it_missed() -> None:
            messages = []
            while True:
                try:
                    messages.append(stalled.recv(timeout=1.0))
                except TimeoutError:
                    break
            overflow = [m for m in messages if m.get("method") == "events.overflow"]
            assert len(overflow) == 1
            notice = overflow[0]["params"]
            delivered = [m["params"]["seq"] for m in messages
                         if m.get("method") == "events.event"]
            assert notice["missed"] > 0
            before = [s for s in delivered if s <= notice["resume_after_seq"]]
            assert before == list(range(head + 1, notice["resume_after_seq"] + 1))
            assert len(before) + notice["missed"] == count
            # ...and it can fetch the gap from the log.
            sub = stalled.result("events.subscribe",
                                 {"since_seq": notice["resume_after_seq"]})["subscription"]
            gap = [m["params"]["seq"] for m in stalled.events_until_live(sub, timeout=5)
                   if m["method"] == "events.event"]
            assert gap[:5] == list(range(notice["resume_after_seq"] + 1,
                                         notice["resume_after_seq"] + 6))
            stalled.close()
            healthy.close()

        await in_thread(stalled_is_told_what_it_missed)


async def test_a_client_that_stops_reading_is_closed(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(control_server, "SEND_STALL_TIMEOUT_S", 0.5)
    async with running(tmp_path) as rt:
        def connect() -> Client:
            stalled = Client(control_url(rt), rcvbuf=4096, max_queue=1)
            stalled.send({"jsonrpc": "2.0", "id": 1, "method": "events.subscribe"})
            time.sleep(0.1)
            return stalled

        stalled = await in_thread(connect)
        await emit_events(rt, 1000, pad=4000)
        await eventually(lambda: metrics_for(rt).control_slow_clients_closed > 0, 10)

        def others_are_fine() -> None:
            c = Client(control_url(rt))
            assert c.result("runtime.status")["actors"]
            c.close()

        await in_thread(others_are_fine)
        await eventually(lambda: metrics_for(rt).control_connections == 0)
        await in_thread(stalled.close)


async def test_shutdown_closes_clients_with_going_away_promptly(tmp_path) -> None:
    clients: list[Client] = []
    async with running(tmp_path) as rt:
        def connect() -> None:
            c = Client(control_url(rt), token=TOKEN)
            c.result("events.subscribe")
            assert c.result("runtime.shutdown") == {"ok": True}
            clients.append(c)

        await in_thread(connect)
        await rt.wait_shutdown()
        started = time.monotonic()
    assert time.monotonic() - started < 2.0
    assert await in_thread(clients[0].closed_code) == 1001


async def test_a_failing_connection_does_not_take_the_server_down(tmp_path, monkeypatch
                                                                  ) -> None:
    def broken_status() -> dict[str, Any]:
        raise RuntimeError("status is broken")

    async with running(tmp_path) as rt:
        monkeypatch.setattr(rt, "status", broken_status)

        def client() -> None:
            c = Client(control_url(rt))
            err = c.error("runtime.status")
            assert (err["code"], err["data"]["code"]) == (-32603, "INTERNAL")
            assert "runtime.status failed: status is broken" == err["message"]
            assert c.result("runtime.health")["status"] == "pass"
            c.close()

        await in_thread(client)


async def test_reads_from_a_non_loopback_client_need_the_token(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(control_server, "_is_loopback", lambda remote: False)
    async with running(tmp_path) as rt:  # open_reads is on, but only for loopback clients
        def client() -> None:
            c = Client(control_url(rt))
            err = c.error("runtime.status")
            assert err["code"] == -32001 and "loopback" in err["message"]
            assert c.result("auth", {"token": TOKEN}) == {"ok": True}
            assert c.result("runtime.status")["actors"]
            c.close()

        await in_thread(client)


def test_loopback_detection() -> None:
    from trio_websocket import Endpoint

    assert control_server._is_loopback(Endpoint("127.0.0.1", 1, False))
    assert control_server._is_loopback(Endpoint("::1", 1, False))
    assert control_server._is_loopback(Endpoint("::ffff:127.0.0.1", 1, False))
    assert not control_server._is_loopback(Endpoint("10.1.2.3", 1, False))
    assert not control_server._is_loopback("<unix socket>")


async def test_with_the_mt5_simulator(tmp_path) -> None:
    async with running(tmp_path, mt5={"enabled": True}) as rt:
        def client() -> None:
            reader = Client(control_url(rt))
            tick = reader.result("actor.call", {"actor": "mt5", "op": "symbol_info_tick",
                                                "args": {"symbol": "EURUSD"}})
            assert tick["status"] == "ok" and tick["data"]["bid"] > 0
            # A read is open on loopback; order_send and fault injection are not.
            err = reader.error("actor.call", {"actor": "mt5", "op": "order_send",
                                              "args": {"request": {}}})
            assert err["code"] == -32001
            assert reader.error("sim.inject", {"fault": "terminal_crash"})["code"] == -32001
            sub = reader.result("events.subscribe", {"actors": ["mt5"],
                                                     "kinds": ["state_changed"]})
            reader.events_until_live(sub["subscription"])

            operator = Client(control_url(rt), token=TOKEN)
            err = operator.error("sim.inject", {"fault": "bogus"})
            assert err["code"] == -32602 and "terminal_crash" in err["message"]
            assert operator.result("sim.inject", {"fault": "terminal_crash",
                                                  "duration_s": 0.3}) == {"ok": True}
            degraded = reader.result("actor.call", {"actor": "mt5", "op": "symbol_info_tick",
                                                    "args": {"symbol": "EURUSD"}})
            assert degraded["status"] == "degraded" and degraded["cached_at"]
            moves = [reader.notification()["params"] for _ in range(2)]
            assert [(m["from"], m["to"]) for m in moves] == [("CONNECTED", "RECONNECTING"),
                                                               ("RECONNECTING", "CONNECTED")]
            reader.close()
            operator.close()

        await in_thread(client)


# ---------------------------------------------------------------------------- hardening
async def test_the_reserved_slots_admit_only_a_valid_bearer_header(tmp_path) -> None:
    async with running(tmp_path, control={"max_connections": 2,
                                          "reserved_connections": 1}) as rt:
        def client() -> None:
            crowd = [Client(control_url(rt)) for _ in range(2)]
            with pytest.raises(InvalidStatus) as info:
                Client(control_url(rt))
            assert info.value.response.status_code == 503
            with pytest.raises(InvalidStatus) as info:  # a wrong token gets no slot either
                Client(control_url(rt), token="wrong")
            assert info.value.response.status_code == 401
            operator = Client(control_url(rt), token=TOKEN)  # the reserved slot
            assert operator.result("actor.restart", {"actor": "cache"}) == {"ok": True}
            with pytest.raises(InvalidStatus) as info:  # the reserve is bounded too
                Client(control_url(rt), token=TOKEN)
            assert info.value.response.status_code == 503
            for c in (*crowd, operator):
                c.close()

        await in_thread(client)


def bearer_subprotocols(token: str) -> list[str]:
    encoded = base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
    return [control_server.PAGE_SUBPROTOCOL, control_server.BEARER_SUBPROTOCOL + encoded]


async def test_a_browser_offers_the_token_as_a_subprotocol_and_gets_a_reserved_slot(
        tmp_path) -> None:
    """A browser cannot set an Authorization header on a WebSocket: the operator's page
    offers the token as a subprotocol, and gets the same reserved slots."""
    async with running(tmp_path, control={"max_connections": 1,
                                          "reserved_connections": 1}) as rt:
        def client() -> None:
            crowd = Client(control_url(rt))
            for offered in (bearer_subprotocols("wrong"),
                            [control_server.PAGE_SUBPROTOCOL, "mt5sup.bearer.%%%"]):
                with pytest.raises(InvalidStatus) as info:
                    Client(control_url(rt), subprotocols=offered)
                assert info.value.response.status_code == 401
            with pytest.raises(InvalidStatus) as info:  # no token: no slot
                Client(control_url(rt), subprotocols=[control_server.PAGE_SUBPROTOCOL])
            assert info.value.response.status_code == 503
            page = Client(control_url(rt), subprotocols=bearer_subprotocols(TOKEN))
            # The server answers with the page's protocol, never echoing the token.
            assert page.ws.subprotocol == control_server.PAGE_SUBPROTOCOL
            assert page.result("actor.restart", {"actor": "cache"}) == {"ok": True}
            for c in (crowd, page):
                c.close()

        await in_thread(client)


async def test_a_failed_auth_drops_the_privileges_of_a_bearer_header(tmp_path) -> None:
    async with running(tmp_path) as rt:
        def client() -> None:
            c = Client(control_url(rt), token=TOKEN)
            assert c.result("actor.restart", {"actor": "cache"}) == {"ok": True}
            assert c.error("auth", {"token": "wrong"})["code"] == -32001
            assert c.error("actor.restart", {"actor": "cache"})["code"] == -32001
            assert c.result("auth", {"token": TOKEN}) == {"ok": True}
            assert c.result("actor.restart", {"actor": "cache"}) == {"ok": True}
            c.close()

        await in_thread(client)


async def test_wrong_tokens_are_throttled_per_address_across_connections(
        tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(control_server, "AUTH_FAILURE_BURST", 3)
    monkeypatch.setattr(control_server, "AUTH_FAILURES_PER_S", 0.01)  # no refill in a test
    async with running(tmp_path, control={"auth_tarpit_s": 0.3}) as rt:
        def client() -> None:
            first, second = Client(control_url(rt)), Client(control_url(rt))
            assert first.error("auth", {"token": "a"})["code"] == -32001
            assert second.error("auth", {"token": "b"})["code"] == -32001
            assert first.error("auth", {"token": "c"})["code"] == -32001
            # Budget spent, on every connection from this address: a wrong token is answered
            # only after the tarpit...
            started = time.monotonic()
            err = second.error("auth", {"token": "d"})
            assert err["code"] == -32002 and err["data"]["retry_after"] > 0
            assert time.monotonic() - started >= 0.3
            assert second.error("actor.restart", {"actor": "cache"})["code"] == -32001
            with pytest.raises(InvalidStatus) as info:
                Client(control_url(rt), token="e")
            assert info.value.response.status_code == 429
            assert int(info.value.response.headers["Retry-After"]) >= 1
            # ...but the right one still gets in at once: guessers on the same machine
            # never lock the operator out.
            assert first.result("auth", {"token": TOKEN}) == {"ok": True}
            operator = Client(control_url(rt), token=TOKEN)
            assert operator.result("actor.restart", {"actor": "cache"}) == {"ok": True}
            for c in (first, second, operator):
                c.close()

        await in_thread(client)
        metrics = metrics_for(rt)
        assert (metrics.control_auth_failures, metrics.control_auth_throttled) == (5, 2)


async def test_silent_and_idle_connections_are_closed_but_subscribers_are_not(
        tmp_path) -> None:
    async with running(tmp_path, control={"handshake_timeout_s": 0.3,
                                          "idle_timeout_s": 0.6}) as rt:
        def client() -> None:
            silent = Client(control_url(rt))
            operator = Client(control_url(rt), token=TOKEN)  # the token: no first-message limit
            subscriber = Client(control_url(rt))
            subscriber.result("events.subscribe", {})
            assert silent.closed_code() == 1000
            assert operator.closed_code() == 1000  # after idle_timeout_s
            time.sleep(0.6)  # the subscriber has now been silent longer than idle_timeout_s
            assert subscriber.result("runtime.status")["actors"]
            subscriber.close()

        await in_thread(client)
        assert metrics_for(rt).control_idle_closed == 2
