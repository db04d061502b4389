"""The `echo` provider: answers ``echo: <prompt>`` identically on every node, for smoke and load tests.

For chat it echoes the last user message. The answer streams word by word. Settings
(``[echo]``): `latency_ms` (a number or ``MIN-MAX``, slept before the first chunk),
`word_delay_ms` (slept between consecutive chunks, for mid-stream fault tests), `failure_rate`
(drawn per attempt from a per-node RNG seeded by `seed`) and `concurrency` (a cap on generations
served at once; the others queue; 0 = unlimited). The cap is kept separately for synchronous
callers (threads) and for the daemon's event loop, and held for the whole answer.

Both paths keep to the request's deadline (`ProviderRequest.timeout`, counted from the call): a
pause that would pass it sleeps until the deadline and raises `ProviderTimeout` instead.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from node.errors import ProviderFailed, ProviderTimeout
from node.providers.base import BaseProvider, Completion, ProviderRequest, Readiness

if TYPE_CHECKING:
    from node.config import EchoSettings, Settings

__all__ = ["EchoProvider", "EchoStatistics", "echo_text", "split_words"]

MODEL = "echo"


def echo_text(request: ProviderRequest) -> str:
    return f"echo: {request.last_user_message if request.messages is not None else request.text}"


def split_words(text: str) -> list[str]:
    """Chunks that concatenate back to `text`: each word with the whitespace before it."""
    chunks = re.findall(r"\s*\S+", text)
    tail = text[sum(map(len, chunks)) :]
    if tail:
        if chunks:
            chunks[-1] += tail
        else:
            chunks = [tail]
    return chunks


@dataclass(frozen=True)
class EchoStatistics:
    """A snapshot of one echo provider (`EchoProvider.statistics()`)."""

    served: int  # attempts that produced an answer
    concurrency: int  # cap on generations served at once; 0 = unlimited
    latency_ms: tuple[float, float]  # (min, max) milliseconds slept before the first chunk
    failure_rate: float  # probability that an attempt fails
    word_delay_ms: float  # milliseconds slept between consecutive chunks


class EchoProvider(BaseProvider):
    name = "echo"

    def __init__(
        self,
        *,
        latency_ms: tuple[float, float] = (0.0, 0.0),
        failure_rate: float = 0.0,
        seed: int = 0,
        concurrency: int = 0,
        word_delay_ms: float = 0.0,
    ) -> None:
        self.latency_ms = latency_ms
        self.failure_rate = failure_rate
        self.concurrency = concurrency
        self.word_delay_ms = word_delay_ms  # read per pause, so a test may change it mid-stream
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._thread_slots = threading.BoundedSemaphore(concurrency) if concurrency else None
        self._trio_slots: Any = None  # a trio.Semaphore, made on first async use
        self.served = 0  # attempts that produced an answer

    @classmethod
    def from_settings(cls, settings: Settings) -> EchoProvider:
        echo: EchoSettings = settings.echo
        return cls(
            latency_ms=echo.latency_ms, failure_rate=echo.failure_rate, seed=echo.seed, concurrency=echo.concurrency,
            word_delay_ms=echo.word_delay_ms,
        )

    def available(self) -> Readiness:
        return Readiness(True, "built in: answers 'echo: <prompt>' (for smoke and load tests)")

    def models(self) -> tuple[str, ...]:
        return (MODEL,)

    def model_identity(self, model: str | None) -> str:
        return MODEL  # the answer never depends on the model asked for

    def accelerator(self) -> str:
        return "cpu"

    def capacity(self) -> int | None:
        """`concurrency`, or None when it is 0 (unlimited)."""
        return self.concurrency or None

    def answer_text(self, request: ProviderRequest) -> str:
        """The answer to `request` (a subclass may answer otherwise: tests/fakes/lying_daemon.py)."""
        return echo_text(request)

    def _draw(self) -> tuple[float, bool]:
        """Per attempt: the latency in seconds and whether this attempt fails."""
        lo, hi = self.latency_ms
        with self._rng_lock:
            latency = lo if lo == hi else self._rng.uniform(lo, hi)
            fails = self.failure_rate > 0 and self._rng.random() < self.failure_rate
        return latency / 1000.0, fails

    def _word_delay(self, i: int, chunks: list[str]) -> tuple[float, str]:
        """The pause before chunk `i` (> 0) in seconds, and what to call it if it passes the deadline."""
        delay = self.word_delay_ms / 1000.0
        return delay, f"word delay {delay:.3f} s before word {i + 1} of {len(chunks)}"

    def _pause_sync(self, seconds: float, what: str, deadline: float) -> None:
        """Sleep `seconds`, or until `deadline` (`time.monotonic()`) and raise `ProviderTimeout`."""
        if not seconds:
            return
        left = deadline - time.monotonic()
        if seconds > left:
            time.sleep(max(left, 0.0))
            raise ProviderTimeout(self.name, f"{what} exceeds the deadline")
        time.sleep(seconds)

    async def _pause(self, seconds: float, what: str, deadline: float) -> None:
        """Sleep `seconds`, or until `deadline` (`trio.current_time()`) and raise `ProviderTimeout`."""
        import trio

        if not seconds:
            return
        if trio.current_time() + seconds > deadline:
            await trio.sleep_until(deadline)
            raise ProviderTimeout(self.name, f"{what} exceeds the deadline")
        await trio.sleep(seconds)

    def _completion(self, request: ProviderRequest, chunks: list[str]) -> Completion:
        self.served += 1
        return Completion(
            text="".join(chunks),
            model=MODEL,
            prompt_tokens=len(request.text.split()),
            completion_tokens=len(chunks),
        )

    def complete_sync(self, request: ProviderRequest) -> Completion:
        deadline = time.monotonic() + request.timeout
        latency, fails = self._draw()
        slots = self._thread_slots
        if slots is not None and not slots.acquire(timeout=request.timeout):
            raise ProviderTimeout(self.name, f"no free slot within {request.timeout:g} s")
        try:
            self._pause_sync(latency, f"latency {latency:.3f} s", deadline)
            if fails:
                raise ProviderFailed(self.name, "injected failure (echo.failure_rate)", retryable=True)
            chunks = split_words(self.answer_text(request))
            for i in range(1, len(chunks)):
                self._pause_sync(*self._word_delay(i, chunks), deadline)
            return self._completion(request, chunks)
        finally:
            if slots is not None:
                slots.release()

    async def astream(self, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        import trio

        deadline = trio.current_time() + request.timeout
        latency, fails = self._draw()
        if self.concurrency and self._trio_slots is None:
            self._trio_slots = trio.Semaphore(self.concurrency)
        slots = self._trio_slots
        if slots is not None:
            await slots.acquire()
        try:
            await self._pause(latency, f"latency {latency:.3f} s", deadline)
            if fails:
                raise ProviderFailed(self.name, "injected failure (echo.failure_rate)", retryable=True)
            chunks = split_words(self.answer_text(request))
            for i, chunk in enumerate(chunks):
                if i:
                    await self._pause(*self._word_delay(i, chunks), deadline)
                yield chunk
            yield self._completion(request, chunks)
        finally:
            if slots is not None:
                slots.release()

    def statistics(self) -> EchoStatistics:
        return EchoStatistics(served=self.served, concurrency=self.concurrency, latency_ms=self.latency_ms,
                              failure_rate=self.failure_rate, word_delay_ms=self.word_delay_ms)

    def __repr__(self) -> str:
        s = self.statistics()
        lo, hi = s.latency_ms
        latency = f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"
        return (f"<EchoProvider served={s.served} concurrency={s.concurrency or 'unlimited'} "
                f"latency_ms={latency} failure_rate={s.failure_rate:g} word_delay_ms={s.word_delay_ms:g}>")
