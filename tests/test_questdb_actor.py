"""The QuestDB actor on a real PostgreSQL-wire server (the embedded PostgreSQL stand-in).

Real time, real sockets, a real server process that the tests stop, kill -9 and start again.
Timings are shortened through ``ActorSettings`` (backoff 0.1 s, probe every 0.5 s, breaker open
for 1 s) so the module stays fast; the call-level retry delays are the contract's own
(0.1 s, 0.5 s, 1.0 s) everywhere, and ``test_contract_defaults_retry_then_breaker`` runs on the
unmodified defaults of ``[questdb]``.

How "reached the server" is counted: servers started with ``log_statement=all`` write every
executed statement to their log, and PostgreSQL logs every failed statement (``STATEMENT:``)
by default; tests tag their SQL with a unique comment and count it in ``server.log``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import attrs
import pytest
import trio

from actors.cache import TtlCache
from actors.questdb.actor import QuestdbActor, QuestdbRef
from actors.questdb.pgserver import EmbeddedPostgres
from supervision.breaker import BreakerConfig, BreakerState
from supervision.errors import ErrorCode, Response
from supervision.events import Event
from supervision.settings import ActorSettings
from supervision.shell.config import RuntimeConfig
from supervision.shell.runtime import open_runtime
from supervision.supervisor import ChildSpec, Supervisor
from tests.support.actors import Recorder, running_supervisor
from tests.support.pg_fixtures import PG_TEST_PASSWORD
from tests.support.waiting import eventually, in_thread

pytestmark = pytest.mark.realserver

RETRY_DELAYS = (0.1, 0.5, 1.0)  # DESIGN.md section 4
UNAVAILABLE = {ErrorCode.DB_UNAVAILABLE, ErrorCode.ACTOR_UNAVAILABLE, ErrorCode.CIRCUIT_OPEN}
LOGGED = {"log_statement": "all"}


def fast_settings(**overrides: Any) -> ActorSettings:
    """Short supervisor timings; the contract's call retry delays and breaker threshold."""
    values: dict[str, Any] = {
        "backoff_base_s": 0.1,
        "health_interval_s": 0.5,
        "probe_timeout_s": 2.0,
        "connect_timeout_s": 2.0,
        "call_timeout_s": 5.0,
        "shutdown_timeout_s": 3.0,
        "retry_delays_s": RETRY_DELAYS,
        "breaker": BreakerConfig(threshold=5, open_s=1.0, probe_timeout_s=5.0),
    }
    values.update(overrides)
    return ActorSettings(**values)


@attrs.define
class Tree:
    sup: Supervisor
    ref: QuestdbRef
    rec: Recorder
    name: str

    @property
    def actor(self) -> QuestdbActor:
        return self.sup.children[self.name].actor  # type: ignore[return-value]

    @property
    def cell(self) -> Any:
        return self.sup.children[self.name].cell

    def at(self, event: Event) -> float:
        """The trio time of an event (its ``ts`` mapped back through the wall clock)."""
        clock = self.sup.wallclock
        return clock.trio_anchor + (event.ts.timestamp() - clock.wall_anchor)

    def events(self, *kinds: str, after: int = 0) -> list[Event]:
        return [e for e in self.rec.of(self.name, *kinds) if e.seq > after]

    async def wait(self, predicate: Callable[[Event], bool], limit_s: float = 10.0) -> Event:
        return await self.rec.wait_for(
            lambda e: e.actor == self.name and predicate(e), timeout=limit_s)

    async def wait_kind(self, kind: str, *, after: int = 0, limit_s: float = 10.0) -> Event:
        return await self.wait(lambda e: e.kind == kind and e.seq > after, limit_s)

    async def wait_state(self, state: str, *, after: int = 0, limit_s: float = 10.0) -> Event:
        return await self.wait(
            lambda e: e.kind == "state_changed" and e.to_state == state and e.seq > after,
            limit_s)

    @property
    def last_seq(self) -> int:
        return self.rec.events[-1].seq if self.rec.events else 0


@contextlib.asynccontextmanager
async def questdb_tree(tmp_path: Path, dsn: str, settings: ActorSettings, *,
                       name: str = "questdb", **actor_kwargs: Any) -> AsyncIterator[Tree]:
    async with running_supervisor(tmp_path, lkg=TtlCache()) as sup:
        rec = Recorder(sup)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rec.run)
            ref = await sup.start_child(ChildSpec(
                name, lambda: QuestdbActor(dsn, **actor_kwargs), settings=settings,
                ref_class=QuestdbRef))
            assert isinstance(ref, QuestdbRef)
            tree = Tree(sup, ref, rec, name)
            await tree.wait_kind("state_changed")  # the start is on record before marks
            try:
                yield tree
            finally:
                nursery.cancel_scope.cancel()


