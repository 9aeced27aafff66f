"""HTTP ``/health`` and ``/metrics`` (DESIGN.md section 7), served by Hypercorn's trio worker.

A tiny ASGI app, no framework: two GET routes. Both answers are built at request time from
state the runtime already holds (no I/O to the resources), so they answer even while every
resource is down.

Metrics are produced by a custom Prometheus ``Collector`` reading the supervisor at scrape
time, registered in a registry of its own per runtime (two runtimes in one process, as in
tests, never clash in the global registry). Call latency is recorded by the control
``ActorRef`` call, in-process or from the control channel, through the supervisor's
``call_observers`` hook (``RuntimeMetrics.observe_call``).
"""

from __future__ import annotations

import bisect
import functools
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

import attrs
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from supervision.shell import web
from supervision.shell.control.jsonrpc import dumps
from supervision.shell.health import CONTENT_TYPE as HEALTH_CONTENT_TYPE
from supervision.states import ConnectionState

if TYPE_CHECKING:
    from supervision.shell.surface import RuntimeSurface

log = logging.getLogger("mt5_supervisor.http")

PREFIX = "mt5sup"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BREAKER_STATES = ("CLOSED", "HALF_OPEN", "OPEN")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@attrs.define
class _Histogram:
    counts: list[int] = attrs.field(factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds


@attrs.define
class RuntimeMetrics:
    """Counters that are not part of the supervisor's state: the control channel's."""

    control_connections: int = 0
    control_connections_total: int = 0
    control_rejected: int = 0
    control_requests: int = 0
    control_errors: int = 0
    control_rate_limited: int = 0
    control_oversized: int = 0
    control_slow_clients_closed: int = 0
    control_idle_closed: int = 0
    control_auth_failures: int = 0
    control_auth_throttled: int = 0
    call_latency: dict[tuple[str, str], _Histogram] = attrs.field(factory=dict)

    def observe_call(self, actor: str, status: str, seconds: float) -> None:
        self.call_latency.setdefault((actor, status), _Histogram()).observe(seconds)


_METRICS: weakref.WeakKeyDictionary[Any, RuntimeMetrics] = weakref.WeakKeyDictionary()


def metrics_for(rt: RuntimeSurface) -> RuntimeMetrics:
    metrics = _METRICS.get(rt)
    if metrics is None:
        metrics = _METRICS[rt] = RuntimeMetrics()
        observe = metrics.observe_call
        rt.supervisor.call_observers.append(
            lambda actor, op, status, seconds: observe(actor, status, seconds))
    return metrics


class RuntimeCollector(Collector):
    """Reads the supervisor at scrape time (on the trio thread, no I/O)."""

    def __init__(self, rt: RuntimeSurface) -> None:
        self.rt = rt

    def collect(self) -> Iterator[Metric]:
        rt = self.rt
        sup = rt.supervisor
        state = GaugeMetricFamily(f"{PREFIX}_actor_state",
                                  "1 for the actor's current connection state, else 0",
                                  labels=["actor", "state"])
        up = GaugeMetricFamily(f"{PREFIX}_actor_up", "1 when the actor is CONNECTED",
                               labels=["actor"])
        restarts = CounterMetricFamily(f"{PREFIX}_actor_restarts",
                                       "Reconnect attempts made for the actor",
                                       labels=["actor"])
        attempt = GaugeMetricFamily(f"{PREFIX}_actor_attempt",
                                    "Current reconnect attempt number (0 when connected)",
                                    labels=["actor"])
        waiting = GaugeMetricFamily(f"{PREFIX}_actor_waiting_calls",
                                    "Calls waiting for the actor to reconnect",
                                    labels=["actor"])
        degraded = CounterMetricFamily(f"{PREFIX}_degraded_served",
                                       "Answers served from the last-known-good cache",
                                       labels=["actor"])
        breaker = GaugeMetricFamily(f"{PREFIX}_breaker_state",
                                    "1 for the circuit breaker's current state, else 0",
                                    labels=["actor", "state"])
        for name, child in list(sup.children.items()):
            view = child.view
            for s in ConnectionState:
                state.add_metric([name, str(s)], 1.0 if view.state is s else 0.0)
            up.add_metric([name], 1.0 if view.state is ConnectionState.CONNECTED else 0.0)
            restarts.add_metric([name], float(child.cell.restarts))
            attempt.add_metric([name], float(view.attempt))
            waiting.add_metric([name], float(child.cell.waiting_calls))
            degraded.add_metric([name], float(view.degraded_served))
            if view.breaker is not None:
                for b in BREAKER_STATES:
                    breaker.add_metric([name, b], 1.0 if view.breaker == b else 0.0)
        yield from (state, up, restarts, attempt, waiting, degraded, breaker)
        yield from _actor_checks_and_figures(sup)

        yield CounterMetricFamily(f"{PREFIX}_events", "Supervision events published",
                                  value=float(sup.events_total))
        yield GaugeMetricFamily(f"{PREFIX}_event_head_seq", "seq of the last published event",
                                value=float(rt.events.head_seq))
        yield GaugeMetricFamily(f"{PREFIX}_event_subscribers", "Open event subscriptions",
                                value=float(rt.events.subscriber_count))
        yield GaugeMetricFamily(f"{PREFIX}_cache_entries", "Entries in the cache",
                                value=float(len(rt.store)))
        yield GaugeMetricFamily(f"{PREFIX}_uptime_seconds", "Seconds since the runtime started",
                                value=max(0.0, trio.current_time() - rt.started_at))

        m = metrics_for(rt)
        yield GaugeMetricFamily(f"{PREFIX}_control_open_connections",
                                "Open control-channel connections",
                                value=float(m.control_connections))
        for name, value, text in (
            ("control_accepted_connections", m.control_connections_total,
             "Accepted connections"),
            ("control_rejected_connections", m.control_rejected,
             "Handshakes refused (bad token, too many connections)"),
            ("control_messages", m.control_requests, "Messages received"),
            ("control_errors", m.control_errors, "Error replies sent"),
            ("control_rate_limited", m.control_rate_limited, "Requests refused by the rate "
                                                             "limit"),
            ("control_oversized", m.control_oversized, "Connections closed with 1009 for an "
                                                       "oversized message"),
            ("control_slow_clients_closed", m.control_slow_clients_closed,
             "Connections closed because the client stopped reading"),
            ("control_idle_closed", m.control_idle_closed,
             "Connections closed for idling (no request, no subscription)"),
            ("control_auth_failures", m.control_auth_failures,
             "Wrong tokens (handshake header or auth call)"),
            ("control_auth_throttled", m.control_auth_throttled,
             "Token checks refused because the source failed too often"),
        ):
            yield CounterMetricFamily(f"{PREFIX}_{name}", text, value=float(value))

        latency = HistogramMetricFamily(f"{PREFIX}_call_duration_seconds",
                                        "actor.call latency over the control channel",
                                        labels=["actor", "status"])
        for (actor, status), hist in sorted(m.call_latency.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), hist.counts,
                                    strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound),
                                float(cumulative)))
            latency.add_metric([actor, status], buckets, hist.total)
        yield latency


