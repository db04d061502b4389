"""Code written for the seed's router runs against `node` with only its import changed.

Each test states one behaviour the seed documents (its registry, its RouterDeps container,
provider discovery, cache keys, generation with a custom provider), in our own words.
"""

from __future__ import annotations

import threading
import time

import pytest

import node
from node import RouterDeps
from tests.fakes.providers import SeedStyleProvider


# -- names ------------------------------------------------------------------------------


def test_the_seed_names_are_exported():
    assert node.llm_router_available is True
    for name in ("generate_text", "get_llm_provider", "register_llm_provider", "RouterDeps",
                 "get_default_router_deps", "LLMProvider", "RemoteCacheProtocol", "builtin_provider",
                 "response_cache_key"):
        assert name in dir(node) and getattr(node, name) is not None


def test_any_object_with_generate_is_an_llm_provider():
    class Mine:
        def generate(self, prompt, *, model_name=None, **kwargs):
            return "x"

    class NotOne:
        def answer(self, prompt):
            return "x"

    assert isinstance(Mine(), node.LLMProvider)
    assert not isinstance(NotOne(), node.LLMProvider)
    assert isinstance(SeedStyleProvider(), node.LLMProvider)


def test_a_get_set_object_is_a_remote_cache():
    assert isinstance(DictRemote(), node.RemoteCacheProtocol)
    assert not isinstance(object(), node.RemoteCacheProtocol)


# -- RouterDeps as the seed's container ----------------------------------------------------


class DictRemote:
    """A remote cache with the seed's interface, counting calls; `fail=True` raises on every call."""

    def __init__(self, fail: bool = False) -> None:
        self.data: dict[str, object] = {}
        self.gets = self.sets = 0
        self.fail = fail

    def get(self, key):
        self.gets += 1
        if self.fail:
            raise ConnectionError("remote cache down")
        return self.data.get(key)

    def set(self, key, value):
        self.sets += 1
        if self.fail:
            raise ConnectionError("remote cache down")
        self.data[key] = value


def test_set_cached_then_get_cached_returns_the_value():
    deps = RouterDeps()
    assert deps.get_cached("client") is None
    assert deps.set_cached("client", "the client") == "the client"
    assert deps.get_cached("client") == "the client"
    assert deps.router_cache["client"] == "the client"


def test_an_empty_key_keeps_nothing():
    deps = RouterDeps()
    assert deps.set_cached("", 1) == 1 and deps.get_cached("") is None
    made = []
    assert deps.get_or_create("", lambda: made.append(1) or "v") == "v"
    assert deps.get_or_create("", lambda: made.append(1) or "v") == "v"
    assert made == [1, 1] and "" not in deps.router_cache


def test_router_cache_given_is_the_dict_shared():
    shared: dict[str, object] = {"manager": "preconfigured"}
    a, b = RouterDeps(router_cache=shared), RouterDeps(router_cache=shared)
    a.set_cached("client", 42)
    assert b.get_cached("client") == 42 and b.get_cached("manager") == "preconfigured"


def test_get_or_create_calls_the_factory_once_and_keeps_the_instance():
    deps = RouterDeps()
    made = []
    first = deps.get_or_create("manager", lambda: made.append(object()) or made[-1])
    second = deps.get_or_create("manager", lambda: made.append(object()) or made[-1])
    assert first is second and len(made) == 1


def test_get_or_create_runs_the_factory_once_when_50_threads_race_for_one_key():
    deps = RouterDeps()
    calls = 0
    calls_lock = threading.Lock()
    start = threading.Barrier(50)

    def slow_factory():
        nonlocal calls
        with calls_lock:
            calls += 1
        time.sleep(0.05)  # wide open window: a check-then-create would run this many times
        return object()

    results: list[object] = []

    def worker():
        start.wait(timeout=10)
        results.append(deps.get_or_create("shared", slow_factory))

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert calls == 1
    assert len(results) == 50 and all(r is results[0] for r in results)


def test_get_or_create_does_not_hold_other_keys_while_a_factory_runs():
    deps = RouterDeps()
    entered, release = threading.Event(), threading.Event()

    def blocking_factory():
        entered.set()
        release.wait(timeout=10)
        return "slow"

    t = threading.Thread(target=deps.get_or_create, args=("slow", blocking_factory))
    t.start()
    assert entered.wait(timeout=10)
    try:
        assert deps.get_or_create("fast", lambda: "fast") == "fast"  # not blocked behind "slow"
        assert deps.get_cached("slow") is None
    finally:
        release.set()
        t.join(timeout=10)
    assert deps.get_cached("slow") == "slow"


