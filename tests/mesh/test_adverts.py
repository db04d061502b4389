"""Capability adverts: the peer table's rules (pure), accelerator parsers, and convergence on real hosts."""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import aclosing
from types import SimpleNamespace

import pytest
import trio
from libp2p.peer.id import ID

from node.accelerators import Accelerator, detect, detect_cpu, parse_nvidia_smi, parse_rocm_smi
from node.client import DaemonClient
from node.mesh.adverts import LoadPublisher, PeerTable, load_bucket
from protocols.advert.messages import TOPIC, decode_advert, encode_advert, verified_advert, verify_advert
from protocols.codec import encode
from protocols.inference.messages import Request
from protocols.records import Identity
from tests.mesh.conftest import connect, peer_host, running_daemon
from tests.protocols.test_messages import make_advert

alice, bob, mallory = (Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3))


class Clock:
    def __init__(self) -> None:
        self.wall = 1_800_000_000.0

    def __call__(self) -> float:
        return self.wall


def table(ttl: float = 30.0) -> tuple[PeerTable, Clock]:
    clock = Clock()
    return PeerTable(bob.peer_id, ttl, wall=clock), clock


def advert_bytes(identity=alice, *, seq=1, clock: Clock | None = None, **kw) -> bytes:
    created = int((clock.wall if clock else 1_800_000_000.0) * 1000)
    return encode_advert(make_advert(identity, seq=seq, created=created, **kw))


# -- the peer table (pure) ----------------------------------------------------------------------


def test_a_valid_advert_is_taken_and_a_newer_one_replaces_it():
    t, clock = table()
    assert t.offer(advert_bytes(seq=1, clock=clock), now=0.0).seq == 1
    assert t.offer(advert_bytes(seq=2, clock=clock), now=1.0).seq == 2
    assert len(t) == 1 and t.get(alice.peer_id).advert.seq == 2
    assert t.statistics().accepted == 2


def test_mallory_forging_alices_advert_is_refused():
    t, clock = table()
    forged = dataclasses.replace(make_advert(mallory, created=int(clock.wall * 1000)), peer_id=alice.peer_id)
    assert t.offer(encode(forged), 0.0) is None
    assert t.rejected["forged"] == 1 and alice.peer_id not in t


def test_a_tampered_advert_is_refused():
    t, clock = table()
    good = make_advert(alice, created=int(clock.wall * 1000))
    assert t.offer(encode(dataclasses.replace(good, capacity=10**6)), 0.0) is None
    assert t.rejected["bad_signature"] == 1


def test_a_replayed_older_advert_is_refused_and_a_copy_is_a_duplicate():
    t, clock = table()
    old, new = advert_bytes(seq=1, clock=clock), advert_bytes(seq=2, clock=clock)
    t.offer(new, 0.0)
    assert t.offer(old, 1.0) is None and t.rejected["replayed"] == 1
    assert t.offer(new, 2.0) is None and t.duplicates == 1 and t.rejected["replayed"] == 1
    assert t.get(alice.peer_id).advert.seq == 2


def test_an_advert_from_a_future_major_version_is_refused():
    t, clock = table()
    assert t.offer(advert_bytes(protocol="2.0", clock=clock), 0.0) is None
    assert t.rejected["unsupported_version"] == 1
    assert t.offer(advert_bytes(protocol="1.3", clock=clock), 0.0) is not None  # a newer minor is fine


def test_expired_and_own_adverts_are_refused():
    t, clock = table()
    clock.wall += 600
    assert t.offer(advert_bytes(), 0.0) is None and t.rejected["expired"] == 1
    assert t.offer(advert_bytes(bob, clock=clock), 0.0) is None and t.rejected["own"] == 1


def test_silent_peers_leave_after_ttl_on_our_own_clock():
    t, clock = table(ttl=30.0)
    t.offer(advert_bytes(alice, clock=clock), now=100.0)
    t.offer(advert_bytes(mallory, clock=clock), now=110.0)
    assert t.expire(now=130.0) == [] and len(t) == 2  # exactly at the ttl: kept
    assert t.expire(now=130.5) == [alice.peer_id] and len(t) == 1
    assert t.statistics().expired == 1


def test_a_relayed_copy_does_not_keep_a_silent_peer_alive():
    t, clock = table(ttl=30.0)
    data = advert_bytes(alice, clock=clock)
    t.offer(data, now=100.0)
    for now in (110.0, 120.0, 129.0):  # the same advert again, from relays (pulls, answers to GetAdvert)
        assert t.offer(data, now) is None
    assert t.duplicates == 3
    assert t.expire(now=130.0) == [] and t.expire(now=130.5) == [alice.peer_id]  # ttl after it first arrived
    t.offer(advert_bytes(alice, seq=2, clock=clock), now=131.0)  # only a new advert renews
    assert t.expire(now=160.0) == [] and t.expire(now=161.5) == [alice.peer_id]


def test_an_expired_peer_is_not_brought_back_by_its_last_advert_relayed_again():
    t, clock = table(ttl=30.0)
    last = advert_bytes(alice, seq=7, clock=clock)
    t.offer(last, now=100.0)
    assert t.expire(now=131.0) == [alice.peer_id]
    assert t.offer(last, now=132.0) is None and alice.peer_id not in t, "a survivor's copy of the dead peer's advert"
    assert t.offer(advert_bytes(alice, seq=6, clock=clock), now=133.0) is None  # nor an older one
    assert t.offer(advert_bytes(alice, seq=8, clock=clock), now=134.0).seq == 8  # a new one: it is back
    assert t.expire(now=165.0) == [alice.peer_id]
    clock.wall += 3600  # long after that advert could verify anywhere: the memory of it goes
    t.expire(now=4000.0)
    assert t._gone == {}


