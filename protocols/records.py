"""Peer identities and signed records: Ed25519 libp2p keys, peer ids, and the cache record.

Keys and peer ids follow the libp2p specs, encoded here by hand (no libp2p import):

- a public key is the protobuf ``PublicKey { Type = 1 (Ed25519); Data = 32 bytes }``, i.e.
  ``08 01 12 20 <key>``; a private key is ``PrivateKey`` with the 32-byte seed (py-libp2p) or
  seed||public key (64 bytes, go-libp2p) as Data;
- a peer id is the multihash of the public-key protobuf: the identity multihash (``00 24``)
  when the protobuf is at most 42 bytes, as it is for Ed25519, written in base58btc
  (``12D3KooW...``). So an Ed25519 peer id carries its public key.

A signature covers ``DOMAIN || msgpack of the record's map without "signature"``, every map's
keys sorted by their UTF-8 bytes and every value exactly as sent (no normalization). A
verifier checks the map it *received*, unknown fields included, so a newer minor version
may add signed fields and nobody can add unsigned ones. The domain string differs per
record type, so a signature made for one kind of record can never be replayed as another.
Verification checks that the signer's key hashes to the subject's peer id, the signature,
and the record's time window (60 s of clock skew tolerated in each direction).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, PublicFormat, NoEncryption

from protocols.cid import parse as parse_cid
from protocols.codec import Bytes, Int, Message, Str, decode_with_fields, encode, field, pack
from protocols.errors import BadSignature, ExpiredRecord, FrameTooLarge, MalformedMessage, ProtocolError
from protocols.vocabulary import MAX_PEER_ID_LENGTH

__all__ = [
    "KEY_TYPE_ED25519",
    "CLOCK_SKEW_MS",
    "MAX_PEER_ID_LENGTH",
    "DOMAIN_ADVERT",
    "DOMAIN_CACHE_RECORD",
    "CACHE_NAMESPACE",
    "MAX_CACHE_RECORD_BYTES",
    "Identity",
    "b58encode",
    "b58decode",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "is_peer_id",
    "signed_payload",
    "verify_signature",
    "check_time_window",
    "CacheRecord",
    "sign_cache_record",
    "verify_cache_record",
    "cache_dht_key",
    "validate_cache_value",
    "select_cache_value",
]

KEY_TYPE_ED25519 = 1  # libp2p crypto.proto KeyType.Ed25519
CLOCK_SKEW_MS = 60_000  # records may be up to 60 s "from the future" or past expiry (clock skew)
DOMAIN_ADVERT = b"accelmesh advert v1\n"
DOMAIN_CACHE_RECORD = b"accelmesh cache-record v1\n"
CACHE_NAMESPACE = "accelmesh"  # DHT keys are /accelmesh/<request key>
MAX_CACHE_RECORD_BYTES = 2048  # a record is a few hundred bytes; anything larger is refused

_IDENTITY_MULTIHASH = 0x00
_MAX_INLINE_KEY_LENGTH = 42
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}


# ---------------------------------------------------------------------------------------
# base58btc (the Bitcoin alphabet, as libp2p writes peer ids)


def b58encode(data: bytes) -> str:
    zeros = len(data) - len(data.lstrip(b"\0"))
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, rem = divmod(n, 58)
        out.append(_B58[rem])
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for char in text:
        digit = _B58_INDEX.get(char)
        if digit is None:
            raise MalformedMessage(f"{char!r} is not a base58 character", field="peer_id")
        n = n * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body


# ---------------------------------------------------------------------------------------
# Keys and peer ids


def _protobuf_key(key_type: int, data: bytes) -> bytes:
    """libp2p's two-field key protobuf: field 1 (varint) Type, field 2 (bytes) Data."""
    assert len(data) < 128
    return bytes([0x08, key_type, 0x12, len(data)]) + data


def _parse_protobuf_key(blob: bytes) -> tuple[int, bytes]:
    if len(blob) < 4 or blob[0] != 0x08 or blob[2] != 0x12 or blob[1] & 0x80 or blob[3] & 0x80:
        raise MalformedMessage("not a libp2p key protobuf (08 TYPE 12 LEN DATA)", field="public_key")
    data = blob[4:]
    if len(data) != blob[3]:
        raise MalformedMessage(f"key protobuf says {blob[3]} data bytes, has {len(data)}", field="public_key")
    return blob[1], data


# The eight points of small order on Ed25519 (canonical encodings). A "key" among them needs no
# private key: signatures made of small-order points verify for many messages.
_SMALL_ORDER = frozenset(bytes.fromhex(h) for h in (
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
))
_ED25519_P = 2**255 - 19


