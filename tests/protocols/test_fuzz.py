"""Seeded mutation fuzzing: whatever bytes a peer sends, only a ProtocolError comes out of a decoder.

Each decoder gets 10,000 mutants (truncated, bit-flipped, spliced, oversize and over-long
length prefixes, deep nesting, huge container headers, ext types, wrong field types). Seeds are
fixed, so a failure reproduces; the corpus is valid frames of each decoder.
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
from protocols.inference.machine import InferenceStream, Role
from protocols.inference.messages import ChatMessage, Chunk, Credit, Error, Request, Result
from protocols.records import Identity, sign_cache_record, validate_cache_value
from tests.protocols.test_codec import Sample, valid
from tests.protocols.test_messages import make_advert

N = 10_000


def frames(data: bytes) -> list[bytes]:
    decoder = FrameDecoder(max_frame_size=64 * 1024)
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

DECODERS = {
    "framing": (frames, FRAME_CORPUS),
    "codec message": (lambda data: decode(data, Sample), [encode(valid())]),
    "canonical response": (decode_response, RESPONSE_CORPUS),
    "framed message": (lambda data: [decode(f, Sample) for f in frames(data)], [encode_frame(encode(valid()))]),
    "advert (decode and verify)": (_advert_then_verify, [encode(make_advert(created=NOW))]),
    "get-advert": (lambda data: decode(data, GetAdvert), [encode(GetAdvert())]),
    "inference, server side": (_server_side, _CLIENT_FRAMES),
    "inference, client side": (_client_side, _SERVER_FRAMES),
    "cache messages": (lambda data: decode(data, (Get, Found, NotFound)),
                       [encode(Get(cid_of(b"x"))), encode(Found(cid_of(b"x"), b"x")), encode(NotFound("b"))]),
    "control messages": (lambda data: decode(data, (Command, Reply)),
                         [encode(Command("cache-get", {"cid": "bafk", "n": [1, 2.5, None, {"a": True}]})),
                          encode(Reply(True, {"peers": [{"peer_id": "x", "latency_ms": None}]})),
                          encode(Reply(False, None, ErrorInfo("no_daemon", "none")))]),
    "cache record validator": (lambda data: validate_cache_value(f"/accelmesh/{_KEY}", data, NOW),
                               [encode(_RECORD)]),
}


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_only_protocol_errors_escape(name):
    decoder, corpus = DECODERS[name]
    for valid_input in corpus[:1]:
        decoder(valid_input)  # the corpus is valid where it should be
    outcomes = check_decoder(decoder, corpus, n=N, seed=zlib.crc32(name.encode()))
    assert outcomes["rejected"] > N // 10, outcomes  # the mutants really do reach the rejection paths


def test_cid_parser_only_raises_protocol_errors():
    import random

    from protocols.errors import ProtocolError

    rng = random.Random(7)
    good = cid_of(b"x")
    alphabet = "abcdefghijklmnopqrstuvwxyz234567QmzZ01!/ "
    for i in range(N):
        text = list(good)
        for _ in range(rng.randint(1, 5)):
            text[rng.randrange(len(text))] = rng.choice(alphabet)
        candidate = "".join(text)[: rng.randint(0, len(text))] if i % 3 == 0 else "".join(text)
        try:
            parse(candidate)
        except ProtocolError:
            pass
