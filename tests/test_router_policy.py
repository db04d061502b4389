"""The router's pure policy over its whole table, and the sync and trio shells agreeing on every error."""

import functools
import itertools
import time

import pytest
import trio

import node
from node import RouterDeps
from node.config import load_settings
from node.errors import (
    AllProvidersFailed,
    CacheMiss,
    DeadlineExceeded,
    InvalidRequest,
    ProviderAuthError,
    ProviderFailed,
    ProviderTimeout,
)
from node.providers.base import Completion, Readiness
from node.router import CACHE_MODES, CachePolicy, cache_policy
from tests.fakes.providers import ScriptedProvider

# Every argument cache_policy can get: mode x sampled x response cache enabled x routes remotely x remote cache.
TABLE = [
    (mode, sampled, enabled, remote, remote_cache)
    for mode, sampled, enabled, remote, remote_cache
    in itertools.product(CACHE_MODES, (False, True), (False, True), (False, True), (False, True))
]


def policy(mode, sampled, enabled, remote, remote_cache) -> CachePolicy:
    return cache_policy(mode, sampled=sampled, enabled=enabled, routes_remotely=remote, remote_cache=remote_cache)


def test_the_table_has_every_combination():
    assert len(TABLE) == len(CACHE_MODES) * 2**4 == 96
    assert all(isinstance(policy(*row), CachePolicy) for row in TABLE)


# What each mode does for a local provider with the cache on (INTERFACES.md "Cache modes"), written
# out: (lookup, store) for a deterministic request, then for a sampled one (temperature, no seed).
MODES = {
    "default":        ((True, True),   (False, False)),
    "no-store":       ((True, False),  (False, False)),
    "no-cache":       ((False, True),  (False, False)),
    "only-if-cached": ((True, False),  (True, False)),   # a forced sampled answer may be found
    "force":          ((True, True),   (True, True)),    # caches even a sampled request
    "private":        ((True, True),   (False, False)),  # stored locally, never published
}


def test_each_mode_looks_up_and_stores_as_documented_for_a_local_provider():
    assert set(MODES) == set(CACHE_MODES)
    for mode, sampled, enabled, remote, remote_cache in TABLE:
        if enabled and not remote:
            p = policy(mode, sampled, enabled, remote, remote_cache)
            assert (p.lookup, p.store) == MODES[mode][sampled], (mode, sampled, remote_cache)


def test_with_the_response_cache_off_nothing_is_looked_up_stored_published_or_coalesced():
    for row in TABLE:
        p, enabled = policy(*row), row[2]
        if not enabled:
            assert not (p.lookup or p.store or p.publish or p.coalesce), row


def test_a_provider_that_routes_remotely_never_looks_up_here_but_stores_as_a_local_one_would():
    for mode, sampled, enabled, _, remote_cache in TABLE:
        remote = policy(mode, sampled, enabled, True, remote_cache)
        local = policy(mode, sampled, enabled, False, remote_cache)
        assert not remote.lookup and not remote.coalesce and not remote.only_cached
        assert (remote.store, remote.publish) == (local.store, local.publish)


def test_only_if_cached_answers_a_miss_with_cache_miss_unless_another_node_serves():
    for row in TABLE:
        mode, _, _, remote, _ = row
        assert policy(*row).only_cached == (mode == "only-if-cached" and not remote), row


def test_publish_only_what_is_stored_to_a_configured_remote_cache_and_never_private():
    for row in TABLE:
        mode, _, _, _, remote_cache = row
        p = policy(*row)
        assert p.publish == (p.store and remote_cache and mode != "private"), row


def test_coalesce_exactly_when_the_answer_waited_for_is_stored_and_looked_up():
    for row in TABLE:
        p = policy(*row)
        assert p.coalesce == (p.lookup and p.store), row


def test_the_remote_cache_does_not_change_lookups_or_stores():
    for mode, sampled, enabled, remote, _ in TABLE:
        with_cache, without = (policy(mode, sampled, enabled, remote, rc) for rc in (True, False))
        assert (with_cache.lookup, with_cache.store, with_cache.coalesce, with_cache.only_cached) == (
            without.lookup, without.store, without.coalesce, without.only_cached)
        assert not without.publish


def test_an_unknown_cache_mode_is_refused():
    with pytest.raises(InvalidRequest, match="cache mode 'sometimes'"):
        cache_policy("sometimes", sampled=False, enabled=True, routes_remotely=False, remote_cache=False)


def test_the_policy_is_a_frozen_value():
    p = policy("default", False, True, False, True)
    assert p == CachePolicy(lookup=True, store=True, publish=True, coalesce=True, only_cached=False, share=True)
    with pytest.raises(AttributeError):
        p.lookup = False  # type: ignore[misc]


# ---------------------------------------------------------------------------------------
# The two shells: the same steps must give the same outcome, error for error.


def sync_shell(prompt, **kw):
    return node.complete(prompt, **kw)


def trio_shell(prompt, **kw):
    async def main():
        with trio.fail_after(10):
            return await node.acomplete(prompt, **kw)

    return trio.run(main)


SHELLS = pytest.mark.parametrize("answer", [sync_shell, trio_shell], ids=["sync", "trio"])


def deps_with(*providers, **env):
    for p in providers:
        node.register_llm_provider(p.name, lambda p=p: p)
    env = {"ACCELMESH_FALLBACK_ORDER": ",".join(p.name for p in providers), **env}
    return RouterDeps(settings=load_settings(env=env))