def _ed25519_public(public_key: bytes) -> Ed25519PublicKey:
    key_type, data = _parse_protobuf_key(public_key)
    if key_type != KEY_TYPE_ED25519:
        raise BadSignature(f"key type {key_type} is not supported (only Ed25519)")
    if len(data) != 32:
        raise MalformedMessage(f"Ed25519 public key of {len(data)} bytes", field="public_key")
    if int.from_bytes(data, "little") & ((1 << 255) - 1) >= _ED25519_P:
        raise BadSignature("public key is not canonically encoded")
    if data in _SMALL_ORDER:
        raise BadSignature("public key is a point of small order")
    try:
        return Ed25519PublicKey.from_public_bytes(data)
    except ValueError as exc:  # not a point on the curve
        raise BadSignature(f"public key is not an Ed25519 point: {exc}") from exc


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id (base58btc) of a public-key protobuf."""
    if len(public_key) <= _MAX_INLINE_KEY_LENGTH:
        multihash = bytes([_IDENTITY_MULTIHASH, len(public_key)]) + public_key
    else:
        multihash = b"\x12\x20" + hashlib.sha256(public_key).digest()
    return b58encode(multihash)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The public-key protobuf inlined in an (Ed25519) peer id; MalformedMessage if there is none."""
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= MAX_PEER_ID_LENGTH:
        raise MalformedMessage("not a peer id string", field="peer_id")
    raw = b58decode(peer_id)
    if len(raw) < 2 or raw[0] != _IDENTITY_MULTIHASH or raw[1] != len(raw) - 2:
        raise MalformedMessage("peer id does not inline its public key (identity multihash)", field="peer_id")
    return raw[2:]


def is_peer_id(text: str) -> bool:
    """True for a well-formed Ed25519 peer id."""
    try:
        _ed25519_public(public_key_from_peer_id(text))
    except (ProtocolError, ValueError):
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Identity:
    """An Ed25519 libp2p identity: signs records; its peer id is derived from its public key."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_protobuf(cls, blob: bytes) -> Identity:
        """Read libp2p's private-key protobuf (32-byte seed, or seed||public key)."""
        key_type, data = _parse_protobuf_key(blob)
        if key_type != KEY_TYPE_ED25519 or len(data) not in (32, 64):
            raise MalformedMessage(f"not an Ed25519 private key (type {key_type}, {len(data)} bytes)")
        identity = cls.from_seed(data[:32])
        if len(data) == 64 and data[32:] != identity.public_bytes:
            raise MalformedMessage("private key's embedded public key does not match its seed")
        return identity

    def to_protobuf(self) -> bytes:
        """The private key as py-libp2p serializes it (Type Ed25519, Data = 32-byte seed)."""
        return _protobuf_key(KEY_TYPE_ED25519, self.seed)

    @property
    def seed(self) -> bytes:
        return self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @property
    def public_bytes(self) -> bytes:
        return self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def public_key(self) -> bytes:
        """The public-key protobuf (what records carry)."""
        return _protobuf_key(KEY_TYPE_ED25519, self.public_bytes)

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def sign(self, domain: bytes, payload: Mapping[str, Any]) -> bytes:
        return self.private.sign(signed_payload(domain, payload))

    def __repr__(self) -> str:
        return f"<Identity {self.peer_id}>"


def _sorted(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _sorted(value[k]) for k in sorted(value, key=lambda k: k.encode("utf-8"))}
    if isinstance(value, (list, tuple)):
        return [_sorted(v) for v in value]
    return value


def signed_payload(domain: bytes, payload: Mapping[str, Any]) -> bytes:
    """What a signature covers: the domain, then the msgpack of the fields with sorted keys.

    `payload` must not contain "signature" (callers pass the record's map without it).
    """
    return domain + pack(_sorted(payload))


def verify_signature(
    *, subject: str, public_key: bytes, domain: bytes, payload: Mapping[str, Any], signature: bytes
) -> None:
    """Raise `BadSignature` unless `public_key` is `subject`'s and signed `payload` under `domain`."""
    if peer_id_from_public_key(public_key) != subject:
        raise BadSignature("signer is not the subject: the public key does not hash to the peer id",
                           signer=peer_id_from_public_key(public_key))
    key = _ed25519_public(public_key)
    try:
        key.verify(signature, signed_payload(domain, payload))
    except InvalidSignature:
        raise BadSignature("signature does not verify", signer=subject) from None


def check_time_window(created_ms: int, expires_ms: int, now_ms: int, what: str = "record") -> None:
    """Raise `ExpiredRecord` for a record past its expiry or created in the future (60 s skew each way)."""
    if expires_ms <= created_ms:
        raise ExpiredRecord(f"{what} expires ({expires_ms}) before it was created ({created_ms})",
                            expires=expires_ms, now=now_ms)
    if created_ms > now_ms + CLOCK_SKEW_MS:
        raise ExpiredRecord(f"{what} created {(created_ms - now_ms) / 1000:.1f} s in the future",
                            expires=expires_ms, now=now_ms)
    if now_ms > expires_ms + CLOCK_SKEW_MS:
        raise ExpiredRecord(f"{what} expired {(now_ms - expires_ms) / 1000:.1f} s ago", expires=expires_ms,
                            now=now_ms)


