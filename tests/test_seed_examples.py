"""The seed's documented examples work verbatim (with `node` for `ipfs_accelerate_py`)."""

import os

import pytest

import node
from node import RouterDeps, generate_text, register_llm_provider
from tests.fakes.providers import SeedStyleProvider


def test_custom_provider_registered_with_a_lambda_is_used():
    class MyProvider:
        def generate(self, prompt, *, model_name=None, **kwargs):
            return "response"

    register_llm_provider("my_provider", lambda: MyProvider())
    assert generate_text("Your prompt", provider="my_provider") == "response"
    assert "my_provider" in node.list_llm_providers()
    # Registered in this process, so the default chain tries it first.
    assert generate_text("Your prompt") == "response"


def test_router_deps_shared_across_calls_share_the_cache():
    provider = SeedStyleProvider()
    register_llm_provider("my_provider", lambda: provider)
    deps = RouterDeps()
    response1 = generate_text("First", deps=deps)
    response2 = generate_text("Second", deps=deps)
    assert (response1, response2) == ("response", "response")
    assert provider.calls == 2
    assert generate_text("First", deps=deps) == "response"
    assert provider.calls == 2, "a repeat with the same deps is a cache hit"
    stats = deps.statistics()
    assert stats.cache["miss"] == 2 and stats.cache["memory"] == 1


def test_repeat_is_a_cache_hit_with_the_cid_key_strategy(monkeypatch):
    provider = SeedStyleProvider()
    register_llm_provider("my_provider", lambda: provider)
    monkeypatch.setitem(os.environ, "IPFS_ACCELERATE_PY_ROUTER_CACHE_KEY", "cid")
    first = node.complete("Your prompt")  # cache miss
    second = node.complete("Your prompt")  # cache hit (fast)
    assert (first.cache, second.cache) == ("miss", "memory")
    assert first.key == second.key and first.key.startswith("bafkrei")
    assert provider.calls == 1


def test_sha256_key_strategy_is_the_hex_digest_of_the_same_canonical_bytes(monkeypatch):
    import hashlib

    from protocols.canonical import request_bytes

    register_llm_provider("my_provider", lambda: SeedStyleProvider())
    monkeypatch.setenv("IPFS_ACCELERATE_PY_ROUTER_CACHE_KEY", "sha256")
    result = node.complete("Your prompt", provider="my_provider")
    canonical = request_bytes(task="generate", model="my_provider", prompt="Your prompt", params={})
    assert result.key == hashlib.sha256(canonical).hexdigest()


def test_response_cache_switch_off_means_every_call_runs(monkeypatch):
    provider = SeedStyleProvider()
    register_llm_provider("my_provider", lambda: provider)
    monkeypatch.setenv("IPFS_ACCELERATE_PY_ROUTER_RESPONSE_CACHE", "0")
    for _ in range(3):
        assert node.complete("Your prompt").cache == "bypass"
    assert provider.calls == 3


def test_provider_cache_switch_controls_instance_reuse(monkeypatch):
    made = []
    register_llm_provider("my_provider", lambda: made.append(SeedStyleProvider()) or made[-1])
    generate_text("a", cache="no-store")
    generate_text("b", cache="no-store")
    assert len(made) == 1, "instances are reused by default"
    monkeypatch.setenv("IPFS_ACCELERATE_PY_ROUTER_CACHE", "false")
    generate_text("c", cache="no-store")
    generate_text("d", cache="no-store")
    assert len(made) == 3, "with the provider cache off each call constructs a provider"


def test_generate_text_inside_trio_names_agenerate_text():
    import trio

    async def call():
        with pytest.raises(node.InvalidRequest, match="agenerate_text"):
            generate_text("x", provider="echo")
        assert await node.agenerate_text("x", provider="echo") == "echo: x"

    trio.run(call)
