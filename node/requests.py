"""What a request is: the arguments of a call, validated and normalized once, and what comes back.

`build_request` turns the arguments of any entry point (`node.generate_text(...)`, a CLI
command, a protocol message through `node.wire.request_from_wire`) into a `Request`: reserved
keyword arguments split off and checked, parameters validated, parameters equal to their
defaults dropped (so spelling one out keeps the request key), the rest canonical. A `Result` is
the answer with its metadata (INTERFACES.md `--json`). The router, the front door, the clients
and the mesh all use these types; none of them needs the router to build one.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from node.config import LOAD_BALANCING_STRATEGIES
from node.errors import InvalidRequest
from node.providers.base import AdmissionSlot, ProviderRequest, is_sampled
from protocols.canonical import canonicalize, request_bytes
from protocols.cid import request_key
from protocols.errors import NotCanonical
from protocols.inference.messages import MAX_TIMEOUT_MS, MAX_VERIFY
from protocols.vocabulary import ACCELERATOR_KINDS, CACHE_MODES

__all__ = ["RESERVED_KWARGS", "CACHE_MODES", "PARAM_DEFAULTS", "Request", "Result", "build_request", "evolve",
           "request_key_for"]

_Frozen = TypeVar("_Frozen", "Request", "Result")

# Never sent to a provider, never part of a request key (INTERFACES.md "Python API").
RESERVED_KWARGS = frozenset({"timeout", "cache", "stream", "request_id", "deps", "on_peers", "accelerator", "strategy",
                             "verify"})
# A parameter equal to its default is dropped before keying, so spelling it out keeps the key.
PARAM_DEFAULTS: Mapping[str, Any] = {
    "temperature": 0.0,
    "top_p": 1.0,
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}
MAX_TIMEOUT = MAX_TIMEOUT_MS / 1000.0  # seconds: the longest deadline a request may have (the wire's, 1 hour)
_FLOAT_PARAMS = frozenset({"temperature", "top_p", "presence_penalty", "frequency_penalty"})



def evolve(value: _Frozen, **changes: Any) -> _Frozen:
    """`dataclasses.replace` for Request and Result (frozen, no __post_init__): a copy of the fields
    with `changes`, without re-running __init__ field by field (a fifth of replace's cost; the
    front door makes three copies per request)."""
    assert changes.keys() <= value.__dict__.keys(), f"not fields of {type(value).__name__}: {sorted(changes)}"
    copy = object.__new__(type(value))
    copy.__dict__.update(value.__dict__, **changes)
    return copy


@dataclass(frozen=True)
class Request:
    """A normalized request: what determines the answer, and how to get it."""

    task: str  # "generate" (a prompt), "chat" (messages) or "embed" (a text to embed)
    prompt: str | None
    messages: tuple[Mapping[str, Any], ...] | None
    model: str | None  # explicit model, else the configured default, else None (provider's default)
    params: Mapping[str, Any]  # non-reserved keyword arguments, defaults dropped
    cache_mode: str = "default"
    timeout: float = 120.0
    request_id: str = ""
    on_peers: tuple[str, ...] = ()
    accelerator: str | None = None
    strategy: str | None = None
    verify: int = 1  # nodes that must return the same response CID (1: one node's answer)

    @property
    def sampled(self) -> bool:
        """Sampling without a seed: the answer may differ each time, so it is not cached."""
        return is_sampled(self.params)

    def for_provider(self, timeout: float, *, slot: AdmissionSlot | None = None) -> ProviderRequest:
        """The request as a provider sees it, with `timeout` seconds left and the admission slot."""
        return ProviderRequest(
            task=self.task, prompt=self.prompt, messages=self.messages, model=self.model,
            params=dict(self.params), timeout=timeout, request_id=self.request_id, on_peers=self.on_peers,
            accelerator=self.accelerator, strategy=self.strategy, cache_mode=self.cache_mode, verify=self.verify,
            slot=slot,
        )


@dataclass(frozen=True)
class Result:
    """An answer and where it came from (INTERFACES.md `--json` shape)."""

    text: str
    provider: str
    model: str  # identity of the model that answered (what the request key covered)
    cache: str  # tier: memory, local, cluster, miss, bypass
    key: str  # request key
    cid: str  # response CID
    request_id: str
    latency_ms: float
    finish_reason: str = "stop"
    usage: Mapping[str, int] = field(default_factory=dict)
    peer: str | None = None  # peer id that computed the answer (set when a daemon handled it)
    served_from: str | None = None  # peer that supplied a cluster hit
    agreed: tuple[str, ...] = ()  # verify=k: the nodes (peer ids) that computed this same response CID
    response: bytes = field(default=b"", repr=False)  # the canonical response bytes (their CID is `cid`)
    embedding: tuple[float, ...] | None = field(default=None, repr=False)  # task "embed": the vector

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "provider": self.provider,
            "model": self.model,
            "cache": self.cache,
            "key": self.key,
            "cid": self.cid,
            "request_id": self.request_id,
            "peer": self.peer,
            "served_from": self.served_from,
            "agreed": list(self.agreed),
            "latency_ms": round(self.latency_ms, 3),
        }


def _messages(value: Sequence[Any]) -> tuple[Mapping[str, Any], ...]:
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise InvalidRequest(f"messages[{i}] must be a mapping with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}] needs string 'role' and 'content'")
        out.append(dict(message))
    if not out:
        raise InvalidRequest("messages must not be empty")
    return tuple(out)


def _params(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, value in kwargs.items():
        if value is None:
            continue
        if name in _FLOAT_PARAMS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidRequest(f"{name} must be a finite number, got {value!r}")
            value = float(value)
        if name == "temperature" and value < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {value!r}")
        if name == "top_p" and not 0.0 < value <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {value!r}")
        if name in ("max_tokens", "seed", "n") and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidRequest(f"{name} must be an integer, got {value!r}")
        if name == "max_tokens" and value < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {value!r}")
        if name == "stop":
            value = [value] if isinstance(value, str) else list(value)
            if not all(isinstance(s, str) for s in value):
                raise InvalidRequest("stop must be a string or a list of strings")
            if not value:
                continue
        if name in PARAM_DEFAULTS and value == PARAM_DEFAULTS[name]:
            continue
        params[name] = value
    try:
        return canonicalize(params)  # type: ignore[no-any-return]
    except NotCanonical as exc:
        raise InvalidRequest(f"keyword argument {exc.path}: {exc.reason}") from None


def build_request(
    prompt: Any,
    *,
    model_name: str | None,
    kwargs: Mapping[str, Any],
    default_model: str | None = None,
    default_timeout: float = 120.0,
    task: str | None = None,
) -> Request:
    """Split reserved arguments from parameters, validate them, drop defaults. `task="embed"`: the
    prompt is one text to embed (no parameters); else the prompt's type says generate or chat."""
    reserved = {k: v for k, v in kwargs.items() if k in RESERVED_KWARGS}
    params = _params({k: v for k, v in kwargs.items() if k not in RESERVED_KWARGS})
    if task == "embed":
        if not isinstance(prompt, str):
            raise InvalidRequest(f"an embedding's input must be a string, got {type(prompt).__name__}")
        if params:
            raise InvalidRequest(f"embeddings take no parameters, got {', '.join(sorted(params))}")
        task, text, messages = "embed", prompt, None
    elif task is not None and task not in ("generate", "chat"):
        raise InvalidRequest(f"task must be generate, chat or embed, got {task!r}")
    elif isinstance(prompt, str):
        task, text, messages = "generate", prompt, None
    elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        task, text, messages = "chat", None, _messages(prompt)
    else:
        raise InvalidRequest(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if model_name is not None and not isinstance(model_name, str):
        raise InvalidRequest(f"model_name must be a string, got {type(model_name).__name__}")

    mode = reserved.get("cache")
    if mode is None or mode is True:
        mode = "default"
    elif mode is False:
        mode = "no-cache"
    if mode not in CACHE_MODES:
        raise InvalidRequest(f"cache mode {mode!r} is not one of {', '.join(CACHE_MODES)}")
    timeout = reserved.get("timeout")
    timeout = default_timeout if timeout is None else timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise InvalidRequest(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
    on_peers = reserved.get("on_peers") or ()
    on_peers = (on_peers,) if isinstance(on_peers, str) else on_peers
    if not isinstance(on_peers, (list, tuple)) or not all(isinstance(p, str) and p for p in on_peers):
        raise InvalidRequest(f"on_peers must be a peer id or a list of peer ids, got {on_peers!r}")
    strategy, verify = reserved.get("strategy"), reserved.get("verify")
    if strategy is not None and strategy not in LOAD_BALANCING_STRATEGIES:
        raise InvalidRequest(f"strategy must be one of {', '.join(LOAD_BALANCING_STRATEGIES)}, got {strategy!r}")
    verify = _verify(verify, params)
    if verify > 1 and mode == "only-if-cached":
        raise InvalidRequest(f"verify={verify} compares answers computed afresh: it cannot be only-if-cached")
    accelerator = reserved.get("accelerator")
    if accelerator is not None and accelerator not in ACCELERATOR_KINDS:
        raise InvalidRequest(f"accelerator must be one of {', '.join(ACCELERATOR_KINDS)}, got {accelerator!r}")
    return Request(
        task=task,
        prompt=text,
        messages=messages,
        model=model_name or default_model,
        params=params,
        cache_mode=mode,
        timeout=float(timeout),
        request_id=str(reserved.get("request_id") or uuid.uuid4().hex),
        on_peers=tuple(on_peers),
        accelerator=accelerator,
        strategy=strategy,
        verify=verify,
    )


def _verify(k: Any, params: Mapping[str, Any]) -> int:
    """`verify=k` (INTERFACES.md): k distinct nodes must return the same response CID. Only a
    deterministic request has one right answer to agree on, so a sampled one is refused."""
    if k is None:
        return 1
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_VERIFY:
        raise InvalidRequest(f"verify must be a whole number of nodes from 1 to {MAX_VERIFY}, got {k!r}")
    if k > 1 and is_sampled(params):
        raise InvalidRequest(f"verify={k} needs a deterministic request (no temperature, or a seed): sampled "
                             "answers differ from node to node")
    return k


def request_key_for(request: Request, identity: str, strategy: str) -> str:
    """The request key of `request` answered by the model `identity` (`strategy`: cid or sha256)."""
    canonical = request_bytes(task=request.task, model=identity, prompt=request.prompt, messages=request.messages,
                              params=request.params)
    return request_key(canonical, strategy)