async def timed(call: Any) -> tuple[float, Response]:
    start = trio.current_time()
    resp = await call
    return trio.current_time() - start, resp




def log_count(server: EmbeddedPostgres, marker: str, *, offset: int = 0) -> int:
    """How many statements tagged ``marker`` the server logged (executed or failed)."""
    text = server.log_path.read_bytes()[offset:].decode(errors="replace")
    return sum(1 for line in text.splitlines()
               if marker in line and re.search(r"(execute [^:]*|statement|STATEMENT):", line))


def log_size(server: EmbeddedPostgres) -> int:
    return server.log_path.stat().st_size


def retry_records(caplog: pytest.LogCaptureFixture, op: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "mt5_supervisor.cell" and f"{op} failed" in r.getMessage()
            and "(retry" in r.getMessage()]


def on_time(value: float, low: float, slack: float = 0.25) -> bool:
    """``low <= value <= low + slack``: a sleep is never shorter than asked, and may run late
    on a busy machine."""
    return low - 0.005 <= value <= low + slack


def assert_unavailable(resp: Response, op: str, *, allow_degraded: bool = False) -> None:
    assert resp.status in (("error", "degraded") if allow_degraded else ("error",)), resp
    assert resp.error is not None and resp.error.code in UNAVAILABLE, resp
    assert resp.error.message.startswith(op), resp.error.message
    detail = resp.error.message[len(op):].split(":", 1)[-1].strip()
    assert detail, resp.error.message
    assert PG_TEST_PASSWORD not in resp.error.message
    if resp.status == "error":
        assert resp.data is None and resp.cached_at is None


# ----------------------------------------------------------------------------- happy paths
async def test_queries_round_trip(tmp_path: Path, pg_dsn: str) -> None:
    async with questdb_tree(tmp_path, pg_dsn, fast_settings()) as t:
        assert t.ref.state == "CONNECTED"
        assert t.actor.status_extra()["dialect"] == "postgresql"
        assert t.actor.server_version.startswith("PostgreSQL")

        r = await t.ref.execute("CREATE TABLE quotes (id INT PRIMARY KEY, sym TEXT, px FLOAT8)")
        assert r.ok and r.data == "CREATE TABLE", r
        r = await t.ref.execute("INSERT INTO quotes VALUES ($1, $2, $3)", 1, "EURUSD", 1.1)
        assert r.ok and r.data == "INSERT 0 1", r
        r = await t.ref.executemany("INSERT INTO quotes VALUES ($1, $2, $3)",
                                    [(2, "GBPUSD", 1.27), (3, "USDJPY", 151.5)])
        assert r.ok and r.data == 2, r

        r = await t.ref.fetch("SELECT id, sym FROM quotes WHERE px > $1 ORDER BY id", 1.2)
        assert r.ok and r.data == [{"id": 2, "sym": "GBPUSD"}, {"id": 3, "sym": "USDJPY"}]
        r = await t.ref.fetchrow("SELECT sym, px FROM quotes WHERE id = $1", 1)
        assert r.ok and r.data == {"sym": "EURUSD", "px": 1.1}
        r = await t.ref.fetchrow("SELECT sym FROM quotes WHERE id = $1", 99)
        assert r.ok and r.data is None
        r = await t.ref.fetchval("SELECT count(*) FROM quotes")
        assert r.ok and r.data == 3
        r = await t.ref.fetch("SELECT 1 WHERE false")
        assert r.ok and r.data == []

        # Bad arguments are the caller's mistake: refused, nothing retried or counted.
        r = await t.ref.call("fetch", {"sql": ""})
        assert r.error is not None and r.error.code is ErrorCode.INVALID_REQUEST
        r = await t.ref.fetchval("SELECT $1::int", "not a number")
        assert r.error is not None and r.error.code in (ErrorCode.INVALID_REQUEST,
                                                        ErrorCode.DB_QUERY_FAILED)
        assert r.error.message.startswith("fetchval failed: ")
        assert t.cell.breaker.state is BreakerState.CLOSED and t.cell.breaker.failures == 0
        # Every statement ran on the same pool, at most pool_max_size connections.
        assert 1 <= t.actor.status_extra()["pool_size"] <= t.actor.pool_max_size
        assert t.events("state_changed") and all(
            e.to_state == "CONNECTED" for e in t.events("state_changed"))


