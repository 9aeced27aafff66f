"""JSON-RPC 2.0 for the control channel, without I/O: parse, validate, build replies.

Decisions (docs/protocol.md has the full table):

* One request per WebSocket text message. Batches (JSON arrays) are refused with -32600:
  each request already runs in its own task, so a batch would only add a second way to
  pipeline requests and a second place for limits to be enforced.
* Parameters are by name only (``params`` is an object or absent); positional ``params``
  get -32602.
* Unknown envelope members (a typo such as ``param``) are refused with -32600 rather than
  ignored, so a mistake is reported instead of silently running with no parameters.
* Application errors use -32001..-32004 and always carry ``data.code``: an error code from
  DESIGN.md section 4 where one fits, else a control-channel word (``UNAUTHORIZED``,
  ``RATE_LIMITED``, ``BUSY``).
* Replies never contain NaN or Infinity (not JSON): such floats become ``null``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import attrs

JSONRPC_VERSION = "2.0"

# Standard codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Application codes (-32000..-32099 is reserved by the spec for implementations).
UNAUTHORIZED = -32001
RATE_LIMITED = -32002
REQUEST_TIMEOUT = -32003
BUSY = -32004

# data.code for every error code: what a client switches on.
DATA_CODE: dict[int, str] = {
    PARSE_ERROR: "PARSE_ERROR",
    INVALID_REQUEST: "INVALID_REQUEST",
    METHOD_NOT_FOUND: "METHOD_NOT_FOUND",
    INVALID_PARAMS: "INVALID_REQUEST",
    INTERNAL_ERROR: "INTERNAL",
    UNAUTHORIZED: "UNAUTHORIZED",
    RATE_LIMITED: "RATE_LIMITED",
    REQUEST_TIMEOUT: "TIMEOUT",
    BUSY: "BUSY",
}

RequestId = int | str | None
_ENVELOPE_KEYS = frozenset({"jsonrpc", "method", "params", "id"})


class RpcError(Exception):
    """An error reply: raised by parsing, validation and method handlers."""

    def __init__(self, code: int, message: str, *, request_id: RequestId = None,
                 data: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.data: dict[str, Any] = {"code": DATA_CODE.get(code, "INTERNAL"), **(data or {})}

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "data": self.data}


@attrs.frozen
class Request:
    method: str
    params: Mapping[str, Any]
    id: RequestId
    is_notification: bool  # no "id" member: the client wants no reply


# ---------------------------------------------------------------------------- parsing
def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_request(text: str) -> Request:
    """Parse one text frame into a ``Request`` or raise ``RpcError`` (with the request id
    when it could be recovered, so the client can match the error to its request)."""
    try:
        obj = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise RpcError(PARSE_ERROR, "parse error: JSON nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise RpcError(PARSE_ERROR, f"parse error: {exc}") from None
    if isinstance(obj, list):
        raise RpcError(INVALID_REQUEST, "batch requests are not supported; send one request "
                                        "object per message")
    if _SURROGATE_ESCAPE.search(text) is not None and _has_lone_surrogate(obj):
        # JSON can spell a lone surrogate ("\\ud800") that is no Unicode character: it could
        # never be sent back, logged or stored as UTF-8. Refused here, before any handler.
        raw_id = obj.get("id") if isinstance(obj, dict) else None
        safe_id = raw_id if _valid_id(raw_id) and not _has_lone_surrogate(raw_id) else None
        raise RpcError(INVALID_REQUEST, "invalid text: a string holds a lone UTF-16 surrogate "
                                        "(e.g. \\ud800 without its pair); send valid Unicode",
                       request_id=safe_id)
    if not isinstance(obj, dict):
        raise RpcError(INVALID_REQUEST, f"a request must be a JSON object, got "
                                        f"{_json_type(obj)}")
    request_id = obj.get("id")
    has_id = "id" in obj
    if has_id and not _valid_id(request_id):
        raise RpcError(INVALID_REQUEST, "id must be a string, an integer or null, got "
                                        f"{_json_type(request_id)}")
    rid: RequestId = request_id if has_id else None
    if obj.get("jsonrpc") != JSONRPC_VERSION:
        raise RpcError(INVALID_REQUEST, 'jsonrpc must be exactly "2.0"', request_id=rid)
    unknown = sorted(set(obj) - _ENVELOPE_KEYS)
    if unknown:
        raise RpcError(INVALID_REQUEST, f"unknown request member(s): {', '.join(unknown)}; "
                                        "expected jsonrpc, method, params, id",
                       request_id=rid)
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        raise RpcError(INVALID_REQUEST, "method must be a non-empty string", request_id=rid)
    params = obj.get("params", {})
    if isinstance(params, list):
        raise RpcError(INVALID_PARAMS, "params must be an object (by-name parameters); "
                                       "positional parameters are not supported",
                       request_id=rid)
    if not isinstance(params, dict):
        raise RpcError(INVALID_REQUEST, f"params must be an object, got {_json_type(params)}",
                       request_id=rid)
    return Request(method, params, rid, is_notification=not has_id)


# A \\uD800..\\uDFFF escape: the only way a lone surrogate gets into decoded JSON (a text
# frame is valid UTF-8, which cannot hold one). Pairs decode to one character and pass.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _LONE_SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_id(value: Any) -> bool:
    return value is None or isinstance(value, str) or (
        isinstance(value, int) and not isinstance(value, bool))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# ---------------------------------------------------------------------------- methods
@attrs.frozen
class Param:
    """One by-name parameter. ``kind``: str, int, number, bool, object, strings."""

    name: str
    kind: str
    required: bool = False
    minimum: float | None = None  # int/number: inclusive lower bound
    positive: bool = False  # number: must be > 0
    maximum: float | None = None  # int/number: inclusive upper bound
    nullable: bool = False  # null is accepted (and means "not given")


@attrs.frozen
class MethodSpec:
    name: str
    params: tuple[Param, ...] = ()
    mutating: bool = False  # needs the bearer token


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("auth", (Param("token", "str", required=True),)),
    MethodSpec("runtime.status"),
    MethodSpec("runtime.health"),
    MethodSpec("events.subscribe", (
        Param("since_seq", "int", minimum=0, nullable=True),
        Param("actors", "strings", nullable=True),
        Param("kinds", "strings", nullable=True),
        Param("batch", "bool", nullable=True),
    )),
    MethodSpec("events.unsubscribe", (Param("subscription", "str", required=True),)),
    MethodSpec("actor.call", (
        Param("actor", "str", required=True),
        Param("op", "str", required=True),
        Param("args", "object", nullable=True),
        Param("timeout_s", "number", positive=True, maximum=3600.0, nullable=True),
    )),
    MethodSpec("actor.restart", (Param("actor", "str", required=True),), mutating=True),
    MethodSpec("sim.inject", (
        Param("fault", "str", required=True),
        Param("actor", "str", nullable=True),
        Param("duration_s", "number", positive=True, maximum=86_400.0, nullable=True),
        Param("params", "object", nullable=True),
    ), mutating=True),
    MethodSpec("runtime.shutdown", mutating=True),
)}


def lookup_method(name: str) -> MethodSpec:
    spec = METHODS.get(name)
    if spec is None:
        raise RpcError(METHOD_NOT_FOUND, f"method not found: {name!r}; methods: "
                                         f"{', '.join(METHODS)}")
    return spec


def validate_params(spec: MethodSpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``params`` against ``spec``; return them with absent/null optionals as None.
    Raises -32602 naming the parameter and what was expected."""
    known = {p.name: p for p in spec.params}
    unknown = sorted(set(params) - set(known))
    if unknown:
        expected = ", ".join(known) if known else "no parameters"
        raise RpcError(INVALID_PARAMS, f"{spec.name}: unknown parameter(s) "
                                       f"{', '.join(unknown)}; expected {expected}")
    out: dict[str, Any] = {}
    for param in spec.params:
        if param.name not in params or (params[param.name] is None and param.nullable):
            if param.required:
                raise RpcError(INVALID_PARAMS, f"{spec.name}: missing required parameter "
                                               f"{param.name!r}")
            out[param.name] = None
            continue
        out[param.name] = _check_param(spec.name, param, params[param.name])
    return out


