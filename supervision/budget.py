"""The restart budget: how many reconnect attempts one outage may spend before ERROR.

Pure and immutable. ``charge()`` spends one attempt and says whether the budget is now
exhausted; ``reset()`` gives a fresh budget (after a successful connect, or an operator
restart). Charging an exhausted budget is a bug in the caller and raises.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class RestartBudget:
    max_attempts: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    used: int = attrs.field(default=0, validator=attrs.validators.ge(0))

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
        return attrs.evolve(self, used=0)
