"""Serving one inference request on a stream: admission, credit-based streaming, deadlines, cancellation.

The mesh does not import the router: the daemon hands `serve_inference` a `runner`, an async
generator function that takes the protocol `Request` and yields text chunks and then one
answer object (attributes: response, cid, key, provider, peer, cache, latency_ms,
served_from). Used by `/accelmesh/infer/1.0.0` and by the control protocol's `generate`.

While the runner produces chunks, a reader task takes the client's `Credit` messages: the
writer never sends more than the credit allows, so a slow reader holds back the generation
instead of growing a buffer (py-libp2p has no write backpressure). A reset or closed stream
cancels the runner at once, which frees the slot.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from node.errors import (
    AccelmeshError,
    AllProvidersFailed,
    CacheMiss,
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
    ProviderError,
    ProviderFailed,
    ProviderNotFound,
    ProviderUnavailable,
    RateLimited,
)
from node.providers.base import LOCAL_SLOT
from node.mesh.streams import FramedStream, StreamClosedEarly, StreamTimeout
from protocols.errors import ProtocolError
from protocols.inference.machine import MAX_FRAME_SIZE as MAX_INFER_FRAME
from protocols.inference.machine import InferenceStream, Role
from protocols.inference.messages import MAX_CHUNK_CHARS, MAX_TIMEOUT_MS, Credit, Error, Request, Result

__all__ = [
    "Admission",
    "AdmissionStatistics",
    "Busy",
    "ClusterBusy",
    "Slot",
    "RemoteError",
    "Runner",
    "error_for",
    "raise_for",
    "request_inference",
    "serve_inference",
    "serve_inference_stream",
    "StreamPool",
    "wire_timeout_ms",
]

log = logging.getLogger(__name__)

Runner = Callable[[Request], AsyncIterator[Any]]

MAX_ERROR_MESSAGE = 4096  # characters: the inference protocol's bound on Error.message


class Busy(AccelmeshError):
    def __init__(self, retry_after: float) -> None:
        super().__init__("every slot and the queue are full")
        self.retry_after = retry_after


class ClusterBusy(RateLimited):
    """Every eligible node answered busy (the caller hears `busy`, with the smallest retry_after)."""


@dataclass(frozen=True)
class AdmissionStatistics:
    in_flight: int
    queued: int
    forwarding: int
    max_concurrent: int
    max_queue: int
    served: int
    refused_busy: int


class Admission:
    """`max_concurrent` requests run here at once; up to `max_queue` more wait; beyond that: busy.

    A request that the mesh hands to another node gives its slot back while that node serves it
    (`Slot.hand_off`); it counts as `forwarding`, not `in_flight`, until it ends or needs a
    slot again for work done here (`Slot.local`, held by the router around a local provider).
    So the slots count the work done on this node, and two full nodes forwarding to each other
    never each hold every slot while waiting for the other's.
    """

    def __init__(self, max_concurrent: int, max_queue: int) -> None:
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.limiter = trio.CapacityLimiter(max_concurrent)
        self.queued = 0
        self.forwarding = 0
        self.served = 0
        self.refused_busy = 0
        self.changed = trio.Event()  # set whenever in_flight, queued or forwarding changes (load adverts watch it)

    @property
    def in_flight(self) -> int:
        return int(self.limiter.borrowed_tokens)

    @property
    def idle(self) -> bool:
        """Nothing running, waiting or forwarded (a drain waits for this)."""
        return not (self.in_flight or self.queued or self.forwarding)

    def _touch(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def _admit(self, slot: Slot) -> None:
        """A slot for `slot` now, or a place in the queue; Busy when the queue is full too."""
        if self.limiter.available_tokens:
            await self.limiter.acquire_on_behalf_of(slot)
            return
        if self.queued >= self.max_queue:
            self.refused_busy += 1
            raise Busy(retry_after=1.0)
        self.queued += 1
        self._touch()
        try:
            await self.limiter.acquire_on_behalf_of(slot)
        finally:
            self.queued -= 1
            self._touch()  # also when cancelled while waiting: a drain may be waiting for this

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        slot = Slot(self)
        await self._admit(slot)
        slot.held = True
        self._touch()
        token = LOCAL_SLOT.set(slot)
        try:
            yield slot
        finally:
            try:
                LOCAL_SLOT.reset(token)
            except ValueError:  # closed from another context, which never saw it
                pass
            if slot.held:
                self.limiter.release_on_behalf_of(slot)
            else:
                self.forwarding -= 1
            self.served += 1
            self._touch()

    def statistics(self) -> AdmissionStatistics:
        return AdmissionStatistics(self.in_flight, self.queued, self.forwarding, self.max_concurrent,
                                   self.max_queue, self.served, self.refused_busy)

    def __repr__(self) -> str:
        return (f"<Admission {self.in_flight}/{self.max_concurrent} in flight, {self.queued}/{self.max_queue} "
                f"queued, {self.forwarding} forwarded>")


class Slot:
    """One admitted request's slot: held while it works here, handed off while another node serves it."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.held = False

    def hand_off(self) -> None:
        """Another node serves the request now: free the slot for other work here."""
        if self.held:
            self.admission.limiter.release_on_behalf_of(self)
            self.held = False
            self.admission.forwarding += 1
            self.admission._touch()

    @asynccontextmanager
    async def local(self) -> AsyncIterator[None]:
        """Hold the slot around work done here, taking it back (through the queue, or Busy when
        that is full) if it was handed off; cancelled while waiting, nothing changes."""
        if not self.held:
            await self.admission._admit(self)
            self.held = True
            self.admission.forwarding -= 1
            self.admission._touch()
        yield


