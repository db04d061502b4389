"""A daemon's Prometheus metrics (docs/operations.md, "Metrics and health", tables every name).

    front door ── record(Served) ──► requests_total, request_duration, time_to_first_token, tokens
    scrape ────── _NodeView.collect ─► everything else, read at that moment from the node's
                                        read-only view (the control commands' ControlContext)

Each daemon has its own registry (tests run several daemons in one process). Labels stay
bounded: entry points, provider names, peer ids (the cluster's size), outcomes, cache tiers.
`prometheus_client` is imported only when a daemon serves HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from node.errors import Busy, CacheMiss, DeadlineExceeded, Disagreement, InvalidRequest, ModelNotFound

if TYPE_CHECKING:
    from node.control import ControlContext

__all__ = ["CONTENT_TYPE", "Metrics", "Served", "outcome_of"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: from a cache hit in memory (sub-millisecond) to a long generation.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
NONE = "none"  # the label value where there is no provider or peer (a request refused before one was chosen)
OTHER = "other"  # a provider not registered here, or a peer not in the table: labels stay bounded


@dataclass(frozen=True)
class Served:
    """One request the front door finished, as the metrics count it."""

    entry: str
    outcome: str  # outcome_of()
    provider: str | None
    peer: str | None
    seconds: float
    first_seconds: float | None  # to the first text chunk (or the answer when none came first)
    tokens: int  # completion tokens of the answer


_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (Busy, "busy"), (DeadlineExceeded, "deadline"), (InvalidRequest, "invalid"), (ModelNotFound, "not_found"),
    (CacheMiss, "cache_miss"), (Disagreement, "disagreement"),
)


def outcome_of(exc: BaseException | None) -> str:
    """`ok`, or the outcome label of the exception that ended a request."""
    if exc is None:
        return "ok"
    for kind, label in _OUTCOMES:
        if isinstance(exc, kind):
            return label
    if not isinstance(exc, Exception):  # trio.Cancelled, GeneratorExit: the caller went away
        return "cancelled"
    from node.mesh.errors import ClusterBusy

    return "busy" if isinstance(exc, ClusterBusy) else "failed"


class Metrics:
    """The registry of one daemon; `record` is what the front door calls for each request."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("accelmesh_requests", "requests this node's front door answered",
                                ["entry", "provider", "peer", "outcome"], registry=self.registry)
        self.duration = Histogram("accelmesh_request_duration_seconds", "front door to the answer's end (ok requests)",
                                  ["entry", "provider"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("accelmesh_time_to_first_token_seconds",
                                     "front door to the first text chunk (the answer, asked whole)",
                                     ["entry", "provider"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("accelmesh_tokens_generated", "completion tokens in the answers' usage",
                              ["provider"], registry=self.registry)
        self._self_id: str | None = None
        self._known: Callable[[str], bool] = lambda peer: False
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}  # (metric, label values) -> its child

    def watch(self, view: ControlContext, *, ready: Callable[[], tuple[bool, str]],
              known: Callable[[str], bool] = lambda peer: False,
              traffic: Callable[[], dict[tuple[str, str], int]] = dict) -> None:
        """Read the node's other metrics from `view` (and `ready`, `traffic`) at each scrape; label
        only this node and the peers `known` says are in its table by their ids."""
        self._self_id, self._known = view.peer_id, known
        self.registry.register(_NodeView(view, ready, traffic))

    def _labels(self, served: Served) -> tuple[str, str]:
        """(provider, peer) as labels, bounded: a name another node sent that is not a provider
        registered here, or a peer id not in the table, is `other` (a lying peer cannot grow the
        series)."""
        from node.providers import registry

        provider = served.provider or NONE
        if provider != NONE and not registry.is_registered(provider):
            provider = OTHER
        peer = served.peer or NONE
        if peer not in (NONE, self._self_id) and not self._known(peer):
            peer = OTHER
        return provider, peer

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, kept: the label sets are few (bounded by `_labels`), and
        looking one up again costs more than the increment."""
        child = self._children.get((metric, labels))
        if child is None:
            child = self._children[(metric, labels)] = metric.labels(*labels)
        return child

    def record(self, served: Served) -> None:
        provider, peer = self._labels(served)
        self._child(self.requests, served.entry, provider, peer, served.outcome).inc()
        if served.outcome == "ok":
            self._child(self.duration, served.entry, provider).observe(served.seconds)
            if served.first_seconds is not None:
                self._child(self.first_token, served.entry, provider).observe(served.first_seconds)
            if served.tokens:
                self._child(self.tokens, provider).inc(served.tokens)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)  # type: ignore[no-any-return]


class _NodeView:
    """The metrics read at scrape time from the node's read-only view."""

    def __init__(self, view: ControlContext, ready: Callable[[], tuple[bool, str]],
                 traffic: Callable[[], dict[tuple[str, str], int]]) -> None:
        self.view, self.ready, self.traffic = view, ready, traffic

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        view = self.view
        router, admission = view.router(), view.admission()
        tiers = CounterMetricFamily("accelmesh_cache_lookups", "how requests were answered, by cache tier",
                                    labels=["tier"])
        for tier, count in sorted(router.cache.items()):
            tiers.add_metric([tier], count)
        yield tiers
        yield CounterMetricFamily("accelmesh_inferences", "provider runs on this node", value=router.inferences)
        yield GaugeMetricFamily("accelmesh_requests_in_flight", "admitted requests running",
                                value=admission.in_flight)
        yield GaugeMetricFamily("accelmesh_requests_queued", "requests waiting for a slot", value=admission.queued)
        limits = GaugeMetricFamily("accelmesh_admission_limit", "admission limits", labels=["kind"])
        limits.add_metric(["running"], admission.max_concurrent)
        limits.add_metric(["queued"], admission.max_queue)
        yield limits
        entries = view.peer_entries()
        health = [view.peer_health(entry.advert.peer_id).get("health") for entry in entries]
        peers = GaugeMetricFamily("accelmesh_peers", "peers in the table", labels=["state"])
        peers.add_metric(["known"], len(entries))
        peers.add_metric(["healthy"], sum(h != "cooling" for h in health))
        peers.add_metric(["cooling"], sum(h == "cooling" for h in health))
        yield peers
        traffic = CounterMetricFamily("accelmesh_stream_bytes", "bytes on this node's streams, by protocol",
                                      labels=["protocol", "direction"])
        for (protocol, direction), count in sorted(self.traffic().items()):
            traffic.add_metric([protocol, direction], count)
        yield traffic
        cluster = view.cluster() or {}
        yield GaugeMetricFamily("accelmesh_dht_records", "cache records this node's DHT store holds",
                                value=(cluster.get("dht") or {}).get("records", 0))
        yield CounterMetricFamily("accelmesh_dht_records_published", "cache records this node published",
                                  value=cluster.get("published", 0))
        yield GaugeMetricFamily("accelmesh_ready", "1 when /readyz answers 200", value=1 if self.ready()[0] else 0)
        build = GaugeMetricFamily("accelmesh_build_info", "this node", labels=["version", "peer_id"])
        build.add_metric([view.version, view.peer_id], 1)
        yield build
