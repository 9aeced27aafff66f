"""The control channel server: JSON-RPC 2.0 over WebSocket (trio-websocket).

Task tree (every task has an owner; nothing outlives ``serve_control``):

    serve_control                       the runtime's "control" server scope
    └── trio-websocket server           accepts, runs the handshake, one handler per client
        └── Connection.run              one per client, its own nursery
            ├── reader (in run itself)  parse, rate-limit, authorize, spawn the request
            ├── writer                  the only task that sends; drains a bounded queue
            ├── request task            one per request, under its own deadline
            └── forwarder               one per subscription: bus -> queue

Why it is shaped like this:

* Nothing the supervisor does waits for a client. Events reach a connection through its
  bus ``Subscription`` (bounded, dropping, ``Missed`` notice); the forwarder moves them into
  the connection's bounded outgoing queue and blocks when it is full, so a client that does
  not read stops draining its own subscription buffer, which then overflows: the client is
  told (``events.overflow``) and may resume from the log. Other clients and the supervisor
  are untouched.
* A client that stops reading entirely is closed: a single send stuck for
  ``SEND_STALL_TIMEOUT_S`` closes that connection (1008) and frees its resources.
* Requests run in their own tasks, so a slow ``actor.call`` does not hold up the
  connection's other requests; at most ``MAX_IN_FLIGHT`` run at once per connection and each
  has a deadline.
* Oversized messages are refused by trio-websocket itself (``max_message_size``): it stops
  buffering the message and closes that connection with 1009 (Message Too Big). Only that
  connection is affected.
* Bad input (malformed JSON, wrong envelope, unknown method, bad params, binary frames) gets
  an error reply and the connection stays up.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    Endpoint,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from supervision.bus import Missed, Subscription, make_filter
from supervision.control.jsonrpc import (
    BUSY,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    RATE_LIMITED,
    REQUEST_TIMEOUT,
    UNAUTHORIZED,
    MethodSpec,
    Request,
    RpcError,
    error_message,
    lookup_method,
    notification_message,
    parse_request,
    result_message,
    validate_params,
)
from supervision.errors import describe
from supervision.events import Event

if TYPE_CHECKING:
    from supervision.runtime import Runtime

log = logging.getLogger("mt5_supervisor.control")

# Limits that are not configuration keys (docs/protocol.md, "Limits"). Module attributes so
# tests can shorten them.
OUTGOING_QUEUE_SIZE = 256  # messages waiting for the writer, per connection
MAX_IN_FLIGHT = 32  # concurrent requests per connection
MAX_SUBSCRIPTIONS = 16  # per connection
REQUEST_TIMEOUT_S = 30.0  # deadline of every method but actor.call
CALL_GRACE_S = 2.0  # actor.call deadline = its timeout_s + this
SEND_STALL_TIMEOUT_S = 10.0  # one send blocked this long: the client is closed (1008)
HANDSHAKE_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 0.5  # flushing and the close handshake, when a connection ends
MAX_AUTH_FAILURES = 5  # failed `auth` calls before the connection is closed (1008)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009


@attrs.define
class TokenBucket:
    """Per-connection request rate limit: ``rate`` per second, bursts up to ``capacity``.
    Pure: the caller passes ``now``."""

    rate: float
    capacity: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, now: float) -> TokenBucket:
        capacity = max(1.0, rate)  # one second's worth of burst
        return cls(rate, capacity, capacity, now)

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def retry_after(self) -> float:
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate


@attrs.frozen
class _Close:
    """Queued after the replies that must reach the client before it is closed."""

    code: int
    reason: str


@attrs.frozen
class _FollowUp:
    """A method result plus what to do once the reply is queued (start a forwarder: no
    event may overtake the ``events.subscribe`` reply)."""

    result: Any
    then: Callable[[], None]


@attrs.define
class _Forwarding:
    sub: Subscription
    scope: trio.CancelScope


async def serve_control(
    rt: Runtime,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control channel until cancelled. Reports ``(host, port)`` once listening
    (the actual port when ``control.port`` is 0)."""
    cfg = rt.config["control"]
    server = ControlServer(rt)
    async with trio.open_nursery() as nursery:
        ws_server = await nursery.start(functools.partial(
            serve_websocket, server.handle, cfg["host"], cfg["port"], None,
            max_message_size=cfg["max_message_bytes"],
            connect_timeout=HANDSHAKE_TIMEOUT_S,
            disconnect_timeout=CLOSE_TIMEOUT_S))
        endpoint = ws_server.listeners[0]
        port = endpoint.port if isinstance(endpoint, Endpoint) else cfg["port"]
        log.info("control channel listening on ws://%s:%d/", cfg["host"], port)
        task_status.started((cfg["host"], port))


