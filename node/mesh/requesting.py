"""Asking a node for one inference on a stream: send the Request, return credit, verify the Result."""

from __future__ import annotations

from collections.abc import AsyncIterator

from node.errors import InvalidRequest, ProviderError, ProviderFailed
from node.mesh.errors import raise_for
from node.mesh.streams import FramedStream
from protocols.errors import ProtocolError
from protocols.inference.machine import InferenceStream
from protocols.inference.messages import Credit, Error, Request, Result

__all__ = ["request_inference"]


async def request_inference(framed: FramedStream, request: Request) -> AsyncIterator[str | Result]:
    """Send `request` on a fresh stream; yield text chunks, then the verified `Result`.

    Credit is returned as chunks are consumed (half a window at a time), so the server never
    runs more than one window ahead of this reader. The Result's bytes are hashed and checked
    against its CID before it is yielded (CIDMismatch otherwise).
    """
    machine = framed.decoder
    assert isinstance(machine, InferenceStream)
    _check_sendable(request)
    await framed.write(machine.send(request))
    consumed, top_up = 0, max(1, request.window // 2)
    while True:
        event = await framed.read_event(idle=False)
        if event is None:
            raise ProviderFailed(f"peer {framed.peer[-8:]}", "the stream ended before the result (the peer reset it: "
                                 "over one of its limits, or shutting down; its log says which)", retryable=True)
        if isinstance(event, Result):
            event.verify()
            _check_agreed(request, event, framed.peer)
            yield event
            return
        if isinstance(event, Error):
            raise_for(event, framed.peer)
        yield event.text
        consumed += 1
        if consumed >= top_up and machine.state.value == "active":
            await framed.write(machine.send(Credit(consumed)))
            consumed = 0


def _check_agreed(request: Request, result: Result, peer: str) -> None:
    """A Request with `verify = k` needs a Result that k distinct nodes agreed on: a node that ignored
    the field (older than protocol 1.1) answers with one node's word, which must not pass as k."""
    agreed = len(set(result.agreed or ()))
    if request.verify and agreed < request.verify:
        raise ProviderError(f"peer {peer[-8:]}", f"asked for verify={request.verify}, got an answer {agreed} "
                            "node(s) agreed on (a daemon older than verify answers with one node's word)",
                            retryable=False)  # (not ProviderFailed: the stream is fine, and no retry may follow)


def _check_sendable(request: Request) -> None:
    """Refuse here, with the field and the reason, a Request the server would refuse to decode
    (e.g. more than 16 `on_peers`): otherwise the caller would only see its stream reset."""
    from protocols.codec import encode

    try:
        encode(request)  # checks every field against the bounds the server decodes with
    except ProtocolError as exc:
        raise InvalidRequest(f"this request cannot be sent: {exc}") from exc
