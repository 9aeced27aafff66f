"""``open_runtime``: the default tree, the control channel and the health server.

Start order (each waits for the previous one's first connect attempt to resolve):
the event log, the supervisor, then ``cache`` -> (embedded PostgreSQL) -> ``questdb`` ->
``mt5`` -> ``events_store`` (event persistence) -> the bot's own children -> control channel
and health server. Stop order is the reverse, bounded: servers first (no new requests), then
the children in reverse start order, then the embedded database, then the log.

This is the one module of ``supervision`` that imports resource actors (DESIGN.md section 2).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, overload

import attrs
import trio

from supervision.errors import ErrorCode, ErrorInfo, Response
from supervision.eventlog import EventLog
from supervision.ref import ActorRef
from supervision.settings import ActorSettings
from supervision.shell.config import ConfigError, RuntimeConfig
from supervision.shell.health import ESSENTIAL_ACTORS
from supervision.states import ConnectionState
from supervision.supervisor import (
    ChildSpec,
    EscalateHook,
    Subtree,
    Supervisor,
    SupervisorSpec,
)

if TYPE_CHECKING:
    from actors.mt5.api import Mt5Ref

log = logging.getLogger("mt5_supervisor.runtime")

DEFAULT_ACTORS = ("cache", "questdb", "mt5")
EMBEDDED_DB = "embedded_db"  # the embedded PostgreSQL server's child (no questdb.dsn)


class Runtime:
    """What a bot holds: refs to the actors, state, events, and the operator's levers."""

    def __init__(self, config: RuntimeConfig, supervisor: Supervisor, store: Any) -> None:
        self.config = config
        self.supervisor = supervisor
        self.store = store  # the cache actor's TtlCache
        self.events = supervisor.bus
        self.simulator: Any = None  # the MT5 TerminalSimulator, when that backend is used
        # Per terminal actor ("mt5", "mt5-NAME"): where sim.inject goes (the simulator, or
        # the TerminalHost of the process it runs in), and the hosts to close at shutdown.
        self.simulators: dict[str, Any] = {}
        self.terminal_hosts: list[Any] = []
        self.embedded_db: Any = None  # the EmbeddedPostgres, when no DSN is configured
        self.embedded: Any = None  # its EmbeddedDatabase (secrets, roles, fault hold)
        self.started_at = trio.current_time()
        self._shutdown = trio.Event()
        self._servers: list[trio.CancelScope] = []
        self.endpoints: dict[str, tuple[str, int]] = {}
        # Product knowledge for health: the database and every terminal (set as they start).
        self.essential: frozenset[str] = ESSENTIAL_ACTORS
        self._nursery: trio.Nursery | None = None  # for the runtime's own background tasks

    # ------------------------------------------------------------------ actors
    @property
    def mt5(self) -> Mt5Ref:
        """The ``[mt5]`` terminal: the MetaTrader5 functions as typed async methods."""
        return self.supervisor.ref("mt5")  # type: ignore[return-value]

    def terminal(self, name: str) -> Mt5Ref:
        """The ``[mt5.terminals.NAME]`` terminal (actor ``mt5-NAME``); "mt5" for [mt5]."""
        actor = name if name == "mt5" or name.startswith("mt5-") else f"mt5-{name}"
        return self.supervisor.ref(actor)  # type: ignore[return-value]

    @property
    def questdb(self) -> Any:
        return self.supervisor.ref("questdb")

    @property
    def cache(self) -> Any:
        return self.supervisor.ref("cache")

    def ref(self, name: str) -> ActorRef:
        return self.supervisor.ref(name)

    def state(self, name: str) -> ConnectionState:
        return self.supervisor.state(name)

    def status(self) -> dict[str, Any]:
        return {"actors": self.supervisor.status()}

    def health(self) -> tuple[int, dict[str, Any]]:
        from supervision.shell.health import health_document

        return health_document(self)

    @overload
    async def start_child(self, spec: ChildSpec) -> ActorRef: ...
    @overload
    async def start_child(self, spec: SupervisorSpec) -> Subtree: ...

    async def start_child(self, spec: ChildSpec | SupervisorSpec) -> ActorRef | Subtree:
        """Add an actor (returns its ``ActorRef``) or a nested supervisor with its own
        children and strategy (returns its ``Subtree``) to the tree."""
        return await self.supervisor.start_child(spec)

    def nudge(self, name: str, reason: str = "nudge") -> None:
        """The resource behind ``name`` is back (e.g. a supervised database restarted):
        reconnect or probe now instead of at the next scheduled attempt or probe."""
        self.supervisor.nudge(name, reason)

    async def restart(self, name: str) -> None:
        if name not in self.supervisor.children:
            raise KeyError(name)
        await self.supervisor.restart_child(name, "operator")

    async def call(self, actor: str, op: str, args: dict[str, Any] | None = None,
                   timeout_s: float | None = None) -> Response:
        """The control channel's entry point. Free-form SQL arriving here is marked so the
        ``questdb`` actor runs it on its own pool under the least-privilege query role."""
        if actor not in self.supervisor.children:
            return Response.failure(ErrorInfo(ErrorCode.INVALID_REQUEST,
                                              f"{op} failed: no actor named {actor!r}"))
        args = args or {}
        from actors.questdb.actor import QuestdbActor, mark_via_control

        if isinstance(self.supervisor.children[actor].actor, QuestdbActor):
            args = mark_via_control(args)
        return await self.ref(actor).call(op, args, timeout_s=timeout_s)

    # ------------------------------------------------------------------ fault injection
    async def inject(self, fault: str, *, actor: str = "mt5", duration_s: float | None = None,
                     **params: Any) -> None:
        """Simulator and test-server faults (``sim.inject``). ``mt5``: the simulator's faults;
        ``questdb``: ``db_stop`` / ``db_kill`` / ``db_start`` on the embedded server (a
        ``duration_s`` restarts it afterwards). Raises ``ValueError`` for what cannot be done."""
        if actor == "mt5" or actor.startswith("mt5-"):
            simulator = self.simulators.get(actor)
            if simulator is None:
                raise ValueError("sim.inject needs the MT5 simulator backend" + (
                    "" if actor in self.supervisor.children or actor == "mt5"
                    else f" (no MT5 terminal actor named {actor!r})"))
            from actors.mt5.simulator import SIMULATOR_FAULTS

            if fault not in SIMULATOR_FAULTS:
                raise ValueError(f"unknown simulator fault {fault!r}; one of "
                                 f"{', '.join(sorted(SIMULATOR_FAULTS))}")
            done = simulator.inject(fault, duration_s=duration_s, **params)
            if done is not None:  # the process worker's host forwards it over its pipe
                await done
            return
        if actor == "questdb":
            # db_stop holds the server down (its supervisor does not restart it) until
            # db_start/clear or duration_s; db_kill is a crash, which the embedded_db
            # child notices and restarts by itself.
            embedded = self.embedded
            if embedded is None:
                raise ValueError("database faults need the embedded PostgreSQL server")
            db = embedded.server
            faults = ("db_stop", "db_kill", "db_start", "clear")
            if fault not in faults:
                raise ValueError(f"unknown database fault {fault!r}; one of "
                                 f"{', '.join(sorted(faults))}")
            if fault in ("db_start", "clear"):
                await self._release_db()
                return
            if fault == "db_stop":
                embedded.held = True
            await trio.to_thread.run_sync(db.stop if fault == "db_stop" else db.kill)
            if duration_s is not None:
                assert self._nursery is not None
                self._nursery.start_soon(self._restart_db_after, duration_s)
            return
        raise ValueError(f"no faults can be injected into {actor!r}")

    async def _release_db(self) -> None:
        """End a db_stop hold: the embedded_db child starts the server at once (it alone
        starts it, so two starts never race)."""
        embedded = self.embedded
        embedded.held = False
        if self.state(EMBEDDED_DB) != ConnectionState.CONNECTED:
            await self.supervisor.restart_child(EMBEDDED_DB, "database released")

    async def _restart_db_after(self, delay_s: float) -> None:
        await trio.sleep(delay_s)
        if self.embedded is not None:
            await self._release_db()

    # ------------------------------------------------------------------ shutdown
    def request_shutdown(self) -> None:
        self._shutdown.set()

    @property
    def shutdown_requested(self) -> bool:
        return self._shutdown.is_set()

    async def wait_shutdown(self) -> None:
        await self._shutdown.wait()


