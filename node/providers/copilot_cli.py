"""`copilot_cli`: answers by running the GitHub Copilot CLI (npm ``@github/copilot``) non-interactively.

The command (every flag is in ``copilot --help`` of GitHub Copilot CLI 1.0.102, recorded in
tests/fixtures/cli/copilot/help.txt)::

    copilot --prompt=PROMPT --output-format json --stream on --no-ask-user --no-custom-instructions
            --disable-builtin-mcps --no-auto-update --no-color
            --deny-tool=shell --deny-tool=write --deny-tool=url [--model MODEL]

- ``--prompt=PROMPT``: "Execute a prompt in non-interactive mode (exits after completion)"; the
  ``=`` form keeps a prompt that starts with ``-`` a value. Copilot takes the prompt only as an
  argument, so a prompt over 128 KiB fails with `ProviderFailed` before anything runs.
- ``--output-format json``: "JSONL, one JSON object per line" (below); ``--stream on`` asks for
  streaming, so the answer arrives as ``assistant.message_delta`` events.
- No ``--allow-all-tools`` / ``--allow-tool``: without them every tool call that needs
  permission is denied in prompt mode (``--no-ask-user`` also removes the ask-the-user tool),
  and ``--deny-tool=shell --deny-tool=write --deny-tool=url`` denies running commands, writing
  files and fetching URLs outright ("Denial rules always take precedence", ``copilot help
  permissions``). We only want a text answer.
- ``--no-custom-instructions``, ``--disable-builtin-mcps``: no AGENTS.md, no GitHub MCP server.
- ``--no-auto-update``: a request never downloads a new CLI; ``--no-color``: plain text.
- ``--model MODEL`` only when a model is asked for (the request's, else ``[providers.copilot_cli] model``).

Output: JSONL events ``{"type", "id", "timestamp", "data", ...}``. Text comes from
``assistant.message_delta`` (``data.deltaContent``, per ``data.messageId``); an
``assistant.message`` (``data.content``) whose deltas did not arrive is used whole; ``result``
closes the run (``exitCode``); ``assistant.usage`` carries token counts when present.

Login: without credentials copilot exits 1 before any output, printing "Error: No authentication
information found." on stderr (tests/fixtures/cli/copilot/not-logged-in.txt).

Request params: ``max_tokens`` and ``temperature`` are ignored: copilot has no flags for them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from node.providers.base import ProviderRequest
from node.providers.cli_base import CLIProvider, JSONLParser, OutputParser, as_int, as_text, prompt_argument

__all__ = ["CopilotCLIProvider", "CopilotParser"]


class CopilotParser(JSONLParser):
    """Reads ``copilot --output-format json`` events."""

    def __init__(self) -> None:
        super().__init__()
        self._streamed: set[object] = set()

    def feed_event(self, event: Mapping[str, Any]) -> list[str]:
        kind = event.get("type")
        data = event.get("data")
        data = data if isinstance(data, dict) else {}
        if kind == "assistant.message_delta":
            message_id = data.get("messageId")
            self._streamed.add(message_id)
            return self.message_text(message_id, as_text(data.get("deltaContent")) or "")
        if kind == "assistant.message":
            self.model = as_text(data.get("model")) or self.model
            message_id = data.get("messageId")
            if message_id not in self._streamed:
                return self.message_text(message_id, as_text(data.get("content")) or "")
        elif kind == "assistant.usage":
            self.model = as_text(data.get("model")) or self.model
            for attr, key in (("prompt_tokens", "inputTokens"), ("completion_tokens", "outputTokens")):
                count = as_int(data.get(key))
                if count is not None:
                    setattr(self, attr, (getattr(self, attr) or 0) + count)
        elif kind == "session.error":
            self.warning = as_text(data.get("message")) or self.warning
        elif kind == "result":
            code = as_int(event.get("exitCode"))
            if code:
                self.error = self.warning or f"the session ended with exit code {code}"
        return []


class CopilotCLIProvider(CLIProvider):
    name = "copilot_cli"
    default_binary = "copilot"
    package = "@github/copilot"
    login_hint = (
        "copilot is not logged in: run `copilot login` "
        "(or set COPILOT_GITHUB_TOKEN, GH_TOKEN or GITHUB_TOKEN)"
    )
    login_pattern = re.compile(
        r"No authentication information found|not (?:logged|signed) in|/login|authenticate|401 Unauthorized",
        re.IGNORECASE,
    )

    def argv(self, request: ProviderRequest) -> list[str]:
        argv = [
            self.binary,
            prompt_argument(self.name, "--prompt", request.text),
            "--output-format", "json",
            "--stream", "on",
            "--no-ask-user",
            "--no-custom-instructions",
            "--disable-builtin-mcps",
            "--no-auto-update",
            "--no-color",
            "--deny-tool=shell",
            "--deny-tool=write",
            "--deny-tool=url",
        ]  # fmt: skip
        model = self.request_model(request)
        if model:
            argv += ["--model", model]
        return argv

    def new_parser(self) -> OutputParser:
        return CopilotParser()
