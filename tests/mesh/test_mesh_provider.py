"""The mesh provider's choices: who is eligible, whose turn it is, and failing over to the next node."""

from __future__ import annotations

from contextlib import aclosing

import pytest
import trio

from node.client import PeerClient
from node.mesh.manager import BackendManager, Candidate, Offer, eligible
from protocols.inference.messages import Request
from tests.mesh.conftest import running_daemon

ECHO = Offer("echo", ("generate",), ("echo",), True)
GPT = Offer("openai_compatible", ("generate", "chat"), ("gpt",), True)
NOT_READY = Offer("hf_local", ("generate",), ("tiny",), False)


def test_eligible_needs_a_ready_provider_for_the_task_and_model_and_honours_constraints():
    a = Candidate("A", (ECHO,), frozenset({"cpu"}))
    b = Candidate("B", (GPT, NOT_READY), frozenset({"cpu", "cuda"}))
    c = Candidate("C", (NOT_READY,), frozenset({"cuda"}), is_self=True)
    everyone = [c, b, a]
    assert [x.peer_id for x in eligible(everyone, "generate", None)] == ["A", "B"]  # sorted, C not ready
    assert [x.peer_id for x in eligible(everyone, "generate", "gpt")] == ["B"]
    assert [x.peer_id for x in eligible(everyone, "chat", None)] == ["B"]
    assert eligible(everyone, "generate", "tiny") == [], "a provider that is not ready serves nothing"
    assert [x.peer_id for x in eligible(everyone, "generate", None, on_peers=("A", "C"))] == ["A"]
    assert [x.peer_id for x in eligible(everyone, "generate", None, accelerator="cuda")] == ["B"]
    assert eligible(everyone, "embed", None) == []


def test_round_robin_takes_turns_over_whoever_is_eligible_now():
    from node.providers.base import ProviderRequest

    a, b, c = (Candidate(p, (ECHO,), frozenset()) for p in "ABC")
    manager = BackendManager(lambda: [c, a, b], strategy="round_robin", clock=lambda: 0.0)
    request = ProviderRequest(task="generate", prompt="hi", messages=None, model="echo")
    firsts = [manager.plan(request)[0].peer_id for _ in range(6)]
    assert firsts == ["A", "B", "C", "A", "B", "C"]
    assert [x.peer_id for x in manager.plan(request)] == ["A", "B", "C"]  # the rest follow, as failover order
    assert [x.peer_id for x in manager.plan(request)] == ["B", "C", "A"]
    assert manager.plan(ProviderRequest(task="embed", prompt="hi", messages=None, model=None)) == []


QUIET = {"ACCELMESH_ADVERTS_INTERVAL": "60"}


async def test_a_node_that_fails_is_passed_over_for_the_next_one(tmp_path):
    async with running_daemon(tmp_path, "alice", **QUIET) as alice, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], ACCELMESH_ECHO_FAILURE_RATE="1",
                           **QUIET) as bob:
        with trio.fail_after(10):
            while bob.peer_id not in alice.table:
                await trio.sleep(0.02)
        async with PeerClient.connect(alice.addrs()[0]) as client:
            for i in range(4):  # bob's turn comes twice; each time alice serves instead
                request = Request(id=f"r{i}", task="generate", prompt=f"p{i}", model="echo", provider="mesh",
                                  timeout_ms=20_000)
                async with aclosing(client.generate(request)) as items:
                    result = [item async for item in items][-1]
                assert result.peer == alice.peer_id and result.verify()["text"] == f"echo: p{i}"
        assert bob.admission.statistics().served == 2, "bob was asked on his two turns (and failed)"
        assert bob.info()["stats"]["inferences"] == 0
        assert alice.info()["stats"]["inferences"] == 4


async def test_a_node_that_resets_the_stream_is_passed_over_too(tmp_path):
    async with running_daemon(tmp_path, "alice", **QUIET) as alice, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **QUIET) as bob:
        with trio.fail_after(10):
            while bob.peer_id not in alice.table:
                await trio.sleep(0.02)
        bob.guard.closing = True  # bob starts to drain: every new stream is reset
        async with PeerClient.connect(alice.addrs()[0]) as client:
            for i in range(4):
                request = Request(id=f"r{i}", task="generate", prompt=f"p{i}", model="echo", provider="mesh",
                                  timeout_ms=20_000)
                async with aclosing(client.generate(request)) as items:
                    result = [item async for item in items][-1]
                assert result.peer == alice.peer_id
        assert bob.guard.refused["shutting_down"] >= 2 and alice.info()["stats"]["inferences"] == 4


class ResettingStream:
    """A libp2p stream the peer reset as soon as it opened."""

    def __init__(self, peer_id) -> None:
        self.muxed_conn = type("Conn", (), {"peer_id": peer_id})()

    async def write(self, data: bytes) -> None:
        raise ConnectionResetError("stream reset by the peer")

    async def read(self, n: int = -1) -> bytes:
        raise ConnectionResetError("stream reset by the peer")

    async def reset(self) -> None:
        pass

    async def close(self) -> None:
        pass


