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
  the same way. A batch that fails because the database is unreachable (or the ``questdb``
  actor refuses calls) is an outage to wait out, never "poison" to skip.

Never silently (issue 8): every failure is logged with its operation and message, kept in
``last_error`` and counted in ``lag`` (log seq - persisted seq) in ``status_extra()`` (so in
``runtime.status`` and ``/metrics``), and two checks of this actor go to health:

* ``events_store:persistence`` — warn while persisting fails, lags by ``lag_warn_events`` or
  more, or makes no progress for ``stall_checks`` check intervals while behind.
* ``events_store:table`` — the table as the ``events_table`` op finds it every
  ``check_interval_s`` (a table found lost is refilled from the log at once): fail when its
  WAL is suspended (QuestDB applies nothing; the output gives the remedy ``ALTER TABLE
  supervision_events RESUME WAL``) or when it cannot guarantee exactly-once (not WAL, wrong
  designated timestamp or columns); warn right after a repair (DEDUP re-enabled). While the
  table is unusable nothing is written and nothing is skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from supervision.actor import Actor
from supervision.bus import EventBus, Missed
from supervision.errors import ErrorCode
from supervision.eventlog import EventLog
from supervision.events import Event
from supervision.messages import check_notice

log = logging.getLogger("mt5_supervisor.persistence")

PERSISTENCE_CHECK = "persistence"
CHECK_INTERVAL_S = 5.0  # how often the table and the lag are looked at
TABLE_CHECK = "table"


def persistence_check(*, failing: bool, last_error: dict[str, Any] | None, lag: int,
                      stalled_checks: int, lag_warn_events: int, stall_checks: int
                      ) -> tuple[str, str]:
    """``(status, output)`` of ``events_store:persistence`` (pure)."""
    if failing and last_error:
        return "warn", (f"persisting events fails: {last_error['code']}: "
                        f"{last_error['message']}; {lag} events not persisted yet")
    if lag >= lag_warn_events:
        return "warn", f"persistence lags {lag} events behind the log"
    if lag > 0 and stalled_checks >= stall_checks:
        return "warn", f"persistence makes no progress: {lag} events not persisted"
    return "pass", "events persisted up to the log's last seq (or about to be)"


def table_lost(table: dict[str, Any], persisted_before: int) -> bool:
    """The table holds less than was acknowledged before ``events_table`` was asked
    (dropped, truncated, a replaced server), and that is not WAL lag: every committed WAL
    transaction was applied when ``max_seq`` was read, and the table is not suspended (pure)."""
    return (not table.get("problems") and not table.get("pending_txns")
            and not table.get("suspended")
            and int(table.get("max_seq") or 0) < persisted_before)


def table_check(table: dict[str, Any]) -> tuple[str, str]:
    """``(status, output)`` of ``events_store:table`` from an ``events_table`` answer (pure)."""
    name = table.get("table", "supervision_events")
    if table.get("problems"):
        return "fail", "; ".join(table["problems"]) + " (persisting is held, nothing skipped)"
    if table.get("suspended"):
        why = f" ({table['wal_error']})" if table.get("wal_error") else ""
        return "fail", (f"table {name} is suspended{why}: QuestDB applies no more writes "
                        f"(they wait in its WAL). Remedy: ALTER TABLE {name} RESUME WAL")
    if table.get("repaired"):
        return "warn", ("repaired: " + "; ".join(table["repaired"])
                        + " (rows written while it was wrong may be doubled)")
    return "pass", f"table {name} ok"


