"""The bounded msgpack codec: round trips, field validation, versions, and limits at and past the limit."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import codec
from protocols.codec import (
    Any_, Bool, Bytes, Dict, Float, Int, Limits, List, Message, Nested, Str, decode, encode, field, unpack,
)
from protocols.errors import LocalProtocolError, MalformedMessage, UnsupportedVersion


@dataclasses.dataclass(frozen=True)
class Point(Message):
    x: int = field(Int(-100, 100))
    y: int = field(Int(-100, 100))


@dataclasses.dataclass(frozen=True)
class Sample(Message):
    TYPE = "sample"
    VERSION = 2
    name: str = field(Str(max_len=16))
    blob: bytes = field(Bytes(max_len=32))
    count: int = field(Int(0, 1000))
    ratio: float = field(Float(0.0, 1.0))
    flag: bool = field(Bool())
    tags: tuple[str, ...] = field(List(Str(max_len=8), max_items=4))
    attrs: dict = field(Dict(Int(0, 9), max_items=3, max_key_len=8))
    where: Point = field(Nested(Point))
    extra: object = field(Any_(), optional=True)
    note: str | None = field(Str(choices=("a", "b")), optional=True)


samples = st.builds(
    Sample,
    name=st.text(max_size=16),
    blob=st.binary(max_size=32),
    count=st.integers(0, 1000),
    ratio=st.floats(0.0, 1.0),
    flag=st.booleans(),
    tags=st.lists(st.text(max_size=8), max_size=4).map(tuple),
    attrs=st.dictionaries(st.text(max_size=8), st.integers(0, 9), max_size=3),
    where=st.builds(Point, x=st.integers(-100, 100), y=st.integers(-100, 100)),
    extra=st.none() | st.integers(-5, 5) | st.lists(st.text(max_size=3), max_size=3),
    note=st.sampled_from([None, "a", "b"]),
)


@settings(max_examples=300, deadline=None)
@given(samples)
def test_round_trip(message):
    assert decode(encode(message), Sample) == message


def valid() -> Sample:
    return Sample("n", b"\x00", 1, 0.5, True, ("t",), {"k": 1}, Point(1, 2))


def wire(**changes) -> bytes:
    d = valid().to_dict()
    for key, value in changes.items():
        if value is dataclasses.MISSING:
            d.pop(key, None)
        else:
            d[key] = value
    return msgpack.packb(d, use_bin_type=True)


def test_unknown_fields_are_ignored_for_forward_compatibility():
    assert decode(wire(added_in_v2_1="hello"), Sample) == valid()


def test_missing_required_field_is_named():
    with pytest.raises(MalformedMessage) as info:
        decode(wire(count=dataclasses.MISSING), Sample)
    assert info.value.field == "count" and info.value.message_type == "sample"


@pytest.mark.parametrize(
    "name,value,field_name",
    [
        ("name", 7, "name"), ("name", "x" * 17, "name"), ("blob", "text", "blob"), ("blob", b"x" * 33, "blob"),
        ("count", 1001, "count"), ("count", True, "count"), ("count", 1.0, "count"),
        ("ratio", 1.5, "ratio"), ("ratio", "0.5", "ratio"), ("ratio", float("nan"), "ratio"),
        ("flag", 1, "flag"), ("tags", "t", "tags"), ("tags", ["a"] * 5, "tags"), ("tags", [1], "tags[0]"),
        ("attrs", {"k": 10}, "attrs.k"), ("attrs", {"long-key-9": 1}, "attrs"), ("attrs", [1], "attrs"),
        ("where", {"x": 1}, "y"), ("where", 5, "where"), ("note", "c", "note"), ("extra", b"bin", "extra"),
    ],
)
def test_mistyped_or_out_of_bounds_fields_are_named(name, value, field_name):
    with pytest.raises(MalformedMessage) as info:
        decode(wire(**{name: value}), Sample)
    assert info.value.field == field_name


def test_optional_fields_may_be_absent_or_nil():
    assert decode(wire(note=None), Sample).note is None
    assert decode(wire(note=dataclasses.MISSING), Sample).note is None


def test_newer_major_version_is_unsupported_and_older_is_read():
    with pytest.raises(UnsupportedVersion) as info:
        decode(wire(v=3), Sample)
    assert info.value.got == 3
    assert decode(wire(v=1), Sample) == valid()
    for bad in (0, "2", None, True):
        with pytest.raises(MalformedMessage, match="version"):
            decode(wire(v=bad), Sample)


def test_wrong_message_type_is_refused():
    with pytest.raises(MalformedMessage, match="unexpected message type"):
        decode(wire(t="other"), Sample)
    with pytest.raises(MalformedMessage, match="expected a map"):
        decode(msgpack.packb([1, 2]), Sample)


def test_ext_types_are_refused():
    with pytest.raises(MalformedMessage, match="ext"):
        unpack(msgpack.packb(msgpack.ExtType(5, b"abc")))


def test_trailing_bytes_are_refused():
    with pytest.raises(MalformedMessage):
        unpack(msgpack.packb(1) + b"\x01")


@pytest.mark.parametrize(
    "limit_name,at_limit,over",
    [
        ("max_str_len", "s" * 10, "s" * 11),
        ("max_bin_len", b"b" * 10, b"b" * 11),
        ("max_array_len", [0] * 10, [0] * 11),
        ("max_map_len", {str(i): 0 for i in range(10)}, {str(i): 0 for i in range(11)}),
    ],
)
def test_unpack_limits_at_the_limit_and_one_past_it(limit_name, at_limit, over):
    limits = Limits(**{limit_name: 10})
    assert unpack(msgpack.packb(at_limit, use_bin_type=True), limits) == at_limit
    with pytest.raises(MalformedMessage):
        unpack(msgpack.packb(over, use_bin_type=True), limits)


def test_nesting_depth_at_the_limit_and_one_past_it():
    def nested(depth):
        value: list = []
        for _ in range(depth - 1):
            value = [value]
        return value

    limits = Limits(max_depth=5)
    assert unpack(msgpack.packb(nested(5)), limits) == nested(5)
    with pytest.raises(MalformedMessage, match="deeper than 5"):
        unpack(msgpack.packb(nested(6)), limits)
    with pytest.raises(MalformedMessage):
        unpack(b"\x91" * 100_000 + b"\xc0")  # far past msgpack's own stack


def test_encoding_a_message_without_a_type_is_our_bug():
    with pytest.raises(LocalProtocolError):
        encode(Point(1, 2))


def test_encoding_drops_absent_optionals_and_tags_type_and_version():
    d = msgpack.unpackb(encode(valid()))
    assert d["t"] == "sample" and d["v"] == 2 and "note" not in d and "extra" not in d


def test_floats_travel_as_float64():
    assert b"\xcb" in encode(valid()) and codec.pack(0.5) == b"\xcb\x3f\xe0\x00\x00\x00\x00\x00\x00"
