"""Seeded mutation fuzzing: whatever bytes a peer sends, only a ProtocolError comes out of a decoder.

Each decoder gets 10,000 mutants (truncated, bit-flipped, spliced, oversize and over-long
length prefixes, deep nesting, huge container headers, ext types, wrong field types). Seeds are
fixed, so a failure reproduces; the corpus is valid inputs of each decoder. For decoders that
read frames the structural mutations unframe, mutate the msgpack body and frame again, so they
reach the codec; each test checks that every structural kind was rejected where it aims.
"""

from __future__ import annotations

import zlib

import pytest

from protocols.canonical import decode_response, response_bytes
from protocols.cid import cid_of, parse
from protocols.codec import decode, encode
from protocols.framing import NEED_DATA, FrameDecoder, encode_frame, encode_varint
from tests.protocols.fuzz import check_decoder
from protocols.advert.messages import GetAdvert, verified_advert
from protocols.cache.messages import Found, Get, NotFound
from protocols.control.messages import Command, ErrorInfo, Reply
from protocols.inference import machine
from protocols.inference.machine import InferenceStream, Role
from protocols.inference.messages import (
    CLIENT_MESSAGES, SERVER_MESSAGES, ChatMessage, Chunk, Credit, Error, Request, Result,
)
from protocols.records import Identity, sign_cache_record, validate_cache_value
from tests.protocols.test_codec import Sample, valid
from tests.protocols.test_messages import make_advert

N = 10_000


def frames(data: bytes, max_frame_size: int = 64 * 1024) -> list[bytes]:
    decoder = FrameDecoder(max_frame_size=max_frame_size)
    decoder.receive_data(data)
    out = []
    while (frame := decoder.next_frame()) is not NEED_DATA:
        out.append(frame)
    return out


FRAME_CORPUS = [
    encode_frame(b""),
    encode_frame(b"hello") + encode_frame(b"world"),
    encode_frame(b"x" * 300),
    encode_varint(64 * 1024) + b"y" * 100,      # an incomplete frame at the limit
    encode_varint(64 * 1024 + 1),               # one past the limit
    b"\x80" * 12,                               # an over-long varint
    b"\x81\x00",                                # a non-minimal varint
]

RESPONSE_CORPUS = [
    response_bytes(task="generate", model="echo", text="echo: hi", usage={"prompt_tokens": 1}),
    response_bytes(task="embed", model="m", embedding=[0.1, 0.2, -0.5]),
    response_bytes(task="chat", model="hf_local/x@sha256:ab", text="é" * 50, finish_reason="length"),
]

def _advert_then_verify(data: bytes) -> None:
    verified_advert(data, NOW)


def _server_side(data: bytes) -> None:
    stream = InferenceStream(Role.SERVER)
    stream.receive_data(data)
    while stream.next_event() is not NEED_DATA:
        pass


def _client_side(data: bytes) -> None:
    stream = InferenceStream(Role.CLIENT)
    stream.send(Request(id="r", task="generate", timeout_ms=1000, prompt="p", window=4))
    stream.receive_data(data)
    while stream.next_event() is not NEED_DATA:
        pass


NOW = 1_800_000_000_000
_ALICE = Identity.from_seed(b"\x01" * 32)
_KEY = cid_of(b"request")
_RECORD = sign_cache_record(_ALICE, key=_KEY, cid=cid_of(b"r"), created=NOW, expires=NOW + 1000, seq=1)
_CLIENT_FRAMES = [
    encode_frame(encode(Request(id="r", task="chat", timeout_ms=5000, messages=(ChatMessage("user", "hi"),),
                                params={"temperature": 0.0, "stop": ["x"]}, on_peers=(_ALICE.peer_id,))))
    + encode_frame(encode(Credit(3))),
    encode_frame(encode(Request(id="r2", task="generate", timeout_ms=5000, prompt="p" * 100, stream=False))),
]
_RESULT_BYTES = response_bytes(task="generate", model="echo", text="echo: p")
_SERVER_FRAMES = [
    encode_frame(encode(Chunk(0, "echo:"))) + encode_frame(encode(Chunk(1, " p")))
    + encode_frame(encode(Result(response=_RESULT_BYTES, cid=cid_of(_RESULT_BYTES), key="k", provider="echo",
                                 peer=_ALICE.peer_id, cache="miss", timings={"total": 1.5}))),
    encode_frame(encode(Error(code="busy", message="full", retryable=True, retry_after=1.0))),
]

_ADVERTS = [encode(make_advert(created=NOW)),  # as a 1.0 node sends it
            encode(make_advert(created=NOW, protocol="1.1", echo_capacity=4)),  # 1.1: a provider's capacity
            encode(make_advert(created=NOW, protocol="1.2", echo_capacity=4, echo_identities=("echo",),
                               echo_default_model="echo"))]  # 1.2: model identities, the default model

