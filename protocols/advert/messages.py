"""Capability adverts: what a node serves, on what hardware, and how busy it is; signed by the node.

`/accelmesh/advert/1.0.0` answers one `GetAdvert` with the node's current `Advert`; the same
signed `Advert` bytes are pushed on the gossipsub topic `accelmesh/adverts/1`. See SPEC.md.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from protocols.codec import (
    Bool,
    Bytes,
    FieldsDisagree,
    Int,
    List,
    Message,
    Nested,
    Str,
    decode_with_fields,
    encode,
    field,
)
from protocols.errors import BadSignature, FrameTooLarge, MalformedMessage, StaleRecord, UnsupportedVersion
from protocols.records import (
    DOMAIN_ADVERT,
    MAX_PEER_ID_LENGTH,
    Identity,
    check_time_window,
    verify_signature,
)
from protocols.vocabulary import ACCELERATOR_KINDS, TASKS

__all__ = [
    "PROTOCOL_ID",
    "TOPIC",
    "PROTOCOL_VERSION",
    "MAX_ADVERT_BYTES",
    "MAX_ADDRS",
    "MAX_ADDR_CHARS",
    "MAX_PROVIDERS",
    "MAX_PROVIDER_NAME_CHARS",
    "MAX_TASK_CHARS",
    "MAX_MODELS",
    "MAX_MODEL_NAME_CHARS",
    "MAX_MODEL_IDENTITY_CHARS",
    "MAX_ACCELERATORS",
    "MAX_ACCELERATOR_KIND_CHARS",
    "MAX_ACCELERATOR_NAME_CHARS",
    "MAX_KEY_BYTES",
    "MAX_SOFTWARE_CHARS",
    "MAX_PROTOCOL_VERSION_CHARS",
    "MAX_CAPACITY",
    "MAX_CORES",
    "MAX_QUEUED",
    "MAX_DEVICE_INDEX",
    "MAX_INT",
    "TASKS",
    "ACCELERATOR_KINDS",
    "ProviderEntry",
    "Accelerator",
    "Load",
    "Advert",
    "GetAdvert",
    "sign_advert",
    "verify_advert",
    "check_newer",
    "decode_advert",
    "verified_advert",
    "encode_advert",
]

PROTOCOL_ID = "/accelmesh/advert/1.0.0"
TOPIC = "accelmesh/adverts/1"
_VERSION = re.compile(r"([0-9]{1,6})\.([0-9]{1,6})", re.ASCII)
PROTOCOL_VERSION = "1.2"  # major.minor of accelmesh's wire protocols; a newer major is refused
# Minor versions (SPEC.md "Versioning"): 1.1 added ProviderEntry.capacity; 1.2 added
# ProviderEntry.identities and ProviderEntry.default_model.
MAX_ADVERT_BYTES = 64 * 1024  # the real bound of an advert (the per-field bounds allow more): gossip stays cheap
# Per-field bounds (strings count characters). A sender leaves out what does not fit rather than
# cutting it, except device names: a cut model name would name another model, a cut GPU name is harmless.
MAX_ADDRS = 16  # multiaddrs per node: loopback, every interface, a public address, with room to spare
MAX_ADDR_CHARS = 256  # one multiaddr, /p2p/ peer id (52 characters) included, with room for a DNS name
MAX_PROVIDERS = 32  # providers one node offers: the ten built in, and room for registered ones
MAX_PROVIDER_NAME_CHARS = 64  # a provider's registry name (`echo`, `hf_local`, `openai_compatible`)
MAX_TASK_CHARS = 16  # one of TASKS, with room for a later one
MAX_MODELS = 64  # models one provider lists; a catalogue beyond that is asked for by name
MAX_MODEL_NAME_CHARS = 256  # a model id: `org/name`, a local path, a revision
# A model identity (what the request key covers): a provider name, a model name, and what pins it
# (`@sha256:` and a weights digest, an API's base URL): `hf_local/org/name@sha256:<32 hex>`.
MAX_MODEL_IDENTITY_CHARS = 512
MAX_ACCELERATORS = 64  # devices on one host: one entry per GPU and one for the cpu; beyond any real host
MAX_ACCELERATOR_KIND_CHARS = 8  # one of ACCELERATOR_KINDS
MAX_ACCELERATOR_NAME_CHARS = 128  # a device name as the vendor tool prints it
MAX_KEY_BYTES = 64  # a libp2p public-key protobuf (Ed25519: 36 bytes) or an Ed25519 signature (64 bytes)
MAX_SOFTWARE_CHARS = 64  # "accelmesh/<version>"
MAX_PROTOCOL_VERSION_CHARS = 16  # "major.minor"
MAX_CAPACITY = 1 << 20  # requests served at once (a node's max_concurrent, a provider's own cap)
MAX_CORES = 1 << 20  # logical cores of one host's cpu
MAX_QUEUED = 1 << 24  # requests waiting or running, as counted in `queue` and `load`
MAX_DEVICE_INDEX = 1023  # a device's index among its kind
MAX_INT = 2**53  # sequence numbers, times in ms, bytes of memory: exact as a float64 (JSON, JavaScript)


@dataclasses.dataclass(frozen=True)
class ProviderEntry(Message):
    """One provider a node offers.

    `capacity` (since 1.1): requests this provider runs at once. Absent (None) is unlimited: the
    provider has no cap of its own, and the node's `Advert.capacity` still bounds it. An entry
    from a 1.0 sender has none, which reads the same way.

    `identities` (since 1.2): the model identity of each of `models`, at the same index (what the
    request key covers, ARCHITECTURE.md section 4), so a peer can key a request before it sends it;
    "" where the identity is not known yet (local weights not loaded). It has exactly as many
    items as `models`: otherwise the entry is refused (`FieldsDisagree`, a `ValueError`, when built
    here; `MalformedMessage` naming `identities` when decoded). Absent (None): no identity is
    known, as from a 1.0 or 1.1 sender.
    `default_model` (since 1.2): the model it uses for a request that names none; absent: not said.
    """

    name: str = field(Str(max_len=MAX_PROVIDER_NAME_CHARS))
    tasks: tuple[str, ...] = field(List(Str(max_len=MAX_TASK_CHARS, choices=TASKS), max_items=len(TASKS)))
    models: tuple[str, ...] = field(List(Str(max_len=MAX_MODEL_NAME_CHARS), max_items=MAX_MODELS))
    ready: bool = field(Bool())
    capacity: int | None = field(Int(1, MAX_CAPACITY), optional=True)  # None: unlimited (since 1.1)
    identities: tuple[str, ...] | None = field(  # parallel to models, "" = not known (since 1.2)
        List(Str(max_len=MAX_MODEL_IDENTITY_CHARS), max_items=MAX_MODELS), optional=True)
    default_model: str | None = field(Str(max_len=MAX_MODEL_NAME_CHARS), optional=True)  # since 1.2

    def __post_init__(self) -> None:
        if self.identities is not None and len(self.identities) != len(self.models):
            raise FieldsDisagree(f"{len(self.identities)} items but models has {len(self.models)}: each "
                                 "identity names the model at the same index", field="identities")

    def identity_of(self, model: str) -> str | None:
        """The advertised identity of `model`; None when it is not listed or its identity is not known."""
        if self.identities is None:
            return None
        for name, identity in zip(self.models, self.identities):
            if name == model:
                return identity or None
        return None


@dataclasses.dataclass(frozen=True)
class Accelerator(Message):
    """One device: a GPU (per device) or the host's CPU."""

    kind: str = field(Str(max_len=MAX_ACCELERATOR_KIND_CHARS, choices=ACCELERATOR_KINDS))
    name: str = field(Str(max_len=MAX_ACCELERATOR_NAME_CHARS))
    memory_total: int = field(Int(0, MAX_INT))  # bytes (RAM for the cpu entry)
    memory_free: int = field(Int(0, MAX_INT))  # bytes
    index: int = field(Int(0, MAX_DEVICE_INDEX), default=0)  # device index among its kind
    cores: int = field(Int(0, MAX_CORES), optional=True)  # cpu: logical cores


