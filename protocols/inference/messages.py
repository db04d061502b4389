"""Remote inference: Request -> Chunk* -> Result | Error, one request at a time per stream; a reset cancels.

The client grants the server credit for `window` chunks in its Request and tops it up with
`Credit` as it consumes them, so a slow reader never makes the server buffer more than
`window` chunks (py-libp2p streams have no write backpressure). See SPEC.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from protocols.canonical import decode_response
from protocols.cid import cid_of
from protocols.codec import Any_, Bool, Bytes, Dict, Float, Int, List, Message, Nested, Str, field
from protocols.errors import CIDMismatch
from protocols.vocabulary import ACCELERATOR_KINDS, CACHE_MODES, CACHE_TIERS, MAX_PEER_ID_LENGTH, TASKS

__all__ = [
    "PROTOCOL_ID",
    "MAX_HOPS",
    "DEFAULT_WINDOW",
    "MAX_WINDOW",
    "MAX_TIMEOUT_MS",
    "MAX_PROMPT_CHARS",
    "MAX_CHUNK_CHARS",
    "MAX_RESPONSE_BYTES",
    "MAX_ERROR_MESSAGE_CHARS",
    "MAX_RETRY_AFTER",
    "MAX_VERIFY",
    "TASKS",
    "CACHE_MODES",
    "CACHE_TIERS",
    "ERROR_CODES",
    "ChatMessage",
    "Request",
    "Chunk",
    "Credit",
    "Result",
    "Error",
    "CLIENT_MESSAGES",
    "SERVER_MESSAGES",
]

PROTOCOL_ID = "/accelmesh/infer/1.0.0"
MAX_HOPS = 2  # entry node -> serving node (+1 spare); the router refuses to forward a forwarded request
DEFAULT_WINDOW = 32  # chunks a server may send ahead of the client's credit
MAX_WINDOW = 1024
MAX_TIMEOUT_MS = 3_600_000  # one hour: a longer deadline is sent as this
MAX_PROMPT_CHARS = 1024 * 1024  # 1 Mi characters of prompt or of one chat message
MAX_CHUNK_CHARS = 64 * 1024  # one streamed delta
MAX_RESPONSE_BYTES = 4 * 1024 * 1024  # the canonical response bytes (one cache block)
MAX_ERROR_MESSAGE_CHARS = 4096  # an Error's message: one readable paragraph, not a log
MAX_RETRY_AFTER = 86_400.0  # seconds: a busy hint longer than a day is no hint
MAX_VERIFY = 16  # verify=k: at most this many nodes must agree
ERROR_CODES = (
    "bad_request",  # the request itself is invalid (not retryable)
    "unauthorized",  # the caller may not use this node
    "busy",  # every slot and the queue are full (retryable, retry_after)
    "model_not_found",  # no local provider serves that model
    "no_provider",  # no local provider is ready for that task
    "provider_failed",  # the provider failed (retryable if it says so)
    "deadline_exceeded",  # the deadline passed before an answer
    "cache_miss",  # cache mode only-if-cached and nothing cached
    "internal",  # a bug on the serving node
    "disagreement",  # verify=k: no k nodes agreed (sent only in answer to a Request with verify > 1)
)


@dataclasses.dataclass(frozen=True)
class ChatMessage(Message):
    role: str = field(Str(max_len=32))
    content: str = field(Str(max_len=MAX_PROMPT_CHARS))


@dataclasses.dataclass(frozen=True)
class Request(Message):
    """Starts one request: the client's first message on a stream, and again after each Result or
    Error (keep-alive: the stream carries the next request; one at a time, never while one is active)."""

    TYPE = "request"
    VERSION = 1

    id: str = field(Str(max_len=64))  # request id, echoed in logs and results
    task: str = field(Str(max_len=16, choices=TASKS))
    timeout_ms: int = field(Int(1, MAX_TIMEOUT_MS))  # the caller's remaining deadline when sent
    prompt: str | None = field(Str(max_len=MAX_PROMPT_CHARS), optional=True)  # generate / embed
    messages: tuple[ChatMessage, ...] | None = field(List(Nested(ChatMessage), max_items=1024), optional=True)
    model: str | None = field(Str(max_len=256), optional=True)  # None: the server's default
    provider: str | None = field(Str(max_len=64), optional=True)  # None: the server's chain
    params: dict[str, Any] = field(Dict(Any_(), max_items=64, max_key_len=64), default_factory=dict)
    stream: bool = field(Bool(), default=True)  # False: no Chunk messages, only the Result
    hops: int = field(Int(0, MAX_HOPS), default=1)  # times this request has crossed the network
    cache: str = field(Str(max_len=16, choices=CACHE_MODES), default="default")
    strategy: str | None = field(Str(max_len=32), optional=True)
    on_peers: tuple[str, ...] = field(List(Str(max_len=MAX_PEER_ID_LENGTH), max_items=16), default=())
    accelerator: str | None = field(Str(max_len=8, choices=ACCELERATOR_KINDS), optional=True)
    window: int = field(Int(1, MAX_WINDOW), default=DEFAULT_WINDOW)  # initial chunk credit
    verify: int | None = field(Int(2, MAX_VERIFY), optional=True)  # 1.1: k nodes must agree (absent: one answer)

    def __post_init__(self) -> None:
        if self.task == "chat":
            if self.messages is None or self.prompt is not None:
                raise ValueError("a chat request carries messages and no prompt")
        elif self.prompt is None or self.messages is not None:
            raise ValueError(f"a {self.task} request carries a prompt and no messages")


@dataclasses.dataclass(frozen=True)
class Chunk(Message):
    """One streamed text delta. `index` counts from 0, so gaps and reordering are detectable."""

    TYPE = "chunk"
    VERSION = 1
    index: int = field(Int(0, (1 << 32) - 1))
    text: str = field(Str(max_len=MAX_CHUNK_CHARS))


@dataclasses.dataclass(frozen=True)
class Credit(Message):
    """The client consumed chunks: the server may send `n` more."""

    TYPE = "credit"
    VERSION = 1
    n: int = field(Int(1, MAX_WINDOW))


@dataclasses.dataclass(frozen=True)
class Result(Message):
    """The answer. Text or embedding, model and usage are inside `response` (canonical bytes)."""

    TYPE = "result"
    VERSION = 1

    response: bytes = field(Bytes(max_len=MAX_RESPONSE_BYTES))  # the canonical response, as stored
    cid: str = field(Str(max_len=128))  # response CID: the receiver hashes `response` to check it
    key: str = field(Str(max_len=128))  # the request key the server computed
    provider: str = field(Str(max_len=64))  # the provider that answered (on the serving node)
    peer: str = field(Str(max_len=MAX_PEER_ID_LENGTH))  # peer id that computed the answer
    cache: str = field(Str(max_len=8, choices=CACHE_TIERS))  # where the serving node found it
    timings: dict[str, float] = field(Dict(Float(0.0, 1e9), max_items=16), default_factory=dict)  # ms
    served_from: str | None = field(Str(max_len=MAX_PEER_ID_LENGTH), optional=True)  # cluster-hit source
    # 1.1: the nodes that computed this same response CID, when the Request had `verify`
    agreed: tuple[str, ...] | None = field(List(Str(max_len=MAX_PEER_ID_LENGTH), max_items=MAX_VERIFY),
                                           optional=True)

    def verify(self) -> dict[str, Any]:
        """Check the response bytes against the CID and decode them; CIDMismatch / MalformedMessage."""
        actual = cid_of(self.response)
        if actual != self.cid:
            raise CIDMismatch(self.cid, actual)
        return decode_response(self.response)


@dataclasses.dataclass(frozen=True)
class Error(Message):
    TYPE = "error"
    VERSION = 1
    code: str = field(Str(max_len=32, choices=ERROR_CODES))
    message: str = field(Str(max_len=MAX_ERROR_MESSAGE_CHARS))
    retryable: bool = field(Bool(), default=False)
    retry_after: float | None = field(Float(0.0, MAX_RETRY_AFTER), optional=True)  # seconds
    # 1.1, code `disagreement`: each node that answered (peer id) and the response CID it returned
    answers: dict[str, str] | None = field(Dict(Str(max_len=128), max_items=64, max_key_len=MAX_PEER_ID_LENGTH),
                                           optional=True)


CLIENT_MESSAGES: tuple[type[Message], ...] = (Request, Credit)
SERVER_MESSAGES: tuple[type[Message], ...] = (Chunk, Result, Error)