def test_no_entry_outlives_its_adverts_own_expiry():
    t, clock = table(ttl=600.0)  # a long ttl here; the advert says it expires 90 s after creation
    t.offer(advert_bytes(alice, clock=clock), now=0.0)
    assert t.expire(now=150.0) == []  # 90 s + the 60 s clock-skew allowance verify_advert grants
    assert t.expire(now=150.5) == [alice.peer_id]


def test_table_statistics_and_repr():
    t, clock = table()
    t.offer(advert_bytes(clock=clock), 0.0)
    t.offer(b"garbage", 0.0)
    s = t.statistics()
    assert (s.peers, s.accepted, s.rejected) == (1, 1, {"malformed": 1})
    assert "1 peers" in repr(t) and "malformed" in repr(t)


def test_peer_entry_json_has_the_contract_shape():
    t, clock = table()
    t.offer(advert_bytes(clock=clock), 0.0)
    entry = t.get(alice.peer_id).to_json()
    assert set(entry) >= {"peer_id", "addrs", "providers", "accelerators", "load", "last_seen"}
    assert "health" not in entry, "the backend manager adds health and latency (node.control.peers)"
    assert entry["providers"][0] == {"name": "echo", "tasks": ["generate", "chat"], "models": ["echo"], "ready": True,
                                     "capacity": None,  # a 1.0 advert: unlimited, said as null
                                     "identities": {}, "default_model": None}  # and no identity known, no default


@pytest.mark.parametrize("n,bucket", [(0, 0), (1, 1), (2, 2), (3, 2), (4, 3), (7, 3), (8, 4), (64, 7)])
def test_load_buckets(n, bucket):
    assert load_bucket(n) == bucket


def test_load_is_republished_on_a_bucket_change_at_most_once_per_interval():
    loads = LoadPublisher(min_interval=1.0)
    assert not loads.due(0, 0, now=0.0)
    assert loads.due(1, 0, now=0.0)
    loads.mark(1, 0, now=0.0)
    assert not loads.due(1, 0, now=5.0), "no change, no advert"
    assert not loads.due(5, 0, now=0.5), "changed, but inside the interval"
    assert loads.due(5, 0, now=1.0)
    loads.mark(5, 0, now=1.0)
    assert not loads.due(6, 0, now=9.0), "4..7 is one bucket"
    assert loads.due(6, 3, now=9.0)


# -- this node's advert: built within the wire's bounds (pure) ------------------------------------


def build(**kw):
    from protocols.advert.messages import ProviderEntry

    fields = dict(addrs=[f"/ip4/127.0.0.1/tcp/4001/p2p/{alice.peer_id}"],
                  providers=[ProviderEntry("echo", ("generate",), ("echo",), True)],
                  accelerators=[Accelerator("cpu", "x86_64", 1 << 34, 1 << 33, cores=2)], capacity=4, queue=16,
                  load=(1, 2), ttl=90.0, seq=7, software="accelmesh/0.1.0", created=int(time.time() * 1000))
    fields.update(kw)
    from node.mesh.adverts import build_advert

    advert = build_advert(alice, **fields)
    verify_advert(advert, int(time.time() * 1000))  # signed, current, and every field within its bound
    assert decode_advert(encode_advert(advert))[0] == advert
    return advert


def test_a_built_advert_is_signed_and_carries_what_it_was_given():
    created = int(time.time() * 1000)
    advert = build(created=created)
    assert (advert.peer_id, advert.seq, advert.capacity, advert.queue) == (alice.peer_id, 7, 4, 16)
    assert (advert.load.in_flight, advert.load.queued) == (1, 2)
    assert advert.expires == created + 90_000 and advert.software == "accelmesh/0.1.0"
    assert advert.accelerators[0].cores == 2 and advert.providers[0].models == ("echo",)


def test_provider_capacities_are_kept_and_those_the_wire_cannot_carry_are_left_out_as_unlimited():
    from protocols.advert.messages import MAX_CAPACITY, ProviderEntry

    caps = [1, 4, MAX_CAPACITY, None, MAX_CAPACITY + 1, 0, -1, True]
    advert = build(providers=[ProviderEntry(f"p{i}", ("generate",), (), True, c) for i, c in enumerate(caps)])
    assert [p.capacity for p in advert.providers] == [1, 4, MAX_CAPACITY, None, None, None, None, None]
    assert advert.protocol == "1.2"


def test_addresses_beyond_the_bounds_are_left_out():
    from protocols.advert.messages import MAX_ADDR_CHARS, MAX_ADDRS

    at_limit, over = "/dns4/" + "a" * (MAX_ADDR_CHARS - 6), "/dns4/" + "a" * (MAX_ADDR_CHARS - 5)
    assert len(at_limit) == MAX_ADDR_CHARS
    assert build(addrs=[over, at_limit]).addrs == (at_limit,)
    many = [f"/ip4/10.0.0.{i}/tcp/4001" for i in range(MAX_ADDRS + 1)]
    assert build(addrs=many).addrs == tuple(many[:MAX_ADDRS])


