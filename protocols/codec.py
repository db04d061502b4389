"""Bounded msgpack for typed messages: every field has a type and a bound, checked on decode.

A message is a frozen dataclass subclassing `Message`, with a wire name (`TYPE`), a major
version (`VERSION`) and fields declared with `field(spec)`. On the wire it is a msgpack map:

    {"t": TYPE, "v": VERSION, <field name>: <value>, ...}

Decoding (`decode`) unpacks with explicit bounds (string, binary, array and map lengths, no
ext types, ``raw=False``), checks the nesting depth, then checks every declared field: a
missing required field or a wrong type or bound raises `MalformedMessage` naming the field;
a newer major version raises `UnsupportedVersion`; unknown fields are ignored (a newer minor
version may add fields). Only `ProtocolError`s escape: msgpack's own exceptions are caught by
name and translated.

Encoding (`encode`) checks every field against the same spec before a byte is written, and
raises `UnsendableMessage` (a `LocalProtocolError`: our bug) naming the field, so a message the
peer would refuse is never sent and the peer is never blamed for our mistake (h11's
`Connection.send`). Validation and conversion to wire values happen in one pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import msgpack

from protocols.errors import LocalProtocolError, MalformedMessage, UnsendableMessage, UnsupportedVersion

__all__ = [
    "Limits",
    "DEFAULT_LIMITS",
    "MAX_DEPTH",
    "Spec",
    "Str",
    "Bytes",
    "Int",
    "Float",
    "Bool",
    "List",
    "Dict",
    "Nested",
    "Any_",
    "field",
    "FieldsDisagree",
    "Message",
    "encode",
    "decode",
    "unpack",
    "pack",
    "decode_with_fields",
]

M = TypeVar("M", bound="Message")

MAX_DEPTH = 16  # deeper than any message we define; bounds the work of validating a frame


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds passed to msgpack's unpacker; each is a hard cap for one frame."""

    max_str_len: int = 1024 * 1024  # a prompt or an answer: 1 MiB of text is plenty
    max_bin_len: int = 4 * 1024 * 1024  # a cached response block
    max_array_len: int = 16 * 1024  # messages in a chat, floats in an embedding
    max_map_len: int = 256  # fields of a message, parameters of a request
    max_depth: int = MAX_DEPTH


DEFAULT_LIMITS = Limits()

_UNPACK_ERRORS: tuple[type[BaseException], ...] = (
    msgpack.exceptions.ExtraData,
    msgpack.exceptions.FormatError,
    msgpack.exceptions.StackError,
    msgpack.exceptions.OutOfData,
    msgpack.exceptions.BufferFull,
    ValueError,  # msgpack raises bare ValueError for limits ("... exceeds max_str_len") and bad keys
    TypeError,  # unhashable map keys (a map used as a key)
    UnicodeDecodeError,
    RecursionError,
)


def _forbid_ext(code: int, data: bytes) -> Any:
    raise MalformedMessage(f"msgpack ext type {code} is not allowed")


def _map_without_duplicates(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise MalformedMessage("a map repeats a key (decoders could disagree on which one counts)")
    return out


def unpack(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """msgpack bytes -> Python objects, bounded; only `MalformedMessage` escapes."""
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_forbid_ext,
            object_pairs_hook=_map_without_duplicates,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except MalformedMessage:
        raise
    except _UNPACK_ERRORS as exc:
        raise MalformedMessage(f"undecodable msgpack: {type(exc).__name__}: {exc}") from exc
    _check_depth(obj, limits.max_depth)
    return obj


def _check_depth(obj: Any, limit: int) -> None:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (list, dict)):
            if depth > limit:
                raise MalformedMessage(f"nested deeper than {limit} levels")
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children if isinstance(child, (list, dict)))


_MIN_INT, _MAX_INT = -(2**63), 2**64 - 1  # what msgpack can carry (int64 .. uint64)


def _show(value: Any) -> str:
    """A number for an error message (a huge int cannot even be printed: Python caps int -> str)."""
    if isinstance(value, int) and not _MIN_INT <= value <= _MAX_INT:
        return f"an integer of {value.bit_length()} bits"
    return str(value)


def pack(obj: Any) -> bytes:
    """Python objects -> msgpack bytes (bin type for bytes, float64 for floats)."""
    return msgpack.packb(obj, use_bin_type=True, use_single_float=False)


# ---------------------------------------------------------------------------------------
# Field specs