def test_a_factory_that_raises_keeps_nothing_and_the_next_call_retries():
    deps = RouterDeps()

    def broken():
        raise RuntimeError("no")

    with pytest.raises(RuntimeError, match="no"):
        deps.get_or_create("k", broken)
    assert deps.get_cached("k") is None
    assert deps.get_or_create("k", lambda: "ok") == "ok"


def test_get_cached_or_remote_falls_back_to_the_remote_cache_and_keeps_the_value():
    remote = DictRemote()
    remote.data["k"] = b"from afar"
    deps = RouterDeps(remote_cache=remote)
    assert deps.get_cached_or_remote("k") == b"from afar"
    assert deps.get_cached("k") == b"from afar"
    assert deps.get_cached_or_remote("k") == b"from afar" and remote.gets == 1, "second read is local"
    assert deps.get_cached_or_remote("absent") is None


def test_set_cached_and_remote_writes_both():
    remote = DictRemote()
    deps = RouterDeps(remote_cache=remote)
    assert deps.set_cached_and_remote("k", b"v") == b"v"
    assert deps.get_cached("k") == b"v" and remote.data["k"] == b"v"


def test_a_failing_remote_cache_is_best_effort(caplog):
    deps = RouterDeps(remote_cache=DictRemote(fail=True))
    assert deps.set_cached_and_remote("k", b"v") == b"v"
    assert deps.get_cached("k") == b"v"
    assert deps.get_cached_or_remote("other") is None
    assert "remote cache down" in caplog.text


def test_without_a_remote_cache_the_remote_variants_are_local():
    deps = RouterDeps()
    deps.set_cached_and_remote("k", 1)
    assert deps.get_cached_or_remote("k") == 1 and deps.get_cached_or_remote("x") is None


def test_backend_manager_is_none_in_a_plain_process_and_the_given_one_otherwise():
    assert RouterDeps().get_backend_manager() is None
    assert RouterDeps().get_backend_manager(purpose="router", load_balancing_strategy="round_robin") is None
    manager = object()
    assert RouterDeps(backend_manager=manager).get_backend_manager() is manager


def test_default_deps_is_a_singleton_until_replaced():
    first = node.get_default_router_deps()
    assert node.get_default_router_deps() is first
    mine = RouterDeps()
    node.set_default_router_deps(mine)
    try:
        assert node.get_default_router_deps() is mine
    finally:
        node.set_default_router_deps(None)
    assert node.get_default_router_deps() is not mine


def test_provider_instances_and_the_callers_instances_share_router_cache_without_clashing():
    deps = RouterDeps()
    deps.set_cached("echo", "my own thing named echo")
    assert node.generate_text("hi", provider="echo", deps=deps) == "echo: hi"
    assert deps.get_cached("echo") == "my own thing named echo"
    provider = deps.get_cached("provider:echo")
    assert provider is not None and provider.name == "echo"
    node.clear_llm_router_caches(deps=deps)
    assert deps.get_cached("provider:echo") is None
    assert deps.get_cached("echo") == "my own thing named echo", "clearing keeps the caller's instances"


# -- the registry -----------------------------------------------------------------------------


def test_a_registered_provider_is_returned_by_name_and_generates():
    class Upper:
        def generate(self, prompt, *, model_name=None, **kwargs):
            return f"reply to {prompt}".upper()

    node.register_llm_provider("upper", lambda: Upper())
    provider = node.get_llm_provider("upper")
    assert provider.generate("test prompt") == "REPLY TO TEST PROMPT"
    assert "upper" in node.list_llm_providers()


def test_registering_a_name_again_replaces_the_instance_in_use():
    node.register_llm_provider("versioned", lambda: _Fixed("one"))
    assert node.generate_text("p", provider="versioned", cache="no-cache") == "one"
    node.register_llm_provider("versioned", lambda: _Fixed("two"))
    assert node.generate_text("p", provider="versioned", cache="no-cache") == "two"


class _Fixed:
    def __init__(self, text: str) -> None:
        self.text = text

    def generate(self, prompt, *, model_name=None, **kwargs):
        return self.text


# -- provider discovery -------------------------------------------------------------------------


BUILTINS = ("codex_cli", "copilot_cli", "gemini_cli", "claude_code", "copilot_sdk", "openrouter",
            "openai_compatible", "hf_local", "echo", "mesh")


