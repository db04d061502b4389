"""Remote inference between real daemons: routing, streaming, cancellation, deadlines, busy, abuse."""

from __future__ import annotations

import uuid
from contextlib import aclosing

import pytest
import trio
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

import node
from node.client import PeerClient
from node.errors import Busy, CacheMiss, DeadlineExceeded, ModelNotFound
from node.mesh.errors import RemoteError
from node.mesh.streams import FramedStream, StreamLimits
from protocols.inference.machine import InferenceStream, Role
from protocols.inference.messages import PROTOCOL_ID as INFER
from protocols.inference.messages import Request, Result
from tests.fakes.openai_server import FakeOpenAIServer
from tests.fakes.providers import ScriptedProvider
from tests.mesh.conftest import connect, peer_host, running_daemon

QUIET = {"ACCELMESH_ADVERTS_INTERVAL": "60"}


async def until(predicate, timeout=10.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


def request(prompt="hello", *, model="echo", provider="mesh", **kw) -> Request:
    """A new request (its own id: the same id and question again is a repeat, node.idempotency)."""
    return Request(id=kw.pop("id", uuid.uuid4().hex), task="generate", prompt=prompt, model=model, provider=provider,
                   timeout_ms=kw.pop("timeout_ms", 20_000), **kw)


async def collect(client, req):
    async with aclosing(client.generate(req)) as items:
        return [item async for item in items]


async def test_the_request_reaches_the_peer_that_has_the_model(tmp_path):
    with FakeOpenAIServer(slow_seconds=1) as server:
        bob_env = {"ACCELMESH_PROVIDERS_OPENAI_COMPATIBLE_BASE_URL": server.base_url,
                   "ACCELMESH_PROVIDERS_OPENAI_COMPATIBLE_DEFAULT_MODEL": "gpt-only-on-bob"}
        async with running_daemon(tmp_path, "alice", **QUIET) as alice, \
                running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **QUIET, **bob_env) as bob:
            await until(lambda: bob.peer_id in alice.table)
            async with PeerClient.connect(alice.addrs()[0]) as client:
                for i in range(3):  # round robin cannot pick alice: only bob serves that model
                    *chunks, result = await collect(client, request(f"which model? {i}", model="gpt-only-on-bob"))
                    assert result.peer == bob.peer_id and result.provider == "openai_compatible"
                    assert "".join(chunks) == f"answer to: which model? {i}" == result.verify()["text"]
                    assert result.cache == "miss"
                again = (await collect(client, request("which model? 0", model="gpt-only-on-bob")))[-1]
                assert (again.peer, again.cache) == (alice.peer_id, "memory"), (
                    "alice keyed the repeat with the identity bob advertises and found it in her cache: "
                    "not even bob was asked")
            assert len(server.requests) == 3 and server.requests[0]["body"]["model"] == "gpt-only-on-bob"
            assert alice.info()["stats"]["inferences"] == 0 and bob.info()["stats"]["inferences"] == 3
            with pytest.raises((ModelNotFound, RemoteError)):
                async with PeerClient.connect(alice.addrs()[0]) as client:
                    await collect(client, request(model="no-such-model"))


async def test_round_robin_across_the_cluster_and_peer_is_always_set(tmp_path):
    async with running_daemon(tmp_path, "alice", **QUIET) as alice, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **QUIET) as bob:
        await until(lambda: bob.peer_id in alice.table)
        async with PeerClient.connect(alice.addrs()[0]) as client:
            peers = []
            for i in range(4):
                *chunks, result = await collect(client, request(f"prompt {i} with several words"))
                assert chunks == ["echo:", " prompt", f" {i}", " with", " several", " words"]  # in order
                peers.append(result.peer)
        assert sorted(peers) == sorted([alice.peer_id, bob.peer_id] * 2), "every answer names its node"


