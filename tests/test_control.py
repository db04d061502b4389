"""The control commands' table: every command's JSON shape, `failed` for what fails, stop after the reply."""

from __future__ import annotations

import dataclasses
import time

import pytest
import trio

from node import control
from node.accelerators import Accelerator as Device
from node.admission import Admission
from node.cache.store import LocalStore
from node.control import COMMANDS, ControlContext, answer, run_command, serve_control
from node.deps import RouterStatistics
from node.errors import DaemonError, ProviderFailed
from node.mesh.adverts import PeerTable, build_advert
from node.mesh.manager import BackendManager
from node.mesh.streams import StreamGuard, StreamLimits
from protocols.advert.messages import ProviderEntry, encode_advert
from protocols.codec import decode, encode
from protocols.control import messages as wire
from protocols.framing import FrameDecoder
from protocols.records import Identity

alice, bob = (Identity.from_seed(bytes([i]) * 32) for i in (1, 2))
ALICE_ADDR = f"/ip4/127.0.0.1/tcp/4001/p2p/{alice.peer_id}"
STATS = RouterStatistics(inferences=3, cache={"memory": 1, "local": 0, "cluster": 0, "miss": 3, "bypass": 0},
                         failures={}, in_flight=0)


def advert_of(identity: Identity, addr: str):
    echo = ProviderEntry("echo", ("generate", "chat"), ("echo",), True, None, ("echo",), "echo")
    return build_advert(identity, addrs=[addr], providers=[echo],
                        accelerators=[Device("cpu", "x86_64", 16 << 30, 8 << 30, cores=4)], capacity=4, queue=16,
                        load=(1, 0), ttl=90.0, seq=1, software="accelmesh/9.9.9", created=int(time.time() * 1000))


@pytest.fixture
def store(tmp_path):
    s = LocalStore(tmp_path / "store.sqlite")
    yield s
    s.close()


@pytest.fixture
def stops():
    return []


@pytest.fixture
def context(store, stops) -> ControlContext:
    """Alice's view: bob in her peer table, her own advert current, one request running."""
    table = PeerTable(alice.peer_id, ttl=30.0)
    assert table.offer(encode_advert(advert_of(bob, "/ip4/127.0.0.1/tcp/4002")), 0.0) is not None
    admission = Admission(max_concurrent=4, max_queue=16)
    own = advert_of(alice, ALICE_ADDR)
    manager = BackendManager(lambda: [], clock=lambda: 100.0, wall=lambda: 1_700_000_000.0)
    return ControlContext(
        peer_id=alice.peer_id, version="9.9.9", pid=4242, drain_grace=10.0, addrs=lambda: [ALICE_ADDR],
        state=lambda: "running", uptime=lambda: 12.34567, connections=lambda: 1,
        admission=lambda: dataclasses.replace(admission.statistics(), in_flight=1),
        streams=StreamGuard(StreamLimits()).statistics, peer_entries=table.entries, advert=lambda: own,
        router=lambda: STATS, store=store, request_stop=lambda: stops.append("stop"), peer_health=manager.peer_json,
        balancing=manager.statistics,
    )


def test_the_table_answers_exactly_the_commands_the_protocol_names():
    assert set(COMMANDS) == set(wire.COMMANDS)


async def test_status_says_whether_the_daemon_is_up_and_how_busy_it_is(context):
    assert await run_command(context, "status", {}) == {
        "state": "running", "peer_id": alice.peer_id, "pid": 4242, "version": "9.9.9", "uptime_s": 12.346,
        "in_flight": 1, "queued": 0, "connections": 1,
        "streams": {"peers": 0, "open_streams": 0, "served": 0, "refused": {}},
    }


async def test_info_has_the_contract_shape_with_this_nodes_advert_fields(context):
    assert await run_command(context, "info", {}) == {
        "peer_id": alice.peer_id, "addrs": [ALICE_ADDR], "version": "9.9.9",
        "providers": [{"name": "echo", "tasks": ["generate", "chat"], "models": ["echo"], "ready": True,
                       "capacity": None, "identities": {"echo": "echo"}, "default_model": "echo"}],
        "accelerators": [{"kind": "cpu", "name": "x86_64", "memory_total": 16 << 30, "memory_free": 8 << 30,
                          "index": 0, "cores": 4}],
        "capacity": 4, "queue": 16, "load": {"in_flight": 1, "queued": 0}, "peers": 1,
        "stats": {"inferences": 3, "cache": {"memory": 1, "local": 0, "cluster": 0, "miss": 3, "bypass": 0}},
        "mesh": {"strategy": "round_robin", "planned": 0, "by_strategy": {}, "cooling": 0, "backends": {}},
    }
    assert control.info(context) == await run_command(context, "info", {})


async def test_info_before_the_first_advert_lists_no_providers_or_accelerators(context):
    info = control.info(dataclasses.replace(context, advert=lambda: None))
    assert info["providers"] == [] and info["accelerators"] == []


