"""The control plane against hostile local clients (issue 9, findings 5 and 6), driven from
outside: a real ``mt5-supervisor run`` subprocess, raw sockets, the WebSocket JSON-RPC
channel, HTTP and the CLI.

Each runtime here runs without the database (``questdb.enabled = false``): nothing in these
findings involves it, and it keeps every start to a second or two.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from tests.support.e2e import REPO_ROOT, TOKEN, TOKEN_ENV, Rpc, RuntimeProcess, http_get

# The MT5 simulator's password: what an attacker tries to guess through echoed errors.
MT5_SECRET = "Tr0ub4dor-e2e"
pytestmark = pytest.mark.realserver

HANDSHAKE_TIMEOUT_S = 1.0
IDLE_TIMEOUT_S = 1.5
NO_DATABASE = {"questdb": {"enabled": False}}


def start_runtime(workdir: Path, control: dict[str, Any]) -> RuntimeProcess:
    sections = {**NO_DATABASE, "control": control}
    rt = RuntimeProcess(workdir, sections=sections)
    saved = os.environ.get("MT5_PASSWORD")
    os.environ["MT5_PASSWORD"] = MT5_SECRET  # the child's environment is copied from ours
    try:
        rt.start()
    finally:
        if saved is None:
            del os.environ["MT5_PASSWORD"]
        else:
            os.environ["MT5_PASSWORD"] = saved
    try:
        rt.wait_ready()
    except BaseException:
        rt.close()
        raise
    return rt


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    """Short handshake and idle timeouts, so the timeout tests take seconds."""
    rt = start_runtime(tmp_path_factory.mktemp("hardening"), {
        "handshake_timeout_s": HANDSHAKE_TIMEOUT_S, "idle_timeout_s": IDLE_TIMEOUT_S})
    try:
        yield rt
    finally:
        code = rt.close()
    assert code == 0, rt.output()


def raw_upgrade(port: int, path: str = "/", headers: dict[str, str] | None = None
                ) -> tuple[socket.socket, bytes]:
    """A WebSocket upgrade by hand; returns the socket and the response head. The socket
    then sends nothing: an idle client that costs the test almost nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
             "Sec-WebSocket-Version: 13"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