async def test_constraints_on_peers_and_accelerator(tmp_path):
    async with running_daemon(tmp_path, "alice", **QUIET) as alice, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **QUIET) as bob:
        await until(lambda: bob.peer_id in alice.table)
        async with PeerClient.connect(alice.addrs()[0]) as client:
            for _ in range(3):
                result = (await collect(client, request(on_peers=(bob.peer_id,))))[-1]
                assert result.peer == bob.peer_id
            result = (await collect(client, request(accelerator="cpu")))[-1]
            assert result.peer in (alice.peer_id, bob.peer_id)
            with pytest.raises((ModelNotFound, RemoteError), match="cuda"):
                await collect(client, request(accelerator="cuda"))


async def test_closing_the_stream_cancels_the_generation_and_frees_the_slot_within_a_second(tmp_path):
    async with running_daemon(tmp_path, "alice", ACCELMESH_ECHO_LATENCY_MS="30000", **QUIET) as alice, \
            peer_host() as client_host:
        await connect(client_host, alice)
        stream = await client_host.new_stream(ID.from_base58(alice.peer_id), [INFER])
        machine = InferenceStream(Role.CLIENT)
        await stream.write(machine.send(request(provider="echo")))
        await until(lambda: alice.admission.in_flight == 1)
        await stream.reset()  # the caller goes away
        start = trio.current_time()
        await until(lambda: alice.admission.in_flight == 0, timeout=5)
        assert trio.current_time() - start < 1.0


async def test_the_deadline_travels_with_the_request(tmp_path):
    async with running_daemon(tmp_path, "alice", ACCELMESH_ECHO_LATENCY_MS="30000", **QUIET) as alice:
        async with PeerClient.connect(alice.addrs()[0]) as client:
            start = trio.current_time()
            with trio.fail_after(10), pytest.raises(DeadlineExceeded):
                await collect(client, request(provider="echo", timeout_ms=500))
            assert trio.current_time() - start < 3.0
        await until(lambda: alice.admission.in_flight == 0, timeout=2)


async def test_busy_only_when_every_slot_and_the_queue_are_full(tmp_path):
    env = {"ACCELMESH_ECHO_LATENCY_MS": "1500", "ACCELMESH_LIMITS_MAX_CONCURRENT": "1",
           "ACCELMESH_LIMITS_MAX_QUEUE": "1"}
    async with running_daemon(tmp_path, "alice", **env, **QUIET) as alice:
        outcomes = []

        async def one(i):
            try:
                async with PeerClient.connect(alice.addrs()[0]) as client:
                    outcomes.append(("ok", (await collect(client, request(f"p{i}", provider="echo")))[-1]))
            except Busy as exc:  # what a client hears when its entry node is full (INTERFACES.md, Errors)
                outcomes.append(("busy", exc))

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(one, i)
                    await until(lambda: alice.admission.in_flight + alice.admission.queued >= min(i + 1, 2))
        codes = sorted(code for code, _ in outcomes)
        assert codes == ["busy", "ok", "ok"], "one served, one queued then served, one refused"
        busy = next(exc for code, exc in outcomes if code == "busy")
        assert busy.retry_after > 0 and "every slot and the queue are full" in str(busy)


async def test_a_malformed_frame_resets_that_stream_only(tmp_path):
    async with running_daemon(tmp_path, "alice", ACCELMESH_ECHO_LATENCY_MS="1000", **QUIET) as alice, \
            peer_host() as mallory:
        await connect(mallory, alice)
        # a good request in flight on mallory's own connection while she sends garbage beside it
        good = FramedStream(await mallory.new_stream(ID.from_base58(alice.peer_id), [INFER]), StreamLimits(),
                            decoder=InferenceStream(Role.CLIENT))
        await good.write(good.decoder.send(request("still answered", provider="echo")))
        await until(lambda: alice.admission.in_flight == 1)
        for garbage in (b"\x05hello", b"\xff\xff\xff\xff\xff\xff", b"\x03\x93\x01\x02"):
            stream = await mallory.new_stream(ID.from_base58(alice.peer_id), [INFER])
            await stream.write(garbage)
            # the reset reads as EOF: py-libp2p's yamux forgets a stream once its RST arrives with nothing unread
            with trio.fail_after(5), pytest.raises(StreamEOF):
                await stream.read(100)  # any answer fails the test
        assert alice.guard.refused["protocol_error"] == 3, "each one counted before its stream was reset"
        with trio.fail_after(5):
            events = []
            while not isinstance(event := await good.read_event(), Result):
                events.append(event.text)
        assert "".join(events) == "echo: still answered" == event.verify()["text"]
        assert len(mallory.get_network().connections) == 1, "the connection itself was never closed"
        async with PeerClient.connect(alice.addrs()[0]) as client:  # the node keeps serving
            assert (await collect(client, request(provider="echo")))[-1].verify()["text"] == "echo: hello"