def error_for(exc: BaseException) -> Error:
    """The wire Error for an exception raised while serving (messages cut to what the wire allows)."""
    error = _error_for(exc)
    if len(error.message) > MAX_ERROR_MESSAGE:
        error = dataclasses.replace(error, message=error.message[:MAX_ERROR_MESSAGE - 1] + "…")
    return error


def _error_for(exc: BaseException) -> Error:
    if isinstance(exc, (Busy, ClusterBusy)):
        return Error(code="busy", message=str(exc), retryable=True, retry_after=exc.retry_after)
    if isinstance(exc, AllProvidersFailed) and _all_busy(exc):
        retry_after = min(cause.retry_after or 1.0 for _, cause in exc.attempts if isinstance(cause, ClusterBusy))
        return Error(code="busy", message=str(exc), retryable=True, retry_after=retry_after)
    if isinstance(exc, DeadlineExceeded):
        return Error(code="deadline_exceeded", message=str(exc), retryable=False)
    if isinstance(exc, CacheMiss):
        return Error(code="cache_miss", message=str(exc))
    if isinstance(exc, InvalidRequest):
        return Error(code="bad_request", message=str(exc))
    if isinstance(exc, ModelNotFound):
        return Error(code="model_not_found", message=str(exc), retryable=True)
    if isinstance(exc, (ProviderNotFound, ProviderUnavailable, AllProvidersFailed)):
        return Error(code="no_provider", message=str(exc), retryable=True)
    if isinstance(exc, ProviderError):
        retry_after = exc.retry_after if exc.retry_after is None or math.isfinite(exc.retry_after) else None
        return Error(code="provider_failed", message=str(exc), retryable=exc.retryable,
                     retry_after=None if retry_after is None else min(max(retry_after, 0.0), 86_400.0))
    return Error(code="internal", message=f"{type(exc).__name__}: {exc}")


def _all_busy(exc: AllProvidersFailed) -> bool:
    """Whether every provider that was tried answered busy (skipped ones aside): the cluster is full."""
    tried = [cause for _, cause in exc.attempts if isinstance(cause, BaseException)]
    return bool(tried) and all(isinstance(cause, ClusterBusy) for cause in tried)


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
    admission: Admission,
    *,
    peer_id: str,
) -> None:
    """Answer one `request` already received by `machine` on `framed` (the control protocol's `generate`)."""
    client = ClientSide(framed)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        await _answer(framed, machine, request, runner, admission, client, peer_id)
        nursery.cancel_scope.cancel()  # one request per control stream: nothing more to read
    if client.error is not None:
        raise client.error


