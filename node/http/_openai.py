"""OpenAI's request, response and error shapes and ours, translated both ways: pure, no I/O.

    HTTP body + headers ── parse_call / reserved_from_headers ──► build_request arguments
    node.requests.Result ── completion_json / chunk_json ───────► OpenAI JSON (+ "accelmesh")
    an exception ───────── error_response ─────────────────────► (status, OpenAI error JSON, headers)

Errors map through the inference protocol's codes (node.mesh.errors.error_for), so a caller
hears the same failure over HTTP as over the wire.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from node.errors import DaemonError, InvalidRequest, ProviderNotFound
from node.mesh.errors import error_for
from node.requests import MAX_TIMEOUT, RESERVED_KWARGS, Result
from protocols.inference.messages import ERROR_CODES, Error

__all__ = [
    "IGNORED_FIELDS",
    "MAX_BODY_BYTES",
    "MAX_REQUEST_ID_CHARS",
    "PASSED_FIELDS",
    "REJECTED_FIELDS",
    "Call",
    "accelmesh_json",
    "EmbeddingCall",
    "chunk_json",
    "embeddings_json",
    "completion_json",
    "error_from_json",
    "error_json",
    "error_response",
    "models_json",
    "parse_call",
    "parse_embedding_call",
    "reserved_from_headers",
    "result_from_json",
    "results_from_embeddings",
    "result_headers",
]

MAX_BODY_BYTES = 4 * 1024 * 1024  # a request body above this is refused (413): prompts, not uploads
MAX_REQUEST_ID_CHARS = 64  # a client's x-request-id longer than this is refused (the wire's id limit)
REQUEST_ID = re.compile(rf"^[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_CHARS}}}$")  # an x-request-id the API keeps

Kind = Literal["chat", "completion"]

# Parameters passed to the providers (the same names as node.generate_text's keyword arguments).
PASSED_FIELDS = frozenset({"temperature", "top_p", "max_tokens", "stop", "seed", "presence_penalty",
                           "frequency_penalty", "n"})
# Accepted and ignored: they do not change the answer (docs/api.md lists them).
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
# Refused with a 400 naming them: no provider here can honour them.
REJECTED_FIELDS = frozenset({"tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs",
                             "logit_bias", "response_format", "audio", "modalities", "prediction", "suffix", "echo",
                             "best_of", "reasoning_effort", "web_search_options"})
_OWN_FIELDS = {"chat": frozenset({"model", "messages", "stream", "stream_options", "max_completion_tokens",
                                  "accelmesh"}),
               "completion": frozenset({"model", "prompt", "stream", "stream_options", "accelmesh"})}


@dataclass(frozen=True)
class Call:
    """One OpenAI request body, checked: what to ask and how to answer."""

    kind: Kind
    prompt: str | list[dict[str, str]]  # completions: the prompt; chat: the messages
    model: str | None
    params: Mapping[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: usage in the last chunk


def _text_content(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (OpenAI's newer form)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{where}.content[{j}]: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequest(f"{where}.content must be a string or a list of text parts")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("messages must be a non-empty array")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must be an object with a string 'role'")
        out.append({"role": message["role"], "content": _text_content(message.get("content"), f"messages[{i}]")})
    return out


def _prompt(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    raise InvalidRequest("prompt must be a string (one prompt per request)")


def parse_call(kind: Kind, body: Any) -> Call:
    """The checked Call of a request body (already JSON-decoded); InvalidRequest names what is wrong."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - PASSED_FIELDS - IGNORED_FIELDS - _OWN_FIELDS[kind] - REJECTED_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown parameter: {unknown[0]}")
    rejected = sorted(name for name in REJECTED_FIELDS & set(body)
                      if body[name] not in (None, False) and not (name == "response_format" and body[name] == {"type": "text"}))
    if rejected:
        raise InvalidRequest(f"parameter {rejected[0]} is not supported by accelmesh (docs/api.md)")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise InvalidRequest("model must be a non-empty string")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("stream must be a boolean")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping) or not isinstance(options.get("include_usage", False), bool):
        raise InvalidRequest("stream_options must be an object whose include_usage is a boolean")
    params = {name: body[name] for name in PASSED_FIELDS if body.get(name) is not None}
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        params["max_tokens"] = body["max_completion_tokens"]
    if params.get("n", 1) != 1:
        raise InvalidRequest("n must be 1 (one choice per request)")
    params.update(_extra_params(body.get("accelmesh"), params))
    prompt = _messages(body.get("messages")) if kind == "chat" else _prompt(body.get("prompt"))
    return Call(kind, prompt, model, params, stream, bool(options.get("include_usage", False)))


