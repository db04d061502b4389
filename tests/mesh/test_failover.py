"""Failover inside the mesh provider: busy waited out within the deadline, silent nodes cut by their
liveness timeout, answers broken off mid-stream resumed on another node (or refused, typed).

The other nodes are a scripted stream pool (the pool's interface, real wire Results), time is
trio's `autojump_clock`, and the manager is the real one with a seeded rng."""

from __future__ import annotations

import dataclasses
import random
from contextlib import aclosing

import pytest
import trio

import node
from node.errors import Busy, ProviderFailed
from node.mesh.errors import ClusterBusy, LivenessTimeout, StreamInterrupted
from node.mesh.manager import BackendManager, Candidate, Offer
from node.mesh.provider import MeshProvider
from node.providers.base import Completion, ProviderRequest
from node.wire import result_to_wire

ECHO = Offer("echo", ("generate", "chat"), ("echo",), True, capacity=2)
PROMPT = "one two three four"


def nodes(*peers: str) -> list[Candidate]:
    return [Candidate(p, (ECHO,), frozenset({"cpu"}), capacity=64) for p in peers]


async def answer_for(prompt: str, peer: str):
    """The echo answer as a serving node sends it: its chunks and its wire Result."""
    result = await node.acomplete(prompt, provider="echo", cache="no-store")
    words = result.text.split(" ")
    chunks = [w if i == 0 else " " + w for i, w in enumerate(words)]
    return chunks, result_to_wire(result, peer=peer)


class ScriptedPool:
    """The stream pool's interface: each peer behaves as `script[peer]` says, one step per request:
    "ok", ("busy", s), "silent", ("die_after", n chunks), ("lie_after", n), ("slow", s between chunks),
    "forged" (the honest request key over another, self-consistent answer: a lying node), "other_model"
    (a different request key: another model's honest answer), ("stall", s before the first chunk),
    "cached" (the honest answer, found in the node's memory cache). `modes` lists the cache modes asked.
    `abandoned` lists the peers whose answer the mesh stopped reading before its end (a reset stream)."""

    def __init__(self, script: dict[str, list], prompt: str = PROMPT) -> None:
        self.script, self.prompt, self.asked, self.abandoned, self.modes = script, prompt, [], [], []

    async def request(self, peer_id, wire_request):
        self.modes.append(wire_request.cache)
        finished = False
        try:
            async for item in self._answer(peer_id):
                yield item
            finished = True
        finally:
            if not finished:
                self.abandoned.append(peer_id)

    async def _answer(self, peer_id):
        self.asked.append(peer_id)
        steps = self.script[peer_id]
        step = steps.pop(0) if len(steps) > 1 else steps[0]
        chunks, result = await answer_for(self.prompt, peer_id)
        if step == "forged":
            chunks, forged = await answer_for(self.prompt + " (forged)", peer_id)
            result = dataclasses.replace(forged, key=result.key)
        if step == "cached":
            result = dataclasses.replace(result, cache="memory")
        if step == "other_model":
            result = dataclasses.replace(result, key="another-model-key")
        if isinstance(step, tuple) and step[0] == "busy":
            raise Busy(step[1], f"{peer_id} is full")
        if step == "silent":
            await trio.sleep_forever()
        if isinstance(step, tuple) and step[0] == "stall":
            await trio.sleep(step[1])
        if isinstance(step, tuple) and step[0] == "die_after":
            for chunk in chunks[:step[1]]:
                yield chunk
                await trio.sleep(0.01)
            raise ProviderFailed(f"peer {peer_id}", "the stream was reset", retryable=True)
        if isinstance(step, tuple) and step[0] == "lie_after":
            for chunk in chunks[:step[1]]:
                yield chunk
            yield " something else"
            return
        pause = step[1] if isinstance(step, tuple) and step[0] == "slow" else 0.01
        for chunk in chunks:
            yield chunk
            await trio.sleep(pause)
        yield result