async def test_query_errors_are_not_retried_and_never_trip_the_breaker(
        tmp_path: Path, pg_server: EmbeddedPostgres, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with questdb_tree(tmp_path, pg_server.dsn, fast_settings()) as t:
        before = t.last_seq
        start = trio.current_time()
        for i in range(10):
            marker = f"qerr_{i}"
            if i % 2:
                resp = await t.ref.fetch(f"SELEC 1 /* {marker} */")  # syntax error
                expected = 'fetch failed: syntax error at or near "SELEC"'
            else:
                resp = await t.ref.fetchval(f"SELECT * FROM no_such_table /* {marker} */")
                expected = 'fetchval failed: relation "no_such_table" does not exist'
            assert resp.status == "error" and resp.data is None, resp
            assert resp.error is not None and resp.error.code is ErrorCode.DB_QUERY_FAILED
            assert resp.reason == "query_failed"
            assert resp.error.message == expected
            assert log_count(pg_server, marker) == 1  # one attempt reached the server
        # A single retry per call would have cost 0.1 s each.
        assert trio.current_time() - start < 1.0
        assert not retry_records(caplog, "fetch") and not retry_records(caplog, "fetchval")
        # A write's query error is the same: one attempt, not counted.
        resp = await t.ref.execute("INSERT INTO no_such_table VALUES (1) /* qerr_w */")
        assert resp.error is not None and resp.error.code is ErrorCode.DB_QUERY_FAILED
        assert log_count(pg_server, "qerr_w") == 1

        assert t.cell.breaker.state is BreakerState.CLOSED
        assert t.cell.breaker.failures == 0
        assert t.sup.children["questdb"].view.breaker == "CLOSED"
        assert t.ref.state == "CONNECTED"
        await trio.sleep(0.6)  # a health probe later, nothing has changed
        assert not t.events(after=before)
        assert (await t.ref.fetchval("SELECT 1")).ok


# ----------------------------------------------------------------------------- outages
async def test_database_stopped_while_idle_degrades_then_recovers_on_the_same_pool(
        tmp_path: Path, pg_server_factory: Callable[..., EmbeddedPostgres],
        monkeypatch: pytest.MonkeyPatch) -> None:
    server = pg_server_factory(server_settings=LOGGED)
    created: list[Any] = []
    expired: list[Any] = []
    real_create_pool = asyncpg.create_pool
    real_expire = asyncpg.pool.Pool.expire_connections

    def counting_create_pool(*args: Any, **kwargs: Any) -> Any:
        created.append(args)
        return real_create_pool(*args, **kwargs)

    async def counting_expire(self: Any) -> None:
        expired.append(self)
        await real_expire(self)

    monkeypatch.setattr(asyncpg, "create_pool", counting_create_pool)
    monkeypatch.setattr(asyncpg.pool.Pool, "expire_connections", counting_expire)

    async with questdb_tree(tmp_path, server.dsn, fast_settings()) as t:
        wall = t.sup.wallclock
        await t.ref.execute("CREATE TABLE sessions (id INT, name TEXT)")
        await t.ref.execute("INSERT INTO sessions VALUES (1, 'london'), (2, 'tokyo')")
        sql = "SELECT id, name FROM sessions ORDER BY id"
        before_read = wall.wall(trio.current_time())
        ok = await t.ref.fetch(sql)
        after_read = wall.wall(trio.current_time())
        assert ok.ok and ok.data == [{"id": 1, "name": "london"}, {"id": 2, "name": "tokyo"}]
        pool = t.actor.pool
        assert pool is not None and len(created) == 1
        mark = t.last_seq

        await in_thread(server.stop)
        stopped_at = trio.current_time()
        # Nobody calls: the 0.5 s liveness probe notices.
        probe = await t.wait_kind("probe_failed", after=mark, limit_s=5)
        assert t.at(probe) - stopped_at < 0.5 + 0.7  # the next 0.5 s probe, not a call
        assert probe.error is not None and probe.error["code"] == "DB_UNAVAILABLE"
        assert probe.error["message"].startswith("probe failed: ")
        down = await t.wait_state("RECONNECTING", after=mark)
        assert down.from_state == "CONNECTED" and down.data == {
            "reason": "failure_detected", "next_at": down.data["next_at"]}
        # Backoff 0.1, 0.2, 0.4 s (base 0.1, factor 2), then ERROR.
        error = await t.wait_state("ERROR", after=mark)
        failed = [e for e in t.events("attempt_failed", after=mark) if e.seq < error.seq]
        assert [e.attempt for e in failed] == [1, 2, 3]
        gaps = [t.at(b) - t.at(a) for a, b in zip([down, *failed], failed, strict=False)]
        assert all(on_time(g, d) for g, d in zip(gaps, (0.1, 0.2, 0.4), strict=True)), gaps
        assert [e.delay_s for e in t.events("backoff_scheduled", after=mark)][:3] == [
            pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.4)]
        await t.wait_kind("escalated", after=mark)
        # Each instance's pool released (connections expired) before the instance ended;
        # restarts are fresh (DESIGN 3), so each attempt built its own pool.
        assert expired and expired[0] is pool

        # A cacheable read is answered from the last good value, stamped with its time.
        elapsed, resp = await timed(t.ref.fetch(sql))
        assert elapsed < 0.1  # refused at once: no retries, no waiting
        assert resp.status == "degraded", resp
        assert resp.data == ok.data
        assert resp.cached_at is not None and before_read <= resp.cached_at <= after_read
        assert resp.reason in ("actor_unavailable", "circuit_open", "database_unavailable")
        assert_unavailable(resp, "fetch", allow_degraded=True)
        served = await t.wait_kind("degraded_served", after=mark)
        assert served.data is not None and served.data["op"] == "fetch"
        # A read never made before has nothing to fall back on.
        resp = await t.ref.fetch("SELECT id FROM sessions WHERE id = 2")
        assert_unavailable(resp, "fetch")
        # Writes are never served from the cache.
        for call in (t.ref.execute("INSERT INTO sessions VALUES (3, 'sydney')"),
                     t.ref.executemany("INSERT INTO sessions VALUES ($1, $2)", [(4, "ny")])):
            elapsed, resp = await timed(call)
            assert elapsed < 0.1
            assert_unavailable(resp, "execute")

        # Back: the ERROR-state probe (every 0.5 s) recovers it.
        offset = log_size(server)
        mark = t.last_seq
        await in_thread(server.start)
        # Until the probe runs, calls are refused at once and reach nothing.
        for i in range(4):
            elapsed, resp = await timed(t.ref.fetchval(f"SELECT {i} /* early_{i} */"))
            if resp.ok:
                break  # the probe has already recovered it
            assert elapsed < 0.1
            assert_unavailable(resp, "fetchval")
        recovered = await t.wait_kind("recovered", after=mark, limit_s=5)
        back = [e for e in t.events("state_changed", after=mark) if e.to_state == "CONNECTED"]
        assert back and back[0].from_state == "ERROR" and back[0].seq < recovered.seq
        assert t.events("circuit_closed", after=mark) or t.cell.breaker.state == "CLOSED"
        assert sum(log_count(server, f"early_{i}", offset=offset) for i in range(4)) == 0
        assert log_count(server, "SELECT version()", offset=offset) == 1  # one probe
        # Restarts are fresh (DESIGN 3): the recovering probe ran on a new instance and pool.
        assert t.actor.pool is not pool and len(created) > 1

        resp = await t.ref.fetch(sql)
        assert resp.ok and resp.data == ok.data and resp.cached_at is None
        assert (await t.ref.execute("INSERT INTO sessions VALUES (3, 'sydney')")).ok
        assert (await t.ref.fetchval("SELECT count(*) FROM sessions")).data == 3
        assert t.cell.breaker.state is BreakerState.CLOSED


