"""hf_local on the embedded tiny model: real transformers on the CPU, no network."""

import hashlib
import json
import shutil
import threading
import time

import pytest
import trio

import node
from node import RouterDeps
from node.config import load_settings
from node.errors import DeadlineExceeded, ModelNotFound, ProviderTimeout
from node.providers.base import ProviderRequest
from node.providers.hf_local import EMBEDDED_MODEL, HFLocalProvider, resolve_model_dir


@pytest.fixture(scope="module")
def provider():
    return HFLocalProvider(max_new_tokens=16)


def req(prompt="Hello there", **params):
    return ProviderRequest("generate", prompt, None, None, params=params, timeout=60)


def test_embedded_model_is_the_default_and_says_it_is_not_meaningful(provider):
    readiness = provider.available()
    assert readiness.ok and "not meaningful" in readiness.reason
    assert provider.models() == (EMBEDDED_MODEL,) and provider.default_model() == EMBEDDED_MODEL


def test_greedy_by_default_so_answers_repeat(provider):
    a, b = provider.complete_sync(req()), provider.complete_sync(req())
    assert a.text == b.text and a.model == EMBEDDED_MODEL


def test_max_tokens_and_usage_counts(provider):
    completion = provider.complete_sync(req(max_tokens=7))
    assert completion.completion_tokens <= 7 and completion.prompt_tokens > 0
    if completion.completion_tokens == 7:
        assert completion.finish_reason == "length"


def test_stop_string_ends_the_answer_before_it(provider):
    full = provider.complete_sync(req(max_tokens=16)).text
    assert len(full) >= 4, full
    stop = full[2:4]
    cut = provider.complete_sync(req(max_tokens=16, stop=[stop]))
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"


def test_sampling_with_a_seed_is_reproducible(provider):
    a = provider.complete_sync(req(temperature=1.5, seed=11, max_tokens=12))
    b = provider.complete_sync(req(temperature=1.5, seed=11, max_tokens=12))
    assert a.text == b.text


def test_chat_uses_the_tokenizer_chat_template(provider):
    loaded = provider.load()
    messages = ({"role": "user", "content": "hi"},)
    ids = provider._inputs(loaded, ProviderRequest("chat", None, messages, None))
    assert loaded.tokenizer.decode(ids["input_ids"][0]) == "<|user|>hi\n<|assistant|>"


def test_chat_without_a_template_is_a_plain_join(tmp_path):
    plain = tmp_path / "no-template"
    shutil.copytree(resolve_model_dir(EMBEDDED_MODEL), plain)
    (plain / "chat_template.jinja").unlink()
    p = HFLocalProvider(models=(str(plain),))
    loaded = p.load()
    messages = ({"role": "system", "content": "s"}, {"role": "user", "content": "hi"})
    ids = p._inputs(loaded, ProviderRequest("chat", None, messages, None))
    assert loaded.tokenizer.decode(ids["input_ids"][0]) == "system: s\nuser: hi\nassistant:"


def test_model_is_loaded_once_per_model_and_device(provider):
    first = provider.load()
    assert provider.load() is first and list(provider._loaded) == [(EMBEDDED_MODEL, "cpu")]


def test_request_key_covers_a_digest_of_the_weights(tmp_path):
    same = tmp_path / "same"
    shutil.copytree(resolve_model_dir(EMBEDDED_MODEL), same)
    changed = tmp_path / "changed"
    shutil.copytree(same, changed)
    weights = changed / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    a, b = HFLocalProvider(models=(str(same),)), HFLocalProvider(models=(str(changed),))
    ida, idb = a.model_identity(None), b.model_identity(None)
    assert ida.split("@")[1] != idb.split("@")[1]
    assert HFLocalProvider().model_identity(None).split("@")[1] == ida.split("@")[1], "same bytes, same digest"


def test_an_identity_is_advertised_once_the_model_is_loaded_and_building_an_advert_reads_no_weights():
    p = HFLocalProvider(max_new_tokens=4)
    assert p.advertised_identity(None) is None and p.advertised_identity(EMBEDDED_MODEL) is None
    assert p._identities == {} and p._loaded == {}, "asking loaded nothing and digested nothing"
    p.load()
    assert p.advertised_identity(EMBEDDED_MODEL) == p.advertised_identity(None) == p.model_identity(None)
    missing = HFLocalProvider(models=("/nonexistent/model",))
    assert missing.model_identity(None).endswith("@sha256:unavailable")
    assert missing.advertised_identity(None) is None, "weights that are not there identify no model"


def test_a_model_that_is_not_available_locally_is_not_ready():
    readiness = HFLocalProvider(models=("/nonexistent/model",)).available()
    assert not readiness.ok and "not available locally" in readiness.reason


