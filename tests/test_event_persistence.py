"""Event persistence on a real PostgreSQL server: the table ``supervision_events`` holds every
event of the log ``state_dir/events.jsonl``, once, across outages, replays and kill -9.

The log file is the reference: each test reads it line by line and compares the table with it
(same ``seq`` set, and the ``payload`` column equal to the exact log line).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any, ClassVar

import asyncpg
import pytest
import trio

from actors.questdb.persistence import EventStoreActor
from actors.questdb.pgserver import EmbeddedPostgres
from supervision.actor import Actor, OpSpec
from supervision.messages import Notice
from supervision.settings import ActorSettings
from supervision.shell.config import RuntimeConfig
from supervision.shell.runtime import Runtime, open_runtime
from supervision.supervisor import ChildSpec
from tests.support.waiting import eventually, in_thread

pytestmark = pytest.mark.realserver

REPO = Path(__file__).resolve().parent.parent
COLUMNS = ("seq, ts, actor, kind, from_state, to_state, attempt, delay_s, error_code, "
           "error_message, payload")
FAST = {"backoff_base_s": 0.1, "health_interval_s": 0.5, "connect_timeout_s": 2.0,
        "probe_timeout_s": 2.0, "call_timeout_s": 5.0, "shutdown_timeout_s": 3.0}


def log_lines(state_dir: Path) -> dict[int, str]:
    """``seq -> exact line`` for every complete line of the event log."""
    out: dict[int, str] = {}
    data = (state_dir / "events.jsonl").read_bytes()
    for raw in data.split(b"\n")[:-1]:  # a torn last line (no newline) is not an event
        if raw.strip():
            line = raw.decode()
            out[json.loads(line)["seq"]] = line
    return out


def assert_table_matches_log(rows: list[Mapping[str, Any]], lines: dict[int, str]) -> None:
    seqs = [r["seq"] for r in rows]
    assert len(seqs) == len(set(seqs)), "a seq is doubled"
    assert seqs == sorted(lines), "the table and the log hold different seqs"
    assert seqs == list(range(1, len(seqs) + 1)), "seq is not contiguous from 1"
    for row in rows:
        line = lines[row["seq"]]
        event = json.loads(line)
        assert row["payload"] == line
        assert row["actor"] == event["actor"] and row["kind"] == event["kind"]
        assert row["from_state"] == event["from"] and row["to_state"] == event["to"]
        assert row["ts"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") == event["ts"]
        error = event.get("error") or {}
        assert row["error_code"] == error.get("code")
        assert row["error_message"] == (None if error.get("message") is None
                                        else error["message"].replace("\x00", "\ufffd"))


class Flapper(Actor):
    """A bot actor whose work fails every ``period_s``: each failure and reconnect is a few
    events. ``message`` is what it fails with."""

    ops: ClassVar[Mapping[str, OpSpec]] = {}

    def __init__(self, period_s: float, message: str = "flap", times: int | None = None
                 ) -> None:
        self.period_s = period_s
        self.message = message
        self.left = times

    async def serve(self) -> None:
        await trio.sleep(self.period_s)
        if self.left is not None:
            if self.left <= 0:
                await trio.sleep_forever()
            self.left -= 1
        raise RuntimeError(self.message)


def flapper(name: str, period_s: float, **kwargs: Any) -> ChildSpec:
    actor = Flapper(period_s, **kwargs)
    return ChildSpec(name, lambda: actor,
                     settings=ActorSettings(backoff_base_s=0.01, health_interval_s=60.0))


def runtime_config(state_dir: Path, dsn: str, **sections: Mapping[str, Any]) -> RuntimeConfig:
    raw: dict[str, Any] = {
        "runtime": {"state_dir": str(state_dir), "fsync": "never"},
        "control": {"enabled": False},
        "health": {"enabled": False},
        "questdb": {"dsn": dsn, "breaker_open_s": 1.0, **FAST},
        "mt5": {"backend": "simulator", **FAST},
        "cache": {"shutdown_timeout_s": 3.0},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return RuntimeConfig.from_mapping(raw, env={})


@contextlib.asynccontextmanager
async def persisting_runtime(state_dir: Path, dsn: str, children: Sequence[ChildSpec] = (),
                             **sections: Mapping[str, Any]) -> AsyncIterator[Runtime]:
    async with open_runtime(runtime_config(state_dir, dsn, **sections),
                            children=children) as rt:
        yield rt


def store_of(rt: Runtime) -> EventStoreActor:
    actor = rt.supervisor.children["events_store"].actor
    assert isinstance(actor, EventStoreActor)
    return actor


async def table(rt: Runtime) -> list[dict[str, Any]]:
    resp = await rt.questdb.fetch(f"SELECT {COLUMNS} FROM supervision_events ORDER BY seq")
    assert resp.ok, resp  # never a degraded (cached) copy of the table
    return resp.data


async def caught_up(rt: Runtime, limit_s: float = 10.0, quiet_s: float = 0.3) -> int:
    """Wait until the store has persisted the log's last seq and nothing new came for
    ``quiet_s``; return that seq."""
    store, log = store_of(rt), rt.supervisor.log
    with trio.fail_after(limit_s):
        while True:
            if store.persisted_seq == log.last_seq:
                seq = log.last_seq
                await trio.sleep(quiet_s)
                if log.last_seq == seq and store.persisted_seq == seq:
                    return seq
            await trio.sleep(0.02)




# ----------------------------------------------------------------------------- in process
async def test_every_event_reaches_the_table(tmp_path: Path, pg_dsn: str) -> None:
    state_dir = tmp_path / "var"
    # One bot fails three times, once with a NUL in its message (PostgreSQL refuses NUL in
    # text; that event must not stop persistence).
    children = [flapper("nul_bot", 0.05, message="bad\x00byte", times=1),
                flapper("bot", 0.05, times=2)]
    async with persisting_runtime(state_dir, pg_dsn, children) as rt:
        await rt.inject("terminal_crash")
        await eventually(lambda: rt.state("mt5") != "CONNECTED", within_s=10)
        await rt.inject("clear")
        await eventually(lambda: rt.state("mt5") == "CONNECTED", within_s=10)
        last = await caught_up(rt)
        rows = await table(rt)
        lines = log_lines(state_dir)
        assert max(lines) == last and len(rows) == last
        assert_table_matches_log(rows, lines)
        kinds = {r["kind"] for r in rows}
        assert {"runtime_started", "actor_started", "state_changed", "backoff_scheduled"} <= kinds
        assert {"mt5", "questdb", "cache", "events_store", "bot", "nul_bot"} <= {
            r["actor"] for r in rows}
        nul = [r for r in rows if r["actor"] == "nul_bot" and r["error_message"]]
        assert nul and all("bad\ufffdbyte" in r["error_message"] for r in nul)
        assert all("bad\\u0000byte" in r["payload"] for r in nul)


async def test_events_wait_in_the_log_while_the_database_is_down(
        tmp_path: Path, pg_server: EmbeddedPostgres) -> None:
    state_dir = tmp_path / "var"
    async with persisting_runtime(state_dir, pg_server.dsn) as rt:
        store = store_of(rt)
        persisted = await caught_up(rt)
        await in_thread(pg_server.stop)
        await eventually(lambda: rt.state("questdb") == "ERROR", within_s=10)
        # Events go on (the database's own outage, a terminal crash) and wait in the log.
        await rt.inject("terminal_crash")
        await trio.sleep(1.5)
        await rt.inject("clear")
        await eventually(lambda: rt.state("mt5") == "CONNECTED", within_s=10)
        lines = log_lines(state_dir)
        waiting = [seq for seq in lines if seq > persisted]
        assert len(waiting) >= 10
        assert {json.loads(lines[s])["actor"] for s in waiting} >= {"questdb", "mt5"}
        assert store.persisted_seq == persisted
        # The store retries after 1 s, 2 s, then 4 s...: come back during the 4 s wait.
        await eventually(lambda: store.failures >= 3, within_s=10)

        await in_thread(pg_server.start)
        back = trio.current_time()
        last = await caught_up(rt, quiet_s=0.2)
        # Replayed as soon as the database is back (the probe runs every 0.5 s), not at the
        # end of the store's 4 s wait.
        assert trio.current_time() - back < 2.5
        rows = await table(rt)
        assert_table_matches_log(rows, log_lines(state_dir))
        assert len(rows) == last


async def test_a_lost_log_and_mark_never_number_below_what_the_table_holds(
        tmp_path: Path, pg_dsn: str) -> None:
    # The log and its high-water mark both gone (a fresh state directory) while the database
    # kept its rows: numbering on from 1 would reuse stored seqs, and those events would be
    # skipped as already persisted. The runtime reads the table's max(seq) before its first
    # event and numbers above it from the start.
    state_dir = tmp_path / "var"
    async with persisting_runtime(state_dir, pg_dsn) as rt:
        await rt.inject("terminal_crash")
        await trio.sleep(0.3)
        await rt.inject("clear")
        await eventually(lambda: rt.state("mt5") == "CONNECTED", within_s=10)
        first_run = await caught_up(rt)
    (state_dir / "events.jsonl").unlink()
    (state_dir / "events.jsonl.hwm").unlink()
    async with persisting_runtime(state_dir, pg_dsn) as rt:
        await rt.inject("terminal_crash")
        await trio.sleep(0.3)
        await rt.inject("clear")
        await eventually(lambda: rt.state("mt5") == "CONNECTED", within_s=10)
        last = await caught_up(rt)
        rows = await table(rt)
        seqs = [r["seq"] for r in rows]
        assert len(seqs) == len(set(seqs))  # nothing doubled
        lines = log_lines(state_dir)
        # Every event of the second run is above the first run's, and in the table.
        assert min(lines) == first_run + 1 and max(lines) == last, (first_run, min(lines))
        assert set(lines) <= set(seqs)
        assert all(r["payload"] == lines[r["seq"]] for r in rows if r["seq"] > first_run)
        # The first event says why numbering jumped.
        first = json.loads(lines[first_run + 1])
        assert first["kind"] == "eventlog_replaced", first
        assert first["data"]["what"] == "behind_database"
        assert first["data"]["continues_at"] == first_run + 1


async def test_with_the_database_down_a_fresh_log_starts_after_a_short_wait(
        tmp_path: Path) -> None:
    """The table cannot be read (nothing listens): start is held up at most the bound, and
    numbering starts from the log (the event store checks again once it gets through)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens on it once closed
    dsn = f"postgresql://u:secret-pw@127.0.0.1:{port}/db"
    started = trio.current_time()
    async with persisting_runtime(tmp_path / "var", dsn,
                                  questdb={"connect_timeout_s": 1.0}) as rt:
        assert trio.current_time() - started < 10
        await eventually(lambda: rt.supervisor.log.last_seq >= 1, within_s=10)
        assert rt.supervisor.log.read_since(0)[0].seq == 1