async def test_killed_mid_query_answers_promptly_and_recovers(
        tmp_path: Path, pg_server: EmbeddedPostgres) -> None:
    async with questdb_tree(tmp_path, pg_server.dsn, fast_settings()) as t:
        assert (await t.ref.fetchval("SELECT 1")).ok
        pool = t.actor.pool
        results: dict[str, tuple[float, Response]] = {}

        async def run(name: str, call: Any) -> None:
            resp = await call
            results[name] = (trio.current_time(), resp)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "read", t.ref.fetchval("SELECT pg_sleep(5)"))
            nursery.start_soon(run, "write", t.ref.execute("SELECT pg_sleep(5)"))
            with trio.fail_after(5):
                while True:  # both queries are running on the server
                    r = await t.ref.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                        "AND query = 'SELECT pg_sleep(5)'")
                    if r.ok and r.data == 2:
                        break
                    await trio.sleep(0.02)
            mark = t.last_seq
            await in_thread(pg_server.kill)
            killed_at = trio.current_time()
        assert not pg_server.is_running()

        done, write = results["write"]
        assert done - killed_at < 1.0
        assert write.status == "error" and write.error is not None
        assert write.error.code is ErrorCode.DB_UNAVAILABLE, write
        assert write.error.message.startswith("execute failed: "), write.error.message
        assert_unavailable(write, "execute")
        done, read = results["read"]
        # An idempotent read is retried (0.1, 0.5, 1.0 s at most) before it gives up.
        assert done - killed_at < sum(RETRY_DELAYS) + 1.0
        assert_unavailable(read, "fetchval")
        down = await t.wait_state("RECONNECTING", after=mark)
        assert down.error is not None and down.error["code"] == "DB_UNAVAILABLE"

        mark = t.last_seq
        await in_thread(pg_server.start)  # crash recovery
        await t.wait_state("CONNECTED", after=mark, limit_s=10)
        assert t.actor.pool is not pool  # a fresh instance, with a fresh pool (DESIGN 3)
        resp = await t.ref.fetchval("SELECT 2")
        assert resp.ok and resp.data == 2


