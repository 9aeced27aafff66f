"""The ``mt5-supervisor`` command: help, configuration errors, and the client commands
against an in-process runtime (each ``main()`` runs its own ``trio.run`` in a thread)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervision.shell import cli
from tests.support.inprocess import TOKEN, control_url, emit_events, running, wait_head
from tests.support.waiting import in_thread

pytestmark = pytest.mark.realserver


def test_help_explains_the_commands(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for words in ("run", "status", "events", "examples:", "MT5SUP_TOKEN", "exit codes"):
        assert words in out
    with pytest.raises(SystemExit):
        cli.main(["events", "--help"])
    assert "--follow" in capsys.readouterr().out


def test_no_command_or_a_bad_option_is_a_usage_error(capsys) -> None:
    assert cli.main([]) == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["status", "--bogus"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["events", "--since", "-3"])
    assert info.value.code == 2


@pytest.mark.parametrize(("toml", "words"), [
    ("[control]\nprot = 1\n", "unknown key control.prot"),
    ("[control]\nport = \"x\"\n", "control.port in"),
    ("[nonsense]\n", "unknown section [nonsense]"),
    ("[control\n", "not valid TOML"),
])
def test_configuration_errors_exit_2_naming_key_and_file(tmp_path, capsys, toml, words
                                                         ) -> None:
    path = tmp_path / "runtime.toml"
    path.write_text(toml)
    assert cli.main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert words in err and str(path) in err


def test_a_missing_configuration_file_exits_2(tmp_path, capsys) -> None:
    missing = tmp_path / "absent.toml"
    assert cli.main(["run", "--config", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_status_without_a_server_exits_1(capsys) -> None:
    assert cli.main(["status", "--url", "ws://127.0.0.1:1/", "--timeout", "2"]) == 1
    assert "cannot connect to ws://127.0.0.1:1/" in capsys.readouterr().err


async def test_status_prints_the_tree(tmp_path, capsys) -> None:
    async with running(tmp_path) as rt:
        url = control_url(rt)
        assert await in_thread(lambda: cli.main(["status", "--url", url])) == 0
        out = capsys.readouterr().out
        header, row = out.splitlines()[:2]
        assert header.split()[:4] == ["ACTOR", "STATE", "RESTARTS", "ATTEMPT"]
        assert row.split()[:4] == ["cache", "CONNECTED", "0", "0"]
        assert await in_thread(lambda: cli.main(["status", "--url", url, "--json"])) == 0
        assert '"name": "cache"' in capsys.readouterr().out


async def test_status_with_a_wrong_token_exits_1(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MT5SUP_TOKEN", "not-the-token")
    async with running(tmp_path) as rt:
        url = control_url(rt)
        assert await in_thread(lambda: cli.main(["status", "--url", url])) == 1
        assert "HTTP 401" in capsys.readouterr().err


async def test_an_error_answer_exits_4_and_no_server_exits_1(tmp_path, capsys,
                                                              monkeypatch) -> None:
    async with running(tmp_path) as rt:
        url = control_url(rt)
        # A refused request (a mutating method without the token).
        monkeypatch.delenv("MT5SUP_TOKEN", raising=False)
        assert await in_thread(lambda: cli.main(["restart", "cache", "--url", url])) == 4
        assert "the runtime refused" in capsys.readouterr().err
        # An error Response from a call: answered, but not ok.
        monkeypatch.setenv("MT5SUP_TOKEN", TOKEN)
        argv = ["call", "cache", "no_such_op", "--url", url, "--json"]
        assert await in_thread(lambda: cli.main(argv)) == 4
        assert '"status": "error"' in capsys.readouterr().out
        argv = ["call", "cache", "stats", "--url", url, "--json"]
        assert await in_thread(lambda: cli.main(argv)) == 0
    # The runtime has gone: the same call cannot connect.
    argv = ["call", "cache", "stats", "--url", url, "--timeout", "2"]
    assert await in_thread(lambda: cli.main(argv)) == 1


async def test_events_prints_the_log_and_exits(tmp_path, capsys) -> None:
    async with running(tmp_path) as rt:
        head = rt.events.head_seq
        await emit_events(rt, 3, actor="feed")
        await wait_head(rt, head + 3)
        url = control_url(rt)
        assert await in_thread(lambda: cli.main(["events", "--url", url])) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in lines] == [f"#{n}" for n in range(1, head + 4)]
        assert "cache state_changed DISCONNECTED->CONNECTED" in "\n".join(lines)

        argv = ["events", "--url", url, "--since", str(head), "--actor", "feed", "--json"]
        assert await in_thread(lambda: cli.main(argv)) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 3 and all('"actor": "feed"' in line for line in lines)

        argv = ["events", "--url", url, "--kind", "state_changed"]
        assert await in_thread(lambda: cli.main(argv)) == 0
        assert all("state_changed" in line for line in capsys.readouterr().out.splitlines())


async def test_events_resumes_past_the_server_buffer_without_gaps(tmp_path, capsys) -> None:
    # A log longer than the subscriber buffer: the CLI gets an overflow notice and resumes.
    async with running(tmp_path, runtime={"subscriber_buffer": 10}) as rt:
        head = rt.events.head_seq
        await emit_events(rt, 95)
        await wait_head(rt, head + 95)
        url = control_url(rt)
        assert await in_thread(lambda: cli.main(["events", "--url", url])) == 0
        seqs = [int(line.split()[0][1:]) for line in capsys.readouterr().out.splitlines()]
        assert seqs == list(range(1, head + 96))


def _write_config(tmp_path: Path) -> Path:
    path = tmp_path / "runtime.toml"
    path.write_text(
        f'[runtime]\nstate_dir = "{tmp_path / "var"}"\nfsync = "never"\n'
        "[control]\nport = 0\n[health]\nport = 0\n"
        "[mt5]\nenabled = false\n[questdb]\nenabled = false\n")
    return path


def _read_until(proc: subprocess.Popen[str], prefix: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no line starting with {prefix!r}")


def test_run_serves_until_sigterm(tmp_path) -> None:
    env = {**os.environ, "MT5SUP_TOKEN": "t0k3n", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervision.shell.cli", "run", "--config",
         str(_write_config(tmp_path))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = _read_until(proc, "control: ").split(" ", 1)[1]
        assert url.startswith("ws://127.0.0.1:")
        assert _read_until(proc, "health: ").startswith("health: http://127.0.0.1:")
        status = subprocess.run(
            [sys.executable, "-m", "supervision.shell.cli", "status", "--url", url],
            capture_output=True, text=True, timeout=20, env=env)
        assert status.returncode == 0, status.stderr
        assert "cache" in status.stdout and "CONNECTED" in status.stdout

        follow = subprocess.Popen(
            [sys.executable, "-m", "supervision.shell.cli", "events", "--url", url, "--follow",
             "--since", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env)
        try:
            assert _read_until(follow, "#1 ").split()[2] == "supervisor"
        finally:
            follow.send_signal(signal.SIGINT)
            assert follow.wait(timeout=10) == 0

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "SIGTERM: stopping" in out and out.rstrip().endswith("stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_stops_on_a_shutdown_request(tmp_path) -> None:
    env = {**os.environ, "MT5SUP_TOKEN": "t0k3n", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervision.shell.cli", "run", "--config",
         str(_write_config(tmp_path))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = _read_until(proc, "control: ").split(" ", 1)[1]
        from tests.support.inprocess import Client

        client = Client(url, token="t0k3n")
        assert client.result("runtime.shutdown") == {"ok": True}
        client.close()
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out.rstrip().endswith("stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
