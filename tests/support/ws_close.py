"""Waiting for a server to close a `websockets` sync connection (shared by the test clients)."""

from __future__ import annotations

import time
from typing import Any

from websockets.exceptions import ConnectionClosed


def close_code(ws: Any, timeout: float) -> int | None:
    """Read until the server closes the connection; return the close code it sent."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ws.recv(timeout=max(0.01, deadline - time.monotonic()))
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None
    except TimeoutError:
        pass
    raise AssertionError("the server did not close the connection")
