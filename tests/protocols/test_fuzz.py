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
from tests.protocols.test_codec import Sample, valid

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

DECODERS = {
    "framing": (frames, FRAME_CORPUS),
    "codec message": (lambda data: decode(data, Sample), [encode(valid())]),
    "canonical response": (decode_response, RESPONSE_CORPUS),
    "framed message": (lambda data: [decode(f, Sample) for f in frames(data)], [encode_frame(encode(valid()))]),
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
