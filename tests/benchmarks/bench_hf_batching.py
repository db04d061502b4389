"""hf_local with continuous batching (issue 19) against hf_local without it and against
transformers' own `generate_batch`, on the same prompts: the 28.9 M-parameter GPT-2 built
offline, on this machine's CPU (and on a GPU with a larger offline-built model, when run on one).

At each concurrency c, WAVES waves of c requests are sent at once (greedy, TOKENS tokens each,
streamed: time to first token is the first chunk's arrival). Aggregate tokens/s: completion
tokens over the wall time of the waves. `generate_batch`: one call with the same c x WAVES
prompts and the same batching configuration (its own request scheduling, no streaming).
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import aclosing
from pathlib import Path

from tests.benchmarks.run import Section, percentile, series

TITLE = "hf_local continuous batching (issue 19)"
CONCURRENCY = (1, 4, 16, 64)
TOKENS = 32
WAVES = 2
BATCH = 64  # batch_concurrency: every request of the largest wave in one batch


def _prompts(n: int, offset: int = 0) -> list[str]:
    return [f"Request {offset + i}: the quick brown fox jumps over the lazy dog" for i in range(n)]


def run() -> Section:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import trio

    from node.models.build_tiny import build
    from node.providers.base import ProviderRequest
    from node.providers.hf_batching import Batcher
    from node.providers.hf_local import HFLocalProvider

    device = "cuda" if torch.cuda.is_available() else "cpu"
    samples: list[dict] = []
    rows: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        size = "30m"
        path = build(Path(tmp) / "model", size)
        providers = {
            "unbatched": HFLocalProvider(models=(str(path),), device=device, batching="off", max_new_tokens=TOKENS),
            "batched": HFLocalProvider(models=(str(path),), device=device, batching="on", batch_concurrency=BATCH,
                                       max_new_tokens=TOKENS),
        }
        loaded = {name: p.load() for name, p in providers.items()}
        assert loaded["batched"].batcher is not None
        params = sum(p.numel() for p in loaded["batched"].model.parameters())

        async def wave(provider: HFLocalProvider, prompts: list[str]) -> tuple[list[float], int]:
            firsts: list[float] = []
            tokens = 0

            async def one(prompt: str) -> None:
                nonlocal tokens
                started = trio.current_time()
                first = None
                request = ProviderRequest("generate", prompt, None, None, params={"max_tokens": TOKENS}, timeout=600)
                async with aclosing(provider.astream(request)) as stream:
                    async for item in stream:
                        if first is None:
                            first = trio.current_time() - started
                        if not isinstance(item, str):
                            tokens += item.completion_tokens
                firsts.append((first or 0.0) * 1000)

            async with trio.open_nursery() as nursery:
                for prompt in prompts:
                    nursery.start_soon(one, prompt)
            return firsts, tokens

        async def measure(name: str, concurrency: int) -> None:
            provider = providers[name]
            await wave(provider, _prompts(min(concurrency, 4), 10_000))  # warm-up
            firsts: list[float] = []
            tokens = 0
            started = time.perf_counter()
            for w in range(WAVES):
                f, t = await wave(provider, _prompts(concurrency, w * concurrency))
                firsts += f
                tokens += t
            wall = time.perf_counter() - started
            rows[(name, concurrency)] = {"tps": tokens / wall, "p50": percentile(firsts, 0.5),
                                         "p99": percentile(firsts, 0.99), "wall": wall}
            samples.extend(series({"target": name, "concurrency": concurrency, "tokens_per_s": round(tokens / wall, 1),
                                   "device": device}, firsts))

        for concurrency in CONCURRENCY:
            for name in ("unbatched", "batched"):
                trio.run(measure, name, concurrency)
            # transformers directly: generate_batch on the same prompts, the same batching configuration
            model, tok = loaded["batched"].model, loaded["batched"].tokenizer
            from transformers import GenerationConfig

            config = GenerationConfig(do_sample=False, max_new_tokens=TOKENS, pad_token_id=tok.pad_token_id,
                                      eos_token_id=model.generation_config.eos_token_id)
            cb_config = Batcher(model, tok, concurrency=BATCH, max_batch_tokens=0, max_length=1024)._config()
            ids = [tok(p)["input_ids"] for w in range(WAVES) for p in _prompts(concurrency, w * concurrency)]
            with loaded["batched"].batcher.paused(), torch.inference_mode():
                model.generate_batch(inputs=ids[:concurrency], generation_config=config,
                                     continuous_batching_config=cb_config, progress_bar=False)  # warm-up
                started = time.perf_counter()
                out = model.generate_batch(inputs=ids, generation_config=config, continuous_batching_config=cb_config,
                                           progress_bar=False)
                wall = time.perf_counter() - started
            tokens = sum(len(o.generated_tokens) for o in out.values())
            rows[("generate_batch", concurrency)] = {"tps": tokens / wall, "p50": float("nan"), "p99": float("nan"),
                                                     "wall": wall}
            samples.append({"target": "generate_batch", "concurrency": concurrency,
                            "tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 3), "device": device})
        loaded["batched"].batcher.stop()

    lines = [
        f"GPT-2 built offline ({size}: {params / 1e6:.1f} M parameters), on **{device}**"
        f" ({torch.get_num_threads()} threads); greedy, {TOKENS} tokens per request, {WAVES} waves of c",
        "requests sent at once after a warm-up; batch_concurrency "
        f"{BATCH}. Time to first token: request to its first streamed chunk.",
        "",
        "| concurrency | unbatched tok/s | batched tok/s | generate_batch tok/s | batched / unbatched | "
        "batched time / generate_batch time | TTFT p50 unbatched / batched ms | TTFT p99 unbatched / batched ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in CONCURRENCY:
        u, b, g = rows[("unbatched", c)], rows[("batched", c)], rows[("generate_batch", c)]
        lines.append(f"| {c} | {u['tps']:.0f} | {b['tps']:.0f} | {g['tps']:.0f} | {b['tps'] / u['tps']:.2f}x | "
                     f"{b['wall'] / g['wall']:.2f} | {u['p50']:.0f} / {b['p50']:.0f} | "
                     f"{u['p99']:.0f} / {b['p99']:.0f} |")
    b16, u16, g16 = rows[("batched", 16)], rows[("unbatched", 16)], rows[("generate_batch", 16)]
    lines += [
        "",
        f"- At concurrency 16: batched {b16['tps'] / u16['tps']:.2f}x the unbatched aggregate tokens/s "
        f"(GPU target 4x); batched time {b16['wall'] / g16['wall']:.2f}x generate_batch's for the same work "
        "(GPU target <= 1.1x).",
    ]
    return Section("\n".join(lines), samples, sum(len(s.get("samples", [])) for s in samples))
