"""Protocol messages: round trips for every message, adverts' signatures and versions, the
inference state machine between two sides joined by a fake link, and the cache and control rules."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.advert.messages import (
    MAX_ADVERT_BYTES, MAX_CAPACITY, MAX_MODEL_IDENTITY_CHARS, MAX_MODEL_NAME_CHARS, Accelerator, Advert, GetAdvert,
    Load, ProviderEntry, decode_advert, encode_advert, sign_advert, verified_advert, verify_advert,
)
from protocols.cache.messages import Found, Get, NotFound, check_found
from protocols.canonical import response_bytes
from protocols.cid import cid_of
from protocols.codec import FieldsDisagree, decode, encode, pack
from protocols.control.messages import COMMANDS, Command, ErrorInfo, Reply
from protocols.control.messages import ERROR_CODES as CONTROL_ERROR_CODES
from protocols.errors import (
    BadSignature, CIDMismatch, ExpiredRecord, FlowControlViolation, FrameTooLarge, LocalProtocolError,
    MalformedMessage, RemoteProtocolError, UnsendableMessage, UnsupportedVersion,
)
from protocols.framing import NEED_DATA
from protocols.inference.machine import InferenceStream, Role, State
from protocols.inference.messages import (
    CACHE_MODES, CACHE_TIERS, ERROR_CODES, MAX_CHUNK_CHARS, MAX_PROMPT_CHARS, ChatMessage, Chunk, Credit, Error,
    Request, Result,
)
from protocols.records import CacheRecord, Identity

NOW = 1_800_000_000_000
alice, mallory = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x03" * 32)


def make_advert(identity: Identity = alice, *, seq: int = 1, created: int = NOW, protocol: str = "1.0",
                echo_capacity: int | None = None, echo_identities: tuple[str, ...] | None = None,
                echo_default_model: str | None = None) -> Advert:
    """A signed advert; as a 1.0 sender writes it unless `echo_capacity` (1.1) or `echo_identities`
    and `echo_default_model` (1.2) are given."""
    return sign_advert(
        identity,
        addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{identity.peer_id}",),
        providers=(ProviderEntry("echo", ("generate", "chat"), ("echo",), True, echo_capacity, echo_identities,
                                 echo_default_model),
                   ProviderEntry("hf_local", ("generate",), ("accelmesh-tiny",), True)),
        accelerators=(Accelerator("cpu", "x86_64", 24 << 30, 20 << 30, cores=2),
                      Accelerator("cuda", "NVIDIA H100", 80 << 30, 79 << 30, index=0)),
        capacity=64, queue=256, load=Load(3, 0), software="accelmesh/0.1.0", protocol=protocol,
        seq=seq, created=created, expires=created + 90_000,
    )


# -- strategies: every message, with values inside its bounds --------------------------------

text = st.text(max_size=40)
peer = st.sampled_from([alice.peer_id, mallory.peer_id])
models_and_identities = st.lists(st.text(max_size=30), max_size=4).map(tuple).flatmap(
    lambda models: st.tuples(st.just(models), st.none() | st.lists(  # identities: one per model (1.2), or none
        st.just("") | st.text(max_size=40), min_size=len(models), max_size=len(models)).map(tuple)))
providers = models_and_identities.flatmap(lambda mi: st.builds(
    ProviderEntry, name=st.text(max_size=64), tasks=st.lists(
        st.sampled_from(["generate", "chat", "embed"]), max_size=3).map(tuple),
    models=st.just(mi[0]), ready=st.booleans(), capacity=st.none() | st.integers(1, 1 << 20),
    identities=st.just(mi[1]), default_model=st.none() | st.text(max_size=30)))
accelerators = st.builds(Accelerator, kind=st.sampled_from(["cuda", "rocm", "mps", "cpu"]), name=text,
                         memory_total=st.integers(0, 2**53), memory_free=st.integers(0, 2**53),
                         index=st.integers(0, 1023), cores=st.none() | st.integers(0, 1024))
adverts = st.builds(
    Advert, peer_id=peer, public_key=st.binary(max_size=64), addrs=st.lists(text, max_size=3).map(tuple),
    providers=st.lists(providers, max_size=3).map(tuple), accelerators=st.lists(accelerators, min_size=1,
                                                                                 max_size=3).map(tuple),
    capacity=st.integers(0, 1 << 20), queue=st.integers(0, 1 << 24),
    load=st.builds(Load, in_flight=st.integers(0, 100), queued=st.integers(0, 100)),
    software=text, protocol=st.sampled_from(["1.0", "1.1", "1.2", "1.7"]), seq=st.integers(0, 2**53),
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
        Reply, ok=st.just(False), error=st.builds(ErrorInfo, code=st.sampled_from(CONTROL_ERROR_CODES),
                                                  message=text)), Reply),
    "cache-record": (st.builds(CacheRecord, key=text, cid=text, publisher=peer, public_key=st.binary(max_size=64),
                               created=st.integers(0, 2**53), expires=st.integers(0, 2**53),
                               seq=st.integers(0, 2**53), signature=st.binary(max_size=64)), CacheRecord),
}


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_every_message_round_trips(name):
    strategy, cls = MESSAGES[name]

    @settings(max_examples=60, deadline=None)
    @given(strategy)
    def round_trip(message):
        assert decode(encode(message), cls) == message
        assert encode(message) == pack(message.to_dict())  # the checks on encode change no byte

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


# -- provider capacity (protocol 1.1) -----------------------------------------------------------


def _with_echo_capacity(value) -> bytes:
    """A 1.1 advert's bytes with the echo entry's capacity set to `value` (as mallory may send it)."""
    import msgpack

    d = make_advert(protocol="1.1", echo_capacity=4).to_dict()
    d["providers"][0]["capacity"] = value
    return msgpack.packb(d, use_bin_type=True)


def test_provider_capacity_round_trips_and_absent_means_unlimited():
    advert = make_advert(protocol="1.1", echo_capacity=4)
    assert verified_advert(encode_advert(advert), NOW) == advert
    echo, hf = advert.providers
    assert (echo.capacity, hf.capacity) == (4, None)
    wire = advert.to_dict()["providers"]
    assert wire[0]["capacity"] == 4 and "capacity" not in wire[1]  # unlimited is said by leaving it out


def test_an_advert_from_a_1_0_sender_verifies_and_its_providers_read_as_unlimited():
    import msgpack

    data = encode_advert(make_advert(protocol="1.0"))  # what a 1.0 node signs and sends
    assert [set(p) for p in msgpack.unpackb(data)["providers"]] == [{"name", "tasks", "models", "ready"}] * 2
    advert = verified_advert(data, NOW)
    assert [p.capacity for p in advert.providers] == [None, None]


def test_a_provider_capacity_changed_after_signing_breaks_the_signature():
    advert = make_advert(protocol="1.1", echo_capacity=4)
    raised = dataclasses.replace(advert, providers=(dataclasses.replace(advert.providers[0], capacity=64),
                                                    advert.providers[1]))
    with pytest.raises(BadSignature, match="does not verify"):
        verify_advert(raised, NOW)


@pytest.mark.parametrize("value", [0, -1, MAX_CAPACITY + 1, 2**64 - 1, True, False, "4", 4.0, [4]],
                         ids=repr)
def test_mallorys_provider_capacity_outside_1_to_2_20_or_not_an_int_is_refused_naming_the_field(value):
    with pytest.raises(MalformedMessage) as info:
        decode_advert(_with_echo_capacity(value))
    assert info.value.field == "capacity" and "providers[0]" in str(info.value)


def test_provider_capacity_at_the_limit_is_read_and_one_more_is_refused_on_both_sides():
    assert decode_advert(_with_echo_capacity(MAX_CAPACITY))[0].providers[0].capacity == MAX_CAPACITY
    assert decode_advert(_with_echo_capacity(1))[0].providers[0].capacity == 1
    for value in (0, MAX_CAPACITY + 1):
        with pytest.raises(UnsendableMessage) as info:
            encode_advert(make_advert(protocol="1.1", echo_capacity=value))
        assert info.value.field == "capacity"


def test_a_nil_provider_capacity_reads_as_absent_like_every_optional_field():
    """SPEC.md "Encoding": nil is allowed for optional fields only, and means absent. The signature
    covers the nil as received, so it cannot be added or removed on the way."""
    advert = decode_advert(_with_echo_capacity(None))[0]
    assert advert.providers[0].capacity is None


# -- model identities and default models (protocol 1.2) -------------------------------------------

HF_TINY = "hf_local/accelmesh-tiny@sha256:4723dd5460e07a9bf0bf5755a486411d"


def _with_echo(**changes) -> bytes:
    """A 1.2 advert's bytes with fields of the echo entry set to what mallory likes."""
    import msgpack

    d = make_advert(protocol="1.2", echo_identities=("echo",), echo_default_model="echo").to_dict()
    d["providers"][0].update(changes)
    return msgpack.packb(d, use_bin_type=True)


