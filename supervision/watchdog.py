"""The deadline watchdog: one task per cell that answers every call whose deadline passes.

Why not a cancel scope per call: entering and leaving a deadline scope is the single
largest cost of a round trip. Callers instead push ``(deadline, reply)`` on a heap and
park; the watchdog sleeps until the earliest deadline and answers the replies still waiting
with ``NoAnswer.DEADLINE_PASSED``. Answered replies are dropped lazily, and the heap is
compacted when it grows, so its size stays near the number of calls in flight.
"""

from __future__ import annotations

import heapq
import itertools
import math

import trio

from supervision.reply import NoAnswer, Reply


class DeadlineWatchdog:
    COMPACT_AT = 4096

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Reply]] = []
        self._order = itertools.count()
        self._scope: trio.CancelScope | None = None
        self._sleeping_until = math.inf
        self._compact_at = self.COMPACT_AT

    def watch(self, deadline: float, reply: Reply) -> None:
        heapq.heappush(self._heap, (deadline, next(self._order), reply))
        if deadline < self._sleeping_until and self._scope is not None:
            self._sleeping_until = deadline
            self._scope.deadline = deadline  # wake earlier than planned
        if len(self._heap) >= self._compact_at:
            self._heap = [item for item in self._heap if not item[2].done]
            heapq.heapify(self._heap)
            self._compact_at = max(self.COMPACT_AT, 2 * len(self._heap))

    def expire_all(self) -> None:
        """The cell is gone: nobody will answer these."""
        heap, self._heap = self._heap, []
        for _, _, reply in heap:
            reply.set_value(NoAnswer.CELL_ENDED)

    async def run(self) -> None:
        while True:
            while self._heap and self._heap[0][2].done:
                heapq.heappop(self._heap)
            heap = self._heap
            with trio.CancelScope() as scope:
                self._sleeping_until = heap[0][0] if heap else math.inf
                scope.deadline = self._sleeping_until
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            now = trio.current_time()
            while self._heap and self._heap[0][0] <= now:
                _, _, reply = heapq.heappop(self._heap)
                reply.set_value(NoAnswer.DEADLINE_PASSED)
