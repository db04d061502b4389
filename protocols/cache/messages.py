"""Cached blocks by CID: Get -> Found(bytes) | NotFound; the receiver verifies the bytes against the CID.

Our own protocol rather than Bitswap (notes section 13.1): one request, one answer, a bounded
block, and a receiver that hashes what it got before using it. See SPEC.md.
"""

from __future__ import annotations

import dataclasses

from protocols.cid import verify
from protocols.codec import Bytes, Message, Str, field
from protocols.errors import MalformedMessage

__all__ = ["PROTOCOL_ID", "MAX_BLOCK_BYTES", "MAX_FRAME_SIZE", "Get", "Found", "NotFound", "check_found"]

PROTOCOL_ID = "/accelmesh/cache/1.0.0"
MAX_BLOCK_BYTES = 4 * 1024 * 1024  # one canonical response (inference.MAX_RESPONSE_BYTES)
MAX_FRAME_SIZE = MAX_BLOCK_BYTES + 1024  # a Found frame: the block plus its CID and envelope


@dataclasses.dataclass(frozen=True)
class Get(Message):
    TYPE = "get"
    VERSION = 1
    cid: str = field(Str(max_len=128))


@dataclasses.dataclass(frozen=True)
class Found(Message):
    TYPE = "found"
    VERSION = 1
    cid: str = field(Str(max_len=128))
    data: bytes = field(Bytes(max_len=MAX_BLOCK_BYTES))


@dataclasses.dataclass(frozen=True)
class NotFound(Message):
    TYPE = "not-found"
    VERSION = 1
    cid: str = field(Str(max_len=128))


def check_found(asked: Get, answer: Found | NotFound) -> bytes | None:
    """The verified block, or None for NotFound; CIDMismatch / MalformedMessage for a lying peer."""
    if answer.cid != asked.cid:
        raise MalformedMessage(f"answer is for {answer.cid[:80]!r}, not {asked.cid[:80]!r}", field="cid")
    if isinstance(answer, NotFound):
        return None
    verify(asked.cid, answer.data)
    return answer.data
