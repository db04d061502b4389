"""The pure health policy of the backend manager: cooldown rules, backoff, EWMAs and the sole-provider order."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from fractions import Fraction

import pytest

from node.mesh.health import (
    BackendHealth,
    Ewma,
    HealthPolicy,
    HealthStatistics,
    false_cooldown_bound,
    false_cooldown_probability,
    ranked,
)

DEFAULT = HealthPolicy()


def cool(health: BackendHealth, now: float) -> float:
    """Record failures at `now` until `health` cools; returns when the cooldown ends."""
    for _ in range(health.policy.max_outcomes):
        if health.record(now, ok=False) == "cooling":
            until = health.cooldown_until(now)
            assert until is not None
            return until
    raise AssertionError("never cooled")


# -- the rule -----------------------------------------------------------------------------------


def test_three_backends_failing_25_percent_at_random_are_never_cooled_by_the_default_policy():
    # 1,000 requests each, one every 0.5 s: 60 outcomes in the 30 s window once it has filled.
    # Union bound over all 3 x 1,000 evaluations, each at most false_cooldown_probability with
    # the outcomes then in the window (20..59 while filling, 60 after):
    #   3 * (sum(p(k) for k in 20..59) + 941 * p(60)) = 7.2e-3,
    # so no cooldown is expected (with probability > 99%); the seeds make it certain here.
    bound = 3 * (sum(false_cooldown_probability(DEFAULT, 0.25, k) for k in range(20, 60))
                 + 941 * false_cooldown_probability(DEFAULT, 0.25, 60))
    assert bound < 0.01
    for seed, name in enumerate(("alice", "bob", "carol")):
        rng = random.Random(seed)
        health = BackendHealth()
        failures = 0
        for i in range(1000):
            ok = rng.random() >= 0.25
            failures += not ok
            assert health.record(i * 0.5, ok) == "ok", f"{name} cooled at request {i}: {health!r}"
        s = health.statistics(999 * 0.5)
        assert (s.cooldowns, s.outcomes) == (0, 60)
        assert 200 <= failures <= 300, f"{name}'s RNG did not fail about 25%: {failures}"


def test_a_backend_failing_6_of_10_is_cooled_and_ranked_behind_the_healthy_ones():
    health, others = BackendHealth(), {"alice": BackendHealth(), "carol": BackendHealth()}
    first = None
    for i in range(30):  # ok x4 then fail x6, repeated: 60% failures
        if health.record(float(i), ok=i % 10 < 4) == "cooling":
            first = i
            break
    assert first is not None, "a backend failing 60% was not cooled within 30 requests"
    assert first >= DEFAULT.min_requests - 1, "cooled before min_requests outcomes"
    assert health.statistics(float(first)).cooldowns == 1
    table = {**others, "bob": health}
    assert ranked(["alice", "bob", "carol"], float(first), table.__getitem__) == ["alice", "carol", "bob"]
    # with a 10-request minimum, 6 of 10 is enough on the tenth outcome
    small = BackendHealth(HealthPolicy(min_requests=10))
    assert [small.record(float(i), ok=i < 4) for i in range(10)] == ["ok"] * 9 + ["cooling"]


def test_a_backend_failing_just_below_the_threshold_is_not_cooled():
    health = BackendHealth(HealthPolicy(min_requests=10))
    assert [health.record(float(i), ok=i < 5) for i in range(10)] == ["ok"] * 10  # 5 of 10 < 0.6
    assert health.failure_ratio(9.0) == 0.5


def test_one_failure_alone_never_cools_a_backend():
    lenient = BackendHealth(HealthPolicy(min_requests=2, threshold=0.01))
    assert lenient.record(0.0, ok=False) == "ok"
    assert lenient.state(0.0) == "ok" and lenient.available(0.0)
    assert BackendHealth().record(0.0, ok=False) == "ok"
    with pytest.raises(ValueError, match="min_requests"):
        HealthPolicy(min_requests=1)


def test_outcomes_older_than_the_window_do_not_count():
    stale = BackendHealth()
    for _ in range(19):
        stale.record(0.0, ok=False)
    # exactly one window later the 19 have dropped out: one failure alone in the window
    assert stale.record(30.0, ok=False) == "ok"
    assert stale.statistics(30.0) == HealthStatistics("ok", 1, 1, 0, 0, None, 0)
    fresh = BackendHealth()
    for _ in range(19):
        fresh.record(0.0, ok=False)
    assert fresh.record(29.5, ok=False) == "cooling"  # still inside: 20 of 20 failed
    assert fresh.failure_ratio(1.0) == 0.0  # the window was cleared by the cooldown


def test_queries_see_the_window_at_now_without_changing_it():
    health = BackendHealth()
    health.record(0.0, ok=False)
    health.record(10.0, ok=True)
    assert health.failure_ratio(10.0) == 0.5
    assert health.failure_ratio(35.0) == 0.0  # the failure has aged out at 35
    assert health.failure_ratio(10.0) == 0.5  # and a query changed nothing
    assert health.failure_ratio(45.0) == 0.0 and health.statistics(45.0).outcomes == 0


def test_at_most_max_outcomes_are_kept_and_the_oldest_drop_first():
    policy = HealthPolicy(min_requests=4, max_outcomes=4, threshold=0.75)
    health = BackendHealth(policy)
    for i in range(4):  # at the limit: 4 successes
        health.record(float(i), ok=True)
    assert health.statistics(3.0).outcomes == 4
    assert health.record(4.0, ok=False) == "ok"  # limit + 1: the oldest success dropped, 1 of 4
    assert (health.statistics(4.0).outcomes, health.statistics(4.0).failures) == (4, 1)
    assert health.record(5.0, ok=False) == "ok"  # 2 of 4
    assert health.record(6.0, ok=False) == "cooling"  # 3 of 4 reaches 0.75 only because the window is capped


# -- cooldowns, probing and backoff ----------------------------------------------------------


def test_backoff_doubles_on_repeated_cooldowns_is_capped_and_resets_after_a_success():
    health = BackendHealth()
    now = 0.0
    until = cool(health, now)
    lengths = [until - now]
    for _ in range(6):  # each probe fails: cooled again at once, for twice as long
        now = until
        assert health.state(now) == "probing"
        assert health.record(now, ok=False) == "cooling"
        until = health.cooldown_until(now)
        assert until is not None
        lengths.append(until - now)
    assert lengths == [5.0, 10.0, 20.0, 40.0, 80.0, 120.0, 120.0]
    assert health.statistics(now).consecutive_cooldowns == 7
    now = until
    assert health.record(now, ok=True) == "ok"  # a successful probe resets the backoff
    assert health.statistics(now).consecutive_cooldowns == 0
    assert cool(health, now + 1.0) - (now + 1.0) == 5.0
    assert health.statistics(now + 1.0).cooldowns == 8


def test_a_failure_while_probing_recools_at_once():
    health = BackendHealth()
    until = cool(health, 0.0)
    assert health.state(until - 0.001) == "cooling" and not health.available(until - 0.001)
    assert health.state(until) == "probing" and health.available(until)
    assert health.cooldown_until(until) is None
    assert health.record(until + 1.0, ok=False) == "cooling"  # one failure, far below min_requests
    assert health.cooldown_until(until + 1.0) == until + 1.0 + 10.0


def test_the_stale_window_is_cleared_after_a_cooldown():
    health = BackendHealth()
    until = cool(health, 0.0)  # 20 failures at 0.0, all still inside the window at `until` = 5.0
    assert health.record(until, ok=True) == "ok"
    for _ in range(DEFAULT.min_requests - 2):
        assert health.record(until + 1.0, ok=False) == "ok"  # the 20 old failures no longer count
    s = health.statistics(until + 1.0)
    assert (s.state, s.outcomes, s.failures) == ("ok", DEFAULT.min_requests - 1, DEFAULT.min_requests - 2)


def test_outcomes_recorded_while_cooling_are_dropped():
    health = BackendHealth()
    until = cool(health, 0.0)
    assert health.record(1.0, ok=True) == "cooling"  # a request sent before the cooldown
    assert health.record(2.0, ok=False) == "cooling"
    s = health.statistics(2.0)
    assert (s.state, s.outcomes, s.ignored, s.cooldown_until, s.consecutive_cooldowns) == ("cooling", 0, 2, until, 1)
    assert health.state(until) == "probing", "a late success during the cooldown is not a probe"


# -- the sole-provider order --------------------------------------------------------------------


def test_ranked_keeps_a_cooling_sole_provider_last_instead_of_dropping_it():
    alice = BackendHealth()
    cool(alice, 0.0)
    assert ranked(["alice"], 1.0, {"alice": alice}.__getitem__) == ["alice"]


def test_ranked_puts_available_backends_first_each_group_in_the_given_order():
    table = {name: BackendHealth() for name in ("alice", "bob", "carol", "dave")}
    until = cool(table["alice"], 0.0)
    cool(table["carol"], 0.0)
    assert ranked(["alice", "bob", "carol", "dave"], 1.0, table.__getitem__) == ["bob", "dave", "alice", "carol"]
    assert ranked(["carol", "dave", "alice", "bob"], 1.0, table.__getitem__) == ["dave", "bob", "carol", "alice"]
    assert ranked(["alice", "bob"], until, table.__getitem__) == ["alice", "bob"]  # probing is available
    assert ranked([], 1.0, table.__getitem__) == []


# -- the computed probabilities ---------------------------------------------------------------


def _brute_force(policy: HealthPolicy, p: Fraction, n: int, *, last_fails: bool) -> Fraction:
    """Sum over all 2**n outcome sequences of those that meet the cooling rule (optionally: just after a failure)."""
    total = Fraction(0)
    for seq in itertools.product((False, True), repeat=n):  # True: a failure
        failures = sum(seq)
        if n >= policy.min_requests and failures >= policy.threshold * n and (seq[-1] or not last_fails):
            total += p ** failures * (1 - p) ** (n - failures)
    return total


@pytest.mark.parametrize("policy", [HealthPolicy(min_requests=2, threshold=0.5),
                                    HealthPolicy(min_requests=3, threshold=0.6),
                                    HealthPolicy(min_requests=5, threshold=1.0)])
@pytest.mark.parametrize("rate", [0.25, 0.1, 0.7])
def test_false_cooldown_probability_matches_a_brute_force_binomial_sum_for_small_n(policy, rate):
    p = Fraction(rate)
    for n in range(11):
        expected = _brute_force(policy, p, n, last_fails=False)
        assert false_cooldown_probability(policy, rate, n) == pytest.approx(float(expected), rel=1e-12, abs=0)
        per_outcome = _brute_force(policy, p, n, last_fails=True)
        assert false_cooldown_bound(policy, rate, n) == pytest.approx(min(1.0, n * float(per_outcome)),
                                                                      rel=1e-12, abs=0)


def test_false_cooldown_probability_is_zero_below_min_requests():
    for n in range(DEFAULT.min_requests):
        assert false_cooldown_probability(DEFAULT, 1.0, n) == 0.0
        assert false_cooldown_bound(DEFAULT, 1.0, n) == 0.0
    assert false_cooldown_probability(DEFAULT, 1.0, DEFAULT.min_requests) == 1.0


def test_false_cooldown_probability_agrees_with_the_rule_a_backend_applies():
    # the function counts ceil(threshold * n) failures among n; BackendHealth cools at exactly that
    # many (min_requests = n, so that no shorter prefix is evaluated first)
    for n in (2, 3, 20, 21, 29, 30, 50):
        policy = HealthPolicy(min_requests=n)
        needed = math.ceil(policy.threshold * n)
        assert policy.failures_to_cool(n) == needed and policy.failures_to_cool(n - 1) == 0
        below, at = BackendHealth(policy), BackendHealth(policy)
        for health, failures in ((below, needed - 1), (at, needed)):
            states = [health.record(0.0, ok=True) for _ in range(n - failures)]
            states += [health.record(0.0, ok=False) for _ in range(failures)]
            assert states[:-1] == ["ok"] * (n - 1)
        assert below.state(0.0) == "ok" and at.state(0.0) == "cooling"


def test_the_documented_figures_for_the_default_policy_are_the_computed_ones():
    assert (DEFAULT.window, DEFAULT.min_requests, DEFAULT.threshold) == (30.0, 20, 0.6)
    assert (DEFAULT.base_cooldown, DEFAULT.max_cooldown, DEFAULT.max_outcomes) == (5.0, 120.0, 1024)
    assert f"{false_cooldown_probability(DEFAULT, 0.25, 20):.2e}" == "9.35e-04"
    assert f"{false_cooldown_probability(DEFAULT, 0.25, 30):.2e}" == "5.01e-05"
    assert f"{false_cooldown_probability(DEFAULT, 0.25, 50):.2e}" == "1.64e-07"
    assert f"{false_cooldown_bound(DEFAULT, 0.25, 20):.2e}" == "1.14e-02"
    assert f"{false_cooldown_bound(DEFAULT, 0.25, 30):.2e}" == "9.14e-04"
    assert f"{false_cooldown_bound(DEFAULT, 0.25, 50):.2e}" == "4.97e-06"
    # more outcomes than the window keeps are evaluated as max_outcomes
    assert false_cooldown_probability(DEFAULT, 0.5, 5000) == false_cooldown_probability(DEFAULT, 0.5, 1024)


@pytest.mark.parametrize(("rate", "n"), [(-0.1, 20), (1.5, 20), (math.nan, 20), (0.25, -1), (0.25, 2.5)])
def test_false_cooldown_probability_rejects_impossible_arguments(rate, n):
    with pytest.raises(ValueError, match="failure_rate" if not 0 <= rate <= 1 else "requests_in_window"):
        false_cooldown_probability(DEFAULT, rate, n)


# -- the policy, statistics, EWMA -----------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("window", 0.0), ("window", -1.0), ("window", math.inf), ("window", math.nan),
    ("min_requests", 1), ("min_requests", 2.0), ("min_requests", True),
    ("threshold", 0.0), ("threshold", 1.5), ("threshold", math.nan),
    ("base_cooldown", 0.0), ("base_cooldown", math.inf),
    ("max_cooldown", 4.0), ("max_cooldown", math.nan),
    ("max_outcomes", 19), ("max_outcomes", 100.0),
])
def test_policy_validation_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"HealthPolicy\.{field} must"):
        HealthPolicy(**{field: value})


def test_cooldown_lengths_double_from_the_base_and_stop_at_the_cap():
    assert [DEFAULT.cooldown(k) for k in range(1, 8)] == [5.0, 10.0, 20.0, 40.0, 80.0, 120.0, 120.0]
    assert DEFAULT.cooldown(10**6) == 120.0  # no overflow however long the streak
    with pytest.raises(ValueError, match="consecutive"):
        DEFAULT.cooldown(0)


def test_statistics_is_a_frozen_snapshot_and_repr_is_informative():
    health = BackendHealth()
    health.record(0.0, ok=True)
    health.record(1.0, ok=False)
    s = health.statistics(1.0)
    assert s == HealthStatistics(state="ok", outcomes=2, failures=1, cooldowns=0, consecutive_cooldowns=0,
                                 cooldown_until=None, ignored=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.failures = 0  # type: ignore[misc]
    health.record(2.0, ok=True)
    assert s.outcomes == 2, "a snapshot does not follow the object"
    assert health.statistics() == health.statistics(2.0)  # no `now`: as of the latest outcome
    assert repr(health) == ("<BackendHealth ok failed 1/3 in 30 s (cools at >= 0.6 of >= 20) "
                            "cooldowns=0 consecutive=0 ignored=0>")
    until = cool(health, 3.0)
    assert repr(health).startswith(f"<BackendHealth cooling until {until:g} failed 0/0 ")
    assert "cooldowns=1 consecutive=1" in repr(health)


def test_ewma_takes_the_first_sample_as_is_then_moves_alpha_of_the_way():
    ewma = Ewma(0.25)
    assert ewma.value is None and repr(ewma) == "<Ewma alpha=0.25 value=none samples=0>"
    assert ewma.update(100.0) == 100.0
    assert ewma.update(200.0) == 125.0
    assert ewma.value == 125.0 and ewma.samples == 2
    for _ in range(200):
        ewma.update(40.0)
    assert ewma.value == pytest.approx(40.0)
    assert Ewma(1.0).update(7) == 7.0 and repr(Ewma(1.0)) == "<Ewma alpha=1 value=none samples=0>"


@pytest.mark.parametrize("alpha", [0.0, -0.5, 1.01, math.nan, True])
def test_ewma_alpha_must_be_in_zero_to_one(alpha):
    with pytest.raises(ValueError, match="alpha"):
        Ewma(alpha)


def test_ewma_refuses_a_sample_that_would_poison_it():
    ewma = Ewma(0.5)
    ewma.update(10.0)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="finite"):
            ewma.update(bad)
    assert ewma.value == 10.0 and ewma.samples == 1


def test_configuration_md_states_the_computed_false_cooldown_figures():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    policy = HealthPolicy()
    for n in (20, 30, 50):
        row = f"| {false_cooldown_probability(policy, 0.25, n):.2e} | {false_cooldown_bound(policy, 0.25, n):.2e} |"
        assert row in doc, f"docs/configuration.md should state, for {n} outcomes: {row}"
    worst = max(range(20, 200), key=lambda n: false_cooldown_bound(policy, 0.25, n))
    assert worst == 20, "the documented worst case is the minimum number of outcomes"