async def test_replays_are_idempotent(tmp_path: Path, pg_dsn: str) -> None:
    state_dir = tmp_path / "var"
    async with persisting_runtime(state_dir, pg_dsn) as rt:
        await caught_up(rt)
        lines = log_lines(state_dir)
        events = [json.loads(line) for line in lines.values()]
        count = len(await table(rt))
        # The whole range again, twice, and an overlapping slice: nothing changes.
        for batch in (events, events, events[3:7]):
            resp = await rt.questdb.call("persist_events", {"events": batch})
            assert resp.ok and resp.data == len(batch)
        assert len(await table(rt)) == count

        # Lose the newest rows, then run a second persister over the same range while the
        # first one keeps going: both write, each seq is there once.
        resp = await rt.questdb.execute(
            "DELETE FROM supervision_events WHERE seq > $1", count - 5)
        assert resp.ok and resp.data == "DELETE 5"
        await rt.start_child(ChildSpec("events_store_2", lambda: EventStoreActor(
            rt.supervisor.bus, rt.supervisor.log, rt.questdb)))
        second = rt.supervisor.children["events_store_2"].actor
        assert isinstance(second, EventStoreActor)
        await rt.inject("terminal_crash")
        await trio.sleep(0.3)
        await rt.inject("clear")
        last = await caught_up(rt)
        await eventually(lambda: second.persisted_seq >= last, within_s=5)
        rows = await table(rt)
        assert_table_matches_log(rows, log_lines(state_dir))
        dup = await rt.questdb.fetch("SELECT seq, count(*) AS n FROM supervision_events "
                                     "GROUP BY seq HAVING count(*) > 1")
        assert dup.ok and dup.data == []


