"""Varint framing: byte-compatible with libp2p, incremental, and every limit enforced before allocation."""

import random

import pytest
from libp2p.utils.varint import encode_uvarint, encode_varint_prefixed

from protocols.errors import FrameTooLarge, LocalProtocolError, MalformedMessage
from protocols.framing import (
    MAX_FRAME_SIZE,
    MAX_VARINT_BYTES,
    NEED_DATA,
    FrameDecoder,
    encode_frame,
    encode_varint,
    varint_length,
)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16383, 16384, 65536, 2**21, 2**21 + 5])
def test_frames_are_byte_identical_to_libp2p(size):
    payload = bytes(random.Random(size).randrange(256) for _ in range(min(size, 4096))) * (size // 4096 + 1)
    payload = payload[:size]
    assert encode_frame(payload) == encode_varint_prefixed(payload)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 255, 256, 2**14, 2**21 - 1, 2**28, 2**35, 2**63 - 1])
def test_varints_match_libp2p(value):
    assert encode_varint(value) == encode_uvarint(value)


def test_libp2p_frames_decode_byte_by_byte():
    payloads = [b"", b"a", b"x" * 200, bytes(range(256)) * 70]
    wire = b"".join(encode_varint_prefixed(p) for p in payloads)
    decoder, out = FrameDecoder(), []
    for i in range(len(wire)):
        decoder.receive_data(wire[i : i + 1])
        while (frame := decoder.next_frame()) is not NEED_DATA:
            out.append(frame)
    assert out == payloads and decoder.pending == 0 and not decoder.in_frame


def test_many_frames_in_one_chunk_and_need_data_in_between():
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b"one") + encode_frame(b"two") + encode_frame(b"three")[:3])
    assert decoder.next_frame() == b"one" and decoder.next_frame() == b"two"
    assert decoder.next_frame() is NEED_DATA and decoder.in_frame
    decoder.receive_data(encode_frame(b"three")[3:])
    assert decoder.next_frame() == b"three" and decoder.next_frame() is NEED_DATA
    assert repr(NEED_DATA) == "NEED_DATA" and not NEED_DATA


def test_frame_at_the_limit_passes_and_one_byte_more_is_refused_from_the_prefix_alone():
    decoder = FrameDecoder(max_frame_size=1000)
    decoder.receive_data(encode_frame(b"z" * 1000, 1000))
    assert decoder.next_frame() == b"z" * 1000
    over = FrameDecoder(max_frame_size=1000)
    over.receive_data(encode_varint(1001))  # only the prefix: no payload byte has arrived
    with pytest.raises(FrameTooLarge) as info:
        over.next_frame()
    assert (info.value.size, info.value.limit) == (1001, 1000)


def test_hard_maximum_without_arguments():
    decoder = FrameDecoder()
    assert decoder.max_frame_size == MAX_FRAME_SIZE
    decoder.receive_data(encode_varint(MAX_FRAME_SIZE + 1))
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_settings_may_only_lower_the_limit():
    with pytest.raises(ValueError, match="may only lower"):
        FrameDecoder(max_frame_size=MAX_FRAME_SIZE + 1)
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_size=0)


def test_overlong_varint_is_refused_once_it_exceeds_what_the_limit_needs():
    decoder = FrameDecoder(max_frame_size=1000)  # 1000 needs 2 varint bytes
    assert varint_length(1000) == 2
    decoder.receive_data(b"\x80\x80")
    with pytest.raises(MalformedMessage, match="longer than 2 bytes"):
        decoder.next_frame()
    endless = FrameDecoder()
    endless.receive_data(b"\xff" * 20)
    with pytest.raises(MalformedMessage, match="longer than"):
        endless.next_frame()


def test_non_minimal_varint_is_refused():
    decoder = FrameDecoder()
    decoder.receive_data(b"\x81\x00" + b"x")  # 1 encoded in two bytes
    with pytest.raises(MalformedMessage, match="minimally"):
        decoder.next_frame()


def test_partial_prefix_waits_for_more():
    decoder = FrameDecoder()
    decoder.receive_data(b"\x80")
    assert decoder.next_frame() is NEED_DATA and decoder.in_frame
    decoder.receive_data(b"\x01" + b"y" * 128)
    assert decoder.next_frame() == b"y" * 128


def test_encoding_refuses_a_frame_over_the_limit():
    assert len(encode_frame(b"a" * 10, 10)) == 11
    with pytest.raises(LocalProtocolError, match="refusing to send"):
        encode_frame(b"a" * 11, 10)
    with pytest.raises(LocalProtocolError):
        encode_varint(-1)


def test_repr_shows_state():
    decoder = FrameDecoder(max_frame_size=100)
    decoder.receive_data(b"\x05ab")
    decoder.next_frame()
    assert "5 bytes expected" in repr(decoder)


def test_varints_stop_at_nine_bytes_as_the_unsigned_varint_spec_says():
    assert MAX_VARINT_BYTES == 9
    assert len(encode_varint(2**63 - 1)) == MAX_VARINT_BYTES  # the largest value: 9 bytes
    with pytest.raises(LocalProtocolError, match="at most 9 bytes"):
        encode_varint(2**63)  # would take 10
    with pytest.raises(LocalProtocolError):
        encode_varint(2**70)


@pytest.mark.parametrize("max_frame_size", [1, 127, 128, 1000, 2**20, MAX_FRAME_SIZE])
def test_a_decoder_reads_no_more_prefix_than_its_limit_needs(max_frame_size):
    n = varint_length(max_frame_size)
    assert n <= MAX_VARINT_BYTES
    at = FrameDecoder(max_frame_size)
    at.receive_data(encode_varint(max_frame_size))  # a prefix of exactly n bytes is read
    assert at.next_frame() is NEED_DATA and at.in_frame
    over = FrameDecoder(max_frame_size)
    over.receive_data(b"\x80" * n)  # n bytes that all say "more follows": byte n+1 would be too many
    with pytest.raises(MalformedMessage, match=f"longer than {n} bytes"):
        over.next_frame()
    nine = FrameDecoder(max_frame_size)
    nine.receive_data(encode_varint(2**63 - 1))  # the largest varint: over any frame limit
    with pytest.raises((FrameTooLarge, MalformedMessage)):
        nine.next_frame()