# ----------------------------------------------------------------------------- the breaker
async def test_breaker_counts_every_connection_failure_then_fails_fast(
        tmp_path: Path, pg_server: EmbeddedPostgres, caplog: pytest.LogCaptureFixture) -> None:
    """Four failed calls and the supervisor's first reconnect attempt are five consecutive
    connection failures: the breaker opens, and calls fail fast until the reconnect."""
    caplog.set_level(logging.WARNING)
    settings = fast_settings(backoff_base_s=0.3, health_interval_s=60.0,
                             breaker=BreakerConfig(threshold=5, open_s=2.0))
    async with questdb_tree(tmp_path, pg_server.dsn, settings) as t:
        assert (await t.ref.fetchval("SELECT 1")).ok
        mark = t.last_seq
        await in_thread(pg_server.stop)

        writes: list[Response] = []
        started = trio.current_time()

        async def write(i: int) -> None:
            writes.append(await t.ref.execute(f"INSERT INTO nowhere VALUES ({i})"))

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(write, i)
        assert trio.current_time() - started < 0.5
        for resp in writes:  # writes are never retried
            assert resp.error is not None and resp.error.code is ErrorCode.DB_UNAVAILABLE
        assert not retry_records(caplog, "execute")
        assert t.cell.breaker.state is BreakerState.CLOSED and t.cell.breaker.failures == 4
        assert not t.events("circuit_opened", after=mark)

        opened = await t.wait_kind("circuit_opened", after=mark, limit_s=5)
        first = await t.wait_kind("attempt_failed", after=mark)
        assert first.attempt == 1 and abs(t.at(opened) - t.at(first)) < 0.05
        assert t.at(opened) - started >= 0.3  # it was the reconnect attempt, after backoff
        assert opened.data == {"from": "CLOSED", "to": "OPEN", "retry_after": 2.0}
        assert t.sup.children["questdb"].view.breaker == "OPEN"

        # Open: reads and writes fail at once, far inside the 1.6 s retry schedule.
        for call in (t.ref.fetchval("SELECT 1 /* open_1 */"), t.ref.fetch("SELECT 2"),
                     t.ref.execute("SELECT 3"), t.ref.fetchval("SELECT 4")):
            elapsed, resp = await timed(call)
            assert elapsed < 0.1, elapsed  # no retry (>= 0.1 s), no wait for the reconnect
            assert resp.status in ("error", "degraded")
            assert resp.error is not None and resp.error.code is ErrorCode.CIRCUIT_OPEN
            assert resp.reason == "circuit_open"
            assert resp.error.message.endswith("refused: circuit open for questdb")
            assert resp.error.retry_after is not None and 0 < resp.error.retry_after <= 2.0

        # The server comes back: the supervisor's next reconnect attempt finds it.
        await in_thread(pg_server.start)
        await t.wait_state("CONNECTED", after=mark, limit_s=5)
        closed = await t.wait_kind("circuit_closed", after=mark)
        assert closed.data is not None and closed.data["to"] == "CLOSED"
        assert (await t.ref.fetchval("SELECT 5")).data == 5
        assert t.cell.breaker.state is BreakerState.CLOSED