def test_identities_and_the_default_model_round_trip_and_read_per_model():
    advert = make_advert(protocol="1.2", echo_identities=("echo",), echo_default_model="echo")
    assert verified_advert(encode_advert(advert), NOW) == advert
    echo, hf = advert.providers
    assert (echo.identities, echo.default_model, echo.identity_of("echo")) == (("echo",), "echo", "echo")
    assert (hf.identities, hf.default_model, hf.identity_of("accelmesh-tiny")) == (None, None, None)
    wire = advert.to_dict()["providers"]
    assert wire[0]["identities"] == ["echo"] and "identities" not in wire[1] and "default_model" not in wire[1]


def test_an_identity_not_known_yet_is_an_empty_string_and_reads_as_unknown():
    entry = ProviderEntry("hf_local", ("generate",), ("accelmesh-tiny", "org/other"), True, 1, (HF_TINY, ""),
                          "accelmesh-tiny")
    assert decode(encode(sign_advert(alice, addrs=(), providers=(entry,), accelerators=(
        Accelerator("cpu", "x", 0, 0),), capacity=1, queue=0, load=Load(0, 0), software="accelmesh/0.1.0",
        protocol="1.2", seq=1, created=NOW, expires=NOW + 1)), Advert).providers == (entry,)
    assert (entry.identity_of("accelmesh-tiny"), entry.identity_of("org/other"), entry.identity_of("nope")) == (
        HF_TINY, None, None)


