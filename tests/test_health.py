"""The health document and its status rule; /health and /metrics over real HTTP.

Document tests run the runtime on trio's virtual clock (servers off) with scriptable actors
standing in for ``mt5``, ``questdb`` and a bot's ``feed``; the HTTP tests use real sockets.
"""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest

from supervision.breaker import BreakerConfig
from supervision.settings import ActorSettings
from supervision.shell.health import overall_status
from supervision.states import ConnectionState
from supervision.supervisor import ChildSpec
from tests.support.actors import FlakyActor, FlakyResource
from tests.support.inprocess import TOKEN, Client, control_url, running
from tests.support.waiting import eventually, in_thread

SERVERS_OFF: dict[str, Any] = {"control": {"enabled": False}, "health": {"enabled": False}}


def child(name: str, resource: FlakyResource, **settings: Any) -> ChildSpec:
    return ChildSpec(name, lambda: FlakyActor(resource), settings=ActorSettings(**settings))


async def wait_state(rt: Any, name: str, state: ConnectionState, within_s: float = 120
                     ) -> None:
    await eventually(lambda: rt.state(name) is state, within_s)


@pytest.mark.parametrize(("states", "checks", "expected"), [
    ({"mt5": "CONNECTED", "questdb": "CONNECTED"}, ["pass", "pass"], "pass"),
    ({"mt5": "RECONNECTING", "questdb": "CONNECTED"}, ["warn", "pass"], "warn"),
    ({"mt5": "ERROR", "questdb": "CONNECTED"}, ["fail", "pass"], "warn"),  # DESIGN 7
    ({"mt5": "CONNECTED", "questdb": "ERROR"}, ["pass", "fail"], "warn"),
    ({"mt5": "ERROR", "questdb": "ERROR"}, ["fail", "fail"], "fail"),
    ({"mt5": "ERROR", "cache": "CONNECTED"}, ["fail", "pass"], "fail"),
    ({"mt5": "CONNECTED", "feed": "ERROR"}, ["pass", "fail"], "warn"),
    ({"mt5": "DISCONNECTED"}, ["warn"], "warn"),
    ({"mt5": "CONNECTED", "questdb": "CONNECTED"}, ["pass", "warn"], "warn"),  # a breaker
    ({"cache": "CONNECTED"}, ["pass"], "pass"),
])
def test_overall_status_rule(states: dict[str, str], checks: list[str], expected: str) -> None:
    assert overall_status(states, checks) == expected


async def test_document_shape_when_everything_is_connected(tmp_path, autojump_clock) -> None:
    mt5, db = FlakyResource(), FlakyResource()
    children = [child("mt5", mt5), child("questdb", db, breaker=BreakerConfig(threshold=5))]
    async with running(tmp_path, children=children, **SERVERS_OFF) as rt:
        await rt.cache.put("k", 1)
        status, doc = rt.health()
        assert status == 200
        assert doc["status"] == "pass"
        assert "output" not in doc
        assert doc["serviceId"] == "mt5-supervisor" and doc["releaseId"]
        assert list(doc["checks"]) == ["cache:entries", "mt5:connection", "questdb:connection",
                                       "questdb:circuit", "eventlog:writable"]
        [mt5_check] = doc["checks"]["mt5:connection"]
        assert mt5_check["componentId"] == "mt5"
        assert mt5_check["componentType"] == "component"
        assert mt5_check["status"] == "pass"
        assert mt5_check["observedValue"] == "CONNECTED"
        assert mt5_check["time"].endswith("Z")
        assert mt5_check["affectedEndpoints"] == []
        assert "output" not in mt5_check
        [cache_check] = doc["checks"]["cache:entries"]
        assert (cache_check["observedValue"], cache_check["observedUnit"]) == (1, "entries")
        assert cache_check["componentType"] == "datastore"
        assert cache_check["state"] == "CONNECTED"
        [circuit] = doc["checks"]["questdb:circuit"]
        assert (circuit["status"], circuit["observedValue"]) == ("pass", "CLOSED")
        json.dumps(doc)  # serialisable as is


async def test_reconnecting_warns_and_one_essential_error_still_warns(tmp_path, autojump_clock
                                                                      ) -> None:
    mt5, db = FlakyResource(), FlakyResource()
    async with running(tmp_path, children=[child("mt5", mt5), child("questdb", db)],
                       **SERVERS_OFF) as rt:
        mt5.up = False
        await rt.mt5.call("read")  # the call notices the terminal is gone
        await wait_state(rt, "mt5", ConnectionState.RECONNECTING)
        status, doc = rt.health()
        assert (status, doc["status"]) == (200, "warn")
        [check] = doc["checks"]["mt5:connection"]
        assert (check["status"], check["observedValue"]) == ("warn", "RECONNECTING")
        assert check["output"].startswith("DB_UNAVAILABLE: ")
        assert "mt5 is RECONNECTING" in doc["output"]

        await wait_state(rt, "mt5", ConnectionState.ERROR)  # 1 + 2 + 4 s of virtual time
        status, doc = rt.health()
        assert (status, doc["status"]) == (200, "warn")  # questdb still serves
        [check] = doc["checks"]["mt5:connection"]
        assert (check["status"], check["observedValue"]) == ("fail", "ERROR")
        assert check["output"] == "DB_UNAVAILABLE: reconnect failed: connection refused"
        assert check["nextRetryAt"].endswith("Z")
        assert doc["checks"]["questdb:connection"][0]["status"] == "pass"

        mt5.up = True  # the next ERROR probe (30 s) recovers it
        await wait_state(rt, "mt5", ConnectionState.CONNECTED)
        assert rt.health()[1]["status"] == "pass"


