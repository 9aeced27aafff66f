"""The backoff schedule: how long to wait before reconnect attempt n.

Pure: ``delay(attempt, rand)`` is ``base * factor**(attempt-1)``, capped, with optional
symmetric jitter drawn from ``rand`` in [0, 1) that the caller supplies (so tests and the
virtual clock see an exact schedule). Defaults give 1 s, 2 s, 4 s for attempts 1, 2, 3.
"""

from __future__ import annotations

import attrs


def _non_negative(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen
class BackoffPolicy:
    base_s: float = attrs.field(default=1.0, validator=_non_negative)
    factor: float = attrs.field(default=2.0, validator=_non_negative)
    max_attempts: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    # Fraction of the delay: 0.1 spreads each delay uniformly over +-10 %.
    jitter: float = attrs.field(default=0.0, validator=attrs.validators.and_(
        attrs.validators.ge(0.0), attrs.validators.le(1.0)))
    cap_s: float | None = None

    def delay(self, attempt: int, rand: float = 0.5) -> float:
        if attempt < 1:
            raise ValueError(f"attempts are numbered from 1, got {attempt}")
        delay = self.base_s * self.factor ** (attempt - 1)
        if self.jitter:
            delay *= 1.0 + self.jitter * (2.0 * rand - 1.0)
        if self.cap_s is not None:  # after jitter: the cap is a hard bound
            delay = min(delay, self.cap_s)
        return delay

    def schedule(self) -> tuple[float, ...]:
        """The delays before attempts 1..max_attempts without jitter (for docs and status)."""
        plain = attrs.evolve(self, jitter=0.0)
        return tuple(plain.delay(n) for n in range(1, self.max_attempts + 1))