@dataclasses.dataclass(frozen=True)
class Load(Message):
    in_flight: int = field(Int(0, MAX_QUEUED))  # requests being served
    queued: int = field(Int(0, MAX_QUEUED))  # requests waiting for a slot


@dataclasses.dataclass(frozen=True)
class GetAdvert(Message):
    """Ask a peer for its current advert; with `known`, also for the adverts it holds of others.

    The answer is a sequence of Advert frames, the peer's own first, then the stream closes.
    Relayed adverts are signed by their subjects, so the asker verifies each one as usual.
    """

    TYPE = "get-advert"
    VERSION = 1
    known: bool = field(Bool(), default=False)


@dataclasses.dataclass(frozen=True)
class Advert(Message):
    TYPE = "advert"
    VERSION = 1

    peer_id: str = field(Str(max_len=MAX_PEER_ID_LENGTH))  # the subject, and the signer
    public_key: bytes = field(Bytes(max_len=MAX_KEY_BYTES))  # libp2p public-key protobuf; hashes to peer_id
    addrs: tuple[str, ...] = field(List(Str(max_len=MAX_ADDR_CHARS), max_items=MAX_ADDRS))  # multiaddrs, /p2p/ included
    providers: tuple[ProviderEntry, ...] = field(List(Nested(ProviderEntry), max_items=MAX_PROVIDERS))
    accelerators: tuple[Accelerator, ...] = field(List(Nested(Accelerator), max_items=MAX_ACCELERATORS))
    capacity: int = field(Int(0, MAX_CAPACITY))  # requests served at once (node max_concurrent)
    queue: int = field(Int(0, MAX_QUEUED))  # requests that may wait for a slot
    load: Load = field(Nested(Load))
    software: str = field(Str(max_len=MAX_SOFTWARE_CHARS))  # e.g. "accelmesh/0.1.0"
    protocol: str = field(Str(max_len=MAX_PROTOCOL_VERSION_CHARS))  # PROTOCOL_VERSION of the sender, "major.minor"
    seq: int = field(Int(0, MAX_INT))  # increases with every new advert of this peer
    created: int = field(Int(0, MAX_INT))  # Unix time, milliseconds
    expires: int = field(Int(0, MAX_INT))  # Unix time, milliseconds
    signature: bytes = field(Bytes(max_len=MAX_KEY_BYTES), default=b"")

    def __post_init__(self) -> None:
        if not self.accelerators:
            raise ValueError("an advert lists at least one accelerator (cpu at least)")

    def signed_fields(self) -> dict[str, Any]:
        fields = self.to_dict()
        fields.pop("signature", None)
        return fields

    @property
    def major(self) -> int:
        match = _VERSION.fullmatch(self.protocol)
        if match is None:
            raise MalformedMessage(f"protocol version {self.protocol[:20]!r} is not MAJOR.MINOR (ASCII digits)",
                                   field="protocol", message_type=self.TYPE)
        return int(match.group(1))


