"""`codex_cli`: answers by running the OpenAI Codex CLI (npm ``@openai/codex``) non-interactively.

The command (every flag is in ``codex exec --help`` of codex-cli 0.171.0, recorded in
tests/fixtures/cli/codex/exec-help.txt)::

    codex exec --json --skip-git-repo-check --ephemeral --sandbox read-only --color never [--model MODEL] -

- ``exec``: "Run Codex non-interactively"; it never asks for approval.
- ``-`` as the prompt: the prompt is read from stdin, which is a file holding `request.text`
  (no 128 KiB argv limit, and the prompt is not shown by ``ps``).
- ``--json``: "Print events to stdout as JSONL" (below).
- ``--skip-git-repo-check``: the run's working directory is an empty scratch directory, not a
  git repository.
- ``--ephemeral``: no session files are persisted: each request is a one-off.
- ``--sandbox read-only``: commands the model runs cannot write; we only want a text answer.
- ``--color never``: no ANSI codes in anything printed.
- ``--model MODEL`` only when a model is asked for (the request's, else ``[providers.codex_cli] model``).

Output: JSONL events (``thread.started``, ``turn.started``, ``item.started`` / ``item.completed``,
``turn.completed`` with ``usage``, ``turn.failed``, ``error``). Codex streams no token deltas in
this mode: an assistant message arrives whole, as an ``item.completed`` whose ``item.type`` is
``agent_message``. Each such message is one chunk (messages after the first are preceded by a
blank line), so a short answer usually arrives as a single chunk. ``error`` events are not fatal
(codex prints "Reconnecting... 2/5" as ``error`` events and retries); ``turn.failed`` is.

Login: codex calls the API without checking credentials first, so "not logged in" shows up as
the API's refusal (``unexpected status 401 Unauthorized: ...`` in an ``error`` / ``turn.failed``
event) or as codex's own wording ("Not logged in", "sign in again", "codex login"): both are
matched and raised as `ProviderAuthError`.

Request params: ``max_tokens`` and ``temperature`` are ignored: ``codex exec`` has no flags for them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from node.providers.base import ProviderRequest
from node.providers.cli_base import CLIProvider, JSONLParser, OutputParser, as_int, as_text

__all__ = ["CodexCLIProvider", "CodexParser"]


class CodexParser(JSONLParser):
    """Reads ``codex exec --json`` events."""

    def __init__(self) -> None:
        super().__init__()
        self._items = 0

    def feed_event(self, event: Mapping[str, Any]) -> list[str]:
        kind = event.get("type")
        if kind == "item.completed":
            item = event.get("item")
            if isinstance(item, dict) and item.get("type") == "agent_message":
                self._items += 1
                return self.message_text(item.get("id", self._items), as_text(item.get("text")) or "")
            if isinstance(item, dict) and item.get("type") == "error":
                self.warning = as_text(item.get("message")) or self.warning
        elif kind == "turn.completed":
            usage = event.get("usage")
            if isinstance(usage, dict):
                self.prompt_tokens = as_int(usage.get("input_tokens"))
                self.completion_tokens = as_int(usage.get("output_tokens"))
        elif kind == "turn.failed":
            error = event.get("error")
            message = as_text(error.get("message")) if isinstance(error, dict) else None
            self.error = message or "the turn failed"
        elif kind == "error":
            self.warning = as_text(event.get("message")) or self.warning
        return []


class CodexCLIProvider(CLIProvider):
    name = "codex_cli"
    default_binary = "codex"
    package = "@openai/codex"
    login_hint = "codex is not logged in: run `codex login` (or pipe an API key to `codex login --with-api-key`)"
    login_pattern = re.compile(
        r"401 Unauthorized|not logged in|not signed in|sign in again|codex login|no Codex credentials"
        r"|Missing bearer|invalid_api_key|Incorrect API key",
        re.IGNORECASE,
    )

    def argv(self, request: ProviderRequest) -> list[str]:
        argv = [self.binary, "exec", "--json", "--skip-git-repo-check", "--ephemeral", "--sandbox", "read-only"]
        argv += ["--color", "never"]
        model = self.request_model(request)
        if model:
            argv += ["--model", model]
        return [*argv, "-"]

    def stdin_text(self, request: ProviderRequest) -> str | None:
        return request.text

    def new_parser(self) -> OutputParser:
        return CodexParser()
