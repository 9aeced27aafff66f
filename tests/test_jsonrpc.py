"""The JSON-RPC layer on its own: parsing, envelope checks, params validation, replies."""

from __future__ import annotations

import json

import pytest

from supervision.shell.control import jsonrpc
from supervision.shell.control.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    RpcError,
    lookup_method,
    parse_request,
    validate_params,
)
from supervision.shell.control.server import AuthThrottle, TokenBucket


def _error(text: str) -> RpcError:
    with pytest.raises(RpcError) as info:
        parse_request(text)
    return info.value


def test_parses_a_request() -> None:
    req = parse_request('{"jsonrpc":"2.0","id":7,"method":"runtime.status"}')
    assert (req.method, dict(req.params), req.id, req.is_notification) == (
        "runtime.status", {}, 7, False)


def test_a_request_without_id_is_a_notification() -> None:
    req = parse_request('{"jsonrpc":"2.0","method":"events.unsubscribe",'
                        '"params":{"subscription":"s1"}}')
    assert req.is_notification and req.id is None


def test_string_and_null_ids_are_kept() -> None:
    assert parse_request('{"jsonrpc":"2.0","id":"a","method":"m"}').id == "a"
    req = parse_request('{"jsonrpc":"2.0","id":null,"method":"m"}')
    assert req.id is None and not req.is_notification


@pytest.mark.parametrize(("text", "code", "words"), [
    ("{not json", PARSE_ERROR, "parse error"),
    ("", PARSE_ERROR, "parse error"),
    ('{"jsonrpc":"2.0","id":1,"method":"m","params":{"x":NaN}}', PARSE_ERROR, "NaN"),
    ("[" * 100_000 + "]" * 100_000, PARSE_ERROR, "parse error"),
    ("[]", INVALID_REQUEST, "batch"),
    ('[{"jsonrpc":"2.0","id":1,"method":"runtime.status"}]', INVALID_REQUEST, "batch"),
    ("42", INVALID_REQUEST, "JSON object, got number"),
    ('"text"', INVALID_REQUEST, "got string"),
    ('{"jsonrpc":"1.0","id":1,"method":"m"}', INVALID_REQUEST, '"2.0"'),
    ('{"id":1,"method":"m"}', INVALID_REQUEST, '"2.0"'),
    ('{"jsonrpc":"2.0","id":{},"method":"m"}', INVALID_REQUEST, "id must be"),
    ('{"jsonrpc":"2.0","id":true,"method":"m"}', INVALID_REQUEST, "id must be"),
    ('{"jsonrpc":"2.0","id":1.5,"method":"m"}', INVALID_REQUEST, "id must be"),
    ('{"jsonrpc":"2.0","id":1}', INVALID_REQUEST, "method"),
    ('{"jsonrpc":"2.0","id":1,"method":5}', INVALID_REQUEST, "method"),
    ('{"jsonrpc":"2.0","id":1,"method":"m","param":{}}', INVALID_REQUEST, "param"),
    ('{"jsonrpc":"2.0","id":1,"method":"m","params":[1]}', INVALID_PARAMS, "positional"),
    ('{"jsonrpc":"2.0","id":1,"method":"m","params":"x"}', INVALID_REQUEST, "params"),
])
def test_bad_envelopes(text: str, code: int, words: str) -> None:
    err = _error(text)
    assert err.code == code
    assert words in err.message
    assert err.data["code"] == jsonrpc.DATA_CODE[code]


def test_errors_keep_the_request_id_when_it_is_known() -> None:
    assert _error('{"jsonrpc":"1.0","id":9,"method":"m"}').request_id == 9
    assert _error('{"jsonrpc":"2.0","id":"x","method":"m","params":[]}').request_id == "x"
    assert _error("{broken").request_id is None


def test_unknown_method() -> None:
    with pytest.raises(RpcError) as info:
        lookup_method("actor.kill")
    assert info.value.code == METHOD_NOT_FOUND
    assert "actor.kill" in info.value.message and "actor.restart" in info.value.message