async def _start_server(nursery: trio.Nursery, rt: Runtime, name: str,
                        serve: Callable[..., Awaitable[None]]) -> None:
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        with scope:
            await serve(rt, task_status=task_status)

    rt.endpoints[name] = await nursery.start(run)
    rt._servers.append(scope)


@contextlib.asynccontextmanager
async def open_runtime(
    config: RuntimeConfig | None = None,
    *,
    on_escalate: EscalateHook | None = None,
    children: Iterable[ChildSpec] = (),
) -> AsyncIterator[Runtime]:
    """Run the whole tree for the duration of the ``async with`` block."""
    from actors.cache import CacheActor, CacheRef, TtlCache

    config = config or RuntimeConfig.load()
    state_dir = config.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    event_log = EventLog(state_dir / "events.jsonl", fsync=config["runtime"]["fsync"],
                         buffer=config["runtime"]["log_buffer"])
    event_log.open()
    cache = config["cache"]
    store = TtlCache(ttl_s=cache["ttl_s"], max_entries=cache["max_entries"],
                     max_bytes=cache["max_bytes"], max_entry_bytes=cache["max_entry_bytes"])
    try:
        if event_log.last_seq == 0:
            await _start_above_the_events_table(config, event_log)
        async with trio.open_nursery() as nursery:
            sup = Supervisor(log=event_log, lkg=store, on_escalate=on_escalate,
                             subscriber_buffer=config["runtime"]["subscriber_buffer"])
            await nursery.start(sup.run)
            rt = Runtime(config, sup, store)
            rt._nursery = nursery
            try:
                await sup.start_child(ChildSpec(
                    "cache", lambda: CacheActor(store), settings=config.actor_settings("cache"),
                    ref_class=CacheRef))
                if config["questdb"]["enabled"]:
                    await _start_questdb(rt)
                if config["mt5"]["enabled"] or config.terminals:
                    await _start_mt5(rt)
                if config["questdb"]["enabled"] and config["questdb"]["persist_events"]:
                    await _start_event_store(rt)
                for spec in children:
                    await sup.start_child(spec)
                if config["control"]["enabled"]:
                    from supervision.shell.control.server import serve_control

                    await _start_server(nursery, rt, "control", serve_control)
                if config["health"]["enabled"]:
                    from supervision.shell.httpserver import serve_http

                    await _start_server(nursery, rt, "health", serve_http)
                yield rt
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(_shutdown_bound(config)):
                    await _close(rt)
                nursery.cancel_scope.cancel()
    finally:
        event_log.close()


