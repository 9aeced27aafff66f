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
* Bad input (malformed JSON, wrong envelope, unknown method, bad params, binary frames,
  lone surrogates) gets an error reply and the connection stays up.
* No crowd of sockets locks the operator out: the upgrade must finish within
  ``control.handshake_timeout_s``, a client without the token must send its first message
  within that too, and a connection with nothing to do (no request running, no
  subscription) is closed after ``control.idle_timeout_s``. ``control.max_connections``
  bounds the connections without a bearer header; a valid ``Authorization: Bearer`` header
  (or, from a browser, a ``mt5sup.bearer.<base64url token>`` subprotocol) may also use
  ``control.reserved_connections`` more.
* Token guessing is throttled per source address, across connections (``AuthThrottle``): a
  refused check is never evaluated, so the right token is no faster to find than a wrong one.
"""

from __future__ import annotations

import base64
import functools
import hmac
import ipaddress
import json
import logging
import math
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
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
from supervision.errors import describe
from supervision.events import Event
from supervision.shell.control.jsonrpc import (
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

if TYPE_CHECKING:
    from supervision.shell.surface import RuntimeSurface

log = logging.getLogger("mt5_supervisor.control")

# Limits that are not configuration keys (docs/protocol.md, "Limits"). Module attributes so
# tests can shorten them.
OUTGOING_QUEUE_SIZE = 256  # messages waiting for the writer, per connection
MAX_IN_FLIGHT = 32  # concurrent requests per connection
MAX_SUBSCRIPTIONS = 16  # per connection
REQUEST_TIMEOUT_S = 30.0  # deadline of every method but actor.call
CALL_GRACE_S = 2.0  # actor.call deadline = its timeout_s + this
SEND_STALL_TIMEOUT_S = 10.0  # one send blocked this long: the client is closed (1008)
CLOSE_TIMEOUT_S = 0.5  # flushing and the close handshake, when a connection ends
BATCH_MAX_EVENTS = 512  # events.batch: events per frame at most
BATCH_MAX_CHARS = 256 * 1024  # ... and about this much text (a quarter of the 1 MiB default
# client limit of common WebSocket libraries), so one frame never grows unbounded
MAX_AUTH_FAILURES = 5  # failed `auth` calls before the connection is closed (1008)
# Wrong tokens per source address (all connections, header or `auth`): a burst of this many,
# then one more every 1 / AUTH_FAILURES_PER_S seconds; past it, checks are refused unseen.
AUTH_FAILURE_BURST = 20
AUTH_FAILURES_PER_S = 1.0
AUTH_THROTTLE_SOURCES = 4096  # sources remembered; full buckets are forgotten first
# Past the budget a wrong token is answered only after control.auth_tarpit_s (the tarpit),
# with at most TARPIT_PER_SOURCE such answers pending per source: every token is still
# compared, so the operator's right one gets in at once, while a guesser's rate is capped
# near TARPIT_PER_SOURCE / auth_tarpit_s per source however many connections it opens.
TARPIT_PER_SOURCE = 16

# The operator's page offers both; the server answers with the first, never the second.
PAGE_SUBPROTOCOL = "mt5sup.v1"
BEARER_SUBPROTOCOL = "mt5sup.bearer."  # + base64url(token), no padding
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

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = now

    def take(self, now: float) -> bool:
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def retry_after(self) -> float:
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate


class AuthThrottle:
    """Failed-token budget per source address, shared by every connection from it.

    A token is always compared (a right one is never refused: the operator shares the
    loopback "source" with every local process). When the source's bucket is empty, a
    wrong token's answer is held back (``ControlServer.tarpit``), which caps guessing
    without locking anybody out. Only failures spend the budget. Pure: the caller passes
    ``now``."""

    def __init__(self, burst: float | None = None, rate: float | None = None) -> None:
        self.burst = AUTH_FAILURE_BURST if burst is None else burst
        self.rate = AUTH_FAILURES_PER_S if rate is None else rate
        self._buckets: dict[str, TokenBucket] = {}

    def _bucket(self, source: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= AUTH_THROTTLE_SOURCES:
                self._forget_full(now)
            bucket = self._buckets[source] = TokenBucket(self.rate, self.burst, self.burst,
                                                         now)
        return bucket

    def _forget_full(self, now: float) -> None:
        for key, bucket in list(self._buckets.items()):
            bucket.refill(now)
            if bucket.tokens >= bucket.capacity:
                del self._buckets[key]
        if len(self._buckets) >= AUTH_THROTTLE_SOURCES:
            # All still charged: forget the one with the most budget left, never the
            # exhausted ones (else a guesser could reset its own by spraying sources).
            del self._buckets[max(self._buckets, key=lambda k: self._buckets[k].tokens)]

    def retry_after(self, source: str, now: float) -> float | None:
        """None when a token from ``source`` may be checked now, else seconds to wait."""
        bucket = self._buckets.get(source)
        if bucket is None:
            return None
        bucket.refill(now)
        return None if bucket.tokens >= 1.0 else bucket.retry_after()

    def failed(self, source: str, now: float) -> None:
        self._bucket(source, now).take(now)


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
    batch: bool = False  # events.batch notifications (opt-in) instead of events.event


async def serve_control(
    rt: RuntimeSurface,
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
            connect_timeout=cfg["handshake_timeout_s"],
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


def _source(remote: Endpoint | str) -> str:
    """Whom a failed token is charged to. Not the port, and not the exact address where one
    client can have many: every loopback address is one source (a local process may bind
    any of 127.0.0.0/8), and an IPv6 peer is its /64."""
    if not isinstance(remote, Endpoint):
        return str(remote)
    if _is_loopback(remote):
        return "loopback"
    address = remote.address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped if mapped is not None else address)


def _header(headers: list[tuple[bytes, bytes]], wanted: bytes) -> str | None:
    """A request header's value, or None when absent."""
    for name, value in headers:
        if name.lower() == wanted:
            return value.decode("latin-1").strip()
    return None


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The Authorization header's value, or None when absent."""
    return _header(headers, b"authorization")


