"""Providers with scripted behaviour, implementing the real provider interface."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from node.errors import ProviderError, ProviderFailed
from node.providers.base import BaseProvider, Completion, ProviderRequest, Readiness


class ScriptedProvider(BaseProvider):
    """Answers ``"<name>: <prompt>"``; `script` lists, per attempt, an exception to raise or None.

    After the script runs out every attempt succeeds. `latency` is slept before answering
    (real time in sync code, trio time in async code). `calls` counts attempts.
    """

    def __init__(
        self,
        name: str,
        script: Sequence[BaseException | None] = (),
        *,
        latency: float = 0.0,
        ready: Readiness = Readiness(True, "ready (scripted)"),
        chunks: int = 3,
    ) -> None:
        self.name = name  # type: ignore[misc]
        self.script = list(script)
        self.latency = latency
        self.ready = ready
        self.chunks = chunks
        self.calls = 0
        self.cancelled = 0
        self._lock = threading.Lock()

    def available(self) -> Readiness:
        return self.ready

    def models(self) -> tuple[str, ...]:
        return (f"{self.name}-model",)

    def _next(self) -> BaseException | None:
        with self._lock:
            self.calls += 1
            return self.script.pop(0) if self.script else None

    def answer(self, request: ProviderRequest) -> str:
        return f"{self.name}: {request.text}"

    def complete_sync(self, request: ProviderRequest) -> Completion:
        failure = self._next()
        if self.latency:
            time.sleep(self.latency)
        if failure is not None:
            raise failure
        return Completion(self.answer(request), model=request.model or self.default_model())

    async def astream(self, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        import trio

        failure = self._next()
        try:
            if self.latency:
                await trio.sleep(self.latency)
            if failure is not None:
                raise failure
            text = self.answer(request)
            step = max(1, len(text) // self.chunks)
            for i in range(0, len(text), step):
                yield text[i : i + step]
                await trio.sleep(0)
            yield Completion(text, model=request.model or self.default_model())
        except trio.Cancelled:
            self.cancelled += 1
            raise


def failing(name: str, message: str = "scripted failure", **kw: Any) -> ProviderError:
    return ProviderFailed(name, message, **kw)


class SeedStyleProvider:
    """Exactly the seed's documented custom provider: a plain class with generate()."""

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, prompt, *, model_name=None, **kwargs):  # noqa: ANN001, ANN201 - seed signature
        self.calls += 1
        return "response"


class GatedProvider(BaseProvider):
    """Answers ``"<name>: <prompt>"`` once `open()` is called: every request waits at the gate, so a
    test can fill a node's slots and queue, look at them, then let everything through at once.

    `waiting` counts requests at the gate now; `answered` those that went through. Async only.
    """

    def __init__(self, name: str = "gate") -> None:
        self.name = name  # type: ignore[misc]
        self.waiting = 0
        self.answered = 0
        self._gate: Any = None  # a trio.Event, made in the loop of the first request

    def models(self) -> tuple[str, ...]:
        return (f"{self.name}-model",)

    def accelerator(self) -> str:
        return "cpu"

    def open(self) -> None:
        if self._gate is not None:
            self._gate.set()

    async def astream(self, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        import trio

        if self._gate is None:
            self._gate = trio.Event()
        self.waiting += 1
        try:
            await self._gate.wait()
        finally:
            self.waiting -= 1
        self.answered += 1
        text = f"{self.name}: {request.text}"
        yield text
        yield Completion(text, model=request.model or self.default_model())
