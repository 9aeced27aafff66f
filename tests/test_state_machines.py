"""Property and example tests for the pure machines: connection state, backoff, restart
budget, circuit breaker (DESIGN.md sections 3 and 4). No trio, no clock: ``now`` is data."""

from __future__ import annotations

import math

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervision import states
from supervision.backoff import BackoffPolicy
from supervision.breaker import Breaker, BreakerConfig, BreakerState, Ticket
from supervision.budget import RestartBudget
from supervision.states import (
    TRANSITIONS,
    Action,
    ConnectionState,
    ConnectionStatus,
    Input,
    InvalidTransition,
)

S = ConnectionState
HEALTH = 30.0
# The *_LAST inputs are the machine's own refinements, not driver inputs.
DRIVER_INPUTS = [i for i in Input
                 if i not in (Input.ATTEMPT_FAILED_LAST, Input.FAILURE_DETECTED_LAST)]
STABLE = 30.0

unit = st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False)


# ---------------------------------------------------------------------------------- backoff
def test_backoff_default_schedule_is_1_2_4():
    policy = BackoffPolicy()
    assert [policy.delay(n) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert policy.schedule() == (1.0, 2.0, 4.0)
    # Without jitter the draw does not matter.
    assert {policy.delay(2, r) for r in (0.0, 0.3, 0.999)} == {2.0}


def test_backoff_cap():
    policy = BackoffPolicy(base_s=1.0, factor=3.0, max_attempts=6, cap_s=10.0)
    assert policy.schedule() == (1.0, 3.0, 9.0, 10.0, 10.0, 10.0)


def test_backoff_refuses_bad_input():
    with pytest.raises(ValueError):
        BackoffPolicy().delay(0)
    for bad in ({"base_s": -1.0}, {"factor": -2.0}, {"max_attempts": 0}, {"jitter": 1.5},
                {"jitter": -0.1}):
        with pytest.raises(ValueError):
            BackoffPolicy(**bad)


@given(
    base=st.floats(min_value=0.0, max_value=10.0),
    factor=st.floats(min_value=0.0, max_value=4.0),
    jitter=st.floats(min_value=0.0, max_value=1.0),
    cap=st.none() | st.floats(min_value=0.0, max_value=50.0),
    attempt=st.integers(min_value=1, max_value=10),
    rand=unit,
)
def test_backoff_jitter_within_bounds_and_deterministic(base, factor, jitter, cap, attempt,
                                                        rand):
    policy = BackoffPolicy(base_s=base, factor=factor, max_attempts=10, jitter=jitter,
                           cap_s=cap)
    plain = base * factor ** (attempt - 1)
    delay = policy.delay(attempt, rand)
    assert delay == policy.delay(attempt, rand)  # same draw, same delay
    lo, hi = plain * (1 - jitter), plain * (1 + jitter)
    capped = (lambda d: d) if cap is None else (lambda d: min(d, cap))
    assert capped(lo) - 1e-9 <= delay <= capped(hi) + 1e-9
    assert delay >= 0
    if cap is not None:
        assert delay <= cap  # the cap is a hard bound, jitter included
    # The draw maps monotonically onto the interval: 0 -> low end, 0.5 -> the plain delay.
    assert math.isclose(policy.delay(attempt, 0.5), capped(plain), rel_tol=1e-12,
                        abs_tol=1e-12)
    assert math.isclose(policy.delay(attempt, 0.0), capped(lo), rel_tol=1e-12, abs_tol=1e-12)


# ---------------------------------------------------------------------------------- budget
def test_restart_budget():
    b = RestartBudget(max_attempts=3)
    assert (b.used, b.remaining, b.exhausted) == (0, 3, False)
    b = b.charge().charge()
    assert (b.used, b.remaining, b.exhausted) == (2, 1, False)
    b = b.charge()
    assert (b.used, b.remaining, b.exhausted) == (3, 0, True)
    with pytest.raises(ValueError):
        b.charge()
    assert b.reset() == RestartBudget(max_attempts=3)
    with pytest.raises(ValueError):
        RestartBudget(max_attempts=0)


@given(max_attempts=st.integers(1, 8), ops=st.lists(st.booleans(), max_size=30))
def test_restart_budget_property(max_attempts, ops):
    b, used = RestartBudget(max_attempts=max_attempts), 0
    for charge in ops:
        if charge:
            if used == max_attempts:
                with pytest.raises(ValueError):
                    b.charge()
                continue
            b, used = b.charge(), used + 1
        else:
            b, used = b.reset(), 0
        assert b.used == used
        assert b.exhausted == (used == max_attempts)
        assert b.remaining == max_attempts - used


# ---------------------------------------------------------------------- connection machine
policies = st.builds(
    BackoffPolicy,
    base_s=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    factor=st.sampled_from([1.0, 2.0, 3.0]),
    max_attempts=st.integers(1, 5),
    jitter=st.sampled_from([0.0, 0.1, 0.5]),
    cap_s=st.none() | st.sampled_from([1.5, 3.0]),
)


@settings(max_examples=400)
@given(
    policy=policies,
    script=st.lists(
        st.tuples(st.sampled_from(DRIVER_INPUTS),
                  st.floats(min_value=0.0, max_value=100.0), unit),
        max_size=40,
    ),
)
def test_connection_machine_property(policy, script):
    """Any input sequence: either InvalidTransition for a pair the table lacks, or exactly
    the table's target; attempts numbered 1..max with the policy's delays; ERROR exactly
    when the budget is spent; the budget fresh again only after STABLE s connected; STOP
    always gives DISCONNECTED."""
    status = states.initial(policy, stable_s=STABLE)
    now = 0.0
    # An independent model: how many attempts this outage has spent, and since when up.
    spent = 0
    up_since: float | None = None
    for event, dt, rand in script:
        now += dt
        lost = event is Input.FAILURE_DETECTED and status.state is S.CONNECTED
        if lost and up_since is not None and now - up_since >= STABLE:
            spent_before = 0
        else:
            spent_before = spent
        last_attempt = (event is Input.ATTEMPT_FAILED and status.state is S.RECONNECTING
                        and spent + 1 == policy.max_attempts)
        last_loss = lost and spent_before == policy.max_attempts
        last = last_attempt or last_loss
        refined = (Input.ATTEMPT_FAILED_LAST if last_attempt
                   else Input.FAILURE_DETECTED_LAST if last_loss else event)
        key = (status.state, refined)
        if key not in TRANSITIONS:
            with pytest.raises(InvalidTransition):
                states.step(status, event, now, policy, health_interval_s=HEALTH, rand=rand)
            continue
        new, actions = states.step(status, event, now, policy, health_interval_s=HEALTH,
                                   rand=rand)
        target, table_actions = TRANSITIONS[key]
        assert new.state is target
        assert actions == table_actions
        if event is Input.STOP:
            assert new.state is S.DISCONNECTED
        # The model of the budget: every attempt spends, a stable connection refunds.
        if lost:
            spent = spent_before
        if event in (Input.ATTEMPT_FAILED, Input.ATTEMPT_OK) and status.state is S.RECONNECTING:
            spent += 1
        if Action.RESET_BUDGET in actions:
            spent = 0
        up_since = now if new.state is S.CONNECTED and status.state is not S.CONNECTED \
            else (up_since if new.state is S.CONNECTED else None)
        assert new.budget.used == spent
        assert new.budget.max_attempts == policy.max_attempts
        # ERROR is reached exactly when the budget is spent.
        if new.state is S.ERROR and status.state is not S.ERROR:
            assert spent == policy.max_attempts and last
        if status.state is S.RECONNECTING and event is Input.ATTEMPT_FAILED:
            assert (new.state is S.ERROR) == (spent == policy.max_attempts)
        if lost:
            assert (new.state is S.ERROR) == last_loss
        # Scheduling.
        if new.state is S.RECONNECTING:
            assert 1 <= new.attempt <= policy.max_attempts
            if Action.ATTEMPT_NOW in actions:
                assert (new.attempt, new.delay_s, new.next_at) == (1, 0.0, now)
            else:
                assert new.attempt == spent + 1
                assert new.delay_s == policy.delay(new.attempt, rand)
                assert new.next_at == now + new.delay_s
        elif new.state is S.ERROR:
            assert (new.attempt, new.delay_s, new.next_at) == (0, HEALTH, now + HEALTH)
        else:
            assert (new.attempt, new.next_at, new.delay_s) == (0, None, None)
        assert new.since == (status.since if new.state is status.state else now)
        status = new


@given(policy=policies, rand=unit)
def test_outage_runs_exactly_max_attempts_with_policy_delays(policy, rand):
    status, _ = states.step(states.initial(policy), Input.CONNECT_FAILED, 0.0, policy,
                            health_interval_s=HEALTH, rand=rand)
    attempts, delays = [], []
    while status.state is S.RECONNECTING:
        attempts.append(status.attempt)
        delays.append(status.delay_s)
        status, _ = states.step(status, Input.ATTEMPT_FAILED, status.next_at, policy,
                                health_interval_s=HEALTH, rand=rand)
    assert attempts == list(range(1, policy.max_attempts + 1))
    assert delays == [policy.delay(n, rand) for n in attempts]
    assert status.state is S.ERROR and status.budget.exhausted


def test_default_schedule_start_plus_1_3_7_then_probes():
    policy = BackoffPolicy()
    st_, _ = states.step(states.initial(policy), Input.CONNECT_FAILED, 0.0, policy,
                         health_interval_s=HEALTH)
    times = []
    while st_.state is S.RECONNECTING:
        times.append(st_.next_at)
        st_, actions = states.step(st_, Input.ATTEMPT_FAILED, st_.next_at, policy,
                                   health_interval_s=HEALTH)
    assert times == [1.0, 3.0, 7.0]
    assert st_.state is S.ERROR and actions == (Action.ESCALATE, Action.SCHEDULE_PROBE)
    assert st_.next_at == 37.0
    st_, actions = states.step(st_, Input.PROBE_FAILED, 37.0, policy, health_interval_s=HEALTH)
    assert (st_.state, st_.next_at, actions) == (S.ERROR, 67.0, (Action.SCHEDULE_PROBE,))


def _status_in(state: ConnectionState, policy: BackoffPolicy, *, used: int = 0,
               connected_at: float | None = None) -> ConnectionStatus:
    return ConnectionStatus(state=state, budget=RestartBudget(policy.max_attempts, used,
                                                              connected_at=connected_at),
                            since=0.0)


@pytest.mark.parametrize(("key", "row"), list(TRANSITIONS.items()),
                         ids=[f"{s}-{i.value}" for s, i in TRANSITIONS])
def test_each_table_row(key, row):
    policy = BackoffPolicy()
    state, event = key
    target, actions = row
    used = 0
    if event is Input.ATTEMPT_FAILED_LAST:  # reached by refining the last failed attempt
        event, used = Input.ATTEMPT_FAILED, policy.max_attempts - 1
    elif event is Input.FAILURE_DETECTED_LAST:  # lost before stable, after the last attempt
        event, used = Input.FAILURE_DETECTED, policy.max_attempts
    elif event is Input.ATTEMPT_FAILED:
        used = 1
    new, got = states.step(_status_in(state, policy, used=used), event, 10.0, policy,
                           health_interval_s=HEALTH)
    assert new.state is target
    assert got == actions
    expect = {
        (S.DISCONNECTED, Input.CONNECT_OK): (0, None),
        (S.DISCONNECTED, Input.CONNECT_FAILED): (1, 11.0),  # attempt 1 after 1 s
        (S.CONNECTED, Input.FAILURE_DETECTED): (1, 11.0),
        (S.CONNECTED, Input.FAILURE_DETECTED_LAST): (0, 40.0),  # escalated: probe in 30 s
        (S.RECONNECTING, Input.ATTEMPT_OK): (0, None),
        (S.RECONNECTING, Input.ATTEMPT_FAILED): (3, 14.0),  # attempt 2 failed: 3 after 4 s
        (S.RECONNECTING, Input.ATTEMPT_FAILED_LAST): (0, 40.0),  # probe in 30 s
        (S.ERROR, Input.PROBE_OK): (0, None),
        (S.ERROR, Input.PROBE_FAILED): (0, 40.0),
        (S.ERROR, Input.OPERATOR_RESTART): (1, 10.0),  # fresh budget, attempt now
        (S.CONNECTED, Input.OPERATOR_RESTART): (1, 10.0),
        (S.RECONNECTING, Input.OPERATOR_RESTART): (1, 10.0),
    }.get(key, (0, None))
    assert (new.attempt, new.next_at) == expect
    if Action.RESET_BUDGET in actions:
        assert new.budget.used == 0
    if event is Input.STOP:
        assert Action.RELEASE in actions or state is S.DISCONNECTED


def test_pairs_absent_from_table_are_refused():
    policy = BackoffPolicy()
    absent = [(s, i) for s in S for i in DRIVER_INPUTS if (s, i) not in TRANSITIONS
              and not (s is S.RECONNECTING and i is Input.ATTEMPT_FAILED)]
    assert (S.DISCONNECTED, Input.OPERATOR_RESTART) in absent
    assert (S.CONNECTED, Input.ATTEMPT_OK) in absent
    for state, event in absent:
        with pytest.raises(InvalidTransition, match=event.value):
            states.step(_status_in(state, policy), event, 0.0, policy, health_interval_s=HEALTH)


def test_operator_restart_from_error_gives_fresh_budget():
    policy = BackoffPolicy()
    status = _status_in(S.ERROR, policy, used=3)
    status, actions = states.step(status, Input.OPERATOR_RESTART, 100.0, policy,
                                  health_interval_s=HEALTH)
    assert (status.state, status.attempt, status.next_at) == (S.RECONNECTING, 1, 100.0)
    times = [status.next_at]
    while status.state is S.RECONNECTING:
        status, _ = states.step(status, Input.ATTEMPT_FAILED, status.next_at, policy,
                                health_interval_s=HEALTH)
        times.append(status.next_at)
    # attempt now, then 2 s, 4 s later; then the ERROR probe 30 s after the last failure
    assert times == [100.0, 102.0, 106.0, 136.0]


# ---------------------------------------------------------------------------------- breaker
CFG = BreakerConfig(threshold=5, open_s=30.0, half_open_probes=1, probe_timeout_s=10.0)


def _admit(b: Breaker, now: float) -> tuple[Breaker, Ticket | None]:
    a = b.admit(now)
    return a.breaker, a.ticket


def test_breaker_threshold_opens_after_5_consecutive_failures():
    b = Breaker(CFG)
    for i in range(4):
        b, t = _admit(b, float(i))
        b, trs = b.record_failure(t, float(i))
        assert b.state is BreakerState.CLOSED and trs == ()
    b, t = _admit(b, 4.0)
    b, trs = b.record_failure(t, 4.0)
    assert b.state is BreakerState.OPEN
    assert [(x.from_state, x.to_state, x.at) for x in trs] == [
        (BreakerState.CLOSED, BreakerState.OPEN, 4.0)]
    assert b.retry_after(10.0) == 24.0


def test_breaker_success_in_closed_resets_the_count():
    b = Breaker(CFG)
    for i in range(4):
        b, _ = b.record_failure(None, float(i))
    b, trs = b.record_success(None, 5.0)
    assert (b.failures, b.state, trs) == (0, BreakerState.CLOSED, ())
    for i in range(4):
        b, _ = b.record_failure(None, 6.0 + i)
    assert b.state is BreakerState.CLOSED  # 4 after the reset: still closed
    b, _ = b.record_failure(None, 11.0)
    assert b.state is BreakerState.OPEN


def _opened(now: float = 0.0, cfg: BreakerConfig = CFG) -> Breaker:
    b = Breaker(cfg)
    for _ in range(cfg.threshold):
        b, _ = b.record_failure(None, now)
    assert b.state is BreakerState.OPEN
    return b


def test_breaker_open_refuses_until_open_s_then_one_probe_and_success_closes():
    b = _opened(0.0)
    for now in (0.0, 10.0, 29.999):
        a = b.admit(now)
        assert a.ticket is None and a.retry_after == pytest.approx(30.0 - now)
        assert a.transitions == ()
        b = a.breaker
    a = b.admit(30.0)
    assert a.ticket is not None and a.ticket.probe
    assert [(x.from_state, x.to_state) for x in a.transitions] == [
        (BreakerState.OPEN, BreakerState.HALF_OPEN)]
    b, probe = a.breaker, a.ticket
    second = b.admit(30.5)  # exactly one probe
    assert second.ticket is None and second.retry_after == pytest.approx(9.5)
    b, trs = b.record_success(probe, 31.0)
    assert b.state is BreakerState.CLOSED and trs[0].to_state is BreakerState.CLOSED


def test_breaker_probe_failure_reopens_for_full_open_s():
    b = _opened(0.0)
    b, probe = _admit(b, 30.0)
    b, trs = b.record_failure(probe, 32.0)
    assert b.state is BreakerState.OPEN and b.opened_at == 32.0
    assert b.admit(61.9).ticket is None
    assert b.admit(62.0).ticket is not None


def test_breaker_silent_probe_does_not_wedge():
    b = _opened(0.0)
    b, probe = _admit(b, 30.0)
    assert probe is not None
    assert b.admit(39.9).ticket is None  # the probe is still out
    a = b.admit(40.0)  # probe_timeout_s passed: counted failed, re-opened
    assert a.ticket is None and a.breaker.state is BreakerState.OPEN
    assert [(x.from_state, x.to_state) for x in a.transitions] == [
        (BreakerState.HALF_OPEN, BreakerState.OPEN)]
    b = a.breaker
    # The silent probe reporting late is stale and changes nothing.
    assert b.record_success(probe, 41.0)[0] is b
    assert b.record_failure(probe, 41.0)[0] is b
    assert b.release(probe) is b
    a = b.admit(70.0)  # half-opens again after open_s
    assert a.ticket is not None and a.breaker.state is BreakerState.HALF_OPEN


def test_breaker_release_frees_the_slot_of_that_probe():
    cfg = attrs.evolve(CFG, half_open_probes=2)
    b = _opened(0.0, cfg)
    b, stuck = _admit(b, 30.0)  # never reports
    b, other = _admit(b, 31.0)
    assert b.admit(31.5).ticket is None  # both slots taken
    b = b.release(other)  # no verdict: its slot comes back
    b, third = _admit(b, 32.0)
    assert third is not None
    # The stuck probe still times out 10 s after *its* admission.
    a = b.admit(40.0)
    assert a.breaker.state is BreakerState.OPEN


def test_breaker_stale_ticket_from_closed_does_not_reopen():
    b = Breaker(CFG)
    b, slow = _admit(b, 0.0)  # admitted while CLOSED, answers late
    for i in range(5):  # the outage, seen by others (reconnect attempts, other calls)
        b, _ = b.record_failure(None, 1.0 + i)
    assert b.state is BreakerState.OPEN
    b, probe = _admit(b, 40.0)
    b, _ = b.record_success(probe, 40.5)
    assert b.state is BreakerState.CLOSED
    assert slow is not None and slow.generation != b.generation
    after, trs = b.record_failure(slow, 41.0)
    assert after is b and trs == ()  # neither counted nor re-opened
    # A ticket of the current generation does count.
    b, fresh = _admit(b, 42.0)
    b, _ = b.record_failure(fresh, 42.5)
    assert b.failures == 1


breaker_ops = st.lists(
    st.tuples(
        st.sampled_from(["admit", "admit", "success", "failure", "release", "observe_fail",
                         "observe_ok"]),
        st.floats(min_value=0.0, max_value=12.0),
        st.integers(min_value=0, max_value=50),
    ),
    max_size=120,
)


@settings(max_examples=400)
@given(
    probes=st.integers(1, 3),
    threshold=st.integers(1, 6),
    open_s=st.sampled_from([0.0, 5.0, 30.0]),
    probe_timeout=st.sampled_from([1.0, 10.0]),
    ops=breaker_ops,
)
def test_breaker_property(probes, threshold, open_s, probe_timeout, ops):
    cfg = BreakerConfig(threshold=threshold, open_s=open_s, half_open_probes=probes,
                        probe_timeout_s=probe_timeout)
    b = Breaker(cfg)
    now = 0.0
    tickets: list[Ticket] = []
    in_flight: dict[int, int] = {}  # half-open generation -> probes out (admitted - released)
    consecutive = 0
    for op, dt, pick in ops:
        now += dt
        before = b
        if op == "admit":
            a = b.admit(now)
            b = a.breaker
            chain = [before.state] + [t.to_state for t in a.transitions]
            assert [t.from_state for t in a.transitions] == chain[:-1]
            assert chain[-1] is b.state
            if before.state is BreakerState.OPEN and now < before.opened_at + open_s:
                assert a.ticket is None and a.transitions == ()
                assert a.retry_after == pytest.approx(before.opened_at + open_s - now)
            if a.ticket is None:
                assert a.retry_after is not None and a.retry_after >= 0
                continue
            assert a.ticket.generation == b.generation
            assert a.ticket.probe == (b.state is BreakerState.HALF_OPEN)
            if a.ticket.probe:
                in_flight[b.generation] = in_flight.get(b.generation, 0) + 1
                assert in_flight[b.generation] <= probes
            tickets.append(a.ticket)
            continue
        if op in ("observe_fail", "observe_ok"):
            ticket = None
        else:
            if not tickets:
                continue
            ticket = tickets.pop(pick % len(tickets))
        stale = ticket is not None and ticket.generation != b.generation
        if op == "release":
            b = b.release(ticket)
            if stale:
                assert b is before
            elif ticket.probe and before.probes:
                in_flight[b.generation] -= 1
                assert len(b.probes) == len(before.probes) - 1
            continue
        ok = op in ("success", "observe_ok")
        b, trs = (b.record_success if ok else b.record_failure)(ticket, now)
        if stale:
            assert b is before and trs == ()  # stale tickets never change anything
            continue
        if before.state is BreakerState.CLOSED:
            consecutive = 0 if ok else consecutive + 1
            if consecutive >= threshold:
                assert b.state is BreakerState.OPEN and b.opened_at == now
                consecutive = 0
            else:
                assert b.state is BreakerState.CLOSED and b.failures == consecutive
        elif before.state is BreakerState.HALF_OPEN:
            assert b.state is (BreakerState.CLOSED if ok else BreakerState.OPEN)
        else:  # OPEN: an observed success closes, a failure changes nothing
            assert b.state is (BreakerState.CLOSED if ok else BreakerState.OPEN)
            if not ok:
                assert b is before
        if b.state is not before.state:
            assert b.generation == before.generation + 1
            assert [(t.from_state, t.to_state) for t in trs] == [(before.state, b.state)]
            consecutive = 0
        # invariants
        assert len(b.probes) <= probes
        assert (b.state is BreakerState.OPEN) == (b.opened_at is not None)


def test_an_observed_success_is_the_half_open_probe():
    """DESIGN 4: a successful reconnect or probe by the supervisor closes the breaker at
    once, for every actor; a failed one counts toward opening it."""
    b = Breaker(BreakerConfig(threshold=2, open_s=30.0))
    b, _ = b.record_failure(None, 0.0)  # a failed reconnect attempt counts
    b, transitions = b.record_failure(None, 1.0)
    assert b.state is BreakerState.OPEN and len(transitions) == 1
    assert b.admit(5.0).ticket is None  # calls fail fast
    b, transitions = b.record_success(None, 5.0)  # the supervisor reconnected
    assert b.state is BreakerState.CLOSED and len(transitions) == 1
    assert b.admit(5.0).ticket is not None


# ------------------------------------------------------------------ reset after stability
def _flap(policy: BackoffPolicy, up_s: float, stable_s: float = STABLE
          ) -> list[tuple[str, int, float | None]]:
    """Connect at 0, then every connection dies after ``up_s``; every attempt succeeds.
    Returns (state, attempt, delay) after each loss until ERROR (or 10 losses)."""
    status, _ = states.step(states.initial(policy, stable_s=stable_s), Input.CONNECT_OK, 0.0,
                            policy, health_interval_s=HEALTH)
    now, seen = 0.0, []
    for _ in range(10):
        now += up_s
        status, _ = states.step(status, Input.FAILURE_DETECTED, now, policy,
                                health_interval_s=HEALTH)
        seen.append((str(status.state), status.attempt, status.delay_s))
        if status.state is S.ERROR:
            break
        now = status.next_at
        status, _ = states.step(status, Input.ATTEMPT_OK, now, policy, health_interval_s=HEALTH)
    return seen


def test_flapping_escalates_on_the_never_connects_schedule():
    policy = BackoffPolicy()
    assert _flap(policy, up_s=2.0) == [
        ("RECONNECTING", 1, 1.0), ("RECONNECTING", 2, 2.0), ("RECONNECTING", 3, 4.0),
        ("ERROR", 0, HEALTH)]


def test_a_stable_connection_earns_a_fresh_budget():
    policy = BackoffPolicy()
    assert _flap(policy, up_s=STABLE) == [("RECONNECTING", 1, 1.0)] * 10
    # Just short of stable_s is not stable.
    assert _flap(policy, up_s=STABLE - 0.001)[-1] == ("ERROR", 0, HEALTH)


def test_recovered_from_error_and_lost_before_stable_escalates_again():
    policy = BackoffPolicy()
    status = _status_in(S.ERROR, policy, used=policy.max_attempts)
    status, actions = states.step(status, Input.PROBE_OK, 100.0, policy,
                                  health_interval_s=HEALTH)
    assert actions == (Action.MARK_CONNECTED, Action.RECOVERED)
    lost, actions = states.step(status, Input.FAILURE_DETECTED, 110.0, policy,
                                health_interval_s=HEALTH)
    assert lost.state is S.ERROR and Action.ESCALATE in actions
    lost, _ = states.step(status, Input.FAILURE_DETECTED, 100.0 + STABLE, policy,
                          health_interval_s=HEALTH)
    assert (lost.state, lost.attempt) == (S.RECONNECTING, 1)


def test_budget_after_loss():
    budget = RestartBudget(3, used=2, stable_s=10.0).connected(5.0)
    assert budget.after_loss(14.9).used == 2
    assert budget.after_loss(15.0).used == 0
    assert RestartBudget(3, used=2).after_loss(100.0).used == 2  # never connected