def test_providers_and_models_beyond_the_bounds_are_left_out_not_cut():
    from protocols.advert.messages import (
        MAX_MODEL_NAME_CHARS,
        MAX_MODELS,
        MAX_PROVIDER_NAME_CHARS,
        MAX_PROVIDERS,
        ProviderEntry,
    )

    named = [ProviderEntry("p" * (MAX_PROVIDER_NAME_CHARS + 1), (), (), True),
             ProviderEntry("p" * MAX_PROVIDER_NAME_CHARS, (), (), True)]
    assert [p.name for p in build(providers=named).providers] == ["p" * MAX_PROVIDER_NAME_CHARS]
    many = [ProviderEntry(f"p{i}", ("generate",), (), True) for i in range(MAX_PROVIDERS + 1)]
    assert [p.name for p in build(providers=many).providers] == [f"p{i}" for i in range(MAX_PROVIDERS)]
    models = ("é" * (MAX_MODEL_NAME_CHARS + 1), "é" * MAX_MODEL_NAME_CHARS,  # characters, not bytes
              *(f"m{i}" for i in range(MAX_MODELS)))
    (entry,) = build(providers=[ProviderEntry("hf", ("generate",), models, True)]).providers
    assert entry.models == models[1:MAX_MODELS + 1]


def test_accelerators_beyond_the_bound_are_left_out_and_long_device_names_cut():
    from protocols.advert.messages import MAX_ACCELERATOR_NAME_CHARS, MAX_ACCELERATORS

    gpus = [Accelerator("cuda", "G" * (MAX_ACCELERATOR_NAME_CHARS + 1), 1 << 30, 1 << 29, index=i)
            for i in range(MAX_ACCELERATORS + 1)]
    advert = build(accelerators=gpus)
    assert [a.index for a in advert.accelerators] == list(range(MAX_ACCELERATORS))
    assert {a.name for a in advert.accelerators} == {"G" * MAX_ACCELERATOR_NAME_CHARS}


def test_the_builder_reads_its_sources_each_time_an_advert_is_signed():
    from node.mesh.adverts import AdvertBuilder
    from protocols.advert.messages import ProviderEntry

    offer = [ProviderEntry("echo", ("generate",), ("echo",), False)]
    load = [(0, 0)]
    builder = AdvertBuilder(alice, addrs=lambda: [f"/ip4/127.0.0.1/tcp/4001/p2p/{alice.peer_id}"],
                            offer=lambda: list(offer), accelerators=lambda: [Accelerator("cpu", "x", 1, 1, cores=1)],
                            load=lambda: load[0], capacity=2, queue=8, ttl=30.0, software="accelmesh/0.1.0",
                            wall=lambda: 1_800_000_000.0)
    first = builder(1)
    assert (first.seq, first.created, first.expires) == (1, 1_800_000_000_000, 1_800_000_030_000)
    assert builder.offer_signature() == [("echo", False, ("echo",), (), None)]
    offer[0], load[0] = ProviderEntry("echo", ("generate",), ("echo",), True), (3, 1)
    second = builder(2)
    assert second.providers[0].ready and (second.load.in_flight, second.load.queued) == (3, 1)
    assert builder.offer_signature() == [("echo", True, ("echo",), (), None)]


def test_the_local_offer_lists_every_provider_but_the_mesh_and_one_that_fails_as_not_ready():
    from node.mesh.adverts import local_offer
    from protocols.advert.messages import ProviderEntry
    from tests.fakes.providers import ScriptedProvider

    def get_provider(name):
        if name == "broken":
            raise RuntimeError("cannot build")
        return ScriptedProvider(name)

    assert local_offer(["echo", "mesh", "broken"], get_provider) == [
        ProviderEntry("echo", tuple(ScriptedProvider.tasks), ("echo-model",), True, None, ("echo/echo-model",),
                      "echo-model"),
        ProviderEntry("broken", (), (), False),
    ]


def test_the_local_offer_carries_each_providers_own_capacity():
    from node.mesh.adverts import local_offer
    from node.providers.echo import EchoProvider
    from tests.fakes.providers import ScriptedProvider

    providers = {"capped": EchoProvider(concurrency=3), "uncapped": EchoProvider(concurrency=0),
                 "scripted": ScriptedProvider("scripted")}
    offer = local_offer(list(providers), providers.__getitem__)
    assert {p.name: p.capacity for p in offer} == {"capped": 3, "uncapped": None, "scripted": None}


def test_the_local_offer_says_each_models_identity_only_when_known_without_loading_anything():
    from node.mesh.adverts import local_offer
    from node.providers.echo import EchoProvider
    from node.providers.hf_local import HFLocalProvider
    from tests.fakes.providers import ScriptedProvider

    class Mute(ScriptedProvider):
        def advertised_identity(self, model):
            raise RuntimeError("cannot tell")

    hf = HFLocalProvider()
    providers = {"echo": EchoProvider(), "hf_local": hf, "mute": Mute("mute")}
    offer = {p.name: p for p in local_offer(list(providers), providers.__getitem__)}
    assert (offer["echo"].identities, offer["echo"].default_model) == (("echo",), "echo")
    assert (offer["hf_local"].models, offer["hf_local"].identities) == (("accelmesh-tiny",), ("",))
    assert offer["hf_local"].default_model == "accelmesh-tiny" and hf._loaded == {}, "no weights loaded or read"
    assert (offer["mute"].ready, offer["mute"].identities) == (True, ("",)), "offered, its identity not known"
    known = hf.model_identity(None)  # what keying a request (or loading the model) learns
    assert known.startswith("hf_local/accelmesh-tiny@sha256:")
    assert local_offer(["hf_local"], providers.__getitem__)[0].identities == (known,)


