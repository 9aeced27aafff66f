"""Waiting in tests: the one ``eventually`` and the one ``in_thread``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")


async def in_thread(fn: Callable[[], T]) -> T:
    """Blocking work (server control, a sync client) off the trio thread."""
    return await trio.to_thread.run_sync(fn)


async def eventually(predicate: Callable[[], bool], within_s: float = 5.0,
                     interval_s: float = 0.005) -> None:
    """Until ``predicate()`` holds, at most ``within_s`` (``trio.TooSlowError`` past it).

    For state that offers no ``trio.Event`` to wait on (views, counters, another process),
    observed from outside as a test must. On the virtual clock the polling costs nothing.
    """
    with trio.fail_after(within_s):
        while not predicate():  # noqa: ASYNC110 - nothing to wait on but the state itself
            await trio.sleep(interval_s)
