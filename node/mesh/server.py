"""Serving inference requests on a stream: credit-based streaming, deadlines, keep-alive, cancellation.

The mesh does not import the router: the daemon hands `serve_inference_stream` a `runner`
(the front door's, `node.serving.FrontDoor.runner(entry)`), an async generator function that takes the
protocol `Request` and the caller's peer id and yields text chunks, then the protocol `Result`.
The runner admits the request (a slot, the queue, or `Busy`); this module only moves its answer
under the request's deadline. Used by `/accelmesh/infer/1.0.0` and by the control protocol's
`generate`.

While the runner produces chunks, one reader task takes the client's `Credit` messages: the
writer never sends more than the credit allows, so a slow reader holds back the generation
instead of growing a buffer (py-libp2p has no write backpressure). A reset or closed stream
cancels the runner at once, which frees its slot.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import trio

from node.errors import AccelmeshError, DeadlineExceeded, ProviderError
from node.mesh.errors import error_for
from node.mesh.streams import FramedStream, StreamClosedEarly, StreamTimeout
from protocols.errors import ProtocolError
from protocols.inference.machine import MAX_FRAME_SIZE as MAX_INFER_FRAME
from protocols.inference.machine import InferenceStream, Role
from protocols.inference.messages import MAX_CHUNK_CHARS, Error, Request, Result

__all__ = ["Runner", "serve_inference", "serve_inference_stream"]

log = logging.getLogger(__name__)

Runner = Callable[[Request, str], AsyncIterator["str | Result"]]  # (request, caller peer id)


class ClientSide:
    """The one reader of a stream a server answers on: the client's Credits, its next Request, its leaving.

    A single task reads for the stream's whole life and is never cancelled while the stream is
    in use (a cancelled py-libp2p read can lose bytes it already took off the connection). It
    wakes the writer on each Credit, hands Requests over one at a time, and cancels the answer
    in progress when the client goes away (the end of its side before the answer, or a reset)
    or breaks the protocol (`error`, re-raised by the server for the stream guard to log).
    """

    def __init__(self, framed: FramedStream) -> None:
        self.framed = framed
        self.credit = trio.Event()  # replaced after each Credit: wait on the current one
        self.answering: trio.CancelScope | None = None  # the answer in progress, if any
        self.error: ProtocolError | StreamTimeout | None = None
        self._send, self.requests = trio.open_memory_channel[Request](1)

    async def run(self) -> None:
        try:
            while True:
                event = await self.framed.read_event(idle=False)  # the server times idleness itself
                if event is None:
                    break  # the client closed its side: before an answer that means it went away
                if isinstance(event, Request):
                    await self._send.send(event)
                else:
                    self.credit.set()
                    self.credit = trio.Event()
        except StreamClosedEarly:
            pass
        except (ProtocolError, StreamTimeout) as exc:
            self.error = exc
        finally:
            # Synchronously, after `error` is set: the server sees the end of the requests only now.
            if self.answering is not None:
                self.answering.cancel()
            self._send.close()


async def serve_inference(
    framed: FramedStream,
    machine: InferenceStream,
    request: Request,
    runner: Runner,
) -> None:
    """Answer one `request` already received by `machine` on `framed` (the control protocol's `generate`)."""
    client = ClientSide(framed)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        await _answer(framed, machine, request, runner, client)
        nursery.cancel_scope.cancel()  # one request per control stream: nothing more to read
    if client.error is not None:
        raise client.error


async def serve_inference_stream(
    framed: FramedStream,
    runner: Runner,
    *,
    allow_request: Callable[[], bool] | None = None,
) -> None:
    """Serve every request of one keep-alive stream, until the client closes it or it idles out.

    `allow_request` is asked before each request after the first (the first was admitted when the
    stream opened): the per-peer request rate applies to requests, not only to streams.
    """
    machine = InferenceStream(Role.SERVER, MAX_INFER_FRAME, max_inbound_frame_size=framed.limits.max_frame_size)
    framed.decoder = machine
    client = ClientSide(framed)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        first = True
        while True:
            request: Request | None = None
            with trio.move_on_after(framed.limits.idle_timeout) as idle:
                try:
                    request = await client.requests.receive()
                except trio.EndOfChannel:
                    pass
            if request is None:
                if idle.cancelled_caught and first:
                    raise StreamTimeout("idle_timeout", "no request after the stream opened")
                break  # the client closed the stream, broke the protocol, or left it idle: done
            if not first and allow_request is not None and not allow_request():
                usable = await _send_error(framed, machine, Error(
                    code="busy", message="over this peer's request rate", retryable=True, retry_after=1.0))
            else:
                usable = await _answer(framed, machine, request, runner, client)
            if not usable:
                break
            first = False
        nursery.cancel_scope.cancel()
    if client.error is not None:
        raise client.error


async def _answer(
    framed: FramedStream,
    machine: InferenceStream,
    request: Request,
    runner: Runner,
    client: ClientSide,
) -> bool:
    """Run `request` and stream its answer; True if the stream can carry another request."""
    torn = False  # a write was cut off midway: half a message is on the stream

    async def send(data: bytes) -> None:
        nonlocal torn
        torn = True
        await framed.write(data)
        torn = False

    failure: BaseException | None = None
    with trio.CancelScope() as scope:
        client.answering = scope
        try:
            with trio.fail_after(request.timeout_ms / 1000.0):  # queueing and writing count too
                result: Result | None = None
                async with aclosing(runner(request, framed.peer)) as items:
                    async for item in items:
                        if isinstance(item, Result):
                            result = item
                        elif request.stream:
                            for start in range(0, len(item), MAX_CHUNK_CHARS):  # a Chunk's bound
                                while not machine.can_send_chunk:
                                    await client.credit.wait()
                                await send(machine.chunk(item[start:start + MAX_CHUNK_CHARS]))
                if result is None:
                    raise ProviderError("node", "the runner produced no answer")
                await send(machine.send(result))
        except trio.TooSlowError:
            failure = DeadlineExceeded(request.timeout_ms / 1000.0)
        except StreamClosedEarly:
            return False
        except AccelmeshError as exc:
            failure = exc
        except Exception as exc:  # a bug in a runner: answer `internal`, log the traceback, keep serving
            log.exception("request %s failed", request.id, extra={"request_id": request.id})
            failure = exc
        finally:
            client.answering = None
    if scope.cancelled_caught:  # the client went away or broke the protocol: the generation is cancelled
        log.info("request %s cancelled: the client went away", request.id,
                 extra={"request_id": request.id, "peer": framed.peer})
        await framed.reset()
        return False
    if torn or (failure is not None and machine.state.value != "active"):
        # Cut off while writing (the deadline), or failed after the Result went out: nothing more
        # can be said on this stream, and the client must not wait for it.
        await framed.reset()
        return False
    if failure is not None:
        return await _send_error(framed, machine, error_for(failure))
    return True


async def _send_error(framed: FramedStream, machine: InferenceStream, error: Error) -> bool:
    """Answer with `error`; True if the stream can carry another request."""
    try:
        with trio.fail_after(framed.limits.idle_timeout):  # a client that takes not even an Error is gone
            await framed.write(machine.send(error))
    except (StreamClosedEarly, trio.TooSlowError):
        await framed.reset()
        return False
    return True
