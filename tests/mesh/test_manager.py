"""The backend manager: live state per backend, fed by attempts, and each request's failover order.

No network: candidates are plain values, "backends" are trio tasks that sleep, fail or succeed as
scripted, and time is trio's `autojump_clock` (or a plain number for the sync tests)."""

from __future__ import annotations

import collections
import dataclasses
import random

import pytest
import trio

from node.config import LOAD_BALANCING_STRATEGIES, load_settings
from node.errors import Busy, ConfigError, InvalidRequest, ModelNotFound, ProviderFailed
from node.mesh.health import HealthPolicy
from node.mesh.manager import (
    PING_FAILURES_TO_COOL,
    BackendManager,
    Candidate,
    Offer,
    capacity_for,
    candidates_from_adverts,
    health_policy,
    outcome_of,
)
from node.providers.base import ProviderRequest

ECHO = Offer("echo", ("generate", "chat"), ("echo",), True)
REQUEST = ProviderRequest(task="generate", prompt="hi", messages=None, model="echo")


def node(peer: str, *offers: Offer, capacity: int | None = 64, load: int = 0, **kw) -> Candidate:
    return Candidate(peer, offers or (ECHO,), frozenset({"cpu"}), capacity=capacity, load=load, **kw)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- what counts as a failure ---------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "timed_out", "expected"), [
    (None, False, "ok"),
    (Busy(1.0, "full"), False, "neutral"),
    (ProviderFailed("peer", "connection lost", retryable=True), False, "failed"),
    (ProviderFailed("peer", "bad request", retryable=False), False, "neutral"),
    (ModelNotFound("peer", "no such model"), False, "neutral"),
    (RuntimeError("a bug on the way"), False, "failed"),
    (GeneratorExit(), False, "neutral"),
    (GeneratorExit(), True, "failed"),
    (Busy(1.0, "full"), True, "failed"),
])
def test_busy_bad_requests_and_callers_leaving_never_count_an_attempt_past_its_deadline_does(exc, timed_out,
                                                                                             expected):
    assert outcome_of(exc, timed_out=timed_out) == expected


def test_a_cancelled_attempt_counts_only_when_the_deadline_had_passed():
    clock = Clock()
    manager = BackendManager(lambda: [], clock=clock)

    async def cancelled(deadline: float) -> None:
        with trio.CancelScope() as scope:
            with manager.attempt("B", deadline):
                scope.cancel()
                await trio.sleep(1)

    trio.run(cancelled, 10.0)  # the caller went away before the deadline
    assert manager.backend("B").statistics().failed == 0
    clock.now = 20.0
    trio.run(cancelled, 10.0)  # cut by the request's deadline: the backend was too slow
    assert manager.backend("B").statistics().failed == 1


# -- live state ---------------------------------------------------------------------------------


def test_in_flight_is_counted_on_every_start_and_finish_whatever_the_ending():
    clock = Clock()
    manager = BackendManager(lambda: [], clock=clock)
    a = manager.attempt("B", deadline=100.0)
    b = manager.attempt("B", deadline=100.0)
    with a:
        with b:
            assert manager.backend("B").in_flight == 2
        assert manager.backend("B").in_flight == 1
    with pytest.raises(ProviderFailed), manager.attempt("B", deadline=100.0):
        assert manager.backend("B").in_flight == 1
        raise ProviderFailed("B", "reset", retryable=True)
    s = manager.backend("B").statistics()
    assert (s.in_flight, s.started, s.succeeded, s.failed) == (0, 3, 2, 1)


def test_latency_is_an_ewma_of_successes_and_ttfc_of_first_chunks():
    clock = Clock()
    manager = BackendManager(lambda: [], clock=clock)
    for duration, first in ((1.0, 0.5), (2.0, 1.0)):
        start = clock.now
        with manager.attempt("B", deadline=1e9) as attempt:
            clock.now = start + first
            attempt.chunk()
            attempt.chunk()  # only the first chunk times the first chunk
            clock.now = start + duration
    with pytest.raises(ProviderFailed), manager.attempt("B", deadline=1e9):
        clock.now += 50.0  # a slow failure says nothing about speed
        raise ProviderFailed("B", "reset", retryable=True)
    s = manager.backend("B").statistics()
    assert s.latency_ms == pytest.approx(1000 + 0.2 * 1000) and s.ttfc_ms == pytest.approx(500 + 0.2 * 500)


