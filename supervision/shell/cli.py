"""The ``mt5-supervisor`` command: run the runtime, or look at a running one.

Exit codes: 0 ok; 2 usage or configuration error (the message names the key and the file);
1 cannot connect to (or lost) the control channel, or a port could not be opened.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any, TextIO

import trio

from supervision.shell.config import ConfigError, RuntimeConfig

DEFAULT_URL = "ws://127.0.0.1:8765/"
EXIT_OK = 0
EXIT_CONNECT = 1
EXIT_USAGE = 2
EXIT_LOG_DAMAGED = 3  # `log check`: unreadable lines found; `log repair`: could not repair
# The runtime answered, with an error: a JSON-RPC error (refused, unknown actor, no token),
# or `call`'s error Response. Scripts tell "not running" (1) from "said no" (4).
EXIT_REFUSED = 4

DESCRIPTION = """\
mt5-supervisor runs a supervised tree of actors: a MetaTrader 5 terminal (or its built-in
simulator), a QuestDB/PostgreSQL pool and a cache. Each actor is restarted with backoff
when its resource fails, escalated to ERROR after 3 failed attempts, and recovered when the
resource comes back. Every state change is a numbered event.

`run` starts everything: the actors, the WebSocket control channel (JSON-RPC, default
ws://127.0.0.1:8765/) and HTTP health/metrics (default http://127.0.0.1:8766/health).
`status` and `events` are clients of a running runtime's control channel."""

EPILOG = """\
examples:
  mt5-supervisor run                          # defaults: simulator + embedded database
  mt5-supervisor run --config runtime.toml    # your configuration (see docs/operations.md)
  mt5-supervisor status                       # the actor tree, as a table
  mt5-supervisor status --json                # the same, as JSON
  mt5-supervisor events                       # the whole event log, then exit
  mt5-supervisor events --follow              # new events as they happen (Ctrl-C to stop)
  mt5-supervisor events --since 120 --actor mt5 --kind state_changed

The control token (needed for mutating methods; reads are open on loopback by default) is
read from the environment variable MT5SUP_TOKEN; `status` and `events` send it when set.

  mt5-supervisor log check                    # is the event log readable? (see log repair)

exit codes: 0 ok, 1 cannot connect, 2 usage or configuration error, 3 damaged event log,
            4 the runtime answered with an error (refused, or the call's error response)"""


class CannotConnect(Exception):
    pass


class RpcFailure(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('message')} ({error.get('code')})")
        self.error = error


# ---------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mt5-supervisor", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run the whole tree, the control channel and health",
        description="Run the supervised tree, the control channel and the health server\n"
                    "until SIGINT (Ctrl-C), SIGTERM or a runtime.shutdown request. Shutdown\n"
                    "is ordered and bounded: actors in reverse start order, then the servers.",
        epilog="example:\n  MT5SUP_TOKEN=change-me mt5-supervisor run --config runtime.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", metavar="FILE",
                     help="TOML configuration (default: built-in defaults; environment "
                          "variables MT5SUP_<SECTION>_<KEY> override either)")

    def client_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=os.environ.get("MT5SUP_URL", DEFAULT_URL),
                       help=f"control channel URL (default: $MT5SUP_URL or {DEFAULT_URL})")
        p.add_argument("--token-env", default="MT5SUP_TOKEN", metavar="NAME",
                       help="environment variable holding the token (default: MT5SUP_TOKEN)")
        p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                       help="connect and reply timeout (default: 5)")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")

    status = commands.add_parser(
        "status", help="show the actor tree of a running runtime",
        description="Show each actor's state, restarts, reconnect attempt, breaker and\n"
                    "last error.",
        epilog="examples:\n  mt5-supervisor status\n"
               "  mt5-supervisor status --url ws://10.0.0.5:8765/ --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    client_options(status)

    events = commands.add_parser(
        "events", help="print supervision events (the log, or live with --follow)",
        description="Print supervision events from a running runtime.\n"
                    "Without --follow: the events after --since (default: the whole log),\n"
                    "then exit. With --follow: new events (or from --since) until Ctrl-C.",
        epilog="examples:\n  mt5-supervisor events --since 100\n"
               "  mt5-supervisor events --follow --actor mt5 --kind escalated",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    client_options(events)
    events.add_argument("--follow", "-f", action="store_true",
                        help="keep printing new events")
    events.add_argument("--since", type=int, metavar="SEQ",
                        help="print events with seq > SEQ (default: 0 without --follow, "
                             "only new events with --follow)")
    events.add_argument("--actor", action="append", metavar="NAME",
                        help="only this actor's events (repeatable)")
    events.add_argument("--kind", action="append", metavar="KIND",
                        help="only events of this kind, e.g. state_changed (repeatable)")

    call = commands.add_parser(
        "call", help="call an actor operation and print the Response",
        description="Call one operation of one actor (JSON-RPC actor.call) and print the\n"
                    "Response: status ok / degraded (with cached_at) / error. Market data,\n"
                    "account reads and cache get are open on loopback; writes (order_send,\n"
                    "...) and all SQL (questdb fetch too) need the token (MT5SUP_TOKEN).",
        epilog="examples:\n  mt5-supervisor call mt5 symbol_info_tick '{\"symbol\": \"EURUSD\"}'\n"
               "  mt5-supervisor call questdb fetch '{\"sql\": \"SELECT 1 AS one\"}'\n"
               "  mt5-supervisor call cache stats",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    client_options(call)
    call.add_argument("actor", help="mt5, questdb, cache or a bot's actor")
    call.add_argument("op", help="the operation, e.g. symbol_info_tick or fetch")
    call.add_argument("args", nargs="?", default="{}",
                      help="the operation's parameters by name, as a JSON object")
    call.add_argument("--call-timeout", type=float, metavar="SECONDS",
                      help="the call's deadline inside the runtime (default: its "
                           "call_timeout_s)")

    inject = commands.add_parser(
        "inject", help="inject a simulator or test-server fault (needs the token)",
        description="Inject a fault (JSON-RPC sim.inject). MT5 simulator faults:\n"
                    "  terminal_crash, ipc_timeout, hang, broker_disconnect, auth_failure,\n"
                    "  autotrading_off, market_retcode (--param retcode=10018), slow\n"
                    "  (--param delay_s=2), lost_reply, clear.\n"
                    "Embedded database (--actor questdb): db_stop, db_kill, db_start, clear.",
        epilog="examples:\n  mt5-supervisor inject terminal_crash --duration 20\n"
               "  mt5-supervisor inject db_stop --actor questdb --duration 40\n"
               "  mt5-supervisor inject clear",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    client_options(inject)
    inject.add_argument("fault")
    inject.add_argument("--actor", default="mt5",
                        help="mt5 (default), a terminal mt5-NAME, or questdb")
    inject.add_argument("--duration", type=float, metavar="SECONDS",
                        help="heal by itself after this long (default: until clear)")
    inject.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a fault parameter, value parsed as JSON when it parses "
                             "(repeatable)")

    restart = commands.add_parser(
        "restart", help="restart an actor with a fresh budget (needs the token)",
        description="Operator restart (JSON-RPC actor.restart): release the resource and\n"
                    "attempt to connect at once, with a fresh restart budget.",
        epilog="example:\n  mt5-supervisor restart mt5",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    client_options(restart)
    restart.add_argument("actor")

    log_cmd = commands.add_parser(
        "log", help="check or repair the event log (state_dir/events.jsonl)",
        description="Look at the event log on disk (no running runtime needed).\n"
                    "  check   read the whole log; list unreadable lines (exit 3 if any)\n"
                    "  repair  move unreadable lines to events.jsonl.corrupt, keep every\n"
                    "          readable event; the runtime must be stopped",
        epilog="examples:\n  mt5-supervisor log check --config runtime.toml\n"
               "  mt5-supervisor log repair --state-dir ./var",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    log_cmd.add_argument("action", choices=("check", "repair"))
    where = log_cmd.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="FILE",
                       help="take state_dir from this configuration (default: built-in "
                            "defaults and MT5SUP_* environment overrides)")
    where.add_argument("--state-dir", metavar="DIR", help="the state directory itself")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "run":
        return cmd_run(args)
    if args.command == "log":
        return cmd_log(args)
    if getattr(args, "since", None) is not None and args.since < 0:
        parser.error("--since must be >= 0")
    commands = {"status": cmd_status, "events": cmd_events, "call": cmd_call,
                "inject": cmd_inject, "restart": cmd_restart}
    try:
        if args.command in ("call", "inject"):
            _check_json_arguments(parser, args)
        code = trio.run(commands[args.command], args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except CannotConnect as exc:
        print(f"mt5-supervisor: {exc}", file=sys.stderr)
        return EXIT_CONNECT
    except RpcFailure as exc:
        print(f"mt5-supervisor: the runtime refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_OK


def _stdout_closed() -> int:
    """Whoever read our output has had enough (``... | head``): stop quietly, as Unix tools
    do. stdout goes to /dev/null so the interpreter's final flush cannot complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_OK


# ---------------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    config: RuntimeConfig | None = None
    try:
        config = RuntimeConfig.load(args.config)
        return trio.run(_run, config)
    except KeyboardInterrupt:
        return EXIT_OK
    except BaseException as exc:  # open_runtime wraps errors in exception groups
        config_error = _find(exc, ConfigError)
        if config_error is not None:
            print(f"mt5-supervisor: configuration error: {config_error}", file=sys.stderr)
            return EXIT_USAGE
        from supervision.eventlog import LogUnreadable

        unreadable = _find(exc, LogUnreadable)
        if unreadable is not None:
            print(f"mt5-supervisor: {unreadable} (the seq to continue from cannot be known; "
                  "fix the file's permissions or see `mt5-supervisor log check`)",
                  file=sys.stderr)
            return EXIT_LOG_DAMAGED
        os_error = _find(exc, OSError)
        if os_error is not None:
            detail = str(os_error)
            if os_error.errno == errno.EADDRINUSE and config is not None:
                c, h = config["control"], config["health"]
                detail = (f"cannot listen: address already in use (control "
                          f"{c['host']}:{c['port']}, health {h['host']}:{h['port']}); is "
                          "another mt5-supervisor running? Change [control] port / "
                          "[health] port or MT5SUP_CONTROL_PORT / MT5SUP_HEALTH_PORT")
            print(f"mt5-supervisor: {detail}", file=sys.stderr)
            return EXIT_CONNECT
        raise


def _find(exc: BaseException, kind: type[BaseException]) -> Any:
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


async def _run(config: RuntimeConfig, out: TextIO | None = None) -> int:
    from supervision.shell.runtime import open_runtime

    out = out or sys.stdout
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_runtime(config) as rt:
            for name, (host, port) in rt.endpoints.items():
                url = (f"ws://{host}:{port}/" if name == "control"
                       else f"http://{host}:{port}/health")
                print(f"{name}: {url}", file=out, flush=True)
            print(f"event log: {config.state_dir / 'events.jsonl'}", file=out, flush=True)
            condition = rt.supervisor.log.condition()
            if condition.status != "pass":
                print(f"event log {condition.status.upper()}: {condition.output}", file=out,
                      flush=True)
            if config.token is None:
                print(f"note: {config['control']['token_env']} is not set: mutating control "
                      "methods are refused", file=out, flush=True)
            print("running; Ctrl-C or SIGTERM stops it", file=out, flush=True)
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    async for signum in signals:
                        print(f"{signal.Signals(signum).name}: stopping", file=out, flush=True)
                        rt.request_shutdown()
                        return

                nursery.start_soon(on_signal)
                await rt.wait_shutdown()
                nursery.cancel_scope.cancel()
            print("stopping: actors in reverse start order, then the control channel and "
                  "health", file=out, flush=True)
        print("stopped", file=out, flush=True)
    return EXIT_OK


# ---------------------------------------------------------------------------- log
def cmd_log(args: argparse.Namespace) -> int:
    from pathlib import Path

    from supervision.logcheck import LogInUse, check_log, format_report, repair_log

    if args.state_dir is not None:
        state_dir = Path(args.state_dir)
    else:
        try:
            state_dir = RuntimeConfig.load(args.config).state_dir
        except ConfigError as exc:
            print(f"mt5-supervisor: configuration error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    path = state_dir / "events.jsonl"
    try:
        if args.action == "check":
            report = check_log(path)
            print(format_report(report))
            return EXIT_LOG_DAMAGED if report.damaged else EXIT_OK
        result = repair_log(path)
    except LogInUse as exc:
        print(f"mt5-supervisor: {exc}", file=sys.stderr)
        return EXIT_LOG_DAMAGED
    except OSError as exc:
        print(f"mt5-supervisor: cannot {args.action} {path}: {exc.strerror or exc}",
              file=sys.stderr)
        return EXIT_LOG_DAMAGED
    if not result.moved:
        print(f"{path}: nothing to repair ({result.kept} readable events)")
    else:
        print(f"{path}: moved {result.moved} unreadable line(s) to {result.corrupt_path}; "
              f"kept {result.kept} readable events")
    return EXIT_OK


# ---------------------------------------------------------------------------- clients
class ControlClient:
    """A minimal JSON-RPC client over trio-websocket (the CLI's only dependency for it)."""

    def __init__(self, ws: Any, timeout: float) -> None:
        self.ws = ws
        self.timeout = timeout
        self._next_id = 0
        self.notifications: deque[dict[str, Any]] = deque()

    async def _receive(self) -> dict[str, Any]:
        from trio_websocket import ConnectionClosed

        try:
            text = await self.ws.get_message()
        except ConnectionClosed as exc:
            reason = exc.reason
            detail = f"{reason.code} {reason.reason or ''}".strip() if reason else "closed"
            raise CannotConnect(f"the control channel closed the connection ({detail})") from None
        return json.loads(text)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        from trio_websocket import ConnectionClosed

        self._next_id += 1
        request_id = self._next_id
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params:
            message["params"] = params
        try:
            await self.ws.send_message(json.dumps(message))
        except ConnectionClosed:
            raise CannotConnect("the control channel closed the connection") from None
        with trio.move_on_after(self.timeout):
            while True:
                reply = await self._receive()
                if "id" not in reply:
                    self.notifications.append(reply)
                    continue
                if reply.get("id") != request_id:
                    continue
                if "error" in reply:
                    raise RpcFailure(reply["error"])
                return reply.get("result")
        raise CannotConnect(f"no reply to {method} within {self.timeout:g} s")

    async def notification(self) -> dict[str, Any]:
        if self.notifications:
            return self.notifications.popleft()
        while True:
            message = await self._receive()
            if "id" not in message:
                return message


async def _with_client(args: argparse.Namespace, body: Any) -> int:
    from trio_websocket import HandshakeError, open_websocket_url

    token = os.environ.get(args.token_env)
    headers = [(b"Authorization", f"Bearer {token}".encode())] if token else None
    try:
        async with open_websocket_url(args.url, extra_headers=headers,
                                      connect_timeout=args.timeout,
                                      disconnect_timeout=1.0) as ws:
            return await body(ControlClient(ws, args.timeout))
    except BaseException as exc:
        # trio-websocket may wrap a failure in an exception group; find what it was.
        # BrokenPipeError first: it is an OSError too, but it is our stdout that closed.
        for kind in (BrokenPipeError, CannotConnect, RpcFailure, KeyboardInterrupt):
            found = _find(exc, kind)
            if found is not None:
                raise found from None
        handshake = _find(exc, HandshakeError) or _find(exc, OSError)
        if handshake is not None:
            raise CannotConnect(f"cannot connect to {args.url}: "
                                f"{_handshake_detail(handshake)} (is `mt5-supervisor run` "
                                "running there? see --url)") from None
        raise


def _handshake_detail(exc: BaseException) -> str:
    if not str(exc) and exc.__cause__ is not None:  # HandshakeError() wrapping an OSError
        exc = exc.__cause__
    status = getattr(exc, "status_code", None)
    if status is not None:
        body = (getattr(exc, "body", None) or b"").decode("utf-8", "replace").strip()
        return f"HTTP {status}" + (f": {body}" if body else "")
    return str(exc) or type(exc).__name__


async def cmd_status(args: argparse.Namespace) -> int:
    async def body(client: ControlClient) -> int:
        status = await client.call("runtime.status")
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            print(format_status(status))
        return EXIT_OK

    return await _with_client(args, body)


def format_status(status: dict[str, Any]) -> str:
    header = ("ACTOR", "STATE", "RESTARTS", "ATTEMPT", "BREAKER", "SINCE", "NEXT RETRY",
              "LAST ERROR")
    rows = [header]
    for actor in status.get("actors", []):
        error = actor.get("last_error")
        rows.append((
            actor["name"], actor["state"], str(actor.get("restarts", 0)),
            str(actor.get("attempt") or 0), actor.get("breaker") or "-",
            actor.get("since") or "-", actor.get("next_retry_at") or "-",
            f"{error['code']}: {error['message']}" if error else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def format_event(event: dict[str, Any]) -> str:
    parts = [f"#{event['seq']}", event["ts"], event["actor"], event["kind"]]
    if event.get("from") or event.get("to"):
        parts.append(f"{event.get('from')}->{event.get('to')}")
    if event.get("attempt") is not None:
        parts.append(f"attempt={event['attempt']}")
    if event.get("delay_s") is not None:
        parts.append(f"delay={event['delay_s']:g}s")
    data = event.get("data") or {}
    if "reason" in data:
        parts.append(f"reason={data['reason']!r}")
    error = event.get("error")
    if error:
        parts.append(f"{error.get('code')}: {error.get('message')}")
    return " ".join(parts)


async def cmd_events(args: argparse.Namespace) -> int:
    since = args.since if args.since is not None else (None if args.follow else 0)

    async def body(client: ControlClient) -> int:
        last_seq = since if since is not None else -1

        async def subscribe(after: int | None) -> str:
            params: dict[str, Any] = {"batch": True}  # fewer frames in a restart storm
            if after is not None:
                params["since_seq"] = after
            if args.actor:
                params["actors"] = args.actor
            if args.kind:
                params["kinds"] = args.kind
            result = await client.call("events.subscribe", params)
            return result["subscription"]

        current = await subscribe(since)
        while True:
            message = await client.notification()
            params = message.get("params") or {}
            if params.get("subscription") != current:
                continue  # from a subscription replaced after an overflow
            method = message.get("method")
            if method in ("events.batch", "events.event"):
                batch = params["events"] if method == "events.batch" else [
                    {k: v for k, v in params.items() if k != "subscription"}]
                lines = []
                for event in batch:
                    if event["seq"] <= last_seq:
                        continue  # replayed again after a resume
                    last_seq = event["seq"]
                    lines.append(json.dumps(event) if args.json else format_event(event))
                if lines:
                    print("\n".join(lines), flush=True)
            elif method == "events.overflow":
                # Fell behind (the log is longer than the server's buffer, or we were slow):
                # resume from the log where the gap starts. Nothing is skipped.
                resume = params["resume_after_seq"]
                await client.call("events.unsubscribe", {"subscription": current})
                current = await subscribe(resume)
            elif method == "events.live" and not args.follow:
                return EXIT_OK
            elif method == "events.closed":
                print("mt5-supervisor: the runtime is stopping", file=sys.stderr)
                return EXIT_OK

    return await _with_client(args, body)




# ---------------------------------------------------------------------------- levers
def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _check_json_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command == "call":
        try:
            value = json.loads(args.args)
        except json.JSONDecodeError as exc:
            parser.error(f"args must be a JSON object: {exc}")
        if not isinstance(value, dict):
            parser.error("args must be a JSON object, e.g. '{\"symbol\": \"EURUSD\"}'")
        args.args = value
    else:
        params = {}
        for item in args.param:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"--param takes KEY=VALUE, got {item!r}")
            params[key] = _json_value(value)
        args.param = params


async def cmd_call(args: argparse.Namespace) -> int:
    async def body(client: ControlClient) -> int:
        params: dict[str, Any] = {"actor": args.actor, "op": args.op, "args": args.args}
        if args.call_timeout is not None:
            params["timeout_s"] = args.call_timeout
        response = await client.call("actor.call", params)
        print(json.dumps(response, indent=None if args.json else 2))
        return EXIT_OK if response.get("status") in ("ok", "degraded") else EXIT_REFUSED

    return await _with_client(args, body)


async def cmd_inject(args: argparse.Namespace) -> int:
    async def body(client: ControlClient) -> int:
        params: dict[str, Any] = {"fault": args.fault, "actor": args.actor}
        if args.duration is not None:
            params["duration_s"] = args.duration
        if args.param:
            params["params"] = args.param
        await client.call("sim.inject", params)
        print(f"injected {args.fault} into {args.actor}"
              + (f" for {args.duration:g} s" if args.duration is not None else ""))
        return EXIT_OK

    return await _with_client(args, body)


async def cmd_restart(args: argparse.Namespace) -> int:
    async def body(client: ControlClient) -> int:
        await client.call("actor.restart", {"actor": args.actor})
        print(f"restarting {args.actor}")
        return EXIT_OK

    return await _with_client(args, body)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
