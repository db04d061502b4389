"""The load-balancing benchmark's simulation: arrivals, FIFO backends and the JSED oracle, checked by hand."""

from __future__ import annotations

import itertools
import random

import pytest

from tests.benchmarks.balancing_sim import (
    Backend,
    capacity,
    draw_service_times,
    expected_delay,
    jsed,
    poisson_arrivals,
    round_robin,
    simulate,
)

FAST, SLOW = Backend("alice", 50, 150), Backend("carol", 200, 600)


def test_jsed_never_sends_to_a_slower_idle_backend_while_a_faster_one_has_a_free_slot() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        in_system = [rng.randint(0, FAST.slots - 1), 0]  # the fast one has a free slot, the slow one is idle
        assert jsed(0, in_system, [FAST, SLOW]) == 0
        assert jsed(0, in_system[::-1], [SLOW, FAST]) == 1


def test_jsed_sends_to_the_slower_backend_once_waiting_at_the_faster_one_takes_longer() -> None:
    # fast: mean 0.1 s, 2 slots; each request beyond the slots adds 0.05 s. Slow idle: 0.4 s.
    assert expected_delay(6, FAST) == pytest.approx(0.1 + 5 * 0.05)  # 0.35 < 0.4
    assert expected_delay(8, FAST) == pytest.approx(0.1 + 7 * 0.05)  # 0.45 > 0.4
    assert jsed(0, [6, 0], [FAST, SLOW]) == 0
    assert jsed(0, [8, 0], [FAST, SLOW]) == 1
    assert jsed(0, [0, 0], [Backend("x", 100, 100), Backend("y", 100, 100)]) == 0  # a tie: the lower index


def test_a_single_backend_with_one_slot_is_a_fifo_queue_by_hand() -> None:
    single = Backend("bob", 100, 300, slots=1)
    arrivals = [0.0, 0.5, 0.6, 0.7, 3.0]
    service = [[1.0, 0.2, 0.3, 0.1, 0.5]]
    run = simulate(arrivals, service, [single], jsed)
    # starts: 0.0, 1.0 (waits for the first), 1.2, 1.5, 3.0 (idle again); finishes: 1.0, 1.2, 1.5, 1.6, 3.5
    assert run.latencies == pytest.approx([1.0, 0.7, 0.9, 0.9, 0.5])
    assert run.backends == (0, 0, 0, 0, 0)


def test_two_slots_serve_in_arrival_order_and_a_service_ending_at_an_arrival_has_ended() -> None:
    two = Backend("bob", 100, 300, slots=2)
    seen: list[list[int]] = []

    def only(i: int, in_system, backends) -> int:
        seen.append(list(in_system))
        return 0

    run = simulate([0.0, 0.0, 0.0, 1.0], [[1.0, 2.0, 0.5, 0.1]], [two], only)
    # the third waits for the first slot (free at 1.0) and ends at 1.5; the fourth arrives at 1.0
    # and waits for the third (1.5), since the second holds the other slot until 2.0
    assert run.latencies == pytest.approx([1.0, 2.0, 1.5, 0.6])
    assert seen == [[0], [1], [2], [2]]  # at 1.0 the first has ended: the second and the third remain


def test_round_robin_ignores_load_and_speed() -> None:
    run = simulate([0.0] * 7, [[0.1] * 7, [9.0] * 7], [FAST, SLOW], round_robin)
    assert run.backends == (0, 1, 0, 1, 0, 1, 0)


def test_the_same_seed_gives_the_same_run_and_another_seed_another() -> None:
    backends = [FAST, Backend("bob", 100, 300), SLOW]

    def once(seed: int) -> tuple[list[float], tuple[float, ...]]:
        rng = random.Random(seed)
        arrivals = poisson_arrivals(0.8 * capacity(backends), 500, rng)
        return arrivals, simulate(arrivals, draw_service_times(backends, 500, rng), backends, jsed).latencies

    assert once(14) == once(14)
    assert once(14) != once(15)


def test_poisson_arrivals_have_the_asked_rate_and_capacity_is_slots_over_mean_service() -> None:
    arrivals = poisson_arrivals(35.0, 20_000, random.Random(1))
    assert all(a < b for a, b in itertools.pairwise(arrivals))
    assert len(arrivals) / arrivals[-1] == pytest.approx(35.0, rel=0.03)
    assert capacity([FAST, Backend("bob", 100, 300), SLOW]) == pytest.approx(2 / 0.1 + 2 / 0.2 + 2 / 0.4)


def test_jsed_beats_round_robin_on_unequal_backends() -> None:
    backends = [FAST, Backend("bob", 100, 300), SLOW]
    rng = random.Random(14)
    arrivals = poisson_arrivals(0.4 * capacity(backends), 1000, rng)
    service = draw_service_times(backends, 1000, rng)
    oracle = sorted(simulate(arrivals, service, backends, jsed).latencies)
    rr = sorted(simulate(arrivals, service, backends, round_robin).latencies)
    assert oracle[989] < rr[989] / 2  # p99


def test_arrivals_out_of_order_and_too_few_service_times_are_refused() -> None:
    with pytest.raises(ValueError, match="comes before"):
        simulate([1.0, 0.5], [[0.1, 0.1]], [FAST], jsed)
    with pytest.raises(ValueError, match="pre-drawn"):
        simulate([0.0, 1.0], [[0.1]], [FAST], jsed)
    with pytest.raises(ValueError, match="rows"):
        simulate([0.0], [[0.1]], [FAST, SLOW], jsed)
