"""The operator's live page (DESIGN.md section 7, "The operator's view"): static files that
ship in the package, served by the health HTTP server at ``/``.

The page is a client of the control channel like any other: it learns where the channel
listens from ``/ui/config.json`` (the actual port, also when ``control.port`` is 0) and
speaks the same JSON-RPC methods with the same auth. The files are read once, when the HTTP
app is built, so serving them does no I/O.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from supervision.shell.surface import RuntimeSurface

CONFIG_PATH = "/ui/config.json"
_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


@attrs.frozen
class Asset:
    body: bytes
    content_type: str


def load_assets() -> dict[str, Asset]:
    """Every path the page is served under, with its bytes (read now, once)."""
    root = resources.files(__name__)
    cache: dict[str, bytes] = {}
    assets = {}
    for path, (name, content_type) in _FILES.items():
        if name not in cache:
            cache[name] = root.joinpath(name).read_bytes()
        assets[path] = Asset(cache[name], content_type)
    return assets


def page_config(rt: RuntimeSurface) -> dict[str, Any]:
    """What the page needs to find the control channel. A wildcard bind address tells the
    browser nothing, so the page then uses the host it loaded the page from."""
    endpoint = rt.endpoints.get("control")
    control = None
    if endpoint is not None:
        host, port = endpoint
        control = {"host": None if host in _WILDCARD_HOSTS else host, "port": port}
    return {"control": control, "health": "/health", "metrics": "/metrics"}


def config_body(rt: RuntimeSurface) -> bytes:
    return json.dumps(page_config(rt), separators=(",", ":")).encode()


def security_headers(rt: RuntimeSurface) -> list[tuple[bytes, bytes]]:
    """A strict Content-Security-Policy: no inline script, no other origin but the control
    channel's WebSocket. Defence in depth behind the page's own escaping (it never puts
    server-provided text into HTML)."""
    endpoint = rt.endpoints.get("control")
    connect = "'self'"
    if endpoint is not None:
        host, port = endpoint
        if host in _WILDCARD_HOSTS:
            connect += " ws:"
        else:
            shown = f"[{host}]" if ":" in host else host
            connect += f" ws://{shown}:{port}"
    policy = (f"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
              f"connect-src {connect}; base-uri 'none'; form-action 'none'; "
              f"frame-ancestors 'none'")
    return [(b"content-security-policy", policy.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer")]