def _is_loopback(remote: Endpoint | str) -> bool:
    if not isinstance(remote, Endpoint):
        return False
    address = remote.address
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The Authorization header's value, or None when absent."""
    for name, value in headers:
        if name.lower() == b"authorization":
            return value.decode("latin-1").strip()
    return None


def tokens_equal(expected: str, given: str) -> bool:
    # Constant time: the comparison must not tell an attacker how much of a guess matched.
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


class ControlServer:
    def __init__(self, rt: Runtime) -> None:
        from supervision.httpserver import metrics_for

        self.rt = rt
        cfg = rt.config["control"]
        self.token = rt.config.token
        self.token_env: str = cfg["token_env"]
        self.open_reads: bool = cfg["open_reads"]
        self.max_connections: int = cfg["max_connections"]
        self.requests_per_second: float = cfg["requests_per_second"]
        self.connections = 0
        self.metrics = metrics_for(rt)

    async def handle(self, request: WebSocketRequest) -> None:
        try:
            await self._handle(request)
        except ConnectionClosed:
            pass  # the client left during the handshake
        except Exception:
            # A bug in one connection must not take the server (and the runtime) down.
            log.exception("control: a connection failed")

    async def _handle(self, request: WebSocketRequest) -> None:
        # Check and reserve the slot before any checkpoint: concurrent handshakes cannot
        # overshoot the limit.
        if self.connections >= self.max_connections:
            self.metrics.control_rejected += 1
            await request.reject(503, body=b"too many connections\n")
            return
        self.connections += 1
        self.metrics.control_connections = self.connections
        try:
            authenticated = False
            header = _bearer(request.headers)
            if header is not None:
                problem = self._check_header(header)
                if problem is not None:
                    self.metrics.control_rejected += 1
                    await request.reject(
                        401, extra_headers=[(b"WWW-Authenticate", b'Bearer realm="control"')],
                        body=problem.encode() + b"\n")
                    return
                authenticated = True
            ws = await request.accept()
            self.metrics.control_connections_total += 1
            conn = Connection(self, ws, loopback=_is_loopback(request.remote),
                              authenticated=authenticated)
            await conn.run()
        finally:
            self.connections -= 1
            self.metrics.control_connections = self.connections

    def _check_header(self, header: str) -> str | None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return "unsupported Authorization header: use 'Authorization: Bearer <token>'"
        if self.token is None:
            return (f"no token is configured on this server (environment variable "
                    f"{self.token_env})")
        if not tokens_equal(self.token, value.strip()):
            return "invalid bearer token"
        return None


