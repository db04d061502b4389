"""Router core: resolution, ordered fallback, error aggregation, deadlines, request normalization."""

import pytest
import trio

import node
from node import RouterDeps
from node.config import load_settings
from node.errors import (
    AllProvidersFailed,
    DeadlineExceeded,
    InvalidRequest,
    ProviderAuthError,
    ProviderFailed,
    ProviderNotFound,
    ProviderUnavailable,
)
from node.providers.base import Readiness
from tests.fakes.providers import ScriptedProvider


def deps_with(*providers, **env):
    """RouterDeps whose fallback chain is exactly `providers`, in order."""
    for p in providers:
        node.register_llm_provider(p.name, lambda p=p: p)
    env = {"ACCELMESH_FALLBACK_ORDER": ",".join(p.name for p in providers), **env}
    return RouterDeps(settings=load_settings(env=env))


def test_first_ready_provider_answers():
    alice, bob = ScriptedProvider("alice"), ScriptedProvider("bob")
    result = node.complete("hi", deps=deps_with(alice, bob))
    assert (result.text, result.provider) == ("alice: hi", "alice")
    assert (alice.calls, bob.calls) == (1, 0)


def test_failure_falls_back_to_the_next_provider_in_order():
    alice = ScriptedProvider("alice", [ProviderFailed("alice", "boom")])
    bob = ScriptedProvider("bob", [ProviderAuthError("bob", "401")])
    carol = ScriptedProvider("carol")
    deps = deps_with(alice, bob, carol)
    result = node.complete("hi", deps=deps)
    assert result.provider == "carol"
    assert (alice.calls, bob.calls, carol.calls) == (1, 1, 1)
    assert deps.statistics().failures == {"alice": 1, "bob": 1}


def test_unready_providers_are_skipped_without_being_called():
    alice = ScriptedProvider("alice", ready=Readiness(False, "ALICE_API_KEY is not set"))
    bob = ScriptedProvider("bob")
    assert node.complete("hi", deps=deps_with(alice, bob)).provider == "bob"
    assert alice.calls == 0


def test_all_failed_lists_every_provider_and_its_cause_in_order():
    alice = ScriptedProvider("alice", [ProviderFailed("alice", "boom")])
    bob = ScriptedProvider("bob", ready=Readiness(False, "binary `bob` not on PATH"))
    carol = ScriptedProvider("carol", [RuntimeError("segfault-ish")])
    deps = deps_with(alice, bob, carol, ACCELMESH_FALLBACK_ORDER="alice,bob,ghost,carol")
    with pytest.raises(AllProvidersFailed) as info:
        node.complete("hi", deps=deps)
    names = [name for name, _ in info.value.attempts]
    assert names == ["alice", "bob", "ghost", "carol"]  # in chain order
    message = str(info.value)
    assert "alice: boom" in message
    assert "bob: not ready: binary `bob` not on PATH" in message
    assert "ghost: not installed" in message
    assert "carol: RuntimeError: segfault-ish" in message


def test_chain_skips_unregistered_names_and_unready_providers_with_reasons():
    env = {"ACCELMESH_FALLBACK_ORDER": "ghost,openrouter"}
    with pytest.raises(AllProvidersFailed) as info:
        node.complete("hi", deps=RouterDeps(settings=load_settings(env=env)))
    reasons = dict(info.value.attempts)
    assert reasons == {"ghost": "not installed", "openrouter": reasons["openrouter"]}
    assert reasons["openrouter"].startswith("not ready: no API key") and "OPENROUTER_API_KEY" in reasons["openrouter"]


def test_default_chain_follows_the_seed_order():
    from node.router import _chain

    assert _chain(load_settings(env={})) == [
        "openrouter", "codex_cli", "copilot_cli", "copilot_sdk", "gemini_cli", "claude_code", "hf_local"]