class ManyChunks(ScriptedProvider):
    """Yields `total` chunks as fast as it is allowed to, counting how far it got."""

    def __init__(self, total: int) -> None:
        super().__init__("many")
        self.total, self.produced = total, 0

    async def astream(self, request):
        from node.providers.base import Completion

        for i in range(self.total):
            self.produced += 1
            yield f"w{i} "
        yield Completion("".join(f"w{i} " for i in range(self.total)), model="many")


async def test_a_slow_reader_holds_the_generation_back_instead_of_growing_a_buffer(tmp_path):
    provider = ManyChunks(500)
    node.register_llm_provider("many", lambda: provider)
    async with running_daemon(tmp_path, "alice", **QUIET) as alice, peer_host() as reader_host:
        await connect(reader_host, alice)
        stream = await reader_host.new_stream(ID.from_base58(alice.peer_id), [INFER])
        framed = FramedStream(stream, StreamLimits(), decoder=InferenceStream(Role.CLIENT))
        await framed.write(framed.decoder.send(request("x", model=None, provider="many", window=8)))
        first = await framed.read_event()
        assert first.text == "w0 "
        await trio.sleep(1.0)  # a reader that stops reading (and sends no credit)
        assert provider.produced <= 8 + 2, f"{provider.produced} chunks produced for a window of 8"
        await framed.reset()
        await until(lambda: alice.admission.in_flight == 0, timeout=5)
        assert provider.produced < 500, "the rest was never generated"


async def test_a_forwarded_request_is_never_forwarded_again(tmp_path):
    with FakeOpenAIServer() as server:
        bob_env = {"ACCELMESH_PROVIDERS_OPENAI_COMPATIBLE_BASE_URL": server.base_url,
                   "ACCELMESH_PROVIDERS_OPENAI_COMPATIBLE_DEFAULT_MODEL": "bobs-model"}
        async with running_daemon(tmp_path, "alice", **QUIET) as alice, \
                running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **QUIET, **bob_env) as bob:
            await until(lambda: bob.peer_id in alice.table and alice.peer_id in bob.table)
            async with PeerClient.connect(alice.addrs()[0]) as client:
                hops_two = request("x", model="bobs-model", hops=2)  # as if another node had forwarded it
                with pytest.raises(RemoteError) as info:
                    await collect(client, hops_two)
                assert info.value.code in ("no_provider", "model_not_found")
                assert "hop limit" in str(info.value)
            assert server.requests == [], "alice served locally only: she never forwarded it to bob"


async def test_node_connect_data_dir_and_peer(tmp_path):
    async with running_daemon(tmp_path, "alice", **QUIET) as alice:
        def blocking():
            with node.connect(data_dir=alice.data_dir.path) as client:
                text = client.generate_text("one two", provider="echo")
                chunks = list(client.stream_text("three four", provider="echo"))
                result = client.complete("five", provider="echo")
            return text, chunks, result

        text, chunks, result = await trio.to_thread.run_sync(blocking)
        assert text == "echo: one two" and chunks == ["echo:", " three", " four"]
        assert result.peer == alice.peer_id and result.cid.startswith("bafkrei") and result.cache == "miss"
        client = node.connect(peer=alice.addrs()[0])
        assert await client.agenerate_text("six", provider="echo") == "echo: six"
        assert [c async for c in client.astream_text("seven", provider="echo")] == ["echo:", " seven"]
        assert isinstance(node.connect(http_url="http://127.0.0.1:8080"), node.HttpClient)
        with pytest.raises(node.InvalidRequest, match="exactly one"):
            node.connect()