# ---------------------------------------------------------------------------------------
# The cache record: request key -> response CID, signed by its publisher


@dataclasses.dataclass(frozen=True)
class CacheRecord(Message):
    """The DHT value under ``/accelmesh/<key>``: who computed which response for a request key."""

    TYPE = "cache-record"
    VERSION = 1

    key: str = field(Str(max_len=128))  # request key (CIDv1 string, or 64 hex with the sha256 strategy)
    cid: str = field(Str(max_len=128))  # response CID
    publisher: str = field(Str(max_len=MAX_PEER_ID_LENGTH))  # peer id that signed it
    public_key: bytes = field(Bytes(max_len=64))  # the publisher's public-key protobuf
    created: int = field(Int(0, 2**53))  # Unix time in milliseconds
    expires: int = field(Int(0, 2**53))  # Unix time in milliseconds
    seq: int = field(Int(0, 2**53))  # per-publisher sequence number, increasing
    signature: bytes = field(Bytes(max_len=64), default=b"")

    def signed_fields(self) -> dict[str, Any]:
        fields = self.to_dict()
        fields.pop("signature", None)
        return fields


def sign_cache_record(identity: Identity, *, key: str, cid: str, created: int, expires: int, seq: int) -> CacheRecord:
    unsigned = CacheRecord(key=key, cid=cid, publisher=identity.peer_id, public_key=identity.public_key,
                           created=created, expires=expires, seq=seq)
    return dataclasses.replace(unsigned, signature=identity.sign(DOMAIN_CACHE_RECORD, unsigned.signed_fields()))


def verify_cache_record(record: CacheRecord, now_ms: int, fields: Mapping[str, Any] | None = None) -> None:
    """Check a record's signature and time window. `fields`: the map as received (default: re-encoded)."""
    if not record.signature:
        raise BadSignature("record is unsigned", signer=record.publisher)
    payload = {k: v for k, v in (fields if fields is not None else record.to_dict()).items() if k != "signature"}
    verify_signature(subject=record.publisher, public_key=record.public_key, domain=DOMAIN_CACHE_RECORD,
                     payload=payload, signature=record.signature)
    check_time_window(record.created, record.expires, now_ms, "cache record")


def cache_dht_key(request_key: str) -> str:
    return f"/{CACHE_NAMESPACE}/{request_key}"


def validate_cache_value(dht_key: str, value: bytes, now_ms: int) -> CacheRecord:
    """The pure validator for the ``/accelmesh/`` DHT namespace: the record, or a ProtocolError.

    Rejects oversize, undecodable, unsigned, wrongly signed, tampered and expired records, and
    records stored under a key other than their own.
    """
    if len(value) > MAX_CACHE_RECORD_BYTES:
        raise FrameTooLarge(len(value), MAX_CACHE_RECORD_BYTES, what="cache record")
    record, fields = decode_with_fields(value, CacheRecord)
    assert isinstance(record, CacheRecord)
    if dht_key != cache_dht_key(record.key):
        raise MalformedMessage(f"record for {record.key} stored under {dht_key[:140]!r}", field="key")
    if not _is_request_key(record.key):
        raise MalformedMessage("not a request key (a CID, or 64 hex characters)", field="key",
                               message_type=record.TYPE)
    parse_cid(record.cid)  # MalformedMessage / InsecureHash for a CID outside the policy
    verify_cache_record(record, now_ms, fields)
    return record


def _is_request_key(key: str) -> bool:
    if len(key) == 64 and all(c in "0123456789abcdef" for c in key):
        return True  # the sha256 key strategy
    try:
        parse_cid(key)
    except ProtocolError:
        return False
    return True


def select_cache_value(dht_key: str, values: Sequence[bytes], now_ms: int) -> int:
    """The pure selector: the index of the best valid value (-1 if none is valid).

    Sequence numbers are compared only within one publisher (the highest wins); across
    publishers the newest `created` wins; ties go to the smaller publisher id, so every node
    picks the same value.
    """
    records: list[CacheRecord | None] = []
    newest_seq: dict[str, int] = {}
    for value in values:
        try:
            record = validate_cache_value(dht_key, value, now_ms)
        except ProtocolError:
            record = None
        records.append(record)
        if record is not None:
            newest_seq[record.publisher] = max(newest_seq.get(record.publisher, -1), record.seq)
    candidates = [(i, r) for i, r in enumerate(records) if r is not None and r.seq == newest_seq[r.publisher]]
    if not candidates:
        return -1
    return min(candidates, key=lambda item: (-item[1].created, item[1].publisher, item[0]))[0]


def encode_cache_record(record: CacheRecord) -> bytes:
    return encode(record)
