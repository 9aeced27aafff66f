"""End-to-end helpers: ``mt5-supervisor run`` as a real subprocess, driven only through its
public surfaces (WebSocket JSON-RPC and HTTP), as an operator or a tool would.

Nothing here imports the product (``supervision``, ``actors``): the clients are the
``websockets`` library (the server uses trio-websocket) and ``urllib`` (the server uses
Hypercorn), so the tests check the wire protocol, not a shared implementation.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from websockets.sync.client import connect

from tests.support.jsonrpc_client import JsonRpcClient

TOKEN = "e2e-token-b4f2c9"
# A non-default variable name: checks that control.token_env is honoured.
TOKEN_ENV = "MT5SUP_E2E_TOKEN"
READY_TIMEOUT_S = 60.0  # first start: initdb of the embedded PostgreSQL (about a second)
REPO_ROOT = Path(__file__).resolve().parents[2]  # tests/support/ -> the repository


def free_port() -> int:
    """A port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string for our values
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_text(sections: Mapping[str, Mapping[str, Any]]) -> str:
    lines = []
    for section, table in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
        lines.append("")
    return "\n".join(lines)


def base_sections(state_dir: Path, control_port: int, health_port: int
                  ) -> dict[str, dict[str, Any]]:
    """Short timings so a whole crash/backoff/escalation/recovery cycle takes seconds."""
    return {
        "runtime": {"state_dir": str(state_dir), "fsync": "batch"},
        "control": {"host": "127.0.0.1", "port": control_port, "token_env": TOKEN_ENV,
                    "max_message_bytes": 65536, "requests_per_second": 50.0},
        "health": {"host": "127.0.0.1", "port": health_port},
        "supervisor": {"backoff_base_s": 0.2, "backoff_factor": 2.0, "max_attempts": 3,
                       "jitter": 0.0, "health_interval_s": 1.0, "probe_timeout_s": 1.0,
                       "call_timeout_s": 2.0, "connect_timeout_s": 2.0,
                       # Up 1 s earns a fresh budget, so back-to-back faults each start
                       # their own 0.2/0.4/0.8 s schedule (DESIGN 3, reset after stability).
                       "stable_s": 1.0},
        # [questdb] has no dsn: the runtime starts its embedded PostgreSQL server itself.
        # Its breaker fails fast for breaker_open_s after opening (DESIGN: 30 s), even once
        # the database is back: a short window keeps recovery tests to seconds.
        "questdb": {"breaker_open_s": 2.0},
    }


def scratch_state_dir() -> Path:
    """A private directory for ``runtime.state_dir``, outside pytest's ``tmp_path``.

    Run as root, the embedded PostgreSQL server runs as an unprivileged user that must be
    able to reach its data directory inside the state directory. pytest's base directory
    (``/tmp/pytest-of-root``) is private to root, and every pytest session that starts
    (other test runs on the same machine) resets it to mode 0700, which would cut a running
    server off from its files mid-test. So state lives here instead: ``$MT5SUP_PG_TEST_DIR``,
    else ``/dev/shm`` (tmpfs: initdb is faster), else the default temporary directory. The
    caller removes it (``RuntimeProcess.close``).
    """
    root = os.environ.get("MT5SUP_PG_TEST_DIR")
    if not root and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
        root = "/dev/shm"
    path = Path(tempfile.mkdtemp(prefix="mt5sup-e2e-", dir=root or None))
    path.chmod(0o755)
    return path

def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the test process dies (Linux).

    A test run that is killed (a time-out, Ctrl-C twice) never reaches its ``finally``;
    without this its runtime, and that runtime's database, would live on as orphans.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG



class RuntimeProcess:
    """One ``python -m supervision.shell.cli run --config <workdir>/runtime.toml`` process.

    ``workdir`` (pytest's ``tmp_path``) holds the configuration and the captured output;
    the state directory (event log, embedded database) is ``state_dir``, by default a
    private scratch directory (see ``scratch_state_dir``) removed by ``close()``."""

    def __init__(self, workdir: Path, *, state_dir: Path | None = None,
                 sections: Mapping[str, Mapping[str, Any]] | None = None,
                 token: str | None = TOKEN,
                 env: Mapping[str, str] | None = None) -> None:
        self.workdir = workdir
        self.extra_env = dict(env or {})
        workdir.mkdir(parents=True, exist_ok=True)
        self.owns_state_dir = state_dir is None
        self.state_dir = (state_dir or scratch_state_dir() / "var")
        self.control_port = free_port()
        self.health_port = free_port()
        merged = base_sections(self.state_dir, self.control_port, self.health_port)
        for name, table in (sections or {}).items():
            merged.setdefault(name, {}).update(table)
        self.config_path = workdir / "runtime.toml"
        self.config_path.write_text(toml_text(merged))
        self.token = token
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout_path = workdir / "stdout.txt"
        self.stderr_path = workdir / "stderr.txt"

    # ------------------------------------------------------------------ addresses
    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.control_port}/"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.health_port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "events.jsonl"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> RuntimeProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MT5SUP_")}
        if self.token is not None:
            env[TOKEN_ENV] = self.token
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervision.shell.cli", "run", "--config",
                 str(self.config_path)],
                cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True,  # our signals only, never the terminal's Ctrl-C
                # PDEATHSIG follows the forking *thread*: only safe from the main one.
                preexec_fn=(_die_with_parent if threading.current_thread()
                            is threading.main_thread() else None))
        return self

    @contextlib.contextmanager
    def serving(self) -> Iterator[RuntimeProcess]:
        """Started and ready for the block; stopped after it, and it must have exited 0 (a
        runtime that cannot stop cleanly fails the test that used it)."""
        self.start()
        try:
            self.wait_ready()
            yield self
        finally:
            code = self.close()
        assert code == 0, self.output()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
        """Poll ``/health`` until every actor is up (status ``pass``); return the document."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the runtime exited with {self.proc.returncode} before "
                                     f"it was ready\n{self.output()}")
            try:
                status, _, body = http_get(self.http_base + "/health", timeout=2.0)
            except OSError as exc:  # not listening yet
                last = exc
            else:
                doc = json.loads(body)
                last = doc
                if status == 200 and doc["status"] == "pass":
                    return doc
            time.sleep(0.1)
        raise AssertionError(f"the runtime was not ready within {timeout} s (last: {last})\n"
                             f"{self.output()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL (and the postgres children) if that does not work."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            children = self.descendants()
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                for child in children:
                    try:
                        child.kill()
                    except psutil.Error:
                        pass
        return self.proc.returncode

    def close(self) -> int | None:
        """``stop()``, then remove the state directory if this object made it."""
        try:
            return self.stop()
        finally:
            if self.owns_state_dir:
                shutil.rmtree(self.state_dir.parent, ignore_errors=True)

    def descendants(self) -> list[psutil.Process]:
        """The process's children, recursively (the embedded postgres and its backends)."""
        if self.proc is None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def postgres_processes(self) -> list[psutil.Process]:
        """Every process on this machine whose command line names our data directory."""
        data_dir = str(self.state_dir / "postgres")
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info.get("cmdline") or []
            if any(data_dir in part for part in cmdline):
                found.append(proc)
        return found

    def output(self) -> str:
        def tail(path: Path) -> str:
            try:
                return path.read_text(errors="replace")[-4000:]
            except FileNotFoundError:
                return ""
        return f"--- stdout ---\n{tail(self.stdout_path)}\n--- stderr ---\n{tail(self.stderr_path)}"

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    # ------------------------------------------------------------------ the event log
    def log_events(self) -> list[dict[str, Any]]:
        """Every complete line of ``state_dir/events.jsonl``."""
        events = []
        with open(self.log_path, encoding="utf-8") as handle:
            for line in handle:
                if line.endswith("\n"):
                    events.append(json.loads(line))
        return events

    def log_by_seq(self) -> dict[int, dict[str, Any]]:
        return {event["seq"]: event for event in self.log_events()}

    def wait_log(self, predicate: Callable[[list[dict[str, Any]]], bool],
                 timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            events = self.log_events()
            if predicate(events):
                return events
            if time.monotonic() > deadline:
                raise AssertionError("the event log never satisfied the condition; last "
                                     f"events: {events[-10:]}")
            time.sleep(0.05)


# ---------------------------------------------------------------------------- HTTP
def http_get(url: str, *, timeout: float = 5.0, method: str = "GET"
             ) -> tuple[int, Mapping[str, str], bytes]:
    """``(status, headers, body)``; HTTP error statuses are returned, not raised."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers, exc.read()


def metric_samples(text: str) -> dict[str, float]:
    """Prometheus text exposition -> ``{'name{labels}': value}`` (comments dropped)."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        samples[name] = float(value)
    return samples


# ---------------------------------------------------------------------------- WebSocket
class Rpc(JsonRpcClient):
    """A blocking JSON-RPC 2.0 client over ``websockets.sync`` (10 s waits, one request at
    a time). Notifications that arrive while waiting for a reply are kept in
    ``notifications``."""

    def __init__(self, url: str, *, token: str | None = None,
                 headers: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        kwargs.setdefault("open_timeout", 10)
        kwargs.setdefault("close_timeout", 2)
        kwargs.setdefault("max_size", 16 * 1024 * 1024)
        # Entered as a context manager (websockets >= 17.1 deprecates a bare connect()).
        super().__init__(connect(url, additional_headers=all_headers or None,
                                 **kwargs).__enter__())
        # Notifications of other subscriptions, passed over by events() and until_live().
        self.passed_over: list[dict[str, Any]] = []

    def __enter__(self) -> Rpc:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.ws.close()

    def call(self, actor: str, op: str, args: Mapping[str, Any] | None = None, *,
             timeout_s: float | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"actor": actor, "op": op, "args": dict(args or {})}
        if timeout_s is not None:
            params["timeout_s"] = timeout_s
        return self.result("actor.call", params, timeout=(timeout_s or 10.0) + 5.0)

    # ------------------------------------------------------------------ notifications
    def events(self, subscription: str, until: Callable[[dict[str, Any]], bool], *,
               timeout: float = 15.0) -> list[dict[str, Any]]:
        """The events (``events.event`` params, without ``subscription``) of one
        subscription up to and including the first for which ``until`` is true. Any
        other notification of that subscription (overflow, closed) fails the test."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"condition not met within {timeout} s; got "
                                     f"{[_short(e) for e in seen]}")
            try:
                message = self.notification(timeout=remaining)
            except TimeoutError:
                continue
            params = message.get("params") or {}
            if params.get("subscription") != subscription:
                self.passed_over.append(message)
                continue
            if message["method"] == "events.live":
                continue
            assert message["method"] == "events.event", message
            event = {k: v for k, v in params.items() if k != "subscription"}
            seen.append(event)
            if until(event):
                return seen

    def until_live(self, subscription: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The events of a subscription up to its ``events.live`` marker."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            message = self.notification(timeout=max(0.01, deadline - time.monotonic()))
            params = message.get("params") or {}
            if params.get("subscription") != subscription:
                self.passed_over.append(message)
                continue
            if message["method"] == "events.live":
                return seen
            assert message["method"] == "events.event", message
            seen.append({k: v for k, v in params.items() if k != "subscription"})



def _short(event: Mapping[str, Any]) -> str:
    parts = [str(event.get("seq")), str(event.get("actor")), str(event.get("kind"))]
    if event.get("from") or event.get("to"):
        parts.append(f"{event.get('from')}->{event.get('to')}")
    return " ".join(parts)


def contiguous(seqs: Iterable[int]) -> bool:
    return all(b == a + 1 for a, b in itertools.pairwise(seqs))


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def attempt_schedule(events: Iterable[Mapping[str, Any]], actor: str
                     ) -> list[tuple[float, float, float]]:
    """``(configured delay, observed delay, lateness)`` for each reconnect attempt of the
    first failure of ``actor`` in ``events``, from the events' timestamps:

    * observed delay: from the failure before attempt n (the ``state_changed`` to
      RECONNECTING, or ``attempt_failed`` n-1) to ``attempt_failed`` n;
    * lateness: from the time attempt n was scheduled for (``backoff_scheduled`` n's
      ``data.next_at``, computed from the exact moment of scheduling) to its
      ``attempt_failed``. A trio sleep never ends early, so this is >= 0.

    An event's ``ts`` may be later than the moment it happened: the supervisor keeps ``ts``
    non-decreasing in ``seq`` order (``Supervisor._number``), so an event queued behind a
    newer one takes that one's time. Hence the observed delay is compared two-sided."""
    out = []
    previous: Mapping[str, Any] | None = None
    scheduled: dict[int, Mapping[str, Any]] = {}
    for event in events:
        if event["actor"] != actor:
            continue
        kind = event["kind"]
        if kind == "state_changed" and event["to"] == "RECONNECTING" and previous is None:
            previous = event
        elif previous is None:
            continue
        elif kind == "backoff_scheduled":
            scheduled[event["attempt"]] = event
        elif kind == "attempt_failed":
            plan = scheduled[event["attempt"]]
            at = parse_ts(event["ts"])
            out.append((plan["delay_s"], (at - parse_ts(previous["ts"])).total_seconds(),
                        (at - parse_ts(plan["data"]["next_at"])).total_seconds()))
            previous = event
        elif kind == "state_changed" and event["to"] != "RECONNECTING":
            break
    return out


def status_of(rpc: Rpc, actor: str) -> dict[str, Any]:
    for row in rpc.result("runtime.status")["actors"]:
        if row["name"] == actor:
            return row
    raise AssertionError(f"no actor {actor!r} in runtime.status")


def wait_all_connected(rpc: Rpc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rows = rpc.result("runtime.status")["actors"]
        if all(row["state"] == "CONNECTED" for row in rows):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not every actor is CONNECTED: {rows}")
        time.sleep(0.1)
