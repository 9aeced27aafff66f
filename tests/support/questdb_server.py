"""A real QuestDB server for tests: ``<repo>/../shared/questdb`` started on free ports.

* :class:`QuestdbServer` starts ``start-questdb`` in a data directory, waits for the PG wire
  (bounded), and can ``terminate`` (SIGTERM), ``kill`` (SIGKILL), ``pause``/``resume``
  (SIGSTOP/SIGCONT) and ``restart`` on the same data and ports. :meth:`QuestdbServer.exec`
  reads through QuestDB's HTTP ``/exec`` (urllib): an independent view of what landed, not
  through asyncpg.
* Fixtures (registered from ``tests/conftest.py``): ``questdb`` (module scope, shared by every
  test of a module that does not stop it) and ``questdb_factory`` (function scope: a private
  server for a test that kills, stops or pauses it). Each JVM costs 3-7 s and ~300 MB.
* QuestDB is looked for at ``<repo>/../shared/questdb`` (``MT5SUP_QUESTDB_HOME`` overrides).
  Where QuestDB or Java is missing (a user's fresh clone) the tests skip and say why; with
  ``CI`` set (``true``/``1``) a missing QuestDB is a failure instead, so CI never goes green
  by skipping the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]  # tests/support/ -> the repository
# ../shared/questdb beside the repository (CI's layout); MT5SUP_QUESTDB_HOME overrides it.
QUESTDB_HOME = Path(os.environ.get("MT5SUP_QUESTDB_HOME")
                    or REPO_ROOT.parent / "shared" / "questdb")
LAUNCHER = QUESTDB_HOME / "start-questdb"
START_TIMEOUT_S = 45.0
STOP_TIMEOUT_S = 15.0
USER, PASSWORD = "admin", "quest"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_reason() -> str | None:
    """Why QuestDB cannot run here, or None."""
    if not (LAUNCHER.is_file() and (QUESTDB_HOME / "questdb.jar").is_file()):
        return f"QuestDB not found at {QUESTDB_HOME} (expected ../shared/questdb beside the repo)"
    java = os.environ.get("JAVA") or (
        str(Path(os.environ["JAVA_HOME"]) / "bin" / "java") if os.environ.get("JAVA_HOME")
        else shutil.which("java"))
    if not java or not Path(java).exists():
        return "java not found (QuestDB needs Java 17+; set JAVA_HOME or put java on PATH)"
    return None


def require_questdb() -> None:
    """Skip the calling test when QuestDB cannot run, or fail in CI."""
    reason = missing_reason()
    if reason is None:
        return
    if _in_ci():
        pytest.fail(f"CI is set but the real QuestDB cannot run: {reason}", pytrace=False)
    pytest.skip(f"real QuestDB unavailable: {reason}")


# Below Linux's ephemeral range (32768-60999): a port picked there can be taken by any
# outgoing connection's source port while the server is down, and a restart on the same
# ports then fails ("could not bind socket").
_PORT_RANGE = (20000, 32000)


def free_port() -> int:
    """A port below the ephemeral range that was free a moment ago."""
    for _ in range(200):
        port = random.randrange(*_PORT_RANGE)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORT_RANGE}")


class QuestdbServer:
    """One QuestDB process on its own ports and data directory (see the module docstring)."""

    def __init__(self, root: Path, *, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.pg_port, self.http_port, self.ilp_port = _three_free_ports()
        # C1 only: the JVM starts in about two thirds of the time (8 s instead of 13 s on a
        # loaded 2-core machine); tests do not need C2's peak speed. Benchmarks pass their own.
        # QuestDB unpacks its native libraries into java.io.tmpdir on every start and never
        # removes them; pointed at the server's own directory they go with the test's files
        # instead of piling up in /tmp (two ~10 MB files per start).
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "QUESTDB_HEAP": "512m", "QUESTDB_LOG_LEVEL": "ERROR",
                    "QUESTDB_JAVA_OPTS": "-XX:TieredStopAtLevel=1", **(env or {})}
        self.env["QUESTDB_JAVA_OPTS"] += f" -XX:-UsePerfData -Djava.io.tmpdir={root / 'tmp'}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self.starts = 0

    @property
    def dsn(self) -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.pg_port}/qdb"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = START_TIMEOUT_S) -> QuestdbServer:
        if self.running():
            return self
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap
        self.proc = subprocess.Popen(
            [str(LAUNCHER), str(self.root / "data"), str(self.pg_port), str(self.http_port),
             str(self.ilp_port)],
            stdout=self._log_file, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True)
        self.starts += 1
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"QuestDB exited during start:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.pg_port), timeout=0.5):
                    pass
                with socket.create_connection(("127.0.0.1", self.http_port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"QuestDB not ready within {timeout_s:g} s:\n{self.log_tail()}")
        # The first PG login after a start takes seconds (the JVM loads and compiles its
        # code paths): pay it here, not inside a test's connect timeout.
        self._warm_up(max(1.0, deadline - time.monotonic()))

    def _warm_up(self, timeout_s: float) -> None:
        import asyncio

        import asyncpg

        async def login() -> None:
            conn = await asyncpg.connect(self.dsn, timeout=timeout_s)
            try:
                await conn.fetchval("SELECT 1", timeout=timeout_s)
            finally:
                await conn.close(timeout=timeout_s)

        # In a thread of its own: the caller may be inside trio (or trio-asyncio).
        errors: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(login())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                errors.append(exc)

        thread = threading.Thread(target=run, name="questdb-warm-up", daemon=True)
        thread.start()
        thread.join(timeout_s + 1.0)
        if thread.is_alive() or errors:
            raise RuntimeError(f"QuestDB accepts TCP but no PG login: {errors!r}\n"
                               f"{self.log_tail()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> int | None:
        """SIGTERM: a graceful shutdown (running queries are cancelled)."""
        return self._stop(signal.SIGTERM)

    def kill(self) -> int | None:
        """SIGKILL: a crash; WAL tables recover on the next start."""
        return self._stop(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the server hangs (sockets stay open, nothing answers)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> QuestdbServer:
        """Start again on the same data and ports (after terminate or kill)."""
        if self.running():
            self.terminate()
        return self.start(timeout_s)

    def _stop(self, signum: int) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a paused JVM cannot handle SIGTERM
                os.kill(proc.pid, signum)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        self._reap()
        return proc.returncode

    def _reap(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.terminate()
        self._reap()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------ HTTP /exec
    def exec(self, sql: str, *, timeout_s: float = 10.0) -> dict[str, Any]:
        """Run ``sql`` through HTTP ``/exec``: ``{"columns": [...], "dataset": [[...]], ...}``.
        Raises ``RuntimeError`` with QuestDB's message for an error."""
        query = urllib.parse.urlencode({"query": sql})
        url = f"http://127.0.0.1:{self.http_port}/exec?{query}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                doc = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            raise RuntimeError(f"/exec {sql!r}: HTTP {exc.code}: {body}") from None
        if "error" in doc:
            raise RuntimeError(f"/exec {sql!r}: {doc['error']}")
        return doc

    def rows(self, sql: str) -> list[dict[str, Any]]:
        doc = self.exec(sql)
        names = [c["name"] for c in doc.get("columns", [])]
        return [dict(zip(names, row, strict=True)) for row in doc.get("dataset", [])]

    def value(self, sql: str) -> Any:
        rows = self.exec(sql).get("dataset", [])
        return rows[0][0] if rows else None

    def wait_wal(self, table: str, timeout_s: float = 10.0) -> None:
        """Until every committed WAL transaction of ``table`` is applied (visible)."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = [r for r in self.rows("wal_tables()") if r["name"] == table]
            if rows and rows[0]["writerTxn"] >= rows[0]["sequencerTxn"]:
                return
            if rows and rows[0]["suspended"]:
                raise RuntimeError(f"table {table} is suspended: {rows[0]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"WAL of {table} not applied within {timeout_s:g} s: {rows}")
            time.sleep(0.05)

    def seqs(self, table: str = "supervision_events") -> list[int]:
        """Every ``seq`` in ``table`` (duplicates included), after its WAL is applied."""
        self.wait_wal(table)
        return [row[0] for row in self.exec(f"SELECT seq FROM {table} ORDER BY seq")["dataset"]]


def _three_free_ports() -> tuple[int, int, int]:
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    a, b, c = sorted(ports)
    return a, b, c


def _scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="mt5sup-questdb-"))


@contextlib.contextmanager
def questdb_server(**kwargs: Any) -> Iterator[QuestdbServer]:
    """A started server, stopped and its directory removed afterwards."""
    root = _scratch()
    server = QuestdbServer(root, **kwargs)
    try:
        server.start()
        yield server
    finally:
        try:
            server.close()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def questdb() -> Iterator[QuestdbServer]:
    """One QuestDB shared by the module's tests: do not stop, kill or pause it."""
    require_questdb()
    with questdb_server(env={"QDB_DEV_MODE_ENABLED": "true"}) as server:
        yield server


@pytest.fixture
def questdb_factory() -> Iterator[Callable[..., QuestdbServer]]:
    """``make(**kwargs)``: a private, started QuestDB the test may stop, kill or pause."""
    require_questdb()
    stack = contextlib.ExitStack()

    def make(**kwargs: Any) -> QuestdbServer:
        return stack.enter_context(questdb_server(**kwargs))

    with stack:
        yield make