def test_enable_mesh_puts_mesh_first_in_the_chain():
    with pytest.raises(AllProvidersFailed) as info:
        env = {"ACCELMESH_ENABLE_MESH": "1", "ACCELMESH_FALLBACK_ORDER": "ghost"}
        node.complete("hi", deps=RouterDeps(settings=load_settings(env=env)))
    assert info.value.attempts[0][0] == "mesh"


def test_named_provider_is_the_only_one_tried_and_its_error_is_raised():
    alice = ScriptedProvider("alice", [ProviderAuthError("alice", "401 unauthorized")])
    bob = ScriptedProvider("bob")
    deps = deps_with(alice, bob)
    with pytest.raises(ProviderAuthError):
        node.complete("hi", provider="alice", deps=deps)
    assert bob.calls == 0


def test_configured_provider_acts_like_a_named_one():
    alice, bob = ScriptedProvider("alice"), ScriptedProvider("bob")
    deps = deps_with(alice, bob, ACCELMESH_PROVIDER="bob")
    assert node.complete("hi", deps=deps).provider == "bob"


def test_unknown_provider_lists_the_known_ones():
    node.register_llm_provider("alice", lambda: ScriptedProvider("alice"))
    with pytest.raises(ProviderNotFound) as info:
        node.generate_text("hi", provider="nope")
    assert "echo" in str(info.value) and "alice" in str(info.value)


def test_named_provider_that_is_not_ready_says_why():
    node.register_llm_provider("alice", lambda: ScriptedProvider("alice", ready=Readiness(False, "set ALICE_KEY")))
    with pytest.raises(ProviderUnavailable, match="set ALICE_KEY"):
        node.generate_text("hi", provider="alice")


def test_deadline_stops_the_chain():
    slow = ScriptedProvider("slow", [ProviderFailed("slow", "late")], latency=0.2)
    bob = ScriptedProvider("bob")
    with pytest.raises(DeadlineExceeded):
        node.complete("hi", deps=deps_with(slow, bob), timeout=0.1)
    assert bob.calls == 0


async def test_async_deadline_cancels_a_slow_provider():
    slow = ScriptedProvider("slow", latency=10.0)
    with trio.fail_after(5):
        with pytest.raises(DeadlineExceeded):
            await node.acomplete("hi", deps=deps_with(slow), timeout=0.2)
    assert slow.cancelled == 1


async def test_async_fallback_happens_before_the_first_chunk():
    alice = ScriptedProvider("alice", [ProviderFailed("alice", "boom")])
    bob = ScriptedProvider("bob")
    deps = deps_with(alice, bob)
    with trio.fail_after(5):
        chunks = [c async for c in node.astream_text("hello there", deps=deps)]
    assert "".join(chunks) == "bob: hello there" and len(chunks) > 1


async def test_async_failure_after_a_chunk_is_not_hidden_by_fallback():
    class FailsMidStream(ScriptedProvider):
        async def astream(self, request):
            yield "partial"
            raise ProviderFailed(self.name, "connection lost")

    alice, bob = FailsMidStream("alice"), ScriptedProvider("bob")
    deps = deps_with(alice, bob)
    seen = []
    with trio.fail_after(5), pytest.raises(ProviderFailed, match="connection lost"):
        async for chunk in node.astream_text("hi", deps=deps):
            seen.append(chunk)
    assert seen == ["partial"] and bob.calls == 0


def test_sync_stream_yields_chunks_in_order_and_closing_early_cancels():
    node.register_llm_provider("alice", lambda: ScriptedProvider("alice", chunks=4))
    chunks = list(node.stream_text("one two three", provider="alice"))
    assert "".join(chunks) == "alice: one two three" and len(chunks) >= 4
    iterator = node.stream_text("never finished", provider="echo", cache="no-cache")
    assert next(iterator) == "echo:"
    iterator.close()  # returns promptly: the worker loop is cancelled


