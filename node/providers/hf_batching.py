"""Continuous batching for `hf_local`: transformers' own manager, shared by every request to a model.

transformers (5.x) ships continuous batching: `model.init_continuous_batching()` returns a
manager that runs one generation loop in a thread of its own, admits requests between steps
(`add_request`), drops cancelled ones at the next step (`cancel_request`) and hands outputs back
through one queue. This module wraps it for hf_local, and adds nothing of its own to the batching:

- `Batcher.start` builds and starts the manager for one loaded model; sized for a CPU (the
  manager's defaults size the KV cache from free GPU memory, which on a CPU means most of the
  RAM, and makes every step slow), left to transformers on a GPU. Starting raises when the
  manager cannot run this model (an attention implementation or architecture it does not
  support, out of memory for its cache): hf_local then logs one line and serves unbatched.
- One dispatcher thread reads the manager's outputs (`get_result`) and routes each to the queue
  of the request it belongs to, so a request waits on its own queue only.
- A step that fails (out of memory) stops transformers' manager, failing the requests it held;
  those fail with a retryable error (the mesh retries them elsewhere) and the next request
  starts a new manager.

Greedy decoding only: the manager has one generation config for every request. Sampled requests
(`temperature > 0`) run unbatched on the same model, the batch paused meanwhile (`paused`).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Batcher", "BatcherStatistics", "CPU_PAGE_SIZE"]

log = logging.getLogger("node.providers.hf_local")

CPU_PAGE_SIZE = 64  # tokens per KV cache page on a CPU (transformers' default, 256, wastes most of each page)
CPU_MAX_BATCH_TOKENS = 512  # tokens per step on a CPU unless `max_batch_tokens` says otherwise
_POLL = 0.1  # seconds the dispatcher waits for an output before it checks that the manager still runs


@dataclass(frozen=True)
class BatcherStatistics:
    """A snapshot of one model's batcher."""

    running: int  # requests in the manager now (submitted, not finished or cancelled)
    submitted: int
    failed: int  # requests failed by a step that failed (out of memory), or by the manager stopping
    restarts: int  # managers started after the first one stopped


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Log records of `name` (and below) dropped while the block runs."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


