"""Canonical msgpack: one byte string per value, so equal requests get equal keys everywhere.

Rules (pinned by tests/vectors; never change the bytes these functions produce):

- maps: keys are strings, NFC-normalized, sorted by their UTF-8 bytes; duplicate keys
  after normalization are an error;
- strings: NFC-normalized, msgpack str; bytes: msgpack bin;
- floats: always float64; NaN and infinities have no canonical form; -0.0 becomes 0.0;
- integers: msgpack's shortest form, from -2**63 to 2**64-1; booleans and nil as themselves;
- lists and tuples: arrays; nesting at most MAX_DEPTH levels; nothing else is encodable.

A request is the map ``{"v": 1, "task", "model", "prompt" | "messages", "params"}``;
a response is ``{"v": 1, "task", "model", "text" | "embedding", "finish_reason", "usage"}``
(see protocols/cache/SPEC.md for the field-by-field definition and worked examples).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from protocols.errors import MalformedMessage, NotCanonical

__all__ = [
    "CANONICAL_VERSION",
    "MAX_DEPTH",
    "canonicalize",
    "encode",
    "request_bytes",
    "response_bytes",
    "decode_response",
]

CANONICAL_VERSION = 1
MAX_DEPTH = 32  # deeper than any request we build; bounds recursion on user input
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def canonicalize(value: Any, path: str = "", depth: int = 0) -> Any:
    """Return `value` as plain msgpack-able Python objects in canonical form."""
    if depth > MAX_DEPTH:
        raise NotCanonical(path, f"nested deeper than {MAX_DEPTH} levels")
    kind = type(value)  # exact types first (the common case), then subclasses
    if kind is str:  # (ASCII is NFC already: a constant-time check before the scan)
        if value.isascii() or unicodedata.is_normalized("NFC", value):
            return value
        return unicodedata.normalize("NFC", value)
    if kind is dict or (kind is not list and isinstance(value, Mapping)):
        return _canonical_map(value, path, depth)
    if kind is list or kind is tuple:
        if value and set(map(type, value)) == {float}:  # a vector (an embedding): checked in C loops
            if depth + 1 > MAX_DEPTH:
                raise NotCanonical(f"{path}[0]", f"nested deeper than {MAX_DEPTH} levels")
            if not all(map(math.isfinite, value)):
                i = next(i for i, item in enumerate(value) if not math.isfinite(item))
                raise NotCanonical(f"{path}[{i}]", f"{value[i]!r} has no canonical encoding")
            return [0.0 if item == 0.0 else item for item in value] if 0.0 in value else list(value)  # -0.0 as 0.0
        return [canonicalize(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    if value is None or kind is bool:
        return value
    if kind is int or (isinstance(value, int) and not isinstance(value, bool)):
        if not _INT_MIN <= value <= _INT_MAX:
            raise NotCanonical(path, "integer out of the 64-bit range")
        return int(value)
    if kind is float or isinstance(value, float):
        if not math.isfinite(value):
            raise NotCanonical(path, f"{value!r} has no canonical encoding")
        return 0.0 if value == 0.0 else float(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return unicodedata.normalize("NFC", str(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, Sequence):
        return [canonicalize(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise NotCanonical(path, f"type {type(value).__name__} has no canonical encoding")


def _canonical_map(value: Mapping[Any, Any], path: str, depth: int) -> dict[str, Any]:
    if depth < MAX_DEPTH and all(type(key) is str and key.isascii() for key in value):
        # The common case: ASCII keys are NFC already and cannot collide after normalizing, and
        # their order as strings is their UTF-8 byte order. ASCII strings and 64-bit integers
        # are canonical as they are (at a depth allowed: the map's items are one level down).
        out: dict[str, Any] = {}
        for key in sorted(value):
            item = value[key]
            kind = type(item)
            if (kind is str and item.isascii()) or item is None or (kind is int and _INT_MIN <= item <= _INT_MAX):
                out[key] = item
            else:
                out[key] = canonicalize(item, f"{path}.{key}" if path else key, depth + 1)
        return out
    items: dict[bytes, tuple[str, Any]] = {}
    for key, item in value.items():
        if type(key) is not str and not isinstance(key, str):
            raise NotCanonical(path, f"map key {key!r} is not a string")
        norm = key if unicodedata.is_normalized("NFC", key) else unicodedata.normalize("NFC", key)
        raw = norm.encode("utf-8")
        if raw in items:
            raise NotCanonical(path, f"duplicate key {norm!r} after NFC normalization")
        items[raw] = (norm, canonicalize(item, f"{path}.{norm}" if path else norm, depth + 1))
    return {items[raw][0]: items[raw][1] for raw in sorted(items)}


def encode(value: Any) -> bytes:
    """Canonical msgpack bytes of `value`."""
    return msgpack.packb(canonicalize(value), use_bin_type=True, use_single_float=False)


def request_bytes(
    *,
    task: str,
    model: str,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    params: Mapping[str, Any] | None = None,
) -> bytes:
    """Canonical bytes of a request: what determines its answer, and nothing else.

    Exactly one of `prompt` (task ``generate`` and ``embed``) and `messages` (task ``chat``)
    is given. `params` holds every non-reserved keyword argument whose value differs from
    its default; the caller drops the rest so that spelling out a default keeps the key.
    """
    if (prompt is None) == (messages is None):
        raise NotCanonical("request", "exactly one of prompt and messages is required")
    body: dict[str, Any] = {"v": CANONICAL_VERSION, "task": task, "model": model, "params": dict(params or {})}
    if prompt is not None:
        body["prompt"] = prompt
    else:
        body["messages"] = list(messages or ())
    return encode(body)


def response_bytes(
    *,
    task: str,
    model: str,
    text: str | None = None,
    embedding: Sequence[float] | None = None,
    finish_reason: str = "stop",
    usage: Mapping[str, int] | None = None,
) -> bytes:
    """Canonical bytes of a response: the answer's deterministic content only.

    Who served it, how long it took and where it came from travel beside these bytes,
    never inside them, so two honest peers produce the same response CID.
    """
    if (text is None) == (embedding is None):
        raise NotCanonical("response", "exactly one of text and embedding is required")
    body: dict[str, Any] = {
        "v": CANONICAL_VERSION,
        "task": task,
        "model": model,
        "finish_reason": finish_reason,
        "usage": {k: v for k, v in (usage or {}).items() if v is not None},
    }
    if text is not None:
        body["text"] = text
    else:
        body["embedding"] = list(map(float, embedding or ()))
    return encode(body)


_RESPONSE_KEYS = frozenset({"v", "task", "model", "text", "embedding", "finish_reason", "usage"})
_MAX_RESPONSE_BYTES = 4 * 1024 * 1024  # a response must fit in one cache block (codec.Limits.max_bin_len)


def decode_response(data: bytes, *, trusted: bool = False) -> dict[str, Any]:
    """Parse canonical response bytes; MalformedMessage unless they are exactly what `response_bytes` makes.

    `trusted` skips the canonical-form check (a re-encode) for bytes this node stored itself
    and has just verified against their CID.
    """
    if len(data) > _MAX_RESPONSE_BYTES:
        raise MalformedMessage(f"{len(data)} bytes exceeds {_MAX_RESPONSE_BYTES}", message_type="response")
    from protocols.codec import Limits, unpack

    body = unpack(data, Limits(max_str_len=_MAX_RESPONSE_BYTES, max_bin_len=0, max_array_len=1 << 20))
    if not isinstance(body, dict):
        raise MalformedMessage("not a map", message_type="response")
    if body.get("v") != CANONICAL_VERSION:
        raise MalformedMessage(f"unknown version {body.get('v')!r}", field="v", message_type="response")
    for name in ("task", "model", "finish_reason"):
        if not isinstance(body.get(name), str):
            raise MalformedMessage("missing or not a string", field=name, message_type="response")
    usage = body.get("usage")
    if not isinstance(usage, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in usage.values()
    ):
        raise MalformedMessage("not a map of integers", field="usage", message_type="response")
    unknown = set(body) - _RESPONSE_KEYS
    if unknown:  # nothing may ride inside the hashed bytes beside the answer (metadata travels outside)
        raise MalformedMessage(f"unknown field {sorted(unknown)[0][:40]!r}", message_type="response")
    text, embedding = body.get("text"), body.get("embedding")
    if (text is None) == (embedding is None):
        raise MalformedMessage("exactly one of text and embedding is required", message_type="response")
    if text is not None and not isinstance(text, str):
        raise MalformedMessage("not a string", field="text", message_type="response")
    if embedding is not None and not (
        isinstance(embedding, list) and all(isinstance(x, float) for x in embedding)
    ):
        raise MalformedMessage("not a list of floats", field="embedding", message_type="response")
    if not trusted and encode(body) != bytes(data):
        raise MalformedMessage("not in canonical form", message_type="response")
    return body