def _actor_checks_and_figures(sup: Any) -> Iterator[Metric]:
    """What actors report about themselves: their named checks (check_changed notices) and
    the numbers in their status_extra() (e.g. events_store's lag), generically."""
    checks = GaugeMetricFamily(f"{PREFIX}_actor_check",
                               "1 for the status of an actor's own check, else 0",
                               labels=["actor", "check", "status"])
    figures = GaugeMetricFamily(f"{PREFIX}_actor_figure",
                                "Numeric figures an actor reports in its status (extra)",
                                labels=["actor", "figure"])
    for name, child in list(sup.children.items()):
        for check, own in child.view.checks.items():
            for status in ("pass", "warn", "fail"):
                checks.add_metric([name, check, status],
                                  1.0 if own["status"] == status else 0.0)
        for key, value in child.actor.status_extra().items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                figures.add_metric([name, key], float(value))
    yield from (checks, figures)


def make_app(rt: RuntimeSurface) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI application: GET/HEAD /health, /metrics and the operator's page (``/``,
    its files and ``/ui/config.json``); 404 elsewhere; 405 otherwise."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector(rt))
    ProcessCollector(registry=registry)
    page_assets = web.load_assets()  # the operator's page (supervision/shell/web/), read once

    async def respond(send: Send, status: int, body: bytes, content_type: str,
                      head: bool = False, extra: list[tuple[bytes, bytes]] | None = None
                      ) -> None:
        headers = [(b"content-type", content_type.encode()),
                   (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"no-store"), *(extra or [])]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "websocket":
            # Refused before the upgrade with a plain HTTP answer (the ASGI denial-response
            # extension); returning without one makes Hypercorn answer 500.
            await receive()  # websocket.connect
            body = b"no WebSocket here: the control channel is a separate port\n"
            await send({"type": "websocket.http.response.start", "status": 400,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "websocket.http.response.body", "body": body})
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        text = "text/plain; charset=utf-8"
        if path not in ("/health", "/metrics", web.CONFIG_PATH, *page_assets):
            await respond(send, 404, b"not found: try /, /health or /metrics\n", text)
            return
        if method not in ("GET", "HEAD"):
            await respond(send, 405, b"method not allowed: use GET\n", text,
                          extra=[(b"allow", b"GET, HEAD")])
            return
        head = method == "HEAD"
        if path in page_assets:
            asset = page_assets[path]
            await respond(send, 200, asset.body, asset.content_type, head,
                          extra=web.security_headers(rt))
        elif path == web.CONFIG_PATH:
            await respond(send, 200, web.config_body(rt), "application/json", head)
        elif path == "/health":
            status, doc = rt.health()
            await respond(send, status, (dumps(doc) + "\n").encode(), HEALTH_CONTENT_TYPE,
                          head)
        else:
            await respond(send, 200, generate_latest(registry), CONTENT_TYPE_LATEST, head)

    return app


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_http(
    rt: RuntimeSurface,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /health and /metrics until cancelled or a shutdown is requested. Reports
    ``(host, port)`` once listening (the actual port when ``health.port`` is 0)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    cfg = rt.config["health"]
    config = Config()
    config.bind = [_bind(cfg["host"], cfg["port"])]
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = 1.0
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(functools.partial(
            # Our ASGI app is typed with plain mappings, Hypercorn's with its TypedDicts.
            serve, make_app(rt), config,  # type: ignore[arg-type]
            shutdown_trigger=rt.wait_shutdown))
        # "http://127.0.0.1:54321" or "http://[::1]:54321"
        port = int(binds[0].rsplit(":", 1)[1])
        log.info("health and metrics on http://%s/health", _bind(cfg["host"], port))
        task_status.started((cfg["host"], port))
