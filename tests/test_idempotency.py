"""A request id is idempotent at the front door: one id, one question, one answer computed.

Every request here is `cache=False` (no-cache), so neither the response cache nor the router's own
coalescing could spare the provider a second run: what does is the front door's memory of requests.
"""

from __future__ import annotations

from contextlib import aclosing

import pytest
import trio

import node
from node.admission import Admission
from node.config import load_settings
from node.deps import RouterDeps
from node.errors import AccelmeshError, DeadlineExceeded
from node.idempotency import RecentRequests
from node.requests import Result, build_request
from node.serving import FrontDoor, RequestContext
from tests.fakes.providers import ScriptedProvider, failing

ALICE = "12D3KooWAlice"  # the caller
ME = "12D3KooWMe"  # the node


def front_door(provider: ScriptedProvider, *, slots: int = 1, queue: int = 1,
               recent: RecentRequests | None = None) -> FrontDoor:
    node.register_llm_provider(provider.name, lambda: provider)
    return FrontDoor(admission=Admission(slots, queue), deps=RouterDeps(settings=load_settings(env={})),
                     peer_id=ME, recent=recent)


def context(prompt: str, *, request_id: str = "r1", caller: str = ALICE, timeout: float = 30.0) -> RequestContext:
    request = build_request(prompt, model_name=None,
                            kwargs={"timeout": timeout, "request_id": request_id, "cache": False})
    return RequestContext(request=request, provider="alice", deadline=trio.current_time() + timeout, hops=1,
                          caller=caller, entry="infer")


async def answer(door: FrontDoor, ctx: RequestContext) -> tuple[str, Result]:
    async with aclosing(door.run(ctx)) as items:
        *chunks, result = [item async for item in items]
    assert isinstance(result, Result)
    return "".join(chunks), result


def same_answer(a: Result, b: Result) -> bool:
    return (a.text, a.cid, a.key, a.peer, a.request_id) == (b.text, b.cid, b.key, b.peer, b.request_id)