def _extra_params(extension: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """`"accelmesh": {"params": {...}}`: provider parameters beyond OpenAI's (e.g. `top_k`), passed
    as `node.generate_text` passes its keyword arguments (`extra_body=` in the openai SDK)."""
    if extension is None:
        return {}
    if not isinstance(extension, Mapping) or set(extension) - {"params"}:
        raise InvalidRequest('accelmesh must be an object whose only field is "params"')
    extra = extension.get("params") or {}
    if not isinstance(extra, Mapping) or not all(isinstance(name, str) for name in extra):
        raise InvalidRequest("accelmesh.params must be an object of parameters")
    both = sorted(set(extra) & set(params))
    if both:
        raise InvalidRequest(f"accelmesh.params.{both[0]} is also given as a top-level field: give it once")
    reserved = sorted(set(extra) & RESERVED_KWARGS)
    if reserved:
        raise InvalidRequest(f"accelmesh.params.{reserved[0]} is not a parameter: it has its own x-accelmesh-* "
                             "header (docs/api.md)")
    return dict(extra)


# Request headers -> the reserved keyword arguments (INTERFACES.md "HTTP").
HEADER_ARGUMENTS = {
    "x-accelmesh-timeout": "timeout",
    "x-accelmesh-cache-mode": "cache",
    "x-accelmesh-strategy": "strategy",
    "x-accelmesh-verify": "verify",
    "x-accelmesh-on-peers": "on_peers",
    "x-accelmesh-accelerator": "accelerator",
}


def reserved_from_headers(headers: Mapping[str, str]) -> tuple[str | None, dict[str, Any]]:
    """(the provider `x-accelmesh-provider` names or None, the reserved arguments the other
    `x-accelmesh-*` headers give). `headers`' names are lower case. Values are checked by
    build_request; only their types are made here."""
    provider = headers.get("x-accelmesh-provider") or None
    reserved: dict[str, Any] = {}
    for header, name in HEADER_ARGUMENTS.items():
        value = headers.get(header)
        if value is None or not value.strip():
            continue
        value = value.strip()
        if name == "verify":
            try:
                reserved[name] = int(value)
            except ValueError:
                raise InvalidRequest(f"{header} must be a whole number, got {value!r}") from None
        elif name == "timeout":
            try:
                seconds = float(value)
            except ValueError:
                seconds = math.nan
            if not 0 < seconds < math.inf:
                raise InvalidRequest(f"{header} must be a positive, finite number of seconds, got {value!r}")
            reserved[name] = min(seconds, MAX_TIMEOUT)  # as on the wire: an hour at most
        elif name == "on_peers":
            reserved[name] = tuple(p.strip() for p in value.split(",") if p.strip())
        else:
            reserved[name] = value
    return provider, reserved


# -- answers ---------------------------------------------------------------------------------


def accelmesh_json(result: Result) -> dict[str, Any]:
    """The `accelmesh` object every response body (and the last SSE chunk) carries."""
    return {"key": result.key, "cid": result.cid, "provider": result.provider, "peer": result.peer,
            "cache": result.cache, "served_from": result.served_from, "request_id": result.request_id,
            "agreed": list(result.agreed)}


def result_headers(result: Result) -> list[tuple[bytes, bytes]]:
    """x-accelmesh-peer, -cache and -cid for a known Result."""
    out = [(b"x-accelmesh-cache", result.cache.encode()), (b"x-accelmesh-cid", result.cid.encode())]
    if result.peer:
        out.append((b"x-accelmesh-peer", result.peer.encode()))
    return out


def _usage(result: Result) -> dict[str, int]:
    prompt, completion = int(result.usage.get("prompt_tokens", 0)), int(result.usage.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(reason: str) -> str:
    return reason if reason in ("stop", "length", "content_filter") else "stop"


def response_id(kind: Kind, request_id: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"


def completion_json(kind: Kind, result: Result, *, created: int | None = None) -> dict[str, Any]:
    """The whole (non-streaming) answer: a chat.completion or a text_completion."""
    created = int(time.time()) if created is None else created
    if kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": result.text},
                                  "finish_reason": _finish(result.finish_reason), "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": result.text, "finish_reason": _finish(result.finish_reason), "logprobs": None}
        obj = "text_completion"
    return {"id": response_id(kind, result.request_id), "object": obj, "created": created, "model": result.model,
            "choices": [choice], "usage": _usage(result), "accelmesh": accelmesh_json(result)}


def result_from_json(body: Any, *, latency_ms: float, text: str | None = None,
                     finish_reason: str | None = None) -> Result:
    """The inverse of `completion_json` (and, with the streamed `text` and `finish_reason`, of the
    last SSE chunk): the Result an in-process call returns. A body that is not ours is DaemonError."""
    try:
        meta = body["accelmesh"]
        choice = (body.get("choices") or [{}])[0]
        if text is None:
            text = choice["message"]["content"] if "message" in choice else choice["text"]
        usage = body.get("usage") or {}
        return Result(
            text=text or "", provider=meta["provider"], model=body.get("model") or "", cache=meta["cache"],
            key=meta["key"], cid=meta["cid"], request_id=meta.get("request_id") or "", latency_ms=latency_ms,
            finish_reason=finish_reason or choice.get("finish_reason") or "stop",
            usage={name: int(usage[name]) for name in ("prompt_tokens", "completion_tokens") if name in usage},
            peer=meta.get("peer"), served_from=meta.get("served_from"), agreed=tuple(meta.get("agreed") or ()))
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise DaemonError(f"the HTTP API answered something that is not an accelmesh completion ({exc!r})") from None


def chunk_json(kind: Kind, request_id: str, model: str, created: int, *, text: str | None = None,
               role: bool = False, result: Result | None = None, usage: bool = False) -> dict[str, Any]:
    """One streamed chunk. `text`: a delta; `result`: the answer is complete (finish_reason, and
    with `usage` the usage-only chunk OpenAI sends last: no choices)."""
    choices: list[dict[str, Any]] = []
    if not usage:
        finish = _finish(result.finish_reason) if result is not None else None
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        else:
            choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
    chunk: dict[str, Any] = {"id": response_id(kind, request_id),
                             "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                             "created": created, "model": model, "choices": choices}
    if usage and result is not None:
        chunk["usage"] = _usage(result)
    return chunk


# -- embeddings ------------------------------------------------------------------------------

MAX_EMBEDDING_INPUTS = 2048  # texts in one /v1/embeddings request (OpenAI's limit)


@dataclass(frozen=True)
class EmbeddingCall:
    """One /v1/embeddings body, checked."""

    texts: tuple[str, ...]
    model: str | None
    base64: bool  # encoding_format "base64": each vector as little-endian float32 bytes, base64


def parse_embedding_call(body: Any) -> EmbeddingCall:
    if not isinstance(body, Mapping):
        raise InvalidRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - {"model", "input", "encoding_format", "user", "dimensions"})
    if unknown:
        raise InvalidRequest(f"unknown parameter: {unknown[0]}")
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidRequest("input must be a string or a non-empty array of strings (token arrays are not "
                             "supported)")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(f"input has {len(texts)} texts; at most {MAX_EMBEDDING_INPUTS} per request")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidRequest("encoding_format must be float or base64")
    if body.get("dimensions") is not None:
        raise InvalidRequest("parameter dimensions is not supported by accelmesh (the model's size is fixed)")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise InvalidRequest("model must be a non-empty string")
    return EmbeddingCall(tuple(texts), model, encoding == "base64")


def embeddings_json(call: EmbeddingCall, results: Sequence[Result]) -> dict[str, Any]:
    """OpenAI's embeddings list; `accelmesh` holds each field as a list aligned with `data`."""
    import base64
    import struct

    def encoded(vector: Sequence[float]) -> Any:
        if not call.base64:
            return list(vector)
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

    tokens = sum(int(r.usage.get("prompt_tokens", 0)) for r in results)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encoded(r.embedding or ())}
                 for i, r in enumerate(results)],
        "model": results[0].model.split("/", 1)[-1] if results else (call.model or ""),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "accelmesh": {name: [value[name] for value in (accelmesh_json(r) for r in results)]
                      for name in ("key", "cid", "provider", "peer", "cache", "served_from", "request_id")},
    }