async def test_requests_share_one_keep_alive_stream_and_a_cancelled_one_is_never_reused(tmp_path):
    slow = ScriptedProvider("slow", latency=30)
    node.register_llm_provider("slow", lambda: slow)
    async with running_daemon(tmp_path, "alice", **QUIET) as alice:
        async with PeerClient.connect(alice.addrs()[0]) as client:
            for i in range(3):
                *chunks, result = await collect(client, request(f"turn {i}", provider="echo"))
                assert "".join(chunks) == f"echo: turn {i}" and result.peer == alice.peer_id
            assert (client.pool.opened, client.pool.reused) == (1, 2)

            with trio.move_on_after(0.5) as scope:  # the caller gives up mid-request
                await collect(client, request("never answered", model=None, provider="slow"))
            assert scope.cancelled_caught
            await until(lambda: alice.admission.in_flight == 0, timeout=1.5)
            assert slow.cancelled == 1, "the generation itself was cancelled"
            assert client.pool.statistics().idle == 0, "the cancelled stream was reset, not pooled"

            result = (await collect(client, request("after the cancel", provider="echo")))[-1]
            assert result.verify()["text"] == "echo: after the cancel"
            assert client.pool.opened == 2


async def test_a_provider_concurrency_cap_queues_requests_instead_of_refusing_them(tmp_path):
    env = {"ACCELMESH_ECHO_LATENCY_MS": "300", "ACCELMESH_ECHO_CONCURRENCY": "1"}
    async with running_daemon(tmp_path, "alice", **env, **QUIET) as alice:
        results = []

        async def one(i):
            async with PeerClient.connect(alice.addrs()[0]) as client:
                results.append((await collect(client, request(f"p{i}", provider="echo")))[-1])

        start = trio.current_time()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(one, i)
        assert sorted(r.verify()["text"] for r in results) == ["echo: p0", "echo: p1", "echo: p2"]
        assert trio.current_time() - start >= 0.9, "one generation at a time: three in a row"
        assert alice.info()["stats"]["inferences"] == 3


class StallingStream:
    """A FramedStream whose client takes the small frames but never the Result (a stalled reader)."""

    limits = StreamLimits()
    peer = "12D3KooWStalledReader"

    def __init__(self) -> None:
        self.written, self.was_reset = [], False

    async def write(self, data: bytes) -> None:
        if len(data) > 200:  # the Result
            self.written.append(data[:100])  # half of it went out
            await trio.sleep_forever()
        self.written.append(data)

    async def read_event(self, *, idle: bool = True):
        await trio.sleep_forever()

    async def reset(self) -> None:
        self.was_reset = True


async def test_a_deadline_while_the_result_is_written_resets_the_stream_and_raises_nothing():
    # The answer is complete (the state machine is DONE) when the deadline cuts the Result's write:
    # no Error may follow half a Result, and nothing may escape to the connection (py-libp2p would
    # take the whole connection down with it).
    from node.admission import Admission
    from node.mesh.server import serve_inference
    from node.wire import result_to_wire

    answer = result_to_wire(await node.acomplete("a b c", provider="echo", cache="no-store"), peer="12D3KooWServer")
    admission = Admission(1, 0)

    async def runner(req, caller):  # what the front door does: hold a slot while answering
        async with admission.slot():
            yield "a"
            yield answer

    framed, machine = StallingStream(), InferenceStream(Role.SERVER)
    req = request("a b c", provider="echo", timeout_ms=300)
    machine.receive_message(req)
    with trio.fail_after(5):
        await serve_inference(framed, machine, req, runner)
    assert framed.was_reset and admission.in_flight == 0
    assert len(framed.written) == 2, "one chunk, half a Result, and nothing after it"


async def test_only_if_cached_through_the_mesh_is_answered_by_the_serving_nodes_cache(tmp_path):
    async with running_daemon(tmp_path, "alice", **QUIET) as alice:
        async with PeerClient.connect(alice.addrs()[0]) as client:
            with pytest.raises(CacheMiss):
                await collect(client, request("remember me", cache="only-if-cached"))
            first = (await collect(client, request("remember me")))[-1]
            again = (await collect(client, request("remember me", cache="only-if-cached")))[-1]
        assert (first.cache, again.cache) == ("miss", "memory") and again.cid == first.cid