class Spec:
    """How one field is checked on decode, and checked and prepared on encode.

    `check` validates a value received (wire types: lists, dicts) and raises `MalformedMessage`;
    `encode` validates a value we are about to send (Python types: tuples, messages) against the
    same bounds, raises `UnsendableMessage`, and returns its wire form; `dump` returns the wire
    form without checking (`Message.to_dict`). `depth` is the nesting level the value occupies
    if it is a container (the message's own map is level 1, so a field's value is level 2).
    """

    def check(self, value: Any, name: str, owner: str) -> Any:
        raise NotImplementedError  # pragma: no cover - every spec overrides it

    def encode(self, value: Any, name: str, owner: str, depth: int) -> Any:
        raise NotImplementedError  # pragma: no cover - every spec overrides it

    def dump(self, value: Any) -> Any:
        return value

    def _fail(self, name: str, owner: str, reason: str) -> MalformedMessage:
        return MalformedMessage(reason, field=name, message_type=owner)

    def _refuse(self, name: str, owner: str, reason: str) -> UnsendableMessage:
        return UnsendableMessage(reason, field=name, message_type=owner)


@dataclasses.dataclass(frozen=True)
class Str(Spec):
    max_len: int = 1024
    choices: tuple[str, ...] | None = None

    def check(self, value: Any, name: str, owner: str) -> str:
        if not isinstance(value, str):
            raise self._fail(name, owner, f"expected a string, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise self._fail(name, owner, f"string of {len(value)} characters exceeds {self.max_len}")
        if self.choices is not None and value not in self.choices:
            raise self._fail(name, owner, f"{value[:64]!r} is not one of {', '.join(self.choices)}")
        return value

    def encode(self, value: Any, name: str, owner: str, depth: int) -> str:
        if not isinstance(value, str):
            raise self._refuse(name, owner, f"expected a string, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise self._refuse(name, owner, f"string of {len(value)} characters exceeds {self.max_len}")
        if self.choices is not None and value not in self.choices:
            raise self._refuse(name, owner, f"{value[:64]!r} is not one of {', '.join(self.choices)}")
        return value  # a string that is not valid UTF-8 (a lone surrogate) is caught by `encode`


@dataclasses.dataclass(frozen=True)
class Bytes(Spec):
    max_len: int = 1024

    def check(self, value: Any, name: str, owner: str) -> bytes:
        if not isinstance(value, bytes):
            raise self._fail(name, owner, f"expected bytes, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise self._fail(name, owner, f"{len(value)} bytes exceeds {self.max_len}")
        return value

    def encode(self, value: Any, name: str, owner: str, depth: int) -> bytes:
        if not isinstance(value, (bytes, bytearray)):
            raise self._refuse(name, owner, f"expected bytes, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise self._refuse(name, owner, f"{len(value)} bytes exceeds {self.max_len}")
        return value


@dataclasses.dataclass(frozen=True)
class Int(Spec):
    lo: int = 0
    hi: int = 2**63 - 1

    def check(self, value: Any, name: str, owner: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._fail(name, owner, f"expected an integer, got {type(value).__name__}")
        if not self.lo <= value <= self.hi:
            raise self._fail(name, owner, f"{value} is outside {self.lo}..{self.hi}")
        return value

    def encode(self, value: Any, name: str, owner: str, depth: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._refuse(name, owner, f"expected an integer, got {type(value).__name__}")
        if not self.lo <= value <= self.hi:
            raise self._refuse(name, owner, f"{_show(value)} is outside {self.lo}..{self.hi}")
        return value


@dataclasses.dataclass(frozen=True)
class Float(Spec):
    lo: float = -math.inf
    hi: float = math.inf

    def check(self, value: Any, name: str, owner: str) -> float:
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # an integer is an acceptable float
        if not isinstance(value, float):
            raise self._fail(name, owner, f"expected a number, got {type(value).__name__}")
        if not math.isfinite(value) or not self.lo <= value <= self.hi:
            raise self._fail(name, owner, f"{value} is not a finite number in {self.lo}..{self.hi}")
        return value

    def encode(self, value: Any, name: str, owner: str, depth: int) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._refuse(name, owner, f"expected a number, got {type(value).__name__}")
        try:
            value = float(value)
        except OverflowError:
            raise self._refuse(name, owner, f"{_show(value)} is not a finite number in {self.lo}..{self.hi}") from None
        if not math.isfinite(value) or not self.lo <= value <= self.hi:
            raise self._refuse(name, owner, f"{value} is not a finite number in {self.lo}..{self.hi}")
        return value

    def dump(self, value: Any) -> Any:
        return float(value)


@dataclasses.dataclass(frozen=True)
class Bool(Spec):
    def check(self, value: Any, name: str, owner: str) -> bool:
        if not isinstance(value, bool):
            raise self._fail(name, owner, f"expected a boolean, got {type(value).__name__}")
        return value

    def encode(self, value: Any, name: str, owner: str, depth: int) -> bool:
        if not isinstance(value, bool):
            raise self._refuse(name, owner, f"expected a boolean, got {type(value).__name__}")
        return value


@dataclasses.dataclass(frozen=True)
class List(Spec):
    item: Spec
    max_items: int = 256

    def check(self, value: Any, name: str, owner: str) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise self._fail(name, owner, f"expected a list, got {type(value).__name__}")
        if len(value) > self.max_items:
            raise self._fail(name, owner, f"{len(value)} items exceeds {self.max_items}")
        return tuple(self.item.check(v, f"{name}[{i}]", owner) for i, v in enumerate(value))

    def encode(self, value: Any, name: str, owner: str, depth: int) -> list[Any]:
        if not isinstance(value, (list, tuple)):
            raise self._refuse(name, owner, f"expected a list or tuple, got {type(value).__name__}")
        if len(value) > self.max_items:
            raise self._refuse(name, owner, f"{len(value)} items exceeds {self.max_items}")
        spec, inner = self.item, depth + 1
        try:
            if type(spec) is Str:  # the common cases, checked inline: bounded strings, nested messages
                limit, choices = spec.max_len, spec.choices
                for v in value:
                    if v.__class__ is not str or len(v) > limit or (choices is not None and v not in choices):
                        break
                else:
                    return list(value)
            elif type(spec) is Nested:
                cls, items, owner_of_items = spec.cls, [], f"{owner}.{name}"
                for v in value:
                    if not isinstance(v, cls):
                        break
                    items.append(v._to_wire(owner_of_items, inner))
                else:
                    return items
            item = spec.encode
            return [item(v, name, owner, inner) for v in value]
        except UnsendableMessage:  # again, naming the item (kept off the common path: no f-string per item)
            for i, v in enumerate(value):
                spec.encode(v, f"{name}[{i}]", owner, inner)
            raise  # pragma: no cover - the loop above raises

    def dump(self, value: Any) -> Any:
        return [self.item.dump(v) for v in value]


@dataclasses.dataclass(frozen=True)
class Dict(Spec):
    """A map from bounded string keys to values of one spec."""

    value: Spec
    max_items: int = 64
    max_key_len: int = 128

    def check(self, value: Any, name: str, owner: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self._fail(name, owner, f"expected a map, got {type(value).__name__}")
        if len(value) > self.max_items:
            raise self._fail(name, owner, f"{len(value)} entries exceeds {self.max_items}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or len(k) > self.max_key_len:
                raise self._fail(name, owner, f"map key {str(k)[:64]!r} is not a string of at most "
                                              f"{self.max_key_len} characters")
            out[k] = self.value.check(v, f"{name}.{k}", owner)
        return out

    def encode(self, value: Any, name: str, owner: str, depth: int) -> dict[str, Any]:
        if value.__class__ is not dict and not isinstance(value, Mapping):
            raise self._refuse(name, owner, f"expected a map, got {type(value).__name__}")
        if len(value) > self.max_items:
            raise self._refuse(name, owner, f"{len(value)} entries exceeds {self.max_items}")
        key_limit = self.max_key_len
        for k in value:
            if not isinstance(k, str) or len(k) > key_limit:
                raise self._refuse(name, owner, f"map key {str(k)[:64]!r} is not a string of at most "
                                                f"{self.max_key_len} characters")
        spec = self.value
        if type(spec) is Float:  # the common case (timings): finite floats in bounds, checked inline
            lo, hi = spec.lo, spec.hi
            for v in value.values():
                if v.__class__ is not float or not lo <= v <= hi or v - v != 0.0:
                    break
            else:
                try:
                    return {k: value[k] for k in sorted(value, key=str.encode)}
                except UnicodeEncodeError:
                    raise self._refuse(name, owner, "a map key is not valid UTF-8 (a lone surrogate)") from None
        encode_value, inner = spec.encode, depth + 1
        try:
            return {k: encode_value(value[k], name, owner, inner) for k in sorted(value, key=str.encode)}
        except UnicodeEncodeError:
            raise self._refuse(name, owner, "a map key is not valid UTF-8 (a lone surrogate)") from None
        except UnsendableMessage:  # again, naming the entry
            for k in value:
                encode_value(value[k], f"{name}.{k}", owner, inner)
            raise  # pragma: no cover - the loop above raises

    def dump(self, value: Any) -> Any:
        return {k: self.value.dump(value[k]) for k in sorted(value, key=str.encode)}


@dataclasses.dataclass(frozen=True)
class Nested(Spec):
    """A message inside a message (encoded as a map without "t"/"v")."""

    cls: type[Message]

    def check(self, value: Any, name: str, owner: str) -> Message:
        if not isinstance(value, dict):
            raise self._fail(name, owner, f"expected a map, got {type(value).__name__}")
        return self.cls._from_fields(value, f"{owner}.{name}")

    def encode(self, value: Any, name: str, owner: str, depth: int) -> dict[str, Any]:
        if not isinstance(value, self.cls):
            raise self._refuse(name, owner, f"expected {self.cls.__name__}, got {type(value).__name__}")
        return value._to_wire(f"{owner}.{name}", depth)

    def dump(self, value: Any) -> Any:
        return value._to_fields()


class _NotPlain(Exception):
    """Inside `Any_.encode`: why a value is not plain, and where (the path, innermost first)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason, self.path = reason, []


@dataclasses.dataclass(frozen=True)
class Any_(Spec):
    """A plain value (str, int, float, bool, None, or lists and maps of them), bounded by `Limits`.

    On decode the unpacker's `Limits` bound it; on encode, `limits` (those of the decoder that
    will read it: string bytes, list and map lengths, nesting depth).
    """

    limits: Limits = DEFAULT_LIMITS

    def check(self, value: Any, name: str, owner: str) -> Any:
        if isinstance(value, bytes):
            raise self._fail(name, owner, "binary is not allowed here")
        if isinstance(value, float) and not math.isfinite(value):
            raise self._fail(name, owner, "non-finite number")
        if isinstance(value, list):
            return [self.check(v, f"{name}[{i}]", owner) for i, v in enumerate(value)]
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise self._fail(name, owner, "map keys must be strings")
            return {k: self.check(v, f"{name}.{k}", owner) for k, v in value.items()}
        return value

    def encode(self, value: Any, name: str, owner: str, depth: int) -> Any:
        try:
            return self._plain(value, depth)
        except _NotPlain as exc:
            raise self._refuse(name + "".join(reversed(exc.path)), owner, exc.reason) from None

    def _plain(self, value: Any, depth: int) -> Any:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str):
            limit = self.limits.max_str_len
            if len(value) * 4 > limit:  # might be over the limit in UTF-8 bytes: count them
                try:
                    size = len(value) if value.isascii() else len(value.encode("utf-8"))
                except UnicodeEncodeError:
                    raise _NotPlain("string is not valid UTF-8 (a lone surrogate)") from None
                if size > limit:
                    raise _NotPlain(f"string of {size} UTF-8 bytes exceeds {limit}")
            return value
        if isinstance(value, int):
            if not _MIN_INT <= value <= _MAX_INT:
                raise _NotPlain(f"{_show(value)} does not fit in 64 bits")
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise _NotPlain("non-finite number")
            return value
        limits = self.limits
        if isinstance(value, (list, tuple)):
            if depth > limits.max_depth:
                raise _NotPlain(f"nested deeper than {limits.max_depth} levels")
            if len(value) > limits.max_array_len:
                raise _NotPlain(f"{len(value)} items exceeds {limits.max_array_len}")
            out: list[Any] = []
            for i, v in enumerate(value):
                try:
                    out.append(self._plain(v, depth + 1))
                except _NotPlain as exc:
                    exc.path.append(f"[{i}]")
                    raise
            return out
        if isinstance(value, Mapping):
            if depth > limits.max_depth:
                raise _NotPlain(f"nested deeper than {limits.max_depth} levels")
            if len(value) > limits.max_map_len:
                raise _NotPlain(f"{len(value)} entries exceeds {limits.max_map_len}")
            if not all(isinstance(k, str) for k in value):
                raise _NotPlain("map keys must be strings")
            try:
                keys = sorted(value, key=str.encode)
            except UnicodeEncodeError:
                raise _NotPlain("a map key is not valid UTF-8 (a lone surrogate)") from None
            mapping: dict[str, Any] = {}
            for k in keys:
                try:
                    mapping[k] = self._plain(value[k], depth + 1)
                except _NotPlain as exc:
                    exc.path.append(f".{k}")
                    raise
            return mapping
        if isinstance(value, (bytes, bytearray)):
            raise _NotPlain("binary is not allowed here")
        raise _NotPlain(f"{type(value).__name__} is not a plain value (nil, bool, int, float, str, list, map)")

    def dump(self, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: self.dump(value[k]) for k in sorted(value, key=str.encode)}
        if isinstance(value, (list, tuple)):
            return [self.dump(v) for v in value]
        return value


def field(
    spec: Spec,
    *,
    optional: bool = False,
    default: Any = dataclasses.MISSING,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """Declare a message field.

    `optional` fields may be absent or nil (default None). A field with a default may be absent
    on the wire (a later minor version added it) and then takes its default; nil is accepted
    only for optional fields.
    """
    if optional and default is dataclasses.MISSING and default_factory is dataclasses.MISSING:
        default = None
    meta = {"spec": spec, "optional": optional}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------
# Messages


class FieldsDisagree(ValueError):
    """A message's own cross-field check (its `__post_init__`) failed, blaming `field`.

    Built here it is a `ValueError` (our bug); decoded, it becomes `MalformedMessage` naming the field."""

    def __init__(self, reason: str, *, field: str) -> None:
        super().__init__(reason)
        self.field = field


_FIELD_ORDER: dict[type, tuple[dataclasses.Field[Any], ...]] = {}
_WirePlan = tuple[tuple[str, int, Any, Any, Callable[[Any, str, str, int], Any], bool], ...]
_WIRE_PLAN: dict[type, _WirePlan] = {}
_OTHER, _STR, _INT, _FLOAT, _BOOL, _BYTES = range(6)  # field kinds `Message._to_wire` checks inline


def _wire_plan(cls: type) -> _WirePlan:
    """Per field, sorted by name: (name, kind, bound a, bound b, the spec's encode, optional)."""
    plan = []
    for f in _sorted_fields(cls):
        spec: Spec = f.metadata["spec"]
        kind, a, b = _OTHER, None, None
        if type(spec) is Str:
            kind, a, b = _STR, spec.max_len, spec.choices
        elif type(spec) is Int:
            kind, a, b = _INT, spec.lo, spec.hi
        elif type(spec) is Float:
            kind, a, b = _FLOAT, spec.lo, spec.hi
        elif type(spec) is Bool:
            kind = _BOOL
        elif type(spec) is Bytes:
            kind, a = _BYTES, spec.max_len
        plan.append((f.name, kind, a, b, spec.encode, bool(f.metadata["optional"])))
    return tuple(plan)


def _sorted_fields(cls: type) -> tuple[dataclasses.Field[Any], ...]:
    order = _FIELD_ORDER.get(cls)
    if order is None:
        order = _FIELD_ORDER[cls] = tuple(sorted(dataclasses.fields(cls), key=lambda f: f.name.encode()))
    return order


class Message:
    """Base of wire messages: frozen dataclasses with `TYPE` and `VERSION` class attributes."""

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    def _to_fields(self) -> dict[str, Any]:
        """Field name -> wire value, keys in sorted order (encoders write maps sorted, so the
        bytes of a message are reproducible; decoders accept any order)."""
        out: dict[str, Any] = {}
        for f in _sorted_fields(type(self)):
            spec: Spec = f.metadata["spec"]
            value = getattr(self, f.name)
            if value is None and f.metadata["optional"]:
                continue
            out[f.name] = spec.dump(value)
        return out

    def _to_wire(self, owner: str, depth: int = 1) -> dict[str, Any]:
        """Like `_to_fields`, checking every field against its spec first (`UnsendableMessage`).

        The common field kinds (exact str, int, float, bool, bytes within bounds) are checked
        inline; anything else, and every value that fails the inline check, goes to its spec's
        `encode`, which accepts subclasses and raises with the reason. Same result, fewer calls.
        """
        plan = _WIRE_PLAN.get(type(self))
        if plan is None:
            plan = _WIRE_PLAN[type(self)] = _wire_plan(type(self))
        out: dict[str, Any] = {}
        inner = depth + 1
        for name, kind, a, b, encode_field, optional in plan:
            value = getattr(self, name)
            cls = value.__class__
            if kind == _STR:
                if cls is str and len(value) <= a and (b is None or value in b):
                    out[name] = value
                    continue
            elif kind == _INT:
                if cls is int and a <= value <= b:
                    out[name] = value
                    continue
            elif kind == _FLOAT:
                if cls is float and a <= value <= b and value - value == 0.0:  # in bounds and finite
                    out[name] = value
                    continue
            elif kind == _BOOL:
                if cls is bool:
                    out[name] = value
                    continue
            elif kind == _BYTES:
                if cls is bytes and len(value) <= a:
                    out[name] = value
                    continue
            if value is None:
                if optional:
                    continue
                raise UnsendableMessage("required field is None", field=name, message_type=owner)
            out[name] = encode_field(value, name, owner, inner)
        return out

    @classmethod
    def _from_fields(cls: type[M], data: Mapping[str, Any], owner: str | None = None) -> M:
        owner = owner or cls.TYPE or cls.__name__
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            spec: Spec = f.metadata["spec"]
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise MalformedMessage("required field is missing", field=f.name, message_type=owner)
                continue  # the dataclass default applies
            value = data[f.name]
            if value is None and f.metadata["optional"]:
                kwargs[f.name] = None
                continue
            kwargs[f.name] = spec.check(value, f.name, owner)
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as exc:  # a message's own __post_init__ cross-field checks
            raise MalformedMessage(str(exc), field=exc.field if isinstance(exc, FieldsDisagree) else None,
                                   message_type=owner) from exc

    def to_dict(self) -> dict[str, Any]:
        """The wire map, every key in sorted order."""
        fields = self._to_fields()
        fields["t"], fields["v"] = self.TYPE, self.VERSION
        return {k: fields[k] for k in sorted(fields)}


def encode(message: Message) -> bytes:
    """A message's msgpack bytes (not framed), after checking every field against its spec.

    Raises `UnsendableMessage` (a `LocalProtocolError`) naming the first field that is missing,
    mistyped or out of bounds: what the peer's decoder would refuse as `MalformedMessage`.
    """
    if not isinstance(message, Message):
        raise LocalProtocolError(f"{type(message).__name__} is not a message")
    if not message.TYPE:
        raise LocalProtocolError(f"{type(message).__name__} has no wire TYPE")
    fields = message._to_wire(message.TYPE)
    fields["t"], fields["v"] = message.TYPE, message.VERSION
    wire = {k: fields[k] for k in sorted(fields)}
    try:
        return pack(wire)
    except (UnicodeEncodeError, OverflowError, ValueError, TypeError) as exc:
        # Left to msgpack: a string that is not valid UTF-8 (a lone surrogate). Name the field.
        for key, value in wire.items():
            try:
                pack(value)
            except (UnicodeEncodeError, OverflowError, ValueError, TypeError):
                raise UnsendableMessage(f"cannot be packed: {exc}", field=key, message_type=message.TYPE) from exc
        raise UnsendableMessage(f"cannot be packed: {exc}", message_type=message.TYPE) from exc


def decode(
    data: bytes,
    expected: type[M] | Sequence[type[Message]],
    limits: Limits = DEFAULT_LIMITS,
) -> M | Message:
    """Bytes -> one of the `expected` message classes (chosen by its "t" field)."""
    return decode_with_fields(data, expected, limits)[0]


def decode_with_fields(
    data: bytes,
    expected: type[M] | Sequence[type[Message]],
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[M | Message, dict[str, Any]]:
    """Like `decode`, and also the map as received (unknown fields included), e.g. to check a signature."""
    classes = [expected] if isinstance(expected, type) else list(expected)
    by_type = {cls.TYPE: cls for cls in classes}
    obj = unpack(data, limits)
    if not isinstance(obj, dict):
        raise MalformedMessage(f"expected a map, got {type(obj).__name__}")
    kind = obj.get("t")
    if not isinstance(kind, str) or kind not in by_type:
        raise MalformedMessage(f"unexpected message type {str(kind)[:64]!r}; expected one of "
                               f"{', '.join(sorted(by_type))}", field="t")
    cls = by_type[kind]
    version = obj.get("v")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MalformedMessage("missing or invalid version", field="v", message_type=kind)
    if version > cls.VERSION:
        raise UnsupportedVersion(version, f"up to {cls.VERSION}", what=kind)
    return cls._from_fields(obj), obj


def decoder_for(*classes: type[Message], limits: Limits = DEFAULT_LIMITS) -> Callable[[bytes], Message]:
    """A one-argument decoder accepting exactly `classes` (handy for fuzzing and tests)."""
    return lambda data: decode(data, classes, limits)