def test_an_identity_becoming_known_changes_the_offer_signature_so_it_is_published_at_once():
    from node.mesh.adverts import AdvertBuilder
    from protocols.advert.messages import ProviderEntry

    offer = [ProviderEntry("hf_local", ("generate",), ("tiny",), True, 1, ("",), "tiny")]
    builder = AdvertBuilder(alice, addrs=lambda: [], offer=lambda: list(offer),
                            accelerators=lambda: [Accelerator("cpu", "x", 1, 1, cores=1)], load=lambda: (0, 0),
                            capacity=2, queue=8, ttl=30.0, software="accelmesh/0.1.0", wall=lambda: 1_800_000_000.0)
    before = builder.offer_signature()
    offer[0] = dataclasses.replace(offer[0], identities=("hf_local/tiny@sha256:" + "ab" * 16,))
    assert builder.offer_signature() != before
    assert builder(2).providers[0].identities == ("hf_local/tiny@sha256:" + "ab" * 16,)


def test_identities_follow_their_models_and_those_the_wire_cannot_carry_are_sent_as_unknown():
    from protocols.advert.messages import MAX_MODEL_IDENTITY_CHARS, MAX_MODEL_NAME_CHARS, MAX_MODELS, ProviderEntry

    long_name, at, over = "m" * (MAX_MODEL_NAME_CHARS + 1), "i" * MAX_MODEL_IDENTITY_CHARS, \
        "i" * (MAX_MODEL_IDENTITY_CHARS + 1)
    models = ("a", long_name, "b", "c", *(f"m{i}" for i in range(MAX_MODELS)))
    identities = ("id-a", "id-long", at, over, *(f"id-m{i}" for i in range(MAX_MODELS)))
    (entry,) = build(providers=[ProviderEntry("hf", ("generate",), models, True, None, identities,
                                              long_name)]).providers
    assert entry.models == ("a", "b", "c", *(f"m{i}" for i in range(MAX_MODELS - 3)))
    assert entry.identities == ("id-a", at, "", *(f"id-m{i}" for i in range(MAX_MODELS - 3))), \
        "the left-out model takes its identity along; one too long is not known, never cut"
    assert entry.default_model is None, "a default model the wire cannot carry is not said"
    (older,) = build(providers=[ProviderEntry("echo", ("generate",), ("echo", "x"), True)]).providers
    assert (older.identities, older.default_model) == (("", ""), None), "a 1.2 sender always says them"


def _mismatched_advert(identity: Identity, clock: Clock) -> bytes:
    """A correctly signed advert whose echo entry lists one model and two identities: only a
    hand-built map can say that (ProviderEntry refuses to be built so)."""
    import msgpack

    from protocols.records import DOMAIN_ADVERT

    fields = make_advert(identity, created=int(clock.wall * 1000), protocol="1.2", echo_identities=("echo",),
                         echo_default_model="echo").to_dict()
    fields["providers"][0]["identities"] = ["echo", "echo/other"]
    del fields["signature"]
    fields["signature"] = identity.sign(DOMAIN_ADVERT, fields)
    return msgpack.packb(fields, use_bin_type=True)


def test_mallorys_advert_with_more_identities_than_models_is_refused_by_the_table_and_the_gossip_validator():
    from node.mesh.adverts import AdvertService

    t, clock = table()
    data = _mismatched_advert(mallory, clock)
    assert t.offer(data, 0.0) is None and mallory.peer_id not in t
    assert t.rejected["malformed"] == 1
    service = AdvertService(None, None, t, lambda seq: None, interval=60, load_interval=5, load=lambda: (0, 0),
                            load_changed=trio.Event, is_member=lambda peer: True)

    assert service._validate_gossip(None, SimpleNamespace(data=data)) is False, "gossipsub does not relay it"
    assert t.rejected["malformed"] == 2
    good = advert_bytes(mallory, clock=clock, protocol="1.2", echo_identities=("echo",), echo_default_model="echo")
    assert t.offer(good, 1.0).providers[0].identities == ("echo",)  # the same advert with one identity per model


# -- accelerators -----------------------------------------------------------------------------------


# A two-GPU nvidia-smi answer in the shape recorded on a real H200 host (tests/fixtures/gpu/, checked in
# test_accelerators_recorded.py): `nvidia-smi --query-gpu=index,name,memory.total,memory.free
# --format=csv,noheader,nounits` (MiB). The rocm-smi answer is constructed from its documentation (no
# AMD GPU was available): `rocm-smi --showproductname --showmeminfo vram --json` (bytes, as strings).
NVIDIA_SMI = "0, NVIDIA H100 80GB HBM3, 81559, 80918\n1, NVIDIA H100 80GB HBM3, 81559, 1024\n"
ROCM_SMI = ('{"card0": {"Card series": "Instinct MI300X", "Card model": "0x74a1", '
            '"VRAM Total Memory (B)": "206141652992", "VRAM Total Used Memory (B)": "10485760"}, '
            '"system": {"Driver version": "6.7.0"}}')


def test_nvidia_smi_output_is_parsed_per_device():
    devices = parse_nvidia_smi(NVIDIA_SMI)
    assert devices == [
        Accelerator("cuda", "NVIDIA H100 80GB HBM3", 81559 * 2**20, 80918 * 2**20, 0),
        Accelerator("cuda", "NVIDIA H100 80GB HBM3", 81559 * 2**20, 1024 * 2**20, 1),
    ]
    assert parse_nvidia_smi("garbage line\n") == []


def test_rocm_smi_output_is_parsed_per_card():
    assert parse_rocm_smi(ROCM_SMI) == [
        Accelerator("rocm", "Instinct MI300X", 206141652992, 206141652992 - 10485760, 0)]
    assert parse_rocm_smi("not json") == []