async def test_a_non_essential_actor_in_error_only_warns(tmp_path, autojump_clock) -> None:
    feed = FlakyResource(up=False)
    async with running(tmp_path, children=[child("feed", feed)], **SERVERS_OFF) as rt:
        await wait_state(rt, "feed", ConnectionState.ERROR)
        status, doc = rt.health()
        assert (status, doc["status"]) == (200, "warn")
        assert doc["checks"]["feed:connection"][0]["status"] == "fail"


async def test_an_open_breaker_warns(tmp_path, autojump_clock) -> None:
    feed = FlakyResource()
    spec = child("feed", feed, breaker=BreakerConfig(threshold=1, open_s=1000.0),
                 max_attempts=100, backoff_base_s=5.0, backoff_factor=1.0)
    async with running(tmp_path, children=[spec], **SERVERS_OFF) as rt:
        feed.up = False
        await rt.ref("feed").call("read")
        await eventually(lambda: rt.supervisor.children["feed"].view.breaker == "OPEN", 60)
        status, doc = rt.health()
        [circuit] = doc["checks"]["feed:circuit"]
        assert (circuit["status"], circuit["observedValue"]) == ("warn", "OPEN")
        assert "fail fast" in circuit["output"]
        assert (status, doc["status"]) == (200, "warn")


# ---------------------------------------------------------------------------- over HTTP
def _get(base: str, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, \
            response.read()
    finally:
        conn.close()


def _base(rt: Any) -> str:
    host, port = rt.endpoints["health"]
    return f"http://{host}:{port}"


@pytest.mark.realserver
async def test_health_and_metrics_over_http(tmp_path) -> None:
    async with running(tmp_path) as rt:
        base = _base(rt)

        def client() -> None:
            status, headers, body = _get(base, "/health")
            assert status == 200
            assert headers["content-type"] == "application/health+json"
            doc = json.loads(body)
            assert doc["status"] == "pass" and "cache:entries" in doc["checks"]

            c = Client(control_url(rt), token=TOKEN)
            c.result("actor.call", {"actor": "cache", "op": "put",
                                    "args": {"key": "k", "value": 1}})
            c.close()

            status, headers, body = _get(base, "/metrics")
            assert status == 200
            assert headers["content-type"].startswith("text/plain")
            text = body.decode()
            for line in (
                'mt5sup_actor_state{actor="cache",state="CONNECTED"} 1.0',
                'mt5sup_actor_state{actor="cache",state="ERROR"} 0.0',
                'mt5sup_actor_up{actor="cache"} 1.0',
                'mt5sup_actor_restarts_total{actor="cache"} 0.0',
                'mt5sup_actor_waiting_calls{actor="cache"} 0.0',
                'mt5sup_degraded_served_total{actor="cache"} 0.0',
                "mt5sup_cache_entries 1.0",
                "mt5sup_control_accepted_connections_total 1.0",
                'mt5sup_call_duration_seconds_count{actor="cache",status="ok"} 1.0',
            ):
                assert line in text, line
            assert "mt5sup_events_total " in text and "mt5sup_event_head_seq " in text

            assert _get(base, "/nope")[0] == 404
            status, headers, _ = _get(base, "/health", method="POST")
            assert status == 405 and headers["allow"] == "GET, HEAD"
            status, headers, body = _get(base, "/health", method="HEAD")
            assert status == 200 and body == b""

        await in_thread(client)


@pytest.mark.realserver
async def test_health_is_503_when_every_essential_actor_is_in_error(tmp_path) -> None:
    mt5 = FlakyResource(up=False)
    spec = child("mt5", mt5, backoff_base_s=0.01, max_attempts=1, breaker=BreakerConfig(
        threshold=1, open_s=600.0))
    async with running(tmp_path, children=[spec]) as rt:
        await wait_state(rt, "mt5", ConnectionState.ERROR, within_s=5)
        base = _base(rt)

        def client() -> None:
            status, _, body = _get(base, "/health")
            assert status == 503
            doc = json.loads(body)
            assert doc["status"] == "fail"
            assert doc["checks"]["mt5:connection"][0]["observedValue"] == "ERROR"
            metrics = _get(base, "/metrics")[2].decode()
            assert 'mt5sup_actor_state{actor="mt5",state="ERROR"} 1.0' in metrics
            assert 'mt5sup_breaker_state{actor="mt5",state="OPEN"} 1.0' in metrics

        await in_thread(client)
