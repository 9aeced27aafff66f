"""Per-actor timings and limits (DESIGN.md sections 3, 4 and 8), with the contract's defaults."""

from __future__ import annotations

import attrs

from supervision.backoff import BackoffPolicy
from supervision.breaker import BreakerConfig


@attrs.frozen
class ActorSettings:
    backoff_base_s: float = 1.0
    backoff_factor: float = 2.0
    max_attempts: int = 3
    jitter: float = 0.0
    backoff_cap_s: float | None = None
    health_interval_s: float = 30.0
    probe_timeout_s: float = 5.0
    call_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    shutdown_timeout_s: float = 5.0
    escalate_timeout_s: float = 5.0
    # The restart budget is fresh again only after this long CONNECTED (flapping escalates).
    stable_s: float = 30.0
    # Calls waiting for a RECONNECTING actor; more are refused at once.
    queue_limit: int = 1000
    # Call-level retries of connection errors for idempotent operations (QuestDB: 0.1/0.5/1.0).
    retry_delays_s: tuple[float, ...] = ()
    # None: no circuit breaker for this actor.
    breaker: BreakerConfig | None = None

    @property
    def backoff(self) -> BackoffPolicy:
        return BackoffPolicy(
            base_s=self.backoff_base_s,
            factor=self.backoff_factor,
            max_attempts=self.max_attempts,
            jitter=self.jitter,
            cap_s=self.backoff_cap_s,
        )