def sign_advert(identity: Identity, **fields: Any) -> Advert:
    """An advert for `identity` with `fields` (everything but peer_id, public_key, signature), signed."""
    unsigned = Advert(peer_id=identity.peer_id, public_key=identity.public_key, **fields)
    return dataclasses.replace(unsigned, signature=identity.sign(DOMAIN_ADVERT, unsigned.signed_fields()))


def verify_advert(advert: Advert, now_ms: int, fields: Mapping[str, Any] | None = None) -> None:
    """Raise unless the advert is readable, signed by its subject, and current.

    `fields` is the map as received (unknown fields included, see `decode_advert`); without it
    the advert is re-encoded, which is right only for adverts built here. `UnsupportedVersion`
    for a newer major protocol (log and ignore it); `BadSignature` for a forged or tampered
    advert; `ExpiredRecord` outside its time window (60 s of skew allowed).
    """
    ours = int(PROTOCOL_VERSION.split(".")[0])
    if advert.major > ours:
        raise UnsupportedVersion(advert.protocol, PROTOCOL_VERSION, what="advert protocol")
    if not advert.signature:
        raise BadSignature("advert is unsigned", signer=advert.peer_id)
    payload = {k: v for k, v in (fields if fields is not None else advert.to_dict()).items() if k != "signature"}
    verify_signature(subject=advert.peer_id, public_key=advert.public_key, domain=DOMAIN_ADVERT,
                     payload=payload, signature=advert.signature)
    check_time_window(advert.created, advert.expires, now_ms, "advert")


def check_newer(current: Advert | None, new: Advert) -> None:
    """Raise `StaleRecord` unless `new` supersedes `current` (same peer: strictly higher seq)."""
    if current is not None and current.peer_id == new.peer_id and new.seq <= current.seq:
        raise StaleRecord(new.peer_id, new.seq, current.seq)


def decode_advert(data: bytes) -> tuple[Advert, dict[str, Any]]:
    """An advert and the map it arrived as (to verify its signature over every field received)."""
    if len(data) > MAX_ADVERT_BYTES:
        raise FrameTooLarge(len(data), MAX_ADVERT_BYTES, what="advert")
    advert, fields = decode_with_fields(data, Advert)
    assert isinstance(advert, Advert)
    return advert, fields


def verified_advert(data: bytes, now_ms: int) -> Advert:
    """Decode and verify advert bytes (from gossip or the advert protocol) in one step."""
    advert, fields = decode_advert(data)
    verify_advert(advert, now_ms, fields)
    return advert


def encode_advert(advert: Advert) -> bytes:
    return encode(advert)