async def test_a_repeat_while_the_first_runs_waits_for_its_result_without_a_slot(autojump_clock):
    alice = ScriptedProvider("alice", latency=1.0)
    door = front_door(alice, slots=1, queue=0)  # a repeat asking for a slot would be refused busy
    got = {}

    async def ask(name):
        got[name] = await answer(door, context("hello"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "first")
            await trio.sleep(0.5)  # the first is at the provider, holding the only slot
            nursery.start_soon(ask, "repeat")
    (first_text, first), (repeat_text, repeat) = got["first"], got["repeat"]
    assert alice.calls == 1, "computed once"
    assert same_answer(first, repeat) and first_text == repeat_text == "alice: hello" and repeat.peer == ME
    assert door.admission.statistics().served == 1 and door.admission.refused_busy == 0, "the repeat took no slot"
    assert (door.recent.statistics().joined, door.recent.statistics().running) == (1, 0)


async def test_a_repeat_after_the_first_finished_replays_its_result_until_it_is_forgotten(autojump_clock):
    alice = ScriptedProvider("alice")
    door = front_door(alice, recent=RecentRequests(max_age=300.0))
    with trio.fail_after(1000):
        text, first = await answer(door, context("hello"))
        await trio.sleep(299.0)
        replayed_text, replayed = await answer(door, context("hello"))
        assert alice.calls == 1 and replayed is first and replayed_text == text == "alice: hello"
        assert door.recent.statistics().replayed == 1
        await trio.sleep(1.0)  # 300 s after the first finished: forgotten
        _, again = await answer(door, context("hello"))
    assert alice.calls == 2 and again is not first and door.recent.statistics().replayed == 1


async def test_the_same_id_with_another_question_is_another_request_and_from_another_caller_a_repeat(
        autojump_clock):
    alice = ScriptedProvider("alice")
    door = front_door(alice)
    with trio.fail_after(10):
        _, hello = await answer(door, context("hello", request_id="r1"))
        _, bye = await answer(door, context("goodbye", request_id="r1"))
        # a client peer without a fixed identity reconnects as another peer: still the same request
        _, carols = await answer(door, context("hello", request_id="r1", caller="12D3KooWCarol"))
    assert alice.calls == 2 and door.recent.statistics().replayed == 1 and carols is hello
    assert (hello.text, bye.text, carols.text) == ("alice: hello", "alice: goodbye", "alice: hello")


async def test_a_failure_is_not_remembered_a_retry_runs_again(autojump_clock):
    alice = ScriptedProvider("alice", [failing("alice")])
    door = front_door(alice)
    with trio.fail_after(10):
        with pytest.raises(AccelmeshError, match="scripted failure"):
            await answer(door, context("hello"))
        _, result = await answer(door, context("hello"))
    assert alice.calls == 2 and result.text == "alice: hello"


async def test_a_repeat_waiting_for_a_first_that_fails_runs_the_request_itself(autojump_clock):
    alice = ScriptedProvider("alice", [failing("alice")], latency=1.0)
    door = front_door(alice)
    got = {}

    async def first():
        with pytest.raises(AccelmeshError, match="scripted failure"):
            await answer(door, context("hello"))

    async def repeat():
        got["repeat"] = await answer(door, context("hello"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.sleep(0.5)
            nursery.start_soon(repeat)
    assert alice.calls == 2 and got["repeat"][1].text == "alice: hello"
    assert door.recent.statistics().joined == 0


async def test_a_repeat_waiting_for_a_first_whose_caller_went_away_runs_the_request_itself(autojump_clock):
    alice = ScriptedProvider("alice", latency=1.0)
    door = front_door(alice)
    got = {}

    async def repeat():
        got["repeat"] = await answer(door, context("hello"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(0.5):  # the first's caller went away while it ran
                nursery.start_soon(repeat)
                await answer(door, context("hello"))
    assert (alice.calls, alice.cancelled) == (2, 1) and got["repeat"][1].text == "alice: hello"


async def test_a_repeat_waits_for_the_first_no_longer_than_its_own_deadline(autojump_clock):
    alice = ScriptedProvider("alice", latency=10.0)
    door = front_door(alice, slots=2, queue=0)  # a slot free: only waiting for the first keeps the repeat from running
    got = {}

    async def first():
        got["first"] = await answer(door, context("hello", timeout=30.0))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.sleep(1.0)
            started = trio.current_time()
            with pytest.raises(DeadlineExceeded):
                await answer(door, context("hello", timeout=2.0))
            assert trio.current_time() - started == pytest.approx(2.0), "its deadline, not the first's"
    assert alice.calls == 1 and got["first"][1].text == "alice: hello", "the first was not disturbed"
    assert door.admission.statistics().served == 1


async def test_the_oldest_finished_request_is_forgotten_beyond_max_results(autojump_clock):
    alice = ScriptedProvider("alice")
    door = front_door(alice, recent=RecentRequests(max_results=2))
    with trio.fail_after(10):
        for request_id in ("a", "b"):  # at the limit: both remembered
            await answer(door, context("hello", request_id=request_id))
        for request_id in ("a", "b"):
            await answer(door, context("hello", request_id=request_id))
        assert (alice.calls, door.recent.statistics().replayed) == (2, 2)
        await answer(door, context("hello", request_id="c"))  # limit + 1: "a", the oldest, is forgotten
        assert door.recent.statistics().remembered == 2
        await answer(door, context("hello", request_id="b"))
        assert alice.calls == 3, "b still remembered"
        await answer(door, context("hello", request_id="a"))
    assert alice.calls == 4, "a ran again"


def test_finished_results_are_bounded_by_their_bytes_too():
    def result(text: str) -> Result:
        return Result(text=text, provider="alice", model="m", cache="bypass", key="k", cid="c", request_id="r",
                      latency_ms=1.0, response=b"")

    recent = RecentRequests(max_bytes=10)
    for name in ("a", "b"):  # 5 + 5 bytes: at the limit
        recent.finish((ALICE, name, "f"), recent.start((ALICE, name, "f")), result("x" * 5), now=0.0)
    assert recent.statistics().remembered_bytes == 10 and recent.replay((ALICE, "a", "f"), now=1.0) is not None
    recent.finish((ALICE, "c", "f"), recent.start((ALICE, "c", "f")), result("x"), now=2.0)  # one over
    assert recent.replay((ALICE, "a", "f"), now=3.0) is None and recent.replay((ALICE, "b", "f"), now=3.0)
    assert recent.statistics().remembered_bytes == 6