def results_from_embeddings(body: Any, *, latency_ms: float) -> list[Result]:
    """The inverse of `embeddings_json` (float or base64): each input's Result, with `.embedding`."""
    import base64
    import struct

    try:
        meta, data = body["accelmesh"], sorted(body["data"], key=lambda item: item["index"])
        out = []
        for i, item in enumerate(data):
            vector = item["embedding"]
            if isinstance(vector, str):
                raw = base64.b64decode(vector)
                vector = struct.unpack(f"<{len(raw) // 4}f", raw)
            out.append(Result(
                text="", provider=meta["provider"][i], model=body.get("model") or "", cache=meta["cache"][i],
                key=meta["key"][i], cid=meta["cid"][i], request_id=meta["request_id"][i], latency_ms=latency_ms,
                peer=meta["peer"][i], served_from=meta["served_from"][i], embedding=tuple(float(x) for x in vector)))
        return out
    except (KeyError, IndexError, TypeError, ValueError, struct.error) as exc:
        raise DaemonError(f"the HTTP API answered something that is not an accelmesh embeddings list ({exc!r})") from None


# -- errors ----------------------------------------------------------------------------------

# wire code (node.mesh.errors.error_for) -> HTTP status, OpenAI error type
_STATUS = {
    "bad_request": (400, "invalid_request_error"),
    "model_not_found": (404, "invalid_request_error"),
    "busy": (429, "rate_limit_error"),
    "disagreement": (502, "server_error"),
    "provider_failed": (502, "server_error"),
    "no_provider": (503, "server_error"),
    "deadline_exceeded": (504, "timeout_error"),
    "cache_miss": (504, "cache_miss"),  # RFC 9111: only-if-cached and nothing stored is a 504
    "internal": (500, "server_error"),
}