def test_torch_is_asked_only_where_a_gpu_driver_or_mps_could_answer(tmp_path):
    from node.accelerators import torch_could_find_gpus

    assert not torch_could_find_gpus(str(tmp_path), "Linux")
    assert torch_could_find_gpus(str(tmp_path), "Darwin")
    for node in ("nvidiactl", "kfd", "dxg"):
        (tmp_path / node).touch()
        assert torch_could_find_gpus(str(tmp_path), "Linux")
        (tmp_path / node).unlink()


GiB = 1 << 30


def test_accelerator_detection_runs_once_and_rereads_only_free_memory_at_most_every_10_s():
    from node.accelerators import AcceleratorDetector

    now = [0.0]
    detector = AcceleratorDetector(clock=lambda: now[0])
    first = detector()
    for t in (0.5, 5.0, 9.9):  # an advert per second under changing load: no detection at all
        now[0] = t
        assert detector() == first
    assert (detector.detections, detector.refreshes) == (1, 0)
    now[0] = 10.0
    again = detector()
    assert (detector.detections, detector.refreshes) == (1, 1)
    static = [(a.kind, a.name, a.memory_total, a.index, a.cores) for a in first]
    assert [(a.kind, a.name, a.memory_total, a.index, a.cores) for a in again] == static
    assert again[-1].kind == "cpu" and again[-1].memory_free > 0


class TorchCuda:
    """Stands in for `torch.cuda` (no GPU here): free memory per device, and who asked."""

    def __init__(self, fail: bool = False) -> None:
        self.asked: list[int] = []
        self.fail = fail

    def mem_get_info(self, index: int) -> tuple[int, int]:
        self.asked.append(index)
        if self.fail:
            raise RuntimeError("CUDA driver gone")
        return (5 * GiB + index, 140 * GiB)


def test_free_memory_is_reread_from_the_source_that_found_each_device():
    from node.accelerators import NVIDIA_FREE_QUERY, refresh_free_memory

    cpu = Accelerator("cpu", "Xeon", 24 * GiB, 20 * GiB, 0, cores=2)
    found = [(Accelerator("cuda", "NVIDIA H200", 140 * GiB, 139 * GiB, 0), "torch"),
             (Accelerator("cuda", "NVIDIA H200", 140 * GiB, 139 * GiB, 1), "torch"),
             (Accelerator("cuda", "NVIDIA H100 80GB HBM3", 81559 * 2**20, 80918 * 2**20, 1), "nvidia-smi"),
             (Accelerator("rocm", "Instinct MI300X", 206141652992, 1, 0), "rocm-smi"), (cpu, "cpu")]
    ran = []

    def run(tool, *args):
        ran.append((tool, args))
        return {"nvidia-smi": "0, 7\n1, 1024\n", "rocm-smi": ROCM_SMI}[tool]

    cuda = TorchCuda()
    out = refresh_free_memory(found, cuda=cuda, run=run, meminfo=lambda: (24 * GiB, 3 * GiB))
    assert [(a.kind, a.name, a.memory_total, a.index) for a, _ in out] == \
        [(a.kind, a.name, a.memory_total, a.index) for a, _ in found]
    assert [a.memory_free for a, _ in out] == [5 * GiB, 5 * GiB + 1, 1024 * 2**20, 206141652992 - 10485760, 3 * GiB]
    assert cuda.asked == [0, 1]
    assert ran == [("nvidia-smi", NVIDIA_FREE_QUERY), ("rocm-smi", ran[1][1])]  # one query per tool
    # a source that fails keeps the last values
    kept = refresh_free_memory(found, cuda=TorchCuda(fail=True), run=lambda *a: None, meminfo=lambda: (0, 0))
    assert [a.memory_free for a, _ in kept][:4] == [a.memory_free for a, _ in found][:4]


def test_nvidia_smi_free_memory_query_is_parsed():
    from node.accelerators import parse_nvidia_smi_free

    assert parse_nvidia_smi_free("0, 80918\n1, 1024\n") == {0: 80918 * 2**20, 1: 1024 * 2**20}
    assert parse_nvidia_smi_free("garbage\n0, lots\n") == {}


def test_the_cpu_is_always_detected_with_cores_and_memory():
    import os

    cpu = detect_cpu()
    assert cpu.kind == "cpu" and cpu.cores == os.cpu_count() and cpu.memory_total > cpu.memory_free > 0
    devices = detect()
    assert devices[-1].kind == "cpu" and all(d.kind in ("cuda", "rocm", "mps", "cpu") for d in devices)


# -- on real hosts -----------------------------------------------------------------------------------


FAST = {"ACCELMESH_ADVERTS_INTERVAL": "60"}  # long: convergence must not wait for the periodic advert


async def wait_until(predicate, timeout: float = 10.0) -> float:
    start = trio.current_time()
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
    return trio.current_time() - start


async def test_five_daemons_bootstrapped_from_one_converge(tmp_path):
    async with running_daemon(tmp_path, "n0", **FAST) as first:
        async with running_daemon(tmp_path, "n1", ACCELMESH_BOOTSTRAP=first.addrs()[0], **FAST) as n1, \
                running_daemon(tmp_path, "n2", ACCELMESH_BOOTSTRAP=first.addrs()[0], **FAST) as n2, \
                running_daemon(tmp_path, "n3", ACCELMESH_BOOTSTRAP=first.addrs()[0], **FAST) as n3, \
                running_daemon(tmp_path, "n4", ACCELMESH_BOOTSTRAP=first.addrs()[0], **FAST) as n4:
            nodes = [first, n1, n2, n3, n4]
            took = await wait_until(lambda: all(len(n.table) == 4 for n in nodes))
            assert took < 5.0
            for node in nodes:
                assert {e.advert.peer_id for e in node.table.entries()} == {n.peer_id for n in nodes} - {node.peer_id}


