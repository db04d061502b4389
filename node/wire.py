"""The one conversion between our requests and results and the inference protocol's messages.

    node.requests.Request  ── request_to_wire ──►  protocols Request   (clients, the mesh forwarding)
    protocols Request      ── request_from_wire ─► node.requests.Request (the front door, serving)
    node.requests.Result   ── result_to_wire ───►  protocols Result     (the front door, answering)
    protocols Result       ── result_from_wire ─►  node.requests.Result (clients, the mesh)

`request_to_wire` also takes a provider's view of a request (`ProviderRequest`: the same fields).
No router here: the mesh may use this module.
"""

from __future__ import annotations

import uuid
from typing import Any

from node.requests import Request, Result, build_request
from protocols.canonical import decode_response
from protocols.inference.messages import MAX_HOPS, MAX_TIMEOUT_MS, ChatMessage
from protocols.inference.messages import Request as WireRequest
from protocols.inference.messages import Result as WireResult

__all__ = [
    "FORWARDED_HOPS",
    "request_to_wire",
    "request_from_wire",
    "result_to_wire",
    "result_from_wire",
    "wire_timeout_ms",
]

# A request the mesh forwards arrives with this many hops: it is served by local providers only,
# and the constraints on who serves it (on_peers, strategy) were met by choosing this node.
FORWARDED_HOPS = MAX_HOPS


def wire_timeout_ms(seconds: float) -> int:
    """A deadline in seconds as the Request's `timeout_ms` (the protocol allows 1 ms to 1 hour)."""
    return min(MAX_TIMEOUT_MS, max(1, int(seconds * 1000)))


def request_to_wire(request: Any, *, provider: str | None, hops: int, stream: bool = True) -> WireRequest:
    """`request` (a `Request` or a `ProviderRequest`) as the Request message a node receives."""
    forwarded = hops >= FORWARDED_HOPS
    return WireRequest(
        id=(request.request_id or uuid.uuid4().hex)[:64], task=request.task, prompt=request.prompt,
        messages=tuple(ChatMessage(str(m["role"]), str(m["content"])) for m in request.messages)
        if request.messages is not None else None,
        model=request.model, provider=provider, params=dict(request.params), stream=stream, hops=hops,
        cache=request.cache_mode, timeout_ms=wire_timeout_ms(request.timeout),
        on_peers=() if forwarded else tuple(request.on_peers), accelerator=request.accelerator,
        strategy=None if forwarded else request.strategy,
        verify=None if forwarded or request.verify <= 1 else request.verify,
    )


def request_from_wire(message: WireRequest, *, default_model: str | None = None) -> Request:
    """The Request a node received, validated and normalized exactly as an in-process call's
    arguments are (InvalidRequest names what is wrong); no model named: `default_model`."""
    prompt: Any = message.prompt
    if message.messages is not None:
        prompt = [{"role": m.role, "content": m.content} for m in message.messages]
    reserved: dict[str, Any] = {"cache": message.cache, "timeout": message.timeout_ms / 1000.0,
                                "request_id": message.id}
    if message.on_peers:
        reserved["on_peers"] = tuple(message.on_peers)
    if message.accelerator:
        reserved["accelerator"] = message.accelerator
    if message.strategy:
        reserved["strategy"] = message.strategy
    if message.verify:
        reserved["verify"] = message.verify
    return build_request(prompt, model_name=message.model, kwargs={**message.params, **reserved},
                         default_model=default_model, task="embed" if message.task == "embed" else None)


def result_to_wire(result: Result, *, peer: str) -> WireResult:
    """The Result message for `result`; `peer` computed it unless the result names another node."""
    return WireResult(
        response=result.response, cid=result.cid, key=result.key, provider=result.provider,
        peer=result.peer or peer, cache=result.cache, timings={"total_ms": float(result.latency_ms)},
        served_from=result.served_from, agreed=tuple(result.agreed) or None,
    )


def result_from_wire(message: WireResult, *, request_id: str, latency_ms: float) -> Result:
    """The answer a node sent, as `node.mesh.requesting.request_inference` yields it: its bytes were
    checked against its CID and decoded as they arrived, so they are not hashed again here."""
    body = decode_response(message.response, trusted=True)
    return Result(
        text=body.get("text", ""), provider=message.provider, model=body["model"], cache=message.cache,
        key=message.key, cid=message.cid, request_id=request_id, latency_ms=latency_ms,
        finish_reason=body["finish_reason"], usage=body["usage"], peer=message.peer,
        served_from=message.served_from, agreed=tuple(message.agreed or ()), response=message.response,
        embedding=tuple(body["embedding"]) if body.get("embedding") is not None else None,
    )