def test_reserved_kwargs_never_reach_the_provider_nor_the_key():
    seen = []

    class Recorder:
        def generate(self, prompt, *, model_name=None, **kwargs):
            seen.append(kwargs)
            return "ok"

    node.register_llm_provider("rec", Recorder)
    a = node.complete("p", provider="rec", timeout=5, request_id="r1", stream=False, strategy="least_loaded",
                      on_peers=[], accelerator=None, cache="no-store", verify=1, extra=1)  # (constraints: below)
    b = node.complete("p", provider="rec", extra=1, cache="no-store")
    assert seen == [{"extra": 1}, {"extra": 1}]
    assert a.key == b.key and a.request_id == "r1"


def test_an_unknown_strategy_is_refused_naming_the_valid_ones():
    with pytest.raises(node.InvalidRequest, match="round_robin, least_loaded, power_of_two, weighted, cache_affinity"):
        node.complete("p", provider="echo", strategy="fastest")


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "2"])
def test_verify_must_be_a_whole_number_of_nodes(k):
    with pytest.raises(node.InvalidRequest, match="verify must be"):
        node.complete("p", provider="echo", verify=k)


def test_verify_above_one_needs_the_mesh_and_a_named_local_provider_says_so():
    with pytest.raises(node.ProviderUnavailable, match="verify=3: only the mesh asks several nodes"):
        node.complete("p", provider="echo", verify=3)
    assert node.complete("p", provider="echo", verify=1).text == "echo: p"  # one node agrees with itself


def test_spelled_out_defaults_keep_the_key_and_real_parameters_change_it():
    base = node.complete("p", provider="echo").key
    assert node.complete("p", provider="echo", temperature=0, top_p=1.0, stop=[]).key == base
    assert node.complete("p", provider="echo", max_tokens=5).key != base
    assert node.complete("p", provider="echo", temperature=0.5, seed=1).key != base


def test_key_covers_the_model_identity_so_providers_never_share_answers():
    node.register_llm_provider("alice", lambda: ScriptedProvider("alice"))
    echo, alice = node.complete("same", provider="echo"), node.complete("same", provider="alice")
    assert echo.key != alice.key and (echo.cache, alice.cache) == ("miss", "miss")
    assert alice.text == "alice: same"
    assert node.complete("same", provider="alice", model_name="other").key != alice.key


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"stop": [1]}, "stop"),
        ({"cache": "sometimes"}, "cache mode"),
        ({"timeout": -1}, "timeout"),
        ({"weird": object()}, "weird"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_bad_arguments_raise_invalid_request(kwargs, match):
    with pytest.raises(InvalidRequest, match=match):
        node.generate_text("hi", provider="echo", **kwargs)


def test_chat_messages_are_a_chat_request_and_echo_answers_the_last_user_message():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
    ]
    result = node.complete(messages, provider="echo")
    assert result.text == "echo: second"
    assert node.complete("second", provider="echo").key != result.key
    with pytest.raises(InvalidRequest, match="messages"):
        node.generate_text([{"role": "user"}], provider="echo")


def test_get_and_describe_providers():
    node.register_llm_provider("alice", lambda: ScriptedProvider("alice", ready=Readiness(False, "no key")))
    infos = {info.name: info for info in node.describe_llm_providers()}
    assert infos["echo"].ready and infos["echo"].models == ("echo",)
    assert not infos["alice"].ready and infos["alice"].reason == "no key"
    assert node.get_llm_provider("echo").name == "echo"


class OnDevice(ScriptedProvider):
    def __init__(self, name: str, kind: str | None) -> None:
        super().__init__(name)
        self.kind = kind

    def accelerator(self):
        return self.kind


def test_on_peers_is_only_honoured_by_the_mesh_never_by_a_local_fallback():
    deps = deps_with(ScriptedProvider("local_a"), ScriptedProvider("local_b"))
    with pytest.raises(AllProvidersFailed, match="only the mesh chooses who serves") as info:
        node.generate_text("x", on_peers=["12D3KooWAnyone"], deps=deps)
    assert "local_a" in str(info.value) and "local_b" in str(info.value)
    with pytest.raises(ProviderUnavailable, match="only the mesh"):
        node.generate_text("x", provider="local_a", on_peers="12D3KooWAnyone", deps=deps)
    assert node.generate_text("x", deps=deps) == "local_a: x"  # unconstrained: as before