def _check_param(method: str, param: Param, value: Any) -> Any:
    def bad(expected: str) -> RpcError:
        shown = json.dumps(value)[:80] if _json_type(value) != "object" else "an object"
        return RpcError(INVALID_PARAMS, f"{method}: parameter {param.name!r} must be "
                                        f"{expected}, got {_json_type(value)} {shown}")

    kind = param.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise bad("a non-empty string")
        return value
    if kind == "object":
        if not isinstance(value, dict):
            raise bad("an object")
        return value
    if kind == "strings":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise bad("an array of non-empty strings")
        return list(value)
    if kind in ("int", "number"):
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
            raise bad(_describe_range("an integer", param))
        if not is_number or (isinstance(value, float) and not math.isfinite(value)):
            raise bad(_describe_range("a number", param))
        if (param.minimum is not None and value < param.minimum) or (
                param.positive and value <= 0) or (
                param.maximum is not None and value > param.maximum):
            raise bad(_describe_range("a number" if kind == "number" else "an integer",
                                      param))
        return float(value) if kind == "number" else value
    raise AssertionError(f"unknown parameter kind {kind!r}")  # pragma: no cover


def _describe_range(what: str, param: Param) -> str:
    parts = []
    if param.positive:
        parts.append("> 0")
    if param.minimum is not None:
        parts.append(f">= {param.minimum:g}")
    if param.maximum is not None:
        parts.append(f"<= {param.maximum:g}")
    return what + (" " + " and ".join(parts) if parts else "")


# ---------------------------------------------------------------------------- replies
def dumps(obj: Any) -> str:
    """Compact JSON; NaN and infinities (not JSON) become null. Text that cannot be sent as
    UTF-8 (a lone surrogate from anywhere) is escaped (``\\ud800``) instead of failing the
    send, which would end the connection."""
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        obj = _finite(obj)
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if _LONE_SURROGATE.search(text) is not None:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def result_message(request_id: RequestId, result: Any) -> str:
    return dumps({"jsonrpc": JSONRPC_VERSION, "id": request_id, "result": result})


def error_message(request_id: RequestId, error: RpcError) -> str:
    return dumps({"jsonrpc": JSONRPC_VERSION, "id": request_id, "error": error.to_json()})


def notification_message(method: str, params: Mapping[str, Any]) -> str:
    return dumps({"jsonrpc": JSONRPC_VERSION, "method": method, "params": params})