def _params_error(method: str, params: dict) -> str:
    with pytest.raises(RpcError) as info:
        validate_params(lookup_method(method), params)
    assert info.value.code == INVALID_PARAMS
    assert info.value.data["code"] == "INVALID_REQUEST"
    return info.value.message


@pytest.mark.parametrize(("method", "params", "words"), [
    ("events.subscribe", {"since_seq": "x"}, "'since_seq' must be an integer >= 0"),
    ("events.subscribe", {"since_seq": -1}, "'since_seq'"),
    ("events.subscribe", {"since_seq": 1.5}, "'since_seq'"),
    ("events.subscribe", {"since_seq": True}, "'since_seq'"),
    ("events.subscribe", {"actors": "mt5"}, "'actors' must be an array"),
    ("events.subscribe", {"kinds": [1]}, "'kinds'"),
    ("actor.call", {"op": "get"}, "missing required parameter 'actor'"),
    ("actor.call", {"actor": "", "op": "get"}, "'actor' must be a non-empty string"),
    ("actor.call", {"actor": "cache", "op": "get", "args": [1]}, "'args' must be an object"),
    ("actor.call", {"actor": "cache", "op": "get", "timeout_s": 0}, "'timeout_s'"),
    ("actor.call", {"actor": "cache", "op": "get", "timeout_s": "1"}, "'timeout_s'"),
    ("actor.call", {"actor": "cache", "op": "get", "timeout": 1}, "unknown parameter"),
    ("runtime.status", {"verbose": True}, "expected no parameters"),
    ("auth", {}, "'token'"),
    ("sim.inject", {"fault": "hang", "duration_s": -1}, "'duration_s'"),
])
def test_params_are_validated_by_name(method: str, params: dict, words: str) -> None:
    assert words in _params_error(method, params)


def test_valid_params_fill_optionals_with_none() -> None:
    spec = lookup_method("actor.call")
    assert validate_params(spec, {"actor": "cache", "op": "get", "timeout_s": 2}) == {
        "actor": "cache", "op": "get", "args": None, "timeout_s": 2.0}
    assert validate_params(lookup_method("events.subscribe"), {"since_seq": None}) == {
        "since_seq": None, "actors": None, "kinds": None, "batch": None}


def test_mutating_methods_are_marked() -> None:
    mutating = {name for name, spec in jsonrpc.METHODS.items() if spec.mutating}
    assert mutating == {"actor.restart", "sim.inject", "runtime.shutdown"}


def test_replies_are_json_rpc_objects() -> None:
    assert json.loads(jsonrpc.result_message(1, {"ok": True})) == {
        "jsonrpc": "2.0", "id": 1, "result": {"ok": True}}
    err = RpcError(jsonrpc.RATE_LIMITED, "slow down", data={"retry_after": 0.5})
    assert json.loads(jsonrpc.error_message("a", err)) == {
        "jsonrpc": "2.0", "id": "a",
        "error": {"code": -32002, "message": "slow down",
                  "data": {"code": "RATE_LIMITED", "retry_after": 0.5}}}
    assert json.loads(jsonrpc.notification_message("events.live", {"head_seq": 3})) == {
        "jsonrpc": "2.0", "method": "events.live", "params": {"head_seq": 3}}


def test_non_finite_floats_become_null() -> None:
    text = jsonrpc.result_message(1, {"a": float("nan"), "b": [float("inf"), 1.5]})
    assert json.loads(text)["result"] == {"a": None, "b": [None, 1.5]}


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket.full(10.0, now=0.0)
    assert sum(bucket.take(0.0) for _ in range(25)) == 10
    assert bucket.retry_after() == pytest.approx(0.1)
    assert not bucket.take(0.05)
    assert bucket.take(0.1)
    assert sum(bucket.take(5.0) for _ in range(25)) == 10  # never more than the capacity


def test_token_bucket_below_one_per_second_still_admits_one() -> None:
    bucket = TokenBucket.full(0.5, now=0.0)
    assert bucket.take(0.0)
    assert not bucket.take(1.0)
    assert bucket.take(2.0)