def test_an_advert_from_a_1_1_sender_verifies_and_says_no_identity_and_no_default():
    import msgpack

    data = encode_advert(make_advert(protocol="1.1", echo_capacity=4))  # what a 1.1 node signs and sends
    assert set(msgpack.unpackb(data)["providers"][0]) == {"name", "tasks", "models", "ready", "capacity"}
    advert = verified_advert(data, NOW)
    assert [(p.identities, p.default_model) for p in advert.providers] == [(None, None)] * 2


@pytest.mark.parametrize("identities", [[], ["a", "b"], ["echo", ""], ["", "", ""]], ids=repr)
def test_mallorys_identities_of_another_length_than_models_are_refused_naming_the_field(identities):
    with pytest.raises(MalformedMessage) as info:
        decode_advert(_with_echo(identities=identities))
    assert info.value.field == "identities" and "providers[0]" in str(info.value)


def test_identities_of_another_length_than_models_cannot_even_be_built():
    with pytest.raises(FieldsDisagree, match="models has 1") as info:
        ProviderEntry("echo", ("generate",), ("echo",), True, None, ("echo", "echo"))
    assert isinstance(info.value, ValueError) and info.value.field == "identities"  # our bug, not a peer's


@pytest.mark.parametrize("changes", [{"identities": "echo"}, {"identities": [1]}, {"identities": [None]},
                                     {"identities": [b"echo"]}, {"default_model": 1}, {"default_model": ["echo"]}],
                         ids=repr)
