"""Errors raised by the wire layer, and whose fault each one is.

    ProtocolError                   anything the wire layer rejects
    ├── RemoteProtocolError         the peer sent something invalid: reset its stream, penalize it
    │   ├── FrameTooLarge           a length prefix over the frame limit (limit, size)
    │   ├── MalformedMessage        undecodable bytes, or a field missing, mistyped or out of bounds
    │   ├── UnsupportedVersion      a message or record from a version we cannot read
    │   ├── CIDMismatch             bytes that do not hash to the CID they were sent for
    │   ├── InsecureHash            a CID whose hash function is not on the allowlist
    │   ├── BadSignature            a record whose signature or signer does not verify
    │   ├── ExpiredRecord           a record past its expiry (or created too far in the future)
    │   ├── StaleRecord             a replayed record: not newer than the one already held
    │   └── FlowControlViolation    more chunks than the receiver granted credit for
    └── LocalProtocolError          we tried to produce something the protocol forbids (our bug)
        ├── UnsendableMessage       an outgoing message with a field missing, mistyped or out of bounds
        └── NotCanonical            a value with no canonical encoding (NaN, an object, a huge int)

Every error carries the fields a log line needs, so callers never parse messages.
"""

from __future__ import annotations

__all__ = [
    "ProtocolError",
    "RemoteProtocolError",
    "LocalProtocolError",
    "FrameTooLarge",
    "MalformedMessage",
    "UnsupportedVersion",
    "CIDMismatch",
    "InsecureHash",
    "BadSignature",
    "ExpiredRecord",
    "StaleRecord",
    "FlowControlViolation",
    "UnsendableMessage",
    "NotCanonical",
]


class ProtocolError(Exception):
    """Base of every error the wire layer raises."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: reset the stream, never the node."""


class LocalProtocolError(ProtocolError):
    """We broke the protocol: a bug on this side, never the peer's fault."""


class FrameTooLarge(RemoteProtocolError):
    def __init__(self, size: int, limit: int, what: str = "frame") -> None:
        super().__init__(f"{what} of {size} bytes exceeds the limit of {limit} bytes")
        self.size, self.limit, self.what = size, limit, what


class MalformedMessage(RemoteProtocolError):
    def __init__(self, reason: str, *, field: str | None = None, message_type: str | None = None) -> None:
        where = ".".join(p for p in (message_type, field) if p)
        super().__init__(f"{where}: {reason}" if where else reason)
        self.reason, self.field, self.message_type = reason, field, message_type


class UnsupportedVersion(RemoteProtocolError):
    def __init__(self, got: object, supported: object, what: str = "message") -> None:
        super().__init__(f"{what} version {got!r} is not supported (supported: {supported})")
        self.got, self.supported, self.what = got, supported, what


class CIDMismatch(RemoteProtocolError):
    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"bytes hash to {actual}, expected {expected}")
        self.expected, self.actual = expected, actual


class InsecureHash(RemoteProtocolError):
    def __init__(self, cid: str, reason: str) -> None:
        super().__init__(f"CID {cid} rejected: {reason}")
        self.cid, self.reason = cid, reason


class BadSignature(RemoteProtocolError):
    def __init__(self, reason: str, *, signer: str | None = None) -> None:
        super().__init__(f"bad signature: {reason}" + (f" (signer {signer})" if signer else ""))
        self.reason, self.signer = reason, signer


class ExpiredRecord(RemoteProtocolError):
    def __init__(self, reason: str, *, expires: float | None = None, now: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.expires, self.now = reason, expires, now


class StaleRecord(RemoteProtocolError):
    def __init__(self, subject: str, got_seq: int, have_seq: int) -> None:
        super().__init__(f"record from {subject} has sequence {got_seq}, not newer than {have_seq} (replayed?)")
        self.subject, self.got_seq, self.have_seq = subject, got_seq, have_seq


class FlowControlViolation(RemoteProtocolError):
    def __init__(self, sent: int, credit: int) -> None:
        super().__init__(f"peer sent chunk {sent} with credit for only {credit}")
        self.sent, self.credit = sent, credit


class UnsendableMessage(LocalProtocolError):
    """The encoder refused one of our messages: the peer would refuse it as `MalformedMessage`."""

    def __init__(self, reason: str, *, field: str | None = None, message_type: str | None = None) -> None:
        where = ".".join(p for p in (message_type, field) if p)
        super().__init__(f"refusing to send {where or 'a message'}: {reason}")
        self.reason, self.field, self.message_type = reason, field, message_type


class NotCanonical(LocalProtocolError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path or 'value'}: {reason}")
        self.path, self.reason = path, reason
