"""Who runs backend calls: a dedicated thread (production) or an inline trio worker (simulator).

Why two: the real ``MetaTrader5`` package is blocking and not thread-safe, so one dedicated
thread owns it, and ``last_error()`` is read in the same thread step as the call that failed
(another call in between would overwrite it). On trio's virtual clock a real thread's work is
invisible — the clock jumps while it runs and deadlines fire falsely — so the simulator can
also run inline: its slow calls and hangs become trio sleeps and events the clock sees.

Both implement ``await worker.call(name, args, kwargs) -> (result, last_error)``. A call
cancelled while it runs (its deadline passed) *wedges* the worker: it refuses every later
call with ``WorkerLost``, so nothing new reaches the terminal until the actor has put a fresh
worker in place. A wedged thread cannot be killed; it is abandoned (a daemon thread, counted
in ``ABANDONED``) and exits on its own if the call ever returns.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import outcome
import trio

Backend = Any  # an object with the MetaTrader5 function names
CallResult = tuple[Any, tuple[int, str]]


class WorkerLost(Exception):
    """The worker was wedged by an abandoned call or has been retired."""


class Worker(Protocol):
    wedged: bool

    async def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> CallResult: ...

    def retire(self) -> None: ...


class AbandonedThreads:
    """Counts worker threads given up on (process-wide: they outlive their actor)."""

    def __init__(self) -> None:
        self.total = 0
        self._alive: set[threading.Thread] = set()

    def add(self, thread: threading.Thread) -> None:
        self.total += 1
        self._alive.add(thread)

    @property
    def alive(self) -> int:
        self._alive = {t for t in self._alive if t.is_alive()}
        return len(self._alive)


ABANDONED = AbandonedThreads()


def _delay_of(backend: Backend, name: str) -> Any:
    """The simulator tells its worker how long a call takes; a real backend does not."""
    before = getattr(backend, "before_call", None)
    return before(name) if before is not None else None


class InlineWorker:
    """Runs simulator calls on the trio thread; delays and hangs are trio waits.

    Calls run one at a time in arrival order, like the thread's queue: a call that arrives
    while another runs (the health probe during a slow request) waits its turn."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.wedged = False
        self._retired = False
        self._lock = trio.Lock()  # FIFO

    async def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> CallResult:
        # ``wedged`` also marks the call in progress: check it only once it is our turn.
        # Acquiring the lock is this call's checkpoint.
        async with self._lock:
            return await self._call_locked(name, args, kwargs)

    async def _call_locked(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
                           ) -> CallResult:
        if self.wedged or self._retired:  # the call before this one was abandoned
            raise WorkerLost("the terminal worker is no longer usable")
        self.wedged = True  # until this call completes: a cancellation leaves it wedged
        delay = _delay_of(self.backend, name)
        if delay is not None:
            if delay.seconds:
                await trio.sleep(delay.seconds)
            if delay.hang is not None and not delay.hang.released:
                released = trio.Event()
                token = trio.lowlevel.current_trio_token()
                delay.hang.add_listener(lambda: token.run_sync_soon(released.set))
                await released.wait()
        if self._retired:
            raise WorkerLost("the terminal worker was retired")
        try:
            result = getattr(self.backend, name)(*args, **kwargs)
        except Exception:
            # The package raises for some bad arguments (TypeError, SystemError): the call
            # has returned, so the worker is not wedged.
            self.wedged = False
            raise
        error = self.backend.last_error()
        self.wedged = False
        return result, error

    def retire(self) -> None:
        self._retired = True


class _Job:
    __slots__ = ("name", "args", "kwargs", "deliver", "abandoned", "started")

    def __init__(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                 deliver: Callable[[outcome.Outcome], None]) -> None:
        self.name = name
        self.args = args
        self.kwargs = kwargs
        self.deliver = deliver
        self.abandoned = False
        self.started = False


_STOP = object()
_thread_ids = itertools.count(1)


class ThreadWorker:
    """One dedicated daemon thread owns the backend; jobs run strictly one at a time."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.wedged = False
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self.thread = threading.Thread(target=self._loop, daemon=True,
                                       name=f"mt5-worker-{next(_thread_ids)}")
        self.thread.start()
        self._retired = False

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            # Started before the abandoned check: an abort that comes between them sees
            # ``started`` and wedges the worker, so a job can never hang unnoticed.
            job.started = True
            if job.abandoned:
                continue
            delay = _delay_of(self.backend, job.name)
            if delay is not None:
                if delay.seconds:
                    time.sleep(delay.seconds)
                if delay.hang is not None and not delay.hang.released:
                    released = threading.Event()
                    delay.hang.add_listener(released.set)
                    released.wait()
            if job.abandoned or self._retired:
                continue  # nothing new reaches the terminal from an abandoned worker
            result = outcome.capture(self._run, job)
            try:
                self._token.run_sync_soon(job.deliver, result)
            except trio.RunFinishedError:
                return

    def _run(self, job: _Job) -> CallResult:
        # The call and last_error() in the same thread step, nothing in between.
        result = getattr(self.backend, job.name)(*job.args, **job.kwargs)
        return result, self.backend.last_error()

    async def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> CallResult:
        if self.wedged or self._retired:
            raise WorkerLost("the terminal worker is no longer usable")
        task = trio.lowlevel.current_task()
        box: list[outcome.Outcome] = []

        def deliver(result: outcome.Outcome) -> None:
            if job.abandoned:
                return
            box.append(result)
            trio.lowlevel.reschedule(task)

        job = _Job(name, args, kwargs, deliver)

        def abort(_: object) -> trio.lowlevel.Abort:
            job.abandoned = True
            if job.started:
                self.wedged = True  # the thread may be stuck inside the terminal
            return trio.lowlevel.Abort.SUCCEEDED

        self._jobs.put(job)
        await trio.lowlevel.wait_task_rescheduled(abort)
        return box[0].unwrap()

    def retire(self) -> None:
        """Stop the thread; a wedged one is abandoned instead of joined."""
        if self._retired:
            return
        self._retired = True
        self._jobs.put(_STOP)
        if self.wedged and self.thread.is_alive():
            ABANDONED.add(self.thread)