def status_code(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def wait_closed(sock: socket.socket, within_s: float) -> bool:
    """True once the server closed the socket (EOF), reading whatever it sent first."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(4096):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def no_traceback(rt: RuntimeProcess) -> None:
    output = rt.output()
    assert "Traceback" not in output and "UnicodeEncodeError" not in output, output


# ---------------------------------------------------------------------------- capacity
def test_an_operator_with_the_token_gets_in_past_256_idle_sockets(tmp_path: Path) -> None:
    # Default capacity (256 without the token, 16 more reserved for it); the handshake
    # timeout is long so the crowd is still there when the operator arrives.
    rt = start_runtime(tmp_path, {"handshake_timeout_s": 120.0, "idle_timeout_s": 120.0})
    crowd: list[socket.socket] = []
    try:
        for _ in range(256):
            sock, head = raw_upgrade(rt.control_port)
            crowd.append(sock)
            assert status_code(head) == 101, head
        late, head = raw_upgrade(rt.control_port)  # the crowd fills what it may use
        late.close()
        assert status_code(head) == 503, head
        with Rpc(rt.ws_url, token=TOKEN) as operator:
            assert "actors" in operator.result("runtime.status")
            assert operator.result("sim.inject", {"fault": "clear"}) == {"ok": True}
    finally:
        for sock in crowd:
            sock.close()
        code = rt.close()
    assert code == 0, rt.output()


# ---------------------------------------------------------------------------- timeouts
def test_a_socket_that_never_finishes_the_upgrade_is_closed(runtime: RuntimeProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", runtime.control_port), timeout=10)
    with sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the end of the request
        assert wait_closed(sock, within_s=HANDSHAKE_TIMEOUT_S + 10)


def test_an_unauthenticated_connection_that_never_speaks_is_closed(
        runtime: RuntimeProcess) -> None:
    with Rpc(runtime.ws_url) as silent:
        assert silent.closed_code(timeout=HANDSHAKE_TIMEOUT_S + 10) == 1000


def test_an_idle_connection_is_closed_but_a_subscriber_is_not(
        runtime: RuntimeProcess) -> None:
    with Rpc(runtime.ws_url, token=TOKEN) as idle, Rpc(runtime.ws_url) as subscriber:
        subscriber.result("events.subscribe", {"since_seq": 0})
        assert "actors" in idle.result("runtime.status")
        assert idle.closed_code(timeout=IDLE_TIMEOUT_S + 10) == 1000
        # The subscriber has been silent at least as long as the closed one, and still is
        # served (waiting for events is not idling).
        time.sleep(IDLE_TIMEOUT_S)
        assert "actors" in subscriber.result("runtime.status")


# ---------------------------------------------------------------------------- bad text
def test_lone_surrogates_get_an_error_reply_and_the_connection_stays_up(
        runtime: RuntimeProcess) -> None:
    with Rpc(runtime.ws_url) as client:
        frames = [  # (frame, the id the error reply carries)
            ('{"jsonrpc":"2.0","id":"\\ud800","method":"runtime.status"}', None),
            ('{"jsonrpc":"2.0","id":7,"method":"runtime.st\\udfffatus"}', 7),
            ('{"jsonrpc":"2.0","id":8,"method":"actor.call","params":'
             '{"actor":"mt5\\ud800","op":"symbol_info_tick","args":{"symbol":"EURUSD"}}}', 8),
            ('{"jsonrpc":"2.0","id":9,"method":"events.subscribe","params":'
             '{"actors":["\\udc00"]}}', 9),
        ]
        for frame, expected_id in frames:
            client.send(frame)
            reply = client.recv()
            assert reply["error"]["code"] == -32600, reply
            assert reply["id"] == expected_id, reply
        # A surrogate pair is one valid character: accepted.
        client.send('{"jsonrpc":"2.0","id":10,"method":"actor.call","params":{"actor":"mt5",'
                    '"op":"symbol_info_tick","args":{"symbol":"\\ud83d\\ude00"}}}')
        assert client.reply_to(10)["result"]["status"] == "error"
        assert "actors" in client.result("runtime.status")
    no_traceback(runtime)


# ---------------------------------------------------------------------------- auth
def test_a_failed_re_auth_drops_the_privileges(runtime: RuntimeProcess) -> None:
    with Rpc(runtime.ws_url) as client:
        assert client.result("auth", {"token": TOKEN}) == {"ok": True}
        assert client.result("sim.inject", {"fault": "clear"}) == {"ok": True}
        assert client.error("auth", {"token": "not-the-token"})["code"] == -32001
        assert client.error("sim.inject", {"fault": "clear"})["code"] == -32001
        assert client.result("auth", {"token": TOKEN}) == {"ok": True}
        assert client.result("sim.inject", {"fault": "clear"}) == {"ok": True}


def test_token_guessing_is_throttled_per_source_across_connections(tmp_path: Path) -> None:
    tarpit_s = 0.4  # below the 1 / s refill: the two slowed answers below come back to back
    rt = start_runtime(tmp_path, {"auth_tarpit_s": tarpit_s})
    try:
        # The documented budget: a burst of 20 wrong tokens per source, answered at once.
        for connection in range(4):  # five failures close a connection: spread the guesses
            with Rpc(rt.ws_url) as guesser:
                for i in range(5):
                    error = guesser.error("auth", {"token": f"guess-{connection}-{i}"})
                    assert error["code"] == -32001, error
        # Past it, from any connection of this address, a wrong token's answer is held back:
        # guessing is slowed to a crawl...
        with Rpc(rt.ws_url) as guesser:
            started = time.monotonic()
            error = guesser.error("auth", {"token": "one-more-guess"})
            assert time.monotonic() - started >= tarpit_s
            assert error["code"] == -32002, error
            assert error["data"]["retry_after"] > 0
        started = time.monotonic()
        with pytest.raises(InvalidStatus) as info:
            Rpc(rt.ws_url, token="another-guess")
        assert time.monotonic() - started >= tarpit_s
        assert info.value.response.status_code == 429
        assert info.value.response.headers["Retry-After"]
        # ...while a guesser keeps at it, the operator still gets in at once, by the header
        # and by auth: the token is always compared.
        with Rpc(rt.ws_url) as guesser, Rpc(rt.ws_url, token=TOKEN) as operator:
            guesser.send({"jsonrpc": "2.0", "id": 99, "method": "auth",
                          "params": {"token": "still-guessing"}})
            assert operator.result("actor.restart", {"actor": "cache"}) == {"ok": True}
            with Rpc(rt.ws_url) as page:
                assert page.result("auth", {"token": TOKEN}) == {"ok": True}
    finally:
        code = rt.close()
    assert code == 0, rt.output()


# ---------------------------------------------------------------------------- redaction
def test_a_guessed_secret_cannot_be_checked_through_an_error_message(
        runtime: RuntimeProcess) -> None:
    # An open read without the token, with a guessed password as an argument name: if the
    # answer quoted the caller's text, scrubbing the real password from it would tell
    # which guess was right. The caller's text is not quoted: both answers are the same.
    with Rpc(runtime.ws_url) as client:
        hit = client.call("mt5", "symbol_info_tick", {f"xx{MT5_SECRET}yy": 1})
        miss = client.call("mt5", "symbol_info_tick", {"xxnot-the-secretyy": 1})
    assert hit["error"] == miss["error"], (hit, miss)
    assert MT5_SECRET not in hit["error"]["message"]
    assert hit["error"]["message"].startswith("symbol_info_tick failed: ")


# ---------------------------------------------------------------------------- CLI, HTTP
@pytest.mark.parametrize("command", [
    ["call", "mt5", "symbol_info_tick", '{"symbol": "EURUSD"}'],
    ["events", "--follow", "--since", "0"],  # stops at the first event it cannot print
], ids=["call", "events-follow"])
def test_output_into_a_closed_pipe_exits_quietly(runtime: RuntimeProcess,
                                                 command: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that has already gone: every write gets EPIPE
    try:
        env = {**os.environ, TOKEN_ENV: TOKEN}
        done = subprocess.run(
            [sys.executable, "-m", "supervision.shell.cli", *command, "--url", runtime.ws_url,
             "--token-env", TOKEN_ENV],
            cwd=REPO_ROOT, env=env, stdout=write_end, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    stderr = done.stderr.decode(errors="replace")
    assert "cannot connect" not in stderr and "Traceback" not in stderr, stderr
    assert stderr == ""
    assert done.returncode == 0


def test_a_websocket_upgrade_on_the_health_port_is_a_4xx(runtime: RuntimeProcess) -> None:
    sock, head = raw_upgrade(runtime.health_port, "/health")
    sock.close()
    assert 400 <= status_code(head) < 500, head
    sock, head = raw_upgrade(runtime.health_port, "/")
    sock.close()
    assert 400 <= status_code(head) < 500, head
    status, _, _ = http_get(runtime.http_base + "/health")  # plain HTTP is still served
    assert status == 200
    no_traceback(runtime)


def test_a_foreign_web_page_cannot_open_the_control_channel(runtime: RuntimeProcess) -> None:
    # A browser sends Origin on every WebSocket handshake and does not apply the same-origin
    # policy to WebSockets: a web site must not become a loopback client.
    for origin in ("https://evil.example", "null", "http://127.0.0.1.evil.example:8766"):
        sock, head = raw_upgrade(runtime.control_port, "/", {"Origin": origin})
        sock.close()
        assert status_code(head) == 403, (origin, head)
    for origin in (f"http://127.0.0.1:{runtime.health_port}", "http://localhost:8766"):
        sock, head = raw_upgrade(runtime.control_port, "/", {"Origin": origin})
        sock.close()
        assert status_code(head) == 101, (origin, head)
    no_traceback(runtime)
