"""Every stateful object in node/ exposes `statistics()` as a frozen snapshot dataclass and a `__repr__`
(STYLE.md section 7, trio's shape).

The classes are found by reading node/'s source, so a new `statistics()` is checked without
anyone listing it here. Each one's return annotation must resolve to a frozen dataclass (and so
must any dataclass among its fields' types). Each class is then built cheaply and its
`statistics()` called: the snapshot is an instance of the annotated class and cannot be changed.
A class found but neither built below nor listed in `NOT_BUILT` fails the test, so nothing is
skipped silently. (Subclasses that inherit `statistics()`, such as the CLI providers, share the
defining class's method and annotation; one of them stands in for `CLIProvider`.)
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _classes_defining_statistics() -> list[str]:
    found = []
    for path in sorted((ROOT / "node").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == "statistics"
                for item in node.body
            ):
                found.append(f"{module}.{node.name}")
    return found


CLASSES = _classes_defining_statistics()


def _load(qualname: str) -> type:
    module, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def _dataclasses_in(hint: Any) -> Iterator[type]:
    """The dataclass types a type hint names: itself, or inside a union, Optional or a container."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        yield hint
    for arg in typing.get_args(hint):
        yield from _dataclasses_in(arg)


def _assert_frozen_dataclass(cls: Any, where: str) -> None:
    assert isinstance(cls, type) and dataclasses.is_dataclass(cls), f"{where}: {cls!r} is not a dataclass"
    assert cls.__dataclass_params__.frozen, f"{where}: {cls.__name__} is not frozen"  # type: ignore[attr-defined]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        for inner in _dataclasses_in(hints[f.name]):
            _assert_frozen_dataclass(inner, f"{where}.{f.name}")


def _snapshot_class(qualname: str) -> type:
    method = _load(qualname).statistics  # type: ignore[attr-defined]
    hint = typing.get_type_hints(method).get("return")
    assert hint is not None, f"{qualname}.statistics() has no return annotation"
    _assert_frozen_dataclass(hint, f"{qualname}.statistics()")
    return hint  # type: ignore[no-any-return]


# -- cheap instances, one per class found ---------------------------------------------------


def _settings() -> Any:
    from node.config import load_settings

    return load_settings(env={})


def _local_store(tmp_path: Path, stack: contextlib.ExitStack) -> Any:
    from node.cache.store import LocalStore

    store = LocalStore(tmp_path / "store.sqlite3")
    stack.callback(store.close)
    return store


def _stream_pool(tmp_path: Path, stack: contextlib.ExitStack) -> Any:
    from node.mesh.pool import StreamPool
    from node.mesh.streams import StreamLimits

    return StreamPool(None, StreamLimits())  # no host needed until a stream is opened


def _mesh_provider(tmp_path: Path, stack: contextlib.ExitStack) -> Any:
    from node.mesh.provider import MeshProvider

    async def run_local(request: Any, slot: Any) -> Any:  # never called here
        yield ""

    return MeshProvider(peer_id="12D3KooWself", manager=_manager(tmp_path, stack), run_local=run_local,
                        pool=_stream_pool(tmp_path, stack))


def _block_exchange(tmp_path: Path, stack: contextlib.ExitStack) -> Any:
    from node.cache.exchange import BlockExchange
    from node.mesh.streams import StreamLimits

    return BlockExchange(None, StreamLimits(), lambda cid: None)  # opens nothing until asked to fetch


def _cluster_cache(tmp_path: Path, stack: contextlib.ExitStack) -> Any:
    from node.cache.cluster import ClusterCache
    from protocols.records import Identity

    return ClusterCache(dht=None, fetch=None, identity=Identity.generate(), penalise=lambda peer: None)  # type: ignore[arg-type]


def _cluster_dht(tmp_path: Path, stack: contextlib.ExitStack) -> Any:
    from node.mesh.dht import ClusterDHT

    from node.mesh.host import HostConfig, make_host
    from protocols.records import Identity

    host = make_host(HostConfig(identity=Identity.generate(), listen=()))  # not started: nothing listens
    return ClusterDHT(host, is_member=lambda peer: True)  # starts nothing until run()