def test_capacity_is_the_serving_providers_bounded_by_the_nodes():
    limited = Offer("hf_local", ("generate",), ("tiny",), True, capacity=2)
    unlimited = Offer("echo", ("generate",), ("echo",), True, capacity=None)
    both = node("A", limited, unlimited, capacity=64)
    assert capacity_for(both, "generate", "tiny") == 2
    assert capacity_for(both, "generate", "echo") == 64, "unlimited: the node's max_concurrent bounds it"
    assert capacity_for(both, "generate", None) == 64, "no model named: the node's own chain, an unlimited one"
    assert capacity_for(node("B", limited, capacity=1), "generate", "tiny") == 1
    assert capacity_for(node("C", unlimited, capacity=None), "generate", "echo") is None


def test_least_loaded_uses_advertised_capacity_and_load():
    small = node("A", Offer("echo", ("generate",), ("echo",), True, capacity=1))
    large = node("B", Offer("echo", ("generate",), ("echo",), True, capacity=8), load=3)  # 3 / 8
    manager = BackendManager(lambda: [small, large], strategy="least_loaded", clock=Clock(), rng=random.Random(1))
    assert manager.plan(REQUEST)[0].peer_id == "A", "A is idle"
    with manager.attempt("A", deadline=1e9):  # 1 / 1 against 3 / 8
        assert [c.peer_id for c in manager.plan(REQUEST)] == ["B", "A"]


def test_a_request_strategy_wins_over_the_configured_one_and_an_unknown_one_is_refused():
    nodes = [node(p) for p in "ABC"]
    manager = BackendManager(lambda: nodes, strategy="round_robin", clock=Clock(), rng=random.Random(3))
    manager.plan(REQUEST)
    manager.plan(dataclasses.replace(REQUEST, strategy="cache_affinity"))
    assert manager.statistics().by_strategy == {"round_robin": 1, "cache_affinity": 1}
    with pytest.raises(InvalidRequest, match="valid ones: " + ", ".join(LOAD_BALANCING_STRATEGIES)):
        manager.plan(dataclasses.replace(REQUEST, strategy="fastest"))
    with pytest.raises(InvalidRequest, match="fastest"):
        BackendManager(lambda: nodes, strategy="fastest")


def test_cache_affinity_sends_a_repeated_request_to_the_same_node():
    nodes = [node(f"peer-{i}") for i in range(5)]
    manager = BackendManager(lambda: nodes, strategy="cache_affinity", clock=Clock(), rng=random.Random(0))
    firsts = collections.Counter()
    for i in range(200):
        request = dataclasses.replace(REQUEST, prompt=f"prompt {i}")
        chosen = {manager.plan(request)[0].peer_id for _ in range(3)}
        assert len(chosen) == 1, "a repeat lands where its answer already is"
        firsts[chosen.pop()] += 1
    assert len(firsts) == 5 and min(firsts.values()) >= 20, firsts


# -- health through the manager -------------------------------------------------------------------


async def run_load(manager: BackendManager, behaviour, n: int, gap: float) -> collections.Counter:
    """`n` requests, one every `gap` seconds, each tried down its plan as the mesh does; `behaviour(peer)`
    sleeps for the service time and raises to fail. Returns the first-choice counts by peer."""
    firsts: collections.Counter = collections.Counter()

    async def one() -> None:
        plan = manager.plan(REQUEST)
        firsts[plan[0].peer_id] += 1
        for candidate in plan:
            try:
                with manager.attempt(candidate.peer_id, deadline=trio.current_time() + 60.0) as attempt:
                    await behaviour(candidate.peer_id)
                    attempt.chunk()
                return
            except ProviderFailed:
                continue

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
            await trio.sleep(gap)
    return firsts