def test_mallorys_identities_or_default_model_of_the_wrong_type_are_refused(changes):
    (name,) = changes
    with pytest.raises(MalformedMessage) as info:
        decode_advert(_with_echo(**changes))
    assert info.value.field.startswith(name)


def test_an_identity_and_a_default_model_at_their_limits_are_read_and_one_more_is_refused_on_both_sides():
    at, over = "é" * MAX_MODEL_IDENTITY_CHARS, "é" * (MAX_MODEL_IDENTITY_CHARS + 1)  # characters, not bytes
    assert decode_advert(_with_echo(identities=[at]))[0].providers[0].identities == (at,)
    with pytest.raises(MalformedMessage) as info:
        decode_advert(_with_echo(identities=[over]))
    assert info.value.field == "identities[0]"
    with pytest.raises(UnsendableMessage) as sent:
        encode_advert(make_advert(protocol="1.2", echo_identities=(over,)))
    assert sent.value.field == "identities[0]"
    name, too_long = "m" * MAX_MODEL_NAME_CHARS, "m" * (MAX_MODEL_NAME_CHARS + 1)
    assert decode_advert(_with_echo(default_model=name))[0].providers[0].default_model == name
    with pytest.raises(MalformedMessage) as info:
        decode_advert(_with_echo(default_model=too_long))
    assert info.value.field == "default_model"
    with pytest.raises(UnsendableMessage) as sent:
        encode_advert(make_advert(protocol="1.2", echo_default_model=too_long))
    assert sent.value.field == "default_model"


def test_nil_identities_and_default_model_read_as_absent():
    advert = decode_advert(_with_echo(identities=None, default_model=None))[0]
    assert (advert.providers[0].identities, advert.providers[0].default_model) == (None, None)


def test_an_identity_changed_after_signing_breaks_the_signature():
    advert = make_advert(protocol="1.2", echo_identities=("echo",), echo_default_model="echo")
    changed = dataclasses.replace(advert, providers=(
        dataclasses.replace(advert.providers[0], identities=("echo/other",)), advert.providers[1]))
    with pytest.raises(BadSignature, match="does not verify"):
        verify_advert(changed, NOW)


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


# -- the sender checks its own messages: the peer is never blamed for our bug -----------------