def bearer_from_subprotocols(offered: Iterable[str]) -> str | None:
    """``Bearer <token>`` from a ``mt5sup.bearer.<base64url(token)>`` subprotocol, else None.

    Browsers cannot set an ``Authorization`` header on a WebSocket, so the operator's page
    offers its token this way (as Kubernetes' API server takes ``base64url.bearer...``):
    then it too may use the reserved connections when a crowd of sockets fills the rest.
    The token is base64url because a subprotocol must be an HTTP token (no spaces or
    separators). An entry that does not decode gives a bearer that fails the check."""
    for entry in offered:
        if entry.startswith(BEARER_SUBPROTOCOL):
            encoded = entry[len(BEARER_SUBPROTOCOL):]
            try:
                token = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_",
                                         validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
                token = ""
            # Never equal to a token, so refused and charged like any wrong one.
            return "Bearer " + (token.strip() or "\ufffd")
    return None


def origin_allowed(origin: str) -> bool:
    """May a browser page from ``origin`` open the control channel?

    Browsers send ``Origin`` on every WebSocket handshake and never enforce the same-origin
    policy on WebSockets, so without this check any web site open on the operator's machine
    could reach ws://127.0.0.1 as a loopback client. Pages served from this machine (the
    operator page on the health port) are allowed; other clients send no ``Origin``.
    """
    parts = urllib.parse.urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False  # "null" (a file:// page, a sandboxed frame) included
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def tokens_equal(expected: str, given: str) -> bool:
    # Constant time: the comparison must not tell an attacker how much of a guess matched.
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