async def run_local(request, slot):  # no node here serves
    raise AssertionError("this node serves nothing in these tests")
    yield  # pragma: no cover


def mesh(pool: ScriptedPool, peers: list[Candidate], **kw) -> MeshProvider:
    manager = BackendManager(lambda: peers, strategy="round_robin", rng=random.Random(5), **kw)
    return MeshProvider(peer_id="ENTRY", manager=manager, run_local=run_local, pool=pool)


def request(timeout: float = 60.0, **params) -> ProviderRequest:
    return ProviderRequest(task="generate", prompt=PROMPT, messages=None, model="echo", timeout=timeout,
                           params=params)


async def collect(provider: MeshProvider, req: ProviderRequest) -> tuple[list[str], Completion]:
    chunks, final = [], None
    async with aclosing(provider.astream(req)) as items:
        async for item in items:
            if isinstance(item, str):
                chunks.append(item)
            else:
                final = item
    assert isinstance(final, Completion)
    return chunks, final


async def test_when_every_node_is_busy_the_mesh_waits_for_the_soonest_slot_within_the_deadline(autojump_clock):
    pool = ScriptedPool({"A": [("busy", 2.0), "ok"], "B": [("busy", 0.5), "ok"]})
    provider = mesh(pool, nodes("A", "B"))
    started = trio.current_time()
    with trio.fail_after(30):
        chunks, final = await collect(provider, request())
    assert "".join(chunks) == final.text == "echo: " + PROMPT
    assert trio.current_time() - started >= 0.5, "it waited the smallest retry_after, then asked again"
    assert pool.asked[:2] == ["A", "B"] and len(pool.asked) == 3


async def test_busy_is_answered_only_when_the_deadline_comes_before_the_soonest_slot(autojump_clock):
    pool = ScriptedPool({"A": [("busy", 5.0)], "B": [("busy", 3.0)]})
    provider = mesh(pool, nodes("A", "B"))
    with trio.fail_after(30), pytest.raises(ClusterBusy) as info:
        await collect(provider, request(timeout=2.0))
    assert info.value.retry_after == 3.0 and "deadline" in str(info.value)


async def test_a_node_that_never_answers_costs_a_few_times_its_usual_latency_not_the_deadline(autojump_clock):
    pool = ScriptedPool({"A": ["ok", "silent"], "B": ["ok"]})
    provider = mesh(pool, nodes("A", "B"))
    with trio.fail_after(300):
        for _ in range(2):  # both answer once: their time to first chunk is known (a few ms here)
            await collect(provider, request())
        started = trio.current_time()
        chunks, final = await collect(provider, request())  # A's turn: it has gone silent
    took = trio.current_time() - started
    assert final.remote.peer == "B" and "".join(chunks) == final.text
    assert 2.0 <= took < 2.5, f"cut after the 2 s liveness floor, then served by B ({took:.2f} s; deadline 60 s)"
    a = provider.manager.backend("A").statistics()
    assert a.failed == 1 and provider.manager.liveness("A") == pytest.approx(4.0), "a cut doubles the next limit"


async def test_with_nothing_measured_there_is_no_liveness_limit_but_the_deadline(autojump_clock):
    provider = mesh(ScriptedPool({"A": ["silent"]}), nodes("A"))
    assert provider.manager.liveness("A") is None
    with trio.move_on_after(100) as scope:
        await collect(provider, request())
    assert scope.cancelled_caught, "still waiting at 100 s: only the request's deadline (the router's) ends it"


async def test_an_answer_broken_off_mid_stream_is_resumed_on_another_node_seamlessly(autojump_clock):
    pool = ScriptedPool({"A": [("die_after", 2)], "B": ["ok"]})
    provider = mesh(pool, nodes("A", "B"))
    with trio.fail_after(30):
        chunks, final = await collect(provider, request())
    assert "".join(chunks) == final.text == "echo: " + PROMPT, "one continuous answer, nothing twice"
    assert chunks[:2] == ["echo:", " one"] and final.remote.peer == "B"
    expected = await node.acomplete(PROMPT, provider="echo", cache="no-store")
    assert final.remote.cid == expected.cid, "the response CID is the whole answer's"