_SERVER_BODIES = [f for frame in _SERVER_FRAMES for f in frames(frame, 8 * 1024 * 1024)]
_CLIENT_BODIES = [f for frame in _CLIENT_FRAMES for f in frames(frame, 8 * 1024 * 1024)]

# What each structural mutation must have reached: (mutation kind, what rejected it), each seen
# at least once, so a mutator that regresses to producing garbage the framing or msgpack layer
# throws out (or that the decoder never sees) fails the test.
CODEC = {("wrong_type", "bad-field"), ("deep", "too-deep"), ("huge_header", "undecodable")}
FRAMING = {("prefix", "frame-too-large"), ("prefix", "bad-prefix")}

# name: (decoder, corpus, framed, the (kind, outcome) pairs that must occur)
DECODERS = {
    "framing": (frames, FRAME_CORPUS, True, FRAMING),
    "codec message": (lambda data: decode(data, Sample), [encode(valid())], False, CODEC),
    "canonical response": (decode_response, RESPONSE_CORPUS, False, CODEC),
    "framed message": (lambda data: [decode(f, Sample) for f in frames(data)], [encode_frame(encode(valid()))],
                       True, CODEC | FRAMING),
    "advert (decode and verify)": (_advert_then_verify, _ADVERTS, False, CODEC),
    "get-advert": (lambda data: decode(data, GetAdvert), [encode(GetAdvert())], False, CODEC),
    "inference, server side": (_server_side, _CLIENT_FRAMES, True, CODEC | FRAMING),
    "inference, client side": (_client_side, _SERVER_FRAMES, True, CODEC | FRAMING),
    "inference client messages (unframed)": (lambda data: decode(data, CLIENT_MESSAGES, machine._LIMITS),
                                             _CLIENT_BODIES, False, CODEC),
    "inference server messages (unframed)": (lambda data: decode(data, SERVER_MESSAGES, machine._LIMITS),
                                             _SERVER_BODIES, False, CODEC),
    "cache messages": (lambda data: decode(data, (Get, Found, NotFound)),
                       [encode(Get(cid_of(b"x"))), encode(Found(cid_of(b"x"), b"x")), encode(NotFound("b"))],
                       False, CODEC),
    "control messages": (lambda data: decode(data, (Command, Reply)),
                         [encode(Command("cache-get", {"cid": "bafk", "n": [1, 2.5, None, {"a": True}]})),
                          encode(Reply(True, {"peers": [{"peer_id": "x", "latency_ms": None}]})),
                          encode(Reply(False, None, ErrorInfo("not_found", "none")))], False, CODEC),
    "cache record validator": (lambda data: validate_cache_value(f"/accelmesh/{_KEY}", data, NOW),
                               [encode(_RECORD)], False, CODEC),
}


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_only_protocol_errors_escape(name):
    decoder, corpus, framed, must_reach = DECODERS[name]
    for valid_input in corpus[:1]:
        decoder(valid_input)  # the corpus is valid where it should be
    outcomes = check_decoder(decoder, corpus, n=N, seed=zlib.crc32(name.encode()), framed=framed)
    assert outcomes["rejected"] > N // 10, outcomes  # the mutants really do reach the rejection paths
    missing = {(kind, what) for kind, what in must_reach if not outcomes["by_kind"][kind][what]}
    assert not missing, (missing, outcomes["by_kind"])


def test_structural_mutations_of_frames_keep_the_framing_valid():
    """A structural mutant of a framed corpus is whole frames again (its body is what changed)."""
    import random

    from tests.protocols.fuzz import STRUCTURAL, mutate, unframe

    rng, changed = random.Random(1), set()
    for _ in range(2000):
        kind, mutant = mutate(_CLIENT_FRAMES[0], rng, framed=True)
        if kind in STRUCTURAL:
            payloads = unframe(mutant)
            assert payloads is not None and len(payloads) == 2, (kind, mutant[:40])
            if payloads != unframe(_CLIENT_FRAMES[0]):  # (a value may be replaced by an equal one)
                changed.add(kind)
    assert changed == set(STRUCTURAL)


def test_cid_parser_only_raises_protocol_errors():
    import random

    from protocols.errors import ProtocolError

    rng = random.Random(7)
    good = cid_of(b"x")
    alphabet = "abcdefghijklmnopqrstuvwxyz234567QmzZ01!/ "
    outcomes = {"accepted": 0, "rejected": 0}
    for i in range(N):
        text = list(good)
        for _ in range(rng.randint(1, 5)):
            text[rng.randrange(len(text))] = rng.choice(alphabet)
        candidate = "".join(text)[: rng.randint(0, len(text))] if i % 3 == 0 else "".join(text)
        try:
            parse(candidate)
        except ProtocolError:
            outcomes["rejected"] += 1
        else:
            outcomes["accepted"] += 1
    # Both paths are exercised: mutants that are still CIDs (a different digest) and ones that are not.
    assert outcomes["accepted"] > N // 100 and outcomes["rejected"] > N // 10, outcomes
