"""The mesh provider's choices: who is eligible, whose turn it is, and failing over to the next node."""

from __future__ import annotations

from contextlib import aclosing

import trio

from node.client import PeerClient
from node.mesh.provider import Candidate, RoundRobin, eligible
from protocols.inference.messages import Request
from tests.mesh.conftest import running_daemon

ECHO = ("echo", ("generate",), ("echo",), True)
GPT = ("openai_compatible", ("generate", "chat"), ("gpt",), True)
NOT_READY = ("hf_local", ("generate",), ("tiny",), False)


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
    a, b, c = (Candidate(p, (ECHO,), frozenset()) for p in "ABC")
    rr = RoundRobin()
    firsts = [rr.order([a, b, c])[0].peer_id for _ in range(6)]
    assert firsts == ["A", "B", "C", "A", "B", "C"]
    assert [x.peer_id for x in rr.order([a, b, c])] == ["A", "B", "C"]  # the rest follow, as failover order
    assert [x.peer_id for x in rr.order([a, b, c])] == ["B", "C", "A"]
    assert rr.order([]) == []


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
