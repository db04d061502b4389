"""`gemini_cli`: answers by running the Google Gemini CLI (npm ``@google/gemini-cli``) non-interactively.

The command (every flag is in ``gemini --help`` of gemini-cli 0.61.0, recorded in
tests/fixtures/cli/gemini/help.txt)::

    gemini --output-format stream-json --approval-mode plan --skip-trust [--model MODEL] --prompt=PROMPT

- ``--prompt=PROMPT``: "Run in non-interactive (headless) mode with the given prompt"; the ``=``
  form keeps a prompt that starts with ``-`` a value. stdin is /dev/null, because gemini
  prepends whatever stdin holds to the prompt. A prompt over 128 KiB fails with `ProviderFailed`
  before anything runs.
- ``--output-format stream-json``: JSONL events, streamed (below).
- ``--approval-mode plan``: "read-only mode"; we only want a text answer.
- ``--skip-trust``: "Trust the current workspace for this session". Headless gemini refuses to
  run in an untrusted directory, and without trust it also drops ``plan`` back to ``default``;
  the workspace is the run's empty scratch directory.
- ``--model MODEL`` only when a model is asked for (the request's, else ``[providers.gemini_cli] model``).

Output: JSONL events ``init`` (``model``), ``message`` (``role: "assistant"``, ``delta: true``:
the text chunks), ``tool_use`` / ``tool_result``, ``error`` (``severity`` warning or error) and
``result`` (``status`` success or error, ``stats.input_tokens`` / ``stats.output_tokens``).

Login: without credentials gemini prints "Please set an Auth method in your .../settings.json or
specify one of the following environment variables before running: GEMINI_API_KEY, ..." on
stderr and exits 41, its FATAL_AUTHENTICATION_ERROR (tests/fixtures/cli/gemini/not-logged-in.txt).

Request params: ``max_tokens`` and ``temperature`` are ignored: gemini has no flags for them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from node.providers.base import ProviderRequest
from node.providers.cli_base import CLIProvider, JSONLParser, OutputParser, as_int, as_text, prompt_argument

__all__ = ["GeminiCLIProvider", "GeminiParser"]

FATAL_AUTHENTICATION_ERROR = 41  # gemini's exit status when no auth method is set or it is refused


class GeminiParser(JSONLParser):
    """Reads ``gemini --output-format stream-json`` events."""

    def __init__(self) -> None:
        super().__init__()
        self._turn = 0  # tool calls split the answer into messages

    def feed_event(self, event: Mapping[str, Any]) -> list[str]:
        kind = event.get("type")
        if kind == "init":
            self.model = as_text(event.get("model")) or self.model
        elif kind == "message" and event.get("role") == "assistant":
            return self.message_text(self._turn, as_text(event.get("content")) or "")
        elif kind == "tool_use":
            self._turn += 1
        elif kind == "error":
            self.warning = as_text(event.get("message")) or self.warning
        elif kind == "result":
            stats = event.get("stats")
            if isinstance(stats, dict):
                self.prompt_tokens = as_int(stats.get("input_tokens"))
                self.completion_tokens = as_int(stats.get("output_tokens"))
            if event.get("status") == "error":
                error = event.get("error")
                message = as_text(error.get("message")) if isinstance(error, dict) else None
                self.error = message or self.warning or "the run ended with status error"
        return []


class GeminiCLIProvider(CLIProvider):
    name = "gemini_cli"
    default_binary = "gemini"
    package = "@google/gemini-cli"
    login_hint = (
        "gemini is not logged in: run `gemini` once to choose an auth method, "
        "or set GEMINI_API_KEY (or GOOGLE_GENAI_USE_VERTEXAI / GOOGLE_GENAI_USE_GCA)"
    )
    login_pattern = re.compile(
        r"set an Auth method|GEMINI_API_KEY|API key not valid|UNAUTHENTICATED|not (?:logged|signed) in",
        re.IGNORECASE,
    )
    auth_exit_codes = frozenset({FATAL_AUTHENTICATION_ERROR})

    def argv(self, request: ProviderRequest) -> list[str]:
        argv = [self.binary, "--output-format", "stream-json", "--approval-mode", "plan", "--skip-trust"]
        model = self.request_model(request)
        if model:
            argv += ["--model", model]
        return [*argv, prompt_argument(self.name, "--prompt", request.text)]

    def new_parser(self) -> OutputParser:
        return GeminiParser()