async def test_a_node_joining_late_learns_everyone_at_once(tmp_path):
    async with running_daemon(tmp_path, "n0", **FAST) as first, \
            running_daemon(tmp_path, "n1", ACCELMESH_BOOTSTRAP=first.addrs()[0], **FAST) as n1, \
            running_daemon(tmp_path, "n2", ACCELMESH_BOOTSTRAP=first.addrs()[0], **FAST) as n2:
        await wait_until(lambda: len(first.table) == 2)
        async with running_daemon(tmp_path, "late", ACCELMESH_BOOTSTRAP=first.addrs()[0], **FAST) as late:
            took = await wait_until(lambda: len(late.table) == 3)
            assert took < 2.0, "the late node asked its bootstrap peer for every advert it knows"
            assert {e.advert.peer_id for e in late.table.entries()} == {first.peer_id, n1.peer_id, n2.peer_id}


async def test_a_killed_node_expires(tmp_path):
    env = {"ACCELMESH_ADVERTS_TTL": "1.5", "ACCELMESH_ADVERTS_INTERVAL": "0.5"}
    async with running_daemon(tmp_path, "n0", **env) as first:
        async with running_daemon(tmp_path, "n1", ACCELMESH_BOOTSTRAP=first.addrs()[0], **env) as victim:
            await wait_until(lambda: victim.peer_id in first.table)
            victim.request_stop(force=True)
        await wait_until(lambda: victim.peer_id not in first.table, timeout=10)
        assert first.table.statistics().expired >= 1


async def test_load_changes_propagate(tmp_path):
    env = {"ACCELMESH_ADVERTS_LOAD_INTERVAL": "0.1", "ACCELMESH_ECHO_LATENCY_MS": "3000", **FAST}
    async with running_daemon(tmp_path, "n0", **env) as first, \
            running_daemon(tmp_path, "busy", ACCELMESH_BOOTSTRAP=first.addrs()[0], **env) as busy:
        await wait_until(lambda: busy.peer_id in first.table)
        assert first.table.get(busy.peer_id).advert.load.in_flight == 0

        async def slow_request():
            async with DaemonClient.connect(busy.data_dir) as client:
                request = Request(id="r", task="generate", prompt="x", provider="echo", timeout_ms=30_000)
                async with aclosing(client.generate(request)) as items:
                    async for _ in items:
                        pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_request)
            await wait_until(lambda: first.table.get(busy.peer_id).advert.load.in_flight == 1, timeout=5)
        await wait_until(lambda: first.table.get(busy.peer_id).advert.load.in_flight == 0, timeout=5)


def gossip(host):
    """mallory's own gossipsub, to publish whatever she likes on the advert topic."""
    from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
    from libp2p.pubsub.pubsub import Pubsub

    router = GossipSub(protocols=[PROTOCOL_ID_V11, PROTOCOL_ID], degree=6, degree_low=4, degree_high=12,
                       heartbeat_interval=1, spam_protection_enabled=False)
    return Pubsub(host, router), router


async def test_mallorys_gossip_never_enters_the_table(tmp_path):
    from libp2p.tools.anyio_service import background_trio_service

    async with running_daemon(tmp_path, "alice", **FAST) as daemon, peer_host(mallory) as host:
        pubsub, router = gossip(host)
        async with background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()
            await pubsub.subscribe(TOPIC)
            await connect(host, daemon)
            with trio.fail_after(10):
                await pubsub.wait_for_subscription(ID.from_base58(daemon.peer_id), TOPIC)
            # gossipsub sends a publish to the topic's mesh, which a heartbeat fills: wait for alice in it
            await wait_until(lambda: ID.from_base58(daemon.peer_id) in router.mesh.get(TOPIC, ()))
            now = int(time.time() * 1000)
            victim = Identity.generate()
            genuine_old = make_advert(victim, seq=1, created=now)
            genuine_new = make_advert(victim, seq=2, created=now)
            forged = dataclasses.replace(make_advert(mallory, created=now), peer_id=victim.peer_id)
            tampered = dataclasses.replace(genuine_new, capacity=10**6)
            future = make_advert(victim, seq=3, created=now, protocol="2.0")
            await pubsub.publish(TOPIC, encode(genuine_new))
            await wait_until(lambda: victim.peer_id in daemon.table)
            for data in (encode(forged), encode(tampered), encode(future), encode(genuine_old)):
                await pubsub.publish(TOPIC, data)
                await trio.sleep(0.05)
            await wait_until(lambda: sum(daemon.table.rejected.values()) >= 4)
            assert daemon.table.get(victim.peer_id).advert == genuine_new
            assert daemon.table.rejected["forged"] >= 1 and daemon.table.rejected["bad_signature"] >= 1
            assert daemon.table.rejected["unsupported_version"] >= 1 and daemon.table.rejected["replayed"] >= 1
            assert mallory.peer_id not in daemon.table  # mallory herself never advertised


async def test_a_change_in_what_a_node_offers_is_published_at_once(tmp_path):
    import node
    from tests.fakes.providers import ScriptedProvider

    async with running_daemon(tmp_path, "n0", **FAST) as first, \
            running_daemon(tmp_path, "n1", ACCELMESH_BOOTSTRAP=first.addrs()[0], **FAST) as second:
        await wait_until(lambda: second.peer_id in first.table)
        assert "fresh" not in {p.name for p in first.table.get(second.peer_id).advert.providers}
        node.register_llm_provider("fresh", lambda: ScriptedProvider("fresh"))  # (both daemons share the registry)
        took = await wait_until(
            lambda: "fresh" in {p.name for p in first.table.get(second.peer_id).advert.providers}, timeout=10)
        assert took < 5.0, "published on change, not at the next periodic advert (60 s here)"