async def test_a_dropped_table_is_created_again_and_refilled_from_the_log(
        tmp_path: Path, pg_dsn: str) -> None:
    state_dir = tmp_path / "var"
    async with persisting_runtime(state_dir, pg_dsn) as rt:
        await caught_up(rt)
        resp = await rt.questdb.execute("DROP TABLE supervision_events")
        assert resp.ok
        await rt.inject("terminal_crash")  # new events: the next insert finds no table
        await trio.sleep(0.3)
        await rt.inject("clear")
        await caught_up(rt, limit_s=15)
        # The refused insert is retried once, by which time the table has been created
        # again: no failure is even visible to the store.
        assert store_of(rt).skipped == []
        rows = await table(rt)
        assert_table_matches_log(rows, log_lines(state_dir))


# ----------------------------------------------------------------------------- kill -9
RUNNER = textwrap.dedent('''
    """A runtime persisting a steady stream of events (started by test_event_persistence)."""
    import sys

    import trio

    from supervision.actor import Actor
    from supervision.shell.config import RuntimeConfig
    from supervision.shell.runtime import open_runtime
    from supervision.settings import ActorSettings
    from supervision.supervisor import ChildSpec


    class Flapper(Actor):
        async def serve(self):
            await trio.sleep(0.005)
            raise RuntimeError("flap")


    async def main(path):
        config = RuntimeConfig.load(path)
        # stable_s=0: every flap counts as stable, so the stream never escalates to ERROR.
        settings = ActorSettings(backoff_base_s=0.005, health_interval_s=60.0, stable_s=0.0)
        children = [ChildSpec(f"flapper{i}", Flapper, settings=settings) for i in range(3)]
        async with open_runtime(config, children=children):
            print("running", flush=True)
            await trio.sleep_forever()


    trio.run(main, sys.argv[1])
''')


