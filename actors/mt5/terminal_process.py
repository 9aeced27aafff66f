"""The child side of the process worker: one OS process that owns one terminal's backend.

Started by ``actors.mt5.process_worker`` as ``python -m actors.mt5.terminal_process``. It
imports no trio: a plain loop over its stdin and stdout.

Why a module run with ``-m`` and not ``multiprocessing``: spawn re-imports the embedding
program's ``__main__`` in the child, and a bot script without the ``if __name__ ==
"__main__"`` guard would run again there. Stdin/stdout pipes also work the same on Windows,
where the real ``MetaTrader5`` package lives, and trio reads them without a thread.

Protocol: frames of an 8-byte little-endian length and a pickle.

* parent -> child: first the ``BackendRecipe``; then ``("call", id, name, args, kwargs)``,
  ``("inject", id, fault, duration_s, params)`` and ``("restore", id, account)``;
* child -> parent: ``("ready", server_time_offset)`` once, then ``("ok", id, result,
  last_error)`` or ``("raised", id, exception)``; injects and restores get no answer (the
  parent has validated them). A simulator also sends ``("account", id, update)`` before
  the answer to every ``order_send``: what the trade server now holds (new history only),
  which the parent restores into the next process if this one is killed.

One thread runs everything, in order: a call, then the next frame. While a call waits
(the simulator's ``slow``, ``ipc_timeout`` or ``hang`` fault) it keeps reading frames, so
``sim.inject`` (e.g. ``clear``) still reaches the simulator during a hung call; the parent
never sends a second call before the first one's answer. No thread hop per call: the hop
would be a third wake-up on top of the pipe's two. (On Windows, where ``select`` does not
take pipes, one reader thread feeds a queue instead.) The parent never waits for a stuck
child: it kills it. EOF on stdin (the parent closed it, or died) ends the process at once.

The backend's ``last_error()`` is read in the same step as the call that failed, on the one
thread that makes calls (the package is process-global and not thread-safe).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import select
import signal
import sys
import threading
import time
from typing import Any, BinaryIO

import attrs


@attrs.frozen
class BackendRecipe:
    """How to build a backend inside the worker process (a picklable description, since
    the backend itself — a module, an rpyc client, a simulator — cannot cross a pipe)."""

    kind: str  # "simulator" | "metatrader5" | "mt5linux"
    host: str = "127.0.0.1"  # mt5linux
    port: int = 18812  # mt5linux
    simulator_seed: int = 0
    ipc_timeout_s: float = 60.0


def build_backend(recipe: BackendRecipe) -> Any:
    if recipe.kind == "simulator":
        from actors.mt5.simulator import TerminalSimulator

        # Real time: the process worker is the production path, never virtual time.
        return TerminalSimulator(clock=time.monotonic, seed=recipe.simulator_seed,
                                 ipc_timeout_s=recipe.ipc_timeout_s)
    if recipe.kind == "metatrader5":
        import MetaTrader5  # type: ignore[import-not-found]  # Windows only (extra "mt5")

        return MetaTrader5
    if recipe.kind == "mt5linux":
        from mt5linux import MetaTrader5  # type: ignore[import-untyped]  # extra "bridge"

        client = MetaTrader5(host=recipe.host, port=recipe.port)
        conn = getattr(client, "_MetaTrader5__conn", None)  # mt5linux 0.1.x keeps it private
        if conn is not None:
            # The bridge's own bound on a call (rpyc's default is 30 s): the terminal's.
            conn._config["sync_request_timeout"] = recipe.ipc_timeout_s
            # The client sends dates as `datetime.datetime(...)` source text; the server's
            # namespace has only `mt5`, so without this every dated call is a NameError.
            conn.execute("import datetime")
        return client
    raise ValueError(f"unknown MT5 backend {recipe.kind!r}")


class TransportLost(ConnectionError):
    """The bridge to the terminal is gone (mt5linux: the rpyc server closed or refused)."""


class TransportTimeout(TimeoutError):
    """The bridge gave up waiting for the terminal (rpyc's ``result expired``)."""


def transport_failure(exc: BaseException) -> Exception | None:
    """A bridge's transport failure, as one of ours (so it pickles and the actor can tell
    it apart without importing rpyc); None for anything else."""
    if isinstance(exc, TransportLost | TransportTimeout):
        return exc
    # rpyc's AsyncResultTimeout ("result expired") is TimeoutError itself in rpyc 6.
    if isinstance(exc, TimeoutError) or type(exc).__name__ == "AsyncResultTimeout":
        return TransportTimeout(str(exc) or "result expired")
    if isinstance(exc, EOFError | ConnectionError):
        return TransportLost(f"{type(exc).__name__}: {exc}" if str(exc)
                             else type(exc).__name__)
    return None


FRAME_HEADER = 8
_CHUNK = 1 << 16
_HANG_POLL_S = 0.5  # a hang re-checks its token this often, whatever arrives


def frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(FRAME_HEADER, "little") + data


class Inbox:
    """Frames from the parent. ``read(deadline)`` returns the next frame, or None once
    ``time.monotonic()`` passes ``deadline``; EOF raises ``EOFError``."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._queue: queue.SimpleQueue[Any] | None = None
        if os.name == "nt":  # select() takes sockets only there
            self._queue = queue.SimpleQueue()
            threading.Thread(target=self._feed, daemon=True, name="mt5-inbox").start()

    def _next_buffered(self) -> tuple[bool, Any]:
        if len(self._buffer) >= FRAME_HEADER:
            size = int.from_bytes(self._buffer[:FRAME_HEADER], "little")
            if len(self._buffer) >= FRAME_HEADER + size:
                data = bytes(self._buffer[FRAME_HEADER:FRAME_HEADER + size])
                del self._buffer[:FRAME_HEADER + size]
                return True, pickle.loads(data)
        return False, None

    def _fill(self) -> None:
        chunk = os.read(self._fd, _CHUNK)
        if not chunk:
            raise EOFError("the parent closed the pipe")
        self._buffer += chunk

    def _feed(self) -> None:
        assert self._queue is not None
        while True:
            try:
                found, message = self._next_buffered()
                if not found:
                    self._fill()
                    continue
            except (EOFError, OSError) as exc:
                self._queue.put(exc)
                return
            self._queue.put(message)

    def read(self, deadline: float | None = None) -> Any:
        if self._queue is not None:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                return None
            if isinstance(item, BaseException):
                raise EOFError("the parent closed the pipe") from item
            return item
        while True:
            found, message = self._next_buffered()
            if found:
                return message
            if deadline is not None:
                ready, _, _ = select.select([self._fd], [], [],
                                            max(0.0, deadline - time.monotonic()))
                if not ready:
                    return None
            self._fill()


class Terminal:
    """The backend and the one loop that serves it."""

    def __init__(self, inbox: Inbox, outbox: BinaryIO, recipe: BackendRecipe) -> None:
        self.inbox = inbox
        self.outbox = outbox
        self.recipe = recipe
        # A bridge connects when built: build it at the first call, so a server that is
        # down is an answer (TransportLost), not a dead process. The rest build now.
        self.backend: Any = None if recipe.kind == "mt5linux" else build_backend(recipe)
        self._calls: list[tuple[Any, ...]] = []  # arrived while a call waited (not expected)
        self._history_sent = (0, 0)  # history orders and deals the parent already has

    def send(self, message: tuple[Any, ...]) -> None:
        self.outbox.write(frame(message))
        self.outbox.flush()

    def take(self, message: Any) -> None:
        """An inject is applied now (validated by the parent: a failure changes nothing);
        a call waits its turn."""
        if message is None:
            return
        if message[0] == "inject":
            _, _call_id, fault, duration_s, params = message
            with contextlib.suppress(ValueError, AttributeError):
                self.backend.inject(fault, duration_s=duration_s, **params)
        elif message[0] == "restore":
            self.backend.restore_account(message[2])
            self._history_sent = message[2]["history_lengths"]
        else:
            self._calls.append(message)

    def send_account_update(self, call_id: int) -> None:
        if self.recipe.kind != "simulator":
            return  # a real terminal: the broker keeps the account
        state = self.backend.account_state
        update = state(history_from=self._history_sent)
        self._history_sent = update["history_lengths"]
        self.send(("account", call_id, update))

    def wait_before(self, name: str) -> None:
        """The simulator says how long a call takes (slow, ipc_timeout, hang); a real
        backend does not. Frames are read meanwhile."""
        before = getattr(self.backend, "before_call", None)
        if before is None:
            return
        delay = before(name)
        end = time.monotonic() + delay.seconds
        while time.monotonic() < end:
            self.take(self.inbox.read(end))
        if delay.hang is not None:
            released = threading.Event()
            delay.hang.add_listener(released.set)  # set by an inject, on this thread
            while not released.is_set():
                self.take(self.inbox.read(time.monotonic() + _HANG_POLL_S))

    def run(self) -> None:
        while True:
            message = self._calls.pop(0) if self._calls else self.inbox.read()
            if message[0] != "call":
                self.take(message)
                continue
            _, call_id, name, args, kwargs = message
            if self.backend is None and name == "shutdown":
                # Nothing to close: a bridge that was lost, or never connected.
                self.send(("ok", call_id, True, (1, "Success")))
                continue
            try:
                if self.backend is None:
                    self.backend = build_backend(self.recipe)
                self.wait_before(name)
                result = getattr(self.backend, name)(*args, **kwargs)
                error = self.backend.last_error()
                if name == "order_send":
                    self.send_account_update(call_id)
            except Exception as exc:  # TypeError/SystemError from the package: an answer
                lost = transport_failure(exc)
                if lost is not None:
                    exc = lost
                    self.backend = None  # a fresh connection at the next call
                try:
                    self.send(("raised", call_id, exc))
                except Exception:  # an exception that does not pickle: its text does
                    self.send(("raised", call_id,
                               RuntimeError(f"{type(exc).__name__}: {exc}")))
                continue
            self.send(("ok", call_id, result, error))


def serve(inbox: Inbox, outbox: BinaryIO) -> None:
    """The worker process's loop: the recipe, then calls until EOF."""
    recipe = inbox.read()
    terminal = Terminal(inbox, outbox, recipe)
    server_time = getattr(terminal.backend, "server_time", None)
    offset = server_time() - time.time() if callable(server_time) else None
    terminal.send(("ready", offset))
    try:
        terminal.run()
    except (EOFError, OSError):
        # The parent is gone or has let go of us: nothing will read an answer. No cleanup
        # can be trusted in a terminal that may be stuck: leave at once.
        os._exit(0)


def main() -> None:
    # Ctrl-C reaches the whole process group; the parent decides when this process ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inbox = Inbox(sys.stdin.fileno())
    # The channel is a private copy of stdout; fd 1 itself now goes to stderr, so a stray
    # print (ours or the backend's) cannot corrupt a frame.
    outbox = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(inbox, outbox)


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: the exceptions pickled back to the
    # parent must be named actors.mt5.terminal_process.*, which the parent can import.
    from actors.mt5.terminal_process import main as imported_main

    imported_main()
