"""Event persistence: every supervision event reaches table ``supervision_events``.

How nothing is lost and nothing doubled:

* The log file is the source of truth. The actor asks the database for the highest ``seq``
  it holds, subscribes to the bus from that ``seq`` (the bus replays older events from the
  log, then continues live, without a gap) and writes batches through the ``questdb`` actor.
* There is no separate bookkeeping to get out of step: "what is persisted" is read back from
  the table itself. A runtime killed between a batch insert and anything else simply replays
  from ``max(seq)`` and the table's key (``DEDUP UPSERT KEYS(ts, seq)`` on QuestDB, the
  primary key on PostgreSQL) drops the rows it already has.
* While the database is down, writes fail; the actor waits and starts over from
  ``max(seq)``. It waits ``retry_s`` doubling up to ``max_retry_s``, or until the ``questdb``
  actor is CONNECTED again (a ``state_changed`` event on the bus), whichever comes first, so
  the backlog is replayed as soon as the database is back. A subscription overflow is handled
  the same way.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from supervision.actor import Actor
from supervision.bus import EventBus, Missed
from supervision.errors import ErrorCode
from supervision.eventlog import EventLog
from supervision.events import Event

log = logging.getLogger("mt5_supervisor.persistence")


class EventStoreActor(Actor):
    def __init__(self, bus: EventBus, event_log: EventLog, questdb: Any, *,
                 batch_size: int = 500, linger_s: float = 0.05,
                 retry_s: float = 1.0, max_retry_s: float = 15.0) -> None:
        self.name = "events_store"
        self._bus = bus
        self._log = event_log
        self._questdb = questdb
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self.persisted_seq = 0
        self.batches = 0
        self.failures = 0
        self.skipped: list[int] = []  # seqs the database refused outright

    async def serve(self) -> None:
        delay = self.retry_s
        while True:
            if await self._run_once():
                delay = self.retry_s
            else:
                self.failures += 1
                await self._wait_for_database(delay)
                delay = min(delay * 2, self.max_retry_s)

    async def _wait_for_database(self, delay: float) -> None:
        """Sleep ``delay``, cut short when the questdb actor (re)connects. Subscribed right
        after the failure with no checkpoint in between, so a reconnect is not missed."""
        name = getattr(self._questdb, "name", "questdb")
        with trio.move_on_after(delay):
            async with self._bus.subscribe(actors=[name], kinds=["state_changed"]) as changes:
                async for item in changes:
                    if isinstance(item, Event) and item.to_state == "CONNECTED":
                        return

    async def _run_once(self) -> bool:
        """Persist from the table's max(seq) onwards until something fails (returns False),
        or an overflow asks for a fresh start (returns True)."""
        resp = await self._questdb.call("max_persisted_seq")
        if not resp.ok:
            return False
        last = int(resp.data or 0)
        self.persisted_seq = max(self.persisted_seq, last)
        buffer = max(10 * self.batch_size, 10_000)
        async with self._bus.subscribe(since_seq=last, buffer=buffer) as sub:
            while True:
                batch, overflow = await self._next_batch(sub)
                if batch:
                    outcome = await self._persist_batch(batch)
                    if outcome == "failed":
                        return False
                    if outcome == "restart":
                        return True  # start over from the table's max(seq)
                    self.persisted_seq = batch[-1].seq
                    self.batches += 1
                if overflow:
                    return True

    async def _persist(self, events: list[Event]) -> Any:
        return await self._questdb.call("persist_events",
                                        {"events": [e.to_json() for e in events]})

    async def _persist_batch(self, batch: list[Event]) -> str:
        """Write one batch: "ok", "failed" (an outage: the caller waits and starts over from
        the table's max(seq)) or "restart" (start over now).

        A batch the database *refuses* (a query error: the server is up) first makes us
        look at the table: if it holds less than we know we wrote (dropped, truncated,
        lost), start over from its max(seq), which refills it from the log. Otherwise the
        batch is tried once more, then event by event, and only the events the database
        still refuses are skipped: one poison event must not hold up every later one
        forever. Skipped events stay in the log file, the source of truth, and are listed
        in the actor's status."""
        resp = await self._persist(batch)
        if resp.ok:
            return "ok"
        if _refused(resp):
            table = await self._questdb.call("max_persisted_seq")  # re-creates a lost table
            if table.ok and int(table.data or 0) < self.persisted_seq:
                log.warning("the events table holds up to seq %s, less than the %d written: "
                            "refilling it from the log", table.data, self.persisted_seq)
                self.persisted_seq = int(table.data or 0)
                return "restart"
            resp = await self._persist(batch)
            if resp.ok:
                return "ok"
        if not _refused(resp):
            log.warning("persisting events %d..%d failed: %s", batch[0].seq, batch[-1].seq,
                        resp.error.message if resp.error else "")
            return "failed"
        for event in batch:
            one = await self._persist([event])
            if one.ok:
                continue
            if not _refused(one):
                return "failed"
            self.skipped.append(event.seq)
            log.error("event %d was refused by the database and is skipped (it stays in "
                      "the log): %s", event.seq, one.error.message if one.error else "")
        return "ok"

    async def _next_batch(self, sub: Any) -> tuple[list[Event], bool]:
        batch: list[Event] = []
        first = await sub.get()
        if isinstance(first, Missed):
            return batch, True
        batch.append(first)
        with trio.move_on_after(self.linger_s):
            while len(batch) < self.batch_size:
                item = sub.get_nowait()
                if item is None:
                    item = await sub.get()
                if isinstance(item, Missed):
                    return batch, True
                batch.append(item)
        return batch, False

    def status_extra(self) -> dict[str, Any]:
        return {"persisted_seq": self.persisted_seq, "log_seq": self._log.last_seq,
                "skipped_seqs": self.skipped[-20:], "skipped": len(self.skipped),
                "batches": self.batches, "failures": self.failures}


def _refused(resp: Any) -> bool:
    """The database answered and said no (not an outage, not our own deadline)."""
    return resp.error is not None and resp.error.code in (ErrorCode.DB_QUERY_FAILED,
                                                          ErrorCode.INVALID_REQUEST)