class ClosingPubsub:
    """Pubsub's stream handler as py-libp2p 0.8.1 behaves when a message lands while pubsub stops."""

    def __init__(self, message: str) -> None:
        self.message = message

    async def stream_handler(self, stream) -> None:
        raise RuntimeError(self.message)


class RecordingStream:
    def __init__(self) -> None:
        self.was_reset = False

    async def reset(self) -> None:
        self.was_reset = True


async def test_a_gossip_message_racing_shutdown_resets_its_stream_instead_of_killing_the_host():
    from node.mesh.adverts import AdvertService, PeerTable

    service = AdvertService(None, None, PeerTable("self", 60), lambda seq: None, interval=60, load_interval=5,
                            load=lambda: (0, 0), load_changed=trio.Event, is_member=lambda peer: True)
    service.pubsub = ClosingPubsub("Nursery is closed to new arrivals")
    stream = RecordingStream()
    with trio.fail_after(5):
        await service._gossip_stream(stream)
    assert stream.was_reset
    service.pubsub = ClosingPubsub("some other bug")  # anything else is not ours to hide
    with trio.fail_after(5), pytest.raises(RuntimeError, match="other bug"):
        await service._gossip_stream(RecordingStream())


async def test_a_killed_node_leaves_every_table_within_the_ttl_although_relays_still_hold_its_advert(tmp_path):
    # With 3 nodes, each periodic pull hands the survivors the dead node's last advert again; those
    # copies must not renew it (they kept it for minutes, against a ttl of seconds).
    ttl = 1.5
    env = {"ACCELMESH_ADVERTS_TTL": str(ttl), "ACCELMESH_ADVERTS_INTERVAL": "0.3"}
    async with running_daemon(tmp_path, "n0", **env) as first, \
            running_daemon(tmp_path, "n1", ACCELMESH_BOOTSTRAP=first.addrs()[0], **env) as second:
        async with running_daemon(tmp_path, "victim", ACCELMESH_BOOTSTRAP=first.addrs()[0], **env) as victim:
            await wait_until(lambda: all(len(n.table) == 2 for n in (first, second, victim)))
            await trio.sleep(1.0)  # several pull rounds
            killed = trio.current_time()
            victim.request_stop(force=True)
        await wait_until(lambda: victim.peer_id not in first.table and victim.peer_id not in second.table,
                         timeout=15)
        took = trio.current_time() - killed
        assert took <= ttl + 4.0, f"the dead node stayed {took:.1f} s (ttl {ttl} s; before the fix: over a minute)"
        assert second.peer_id in first.table and first.peer_id in second.table  # the living stay
        assert first.table.duplicates + second.table.duplicates > 0, "relayed copies did arrive"


async def test_info_and_peers_agree_with_the_contract_and_each_other(tmp_path):
    import node

    async with running_daemon(tmp_path, "n0", **FAST) as first, \
            running_daemon(tmp_path, "n1", ACCELMESH_BOOTSTRAP=first.addrs()[0], ACCELMESH_ECHO_CONCURRENCY="3",
                           **FAST) as second:
        await wait_until(lambda: second.peer_id in first.table)
        with trio.fail_after(10):
            async with DaemonClient.connect(second.data_dir) as client:
                info = await client.command("info")
                status = await client.command("status")
            async with DaemonClient.connect(first.data_dir) as client:
                peers = await client.command("peers")
        assert set(peers) == {"peers"}
        (entry,) = [p for p in peers["peers"] if p["peer_id"] == second.peer_id]
        assert set(entry) >= {"peer_id", "addrs", "providers", "accelerators", "load", "last_seen", "latency_ms",
                              "health", "cooldown_until", "rtt_ms"}
        assert set(info) >= {"peer_id", "addrs", "version", "stats", "providers", "accelerators", "capacity",
                             "queue", "load"}
        # one meaning of `version` everywhere: the release, as daemon.json and status give it
        daemon_json = json.loads((second.data_dir.path / "daemon.json").read_text())
        assert info["version"] == entry["version"] == status["version"] == daemon_json["version"] == node.__version__
        for key in ("peer_id", "addrs", "providers", "capacity", "queue", "load"):
            assert info[key] == entry[key], key
        static = lambda accels: [{k: v for k, v in a.items() if k != "memory_free"} for a in accels]  # noqa: E731
        assert static(info["accelerators"]) == static(entry["accelerators"])
        for p in entry["providers"]:
            assert set(p) == {"name", "tasks", "models", "ready", "capacity", "identities", "default_model"}
        capacities = {p["name"]: p["capacity"] for p in entry["providers"]}  # as the peer sees n1's advert
        assert capacities["echo"] == 3  # echo.concurrency
        assert capacities["hf_local"] == 16  # hf_local batches by default: batch_concurrency
        assert capacities["openai_compatible"] is None  # an API: no cap of its own, said as null
        echo = next(p for p in entry["providers"] if p["name"] == "echo")
        assert (echo["identities"], echo["default_model"]) == ({"echo": "echo"}, "echo")
        assert info["stats"] == {"inferences": 0, "cache": dict.fromkeys(("memory", "local", "cluster", "miss",
                                                                          "bypass"), 0)}


