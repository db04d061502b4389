"""The backend manager: which node serves each request the mesh carries, from live state kept per node.

A *backend* is a node that can serve a request: a peer whose advert we hold, or this node through
its local providers. For each one the manager keeps what the policy needs, fed by the transport:

- our own requests in flight to it (`Attempt` counts them on every start and finish: exact);
- EWMA latency of whole requests and of the time to the first chunk (successes only for the
  former: a failure's duration says nothing about speed);
- passive health (`node.mesh.health.BackendHealth`): failures of real requests in a sliding
  window, cooldowns with backoff;
- unreachable: two attempts in a row that could not even open a stream to it cool it at once;
- active health: the advert service pings connected peers each interval; two failed pings in a
  row cool an idle peer at once (at low traffic the window never fills, so this is what finds a dead
  node), a ping's round trip is kept for `peers --json` (`rtt_ms`).

What the advert says (load, capacity, providers, accelerators) is read, never copied: each
`plan()` calls `candidates()`, the daemon's read-only view of the peer table and this node's
advert.

`plan(request)` is the whole failover order of one request: the candidates that can serve it
(task, model, readiness, `on_peers`, `accelerator`), ordered by the request's strategy (or the
configured one) through the pure `node.mesh.balancer.order`, then the cooling ones moved last
(`node.mesh.health.ranked`: a backend that alone can serve is tried last, never excluded).

Which outcomes count (`outcome_of`): a success; a retryable failure (connection lost, stream
reset, a failing provider, a peer that broke the protocol or sent bytes that fail their CID) and
an attempt cut by the request's deadline are failures; `busy`, a caller's mistake
(`bad_request`, an unknown model: not retryable) and a caller that went away count for nothing.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Literal

import trio

from node.errors import Busy, ConfigError, InvalidRequest, ProviderError
from node.mesh.balancer import DEFAULT_LOAD_CAP, BackendView, order, routing_key
from node.mesh.errors import LivenessTimeout, PeerUnreachable
from node.mesh.health import BackendHealth, Ewma, HealthPolicy, HealthState, ranked
from node.providers.base import ProviderRequest

__all__ = [
    "Offer",
    "Candidate",
    "candidates_from_adverts",
    "eligible",
    "capacity_for",
    "identities_for",
    "outcome_of",
    "Outcome",
    "Backend",
    "BackendStatistics",
    "BackendManager",
    "ManagerStatistics",
    "Attempt",
    "EWMA_ALPHA",
    "health_policy",
    "hedge_rule",
    "HedgeRule",
    "HEDGE_SAMPLES",
    "HEDGE_MIN_SAMPLES",
    "PING_FAILURES_TO_COOL",
    "PING_IDLE_AFTER",
]

Outcome = Literal["ok", "failed", "neutral"]
HedgeRule = float | Literal["p95"] | None  # seconds, the backend's recent p95 time to first chunk, or off

EWMA_ALPHA = 0.2  # each request moves a backend's average a fifth of the way: ~10 requests of memory
PING_FAILURES_TO_COOL = 2  # failed pings in a row that cool a peer (one lost ping is not a dead node)
PING_IDLE_AFTER = 10.0  # seconds without a successful request after which pings judge a peer (adverts.interval)
HEDGE_SAMPLES = 64  # recent times to first chunk kept per backend for `hedge_after = "p95"`
HEDGE_MIN_SAMPLES = 10  # fewer than this: no p95 yet, no hedge (a guess would hedge every request)
MAX_LIVENESS_DOUBLINGS = 6  # a backend cut again and again waits at most 64 times its liveness timeout


def health_policy(mesh: Any) -> HealthPolicy:
    """The health policy of the `[mesh]` settings (`node.config.MeshSettings`); a `ConfigError`
    naming the key when they do not make one (e.g. `cooldown_max` below `cooldown`)."""
    keys = {"window": "health_window", "min_requests": "health_min_requests", "threshold": "health_threshold",
            "base_cooldown": "cooldown", "max_cooldown": "cooldown_max"}
    try:
        return HealthPolicy(**{name: getattr(mesh, key) for name, key in keys.items()})
    except ValueError as exc:
        name, key = next(((n, k) for n, k in keys.items() if f"HealthPolicy.{n} " in str(exc)),
                         ("max_cooldown", "cooldown_max"))
        raise ConfigError(f"mesh.{key}", getattr(mesh, key), str(exc).replace(f"HealthPolicy.{name} ", "")
                          .replace("base_cooldown", "mesh.cooldown")) from exc


def hedge_rule(value: str) -> HedgeRule:
    """`mesh.hedge_after` as a rule: "off" (None), "p95", or seconds > 0; a `ConfigError` otherwise."""
    text = str(value).strip().lower()
    if text in ("off", ""):
        return None
    if text == "p95":
        return "p95"
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError("mesh.hedge_after", value, "expected off, p95, or a number of seconds above 0")
    return seconds


@dataclass(frozen=True)
class Offer:
    """One provider a backend advertises.

    `identities`: model -> the identity the request key covers (ARCHITECTURE.md section 4), only
    for the models whose identity the advert says (protocol 1.2; an older node says none).
    `default_model`: what it answers a request that names no model with (None: not said)."""

    name: str
    tasks: tuple[str, ...]
    models: tuple[str, ...]
    ready: bool
    capacity: int | None = None  # requests it runs at once; None = unlimited (the node's capacity bounds it)
    identities: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    default_model: str | None = None

    def identity(self, model: str | None) -> str | None:
        """The identity that answers a request naming `model` (None: its default model) here; None
        when the advert does not say it."""
        model = model if model is not None else self.default_model
        return None if model is None else self.identities.get(model)


@dataclass(frozen=True)
class Candidate:
    """A node that could serve, as its advert describes it."""

    peer_id: str
    providers: tuple[Offer, ...]
    accelerators: frozenset[str]
    is_self: bool = False
    capacity: int | None = None  # the node's max_concurrent (None: not said)
    load: int = 0  # in flight + queued in its last advert (up to an advert interval old)


def candidates_from_adverts(peer_id: str, others: Iterable[Any], own: Any) -> list[Candidate]:
    """The nodes that could serve: every peer whose advert we hold (`others`), and this node
    (`own`, its current advert, or None before the first)."""

    def offer(p: Any) -> Offer:
        identities = getattr(p, "identities", None) or ()  # None: a 1.0 or 1.1 sender
        return Offer(p.name, tuple(p.tasks), tuple(p.models), p.ready, getattr(p, "capacity", None),
                     MappingProxyType({m: i for m, i in zip(p.models, identities) if i}),
                     getattr(p, "default_model", None))

    def candidate(advert: Any, is_self: bool) -> Candidate:
        return Candidate(
            advert.peer_id,
            tuple(offer(p) for p in advert.providers),
            frozenset(a.kind for a in advert.accelerators), is_self=is_self,
            capacity=advert.capacity or None, load=advert.load.in_flight + advert.load.queued,
        )

    out = [candidate(advert, False) for advert in others]
    if own is not None:
        out.append(candidate(own, own.peer_id == peer_id))
    return out


def _serves(offer: Offer, task: str, model: str | None) -> bool:
    return offer.ready and task in offer.tasks and (model is None or model in offer.models)


def eligible(candidates: Iterable[Candidate], task: str, model: str | None, on_peers: Sequence[str] = (),
             accelerator: str | None = None) -> list[Candidate]:
    """The candidates that can serve `task` (and `model`) under the constraints, sorted by peer id."""
    out = [c for c in candidates
           if (not on_peers or c.peer_id in on_peers) and (not accelerator or accelerator in c.accelerators)
           and any(_serves(p, task, model) for p in c.providers)]
    return sorted(out, key=lambda c: c.peer_id)


def capacity_for(candidate: Candidate, task: str, model: str | None) -> int | None:
    """How many such requests `candidate` runs at once: the largest capacity among its providers
    that serve them (an unlimited one: the node's), never above the node's own `max_concurrent`.
    None when neither says (unlimited)."""
    limits = [p.capacity for p in candidate.providers if _serves(p, task, model)]
    provider = None if not limits or None in limits else max(limit for limit in limits if limit is not None)
    if provider is None:
        return candidate.capacity
    return provider if candidate.capacity is None else min(provider, candidate.capacity)


def identities_for(candidates: Iterable[Candidate], task: str, model: str | None) -> set[str] | None:
    """The distinct model identities that could answer a request for `task` naming `model` (None:
    each serving provider's default model), over every ready provider of `candidates` that serves
    it; None when the advert of any of them does not say its identity (then the request cannot be
    keyed before it is sent: no lookup). Empty when no candidate serves it.

    Pass `eligible(...)` to apply a request's `on_peers` and `accelerator` first. Every serving
    provider counts, not only the one a node would be asked through (with a model named, the mesh
    addresses the first that lists it; without one, the node's chain picks): a superset, so one
    identity here means one key covers every answer the request can get."""
    out: set[str] = set()
    for candidate in candidates:
        for offer in candidate.providers:
            if not _serves(offer, task, model):
                continue
            identity = offer.identity(model)
            if identity is None:
                return None
            out.add(identity)
    return out


def outcome_of(exc: BaseException | None, *, timed_out: bool = False) -> Outcome:
    """What an attempt that ended with `exc` says of the backend's health.

    `timed_out`: the request's deadline had passed when it ended (a cancellation then is the
    backend's slowness, not the caller leaving)."""
    if exc is None:
        return "ok"
    if timed_out:
        return "failed"
    if isinstance(exc, Busy):
        return "neutral"  # it said no in time: healthy, just full
    if isinstance(exc, ProviderError):
        return "failed" if exc.retryable else "neutral"  # not retryable: the request's fault, not the node's
    if isinstance(exc, (trio.Cancelled, GeneratorExit, KeyboardInterrupt)):
        return "neutral"  # the caller went away (or stopped reading)
    return "failed"


@dataclass(frozen=True)
class BackendStatistics:
    """A snapshot of one backend (`Backend.statistics(now)`)."""

    peer_id: str
    in_flight: int  # our requests to it now
    started: int  # attempts sent to it
    succeeded: int
    failed: int
    latency_ms: float | None  # EWMA of whole requests (successes)
    ttfc_ms: float | None  # EWMA time to the first chunk
    rtt_ms: float | None  # last ping's round trip
    health: HealthState
    cooldown_until: float | None  # monotonic seconds (the manager's clock); None when not cooling
    failure_ratio: float  # in the health window now
    cooldowns: int
    disagreed: int = 0  # verify=k: answers that differed from one at least two other nodes agreed on

    def to_json(self, *, wall_offset: float = 0.0) -> dict[str, Any]:
        """`peers --json`'s view; `wall_offset` turns the manager's clock into Unix time."""
        return {
            "health": "cooling" if self.health == "cooling" else "ok",  # probing: available again
            "cooldown_until": None if self.cooldown_until is None else round(self.cooldown_until + wall_offset, 3),
            "latency_ms": _ms(self.latency_ms), "ttfc_ms": _ms(self.ttfc_ms), "rtt_ms": self.rtt_ms,
            "in_flight": self.in_flight, "failure_ratio": round(self.failure_ratio, 4), "cooldowns": self.cooldowns,
            "started": self.started, "succeeded": self.succeeded, "failed": self.failed,
            "disagreed": self.disagreed,
        }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class Backend:
    """The live state of one backend: in flight, latency, health."""

    __slots__ = ("cuts", "disagreed", "failed", "health", "in_flight", "last_ok", "latency", "peer_id",
                 "ping_failures", "recent_ttfc", "rtt_ms", "service", "started", "succeeded", "ttfc", "unreachable")

    def __init__(self, peer_id: str, policy: HealthPolicy) -> None:
        self.peer_id = peer_id
        self.in_flight = 0
        self.started = self.succeeded = self.failed = self.disagreed = 0
        self.latency = Ewma(EWMA_ALPHA)  # seconds
        self.ttfc = Ewma(EWMA_ALPHA)  # seconds
        self.recent_ttfc: deque[float] = deque(maxlen=HEDGE_SAMPLES)  # seconds, the last few (hedging's p95)
        self.service = Ewma(EWMA_ALPHA)  # seconds, successes that found a free slot (by our count): no queue
        self.health = BackendHealth(policy)
        self.rtt_ms: float | None = None
        self.last_ok = -math.inf  # the manager's clock: when an attempt on it last succeeded
        self.ping_failures = 0  # pings in a row that failed (while idle)
        self.unreachable = 0  # attempts in a row that could not even open a stream to it
        self.cuts = 0  # attempts in a row abandoned for liveness: each doubles its next timeout

    def found_unreachable(self, now: float) -> None:
        """No stream could be opened: `PING_FAILURES_TO_COOL` times in a row cool it at once (a
        dead node is found in two requests, not after a window of them)."""
        self.unreachable += 1
        if self.unreachable >= PING_FAILURES_TO_COOL:
            self.unreachable = 0
            self.health.trip(now)

    def view(self, candidate: Candidate, capacity: int | None) -> BackendView:
        return BackendView(self.peer_id, in_flight=self.in_flight, advert_load=candidate.load, capacity=capacity,
                           latency=self.latency.value, service=self.service.value)

    def statistics(self, now: float | None = None) -> BackendStatistics:
        """A snapshot at `now` (the manager's clock; None: at the latest outcome recorded)."""
        h = self.health.statistics(now)
        latency, ttfc = self.latency.value, self.ttfc.value
        return BackendStatistics(
            self.peer_id, self.in_flight, self.started, self.succeeded, self.failed,
            None if latency is None else latency * 1000.0, None if ttfc is None else ttfc * 1000.0, self.rtt_ms,
            h.state, h.cooldown_until, h.failures / h.outcomes if h.outcomes else 0.0, h.cooldowns, self.disagreed,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        latency = "-" if s.latency_ms is None else f"{s.latency_ms:.0f}ms"
        return (f"<Backend {self.peer_id[-8:]} {s.health} in_flight={s.in_flight} latency={latency} "
                f"ok={s.succeeded} failed={s.failed} cooldowns={s.cooldowns}>")


class Attempt:
    """One attempt of one request on one backend: counts it in flight from `with` to its end, and
    records its outcome (`outcome_of` the exception it ends with) and timings. Call `chunk()` for
    each chunk that arrives and `answered()` when the final answer has arrived (a caller that
    stops reading after that is no failure)."""

    __slots__ = ("_first", "_free_slot", "_manager", "_recorded", "_started", "backend", "capacity", "deadline")

    def __init__(self, manager: BackendManager, backend: Backend, deadline: float, capacity: int | None) -> None:
        self._manager, self.backend, self.deadline, self.capacity = manager, backend, deadline, capacity
        self._started = 0.0
        self._first: float | None = None
        self._recorded = False
        self._free_slot = True

    def __enter__(self) -> Attempt:
        self._started = self._manager.clock()
        self._free_slot = self.capacity is None or self.backend.in_flight < self.capacity
        self.backend.in_flight += 1
        self.backend.started += 1
        return self

    def chunk(self) -> None:
        if self._first is None:
            self._first = self._manager.clock()
            self.backend.ttfc.update(self._first - self._started)
            self.backend.recent_ttfc.append(self._first - self._started)

    def answered(self) -> None:
        """The whole answer arrived: a success, whatever happens after."""
        self.chunk()
        self._record(None)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.backend.in_flight -= 1
        self._record(exc)

    def _record(self, exc: BaseException | None) -> None:
        if self._recorded:
            return
        self._recorded = True
        now = self._manager.clock()
        outcome = outcome_of(exc, timed_out=exc is not None and now >= self.deadline)
        if outcome == "ok":
            self.backend.succeeded += 1
            self.backend.last_ok = now
            self.backend.latency.update(now - self._started)
            if self._free_slot:
                self.backend.service.update(now - self._started)
            self.backend.unreachable = 0
            self.backend.cuts = 0
        elif outcome == "failed":
            self.backend.failed += 1
        if outcome != "neutral":
            self.backend.health.record(now, outcome == "ok")
        if isinstance(exc, PeerUnreachable):
            self.backend.found_unreachable(now)
        if isinstance(exc, LivenessTimeout):
            self.backend.cuts += 1


@dataclass(frozen=True)
class ManagerStatistics:
    """A snapshot of the manager (`BackendManager.statistics()`)."""

    strategy: str  # the default strategy (a request may name another)
    planned: int  # requests planned
    by_strategy: Mapping[str, int]  # requests planned, per strategy used (a copy)
    backends: tuple[BackendStatistics, ...]  # by peer id
    cooling: int  # backends cooling now
    wall_offset: float = 0.0  # Unix time minus the manager's clock, when the snapshot was taken

    def to_json(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "planned": self.planned, "by_strategy": dict(self.by_strategy),
                "cooling": self.cooling,
                "backends": {b.peer_id: b.to_json(wall_offset=self.wall_offset) for b in self.backends}}


class BackendManager:
    """Live state per backend, and each request's failover order under a load-balancing strategy.

    `candidates()` is a read-only view of who could serve, this node included (the daemon's peer
    table and its own advert). `strategy` is the default (`load_balancing`); a request's own
    `strategy` wins. `rng` and `clock` are the only sources of randomness and time (tests pass a
    seeded `random.Random` and trio's clock under `autojump_clock`).
    """

    def __init__(
        self,
        candidates: Callable[[], list[Candidate]],
        *,
        strategy: str = "round_robin",
        policy: HealthPolicy | None = None,
        load_cap: float = DEFAULT_LOAD_CAP,
        ping_idle_after: float = PING_IDLE_AFTER,
        liveness_floor: float = 2.0,
        liveness_multiple: float = 4.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = trio.current_time,
        wall: Callable[[], float] = time.time,
    ) -> None:
        order(strategy, [], rng=random.Random(0))  # an unknown default strategy fails here, not per request
        self.candidates = candidates
        self.strategy = strategy
        self.policy = policy if policy is not None else HealthPolicy()
        self.load_cap = load_cap
        self.ping_idle_after = ping_idle_after
        self.liveness_floor, self.liveness_multiple = liveness_floor, liveness_multiple
        self.rng = rng if rng is not None else random.Random()
        self.clock = clock
        self.wall = wall
        self._backends: dict[str, Backend] = {}
        self._turn = 0  # round_robin's counter
        self.planned = 0
        self.by_strategy: dict[str, int] = {}

    # -- choosing ----------------------------------------------------------------------------

    def plan(self, request: ProviderRequest) -> list[Candidate]:
        """The failover order of one request: first = chosen; empty when no node can serve it."""
        task, model = request.task, request.model
        nodes = eligible(self.candidates(), task, model, request.on_peers, request.accelerator)
        name = request.strategy or self.strategy
        key = None
        if name == "cache_affinity" and len(nodes) > 1:
            try:
                key = routing_key(task, model, prompt=request.prompt, messages=request.messages,
                                  params=request.params)
            except InvalidRequest:  # parameters with no canonical form: no affinity, least loaded instead
                key = None
        views = [self.backend(c.peer_id).view(c, capacity_for(c, task, model)) for c in nodes]
        by_peer = {c.peer_id: c for c in nodes}
        chosen = order(name, views, rng=self.rng, turn=self._turn, key=key, load_cap=self.load_cap)
        self._turn += 1
        self.planned += 1
        self.by_strategy[name] = self.by_strategy.get(name, 0) + 1
        now = self.clock()
        return ranked((by_peer[v.peer_id] for v in chosen), now, lambda c: self.backend(c.peer_id).health)

    def attempt(self, peer_id: str, deadline: float, capacity: int | None = None) -> Attempt:
        """`with manager.attempt(peer, deadline) as a:` around one attempt on `peer` (`deadline` on
        the manager's clock; `capacity`: what it runs at once for this request, `capacity_for`)."""
        return Attempt(self, self.backend(peer_id), deadline, capacity)

    def backend(self, peer_id: str) -> Backend:
        backend = self._backends.get(peer_id)
        if backend is None:
            backend = self._backends[peer_id] = Backend(peer_id, self.policy)
        return backend

    def liveness(self, peer_id: str) -> float | None:
        """Seconds `peer_id` may take to send the first chunk, or the next one, before the attempt is
        abandoned (`LivenessTimeout`); None: no limit but the request's deadline.

        ``max(liveness_floor, liveness_multiple * its EWMA time to first chunk)``. A backend that has
        not sent a chunk yet is measured by the slowest time to first chunk known of any backend
        (none known: no limit, so a cluster that has measured nothing cuts nothing). Each attempt
        in a row abandoned on it doubles its timeout (at most `MAX_LIVENESS_DOUBLINGS` times; a
        success resets it), so a node that is merely slow, a first CPU generation, gets the time
        it needs after a few cuts, while a silent one keeps costing a bounded wait per request
        until it is cooled. The floor (2 s by default) keeps ordinary jitter from cutting anyone.
        """
        backend = self.backend(peer_id)
        ttfc = backend.ttfc.value
        if ttfc is None:
            known = [b.ttfc.value for b in self._backends.values() if b.ttfc.value is not None]
            if not known:
                return None
            ttfc = max(known)
        return max(self.liveness_floor, self.liveness_multiple * ttfc) * 2.0 ** min(backend.cuts,
                                                                                     MAX_LIVENESS_DOUBLINGS)

    def hedge_delay(self, peer_id: str, rule: HedgeRule) -> float | None:
        """Seconds to wait for `peer_id`'s first chunk before a second copy of the request goes to
        another backend (`mesh.hedge_after`); None: no hedge. With "p95", the 95th percentile of its
        last `HEDGE_SAMPLES` times to first chunk, once it has `HEDGE_MIN_SAMPLES` of them: about one
        request in twenty is hedged, the slow tail, at the cost of about 5% more work."""
        if rule is None or rule != "p95":
            return rule
        recent = sorted(self.backend(peer_id).recent_ttfc)
        if len(recent) < HEDGE_MIN_SAMPLES:
            return None
        return recent[min(len(recent) - 1, math.ceil(0.95 * len(recent)) - 1)]

    def penalise(self, peer_id: str) -> None:
        """`peer_id` failed us outside a request attempt (the cluster cache: bytes that fail their
        CID): a failed outcome for its health, like a failed attempt."""
        backend = self.backend(peer_id)
        backend.failed += 1
        backend.health.record(self.clock(), False)

    def disagreed(self, peer_id: str) -> None:
        """`verify=k`: `peer_id` answered with a response CID other than one that at least two other
        nodes agreed on. Counted as a failed outcome for its health (its attempt had succeeded)."""
        backend = self.backend(peer_id)
        backend.disagreed += 1
        backend.health.record(self.clock(), False)

    # -- active health -----------------------------------------------------------------------

    def pinged(self, peer_id: str, rtt_ms: float | None) -> None:
        """A ping's result (None: it failed). `PING_FAILURES_TO_COOL` failures in a row cool an idle
        peer at once; a peer that answered a request within `ping_idle_after` seconds is alive
        whatever its pings say (a loaded peer may be slow to answer a ping), so they count for nothing."""
        backend = self.backend(peer_id)
        backend.rtt_ms = rtt_ms
        if rtt_ms is not None:
            backend.ping_failures = 0
            return
        now = self.clock()
        if now - backend.last_ok < self.ping_idle_after:
            return
        backend.ping_failures += 1
        if backend.ping_failures >= PING_FAILURES_TO_COOL:
            backend.ping_failures = 0
            backend.health.trip(now)

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the state of backends not in `keep` and idle (peers that left the table)."""
        keep = set(keep)
        for peer in [p for p, b in self._backends.items() if p not in keep and b.in_flight == 0]:
            del self._backends[peer]

    # -- reading -------------------------------------------------------------------------------

    def peer_json(self, peer_id: str) -> dict[str, Any]:
        """`peers --json`'s health fields for `peer_id` (null where nothing was measured yet)."""
        backend = self._backends.get(peer_id)
        if backend is None:
            return {"health": "ok", "cooldown_until": None, "latency_ms": None, "ttfc_ms": None, "rtt_ms": None,
                    "in_flight": 0, "failure_ratio": 0.0, "cooldowns": 0, "started": 0, "succeeded": 0, "failed": 0}
        return backend.statistics(self.clock()).to_json(wall_offset=self.wall() - self.clock())

    def statistics(self) -> ManagerStatistics:
        now = self.clock()
        backends = tuple(self._backends[p].statistics(now) for p in sorted(self._backends))
        return ManagerStatistics(self.strategy, self.planned, dict(self.by_strategy), backends,
                                 sum(b.health == "cooling" for b in backends), self.wall() - now)

    def __repr__(self) -> str:
        s = self.statistics()
        return (f"<BackendManager strategy={s.strategy} backends={len(s.backends)} cooling={s.cooling} "
                f"planned={s.planned}>")
