"""The circuit breaker: one implementation for every actor.

Rules:

* CLOSED admits every call. ``threshold`` consecutive connection failures open it.
* OPEN refuses every call (``retry_after`` says when it may half-open) until ``open_s`` has
  passed since it opened; the first admission after that moves it to HALF_OPEN.
* HALF_OPEN admits at most ``half_open_probes`` calls (the probes); further calls are
  refused. Any probe success closes it; a probe failure re-opens it (the full ``open_s``).
* A probe that never reports cannot wedge it: a probe admitted more than ``probe_timeout_s``
  ago counts as failed at the next admission.
* Every state change starts a new *generation*. A result carries the ticket it was admitted
  with; results from an older generation are ignored, so a slow call admitted while CLOSED
  cannot re-open a breaker that has since recovered, nor count twice.
* Observations without a ticket (a supervisor's reconnect attempt, a health probe) count in
  the current generation: every failed connection attempt counts, whoever made it. An
  observed success is the half-open probe (as an active health check un-ejects a host): it
  closes the breaker at once, for every actor, so CONNECTED never coexists with a breaker
  that refuses calls (DESIGN.md section 4).
* Pure: every method takes ``now`` and returns a new ``Breaker`` plus the transitions that
  happened (for events). Nothing sleeps or reads a clock.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs


class BreakerState(enum.StrEnum):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


@attrs.frozen
class BreakerConfig:
    threshold: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    open_s: float = attrs.field(default=30.0, validator=attrs.validators.ge(0.0))
    half_open_probes: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    probe_timeout_s: float = attrs.field(default=10.0, validator=attrs.validators.gt(0.0))


@attrs.frozen
class Ticket:
    """Proof of admission; hand it back with the result."""

    generation: int
    probe: bool
    at: float | None = None  # admission time of a probe: release() frees that probe's slot


@attrs.frozen
class Transition:
    from_state: BreakerState
    to_state: BreakerState
    at: float


@attrs.frozen
class Admission:
    breaker: Breaker
    ticket: Ticket | None  # None: refused
    retry_after: float | None  # seconds until a call may be admitted again (when refused)
    transitions: tuple[Transition, ...]


@attrs.frozen
class Breaker:
    config: BreakerConfig = attrs.field(factory=BreakerConfig)
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0  # consecutive, in CLOSED
    opened_at: float | None = None
    generation: int = 0
    probes: tuple[float, ...] = ()  # admission times of half-open probes still out
    _closed_admission: Admission | None = attrs.field(default=None, init=False, eq=False,
                                                      repr=False)

    # -- internal -------------------------------------------------------------------------
    def _to(self, state: BreakerState, now: float, **changes: Any) -> tuple[Breaker, Transition]:
        new = attrs.evolve(self, state=state, generation=self.generation + 1, **changes)
        return new, Transition(self.state, state, now)

    def _open(self, now: float) -> tuple[Breaker, Transition]:
        return self._to(BreakerState.OPEN, now, failures=0, opened_at=now, probes=())

    def _close(self, now: float) -> tuple[Breaker, Transition]:
        return self._to(BreakerState.CLOSED, now, failures=0, opened_at=None, probes=())

    # -- public ---------------------------------------------------------------------------
    def admit(self, now: float) -> Admission:
        if self.state is BreakerState.CLOSED:
            # The hot path: a CLOSED breaker admits everything with the same ticket, so the
            # answer is built once per breaker value (breakers are immutable).
            cached = self._closed_admission
            if cached is None:
                cached = Admission(self, Ticket(self.generation, probe=False), None, ())
                object.__setattr__(self, "_closed_admission", cached)
            return cached
        b, transitions = self, []
        if b.state is BreakerState.HALF_OPEN:
            live = tuple(t for t in b.probes if now - t < b.config.probe_timeout_s)
            if len(live) != len(b.probes):  # a probe never reported: count it failed
                b, tr = b._open(now)
                transitions.append(tr)
        if b.state is BreakerState.OPEN:
            assert b.opened_at is not None
            reopen_at = b.opened_at + b.config.open_s
            if now < reopen_at:
                return Admission(b, None, reopen_at - now, tuple(transitions))
            b, tr = b._to(BreakerState.HALF_OPEN, now, probes=())
            transitions.append(tr)
        if b.state is BreakerState.HALF_OPEN:
            if len(b.probes) >= b.config.half_open_probes:
                oldest = min(b.probes)
                retry = max(0.0, oldest + b.config.probe_timeout_s - now)
                return Admission(b, None, retry, tuple(transitions))
            b = attrs.evolve(b, probes=(*b.probes, now))
            return Admission(b, Ticket(b.generation, probe=True, at=now), None,
                             tuple(transitions))
        return Admission(b, Ticket(b.generation, probe=False), None, tuple(transitions))

    def record_success(
        self, ticket: Ticket | None, now: float
    ) -> tuple[Breaker, tuple[Transition, ...]]:
        if ticket is not None and ticket.generation != self.generation:
            return self, ()
        if self.state is BreakerState.CLOSED:
            return (attrs.evolve(self, failures=0) if self.failures else self), ()
        b, tr = self._close(now)
        return b, (tr,)

    def record_failure(
        self, ticket: Ticket | None, now: float
    ) -> tuple[Breaker, tuple[Transition, ...]]:
        if ticket is not None and ticket.generation != self.generation:
            return self, ()
        if self.state is BreakerState.CLOSED:
            failures = self.failures + 1
            if failures >= self.config.threshold:
                b, tr = self._open(now)
                return b, (tr,)
            return attrs.evolve(self, failures=failures), ()
        if self.state is BreakerState.HALF_OPEN:
            b, tr = self._open(now)
            return b, (tr,)
        return self, ()  # OPEN: already failing fast

    def release(self, ticket: Ticket | None) -> Breaker:
        """A call admitted as a probe ended with no verdict on the resource (e.g. a query
        error or a cancelled caller): give its probe slot back."""
        if ticket is None or not ticket.probe or ticket.generation != self.generation:
            return self
        if not self.probes:
            return self
        probes = list(self.probes)
        if ticket.at in probes:
            probes.remove(ticket.at)
        else:
            probes.pop(0)
        return attrs.evolve(self, probes=tuple(probes))

    def retry_after(self, now: float) -> float | None:
        if self.state is BreakerState.OPEN and self.opened_at is not None:
            return max(0.0, self.opened_at + self.config.open_s - now)
        return None
