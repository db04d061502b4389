"""`hf_local`: Hugging Face transformers causal LMs run in this process, streamed into trio.

- A model is loaded once per (model, device), in a worker thread, on first use (or at daemon
  start with ``[providers.hf_local] preload = true``, with a progress bar).
- The device is chosen by `node.accelerators.pick_torch_device` (cuda > mps > cpu) unless
  ``[providers.hf_local] device`` names one.
- Chat messages go through the tokenizer's chat template when it has one; otherwise they are
  joined as ``role: content`` lines followed by ``assistant:`` (documented in docs/providers.md).
- Greedy decoding unless ``temperature > 0`` (then sampling with ``top_p``; ``seed`` seeds it).
  ``max_tokens`` (default ``max_new_tokens``), ``stop`` (strings; the answer ends before the
  first one, which is not included). Usage counts prompt and completion tokens.
- Streaming: generation runs in its own thread and feeds a streamer; the async side pulls
  chunks with one thread hop each. Closing the stream (or cancelling) sets a stopping
  criterion, so generation ends within one token.
- Deadline: the synchronous path (`complete_sync`, behind `node.complete` / `generate_text`)
  stops generating at ``request.timeout`` (a time-based stopping criterion, checked every
  token; also while loading and queued) and raises `ProviderTimeout`. The async path is
  stopped by cancellation (the router cancels at its deadline).
- Continuous batching (``[providers.hf_local] batching``, node.providers.hf_batching): greedy
  requests to a model share transformers' continuous batching manager, up to
  ``batch_concurrency`` at once (the provider's capacity, advertised); sampled ones run
  unbatched beside it. ``auto`` turns it on for every device (docs/performance.md: a gain on
  CPU too). Where the manager cannot run a model, one log line, and that model runs unbatched.
- Only the models this provider serves (`models()`: the configured ones and the default) are
  loaded; a request for any other model, a path or hub id included, is refused with
  `ModelNotFound` before anything is read from disk, so a mesh peer cannot make a node load
  arbitrary files.
- The request key covers a digest of the weights (`model_identity`), so different weights
  never share a cached answer.
- With no model configured the embedded `accelmesh-tiny` model answers: random weights, so
  its answers are not meaningful. Real hosts configure a real model id.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.errors import ModelNotFound, ProviderFailed, ProviderTimeout
from node.providers.base import BaseProvider, Completion, ProviderRequest, Readiness, messages_to_text

if TYPE_CHECKING:
    from node.config import Settings

__all__ = ["HFLocalProvider", "HFLocalStatistics", "EMBEDDED_MODEL", "weights_digest", "resolve_model_dir"]

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "accelmesh-tiny"
_EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "models" / "tiny"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja", ".py")
STREAM_BUFFER_CHUNKS = 64  # text pieces generated ahead of a streaming reader before generation pauses
_digest_cache: dict[tuple[str, int, int], str] = {}
_digest_lock = threading.Lock()


# ---------------------------------------------------------------------------------------
# Locating models and digesting their weights (no torch needed)


def resolve_model_dir(model: str) -> Path | None:
    """The local directory holding `model`'s files: the embedded model, a path, or the HF cache."""
    if model == EMBEDDED_MODEL:
        return _EMBEDDED_DIR
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not in the local cache (or not a valid repo id): not available offline
        return None