async def test_breaker_half_open_lets_exactly_one_call_through(
        tmp_path: Path, pg_server_factory: Callable[..., EmbeddedPostgres]) -> None:
    """The breaker as seen by calls: OPEN while CONNECTED, then one probe after ``open_s``.

    A burst of concurrent failures leaves the actor CONNECTED with its breaker OPEN only until
    the supervisor hears of it, so the state is set here by recording five failures on the
    cell's breaker (as the burst would); everything else runs against the real server."""
    server = pg_server_factory(server_settings=LOGGED)
    settings = fast_settings(health_interval_s=60.0, backoff_base_s=5.0)
    async with questdb_tree(tmp_path, server.dsn, settings) as t:
        assert (await t.ref.fetchval("SELECT 1")).ok
        cell = t.cell

        def burst() -> None:
            for _ in range(5):
                cell.guard.result(None, ok=False)  # five connection failures

        async def probe_round(tag: str, n: int = 4) -> list[Response]:
            results: list[Response] = []

            async def one(i: int) -> None:
                results.append(await t.ref.fetchval(
                    f"SELECT pg_sleep(0.2), {i} /* {tag}_{i} */"))

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
            return results

        # -- success closes it
        mark = t.last_seq
        burst()
        opened = await t.wait_kind("circuit_opened", after=mark)
        elapsed, resp = await timed(t.ref.fetchval("SELECT 1 /* while_open */"))
        assert elapsed < 0.1 and resp.error is not None
        assert resp.error.code is ErrorCode.CIRCUIT_OPEN
        assert resp.error.retry_after is not None and 0.7 < resp.error.retry_after <= 1.0
        await trio.sleep(1.05)
        results = await probe_round("ok")
        assert sorted(r.status for r in results) == ["error", "error", "error", "ok"]
        refused = [r for r in results if not r.ok]
        assert all(r.error is not None and r.error.code is ErrorCode.CIRCUIT_OPEN
                   for r in refused)
        assert sum(log_count(server, f"ok_{i}") for i in range(4)) == 1
        assert log_count(server, "while_open") == 0
        await t.wait_kind("circuit_closed", after=opened.seq)
        kinds = [e.kind for e in t.events("circuit_opened", "circuit_half_open",
                                          "circuit_closed", after=opened.seq - 1)]
        assert kinds == ["circuit_opened", "circuit_half_open", "circuit_closed"]
        assert cell.breaker.state is BreakerState.CLOSED
        assert t.ref.state == "CONNECTED"

        # -- failure re-opens it, for the full open_s again
        mark = t.last_seq
        await in_thread(server.stop)
        burst()
        await trio.sleep(1.05)
        results = await probe_round("down")
        await t.wait(lambda e: e.kind == "circuit_opened" and e.seq > mark
                     and (e.data or {}).get("from") == "HALF_OPEN")
        assert all(r.status == "error" and r.error is not None
                   and r.error.code is ErrorCode.CIRCUIT_OPEN for r in results), results
        kinds = [e.kind for e in t.events("circuit_opened", "circuit_half_open",
                                          "circuit_closed", after=mark)]
        assert kinds == ["circuit_opened", "circuit_half_open", "circuit_opened"]
        reopened = t.events("circuit_opened", after=mark)[-1]
        assert reopened.data is not None and reopened.data["from"] == "HALF_OPEN"
        _, resp = await timed(t.ref.fetchval("SELECT 1"))
        assert resp.error is not None and resp.error.code is ErrorCode.CIRCUIT_OPEN
        assert resp.error.retry_after is not None and 0.6 < resp.error.retry_after <= 1.0
        # The failed probe told the supervisor, which now reconnects on its own schedule.
        await t.wait_state("RECONNECTING", after=mark)


