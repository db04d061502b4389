"""Adverts: time for every node to know every other (2, 4, 8, 16 daemons in one process), and traffic."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import trio

from node.config import load_settings
from node.daemon import Daemon
from tests.benchmarks.run import Section

TITLE = "Capability adverts (issue 7)"
SIZES = (2, 4, 8, 16)
ROUNDS = 3
TRAFFIC_NODES, TRAFFIC_INTERVAL, TRAFFIC_SECONDS = 4, 2.0, 20.0


async def cluster(tmp: Path, n: int, env: dict[str, str]) -> tuple[float, list[Daemon]]:
    """Start `n` daemons bootstrapped from the first; seconds from all up to all tables full."""
    daemons: list[Daemon] = []
    async with trio.open_nursery() as nursery:
        def settings(i: int, bootstrap: str = "") -> object:
            return load_settings(env={"ACCELMESH_DATA_DIR": str(tmp / f"n{i}"), "ACCELMESH_LISTEN":
                                      "/ip4/127.0.0.1/tcp/0", "ACCELMESH_BOOTSTRAP": bootstrap, **env})

        first = await nursery.start(Daemon(settings(0)).run)
        daemons.append(first)
        start = trio.current_time()
        for i in range(1, n):
            daemons.append(await nursery.start(Daemon(settings(i, first.addrs()[0])).run))
        while not all(len(d.table) == n - 1 for d in daemons):
            await trio.sleep(0.01)
        took = trio.current_time() - start
        for d in daemons:
            d.request_stop(force=True)
    return took, daemons


async def traffic(tmp: Path) -> tuple[float, float, int]:
    """(published bytes, received bytes) per node per round, and the advert size."""
    env = {"ACCELMESH_ADVERTS_INTERVAL": str(TRAFFIC_INTERVAL)}
    daemons: list[Daemon] = []
    async with trio.open_nursery() as nursery:
        for i in range(TRAFFIC_NODES):
            bootstrap = daemons[0].addrs()[0] if daemons else ""
            s = load_settings(env={"ACCELMESH_DATA_DIR": str(tmp / f"t{i}"), "ACCELMESH_LISTEN": "/ip4/127.0.0.1/tcp/0",
                                   "ACCELMESH_BOOTSTRAP": bootstrap, **env})
            daemons.append(await nursery.start(Daemon(s).run))
        while not all(len(d.table) == TRAFFIC_NODES - 1 for d in daemons):
            await trio.sleep(0.01)
        before = [(d.adverts.bytes_published, d.adverts.bytes_received) for d in daemons]
        await trio.sleep(TRAFFIC_SECONDS)
        after = [(d.adverts.bytes_published, d.adverts.bytes_received) for d in daemons]
        size = len(daemons[0].adverts.current_bytes)
        for d in daemons:
            d.request_stop(force=True)
    rounds = TRAFFIC_SECONDS / TRAFFIC_INTERVAL
    published = statistics.mean(a[0] - b[0] for a, b in zip(after, before)) / rounds
    received = statistics.mean(a[1] - b[1] for a, b in zip(after, before)) / rounds
    return published, received, size


def run() -> Section:
    rows, samples = [], []
    for n in SIZES:
        times = []
        for r in range(ROUNDS):
            with tempfile.TemporaryDirectory() as tmp:
                took, _ = trio.run(cluster, Path(tmp), n, {"ACCELMESH_ADVERTS_INTERVAL": "60"})
            times.append(took)
            samples.append({"nodes": n, "round": r, "seconds": took})
        rows.append((n, statistics.median(times), max(times)))
    with tempfile.TemporaryDirectory() as tmp:
        published, received, size = trio.run(traffic, Path(tmp))
    per_minute = 60 / 10.0  # rounds per minute at the default interval of 10 s
    samples.append({"traffic_published_per_round": published, "traffic_received_per_round": received,
                    "advert_bytes": size})
    lines = [
        "Daemons in one process (one trio loop, one core), bootstrapped in a star from the first; the periodic",
        "advert interval set to 60 s so only the join exchange and on-change gossip count. Time from the first",
        f"daemon up to every peer table holding every other node; {ROUNDS} rounds each.",
        "",
        "| daemons | median (s) | worst (s) |",
        "|---|---|---|",
        *(f"| {n} | {m:.2f} | {w:.2f} |" for n, m, w in rows),
        "",
        f"Traffic: one advert of this node is {size} bytes (echo and hf_local ready, 7 more providers listed,",
        f"one cpu). Measured with {TRAFFIC_NODES} daemons at an interval of {TRAFFIC_INTERVAL:g} s for "
        f"{TRAFFIC_SECONDS:g} s, scaled to the default interval of 10 s: each node publishes "
        f"**{published * per_minute / 1024:.1f} KiB/min** of its own adverts and takes in "
        f"**{received * per_minute / 1024:.1f} KiB/min** of the others' (gossip after de-duplication; relays and",
        "the gossipsub control messages come on top).",
    ]
    return Section("\n".join(lines), samples, sample_count=len(samples))
