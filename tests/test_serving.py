"""The front door: a request waits in the queue no longer than its deadline, and is answered by the router."""

from __future__ import annotations

from contextlib import aclosing

import pytest
import trio

from node.admission import Admission
from node.config import load_settings
from node.deps import RouterDeps
from node.errors import DeadlineExceeded
from node.requests import Result, build_request
from node.serving import FrontDoor, RequestContext


def context(prompt: str, timeout: float) -> RequestContext:
    request = build_request(prompt, model_name=None, kwargs={"timeout": timeout})
    return RequestContext(request=request, provider="echo", deadline=trio.current_time() + timeout, hops=1,
                          caller="12D3KooWCaller", entry="infer")


async def answer(door: FrontDoor, ctx: RequestContext) -> list:
    async with aclosing(door.run(ctx)) as items:
        return [item async for item in items]


async def test_a_request_is_admitted_answered_and_names_this_node(autojump_clock):
    door = FrontDoor(admission=Admission(1, 1), deps=RouterDeps(settings=load_settings(env={})), peer_id="12D3KooWMe")
    *chunks, result = await answer(door, context("hello there", 5))
    assert "".join(chunks) == "echo: hello there" and isinstance(result, Result) and result.peer == "12D3KooWMe"
    assert door.admission.statistics().served == 1


async def test_a_request_still_queued_when_its_deadline_passes_ends_with_deadline_exceeded(autojump_clock):
    door = FrontDoor(admission=Admission(1, 1), deps=RouterDeps(settings=load_settings(env={})), peer_id="12D3KooWMe")
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        async def hold_the_only_slot():
            async with door.admission.slot():
                await release.wait()

        nursery.start_soon(hold_the_only_slot)
        await trio.sleep(0.01)
        started = trio.current_time()
        with pytest.raises(DeadlineExceeded):
            await answer(door, context("queued", 2.0))
        assert trio.current_time() - started == pytest.approx(2.0), "waited its deadline, not longer"
        assert (door.admission.queued, door.admission.in_flight) == (0, 1), "it left the queue"
        release.set()


async def test_an_unknown_entry_point_is_refused():
    door = FrontDoor(admission=Admission(1, 1), deps=RouterDeps(), peer_id="12D3KooWMe")
    with pytest.raises(ValueError, match="control, infer, http"):
        door.runner("carrier-pigeon")
