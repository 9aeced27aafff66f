"""Fan-out of published events to subscribers, each with its own bounded buffer.

Why: the supervisor must never wait for a consumer. ``publish`` is synchronous and O(number
of subscribers): it appends to each subscriber's deque and wakes it. A subscriber whose
buffer is full stops receiving; it is owed a ``Missed`` notice (how many, and the ``seq`` to
resume after) which it receives before anything else, and it may then resume from the log
with ``subscribe(since_seq=...)``. Other subscribers and the supervisor are unaffected.

Resume is gap-free: ``subscribe(since_seq=n)`` registers the live buffer first and then
replays seq ``n+1 .. head`` from the log, so an event published in between is neither lost
nor delivered twice.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

import attrs
import trio

from supervision.eventlog import EventLog
from supervision.events import Event


@attrs.frozen
class Missed:
    """The subscriber's buffer overflowed: ``count`` events after ``after_seq`` were dropped."""

    count: int
    after_seq: int  # the last seq delivered (or replayed) before the gap; resume from here


Item = Event | Missed
EventFilter = Callable[[Event], bool]


class Subscription:
    def __init__(
        self, bus: EventBus, maxlen: int, event_filter: EventFilter | None, after_seq: int
    ) -> None:
        self._bus = bus
        self.maxlen = maxlen
        self._filter = event_filter
        self._buffer: collections.deque[Event] = collections.deque()
        self._wakeup = trio.Event()
        self._missed = 0
        self._missed_after = after_seq
        self.last_seq = after_seq  # last seq handed to the consumer
        self._offered = after_seq  # highest seq offered to this subscription
        self._closed = False
        self.head_seq = after_seq

    # called by the bus, synchronously, from publish()
    def _offer(self, event: Event) -> None:
        if event.seq <= self._offered:
            return  # already queued (replay and live publication overlap)
        self._offered = event.seq
        if self._filter is not None and not self._filter(event):
            return
        if self._missed or len(self._buffer) >= self.maxlen:
            if not self._missed:
                self._missed_after = self._buffer[-1].seq if self._buffer else self.last_seq
            self._missed += 1
        else:
            self._buffer.append(event)
        self._wakeup.set()

    def _close(self) -> None:
        self._closed = True
        self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def get_nowait(self) -> Item | None:
        if self._buffer:
            event = self._buffer.popleft()
            self.last_seq = event.seq
            return event
        if self._missed:
            missed = Missed(self._missed, self._missed_after)
            self._missed = 0
            return missed
        return None

    async def get(self) -> Item:
        while True:
            item = self.get_nowait()
            if item is not None:
                return item
            if self._closed:
                raise trio.EndOfChannel
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    def __aiter__(self) -> AsyncIterator[Item]:
        return self

    async def __anext__(self) -> Item:
        try:
            return await self.get()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


class EventBus:
    def __init__(self, log: EventLog | None = None, *, default_buffer: int = 1000) -> None:
        self._log = log
        self._subs: set[Subscription] = set()
        self.default_buffer = default_buffer
        self.head_seq = log.last_seq if log is not None else 0
        self.published = 0
        self._closed = False

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    def publish(self, events: Iterable[Event]) -> None:
        for event in events:
            self.head_seq = event.seq
            self.published += 1
            for sub in self._subs:
                sub._offer(event)

    def close(self) -> None:
        self._closed = True
        for sub in list(self._subs):
            sub._close()

    def open_subscription(
        self,
        *,
        since_seq: int | None = None,
        buffer: int | None = None,
        event_filter: EventFilter | None = None,
    ) -> Subscription:
        """Register a subscriber. ``since_seq=None``: only new events; ``n``: replay seq > n
        from the log first. Replay is bounded by the buffer: beyond it the subscriber gets a
        ``Missed`` notice and resumes in further steps. Synchronous (no checkpoint)."""
        head = self.head_seq
        # A since_seq beyond the head (a consumer that saw more than this log holds, e.g.
        # after the log was replaced) delivers only events after it, never older ones.
        start = head if since_seq is None else max(0, since_seq)
        sub = Subscription(self, buffer or self.default_buffer, event_filter, start)
        sub.head_seq = head
        if since_seq is not None and start < head and self._log is not None:
            if not self._log.tail_covers(start):
                raise LookupError("resume point is older than the in-memory tail")
            for event in self._log.read_tail(start):
                sub._offer(event)
        if self._closed:
            sub._close()
        self._subs.add(sub)
        return sub

    async def open_subscription_from_disk(
        self, *, since_seq: int, buffer: int | None = None, event_filter: EventFilter | None = None
    ) -> Subscription:
        """Like ``open_subscription`` but also serves a resume point older than the memory tail
        by reading the log file in a worker thread, then catching up without gaps."""
        assert self._log is not None
        log = self._log
        if log.tail_covers(since_seq):
            return self.open_subscription(since_seq=since_seq, buffer=buffer,
                                          event_filter=event_filter)
        limit = buffer or self.default_buffer
        old = await trio.to_thread.run_sync(lambda: log.read_since(since_seq, limit=limit))
        sub = Subscription(self, limit, event_filter, since_seq)
        for event in old:
            sub._offer(event)
        last = old[-1].seq if old else since_seq
        # Anything between the disk read and now comes from memory, or is reported as missed.
        if log.tail_covers(last):
            for event in log.read_tail(last):
                sub._offer(event)
        else:
            sub._missed += self.head_seq - last
            sub._missed_after = last
        sub.head_seq = self.head_seq
        self._subs.add(sub)
        return sub

    def close_subscription(self, sub: Subscription) -> None:
        self._subs.discard(sub)
        sub._close()

    @asynccontextmanager
    async def subscribe(
        self,
        *,
        since_seq: int | None = None,
        buffer: int | None = None,
        actors: Iterable[str] | None = None,
        kinds: Iterable[str] | None = None,
    ) -> AsyncIterator[Subscription]:
        event_filter = make_filter(actors, kinds)
        if since_seq is not None and self._log is not None and not self._log.tail_covers(
            since_seq
        ):
            sub = await self.open_subscription_from_disk(
                since_seq=since_seq, buffer=buffer, event_filter=event_filter
            )
        else:
            sub = self.open_subscription(since_seq=since_seq, buffer=buffer,
                                         event_filter=event_filter)
        try:
            yield sub
        finally:
            self.close_subscription(sub)


def make_filter(
    actors: Iterable[str] | None, kinds: Iterable[str] | None
) -> EventFilter | None:
    actor_set = frozenset(actors) if actors else None
    kind_set = frozenset(kinds) if kinds else None
    if actor_set is None and kind_set is None:
        return None

    def accept(event: Event) -> bool:
        return (actor_set is None or event.actor in actor_set) and (
            kind_set is None or event.kind in kind_set
        )

    return accept
