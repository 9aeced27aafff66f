"""The database error taxonomy, in one place: an exception becomes a ``Failure``.

``connection=True`` (``DB_UNAVAILABLE``) means the database, or our session to it, is gone:
the supervisor reconnects, the circuit breaker counts it, and an idempotent call may be retried
(DESIGN.md section 4). ``connection=False`` means only this request failed: ``DB_QUERY_FAILED``
for anything the database or the driver refused (syntax, missing table, unique violation, bad
parameter, QuestDB's errors), ``INTERNAL`` for anything that is not a database error at all
(a bug). Neither of those is retried or counted by the breaker.

How each case was decided (``docs/questdb.md`` has the table, with which exceptions were
provoked for real against PostgreSQL 18 and asyncpg 0.32 in ``tests/test_db_errors.py``):

* ``OSError`` and subclasses (``ConnectionRefusedError``, ``ConnectionResetError``,
  ``BrokenPipeError``, ``socket.gaierror``, ``ssl.SSLError``...): raised by the socket layer,
  nearly always while connecting -> connection.
* ``TimeoutError`` (``asyncio.TimeoutError`` is the same class since Python 3.11): asyncpg
  raises it, with an empty message, for a connect timeout, a pool ``acquire`` timeout and a
  ``timeout=``/``command_timeout`` that expired -> connection. A hung server and a slow query
  look the same from here; the caller's own deadline (``TIMEOUT``) is the actor's business.
  (The actor tells them apart before they get here: a statement that times out on an
  acquired, live session is re-raised as ``QueryTimeout``, a ``TIMEOUT`` query failure.)
* ``asyncpg.PostgresConnectionError`` (SQLSTATE class 08) and its subclasses, notably
  ``ConnectionDoesNotExistError`` ("connection was closed in the middle of operation"), which
  is what a query sees when the server is killed, shut down (fast/immediate) or terminates the
  session (``pg_terminate_backend``) -> connection.
* SQLSTATE ``57P0x`` (``AdminShutdownError``, ``CrashShutdownError``,
  ``CannotConnectNowError`` "the database system is starting up / shutting down",
  ``DatabaseDroppedError``, ``IdleSessionTimeoutError``) and ``53300``
  (``TooManyConnectionsError``) -> connection. ``57014`` (``QueryCanceledError``,
  statement_timeout or a cancel request) is a query failure: the session survives it.
* Any server error whose *severity* is ``FATAL`` or ``PANIC``: PostgreSQL ends the session
  after it, whatever the SQLSTATE. This is how a refused startup is classified (wrong
  password 28P01, unknown database 3D000, ...): the database is unavailable to us and no
  request can succeed until the configuration or the server changes.
* ``asyncpg.InterfaceError`` whose message says the connection or the pool is closed or
  closing ("connection is closed", "cannot perform operation: connection is closed",
  "pool is closed", "pool is closing") -> connection: the session is gone and only a
  reconnect helps. Other ``InterfaceError``s (asyncpg's ``DataError`` "invalid input for
  query argument $1", ``ClientConfigurationError``, "another operation is in progress")
  -> ``DB_QUERY_FAILED``: this request was refused, the database is fine.
* ``asyncpg.exceptions._base.InternalClientError`` and subclasses: split by what broke.
  - The connection's protocol state machine -> connection. Observed for real: when the
    server ends an idle session (``pg_terminate_backend``, shutdown) and a query is sent
    before asyncpg has processed the unsolicited FATAL, the query fails with
    ``InternalClientError("cannot switch to state 11; another operation (2) is in
    progress")``; the connection is dead. Recognised by asyncpg's messages for this family
    ("cannot switch to state", "protocol is in the failed state", "not connected",
    "unexpected state", "unknown error in protocol implementation", authentication).
  - ``TargetServerAttributeNotMatched`` (no host matched ``target_session_attrs`` while
    connecting) -> connection.
  - Everything else (``ProtocolError`` decoding one value, ``OutdatedSchemaCacheError``, "no
    binary format encoder for type"...) -> ``DB_QUERY_FAILED``: anomalies in one request's
    data, after which the session normally survives (and if it did not, the next operation
    surfaces a connection error). Retrying these, or letting a bug that hits every such
    request open the breaker for the whole database, would be wrong.
* Every other ``asyncpg.PostgresError``: a query failure. This includes QuestDB's errors,
  which arrive with SQLSTATE ``00000`` and severity ``ERROR`` and therefore as asyncpg's
  ``UnknownPostgresError`` (a ``FatalPostgresError`` subclass by asyncpg's naming, but the
  session is fine: the severity is what counts).
* QuestDB sends nearly every error with SQLSTATE ``00000`` and severity ``ERROR``, so only its
  message text tells what happened (verified against QuestDB 9.3 in
  ``tests/test_questdb_real.py``): ``invalid username/password`` (a refused startup) is a
  connection failure (``_QUESTDB_CONNECTION_MESSAGES``). ``cancelled by user`` (a running query
  cancelled by SIGTERM or ``CANCEL QUERY``) stays a query failure, like PostgreSQL's 57014:
  the next call on the dead session fails with a connection error anyway.
* Anything else (``ValueError``, ``TypeError``, ``KeyError``...) -> ``INTERNAL``. Never pass
  a cancellation (``trio.Cancelled``, ``asyncio.CancelledError``, ``KeyboardInterrupt``) here:
  re-raise it; it is not a failure of the database.
* An exception group is classified by its leaves: if any leaf is a connection error the
  group is one (the resource is lost, whatever else went wrong); otherwise the first leaf
  decides. The message describes the deciding leaf.

Messages are ``operation_message(operation, describe(exc))``: never empty (an exception with
an empty ``str()`` gives its type name) and scrubbed of DSN credentials, ``password=...`` and
the given ``secrets``.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

import asyncpg
from asyncpg.exceptions import _base as asyncpg_base

from supervision.errors import ErrorCode, Failure, describe, operation_message

__all__ = [
    "CONNECTION_SQLSTATES",
    "CONNECTION_SQLSTATE_PREFIXES",
    "classify_db_error",
    "is_connection_error",
]

# SQLSTATEs after which there is no session, by class prefix or exact code.
CONNECTION_SQLSTATE_PREFIXES = ("08", "57P")
CONNECTION_SQLSTATES = frozenset({"53300"})  # too_many_connections (refused at startup)
_SESSION_ENDING_SEVERITIES = frozenset({"FATAL", "PANIC"})

# QuestDB (SQLSTATE 00000) messages after which no session exists. Only what was seen from a
# real QuestDB 9.3: its refused login.
_QUESTDB_CONNECTION_MESSAGES = re.compile(r"invalid username/password", re.IGNORECASE)
_CLOSED_INTERFACE = re.compile(r"\b(connection|pool) is (closed|closing)\b", re.IGNORECASE)
# asyncpg's InternalClientError messages that mean the protocol state machine of this
# connection is wrecked (coreproto.pyx ``_set_state``, ``_ensure_connected``, the ERROR_CONSUME
# and authentication paths): the session cannot be used again.
_BROKEN_PROTOCOL = re.compile(
    r"cannot switch to|protocol is in|not connected|unexpected state"
    r"|error in protocol implementation|while performing authentication"
    # The pool's bookkeeping of a connection that died under a call (seen once when the
    # server was killed mid-query): only a fresh connection helps.
    r"|called on a free connection holder",
    re.IGNORECASE,
)


def dsn_passwords(dsn: str) -> tuple[str, ...]:
    """The DSN's password as written (percent-encoded) and as sent (decoded): the secrets
    to scrub from every message about it."""
    try:
        password = urlsplit(dsn).password
    except ValueError:
        return ()
    if not password:
        return ()
    return tuple(dict.fromkeys((password, unquote(password))))


def classify_db_error(
    exc: BaseException, operation: str, *, secrets: tuple[str, ...] = ()
) -> Failure:
    """The ``Failure`` for ``exc`` raised by ``operation`` (see the module docstring)."""
    leaf = _deciding_leaf(exc)
    message = operation_message(operation, describe(leaf), secrets)
    if is_connection_error(leaf):
        return Failure(ErrorCode.DB_UNAVAILABLE, message, connection=True)
    if _is_database_error(leaf):
        return Failure(ErrorCode.DB_QUERY_FAILED, message, connection=False)
    return Failure(ErrorCode.INTERNAL, message, connection=False)


def is_connection_error(exc: BaseException) -> bool:
    """True if ``exc`` means the database or our session to it is gone."""
    if isinstance(exc, BaseExceptionGroup):
        return any(is_connection_error(inner) for inner in exc.exceptions)
    if isinstance(exc, OSError):  # includes TimeoutError and ConnectionError
        return True
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        severity = (
            getattr(exc, "severity_en", None) or getattr(exc, "severity", None) or ""
        ).upper()
        return (
            isinstance(exc, asyncpg.PostgresConnectionError)
            or sqlstate.startswith(CONNECTION_SQLSTATE_PREFIXES)
            or sqlstate in CONNECTION_SQLSTATES
            or severity in _SESSION_ENDING_SEVERITIES
            or (sqlstate in ("", "00000")
                and bool(_QUESTDB_CONNECTION_MESSAGES.search(str(exc))))
        )
    if isinstance(exc, asyncpg.InterfaceError):
        return bool(_CLOSED_INTERFACE.search(str(exc)))
    if isinstance(exc, asyncpg_base.TargetServerAttributeNotMatched):
        return True
    if isinstance(exc, asyncpg_base.InternalClientError):
        return bool(_BROKEN_PROTOCOL.search(str(exc)))
    return False


def _is_database_error(exc: BaseException) -> bool:
    return isinstance(
        exc, (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg_base.InternalClientError)
    )


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _deciding_leaf(exc: BaseException) -> BaseException:
    """``exc`` itself, or for a group its first connection-error leaf, else its first leaf."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = _leaves(exc) or [exc]
    for leaf in leaves:
        if is_connection_error(leaf):
            return leaf
    return leaves[0]