async def test_streaming_chunks_rebuild_the_answer(provider):
    with trio.fail_after(60):
        items = [x async for x in provider.astream(req(max_tokens=16))]
    *chunks, completion = items
    assert chunks and "".join(chunks) == completion.text == provider.complete_sync(req(max_tokens=16)).text


async def test_closing_the_stream_stops_generation_within_one_token():
    # Unbatched: a reader that falls behind pauses the generation (Handoff), so nothing runs ahead of
    # it. (Batched, the batch runs on for the others: tests/providers/test_hf_batching.py.)
    provider = HFLocalProvider(max_new_tokens=200, batching="off")
    loaded = provider.load()
    forwards = []
    lock = threading.Lock()
    handle = loaded.model.register_forward_hook(lambda *a: forwards.append(1))
    try:
        with trio.fail_after(60):
            stream = provider.astream(req(max_tokens=200, prompt="count"))
            await stream.__anext__()
            with lock:
                at_close = len(forwards)
            await stream.aclose()  # joins the generation thread
        assert len(forwards) - at_close <= 2, (at_close, len(forwards))
        assert len(forwards) < 150, "generation ran to the end despite the close"
    finally:
        handle.remove()


@pytest.mark.parametrize("batching", ["off", "on"])
async def test_router_deadline_cancels_a_generation(batching):
    deps = RouterDeps(settings=load_settings(env={"ACCELMESH_PROVIDERS_HF_LOCAL_MAX_NEW_TOKENS": "250",
                                                  "ACCELMESH_PROVIDERS_HF_LOCAL_BATCHING": batching}))
    provider = deps.get_provider("hf_local", deps.current_settings())
    loaded = await trio.to_thread.run_sync(provider.load)
    forwards = []

    def counted(*args) -> None:  # 250 tokens take at least 0.25 s, five times the deadline
        forwards.append(1)
        time.sleep(0.001)

    handle = loaded.model.register_forward_hook(counted)
    try:
        with trio.fail_after(30), pytest.raises(node.DeadlineExceeded):
            await node.acomplete("x", provider="hf_local", deps=deps, timeout=0.05, cache="no-cache")
    finally:
        handle.remove()
    assert len(forwards) < 200, "the generation was not stopped at the deadline"


def test_router_answers_through_hf_local_and_caches_by_weights(provider):
    deps = RouterDeps()
    first = node.complete("Hello", provider="hf_local", deps=deps, max_tokens=8)
    assert first.model.startswith("hf_local/accelmesh-tiny@sha256:") and first.cache == "miss"
    assert node.complete("Hello", provider="hf_local", deps=deps, max_tokens=8).cache == "memory"
    assert node.complete("Hello", provider="echo", deps=deps).key != first.key


def test_preload_loads_every_configured_model(tmp_path, capsys):
    copy = tmp_path / "m2"
    shutil.copytree(resolve_model_dir(EMBEDDED_MODEL), copy)
    p = HFLocalProvider(models=(EMBEDDED_MODEL, str(copy)))
    assert p.preload(progress=True) == [EMBEDDED_MODEL, str(copy)]
    assert len(p._loaded) == 2
    assert "hf_local: loading models" in capsys.readouterr().err


def test_the_shipped_model_is_reproducible_from_the_build_script(tmp_path):
    from node.models.build_tiny import build

    rebuilt = build(tmp_path / "tiny")
    shipped = resolve_model_dir(EMBEDDED_MODEL)
    for path in sorted(shipped.iterdir()):
        assert _content(rebuilt / path.name) == _content(path), path.name


def _content(path):
    """A file's bytes, as a digest; a JSON file's data without `transformers_version` (which only says
    which release wrote it: a newer transformers writes the same model under its own number)."""
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            data.pop("transformers_version", None)
        return data
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_max_tokens_beyond_the_context_is_capped_and_an_oversize_prompt_is_refused(provider):
    context = provider.load().model.config.n_positions
    long = provider.complete_sync(req(prompt="hi", max_tokens=context * 2))
    assert long.prompt_tokens + long.completion_tokens <= context
    with pytest.raises(node.ProviderFailed, match="does not fit the context"):
        provider.complete_sync(req(prompt="hello " * context))


def test_a_reader_that_stops_reading_pauses_the_producer_at_the_buffer_bound():
    from node.providers.hf_local import Handoff

    handoff = Handoff(8)
    produced = []

    def producer():
        for i in range(100):
            if not handoff.put(("text", i)):
                return
            produced.append(i)

    thread = threading.Thread(target=producer)
    thread.start()
    assert handoff.queue.get(timeout=5) == ("text", 0)  # the reader takes one, then stops reading
    deadline = time.monotonic() + 5
    while len(produced) < 9 and time.monotonic() < deadline:
        time.sleep(0.01)
    thread.join(timeout=0.3)
    assert thread.is_alive() and len(produced) == 9, "8 waiting + 1 taken, and the producer waits"
    handoff.stop.set()  # a cancel: the waiting producer leaves at once
    thread.join(timeout=2)
    assert not thread.is_alive() and len(produced) == 9


