"""The OpenAI-compatible HTTP API as an ASGI app: each request becomes one RequestContext (entry
"http") and runs through the daemon's front door, like every other entry point.

    POST /v1/chat/completions ─┐  parse_call + x-accelmesh-* headers    FrontDoor.run(ctx)
    POST /v1/completions ──────┴► build_request ─► RequestContext ───►  text chunks, one Result
    GET  /v1/models ────────────► models(): model id -> peers serving it

The answer is read in the task that serves the HTTP request (never handed to another task: the
router's cancel scopes belong to it), while a second task waits for the client to disconnect
and cancels the work when it does (the mesh stream is reset, the admission slot freed). That
second task is started only for a request still running after WATCH_AFTER (`_Disconnects`): most
answers are written long before, and a task per request would cost a fifth of a fast answer.
Errors before the first byte are OpenAI error JSON with their status (`_openai.error_response`);
an error mid-stream is one `data: {"error": ...}` event, and the stream ends without `[DONE]`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node.errors import AccelmeshError, InvalidRequest, ModelNotFound
from node.http import _openai
from node.http.auth import BearerAuth
from node.requests import Request, Result, build_request
from node.serving import RequestContext

__all__ = ["HttpApi"]

log = logging.getLogger("node.http")

Run = Callable[[RequestContext], AsyncIterator["str | Result"]]
Models = Callable[[], Mapping[str, Sequence[str]]]

SEND_GRACE = 5.0  # seconds past the request's deadline an answer may take to be written to a slow reader
BODY_TIMEOUT = 30.0  # seconds a client has to send its request body (a slower one is 408: it holds a task, not a slot)

_REQUEST_ID = _openai.REQUEST_ID


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


async def _read_body(receive: Any, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_json(send: Any, status: int, body: Any, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


def _sse(payload: Any) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else
                        json.dumps(payload, separators=(",", ":")).encode()) + b"\n\n"


class _Watch:
    """One request's watch for its client leaving: `work` is cancelled when it does."""

    __slots__ = ("receive", "work", "started", "watching", "client_left")

    def __init__(self, receive: Any, work: trio.CancelScope, started: float) -> None:
        self.receive, self.work, self.started = receive, work, started
        self.watching: trio.CancelScope | None = None  # the watcher task's scope, once one runs
        self.client_left = False

    async def watch(self) -> None:
        """Wait for the client to go away, then cancel the work; until `watching` is cancelled."""
        assert self.watching is not None
        with self.watching:
            try:
                while (await self.receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # (the server closed the request's channel: nothing more will come)
                return
            log.debug("client disconnected: cancelling its request")
            self.client_left = True
            self.work.cancel()

    def stop(self) -> None:
        if self.watching is not None:
            self.watching.cancel()


class _Disconnects:
    """Cancels a request's work when its client goes away (the server's `http.disconnect`).

    Watching takes a task that waits on the request's `receive`. With a nursery (`run`, in the
    server's lifespan) a request is watched only once it has run WATCH_AFTER seconds: a sweep
    every WATCH_AFTER starts the watchers of the requests that old, so a client that leaves is
    noticed within 2 * WATCH_AFTER, and a fast answer costs no task. Without one (a server that
    runs no lifespan) each request gets its watcher at once, in a nursery of its own."""

    WATCH_AFTER = 0.25  # seconds

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self._unwatched: dict[int, _Watch] = {}  # requests running, not yet watched (by id)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The sweeps, and the watchers they start; until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    await trio.sleep(self.WATCH_AFTER)
                    due = trio.current_time() - self.WATCH_AFTER
                    for key, watch in list(self._unwatched.items()):
                        if watch.started <= due:
                            del self._unwatched[key]
                            watch.watching = trio.CancelScope()
                            nursery.start_soon(watch.watch)
            finally:
                self._nursery = None

    @asynccontextmanager
    async def watching(self, receive: Any, work: trio.CancelScope) -> AsyncIterator[_Watch]:
        """Watch, while the block runs, for the client leaving: `work` is then cancelled."""
        watch = _Watch(receive, work, trio.current_time())
        if self._nursery is None:
            async with trio.open_nursery() as nursery:
                watch.watching = trio.CancelScope()
                nursery.start_soon(watch.watch)
                try:
                    yield watch
                finally:
                    watch.stop()
            return
        key = id(watch)
        self._unwatched[key] = watch
        try:
            yield watch
        finally:
            self._unwatched.pop(key, None)
            watch.stop()


def _until_last(send: Any, watch: _Watch) -> Any:
    """`send`, which stops watching before the last message of the answer: once the answer is
    complete the server itself reports `http.disconnect`, which is not the client leaving."""

    async def sending(message: Any) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            watch.stop()
        await send(message)

    return sending


class HttpApi:
    """The API's handlers. It needs the front door's `run`, who serves which model (`models`),
    the settings (default model and deadline), this node's peer id and the auth rule, and
    nothing else of the daemon."""

    def __init__(self, *, run: Run, models: Models, settings: Any, peer_id: str = "",
                 auth: BearerAuth | None = None, max_body_bytes: int = _openai.MAX_BODY_BYTES,
                 cors_origins: Sequence[str] = (), ready: Callable[[], tuple[bool, str]] = lambda: (True, "ready"),
                 metrics: Callable[[], bytes] | None = None, traffic: Any = None) -> None:
        self.run, self.models, self.settings, self.peer_id = run, models, settings, peer_id
        self.cors_origins = tuple(cors_origins)
        self.ready = ready  # /readyz: (whether some backend can serve, why not)
        self.metrics = metrics  # /metrics: the Prometheus exposition (None: 404)
        self.traffic = traffic  # node.mesh.streams.Traffic: bytes in and out, counted under "http"
        self.auth = auth if auth is not None else BearerAuth(frozenset(), required=False)
        self.max_body_bytes = max_body_bytes
        self.body_timeout = BODY_TIMEOUT
        self.slow_bodies = 0  # requests refused because their body came too slowly (408)
        self.served = 0  # requests answered (any status)
        self.disconnected = 0  # requests whose client went away before the answer was complete
        self.disconnects = _Disconnects()  # its sweeps run in the server's lifespan (`_Lifespan`)

    def app(self) -> Any:
        """The ASGI app: the routes, behind the key check, behind CORS when origins are configured;
        the server's lifespan runs the disconnect sweeps."""
        # The inference endpoints: dispatched by exact path ahead of Starlette's middleware and routing
        # (`_Dispatch`: they answer their own errors, a tenth of a millisecond per request); also routed
        # below, so that another method on their path is answered 405.
        inference = {"/v1/chat/completions": _Endpoint(self, "chat"), "/v1/completions": _Endpoint(self, "completion"),
                     "/v1/embeddings": _Endpoint(self, "embeddings")}
        routes = [
            *(Route(path, endpoint, methods=["POST"]) for path, endpoint in inference.items()),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/healthz", self._healthz, methods=["GET"]),
            Route("/readyz", self._readyz, methods=["GET"]),
            Route("/metrics", self._metrics, methods=["GET"]),
        ]

        async def http_error(request: HttpRequest, exc: Exception) -> JSONResponse:
            status = exc.status_code if isinstance(exc, HTTPException) else 500
            return JSONResponse(_openai.error_json(f"{request.method} {request.url.path}: "
                                                   f"{getattr(exc, 'detail', 'error')}",
                                                   type_="invalid_request_error", code=str(status)), status)

        app: Any = _Authenticated(_Dispatch(inference, Starlette(routes=routes, exception_handlers={HTTPException: http_error})),
                                  self.auth)
        if self.traffic is not None:
            app = _Counted(app, self.traffic)
        if self.cors_origins:  # outside the key check: a browser's preflight carries no key
            from starlette.middleware.cors import CORSMiddleware

            app = CORSMiddleware(app, allow_origins=self.cors_origins, allow_methods=["GET", "POST"],
                                 allow_headers=["authorization", "content-type", "x-request-id",
                                                *_openai.HEADER_ARGUMENTS, "x-accelmesh-provider"],
                                 expose_headers=["x-request-id", "x-accelmesh-peer", "x-accelmesh-cache",
                                                 "x-accelmesh-cid", "retry-after"], max_age=600)
        return _Lifespan(app, self.disconnects.run)

    async def _models(self, request: HttpRequest) -> JSONResponse:
        return JSONResponse(_openai.models_json(self.models()))

    async def _healthz(self, request: HttpRequest) -> JSONResponse:
        return JSONResponse({"ok": True, "peer_id": self.peer_id})

    async def _readyz(self, request: HttpRequest) -> JSONResponse:
        ready, reason = self.ready()
        return JSONResponse({"ready": ready, "reason": reason, "peer_id": self.peer_id}, 200 if ready else 503)

    async def _metrics(self, request: HttpRequest) -> Response:
        if self.metrics is None:
            raise HTTPException(404, "metrics are off")
        from node.metrics import CONTENT_TYPE

        return Response(self.metrics(), media_type=CONTENT_TYPE)

    # -- completions --------------------------------------------------------------------------

    def _context(self, kind: _openai.Kind, body: bytes, headers: Mapping[str, str], request_id: str,
                 caller: str, repeatable: bool = True) -> tuple[_openai.Call, RequestContext]:
        call = _openai.parse_call(kind, _json_body(body))
        provider, reserved = _openai.reserved_from_headers(headers)
        if provider is None and call.model is not None and call.model not in self.models():
            raise ModelNotFound("http", f"the model {call.model!r} is not served anywhere in the mesh "
                                        "(GET /v1/models lists those that are)", retryable=False)
        request: Request = build_request(call.prompt, model_name=call.model,
                                         kwargs={**call.params, **reserved, "request_id": request_id},
                                         default_model=self.settings.model,
                                         default_timeout=self.settings.request_timeout)
        ctx = RequestContext(request=request, provider=provider, deadline=trio.current_time() + request.timeout,
                             hops=0, caller=caller, entry="http", stream=call.stream, repeatable=repeatable)
        return call, ctx

    async def serve(self, kind: str, scope: Any, receive: Any, send: Any) -> None:
        """One request to a completions endpoint (`kind`: chat, completion) or to /v1/embeddings."""
        self.served += 1
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        request_id = headers.get("x-request-id", "")
        repeatable = bool(_REQUEST_ID.match(request_id))  # (an id made here cannot come again: no replay)
        if not repeatable:
            request_id = uuid.uuid4().hex
        rid = [(b"x-request-id", request_id.encode())]
        client = scope.get("client") or ("?", 0)
        try:
            with trio.fail_after(self.body_timeout):
                body = await _read_body(receive, self.max_body_bytes)
            if kind == "embeddings":
                call, contexts = self._embedding_contexts(body, headers, request_id, f"http:{client[0]}", repeatable)
            else:
                call, ctx = self._context(kind, body, headers, request_id, f"http:{client[0]}", repeatable)
                contexts = [ctx]
        except _ClientGone:
            return
        except trio.TooSlowError:
            self.slow_bodies += 1
            await _send_json(send, 408, _openai.error_json(
                f"the request body did not arrive within {self.body_timeout:g} s", type_="invalid_request_error",
                code="request_timeout"), [*rid, (b"connection", b"close")])
            return
        except _BodyTooLarge:
            await _send_json(send, 413, _openai.error_json(
                f"the request body is over {self.max_body_bytes} bytes", type_="invalid_request_error",
                code="request_too_large"), rid)
            return
        except AccelmeshError as exc:
            status, body_json, extra = _openai.error_response(exc, peer=self.peer_id)
            await _send_json(send, status, body_json, [*rid, *extra])
            return
        # A client that stops reading blocks `send`: bounded by the deadline (plus a grace for the
        # error answer), after which the connection is dropped and the slot freed.
        with trio.move_on_at(contexts[0].deadline + SEND_GRACE) as bounded:
            async with self.disconnects.watching(receive, bounded) as watch:
                send = _until_last(send, watch)
                if kind == "embeddings":
                    await self._embeddings(call, contexts, send, rid)
                elif call.stream:
                    await self._stream(call, contexts[0], send, rid)
                else:
                    await self._whole(call, contexts[0], send, rid)
        if watch.client_left:
            self.disconnected += 1
        elif bounded.cancelled_caught:
            log.warning("request %s: the client did not read its answer before the deadline; dropped", request_id)

    def _embedding_contexts(self, body: bytes, headers: Mapping[str, str], request_id: str, caller: str,
                            repeatable: bool = True) -> tuple[_openai.EmbeddingCall, list[RequestContext]]:
        """One context per input text (each its own request: key, CID, admission)."""
        from node.embeddings import embed_requests

        call = _openai.parse_embedding_call(_json_body(body))
        provider, reserved = _openai.reserved_from_headers(headers)
        if provider is None and call.model is not None and call.model not in self.models():
            raise ModelNotFound("http", f"the model {call.model!r} is not served anywhere in the mesh "
                                        "(GET /v1/models lists those that are)", retryable=False)
        requests = embed_requests(list(call.texts), model_name=call.model,
                                  kwargs={**reserved, "request_id": request_id},
                                  default_timeout=self.settings.request_timeout)
        now = trio.current_time()
        return call, [RequestContext(request=r, provider=provider, deadline=now + r.timeout, hops=0, caller=caller,
                                     entry="http", stream=False, repeatable=repeatable) for r in requests]

    async def _embeddings(self, call: _openai.EmbeddingCall, contexts: list[RequestContext], send: Any,
                          rid: list[tuple[bytes, bytes]]) -> None:
        """Every text at once, at most EMBED_CONCURRENCY admitted together (the texts that reach one
        node together are one forward pass there); the first failure answers for the request."""
        from node.embeddings import EMBED_CONCURRENCY, answer_all

        limits = self.settings.limits  # never more at once than this node admits: the rest wait here, not refused
        try:
            done = await answer_all(contexts, self.run,
                                    limit=max(1, min(EMBED_CONCURRENCY, limits.max_concurrent + limits.max_queue)))
        except Exception as exc:
            await self._send_error(send, exc, rid)
            return
        await _send_json(send, 200, _openai.embeddings_json(call, done), rid)

    async def _whole(self, call: _openai.Call, ctx: RequestContext, send: Any, rid: list[tuple[bytes, bytes]]) -> None:
        result: Result | None = None
        try:
            async with aclosing(self.run(ctx)) as items:
                async for item in items:
                    if isinstance(item, Result):
                        result = item
        except Exception as exc:
            await self._send_error(send, exc, rid)
            return
        if result is None:  # (the front door always ends with a Result)
            await self._send_error(send, RuntimeError("the request ended without an answer"), rid)
            return
        await _send_json(send, 200, _openai.completion_json(call.kind, result),
                         [*rid, *_openai.result_headers(result)])

    async def _send_error(self, send: Any, exc: Exception, rid: list[tuple[bytes, bytes]]) -> None:
        exc = _leaf(exc)
        if not isinstance(exc, AccelmeshError):
            log.exception("HTTP request failed", exc_info=exc)
        status, body, extra = _openai.error_response(exc, peer=self.peer_id)
        await _send_json(send, status, body, [*rid, *extra])

    async def _stream(self, call: _openai.Call, ctx: RequestContext, send: Any,
                      rid: list[tuple[bytes, bytes]]) -> None:
        created, model = int(time.time()), ctx.request.model or call.model or ""
        request_id = ctx.request.request_id
        async with aclosing(self.run(ctx)) as items:
            try:  # the first item before the status line: an early failure gets its own status
                first: str | Result = await items.__anext__()
            except StopAsyncIteration:
                first = Result("", "", model, "miss", "", "", request_id, 0.0)
            except Exception as exc:
                await self._send_error(send, exc, rid)
                return
            headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                       *rid, *(_openai.result_headers(first) if isinstance(first, Result) else ())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})

            async def emit(payload: Any) -> None:
                await send({"type": "http.response.body", "body": _sse(payload), "more_body": True})

            if call.kind == "chat":
                await emit(_openai.chunk_json("chat", request_id, model, created, role=True, text=""))
            result: Result | None = None
            try:
                pending: list[str | Result] = [first]
                while True:
                    item = pending.pop() if pending else await items.__anext__()
                    if isinstance(item, Result):
                        result = item
                        break
                    if item:
                        await emit(_openai.chunk_json(call.kind, request_id, model, created, text=item))
            except StopAsyncIteration:
                pass
            except Exception as exc:
                leaf = _leaf(exc)
                if not isinstance(leaf, AccelmeshError):
                    log.exception("HTTP stream failed", exc_info=leaf)
                await emit(_openai.error_response(leaf, peer=self.peer_id)[1])
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
        if result is None:
            result = Result("", "", model, "miss", "", "", request_id, 0.0)
        final = _openai.chunk_json(call.kind, request_id, result.model or model, created, result=result)
        if call.include_usage:
            await emit(final)
            final = _openai.chunk_json(call.kind, request_id, result.model or model, created, result=result,
                                       usage=True)
        final["accelmesh"] = _openai.accelmesh_json(result)
        await emit(final)
        await send({"type": "http.response.body", "body": _sse(b"[DONE]"), "more_body": False})


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside (nested) groups of one, else `exc`."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class _Endpoint:
    """A raw ASGI endpoint (Starlette routes to it as an app): the handler owns send and receive."""

    def __init__(self, api: HttpApi, kind: str) -> None:
        self.api, self.kind = api, kind

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.api.serve(self.kind, scope, receive, send)


