"""Unsigned-varint length-prefixed frames (byte-compatible with libp2p's `encode_varint_prefixed`).

A frame is ``varint(len(payload)) || payload``. The decoder is incremental and sans-I/O, shaped
like h11: `receive_data(bytes)` only buffers; `next_frame()` returns the next whole frame as
`bytes`, or `NEED_DATA`, and raises every rejection:

- a length prefix over the frame limit -> `FrameTooLarge`, as soon as the prefix is read and
  before any byte of the payload is buffered beyond it;
- a varint longer than the limit needs (never more than `MAX_VARINT_BYTES`), or not minimally
  encoded -> `MalformedMessage`.

The hard maxima are the constants below; `node.config` may only lower them.
"""

from __future__ import annotations

from protocols.errors import FrameTooLarge, LocalProtocolError, MalformedMessage

__all__ = [
    "MAX_FRAME_SIZE",
    "MAX_VARINT_BYTES",
    "NEED_DATA",
    "FrameDecoder",
    "encode_frame",
    "encode_varint",
    "varint_length",
]

# The largest frame any accelmesh protocol may send: a cached response block (bounded at 4 MiB)
# plus its envelope fits; anything bigger is an attack or a bug.
MAX_FRAME_SIZE = 8 * 1024 * 1024
# The unsigned-varint spec caps a varint at 9 bytes (63 bits): `encode_varint` refuses larger
# values, and a decoder never reads more (a frame length needs at most 4: the limit's own length).
MAX_VARINT_BYTES = 9
_MAX_VARINT_VALUE = (1 << (7 * MAX_VARINT_BYTES)) - 1  # 2**63 - 1


class _NeedData:
    """Sentinel: `next_frame()` needs more bytes before it can return a frame."""

    _instance: _NeedData | None = None

    def __new__(cls) -> _NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"

    def __bool__(self) -> bool:
        return False


NEED_DATA = _NeedData()


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128, minimal (what the multiformats unsigned-varint spec and libp2p use), at
    most `MAX_VARINT_BYTES` long: a value over 2**63 - 1 is refused (`LocalProtocolError`)."""
    if value < 0:
        raise LocalProtocolError(f"cannot encode negative varint {value}")
    if value > _MAX_VARINT_VALUE:
        raise LocalProtocolError(f"cannot encode {value} in a varint of at most {MAX_VARINT_BYTES} bytes")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varint_length(limit: int) -> int:
    """How many bytes a varint encoding a value up to `limit` may take."""
    return len(encode_varint(limit))


def encode_frame(payload: bytes, max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """``varint(len(payload)) || payload``; refuses (our bug) a payload over the limit."""
    if len(payload) > max_frame_size:
        raise LocalProtocolError(f"refusing to send a frame of {len(payload)} bytes (limit {max_frame_size})")
    return encode_varint(len(payload)) + payload


class FrameDecoder:
    """Incremental frame decoder. Without arguments its limit is the hard maximum."""

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if not 0 < max_frame_size <= MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be in 1..{MAX_FRAME_SIZE} (settings may only lower it)")
        self.max_frame_size = max_frame_size
        self._max_prefix = varint_length(max_frame_size)  # <= 4 bytes: well under MAX_VARINT_BYTES
        assert self._max_prefix <= MAX_VARINT_BYTES
        self._buffer = bytearray()
        self._length: int | None = None  # the current frame's payload length, once its prefix is read

    @property
    def pending(self) -> int:
        """Bytes buffered that are not yet part of a returned frame (0: between frames)."""
        return len(self._buffer)

    @property
    def in_frame(self) -> bool:
        """True once the first byte of a frame has arrived and until the frame is complete."""
        return bool(self._buffer) or self._length is not None

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer. Never raises: rejections come from `next_frame()`."""
        self._buffer += data

    def next_frame(self) -> bytes | _NeedData:
        if self._length is None:
            length = self._read_prefix()
            if length is None:
                return NEED_DATA
            self._length = length
        if len(self._buffer) < self._length:
            return NEED_DATA
        frame = bytes(self._buffer[: self._length])
        del self._buffer[: self._length]
        self._length = None
        return frame

    def _read_prefix(self) -> int | None:
        value = 0
        for i, byte in enumerate(self._buffer):
            if i >= self._max_prefix:
                raise MalformedMessage(f"length varint longer than {self._max_prefix} bytes", field="length")
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if byte == 0 and i > 0:
                    raise MalformedMessage("length varint is not minimally encoded", field="length")
                if value > self.max_frame_size:
                    raise FrameTooLarge(value, self.max_frame_size)
                del self._buffer[: i + 1]
                return value
        if len(self._buffer) >= self._max_prefix:  # every byte so far says "more follows"
            raise MalformedMessage(f"length varint longer than {self._max_prefix} bytes", field="length")
        return None

    def __repr__(self) -> str:
        state = f"in frame, {self._length} bytes expected" if self._length is not None else "between frames"
        return f"<FrameDecoder max={self.max_frame_size} buffered={len(self._buffer)} {state}>"
