"""The process worker: each terminal's backend in its own OS process, over a pipe.

Why a process: the real ``MetaTrader5`` package is process-global (two terminals in one
process cross-wire) and a call stuck in it can only be abandoned by a thread. A process can
be killed. So a ``TerminalHost`` owns one child process (``python -m
actors.mt5.terminal_process``, started with ``trio.lowlevel.open_process``) that owns the
backend; calls and results cross its stdin/stdout as pickled frames.

Rules:

* One call at a time (a ``trio.Lock``, FIFO): replies come back in order on one pipe.
* The parent never blocks on the pipe: trio's process streams wait on the fds (IOCP on
  Windows), so no thread is started or left behind on this side.
* A call cancelled while the child works on it (its deadline passed) kills the child at
  once (SIGKILL) and reaps it. The worker is then *wedged* (``WorkerLost`` for every later
  call); the actor's next ``connect()`` takes a fresh ``ProcessWorker`` from the host, whose
  first call spawns a fresh process.
* A healthy process outlives the actor instance: a reconnect (``shutdown`` then
  ``initialize``) reuses it, so a simulated terminal keeps its account and its injected
  faults across restarts. The host is closed by its owner (the runtime, at shutdown).
* A child that dies by itself (EOF on the pipe) is reaped and reported as ``WorkerLost``.
* What belongs to the terminal's world, not to one process, outlives a killed one: the
  simulator's injected faults (a ``hang`` or ``ipc_timeout`` for 60 s lasts 60 s, though
  the worker that met it first was killed at its deadline) and its trade server's account
  (positions, orders, deals, balance: a broker keeps them when a terminal dies). The host
  keeps both and hands them to each new process before its first call. A fault injected
  while no process runs (it is being replaced) is kept for the next one, not refused.
"""

from __future__ import annotations

import contextlib
import itertools
import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import trio

from actors.mt5.terminal_process import FRAME_HEADER, BackendRecipe, frame
from actors.mt5.worker import CallResult, WorkerLost

# A SIGKILLed process is gone within milliseconds: reaping it is bounded by this.
_REAP_TIMEOUT_S = 5.0
# A clean stop: the child exits on EOF; this long before it is killed instead.
_CLOSE_TIMEOUT_S = 2.0
_READ_CHUNK = 1 << 16