class _Counted:
    """Bytes of request and response bodies into the node's traffic counts, as protocol `http`."""

    def __init__(self, app: Any, traffic: Any) -> None:
        self.app, self.traffic = app, traffic

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        add = self.traffic.add

        async def counted_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                add("http", "in", len(message.get("body", b"")))
            return message

        async def counted_send(message: Any) -> None:
            if message["type"] == "http.response.body":
                add("http", "out", len(message.get("body", b"")))
            await send(message)

        await self.app(scope, counted_receive, counted_send)


class _Lifespan:
    """ASGI lifespan: `run` (started at start-up, cancelled at shut-down) alongside `app`."""

    def __init__(self, app: Any, run: Callable[..., Any]) -> None:
        self.app, self.run = app, run

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        async with trio.open_nursery() as nursery:
            await receive()  # lifespan.startup
            await nursery.start(self.run)
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown: every request has ended
            nursery.cancel_scope.cancel()
        await send({"type": "lifespan.shutdown.complete"})


class _Dispatch:
    """POST to one of `fast`'s paths goes straight to its endpoint; everything else to `app`."""

    def __init__(self, fast: Mapping[str, Any], app: Any) -> None:
        self.fast, self.app = fast, app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        endpoint = self.fast.get(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" else None
        await (endpoint or self.app)(scope, receive, send)


class _Authenticated:
    """Bearer-token check in front of the app (BearerAuth decides whether one is required)."""

    def __init__(self, app: Any, auth: BearerAuth) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") not in ("/healthz", "/readyz"):
            header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"authorization"),
                          None)
            if not self.auth.allows(header):
                await _send_json(send, 401, _openai.error_json(
                    "a valid API key is required (Authorization: Bearer KEY; the daemon's data dir holds http.token)",
                    type_="authentication_error", code="invalid_api_key"), [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)