def test_builtin_provider_never_raises_and_returns_an_instance_only_when_ready(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no CLI tool can be found
    for var in ("OPENROUTER_API_KEY", "OPENAI_API_KEY", "ACCELMESH_PROVIDERS_OPENAI_COMPATIBLE_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    deps = RouterDeps()
    ready = {info.name: info.ready for info in node.describe_llm_providers(deps=deps)}
    for name in BUILTINS:
        provider = node.builtin_provider(name, deps=deps)
        if ready[name]:
            assert provider is not None and provider.name == name
        else:
            assert provider is None, name
    for tool in ("codex_cli", "copilot_cli", "gemini_cli", "claude_code"):
        assert node.builtin_provider(tool, deps=deps) is None, f"{tool} is not on PATH"
    assert node.builtin_provider("mesh", deps=deps) is None, "the mesh needs a daemon"
    assert node.builtin_provider("echo", deps=deps).generate("x") == "echo: x"


def test_builtin_provider_is_none_for_a_name_that_is_no_builtin():
    node.register_llm_provider("mine_only", lambda: _Fixed("m"))
    assert node.builtin_provider("mine_only") is None
    assert node.builtin_provider("no_such_provider") is None


# -- cache keys ------------------------------------------------------------------------------


def key(**overrides):
    args = dict(provider="test", model_name="gpt-4", prompt="test prompt", kwargs={"temperature": 0.7})
    args.update(overrides)
    return node.response_cache_key(**args)


def test_the_same_call_gives_the_same_key():
    assert key() == key()
    assert key().startswith("bafkrei")


def test_any_change_that_can_change_the_answer_changes_the_key():
    base = key()
    changed = [
        key(prompt="different prompt"),
        key(model_name="gpt-4o"),
        key(model_name=None),
        key(provider="other"),
        key(kwargs={"temperature": 0.8}),
        key(kwargs={"temperature": 0.7, "max_tokens": 10}),
        key(prompt=[{"role": "user", "content": "test prompt"}]),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_reserved_arguments_and_default_parameters_leave_the_key_alone():
    base = key(kwargs={})
    assert key(kwargs={"timeout": 5, "cache": "no-store", "request_id": "r1", "stream": True}) == base
    assert key(kwargs={"temperature": 0.0, "top_p": 1.0}) == base
    assert key(kwargs=None) == base


def test_the_key_is_the_one_the_router_uses_for_a_seed_style_provider():
    node.register_llm_provider("keyed", lambda: _Fixed("k"))
    for model, kwargs in ((None, {}), ("m1", {"max_tokens": 5}), ("m2", {"temperature": 0.3, "seed": 1})):
        result = node.complete("same prompt", provider="keyed", model_name=model, **kwargs)
        assert result.key == node.response_cache_key(provider="keyed", model_name=model, prompt="same prompt",
                                                      kwargs=kwargs)


def test_a_provider_s_default_model_keys_the_same_when_the_call_names_it():
    class WithDefault:
        default_model = "m-default"

        def generate(self, prompt, *, model_name=None, **kwargs):
            return "d"

    node.register_llm_provider("defaulted", lambda: WithDefault())
    result = node.complete("same prompt", provider="defaulted")
    assert result.key == node.response_cache_key(provider="defaulted", model_name="m-default", prompt="same prompt")
    assert result.key != node.response_cache_key(provider="defaulted", model_name=None, prompt="same prompt")


def test_the_key_follows_the_sha256_strategy(monkeypatch):
    monkeypatch.setenv("IPFS_ACCELERATE_PY_ROUTER_CACHE_KEY", "sha256")
    value = key()
    assert len(value) == 64 and int(value, 16) >= 0


def test_a_prompt_no_provider_can_take_is_refused():
    with pytest.raises(node.InvalidRequest, match="prompt must be"):
        key(prompt=123)


# -- generation ---------------------------------------------------------------------------------


def test_generate_text_with_a_custom_provider_returns_its_answer():
    class Mock:
        def generate(self, prompt, *, model_name=None, **kwargs):
            return f"Mock response: {prompt[:20]}..."

    node.register_llm_provider("mock", lambda: Mock())
    assert node.generate_text("Test prompt for mock provider", provider="mock") == \
        "Mock response: Test prompt for mock..."


async def test_a_daemon_s_deps_hand_out_its_backend_manager(tmp_path):
    import trio

    from tests.mesh.conftest import running_daemon

    with trio.fail_after(20):
        async with running_daemon(tmp_path) as daemon:
            manager = daemon.deps.get_backend_manager()
            assert manager is not None and manager is daemon.deps.get_provider("mesh", daemon.settings).manager
            assert manager.strategy == daemon.settings.load_balancing and manager.statistics().planned == 0