class EventStoreActor(Actor):
    def __init__(self, bus: EventBus, event_log: EventLog, questdb: Any, *,
                 batch_size: int = 500, linger_s: float = 0.05,
                 retry_s: float = 1.0, max_retry_s: float = 15.0,
                 check_interval_s: float | None = None, lag_warn_events: int = 10_000,
                 stall_checks: int = 3,
                 raise_seq_floor: Callable[[int, str], None] | None = None) -> None:
        self.name = "events_store"
        self._bus = bus
        self._log = event_log
        self._questdb = questdb
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self.check_interval_s = CHECK_INTERVAL_S if check_interval_s is None else check_interval_s
        self.lag_warn_events = lag_warn_events
        self.stall_checks = stall_checks
        # Moves the runtime's numbering above what the table holds (a lost log and mark).
        self._raise_seq_floor = raise_seq_floor
        self.persisted_seq = 0
        self.batches = 0
        self.failures = 0
        self.skipped: list[int] = []  # seqs the database refused outright
        self.last_error: dict[str, Any] | None = None
        self.failing = False
        self.table: dict[str, Any] = {}
        self._stalled_checks = 0
        self._reported: dict[str, tuple[str, str]] = {}
        self._persisting = trio.CancelScope()  # the current pass of the persisting loop

    @property
    def lag(self) -> int:
        return max(0, self._log.last_seq - self.persisted_seq)

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch)
            delay = self.retry_s
            while True:
                with trio.CancelScope() as self._persisting:
                    ok = await self._run_once()
                if self._persisting.cancelled_caught:
                    ok = True  # the watch found the table lost: start over from it now
                if ok:
                    delay = self.retry_s
                else:
                    self.failures += 1
                    self._report_persistence()
                    await self._wait_for_database(delay)
                    delay = min(delay * 2, self.max_retry_s)

    # ------------------------------------------------------------------ checks
    async def _watch(self) -> None:
        """Every ``check_interval_s``: look at the table (suspended? repaired?) and at the lag."""
        last_persisted = self.persisted_seq
        while True:
            # First sleep: every (re)start of the persisting loop looks at the table itself.
            await trio.sleep(self.check_interval_s)
            persisted_before = self.persisted_seq
            table = await self._check_table()
            if table is not None and table_lost(table, persisted_before):
                self._refill(table)
                self._persisting.cancel()
            if self.lag > 0 and self.persisted_seq == last_persisted:
                self._stalled_checks += 1
            else:
                self._stalled_checks = 0
            last_persisted = self.persisted_seq
            self._report_persistence()

    async def _check_table(self) -> dict[str, Any] | None:
        resp = await self._questdb.call("events_table")
        if not resp.ok:
            self._failed("events_table", resp)
            return None
        table = dict(resp.data)
        self.table = {k: v for k, v in table.items() if k != "max_seq"}
        for statement in table.get("repaired", ()):
            log.warning("events table repaired: %s", statement)
        if table.get("problems"):
            log.error("the events table cannot guarantee exactly-once, persisting is held: %s",
                      "; ".join(table["problems"]))
        self._report(TABLE_CHECK, *table_check(table))
        return table

    def _refill(self, table: dict[str, Any]) -> None:
        log.warning("the events table holds up to seq %s, less than the %d written: "
                    "refilling it from the log", table.get("max_seq"), self.persisted_seq)
        self.persisted_seq = int(table.get("max_seq") or 0)

    def _report(self, check: str, status: str, output: str, cause: str | None = None) -> None:
        """Send a check_changed notice when the status or its cause changed (``cause``
        defaults to ``output``; a cause without the moving figures avoids an event per
        evaluation)."""
        key = (status, output if cause is None else cause)
        if self._reported.get(check) == key:
            return
        self._reported[check] = key
        self.notify(check_notice(self.name, check, status, output, trio.current_time()))

    def _report_persistence(self) -> None:
        status, output = persistence_check(
            failing=self.failing, last_error=self.last_error, lag=self.lag,
            stalled_checks=self._stalled_checks, lag_warn_events=self.lag_warn_events,
            stall_checks=self.stall_checks)
        cause = "" if status == "pass" else "".join(c for c in output if not c.isdigit())
        self._report(PERSISTENCE_CHECK, status, output, cause)

    def _failed(self, operation: str, resp: Any) -> None:
        error = resp.error
        code = str(error.code) if error is not None else "INTERNAL"
        message = error.message if error is not None else f"{operation} failed"
        self.last_error = {"operation": operation, "code": code, "message": message,
                           "at": trio.current_time()}
        self.failing = True
        log.warning("event persistence: %s failed (%s): %s; %d events not persisted yet",
                    operation, code, message, self.lag)

    def _succeeded(self) -> None:
        if self.failing:
            log.info("event persistence resumed at seq %d", self.persisted_seq)
            self.failing = False
            self._report_persistence()

    # ------------------------------------------------------------------ persisting
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
        table = await self._check_table()
        if table is None:
            return False
        if table.get("problems"):
            self.last_error = {"operation": "events_table", "code": "TABLE_UNUSABLE",
                               "message": "; ".join(table["problems"]),
                               "at": trio.current_time()}
            self.failing = True
            return False
        last = int(table.get("max_seq") or 0)
        head = self._log.last_seq
        if last > head and self._raise_seq_floor is not None:
            # Only durable events are published, so the table can be ahead of the log only
            # when the log (and its mark) were lost: number above the table, never reuse.
            why = (f"the events table already holds seq {last}, above this log's {head} "
                   "(the log and its high-water mark were lost)")
            log.error("event log: %s; numbering continues at %d", why, last + 1)
            self._raise_seq_floor(last, why)
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
                    self.persisted_seq = max(self.persisted_seq, batch[-1].seq)
                    self.batches += 1
                    self._succeeded()
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
        lost) once every pending WAL transaction is applied, start over from its max(seq),
        which refills it from the log (rows QuestDB has not applied yet are not "lost").
        If the table cannot take events safely, hold off. Otherwise the batch is tried once
        more, then event by event, and only the events the database still refuses are
        skipped: one poison event must not hold up every later one forever. Skipped events
        stay in the log file, the source of truth, and are listed in the actor's status."""
        resp = await self._persist(batch)
        if resp.ok:
            return "ok"
        if _refused(resp):
            table = await self._check_table()  # re-creates a lost table
            if table is not None and table.get("problems"):
                self._failed("persist_events", resp)
                return "failed"
            if table is not None and table_lost(table, self.persisted_seq):
                self._refill(table)
                return "restart"
            resp = await self._persist(batch)
            if resp.ok:
                return "ok"
        if not _refused(resp):
            self._failed(f"persist_events {batch[0].seq}..{batch[-1].seq}", resp)
            return "failed"
        for event in batch:
            one = await self._persist([event])
            if one.ok:
                continue
            if not _refused(one):
                self._failed(f"persist_events {event.seq}", one)
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
        last_error = None
        if self.last_error is not None:
            last_error = {k: v for k, v in self.last_error.items() if k != "at"}
        return {"persisted_seq": self.persisted_seq, "log_seq": self._log.last_seq,
                "lag": self.lag, "failing": self.failing, "last_error": last_error,
                "skipped_seqs": self.skipped[-20:], "skipped": len(self.skipped),
                "batches": self.batches, "failures": self.failures,
                "table": dict(self.table)}


def _refused(resp: Any) -> bool:
    """The database answered and said no (not an outage, not our own deadline)."""
    return resp.error is not None and resp.error.code in (ErrorCode.DB_QUERY_FAILED,
                                                          ErrorCode.INVALID_REQUEST)
