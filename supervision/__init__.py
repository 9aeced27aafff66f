"""mt5-supervisor: a supervised trio runtime for a trading bot's broker and database.

The public surface for embedding (DESIGN.md section 9)::

    from supervision import RuntimeConfig, open_runtime

The package has three layers, each importing only the ones above it:

1. **Pure machines** — ``states``, ``backoff``, ``budget``, ``breaker``: sans-I/O values
   and functions that take ``now`` and an input and return the new state and what to do.
   They import neither trio nor anything else asynchronous.
2. **The generic core** — ``actor``, ``cell`` (with ``call``, ``gate``, ``mailbox``,
   ``watchdog``), ``supervisor``, ``ref``, ``messages``, ``events``, ``eventlog``, ``bus``:
   the trio code around the machines. It knows nothing of MetaTrader, QuestDB, HTTP or the
   command line.
3. **The product shell** — ``supervision.shell``: configuration, the assembled runtime
   (which is where the resource actors of ``actors/`` are plugged in), the control
   channel, health and metrics, the operator's page and the CLI.

``tests/test_layering.py`` enforces this. The names below are loaded on first use
(PEP 562), so ``import supervision.states`` loads the machine and nothing else.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module that defines it
_EXPORTS = {
    "READ": "supervision.actor",
    "READ_UNCACHED": "supervision.actor",
    "WRITE": "supervision.actor",
    "Actor": "supervision.actor",
    "OpSpec": "supervision.actor",
    "RestartType": "supervision.actor",
    "ActorSettings": "supervision.settings",
    "BreakerConfig": "supervision.breaker",
    "BreakerState": "supervision.breaker",
    "CallFailed": "supervision.errors",
    "ChildSpec": "supervision.supervisor",
    "ConfigError": "supervision.shell.config",
    "ConnectionState": "supervision.states",
    "ErrorCode": "supervision.errors",
    "ErrorInfo": "supervision.errors",
    "Event": "supervision.events",
    "EventKind": "supervision.events",
    "Failure": "supervision.errors",
    "Missed": "supervision.bus",
    "Response": "supervision.errors",
    "Runtime": "supervision.shell.runtime",
    "RuntimeConfig": "supervision.shell.config",
    "Strategy": "supervision.supervisor",
    "Subtree": "supervision.supervisor",
    "Supervisor": "supervision.supervisor",
    "SupervisorSpec": "supervision.supervisor",
    "open_runtime": "supervision.shell.runtime",
}

__all__ = [
    "Actor",
    "ActorSettings",
    "BreakerConfig",
    "BreakerState",
    "CallFailed",
    "ChildSpec",
    "ConfigError",
    "ConnectionState",
    "ErrorCode",
    "ErrorInfo",
    "Event",
    "EventKind",
    "Failure",
    "Missed",
    "OpSpec",
    "READ",
    "READ_UNCACHED",
    "Response",
    "RestartType",
    "Runtime",
    "RuntimeConfig",
    "Strategy",
    "Subtree",
    "Supervisor",
    "SupervisorSpec",
    "WRITE",
    "open_runtime",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'supervision' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and editors: the same names, eagerly
    from supervision.actor import READ, READ_UNCACHED, WRITE, Actor, OpSpec, RestartType
    from supervision.breaker import BreakerConfig, BreakerState
    from supervision.bus import Missed
    from supervision.errors import CallFailed, ErrorCode, ErrorInfo, Failure, Response
    from supervision.events import Event, EventKind
    from supervision.settings import ActorSettings
    from supervision.shell.config import ConfigError, RuntimeConfig
    from supervision.shell.runtime import Runtime, open_runtime
    from supervision.states import ConnectionState
    from supervision.supervisor import (
        ChildSpec,
        Strategy,
        Subtree,
        Supervisor,
        SupervisorSpec,
    )
