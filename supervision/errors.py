"""Error codes, the ``Response`` every call returns, and how failures are classified.

Rules (DESIGN.md section 4):

* A call never raises into the caller for a resource failure: it returns a ``Response``
  whose ``status`` is ``"ok"``, ``"degraded"`` (last-known-good data with ``cached_at``) or
  ``"error"`` (``data`` is None and ``error`` says why).
* ``ErrorInfo.message`` is never empty: ``str(exc) or type(exc).__name__``, prefixed with the
  operation, and scrubbed of secrets (passwords, DSN credentials).
* Each actor classifies its own exceptions into a ``Failure``: an error code plus whether the
  resource itself is lost (``connection``: the supervisor must reconnect, the breaker counts
  it, the call may be retried) or only this request failed (query errors, bad arguments).
"""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Any

import attrs


class ErrorCode(enum.StrEnum):
    MT5_INIT_FAILED = "MT5_INIT_FAILED"
    MT5_IPC_FAILED = "MT5_IPC_FAILED"
    MT5_IPC_TIMEOUT = "MT5_IPC_TIMEOUT"
    BROKER_UNAVAILABLE = "BROKER_UNAVAILABLE"
    AUTH_FAILED = "AUTH_FAILED"
    AUTOTRADING_DISABLED = "AUTOTRADING_DISABLED"
    INVALID_REQUEST = "INVALID_REQUEST"
    NOT_FOUND = "NOT_FOUND"
    ORDER_STATE_UNKNOWN = "ORDER_STATE_UNKNOWN"
    DB_UNAVAILABLE = "DB_UNAVAILABLE"
    DB_QUERY_FAILED = "DB_QUERY_FAILED"
    CIRCUIT_OPEN = "CIRCUIT_OPEN"
    ACTOR_UNAVAILABLE = "ACTOR_UNAVAILABLE"
    TIMEOUT = "TIMEOUT"
    INTERNAL = "INTERNAL"


# Reasons are short machine words for degraded/error answers (``Response.reason``).
REASON_BY_CODE: dict[ErrorCode, str] = {
    ErrorCode.DB_UNAVAILABLE: "database_unavailable",
    ErrorCode.DB_QUERY_FAILED: "query_failed",
    ErrorCode.CIRCUIT_OPEN: "circuit_open",
    ErrorCode.ACTOR_UNAVAILABLE: "actor_unavailable",
    ErrorCode.TIMEOUT: "timeout",
    ErrorCode.MT5_INIT_FAILED: "terminal_unavailable",
    ErrorCode.MT5_IPC_FAILED: "terminal_unavailable",
    ErrorCode.MT5_IPC_TIMEOUT: "terminal_timeout",
    ErrorCode.BROKER_UNAVAILABLE: "broker_unavailable",
    ErrorCode.AUTH_FAILED: "auth_failed",
    ErrorCode.AUTOTRADING_DISABLED: "autotrading_disabled",
    ErrorCode.INVALID_REQUEST: "invalid_request",
    ErrorCode.NOT_FOUND: "not_found",
    ErrorCode.ORDER_STATE_UNKNOWN: "order_state_unknown",
    ErrorCode.INTERNAL: "internal_error",
}


def reason_for(code: ErrorCode | str) -> str:
    try:
        return REASON_BY_CODE[ErrorCode(code)]
    except ValueError:
        return str(code).lower()


@attrs.frozen
class ErrorInfo:
    code: ErrorCode
    message: str
    actor: str | None = None
    state: str | None = None
    retry_after: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "code": str(self.code),
            "message": self.message,
            "actor": self.actor,
            "state": self.state,
            "retry_after": self.retry_after,
        }


@attrs.frozen
class Response:
    status: str  # "ok" | "degraded" | "error"
    data: Any = None
    cached_at: datetime | None = None
    reason: str | None = None
    error: ErrorInfo | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def success(cls, data: Any) -> Response:
        return cls(status="ok", data=data)

    @classmethod
    def failure(cls, error: ErrorInfo, reason: str | None = None) -> Response:
        return cls(status="error", data=None, reason=reason or reason_for(error.code),
                   error=error)

    @classmethod
    def degraded(cls, data: Any, cached_at: datetime, error: ErrorInfo) -> Response:
        return cls(
            status="degraded",
            data=data,
            cached_at=cached_at,
            reason=reason_for(error.code),
            error=error,
        )

    def to_json(self) -> dict[str, Any]:
        from supervision.jsonable import to_jsonable

        return {
            "status": self.status,
            "data": to_jsonable(self.data),
            "cached_at": _iso(self.cached_at),
            "reason": self.reason,
            "error": self.error.to_json() if self.error else None,
        }


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.isoformat().replace("+00:00", "Z")


@attrs.frozen
class Failure:
    """How an actor classifies one exception or failed result."""

    code: ErrorCode
    message: str
    # True: the resource is lost (reconnect, count for the breaker, retryable if idempotent).
    connection: bool = False
    # A more precise ``Response.reason`` than the code's default (e.g. "retcode_10018").
    reason: str | None = None
    # Seconds until asking again makes sense (a refusal: ERROR, an open breaker).
    retry_after: float | None = None

    def info(self, actor: str | None, state: str | None) -> ErrorInfo:
        """The caller's view: this failure, which actor, in which state."""
        return ErrorInfo(self.code, self.message, actor, state, self.retry_after)


class CallFailed(Exception):
    """A call ended without a value: the one exception of the call path, carrying its
    ``Failure`` unchanged from where it arose (the gate, the breaker, the actor's
    ``classify``, the deadline) to ``ActorRef.call``, which answers it as a ``Response``.
    An actor's ``handle`` may raise it too, already classified. Never reaches callers."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


ActorFailure = CallFailed  # its earlier name


_DSN_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]*(:[^/@\s]*)?@")
_PASSWORD_KV = re.compile(r"(?i)\b(password|passwd|pwd|token)\s*[=:]\s*('[^']*'|\"[^\"]*\"|\S+)")
WITHHELD = "*** (details withheld: they contained a credential)"


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove credentials from ``text``.

    Credential fields go whole, whatever their value: a DSN's ``user:password@`` and
    ``password=...``. A known secret anywhere else withholds the whole text, not just the
    secret: replacing it in place (``'xx *** yy'``) would confirm a guess that a caller
    managed to get echoed into an error message, and show where in the guess the secret
    sits. Withholding the whole text still answers "did some of this contain the secret?"
    (docs/operations.md, Security, says where that remains)."""
    text = _DSN_CREDENTIALS.sub(r"\g<scheme>***@", text)
    text = _PASSWORD_KV.sub(lambda m: f"{m.group(1)}=***", text)
    if any(secret and secret in text for secret in secrets):
        return WITHHELD
    return text


def describe(exc: BaseException) -> str:
    """``str(exc) or type(exc).__name__``: a message is never empty."""
    text = str(exc).strip()
    return text or type(exc).__name__


def operation_message(operation: str, detail: str, secrets: tuple[str, ...] = ()) -> str:
    """``"<operation> failed: <detail>"`` with secrets removed; never empty."""
    detail = detail.strip() or "unknown error"
    return f"{redact(operation, secrets)} failed: {redact(detail, secrets)}"
