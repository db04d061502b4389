"""Errors raised by the accelmesh runtime, and whose fault each one is.

    AccelmeshError                  base of everything below
    ├── ConfigError                 a setting has a bad value: names the key, the value and why
    ├── InvalidRequest              the caller passed arguments no provider can take
    ├── CacheMiss                   cache mode `only-if-cached` and no cached answer
    ├── DeadlineExceeded            the request's deadline passed (also a TimeoutError)
    ├── ProviderError               one provider could not answer
    │   ├── ProviderNotFound        no provider registered under that name (lists the known ones)
    │   ├── ProviderUnavailable     registered, not ready: says how to install or configure it
    │   ├── ProviderAuthError       credentials missing or refused (HTTP 401/403, CLI login)
    │   ├── ModelNotFound           the provider does not serve that model (HTTP 404)
    │   ├── RateLimited             slow down; `retry_after` seconds when the provider said (429)
    │   │   └── ClusterBusy         every eligible mesh node answered busy (node.mesh.errors)
    │   ├── ProviderTimeout         the provider did not answer within its time
    │   │   └── LivenessTimeout     a mesh peer sent no chunk within its liveness timeout (node.mesh.errors)
    │   ├── ProviderFailed          anything else the provider reported (5xx, crash, bad output)
    │   │   ├── PeerUnreachable     no stream could be opened to a mesh peer (node.mesh.errors)
    │   │   └── StreamInterrupted   an answer broke off mid-stream and could not be resumed (node.mesh.errors)
    │   └── RemoteError             a peer answered with a wire Error; `code` (node.mesh.errors)
    ├── AllProvidersFailed          every candidate in the fallback chain failed or was skipped
    ├── Busy                        every slot and the queue are full; `retry_after` seconds (429)
    ├── Disagreement                `verify=k`: no k nodes returned the same response CID; `answers`
    ├── StoreError                  the local sqlite store cannot be used: newer schema, not a
    │   │                           database (defined in node.cache.store)
    │   └── CorruptStoreError       damaged: the daemon moves the file aside and starts a new one
    └── DaemonError                 talking to a local daemon failed (none running, refused)

`ProviderError.retryable` tells the fallback chain and the mesh whether another try,
here or elsewhere, can succeed; `retry_after` is a hint in seconds or None.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = [
    "AccelmeshError",
    "ConfigError",
    "InvalidRequest",
    "CacheMiss",
    "DeadlineExceeded",
    "ProviderError",
    "ProviderNotFound",
    "ProviderUnavailable",
    "ProviderAuthError",
    "ModelNotFound",
    "RateLimited",
    "ProviderTimeout",
    "ProviderFailed",
    "AllProvidersFailed",
    "Busy",
    "Disagreement",
    "DaemonError",
]


class AccelmeshError(Exception):
    """Base of every error the runtime raises on purpose."""


class ConfigError(AccelmeshError, ValueError):
    def __init__(self, key: str, value: object, reason: str, *, source: str | None = None) -> None:
        where = f" (from {source})" if source else ""
        super().__init__(f"invalid setting {key}={value!r}{where}: {reason}")
        self.key, self.value, self.reason, self.source = key, value, reason, source


class InvalidRequest(AccelmeshError, ValueError):
    pass


class CacheMiss(AccelmeshError):
    def __init__(self, key: str) -> None:
        super().__init__(f"no cached answer for request key {key} (cache mode only-if-cached)")
        self.key = key


class DeadlineExceeded(AccelmeshError, TimeoutError):
    def __init__(self, timeout: float, what: str = "request") -> None:
        super().__init__(f"{what} did not finish within its deadline of {timeout:g} s")
        self.timeout = timeout


class ProviderError(AccelmeshError):
    retryable: bool = False

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider, self.message = provider, message
        if retryable is not None:
            self.retryable = retryable
        self.retry_after = retry_after


class ProviderNotFound(ProviderError):
    def __init__(self, provider: str, known: Sequence[str]) -> None:
        listing = ", ".join(sorted(known)) or "none"
        super().__init__(provider, f"no such provider; registered providers: {listing}")
        self.known = tuple(sorted(known))


class ProviderUnavailable(ProviderError):
    def __init__(self, provider: str, reason: str) -> None:
        super().__init__(provider, f"not ready: {reason}")
        self.reason = reason


class ProviderAuthError(ProviderError):
    pass


class ModelNotFound(ProviderError):
    pass


class RateLimited(ProviderError):
    retryable = True


class ProviderTimeout(ProviderError):
    retryable = True


class ProviderFailed(ProviderError):
    pass


class AllProvidersFailed(AccelmeshError):
    """Every candidate failed; `attempts` holds (provider name, cause) in the order tried."""

    def __init__(self, attempts: Sequence[tuple[str, BaseException | str]]) -> None:
        self.attempts = tuple(attempts)
        if not self.attempts:
            summary = "no providers in the fallback chain"
        else:
            summary = "; ".join(f"{name}: {_reason(cause)}" for name, cause in self.attempts)
        super().__init__(f"all providers failed ({summary})")


class Busy(AccelmeshError):
    """Every slot and the queue are full (this node's, or every eligible node's): come back in
    `retry_after` seconds. HTTP 429; the wire's `busy` error."""

    def __init__(self, retry_after: float, message: str = "every slot and the queue are full") -> None:
        super().__init__(f"{message}; retry after {retry_after:.3g} s")
        self.retry_after, self.reason = retry_after, message


class Disagreement(AccelmeshError):
    """`verify=k`: the nodes asked did not return k equal response CIDs, and no node was left to ask.
    `answers` maps each node that answered (peer id) to the response CID it returned. Not a
    provider's failure: the router never falls back from it to a single unverified answer."""

    def __init__(self, answers: Mapping[str, str], *, k: int | None = None, message: str | None = None) -> None:
        self.k, self.answers = k, dict(answers)
        if message is None:
            listing = ", ".join(f"{peer[-8:]}: {cid[-12:]}" for peer, cid in sorted(self.answers.items())) or "none"
            message = f"no {k} nodes agree on the answer ({len(self.answers)} answered: {listing})"
        super().__init__(message)


class DaemonError(AccelmeshError):
    pass


def _reason(cause: BaseException | str) -> str:
    if isinstance(cause, ProviderError):
        return cause.message
    return str(cause) or type(cause).__name__
