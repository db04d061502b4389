"""The inference stream's state machine, sans-I/O (the shape of h11's `Connection`).

Each side owns one `InferenceStream`. `send(message) -> bytes` checks that *we* may send it
now (`LocalProtocolError` otherwise) and returns the framed bytes to write; `receive_data`
buffers bytes from the peer and `next_event()` returns the next message or `NEED_DATA`,
raising a `RemoteProtocolError` when the *peer* breaks the protocol.

    client                                   server
    IDLE --send Request--> ACTIVE            IDLE --recv Request--> ACTIVE
    ACTIVE --recv Chunk--> ACTIVE            ACTIVE --send Chunk (credit > 0)--> ACTIVE
    ACTIVE --send Credit--> ACTIVE           ACTIVE --recv Credit--> ACTIVE (credit += n)
    ACTIVE --recv Result | Error--> DONE     ACTIVE --send Result | Error--> DONE
    DONE --send Request--> ACTIVE            DONE --recv Request--> ACTIVE   (keep-alive)

Chunks are numbered from 0 with no gaps; a server may have at most `window` chunks (plus
credits received) outstanding; a request with ``stream=False`` gets no chunks at all. After
an answer the stream may carry the next Request (keep-alive: opening a stream costs several
round trips in py-libp2p, re-using one does not). A stream reset by either side is not a
message: the I/O layer treats it as cancellation.
"""

from __future__ import annotations

from enum import Enum

from protocols.codec import Limits, Message, decode, encode
from protocols.errors import FlowControlViolation, LocalProtocolError, MalformedMessage, RemoteProtocolError
from protocols.framing import NEED_DATA, FrameDecoder, _NeedData, encode_frame
from protocols.inference.messages import (
    CLIENT_MESSAGES,
    MAX_PROMPT_CHARS,
    MAX_RESPONSE_BYTES,
    SERVER_MESSAGES,
    Chunk,
    Credit,
    Error,
    Request,
    Result,
)

__all__ = ["Role", "State", "InferenceStream", "MAX_FRAME_SIZE", "MAX_CREDIT", "LIMITS"]

MAX_FRAME_SIZE = MAX_RESPONSE_BYTES + 64 * 1024  # a Result carries one response block plus its envelope
MAX_CREDIT = 1 << 20  # a client cannot make a server owe it more than this many chunks
# Str bounds count characters; msgpack's max_str_len counts UTF-8 bytes (up to 4 per character).
_LIMITS = Limits(max_bin_len=MAX_RESPONSE_BYTES, max_str_len=4 * MAX_PROMPT_CHARS)
LIMITS = _LIMITS  # what this protocol's messages are decoded with (e.g. a Request carried by another protocol)


class Role(Enum):
    CLIENT = "client"
    SERVER = "server"


class State(Enum):
    IDLE = "idle"  # nothing sent or received yet
    ACTIVE = "active"  # the request is out: chunks, credits, and finally a result or an error
    DONE = "done"  # a Result or an Error ended the request; the client may send the next Request


