"""Cluster cache: what a cluster hit two hops away, a local hit and a miss's lookup cost through
daemons; and `ClusterDHT.get_record` on lines of 2 to 32 hosts against the library's `KadDHT.get_value`.

    python -m tests.benchmarks.run cluster                                  # 50 samples per figure: about 1.5 min
    ACCELMESH_BENCH_CLUSTER_N=10 python -m tests.benchmarks.run cluster     # a smoke run

Everything runs in this process, on one trio loop (one core): the daemons (`running_daemon`, real
libp2p hosts on loopback, sqlite stores), the clients that ask them, and the DHT hosts. A server-side
time therefore includes the work of the peers it waits for, as on a machine running them all.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import trio
from libp2p.kad_dht.common import format_time_rfc3339
from libp2p.records.record import make_signed_put_record

from node.cache.cluster import LOOKUP_BUDGET, RECORD_TTL
from node.client import PeerClient
from node.mesh.dht import MAX_ASKS, ClusterDHT
from node.mesh.host import HostConfig, make_host, peer_info, run_host
from protocols.cid import cid_of
from protocols.inference.messages import Request
from protocols.inference.messages import Result as WireResult
from protocols.records import (
    CacheRecord,
    Identity,
    cache_dht_key,
    encode_cache_record,
    sign_cache_record,
)
from tests.benchmarks.run import Section, percentile, series
from tests.mesh.conftest import running_daemon

TITLE = "Cluster cache (issue 16)"
N = 50  # samples per figure
WARMUP = 5  # rounds before the first measured one: every stream and connection a sample uses is open
DHT_SIZES = (2, 4, 8, 16, 32)
STOCK_SIZES = (2, 8)  # KadDHT.get_value beside ours
STOCK_TIMEOUT = 10.0  # seconds one stock get_value may take (the library's own query timeout is 10 s)
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
SEED = 16
TARGET_HIT_P50_MS = 15.0  # a cluster hit two hops away, p50 (issue 16)


def _n() -> int:
    return int(os.environ.get("ACCELMESH_BENCH_CLUSTER_N", str(N)))


def p50(values: list[float]) -> float:
    return percentile(values, 0.5)


def p99(values: list[float]) -> float:
    return percentile(values, 0.99)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> float:
    started = trio.current_time()
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
        return trio.current_time() - started
    raise RuntimeError(f"the cluster benchmark waited {timeout:g} s for: {what}")


def hold(dht: ClusterDHT, record: CacheRecord) -> None:
    """Put `record` into one node's DHT store only, as `ClusterDHT.put_record` stores it locally
    (signed put record, not marked for the library's republishing), sending it nowhere."""
    key = cache_dht_key(record.key).encode()
    signed = make_signed_put_record(key, encode_cache_record(record), dht.host.get_private_key())
    signed.timeReceived = format_time_rfc3339()
    dht.kad.value_store.put_record(key, signed)


def fresh_record(identity: Identity, key: str, cid: str) -> CacheRecord:
    now = int(time.time() * 1000)
    return sign_cache_record(identity, key=key, cid=cid, created=now, expires=now + int(RECORD_TTL * 1000), seq=now)


# -- 1. through daemons --------------------------------------------------------------------


@dataclass
class Daemons:
    """Server-side totals (`Result.timings["total_ms"]`) per figure, and client round trips."""

    server: dict[str, list[float]] = field(default_factory=dict)
    client: dict[str, list[float]] = field(default_factory=dict)
    tiers: dict[str, set[str]] = field(default_factory=dict)  # the cache tier each figure's answers came from
    wrong: dict[str, int] = field(default_factory=dict)  # samples not answered from the expected tier (not counted)
    miss_pairs: list[float] = field(default_factory=list)  # n3 miss - solo miss, the two asked back to back
    parts: dict[str, list[float]] = field(default_factory=dict)  # a cluster hit's steps, called directly at n3
    settle_s: float = 0.0  # daemons up to routing tables filled
    cluster_stats: dict[str, Any] = field(default_factory=dict)  # n3's cluster tier and DHT, afterwards

    def add(self, what: str, result: WireResult, client_ms: float, expected: tuple[str, ...]) -> float | None:
        if result.cache not in expected:
            self.wrong[what] = self.wrong.get(what, 0) + 1
            return None
        total = float(result.timings["total_ms"])
        self.server.setdefault(what, []).append(total)
        self.client.setdefault(what, []).append(client_ms)
        self.tiers.setdefault(what, set()).add(result.cache)
        return total


async def ask(client: PeerClient, prompt: str, cache: str = "default") -> tuple[WireResult, float]:
    """`prompt` answered by the daemon's own echo; the Result and the client's round trip (ms)."""
    request = Request(id=uuid.uuid4().hex, task="generate", prompt=prompt, provider="echo", timeout_ms=20_000,
                      cache=cache)
    started = time.perf_counter()
    async with aclosing(client.generate(request)) as items:
        result = [item async for item in items][-1]
    took = (time.perf_counter() - started) * 1000
    assert isinstance(result, WireResult) and result.verify()["text"] == f"echo: {prompt}"
    return result, took


async def through_daemons(samples: int) -> Daemons:
    """n1 - n2 - n3 (each bootstrapped to the one before), and `solo` with the cluster off, alone."""
    out = Daemons()
    tag = uuid.uuid4().hex[:8]  # every prompt unique: every sample a fresh request key
    async with AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-cluster-")))
        started = trio.current_time()
        n1 = await stack.enter_async_context(running_daemon(tmp, "n1"))
        n2 = await stack.enter_async_context(running_daemon(tmp, "n2", ACCELMESH_BOOTSTRAP=n1.addrs()[0]))
        n3 = await stack.enter_async_context(running_daemon(tmp, "n3", ACCELMESH_BOOTSTRAP=n2.addrs()[0]))
        # Alone: a node with the cluster off that joined the others would be put into their DHT
        # routing tables by its adverts, and their lookups would ask it.
        solo = await stack.enter_async_context(running_daemon(tmp, "solo", ACCELMESH_CACHE_CLUSTER="off"))
        assert solo.cluster is None and all(d.cluster is not None for d in (n1, n2, n3))
        line = (n1, n2, n3)
        await until(lambda: all(d.dht.statistics().routing_peers == 2 for d in line), "routing tables filled")
        out.settle_s = trio.current_time() - started
        at1 = await stack.enter_async_context(PeerClient.connect(n1.addrs()[0]))
        at3 = await stack.enter_async_context(PeerClient.connect(n3.addrs()[0]))
        at_solo = await stack.enter_async_context(PeerClient.connect(solo.addrs()[0]))

        async def one_round(i: int, keep: bool) -> None:
            # The floor: computed at n3 (private: kept here, not published), then asked again.
            prompt = f"local {tag} {i}"
            await ask(at3, prompt, cache="private")
            result, took = await ask(at3, prompt)
            if keep:
                out.add("local_hit", result, took, ("memory", "local"))

            # A cluster hit two hops away: computed at n1 (private: its bytes in n1's store only), its
            # signed record put into n1's DHT store only; n2 and n3 hold neither.
            prompt = f"cluster {tag} {i}"
            computed, _ = await ask(at1, prompt, cache="private")
            hold(n1.dht, fresh_record(n1.identity, computed.key, computed.cid))
            key = cache_dht_key(computed.key).encode()
            assert n2.dht.kad.value_store.get(key) is None and n3.dht.kad.value_store.get(key) is None
            result, took = await ask(at3, prompt)
            if keep and out.add("cluster_hit", result, took, ("cluster",)) is not None:
                assert result.served_from == n1.peer_id and result.cid == computed.cid
            result, took = await ask(at3, prompt)
            if keep:
                out.add("local_after_cluster", result, took, ("memory", "local"))

            # The same two steps called directly at n3, no router: the record from the DHT, the bytes
            # from n1 (a stream per fetch); what the router adds is the rest (stores, announce, reply).
            prompt = f"parts {tag} {i}"
            computed, _ = await ask(at1, prompt, cache="private")
            hold(n1.dht, fresh_record(n1.identity, computed.key, computed.cid))
            t = time.perf_counter()
            record = await n3.dht.get_record(computed.key)
            t_get = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            data = await n3.exchange.fetch(n1.peer_id, computed.cid)
            t_fetch = (time.perf_counter() - t) * 1000
            assert record is not None and record.cid == computed.cid and data == computed.response
            if keep:
                out.parts.setdefault("get_record", []).append(t_get)
                out.parts.setdefault("fetch", []).append(t_fetch)

            # A miss: a fresh prompt at n3 (cluster on) and at solo (cluster off), back to back, the
            # order alternating. Private: no record is published, so no puts and announcements run
            # on this loop behind the samples (publishing is off the request path in any mode).
            totals = {}
            for name, client in ((("n3", at3), ("solo", at_solo))[:: 1 if i % 2 else -1]):
                result, took = await ask(client, f"miss {tag} {i} {name}", cache="private")
                if keep:
                    totals[name] = out.add(f"miss_{name}", result, took, ("miss",))
            if keep and None not in totals.values():
                out.miss_pairs.append(totals["n3"] - totals["solo"])

        for i in range(WARMUP):
            await one_round(-1 - i, keep=False)
        gc.collect()
        for i in range(samples):
            await one_round(i, keep=True)
        out.cluster_stats = {"n3": n3.cluster.statistics().to_json(), "n3_dht": n3.dht.statistics().to_json(),
                             "n1_exchange": n1.exchange.statistics().to_json()}
    return out


# -- 2. the DHT alone ----------------------------------------------------------------------


@dataclass
class Lookups:
    size: int
    topology: str  # "line" (neighbours only in each table) or "full" (every node in every table)
    api: str  # "get_record" or "KadDHT.get_value"
    ms: list[float] = field(default_factory=list)  # found ones only
    not_found: int = 0
    asks: float = 0.0  # requests per lookup (get_record only)


@asynccontextmanager
async def dht_line(n: int) -> AsyncIterator[list[ClusterDHT]]:
    """n ClusterDHT nodes on plain hosts in a line, each connected to its neighbours, each routing
    table holding its neighbours only (tests/mesh/test_dht.py's `line`)."""
    hosts = [make_host(HostConfig(identity=Identity.generate(), listen=(LOOPBACK,))) for _ in range(n)]
    async with AsyncExitStack() as stack:
        for host in hosts:
            await stack.enter_async_context(run_host(host, [LOOPBACK]))
        nursery = await stack.enter_async_context(trio.open_nursery())
        nodes = [ClusterDHT(host, is_member=lambda peer: True) for host in hosts]
        try:
            with trio.fail_after(60):
                for node in nodes:
                    await nursery.start(node.run)
                for left, right in pairwise(hosts):
                    await right.connect(peer_info(str(left.get_addrs()[0])))
                for left, right in pairwise(nodes):
                    await left.add_member(str(right.host.get_id()))
                    await right.add_member(str(left.host.get_id()))
            yield nodes
        finally:
            nursery.cancel_scope.cancel()


async def fill_tables(nodes: list[ClusterDHT]) -> None:
    """Every node in every routing table, with its address (what a daemon does from adverts); the
    connections stay the line's, a lookup dials the members it asks."""
    addrs = {str(n.host.get_id()): [str(n.host.get_addrs()[0])] for n in nodes}
    with trio.fail_after(60):
        for node in nodes:
            for peer, peer_addrs in addrs.items():
                await node.add_member(peer, peer_addrs)


async def time_lookups(nodes: list[ClusterDHT], asker: ClusterDHT, holder: Callable[[int], ClusterDHT],
                       samples: int, api: str, publisher: Identity, topology: str) -> Lookups:
    """`samples` lookups by `asker`, each of a fresh record held only by `holder(i)`, after WARMUP
    unmeasured ones (connections and lookup streams open)."""
    out = Lookups(len(nodes), topology, api)
    asks_before = 0
    gc.collect()  # the garbage of the phase before (the daemons, a smaller line) is collected before, not during
    for i in range(-WARMUP, samples):
        if i == 0:
            asks_before = asker.asks
        request_key = cid_of(f"dht {uuid.uuid4().hex}".encode())
        record = fresh_record(publisher, request_key, cid_of(f"answer {request_key}".encode()))
        hold(holder(i), record)
        started = time.perf_counter()
        if api == "get_record":
            found = await asker.get_record(request_key) == record
        else:
            value = None
            with trio.move_on_after(STOCK_TIMEOUT):
                value = await asker.kad.get_value(cache_dht_key(request_key))
            found = value == encode_cache_record(record)
        took = (time.perf_counter() - started) * 1000
        if i < 0:
            continue
        if found:
            out.ms.append(took)
        else:
            out.not_found += 1
    out.asks = (asker.asks - asks_before) / samples
    return out


async def dht_alone(samples: int) -> list[Lookups]:
    publisher = Identity.generate()
    rng = random.Random(SEED)
    results: list[Lookups] = []
    for size in DHT_SIZES:
        started = time.perf_counter()
        async with dht_line(size) as nodes:
            far, asker = nodes[0], nodes[-1]
            results.append(await time_lookups(nodes, asker, lambda i, far=far: far, samples, "get_record", publisher, "line"))
            if size in STOCK_SIZES:  # after ours: the asker knows every node's address by now
                results.append(await time_lookups(nodes, asker, lambda i, far=far: far, samples, "KadDHT.get_value",
                                                  publisher, "line"))
            await fill_tables(nodes)
            others = nodes[:-1]
            results.append(await time_lookups(nodes, asker, lambda i, others=others: rng.choice(others), samples, "get_record",
                                              publisher, "full"))
        print(f"  dht, {size} nodes: {time.perf_counter() - started:.1f} s", flush=True)
    return results


# -- the report ----------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "**pass**" if ok else "**FAIL**"


def fmt(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:,.2f}"


def daemon_table(d: Daemons) -> list[str]:
    rows = (("local_hit", "local hit at n3: computed at n3, asked again (the floor)"),
            ("cluster_hit", "cluster hit two hops away: record and bytes at n1 only, first ask at n3"),
            ("local_after_cluster", "the same key asked at n3 again (bytes now local)"),
            ("miss_n3", "miss at n3, cluster on (a fresh prompt, echo 0 ms)"),
            ("miss_solo", "miss at solo, cluster off (the same, no lookup)"))
    floor = p50(d.server.get("local_hit", []))
    lines = ["| figure | n | tier | server p50 (ms) | server p99 (ms) | p50 over floor (ms) | client p50 (ms) |",
             "|---|---|---|---|---|---|---|"]
    for what, label in rows:
        s, c = d.server.get(what, []), d.client.get(what, [])
        lines.append(f"| {label} | {len(s)} | {'/'.join(sorted(d.tiers.get(what, ())))} | {fmt(p50(s))} | "
                     f"{fmt(p99(s))} | {'' if what == 'local_hit' else f'{p50(s) - floor:+,.2f}'} | {fmt(p50(c))} |")
    return lines


def dht_table(results: list[Lookups]) -> list[str]:
    lines = ["| nodes | holder | API | found | p50 (ms) | p99 (ms) | requests per lookup |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        holder = "far end of the line (neighbours-only tables)" if r.topology == "line" else \
            "a random node (every node in every table)"
        asks = f"{r.asks:.1f}" if r.api == "get_record" else ""
        lines.append(f"| {r.size} | {holder} | `{r.api}` | {len(r.ms)}/{len(r.ms) + r.not_found} | {fmt(p50(r.ms))} | "
                     f"{fmt(p99(r.ms))} | {asks} |")
    return lines


def run() -> Section:
    samples = _n()
    t0 = time.perf_counter()
    # As a daemon does (node.logs): py-libp2p logs a multi-line ERROR for every stream a peer refuses
    # (here the daemons' gossipsub asking the client peers, which do not speak it).
    noisy = logging.getLogger("libp2p.host.basic_host")
    level = noisy.level
    noisy.setLevel(logging.CRITICAL)
    try:
        d = trio.run(through_daemons, samples)
    finally:
        noisy.setLevel(level)
    t1 = time.perf_counter()
    print(f"  through daemons: {t1 - t0:.1f} s", flush=True)
    dht = trio.run(dht_alone, samples)
    print(f"  dht alone: {time.perf_counter() - t1:.1f} s", flush=True)

    hit, floor = d.server.get("cluster_hit", []), d.server.get("local_hit", [])
    miss_on, miss_off = d.server.get("miss_n3", []), d.server.get("miss_solo", [])
    budget_ms = LOOKUP_BUDGET * 1000
    cost_p50, cost_p99 = p50(miss_on) - p50(miss_off), p99(miss_on) - p99(miss_off)
    worst = max(miss_on) - p50(miss_off) if miss_on and miss_off else float("nan")
    wrong = ", ".join(f"{k} {v}" for k, v in d.wrong.items()) or "none"
    stats = d.cluster_stats["n3"]
    dht3 = d.cluster_stats["n3_dht"]
    lines = [
        "Three daemons in this process (`running_daemon`, one trio loop, one core), a line n1 - n2 - n3, each",
        "bootstrapped to the one before, every DHT routing table holding the other two (filled from adverts",
        f"{d.settle_s:.1f} s after the first daemon started), and `solo` with `cache.cluster = off`, connected to",
        "nobody. One client peer per daemon (`PeerClient`, keep-alive streams) asks for the daemon's own `echo`",
        f"(0 ms); every sample a fresh prompt, so a fresh request key. {WARMUP} unmeasured rounds first (every",
        f"connection and stream warm), then {samples} rounds, each taking one sample of every figure in turn.",
        "Server p50/p99: the Result's `timings[\"total_ms\"]` (the serving daemon's router, from the request to",
        "the answer: lookups, fetch, inference, store); client: the round trip at the client, for reference.",
        "\"Held only by n1\": n1 computes the answer with `cache='private'` (its store only, nothing published),",
        "then its own signed record is put into n1's DHT value store alone; n2 and n3 hold neither record nor",
        "bytes. Misses use `cache='private'` on both nodes: looked up, not published, so no puts or",
        "announcements run on the loop behind later samples. \"Two hops\" is the bootstrap line: n3's routing table",
        "holds n1 and n2, so its lookup asks both at once (one round), and it fetches the bytes from n1 on a",
        f"connection of its own (dialed in the warm-up). p99 of {samples} samples is close to the slowest one.",
        "",
        *daemon_table(d),
        "",
        f"Lookup cost of a miss (n3 minus solo): p50 **{cost_p50:+.2f} ms**, p99 **{cost_p99:+.2f} ms**; paired",
        f"(each n3 miss minus the solo miss asked next to it) p50 {p50(d.miss_pairs):+.2f} ms, p99",
        (f"{p99(d.miss_pairs):+.2f} ms; the slowest n3 miss over solo's p50: {worst:+.2f} ms (budget"
        f" {budget_ms:g} ms)."),
        (f"The cluster hit's two network steps called directly at n3 (no router), each on a fresh record held at"
        f" n1: `n3.dht.get_record` p50 {p50(d.parts.get('get_record', [])):.2f} ms (p99"
        f" {p99(d.parts.get('get_record', [])):.2f}), `n3.exchange.fetch(n1, cid)` p50"
        f" {p50(d.parts.get('fetch', [])):.2f} ms (p99 {p99(d.parts.get('fetch', [])):.2f})."),
        (f"Answers from another tier than expected (left out): {wrong}. n3's cluster tier afterwards: "
        f"{stats['lookups']} lookups, {stats['hits']} hits, {stats['misses']} misses, "
        f"{stats['fetch_failures']} fetch failures; its DHT: {dht3['asks']} requests sent, "
        f"{dht3['streams_opened']} streams opened."),
        "",
        "Targets:",
        "",
        (f"- cluster hit two hops away, server p50 under {TARGET_HIT_P50_MS:g} ms ({p50(hit):.2f} ms; the floor"
        f" {p50(floor):.2f} ms): {verdict(p50(hit) < TARGET_HIT_P50_MS)}"),
        (f"- a miss pays at most its budget: lookup cost p50 and p99 under {budget_ms:g} ms ({cost_p50:.2f},"
        f" {cost_p99:.2f} ms) and no n3 miss over solo's p50 by more ({worst:.2f} ms): "
        f"{verdict(max(cost_p50, cost_p99, worst) <= budget_ms)}"),
        "",
        "`ClusterDHT.get_record` alone: n plain hosts (Noise, Yamux) with a `ClusterDHT` each, in this process,",
        "in a line, each connected to its neighbours. First each routing table holds its neighbours only and the",
        "record is held only by the node at the far end (n - 1 hops, each answer naming the next node); then",
        "every node is put into every table (with its address, as a daemon does from adverts; connections are",
        "dialed by the lookup) and the record is held by a random other node. The last node asks; a fresh",
        f"record per lookup, {WARMUP} unmeasured lookups first; p50/p99 over the lookups that found it.",
        "`KadDHT.get_value` is the library's lookup on the same line, after ours (the asker's peerstore then",
        (f"knows every node's address), each call bounded at {STOCK_TIMEOUT:g} s. A walk sends at most MAX_ASKS ="
        f" {MAX_ASKS} requests."),
        "",
        *dht_table(dht),
    ]
    short = [r for r in dht if r.api == "get_record" and r.not_found]
    if short:
        lines += ["", "Not found: " + "; ".join(
            f"{r.not_found} of {len(r.ms) + r.not_found} at {r.size} nodes ({r.topology})" for r in short)
            + f". A walk stops after MAX_ASKS = {MAX_ASKS} requests: the far end of a line of n nodes is n - 1"
            " requests away, and with every node in every table a record held by one node only is found when"
            " that node is among the 20 closest to the key (`put_record` stores it at those 20)."]
    if samples < N:
        lines += ["", f"_A smoke run: {samples} samples per figure, under {N}._"]
    samples_out: list[dict[str, Any]] = []
    for what, values in d.server.items():
        samples_out += series({"part": "daemons", "figure": what, "measure": "server_total_ms"}, values)
    for what, values in d.client.items():
        samples_out += series({"part": "daemons", "figure": what, "measure": "client_round_trip_ms"}, values)
    for what, values in d.parts.items():
        samples_out += series({"part": "daemons", "figure": f"direct_{what}", "measure": "ms"}, values)
    samples_out += series({"part": "daemons", "figure": "miss_n3_minus_solo", "measure": "paired_server_ms"},
                          d.miss_pairs)
    samples_out.append({"part": "daemons", "settle_s": round(d.settle_s, 3), "wrong_tier": d.wrong,
                        **{k: v for k, v in d.cluster_stats.items()}})
    for r in dht:
        samples_out += series({"part": "dht", "nodes": r.size, "topology": r.topology, "api": r.api,
                               "not_found": r.not_found, "asks_per_lookup": round(r.asks, 2)}, r.ms)
    count = sum(len(v) for v in d.server.values()) + sum(len(r.ms) + r.not_found for r in dht)
    return Section("\n".join(lines), samples_out, sample_count=count)