async def test_a_backend_failing_6_of_10_is_cooled_and_traffic_moves_away_then_comes_back(autojump_clock):
    rng = random.Random(7)
    failing = {"B": 0.6}

    async def behaviour(peer: str) -> None:
        await trio.sleep(0.05)
        if rng.random() < failing.get(peer, 0.0):
            raise ProviderFailed(peer, "the provider failed", retryable=True)

    nodes = [node(p) for p in "ABC"]
    manager = BackendManager(lambda: nodes, strategy="round_robin", rng=random.Random(1))
    with trio.fail_after(3600):
        before = await run_load(manager, behaviour, 90, 0.1)  # 9 s: B's turn comes 30 times
        b = manager.backend("B").statistics()
        assert b.health == "cooling" and b.cooldowns == 1
        assert 20 <= before["B"] < 30, "cooled once its window held min_requests (20), then passed over"
        left = b.cooldown_until - trio.current_time()
        assert left > 1.0, "the load ended less than 4 s after the cooldown began"
        during = await run_load(manager, behaviour, int(left / 0.1) - 1, 0.1)  # the rest of the 5 s cooldown
        assert during["B"] == 0, "a cooling backend is never the first choice while others can serve"
        failing["B"] = 0.0  # it recovers
        await trio.sleep(1.0)
        after = await run_load(manager, behaviour, 30, 0.1)
    assert after["B"] == 10 and manager.backend("B").statistics().health == "ok", "back in turn after the probe"


async def test_three_backends_failing_25_percent_are_not_cooled_in_a_window(autojump_clock):
    rng = random.Random(11)

    async def behaviour(peer: str) -> None:
        await trio.sleep(0.05)
        if rng.random() < 0.25:
            raise ProviderFailed(peer, "the provider failed", retryable=True)

    nodes = [node(p) for p in "ABC"]
    manager = BackendManager(lambda: nodes, strategy="round_robin", rng=random.Random(2))
    with trio.fail_after(3600):
        await run_load(manager, behaviour, 300, 0.1)  # one 30 s window, ~100 outcomes per backend
    assert manager.statistics().cooling == 0 and all(b.cooldowns == 0 for b in manager.statistics().backends)


def test_the_sole_provider_of_a_model_is_tried_last_never_excluded():
    clock = Clock()
    rare = Offer("hf_local", ("generate",), ("rare",), True)
    nodes = [node("A"), node("B", ECHO, rare)]
    manager = BackendManager(lambda: nodes, strategy="least_loaded", clock=clock,
                             policy=HealthPolicy(min_requests=2), rng=random.Random(0))
    for _ in range(2):
        with pytest.raises(ProviderFailed), manager.attempt("B", deadline=1e9):
            raise ProviderFailed("B", "the provider failed", retryable=True)
    assert manager.backend("B").statistics().health == "cooling"
    assert [c.peer_id for c in manager.plan(dataclasses.replace(REQUEST, model="rare"))] == ["B"]
    assert [c.peer_id for c in manager.plan(REQUEST)] == ["A", "B"], "cooling: last, but still there"


def test_two_failed_pings_in_a_row_cool_a_peer_at_once_and_a_reply_in_between_resets_the_count():
    clock = Clock()
    manager = BackendManager(lambda: [], clock=clock)
    manager.pinged("B", None)
    manager.pinged("B", 0.4)
    manager.pinged("B", None)
    assert manager.backend("B").statistics().health == "ok" and manager.backend("B").rtt_ms is None
    for _ in range(PING_FAILURES_TO_COOL - 1):
        manager.pinged("B", None)
    s = manager.backend("B").statistics()
    assert s.health == "cooling" and s.cooldown_until == clock.now + 5.0


def test_failed_pings_of_a_peer_that_just_answered_a_request_count_for_nothing():
    clock = Clock()
    manager = BackendManager(lambda: [], clock=clock, ping_idle_after=10.0)
    with manager.attempt("B", deadline=1e9) as attempt:
        attempt.answered()
    clock.now = 9.0
    for _ in range(5):  # a loaded peer may be slow to answer pings: it answered a request 9 s ago
        manager.pinged("B", None)
    assert manager.backend("B").statistics().health == "ok"
    clock.now = 10.0  # idle now: its pings judge it
    manager.pinged("B", None)
    manager.pinged("B", None)
    assert manager.backend("B").statistics().health == "cooling"


