"""The health document (DESIGN.md section 7): IETF "Health Check Response Format for HTTP
APIs" (draft-inadarei-api-health-check), served as ``application/health+json``.

Built only from state the supervisor already holds (its status view, fed by the actors'
messages) and the cache's in-memory size: answering it does no I/O, so a health check can
never hang on the resource it reports about.

The status rule (docs/operations.md, "Health"):

* per actor, ``<name>:connection``: CONNECTED -> pass; RECONNECTING or DISCONNECTED -> warn;
  ERROR -> fail. The cache's check is ``cache:entries`` (observedValue: the entry count).
* per breaker, ``<name>:circuit``: CLOSED -> pass; HALF_OPEN or OPEN -> warn.
* per check an actor reports itself (a ``check_changed`` notice), ``<name>:<check>``: its own
  status and output (e.g. ``events_store:table`` fails while the table's WAL is suspended).
* ``eventlog:writable``: fail while the event log cannot be written (full or read-only
  disk: events wait in memory, unpublished), warn after the log was lost, replaced or found
  with unreadable lines; a failing log makes the overall status **fail**.
* overall: **fail** (HTTP 503) when every essential actor present (``mt5``, ``questdb``) is
  in ERROR: the runtime can serve nothing but cached answers; else **warn** when any check
  is not pass (an actor reconnecting or in ERROR, a breaker open: that is also when degraded
  answers are served); else **pass**. 200 for pass and warn. One essential actor in ERROR is
  a warn, as in DESIGN.md section 7's example: the rest of the runtime still serves.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any

import trio

from supervision.clock import iso
from supervision.eventlog import LogCondition

if TYPE_CHECKING:
    from supervision.shell.surface import RuntimeSurface

CONTENT_TYPE = "application/health+json"
# The default tree's essential actors; the runtime that assembles a tree says which are
# essential in it (``RuntimeSurface.essential``: every terminal, and the database).
ESSENTIAL_ACTORS = frozenset({"mt5", "questdb"})
DATASTORES = frozenset({"questdb", "cache"})

STATE_STATUS = {"CONNECTED": "pass", "RECONNECTING": "warn", "DISCONNECTED": "warn",
                "ERROR": "fail"}
BREAKER_STATUS = {"CLOSED": "pass", "HALF_OPEN": "warn", "OPEN": "warn"}
HTTP_STATUS = {"pass": 200, "warn": 200, "fail": 503}
EVENTLOG_CHECK = "eventlog:writable"

try:  # read once at import: the document itself must not touch the disk
    RELEASE_ID = metadata.version("mt5-supervisor")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    RELEASE_ID = "0+unknown"


def overall_status(actor_states: dict[str, str], check_statuses: list[str],
                   essential_actors: frozenset[str] = ESSENTIAL_ACTORS) -> str:
    """The rule, on its own so it can be tested as a table."""
    essential = [state for name, state in actor_states.items() if name in essential_actors]
    if essential and all(state == "ERROR" for state in essential):
        return "fail"
    if any(status != "pass" for status in check_statuses):
        return "warn"
    return "pass"


def health_document(rt: RuntimeSurface) -> tuple[int, dict[str, Any]]:
    """``(http_status, document)``."""
    sup = rt.supervisor
    now = iso(sup.wallclock.wall(trio.current_time()))
    checks: dict[str, list[dict[str, Any]]] = {}
    states: dict[str, str] = {}
    problems: list[str] = []
    for row in sup.status():
        name, state = row["name"], row["state"]
        states[name] = state
        child = sup.children[name]
        status = STATE_STATUS.get(state, "warn")
        check: dict[str, Any] = {
            "componentId": name,
            "componentType": "datastore" if name in DATASTORES else "component",
            "status": status,
        }
        if name == "cache":
            key = "cache:entries"
            check.update(observedValue=len(rt.store), observedUnit="entries", state=state)
        else:
            key = f"{name}:connection"
            check["observedValue"] = state
        check["time"] = now
        if status != "pass":
            check["output"] = _output(state, row["last_error"])
            problems.append(f"{name} is {state}")
        check["affectedEndpoints"] = []
        check["since"] = row["since"]
        check["restarts"] = row["restarts"]
        if row["attempt"]:
            check["attempt"] = row["attempt"]
        if row["next_retry_at"] and state != "CONNECTED":
            check["nextRetryAt"] = row["next_retry_at"]
        check["degradedServed"] = child.view.degraded_served
        checks[key] = [check]
        breaker = row["breaker"]
        if breaker is not None:
            b_status = BREAKER_STATUS.get(breaker, "warn")
            circuit: dict[str, Any] = {
                "componentId": name, "componentType": "component", "status": b_status,
                "observedValue": breaker, "time": now, "affectedEndpoints": []}
            if b_status != "pass":
                circuit["output"] = f"circuit {breaker}: calls to {name} fail fast"
                problems.append(f"{name} circuit {breaker}")
            checks[f"{name}:circuit"] = [circuit]
        for check_name, own in (row.get("checks") or {}).items():
            # The actor's own checks (check_changed notices), e.g. events_store:table.
            entry: dict[str, Any] = {
                "componentId": name, "componentType": "component",
                "status": own["status"], "time": now, "since": own["since"],
                "affectedEndpoints": []}
            if own.get("output"):
                entry["output"] = own["output"]
            if own["status"] != "pass":
                problems.append(f"{name}:{check_name} {own['status']}")
            checks[f"{name}:{check_name}"] = [entry]
    eventlog = _eventlog_check(sup.log.condition(), now)
    checks[EVENTLOG_CHECK] = [eventlog]
    if eventlog["status"] != "pass":
        problems.append(eventlog["output"])
    statuses = [c["status"] for entries in checks.values() for c in entries]
    overall = overall_status(states, statuses, rt.essential)
    if eventlog["status"] == "fail":
        overall = "fail"  # events are not being logged: nothing downstream can be trusted
    doc: dict[str, Any] = {
        "status": overall,
        "version": RELEASE_ID.split(".")[0],
        "releaseId": RELEASE_ID,
        "serviceId": "mt5-supervisor",
        "description": "supervised MetaTrader 5 / QuestDB / cache runtime",
    }
    if overall != "pass":
        doc["output"] = "; ".join(problems)
    doc["checks"] = checks
    return HTTP_STATUS[overall], doc


def _eventlog_check(cond: LogCondition, now: str) -> dict[str, Any]:
    """``eventlog:writable``: fail while events cannot be written (they wait in memory),
    warn after a lost, replaced or damaged log (docs/operations.md, "Runbook")."""
    check: dict[str, Any] = {
        "componentId": "eventlog", "componentType": "component", "status": cond.status,
        "observedValue": cond.pending, "observedUnit": "events waiting", "time": now,
        "lastSeq": cond.last_seq, "affectedEndpoints": []}
    if cond.dropped:
        check["dropped"] = cond.dropped
    if cond.output:
        check["output"] = cond.output
    return check


def _output(state: str, last_error: dict[str, Any] | None) -> str:
    if last_error:
        return f"{last_error.get('code')}: {last_error.get('message')}"
    return f"actor is {state}"