def error_json(message: str, *, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: BaseException, *, peer: str = "") -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
    """(status, OpenAI error JSON, extra headers) for an exception raised while answering at `peer`.

    Beside OpenAI's fields the body carries `"accelmesh": {"peer", "retryable", "retry_after",
    "answers"}` (the wire Error's fields), so a client raises what an in-process caller would
    (`error_from_json`)."""
    if isinstance(exc, ProviderNotFound):  # a caller naming a provider this daemon does not have
        return 400, error_json(str(exc), type_="invalid_request_error", code="provider_not_found",
                               param="x-accelmesh-provider"), []
    wire = error_for(exc)
    status, type_ = _STATUS.get(wire.code, (502, "server_error"))
    headers: list[tuple[bytes, bytes]] = []
    if status == 429:
        retry_after = wire.retry_after if wire.retry_after is not None and math.isfinite(wire.retry_after) else 1.0
        headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    body = error_json(wire.message, type_=type_, code=wire.code, param="model" if wire.code == "model_not_found" else None)
    body["accelmesh"] = {"peer": peer or None, "retryable": wire.retryable, "retry_after": wire.retry_after,
                         "answers": wire.answers}
    return status, body, headers


def error_from_json(status: int, body: Any, *, retry_after: str | None = None) -> tuple[Error | None, str, str]:
    """The inverse of `error_response`: (the wire Error, or None when the body names none of its
    codes; the peer that answered, or ""; the message). `retry_after` is the Retry-After header."""
    error = body.get("error") if isinstance(body, Mapping) else None
    if not isinstance(error, Mapping):
        return None, "", f"HTTP {status}"
    message = str(error.get("message") or f"HTTP {status}")
    code, extension = error.get("code"), body.get("accelmesh")
    extension = extension if isinstance(extension, Mapping) else {}
    if code not in ERROR_CODES:
        return None, str(extension.get("peer") or ""), message
    after = extension.get("retry_after")
    if not isinstance(after, (int, float)) and retry_after is not None:
        try:
            after = float(retry_after)
        except ValueError:
            after = None
    answers = extension.get("answers")
    wire = Error(code=code, message=message, retryable=bool(extension.get("retryable", False)),
                 retry_after=float(after) if isinstance(after, (int, float)) else None,
                 answers=dict(answers) if isinstance(answers, Mapping) else None)
    return wire, str(extension.get("peer") or ""), message


def models_json(models: Mapping[str, Sequence[str]], *, created: int = 0) -> dict[str, Any]:
    """`GET /v1/models`: every model id served anywhere in the mesh, with the peers that serve it."""
    return {"object": "list", "data": [
        {"id": model, "object": "model", "created": created, "owned_by": "accelmesh", "peers": sorted(peers)}
        for model, peers in sorted(models.items())]}