class ControlServer:
    def __init__(self, rt: RuntimeSurface) -> None:
        from supervision.shell.httpserver import metrics_for

        self.rt = rt
        cfg = rt.config["control"]
        self.token = rt.config.token
        self.token_env: str = cfg["token_env"]
        self.open_reads: bool = cfg["open_reads"]
        self.max_connections: int = cfg["max_connections"]
        self.reserved_connections: int = cfg["reserved_connections"]
        self.handshake_timeout_s: float = cfg["handshake_timeout_s"]
        self.idle_timeout_s: float = cfg["idle_timeout_s"]
        self.auth_throttle = AuthThrottle()
        self._tarpits: dict[str, trio.Semaphore] = {}
        self.tarpit_s: float = cfg["auth_tarpit_s"]
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
        source = _source(request.remote)
        origin = _header(request.headers, b"origin")
        if origin is not None and not origin_allowed(origin):
            self.metrics.control_rejected += 1
            await request.reject(403, body=(
                f"cross-origin WebSocket refused: pages from {origin[:200]!r} may not use the "
                "control channel (only pages served from this machine)\n").encode())
            return
        header = _bearer(request.headers) or bearer_from_subprotocols(
            request.proposed_subprotocols)
        # Token check and slot reservation happen before any checkpoint: concurrent
        # handshakes cannot overshoot the limit.
        refusal = await self._check_header(header, source) if header is not None else None
        authenticated = header is not None and refusal is None
        limit = self.max_connections + (self.reserved_connections if authenticated else 0)
        if refusal is None and self.connections >= limit:
            refusal = (503, [], "too many connections" + (
                "" if authenticated else "; an operator with the token still gets in with "
                                         "'Authorization: Bearer <token>' (a browser: the "
                                         "mt5sup.bearer.<base64url token> subprotocol)"))
        if refusal is not None:
            status, headers, text = refusal
            self.metrics.control_rejected += 1
            await request.reject(status, extra_headers=headers, body=text.encode() + b"\n")
            return
        self.connections += 1
        self.metrics.control_connections = self.connections
        try:
            # A browser fails a handshake that offered subprotocols and got none back; the
            # bearer entry itself is never echoed.
            ws = await request.accept(subprotocol=PAGE_SUBPROTOCOL if PAGE_SUBPROTOCOL in
                                      request.proposed_subprotocols else None)
            self.metrics.control_connections_total += 1
            conn = Connection(self, ws, loopback=_is_loopback(request.remote),
                              authenticated=authenticated, source=source)
            await conn.run()
        finally:
            self.connections -= 1
            self.metrics.control_connections = self.connections

    async def _check_header(self, header: str, source: str
                            ) -> tuple[int, list[tuple[bytes, bytes]], str] | None:
        """None when the header carries the token, else (status, headers, body)."""
        challenge = [(b"WWW-Authenticate", b'Bearer realm="control"')]
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return 401, challenge, ("unsupported Authorization header: use "
                                    "'Authorization: Bearer <token>'")
        if self.token is None:
            return 401, challenge, (f"no token is configured on this server (environment "
                                    f"variable {self.token_env})")
        if tokens_equal(self.token, value.strip()):
            return None
        retry = await self.wrong_token(source, limit_s=self.handshake_timeout_s)
        if retry is not None:
            seconds = str(max(1, math.ceil(retry))).encode()
            return 429, [(b"Retry-After", seconds)], (
                f"invalid bearer token; too many wrong tokens from this address: answers "
                f"are slowed down (retry in {retry:.1f} s)")
        return 401, challenge, "invalid bearer token"

    async def wrong_token(self, source: str, *, limit_s: float) -> float | None:
        """A wrong token from ``source``: charge it, and when the source is past its budget
        hold the answer back (``auth_tarpit_s``, at most ``TARPIT_PER_SOURCE`` pending per
        source, never longer than ``limit_s``). Returns the source's retry-after when it
        was over budget, else None."""
        now = trio.current_time()
        retry = self.auth_throttle.retry_after(source, now)
        self.metrics.control_auth_failures += 1
        self.auth_throttle.failed(source, now)
        if retry is None:
            return None
        self.metrics.control_auth_throttled += 1
        pit = self._tarpits.get(source)
        if pit is None:
            pit = self._tarpits[source] = trio.Semaphore(TARPIT_PER_SOURCE)
        with trio.move_on_after(limit_s):
            async with pit:
                await trio.sleep(self.tarpit_s)
        if pit.value == TARPIT_PER_SOURCE and not pit.statistics().tasks_waiting:
            self._tarpits.pop(source, None)  # idle: no memory kept per source
        return retry


