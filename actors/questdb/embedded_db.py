"""The embedded PostgreSQL server as a supervised resource, with least-privilege roles.

With no ``questdb.dsn`` the runtime runs its own PostgreSQL server (``pgserver``). This
module makes it safe and supervised:

* **Authentication.** No ``trust`` on TCP; every TCP login needs a scram password. The
  superuser has no password and is refused over TCP (``pg_hba``), so ``psql -U postgres -h
  127.0.0.1`` fails; administration goes through the server's private unix socket.
* **Secrets.** The roles' passwords are generated once and kept in ``<state_dir>/
  db-secrets.json`` (mode 0600, reused across restarts). The server only ever sees their
  SCRAM verifiers, so no plaintext password reaches its logs or an error message.
* **Roles** (none is a superuser; none may run programs or read server files):
  - ``mt5sup_owner`` (no login) owns ``supervision_events``; nobody else may alter, delete,
    update or truncate it.
  - ``mt5sup_runtime``: the bot's own SQL and event persistence. SELECT and INSERT on
    ``supervision_events``; may create and use its own tables.
  - ``mt5sup_query``: free-form SQL from the control channel. SELECT only on
    ``supervision_events`` and on the runtime's tables; may create scratch tables of its
    own; a per-statement ``statement_timeout`` so no query holds a connection for long.
* **Supervision.** :class:`EmbeddedDbActor` is a child of its own, started before
  ``questdb``: ``connect()`` starts the server (crash recovery after a kill) and provisions
  the roles; ``serve()`` watches the postmaster so a crash is noticed at once; ``probe()``
  sends a startup packet so a hung (SIGSTOPped) server is noticed within a probe timeout,
  and the next attempt kills the hung server and starts a fresh one.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import os
import secrets
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

import trio

from actors.questdb.dialect import POSTGRESQL
from actors.questdb.pgserver import EmbeddedPostgres, EmbeddedPostgresError
from supervision.actor import Actor, OpSpec
from supervision.errors import ErrorCode, Failure, describe, operation_message

__all__ = [
    "DATABASE",
    "OWNER_ROLE",
    "QUERY_ROLE",
    "RUNTIME_ROLE",
    "EmbeddedDatabase",
    "EmbeddedDbActor",
    "load_or_create_secrets",
    "scram_verifier",
]

log = logging.getLogger("mt5_supervisor.embedded_db")

DATABASE = "mt5sup"
OWNER_ROLE = "mt5sup_owner"
RUNTIME_ROLE = "mt5sup_runtime"
QUERY_ROLE = "mt5sup_query"
# Where control-channel SQL may create things: its own schema, first on its search_path and
# on no other role's, so nothing it defines (a function overloading a built-in: the
# CVE-2018-1058 pattern) can change what the runtime's or the bot's own SQL resolves to.
QUERY_SCHEMA = "mt5sup_scratch"
SECRETS_FILE = "db-secrets.json"
_LOGIN_ROLES = (RUNTIME_ROLE, QUERY_ROLE)
_WATCH_INTERVAL_S = 0.2  # how often serve() checks that the postmaster still runs


def load_or_create_secrets(path: Path) -> dict[str, str]:
    """The login roles' passwords, generated on first use and kept in ``path`` (0600).

    A file readable by others is tightened to 0600 (and said so in the log); one that
    cannot be parsed is an error naming the file, never silently replaced (the roles on
    disk were made with those passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_secrets(path)
    made = {role: secrets.token_urlsafe(32) for role in _LOGIN_ROLES}
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(made, handle)
        handle.flush()
        os.fsync(handle.fileno())
    return made


def _read_secrets(path: Path) -> dict[str, str]:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s was readable by others (mode %o): setting it to 0600", path, mode)
        path.chmod(0o600)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EmbeddedPostgresError(f"cannot read the database secrets in {path}: "
                                    f"{type(exc).__name__}") from None
    if not isinstance(stored, dict) or not all(
            isinstance(stored.get(role), str) and stored[role] for role in _LOGIN_ROLES):
        raise EmbeddedPostgresError(f"{path} does not hold a password for each of "
                                    f"{', '.join(_LOGIN_ROLES)}")
    return {role: stored[role] for role in _LOGIN_ROLES}


def scram_verifier(password: str, *, iterations: int = 4096, salt: bytes | None = None) -> str:
    """PostgreSQL's stored form of a SCRAM-SHA-256 password (RFC 5802/7677), so the
    plaintext never has to be sent to the server."""
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def provisioning_sql(verifiers: Mapping[str, str], statement_timeout_ms: int) -> tuple[str, str]:
    """(cluster-level SQL run in ``postgres``, SQL run in ``DATABASE``). Idempotent."""
    roles = [f"CREATE ROLE {OWNER_ROLE} NOLOGIN"] + [
        f"CREATE ROLE {role} LOGIN" for role in _LOGIN_ROLES]
    creates = "\n".join(
        f"  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {_literal(stmt.split()[2])}) "
        f"THEN {stmt}; END IF;" for stmt in roles)
    limits = "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
    cluster = [
        f"DO $$ BEGIN\n{creates}\nEND $$;",
        f"ALTER ROLE {OWNER_ROLE} NOLOGIN {limits};",
        *(f"ALTER ROLE {role} LOGIN {limits} PASSWORD {_literal(verifiers[role])};"
          for role in _LOGIN_ROLES),
        # The control channel's SQL: bounded per statement and per idle transaction, and
        # a few sessions at most.
        f"ALTER ROLE {QUERY_ROLE} SET statement_timeout = {int(statement_timeout_ms)};",
        f"ALTER ROLE {QUERY_ROLE} SET idle_in_transaction_session_timeout = 10000;",
        f"ALTER ROLE {QUERY_ROLE} CONNECTION LIMIT 8;",
        f"ALTER ROLE {QUERY_ROLE} SET search_path = {QUERY_SCHEMA}, public;",
        f"SELECT 'CREATE DATABASE {DATABASE} OWNER {OWNER_ROLE}' WHERE NOT EXISTS "
        f"(SELECT FROM pg_database WHERE datname = {_literal(DATABASE)}) \\gexec",
        f"REVOKE ALL ON DATABASE {DATABASE} FROM PUBLIC;",
        f"GRANT CONNECT, TEMPORARY ON DATABASE {DATABASE} TO {RUNTIME_ROLE}, {QUERY_ROLE};",
    ]
    table = f"public.{POSTGRESQL.table}"
    database = [
        "REVOKE ALL ON SCHEMA public FROM PUBLIC;",
        f"GRANT USAGE, CREATE ON SCHEMA public TO {RUNTIME_ROLE};",
        f"REVOKE CREATE ON SCHEMA public FROM {QUERY_ROLE};",  # granted by earlier versions
        f"GRANT USAGE ON SCHEMA public TO {QUERY_ROLE};",
        f"CREATE SCHEMA IF NOT EXISTS {QUERY_SCHEMA} AUTHORIZATION {QUERY_ROLE};",
        f"GRANT USAGE, CREATE ON SCHEMA public TO {OWNER_ROLE};",
        f"SET ROLE {OWNER_ROLE};",
        POSTGRESQL.create_events_table.replace(POSTGRESQL.table, table, 1) + ";",
        "RESET ROLE;",
        # A table left by an older, trusting version is taken over by the owner.
        f"ALTER TABLE {table} OWNER TO {OWNER_ROLE};",
        f"REVOKE ALL ON {table} FROM PUBLIC, {RUNTIME_ROLE}, {QUERY_ROLE};",
        f"GRANT SELECT, INSERT ON {table} TO {RUNTIME_ROLE};",
        f"GRANT SELECT ON {table} TO {QUERY_ROLE};",
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {RUNTIME_ROLE} IN SCHEMA public "
        f"GRANT SELECT ON TABLES TO {QUERY_ROLE};",
        f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {QUERY_ROLE};",
    ]
    return "\n".join(cluster) + "\n", "\n".join(database) + "\n"


def _is_stopped(pid: int | None) -> bool:
    """Linux: the process is stopped by a signal or traced (``/proc/<pid>/stat`` state)."""
    if pid is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("T", "t")


class EmbeddedDatabase:
    """The embedded server, its secrets and roles; shared by every (fresh) instance of
    :class:`EmbeddedDbActor` and by the runtime's fault injection."""

    def __init__(self, state_dir: Path, *, statement_timeout_s: float = 5.0,
                 server: EmbeddedPostgres | None = None) -> None:
        self.server = server or EmbeddedPostgres(state_dir / "postgres",
                                                 superuser_over_tcp=False)
        self.secrets_path = state_dir / SECRETS_FILE
        self.passwords = load_or_create_secrets(self.secrets_path)
        self.statement_timeout_ms = max(1, int(statement_timeout_s * 1000))
        # Fault injection (db_stop): keep it down until released.
        self.held = False
        self.starts = 0

    def dsn(self, role: str) -> str:
        password = self.passwords[role]
        return (f"postgresql://{quote(role, safe='')}:{quote(password, safe='')}@"
                f"{self.server.host}:{self.server.port}/{DATABASE}")

    @property
    def runtime_dsn(self) -> str:
        return self.dsn(RUNTIME_ROLE)

    @property
    def query_dsn(self) -> str:
        return self.dsn(QUERY_ROLE)

    def secrets(self) -> tuple[str, ...]:
        return tuple(self.passwords.values())

    def start(self, timeout_s: float = 30.0, abort: threading.Event | None = None) -> None:
        """Start (or crash-recover) the server and provision the roles. Blocking; gives up
        (leaving nothing running) once ``abort`` is set."""
        self.server.start(timeout_s=timeout_s, abort=abort)
        verifiers = {role: scram_verifier(pw) for role, pw in self.passwords.items()}
        cluster, database = provisioning_sql(verifiers, self.statement_timeout_ms)
        for sql, db in ((cluster, "postgres"), (database, DATABASE)):
            if abort is not None and abort.is_set():
                # Given up on: leave nothing running (the next start provisions again).
                self.server.kill()
                raise EmbeddedPostgresError("start abandoned: the caller stopped waiting")
            self.server.psql(sql, database=db, timeout_s=timeout_s)
        self.starts += 1

    async def answers(self) -> None:
        """One startup packet over TCP: the server answers (authentication request or an
        error) only if the postmaster can fork a backend. Raises if it does not answer."""
        stream = await trio.open_tcp_stream(self.server.host, self.server.port)
        async with stream:
            params = (b"user\0" + RUNTIME_ROLE.encode() + b"\0database\0" + DATABASE.encode()
                      + b"\0\0")
            packet = struct.pack("!ii", 8 + len(params), 196608) + params
            await stream.send_all(packet)
            first = await stream.receive_some(1)
        if first not in (b"R", b"E"):
            raise ConnectionError("the embedded database closed the connection unanswered")


async def start_abandonably(db: EmbeddedDatabase, timeout_s: float) -> None:
    """``db.start`` in a worker thread that a cancelled caller does not wait for.

    A start can take up to ``timeout_s`` (30 s), and a plain ``to_thread`` call cannot be
    cancelled: shutting down during a start would wait for it, past the shutdown bound. So
    the caller stops waiting at once and sets ``abort``, which the thread sees at its next
    step (a 20 ms poll; at most one ``pg_isready`` of up to 3 s, or one running ``initdb``
    or provisioning statement), killing the postmaster it spawned. The thread holds the
    server's lock until then, so the runtime's final ``close()`` still waits for it:
    nothing outlives the runtime, and the wait is that one step, not the start's
    timeout."""
    abort = threading.Event()
    try:
        await trio.to_thread.run_sync(
            functools.partial(db.start, timeout_s, abort), abandon_on_cancel=True)
    except trio.Cancelled:
        abort.set()
        raise


class EmbeddedDbActor(Actor):
    """The embedded PostgreSQL server as a supervised resource (see the module docstring).

    ``on_restarted`` is called (in ``serve()``, must not block) each time the server came
    back after the first start: the runtime uses it to nudge ``questdb`` to reconnect at
    once instead of at its next scheduled attempt or probe."""

    ops: ClassVar[Mapping[str, OpSpec]] = {}

    def __init__(self, db: EmbeddedDatabase, *, start_timeout_s: float = 30.0,
                 liveness_timeout_s: float = 2.0,
                 on_restarted: Callable[[], None] | None = None) -> None:
        self.db = db
        self.name = "embedded_db"
        self.start_timeout_s = start_timeout_s
        self.liveness_timeout_s = liveness_timeout_s
        self.on_restarted = on_restarted
        self._announced_start = 0

    async def connect(self) -> None:
        db = self.db
        if db.held:
            raise ConnectionError("the embedded database is held down by fault injection "
                                  "(sim.inject db_start releases it)")
        if db.server.is_running():
            try:
                with trio.fail_after(self.liveness_timeout_s):
                    await db.answers()
            except (OSError, trio.TooSlowError):
                # Running but not answering (hung, or stuck in a crash loop): a supervisor
                # does not wait for a hung child; kill it and start a fresh one.
                log.warning("the embedded database does not answer: killing it")
                await trio.to_thread.run_sync(db.server.kill)
        await start_abandonably(db, self.start_timeout_s)
        with trio.fail_after(self.liveness_timeout_s):
            await db.answers()

    async def probe(self) -> None:
        if not self.db.server.is_running():
            raise ConnectionError("the embedded database is not running")
        await self.db.answers()

    async def serve(self) -> None:
        db = self.db
        if db.starts > 1 and db.starts != self._announced_start and self.on_restarted:
            self._announced_start = db.starts
            self.on_restarted()
        # A child process's exit has no trio event to wait on: poll it (cheap, no real I/O).
        # A stopped postmaster (SIGSTOP, a debugger) is a hang the kernel can name at once;
        # other hangs are left to the liveness probe.
        stopped_since: float | None = None
        while db.server.is_running():
            if _is_stopped(db.server.pid):
                now = trio.current_time()
                stopped_since = now if stopped_since is None else stopped_since
                if now - stopped_since >= self.liveness_timeout_s:
                    raise ConnectionError("the embedded database's postmaster is stopped "
                                          "(SIGSTOP): it does not answer")
            else:
                stopped_since = None
            await trio.sleep(_WATCH_INTERVAL_S)
        raise ConnectionError("the embedded database's postmaster exited")

    def classify(self, exc: BaseException, op: str) -> Failure:
        message = operation_message(op, describe(exc), self.db.secrets())
        if isinstance(exc, OSError | EmbeddedPostgresError | trio.TooSlowError):
            return Failure(ErrorCode.DB_UNAVAILABLE, message, connection=True)
        return Failure(ErrorCode.INTERNAL, message, connection=True)

    def status_extra(self) -> dict[str, Any]:
        return {"pid": self.db.server.pid, "starts": self.db.starts, "held": self.db.held}

