"""`claude_code`: answers by running Anthropic's Claude Code CLI (npm ``@anthropic-ai/claude-code``) headless.

The command (every flag is in ``claude --help`` of Claude Code 2.1.332, recorded in
tests/fixtures/cli/claude/help.txt)::

    claude -p --output-format stream-json --verbose --include-partial-messages --tools=
           --strict-mcp-config --no-session-persistence --permission-prompts none [--model MODEL]

- ``-p``: "Print response and exit"; with no prompt argument the prompt is read from stdin,
  which is a file holding `request.text` (no 128 KiB argv limit, not shown by ``ps``).
- ``--output-format stream-json``: "realtime streaming" JSONL (below); claude refuses it in
  print mode without ``--verbose`` ("When using --print, --output-format=stream-json requires
  --verbose"). ``--include-partial-messages`` adds the text deltas as they arrive.
- ``--tools=``: "Built-in tools to make available: "" for none"; ``--strict-mcp-config`` with no
  ``--mcp-config``: no MCP servers either. We only want a text answer.
- ``--permission-prompts none``: anything that would still prompt is denied, never waited on.
- ``--no-session-persistence``: each request is a one-off; nothing is saved to resume.
- ``--model MODEL`` only when a model is asked for (the request's, else ``[providers.claude_code] model``).

Output: JSONL messages ``system`` (``subtype: "init"``, ``model``), ``stream_event`` (Anthropic
streaming events; ``content_block_delta`` with a ``text_delta`` is a text chunk), ``assistant``
(a whole message: used when its deltas did not arrive), ``result`` (``is_error``, ``result`` text,
``usage.input_tokens`` / ``usage.output_tokens``).

Login: without credentials claude prints an ``assistant`` message with ``"error":
"authentication_failed"`` and text "Not logged in · Please run /login", then a ``result`` with
``is_error: true``, and exits 1 (tests/fixtures/cli/claude/not-logged-in.txt). That text is not
passed on as answer text.

Request params: ``max_tokens`` and ``temperature`` are ignored: claude has no flags for them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from node.providers.base import ProviderRequest
from node.providers.cli_base import CLIProvider, JSONLParser, OutputParser, as_int, as_text

__all__ = ["ClaudeCodeProvider", "ClaudeParser"]


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "".join(
        block["text"]
        for block in content
        if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)
    )


class ClaudeParser(JSONLParser):
    """Reads ``claude -p --output-format stream-json --verbose --include-partial-messages`` messages."""

    def __init__(self) -> None:
        super().__init__()
        self._current: object = None  # the id of the message being streamed
        self._streamed: set[object] = set()
        self._result: str | None = None

    def feed_event(self, event: Mapping[str, Any]) -> list[str]:
        kind = event.get("type")
        if event.get("parent_tool_use_id"):
            return []  # a subagent's messages are not the answer
        if kind == "system" and event.get("subtype") == "init":
            self.model = as_text(event.get("model")) or self.model
        elif kind == "stream_event":
            stream = event.get("event")
            if not isinstance(stream, dict):
                return []
            if stream.get("type") == "message_start":
                message = stream.get("message")
                self._current = message.get("id") if isinstance(message, dict) else None
            elif stream.get("type") == "content_block_delta":
                delta = stream.get("delta")
                if isinstance(delta, dict) and delta.get("type") == "text_delta":
                    self._streamed.add(self._current)
                    return self.message_text(self._current, as_text(delta.get("text")) or "")
        elif kind == "assistant":
            message = event.get("message")
            if not isinstance(message, dict):
                return []
            error = as_text(event.get("error"))
            if error is not None:
                self.auth_failed = self.auth_failed or error == "authentication_failed"
                self.warning = _message_text(message) or error
                return []
            message_id = message.get("id")
            if message_id not in self._streamed:
                return self.message_text(message_id, _message_text(message))
        elif kind == "result":
            usage = event.get("usage")
            if isinstance(usage, dict):
                self.prompt_tokens = as_int(usage.get("input_tokens"))
                self.completion_tokens = as_int(usage.get("output_tokens"))
            result = as_text(event.get("result"))
            if event.get("is_error"):
                self.error = result or self.warning or f"the run ended with {event.get('subtype') or 'an error'}"
            else:
                self._result = result
        return []

    def finish(self) -> list[str]:
        if not self.emitted and self._result:
            return self.message_text("result", self._result)
        return []


class ClaudeCodeProvider(CLIProvider):
    name = "claude_code"
    default_binary = "claude"
    package = "@anthropic-ai/claude-code"
    login_hint = (
        "claude is not logged in: run `claude` and type /login (or run `claude setup-token`), "
        "or set ANTHROPIC_API_KEY"
    )
    login_pattern = re.compile(
        r"Not logged in|/login|Invalid API key|authentication_failed|OAuth token has expired", re.IGNORECASE
    )

    def argv(self, request: ProviderRequest) -> list[str]:
        argv = [
            self.binary,
            "-p",
            "--output-format", "stream-json",
            "--verbose",
            "--include-partial-messages",
            "--tools=",
            "--strict-mcp-config",
            "--no-session-persistence",
            "--permission-prompts", "none",
        ]  # fmt: skip
        model = self.request_model(request)
        if model:
            argv += ["--model", model]
        return argv

    def stdin_text(self, request: ProviderRequest) -> str | None:
        return request.text

    def new_parser(self) -> OutputParser:
        return ClaudeParser()
