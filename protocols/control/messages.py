"""The local CLI's requests to its own daemon, and the daemon's replies (JSON-shaped, as INTERFACES.md).

Only the peer holding the data dir's `client.key` may open `/accelmesh/control/1.0.0`. A stream
carries one `Command` and gets one `Reply`; `generate` instead sends an inference `Request` and
gets the inference messages back (Chunk* then Result | Error). See SPEC.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from protocols.codec import Any_, Bool, Dict, Limits, Message, Nested, Str, field

__all__ = ["PROTOCOL_ID", "COMMANDS", "ERROR_CODES", "ErrorInfo", "Command", "Reply", "MAX_FRAME_SIZE",
           "MAX_ERROR_MESSAGE_CHARS", "LIMITS"]

PROTOCOL_ID = "/accelmesh/control/1.0.0"
MAX_FRAME_SIZE = 8 * 1024 * 1024  # a `cache-get` reply carries one block (4 MiB) as base64 text
MAX_ERROR_MESSAGE_CHARS = 4096  # one line for stderr
LIMITS = Limits(max_str_len=6 * 1024 * 1024)  # that base64 text: 4 MiB * 4/3, rounded up
COMMANDS = (
    "status",  # is the daemon up: peer id, pid, uptime, version
    "info",  # this node: peer_id, addrs, version, advert fields, stats (INTERFACES.md `info --json`)
    "peers",  # the peer table (INTERFACES.md `peers --json`)
    "stop",  # drain and exit
    "cache-stats",  # local store statistics
    "cache-ls",  # blocks in the local store
    "cache-get",  # one block by CID (args: cid)
    "cache-rm",  # remove one block by CID (args: cid); other nodes keep theirs
    "cache-verify",  # re-hash every block, drop corrupt ones
)
# What a failed Reply's ErrorInfo.code may say (a closed set, like the inference error codes).
ERROR_CODES = (
    "failed",  # the command failed: bad or missing args, unknown CID form, a store error (message says which)
    "not_found",  # cache-get / cache-rm: no block with that CID in the local store
)


@dataclasses.dataclass(frozen=True)
class ErrorInfo(Message):
    code: str = field(Str(max_len=32, choices=ERROR_CODES))
    message: str = field(Str(max_len=MAX_ERROR_MESSAGE_CHARS))


@dataclasses.dataclass(frozen=True)
class Command(Message):
    TYPE = "command"
    VERSION = 1
    command: str = field(Str(max_len=32, choices=COMMANDS))
    args: dict[str, Any] = field(Dict(Any_(), max_items=32, max_key_len=64), default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Reply(Message):
    """`result` is the JSON object the CLI prints for `--json`; `error` is set when `ok` is false."""

    TYPE = "reply"
    VERSION = 1
    ok: bool = field(Bool())
    result: Any = field(Any_(LIMITS), optional=True)  # the client decodes replies with LIMITS
    error: ErrorInfo | None = field(Nested(ErrorInfo), optional=True)

    def __post_init__(self) -> None:
        if self.ok == (self.error is not None):
            raise ValueError("a reply carries an error exactly when ok is false")