async def test_peers_lists_the_peer_table_in_the_contract_shape(context):
    result = await run_command(context, "peers", {})
    assert set(result) == {"peers"}
    (entry,) = result["peers"]
    assert set(entry) >= {"peer_id", "addrs", "providers", "accelerators", "capacity", "queue", "load", "version",
                          "last_seen", "latency_ms", "health", "cooldown_until", "rtt_ms", "ttfc_ms", "in_flight"}
    assert entry["peer_id"] == bob.peer_id and entry["version"] == "9.9.9"
    assert (entry["health"], entry["cooldown_until"], entry["latency_ms"]) == ("ok", None, None), "nothing measured"


async def test_peers_shows_what_the_backend_manager_measured(context):
    manager = BackendManager(lambda: [], clock=lambda: 100.0, wall=lambda: 1_700_000_000.0)
    with pytest.raises(ProviderFailed), manager.attempt(bob.peer_id, deadline=200.0) as attempt:
        attempt.chunk()
        raise ProviderFailed(bob.peer_id, "the stream was reset", retryable=True)
    manager.pinged(bob.peer_id, None)
    manager.pinged(bob.peer_id, None)  # two failed pings in a row: unreachable, cooled at once
    (entry,) = (await run_command(dataclasses.replace(context, peer_health=manager.peer_json), "peers", {}))["peers"]
    assert entry["health"] == "cooling" and entry["cooldown_until"] == 1_700_000_000.0 + 5.0
    assert entry["latency_ms"] is None and entry["ttfc_ms"] == 0.0 and entry["rtt_ms"] is None
    assert entry["failure_ratio"] == 0.0 and entry["cooldowns"] == 1, "the window starts afresh with a cooldown"


async def test_stop_reports_what_the_drain_waits_for_and_stops_nothing_by_itself(context, stops):
    assert await run_command(context, "stop", {}) == {"stopping": True, "in_flight": 1, "drain_grace": 10.0}
    assert stops == [], "the stop itself waits until the reply is written (AFTER_REPLY)"


async def test_cache_commands_run_on_the_local_store(context, store):
    assert await run_command(context, "cache-stats", {}) == {**dataclasses.asdict(store.statistics()), "cluster": None}
    assert await run_command(context, "cache-ls", {}) == {"blocks": []}
    assert await run_command(context, "cache-verify", {}) == {"checked": 0, "corrupt": []}
    with pytest.raises(DaemonError, match="needs a CID"):
        await run_command(context, "cache-get", {})


async def test_an_unknown_command_is_answered_failed(context):
    reply = await answer(context, wire.Command(command="reboot"))
    assert reply == wire.Reply(ok=False, error=wire.ErrorInfo(code="failed", message="unknown command 'reboot'"))
    with pytest.raises(DaemonError, match="unknown command 'reboot'"):
        await run_command(context, "reboot", {})


async def test_a_failing_command_is_answered_failed_with_its_message_cut_to_the_wire_bound(context):
    def broken():
        raise ValueError("x" * (wire.MAX_ERROR_MESSAGE_CHARS + 1))

    reply = await answer(dataclasses.replace(context, admission=broken), wire.Command(command="status"))
    assert not reply.ok and reply.error.code == "failed"
    assert reply.error.message == "x" * wire.MAX_ERROR_MESSAGE_CHARS  # at the bound, not one past it
    encode(reply)  # and it is sendable
    missing = await answer(context, wire.Command(command="cache-get", args={}))
    assert missing.error == wire.ErrorInfo(code="failed", message="this cache command needs a CID")


class FakeFramed:
    """The side of a control stream `serve_control` sees: one frame in, frames out, in order."""

    def __init__(self, frame: bytes, log: list[str]) -> None:
        self.frames, self.log, self.written = [frame], log, []

    async def read_frame(self) -> bytes | None:
        return self.frames.pop(0) if self.frames else None

    async def write(self, data: bytes) -> None:
        self.log.append("reply")
        self.written.append(data)


async def test_stop_is_requested_only_after_its_reply_is_written(context):
    log: list[str] = []
    framed = FakeFramed(encode(wire.Command(command="stop")), log)
    ctx = dataclasses.replace(context, request_stop=lambda: log.append("stop"))
    with trio.fail_after(5):
        await serve_control(framed, bob.peer_id, context=ctx, runner=None)  # type: ignore[arg-type]
    assert log == ["reply", "stop"]
    decoder = FrameDecoder(wire.MAX_FRAME_SIZE)
    decoder.receive_data(framed.written[0])
    reply = decode(decoder.next_frame(), wire.Reply, wire.LIMITS)
    assert reply.ok and reply.result == {"stopping": True, "in_flight": 1, "drain_grace": 10.0}


async def test_a_stream_closed_before_its_first_frame_gets_no_reply(context):
    framed = FakeFramed(b"", [])
    framed.frames = []
    await serve_control(framed, bob.peer_id, context=context, runner=None)  # type: ignore[arg-type]
    assert framed.written == []
