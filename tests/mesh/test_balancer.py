"""The selection policy: every strategy's failover order, seeded and without a network."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from functools import cache

import pytest

from node.config import LOAD_BALANCING_STRATEGIES
from node.errors import InvalidRequest
from node.mesh.balancer import BackendView, order, routing_key
from protocols.canonical import request_bytes

PEERS = ("alice", "bob", "carol", "dave", "erin")


@cache
def distinct_keys(n: int) -> tuple[bytes, ...]:
    """`n` routing keys of distinct prompts (computed once per module)."""
    return tuple(routing_key("generate", "tiny", prompt=f"prompt number {i}") for i in range(n))


def firsts(strategy: str, backends: list[BackendView], draws: int, seed: int, **kw: object) -> Counter[str]:
    rng = random.Random(seed)
    return Counter(order(strategy, backends, rng=rng, turn=t, **kw)[0].peer_id for t in range(draws))


def random_backends(rng: random.Random, n: int) -> list[BackendView]:
    return [BackendView(f"peer-{i:03d}", in_flight=rng.randrange(5), advert_load=rng.randrange(8),
                        capacity=rng.choice([None, 1, 2, 4, 8]),
                        latency=rng.choice([None, rng.uniform(0.0, 2.0)]))
            for i in range(n)]


# Every strategy


@pytest.mark.parametrize("strategy", LOAD_BALANCING_STRATEGIES)
def test_every_strategy_returns_each_backend_exactly_once(strategy):
    rng = random.Random(1)
    for n in (0, 1, 2, 3, 7, 50):
        for _ in range(20):
            backends = random_backends(rng, n)
            key = rng.choice([None, rng.randbytes(32)])
            out = order(strategy, backends, rng=rng, turn=rng.randrange(100), key=key)
            assert sorted(out, key=lambda b: b.peer_id) == sorted(backends, key=lambda b: b.peer_id)


@pytest.mark.parametrize("strategy", LOAD_BALANCING_STRATEGIES)
def test_the_order_depends_on_the_set_of_backends_and_the_seed_not_on_the_input_order(strategy):
    backends = random_backends(random.Random(2), 12)
    shuffled = list(backends)
    random.Random(3).shuffle(shuffled)
    for seed in range(20):
        a = order(strategy, backends, rng=random.Random(seed), turn=seed, key=bytes([seed]) * 32)
        b = order(strategy, shuffled, rng=random.Random(seed), turn=seed, key=bytes([seed]) * 32)
        assert a == b


def test_an_unknown_strategy_is_an_invalid_request_naming_the_valid_ones():
    for backends in ([], [BackendView("alice")]):
        with pytest.raises(InvalidRequest) as caught:
            order("fastest", backends, rng=random.Random(0))
        assert "fastest" in str(caught.value)
        assert all(name in str(caught.value) for name in LOAD_BALANCING_STRATEGIES)


def test_every_configured_strategy_name_is_implemented():
    for name in LOAD_BALANCING_STRATEGIES:
        assert len(order(name, [BackendView("alice"), BackendView("bob")], rng=random.Random(0))) == 2


def test_a_backend_listed_twice_or_a_non_positive_load_cap_is_refused():
    with pytest.raises(ValueError, match="listed twice"):
        order("round_robin", [BackendView("alice"), BackendView("bob"), BackendView("alice")], rng=random.Random(0))
    with pytest.raises(ValueError, match="load_cap"):
        order("cache_affinity", [BackendView("alice")], rng=random.Random(0), key=b"k", load_cap=0.0)


def test_a_backend_view_with_impossible_numbers_is_refused():
    for bad in ({"in_flight": -1}, {"advert_load": -1}, {"capacity": 0}, {"latency": -0.1},
                {"latency": float("nan")}, {"latency": float("inf")}):
        with pytest.raises(ValueError, match="alice"):
            BackendView("alice", **bad)


# round_robin


def test_round_robin_takes_turns_and_the_rest_follow_in_rotation():
    backends = [BackendView(p) for p in ("carol", "alice", "bob")]
    rng = random.Random(0)
    assert [order("round_robin", backends, rng=rng, turn=t)[0].peer_id for t in range(6)] == \
        ["alice", "bob", "carol", "alice", "bob", "carol"]
    assert [b.peer_id for b in order("round_robin", backends, rng=rng, turn=4)] == ["bob", "carol", "alice"]


# least_loaded


def test_least_loaded_picks_the_lowest_load_relative_to_capacity():
    four_slots = BackendView("alice", in_flight=2, capacity=4)  # 2 / 4
    one_slot = BackendView("bob", in_flight=1, capacity=1)  # 1 / 1
    for seed in range(10):
        assert order("least_loaded", [one_slot, four_slots], rng=random.Random(seed))[0] is four_slots
    backends = [BackendView("alice", in_flight=1, advert_load=3, capacity=2),  # max(1, 3) / 2
                BackendView("bob", in_flight=0, advert_load=1, capacity=1),  # 1 / 1
                BackendView("carol", in_flight=0, advert_load=0, capacity=1),  # 0
                BackendView("dave", in_flight=3, advert_load=3, capacity=None)]  # 3 / unlimited
    assert [b.peer_id for b in order("least_loaded", backends, rng=random.Random(0))] == \
        ["carol", "dave", "bob", "alice"]


def test_least_loaded_breaks_ties_by_latency_then_at_random():
    fast = BackendView("alice", in_flight=1, capacity=2, latency=0.1)
    slow = BackendView("bob", in_flight=1, capacity=2, latency=0.4)
    for seed in range(10):
        assert order("least_loaded", [slow, fast], rng=random.Random(seed))[0] is fast
    twins = [BackendView(p, in_flight=1, capacity=2, latency=0.2) for p in PEERS]
    counts = firsts("least_loaded", twins, 5_000, seed=4)
    assert set(counts) == set(PEERS) and min(counts.values()) > 800, counts


# least_delay


def test_least_delay_prefers_a_fast_backend_while_it_has_a_free_slot_then_counts_its_queue():
    fast = BackendView("alice", in_flight=1, capacity=2, latency=0.1)  # a free slot: 0.1 s
    slow = BackendView("carol", in_flight=0, capacity=2, latency=0.4)
    medium = BackendView("bob", in_flight=0, capacity=2, latency=0.2)
    for seed in range(10):
        assert [b.peer_id for b in order("least_delay", [slow, medium, fast], rng=random.Random(seed))] == \
            ["alice", "bob", "carol"]
    full = BackendView("alice", in_flight=4, capacity=2, latency=0.1)  # 0.1 * (1 + 3 / 2) = 0.25
    assert [b.peer_id for b in order("least_delay", [full, medium, slow], rng=random.Random(0))] == \
        ["bob", "alice", "carol"]
    stale = BackendView("alice", in_flight=0, advert_load=4, capacity=2, latency=0.1)  # the advert says full
    assert order("least_delay", [stale, medium], rng=random.Random(0))[0] is medium


def test_least_delay_uses_the_unqueued_service_time_when_known():
    queued = BackendView("alice", in_flight=2, capacity=2, latency=0.3, service=0.1)  # 0.1 * 1.5 = 0.15
    idle = BackendView("bob", in_flight=0, capacity=2, latency=0.2)
    assert order("least_delay", [queued, idle], rng=random.Random(0))[0] is queued, \
        "its latency holds time queued behind our own requests: counting the queue again would shun it"
    unlimited = BackendView("carol", in_flight=50, capacity=None, latency=0.12)
    assert order("least_delay", [unlimited, idle], rng=random.Random(0))[0] is unlimited, "unlimited never queues"


# power_of_two


def test_power_of_two_puts_the_faster_or_less_loaded_of_two_first():
    idle = BackendView("alice", in_flight=0, latency=0.2)
    busy = BackendView("bob", in_flight=3, latency=0.2)  # 0.8 against 0.2
    fast = BackendView("carol", in_flight=1, latency=0.1)
    slow = BackendView("dave", in_flight=1, latency=0.4)
    for seed in range(20):
        assert order("power_of_two", [busy, idle], rng=random.Random(seed)) == [idle, busy]
        assert order("power_of_two", [slow, fast], rng=random.Random(seed)) == [fast, slow]


def test_power_of_two_sends_more_traffic_to_a_fast_backend_than_to_one_four_times_slower():
    rng = random.Random(5)
    counts: Counter[str] = Counter()
    for _ in range(10_000):  # the loads vary from draw to draw; the speeds do not
        backends = [BackendView("alice", in_flight=rng.randrange(4), latency=0.1),
                    BackendView("bob", in_flight=rng.randrange(4), latency=0.4),
                    BackendView("carol", in_flight=rng.randrange(4), latency=0.2)]
        counts[order("power_of_two", backends, rng=rng)[0].peer_id] += 1
    assert counts["alice"] > 3 * counts["bob"], counts
    assert counts["bob"] > 0, "the slow one is still drawn against an even slower score sometimes"


def test_power_of_two_treats_an_unknown_latency_as_the_median_known_one():
    new = BackendView("alice", in_flight=0)  # median of 0.1, 0.3, 0.5 = 0.3: score 0.3
    backends = [new, BackendView("bob", in_flight=0, latency=0.1), BackendView("carol", in_flight=0, latency=0.3),
                BackendView("dave", in_flight=0, latency=0.5)]
    seen = set()
    for seed in range(20):
        out = order("power_of_two", backends, rng=random.Random(seed))
        pair = frozenset(b.peer_id for b in out[:2])
        seen.add(pair)
        if pair == {"alice", "dave"}:
            assert out[0] is new, "0.3 beats 0.5"
        if pair == {"alice", "bob"}:
            assert out[1] is new, "0.1 beats 0.3"
    assert {frozenset({"alice", "dave"}), frozenset({"alice", "bob"})} <= seen
    unknown = [BackendView("alice", in_flight=2), BackendView("bob", in_flight=0)]  # none known: load decides
    for seed in range(10):
        assert order("power_of_two", unknown, rng=random.Random(seed))[0].peer_id == "bob"


# weighted


def test_weighted_sends_traffic_in_proportion_to_capacity_over_latency():
    backends = [BackendView("alice", capacity=2, latency=0.1),  # 20
                BackendView("bob", capacity=1, latency=0.1),  # 10
                BackendView("carol", capacity=2, latency=0.4),  # 5
                BackendView("dave", capacity=1, latency=0.2)]  # 5
    counts = firsts("weighted", backends, 20_000, seed=6)
    for peer, share in {"alice": 0.5, "bob": 0.25, "carol": 0.125, "dave": 0.125}.items():
        assert abs(counts[peer] / 20_000 - share) < 0.015, counts


def test_weighted_gives_unknown_latency_the_mean_and_unlimited_capacity_the_largest_finite():
    backends = [BackendView("alice", capacity=2, latency=0.1),  # 20
                BackendView("bob", capacity=None, latency=0.2),  # capacity 2: 10
                BackendView("carol", capacity=1, latency=None)]  # latency (0.1 + 0.2) / 2: 6.67
    counts = firsts("weighted", backends, 20_000, seed=7)
    total = 20 + 10 + 20 / 3
    for peer, weight in {"alice": 20, "bob": 10, "carol": 20 / 3}.items():
        assert abs(counts[peer] / 20_000 - weight / total) < 0.015, counts


def test_weighted_failover_order_is_weighted_sampling_without_replacement():
    backends = [BackendView("alice", capacity=3, latency=1.0), BackendView("bob", capacity=1, latency=1.0),
                BackendView("carol", capacity=1, latency=1.0)]
    rng = random.Random(8)
    seconds = Counter(order("weighted", backends, rng=rng)[1].peer_id for _ in range(20_000))
    # P(alice second) = P(bob first) * 3/4 + P(carol first) * 3/4 = 2 * 1/5 * 3/4 = 0.3
    assert abs(seconds["alice"] / 20_000 - 0.3) < 0.015, seconds


# cache_affinity


def owners(backends: list[BackendView], keys: tuple[bytes, ...]) -> dict[bytes, str]:
    rng = random.Random(0)
    return {k: order("cache_affinity", backends, rng=rng, key=k)[0].peer_id for k in keys}


def test_cache_affinity_spreads_ten_thousand_keys_within_ten_percent_of_even():
    counts = Counter(owners([BackendView(p, capacity=4) for p in PEERS], distinct_keys(10_000)).values())
    assert set(counts) == set(PEERS)
    assert all(1_800 <= n <= 2_200 for n in counts.values()), counts


def test_cache_affinity_moves_only_the_keys_of_a_backend_that_leaves():
    keys = distinct_keys(10_000)
    before = owners([BackendView(p, capacity=4) for p in PEERS], keys)
    after = owners([BackendView(p, capacity=4) for p in PEERS if p != "carol"], keys)
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "carol" for k in moved)
    assert len(moved) == sum(1 for k in keys if before[k] == "carol")


def test_cache_affinity_spills_a_full_backend_to_the_next_in_hash_order_and_takes_its_keys_back():
    keys = distinct_keys(2_000)
    idle = [BackendView(p, capacity=2) for p in PEERS]
    full = [BackendView(p, capacity=2, in_flight=2 if p == "bob" else 0) for p in PEERS]
    rng = random.Random(0)
    for k in keys:
        hash_order = order("cache_affinity", idle, rng=rng, key=k)
        spilled = order("cache_affinity", full, rng=rng, key=k)
        expected = [b.peer_id for b in hash_order if b.peer_id != "bob"] + ["bob"]
        assert [b.peer_id for b in spilled] == expected
    assert owners(idle, keys) == owners([BackendView(p, capacity=2, in_flight=1) for p in PEERS], keys), \
        "under the cap again, every key is back on its own backend"


def test_cache_affinity_load_cap_is_relative_to_capacity_and_unlimited_never_spills():
    key = distinct_keys(1)[0]
    top = order("cache_affinity", [BackendView(p) for p in PEERS], rng=random.Random(0), key=key)[0].peer_id

    def first(in_flight: int, capacity: int | None, load_cap: float) -> str:
        backends = [BackendView(p, in_flight=in_flight if p == top else 0, capacity=capacity) for p in PEERS]
        return order("cache_affinity", backends, rng=random.Random(0), key=key, load_cap=load_cap)[0].peer_id

    assert first(3, 4, 1.0) == top  # 3 / 4 under the cap
    assert first(4, 4, 1.0) != top  # 4 / 4 at the cap: spills
    assert first(2, 4, 0.5) != top  # a lower cap spills earlier
    assert first(1_000, None, 1.0) == top  # unlimited


def test_cache_affinity_without_a_key_is_least_loaded():
    backends = random_backends(random.Random(9), 10)
    for seed in range(20):
        assert order("cache_affinity", backends, rng=random.Random(seed)) == \
            order("least_loaded", backends, rng=random.Random(seed))


# routing_key


def test_routing_key_is_the_sha256_of_the_canonical_request_and_is_stable():
    a = routing_key("generate", "tiny", prompt="hello", params={"temperature": 0.5, "max_tokens": 8})
    b = routing_key("generate", "tiny", prompt="hello", params={"max_tokens": 8, "temperature": 0.5})
    assert a == b and len(a) == 32
    assert a == hashlib.sha256(request_bytes(task="generate", model="tiny", prompt="hello",
                                             params={"max_tokens": 8, "temperature": 0.5})).digest()
    assert routing_key("generate", None, prompt="hello") == routing_key("generate", None, prompt="hello")


def test_routing_key_changes_with_prompt_model_params_task_and_messages():
    base = routing_key("generate", "tiny", prompt="hello", params={"max_tokens": 8})
    others = [
        routing_key("generate", "tiny", prompt="hello!", params={"max_tokens": 8}),
        routing_key("generate", "other", prompt="hello", params={"max_tokens": 8}),
        routing_key("generate", None, prompt="hello", params={"max_tokens": 8}),
        routing_key("generate", "tiny", prompt="hello", params={"max_tokens": 9}),
        routing_key("generate", "tiny", prompt="hello"),
        routing_key("embed", "tiny", prompt="hello", params={"max_tokens": 8}),
        routing_key("chat", "tiny", messages=[{"role": "user", "content": "hello"}], params={"max_tokens": 8}),
    ]
    assert len({base, *others}) == len(others) + 1


def test_routing_key_of_a_request_without_exactly_one_of_prompt_and_messages_is_an_invalid_request():
    with pytest.raises(InvalidRequest, match="routing key"):
        routing_key("generate", "tiny")
    with pytest.raises(InvalidRequest, match="routing key"):
        routing_key("chat", "tiny", prompt="x", messages=[{"role": "user", "content": "x"}])
