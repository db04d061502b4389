"""`openai_compatible` and `openrouter`: chat completions over HTTP, with SSE streaming.

Both names run this code; `openrouter` presets OpenRouter's base URL and reads
``OPENROUTER_API_KEY``. A prompt is sent as one user message. Parameters passed through:
``max_tokens``, ``temperature`` (always sent: 0 when the caller gave none, since accelmesh is
greedy by default), ``top_p``, ``stop``, ``seed``, ``presence_penalty``, ``frequency_penalty``.

HTTP errors map to the router's typed errors: 401/403 -> `ProviderAuthError`, 404 ->
`ModelNotFound`, 429 -> `RateLimited` (with Retry-After), 5xx and connection failures ->
retryable `ProviderFailed`, other 4xx -> `ProviderFailed`; a stream that is malformed or ends
before ``data: [DONE]`` without a finish reason -> `ProviderFailed`.

The model identity (what the request key covers) is ``NAME/MODEL@BASE_URL`` with the base URL
normalised (`normalise_base_url`), so two servers exposing the same model name never share a
cached answer.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import math
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from node.errors import (
    ModelNotFound,
    ProviderAuthError,
    ProviderError,
    ProviderFailed,
    ProviderTimeout,
    RateLimited,
)
from node.providers.base import BaseProvider, Completion, ProviderRequest, Readiness

if TYPE_CHECKING:
    from node.config import Settings

__all__ = ["OpenAICompatibleProvider", "OpenRouterProvider", "SSEDecoder", "normalise_base_url"]

_PASSED = ("max_tokens", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")
_MAX_ERROR_BODY = 64 * 1024


class SSEDecoder:
    """Incremental server-sent-events parser: feed text, get the `data:` payloads of complete events."""

    def __init__(self) -> None:
        self._buffer = ""
        self._data: list[str] = []

    def feed(self, text: str) -> list[str]:
        self._buffer += text
        events = []
        while True:
            newline = self._buffer.find("\n")
            if newline < 0:
                return events
            line, self._buffer = self._buffer[:newline].rstrip("\r"), self._buffer[newline + 1 :]
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith("data:"):
                self._data.append(line[5:].lstrip(" "))
            # other fields (event:, id:, retry:) and comments (":") are ignored


class OpenAICompatibleProvider(BaseProvider):
    name = "openai_compatible"
    setting_hint = "set [providers.openai_compatible] base_url (ACCELMESH_PROVIDERS_OPENAI_COMPATIBLE_BASE_URL)"

    def __init__(self, *, base_url: str = "", api_key: str = "", default_model: str = "",
                 timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.default = default_model
        self.timeout = timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAICompatibleProvider:
        s = settings.providers.openai_compatible
        return cls(base_url=s.base_url, api_key=s.api_key, default_model=s.default_model, timeout=s.timeout)

    # -- readiness ---------------------------------------------------------------------

    def available(self) -> Readiness:
        if not self.base_url:
            return Readiness(False, f"no base URL: {self.setting_hint}")
        parsed = urlparse(self.base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            return Readiness(False, f"base URL {self.base_url!r} is not an http(s) URL")
        return Readiness(True, f"{self.base_url} (model {self.default or 'chosen per request'})")

    def default_model(self) -> str | None:
        return self.default or None

    def models(self) -> tuple[str, ...]:
        return (self.default,) if self.default else ()

    def model_identity(self, model: str | None) -> str:
        """``NAME/MODEL@BASE_URL``: the same model name on another server is another model."""
        identity = super().model_identity(model)
        base = normalise_base_url(self.base_url)
        return f"{identity}@{base}" if base else identity

    # -- request building --------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                   "User-Agent": "accelmesh"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _body(self, request: ProviderRequest, stream: bool) -> dict[str, Any]:
        model = request.model or self.default
        if not model:
            raise ModelNotFound(self.name, "no model given and no default_model configured")
        if request.messages is not None:
            messages = [dict(m) for m in request.messages]
        else:
            messages = [{"role": "user", "content": request.text}]
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream,
                                "temperature": float(request.params.get("temperature", 0.0))}
        for name in _PASSED:
            if name in request.params:
                body[name] = request.params[name]
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def _url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def _timeout(self, request: ProviderRequest) -> Any:
        import httpx

        total = min(self.timeout, request.timeout) if request.timeout > 0 else self.timeout
        return httpx.Timeout(total, connect=min(10.0, total))

    # -- errors ------------------------------------------------------------------------

    def _error(self, status: int, body: bytes, headers: Any) -> ProviderError:
        message = _error_message(body) or f"HTTP {status}"
        if status in (401, 403):
            return ProviderAuthError(self.name, f"HTTP {status}: {message} (check the API key)")
        if status == 404:
            return ModelNotFound(self.name, f"HTTP 404: {message}")
        if status == 429:
            return RateLimited(self.name, f"HTTP 429: {message}", retry_after=_retry_after(headers.get("retry-after")))
        if status >= 500:
            return ProviderFailed(self.name, f"HTTP {status}: {message}", retryable=True)
        return ProviderFailed(self.name, f"HTTP {status}: {message}")

    def _transport_error(self, exc: Exception) -> ProviderError:
        import httpx

        if isinstance(exc, httpx.TimeoutException):
            return ProviderTimeout(self.name, f"{self.base_url}: timed out ({type(exc).__name__})")
        return ProviderFailed(self.name, f"cannot reach {self.base_url}: {type(exc).__name__}: {exc}",
                              retryable=True)

    # -- responses ---------------------------------------------------------------------

    def _completion(self, payload: bytes, model: str) -> Completion:
        try:
            data = json.loads(payload)
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ProviderFailed(self.name, f"malformed response: {type(exc).__name__}: {exc}") from exc
        if not isinstance(text, str):
            raise ProviderFailed(self.name, "malformed response: content is not a string")
        usage = data.get("usage") or {}
        return Completion(text=text, model=data.get("model") or model,
                          finish_reason=choice.get("finish_reason") or "stop",
                          prompt_tokens=_int(usage.get("prompt_tokens")),
                          completion_tokens=_int(usage.get("completion_tokens")))

    # -- the two paths -----------------------------------------------------------------

    def complete_sync(self, request: ProviderRequest) -> Completion:
        import httpx

        body = self._body(request, stream=False)
        try:
            with httpx.Client(timeout=self._timeout(request)) as client:
                response = client.post(self._url(), headers=self._headers(), json=body)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        if response.status_code != 200:
            raise self._error(response.status_code, response.content[:_MAX_ERROR_BODY], response.headers)
        return self._completion(response.content, body["model"])

    async def astream(self, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        import httpx

        body = self._body(request, stream=True)
        try:
            async with httpx.AsyncClient(timeout=self._timeout(request)) as client:
                async with client.stream("POST", self._url(), headers=self._headers(), json=body) as response:
                    if response.status_code != 200:
                        raw = await response.aread()
                        raise self._error(response.status_code, raw[:_MAX_ERROR_BODY], response.headers)
                    if "text/event-stream" not in response.headers.get("content-type", ""):
                        # A server that ignores stream=true answers with one JSON body.
                        completion = self._completion(await response.aread(), body["model"])
                        if completion.text:
                            yield completion.text
                        yield completion
                        return
                    stream = _ChatStream(self.name, body["model"])
                    async for text in response.aiter_text():
                        for delta in stream.feed(text):
                            yield delta
                        if stream.done:
                            break
                    yield stream.finish()
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc


class OpenRouterProvider(OpenAICompatibleProvider):
    name = "openrouter"
    setting_hint = "set OPENROUTER_API_KEY (or [providers.openrouter] api_key)"

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenRouterProvider:
        s = settings.providers.openrouter
        return cls(base_url=s.base_url, api_key=s.api_key, default_model=s.default_model, timeout=s.timeout)

    def available(self) -> Readiness:
        if not self.api_key:
            return Readiness(False, f"no API key: {self.setting_hint}")
        return super().available()

    def _headers(self) -> dict[str, str]:
        headers = super()._headers()
        headers["X-Title"] = "accelmesh"
        return headers


# ---------------------------------------------------------------------------------------
# helpers

class _ChatStream:
    """The state of one streamed chat completion: SSE text in, deltas out, one Completion at the end."""

    def __init__(self, provider: str, model: str) -> None:
        self.provider, self.model = provider, model
        self.decoder = SSEDecoder()
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self.done = False

    def feed(self, text: str) -> Iterator[str]:
        """Yield the text deltas in `text`; a bad event raises after the good ones before it."""
        for event in self.decoder.feed(text):
            if self.done:
                break
            if event.strip() == "[DONE]":
                self.done = True
                break
            try:
                data = json.loads(event)
            except ValueError as exc:
                raise ProviderFailed(self.provider, f"malformed stream event: {event[:200]!r}",
                                     retryable=True) from exc
            if not isinstance(data, dict):
                raise ProviderFailed(self.provider, f"malformed stream event: {event[:200]!r}", retryable=True)
            if "error" in data:
                raise ProviderFailed(self.provider, f"stream error: {_error_message(event.encode())}",
                                     retryable=True)
            self.usage = data.get("usage") or self.usage
            self.model = data.get("model") or self.model
            for choice in data.get("choices") or ():
                if not isinstance(choice, dict):
                    raise ProviderFailed(self.provider, "malformed stream event: choice is not an object",
                                         retryable=True)
                delta_obj = choice.get("delta") or {}
                if not isinstance(delta_obj, dict):
                    raise ProviderFailed(self.provider, "malformed stream event: delta is not an object",
                                         retryable=True)
                delta = delta_obj.get("content")
                if isinstance(delta, str) and delta:
                    self.parts.append(delta)
                    yield delta
                self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def finish(self) -> Completion:
        if not self.done and self.finish_reason is None:
            raise ProviderFailed(self.provider, "stream ended before it finished (truncated)", retryable=True)
        return Completion(text="".join(self.parts), model=self.model, finish_reason=self.finish_reason or "stop",
                          prompt_tokens=_int(self.usage.get("prompt_tokens")),
                          completion_tokens=_int(self.usage.get("completion_tokens")))


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:500]
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
        if isinstance(data.get("message"), str):
            return data["message"]
    return json.dumps(data)[:500]


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delay-seconds or an HTTP date); None when absent or unusable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):  # not a date either: the 429 stays a RateLimited, with no hint
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:  # "-0000" dates parse naive; HTTP dates are GMT
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, parsed.timestamp() - time.time())


def normalise_base_url(url: str) -> str:
    """`url` as it goes into the model identity: scheme and host lower-cased, the scheme's default
    port dropped, no trailing slash, and no user info, query or fragment (which may hold secrets;
    the identity travels inside responses). "" for an empty or unparseable URL."""
    try:
        parsed = urlparse(url.strip())
        port = parsed.port
    except ValueError:
        return ""
    scheme, host = parsed.scheme.lower(), (parsed.hostname or "").lower()
    if not scheme or not host:
        return ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal
    if port is not None and (scheme, port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    return f"{scheme}://{host}{parsed.path.rstrip('/')}"


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