# ----------------------------------------------------------------------------- retries
async def test_a_blip_is_absorbed_by_the_retries(
        tmp_path: Path, pg_server: EmbeddedPostgres, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with questdb_tree(tmp_path, pg_server.dsn,
                            fast_settings(health_interval_s=60.0)) as t:
        assert (await t.ref.fetchval("SELECT 1")).ok
        mark = t.last_seq
        await in_thread(pg_server.stop)

        async def come_back() -> None:
            await trio.sleep(0.2)
            await in_thread(pg_server.start)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(come_back)
            elapsed, resp = await timed(t.ref.fetchval("SELECT 40 + 2 /* blip */"))
        # Attempts at 0, 0.1 and 0.6 s: the third finds the server back (or, if the server
        # was slow to start on a busy machine, the fourth at 1.6 s).
        assert resp.ok and resp.data == 42, resp
        records = retry_records(caplog, "fetchval")
        assert [r.getMessage().rsplit("(", 1)[1] for r in records] == [
            "retry 1 in 0.100 s)", "retry 2 in 0.500 s)", "retry 3 in 1.000 s)"][:len(records)]
        assert len(records) in (2, 3)
        assert on_time(elapsed, sum(RETRY_DELAYS[:len(records)]), 0.3)
        assert on_time(records[1].created - records[0].created, 0.1)
        # The caller saw no error, the actor never left CONNECTED, the breaker forgot.
        assert not t.events("state_changed", after=mark)
        assert t.cell.breaker.state is BreakerState.CLOSED and t.cell.breaker.failures == 0


async def test_contract_defaults_retry_then_breaker(
        tmp_path: Path, pg_server: EmbeddedPostgres, caplog: pytest.LogCaptureFixture) -> None:
    """The unmodified ``[questdb]`` defaults: retries at 100/500/1000 ms, then the reconnect
    attempt 1 s later is the fifth failure and the breaker opens for 30 s."""
    caplog.set_level(logging.WARNING)
    settings = RuntimeConfig.from_mapping({}, env={}).actor_settings("questdb")
    assert settings.retry_delays_s == RETRY_DELAYS
    assert settings.breaker is not None
    assert (settings.breaker.threshold, settings.breaker.open_s) == (5, 30.0)
    assert settings.backoff.schedule() == (1.0, 2.0, 4.0)
    assert (settings.health_interval_s, settings.call_timeout_s) == (30.0, 10.0)
    async with questdb_tree(tmp_path, pg_server.dsn, settings) as t:
        assert (await t.ref.fetchval("SELECT 1")).ok
        mark = t.last_seq
        await in_thread(pg_server.stop)
        elapsed, resp = await timed(t.ref.fetchval("SELECT 2 /* contract */"))
        assert resp.status == "error" and resp.error is not None
        assert resp.error.code is ErrorCode.DB_UNAVAILABLE
        assert resp.error.message.startswith("fetchval failed: ")
        records = retry_records(caplog, "fetchval")
        assert len(records) == 3
        gaps = [b.created - a.created for a, b in zip(records, records[1:], strict=False)]
        assert on_time(gaps[0], 0.1) and on_time(gaps[1], 0.5), gaps
        assert on_time(elapsed, 1.6, 0.4), elapsed
        assert t.cell.breaker.failures == 4 and t.cell.breaker.state is BreakerState.CLOSED

        down = await t.wait_state("RECONNECTING", after=mark)
        opened = await t.wait_kind("circuit_opened", after=mark, limit_s=5)
        assert on_time(t.at(opened) - t.at(down), 1.0, 0.3)
        elapsed, resp = await timed(t.ref.fetchval("SELECT 3"))
        assert elapsed < 0.1 and resp.error is not None
        assert resp.error.code is ErrorCode.CIRCUIT_OPEN
        assert resp.error.retry_after is not None and 29.0 < resp.error.retry_after <= 30.0


# ----------------------------------------------------------------------------- end to end
async def test_stop_the_database_verify_graceful_degradation(
        tmp_path: Path, pg_server: EmbeddedPostgres) -> None:
    """The story's missing integration test (BUG-008-7, DoD 7), through ``open_runtime``."""
    fast = {"backoff_base_s": 0.1, "health_interval_s": 0.5, "connect_timeout_s": 2.0,
            "probe_timeout_s": 2.0, "call_timeout_s": 5.0, "shutdown_timeout_s": 3.0}
    config = RuntimeConfig.from_mapping({
        "runtime": {"state_dir": str(tmp_path / "var"), "fsync": "never"},
        "control": {"enabled": False},
        "health": {"enabled": False},
        "questdb": {"dsn": pg_server.dsn, "breaker_open_s": 1.0, **fast},
        "mt5": {"backend": "simulator", **fast},
        "cache": {"shutdown_timeout_s": 3.0},
    }, env={})
    async with open_runtime(config) as rt:
        assert rt.state("questdb") == "CONNECTED" and rt.state("mt5") == "CONNECTED"
        wall = rt.supervisor.wallclock
        sql = "SELECT 'london' AS session, 2 AS symbols"
        before = wall.wall(trio.current_time())
        ok = await rt.questdb.fetch(sql)
        fetched = wall.wall(trio.current_time())
        assert ok.ok and ok.data == [{"session": "london", "symbols": 2}]
        code, doc = rt.health()
        assert doc["checks"]["questdb:connection"][0]["status"] == "pass"

        await in_thread(pg_server.stop)
        await eventually(lambda: rt.state("questdb") == "ERROR", within_s=10)
        resp = await rt.questdb.fetch(sql)
        assert resp.status == "degraded" and resp.data == ok.data, resp
        assert resp.cached_at is not None and before <= resp.cached_at <= fetched
        assert abs((resp.cached_at - fetched).total_seconds()) < 0.05
        assert resp.error is not None and resp.error.message.startswith("fetch ")
        assert resp.reason in ("actor_unavailable", "circuit_open", "database_unavailable")
        write = await rt.questdb.execute("CREATE TABLE t (a int)")
        assert write.status == "error" and write.error is not None
        assert write.error.code in UNAVAILABLE
        # The document is built from state already held: the database is not asked.
        code, doc = rt.health()
        check = doc["checks"]["questdb:connection"][0]
        assert check["status"] == "fail"
        # Overall: not "pass"; whether one essential actor down is "warn" (200, as in DESIGN.md
        # section 7's example) or "fail" (503) is health.py's rule, not this test's.
        assert (doc["status"], code) in (("warn", 200), ("fail", 503))
        assert "questdb" in doc["output"]
        assert check["observedValue"] == "ERROR"
        assert check["output"].startswith("DB_UNAVAILABLE: ")
        assert doc["checks"]["mt5:connection"][0]["status"] == "pass"
        assert PG_TEST_PASSWORD not in json.dumps(doc)
        # Other actors are untouched by the database outage.
        tick = await rt.mt5.symbol_info_tick("EURUSD")
        assert tick.ok, tick

        await in_thread(pg_server.start)
        await eventually(lambda: rt.state("questdb") == "CONNECTED", within_s=10)
        # DESIGN's breaker: an open circuit fails fast for breaker_open_s (1 s here) even
        # though the database is back, then lets one half-open probe through.
        with trio.fail_after(5):
            while True:
                resp = await rt.questdb.fetch(sql)
                if resp.ok:
                    break
                assert resp.status == "degraded" and resp.reason == "circuit_open", resp
                await trio.sleep(0.1)
        assert resp.cached_at is None and resp.data == ok.data, resp
        code, doc = rt.health()
        assert doc["checks"]["questdb:connection"][0]["status"] == "pass"


# ----------------------------------------------------------------------------- secrets
SECRET = "hunter2xyz"


async def test_dsn_password_never_appears_in_messages_events_status_or_logs(
        tmp_path: Path, pg_server: EmbeddedPostgres, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    admin = await trio_run_asyncpg(pg_server.dsn,
                                   f"CREATE ROLE app LOGIN PASSWORD '{SECRET}'")
    assert admin == "CREATE ROLE"
    base = f"postgresql://app:{SECRET}@{pg_server.host}:{pg_server.port}"
    good, no_db = f"{base}/postgres", f"{base}/no_such_db"
    wrong_pw = good.replace(SECRET, SECRET + "-nope")
    settings = fast_settings(max_attempts=1)
    texts: list[str] = []

    async with questdb_tree(tmp_path, good, settings) as t:
        for name, dsn in (("q_no_db", no_db), ("q_wrong_pw", wrong_pw)):
            await t.sup.start_child(ChildSpec(name, lambda dsn=dsn: QuestdbActor(dsn),
                                              settings=settings, ref_class=QuestdbRef))
        assert (await t.ref.fetchval("SELECT current_user")).data == "app"
        for name in ("q_no_db", "q_wrong_pw"):
            resp = await t.sup.ref(name).call("fetchval", {"sql": "SELECT 1"})
            assert resp.error is not None and resp.error.code in UNAVAILABLE
            texts.append(resp.error.message)
        await t.rec.wait_for(lambda e: e.actor == "q_no_db" and e.error is not None
                             and "no_such_db" in e.error["message"])
        await t.rec.wait_for(lambda e: e.actor == "q_wrong_pw" and e.error is not None
                             and "password authentication failed" in e.error["message"])
        texts.append(json.dumps(t.sup.status()))

        await in_thread(pg_server.stop)
        for call in (t.ref.fetchval("SELECT 1"), t.ref.execute("SELECT 1"),
                     t.ref.fetch("SELECT 2")):
            resp = await call
            assert resp.error is not None
            texts.append(resp.error.message)
        await t.wait_state("RECONNECTING")
        await trio.sleep(0.3)
        texts.append(json.dumps(t.sup.status()))
        texts.extend(e.to_line() for e in t.rec.events)
    texts.append((tmp_path / "events.jsonl").read_text())
    texts.extend(r.getMessage() for r in caplog.records)
    texts.append(caplog.text)  # formatted, with tracebacks

    joined = "\n".join(texts)
    assert "no_such_db" in joined and "password authentication failed" in joined
    assert SECRET not in joined
    assert f"app:{SECRET}" not in joined and PG_TEST_PASSWORD not in joined


async def trio_run_asyncpg(dsn: str, sql: str) -> Any:
    """One statement with asyncpg in a worker thread's own loop (setup, outside the actor)."""

    async def go() -> Any:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            return await conn.execute(sql)
        finally:
            await conn.close()

    return await trio.to_thread.run_sync(lambda: asyncio.run(go()))

