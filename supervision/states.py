"""The connection state machine every supervised actor runs (DESIGN.md section 3).

Rules:

* The machine is pure. ``step(status, event, now, policy, rand)`` returns the new status and
  the actions the driver must perform; it never sleeps, awaits or reads a clock. Randomness
  (jitter) comes in as ``rand`` in [0, 1).
* All transitions are in ``TRANSITIONS`` below, one row each; an (state, input) pair that is
  not in the table is an error (``InvalidTransition``), never a silent no-op.
* A failed connection attempt is refined before the lookup: ``ATTEMPT_FAILED`` becomes
  ``ATTEMPT_FAILED_LAST`` when it spends the last of the restart budget. That is the only
  guard; it keeps the table itself free of conditions.
* The first connect on start does not spend the budget: attempts are numbered 1..max after a
  failure, so a resource that never comes back is tried at t+1, t+3, t+7 (base 1 s, factor 2)
  and escalates to ERROR at the third failure; then it is probed every ``health_interval_s``.
* Reset after stability: every reconnect attempt spends budget, whether it fails or succeeds,
  and the budget is fresh again only once the connection has stayed up ``stable_s`` (see
  ``supervision.budget``). A loss sooner continues the schedule where it stood, and a loss
  after the last attempt escalates (``FAILURE_DETECTED_LAST``, the second guard): a resource
  that connects and dies again and again reaches ERROR like one that never connects.
* ``STOP`` is accepted in every state and always leads to DISCONNECTED.
"""

from __future__ import annotations

import enum

import attrs

from supervision.backoff import BackoffPolicy
from supervision.budget import RestartBudget


class ConnectionState(enum.StrEnum):
    DISCONNECTED = "DISCONNECTED"
    CONNECTED = "CONNECTED"
    RECONNECTING = "RECONNECTING"
    ERROR = "ERROR"


class Input(enum.Enum):
    CONNECT_OK = "connect_ok"  # the first connect on start succeeded
    CONNECT_FAILED = "connect_failed"  # the first connect on start failed
    FAILURE_DETECTED = "failure_detected"  # a call or the liveness probe found it dead
    FAILURE_DETECTED_LAST = "failure_detected_last"  # refined: lost before stable, none left
    ATTEMPT_OK = "attempt_ok"  # reconnect attempt n succeeded
    ATTEMPT_FAILED = "attempt_failed"  # reconnect attempt n failed, budget left
    ATTEMPT_FAILED_LAST = "attempt_failed_last"  # refined: the last attempt failed
    PROBE_OK = "probe_ok"  # ERROR-state probe found the resource back
    PROBE_FAILED = "probe_failed"  # ERROR-state probe failed
    OPERATOR_RESTART = "operator_restart"  # actor.restart
    STOP = "stop"


class Action(enum.Enum):
    RESET_BUDGET = "reset_budget"  # a fresh budget now
    MARK_CONNECTED = "mark_connected"  # start the stability clock (fresh budget after stable_s)
    SCHEDULE_ATTEMPT = "schedule_attempt"  # next attempt after the backoff delay
    ATTEMPT_NOW = "attempt_now"  # operator restart: attempt 1 at once, fresh budget
    ESCALATE = "escalate"  # event + on_escalate hook
    SCHEDULE_PROBE = "schedule_probe"  # next ERROR probe after health_interval_s
    RECOVERED = "recovered"
    RELEASE = "release"  # drop the resource


S = ConnectionState
A = Action

