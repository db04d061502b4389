"""The bounded msgpack codec: round trips, field validation, versions, and limits at and past the limit."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import codec
from protocols.codec import (
    MAX_DEPTH, Any_, Bool, Bytes, Dict, Float, Int, Limits, List, Message, Nested, Str, decode, encode, field, unpack,
)
from protocols.errors import LocalProtocolError, MalformedMessage, UnsendableMessage, UnsupportedVersion


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
    assert encode(message) == codec.pack(message.to_dict())  # checking on encode changes no byte


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


# -- encoding checks what decoding checks: we never send what the peer must refuse -----------


@pytest.mark.parametrize(
    "name,value,field_name",
    [
        ("name", 7, "name"), ("name", "x" * 17, "name"), ("name", None, "name"), ("blob", "text", "blob"),
        ("blob", b"x" * 33, "blob"), ("count", 1001, "count"), ("count", -1, "count"), ("count", True, "count"),
        ("count", 1.0, "count"), pytest.param("count", 10**5000, "count", id="count-huge"), ("ratio", 1.5, "ratio"),
        ("ratio", "0.5", "ratio"),
        ("ratio", float("nan"), "ratio"), ("ratio", 10**400, "ratio"), ("flag", 1, "flag"), ("tags", "t", "tags"),
        ("tags", ("a",) * 5, "tags"), ("tags", (1,), "tags[0]"), ("tags", ("ok", "x" * 9), "tags[1]"),
        ("attrs", {"k": 10}, "attrs.k"), ("attrs", {"long-key-9": 1}, "attrs"), ("attrs", {1: 1}, "attrs"),
        ("attrs", [1], "attrs"), ("where", {"x": 1, "y": 2}, "where"), ("note", "c", "note"),
        ("extra", b"bin", "extra"), ("extra", {"a": [1, float("inf")]}, "extra.a[1]"),
        ("extra", object(), "extra"), ("extra", 2**64, "extra"), ("extra", {1: "x"}, "extra"),
        pytest.param("extra", [-(10**5000)], "extra[0]", id="extra-huge"),
    ],
)
def test_encoding_refuses_a_field_the_peer_would_refuse_and_names_it(name, value, field_name):
    bad = dataclasses.replace(valid(), **{name: value})
    with pytest.raises(UnsendableMessage) as info:
        encode(bad)
    assert isinstance(info.value, LocalProtocolError)  # our bug, never the peer's
    assert info.value.field == field_name and info.value.message_type == "sample"
    assert f"sample.{field_name}" in str(info.value)


def test_encoding_names_a_field_of_a_nested_message():
    with pytest.raises(UnsendableMessage) as info:
        encode(dataclasses.replace(valid(), where=Point(1, 200)))
    assert (info.value.message_type, info.value.field) == ("sample.where", "y")


def test_a_string_that_is_not_utf8_is_refused_on_encode_naming_the_field():
    with pytest.raises(UnsendableMessage) as info:
        encode(dataclasses.replace(valid(), name="\ud800"))
    assert info.value.field == "name"
    with pytest.raises(UnsendableMessage):
        encode(dataclasses.replace(valid(), attrs={"\udfff": 1}))


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_plain_values_nest_to_the_limit_and_not_one_level_more_on_both_sides():
    # The message map is level 1, so `extra` may hold 15 levels of lists and not 16.
    at_limit = dataclasses.replace(valid(), extra=_nested(MAX_DEPTH - 1))
    assert decode(encode(at_limit), Sample) == at_limit
    over = dataclasses.replace(valid(), extra=_nested(MAX_DEPTH))
    with pytest.raises(UnsendableMessage, match="deeper than"):
        encode(over)
    with pytest.raises(MalformedMessage, match="deeper than"):
        decode(codec.pack(over.to_dict()), Sample)


def test_a_plain_value_that_contains_itself_is_refused_not_a_crash():
    loop: list = []
    loop.append(loop)
    with pytest.raises(UnsendableMessage, match="deeper than"):
        encode(dataclasses.replace(valid(), extra=loop))


@dataclasses.dataclass(frozen=True)
class Tight(Message):
    TYPE = "tight"
    value: object = field(Any_(Limits(max_str_len=8, max_array_len=3, max_map_len=3)))


TIGHT = Limits(max_str_len=8, max_array_len=3, max_map_len=3)  # the message's own map has 3 entries


@pytest.mark.parametrize(
    "at_limit,over",
    [
        ("s" * 8, "s" * 9),
        ("\u00e9" * 4, "\u00e9" * 4 + "s"),  # the bound counts UTF-8 bytes, as msgpack's max_str_len does
        ([1, 2, 3], [1, 2, 3, 4]),
        ({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 2, "c": 3, "d": 4}),
    ],
)
def test_plain_values_are_bounded_by_the_decoders_limits_at_the_limit_and_one_past_it(at_limit, over):
    message = Tight(at_limit)
    assert decode(encode(message), Tight, TIGHT) == message
    with pytest.raises(UnsendableMessage):
        encode(Tight(over))
    with pytest.raises(MalformedMessage):
        decode(codec.pack(Tight(over).to_dict()), Tight, TIGHT)


def test_encoding_something_that_is_not_a_message_is_our_bug():
    with pytest.raises(LocalProtocolError):
        encode({"t": "sample"})  # type: ignore[arg-type]


anything = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
            | st.binary(max_size=40) | st.lists(st.text(max_size=10), max_size=6).map(tuple)
            | st.dictionaries(st.text(max_size=10), st.integers(-2, 12), max_size=4)
            | st.builds(Point, x=st.integers(-200, 200), y=st.integers(-200, 200)))


@settings(max_examples=400, deadline=None)
@given(samples, st.sampled_from([f.name for f in dataclasses.fields(Sample)]), anything)
def test_the_encoder_refuses_exactly_what_the_decoder_refuses(message, name, value):
    message = dataclasses.replace(message, **{name: value})
    try:
        data = encode(message)
    except UnsendableMessage as exc:
        assert exc.field is not None
        wire = {**dataclasses.replace(message, **{name: getattr(valid(), name)}).to_dict(), name: value}
        if value is None:
            wire.pop(name)  # how an absent optional travels
        try:
            raw = codec.pack(wire)  # the value sent as it is, unconverted
        except (TypeError, ValueError, OverflowError):
            return  # not even packable (e.g. a Point where a list belongs): nothing a peer could get
        with pytest.raises(MalformedMessage):
            decode(raw, Sample)
    else:
        decode(data, Sample)  # what we send, the peer reads