async def serve_inference_stream(
    framed: FramedStream,
    runner: Runner,
    admission: Admission,
    *,
    peer_id: str,
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
                usable = await _answer(framed, machine, request, runner, admission, client, peer_id)
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
    admission: Admission,
    client: ClientSide,
    peer_id: str,
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
            with trio.fail_after(request.timeout_ms / 1000.0):
                async with admission.slot():
                    answer = None
                    async with aclosing(runner(request)) as items:
                        async for item in items:
                            if isinstance(item, str):
                                if not request.stream:
                                    continue
                                for start in range(0, len(item), MAX_CHUNK_CHARS):  # a Chunk's bound
                                    while not machine.can_send_chunk:
                                        await client.credit.wait()
                                    await send(machine.chunk(item[start:start + MAX_CHUNK_CHARS]))
                            else:
                                answer = item
                    if answer is None:
                        raise ProviderError("node", "the runner produced no answer")
                    result = Result(
                        response=answer.response, cid=answer.cid, key=answer.key, provider=answer.provider,
                        peer=answer.peer or peer_id, cache=answer.cache,
                        timings={"total_ms": float(answer.latency_ms)}, served_from=answer.served_from,
                    )
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


# ---------------------------------------------------------------------------------------
# The client half


class RemoteError(ProviderError):
    """The serving node answered with an `Error`; `code` is the wire error code."""

    def __init__(self, peer: str, error: Error) -> None:
        super().__init__(f"peer {peer[-8:]}", f"{error.code}: {error.message}", retryable=error.retryable,
                         retry_after=error.retry_after)
        self.code, self.peer = error.code, peer


def raise_for(error: Error, peer: str) -> None:
    """Raise the local error that matches a wire `Error` from `peer`."""
    if error.code == "deadline_exceeded":
        raise DeadlineExceeded(0.0, f"the request on {peer[-8:]}")
    if error.code == "cache_miss":
        raise CacheMiss(error.message)
    if error.code == "bad_request":
        raise InvalidRequest(error.message)
    if error.code == "model_not_found":  # retryable: the mesh tries the next node (the advert was stale)
        raise ModelNotFound(f"peer {peer[-8:]}", error.message, retryable=error.retryable)
    raise RemoteError(peer, error)


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
            yield event
            return
        if isinstance(event, Error):
            raise_for(event, framed.peer)
        yield event.text
        consumed += 1
        if consumed >= top_up and machine.state.value == "active":
            await framed.write(machine.send(Credit(consumed)))
            consumed = 0


def _check_sendable(request: Request) -> None:
    """Refuse here, with the field and the reason, a Request the server would refuse to decode
    (e.g. more than 16 `on_peers`): otherwise the caller would only see its stream reset."""
    from protocols.codec import encode

    try:
        encode(request)  # checks every field against the bounds the server decodes with
    except ProtocolError as exc:
        raise InvalidRequest(f"this request cannot be sent: {exc}") from exc


def wire_timeout_ms(seconds: float) -> int:
    """A deadline in seconds as the Request's `timeout_ms` (the protocol allows 1 ms to 1 hour)."""
    return min(MAX_TIMEOUT_MS, max(1, int(seconds * 1000)))


class StreamPool:
    """Keep-alive inference streams per peer: a request on an open stream costs no negotiation.

    `request(peer_id, request)` takes an idle stream to that peer (or opens one), runs the
    request, and gives the stream back when its answer ended cleanly; a stream whose answer
    did not end (cancelled, failed) is reset. An idle stream the server has meanwhile closed is
    noticed at once (no answer at all) and the request is retried once on a fresh stream.
    """

    def __init__(self, host: Any, limits: Any, *, protocol: str = "/accelmesh/infer/1.0.0",
                 max_idle_per_peer: int = 16, max_idle_seconds: float = 20.0) -> None:
        self.host, self.limits, self.protocol = host, limits, protocol
        self.max_idle_per_peer, self.max_idle_seconds = max_idle_per_peer, max_idle_seconds
        self._idle: dict[str, list[tuple[float, FramedStream]]] = {}
        self.opened = self.reused = 0

    async def _open(self, peer_id: str) -> FramedStream:
        from libp2p.peer.id import ID

        try:
            stream = await self.host.new_stream(ID.from_base58(peer_id), [self.protocol])
        except Exception as exc:  # libp2p: no connection, protocol refused, stream reset
            raise ProviderFailed(f"peer {peer_id[-8:]}", f"cannot open a stream: {type(exc).__name__}: {exc}",
                                 retryable=True) from exc
        self.opened += 1
        return FramedStream(stream, self.limits, MAX_INFER_FRAME, decoder=InferenceStream(Role.CLIENT, MAX_INFER_FRAME))

    async def _take_idle(self, peer_id: str) -> FramedStream | None:
        idle = self._idle.get(peer_id, [])
        now = trio.current_time()
        while idle:
            since, framed = idle.pop()
            if now - since < self.max_idle_seconds:
                self.reused += 1
                return framed
            await framed.close()  # idle too long: the server's idle timeout may be about to end it
        return None

    async def _give_back(self, peer_id: str, framed: FramedStream) -> None:
        idle = self._idle.setdefault(peer_id, [])
        if len(idle) < self.max_idle_per_peer:
            idle.append((trio.current_time(), framed))
        else:
            await framed.close()

    async def request(self, peer_id: str, request: Request) -> AsyncIterator[str | Result]:
        for attempt in range(2):
            framed = await self._take_idle(peer_id)
            reused = framed is not None
            framed = framed or await self._open(peer_id)
            machine = framed.decoder
            yielded = False
            try:
                async with aclosing(request_inference(framed, request)) as items:
                    async for item in items:
                        yielded = True
                        yield item
            except (ProviderFailed, StreamClosedEarly) as exc:  # the stream broke, not the request
                await framed.reset()
                if reused and not yielded and attempt == 0:
                    log.debug("idle stream to %s was gone (%s); retrying on a new one", peer_id, exc)
                    continue
                if isinstance(exc, StreamClosedEarly):  # reset by the peer: its limits, or it is stopping
                    raise ProviderFailed(f"peer {peer_id[-8:]}", f"the peer reset the stream: {exc}",
                                         retryable=True) from exc
                raise
            except ProtocolError as exc:  # the peer broke the protocol, or sent bytes that fail their CID
                await framed.reset()
                raise ProviderFailed(f"peer {peer_id[-8:]}", f"{type(exc).__name__}: {exc}", retryable=True) from exc
            except BaseException:
                if machine.state.value == "done":  # the server answered with an Error: the stream is fine
                    await self._give_back(peer_id, framed)
                else:
                    await framed.reset()  # cancelled or failed mid-answer: the server stops
                raise
            if machine.state.value == "done":
                await self._give_back(peer_id, framed)
            else:
                await framed.reset()
            return

    async def close(self) -> None:
        for idle in self._idle.values():
            for _, framed in idle:
                await framed.close()
        self._idle.clear()

    def statistics(self) -> dict[str, int]:
        return {"opened": self.opened, "reused": self.reused, "idle": sum(len(v) for v in self._idle.values())}
