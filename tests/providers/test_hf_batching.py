"""hf_local with continuous batching (transformers' manager) against hf_local without it, on the
embedded tiny model: real transformers on the CPU, many requests at once from threads and tasks."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import aclosing

import pytest
import torch
import trio

import node
from node import RouterDeps
from node.config import load_settings
from node.errors import ProviderFailed
from node.providers.base import ProviderRequest
from node.providers.hf_local import HFLocalProvider

PROMPTS = [f"Request {i}: tell me about the mesh" for i in range(16)]


@pytest.fixture(scope="module")
def alone():
    return HFLocalProvider(max_new_tokens=24, batching="off")


@pytest.fixture(scope="module")
def batched():
    provider = HFLocalProvider(max_new_tokens=24, batching="on", batch_concurrency=8)
    assert provider.load().batcher is not None
    return provider


def req(prompt: str, **params) -> ProviderRequest:
    return ProviderRequest("generate", prompt, None, None, params=params, timeout=60)


def at_once(provider: HFLocalProvider, requests: list[ProviderRequest]) -> list:
    """complete_sync of every request, each from its own thread, all at once (an exception raises)."""
    out = at_once_outcomes(provider, requests)
    for outcome in out:
        if isinstance(outcome, Exception):
            raise outcome
    return out


def test_greedy_answers_and_usage_are_those_of_unbatched_generation(alone, batched):
    for params in ({}, {"max_tokens": 5}, {"max_tokens": 40}):
        requests = [req(p, **params) for p in PROMPTS]
        expected = [alone.complete_sync(r) for r in requests]
        assert at_once(batched, requests) == expected  # text, finish reason, prompt and completion tokens


def test_a_stop_string_ends_the_answer_at_the_same_token(alone, batched):
    full = alone.complete_sync(req(PROMPTS[3], max_tokens=30)).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    requests = [req(p, max_tokens=30, stop=[stop]) for p in PROMPTS[:8]]
    expected = [alone.complete_sync(r) for r in requests]
    got = at_once(batched, requests)
    assert got == expected and all(stop not in c.text for c in got)
    assert got[3].finish_reason == "stop" and got[3].completion_tokens < 30


async def test_streamed_chunks_are_those_of_unbatched_generation(alone, batched):
    async def chunks(provider: HFLocalProvider, prompt: str) -> list:
        async with aclosing(provider.astream(req(prompt, max_tokens=30))) as stream:
            return [item async for item in stream]

    with trio.fail_after(60):
        expected = [await chunks(alone, p) for p in PROMPTS[:8]]
        got: list = [None] * 8
        async with trio.open_nursery() as nursery:
            for i, prompt in enumerate(PROMPTS[:8]):
                async def one(i: int = i, prompt: str = prompt) -> None:
                    got[i] = await chunks(batched, prompt)
                nursery.start_soon(one)
    assert got == expected and all(len(c) > 2 for c in got)


def test_the_response_cid_is_the_same_with_and_without_batching():
    def cids(batching: str) -> list[str]:
        deps = RouterDeps(settings=load_settings(env={"ACCELMESH_PROVIDERS_HF_LOCAL_BATCHING": batching}))
        out: list = [None] * 8

        def one(i: int) -> None:
            out[i] = node.complete(PROMPTS[i], provider="hf_local", deps=deps, cache="no-cache", max_tokens=12)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        return [r.cid for r in out]

    assert cids("on") == cids("off")


def test_capacity_is_the_batch_size_and_the_advert_says_so(alone, batched):
    assert batched.capacity() == 8 and batched.statistics().capacity == 8
    assert batched.statistics().batched == ("accelmesh-tiny@cpu",)
    assert alone.capacity() == 1 and alone.statistics().batched == ()
    from node.mesh.adverts import local_offer

    (offer,) = local_offer(["hf_local"], {"hf_local": batched}.__getitem__)
    assert offer.capacity == 8


async def test_a_cancelled_request_leaves_the_batch_and_frees_its_slot_within_a_second():
    provider = HFLocalProvider(max_new_tokens=16, batching="on", batch_concurrency=2)
    loaded = provider.load()
    steps: list[float] = []

    def slow(*args) -> None:  # a slow model: ~20 steps/s
        steps.append(time.monotonic())
        time.sleep(0.05)

    handle = loaded.model.register_forward_hook(slow)
    try:
        with trio.fail_after(30):
            seen = []
            with trio.move_on_after(1.0):
                async with aclosing(provider.astream(req("cancel me", max_tokens=500))) as stream:
                    async for chunk in stream:
                        seen.append(chunk)
            assert seen, "it was generating when cancelled"
            cancelled, steps_then = trio.current_time(), len(steps)
            while loaded.batcher.running_in_manager() or loaded.batcher.statistics().running:
                await trio.sleep(0.01)
            assert trio.current_time() - cancelled < 1.0
            await trio.sleep(0.3)
            assert len(steps) - steps_then <= 2, "out of the batch within one step (the one running then)"
            for _ in range(2):  # both slots free: two more run at once
                assert loaded.batch_slots.acquire(blocking=False)
            loaded.batch_slots.release()
            loaded.batch_slots.release()
    finally:
        handle.remove()
        loaded.batcher.stop()


def test_out_of_memory_in_a_step_fails_that_batch_retryably_and_the_next_request_is_served(caplog):
    provider = HFLocalProvider(max_new_tokens=8, batching="on", batch_concurrency=4)
    loaded = provider.load()
    expected = provider.complete_sync(req("after the failure"))
    fail = threading.Event()

    def out_of_memory(*args):  # forward passes fail as a GPU out of memory would, while `fail` is set
        if fail.is_set():
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    handle = loaded.model.register_forward_hook(out_of_memory)
    try:
        fail.set()
        with caplog.at_level(logging.WARNING, logger="node.providers.hf_local"):
            outcomes = at_once_outcomes(provider, [req(f"in the failing step {i}") for i in range(3)])
        assert all(isinstance(o, ProviderFailed) and o.retryable for o in outcomes), outcomes
        assert any("out of memory" in o.message for o in outcomes)
        assert any("continuous batching stopped" in r.getMessage() for r in caplog.records)
        fail.clear()
        assert provider.complete_sync(req("after the failure")) == expected  # a new manager serves it
        assert loaded.batcher.statistics().restarts >= 1
    finally:
        handle.remove()
        loaded.batcher.stop()


def at_once_outcomes(provider: HFLocalProvider, requests: list[ProviderRequest]) -> list:
    """Like at_once, but each request's exception is its outcome."""
    out: list = [None] * len(requests)

    def one(i: int) -> None:
        try:
            out[i] = provider.complete_sync(requests[i])
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def test_where_the_manager_cannot_run_the_model_is_served_unbatched_with_one_log_line(caplog, alone):
    with caplog.at_level(logging.WARNING):
        provider = HFLocalProvider(max_new_tokens=24, batching="on", batch_concurrency=10**8)  # its cache: no RAM
        loaded = provider.load()
    lines = [r.getMessage() for r in caplog.records]
    assert loaded.batcher is None and len(lines) == 1, lines
    assert "continuous batching cannot run accelmesh-tiny" in lines[0] and "serving it unbatched" in lines[0]
    assert provider.capacity() == 1
    assert provider.complete_sync(req(PROMPTS[0])) == alone.complete_sync(req(PROMPTS[0]))


def test_a_seeded_sampled_request_gets_the_same_answer_while_the_batch_is_busy(batched):
    sampled = req(PROMPTS[0], temperature=1.5, seed=7, max_tokens=12)
    quiet = batched.complete_sync(sampled)
    busy, results = threading.Event(), []

    def keep_the_batch_busy() -> None:
        while not busy.is_set():
            batched.complete_sync(req("busy", max_tokens=40))

    threads = [threading.Thread(target=keep_the_batch_busy) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        results = [batched.complete_sync(sampled) for _ in range(3)]  # unbatched, the batch paused meanwhile
    finally:
        busy.set()
        for t in threads:
            t.join(timeout=60)
    assert results == [quiet] * 3