class Batcher:
    """The continuous batching manager of one loaded model, and the routing of its outputs.

    `submit` returns the request's id and the queue its outputs arrive on (each a transformers
    `GenerationOutput` with every token generated so far; the last one is finished or failed);
    `cancel` takes it out of the batch at the next step."""

    def __init__(self, model: Any, tokenizer: Any, *, concurrency: int, max_batch_tokens: int, max_length: int) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.concurrency, self.max_batch_tokens, self.max_length = concurrency, max_batch_tokens, max_length
        self._lock = threading.Lock()  # guards _waiting and _manager
        self._starting = threading.Lock()  # one start at a time
        self._waiting: dict[str, queue.SimpleQueue[Any]] = {}  # request id -> its outputs
        self._ids = itertools.count()
        self._manager: Any = None
        self._started = False
        self.submitted = self.failed = self.restarts = 0

    # -- the manager ---------------------------------------------------------------------------

    def _config(self) -> Any:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        if self.model.device.type != "cpu":  # a GPU: transformers sizes the cache from its free memory
            return ContinuousBatchingConfig(max_requests_per_batch=self.concurrency,
                                            max_batch_tokens=self.max_batch_tokens or None)
        pages = -(-self.max_length // CPU_PAGE_SIZE)  # pages one request may need, at most
        return ContinuousBatchingConfig(page_size=CPU_PAGE_SIZE, num_blocks=self.concurrency * pages + 1,
                                        max_batch_tokens=self.max_batch_tokens or CPU_MAX_BATCH_TOKENS,
                                        max_requests_per_batch=self.concurrency)

    def start(self) -> None:
        """Build and start the manager; raises when it cannot run this model. Blocking."""
        from transformers import GenerationConfig

        # transformers' manager logs its choices at INFO through a handler of its own, whatever the
        # daemon's log level: only its warnings and errors are worth a line.
        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
        eos = self.model.generation_config.eos_token_id
        config = GenerationConfig(do_sample=False, eos_token_id=eos if eos is not None else -1,
                                  pad_token_id=self.tokenizer.pad_token_id, max_new_tokens=self.max_length)
        manager = self.model.init_continuous_batching(generation_config=config,
                                                      continuous_batching_config=self._config())
        with _quiet("ContinuousBatchingLogger"):  # (transformers logs a failure here with its traceback)
            self._start(manager)
        with self._lock:
            self._manager = manager
        if not self._started:  # stopped before the interpreter ends its daemon threads (torch aborts otherwise)
            atexit.register(self.stop)
        self.restarts += self._started
        self._started = True
        threading.Thread(target=self._dispatch, args=(manager,), name="hf_local-batching-outputs", daemon=True).start()

    @staticmethod
    def _start(manager: Any) -> None:
        """Start `manager` and wait until its KV cache is made (in its own thread); raise its failure."""
        # Its generation thread inherits this thread's daemon flag: started from a daemon thread, it
        # never keeps the process alive at exit (transformers starts it as a plain thread).
        failed: list[BaseException] = []

        def start() -> None:
            try:
                manager.start()
            except BaseException as exc:
                failed.append(exc)

        starter = threading.Thread(target=start, name="hf_local-batching-start", daemon=True)
        starter.start()
        starter.join()
        # The KV cache is made in the manager's own thread: wait for it (or for its failure: out of memory).
        status = manager.background_thread_status
        while not failed and manager.batch_processor is None and status.fatal_error is None and manager.is_running():
            time.sleep(0.01)
        if failed or manager.batch_processor is None:
            manager.stop(block=True, timeout=5.0, hard_stop=True) if manager.is_running() else None
            raise failed[0] if failed else (status.fatal_error or RuntimeError("the manager stopped at start"))

    def _dispatch(self, manager: Any) -> None:
        """Route the manager's outputs to their requests until it stops; then fail what it held."""
        while True:
            output = manager.get_result(timeout=_POLL)
            if output is not None:
                self.failed += output.error is not None
                with self._lock:
                    outputs = self._waiting.get(output.request_id)
                    if outputs is not None and output.is_finished():
                        del self._waiting[output.request_id]
                if outputs is not None:
                    outputs.put(output)
                continue
            if manager.is_running() and manager.background_thread_status.fatal_error is None:
                continue
            error = manager.background_thread_status.fatal_error
            with self._lock:
                if self._manager is manager:
                    self._manager = None  # the next submit starts a new one
                held, self._waiting = self._waiting, {}
            if error is not None or held:
                log.warning("hf_local: continuous batching stopped (%s: %s); the requests in it failed (retryable), "
                            "the next request starts a new manager", type(error).__name__, error)
            for outputs in held.values():
                outputs.put(error or RuntimeError("continuous batching stopped"))
            self.failed += len(held)
            return

    # -- requests ------------------------------------------------------------------------------

    def submit(self, input_ids: list[int], max_new_tokens: int) -> tuple[str, queue.SimpleQueue[Any]]:
        """Add a request; its outputs (or an exception, if the manager stopped) arrive on the queue."""
        with self._starting:
            if self._manager is None:  # the last one stopped (a step failed): a new one
                self.start()
        request_id = f"accelmesh-{next(self._ids)}"
        outputs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        with self._lock:
            self._waiting[request_id] = outputs
            manager = self._manager
        added = manager is not None and manager.add_request(
            input_ids=input_ids, request_id=request_id, max_new_tokens=max_new_tokens, streaming=True)
        if not added:  # it stopped meanwhile, or refuses new requests (stopping)
            with self._lock:
                self._waiting.pop(request_id, None)
            raise RuntimeError("continuous batching is not accepting requests")
        self.submitted += 1
        return request_id, outputs

    def cancel(self, request_id: str) -> None:
        """Take the request out of the batch at the next step (its outputs stop)."""
        with self._lock:
            self._waiting.pop(request_id, None)
            manager = self._manager
        if manager is not None:
            manager.cancel_request(request_id)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The batch held between two steps while the block runs (it keeps its requests and cache).

        A request generated outside the batch on the same model runs in this block: a step running
        beside it makes its seeded sampling differ from run to run (measured; the answers stay
        those of an idle model when the batch waits)."""
        with self._lock:
            manager = self._manager
        if manager is None or not manager.is_running():
            yield
            return
        with manager.pause():
            yield

    def running_in_manager(self) -> int:
        """Requests the manager's scheduler holds now (active or waiting): 0 once every one left."""
        processor = getattr(self._manager, "batch_processor", None)
        if processor is None:
            return 0
        scheduler = processor.scheduler
        return len(scheduler.active_requests) + len(scheduler.waiting_requests)

    def statistics(self) -> BatcherStatistics:
        with self._lock:
            running = len(self._waiting)
        return BatcherStatistics(running=running, submitted=self.submitted, failed=self.failed,
                                 restarts=self.restarts)

    def __repr__(self) -> str:
        s = self.statistics()
        return (f"<Batcher concurrency={self.concurrency} running={s.running} submitted={s.submitted} "
                f"failed={s.failed} restarts={s.restarts}>")

    def stop(self) -> None:
        with self._lock:
            manager, self._manager = self._manager, None
        if manager is not None:
            manager.stop(block=True, timeout=5.0, hard_stop=True)
