"""Router overhead per call on zero-latency echo (miss, memory hit, local-store hit), and `import node`."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import node
from node import RouterDeps
from node.cache import LocalStore, MemoryCache, TieredCache
from node.config import load_settings
from node.providers.base import ProviderRequest
from node.providers.echo import EchoProvider
from tests.benchmarks.run import Section, series, summary

TITLE = "Router core (issue 2)"
N = 5000


def timed(fn, n: int) -> list[float]:
    samples = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - t) * 1e6)
    return samples


def run() -> Section:
    settings = load_settings(env={})
    echo = EchoProvider()

    # The provider alone: the floor every router path sits on.
    direct = timed(lambda i: echo.complete_sync(ProviderRequest("generate", f"prompt {i}", None, None)), N)

    deps = RouterDeps(settings=settings)
    miss = timed(lambda i: node.complete(f"miss {i}", provider="echo", deps=deps), N)
    node.complete("hit", provider="echo", deps=deps)
    hit = timed(lambda i: node.complete("hit", provider="echo", deps=deps), N)

    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "bench.sqlite")
        local_deps = RouterDeps(response_cache=TieredCache(MemoryCache(max_entries=1, ttl=0), store),
                                settings=settings)
        for p in ("a", "b"):
            node.complete(p, provider="echo", deps=local_deps)
        # Alternating two prompts through a one-entry memory tier: every lookup is a local-store hit.
        local = timed(lambda i: node.complete("ab"[i % 2], provider="echo", deps=local_deps), N)
        tiers = local_deps.statistics().cache
        assert tiers["local"] >= N, tiers
        store.close()

    imports = []
    for _ in range(20):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import node"], check=True)
        with_node = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        imports.append((with_node - (time.perf_counter() - t)) * 1000)

    rows = [
        ("echo provider alone (floor)", summary(direct)),
        ("router, miss (key + lookup + echo + store)", summary(miss)),
        ("router, memory hit", summary(hit)),
        ("router, local-store hit (sqlite, verify on read)", summary(local)),
    ]
    floor = summary(direct)["median"]
    lines = [
        f"Synchronous `node.complete()` on the zero-latency `echo` provider, {N} calls per path,",
        "one thread. Overhead = router median minus the provider-alone median.",
        "",
        "| path | median (us) | p99 (us) | overhead vs provider (us) |",
        "|---|---|---|---|",
    ]
    for label, s in rows:
        lines.append(f"| {label} | {s['median']:.1f} | {s['p99']:.1f} | {s['median'] - floor:+.1f} |")
    imp = summary(imports)
    lines += ["", f"`import node` in a fresh interpreter: median {imp['median']:.1f} ms over {len(imports)} runs "
              f"(p99 {imp['p99']:.1f} ms; interpreter start subtracted)."]
    samples = [sample for label, vals in (("direct", direct), ("miss", miss), ("memory_hit", hit), ("local_hit", local))
               for sample in series({"path": label}, vals, unit="us")]
    samples += [{"path": "import_node", "ms": v} for v in imports]
    return Section("\n".join(lines), samples, sample_count=4 * N + len(imports))
