"""Every cache mode, sampled requests, the remote cache, and exact counts under 32 threads."""

import threading

import pytest
import trio

import node
from node import RouterDeps
from node.cache import LocalStore, MemoryCache, TieredCache
from node.config import load_settings
from node.errors import CacheMiss
from tests.fakes.providers import ScriptedProvider


@pytest.fixture
def alice():
    provider = ScriptedProvider("alice")
    node.register_llm_provider("alice", lambda: provider)
    return provider


def run(prompt="p", **kw):
    return node.complete(prompt, provider="alice", **kw)


def test_default_mode_stores_then_hits(alice):
    assert run().cache == "miss"
    assert run().cache == "memory"
    assert alice.calls == 1


def test_no_store_reads_but_never_writes(alice):
    assert run(cache="no-store").cache == "miss"
    assert run(cache="no-store").cache == "miss"
    assert alice.calls == 2
    run()  # stores
    assert run(cache="no-store").cache == "memory"


def test_no_cache_skips_lookups_but_stores(alice):
    run()
    assert run(cache="no-cache").cache == "bypass"
    assert alice.calls == 2
    assert run().cache == "memory"


def test_only_if_cached_never_runs_a_provider(alice):
    with pytest.raises(CacheMiss) as info:
        run(cache="only-if-cached")
    assert alice.calls == 0 and info.value.key.startswith("bafkrei")
    run()
    assert run(cache="only-if-cached").cache == "memory" and alice.calls == 1


def test_sampled_requests_are_not_cached(alice):
    assert run(temperature=0.7).cache == "bypass"
    assert run(temperature=0.7).cache == "bypass"
    assert alice.calls == 2


def test_sampled_request_with_a_seed_is_deterministic_and_cached(alice):
    assert run(temperature=0.7, seed=3).cache == "miss"
    assert run(temperature=0.7, seed=3).cache == "memory"


def test_force_caches_even_a_sampled_request(alice):
    assert run(temperature=0.7, cache="force").cache == "miss"
    assert run(temperature=0.7, cache="force").cache == "memory"
    assert run(temperature=0.7).cache == "bypass", "without force a sampled request never reads the cache"


def test_private_behaves_like_default_locally_and_never_publishes(alice):
    remote = DictRemoteCache()
    deps = RouterDeps(remote_cache=remote)
    assert run(cache="private", deps=deps).cache == "miss"
    assert run(cache="private", deps=deps).cache == "memory"
    assert remote.data == {}
    run("q", deps=deps)
    assert len(remote.data) == 1


def test_cache_true_and_false_map_to_default_and_no_cache(alice):
    run()
    assert run(cache=True).cache == "memory"
    assert run(cache=False).cache == "bypass"


class DictRemoteCache:
    """The seed's remote-cache protocol: sync get/set of bytes."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.gets = 0

    def get(self, key):
        self.gets += 1
        return self.data.get(key)

    def set(self, key, value):
        self.data[key] = value


def test_remote_cache_hit_is_the_cluster_tier_and_is_kept_locally(alice):
    remote = DictRemoteCache()
    first = run(deps=RouterDeps(remote_cache=remote))
    assert remote.data == {first.key: remote.data[first.key]}
    other = RouterDeps(remote_cache=remote)  # a second process sharing the remote cache
    second = run(deps=other)
    assert (second.cache, second.cid, second.text) == ("cluster", first.cid, first.text)
    assert run(deps=other).cache == "memory"
    assert alice.calls == 1


def test_remote_cache_garbage_or_wrong_model_is_ignored(alice):
    remote = DictRemoteCache()
    key = run(cache="no-store").key
    remote.data[key] = b"\xc1 not msgpack"
    assert run(deps=RouterDeps(remote_cache=remote)).cache == "miss"
    echo_bytes = remote.data[node.complete("p", provider="echo", deps=RouterDeps(remote_cache=remote)).key]
    remote.data[key] = echo_bytes  # a valid response, for another model
    assert run(deps=RouterDeps(remote_cache=remote)).cache == "miss"


async def test_async_remote_cache_is_called_in_a_thread(alice):
    remote = DictRemoteCache()
    calling_threads = []
    original_get = remote.get

    class Recording(DictRemoteCache):
        def get(self, key):
            calling_threads.append(threading.current_thread())
            return original_get(key)

    recording = Recording()
    recording.data = remote.data
    with trio.fail_after(5):
        await node.acomplete("p", provider="alice", deps=RouterDeps(remote_cache=recording))
    assert calling_threads and calling_threads[0] is not threading.main_thread()


def test_deps_without_caches_create_a_bounded_memory_cache_and_keep_it(alice):
    deps = RouterDeps()
    assert deps.response_cache is None
    run(deps=deps)
    cache = deps.response_cache
    assert isinstance(cache, MemoryCache) and cache.max_entries == 4096
    run(deps=deps)
    assert deps.response_cache is cache and alice.calls == 1


def test_seed_style_dict_response_cache_works(alice):
    store: dict = {}
    deps = RouterDeps(response_cache=store)
    first = run(deps=deps)
    assert list(store) == [first.key]
    assert run(deps=deps).cache == "memory"


def test_data_dir_store_survives_a_new_deps(alice, tmp_path):
    def deps():
        return RouterDeps(response_cache=TieredCache(MemoryCache(), LocalStore(tmp_path / "c.sqlite")))

    first = run(deps=deps())
    second = run(deps=deps())
    assert (first.cache, second.cache, second.cid) == ("miss", "local", first.cid)


def test_32_threads_by_1000_calls_give_exact_hit_and_miss_counts():
    provider = ScriptedProvider("alice")
    node.register_llm_provider("alice", lambda: provider)
    deps = RouterDeps(settings=load_settings(env={}))
    prompts = [f"prompt {i}" for i in range(50)]
    errors = []
    barrier = threading.Barrier(32)

    def worker(t: int) -> None:
        try:
            barrier.wait(timeout=30)
            for i in range(1000):
                assert node.generate_text(prompts[(t + i) % 50], provider="alice", deps=deps) == \
                    f"alice: {prompts[(t + i) % 50]}"
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    stats = deps.statistics()
    assert provider.calls == 50, "identical concurrent requests ran once each (single flight)"
    assert stats.cache["miss"] == 50 and stats.cache["memory"] == 32 * 1000 - 50
    assert stats.inferences == 50 and stats.in_flight == 0


async def test_concurrent_identical_async_requests_run_once():
    provider = ScriptedProvider("alice", latency=0.05)
    node.register_llm_provider("alice", lambda: provider)
    deps = RouterDeps()
    results = []

    async def one():
        results.append(await node.acomplete("same", provider="alice", deps=deps))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
    assert provider.calls == 1
    assert sorted(r.cache for r in results) == ["memory"] * 19 + ["miss"]