def _manager(tmp_path: Path, stack: contextlib.ExitStack) -> Any:
    from node.mesh.manager import BackendManager

    return BackendManager(list, clock=lambda: 0.0)  # trio's clock needs a running loop


def _backend(tmp_path: Path, stack: contextlib.ExitStack) -> Any:
    from node.mesh.health import HealthPolicy
    from node.mesh.manager import Backend

    return Backend("12D3KooWpeer", HealthPolicy())


def _tiered_cache(tmp_path: Path, stack: contextlib.ExitStack) -> Any:
    from node.cache.memory import MemoryCache
    from node.cache.tiered import TieredCache

    return TieredCache(MemoryCache(), _local_store(tmp_path, stack))


Factory = Callable[[Path, contextlib.ExitStack], Any]  # (a scratch dir, what to close afterwards) -> an instance


def _build(name: str) -> Factory:
    """A factory for classes whose constructor needs nothing but the defaults, the settings or a path."""

    def make(tmp_path: Path, stack: contextlib.ExitStack) -> Any:
        if name == "node.admission.Admission":
            from node.admission import Admission

            return Admission(max_concurrent=2, max_queue=4)
        if name == "node.cache.memory.MemoryCache":
            from node.cache.memory import MemoryCache

            return MemoryCache()
        if name == "node.deps.RouterDeps":
            from node.deps import RouterDeps

            return RouterDeps(settings=_settings())
        if name == "node.idempotency.RecentRequests":
            from node.idempotency import RecentRequests

            return RecentRequests()
        if name == "node.mesh.adverts.PeerTable":
            from node.mesh.adverts import PeerTable

            return PeerTable("12D3KooWself", ttl=30.0)
        if name == "node.mesh.health.BackendHealth":
            from node.mesh.health import BackendHealth

            return BackendHealth()
        if name == "node.mesh.streams.StreamGuard":
            from node.mesh.streams import StreamGuard, StreamLimits

            return StreamGuard(StreamLimits())
        if name == "node.remote.Client":
            from node.remote import Client

            return Client(data_dir=tmp_path, peer=None, identity=None, cluster_key=None)  # connects on first use
        if name == "node.providers.cli_base.CLIProvider":
            from node.providers.codex_cli import CodexCLIProvider

            return CodexCLIProvider.from_settings(_settings())  # runs nothing until asked to generate
        module, _, cls = name.rpartition(".")
        return getattr(importlib.import_module(module), cls).from_settings(_settings())

    return make


FACTORIES: dict[str, Factory] = {
    **{name: _build(name) for name in (
        "node.admission.Admission",
        "node.cache.memory.MemoryCache",
        "node.deps.RouterDeps",
        "node.mesh.adverts.PeerTable",
        "node.mesh.health.BackendHealth",
        "node.mesh.streams.StreamGuard",
        "node.remote.Client",
        "node.providers.cli_base.CLIProvider",
        "node.providers.echo.EchoProvider",
        "node.providers.copilot_sdk.CopilotSDKProvider",
        "node.providers.hf_local.HFLocalProvider",  # loads nothing (no torch) until a request comes
        "node.providers.embed.EmbedProvider",  # likewise
    )},
    "node.cache.store.LocalStore": _local_store,
    "node.cache.tiered.TieredCache": _tiered_cache,
    "node.mesh.pool.StreamPool": _stream_pool,
    "node.mesh.provider.MeshProvider": _mesh_provider,
    "node.mesh.manager.BackendManager": _manager,
    "node.mesh.manager.Backend": _backend,
    "node.idempotency.RecentRequests": _build("node.idempotency.RecentRequests"),
    "node.cache.exchange.BlockExchange": _block_exchange,
    "node.cache.cluster.ClusterCache": _cluster_cache,
    "node.mesh.dht.ClusterDHT": _cluster_dht,
    "node.providers.hf_batching.Batcher": lambda tmp_path, stack: _load("node.providers.hf_batching.Batcher")(
        None, None, concurrency=4, max_batch_tokens=0, max_length=64),  # starts nothing until start()
}