def test_accelerator_is_the_device_kind(provider):
    import torch

    expected = "cpu" if not torch.cuda.is_available() else ("rocm" if torch.version.hip else "cuda")
    assert provider.accelerator() == expected  # device auto: the best device here (the tests pin no device)
    assert HFLocalProvider(device="cpu").accelerator() == "cpu"
    assert HFLocalProvider(device="mps").accelerator() == "mps"


def test_capacity_is_the_batch_size_or_unbatched_the_concurrency_setting():
    assert HFLocalProvider().capacity() == 16  # the default: batching, 16 requests in the batch
    settings = load_settings(env={"ACCELMESH_PROVIDERS_HF_LOCAL_BATCH_CONCURRENCY": "24"})
    assert HFLocalProvider.from_settings(settings).capacity() == 24
    assert HFLocalProvider(batching="off").capacity() == 1  # unbatched: one generation at a time
    settings = load_settings(env={"ACCELMESH_PROVIDERS_HF_LOCAL_CONCURRENCY": "3",
                                  "ACCELMESH_PROVIDERS_HF_LOCAL_BATCHING": "off"})
    assert HFLocalProvider.from_settings(settings).capacity() == 3


def test_sync_path_stops_at_the_deadline_with_provider_timeout():
    provider = HFLocalProvider(max_new_tokens=16)
    loaded = provider.load()
    forwards = []
    # A real model made slow (20 ms per token), so 900 tokens would take 18 s on any CPU.

    def slow_forward(*args):
        forwards.append(1)
        time.sleep(0.02)

    handle = loaded.model.register_forward_hook(slow_forward)
    try:
        start = time.monotonic()
        with pytest.raises(ProviderTimeout, match="within 0.3 s") as info:
            provider.complete_sync(ProviderRequest("generate", "count", None, None, params={"max_tokens": 900},
                                                   timeout=0.3))
        elapsed = time.monotonic() - start
    finally:
        handle.remove()
    assert info.value.retryable
    assert elapsed < 0.3 + 1.5, f"stopped after {elapsed:.2f} s"
    assert len(forwards) < 200, "generation ran on past the deadline"


def test_router_sync_deadline_is_honoured_for_hf_local():
    deps = RouterDeps(settings=load_settings(env={"ACCELMESH_PROVIDERS_HF_LOCAL_MAX_NEW_TOKENS": "900"}))
    provider = deps.get_provider("hf_local", deps.current_settings())
    loaded = provider.load()
    handle = loaded.model.register_forward_hook(lambda *a: time.sleep(0.02))
    try:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded) as info:
            node.complete("x", provider="hf_local", deps=deps, timeout=0.05, cache="no-cache")
        assert isinstance(info.value.__cause__, ProviderTimeout)
        assert time.monotonic() - start < 0.05 + 1.5
    finally:
        handle.remove()


def test_models_that_are_not_configured_are_refused_before_touching_disk(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(resolve_model_dir(EMBEDDED_MODEL), elsewhere)  # a loadable model, never configured
    provider = HFLocalProvider(max_new_tokens=4)
    for model in (str(elsewhere), "/etc", "gpt2"):
        request = ProviderRequest("generate", "hi", None, model, timeout=30)
        with pytest.raises(ModelNotFound) as info:
            provider.complete_sync(request)
        message = str(info.value)
        assert repr(model) in message and EMBEDDED_MODEL in message and "[providers.hf_local] models" in message
        with pytest.raises(ModelNotFound):
            provider.model_identity(model)
    assert provider._loaded == {}, "nothing was loaded"
    served = HFLocalProvider(models=(str(elsewhere),), max_new_tokens=4)
    assert served.complete_sync(ProviderRequest("generate", "hi", None, str(elsewhere), timeout=30)).text is not None


async def test_a_stream_for_an_unserved_model_is_refused():
    provider = HFLocalProvider(max_new_tokens=4)
    with trio.fail_after(30), pytest.raises(ModelNotFound, match="not served here"):
        async for _ in provider.astream(ProviderRequest("generate", "hi", None, "/etc", timeout=30)):
            pass


def test_router_falls_back_past_hf_local_for_a_model_it_does_not_serve():
    deps = RouterDeps(settings=load_settings(env={"ACCELMESH_FALLBACK_ORDER": "hf_local,echo"}))
    result = node.complete("hi", model_name="/etc", deps=deps)
    assert result.provider == "echo"
    with pytest.raises(ModelNotFound, match="not served here"):
        node.complete("hi", provider="hf_local", model_name="/etc", deps=deps)