class Table:
    """The test's own view of the table: asyncpg on a private asyncio loop."""

    def __init__(self, dsn: str) -> None:
        self._runner = asyncio.Runner()
        self._conn: asyncpg.Connection = self._runner.run(asyncpg.connect(dsn, timeout=5))

    def value(self, sql: str) -> Any:
        return self._runner.run(self._conn.fetchval(sql, timeout=10))

    def rows(self, sql: str) -> list[Any]:
        return self._runner.run(self._conn.fetch(sql, timeout=10))

    def count(self) -> int:
        try:
            return int(self.value("SELECT count(*) FROM supervision_events"))
        except asyncpg.UndefinedTableError:
            return 0

    def close(self) -> None:
        self._runner.run(self._conn.close())
        self._runner.close()


def last_logged_seq(state_dir: Path) -> int:
    path = state_dir / "events.jsonl"
    if not path.exists():
        return 0
    lines = log_lines(state_dir)
    return max(lines) if lines else 0


@pytest.mark.slow
def test_kill_9_while_persisting_loses_nothing_and_doubles_nothing(
        tmp_path: Path, pg_server: EmbeddedPostgres) -> None:
    state_dir = tmp_path / "var"
    config = tmp_path / "runtime.toml"
    fast = "\n".join(f"{k} = {v}" for k, v in FAST.items())
    config.write_text(textwrap.dedent(f"""\
        [runtime]
        state_dir = "{state_dir}"
        fsync = "batch"

        [control]
        enabled = false

        [health]
        enabled = false

        [mt5]
        enabled = false

        [questdb]
        dsn = "{pg_server.dsn}"
        """) + fast + "\n")
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env = {k: v for k, v in env.items() if not k.startswith("MT5SUP_")}
    rng = random.Random(20261122)
    db = Table(pg_server.dsn)
    lags: list[int] = []

    def spawn(argv: list[str], run: int) -> subprocess.Popen[bytes]:
        with open(tmp_path / f"runner-{run}.err", "wb") as err:
            return subprocess.Popen([sys.executable, *argv], cwd=tmp_path, env=env,
                                    stdout=subprocess.DEVNULL, stderr=err)

    def stderr_of(run: int) -> str:
        return (tmp_path / f"runner-{run}.err").read_text(errors="replace")[-3000:]

    try:
        for run in range(4):
            before = db.count()
            proc = spawn([str(script), str(config)], run)
            try:
                deadline = time.monotonic() + 30
                while db.count() < before + 300:  # persisting a steady stream
                    assert proc.poll() is None, stderr_of(run)
                    assert time.monotonic() < deadline, stderr_of(run)
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 0.6))
            finally:
                proc.kill()  # SIGKILL: no shutdown, no flush, mid-batch or not
                proc.wait(timeout=10)
            lags.append(last_logged_seq(state_dir) - db.count())

        # Once more, as the operator would (``mt5-supervisor run``, no bots): it catches up
        # from the table's max(seq) over the log the killed runs left, and goes quiet.
        killed_runs_last = last_logged_seq(state_dir)
        proc = spawn(["-m", "supervision.shell.cli", "run", "--config", str(config)], 99)
        try:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, stderr_of(99)
                assert time.monotonic() < deadline, (last_logged_seq(state_dir), db.count())
                last = last_logged_seq(state_dir)
                # This run has started (logged its own events: its signal handlers are in
                # place) and the table has caught up with the log.
                if last > killed_runs_last and db.value(
                        "SELECT max(seq) FROM supervision_events") == last:
                    time.sleep(0.3)
                    if last_logged_seq(state_dir) == last:
                        break
                time.sleep(0.05)
            rows = db.rows(f"SELECT {COLUMNS} FROM supervision_events ORDER BY seq")
            doubled = db.rows("SELECT seq, count(*) FROM supervision_events "
                              "GROUP BY seq HAVING count(*) > 1")
            lines = log_lines(state_dir)
            proc.terminate()  # SIGTERM: the CLI stops in order and exits 0
            assert proc.wait(timeout=30) == 0, stderr_of(99)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    finally:
        db.close()

    assert len(lines) == last and sorted(lines) == list(range(1, last + 1))
    # The orderly stop logged its own events after them (the store had stopped by then).
    after = log_lines(state_dir)
    assert sorted(after) == list(range(1, len(after) + 1)) and len(after) > last
    assert doubled == []
    assert_table_matches_log([dict(r) for r in rows], lines)
    assert last > 4 * 300
    # At least one kill left events logged but not yet in the table: replay had work to do.
    assert max(lags) > 0, lags


async def test_a_poison_event_is_skipped_and_does_not_hold_up_later_ones(
        tmp_path: Path, pg_dsn: str) -> None:
    state_dir = tmp_path / "var"
    async with persisting_runtime(state_dir, pg_dsn) as rt:
        await caught_up(rt)
        # `attempt` is an INTEGER column: 2**40 cannot be stored, whatever we retry.
        await rt.supervisor.emit(Notice("bot", "attempt_failed", trio.current_time(),
                                        attempt=2**40))
        for n in range(3):  # later events, in the same and following batches
            await rt.supervisor.emit(Notice("bot", "probe_failed", trio.current_time(),
                                            data={"n": n}))
        last = await caught_up(rt)
        [poison] = [seq for seq, line in log_lines(state_dir).items()
                    if f'"attempt":{2**40}' in line]
        store = store_of(rt)
        assert store.skipped == [poison]
        assert store.status_extra()["skipped"] == 1
        seqs = {r["seq"] for r in await table(rt)}
        assert poison not in seqs
        assert set(range(1, last + 1)) - seqs == {poison}  # everything else is there
        assert poison in log_lines(state_dir)  # and the log still has it
