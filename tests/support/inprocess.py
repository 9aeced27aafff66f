"""Helpers for the control-channel, health and CLI tests: an in-process runtime with real
sockets, and a blocking WebSocket client (``websockets.sync``) to drive it from a thread."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, TypeVar

import trio
import websockets.sync.client as ws_client

from supervision.messages import Notice
from supervision.shell.config import RuntimeConfig
from supervision.shell.runtime import Runtime, open_runtime
from supervision.supervisor import ChildSpec
from tests.support.jsonrpc_client import JsonRpcClient
from tests.support.waiting import eventually

TOKEN = "test-token-6f1c"
T = TypeVar("T")


def runtime_config(tmp_path: Path, *, token: str | None = TOKEN,
                   **sections: dict[str, Any]) -> RuntimeConfig:
    raw: dict[str, dict[str, Any]] = {
        "runtime": {"state_dir": str(tmp_path / "var"), "fsync": "never"},
        "mt5": {"enabled": False},
        "questdb": {"enabled": False},
        "control": {"port": 0},
        "health": {"port": 0},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    env = {"MT5SUP_TOKEN": token} if token is not None else {}
    return RuntimeConfig.from_mapping(raw, source="test", env=env)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, *, token: str | None = TOKEN,
                  children: Iterable[ChildSpec] = (), **sections: dict[str, Any]
                  ) -> AsyncIterator[Runtime]:
    config = runtime_config(tmp_path, token=token, **sections)
    async with open_runtime(config, children=children) as rt:
        yield rt


def control_url(rt: Runtime) -> str:
    host, port = rt.endpoints["control"]
    return f"ws://{host}:{port}/"


def health_base(rt: Runtime) -> str:
    host, port = rt.endpoints["health"]
    return f"http://{host}:{port}"


async def emit_events(rt: Runtime, count: int, *, actor: str = "test", pad: int = 0) -> None:
    """Publish ``count`` synthetic events (an actor name the supervisor does not own)."""
    for i in range(count):
        data: dict[str, Any] = {"i": i}
        if pad:
            data["pad"] = "x" * pad
        await rt.supervisor.emit(Notice(actor, "probe_failed", trio.current_time(), data=data))


async def wait_head(rt: Runtime, seq: int) -> None:
    await eventually(lambda: rt.events.head_seq >= seq)


class Client(JsonRpcClient):
    """A blocking JSON-RPC client; every method runs in a worker thread (``in_thread``).
    5 s waits; replies to other requests are passed over (tests pipeline requests)."""

    timeout_s = 5.0
    strict_ids = False

    def __init__(self, url: str, *, token: str | None = None, rcvbuf: int | None = None,
                 max_queue: int | None = 16, subprotocols: list[str] | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        sock = None
        if rcvbuf is not None:  # a tiny receive window makes a non-reading client stall fast
            host, port = url.removeprefix("ws://").rstrip("/").rsplit(":", 1)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.connect((host, int(port)))
        self._cm = ws_client.connect(url, additional_headers=headers, sock=sock,
                                     subprotocols=subprotocols,  # type: ignore[arg-type]
                                     max_queue=max_queue, open_timeout=5, close_timeout=0.5,
                                     max_size=16 * 1024 * 1024)
        super().__init__(self._cm.__enter__())

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    def events_until_live(self, subscription: str, timeout: float = 5.0
                          ) -> list[dict[str, Any]]:
        """Notifications of one subscription up to its ``events.live`` marker."""
        seen = []
        while True:
            message = self.notification(timeout)
            if message["params"].get("subscription") != subscription:
                continue
            if message["method"] == "events.live":
                return seen
            seen.append(message)