async def test_on_peers_never_falls_back_to_a_node_outside_them(tmp_path):
    async with running_daemon(tmp_path, "alice", **QUIET) as alice:
        async with PeerClient.connect(alice.addrs()[0]) as client:
            nobody = "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
            with pytest.raises((ModelNotFound, RemoteError), match="no node of the cluster serves"):
                await collect(client, request(on_peers=(nobody,)))
            assert (await collect(client, request(on_peers=(alice.peer_id,))))[-1].peer == alice.peer_id
        assert alice.info()["stats"]["inferences"] == 1


async def test_a_request_the_server_could_not_decode_is_refused_before_it_is_sent(tmp_path):
    async with running_daemon(tmp_path, "alice", **QUIET) as alice:
        def blocking():
            with node.connect(peer=alice.addrs()[0]) as client:
                with pytest.raises(node.InvalidRequest, match="on_peers"):
                    client.generate_text("x", on_peers=[f"12D3KooW{i}" for i in range(17)])
                return client.generate_text("a long deadline", provider="echo", timeout=7200)  # sent as 1 hour

        assert await trio.to_thread.run_sync(blocking) == "echo: a long deadline"


def test_every_error_message_fits_the_wire():
    from node.errors import InvalidRequest
    from node.mesh.errors import error_for
    from protocols.codec import decode, encode
    from protocols.inference.messages import Error

    error = error_for(InvalidRequest("temperature must be a finite number, got " + "9" * 10_000))
    assert len(error.message) == 4096 and error.message.endswith("…")
    assert decode(encode(error), (Error,)) == error


class FirstWordThenSilence(ScriptedProvider):
    async def astream(self, request):
        yield "first"
        try:
            await trio.sleep(30)
        except trio.Cancelled:
            self.cancelled += 1
            raise
        yield "never"


async def test_the_blocking_client_is_shared_by_threads_and_stopping_early_cancels_the_request(tmp_path):
    async with running_daemon(tmp_path, "alice", ACCELMESH_ECHO_LATENCY_MS="0", **QUIET) as alice:
        slow = FirstWordThenSilence("slow_words")
        node.register_llm_provider("slow_words", lambda: slow)

        def blocking():
            import threading

            with node.connect(peer=alice.addrs()[0]) as client:
                answers, portals = {}, set()

                def one(i):
                    answers[i] = client.generate_text(f"thread {i}", provider="echo")
                    portals.add(id(client._portal))

                threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout=30)
                for chunk in client.stream_text("one two three four five six", provider="slow_words"):
                    break  # the caller stops after the first chunk
                after = client.generate_text("after", provider="echo")
            return answers, portals, after

        answers, portals, after = await trio.to_thread.run_sync(blocking)
        assert answers == {i: f"echo: thread {i}" for i in range(4)} and len(portals) == 1
        assert after == "echo: after"
        await until(lambda: alice.admission.in_flight == 0, timeout=2)
        assert slow.cancelled == 1, "the generation the caller walked away from was cancelled"


async def test_a_slot_handed_to_another_node_is_free_here_and_taken_back_for_local_work():
    from node.admission import Admission
    from node.errors import Busy

    admission = Admission(1, 0)
    with trio.fail_after(5):
        async with admission.slot() as slot:
            with pytest.raises(Busy):
                async with admission.slot():
                    pass
            slot.hand_off()  # another node serves this request...
            assert (admission.in_flight, admission.forwarding) == (0, 1) and not admission.idle
            async with admission.slot():  # ... so this node takes other work meanwhile
                assert admission.in_flight == 1
                with pytest.raises(Busy):  # a local fallback now finds the node full: busy
                    async with slot.local():
                        pass
            async with slot.local():  # free again: taken back for work done here
                assert (admission.in_flight, admission.forwarding) == (1, 0)
        assert admission.idle and admission.refused_busy == 2 and admission.served == 2

        waiting = Admission(1, 1)
        async with waiting.slot() as slot:
            slot.hand_off()
            async with waiting.slot():  # another request holds the only slot
                with trio.move_on_after(0.2) as gave_up:  # cancelled while queued to take it back
                    async with slot.local():
                        pytest.fail("the slot was taken twice")
                assert gave_up.cancelled_caught
                assert (waiting.queued, waiting.forwarding, waiting.in_flight) == (0, 1, 1)
        assert waiting.idle and (waiting.queued, waiting.forwarding, waiting.in_flight) == (0, 0, 0)


