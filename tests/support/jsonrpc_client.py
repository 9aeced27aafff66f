"""The JSON-RPC 2.0 request/reply loop both blocking test clients share.

``tests.support.e2e.Rpc`` (against a runtime subprocess) and ``tests.support.inprocess.
Client`` (against an in-process runtime, from a worker thread) differ in how they connect
and in their defaults; asking and waiting for the answer is this one class.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Mapping
from typing import Any

from websockets.sync.client import ClientConnection

from tests.support.ws_close import close_code


class JsonRpcClient:
    """Requests over one ``websockets.sync`` connection. Notifications that arrive while a
    reply is awaited are kept in ``notifications``.

    ``timeout_s`` is every wait's default. ``strict_ids``: a reply to another request while
    waiting is a test failure (one request at a time); otherwise it is passed over (a test
    that pipelines requests reads those replies itself)."""

    timeout_s: float = 10.0
    strict_ids: bool = True

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._next_id = 0
        self.notifications: collections.deque[dict[str, Any]] = collections.deque()

    # ------------------------------------------------------------------ raw
    def send(self, message: Any) -> None:
        self.ws.send(message if isinstance(message, str | bytes) else json.dumps(message))

    def recv(self, timeout: float | None = None) -> dict[str, Any]:
        return json.loads(self.ws.recv(timeout=self.timeout_s if timeout is None else timeout))

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # ------------------------------------------------------------------ requests
    def reply_to(self, request_id: Any, timeout: float | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + (self.timeout_s if timeout is None else timeout)
        while True:
            message = self.recv(timeout=max(0.01, deadline - time.monotonic()))
            if "id" not in message:
                self.notifications.append(message)
                continue
            if message["id"] == request_id:
                return message
            if self.strict_ids:
                raise AssertionError(f"a reply to another request: {message} "
                                     f"(waiting for id {request_id!r})")

    def request(self, method: str, params: Mapping[str, Any] | None = None, *,
                timeout: float | None = None) -> dict[str, Any]:
        """Send one request; return its reply (result or error), keeping notifications."""
        request_id = self.next_id()
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = dict(params)
        self.send(message)
        return self.reply_to(request_id, timeout=timeout)

    def result(self, method: str, params: Mapping[str, Any] | None = None, *,
               timeout: float | None = None) -> Any:
        reply = self.request(method, params, timeout=timeout)
        assert "result" in reply, reply
        return reply["result"]

    def error(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        reply = self.request(method, params)
        assert "error" in reply, reply
        return reply["error"]

    # ------------------------------------------------------------------ notifications
    def notification(self, timeout: float | None = None) -> dict[str, Any]:
        if self.notifications:
            return self.notifications.popleft()
        while True:
            message = self.recv(timeout=timeout)
            if "id" not in message:
                return message

    def closed_code(self, timeout: float | None = None) -> int | None:
        """Read until the server closes the connection; return the close code it sent."""
        return close_code(self.ws, self.timeout_s if timeout is None else timeout)
