"""One harness per provider: how to build it ready, unready, slow and failing, with its fake world.

The conformance checks in test_providers.py run against every harness listed in `HARNESSES`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import ModelNotFound, ProviderAuthError, ProviderError, ProviderFailed
from node.providers.base import BaseProvider, PlainProvider, ProviderRequest, Readiness


def request(prompt: str = "hello conformance world", model: str | None = None, **params: Any) -> ProviderRequest:
    return ProviderRequest("generate", prompt, None, model, params=params, timeout=30.0)


@dataclass
class Case:
    provider: BaseProvider
    request: ProviderRequest


@dataclass
class Harness:
    """How the conformance checks drive one provider. Each callable takes a tmp dir."""

    name: str
    ready: Callable[[Path], contextlib.AbstractContextManager[Case]]  # a normal request that answers
    slow: Callable[[Path], contextlib.AbstractContextManager[Case]]  # takes many seconds unless cancelled
    failing: Callable[[Path], contextlib.AbstractContextManager[Case]]  # raises `error`
    error: type[ProviderError]
    unready: Callable[[Path], BaseProvider] | None = None  # None: this provider is always ready
    unready_hint: str = ""  # a word the unready reason must contain (how to fix it)
    expected: Callable[[str], str] | None = None  # the exact answer to a prompt, when deterministic
    # Whether complete_sync honours request.timeout (raising ProviderTimeout). False only for a plain
    # seed-style object: plain synchronous code cannot be interrupted (docs/router.md), so its late
    # answer is still returned.
    sync_deadline: bool = True


# -- echo -------------------------------------------------------------------------------------


def _echo(**kw: Any) -> Callable[[Path], contextlib.AbstractContextManager[Case]]:
    from node.providers.echo import EchoProvider

    @contextlib.contextmanager
    def make(tmp: Path) -> Iterator[Case]:
        yield Case(EchoProvider(**kw), request())

    return make


ECHO = Harness(
    "echo", ready=_echo(), slow=_echo(latency_ms=(60_000.0, 60_000.0)), failing=_echo(failure_rate=1.0),
    error=ProviderFailed, expected=lambda prompt: f"echo: {prompt}",
)


# -- a seed-style plain object ----------------------------------------------------------------


SLOW_SECONDS = 30.0  # a "slow" case: far past every promptness check (0.5 s + 2 s), so those checks can fail
LATE_SECONDS = 0.6  # a "late" seed-style answer: past a 0.2 s deadline, short enough to wait for


class SeedStyle:
    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode

    def generate(self, prompt, *, model_name=None, **kwargs):  # noqa: ANN001, ANN201 - the seed signature
        if self.mode == "slow":
            time.sleep(SLOW_SECONDS)
        if self.mode == "late":
            time.sleep(LATE_SECONDS)
        if self.mode == "fail":
            raise RuntimeError("the wrapped tool crashed")
        return f"plain: {prompt}"

    def available(self):  # noqa: ANN201
        return self.mode != "unready" or (False, "set PLAIN_TOKEN to enable it")


def _plain(mode: str) -> Callable[[Path], contextlib.AbstractContextManager[Case]]:
    @contextlib.contextmanager
    def make(tmp: Path) -> Iterator[Case]:
        yield Case(PlainProvider("plain", SeedStyle(mode)), request())

    return make


PLAIN = Harness(
    "seed_style_object", ready=_plain("ok"), slow=_plain("slow"), failing=_plain("fail"), error=ProviderFailed,
    unready=lambda tmp: PlainProvider("plain", SeedStyle("unready")), unready_hint="PLAIN_TOKEN",
    expected=lambda prompt: f"plain: {prompt}", sync_deadline=False,
)


# -- hf_local on the embedded tiny model ------------------------------------------------------

_hf: dict[str, Any] = {}


def _hf_provider(batching: str) -> BaseProvider:
    from node.providers.hf_local import HFLocalProvider

    if batching not in _hf:  # one loaded model per mode for the whole session
        _hf[batching] = HFLocalProvider(max_new_tokens=16, batching=batching)
    return _hf[batching]


def _hf_case(req: ProviderRequest, batching: str) -> Callable[[Path], contextlib.AbstractContextManager[Case]]:
    @contextlib.contextmanager
    def make(tmp: Path) -> Iterator[Case]:
        yield Case(_hf_provider(batching), req)

    return make


HF_SLOW_TOKEN_SECONDS = 0.05  # each forward pass of the slow case sleeps this long, on any CPU


def _hf_slow(batching: str) -> Callable[[Path], contextlib.AbstractContextManager[Case]]:
    return lambda tmp: _hf_slow_case(batching)


@contextlib.contextmanager
def _hf_slow_case(batching: str) -> Iterator[Case]:
    """The real embedded model, made slow: every forward pass sleeps, and end-of-text cannot come
    before 900 tokens (min_new_tokens; batched, where the manager's own config applies: the
    embedded model's greedy answer has none), so the answer takes many seconds however fast the
    CPU, unless it is stopped."""
    from node.providers.hf_local import HFLocalProvider

    provider = HFLocalProvider(max_new_tokens=16, batching=batching)  # its own model: the hook stays private
    loaded = provider.load()
    loaded.model.generation_config.min_new_tokens = 900

    def slow_forward(*args: Any) -> None:
        time.sleep(HF_SLOW_TOKEN_SECONDS)

    handle = loaded.model.register_forward_hook(slow_forward)
    try:
        yield Case(provider, request(max_tokens=1000))
    finally:
        handle.remove()


def _hf_unready(tmp: Path) -> BaseProvider:
    from node.providers.hf_local import HFLocalProvider

    return HFLocalProvider(models=(str(tmp / "no-such-model"),))


HF_LOCAL = Harness(
    "hf_local", ready=_hf_case(request(), "on"), slow=_hf_slow("on"),
    failing=_hf_case(request(model="/nonexistent/model"), "on"), error=ModelNotFound,
    unready=_hf_unready, unready_hint="not available locally",
)
HF_LOCAL_UNBATCHED = Harness(
    "hf_local_unbatched", ready=_hf_case(request(), "off"), slow=_hf_slow("off"),
    failing=_hf_case(request(model="/nonexistent/model"), "off"), error=ModelNotFound,
    unready=_hf_unready, unready_hint="not available locally",
)


# -- openai_compatible against a loopback HTTP server ------------------------------------------


def _openai(model: str) -> Callable[[Path], contextlib.AbstractContextManager[Case]]:
    from node.providers.openai_compatible import OpenAICompatibleProvider
    from tests.fakes.openai_server import FakeOpenAIServer

    @contextlib.contextmanager
    def make(tmp: Path) -> Iterator[Case]:
        with FakeOpenAIServer(api_key="sk-test", slow_seconds=20.0) as server:
            provider = OpenAICompatibleProvider(base_url=server.base_url, api_key="sk-test", default_model=model)
            yield Case(provider, request())

    return make


def _openai_unready(tmp: Path) -> BaseProvider:
    from node.providers.openai_compatible import OpenAICompatibleProvider

    return OpenAICompatibleProvider()


OPENAI = Harness(
    "openai_compatible", ready=_openai("gpt-test"), slow=_openai("slow"), failing=_openai("auth"),
    error=ProviderAuthError, unready=_openai_unready, unready_hint="base_url",
    expected=lambda prompt: f"answer to: {prompt}",
)


# -- copilot_sdk against a fake Copilot CLI runtime ---------------------------------------------


def _copilot(scenario: str) -> Callable[[Path], contextlib.AbstractContextManager[Case]]:
    from node.providers.copilot_sdk import CopilotSDKProvider
    from tests.fakes.copilot_cli import FakeCLI

    @contextlib.contextmanager
    def make(tmp: Path) -> Iterator[Case]:
        cli = FakeCLI(tmp, scenario)
        yield Case(CopilotSDKProvider(cli_path=str(cli.path), timeout=60.0), request())

    return make


def _copilot_unready(tmp: Path) -> BaseProvider:
    from node.providers.copilot_sdk import CopilotSDKProvider

    return CopilotSDKProvider(cli_path=str(tmp / "no-copilot-here"))


COPILOT_SDK = Harness(
    "copilot_sdk", ready=_copilot("ok"), slow=_copilot("hang"), failing=_copilot("logged-out"),
    error=ProviderAuthError, unready=_copilot_unready, unready_hint="npm install",
)


# -- the command-line tools against their strict fakes (tests/fakes/cli) -----------------------


def _cli(provider_path: str, tool: str, mode: str) -> Callable[[Path], contextlib.AbstractContextManager[Case]]:
    import importlib
    import shlex
    import sys

    from tests.fakes.cli import FAKE_CLI

    module_name, _, class_name = provider_path.partition(":")

    @contextlib.contextmanager
    def make(tmp: Path) -> Iterator[Case]:
        binary = tmp / f"{tool}-{mode}"
        binary.write_text(
            f"#!/bin/sh\nFAKE_CLI_TOOL={tool} FAKE_CLI_MODE={mode} FAKE_CLI_PIDFILE={shlex.quote(str(tmp / 'pid'))} "
            f"exec {shlex.quote(sys.executable)} {shlex.quote(str(FAKE_CLI))} \"$@\"\n"
        )
        binary.chmod(0o755)
        cls = getattr(importlib.import_module(module_name), class_name)
        yield Case(cls(binary=str(binary), timeout=60.0), request())

    return make


def _cli_unready(provider_path: str) -> Callable[[Path], BaseProvider]:
    import importlib

    module_name, _, class_name = provider_path.partition(":")
    return lambda tmp: getattr(importlib.import_module(module_name), class_name)(binary=str(tmp / "missing"))


CLI_HARNESSES = [
    Harness(name, ready=_cli(path, tool, "answer"), slow=_cli(path, tool, "hang"), failing=_cli(path, tool, "login"),
            error=ProviderAuthError, unready=_cli_unready(path), unready_hint="npm install")
    for name, tool, path in [
        ("codex_cli", "codex", "node.providers.codex_cli:CodexCLIProvider"),
        ("copilot_cli", "copilot", "node.providers.copilot_cli:CopilotCLIProvider"),
        ("gemini_cli", "gemini", "node.providers.gemini_cli:GeminiCLIProvider"),
        ("claude_code", "claude", "node.providers.claude_code:ClaudeCodeProvider"),
    ]
]

HARNESSES = [ECHO, PLAIN, HF_LOCAL, HF_LOCAL_UNBATCHED, OPENAI, COPILOT_SDK, *CLI_HARNESSES]


def unready_readiness(h: Harness, tmp: Path) -> Readiness:
    assert h.unready is not None
    return h.unready(tmp).available()
