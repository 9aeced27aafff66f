"""A one-shot reply slot for actor requests.

Why not a memory channel per request: a request/reply round trip should cost about what a
raw channel ping-pong costs. The caller parks itself once with ``wait_task_rescheduled``; the
actor reschedules it with the outcome. If the caller is cancelled (its deadline passed) the
slot is marked abandoned and a late reply is dropped.

A slot the handler never answered holds a ``NoAnswer`` marker instead of an exception: the
call path turns each into its ``Failure`` (one exception type, ``CallFailed``, carries
failures; these are only control flow, and cheaper than raising).
"""

from __future__ import annotations

import enum
from typing import Any

import outcome
import trio


class NoAnswer(enum.Enum):
    DEADLINE_PASSED = "deadline passed"  # set by the deadline watchdog
    NOT_RUN = "not run"  # reached the mailbox's front after its session ended: back to the gate
    CELL_ENDED = "cell ended"  # the cell is gone; nobody will answer


class Reply:
    __slots__ = ("_task", "_outcome", "abandoned")

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None
        self._outcome: outcome.Outcome[Any] | None = None
        self.abandoned = False

    def set(self, result: outcome.Outcome[Any]) -> None:
        if self.abandoned or self._outcome is not None:
            return
        if self._task is not None:
            task, self._task = self._task, None
            self._outcome = result
            trio.lowlevel.reschedule(task, result)
        else:
            self._outcome = result

    def set_value(self, value: Any) -> None:
        self.set(outcome.Value(value))

    def set_error(self, exc: BaseException) -> None:
        self.set(outcome.Error(exc))

    @property
    def done(self) -> bool:
        """Answered, expired or abandoned: nothing more will happen to this slot."""
        return self._outcome is not None or self.abandoned

    async def wait(self, *, checkpointed: bool = False) -> Any:
        """The outcome. ``checkpointed``: the caller has just passed a checkpoint (it sent
        the request), so an outcome already there is returned without another one."""
        if self._outcome is not None:
            if not checkpointed:
                await trio.lowlevel.checkpoint()
            return self._outcome.unwrap()
        self._task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._task = None
            self.abandoned = True
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)
