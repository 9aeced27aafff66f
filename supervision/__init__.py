"""mt5-supervisor: a supervised trio runtime for a trading bot's broker and database.

The public surface for embedding (DESIGN.md section 9)::

    from supervision import RuntimeConfig, open_runtime

Everything a bot needs to add its own actors is re-exported here too.
"""

from supervision.actor import READ, READ_UNCACHED, WRITE, Actor, OpSpec
from supervision.breaker import BreakerConfig, BreakerState
from supervision.bus import Missed
from supervision.config import ConfigError, RuntimeConfig
from supervision.errors import ErrorCode, ErrorInfo, Failure, Response
from supervision.events import Event, EventKind
from supervision.runtime import Runtime, open_runtime
from supervision.settings import ActorSettings
from supervision.states import ConnectionState
from supervision.supervisor import ChildSpec, Supervisor

__all__ = [
    "READ",
    "READ_UNCACHED",
    "WRITE",
    "Actor",
    "ActorSettings",
    "BreakerConfig",
    "BreakerState",
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
    "Response",
    "Runtime",
    "RuntimeConfig",
    "Supervisor",
    "open_runtime",
]
