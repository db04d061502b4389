"""`node.connect(http_url=...)` and `accelmesh generate` through a daemon's HTTP API.

    client = node.connect(http_url="http://127.0.0.1:8400", api_key=...)   # any daemon's API
    client = node.connect(data_dir=".data/node")   # daemon.json names an http_url: this client
    client.generate_text("Hello"); client.complete("Hello").cid; client.stream_text("Hello")
    await client.agenerate_text("Hello")           # inside trio (or asyncio)

The same methods as `node.remote.Client`, over HTTP instead of libp2p: nothing here imports
libp2p or the server's stack, so `accelmesh generate` through a local daemon starts fast.

    node.requests.Request ── http_call ───────► POST /v1/{chat/,}completions + x-accelmesh-* headers
    200 JSON ───────────── _openai.result_from_json ──► node.requests.Result
    200 SSE ────────────── SseReader ─────────► text chunks, then the Result
    4xx/5xx ────────────── _openai.error_from_json ──► the error an in-process call raises

Connections, kept alive between calls: for the blocking methods one `http.client` connection per
thread (the standard library: `accelmesh generate` imports no HTTP package), for the async ones an
`httpx.AsyncClient` (its pool) per event loop, trio or asyncio. A call that fails
before any answer because the connection was refused or dropped is retried once (the request id
makes the repeat idempotent at the daemon); with `data_dir`, daemon.json and http.token are read
again first (the daemon may have restarted on another port, with a new token). The daemon checks
each answer's CID as it serves it; over HTTP the client trusts the daemon it talks to (the
libp2p clients check the bytes themselves).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import aclosing, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from node.errors import AccelmeshError, DaemonError, DeadlineExceeded, InvalidRequest, ProviderNotFound
from node.http import _openai
from node.remote import ClientMethods
from node.requests import Request, Result, build_request

__all__ = ["HttpClient", "SseReader", "http_call", "CONNECT_TIMEOUT", "READ_MARGIN"]

CONNECT_TIMEOUT = 10.0  # seconds to reach the daemon's API
READ_MARGIN = 5.0  # seconds past the request's deadline before the client gives up on the daemon's answer
MAX_CONNECTIONS = 1000  # per event loop, as the openai SDK: the daemon's admission queues and refuses, not
MAX_IDLE_CONNECTIONS = 100  # the client (httpx's default of 100 would queue calls out of the daemon's sight)


def _async_limits() -> Any:
    import httpx

    return httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_IDLE_CONNECTIONS)


def http_call(request: Request, *, provider: str | None, stream: bool, api_key: str | None = None,
              ) -> tuple[str, dict[str, str], bytes]:
    """(path, headers, body) of the HTTP request that asks what `request` asks (the inverse of the
    server's `_openai.parse_call` and `reserved_from_headers`)."""
    if not _openai.REQUEST_ID.match(request.request_id):  # the daemon would replace it: no idempotent retry
        raise InvalidRequest(f"request_id {request.request_id[:80]!r} must be 1-{_openai.MAX_REQUEST_ID_CHARS} of "
                             "A-Z a-z 0-9 . _ : - over HTTP")
    body: dict[str, Any] = {"model": request.model} if request.model else {}
    if request.task == "chat":
        path, body["messages"] = "/v1/chat/completions", [dict(m) for m in request.messages or ()]
    else:
        path, body["prompt"] = "/v1/completions", request.prompt
    extra = {name: value for name, value in request.params.items() if name not in _openai.PASSED_FIELDS}
    body.update((name, value) for name, value in request.params.items() if name in _openai.PASSED_FIELDS)
    if extra:
        body["accelmesh"] = {"params": extra}
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    headers = {"content-type": "application/json", "x-request-id": request.request_id,
               "x-accelmesh-timeout": repr(request.timeout)}
    if provider:
        headers["x-accelmesh-provider"] = provider
    if request.cache_mode != "default":
        headers["x-accelmesh-cache-mode"] = request.cache_mode
    if request.strategy:
        headers["x-accelmesh-strategy"] = request.strategy
    if request.verify > 1:
        headers["x-accelmesh-verify"] = str(request.verify)
    if request.on_peers:
        headers["x-accelmesh-on-peers"] = ",".join(request.on_peers)
    if request.accelerator:
        headers["x-accelmesh-accelerator"] = request.accelerator
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return path, headers, json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def raise_http_error(status: int, body: bytes, headers: Mapping[str, str], url: str) -> None:
    """Raise what an in-process call would have raised for this error answer."""
    from node.mesh.errors import raise_for

    try:
        decoded = json.loads(body)
    except ValueError:
        decoded = None
    wire, peer, message = _openai.error_from_json(status, decoded, retry_after=headers.get("retry-after"))
    if wire is not None:
        raise_for(wire, peer or url)
    code = decoded.get("error", {}).get("code") if isinstance(decoded, dict) else None
    if code == "provider_not_found":
        raise ProviderNotFound(str(message).split(":", 1)[0], ())
    if status == 401:
        raise DaemonError(f"the HTTP API at {url} refused the API key: {message}")
    if status in (400, 413):
        raise InvalidRequest(message)
    raise DaemonError(f"the HTTP API at {url} answered {status}: {message}")


class SseReader:
    """An SSE answer, line by line: `feed(line)` returns the text deltas and, at the end, the Result."""

    def __init__(self, url: str, started: float) -> None:
        self.url, self.started = url, started
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.result: Result | None = None

    def feed(self, line: str) -> list[str | Result]:
        if not line.startswith("data:") or self.result is not None:
            return []
        data = line[5:].strip()
        if data == "[DONE]":
            return []
        chunk = _json(data.encode(), self.url)
        if "error" in chunk:
            raise_http_error(200, data.encode(), {}, self.url)
        out: list[str | Result] = []
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
            if delta:
                self.text.append(delta)
                out.append(delta)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if "accelmesh" in chunk:
            self.result = _openai.result_from_json(chunk, text="".join(self.text), finish_reason=self.finish_reason,
                                                   latency_ms=(time.monotonic() - self.started) * 1000.0)
            out.append(self.result)
        return out

    def end(self) -> None:
        if self.result is None:
            raise DaemonError(f"the HTTP API at {self.url} ended the stream without an answer")


# Failures before any answer after which a request is sent once more (its id makes that safe).
_RETRIED_SYNC = (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine)


class HttpClient(ClientMethods):
    """A daemon's API over HTTP, with `node.remote.Client`'s methods (see the module docstring).

    `url` is the daemon's `http_url` (`http://HOST:PORT`, with or without `/v1`); or `data_dir`,
    whose daemon.json and http.token give the URL and the key.
    """

    def __init__(self, url: str | None = None, *, api_key: str | None = None, data_dir: str | Path | None = None,
                 provider: str | None = None, model: str | None = None, timeout: float | None = None) -> None:
        if (url is None) == (data_dir is None):
            raise InvalidRequest("HttpClient takes one of url= and data_dir=")
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._url = _base(url) if url is not None else None
        self._api_key = api_key
        self._defaults = (provider, model, timeout)  # the CLI's settings; None: the daemon's
        self._lock = threading.Lock()
        self._idle: list[http.client.HTTPConnection] = []  # keep-alive connections no call is using
        self._async: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()  # httpx client per loop
        if self.data_dir is not None:
            self._resolve()

    @property
    def url(self) -> str:
        assert self._url is not None
        return self._url

    def _resolve(self) -> None:
        """URL and key from the data dir's daemon.json and http.token (DaemonError when none serves HTTP)."""
        from node.datadir import DataDir
        from node.http.auth import TOKEN_FILE

        assert self.data_dir is not None
        daemon = DataDir(self.data_dir).require_daemon()
        if not daemon.http_url:
            raise DaemonError(f"the daemon on {self.data_dir} does not serve HTTP (start it with --http HOST:PORT)")
        self._url = _base(daemon.http_url)
        try:
            self._api_key = (self.data_dir / TOKEN_FILE).read_text().strip() or None
        except OSError:
            self._api_key = None

    def _call(self, prompt: Any, provider: str | None, model_name: str | None, kwargs: dict[str, Any],
              stream: bool) -> tuple[Request, str, dict[str, str], bytes]:
        default_provider, default_model, default_timeout = self._defaults
        if default_timeout is None:
            default_timeout = _settings_timeout()
        request = build_request(prompt, model_name=model_name or default_model, kwargs=kwargs,
                                default_timeout=default_timeout)
        path, headers, body = http_call(request, provider=provider or default_provider, stream=stream,
                                        api_key=self._api_key)
        return request, path, headers, body

    # -- blocking (the standard library's http.client: quick to import, for the CLI) ----------------

    @contextmanager
    def _exchange(self, path: str, headers: dict[str, str], body: bytes, timeout: float
                  ) -> Iterator[http.client.HTTPResponse]:
        """One POST on a keep-alive connection checked out for the whole exchange (two calls at once,
        from one thread or several, never share one); it goes back to the idle ones only when its
        answer was read to the end, and is closed otherwise."""
        host, port = _host_port(self.url)
        with self._lock:
            conn = next((c for c in self._idle if (c.host, c.port) == (host, port)), None)
            if conn is not None:
                self._idle.remove(conn)
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=CONNECT_TIMEOUT)
        reusable = False
        try:
            if conn.sock is None:
                try:
                    conn.connect()
                except TimeoutError as exc:  # nobody answered the dial: unreachable, not slow
                    raise ConnectionError(f"no answer to the connection within {CONNECT_TIMEOUT:g} s") from exc
            conn.sock.settimeout(timeout)
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            yield response
            reusable = response.isclosed() and not response.will_close
        finally:
            with self._lock:
                if reusable and len(self._idle) < MAX_IDLE_CONNECTIONS:
                    self._idle.append(conn)
                    conn = None
            if conn is not None:
                conn.close()

    def iter_request(self, prompt: Any, *, provider: str | None = None, model_name: str | None = None,
                     stream: bool = True, **kwargs: Any) -> Iterator[str | Result]:
        """Text chunks (with `stream`), then the Result."""
        request, path, headers, body = self._call(prompt, provider, model_name, kwargs, stream)
        for attempt in range(2):
            yielded = False
            try:
                started = time.monotonic()
                with self._exchange(path, headers, body, request.timeout + READ_MARGIN) as response:
                    if response.status == 401 and self.data_dir is not None and not attempt:
                        response.read()
                        self._resolve()  # the daemon restarted: a new token
                        headers = {**headers, **_auth(self._api_key)}
                        continue
                    if response.status != 200:
                        raise_http_error(response.status, response.read(), _lower(response.getheaders()), self.url)
                    if not stream:
                        yield _openai.result_from_json(_json(response.read(), self.url),
                                                       latency_ms=(time.monotonic() - started) * 1000.0)
                        return
                    reader = SseReader(self.url, started)
                    while line := response.readline():
                        for item in reader.feed(line.decode().rstrip("\r\n")):
                            yielded = True
                            yield item
                    reader.end()
                    return
            except AccelmeshError:  # the daemon's answer (DeadlineExceeded is an OSError too)
                raise
            except (OSError, http.client.HTTPException) as exc:
                if yielded or attempt or not isinstance(exc, _RETRIED_SYNC):
                    raise _sync_transport_error(exc, self.url) from None
                if self.data_dir is not None:
                    self._resolve()
                headers = {**headers, **_auth(self._api_key)}

    def complete(self, prompt: Any, **kwargs: Any) -> Result:
        return _last(self.iter_request(prompt, stream=False, **kwargs))

    def _embedding_call(self, texts: Any, model_name: str | None, provider: str | None, kwargs: dict[str, Any]
                        ) -> tuple[list[Request], dict[str, str], bytes]:
        from node.embeddings import embed_requests

        timeout = self._defaults[2] if self._defaults[2] is not None else _settings_timeout()
        requests = embed_requests(texts, model_name=model_name, kwargs=kwargs, default_timeout=timeout)
        first = requests[0]
        _, headers, _ = http_call(first, provider=provider, stream=False, api_key=self._api_key)
        headers["x-request-id"] = first.request_id.rsplit(":", 1)[0] if kwargs.get("request_id") else first.request_id
        body: dict[str, Any] = {"input": [r.prompt for r in requests]}
        if model_name:
            body["model"] = model_name
        return requests, headers, json.dumps(body, ensure_ascii=False).encode()

    def embed_results(self, texts: Any, *, model_name: str | None = None, **kwargs: Any) -> list[Result]:
        """`node.embed` over `POST /v1/embeddings`: each text's Result, with `.embedding`."""
        provider = kwargs.pop("provider", None)
        requests, headers, body = self._embedding_call(texts, model_name, provider, kwargs)
        for attempt in range(2):
            try:
                started = time.monotonic()
                with self._exchange("/v1/embeddings", headers, body, requests[0].timeout + READ_MARGIN) as response:
                    data = response.read()
                if response.status == 401 and self.data_dir is not None and not attempt:
                    self._resolve()  # the daemon restarted: a new token
                    headers = {**headers, **_auth(self._api_key)}
                    continue
                if response.status != 200:
                    raise_http_error(response.status, data, _lower(response.getheaders()), self.url)
                return _openai.results_from_embeddings(_json(data, self.url),
                                                       latency_ms=(time.monotonic() - started) * 1e3)
            except AccelmeshError:
                raise
            except (OSError, http.client.HTTPException) as exc:
                if attempt or not isinstance(exc, _RETRIED_SYNC):
                    raise _sync_transport_error(exc, self.url) from None
                if self.data_dir is not None:
                    self._resolve()
                headers = {**headers, **_auth(self._api_key)}
        raise DaemonError(f"the HTTP API at {self.url} refused the API key twice")

    async def aembed_results(self, texts: Any, *, model_name: str | None = None, **kwargs: Any) -> list[Result]:
        import httpx

        provider = kwargs.pop("provider", None)
        requests, headers, body = self._embedding_call(texts, model_name, provider, kwargs)
        for attempt in range(2):
            try:
                started = time.monotonic()
                response = await self._aclient().post(self.url + "/v1/embeddings", content=body, headers=headers,
                                                      timeout=_httpx_timeout(requests[0]))
                if response.status_code == 401 and self.data_dir is not None and not attempt:
                    self._resolve()  # the daemon restarted: a new token
                    headers = {**headers, **_auth(self._api_key)}
                    continue
                if response.status_code != 200:
                    raise_http_error(response.status_code, response.content, response.headers, self.url)
                return _openai.results_from_embeddings(_json(response.content, self.url),
                                                       latency_ms=(time.monotonic() - started) * 1e3)
            except httpx.HTTPError as exc:
                if attempt or not isinstance(exc, _retried_async()):
                    raise _async_transport_error(exc, self.url) from None
                if self.data_dir is not None:
                    self._resolve()
                headers = {**headers, **_auth(self._api_key)}
        raise DaemonError(f"the HTTP API at {self.url} refused the API key twice")

    def close(self) -> None:
        """Close the blocking methods' idle connections (one in use closes when its call ends); the
        async ones close at `aclose()` in their loop, or with it."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- async (trio or asyncio) -----------------------------------------------------------------

    def _aclient(self) -> Any:
        import httpx
        import sniffio

        loop = _current_loop(sniffio.current_async_library())
        with self._lock:
            client = self._async.get(loop)
            if client is None:
                client = self._async[loop] = httpx.AsyncClient(trust_env=False, limits=_async_limits())
            return client

    async def aiter_request(self, prompt: Any, *, provider: str | None = None, model_name: str | None = None,
                            stream: bool = True, **kwargs: Any) -> AsyncIterator[str | Result]:
        import httpx

        request, path, headers, body = self._call(prompt, provider, model_name, kwargs, stream)
        for attempt in range(2):
            yielded = False
            try:
                started = time.monotonic()
                async with self._aclient().stream("POST", self.url + path, content=body, headers=headers,
                                                  timeout=_httpx_timeout(request)) as response:
                    if response.status_code == 401 and self.data_dir is not None and not attempt:
                        self._resolve()  # the daemon restarted: a new token
                        headers = {**headers, **_auth(self._api_key)}
                        continue
                    if response.status_code != 200:
                        raise_http_error(response.status_code, await response.aread(), response.headers, self.url)
                    if not stream:
                        yield _openai.result_from_json(_json(await response.aread(), self.url),
                                                       latency_ms=(time.monotonic() - started) * 1000.0)
                        return
                    reader = SseReader(self.url, started)
                    async with aclosing(response.aiter_lines()) as lines:
                        async for line in lines:
                            for item in reader.feed(line):
                                yielded = True
                                yield item
                    reader.end()
                    return
            except httpx.HTTPError as exc:
                if yielded or attempt or not isinstance(exc, _retried_async()):
                    raise _async_transport_error(exc, self.url) from None
                if self.data_dir is not None:
                    self._resolve()
                headers = {**headers, **_auth(self._api_key)}

    async def acomplete(self, prompt: Any, **kwargs: Any) -> Result:
        result: Result | None = None
        async with aclosing(self.aiter_request(prompt, stream=False, **kwargs)) as items:
            async for item in items:
                result = item if isinstance(item, Result) else result
        if result is None:
            raise DaemonError(f"the HTTP API at {self.url} sent no answer")
        return result

    async def aclose(self) -> None:
        """Close this loop's connections (and the blocking methods' ones)."""
        import sniffio

        loop = _current_loop(sniffio.current_async_library())
        with self._lock:
            client = self._async.pop(loop, None)
        if client is not None:
            await client.aclose()
        self.close()

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<node.HttpClient {self._url}>"


def _settings_timeout() -> float:
    from node.config import current_settings

    return float(current_settings().request_timeout)


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def _auth(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def _current_loop(library: str) -> Any:
    if library == "trio":
        import trio

        return trio.lowlevel.current_trio_token()
    import asyncio

    return asyncio.get_running_loop()


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise InvalidRequest(f"{url!r} is not an http://HOST:PORT URL (the daemon's API speaks plain HTTP)")
    return parts.hostname, parts.port or 80


def _lower(headers: list[tuple[str, str]]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers}


def _json(data: bytes, url: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise DaemonError(f"the HTTP API at {url} answered something that is not JSON: {data[:80]!r}") from None


def _sync_transport_error(exc: Exception, url: str) -> Exception:
    if isinstance(exc, TimeoutError):
        return DeadlineExceeded(0.0, f"the HTTP API at {url} (no answer)")
    return DaemonError(f"cannot reach the daemon's HTTP API at {url}: {type(exc).__name__}: {exc}")


def _httpx_timeout(request: Request) -> Any:
    import httpx

    return httpx.Timeout(request.timeout + READ_MARGIN, connect=CONNECT_TIMEOUT)


def _retried_async() -> tuple[type[Exception], ...]:
    import httpx

    return (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def _async_transport_error(exc: Exception, url: str) -> Exception:
    import httpx

    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
        return DeadlineExceeded(0.0, f"the HTTP API at {url} ({type(exc).__name__})")
    return DaemonError(f"cannot reach the daemon's HTTP API at {url}: {type(exc).__name__}: {exc}")


def _last(items: Iterator[str | Result]) -> Result:
    result: Result | None = None
    for item in items:
        result = item if isinstance(item, Result) else result
    if result is None:
        raise DaemonError("the HTTP API sent no answer")
    return result
