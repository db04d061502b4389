"""Protocol messages: round trips for every message, adverts' signatures and versions, the
inference state machine between two sides joined by a fake link, and the cache and control rules."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.advert.messages import (
    Accelerator, Advert, GetAdvert, Load, ProviderEntry, decode_advert, encode_advert, sign_advert, verified_advert,
    verify_advert,
)
from protocols.cache.messages import Found, Get, NotFound, check_found
from protocols.canonical import response_bytes
from protocols.cid import cid_of
from protocols.codec import decode, encode
from protocols.control.messages import COMMANDS, Command, ErrorInfo, Reply
from protocols.errors import (
    BadSignature, CIDMismatch, ExpiredRecord, FlowControlViolation, LocalProtocolError, MalformedMessage,
    RemoteProtocolError, UnsupportedVersion,
)
from protocols.framing import NEED_DATA
from protocols.inference.machine import InferenceStream, Role, State
from protocols.inference.messages import (
    CACHE_MODES, CACHE_TIERS, ERROR_CODES, ChatMessage, Chunk, Credit, Error, Request, Result,
)
from protocols.records import Identity

NOW = 1_800_000_000_000
alice, mallory = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x03" * 32)


def make_advert(identity: Identity = alice, *, seq: int = 1, created: int = NOW, protocol: str = "1.0") -> Advert:
    return sign_advert(
        identity,
        addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{identity.peer_id}",),
        providers=(ProviderEntry("echo", ("generate", "chat"), ("echo",), True),
                   ProviderEntry("hf_local", ("generate",), ("accelmesh-tiny",), True)),
        accelerators=(Accelerator("cpu", "x86_64", 24 << 30, 20 << 30, cores=2),
                      Accelerator("cuda", "NVIDIA H100", 80 << 30, 79 << 30, index=0)),
        capacity=64, queue=256, load=Load(3, 0), software="accelmesh/0.1.0", protocol=protocol,
        seq=seq, created=created, expires=created + 90_000,
    )


# -- strategies: every message, with values inside its bounds --------------------------------

text = st.text(max_size=40)
peer = st.sampled_from([alice.peer_id, mallory.peer_id])
providers = st.builds(ProviderEntry, name=st.text(max_size=64), tasks=st.lists(
    st.sampled_from(["generate", "chat", "embed"]), max_size=3).map(tuple),
    models=st.lists(st.text(max_size=30), max_size=4).map(tuple), ready=st.booleans())
accelerators = st.builds(Accelerator, kind=st.sampled_from(["cuda", "rocm", "mps", "cpu"]), name=text,
                         memory_total=st.integers(0, 2**53), memory_free=st.integers(0, 2**53),
                         index=st.integers(0, 1023), cores=st.none() | st.integers(0, 1024))
adverts = st.builds(
    Advert, peer_id=peer, public_key=st.binary(max_size=64), addrs=st.lists(text, max_size=3).map(tuple),
    providers=st.lists(providers, max_size=3).map(tuple), accelerators=st.lists(accelerators, min_size=1,
                                                                                 max_size=3).map(tuple),
    capacity=st.integers(0, 1 << 20), queue=st.integers(0, 1 << 24),
    load=st.builds(Load, in_flight=st.integers(0, 100), queued=st.integers(0, 100)),
    software=text, protocol=st.sampled_from(["1.0", "1.7"]), seq=st.integers(0, 2**53),
    created=st.integers(0, 2**53), expires=st.integers(0, 2**53), signature=st.binary(max_size=64))
params = st.dictionaries(st.text(max_size=10), st.none() | st.integers(-5, 5) | st.floats(-1, 1) | text, max_size=4)


@st.composite
def requests(draw):
    task = draw(st.sampled_from(["generate", "chat", "embed"]))
    chat = task == "chat"
    return Request(
        id=draw(st.text(max_size=64)), task=task, timeout_ms=draw(st.integers(1, 3_600_000)),
        prompt=None if chat else draw(text),
        messages=tuple(draw(st.lists(st.builds(ChatMessage, role=st.text(max_size=32), content=text),
                                     max_size=3))) if chat else None,
        model=draw(st.none() | text), provider=draw(st.none() | st.text(max_size=64)), params=draw(params),
        stream=draw(st.booleans()), hops=draw(st.integers(0, 2)), cache=draw(st.sampled_from(CACHE_MODES)),
        strategy=draw(st.none() | st.text(max_size=32)), on_peers=tuple(draw(st.lists(peer, max_size=2))),
        accelerator=draw(st.none() | st.sampled_from(["cuda", "cpu"])), window=draw(st.integers(1, 1024)),
    )


results = st.builds(Result, response=st.binary(max_size=200), cid=text, key=text, provider=text, peer=peer,
                    cache=st.sampled_from(CACHE_TIERS), timings=st.dictionaries(
                        st.text(max_size=10), st.floats(0, 1e6), max_size=3), served_from=st.none() | peer)
errors = st.builds(Error, code=st.sampled_from(ERROR_CODES), message=text, retryable=st.booleans(),
                   retry_after=st.none() | st.floats(0, 100))
json_values = st.recursive(st.none() | st.booleans() | st.integers(-10, 10) | text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=10)

MESSAGES = {
    "advert": (adverts, Advert),
    "get-advert": (st.just(GetAdvert()), GetAdvert),
    "request": (requests(), Request),
    "chunk": (st.builds(Chunk, index=st.integers(0, (1 << 32) - 1), text=text), Chunk),
    "credit": (st.builds(Credit, n=st.integers(1, 1024)), Credit),
    "result": (results, Result),
    "error": (errors, Error),
    "get": (st.builds(Get, cid=text), Get),
    "found": (st.builds(Found, cid=text, data=st.binary(max_size=100)), Found),
    "not-found": (st.builds(NotFound, cid=text), NotFound),
    "command": (st.builds(Command, command=st.sampled_from(COMMANDS), args=st.dictionaries(
        st.text(max_size=10), json_values, max_size=3)), Command),
    "reply": (st.builds(Reply, ok=st.just(True), result=json_values) | st.builds(
        Reply, ok=st.just(False), error=st.builds(ErrorInfo, code=st.text(max_size=32), message=text)), Reply),
}


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_every_message_round_trips(name):
    strategy, cls = MESSAGES[name]

    @settings(max_examples=60, deadline=None)
    @given(strategy)
    def round_trip(message):
        assert decode(encode(message), cls) == message

    round_trip()


# -- adverts -----------------------------------------------------------------------------------


def test_advert_signed_by_its_subject_verifies_after_a_round_trip():
    advert = make_advert()
    assert verified_advert(encode_advert(advert), NOW) == advert


def test_advert_forged_by_mallory_is_refused():
    forged = dataclasses.replace(make_advert(mallory), peer_id=alice.peer_id)
    with pytest.raises(BadSignature, match="signer is not the subject"):
        verify_advert(forged, NOW)


def test_tampered_advert_is_refused():
    tampered = dataclasses.replace(make_advert(), capacity=10_000)
    with pytest.raises(BadSignature, match="does not verify"):
        verify_advert(tampered, NOW)


def test_advert_from_a_newer_major_protocol_is_unsupported():
    with pytest.raises(UnsupportedVersion):
        verify_advert(make_advert(protocol="2.0"), NOW)
    verify_advert(make_advert(protocol="1.9"), NOW)  # a newer minor is fine


def test_expired_advert_is_refused():
    with pytest.raises(ExpiredRecord):
        verify_advert(make_advert(created=NOW - 600_000), NOW)


def test_advert_must_list_an_accelerator():
    d = make_advert().to_dict()
    d["accelerators"] = []
    import msgpack

    with pytest.raises(MalformedMessage, match="at least one accelerator"):
        decode_advert(msgpack.packb(d, use_bin_type=True))


# -- the inference state machine between two sides --------------------------------------------


def request(stream=True, window=2) -> Request:
    return Request(id="r1", task="generate", timeout_ms=30_000, prompt="hi", stream=stream, window=window)


def link(sender: InferenceStream, receiver: InferenceStream, data: bytes) -> list:
    receiver.receive_data(data)
    events = []
    while (event := receiver.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def response(text="echo: hi"):
    data = response_bytes(task="generate", model="echo", text=text)
    return Result(response=data, cid=cid_of(data), key="k", provider="echo", peer=alice.peer_id, cache="miss")


def test_request_chunks_credit_result():
    client, server = InferenceStream(Role.CLIENT), InferenceStream(Role.SERVER)
    assert link(client, server, client.send(request(window=2))) == [request(window=2)]
    got = link(server, client, server.chunk("echo:") + server.chunk(" hi"))
    assert [c.text for c in got] == ["echo:", " hi"]
    assert not server.can_send_chunk  # the window is used up
    with pytest.raises(LocalProtocolError, match="no credit"):
        server.chunk("!")
    link(client, server, client.send(Credit(1)))
    assert server.can_send_chunk
    result = response()
    assert link(server, client, server.send(result)) == [result]
    assert client.state is State.DONE and server.state is State.DONE
    assert result.verify()["text"] == "echo: hi"


def test_server_that_ignores_the_window_is_caught_by_the_client():
    client, rogue = InferenceStream(Role.CLIENT), InferenceStream(Role.SERVER)
    link(client, rogue, client.send(request(window=1)))
    rogue.credit = 10  # a server that does not honour the client's window
    client.receive_data(rogue.chunk("a") + rogue.chunk("b"))
    client.next_event()
    with pytest.raises(FlowControlViolation):
        client.next_event()


def test_out_of_order_chunks_are_refused():
    client = InferenceStream(Role.CLIENT)
    client.send(request())
    other = InferenceStream(Role.SERVER)
    other.receive_data(InferenceStream(Role.CLIENT).send(request()))
    other.next_event()
    other.chunks = 1  # skips chunk 0
    with pytest.raises(MalformedMessage, match="index"):
        link(other, client, other.chunk("late"))


def test_no_chunks_for_a_non_streaming_request():
    client, server = InferenceStream(Role.CLIENT), InferenceStream(Role.SERVER)
    link(client, server, client.send(request(stream=False)))
    with pytest.raises(LocalProtocolError, match="no streaming"):
        server.chunk("x")
    assert link(server, client, server.send(response())) == [response()]


def test_one_request_at_a_time_and_nothing_after_an_answer_but_the_next_request():
    client, server = InferenceStream(Role.CLIENT), InferenceStream(Role.SERVER)
    link(client, server, client.send(request()))
    with pytest.raises(LocalProtocolError, match="one Request at a time"):
        client.send(request())
    second = InferenceStream(Role.CLIENT).send(request())
    with pytest.raises(RemoteProtocolError, match="second Request before the answer"):
        link(client, server, second)
    error = Error(code="busy", message="queue full", retryable=True, retry_after=0.5)
    link(server, client, server.send(error))
    with pytest.raises(LocalProtocolError, match="done"):
        server.send(error)
    with pytest.raises(RemoteProtocolError, match="after the answer was done"):
        link(server, client, _raw_error_frame(error))


def test_keep_alive_a_stream_carries_the_next_request_after_an_answer():
    client, server = InferenceStream(Role.CLIENT), InferenceStream(Role.SERVER)
    for i in range(3):
        got = link(client, server, client.send(request(window=2)))
        assert got[0].window == 2 and server.state is State.ACTIVE and server.chunks == 0 and server.credit == 2
        assert [c.text for c in link(server, client, server.chunk("a") + server.chunk("b"))] == ["a", "b"]
        link(server, client, server.send(response()))
        assert client.state is State.DONE and server.state is State.DONE
    assert client.requests == server.requests == 3


def _raw_error_frame(error: Error) -> bytes:
    from protocols.framing import encode_frame

    return encode_frame(encode(error))


def test_server_messages_before_a_request_are_refused():
    client = InferenceStream(Role.CLIENT)
    with pytest.raises(RemoteProtocolError):
        link(None, client, _raw_error_frame(Error(code="internal", message="x")))
    server = InferenceStream(Role.SERVER)
    with pytest.raises(RemoteProtocolError, match="Credit before"):
        link(None, server, _credit_frame())
    with pytest.raises(LocalProtocolError):
        InferenceStream(Role.SERVER).send(Chunk(0, "x"))


def _credit_frame() -> bytes:
    from protocols.framing import encode_frame

    return encode_frame(encode(Credit(1)))


def test_a_client_message_type_from_the_server_is_malformed():
    client = InferenceStream(Role.CLIENT)
    client.send(request())
    with pytest.raises(MalformedMessage, match="unexpected message type"):
        link(None, client, _credit_frame())


def test_result_with_wrong_cid_is_detected_by_hashing():
    lying = dataclasses.replace(response(), response=response_bytes(task="generate", model="echo", text="lie"))
    with pytest.raises(CIDMismatch):
        lying.verify()


def test_request_needs_exactly_the_input_of_its_task():
    with pytest.raises(ValueError):
        Request(id="x", task="chat", timeout_ms=1, prompt="p")
    with pytest.raises(ValueError):
        Request(id="x", task="generate", timeout_ms=1, messages=(ChatMessage("user", "hi"),))


# -- cache and control -------------------------------------------------------------------------


def test_found_bytes_are_verified_against_the_cid():
    data = b"block"
    assert check_found(Get(cid_of(data)), Found(cid_of(data), data)) == data
    assert check_found(Get(cid_of(data)), NotFound(cid_of(data))) is None
    with pytest.raises(CIDMismatch):
        check_found(Get(cid_of(data)), Found(cid_of(data), b"other"))
    with pytest.raises(MalformedMessage, match="answer is for"):
        check_found(Get(cid_of(data)), Found(cid_of(b"x"), b"x"))


def test_control_command_names_are_a_closed_set():
    import msgpack

    raw = msgpack.packb({"t": "command", "v": 1, "command": "rm -rf", "args": {}})
    with pytest.raises(MalformedMessage, match="command"):
        decode(raw, Command)


# -- found by writing the specs: each of these was once accepted or crashed ------------------


@pytest.mark.parametrize("version", ["\u00b2.0", "\u0661.0", "1", "1.", ".1", "1.0.0", " 1.0", "1e3.0"])
def test_protocol_version_must_be_ascii_major_dot_minor(version):
    with pytest.raises(MalformedMessage, match="MAJOR.MINOR"):
        verify_advert(make_advert(protocol=version), NOW)


def test_a_credit_that_crosses_the_result_is_ignored_by_the_server():
    client, server = InferenceStream(Role.CLIENT), InferenceStream(Role.SERVER)
    link(client, server, client.send(request(window=1)))
    late_credit = client.send(Credit(1))  # sent before the client saw the result
    server.send(response())
    assert link(client, server, late_credit) == [Credit(1)] and server.state is State.DONE


def test_response_bytes_carry_nothing_but_the_answer():
    import msgpack

    from protocols.canonical import decode_response, encode

    body = msgpack.unpackb(response_bytes(task="generate", model="echo", text="x"))
    with pytest.raises(MalformedMessage, match="unknown field"):
        decode_response(encode({**body, "served_by": "12D3KooW..."}))


def test_a_reply_carries_an_error_exactly_when_it_failed():
    import msgpack

    for bad in ({"ok": True, "error": {"code": "x", "message": "y"}}, {"ok": False}):
        with pytest.raises(MalformedMessage):
            decode(msgpack.packb({"t": "reply", "v": 1, **bad}), Reply)


def test_maps_with_a_repeated_key_are_refused():
    # {"t": "get", "v": 1, "cid": "a", "cid": "b"}: other decoders might keep the first "cid"
    raw = b"\x84\xa1t\xa3get\xa1v\x01\xa3cid\xa1a\xa3cid\xa1b"
    with pytest.raises(MalformedMessage, match="repeats a key"):
        decode(raw, Get)


def test_a_prompt_of_a_million_non_ascii_characters_fits():
    prompt = "\u00e9" * (1024 * 1024)  # 2 MiB of UTF-8
    client, server = InferenceStream(Role.CLIENT), InferenceStream(Role.SERVER)
    got = link(client, server, client.send(Request(id="r", task="generate", timeout_ms=1000, prompt=prompt)))
    assert got[0].prompt == prompt