class TimesOutAtItsDeadline(ScriptedProvider):
    """Works (blocking, so no cancel scope intervenes) until the time it was given is spent, then
    raises `ProviderTimeout`, as an HTTP client with the request's timeout does."""

    def _late(self, request):
        self.calls += 1
        time.sleep(request.timeout + 0.01)
        raise ProviderTimeout(self.name, f"no answer within {request.timeout:.2f} s")

    def complete_sync(self, request):
        self._late(request)

    async def astream(self, request):
        self._late(request)
        yield  # pragma: no cover - an async generator that raises before its first item


class RoutesRemotely(ScriptedProvider):
    routes_remotely = True


@SHELLS
def test_a_provider_timeout_at_the_deadline_is_the_requests_deadline_exceeded_on_both_shells(answer):
    late, bob = TimesOutAtItsDeadline("late"), ScriptedProvider("bob")
    deps = deps_with(late, bob)
    with pytest.raises(DeadlineExceeded) as info:
        answer("hi", deps=deps, timeout=0.1)
    assert isinstance(info.value.__cause__, ProviderTimeout)
    assert (late.calls, bob.calls) == (1, 0)
    assert deps.statistics().failures == {"late": 1}
    with pytest.raises(DeadlineExceeded) as info:  # named: the same
        answer("hi", provider="late", deps=deps, timeout=0.1)
    assert isinstance(info.value.__cause__, ProviderTimeout)


@SHELLS
def test_a_provider_timeout_before_the_deadline_falls_back_on_both_shells(answer):
    alice = ScriptedProvider("alice", [ProviderTimeout("alice", "upstream timed out")])
    bob = ScriptedProvider("bob")
    deps = deps_with(alice, bob)
    assert answer("hi", deps=deps, timeout=30).provider == "bob"
    assert deps.statistics().failures == {"alice": 1}


@SHELLS
def test_all_providers_failed_lists_the_same_causes_in_chain_order_on_both_shells(answer):
    alice = ScriptedProvider("alice", [ProviderFailed("alice", "boom")])
    bob = ScriptedProvider("bob", ready=Readiness(False, "no key"))
    carol = ScriptedProvider("carol", [RuntimeError("segfault-ish")])
    deps = deps_with(alice, bob, carol, ACCELMESH_FALLBACK_ORDER="alice,bob,ghost,carol")
    with pytest.raises(AllProvidersFailed) as info:
        answer("hi", deps=deps)
    assert [(name, str(cause)) for name, cause in info.value.attempts] == [
        ("alice", str(ProviderFailed("alice", "boom"))),
        ("bob", "not ready: no key"),
        ("ghost", "not installed"),
        ("carol", str(ProviderFailed("carol", "RuntimeError: segfault-ish"))),
    ]


@SHELLS
def test_a_named_providers_error_is_raised_as_it_is_on_both_shells(answer):
    alice, bob = ScriptedProvider("alice", [ProviderAuthError("alice", "401")]), ScriptedProvider("bob")
    with pytest.raises(ProviderAuthError, match="401"):
        answer("hi", provider="alice", deps=deps_with(alice, bob))
    assert bob.calls == 0


@SHELLS
def test_cache_tiers_and_counts_are_the_same_on_both_shells(answer):
    alice = ScriptedProvider("alice")
    deps = deps_with(alice)
    first, second = answer("p", deps=deps), answer("p", deps=deps)
    assert (first.cache, second.cache, first.key, first.cid) == ("miss", "memory", second.key, second.cid)
    assert answer("p", deps=deps, cache="no-cache").cache == "bypass"
    assert alice.calls == 2 and deps.statistics().inferences == 2


@SHELLS
def test_only_if_cached_raises_cache_miss_here_but_lets_a_remote_provider_ask_on_both_shells(answer):
    alice, mesh = ScriptedProvider("alice"), RoutesRemotely("remote_mesh")
    deps = deps_with(alice, mesh)
    with pytest.raises(CacheMiss):
        answer("p", provider="alice", deps=deps, cache="only-if-cached")
    assert answer("p", provider="remote_mesh", deps=deps, cache="only-if-cached").provider == "remote_mesh"
    assert (alice.calls, mesh.calls) == (0, 1)


def test_both_shells_share_one_single_flight():
    """A sync caller waits for a trio caller's identical request (and reads its answer) instead of
    running the provider again."""
    trio_started = None

    class Slow(ScriptedProvider):
        async def astream(self, request):
            trio_started.set()
            await trio.sleep(0.3)
            async for item in super().astream(request):
                yield item

    slow = Slow("slow")
    deps = deps_with(slow)

    async def main():
        nonlocal trio_started
        trio_started = trio.Event()
        results = {}

        async def by_trio():
            results["trio"] = await node.acomplete("same", provider="slow", deps=deps)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(by_trio)
                await trio_started.wait()
                results["sync"] = await trio.to_thread.run_sync(
                    functools.partial(node.complete, "same", provider="slow", deps=deps))
        return results

    results = trio.run(main)
    assert slow.calls == 1
    assert (results["trio"].cache, results["sync"].cache) == ("miss", "memory")
    assert results["trio"].cid == results["sync"].cid


def test_sync_shell_runs_no_event_loop_for_a_provider_with_a_sync_path():
    class NoLoop(ScriptedProvider):
        def complete_sync(self, request):
            with pytest.raises(RuntimeError):
                trio.lowlevel.current_task()  # not inside any trio loop
            return Completion(f"{self.name}: {request.text}")

    assert node.complete("hi", deps=deps_with(NoLoop("plain"))).text == "plain: hi"