def test_accelerator_keeps_the_providers_on_that_kind_of_device():
    gpu, cpu, api = OnDevice("on_gpu", "cuda"), OnDevice("on_cpu", "cpu"), OnDevice("an_api", None)
    deps = deps_with(api, gpu, cpu)
    assert node.complete("x", accelerator="cpu", deps=deps).provider == "on_cpu"
    assert node.complete("x", accelerator="cuda", deps=deps).provider == "on_gpu"
    assert node.complete("x", deps=deps).provider == "an_api"
    with pytest.raises(AllProvidersFailed, match="does not compute on a local mps"):
        node.generate_text("x", accelerator="mps", deps=deps)
    with pytest.raises(ProviderUnavailable, match="computes on cuda, not cpu"):
        node.generate_text("x", provider="on_gpu", accelerator="cpu", deps=deps)
    assert api.calls == 1 and gpu.calls == 1 and cpu.calls == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"accelerator": "gpu"}, "accelerator must be one of cuda, rocm, mps, cpu"),
    ({"on_peers": [1, 2]}, "on_peers must be"),
    ({"on_peers": {"a": 1}}, "on_peers must be"),
])
def test_constraints_are_checked(kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        node.generate_text("x", provider="echo", **kwargs)


def test_the_accelerator_kinds_agree_everywhere():
    from node.accelerators import KINDS
    from node.providers.base import ACCELERATOR_KINDS
    from protocols.advert.messages import ACCELERATOR_KINDS as ADVERTISED
    from protocols.inference.messages import Request

    requested = Request.__dataclass_fields__["accelerator"].metadata["spec"].choices
    assert KINDS == ACCELERATOR_KINDS == ADVERTISED == requested


def test_the_error_tree_in_node_errors_names_every_runtime_error():
    import node.cache
    import node.errors
    import node.mesh.errors  # noqa: F401  (its errors: ClusterBusy, RemoteError)

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    ours = {c for c in subclasses(node.errors.AccelmeshError)
            if c.__module__ == "node.errors" or c.__module__.startswith(("node.cache", "node.mesh"))}
    assert node.cache.StoreError in ours
    tree = node.errors.__doc__
    missing = sorted(c.__name__ for c in ours if f"── {c.__name__} " not in tree)
    assert missing == [], f"node/errors.py's tree lacks {missing}"


# ---------------------------------------------------------------------------------------
# arun: an already-built request, its admission slot and local_only passed explicitly


class RecordingSlot:
    """The admission slot's interface as the router and the mesh use it (node.providers.base.AdmissionSlot)."""

    def __init__(self) -> None:
        self.held = False
        self.times_held = 0
        self.handed_off = 0
        self.taken_back = 0

    async def take_back(self) -> None:
        self.taken_back += 1

    def local(self):
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def held():
            assert not self.held, "the slot was taken twice"
            self.held, self.times_held = True, self.times_held + 1
            try:
                yield
            finally:
                self.held = False

        return held()

    def hand_off(self) -> None:
        self.handed_off += 1


class SeesItsSlot(ScriptedProvider):
    """Records, for each call, the slot it got and whether the router held that slot meanwhile."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.seen = []

    async def astream(self, request):
        self.seen.append((request.slot, request.slot is not None and request.slot.held))
        if self.routes_remotely and request.slot is not None:
            request.slot.hand_off()  # as the mesh does while another node serves
        async for item in super().astream(request):
            yield item


class RemoteSeesItsSlot(SeesItsSlot):
    routes_remotely = True


async def collect(request, **kw):
    from contextlib import aclosing

    with trio.fail_after(5):
        async with aclosing(node.router.arun(request, **kw)) as items:
            return [item async for item in items]


def built(prompt="hi", **kwargs):
    return node.router.build_request(prompt, model_name=None, kwargs=kwargs)


async def test_arun_yields_chunks_then_exactly_one_result_for_a_built_request():
    alice = ScriptedProvider("alice", chunks=3)
    items = await collect(built("one two three", cache="no-cache"), provider=None, deps=deps_with(alice))
    chunks, result = items[:-1], items[-1]
    assert all(isinstance(c, str) for c in chunks) and len(chunks) >= 3
    assert isinstance(result, node.router.Result) and "".join(chunks) == result.text == "alice: one two three"


async def test_arun_holds_the_slot_around_a_local_provider_and_hands_it_to_the_provider():
    local, slot = SeesItsSlot("local_a"), RecordingSlot()
    await collect(built(), provider="local_a", deps=deps_with(local), slot=slot)
    assert local.seen == [(slot, True)]
    assert (slot.times_held, slot.held, slot.handed_off) == (1, False, 0)


async def test_arun_holds_no_slot_for_a_remote_provider_which_gets_it_to_hand_off():
    remote, slot = RemoteSeesItsSlot("remote_a"), RecordingSlot()
    await collect(built(), provider="remote_a", deps=deps_with(remote), slot=slot)
    assert remote.seen == [(slot, False)]
    assert (slot.times_held, slot.handed_off) == (0, 1)


async def test_a_cache_hit_holds_no_slot():
    local, slot = SeesItsSlot("local_a"), RecordingSlot()
    deps = deps_with(local)
    await collect(built(), provider="local_a", deps=deps, slot=slot)
    items = await collect(built(), provider="local_a", deps=deps, slot=slot)
    assert items[-1].cache == "memory" and slot.times_held == 1 and local.calls == 1


async def test_without_a_slot_nothing_is_held_and_the_provider_gets_none():
    local = SeesItsSlot("local_a")
    await collect(built(), provider="local_a", deps=deps_with(local))
    assert local.seen == [(None, False)]


def test_no_context_variable_steers_a_request_anywhere_in_node():
    """Slots and hop rules travel as arguments (arun's slot= and local_only=), never invisibly."""
    import pathlib

    sources = pathlib.Path(node.__file__).parent.rglob("*.py")
    offenders = [str(p) for p in sources if "ContextVar(" in p.read_text()]
    assert offenders == []


async def test_local_only_skips_providers_that_route_remotely_with_the_hop_limit_reason():
    remote, local = RemoteSeesItsSlot("remote_a"), SeesItsSlot("local_a")
    deps = deps_with(remote, local)
    items = await collect(built(), provider=None, deps=deps, local_only=True)
    assert items[-1].provider == "local_a" and remote.calls == 0
    assert (await collect(built(), provider=None, deps=deps))[-1].provider == "remote_a"  # not local_only: first

    only_remote = deps_with(RemoteSeesItsSlot("remote_b"))
    with pytest.raises(AllProvidersFailed, match="served by local providers only") as info:
        await collect(built(), provider=None, deps=only_remote, local_only=True)
    assert list(info.value.attempts) == [
        ("remote_b", "a request forwarded by another node is served by local providers only (hop limit)")]


async def test_local_only_refuses_a_named_remote_provider_as_unavailable():
    remote = RemoteSeesItsSlot("remote_a")
    with pytest.raises(ProviderUnavailable, match=r"served by local providers only \(hop limit\)"):
        await collect(built(), provider="remote_a", deps=deps_with(remote), local_only=True)
    assert remote.calls == 0


async def test_closing_arun_early_releases_the_slot_and_cancels_the_provider():
    from contextlib import aclosing

    slow, slot = ScriptedProvider("slow", latency=10.0), RecordingSlot()
    deps = deps_with(slow)
    with trio.fail_after(5):
        async with aclosing(node.router.arun(built(), provider="slow", deps=deps, slot=slot)) as items:
            with trio.move_on_after(0.1):
                async for _ in items:
                    pass
    assert slow.cancelled == 1 and not slot.held and len(deps.inflight) == 0
