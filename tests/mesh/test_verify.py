"""`verify=k`: k nodes must return the same response CID. The other nodes are the scripted stream pool
of test_failover (real wire Results; a liar sends the honest request key over another answer whose
CID matches its own bytes, so only comparing nodes can catch it)."""

from __future__ import annotations

import dataclasses

import pytest
import trio

import node
from node.errors import AllProvidersFailed, Disagreement, InvalidRequest, ProviderFailed
from node.mesh.errors import error_for, raise_for
from node.wire import request_from_wire, request_to_wire
from protocols.codec import decode, encode
from protocols.inference.messages import Error
from protocols.inference.messages import Request as WireRequest
from tests.mesh.test_failover import PROMPT, ScriptedPool, collect, mesh, nodes, request


def verified(k: int = 2, **params):
    return dataclasses.replace(request(**params), verify=k)


async def test_two_of_three_agree_when_one_lies_and_the_liar_is_counted_as_failing(autojump_clock):
    pool = ScriptedPool({"A": ["forged"], "B": ["ok"], "C": ["ok"]})
    provider = mesh(pool, nodes("A", "B", "C"))
    honest = await node.acomplete(PROMPT, provider="echo", cache="no-store")
    with trio.fail_after(30):
        chunks, final = await collect(provider, verified(2))
    assert "".join(chunks) == final.text == honest.text and final.remote.cid == honest.cid
    assert set(final.remote.agreed) == {"B", "C"}
    assert sorted(pool.asked) == ["A", "B", "C"], "A and B first; they disagree, so C is asked"
    assert set(pool.modes) == {"no-cache"}, "every node computes afresh"
    assert provider.manager.backend("A").statistics().disagreed == 1
    assert provider.manager.backend("A").health.statistics().failures == 1, "its health is lowered"
    assert provider.manager.backend("B").statistics().disagreed == 0


async def test_one_honest_and_one_lying_node_is_a_disagreement_naming_both_and_accusing_neither(autojump_clock):
    pool = ScriptedPool({"A": ["forged"], "B": ["ok"]})
    provider = mesh(pool, nodes("A", "B"))
    honest = await node.acomplete(PROMPT, provider="echo", cache="no-store")
    with trio.fail_after(30), pytest.raises(Disagreement) as info:
        await collect(provider, verified(2))
    assert set(info.value.answers) == {"A", "B"} and info.value.answers["B"] == honest.cid
    assert info.value.answers["A"] != honest.cid and info.value.k == 2
    assert "no 2 nodes agree" in str(info.value)
    assert all(provider.manager.backend(p).statistics().disagreed == 0 for p in "AB"), "one against one: no verdict"


async def test_while_k_agree_no_more_nodes_are_asked(autojump_clock):
    pool = ScriptedPool({p: ["ok"] for p in "ABCD"})
    provider = mesh(pool, nodes(*"ABCD"))
    with trio.fail_after(30):
        _, final = await collect(provider, verified(3))
    assert len(pool.asked) == 3 and len(set(final.remote.agreed)) == 3


async def test_a_failing_node_is_replaced_and_another_models_answer_is_no_disagreement(autojump_clock):
    pool = ScriptedPool({"A": [("die_after", 0)], "B": ["other_model"], "C": ["ok"], "D": ["ok"]})
    provider = mesh(pool, nodes(*"ABCD"))
    with trio.fail_after(30):
        _, final = await collect(provider, verified(2))
    assert set(final.remote.agreed) == {"C", "D"}
    assert provider.manager.backend("B").statistics().disagreed == 0, "a different key is another model, not a lie"


async def test_too_few_answers_is_a_retryable_failure_not_a_disagreement(autojump_clock):
    pool = ScriptedPool({"A": ["ok"], "B": [("die_after", 0)], "C": ["cached"]})
    provider = mesh(pool, nodes("A", "B", "C"))
    with trio.fail_after(30), pytest.raises(ProviderFailed, match="1 node.s. answered alike") as info:
        await collect(provider, verified(2))
    assert info.value.retryable and "answered from a cache, not a vote" in str(info.value)


async def test_a_tie_of_two_majorities_is_a_disagreement_that_accuses_nobody(autojump_clock):
    pool = ScriptedPool({"A": ["ok"], "B": ["forged"], "C": ["ok"], "D": ["forged"]})
    provider = mesh(pool, nodes(*"ABCD"))
    with trio.fail_after(30), pytest.raises(Disagreement) as info:
        await collect(provider, verified(3))
    assert len(info.value.answers) == 4 and len(set(info.value.answers.values())) == 2
    assert all(provider.manager.backend(p).statistics().disagreed == 0 for p in "ABCD")


async def test_fewer_nodes_than_k_is_refused_at_once(autojump_clock):
    provider = mesh(ScriptedPool({"A": ["ok"]}), nodes("A"))
    with trio.fail_after(5), pytest.raises(ProviderFailed, match="verify=2 needs 2 nodes") as info:
        await collect(provider, verified(2))
    assert not info.value.retryable


async def test_a_silent_node_costs_its_liveness_timeout_then_another_is_asked(autojump_clock):
    pool = ScriptedPool({"A": ["ok", "silent"], "B": ["ok"], "C": ["ok"]})
    provider = mesh(pool, nodes("A", "B", "C"))
    with trio.fail_after(120):
        for _ in range(3):
            await collect(provider, request())  # everyone measured
        started = trio.current_time()
        _, final = await collect(provider, verified(2))
    assert set(final.remote.agreed) == {"B", "C"} and trio.current_time() - started < 3.0


def test_verify_is_refused_for_sampled_requests_and_out_of_range():
    with pytest.raises(InvalidRequest, match="deterministic"):
        node.generate_text("hi", provider="echo", temperature=0.7, verify=2)
    for bad in (0, 17, True, "2"):
        with pytest.raises(InvalidRequest, match="verify must be"):
            node.generate_text("hi", provider="echo", verify=bad)
    assert node.generate_text("hi", provider="echo", temperature=0.7, seed=1, verify=1) == "echo: hi"
    with pytest.raises(InvalidRequest, match="only-if-cached"):
        node.generate_text("hi", cache="only-if-cached", verify=2)


def test_without_a_mesh_verify_is_refused_with_the_reason():
    with pytest.raises(AllProvidersFailed, match="only the mesh asks several nodes"):
        node.generate_text("hi", verify=2)


def test_verify_travels_on_the_wire_and_a_disagreement_comes_back_typed():
    from node.requests import build_request

    built = build_request("hi", model_name="echo", kwargs={"verify": 3})
    wire = decode(encode(request_to_wire(built, provider=None, hops=1)), WireRequest)
    assert wire.verify == 3 and request_from_wire(wire).verify == 3
    assert request_to_wire(built, provider=None, hops=2).verify is None, "a forwarded request is one node's work"
    assert request_to_wire(build_request("hi", model_name=None, kwargs={}), provider=None, hops=1).verify is None
    error = decode(encode(error_for(Disagreement({"P1": "bafy1", "P2": "bafy2"}, k=2))), Error)
    assert error.code == "disagreement" and error.answers == {"P1": "bafy1", "P2": "bafy2"}
    with pytest.raises(Disagreement) as info:
        raise_for(error, "P0")
    assert info.value.answers == {"P1": "bafy1", "P2": "bafy2"} and "no 2 nodes agree" in str(info.value)