@pytest.mark.parametrize(
    "changes,field_name",
    [
        ({"id": "x" * 65}, "id"), ({"hops": 3}, "hops"), ({"hops": -1}, "hops"),
        ({"timeout_ms": 3_600_001}, "timeout_ms"),
        ({"timeout_ms": 0}, "timeout_ms"), ({"window": 1025}, "window"), ({"window": 0}, "window"),
        ({"on_peers": ("12D3KooW",) * 17}, "on_peers"), ({"on_peers": ("x" * 129,)}, "on_peers[0]"),
        ({"accelerator": "tpu"}, "accelerator"), ({"cache": "sometimes"}, "cache"), ({"model": "m" * 257}, "model"),
        ({"provider": "p" * 65}, "provider"), ({"strategy": "s" * 33}, "strategy"), ({"stream": 1}, "stream"),
        ({"params": {"temperature": float("nan")}}, "params.temperature"), ({"params": {"b": b"x"}}, "params.b"),
        ({"params": {"k" * 65: 1}}, "params"), ({"params": {str(i): i for i in range(65)}}, "params"),
        ({"prompt": "p" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
    ],
)
def test_a_request_out_of_bounds_is_refused_by_the_sender_naming_the_field(changes, field_name):
    bad = dataclasses.replace(request(), **changes)
    with pytest.raises(UnsendableMessage) as info:
        encode(bad)
    assert isinstance(info.value, LocalProtocolError) and not isinstance(info.value, RemoteProtocolError)
    assert (info.value.message_type, info.value.field) == ("request", field_name)


def test_the_audits_request_is_refused_before_a_byte_is_sent():
    bad = dataclasses.replace(request(), id="x" * 500, hops=99, timeout_ms=10**9)
    client = InferenceStream(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="refusing to send request"):
        client.send(bad)
    assert client.state is State.IDLE and client.requests == 0 and client.request is None  # nothing changed
    server = InferenceStream(Role.SERVER)
    assert link(client, server, client.send(request())) == [request()]  # the stream is still usable


def test_a_chat_message_out_of_bounds_is_named_with_its_index():
    chat = Request(id="c", task="chat", timeout_ms=1000,
                   messages=(ChatMessage("user", "hi"), ChatMessage("r" * 33, "hi")))
    with pytest.raises(UnsendableMessage) as info:
        encode(chat)
    assert (info.value.message_type, info.value.field) == ("request.messages[1]", "role")


def test_a_refused_server_message_leaves_the_stream_as_it_was():
    client, server = InferenceStream(Role.CLIENT), InferenceStream(Role.SERVER)
    link(client, server, client.send(request(window=2)))
    with pytest.raises(UnsendableMessage, match="text"):
        server.chunk("x" * (MAX_CHUNK_CHARS + 1))
    assert (server.chunks, server.credit, server.state) == (0, 2, State.ACTIVE)
    with pytest.raises(UnsendableMessage, match="code"):
        server.send(Error(code="teapot", message="no"))
    with pytest.raises(UnsendableMessage, match="cache"):
        server.send(dataclasses.replace(response(), cache="disk"))
    with pytest.raises(UnsendableMessage, match="message"):
        server.send(Error(code="internal", message="m" * 4097))
    assert server.state is State.ACTIVE
    assert [c.text for c in link(server, client, server.chunk("ok"))] == ["ok"]
    assert link(server, client, server.send(response())) == [response()]


def test_a_frame_over_the_limit_is_refused_by_the_sender_and_changes_nothing():
    client = InferenceStream(Role.CLIENT, max_frame_size=1000)
    with pytest.raises(LocalProtocolError, match="refusing to send a frame"):
        client.send(Request(id="r", task="generate", timeout_ms=1000, prompt="p" * 2000))
    assert client.state is State.IDLE


# -- control error codes ---------------------------------------------------------------------


def test_control_error_codes_are_a_closed_set_on_both_sides():
    import msgpack

    assert "failed" in CONTROL_ERROR_CODES  # what node/daemon.py sends for every failed command
    for code in CONTROL_ERROR_CODES:
        reply = Reply(False, error=ErrorInfo(code, "why"))
        assert decode(encode(reply), Reply) == reply
    with pytest.raises(UnsendableMessage) as info:
        encode(Reply(False, error=ErrorInfo("no_daemon", "why")))
    assert (info.value.message_type, info.value.field) == ("reply.error", "code")
    raw = msgpack.packb({"t": "reply", "v": 1, "ok": False, "error": {"code": "no_daemon", "message": "why"}})
    with pytest.raises(MalformedMessage, match="code"):
        decode(raw, Reply)


# -- limits, at the limit and one past it ------------------------------------------------------


def _advert_of_size(size: int) -> Advert:
    """A signed advert whose encoding is exactly `size` bytes: `k` model names of 200 characters
    bring it within reach, then one name of 32..255 characters (a str8: 2 header bytes) fills it."""

    def advert(k: int, filler: int) -> Advert:
        names = ["m" * 200] * k + ["f" * filler]
        providers = tuple(ProviderEntry(f"p{i}", ("generate",), tuple(names[i : i + 64]), True)
                          for i in range(0, len(names), 64))
        return _signed_with(providers)

    k = 0
    while len(encode_advert(advert(k, 100))) < size - 155:
        k += 1
    filler = 100 + size - len(encode_advert(advert(k, 100)))
    assert 32 <= filler <= 255
    result = advert(k, filler)
    assert len(encode_advert(result)) == size
    return result


def _signed_with(providers) -> Advert:
    return sign_advert(
        alice, addrs=(), providers=providers, accelerators=(Accelerator("cpu", "x86_64", 1 << 30, 1 << 29),),
        capacity=1, queue=1, load=Load(0, 0), software="accelmesh/0.1.0", protocol="1.0", seq=1, created=NOW,
        expires=NOW + 90_000,
    )


def test_advert_of_exactly_max_advert_bytes_is_read_and_one_byte_more_is_refused():
    at_limit = _advert_of_size(MAX_ADVERT_BYTES)
    data = encode_advert(at_limit)
    assert len(data) == MAX_ADVERT_BYTES
    assert verified_advert(data, NOW) == at_limit
    over = _advert_of_size(MAX_ADVERT_BYTES + 1)  # valid field by field: only its size is wrong
    with pytest.raises(FrameTooLarge) as info:
        decode_advert(encode_advert(over))
    assert (info.value.size, info.value.limit) == (MAX_ADVERT_BYTES + 1, MAX_ADVERT_BYTES)


def test_a_block_of_exactly_max_block_bytes_fits_a_cache_frame_and_one_byte_more_does_not():
    from protocols.cache import messages as cache
    from protocols.framing import FrameDecoder, encode_frame, encode_varint

    block = b"\xab" * cache.MAX_BLOCK_BYTES
    found = Found("b" + "a" * 127, block)  # the longest CID the field allows
    payload = encode(found)
    assert cache.MAX_BLOCK_BYTES < len(payload) <= cache.MAX_FRAME_SIZE  # the envelope fits the 1 KiB margin
    frame = encode_frame(payload, cache.MAX_FRAME_SIZE)
    decoder = FrameDecoder(cache.MAX_FRAME_SIZE)
    decoder.receive_data(frame)
    assert decode(decoder.next_frame(), Found) == found
    with pytest.raises(UnsendableMessage, match="data"):
        encode(Found(cid_of(b"x"), block + b"\xab"))
    over = pack({"t": "found", "v": 1, "cid": cid_of(b"x"), "data": block + b"\xab"})
    with pytest.raises(MalformedMessage):
        decode(over, Found)
    too_big = FrameDecoder(cache.MAX_FRAME_SIZE)
    too_big.receive_data(encode_varint(cache.MAX_FRAME_SIZE + 1))
    with pytest.raises(FrameTooLarge):
        too_big.next_frame()


WIDE = "\U0001f600"  # four bytes of UTF-8: the worst case for a bound counted in characters


def test_a_chunk_of_max_chunk_chars_passes_and_one_character_more_is_refused_on_both_sides():
    client, server = InferenceStream(Role.CLIENT), InferenceStream(Role.SERVER)
    link(client, server, client.send(request(window=4)))
    text = WIDE * MAX_CHUNK_CHARS
    assert [c.text for c in link(server, client, server.chunk(text))] == [text]
    with pytest.raises(UnsendableMessage, match="text"):
        server.chunk(text + "x")
    raw = _frame({"t": "chunk", "v": 1, "index": 1, "text": text + "x"})
    with pytest.raises(MalformedMessage) as info:
        link(server, client, raw)
    assert info.value.field == "text"


@pytest.mark.parametrize("task", ["generate", "chat"])
def test_a_prompt_of_max_prompt_chars_passes_and_one_character_more_is_refused_on_both_sides(task):
    def build(prompt: str) -> Request:
        if task == "chat":
            return Request(id="r", task="chat", timeout_ms=1000, messages=(ChatMessage("user", prompt),))
        return Request(id="r", task="generate", timeout_ms=1000, prompt=prompt)

    at_limit = build(WIDE * MAX_PROMPT_CHARS)  # 4 MiB of UTF-8: the inference string limit exactly
    client, server = InferenceStream(Role.CLIENT), InferenceStream(Role.SERVER)
    assert link(client, server, client.send(at_limit)) == [at_limit]
    over = build(WIDE * MAX_PROMPT_CHARS + "x")
    with pytest.raises(UnsendableMessage):
        InferenceStream(Role.CLIENT).send(over)
    with pytest.raises(MalformedMessage):
        link(None, InferenceStream(Role.SERVER), _frame(over.to_dict()))


def _frame(fields: dict) -> bytes:
    from protocols.framing import encode_frame

    return encode_frame(pack(fields))