async def _start_above_the_events_table(config: RuntimeConfig, event_log: EventLog) -> None:
    """A log starting from nothing, with an external database that may keep the table from
    before (the state directory was lost): number above what it holds, from the first
    event (actors/questdb/seq_floor.py). The embedded database lives in the state
    directory: if that was lost, so was its table."""
    q = config["questdb"]
    if not (q["enabled"] and q["persist_events"] and q["dsn"]):
        return
    from actors.questdb.seq_floor import persisted_max_seq

    held = await persisted_max_seq(q["dsn"], timeout_s=min(5.0, q["connect_timeout_s"]))
    if held:
        event_log.raise_floor(held, f"the events table already holds seq {held} and this "
                                    "log starts from nothing (the state directory was lost)")


def _shutdown_bound(config: RuntimeConfig) -> float:
    per_actor = [config[s]["shutdown_timeout_s"] + 1.0 for s in DEFAULT_ACTORS] + [
        t["shutdown_timeout_s"] + 1.0 for t in config.terminals.values()]
    return sum(per_actor) + 30.0  # + the embedded database's own stop


async def _close(rt: Runtime) -> None:
    # Actors first, while the control channel is still up: subscribers see the final
    # state changes, and the closing bus ends their subscriptions with events.closed.
    await rt.supervisor.shutdown()
    for host in rt.terminal_hosts:
        await host.aclose()  # the terminals' worker processes, now that their actors are stopped
    await trio.sleep(0.05)  # let the forwarders queue their last notifications
    for scope in reversed(rt._servers):
        scope.cancel()  # each connection flushes its queue, then closes with 1001
    if rt.embedded_db is not None:
        db = rt.embedded_db
        await trio.to_thread.run_sync(db.close)


