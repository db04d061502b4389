"""A seeded mutation fuzzer for decoders: fast enough for the normal suite (not Hypothesis).

`mutants(corpus, n, seed)` yields `n` byte strings derived from valid frames: truncations,
bit flips, byte insertions and deletions, oversize and over-long length prefixes, deep nesting,
and values of the wrong type spliced into valid messages. `check_decoder` feeds them all to a
decoder and fails if anything but a `ProtocolError` escapes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgpack

from protocols.errors import ProtocolError

WRONG_VALUES: list[Any] = [
    None, True, -1, 2**63, 2**64 - 1, -(2**63), 1.5, float("nan"), float("inf"), "", "x" * 3000,
    b"\x00" * 40, [], [1, 2], {}, {"a": 1}, [[[[]]]], {"t": None},
]


def _wrong_type(data: bytes, rng: random.Random) -> bytes:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # the corpus entry is not a map we can edit: fall back to a flip
        return _flip(data, rng)
    if not isinstance(obj, dict) or not obj:
        return _flip(data, rng)
    key = rng.choice(list(obj))
    if rng.random() < 0.2:
        del obj[key]
    else:
        obj[key] = rng.choice(WRONG_VALUES)
    return msgpack.packb(obj, use_bin_type=True)


def _flip(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def _deep(rng: random.Random) -> bytes:
    depth = rng.choice([17, 40, 200, 1000, 5000])
    kind = rng.choice([b"\x91", b"\x81\xa1k"])  # [x] or {"k": x}
    return kind * depth + b"\xc0"


def _huge_header(rng: random.Random) -> bytes:
    return rng.choice([
        b"\xdb\xff\xff\xff\xff",          # str32 of 4 GiB
        b"\xc6\x7f\xff\xff\xff",          # bin32 of 2 GiB
        b"\xdd\xff\xff\xff\xff",          # array32 of 4 G items
        b"\xdf\xff\xff\xff\xff",          # map32 of 4 G entries
        b"\xc9\x00\x00\x00\x10\x01abc",   # ext32 (ext types are refused)
        b"\xd4\x01\x00",                  # fixext1
    ])


def mutate(data: bytes, rng: random.Random) -> bytes:
    choice = rng.randrange(9)
    if choice == 0:
        return data[: rng.randrange(len(data) + 1)]  # truncated
    if choice == 1:
        return _flip(data, rng)
    if choice == 2:
        i = rng.randrange(len(data) + 1)
        return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + data[i:]
    if choice == 3 and data:
        i = rng.randrange(len(data))
        return data[:i] + data[i + rng.randint(1, 8):]
    if choice == 4:
        return _wrong_type(data, rng)
    if choice == 5:
        return _deep(rng)
    if choice == 6:
        return _huge_header(rng)
    if choice == 7:
        return data + data[: rng.randrange(len(data) + 1)]  # trailing garbage
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))


def mutants(corpus: Sequence[bytes], n: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(n):
        data = rng.choice(corpus)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            data = mutate(data, rng)
        yield data


def check_decoder(decoder: Callable[[bytes], Any], corpus: Sequence[bytes], n: int = 10_000,
                  seed: int = 0) -> dict[str, int]:
    """Feed `n` mutants to `decoder`; return counts of outcomes. Anything but ProtocolError fails."""
    outcomes = {"accepted": 0, "rejected": 0}
    for data in mutants(corpus, n, seed):
        try:
            decoder(data)
        except ProtocolError:
            outcomes["rejected"] += 1
        except BaseException as exc:  # this is what the fuzzer hunts for
            raise AssertionError(f"{type(exc).__name__} escaped the decoder for input {data[:80]!r}") from exc
        else:
            outcomes["accepted"] += 1
    return outcomes