# (from state, input) -> (to state, actions). The whole machine.
TRANSITIONS: dict[tuple[ConnectionState, Input], tuple[ConnectionState, tuple[Action, ...]]] = {
    # A fresh budget: DISCONNECTED may follow a STOP that left the budget spent.
    (S.DISCONNECTED, Input.CONNECT_OK): (S.CONNECTED, (A.RESET_BUDGET, A.MARK_CONNECTED)),
    (S.DISCONNECTED, Input.CONNECT_FAILED): (
        S.RECONNECTING,
        (A.RESET_BUDGET, A.SCHEDULE_ATTEMPT),
    ),
    (S.CONNECTED, Input.FAILURE_DETECTED): (S.RECONNECTING, (A.RELEASE, A.SCHEDULE_ATTEMPT)),
    (S.CONNECTED, Input.FAILURE_DETECTED_LAST): (
        S.ERROR,
        (A.RELEASE, A.ESCALATE, A.SCHEDULE_PROBE),
    ),
    (S.RECONNECTING, Input.ATTEMPT_OK): (S.CONNECTED, (A.MARK_CONNECTED,)),
    (S.RECONNECTING, Input.ATTEMPT_FAILED): (S.RECONNECTING, (A.SCHEDULE_ATTEMPT,)),
    (S.RECONNECTING, Input.ATTEMPT_FAILED_LAST): (S.ERROR, (A.ESCALATE, A.SCHEDULE_PROBE)),
    (S.ERROR, Input.PROBE_OK): (S.CONNECTED, (A.MARK_CONNECTED, A.RECOVERED)),
    (S.ERROR, Input.PROBE_FAILED): (S.ERROR, (A.SCHEDULE_PROBE,)),
    (S.ERROR, Input.OPERATOR_RESTART): (S.RECONNECTING, (A.RESET_BUDGET, A.ATTEMPT_NOW)),
    (S.CONNECTED, Input.OPERATOR_RESTART): (
        S.RECONNECTING,
        (A.RELEASE, A.RESET_BUDGET, A.ATTEMPT_NOW),
    ),
    (S.RECONNECTING, Input.OPERATOR_RESTART): (S.RECONNECTING, (A.RESET_BUDGET, A.ATTEMPT_NOW)),
    (S.DISCONNECTED, Input.STOP): (S.DISCONNECTED, ()),
    (S.CONNECTED, Input.STOP): (S.DISCONNECTED, (A.RELEASE,)),
    (S.RECONNECTING, Input.STOP): (S.DISCONNECTED, (A.RELEASE,)),
    (S.ERROR, Input.STOP): (S.DISCONNECTED, (A.RELEASE,)),
}


class InvalidTransition(Exception):
    pass


@attrs.frozen
class ConnectionStatus:
    state: ConnectionState = S.DISCONNECTED
    budget: RestartBudget = attrs.field(factory=RestartBudget)
    # The attempt that is scheduled next (1..max) while RECONNECTING, else 0.
    attempt: int = 0
    # When the next attempt (RECONNECTING) or probe (ERROR) is due; None otherwise.
    next_at: float | None = None
    # Delay of the scheduled attempt or probe (for events and status).
    delay_s: float | None = None
    since: float = 0.0


def initial(policy: BackoffPolicy, now: float = 0.0, *, stable_s: float = 30.0
            ) -> ConnectionStatus:
    return ConnectionStatus(
        budget=RestartBudget(max_attempts=policy.max_attempts, stable_s=stable_s), since=now)


def _budget_for(status: ConnectionStatus, event: Input, now: float) -> RestartBudget:
    """The budget the input is judged against: a loss of the connection first asks whether
    it had been stable; an attempt, whatever its outcome, spends one."""
    budget = status.budget
    if event is Input.FAILURE_DETECTED and status.state is S.CONNECTED:
        return budget.after_loss(now)
    if event in (Input.ATTEMPT_FAILED, Input.ATTEMPT_OK) and status.state is S.RECONNECTING:
        return budget.charge()
    return budget


def refine(status: ConnectionStatus, event: Input, now: float) -> Input:
    """The guards: does this failure spend the last of the budget?"""
    if event is Input.ATTEMPT_FAILED and status.state is S.RECONNECTING:
        if status.budget.charge().exhausted:
            return Input.ATTEMPT_FAILED_LAST
    if event is Input.FAILURE_DETECTED and status.state is S.CONNECTED:
        if status.budget.after_loss(now).exhausted:
            return Input.FAILURE_DETECTED_LAST
    return event


def step(
    status: ConnectionStatus,
    event: Input,
    now: float,
    policy: BackoffPolicy,
    *,
    health_interval_s: float,
    rand: float = 0.5,
) -> tuple[ConnectionStatus, tuple[Action, ...]]:
    refined = refine(status, event, now)
    try:
        target, actions = TRANSITIONS[(status.state, refined)]
    except KeyError:
        raise InvalidTransition(f"{refined.value} is not allowed in {status.state}") from None

    budget = _budget_for(status, event, now)
    attempt, next_at, delay = 0, None, None
    for action in actions:
        if action is A.RESET_BUDGET:
            budget = budget.reset()
        elif action is A.MARK_CONNECTED:
            budget = budget.connected(now)
        elif action is A.SCHEDULE_ATTEMPT:
            attempt = budget.used + 1
            delay = policy.delay(attempt, rand)
            next_at = now + delay
        elif action is A.ATTEMPT_NOW:
            attempt, delay, next_at = 1, 0.0, now
        elif action is A.SCHEDULE_PROBE:
            delay = health_interval_s
            next_at = now + delay
    since = status.since if target is status.state else now
    new = ConnectionStatus(
        state=target, budget=budget, attempt=attempt, next_at=next_at, delay_s=delay, since=since
    )
    return new, actions
