"""A seeded mutation fuzzer for decoders: fast enough for the normal suite (not Hypothesis).

`mutants(corpus, n, seed, framed=...)` yields `n` (kinds, bytes) pairs derived from valid
inputs. Byte-level mutations: truncations, bit flips, byte insertions and deletions, trailing
garbage, random bytes. Structural mutations, applied to the msgpack *body*: for a framed corpus
(``varint(len) || msgpack`` frames, what the state machines read) they unframe the input, mutate
one frame's body and frame it again with a correct length, so the mutant gets past the framing
layer and reaches the codec:

- ``wrong_type``: a value anywhere in the message (nested maps and lists included) replaced by
  one of the wrong type or out of bounds, or a key deleted;
- ``deep``: a value replaced by (or the whole body made of) arrays or maps nested 15 to 5000
  deep, spliced in as raw msgpack (msgpack's own packer refuses such depths);
- ``huge_header``: a value replaced by a container or string header announcing gigabytes, or an
  ext type, spliced in as raw msgpack;
- ``prefix`` (framed corpora only): one frame's length prefix rewritten: over the frame limit,
  over-long or not minimal, shorter or longer than the payload.

`check_decoder` feeds them all to a decoder, fails if anything but a `ProtocolError` escapes,
and counts each outcome by mutation kind and by what rejected it (`classify`), so a test can
assert that every structural kind really reached the layer it targets.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgpack

from protocols.errors import FrameTooLarge, MalformedMessage, ProtocolError
from protocols.framing import MAX_FRAME_SIZE, MAX_VARINT_BYTES, encode_varint

WRONG_VALUES: list[Any] = [
    None, True, -1, 2**63, 2**64 - 1, -(2**63), 1.5, float("nan"), float("inf"), "", "x" * 3000,
    b"\x00" * 40, [], [1, 2], {}, {"a": 1}, [[[[]]]], {"t": None}, "request", "zz", 2**32, 1025, 0,
]

STRUCTURAL = ("wrong_type", "deep", "huge_header")
_UNPACK_ERRORS = (ValueError, TypeError, RecursionError, msgpack.exceptions.UnpackException)
_HOLE = b"accelmesh-fuzz-splice-hole"  # a bin value whose packed bytes are replaced by raw msgpack
_HOLE_PACKED = msgpack.packb(_HOLE, use_bin_type=True)


# -- frames ------------------------------------------------------------------------------------


def unframe(data: bytes) -> list[bytes] | None:
    """The payloads of `data` if it is exactly a sequence of whole minimal frames, else None."""
    out, i = [], 0
    while i < len(data):
        length, shift, start = 0, 0, i
        while True:
            if i >= len(data) or i - start >= MAX_VARINT_BYTES:
                return None
            byte = data[i]
            length |= (byte & 0x7F) << shift
            shift += 7
            i += 1
            if not byte & 0x80:
                break
        if i + length > len(data):
            return None
        out.append(data[i : i + length])
        i += length
    return out


def reframe(payloads: Sequence[bytes]) -> bytes:
    return b"".join(encode_varint(len(p)) + p for p in payloads)


# -- structural mutations of one msgpack body -------------------------------------------------


def _paths(obj: Any, path: tuple[Any, ...] = (), depth: int = 0) -> Iterator[tuple[Any, ...]]:
    """Every place a value sits in `obj` (map values and list items), outermost first."""
    if depth > 8:
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield (*path, key)
            yield from _paths(value, (*path, key), depth + 1)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield (*path, i)
            yield from _paths(value, (*path, i), depth + 1)


def _unpack(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except _UNPACK_ERRORS:
        return None


def _pack(obj: Any) -> bytes | None:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):  # deeper than msgpack packs, or an unpackable key
        return None


def _pick(obj: Any, rng: random.Random) -> tuple[Any, Any] | None:
    """A random (container, key) in `obj`, favouring top-level fields half of the time."""
    paths = list(_paths(obj))
    if not paths:
        return None
    top = [p for p in paths if len(p) == 1]
    path = rng.choice(top if top and rng.random() < 0.5 else paths)
    parent = obj
    for step in path[:-1]:
        parent = parent[step]
    return parent, path[-1]


def _deep_value(rng: random.Random) -> bytes:
    depth = rng.choice([15, 16, 17, 40, 200, 1000, 5000])
    kind = rng.choice([b"\x91", b"\x81\xa1k"])  # [x] or {"k": x}
    return kind * depth + rng.choice([b"\xc0", b"\x01", b"\x90", b"\x80"])


def _huge_value(rng: random.Random) -> bytes:
    return rng.choice([
        b"\xdb\xff\xff\xff\xff",          # str32 of 4 GiB
        b"\xda\xff\xff",                  # str16 of 64 KiB
        b"\xc6\x7f\xff\xff\xff",          # bin32 of 2 GiB
        b"\xc5\xff\xff",                  # bin16 of 64 KiB
        b"\xdd\xff\xff\xff\xff",          # array32 of 4 G items
        b"\xdf\xff\xff\xff\xff",          # map32 of 4 G entries
        b"\xde\xff\xff",                  # map16 of 65535 entries
        b"\xc9\x00\x00\x00\x10\x01abc",   # ext32 (ext types are refused)
        b"\xd4\x01\x00",                  # fixext1
        b"\xc1",                          # the one byte msgpack never uses
    ])


def _splice(body: bytes, raw: bytes, rng: random.Random) -> bytes | None:
    """`body` with one of its values replaced by the raw msgpack `raw` (None if not a container)."""
    obj = _unpack(body)
    spot = _pick(obj, rng) if isinstance(obj, (dict, list)) else None
    if spot is None:
        return None
    parent, key = spot
    parent[key] = _HOLE
    packed = _pack(obj)
    return None if packed is None else packed.replace(_HOLE_PACKED, raw, 1)


def _wrong_type(body: bytes, rng: random.Random) -> bytes | None:
    obj = _unpack(body)
    spot = _pick(obj, rng) if isinstance(obj, (dict, list)) else None
    if spot is None:
        return None
    parent, key = spot
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[key]
    else:
        parent[key] = rng.choice(WRONG_VALUES)
    return _pack(obj)


def _structural(kind: str, body: bytes, rng: random.Random) -> bytes | None:
    if kind == "wrong_type":
        return _wrong_type(body, rng)
    raw = _deep_value(rng) if kind == "deep" else _huge_value(rng)
    if rng.random() < 0.2:
        return raw  # the whole body
    return _splice(body, raw, rng)


def _bad_prefix(payloads: list[bytes], rng: random.Random) -> bytes:
    """The frames with one length prefix rewritten (the payload kept)."""
    i = rng.randrange(len(payloads))
    payload = payloads[i]
    n = len(payload)
    choice = rng.randrange(5)
    if choice == 0:  # over every limit (the largest is MAX_FRAME_SIZE), up to the largest varint
        prefix = encode_varint(rng.choice([MAX_FRAME_SIZE + 1, 2**32, 2**56, 2**63 - 1]))
    elif choice == 1:  # not minimal: the same length padded with zero groups
        pad = rng.randint(1, 6)
        prefix = bytearray(encode_varint(n))
        prefix[-1] |= 0x80
        prefix += b"\x80" * (pad - 1) + b"\x00"
        prefix = bytes(prefix)
    elif choice == 2:  # over-long: more continuation bytes than any varint may have
        prefix = b"\xff" * rng.randint(MAX_VARINT_BYTES, MAX_VARINT_BYTES + 4) + b"\x01"
    elif choice == 3:  # shorter than the payload: the rest is read as the next frame
        prefix = encode_varint(rng.randrange(n)) if n else b"\x01"
    else:  # longer than the payload: the frame never completes, or swallows the next one
        prefix = encode_varint(n + rng.randint(1, 64))
    return reframe(payloads[:i]) + prefix + payload + reframe(payloads[i + 1 :])


# -- byte-level mutations ---------------------------------------------------------------------


def _flip(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def _bytewise(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    choice = rng.randrange(6)
    if choice == 0:
        return "truncate", data[: rng.randrange(len(data) + 1)]
    if choice == 1:
        return "flip", _flip(data, rng)
    if choice == 2:
        i = rng.randrange(len(data) + 1)
        return "insert", data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + data[i:]
    if choice == 3 and data:
        i = rng.randrange(len(data))
        return "delete", data[:i] + data[i + rng.randint(1, 8):]
    if choice == 4:
        return "trailing", data + data[: rng.randrange(len(data) + 1)]
    return "random", bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))


KINDS = ("truncate", "flip", "insert", "delete", "trailing", "random", *STRUCTURAL, "prefix")


def mutate(data: bytes, rng: random.Random, framed: bool = False) -> tuple[str, bytes]:
    """One mutation of `data`: (its kind, the mutant). Structural kinds are frame-aware when `framed`."""
    roll = rng.random()
    if roll < 0.45:
        return _bytewise(data, rng)
    if framed and roll > 0.9:
        payloads = unframe(data)
        if payloads:
            return "prefix", _bad_prefix(payloads, rng)
        return _bytewise(data, rng)
    kind = STRUCTURAL[rng.randrange(len(STRUCTURAL))]
    if not framed:
        mutant = _structural(kind, data, rng)
        return (kind, mutant) if mutant is not None else ("flip", _flip(data, rng))
    payloads = unframe(data)
    if not payloads:  # an earlier mutation broke the framing: nothing structural to do
        return "flip", _flip(data, rng)
    i = rng.randrange(len(payloads))
    body = _structural(kind, payloads[i], rng)
    if body is None:
        return "flip", _flip(data, rng)
    return kind, reframe([*payloads[:i], body, *payloads[i + 1 :]])


def mutants(corpus: Sequence[bytes], n: int, seed: int,
            framed: bool = False) -> Iterator[tuple[tuple[str, ...], bytes]]:
    """`n` mutants of the corpus, each with the kinds of the mutations that made it (1 to 3)."""
    rng = random.Random(seed)
    for _ in range(n):
        data = rng.choice(corpus)
        kinds = []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            kind, data = mutate(data, rng, framed)
            kinds.append(kind)
        yield tuple(kinds), data


# -- running a decoder ------------------------------------------------------------------------


def classify(exc: ProtocolError) -> str:
    """What rejected a mutant: the framing layer, the msgpack layer, the depth check, a field check."""
    if isinstance(exc, FrameTooLarge):
        return "frame-too-large"
    if isinstance(exc, MalformedMessage):
        if exc.field == "length":
            return "bad-prefix"
        if "deeper than" in exc.reason:
            return "too-deep"
        if exc.reason.startswith(("undecodable msgpack", "msgpack ext type")):
            return "undecodable"
        if exc.message_type is not None or exc.field is not None:
            return "bad-field"
        return "malformed"
    return type(exc).__name__


def check_decoder(decoder: Callable[[bytes], Any], corpus: Sequence[bytes], n: int = 10_000,
                  seed: int = 0, framed: bool = False) -> dict[str, Any]:
    """Feed `n` mutants to `decoder`. Anything but ProtocolError fails.

    Returns ``{"accepted": int, "rejected": int, "by_kind": {kind: Counter(outcome)}}``, where an
    outcome is "accepted" or `classify`'s name for the rejection, counted under the kind of each
    mutation that made the input.
    """
    accepted = rejected = 0
    by_kind: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
    for kinds, data in mutants(corpus, n, seed, framed):
        try:
            decoder(data)
        except ProtocolError as exc:
            rejected += 1
            outcome = classify(exc)
        except BaseException as exc:  # this is what the fuzzer hunts for
            raise AssertionError(f"{type(exc).__name__} escaped the decoder for mutations {kinds} of "
                                 f"input {data[:80]!r}") from exc
        else:
            accepted += 1
            outcome = "accepted"
        for kind in set(kinds):
            by_kind[kind][outcome] += 1
    return {"accepted": accepted, "rejected": rejected, "by_kind": by_kind}