async def test_the_entry_node_frees_its_slot_while_another_node_serves(tmp_path):
    env = {"ACCELMESH_ECHO_LATENCY_MS": "1500", "ACCELMESH_LIMITS_MAX_CONCURRENT": "1",
           "ACCELMESH_LIMITS_MAX_QUEUE": "0", **QUIET}
    async with running_daemon(tmp_path, "alice", **env) as alice, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **env) as bob:
        await until(lambda: bob.peer_id in alice.table and alice.peer_id in bob.table)
        results = {}

        async def ask(entry, key, req):
            async with PeerClient.connect(entry.addrs()[0]) as client:
                results[key] = (await collect(client, req))[-1]

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, alice, "via alice", request("to bob", on_peers=(bob.peer_id,)))
                await until(lambda: bob.admission.in_flight == 1)
                assert (alice.admission.in_flight, alice.admission.forwarding) == (0, 1)
                # alice's one slot is free for work of her own while bob serves her caller
                await ask(alice, "at alice", request("local", provider="echo"))
        assert results["via alice"].peer == bob.peer_id and results["at alice"].peer == alice.peer_id
        assert alice.admission.idle and bob.admission.idle and alice.admission.refused_busy == 0


async def test_a_busy_node_is_skipped_and_when_every_node_is_busy_the_caller_hears_busy(tmp_path):
    hold = ScriptedProvider("hold", latency=30)
    node.register_llm_provider("hold", lambda: hold)
    env = {"ACCELMESH_LIMITS_MAX_CONCURRENT": "1", "ACCELMESH_LIMITS_MAX_QUEUE": "0", **QUIET}
    async with running_daemon(tmp_path, "alice", **env) as alice, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **env) as bob:
        await until(lambda: bob.peer_id in alice.table and alice.peer_id in bob.table)
        async with trio.open_nursery() as nursery, PeerClient.connect(bob.addrs()[0]) as holder:
            nursery.start_soon(collect, holder, request("hold bob's only slot", model=None, provider="hold"))
            await until(lambda: bob.admission.in_flight == 1)
            async with PeerClient.connect(alice.addrs()[0]) as client:
                for i in range(2):  # round robin asks bob first on one of the two turns: he is busy
                    assert (await collect(client, request(f"turn {i}")))[-1].peer == alice.peer_id
                assert bob.admission.refused_busy == 1
                with pytest.raises(Busy) as info:  # the client hears busy, with bob's hint
                    await collect(client, request("only bob", on_peers=(bob.peer_id,)))
                assert info.value.retry_after == 1.0 and "every eligible node is busy" in str(info.value)
            nursery.cancel_scope.cancel()
        assert alice.admission.refused_busy == 0, "alice's slot was free to serve; bob's queue was full"


class Clocked(ScriptedProvider):
    """Records the deadline each request arrives with."""

    def __init__(self) -> None:
        super().__init__("clocked", latency=30)
        self.timeouts: list[float] = []

    async def astream(self, request):
        self.timeouts.append(request.timeout)
        async for item in super().astream(request):
            yield item