@pytest.mark.parametrize("text, request_id", [
    ('{"jsonrpc":"2.0","id":"\\ud800","method":"runtime.status"}', None),
    ('{"jsonrpc":"2.0","id":3,"method":"x\\udfff"}', 3),
    ('{"jsonrpc":"2.0","id":4,"method":"auth","params":{"tok\\ud800en":"a"}}', 4),
    ('{"jsonrpc":"2.0","id":5,"method":"m","params":{"a":[{"b":"\\uDC00"}]}}', 5),
])
def test_a_lone_surrogate_is_an_invalid_request(text: str, request_id: int | None) -> None:
    err = _error(text)
    assert err.code == INVALID_REQUEST
    assert err.request_id == request_id
    assert "surrogate" in err.message
    jsonrpc.error_message(err.request_id, err).encode("utf-8")  # the reply can be sent


def test_a_surrogate_pair_is_one_character_and_passes() -> None:
    req = parse_request('{"jsonrpc":"2.0","id":"\\ud83d\\ude00","method":"runtime.status"}')
    assert req.id == "\N{GRINNING FACE}"


def test_replies_with_a_lone_surrogate_are_still_valid_utf8_json() -> None:
    text = jsonrpc.result_message("\ud800", {"name": "a\udc00b", "ok": "\N{GRINNING FACE}"})
    text.encode("utf-8")  # would raise UnicodeEncodeError when sent
    assert json.loads(text) == {"jsonrpc": "2.0", "id": "\ud800",
                                "result": {"name": "a\udc00b", "ok": "\N{GRINNING FACE}"}}
    plain = jsonrpc.result_message(1, {"ok": "é"})
    assert "é" in plain  # valid text is still sent as is, not escaped


def test_auth_throttle_allows_a_burst_of_failures_per_source_then_the_rate() -> None:
    throttle = AuthThrottle(burst=3, rate=0.5)
    assert throttle.retry_after("127.0.0.1", 0.0) is None  # an unknown source may try
    for _ in range(3):
        assert throttle.retry_after("127.0.0.1", 0.0) is None
        throttle.failed("127.0.0.1", 0.0)
    assert throttle.retry_after("127.0.0.1", 0.0) == pytest.approx(2.0)
    assert throttle.retry_after("127.0.0.1", 1.0) == pytest.approx(1.0)
    assert throttle.retry_after("10.0.0.7", 1.0) is None  # other sources are not charged
    assert throttle.retry_after("127.0.0.1", 2.0) is None  # one more check after 1 / rate
    throttle.failed("127.0.0.1", 2.0)
    assert throttle.retry_after("127.0.0.1", 2.0) is not None


def test_auth_throttle_remembers_a_bounded_number_of_sources(monkeypatch) -> None:
    from supervision.shell.control import server

    monkeypatch.setattr(server, "AUTH_THROTTLE_SOURCES", 4)
    throttle = AuthThrottle(burst=2, rate=1.0)
    throttle.failed("a", 0.0)
    throttle.failed("a", 0.0)  # "a" is out of budget: kept while others come and go
    for i in range(20):
        throttle.failed(f"other-{i}", 0.0)
    assert len(throttle._buckets) <= 4
    assert throttle.retry_after("a", 0.5) is not None  # spraying sources did not reset "a"


def test_failed_tokens_are_charged_to_loopback_as_a_whole_and_to_an_ipv6_slash_64() -> None:
    from trio_websocket import Endpoint

    from supervision.shell.control.server import _source

    assert _source(Endpoint("127.0.0.1", 1, False)) == _source(Endpoint("127.9.8.7", 2, False))
    assert _source(Endpoint("::1", 1, False)) == "loopback"
    assert _source(Endpoint("10.1.2.3", 1, False)) == "10.1.2.3"
    assert _source(Endpoint("::ffff:10.1.2.3", 1, False)) == "10.1.2.3"
    assert _source(Endpoint("2001:db8::1", 1, False)) == _source(
        Endpoint("2001:db8::ffff:1", 1, False)) == "2001:db8::/64"