class Connection:
    def __init__(self, server: ControlServer, ws: WebSocketConnection, *, loopback: bool,
                 authenticated: bool, source: str) -> None:
        self.server = server
        self.rt = server.rt
        self.ws = ws
        self.loopback = loopback
        self.authenticated = authenticated
        self.source = source
        self._messages_seen = 0
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
            idle_limit = self._idle_limit()
            with trio.move_on_after(idle_limit) as idle:
                try:
                    message = await self.ws.get_message()
                except ConnectionClosed as exc:
                    reason = exc.reason
                    if reason is not None and reason.code == CLOSE_TOO_BIG:
                        self.server.metrics.control_oversized += 1
                        log.warning("control: closed a client for an oversized message (%s)",
                                    reason.reason)
                    return
            if idle.cancelled_caught:
                if self._subs or self._in_flight:
                    continue  # waiting for replies or receiving events is not idling
                self.server.metrics.control_idle_closed += 1
                self._close = _Close(CLOSE_NORMAL, f"idle for {idle_limit:g} s")
                return
            self._messages_seen += 1
            await self._on_message(message)

    def _idle_limit(self) -> float:
        """How long the client may stay silent: a client without the token must speak
        within the handshake timeout; after that, anyone may idle ``idle_timeout_s``."""
        if self._messages_seen == 0 and not self.authenticated:
            return self.server.handshake_timeout_s
        return self.server.idle_timeout_s

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
        """``actor.call`` is a read when the actor declares the operation a read with a fixed
        shape (``OpSpec.read``: symbol_info_tick, account_info, cache get, ...); reads are
        open on loopback (DESIGN section 6). Anything else needs the token: order_send,
        cache put, and free-form SQL of every kind (questdb fetch included, which then runs
        under the least-privilege query role). Unknown actors and ops run nothing: they are
        answered with INVALID_REQUEST either way."""
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
        # Whatever happens below, a failed auth leaves the connection unauthenticated: a
        # wrong re-auth must not keep the privileges of an earlier good one.
        self.authenticated = False
        if token is None:
            raise RpcError(UNAUTHORIZED, f"no token is configured on this server (set the "
                                         f"environment variable {self.server.token_env})")
        if tokens_equal(token, params["token"]):  # always compared: never locked out
            self.authenticated = True
            return {"ok": True}
        self._auth_failures += 1
        if self._auth_failures >= MAX_AUTH_FAILURES:
            self._close_after_reply = _Close(CLOSE_POLICY, "too many failed auth attempts")
        retry = await self.server.wrong_token(self.source, limit_s=4 * self.server.tarpit_s)
        if retry is not None:
            raise RpcError(RATE_LIMITED, "invalid token; too many wrong tokens from this "
                                         f"address: answers are slowed down (retry in "
                                         f"{retry:.1f} s)", data={"retry_after": round(retry, 3)})
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
        forwarding = _Forwarding(sub, trio.CancelScope(), batch=bool(params["batch"]))
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
                if isinstance(item, Event) and forwarding.batch:
                    # Everything already buffered goes out in one frame: under load, the
                    # per-message cost (queue, writer turn, frame, client parse) is paid once
                    # for many events.
                    lines, item = _take_batch(sub, item)
                    await self._send(_batch_notification(lines, sub_json))
                    if item is None:
                        continue
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


def _take_batch(sub: Subscription, first: Event) -> tuple[list[str], Missed | None]:
    """The JSON lines of ``first`` and of the events buffered behind it, up to the batch
    limits; and a ``Missed`` notice met on the way (it goes out after the batch, in order)."""
    lines = [first.to_line()]
    size = len(lines[0])
    while len(lines) < BATCH_MAX_EVENTS and size < BATCH_MAX_CHARS:
        item = sub.get_nowait()
        if not isinstance(item, Event):
            return lines, item
        line = item.to_line()
        lines.append(line)
        size += len(line)
    return lines, None


def _batch_notification(lines: list[str], sub_json: str) -> str:
    """``events.batch``: ``{subscription, events: [...]}``, the events' JSON text (encoded
    once per event, shared by every subscriber and the log) joined, not re-encoded."""
    return ('{"jsonrpc":"2.0","method":"events.batch","params":{"subscription":' + sub_json
            + ',"events":[' + ",".join(lines) + "]}}")


def _event_notification(event: Event, sub_json: str) -> str:
    """``events.event`` with the event's params plus ``subscription``, spliced onto the
    event's JSON text, which is encoded once for every subscriber (and the log)."""
    line = event.to_line()  # '{...}': add the subscription before the closing brace
    return ('{"jsonrpc":"2.0","method":"events.event","params":'
            + line[:-1] + ',"subscription":' + sub_json + "}}")