# Classes too heavy to build in a unit test, with the reason: only their annotation is checked.
NOT_BUILT: dict[str, str] = {}


def test_the_walk_finds_the_known_stateful_classes():
    assert len(CLASSES) >= 14, CLASSES
    assert {"node.providers.echo.EchoProvider", "node.cache.tiered.TieredCache",
            "node.mesh.provider.MeshProvider"} <= set(CLASSES)


@pytest.mark.parametrize("qualname", CLASSES)
def test_statistics_is_annotated_as_a_frozen_dataclass(qualname):
    _snapshot_class(qualname)


@pytest.mark.parametrize("qualname", CLASSES)
def test_statistics_returns_a_frozen_snapshot_and_repr_is_informative(qualname, tmp_path):
    assert (qualname in FACTORIES) != (qualname in NOT_BUILT), (
        f"{qualname} defines statistics(): add a cheap factory to FACTORIES in this file, "
        f"or list it in NOT_BUILT with the reason"
    )
    if qualname in NOT_BUILT:
        return  # its annotation is checked by the test above
    from node.providers.base import BaseProvider

    expected = _snapshot_class(qualname)
    with contextlib.ExitStack() as stack:
        obj = FACTORIES[qualname](tmp_path, stack)
        assert isinstance(obj, _load(qualname))
        snapshot = obj.statistics()
        assert type(snapshot) is expected, f"{qualname}.statistics() returned {type(snapshot).__name__}"
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(snapshot, dataclasses.fields(snapshot)[0].name, None)
        # the class's own __repr__ (or its base's below BaseProvider), not a generic one
        defined = next(c for c in type(obj).__mro__ if "__repr__" in vars(c))
        assert defined not in (object, BaseProvider), f"{qualname} has no informative __repr__"
        assert repr(obj).startswith("<"), repr(obj)


def test_tiered_cache_statistics_nest_each_tiers_own_snapshot(tmp_path):
    from node.cache.memory import MemoryCache, MemoryCacheStatistics
    from node.cache.store import StoreStatistics
    from node.cache.tiered import TieredCache
    from protocols.cid import cid_of

    memory_only = TieredCache(MemoryCache()).statistics()
    assert isinstance(memory_only.memory, MemoryCacheStatistics) and memory_only.local is None
    assert memory_only.to_json() == {"memory": dataclasses.asdict(memory_only.memory)}, "no local key without a store"
    with contextlib.ExitStack() as stack:
        cache = _tiered_cache(tmp_path, stack)
        cache.store("key-a", b"answer", cid_of(b"answer"))
        assert cache.lookup("key-a") is not None
        s = cache.statistics()
        assert isinstance(s.local, StoreStatistics) and s.local.blocks == 1
        assert (s.memory.entries, s.memory.hits) == (1, 1)
        assert set(s.to_json()) == {"memory", "local"} and s.to_json()["local"]["blocks"] == 1


def test_echo_statistics_count_answers():
    from node.providers.base import ProviderRequest
    from node.providers.echo import EchoProvider, EchoStatistics

    provider = EchoProvider(latency_ms=(1.0, 2.0), concurrency=3, word_delay_ms=2.5)
    provider.complete_sync(ProviderRequest(task="generate", prompt="hi", messages=None, model=None))
    assert provider.statistics() == EchoStatistics(served=1, concurrency=3, latency_ms=(1.0, 2.0), failure_rate=0.0,
                                                   word_delay_ms=2.5)
    assert repr(provider) == "<EchoProvider served=1 concurrency=3 latency_ms=1-2 failure_rate=0 word_delay_ms=2.5>"


def test_mesh_statistics_are_a_copy(tmp_path):
    provider = _mesh_provider(tmp_path, contextlib.ExitStack())
    provider.served_by["12D3KooWpeer"] = 2
    s = provider.statistics()
    provider.served_by["12D3KooWpeer"] = 3
    assert s.served_by == {"12D3KooWpeer": 2} and s.to_json() == {"served_by": {"12D3KooWpeer": 2}, "hedged": 0}
    assert "served_by={'KooWpeer': 3}" in repr(provider)