async def test_a_caller_leaving_the_entry_node_cancels_the_generation_on_the_serving_node(tmp_path):
    clocked = Clocked()
    node.register_llm_provider("clocked", lambda: clocked)
    async with running_daemon(tmp_path, "alice", **QUIET) as alice, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **QUIET) as bob, \
            peer_host() as client_host:
        await until(lambda: bob.peer_id in alice.table)
        await connect(client_host, alice)
        stream = await client_host.new_stream(ID.from_base58(alice.peer_id), [INFER])
        machine = InferenceStream(Role.CLIENT)
        await stream.write(machine.send(request(model="clocked-model", on_peers=(bob.peer_id,))))
        # (bob's generation itself has started: past his cache lookups, the cluster's included)
        await until(lambda: bob.admission.in_flight == 1 and alice.admission.forwarding == 1 and clocked.timeouts)
        await stream.reset()  # the caller goes away from alice
        start = trio.current_time()
        await until(lambda: bob.admission.idle and alice.admission.idle, timeout=5)
        assert trio.current_time() - start < 1.0
        assert clocked.cancelled == 1, "bob's generation itself was cancelled"


async def test_the_remaining_deadline_is_forwarded_to_the_serving_node(tmp_path):
    clocked = Clocked()
    node.register_llm_provider("clocked", lambda: clocked)
    async with running_daemon(tmp_path, "alice", **QUIET) as alice, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **QUIET) as bob:
        await until(lambda: bob.peer_id in alice.table)
        async with PeerClient.connect(alice.addrs()[0]) as client:
            start = trio.current_time()
            with trio.fail_after(10), pytest.raises(DeadlineExceeded):
                await collect(client, request(model="clocked-model", on_peers=(bob.peer_id,), timeout_ms=3000))
            assert trio.current_time() - start < 6.0
        (seen,) = clocked.timeouts
        assert 0 < seen <= 3.0, f"bob was given {seen} s: what was left of the caller's 3 s (not his own 120 s)"
        await until(lambda: bob.admission.idle and alice.admission.idle, timeout=2)


@pytest.mark.parametrize("enable_mesh", ["default", "0"])
async def test_a_daemon_routes_through_the_mesh_unless_told_not_to(tmp_path, enable_mesh):
    alice_env = {} if enable_mesh == "default" else {"ACCELMESH_ENABLE_MESH": enable_mesh}
    async with running_daemon(tmp_path, "alice", **QUIET, **alice_env) as alice, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **QUIET) as bob:
        await until(lambda: bob.peer_id in alice.table)
        async with PeerClient.connect(alice.addrs()[0]) as client:  # no provider named: alice's own chain decides
            peers = [(await collect(client, request(f"turn {i}", provider=None)))[-1].peer for i in range(4)]
        if enable_mesh == "default":
            assert sorted(peers) == sorted([alice.peer_id, bob.peer_id] * 2), "the mesh comes first in the chain"
        else:
            assert peers == [alice.peer_id] * 4 and bob.info()["stats"]["inferences"] == 0


class OneBigPiece(ScriptedProvider):
    """Hands over its whole answer as one piece, longer than a Chunk may carry."""

    async def astream(self, request):
        from node.providers.base import Completion

        text = "x" * 150_000
        yield text
        yield Completion(text, model="big")


async def test_a_piece_longer_than_a_chunk_is_sent_as_several_chunks(tmp_path):
    from protocols.inference.messages import MAX_CHUNK_CHARS

    node.register_llm_provider("big", lambda: OneBigPiece("big"))
    async with running_daemon(tmp_path, "alice", **QUIET) as alice:
        async with PeerClient.connect(alice.addrs()[0]) as client:
            *chunks, result = await collect(client, request("x", model=None, provider="big"))
        assert [len(c) for c in chunks] == [MAX_CHUNK_CHARS, MAX_CHUNK_CHARS, 150_000 - 2 * MAX_CHUNK_CHARS]
        assert "".join(chunks) == result.verify()["text"]


async def test_a_long_non_ascii_prompt_goes_through_the_control_channel(tmp_path):
    prompt = "é" * 600_000  # 1.2 MB of UTF-8: past msgpack's default string bound, within the protocol's
    async with running_daemon(tmp_path, "alice", **QUIET) as alice:
        def blocking():
            with node.connect(data_dir=alice.data_dir.path) as client:
                return client.generate_text(prompt, provider="echo", cache="no-store")

        assert await trio.to_thread.run_sync(blocking) == "echo: " + prompt
