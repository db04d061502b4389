"""The inference protocol's `Error` and our errors, both ways: what a server answers for an
exception (`error_for`), and what a client raises for an answer (`raise_for`). One table each way.

Errors defined here, under node.errors' tree:

    ProviderError
    ├── RateLimited
    │   └── ClusterBusy         every eligible node was busy: the caller hears `busy`
    ├── ProviderTimeout
    │   └── LivenessTimeout     a node sent no chunk within its liveness timeout (retryable)
    ├── ProviderFailed
    │   ├── PeerUnreachable     no stream could be opened to the peer (retryable: ask another)
    │   └── StreamInterrupted   the answer broke off after text reached the caller, and could not
    │                           be resumed; `delivered` characters were delivered (not retryable)
    └── RemoteError             a peer answered with an Error not mapped to one of ours; `code`

    wire code            raised by raise_for         error_for answers it for
    busy                 Busy (retry_after)          Busy, ClusterBusy, AllProvidersFailed of busy nodes only
    deadline_exceeded    DeadlineExceeded            DeadlineExceeded
    cache_miss           CacheMiss                   CacheMiss
    bad_request          InvalidRequest              InvalidRequest
    model_not_found      ModelNotFound (retryable)   ModelNotFound
    disagreement         Disagreement (answers)      Disagreement (verify=k: no k nodes agreed)
    no_provider, provider_failed, internal, ...      RemoteError (code, retryable, retry_after)
"""

from __future__ import annotations

import dataclasses
import math

from node.errors import (
    AllProvidersFailed,
    Busy,
    CacheMiss,
    DeadlineExceeded,
    Disagreement,
    InvalidRequest,
    ModelNotFound,
    ProviderError,
    ProviderFailed,
    ProviderNotFound,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from protocols.inference.messages import MAX_ERROR_MESSAGE_CHARS, MAX_RETRY_AFTER, Error

__all__ = ["ClusterBusy", "LivenessTimeout", "PeerUnreachable", "RemoteError", "StreamInterrupted", "error_for",
           "raise_for"]


class ClusterBusy(RateLimited):
    """Every eligible node answered busy (the caller hears `busy`, with the smallest retry_after)."""


class LivenessTimeout(ProviderTimeout):
    """A node sent no chunk (the first, or the next) within its liveness timeout: abandoned, counted
    as a failure, and retried elsewhere (`BackendManager.liveness` states the rule)."""


class StreamInterrupted(ProviderFailed):
    """The answer broke off after `delivered` characters reached the caller and could not be resumed:
    the request is sampled (another node would answer differently), or the replay elsewhere did not
    begin with the text already delivered. Never retried by the router (the caller would see text
    twice); the caller decides."""

    def __init__(self, provider: str, message: str, *, delivered: int) -> None:
        super().__init__(provider, f"{message} ({delivered} characters were delivered)", retryable=False)
        self.delivered = delivered


class PeerUnreachable(ProviderFailed):
    """No stream could be opened to the peer: no connection and the dial failed, or it refused the
    protocol. Retryable (another node may serve); the backend manager cools a peer found
    unreachable twice in a row at once, without waiting for its failure window to fill."""


def error_for(exc: BaseException) -> Error:
    """The wire Error for an exception raised while serving (messages cut to what the wire allows)."""
    error = _error_for(exc)
    if len(error.message) > MAX_ERROR_MESSAGE_CHARS:
        error = dataclasses.replace(error, message=error.message[:MAX_ERROR_MESSAGE_CHARS - 1] + "…")
    return error


def _error_for(exc: BaseException) -> Error:
    if isinstance(exc, Busy):
        return Error(code="busy", message=exc.reason, retryable=True, retry_after=exc.retry_after)
    if isinstance(exc, ClusterBusy):
        return Error(code="busy", message=exc.message, retryable=True, retry_after=exc.retry_after)
    if isinstance(exc, AllProvidersFailed) and _all_busy(exc):
        retry_after = min(cause.retry_after or 1.0 for _, cause in exc.attempts if isinstance(cause, ClusterBusy))
        return Error(code="busy", message=str(exc), retryable=True, retry_after=retry_after)
    if isinstance(exc, DeadlineExceeded):
        return Error(code="deadline_exceeded", message=str(exc), retryable=False)
    if isinstance(exc, CacheMiss):
        return Error(code="cache_miss", message=str(exc))
    if isinstance(exc, Disagreement):  # (only a Request with verify > 1 can end this way)
        return Error(code="disagreement", message=str(exc), answers=dict(list(exc.answers.items())[:64]))
    if isinstance(exc, InvalidRequest):
        return Error(code="bad_request", message=str(exc))
    if isinstance(exc, ModelNotFound):
        return Error(code="model_not_found", message=str(exc), retryable=True)
    if isinstance(exc, (ProviderNotFound, ProviderUnavailable, AllProvidersFailed)):
        return Error(code="no_provider", message=str(exc), retryable=True)
    if isinstance(exc, ProviderError):
        retry_after = exc.retry_after if exc.retry_after is None or math.isfinite(exc.retry_after) else None
        return Error(code="provider_failed", message=str(exc), retryable=exc.retryable,
                     retry_after=None if retry_after is None else min(max(retry_after, 0.0), MAX_RETRY_AFTER))
    return Error(code="internal", message=f"{type(exc).__name__}: {exc}")


def _all_busy(exc: AllProvidersFailed) -> bool:
    """Whether every provider that was tried answered busy (skipped ones aside): the cluster is full."""
    tried = [cause for _, cause in exc.attempts if isinstance(cause, BaseException)]
    return bool(tried) and all(isinstance(cause, ClusterBusy) for cause in tried)


class RemoteError(ProviderError):
    """The serving node answered with an `Error`; `code` is the wire error code."""

    def __init__(self, peer: str, error: Error) -> None:
        super().__init__(f"peer {peer[-8:]}", f"{error.code}: {error.message}", retryable=error.retryable,
                         retry_after=error.retry_after)
        self.code, self.peer, self.detail = error.code, peer, error.message


def raise_for(error: Error, peer: str) -> None:
    """Raise the local error that matches a wire `Error` from `peer`."""
    if error.code == "deadline_exceeded":
        raise DeadlineExceeded(0.0, f"the request on {peer[-8:]}")
    if error.code == "cache_miss":
        raise CacheMiss(error.message)
    if error.code == "bad_request":
        raise InvalidRequest(error.message)
    if error.code == "disagreement":
        raise Disagreement(error.answers or {}, message=error.message)
    if error.code == "model_not_found":  # retryable: the mesh tries the next node (the advert was stale)
        raise ModelNotFound(f"peer {peer[-8:]}", error.message, retryable=error.retryable)
    if error.code == "busy":  # a client hears it as it is; the mesh asks the next node
        raise Busy(error.retry_after if error.retry_after is not None else 1.0, f"peer {peer[-8:]} is busy: {error.message}")
    raise RemoteError(peer, error)
