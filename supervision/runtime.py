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
from typing import Any

import trio

from supervision.config import RuntimeConfig
from supervision.errors import ErrorCode, ErrorInfo, Response
from supervision.eventlog import EventLog
from supervision.ref import ActorRef
from supervision.settings import ActorSettings
from supervision.states import ConnectionState
from supervision.supervisor import ChildSpec, EscalateHook, Supervisor

log = logging.getLogger("mt5_supervisor.runtime")

DEFAULT_ACTORS = ("cache", "questdb", "mt5")


class Runtime:
    """What a bot holds: refs to the actors, state, events, and the operator's levers."""

    def __init__(self, config: RuntimeConfig, supervisor: Supervisor, store: Any) -> None:
        self.config = config
        self.supervisor = supervisor
        self.store = store  # the cache actor's TtlCache
        self.events = supervisor.bus
        self.simulator: Any = None  # the MT5 TerminalSimulator, when that backend is used
        self.embedded_db: Any = None  # the EmbeddedPostgres, when no DSN is configured
        self.started_at = trio.current_time()
        self._shutdown = trio.Event()
        self._servers: list[trio.CancelScope] = []
        self.endpoints: dict[str, tuple[str, int]] = {}
        self._nursery: trio.Nursery | None = None  # for the runtime's own background tasks

    # ------------------------------------------------------------------ actors
    @property
    def mt5(self) -> Any:
        return self.supervisor.ref("mt5")

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
        from supervision.health import health_document

        return health_document(self)

    async def start_child(self, spec: ChildSpec) -> ActorRef:
        return await self.supervisor.start_child(spec)

    async def restart(self, name: str) -> None:
        if name not in self.supervisor.children:
            raise KeyError(name)
        await self.supervisor.restart_child(name, "operator")

    async def call(self, actor: str, op: str, args: dict[str, Any] | None = None,
                   timeout_s: float | None = None) -> Response:
        if actor not in self.supervisor.children:
            return Response.failure(ErrorInfo(ErrorCode.INVALID_REQUEST,
                                              f"{op} failed: no actor named {actor!r}"))
        return await self.ref(actor).call(op, args or {}, timeout_s=timeout_s)

    # ------------------------------------------------------------------ fault injection
    async def inject(self, fault: str, *, actor: str = "mt5", duration_s: float | None = None,
                     **params: Any) -> None:
        """Simulator and test-server faults (``sim.inject``). ``mt5``: the simulator's faults;
        ``questdb``: ``db_stop`` / ``db_kill`` / ``db_start`` on the embedded server (a
        ``duration_s`` restarts it afterwards). Raises ``ValueError`` for what cannot be done."""
        if actor == "mt5":
            if self.simulator is None:
                raise ValueError("sim.inject needs the MT5 simulator backend")
            from actors.mt5.simulator import SIMULATOR_FAULTS

            if fault not in SIMULATOR_FAULTS:
                raise ValueError(f"unknown simulator fault {fault!r}; one of "
                                 f"{', '.join(sorted(SIMULATOR_FAULTS))}")
            self.simulator.inject(fault, duration_s=duration_s, **params)
            return
        if actor == "questdb":
            db = self.embedded_db
            if db is None:
                raise ValueError("database faults need the embedded PostgreSQL server")
            actions = {"db_stop": db.stop, "db_kill": db.kill, "db_start": db.start,
                       "clear": db.start}
            if fault not in actions:
                raise ValueError(f"unknown database fault {fault!r}; one of "
                                 f"{', '.join(sorted(actions))}")
            if fault in ("db_start", "clear") and db.is_running():
                return
            await trio.to_thread.run_sync(actions[fault])
            if duration_s is not None and fault in ("db_stop", "db_kill"):
                assert self._nursery is not None
                self._nursery.start_soon(self._restart_db_after, duration_s)
            return
        raise ValueError(f"no faults can be injected into {actor!r}")

    async def _restart_db_after(self, delay_s: float) -> None:
        await trio.sleep(delay_s)
        if self.embedded_db is not None and not self.embedded_db.is_running():
            await trio.to_thread.run_sync(self.embedded_db.start)

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
    event_log = EventLog(state_dir / "events.jsonl", fsync=config["runtime"]["fsync"])
    event_log.open()
    store = TtlCache(ttl_s=config["cache"]["ttl_s"], max_entries=config["cache"]["max_entries"])
    try:
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
                if config["mt5"]["enabled"]:
                    await _start_mt5(rt)
                if config["questdb"]["enabled"] and config["questdb"]["persist_events"]:
                    await _start_event_store(rt)
                for spec in children:
                    await sup.start_child(spec)
                if config["control"]["enabled"]:
                    from supervision.control.server import serve_control

                    await _start_server(nursery, rt, "control", serve_control)
                if config["health"]["enabled"]:
                    from supervision.httpserver import serve_http

                    await _start_server(nursery, rt, "health", serve_http)
                yield rt
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(_shutdown_bound(config)):
                    await _close(rt)
                nursery.cancel_scope.cancel()
    finally:
        event_log.close()


def _shutdown_bound(config: RuntimeConfig) -> float:
    per_actor = [config[s]["shutdown_timeout_s"] + 1.0 for s in DEFAULT_ACTORS]
    return sum(per_actor) + 30.0  # + the embedded database's own stop


async def _close(rt: Runtime) -> None:
    # Actors first, while the control channel is still up: subscribers see the final
    # state changes, and the closing bus ends their subscriptions with events.closed.
    await rt.supervisor.shutdown()
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
    if not dsn:
        dsn = await _start_embedded_db(rt)
    await rt.supervisor.start_child(ChildSpec(
        "questdb", lambda: QuestdbActor(dsn, config), settings=config.actor_settings("questdb"),
        ref_class=QuestdbRef))


async def _start_event_store(rt: Runtime) -> None:
    from actors.questdb.persistence import EventStoreActor

    q = rt.config["questdb"]
    await rt.supervisor.start_child(ChildSpec(
        "events_store",
        lambda: EventStoreActor(rt.supervisor.bus, rt.supervisor.log, rt.questdb,
                                batch_size=q["persist_batch_size"]),
        settings=ActorSettings(health_interval_s=q["health_interval_s"],
                               shutdown_timeout_s=q["shutdown_timeout_s"]),
    ))


async def _start_embedded_db(rt: Runtime) -> str:
    from actors.questdb.pgserver import EmbeddedPostgres

    db = EmbeddedPostgres(rt.config.state_dir / "postgres")
    rt.embedded_db = db
    try:
        await trio.to_thread.run_sync(db.start)
    except Exception:
        # The questdb actor will report the database as unavailable and keep probing.
        log.exception("the embedded PostgreSQL server did not start")
    return db.dsn


async def _start_mt5(rt: Runtime) -> None:
    from actors.mt5.actor import Mt5Ref, make_mt5_actor

    config = rt.config
    actor, simulator = make_mt5_actor(config)
    rt.simulator = simulator
    await rt.supervisor.start_child(ChildSpec(
        "mt5", lambda: actor, settings=config.actor_settings("mt5"), ref_class=Mt5Ref))