class Connection:
    def __init__(self, server: ControlServer, ws: WebSocketConnection, *, loopback: bool,
                 authenticated: bool) -> None:
        self.server = server
        self.rt = server.rt
        self.ws = ws
        self.loopback = loopback
        self.authenticated = authenticated
        self._out_send, self._out_recv = trio.open_memory_channel[str | _Close](
            OUTGOING_QUEUE_SIZE)
        rate = server.requests_per_second
        self._bucket = TokenBucket.full(rate, trio.current_time()) if rate > 0 else None
        self._in_flight = 0
        self._subs: dict[str, _Forwarding] = {}
        self._sub_counter = 0
        self._auth_failures = 0
        self._close_after_reply: _Close | None = None
        self._close = _Close(CLOSE_NORMAL, "")
        self._stalled = False
        self._nursery: trio.Nursery | None = None
        self._handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "auth": self._auth,
            "runtime.status": self._status,
            "runtime.health": self._health,
            "events.subscribe": self._subscribe,
            "events.unsubscribe": self._unsubscribe,
            "actor.call": self._call,
            "actor.restart": self._restart,
            "sim.inject": self._inject,
            "runtime.shutdown": self._shutdown,
        }

    @property
    def reads_open(self) -> bool:
        return self.server.open_reads and self.loopback

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                await self._reader()
                nursery.cancel_scope.cancel()
        finally:
            if trio.current_effective_deadline() == -math.inf:  # cancelled from outside
                self._close = _Close(CLOSE_GOING_AWAY, "the runtime is shutting down")
            bus = self.rt.events
            for forwarding in self._subs.values():
                bus.close_subscription(forwarding.sub)
            self._subs.clear()
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                await self._flush_and_close()

    async def _flush_and_close(self) -> None:
        try:
            if not self._stalled:  # replies already queued (e.g. runtime.shutdown's)
                while True:
                    try:
                        item = self._out_recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    if isinstance(item, _Close):
                        break
                    await self.ws.send_message(item)
        except ConnectionClosed:
            pass
        await self.ws.aclose(self._close.code, self._close.reason or None)

    def _end(self, close: _Close) -> None:
        self._close = close
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _writer(self) -> None:
        async for item in self._out_recv:
            if isinstance(item, _Close):
                self._end(item)
                return
            with trio.move_on_after(SEND_STALL_TIMEOUT_S) as scope:
                try:
                    await self.ws.send_message(item)
                except ConnectionClosed:
                    self._end(_Close(CLOSE_NORMAL, ""))
                    return
            if scope.cancelled_caught:
                self._stalled = True
                self.server.metrics.control_slow_clients_closed += 1
                log.warning("control: closing a client that read nothing for %.1f s",
                            SEND_STALL_TIMEOUT_S)
                self._end(_Close(CLOSE_POLICY, f"client too slow: a message waited more "
                                               f"than {SEND_STALL_TIMEOUT_S:g} s"))
                return

    async def _send(self, text: str) -> None:
        await self._out_send.send(text)

    async def _reply_error(self, request_id: Any, error: RpcError) -> None:
        self.server.metrics.control_errors += 1
        await self._send(error_message(request_id, error))

    # ------------------------------------------------------------------ reading
    async def _reader(self) -> None:
        while True:
            try:
                message = await self.ws.get_message()
            except ConnectionClosed as exc:
                reason = exc.reason
                if reason is not None and reason.code == CLOSE_TOO_BIG:
                    self.server.metrics.control_oversized += 1
                    log.warning("control: closed a client for an oversized message (%s)",
                                reason.reason)
                return
            await self._on_message(message)

    async def _on_message(self, message: str | bytes) -> None:
        self.server.metrics.control_requests += 1
        allowed = self._bucket is None or self._bucket.take(trio.current_time())
        if isinstance(message, bytes):
            await self._reply_error(None, RpcError(
                INVALID_REQUEST, "binary frames are not supported: send each JSON-RPC request "
                                 "as a text frame"))
            return
        try:
            request = parse_request(message)
        except RpcError as err:
            if allowed:
                await self._reply_error(err.request_id, err)
            else:
                await self._rate_limited(err.request_id)
            return
        if not allowed:
            if not request.is_notification:
                await self._rate_limited(request.id)
            return
        try:
            spec = lookup_method(request.method)
            params = validate_params(spec, request.params)
            self._authorize(spec, params)
            if self._in_flight >= MAX_IN_FLIGHT:
                raise RpcError(BUSY, f"{MAX_IN_FLIGHT} requests are already running on this "
                                     "connection; wait for replies")
        except RpcError as err:
            if not request.is_notification:
                await self._reply_error(request.id, err)
            return
        self._in_flight += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._run_request, request, spec, params)

    async def _rate_limited(self, request_id: Any) -> None:
        self.server.metrics.control_rate_limited += 1
        assert self._bucket is not None
        retry = round(self._bucket.retry_after(), 3)
        await self._reply_error(request_id, RpcError(
            RATE_LIMITED, f"rate limit: at most {self._bucket.rate:g} requests per second "
                          "per connection", data={"retry_after": retry}))

    def _authorize(self, spec: MethodSpec, params: dict[str, Any]) -> None:
        if spec.name == "auth":
            return
        if spec.mutating or (spec.name == "actor.call" and self._is_write_call(params)):
            if self.server.token is None:
                raise RpcError(UNAUTHORIZED, f"{spec.name} is refused: it needs the token and "
                                             f"none is configured (set the environment "
                                             f"variable {self.server.token_env})")
            if not self.authenticated:
                raise RpcError(UNAUTHORIZED, f"{spec.name} needs the token: send "
                                             "'Authorization: Bearer <token>' on the "
                                             "handshake or call auth first")
        elif not self.authenticated and not self.reads_open:
            raise RpcError(UNAUTHORIZED, "authenticate first: reads without the token are "
                                         "open only to loopback clients when "
                                         "control.open_reads is true")

    def _is_write_call(self, params: Mapping[str, Any]) -> bool:
        """``actor.call`` is a read when the actor declares the operation a read
        (``OpSpec.read``: symbol_info_tick, questdb fetch, cache get, ...); reads are open
        on loopback (DESIGN section 6). Anything else (order_send, execute, cache put) needs
        the token. The server does not parse a fetch's SQL: where an unauthenticated local
        client must not run arbitrary statements, set control.open_reads = false. Unknown
        actors and ops run nothing: they are answered with INVALID_REQUEST either way."""
        child = self.rt.supervisor.children.get(params["actor"])
        if child is None:
            return False
        op = child.actor.ops.get(params["op"])
        if op is None:
            return False
        return not op.read

    # ------------------------------------------------------------------ requests
    def _deadline(self, spec: MethodSpec, params: dict[str, Any]) -> float:
        if spec.name != "actor.call":
            return REQUEST_TIMEOUT_S
        timeout = params["timeout_s"]
        if timeout is None:
            child = self.rt.supervisor.children.get(params["actor"])
            timeout = child.spec.settings.call_timeout_s if child is not None else 10.0
        return timeout + CALL_GRACE_S

    async def _run_request(self, request: Request, spec: MethodSpec,
                           params: dict[str, Any]) -> None:
        try:
            deadline = self._deadline(spec, params)
            try:
                with trio.move_on_after(deadline) as scope:
                    outcome = await self._handlers[spec.name](params)
                if scope.cancelled_caught:
                    raise RpcError(REQUEST_TIMEOUT,
                                   f"{spec.name} did not finish within {deadline:g} s")
            except RpcError as err:
                if not request.is_notification:
                    await self._reply_error(request.id, err)
                return
            except Exception as exc:
                log.exception("control: %s failed", spec.name)
                if not request.is_notification:
                    await self._reply_error(request.id, RpcError(
                        INTERNAL_ERROR, f"{spec.name} failed: {describe(exc)}"))
                return
            follow_up = outcome if isinstance(outcome, _FollowUp) else None
            result = follow_up.result if follow_up is not None else outcome
            if not request.is_notification:
                await self._send(result_message(request.id, result))
            if follow_up is not None:
                follow_up.then()
        finally:
            self._in_flight -= 1
            if self._close_after_reply is not None:
                close, self._close_after_reply = self._close_after_reply, None
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                    await self._out_send.send(close)

    async def _auth(self, params: dict[str, Any]) -> Any:
        token = self.server.token
        if token is None:
            raise RpcError(UNAUTHORIZED, f"no token is configured on this server (set the "
                                         f"environment variable {self.server.token_env})")
        if tokens_equal(token, params["token"]):
            self.authenticated = True
            return {"ok": True}
        self._auth_failures += 1
        if self._auth_failures >= MAX_AUTH_FAILURES:
            self._close_after_reply = _Close(CLOSE_POLICY, "too many failed auth attempts")
        raise RpcError(UNAUTHORIZED, "invalid token")

    async def _status(self, params: dict[str, Any]) -> Any:
        return self.rt.status()

    async def _health(self, params: dict[str, Any]) -> Any:
        return self.rt.health()[1]

    async def _subscribe(self, params: dict[str, Any]) -> Any:
        if len(self._subs) >= MAX_SUBSCRIPTIONS:
            raise RpcError(BUSY, f"at most {MAX_SUBSCRIPTIONS} subscriptions per connection")
        bus = self.rt.events
        event_log = self.rt.supervisor.log
        event_filter = make_filter(params["actors"], params["kinds"])
        since = params["since_seq"]
        if since is not None and not event_log.tail_covers(since):
            sub = await bus.open_subscription_from_disk(since_seq=since,
                                                        event_filter=event_filter)
        else:
            sub = bus.open_subscription(since_seq=since, event_filter=event_filter)
        # Registered before the next checkpoint: the connection's cleanup always closes it.
        self._sub_counter += 1
        sub_id = f"s{self._sub_counter}"
        forwarding = _Forwarding(sub, trio.CancelScope())
        self._subs[sub_id] = forwarding

        def start_forwarding() -> None:
            if self._subs.get(sub_id) is forwarding:
                assert self._nursery is not None
                self._nursery.start_soon(self._forward, sub_id, forwarding)

        return _FollowUp({"subscription": sub_id, "head_seq": sub.head_seq}, start_forwarding)

    async def _forward(self, sub_id: str, forwarding: _Forwarding) -> None:
        """Move one subscription's events into the outgoing queue. Blocking here when the
        queue is full is what makes a slow client overflow its own subscription."""
        sub = forwarding.sub
        sub_json = json.dumps(sub_id)
        live_sent = False
        with forwarding.scope:
            while True:
                item = sub.get_nowait()
                if item is None:
                    if not live_sent:
                        # publish() offers every event to every subscription synchronously, so
                        # with the buffer empty, everything up to head_seq was delivered,
                        # filtered out or reported missed: the replay is over.
                        live_sent = True
                        await self._send(notification_message("events.live", {
                            "subscription": sub_id, "head_seq": self.rt.events.head_seq}))
                        continue
                    try:
                        item = await sub.get()
                    except trio.EndOfChannel:
                        await self._send(notification_message("events.closed", {
                            "subscription": sub_id, "reason": "the runtime is stopping"}))
                        return
                if isinstance(item, Missed):
                    await self._send(notification_message("events.overflow", {
                        "subscription": sub_id, "missed": item.count,
                        "resume_after_seq": item.after_seq}))
                else:
                    assert isinstance(item, Event)
                    await self._send(_event_notification(item, sub_json))

    async def _unsubscribe(self, params: dict[str, Any]) -> Any:
        sub_id = params["subscription"]
        forwarding = self._subs.pop(sub_id, None)
        if forwarding is None:
            raise RpcError(INVALID_PARAMS, f"events.unsubscribe: no subscription {sub_id!r} "
                                           "on this connection")
        forwarding.scope.cancel()
        self.rt.events.close_subscription(forwarding.sub)
        return {"ok": True}

    async def _call(self, params: dict[str, Any]) -> Any:
        actor, op = params["actor"], params["op"]
        response = await self.rt.call(actor, op, params["args"] or {},
                                      timeout_s=params["timeout_s"])
        return response.to_json()

    async def _restart(self, params: dict[str, Any]) -> Any:
        name = params["actor"]
        try:
            await self.rt.restart(name)
        except KeyError:
            names = ", ".join(self.rt.supervisor.children)
            raise RpcError(INVALID_PARAMS, f"actor.restart: no actor named {name!r}; actors: "
                                           f"{names}") from None
        return {"ok": True}

    async def _inject(self, params: dict[str, Any]) -> Any:
        extra = dict(params["params"] or {})
        clash = sorted({"fault", "actor", "duration_s"} & set(extra))
        if clash:
            raise RpcError(INVALID_PARAMS, f"sim.inject: {', '.join(clash)} must be given as "
                                           "top-level parameters, not inside params")
        kwargs: dict[str, Any] = {"duration_s": params["duration_s"], **extra}
        if params["actor"] is not None:
            kwargs["actor"] = params["actor"]
        try:
            await self.rt.inject(params["fault"], **kwargs)
        except (ValueError, TypeError) as exc:
            message = describe(exc)
            if not message.startswith("sim.inject"):
                message = f"sim.inject: {message}"
            raise RpcError(INVALID_PARAMS, message) from None
        return {"ok": True}

    async def _shutdown(self, params: dict[str, Any]) -> Any:
        log.warning("control: shutdown requested by a client")
        self.rt.request_shutdown()
        return {"ok": True}


def _event_notification(event: Event, sub_json: str) -> str:
    """``events.event`` with the event's params plus ``subscription``, spliced onto the
    event's JSON text, which is encoded once for every subscriber (and the log)."""
    line = event.to_line()  # '{...}': add the subscription before the closing brace
    return ('{"jsonrpc":"2.0","method":"events.event","params":'
            + line[:-1] + ',"subscription":' + sub_json + "}}")
