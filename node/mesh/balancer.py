"""Which backend serves a request: the pure selection policy behind each load-balancing strategy.

`order(strategy, backends, rng=..., turn=..., key=...)` returns the whole failover order for
one request: the first backend is the one chosen, the rest are tried in turn if it fails, and
every backend appears exactly once. It sees each backend as a `BackendView`, a snapshot the
backend manager takes at the moment of choice; it does no I/O, keeps no state, and draws
randomness only from the `rng` it is handed, so a seeded `random.Random` makes every choice
reproducible. The result depends on the *set* of backends, not on the order they are passed in
(they are sorted by peer id first). Cost: O(n log n) for n backends.

Strategies (their names are `node.config.LOAD_BALANCING_STRATEGIES`):

- ``round_robin``: the backends by peer id, rotated by the caller's counter `turn`.
- ``least_loaded``: lowest relative load first, ``max(in_flight, advert_load) / capacity``
  (the advert's count already holds our own requests that had started when it was signed, so
  a sum would count them twice; ours is exact and fresh, the advert's also holds other nodes');
  unlimited capacity counts as `UNLIMITED_CAPACITY` (near-zero relative load; among unlimited
  backends the raw load decides). Ties go to the lower latency, then to a draw from `rng`.
- ``power_of_two``: two distinct backends drawn from `rng`; the one with the lower score
  ``latency * (in_flight + 1)`` goes first, the other second, the rest follow by score (ties:
  a draw from `rng`). `in_flight` is our own count, exact and fresh; the advert's load is up to
  an interval old and is left to ``least_loaded``.
- ``weighted``: a random backend with probability proportional to ``capacity / latency``, the
  rest in weighted order without replacement (exponential keys, Efraimidis-Spirakis).
- ``least_delay``: the shortest expected delay first (join-the-shortest-expected-delay):
  ``service * (1 + max(0, load + 1 - capacity) / capacity)`` with ``load = max(in_flight,
  advert_load)``: a backend with a free slot costs its service time; a full one, its service
  time stretched by the queue ahead (each of its `capacity` slots frees one waiting request per
  service time). `service` is the EWMA of requests that found a free slot, so the queue is not
  counted twice (`latency` until one is known). Unlimited capacity never queues. Ties: a draw from `rng`. It is what the oracle of
  the balancing benchmark does with exact knowledge, here on our estimates.
- ``cache_affinity``: rendezvous (highest random weight) hashing of the routing `key` with
  each peer id, highest first, so that a repeated request lands where its answer already is
  and a backend leaving moves only its own keys. A backend whose ``in_flight / capacity`` is at
  or over `load_cap` spills: it moves after those under the cap, keeping hash order (an
  unlimited one never spills). Without a key it is ``least_loaded``.

Unknown latency (a backend that has not answered yet):

- ``least_loaded`` (tie-break), ``power_of_two`` and ``least_delay``: the median of the known latencies, so a
  new backend is neither shunned nor flooded; when none is known, 1.0 for everyone, so the
  score is ``in_flight + 1`` alone (0 would erase the load term and make every backend tie).
- ``weighted``: the mean of the known latencies, or 1.0 when none is known.
- A latency is never taken below `LATENCY_FLOOR` in a score: a measured 0 s would erase the
  load term in ``power_of_two`` and divide by zero in ``weighted``.

Unlimited capacity (`capacity=None`) in ``weighted`` counts as the largest finite capacity
among the backends, or 1 when none is finite: "unlimited" says nothing about speed, and an
infinite weight would take every request.

An unknown strategy is the caller's mistake: `InvalidRequest`, naming the valid ones.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from node.config import LOAD_BALANCING_STRATEGIES, MeshSettings
from node.errors import InvalidRequest
from protocols.canonical import request_bytes
from protocols.errors import NotCanonical

__all__ = [
    "DEFAULT_LOAD_CAP",
    "LATENCY_FLOOR",
    "UNLIMITED_CAPACITY",
    "BackendView",
    "order",
    "routing_key",
]

DEFAULT_LOAD_CAP = MeshSettings.load_cap  # 1.0: cache_affinity spills a backend once it runs all it can at once
UNLIMITED_CAPACITY = float(2**32)  # least_loaded's divisor for "unlimited": larger than any real capacity
LATENCY_FLOOR = 1e-6  # seconds; a measured 0 s must not erase the load term or divide by zero
_UNKNOWN_LATENCY = 1.0  # seconds; when no backend has a latency yet, every one gets this same value


@dataclass(frozen=True)
class BackendView:
    """One backend as a strategy sees it at the moment of choice."""

    peer_id: str
    in_flight: int = 0  # our own requests to it now (exact: updated on every start and finish)
    advert_load: int = 0  # in flight + queued in its last advert (up to an advert interval old; ours included)
    capacity: int | None = None  # what it can really run at once; None = unlimited
    latency: float | None = None  # EWMA seconds per request; None before its first answer
    service: float | None = None  # EWMA seconds of requests that found a free slot (no queue); None: unknown

    def __post_init__(self) -> None:
        if self.in_flight < 0 or self.advert_load < 0:
            raise ValueError(f"backend {self.peer_id}: negative load ({self.in_flight}, {self.advert_load})")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"backend {self.peer_id}: capacity {self.capacity} (at least 1, or None for unlimited)")
        for name, value in (("latency", self.latency), ("service", self.service)):
            if value is not None and not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"backend {self.peer_id}: {name} {value!r} (finite seconds, at least 0)")


def routing_key(
    task: str,
    model: str | None,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    params: Mapping[str, Any] | None = None,
) -> bytes:
    """The `cache_affinity` routing key of a request: sha256 of its canonical bytes.

    `model` is the model *name* the entry node knows (or None): the entry node cannot know
    which weights will answer, so this is not the request key of the cache, only a stable
    digest of what the caller asked. Exactly one of `prompt` and `messages` is given; `params`
    as for `protocols.canonical.request_bytes` (defaults dropped by the caller).
    """
    try:
        body = request_bytes(task=task, model=model, prompt=prompt, messages=messages,  # type: ignore[arg-type]
                             params=params)
    except NotCanonical as exc:
        raise InvalidRequest(f"this request has no routing key: {exc}") from exc
    return hashlib.sha256(body).digest()


def order(
    strategy: str,
    backends: Sequence[BackendView],
    *,
    rng: random.Random,
    turn: int = 0,
    key: bytes | None = None,
    load_cap: float = DEFAULT_LOAD_CAP,
) -> list[BackendView]:
    """The failover order for one request under `strategy`: first = chosen, each backend once.

    `rng` is the only source of randomness; `turn` is the caller's counter (round_robin);
    `key` is the request's `routing_key` (cache_affinity); `load_cap` the relative load at
    which cache_affinity spills a backend. Raises `InvalidRequest` for an unknown strategy and
    `ValueError` for two backends with the same peer id or a `load_cap` that is not positive.
    """
    pick = _STRATEGIES.get(strategy)
    if pick is None:
        raise InvalidRequest(f"unknown load-balancing strategy {strategy!r}; "
                             f"valid ones: {', '.join(LOAD_BALANCING_STRATEGIES)}")
    if not load_cap > 0.0:
        raise ValueError(f"load_cap must be positive, got {load_cap!r}")
    ordered = sorted(backends, key=lambda b: b.peer_id)
    for before, after in itertools.pairwise(ordered):
        if before.peer_id == after.peer_id:
            raise ValueError(f"backend {before.peer_id} is listed twice")
    if len(ordered) <= 1:
        return ordered
    return pick(ordered, rng, turn, key, load_cap)


# Each strategy gets the backends sorted by peer id (at least two, distinct), and returns a permutation.
_Strategy = Callable[[list[BackendView], random.Random, int, "bytes | None", float], list[BackendView]]


def _round_robin(backends: list[BackendView], rng: random.Random, turn: int, key: bytes | None,
                 load_cap: float) -> list[BackendView]:
    start = turn % len(backends)
    return backends[start:] + backends[:start]


def _least_loaded(backends: list[BackendView], rng: random.Random, turn: int, key: bytes | None,
                  load_cap: float) -> list[BackendView]:
    latency = _latencies(backends)
    keyed = [(max(b.in_flight, b.advert_load) / (UNLIMITED_CAPACITY if b.capacity is None else b.capacity),
              lat, rng.random(), b) for b, lat in zip(backends, latency)]
    keyed.sort(key=lambda k: k[:3])
    return [k[3] for k in keyed]


def _power_of_two(backends: list[BackendView], rng: random.Random, turn: int, key: bytes | None,
                  load_cap: float) -> list[BackendView]:
    latency = _latencies(backends)
    scored = [(lat * (b.in_flight + 1), rng.random(), b) for b, lat in zip(backends, latency)]
    i, j = rng.sample(range(len(backends)), 2)
    pair = sorted((scored[i], scored[j]), key=lambda s: s[0])  # stable: a tie keeps the draw's order
    rest = sorted((s for n, s in enumerate(scored) if n != i and n != j), key=lambda s: s[:2])
    return [s[2] for s in pair] + [s[2] for s in rest]


def _weighted(backends: list[BackendView], rng: random.Random, turn: int, key: bytes | None,
              load_cap: float) -> list[BackendView]:
    known = [b.latency for b in backends if b.latency is not None]
    unknown_latency = statistics.fmean(known) if known else _UNKNOWN_LATENCY
    finite = [b.capacity for b in backends if b.capacity is not None]
    unlimited = max(finite) if finite else 1
    keyed = []
    for b in backends:
        capacity = unlimited if b.capacity is None else b.capacity
        latency = max(LATENCY_FLOOR, unknown_latency if b.latency is None else b.latency)
        # The smallest of independent Exp(w_i) draws is backend i with probability w_i / sum(w),
        # and by memorylessness the sorted draws are sampling without replacement.
        keyed.append((rng.expovariate(capacity / latency), b))
    keyed.sort(key=lambda k: k[0])
    return [k[1] for k in keyed]


def _least_delay(backends: list[BackendView], rng: random.Random, turn: int, key: bytes | None,
                 load_cap: float) -> list[BackendView]:
    latency = _fill([b.service if b.service is not None else b.latency for b in backends])
    keyed = []
    for b, lat in zip(backends, latency):
        queued = 0.0
        if b.capacity is not None:
            queued = max(0, max(b.in_flight, b.advert_load) + 1 - b.capacity) / b.capacity
        keyed.append((lat * (1.0 + queued), rng.random(), b))
    keyed.sort(key=lambda k: k[:2])
    return [k[2] for k in keyed]


def _cache_affinity(backends: list[BackendView], rng: random.Random, turn: int, key: bytes | None,
                    load_cap: float) -> list[BackendView]:
    if key is None:
        return _least_loaded(backends, rng, turn, key, load_cap)
    ranked = sorted(backends, key=lambda b: _rendezvous(key, b.peer_id), reverse=True)
    under = [b for b in ranked if b.capacity is None or b.in_flight / b.capacity < load_cap]
    over = [b for b in ranked if not (b.capacity is None or b.in_flight / b.capacity < load_cap)]
    return under + over


def _rendezvous(key: bytes, peer_id: str) -> int:
    """The highest-random-weight score of `peer_id` for `key` (the peer id is the hash's suffix)."""
    return int.from_bytes(hashlib.sha256(key + peer_id.encode("utf-8")).digest()[:8], "big")


def _latencies(backends: list[BackendView]) -> list[float]:
    """Each backend's latency for a score: unknown ones get the median known latency (1.0 if none)."""
    return _fill([b.latency for b in backends])


def _fill(seconds: list[float | None]) -> list[float]:
    """`seconds` with each None as the median of the others (1.0 if none is known), none below the floor."""
    known = [s for s in seconds if s is not None]
    unknown = statistics.median(known) if known else _UNKNOWN_LATENCY
    return [max(LATENCY_FLOOR, unknown if s is None else s) for s in seconds]


_STRATEGIES: dict[str, _Strategy] = {
    "round_robin": _round_robin,
    "least_loaded": _least_loaded,
    "power_of_two": _power_of_two,
    "weighted": _weighted,
    "cache_affinity": _cache_affinity,
    "least_delay": _least_delay,
}  # keyed by the names in node.config.LOAD_BALANCING_STRATEGIES (a test checks they agree)