async def test_chunks_a_replay_skips_count_as_arriving_for_liveness(autojump_clock):
    pool = ScriptedPool({"A": ["ok", ("die_after", 3)], "B": ["ok", ("slow", 0.9)]})
    provider = mesh(pool, nodes("A", "B"), liveness_floor=1.0, liveness_multiple=1.0)
    with trio.fail_after(60):
        for _ in range(2):
            await collect(provider, request())  # both measured: the liveness limit is the 1 s floor
        chunks, final = await collect(provider, request())  # A dies after 3 chunks; B replays 0.9 s apart
    assert "".join(chunks) == final.text and final.remote.peer == "B", "2.7 s of skipped replay, never cut"


async def test_a_replay_that_differs_from_what_was_delivered_is_a_typed_error_never_mixed_text(autojump_clock):
    pool = ScriptedPool({"A": [("die_after", 2)], "B": [("lie_after", 1)]})
    provider = mesh(pool, nodes("A", "B"))
    seen = []
    with trio.fail_after(30), pytest.raises(StreamInterrupted) as info:
        async with aclosing(provider.astream(request())) as items:
            async for item in items:
                seen.append(item)
    assert seen == ["echo:", " one"] and info.value.delivered == len("echo: one")
    assert "10 characters" not in str(info.value) and "9 characters were delivered" in str(info.value)


async def test_a_sampled_answer_broken_off_mid_stream_is_not_resumed(autojump_clock):
    pool = ScriptedPool({"A": [("die_after", 2)], "B": ["ok"]})
    provider = mesh(pool, nodes("A", "B"))
    with trio.fail_after(30), pytest.raises(StreamInterrupted, match="sampled") as info:
        await collect(provider, request(temperature=0.7))
    assert info.value.delivered == len("echo: one") and pool.asked == ["A"]


async def test_failures_stop_after_max_attempts_nodes_and_each_failed_node_is_asked_once(autojump_clock):
    pool = ScriptedPool({p: [("die_after", 0)] for p in "ABCD"})
    provider = mesh(pool, nodes(*"ABCD"))
    provider.max_attempts = 3
    with trio.fail_after(30), pytest.raises(ProviderFailed, match="every node tried failed"):
        await collect(provider, request())
    assert sorted(pool.asked) == ["A", "B", "C"]


def test_backoff_is_jittered_doubling_and_capped():
    from node.mesh.provider import BACKOFF_BASE, BACKOFF_MAX

    provider = mesh(ScriptedPool({}), [])
    for failures in range(1, 12):
        wait = provider._backoff(failures)
        nominal = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (failures - 1))
        assert 0.5 * nominal <= wait <= 1.5 * nominal


def test_liveness_is_the_floor_or_a_multiple_of_the_time_to_first_chunk():
    now = [0.0]
    manager = BackendManager(lambda: [], clock=lambda: now[0], liveness_floor=2.0, liveness_multiple=4.0)
    with manager.attempt("fast", deadline=1e9) as attempt:
        now[0] += 0.1
        attempt.answered()
    with manager.attempt("slow", deadline=1e9) as attempt:
        now[0] += 3.0  # a CPU generation: 3 s to its first token
        attempt.answered()
    assert manager.liveness("fast") == 2.0, "the floor: 4 x 0.1 s would cut ordinary jitter"
    assert manager.liveness("slow") == 12.0
    assert manager.liveness("new") == 12.0, "a newcomer gets the slowest known"
    with pytest.raises(LivenessTimeout), manager.attempt("slow", deadline=1e9):
        raise LivenessTimeout("peer slow", "no chunk within 12 s")
    assert manager.liveness("slow") == 24.0