def test_an_answer_counts_as_a_success_even_when_the_caller_stops_reading_after_it():
    manager = BackendManager(lambda: [], clock=Clock())
    with pytest.raises(GeneratorExit), manager.attempt("B", deadline=1e9) as attempt:
        attempt.answered()
        raise GeneratorExit  # what aclosing throws into the mesh once the router has its answer
    s = manager.backend("B").statistics()
    assert (s.succeeded, s.failed, s.in_flight) == (1, 0, 0)


def test_a_peer_no_stream_can_reach_twice_in_a_row_is_cooled_at_once():
    from node.mesh.errors import PeerUnreachable

    clock = Clock()
    manager = BackendManager(lambda: [], clock=clock)

    def unreachable() -> None:
        with pytest.raises(PeerUnreachable), manager.attempt("B", deadline=1e9):
            raise PeerUnreachable("peer B", "cannot open a stream: connection refused", retryable=True)

    unreachable()
    with manager.attempt("B", deadline=1e9) as attempt:
        attempt.answered()  # reached after all: the count starts again
    unreachable()
    assert manager.backend("B").statistics().health == "ok", "a window of 3 outcomes cools nothing by itself"
    unreachable()
    s = manager.backend("B").statistics()
    assert s.health == "cooling" and s.cooldown_until == clock.now + 5.0


def test_forget_drops_the_state_of_peers_that_left_unless_a_request_is_on_them():
    manager = BackendManager(lambda: [], clock=Clock())
    manager.backend("gone")
    busy = manager.attempt("busy", deadline=1e9)
    with busy:
        manager.forget(["kept"])
        assert {b.peer_id for b in manager.statistics().backends} == {"busy"}


def test_statistics_and_repr_say_what_the_manager_knows():
    clock = Clock()
    manager = BackendManager(lambda: [node("A")], strategy="power_of_two", clock=clock)
    manager.plan(REQUEST)
    with manager.attempt("A", deadline=1e9) as attempt:
        clock.now = 0.25
        attempt.chunk()
    s = manager.statistics()
    assert (s.strategy, s.planned, s.cooling) == ("power_of_two", 1, 0)
    (a,) = s.backends
    assert (a.peer_id, a.succeeded, a.latency_ms, a.health) == ("A", 1, 250.0, "ok")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.planned = 2  # type: ignore[misc]
    assert s.to_json()["backends"]["A"]["latency_ms"] == 250.0
    assert repr(manager) == "<BackendManager strategy=power_of_two backends=1 cooling=0 planned=1>"
    assert repr(manager.backend("A")) == "<Backend A ok in_flight=0 latency=250ms ok=1 failed=0 cooldowns=0>"


def test_candidates_come_from_adverts_with_capacity_and_load():
    from protocols.advert.messages import Accelerator, Load, ProviderEntry, sign_advert
    from protocols.records import Identity

    me, other = Identity.generate(), Identity.generate()

    def advert(identity: Identity, in_flight: int):
        return sign_advert(identity, addrs=(), providers=(ProviderEntry("echo", ("generate",), ("echo",), True),),
                           accelerators=(Accelerator("cpu", "x", 0, 0),), capacity=4, queue=8,
                           load=Load(in_flight, 1), software="accelmesh/0", protocol="1.1", seq=1, created=0,
                           expires=1)

    found = candidates_from_adverts(me.peer_id, [advert(other, 2)], advert(me, 0))
    assert [(c.peer_id, c.is_self, c.capacity, c.load) for c in found] == [
        (other.peer_id, False, 4, 3), (me.peer_id, True, 4, 1)]
    assert found[0].providers[0].ready and found[0].accelerators == frozenset({"cpu"})


def test_health_settings_make_the_policy_and_a_bad_combination_names_the_key():
    mesh = load_settings(env={"ACCELMESH_MESH_HEALTH_WINDOW": "10", "ACCELMESH_MESH_COOLDOWN": "2"}).mesh
    assert health_policy(mesh) == HealthPolicy(window=10.0, base_cooldown=2.0)
    with pytest.raises(ConfigError, match=r"mesh\.cooldown_max.*mesh\.cooldown"):
        health_policy(load_settings(env={"ACCELMESH_MESH_COOLDOWN": "10", "ACCELMESH_MESH_COOLDOWN_MAX": "5"}).mesh)


# -- model identities: keying a request before it is sent (advert protocol 1.2) -------------------

