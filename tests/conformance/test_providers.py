"""One conformance check, run against every provider (tests/conformance/harnesses.py).

Each provider must: say whether it is ready, and why not in words that say how to fix it;
answer synchronously and as a stream (text chunks in order, then exactly one Completion whose
text is the chunks joined); stop promptly when cancelled; honour the router's deadline, on the
async path and (except a plain seed-style object, which cannot be interrupted) on the sync path
by raising `ProviderTimeout` (the router's `DeadlineExceeded` then carries it); report failures as typed `ProviderError`s;
say how many requests it runs at once in a form the advert carries (None: unlimited); and advertise
for each model either nothing (not known yet) or exactly the identity that keys its requests.
"""

from __future__ import annotations

import time
from contextlib import aclosing

import pytest
import trio

import node
from node import RouterDeps
from node.errors import DeadlineExceeded, ProviderError, ProviderTimeout
from node.providers.base import Completion, PlainProvider, Readiness
from tests.conformance.harnesses import HARNESSES, LATE_SECONDS, Harness, SeedStyle

by_name = pytest.mark.parametrize("h", HARNESSES, ids=[h.name for h in HARNESSES])
with_unready = [h for h in HARNESSES if h.unready is not None]
with_sync_deadline = [h for h in HARNESSES if h.sync_deadline]
LIMIT = 60.0


@by_name
def test_ready_provider_says_so_with_a_reason(h: Harness, tmp_path):
    with h.ready(tmp_path) as case:
        readiness = case.provider.available()
        assert isinstance(readiness, Readiness) and readiness.ok and readiness.reason.strip()


@by_name
def test_capacity_is_unlimited_or_a_count_the_advert_can_carry(h: Harness, tmp_path):
    from protocols.advert.messages import MAX_CAPACITY

    with h.ready(tmp_path) as case:
        capacity = case.provider.capacity()
    assert capacity is None or (type(capacity) is int and 1 <= capacity <= MAX_CAPACITY), capacity


@by_name
def test_an_advertised_identity_is_unknown_or_the_one_that_keys_the_request_and_known_once_keyed(h: Harness,
                                                                                               tmp_path):
    with h.ready(tmp_path) as case:
        provider = case.provider
        for model in provider.models():
            before = provider.advertised_identity(model)
            keyed = provider.model_identity(model)
            assert before in (None, keyed), (model, before, keyed)
            assert provider.advertised_identity(model) == keyed, "known from the first request key on"


@pytest.mark.parametrize("h", with_unready, ids=[h.name for h in with_unready])
def test_unready_provider_says_how_to_fix_it(h: Harness, tmp_path):
    readiness = h.unready(tmp_path).available()
    assert not readiness.ok and h.unready_hint in readiness.reason


@by_name
def test_generate_answers(h: Harness, tmp_path):
    with h.ready(tmp_path) as case:
        completion = case.provider.complete_sync(case.request)
    assert isinstance(completion, Completion) and isinstance(completion.text, str)
    if h.expected is not None:
        assert completion.text == h.expected(case.request.text)


@by_name
async def test_stream_yields_chunks_in_order_then_one_completion(h: Harness, tmp_path):
    with h.ready(tmp_path) as case:
        with trio.fail_after(LIMIT):
            async with aclosing(case.provider.astream(case.request)) as stream:
                items = [item async for item in stream]
        again = await trio.to_thread.run_sync(case.provider.complete_sync, case.request)
    *chunks, last = items
    assert isinstance(last, Completion) and all(isinstance(c, str) for c in chunks)
    assert "".join(chunks) == last.text
    if h.expected is not None:
        assert last.text == h.expected(case.request.text) == again.text


@by_name
async def test_cancellation_stops_the_provider_promptly(h: Harness, tmp_path):
    with h.slow(tmp_path) as case:
        start = trio.current_time()
        with trio.fail_after(LIMIT):
            with trio.move_on_after(0.5):
                async with aclosing(case.provider.astream(case.request)) as stream:
                    async for _ in stream:
                        pass
            elapsed = trio.current_time() - start
    assert elapsed < 0.5 + 2.0, f"cancel took {elapsed:.1f} s"


@by_name
async def test_router_deadline_is_honoured(h: Harness, tmp_path):
    with h.slow(tmp_path) as case:
        node.register_llm_provider("under_test", lambda: case.provider)
        start = time.monotonic()
        with trio.fail_after(LIMIT), pytest.raises(DeadlineExceeded):
            await node.acomplete(case.request.text, provider="under_test", deps=RouterDeps(), timeout=0.5,
                                 model_name=case.request.model, **case.request.params)
        assert time.monotonic() - start < 0.5 + 2.0


@pytest.mark.parametrize("h", with_sync_deadline, ids=[h.name for h in with_sync_deadline])
async def test_router_deadline_is_honoured_on_the_sync_path(h: Harness, tmp_path):
    with h.slow(tmp_path) as case:
        node.register_llm_provider("under_test", lambda: case.provider)

        def call() -> None:
            node.complete(case.request.text, provider="under_test", deps=RouterDeps(), timeout=0.5,
                          cache="no-cache", model_name=case.request.model, **case.request.params)

        start = time.monotonic()
        with trio.fail_after(LIMIT), pytest.raises(DeadlineExceeded) as info:  # as on the async path
            await trio.to_thread.run_sync(call, abandon_on_cancel=True)
        assert isinstance(info.value.__cause__, ProviderTimeout), "the provider itself stopped at the deadline"
        assert time.monotonic() - start < 0.5 + 2.0


def test_a_plain_synchronous_provider_returns_its_late_answer():
    """docs/router.md: plain synchronous code cannot be interrupted, so its late answer is returned."""
    node.register_llm_provider("late", lambda: PlainProvider("late", SeedStyle("late")))
    start = time.monotonic()
    result = node.complete("hi", provider="late", deps=RouterDeps(), timeout=0.2)
    assert result.text == "plain: hi" and time.monotonic() - start >= LATE_SECONDS


@by_name
async def test_failures_are_typed_provider_errors(h: Harness, tmp_path):
    with h.failing(tmp_path) as case:
        with trio.fail_after(LIMIT), pytest.raises(h.error) as info:
            async with aclosing(case.provider.astream(case.request)) as stream:
                async for _ in stream:
                    pass
        assert isinstance(info.value, ProviderError) and info.value.message
        with pytest.raises(h.error):
            await trio.to_thread.run_sync(case.provider.complete_sync, case.request)