class TerminalHost:
    """Owns the worker process of one terminal, across actor instances."""

    def __init__(self, recipe: BackendRecipe, name: str = "mt5") -> None:
        self.recipe = recipe
        self.name = name
        self.started = 0  # processes spawned
        self.killed = 0  # processes killed at a deadline
        self._process: trio.Process | None = None
        self._buffer = bytearray()
        self._server_time_offset: float | None = None
        self._ids = itertools.count(1)
        self._lock = trio.Lock()  # one call at a time
        self._send_lock = trio.Lock()  # a call and an inject may send at once
        self._generation = 0  # bumped on every kill: old workers are wedged for good
        self._closed = False
        self._faults = FaultLedger()
        self._account: dict[str, Any] | None = None  # the simulator's trade server's side

    # ------------------------------------------------------------------ public
    def worker(self) -> ProcessWorker:
        """A worker on this host's current (or next) process."""
        if self._closed:
            raise WorkerLost(f"the {self.name} terminal host is closed")
        return ProcessWorker(self, self._generation)

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def server_time(self) -> float:
        """The terminal's server time now (the simulator's, else the wall clock)."""
        return time.time() + (self._server_time_offset or 0.0)

    async def inject(self, fault: str, *, duration_s: float | None = None,
                     **params: Any) -> None:
        """``sim.inject`` for the simulator inside the worker process."""
        if self.recipe.kind != "simulator":
            raise ValueError("sim.inject needs the MT5 simulator backend")
        # Validate here, where the operator gets the error: a throwaway simulator refuses
        # exactly what the one in the child would.
        from actors.mt5.simulator import TerminalSimulator

        TerminalSimulator(clock=time.monotonic).inject(fault, duration_s=duration_s, **params)
        if self._closed:
            raise ValueError(f"the {self.name} terminal host is closed")
        self._faults.record(fault, duration_s, params)
        process = self._process
        if process is None or process.returncode is not None:
            return  # the next process gets it before its first call (_spawn)
        # The child's reader thread applies it at once, even during a hung call.
        with contextlib.suppress(WorkerLost):  # it died meanwhile: for the next process
            await self._send(process, ("inject", next(self._ids), fault, duration_s, params))
            self._faults.delivered([fault])

    async def start(self, timeout_s: float = 60.0) -> None:
        """Spawn the process ahead of the actor's first connect, so that its deadline does not
        pay for Python's start-up on a loaded machine. A failure here is left to that connect,
        which spawns again and reports it."""
        async with self._lock:
            if self._process is not None or self._closed:
                return
            with trio.move_on_after(timeout_s):
                try:
                    await self._spawn()
                except WorkerLost:
                    return
                except BaseException:
                    await self._kill()  # cancelled mid start-up: no half-started child
                    raise

    async def aclose(self) -> None:
        """Stop the process: EOF first (it exits by itself), then SIGKILL. Reaps it."""
        self._closed = True
        process, self._process = self._process, None
        if process is None:
            return
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_CLOSE_TIMEOUT_S):
                if process.stdin is not None:
                    await process.stdin.aclose()
                await process.wait()
            await self._reap(process)

    # ------------------------------------------------------------------ calls
    async def call(self, generation: int, name: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> tuple[Any, ...]:
        async with self._lock:
            if generation != self._generation or self._closed:
                raise WorkerLost("the terminal worker process was replaced")
            process = self._process
            if process is not None and process.returncode is not None:
                await self._kill()  # died by itself since the last call
                raise WorkerLost("the terminal worker process died")
            try:
                if process is None:
                    process = await self._spawn()
                call_id = next(self._ids)
                await self._send(process, ("call", call_id, name, args, kwargs))
                while True:
                    reply = await self._receive(process)
                    if reply[0] == "account":
                        self._account = merged_account(self._account, reply[2])
                    elif reply[1] == call_id:
                        return reply
            except WorkerLost:
                raise
            except BaseException:
                # Cancelled mid-call (its deadline): the child may be stuck in the
                # terminal. Kill it now, so nothing of this call reaches the terminal
                # later; the next worker respawns.
                self.killed += 1
                await self._kill()
                raise

    async def _spawn(self) -> trio.Process:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "actors.mt5.terminal_process"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._process, self._buffer = process, bytearray()
        self.started += 1
        await self._send(process, self.recipe)
        ready = await self._receive(process)
        if ready[0] != "ready":
            await self._kill()
            raise WorkerLost(f"the terminal worker process said {ready[0]!r} at start")
        self._server_time_offset = ready[1]
        # The terminal's world as the last process left it, before any call. One write: an
        # inject (say a clear) arriving meanwhile cannot land between the replayed faults.
        due = self._faults.replay()
        messages: list[Any] = [("inject", next(self._ids), fault, duration_s, params)
                               for fault, duration_s, params in due]
        if self._account is not None:
            messages.insert(0, ("restore", next(self._ids), self._account))
        if messages:
            await self._send(process, *messages)
            self._faults.delivered([fault for fault, _, _ in due])
        return process

    async def _send(self, process: trio.Process, *messages: Any) -> None:
        assert process.stdin is not None
        async with self._send_lock:
            try:
                await process.stdin.send_all(b"".join(frame(m) for m in messages))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if self._process is process:  # not a newer one started meanwhile
                    await self._kill()
                raise WorkerLost(f"the terminal worker process is gone "
                                 f"({type(exc).__name__})") from None

    async def _receive(self, process: trio.Process) -> tuple[Any, ...]:
        """The next frame from the child; EOF: it is reaped and ``WorkerLost`` raised."""
        assert process.stdout is not None
        while True:
            if len(self._buffer) >= FRAME_HEADER:
                size = int.from_bytes(self._buffer[:FRAME_HEADER], "little")
                if len(self._buffer) >= FRAME_HEADER + size:
                    data = bytes(self._buffer[FRAME_HEADER:FRAME_HEADER + size])
                    del self._buffer[:FRAME_HEADER + size]
                    return pickle.loads(data)  # type: ignore[no-any-return]
            try:
                chunk = await process.stdout.receive_some(_READ_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                await self._kill()
                raise WorkerLost("the terminal worker process is gone (end of its pipe)")
            self._buffer += chunk

    # ------------------------------------------------------------------ process
    async def _kill(self) -> None:
        self._generation += 1
        process, self._process = self._process, None
        if process is not None:
            with trio.CancelScope(shield=True):
                await self._reap(process)

    async def _reap(self, process: trio.Process) -> None:
        """SIGKILL unless it has exited; wait for it (bounded) so no zombie is left."""
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(_REAP_TIMEOUT_S):
            await process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                await stream.aclose()


# Faults a process can use up (one per order): delivered once, never replayed.
_COUNTED_FAULTS = frozenset({"market_retcode", "lost_reply"})


class FaultLedger:
    """The simulator faults in force, kept by the host across worker processes.

    Conditions (``hang``, ``ipc_timeout``, ``terminal_crash``, ...) are replayed into every
    new process with what is left of their duration; a counted fault (``market_retcode``,
    ``lost_reply``) belongs to the process it reached, and is replayed only if it was
    injected while no process ran. ``clear`` forgets them all, as it does in the simulator.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # fault -> (ends at, or None until cleared; params; delivered to a process)
        self._faults: dict[str, tuple[float | None, dict[str, Any], bool]] = {}

    def record(self, fault: str, duration_s: float | None, params: Mapping[str, Any]
               ) -> None:
        if fault == "clear":
            self._faults.clear()
            return
        if fault == "broker_disconnect" and duration_s is None:
            from actors.mt5.simulator import BROKER_RECONNECT_S

            duration_s = BROKER_RECONNECT_S  # it heals by itself, as in the simulator
        ends = None if duration_s is None else self._clock() + duration_s
        self._faults.pop(fault, None)  # re-inserted last: replayed in injection order
        self._faults[fault] = (ends, dict(params), False)

    def delivered(self, faults: Iterable[str]) -> None:
        """These reached a process (its pipe took them): a counted one is that process's."""
        for fault in faults:
            if fault in self._faults:
                ends, params, _ = self._faults[fault]
                self._faults[fault] = (ends, params, True)

    def replay(self) -> list[tuple[str, float | None, dict[str, Any]]]:
        """(fault, remaining duration or None, params) for a new process, in order."""
        now = self._clock()
        due = []
        for fault, (ends, params, delivered) in list(self._faults.items()):
            if (ends is not None and ends <= now) or (delivered and fault in _COUNTED_FAULTS):
                del self._faults[fault]
                continue
            due.append((fault, None if ends is None else ends - now, params))
        return due


def merged_account(known: dict[str, Any] | None, update: Mapping[str, Any]
                   ) -> dict[str, Any]:
    """The account so far plus an ``account_state`` update (whose history is only what is
    new since the last one)."""
    merged = dict(update)
    # Extended in place: the history only grows, and an order must not copy all of it.
    merged["history_orders"] = known["history_orders"] if known is not None else []
    merged["deals"] = known["deals"] if known is not None else []
    merged["history_orders"].extend(update["history_orders"])
    merged["deals"].extend(update["deals"])
    return merged


class ProcessWorker:
    """The ``Worker`` interface over a ``TerminalHost``: valid for one process generation."""

    def __init__(self, host: TerminalHost, generation: int) -> None:
        self.host = host
        self._generation = generation
        self.wedged = False
        self._retired = False

    async def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> CallResult:
        if self.wedged or self._retired:
            raise WorkerLost("the terminal worker is no longer usable")
        try:
            reply = await self.host.call(self._generation, name, args, kwargs)
        except BaseException:
            # Lost, or cancelled while the child worked on it (the host killed it); a call
            # cancelled while waiting its turn leaves the process, and this worker, alone.
            if self.host.generation != self._generation:
                self.wedged = True
            raise
        if reply[0] == "raised":
            raise reply[2]
        return reply[2], reply[3]

    def server_time(self) -> float:
        return self.host.server_time()

    def retire(self) -> None:
        """Nothing to stop: a wedged worker's process is already killed and reaped; a
        healthy one stays for the actor's next instance."""
        self._retired = True