async def _start_questdb(rt: Runtime) -> None:
    from actors.questdb.actor import QuestdbActor, QuestdbRef

    config = rt.config
    q = config["questdb"]
    dsn = q["dsn"]
    query_dsn: str | None = q["query_dsn"] or None
    if not dsn:
        dsn, query_dsn = await _start_embedded_db(rt)
    elif query_dsn is None:
        log.warning("questdb.query_dsn is not set: free-form SQL from the control channel "
                    "(token holders only) runs with the runtime's own database user; set it "
                    "to a least-privilege user (docs/operations.md, Security)")
    await rt.supervisor.start_child(ChildSpec(
        "questdb", lambda: QuestdbActor(dsn, config, query_dsn=query_dsn),
        settings=config.actor_settings("questdb"), ref_class=QuestdbRef))


async def _start_event_store(rt: Runtime) -> None:
    from actors.questdb.persistence import EventStoreActor

    q = rt.config["questdb"]
    await rt.supervisor.start_child(ChildSpec(
        "events_store",
        lambda: EventStoreActor(rt.supervisor.bus, rt.supervisor.log, rt.questdb,
                                batch_size=q["persist_batch_size"],
                                raise_seq_floor=rt.supervisor.raise_seq_floor),
        settings=ActorSettings(health_interval_s=q["health_interval_s"],
                               shutdown_timeout_s=q["shutdown_timeout_s"]),
    ))


async def _start_embedded_db(rt: Runtime) -> tuple[str, str]:
    """The embedded server as a supervised child of its own, started before ``questdb``
    (docs/operations.md, Security). Returns the runtime role's and the query role's DSNs."""
    from actors.questdb.embedded_db import EmbeddedDatabase, EmbeddedDbActor
    from actors.questdb.pgserver import EmbeddedPostgresError

    q = rt.config["questdb"]
    try:
        embedded = EmbeddedDatabase(rt.config.state_dir,
                                    statement_timeout_s=q["query_statement_timeout_s"])
    except EmbeddedPostgresError as exc:  # a damaged secrets file: the operator must act
        raise ConfigError(str(exc)) from None
    rt.embedded, rt.embedded_db = embedded, embedded.server
    start_timeout_s = 30.0

    def questdb_now() -> None:
        # The server is back: the questdb actor reconnects (or probes) now, not at its next
        # scheduled attempt or 30 s probe.
        if "questdb" in rt.supervisor.children:
            rt.nudge("questdb", "database restarted")

    settings = attrs.evolve(rt.config.actor_settings("questdb"), breaker=None,
                            retry_delays_s=(), connect_timeout_s=start_timeout_s + 10.0)
    await rt.supervisor.start_child(ChildSpec(
        EMBEDDED_DB,
        lambda: EmbeddedDbActor(embedded, start_timeout_s=start_timeout_s,
                                liveness_timeout_s=min(2.0, q["probe_timeout_s"]),
                                on_restarted=questdb_now),
        settings=settings))
    return embedded.runtime_dsn, embedded.query_dsn


async def _start_mt5(rt: Runtime) -> None:
    from actors.mt5.actor import Mt5Ref, make_mt5_actor

    config = rt.config
    # A fresh instance on every (re)start; unresolved orders live in the factory's ledger.
    # [mt5] is "mt5"; each [mt5.terminals.NAME] is "mt5-NAME", with its own worker process,
    # ledger, breaker and backoff.
    names = (["mt5"] if config["mt5"]["enabled"] else []) + [
        f"mt5-{t}" for t, keys in config.terminals.items() if keys["enabled"]]
    rt.essential = rt.essential | set(names)
    for name in names:
        terminal = make_mt5_actor(config, name)
        rt.simulators[name] = terminal.simulator
        if terminal.host is not None:
            rt.terminal_hosts.append(terminal.host)
            await terminal.host.start()  # its worker process, outside the connect deadline
        settings = (config.actor_settings("mt5") if name == "mt5"
                    else config.terminal_settings(name.removeprefix("mt5-")))
        await rt.supervisor.start_child(ChildSpec(
            name, terminal.make, settings=settings, ref_class=Mt5Ref))
    rt.simulator = rt.simulators.get("mt5")