def weights_digest(directory: Path) -> str:
    """sha256 over the model's files (names and contents), cached by path, size and mtime.

    Files in the Hugging Face cache are symlinks to blobs named by their own sha256, so those
    are not re-read.
    """
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    h = hashlib.sha256()
    for path in files:
        stat = path.stat()
        target = path.resolve()
        cache_key = (str(target), stat.st_size, stat.st_mtime_ns)
        with _digest_lock:
            file_digest = _digest_cache.get(cache_key)
        if file_digest is None:
            if target.parent.name == "blobs" and len(target.name) == 64:
                file_digest = target.name  # the HF cache names LFS blobs by their sha256
            else:
                fh = hashlib.sha256()
                with open(target, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        fh.update(block)
                file_digest = fh.hexdigest()
            with _digest_lock:
                _digest_cache[cache_key] = file_digest
        h.update(path.name.encode() + b"\0" + file_digest.encode() + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Loaded models


@dataclass
class _Loaded:
    model_id: str
    device: str
    tokenizer: Any
    model: Any
    slots: threading.BoundedSemaphore  # generations at once on this device (unbatched)
    batcher: Any = None  # node.providers.hf_batching.Batcher: its greedy requests, batched
    batch_slots: threading.BoundedSemaphore | None = None  # requests in the batch at once


class _StopOnEvent:
    """A transformers StoppingCriteria that ends generation when an event is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _StopAtDeadline:
    """A StoppingCriteria that ends generation once ``time.monotonic()`` reaches `deadline`."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.hit = False

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        self.hit = self.hit or time.monotonic() >= self.deadline
        return torch.full((input_ids.shape[0],), self.hit, dtype=torch.bool, device=input_ids.device)


class _StopOnStrings:
    """A StoppingCriteria that ends generation once a stop string appears in the *generated* text.

    (transformers' own `stop_strings` also matches across the prompt's last characters.)
    Only the last few tokens are decoded at each step: a stop string that just appeared must
    end inside them.
    """

    def __init__(self, tokenizer: Any, prompt_tokens: int, stops: list[str]) -> None:
        self.tokenizer, self.prompt_tokens, self.stops = tokenizer, prompt_tokens, stops
        self.window = max(len(s) for s in stops) + 2

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        tail = input_ids[0, max(self.prompt_tokens, input_ids.shape[1] - self.window):]
        text = self.tokenizer.decode(tail, skip_special_tokens=True)
        hit = any(stop in text for stop in self.stops)
        return torch.full((input_ids.shape[0],), hit, dtype=torch.bool, device=input_ids.device)


def _callback_streamer(tokenizer: Any, on_text: Callable[[str], None], *, skip_prompt: bool = True) -> Any:
    """A transformers streamer that hands each decoded piece of new text to `on_text` (fed the
    prompt first, as `generate` feeds it, unless `skip_prompt` is off)."""
    from transformers.generation.streamers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True)


class _StopFilter:
    """Holds back streamed text that could be the start of a stop string; ends at the first one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buffer += text
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buffer, self.stopped = self.buffer[:cut], "", True
            return out
        if self.hold and len(self.buffer) > self.hold:
            out, self.buffer = self.buffer[: -self.hold], self.buffer[-self.hold :]
            return out
        if not self.hold:
            out, self.buffer = self.buffer, ""
            return out
        return ""

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


def _context_length(model: Any) -> int | None:
    """The model's maximum sequence length, when its config says."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class Handoff:
    """Pieces of text from the generating thread to the async reader, at most `size` waiting.

    A reader that stops reading pauses the generation (the producer waits at its next piece)
    instead of letting text pile up; `stop` (cancel, deadline) releases a waiting producer at once.
    """

    def __init__(self, size: int) -> None:
        self.queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=size)
        self.stop = threading.Event()

    def put(self, item: tuple[str, Any]) -> bool:
        """Hand `item` over, waiting while the reader is behind; False if stopped meanwhile."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False


@dataclass(frozen=True)
class HFLocalStatistics:
    """A snapshot of one hf_local provider (`HFLocalProvider.statistics()`)."""

    loaded: tuple[str, ...]  # models in memory, as "MODEL@DEVICE", sorted
    default: str  # the model used when a request names none
    batched: tuple[str, ...] = ()  # of those, the ones served with continuous batching
    capacity: int = 1  # requests run at once (the batch's size when batching)


class HFLocalProvider(BaseProvider):
    name = "hf_local"

    def __init__(
        self,
        *,
        models: tuple[str, ...] = (),
        default_model: str = "",
        device: str = "auto",
        max_new_tokens: int = 256,
        concurrency: int = 1,
        batching: str = "auto",
        batch_concurrency: int = 16,
        max_batch_tokens: int = 0,
    ) -> None:
        self.configured = tuple(models)
        self.default = default_model or (self.configured[0] if self.configured else EMBEDDED_MODEL)
        self.device_setting = device
        self.max_new_tokens = max_new_tokens
        self.concurrency = concurrency
        self.batching = batching  # auto | on | off
        self.batch_concurrency = batch_concurrency
        self.max_batch_tokens = max_batch_tokens  # 0: transformers' choice on a GPU, CPU_MAX_BATCH_TOKENS on a CPU
        self._unbatchable: set[str] = set()  # models whose batching manager could not start
        self._loaded: dict[tuple[str, str], _Loaded] = {}
        self._load_lock = threading.Lock()
        self._device_slots: dict[str, threading.BoundedSemaphore] = {}
        self._identities: dict[str, str] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> HFLocalProvider:
        s = settings.providers.hf_local
        return cls(
            models=s.models, default_model=s.default_model, device=s.device,
            max_new_tokens=s.max_new_tokens, concurrency=s.concurrency, batching=s.batching,
            batch_concurrency=s.batch_concurrency, max_batch_tokens=s.max_batch_tokens,
        )

    # -- readiness and models ----------------------------------------------------------

    def models(self) -> tuple[str, ...]:
        models = list(self.configured) or [EMBEDDED_MODEL]
        if self.default not in models:
            models.insert(0, self.default)
        return tuple(models)

    def default_model(self) -> str | None:
        return self.default

    def available(self) -> Readiness:
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            return Readiness(False, f"{' and '.join(missing)} not installed; install with "
                                    "`pip install 'accelmesh[hf]'` (torch==2.13.0 first)")
        if resolve_model_dir(self.default) is None:
            return Readiness(False, f"model {self.default!r} is not available locally; download it "
                                    f"(`huggingface-cli download {self.default}`) or set a local path")
        version = importlib.metadata.version("transformers")
        if self.default == EMBEDDED_MODEL:
            return Readiness(True, f"transformers {version}; embedded {EMBEDDED_MODEL} "
                                   "(random weights: answers are not meaningful; configure a real model)")
        return Readiness(True, f"transformers {version}; default model {self.default}")

    def _served(self, model: str | None) -> str:
        """`model` (or the default) if this provider serves it; otherwise `ModelNotFound`."""
        model = model or self.default
        served = self.models()
        if model not in served:
            raise ModelNotFound(
                self.name,
                f"model {model!r} is not served here (served: {', '.join(served)}); to serve more, add them "
                "to [providers.hf_local] models (ACCELMESH_PROVIDERS_HF_LOCAL_MODELS, "
                "--providers-hf-local-models)",
            )
        return model

    def model_identity(self, model: str | None) -> str:
        model = self._served(model)
        identity = self._identities.get(model)
        if identity is None:
            directory = resolve_model_dir(model)
            digest = weights_digest(directory)[:32] if directory is not None else "unavailable"
            identity = f"hf_local/{model}@sha256:{digest}"
            self._identities[model] = identity
        return identity

    def advertised_identity(self, model: str | None) -> str | None:
        """The identity of `model` (or the default) once it is known: after the model was loaded or
        keyed a request here; None before. Never reads or digests weights (the advert asks often)."""
        model = model or self.default
        identity = self._identities.get(model)
        return identity if identity is not None and not identity.endswith("@sha256:unavailable") else None

    # -- loading -----------------------------------------------------------------------

    def device(self) -> str:
        if self.device_setting != "auto":
            return self.device_setting
        from node.accelerators import pick_torch_device

        return pick_torch_device()

    def accelerator(self) -> str:
        """The kind of this provider's device: cuda (or rocm, on a ROCm build of torch), mps or cpu."""
        device = self.device().split(":")[0]
        if device == "cuda":
            import torch

            return "rocm" if getattr(torch.version, "hip", None) else "cuda"
        return device

    def batches(self) -> bool:
        """Whether greedy requests to the default model are batched: `batching` on, or auto (every
        device), unless its manager could not start."""
        return self.batching != "off" and self.default not in self._unbatchable

    def capacity(self) -> int:
        """Requests run at once: `batch_concurrency` when batching (per model), else `concurrency`
        (generations at once on this provider's one device, shared by every model on it)."""
        return self.batch_concurrency if self.batches() else self.concurrency

    def load(self, model: str | None = None, *, progress: bool = False) -> _Loaded:
        """Load (once) and return `model` on this provider's device. Blocking: call in a thread.

        Only a model of `models()` is loaded; any other raises `ModelNotFound`."""
        model = self._served(model)
        device = self.device()
        key = (model, device)
        loaded = self._loaded.get(key)
        if loaded is not None:
            return loaded
        with self._load_lock:
            loaded = self._loaded.get(key)
            if loaded is not None:
                return loaded
            directory = resolve_model_dir(model)
            if directory is None:
                raise ModelNotFound(self.name, f"model {model!r} is not available locally (offline)")
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            import transformers
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if not progress:
                transformers.utils.logging.disable_progress_bar()
            else:
                transformers.utils.logging.enable_progress_bar()
            log.info("hf_local: loading %s on %s from %s", model, device, directory)
            try:
                tokenizer = AutoTokenizer.from_pretrained(directory)
                lm = AutoModelForCausalLM.from_pretrained(directory).to(device).eval()
            except (OSError, ValueError) as exc:
                raise ProviderFailed(self.name, f"cannot load {model!r}: {exc}") from exc
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            slots = self._device_slots.setdefault(device, threading.BoundedSemaphore(self.concurrency))
            loaded = _Loaded(model, device, tokenizer, lm, slots)
            if self.batching != "off":
                self._start_batching(loaded)
            self._loaded[key] = loaded
        self.model_identity(model)  # known from now on, so the advert carries it (advertised_identity)
        return loaded

    def _start_batching(self, loaded: _Loaded) -> None:
        """Give `loaded` its continuous batching manager; where it cannot run, one log line and none."""
        from node.providers.hf_batching import Batcher

        batcher = Batcher(loaded.model, loaded.tokenizer, concurrency=self.batch_concurrency,
                          max_batch_tokens=self.max_batch_tokens,
                          max_length=_context_length(loaded.model) or 2 * self.max_new_tokens)
        try:
            batcher.start()
        except Exception as exc:  # unsupported attention or architecture, out of memory for its cache
            self._unbatchable.add(loaded.model_id)
            log.warning("hf_local: continuous batching cannot run %s on %s (%s: %s); serving it unbatched",
                        loaded.model_id, loaded.device, type(exc).__name__, exc)
            return
        loaded.batcher = batcher
        loaded.batch_slots = threading.BoundedSemaphore(self.batch_concurrency)

    def preload(self, models: tuple[str, ...] | None = None, *, progress: bool = True) -> list[str]:
        """Load every configured model now (the daemon calls this in a thread at start)."""
        names = list(models or self.models())
        bar: Any = None
        if progress:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(names), desc="hf_local: loading models", unit="model")
            except ImportError:
                bar = None
        for name in names:
            self.load(name, progress=progress)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return names

    # -- generation --------------------------------------------------------------------

    def _inputs(self, loaded: _Loaded, request: ProviderRequest) -> Any:
        tok = loaded.tokenizer
        if request.messages is not None:
            messages = [dict(m) for m in request.messages]
            if getattr(tok, "chat_template", None):
                return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True).to(loaded.device)
            text = messages_to_text(messages) + "\nassistant:"
        else:
            text = request.text
        return tok(text, return_tensors="pt").to(loaded.device)

    def _generate(
        self,
        request: ProviderRequest,
        *,
        on_text: Callable[[str], None] | None = None,
        stop_event: threading.Event | None = None,
        deadline: float | None = None,
    ) -> Completion:
        """Run one generation in the calling thread: in the model's batch when it has one and the
        request is greedy, else alone (queued behind the device's slots).

        With a `deadline` (``time.monotonic()`` seconds) the generation stops there and raises
        `ProviderTimeout`: while loading, while queued, or within one token while generating.
        """
        loaded = self.load(request.model)
        if deadline is not None and time.monotonic() >= deadline:
            raise self._timeout(request, "while the model was loading")
        params = request.params
        max_new = int(params.get("max_tokens") or self.max_new_tokens)
        temperature = float(params.get("temperature", 0.0))
        stops = list(params.get("stop") or [])
        stop_event = stop_event or threading.Event()
        inputs = self._inputs(loaded, request)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        context = _context_length(loaded.model)
        if context is not None:
            if prompt_tokens >= context:
                raise ProviderFailed(self.name, f"prompt of {prompt_tokens} tokens does not fit the context of "
                                                f"{loaded.model_id} ({context} tokens)")
            max_new = min(max_new, context - prompt_tokens)
        stream_filter = _StopFilter(stops)

        def filtered(piece: str) -> None:
            out = stream_filter.feed(piece)
            if out and on_text is not None:
                on_text(out)

        emit = filtered if on_text is not None else None
        run = self._run_batched if loaded.batcher is not None and temperature <= 0 else self._run_alone
        new_ids, timed_out = run(loaded, request, inputs, max_new=max_new, stops=stops, emit=emit,
                                 stop_event=stop_event, deadline=deadline)
        if timed_out:
            raise self._timeout(request, f"after {len(new_ids)} of {max_new} tokens; generation stopped")
        text = loaded.tokenizer.decode(new_ids, skip_special_tokens=True)
        finish = "length" if len(new_ids) >= max_new else "stop"
        for stop in stops:
            cut = text.find(stop)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        if on_text is not None:
            tail = stream_filter.flush()
            if tail:
                on_text(tail)
        return Completion(text=text, model=loaded.model_id, finish_reason=finish,
                          prompt_tokens=prompt_tokens, completion_tokens=int(len(new_ids)))

    def _queue_for(self, slots: threading.BoundedSemaphore, request: ProviderRequest, stop_event: threading.Event,
                   deadline: float | None) -> None:
        """Take one of `slots`, waiting while stop_event is clear and the deadline is ahead."""
        while not slots.acquire(timeout=0.05):
            if stop_event.is_set():
                raise ProviderFailed(self.name, "cancelled while queued")
            if deadline is not None and time.monotonic() >= deadline:
                raise self._timeout(request, "while queued for the device")

    def _run_alone(self, loaded: _Loaded, request: ProviderRequest, inputs: Any, *, max_new: int, stops: list[str],
                   emit: Callable[[str], None] | None, stop_event: threading.Event,
                   deadline: float | None) -> tuple[Any, bool]:
        """One `model.generate`: (the new token ids, whether it stopped at the deadline)."""
        import torch
        from transformers import StoppingCriteriaList

        params = request.params
        prompt_tokens = int(inputs["input_ids"].shape[1])
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "pad_token_id": loaded.tokenizer.pad_token_id,
            "stopping_criteria": StoppingCriteriaList([_StopOnEvent(stop_event)]),
        }
        temperature = float(params.get("temperature", 0.0))
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=float(params.get("top_p", 1.0)))
        else:
            kwargs["do_sample"] = False  # (passing temperature=None etc. as well costs ~10% on CPU)
        if stops:
            kwargs["stopping_criteria"].append(_StopOnStrings(loaded.tokenizer, prompt_tokens, stops))
        at_deadline = _StopAtDeadline(deadline) if deadline is not None else None
        if at_deadline is not None:
            kwargs["stopping_criteria"].append(at_deadline)
        if emit is not None:
            kwargs["streamer"] = _callback_streamer(loaded.tokenizer, emit)
        self._queue_for(loaded.slots, request, stop_event, deadline)
        try:
            with torch.inference_mode(), loaded.batcher.paused() if loaded.batcher is not None else nullcontext():
                if "seed" in params:
                    torch.manual_seed(int(params["seed"]))
                output = loaded.model.generate(**inputs, **kwargs)
        except (RuntimeError, ValueError) as exc:
            raise ProviderFailed(self.name, f"generation failed: {exc}") from exc
        finally:
            loaded.slots.release()
        return output[0][prompt_tokens:], bool(at_deadline and at_deadline.hit and not stop_event.is_set())

    def _run_batched(self, loaded: _Loaded, request: ProviderRequest, inputs: Any, *, max_new: int,
                     stops: list[str], emit: Callable[[str], None] | None, stop_event: threading.Event,
                     deadline: float | None) -> tuple[list[int], bool]:
        """The request in the model's batch: (the new token ids, whether it stopped at the deadline).

        The tokens are taken one by one as `model.generate` would produce them: streamed, checked
        for a stop string over the same window (`_StopOnStrings`), so that the answer, its usage
        and its CID are those of an unbatched generation. Leaving early (stop string, cancel,
        deadline) takes the request out of the batch at the next step."""
        import torch

        assert loaded.batcher is not None and loaded.batch_slots is not None
        streamer = _callback_streamer(loaded.tokenizer, emit, skip_prompt=False) if emit is not None else None
        window = max(len(s) for s in stops) + 2 if stops else 0
        generated: list[int] = []
        self._queue_for(loaded.batch_slots, request, stop_event, deadline)
        request_id: str | None = None
        try:
            try:
                request_id, outputs = loaded.batcher.submit(inputs["input_ids"][0].tolist(), max_new)
            except Exception as exc:  # the manager stopped, or could not start again
                raise ProviderFailed(self.name, f"continuous batching: {exc}", retryable=True) from exc
            while True:
                if stop_event.is_set():
                    return generated, False
                if deadline is not None and time.monotonic() >= deadline:
                    return generated, True
                try:
                    output = outputs.get(timeout=0.05)
                except queue.Empty:
                    continue
                error = output if isinstance(output, BaseException) else output.error
                if error is not None:  # a step failed (out of memory): every request in it fails, retryably
                    request_id = None
                    raise ProviderFailed(self.name, f"generation failed in the batch: {error}", retryable=True)
                for token in output.generated_tokens[len(generated):]:
                    generated.append(int(token))
                    if streamer is not None:
                        streamer.put(torch.tensor([token]))
                    if stops:
                        tail = loaded.tokenizer.decode(generated[-window:], skip_special_tokens=True)
                        if any(stop in tail for stop in stops):
                            output = None  # stopped here, as _StopOnStrings stops generate
                            break
                if output is None or output.is_finished():
                    request_id = None if output is not None else request_id
                    if streamer is not None:
                        streamer.end()
                    return generated, False
        finally:
            if request_id is not None:
                loaded.batcher.cancel(request_id)
            loaded.batch_slots.release()

    def _timeout(self, request: ProviderRequest, when: str) -> ProviderTimeout:
        return ProviderTimeout(self.name, f"no answer within {request.timeout:g} s ({when})")

    def complete_sync(self, request: ProviderRequest) -> Completion:
        return self._generate(request, deadline=time.monotonic() + request.timeout)

    async def astream(self, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        import trio

        handoff = Handoff(STREAM_BUFFER_CHUNKS)
        chunks, stop, put = handoff.queue, handoff.stop, handoff.put

        def work() -> None:
            try:
                completion = self._generate(request, on_text=lambda t: put(("text", t)), stop_event=stop)
                put(("done", completion))
            except BaseException as exc:  # delivered to the async side, which re-raises it
                put(("error", exc))

        worker = threading.Thread(target=work, name="hf_local-generate", daemon=True)
        worker.start()
        streamed: list[str] = []
        try:
            while True:
                kind, value = await trio.to_thread.run_sync(chunks.get, abandon_on_cancel=True)
                if kind == "text":
                    streamed.append(value)
                    yield value
                elif kind == "error":
                    raise value
                else:
                    sent = "".join(streamed)
                    if value.text != sent:
                        if value.text.startswith(sent):
                            yield value.text[len(sent):]  # what the streamer had not flushed
                        else:  # keep what the caller saw and what gets cached identical
                            log.warning("hf_local: streamed text differs from the final decode; using the stream")
                            value = Completion(sent, value.model, value.finish_reason, value.prompt_tokens,
                                               value.completion_tokens)
                    yield value
                    return
        finally:
            stop.set()  # generation stops at the next token
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(worker.join)

    def statistics(self) -> HFLocalStatistics:
        loaded = tuple(self._loaded.items())  # one C-level copy: a load finishing meanwhile cannot break the iteration
        return HFLocalStatistics(loaded=tuple(sorted(f"{m}@{d}" for (m, d), _ in loaded)), default=self.default,
                                 batched=tuple(sorted(f"{m}@{d}" for (m, d), one in loaded if one.batcher is not None)),
                                 capacity=self.capacity())

    def __repr__(self) -> str:
        s = self.statistics()
        return (f"<HFLocalProvider default={s.default!r} device={self.device_setting!r} "
                f"loaded={list(s.loaded)} batching={self.batching} capacity={s.capacity}>")