TINY = "hf_local/accelmesh-tiny@sha256:4723dd5460e07a9bf0bf5755a486411d"
ECHO_12 = Offer("echo", ("generate", "chat"), ("echo",), True, identities={"echo": "echo"}, default_model="echo")
HF = Offer("hf_local", ("generate", "chat"), ("accelmesh-tiny", "org/big"), True, capacity=1,
           identities={"accelmesh-tiny": TINY}, default_model="accelmesh-tiny")  # org/big: not loaded yet


def test_candidates_from_a_1_2_advert_carry_the_known_identities_and_the_default_model():
    from protocols.advert.messages import Accelerator, Load, ProviderEntry, sign_advert
    from protocols.records import Identity

    me, old = Identity.generate(), Identity.generate()

    def advert(identity: Identity, protocol: str, *providers: ProviderEntry):
        return sign_advert(identity, addrs=(), providers=providers, accelerators=(Accelerator("cpu", "x", 0, 0),),
                           capacity=4, queue=8, load=Load(0, 0), software="accelmesh/0", protocol=protocol, seq=1,
                           created=0, expires=1)

    new = advert(me, "1.2", ProviderEntry("hf_local", ("generate",), ("accelmesh-tiny", "org/big"), True, 1,
                                          (TINY, ""), "accelmesh-tiny"))
    older = advert(old, "1.1", ProviderEntry("echo", ("generate",), ("echo",), True, 4))
    (peer, own) = candidates_from_adverts(me.peer_id, [older], new)
    assert (dict(own.providers[0].identities), own.providers[0].default_model) == ({"accelmesh-tiny": TINY},
                                                                                  "accelmesh-tiny")
    assert (dict(peer.providers[0].identities), peer.providers[0].default_model) == ({}, None)


def test_identities_for_a_named_model_are_those_of_the_ready_providers_serving_it():
    from node.mesh.manager import identities_for

    nodes = [node("A", ECHO_12), node("B", ECHO_12, HF), node("C", HF)]
    assert identities_for(nodes, "generate", "echo") == {"echo"}
    assert identities_for(nodes, "chat", "accelmesh-tiny") == {TINY}
    other = Offer("hf_local", ("generate",), ("accelmesh-tiny",), True,
                  identities={"accelmesh-tiny": "hf_local/accelmesh-tiny@sha256:" + "0" * 32})
    assert identities_for([*nodes, node("D", other)], "generate", "accelmesh-tiny") == {
        TINY, "hf_local/accelmesh-tiny@sha256:" + "0" * 32}, "other weights, another identity: two keys"


def test_identities_for_no_model_are_each_serving_providers_default_model_identity():
    from node.mesh.manager import identities_for

    assert identities_for([node("A", ECHO_12), node("C", HF)], "generate", None) == {"echo", TINY}
    assert identities_for([node("A", ECHO_12), node("B", ECHO_12)], "chat", None) == {"echo"}


def test_identities_for_is_none_when_any_serving_providers_identity_is_unknown():
    from node.mesh.manager import identities_for

    assert identities_for([node("A", ECHO_12), node("C", HF)], "generate", "org/big") is None  # weights not loaded
    older = node("O", ECHO)  # a 1.0 or 1.1 node: no identities in its advert
    assert identities_for([node("A", ECHO_12), older], "generate", "echo") is None
    no_default = dataclasses.replace(ECHO_12, default_model=None)
    assert identities_for([node("A", no_default)], "generate", "echo") == {"echo"}
    assert identities_for([node("A", no_default)], "generate", None) is None  # which model answers is not said
    elsewhere = dataclasses.replace(ECHO_12, default_model="not-listed")
    assert identities_for([node("A", elsewhere)], "generate", None) is None


def test_identities_for_counts_only_ready_providers_of_the_task_and_nothing_serving_is_an_empty_set():
    from node.mesh.manager import identities_for

    unknown_not_ready = dataclasses.replace(HF, ready=False, identities={})
    embed_only = Offer("embedder", ("embed",), ("echo",), True)  # no identities, but not for this task
    assert identities_for([node("A", ECHO_12, unknown_not_ready, embed_only)], "generate", None) == {"echo"}
    assert identities_for([node("A", ECHO_12)], "embed", None) == set()
    assert identities_for([], "generate", "echo") == set()
