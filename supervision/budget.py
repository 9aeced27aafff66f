"""The restart budget: how many reconnect attempts one outage may spend before ERROR.

Pure and immutable; every method that needs the time takes ``now``. Rules (DESIGN.md
section 3, reset-after-stability):

* ``charge()`` spends one attempt, whether it then fails or succeeds: a connection that
  comes up and dies again has spent its attempt like one that never came up.
* ``connected(now)`` starts the stability clock; ``after_loss(now)`` gives a fresh budget
  only if the connection stayed up at least ``stable_s``. A sooner loss continues where the
  schedule stood, so a flapping resource escalates like one that never connects.
* ``reset()`` gives a fresh budget at once (an operator restart, a fresh start).
* Charging an exhausted budget is a bug in the caller and raises.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class RestartBudget:
    max_attempts: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    used: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    stable_s: float = attrs.field(default=30.0, validator=attrs.validators.ge(0.0))
    # When the current connection came up (trio time); None while not connected.
    connected_at: float | None = None

    @property
    def exhausted(self) -> bool:
        return self.used >= self.max_attempts

    @property
    def remaining(self) -> int:
        return max(0, self.max_attempts - self.used)

    def charge(self) -> RestartBudget:
        if self.exhausted:
            raise ValueError("restart budget already exhausted")
        return attrs.evolve(self, used=self.used + 1)

    def reset(self) -> RestartBudget:
        return attrs.evolve(self, used=0, connected_at=None)

    def connected(self, now: float) -> RestartBudget:
        return attrs.evolve(self, connected_at=now)

    def stable(self, now: float) -> bool:
        """Has the current connection stayed up long enough to earn a fresh budget?"""
        return self.connected_at is not None and now - self.connected_at >= self.stable_s

    def after_loss(self, now: float) -> RestartBudget:
        """The connection was lost at ``now``: fresh if it had been stable, else as it stood."""
        if self.stable(now):
            return self.reset()
        return attrs.evolve(self, connected_at=None)
