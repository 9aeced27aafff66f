"""A tiny driver for headless Chromium over the Chrome DevTools Protocol (CDP).

No Selenium, no Playwright: Chromium is started with ``--remote-debugging-port=0`` and
prints the browser's DevTools WebSocket URL on stderr; one blocking ``websockets`` client
sends CDP commands to a page target over that socket (``Target.attachToTarget`` with
``flatten``: one connection, commands tagged with the page's session id).

Every wait has a deadline; ``close()`` ends the browser process (and its children: Chromium
runs a process per renderer) and removes its profile directory.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--mute-audio",
    "--window-size=1400,1000",
)
DEVTOOLS_LINE = re.compile(r"DevTools listening on (ws://\S+)")
START_TIMEOUT_S = 30.0


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CdpError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page."""

    def __init__(self, executable: str) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="mt5sup-chromium-"))
        self.proc = subprocess.Popen(
            [executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)  # its own process group: close() ends every child
        self.stderr_lines: list[str] = []
        self._ids = itertools.count(1)
        self.console: list[str] = []  # the page's console messages and exceptions
        try:
            url = self._devtools_url()
            # Entered as a context manager (websockets >= 17.1 deprecates a bare connect()).
            self.ws: ClientConnection = connect(url, max_size=64 * 1024 * 1024,
                                                open_timeout=10, close_timeout=2).__enter__()
            target = self.command("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.command("Target.attachToTarget",
                                        {"targetId": target, "flatten": True})["sessionId"]
            self.command("Runtime.enable", session=True)
            self.command("Page.enable", session=True)
        except BaseException:
            self.close()
            raise

    def _devtools_url(self) -> str:
        """Read stderr (in a thread, so the wait has a deadline) until the DevTools line."""
        assert self.proc.stderr is not None
        found: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                self.stderr_lines.append(line)
                match = DEVTOOLS_LINE.search(line)
                if match and not found:
                    found.append(match.group(1))
                    ready.set()
            ready.set()  # EOF: the browser exited

        threading.Thread(target=read, daemon=True, name="chromium-stderr").start()
        if not ready.wait(START_TIMEOUT_S) or not found:
            raise CdpError("chromium did not report its DevTools URL; stderr:\n"
                           + "\n".join(self.stderr_lines[-20:]))
        return found[0]

    # ------------------------------------------------------------------ protocol
    def command(self, method: str, params: dict[str, Any] | None = None, *,
                session: bool = False, timeout: float = 30.0) -> dict[str, Any]:
        message: dict[str, Any] = {"id": next(self._ids), "method": method,
                                   "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CdpError(f"{method}: no answer within {timeout} s")
            reply = json.loads(self.ws.recv(timeout=remaining))
            if "id" not in reply:
                self._on_event(reply)
                continue
            if reply["id"] != message["id"]:
                continue
            if "error" in reply:
                raise CdpError(f"{method}: {reply['error']}")
            return reply["result"]

    def _on_event(self, event: dict[str, Any]) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in
                            params.get("args", []))
            self.console.append(f"console.{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.console.append("exception: " + str(
                details.get("exception", {}).get("description") or details.get("text")))

    # ------------------------------------------------------------------ page
    def open(self, url: str) -> None:
        self.command("Page.navigate", {"url": url}, session=True)
        self.wait_for("document.readyState === 'complete'", timeout=15)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (promises awaited)."""
        result = self.command("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True},
            session=True)
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float = 15.0, poll_s: float = 0.05
                 ) -> Any:
        """Poll until the expression is truthy; return its value."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{expression!r} not true within {timeout} s (last "
                                     f"{value!r}); page console: {self.console[-10:]}")
            time.sleep(poll_s)

    def screenshot(self, path: Path, *, size: tuple[int, int] | None = None,
                   scale: float = 1.0) -> Path:
        """A PNG of the viewport, or of its top-left ``size`` (CSS pixels) times ``scale``."""
        params: dict[str, Any] = {"format": "png"}
        if size is not None:
            params["clip"] = {"x": 0, "y": 0, "width": size[0], "height": size[1],
                              "scale": scale}
        data = self.command("Page.captureScreenshot", params, session=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        try:
            ws = getattr(self, "ws", None)
            if ws is not None:
                ws.close()
        finally:
            self._end_process_group()
            shutil.rmtree(self.profile, ignore_errors=True)

    def _end_process_group(self) -> None:
        """SIGTERM to the browser's own process group (renderers, GPU and zygote processes
        included), SIGKILL what is left after a grace period."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:
                time.sleep(0.2)  # children exit after the browser process

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