async def test_peers_show_a_measured_round_trip_after_a_ping(tmp_path):
    env = {"ACCELMESH_ADVERTS_INTERVAL": "0.3"}  # the advert service pings its peers every interval
    async with running_daemon(tmp_path, "n0", **env) as first, \
            running_daemon(tmp_path, "n1", ACCELMESH_BOOTSTRAP=first.addrs()[0], **env) as second:
        await wait_until(lambda: second.peer_id in first.table)
        await wait_until(lambda: first.manager.backend(second.peer_id).rtt_ms is not None)
        with trio.fail_after(10):
            async with DaemonClient.connect(first.data_dir) as client:
                peers = (await client.command("peers"))["peers"]
        (entry,) = [p for p in peers if p["peer_id"] == second.peer_id]
        rtt = entry["rtt_ms"]
        assert isinstance(rtt, (int, float)) and not isinstance(rtt, bool)
        assert 0 <= rtt < 1000  # loopback: py-libp2p reports whole milliseconds, usually 0
        assert entry["health"] == "ok" and entry["latency_ms"] is None, "no request served yet: no request latency"
        json.dumps(entry)  # and it travels as a JSON number


def big_advert(identity: Identity, created: int) -> bytes:
    """A genuine advert of about 48 KiB (many models), under the 64 KiB advert limit."""
    from protocols.advert.messages import MAX_ADVERT_BYTES, PROTOCOL_VERSION, Load, ProviderEntry, sign_advert
    from protocols.advert.messages import Accelerator as Device

    providers = tuple(ProviderEntry(f"p{i}", ("generate",), tuple(f"org/model-{i}-{j}-" + "x" * 180 for j in range(60)),
                                    True) for i in range(4))
    data = encode_advert(sign_advert(
        identity, addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{identity.peer_id}",), providers=providers,
        accelerators=(Device("cpu", "x86_64", 1 << 34, 1 << 33, cores=2),), capacity=64, queue=256, load=Load(0, 0),
        software="accelmesh/0.1.0", protocol=PROTOCOL_VERSION, seq=1, created=created, expires=created + 90_000))
    assert 40 * 1024 < len(data) <= MAX_ADVERT_BYTES
    return data


async def test_a_gossip_rpc_carrying_several_large_adverts_is_accepted(tmp_path):
    # An IWANT reply carries every wanted advert in one RPC (py-libp2p splits outbound RPCs only at
    # 1 MiB); with a 128 KiB inbound limit the daemon reset the stream and dropped the sender.
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX
    from libp2p.pubsub.rpc_queue import DefaultMaxMessageSize
    from libp2p.tools.anyio_service import background_trio_service

    async with running_daemon(tmp_path, "alice", **FAST) as daemon, peer_host(mallory) as host:
        assert daemon.adverts.pubsub.max_inbound_rpc_size >= DefaultMaxMessageSize  # what a sender may send
        pubsub, router = gossip(host)
        async with background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()
            await pubsub.subscribe(TOPIC)
            await connect(host, daemon)
            daemon_id = ID.from_base58(daemon.peer_id)
            with trio.fail_after(10):
                await pubsub.wait_for_subscription(daemon_id, TOPIC)
            await wait_until(lambda: daemon_id in pubsub.peer_queues)
            subjects = [Identity.generate() for _ in range(4)]
            now = int(time.time() * 1000)
            rpc = rpc_pb2.RPC()
            for subject in subjects:
                msg = rpc_pb2.Message(data=big_advert(subject, now), topicIDs=[TOPIC], from_id=pubsub.my_id.to_bytes(),
                                      seqno=pubsub._next_seqno())
                msg.signature = pubsub.sign_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
                msg.key = host.get_public_key().serialize()
                rpc.publish.append(msg)
            assert 160 * 1024 < rpc.ByteSize() < DefaultMaxMessageSize
            router.send_rpc(daemon_id, rpc)  # one RPC, as gossipsub's handle_iwant builds it
            await wait_until(lambda: all(s.peer_id in daemon.table for s in subjects))
            assert host.get_id() in daemon.adverts.pubsub.peers, "the sender was not dropped"


async def test_names_beyond_the_adverts_bounds_are_left_out_not_cut(tmp_path):
    import node
    from tests.fakes.providers import ScriptedProvider

    class ManyNames(ScriptedProvider):
        def models(self):
            return ("fits", "m" * 257, "é" * 256)  # bounds count characters: 257 is one too many

    node.register_llm_provider("many_names", lambda: ManyNames("many_names"))
    node.register_llm_provider("p" * 65, lambda: ScriptedProvider("long"))
    async with running_daemon(tmp_path, "alice", ACCELMESH_ADVERTS_INTERVAL="60") as alice:
        with trio.fail_after(10):
            while alice.adverts is None or alice.adverts.current is None:
                await trio.sleep(0.02)
        providers = {p.name: p for p in alice.adverts.current.providers}
        assert providers["many_names"].models == ("fits", "é" * 256)
        assert "p" * 65 not in providers and "echo" in providers


async def test_a_real_daemons_advert_says_echos_identity_and_default_model_and_no_unloaded_weights(tmp_path):
    async with running_daemon(tmp_path, "alice", ACCELMESH_ADVERTS_INTERVAL="60") as alice:
        with trio.fail_after(10):
            while alice.adverts is None or alice.adverts.current is None:
                await trio.sleep(0.02)
        advert = verified_advert(alice.adverts.current_bytes, int(time.time() * 1000))
        assert advert.protocol == "1.2"
        providers = {p.name: p for p in advert.providers}
        echo = providers["echo"]
        assert (echo.models, echo.identities, echo.default_model) == (("echo",), ("echo",), "echo")
        hf = providers["hf_local"]  # nothing has loaded its model: its identity (a weights digest) is not known
        assert hf.default_model in hf.models and set(hf.identities) == {""}
