"""hf_local through the router vs calling transformers directly, on a ~30 M-parameter model built offline."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from tests.benchmarks.run import Section

TITLE = "hf_local vs transformers directly (issue 3)"
RUNS = 20
TOKENS = 100
PROMPT = "The quick brown fox jumps over the lazy dog."


def run() -> Section:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import trio
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import node
    from node import RouterDeps
    from node.config import load_settings
    from node.models.build_tiny import build

    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp) / "m30", "30m")
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        params = sum(p.numel() for p in model.parameters())
        inputs = tok(PROMPT, return_tensors="pt")

        def direct() -> int:
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False,
                                     pad_token_id=tok.eos_token_id)
            return int(out.shape[1] - inputs["input_ids"].shape[1])

        deps = RouterDeps(settings=load_settings(env={"ACCELMESH_PROVIDERS_HF_LOCAL_MODELS": str(path)}))

        def routed() -> int:
            return node.complete(PROMPT, provider="hf_local", deps=deps, max_tokens=TOKENS,
                                 cache="no-cache").usage["completion_tokens"]

        async def streamed_once() -> tuple[float, int]:
            first = None
            chunks = 0
            t = time.perf_counter()
            async for _ in node.astream_text(PROMPT, provider="hf_local", deps=deps, max_tokens=TOKENS,
                                             cache="no-cache"):
                first = first or time.perf_counter() - t
                chunks += 1
            return first or 0.0, chunks

        direct(), routed()  # warm up: load, first-call allocations
        samples = []
        for i in range(RUNS):  # interleaved, so drift affects both alike
            for label, fn in (("direct", direct), ("router", routed)):
                t = time.perf_counter()
                n = fn()
                samples.append({"path": label, "run": i, "seconds": time.perf_counter() - t, "tokens": n})
        stream = [trio.run(streamed_once) for _ in range(5)]

    def med(label: str, key: str) -> float:
        return statistics.median(s[key] for s in samples if s["path"] == label)

    d_s, r_s = med("direct", "seconds"), med("router", "seconds")
    d_n, r_n = med("direct", "tokens"), med("router", "tokens")
    ratio = (r_s / r_n) / (d_s / d_n)
    lines = [
        f"A {params / 1e6:.1f} M-parameter GPT-2 built offline (`python -m node.models.build_tiny OUT --size 30m`),",
        f"greedy, {TOKENS} new tokens, median of {RUNS} interleaved runs each, CPU, torch threads "
        f"{torch.get_num_threads()}.",
        "",
        "| path | median time (s) | tokens | tokens/s |",
        "|---|---|---|---|",
        f"| transformers `generate()` directly | {d_s:.3f} | {d_n:.0f} | {d_n / d_s:.0f} |",
        f"| `node.complete(provider='hf_local')` | {r_s:.3f} | {r_n:.0f} | {r_n / r_s:.0f} |",
        "",
        f"Router / direct, time per token: **{ratio:.3f}** (target at most 1.05).",
        f"Streaming through `astream_text`: time to first chunk median "
        f"{statistics.median(s[0] for s in stream) * 1000:.1f} ms, {statistics.median(s[1] for s in stream):.0f} "
        "chunks per answer (5 runs).",
    ]
    samples += [{"path": "stream", "ttfc_s": s[0], "chunks": s[1]} for s in stream]
    return Section("\n".join(lines), samples, sample_count=2 * RUNS + len(stream))