class InferenceStream:
    def __init__(self, role: Role, max_frame_size: int = MAX_FRAME_SIZE, *,
                 max_inbound_frame_size: int | None = None) -> None:
        """`max_frame_size` bounds every frame; `max_inbound_frame_size` (a node's own, lower
        limit) bounds only the frames received, so what this side sends is not cut short."""
        self.role = role
        self.state = State.IDLE
        self.request: Request | None = None
        self.chunks = 0  # chunks sent (server) or received (client) for the current request
        self.credit = 0  # chunks the server may still send
        self.requests = 0  # requests started on this stream
        self._decoder = FrameDecoder(min(max_frame_size, max_inbound_frame_size or max_frame_size))
        self._max_frame = max_frame_size

    # -- what may happen now ------------------------------------------------------------

    @property
    def can_send_chunk(self) -> bool:
        return self.role is Role.SERVER and self.state is State.ACTIVE and self.credit > 0

    @property
    def streaming(self) -> bool:
        return self.request is not None and self.request.stream

    # -- sending -----------------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """Check that we may send `message` now, update the state, return the frame to write.

        `LocalProtocolError` if the state forbids it, or if a field is out of its bounds
        (`UnsendableMessage`, from the encoder) or the frame too large; a refused message
        leaves the state as it was.
        """
        if self.state is State.DONE and not (self.role is Role.CLIENT and isinstance(message, Request)):
            raise LocalProtocolError(f"{self.role.value} cannot send {message.TYPE}: the answer is done")
        frame = encode_frame(encode(message), self._max_frame)  # before any state changes
        if self.role is Role.CLIENT:
            self._client_sends(message)
        else:
            self._server_sends(message)
        return frame

    def _client_sends(self, message: Message) -> None:
        if isinstance(message, Request):
            if self.state is State.ACTIVE:
                raise LocalProtocolError("one Request at a time: wait for the answer before the next")
            self._start(message)
        elif isinstance(message, Credit):
            if self.state is not State.ACTIVE:
                raise LocalProtocolError("Credit before the Request")
            self.credit = min(self.credit + message.n, MAX_CREDIT)
        else:
            raise LocalProtocolError(f"a client does not send {type(message).__name__}")

    def _server_sends(self, message: Message) -> None:
        if self.state is not State.ACTIVE:
            raise LocalProtocolError(f"server cannot send {message.TYPE} before the Request")
        if isinstance(message, Chunk):
            if not self.streaming:
                raise LocalProtocolError("the request asked for no streaming: send only the Result")
            if message.index != self.chunks:
                raise LocalProtocolError(f"chunk index {message.index}, expected {self.chunks}")
            if self.credit <= 0:
                raise LocalProtocolError("no credit: wait for the client's Credit before the next Chunk")
            self.chunks += 1
            self.credit -= 1
        elif isinstance(message, (Result, Error)):
            self.state = State.DONE
        else:
            raise LocalProtocolError(f"a server does not send {type(message).__name__}")

    def chunk(self, text: str) -> bytes:
        """Server: the next Chunk with `text` (numbered automatically)."""
        return self.send(Chunk(index=self.chunks, text=text))

    # -- receiving ---------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._decoder.receive_data(data)

    @property
    def in_frame(self) -> bool:
        """A frame has started but not finished (for the I/O layer's frame timeout)."""
        return self._decoder.in_frame

    def next_event(self) -> Message | _NeedData:
        frame = self._decoder.next_frame()
        if frame is NEED_DATA:
            return NEED_DATA
        assert isinstance(frame, bytes)
        expected = SERVER_MESSAGES if self.role is Role.CLIENT else CLIENT_MESSAGES
        message = decode(frame, expected, _LIMITS)
        self.receive_message(message)
        return message

    def receive_message(self, message: Message) -> None:
        """Apply a message already decoded elsewhere (e.g. the first frame of a control stream)."""
        if self.state is State.DONE:
            if self.role is Role.SERVER and isinstance(message, Credit):
                return  # a Credit sent while our Result was in flight: a normal race, nothing to do
            if not (self.role is Role.SERVER and isinstance(message, Request)):
                raise RemoteProtocolError(f"{self.role.value} received {message.TYPE} after the answer was done")
        expected = SERVER_MESSAGES if self.role is Role.CLIENT else CLIENT_MESSAGES
        if not isinstance(message, expected):
            raise MalformedMessage(f"a {self.role.value} does not receive {message.TYPE}", message_type=message.TYPE)
        if self.role is Role.CLIENT:
            self._client_receives(message)
        else:
            self._server_receives(message)

    def _client_receives(self, message: Message) -> None:
        if self.state is not State.ACTIVE:
            raise RemoteProtocolError(f"server sent {message.TYPE} before any Request")
        if isinstance(message, Chunk):
            if not self.streaming:
                raise MalformedMessage("chunk for a request that asked for no streaming", message_type="chunk")
            if message.index != self.chunks:
                raise MalformedMessage(f"chunk index {message.index}, expected {self.chunks}", field="index",
                                       message_type="chunk")
            if self.credit <= 0:
                raise FlowControlViolation(self.chunks + 1, self.chunks)
            self.chunks += 1
            self.credit -= 1
        else:  # Result or Error
            self.state = State.DONE

    def _start(self, request: Request) -> None:
        self.request, self.state, self.credit, self.chunks = request, State.ACTIVE, request.window, 0
        self.requests += 1

    def _server_receives(self, message: Message) -> None:
        if isinstance(message, Request):
            if self.state is State.ACTIVE:
                raise RemoteProtocolError("a second Request before the answer to the first")
            self._start(message)
        else:  # Credit
            if self.state is not State.ACTIVE:
                raise RemoteProtocolError("Credit before the Request")
            self.credit = min(self.credit + message.n, MAX_CREDIT)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return (f"<InferenceStream {self.role.value} {self.state.value} request {self.requests} "
                f"chunks={self.chunks} credit={self.credit}>")