class ResettingHost:
    async def new_stream(self, peer_id, protocols):
        return ResettingStream(peer_id)


async def test_a_reset_stream_is_a_retryable_failure_of_that_peer():
    from node.errors import ProviderFailed
    from node.mesh.pool import StreamPool
    from node.mesh.streams import StreamLimits
    from protocols.records import Identity

    pool = StreamPool(ResettingHost(), StreamLimits())
    peer = Identity.generate().peer_id
    request = Request(id="r", task="generate", prompt="p", timeout_ms=1000)
    with trio.fail_after(5), pytest.raises(ProviderFailed, match="reset") as info:
        async with aclosing(pool.request(peer, request)) as items:
            async for _ in items:
                pass
    assert info.value.retryable, "the mesh moves on to the next node"


async def test_when_this_node_fails_to_serve_the_next_node_does(tmp_path):
    failing = {"ACCELMESH_ECHO_FAILURE_RATE": "1", "ACCELMESH_FALLBACK_ORDER": "echo"}
    async with running_daemon(tmp_path, "alice", **failing, **QUIET) as alice, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], ACCELMESH_FALLBACK_ORDER="echo",
                           **QUIET) as bob:
        with trio.fail_after(10):
            while bob.peer_id not in alice.table:
                await trio.sleep(0.02)
        async with PeerClient.connect(alice.addrs()[0]) as client:
            for i in range(4):  # no model named: alice's own chain (echo only) fails on her turns
                request = Request(id=f"r{i}", task="generate", prompt=f"p{i}", provider="mesh", timeout_ms=20_000)
                async with aclosing(client.generate(request)) as items:
                    result = [item async for item in items][-1]
                assert result.peer == bob.peer_id and result.provider == "echo"
        assert bob.info()["stats"]["inferences"] == 4


class BusyPool:
    """The stream pool's interface, where every other node answers busy."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after, self.asked = retry_after, []

    async def request(self, peer_id, request):
        from node.errors import Busy

        self.asked.append(peer_id)
        raise Busy(self.retry_after, f"peer {peer_id} is busy")
        yield  # pragma: no cover - an async generator


async def test_when_every_node_this_one_included_is_full_the_caller_hears_busy_with_the_smallest_hint():
    from node.errors import Busy
    from node.mesh.errors import ClusterBusy
    from node.mesh.provider import MeshProvider
    from node.providers.base import ProviderRequest

    async def this_node_full(request, slot):  # taking the slot back found the queue full
        raise Busy(0.5, "every slot and the queue are full")
        yield  # pragma: no cover

    pool = BusyPool(retry_after=2.0)
    nodes = [Candidate("B", (ECHO,), frozenset()), Candidate("SELF", (ECHO,), frozenset(), is_self=True)]
    mesh = MeshProvider(peer_id="SELF", manager=BackendManager(lambda: nodes), run_local=this_node_full, pool=pool)
    # 0.3 s left: the soonest slot (0.5 s) comes after the deadline, so the mesh does not wait for it
    request = ProviderRequest(task="generate", prompt="hi", messages=None, model="echo", timeout=0.3)
    with trio.fail_after(5), pytest.raises(ClusterBusy) as info:
        async with aclosing(mesh.astream(request)) as items:
            async for _ in items:
                pass
    assert pool.asked == ["B"] and info.value.retry_after == 0.5, "both asked; the smallest hint wins"


async def test_a_busy_node_is_passed_over_for_this_node_when_it_has_room():
    from node.mesh.provider import MeshProvider
    from node.providers.base import Completion, ProviderRequest

    answer = await node_answer("hi")

    async def this_node_serves(request, slot):
        yield answer.text
        yield answer

    pool = BusyPool(retry_after=2.0)
    nodes = [Candidate("B", (ECHO,), frozenset()), Candidate("SELF", (ECHO,), frozenset(), is_self=True)]
    mesh = MeshProvider(peer_id="SELF", manager=BackendManager(lambda: nodes), run_local=this_node_serves,
                        pool=pool)
    request = ProviderRequest(task="generate", prompt="hi", messages=None, model="echo")
    with trio.fail_after(5):
        async with aclosing(mesh.astream(request)) as items:
            out = [item async for item in items]
    assert pool.asked == ["B"] and isinstance(out[-1], Completion) and out[-1].remote.peer == "SELF"


async def node_answer(prompt: str):
    """An echo answer computed here, as this node's front door returns it (peer filled in)."""
    import dataclasses

    import node

    result = await node.acomplete(prompt, provider="echo", cache="no-store")
    return dataclasses.replace(result, peer="SELF")
