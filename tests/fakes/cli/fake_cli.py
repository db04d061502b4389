#!/usr/bin/env python3
"""A strict fake of the codex, copilot, gemini and claude CLIs, built from their recorded help.

Which tool: ``FAKE_CLI_TOOL``, else the basename of argv[0]. The flags accepted are exactly
those of the tool's recorded help (tests/fixtures/cli/<tool>/help.txt, and exec-help.txt for
``codex exec``); any other flag, a missing or surplus value, or a value outside the help's
listed choices exits 2 with the real tool's wording (tests/fixtures/cli/<tool>/unknown-flag.txt;
the real copilot, gemini and claude exit 1 there, codex exits 2). ``--version`` prints the
recorded version.

Behaviour, from the environment:

- ``FAKE_CLI_MODE``: ``answer`` (default) answers ``"<tool>: <prompt>"`` in the tool's real
  output format for the flags given, word by word; codex has no deltas, so it sends the answer
  as two agent messages, ``"codex:"`` and the prompt. ``login`` prints the tool's recorded
  not-logged-in output and exits with the recorded status (codex: the API's 401 as codex
  reports it, since codex cannot be recorded logging in without a network). ``fail`` prints a
  message on stderr and exits 1. ``hang`` starts a grandchild ``sleep 1000``, writes its pid to
  ``FAKE_CLI_PIDFILE`` (and on a second line the process group), then sleeps forever (ignoring SIGTERM if ``FAKE_CLI_IGNORE_TERM=1``).
- ``FAKE_CLI_DELAY``: seconds slept between two chunks of an answer (default 0).

Standard library only, imports kept few: it starts once per test run of a provider.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "cli"
TOOLS = ("codex", "copilot", "gemini", "claude")
USAGE_ERROR = 2


# ---------------------------------------------------------------------------------------
# Recorded help -> accepted options


@dataclass(frozen=True)
class Option:
    names: tuple[str, ...]
    value: str  # "none", "required", "optional" or "variadic"
    choices: tuple[str, ...] = ()


@dataclass
class Grammar:
    options: dict[str, Option] = field(default_factory=dict)

    def add(self, option: Option) -> None:
        for name in option.names:
            self.options[name] = option


_NAME = re.compile(r"^--?[A-Za-z0-9][A-Za-z0-9-]*$")
_CHOICES = (
    re.compile(r"\[possible values: ([^\]]*)\]"),
    re.compile(r"\[choices: ([^\]]*)\]"),
    re.compile(r"\(choices: ((?:\"[^\"]*\",?\s*)+)"),
)


def _choices(block: str) -> tuple[str, ...]:
    text = " ".join(block.split())
    for pattern in _CHOICES:
        match = pattern.search(text)
        if match:
            return tuple(item.strip().strip('"') for item in match.group(1).split(",") if item.strip())
    return ()


def parse_help(text: str) -> Grammar:
    """The options a help text declares: names, whether they take a value, and listed choices."""
    grammar = Grammar()
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"^\s{1,10}-", line)]
    for n, i in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        block = "\n".join(lines[i:end])
        head = lines[i].strip()
        spec = re.split(r"\s{2,}", head, maxsplit=1)[0]
        description = head[len(spec) :]
        names: list[str] = []
        value = "none"
        for token in spec.replace(",", " ").split():
            if _NAME.match(token):
                names.append(token)
            elif token.startswith("<"):
                value = "variadic" if "..." in token else "required"
            elif token.startswith("["):
                value = "optional"
            elif token == "...":
                value = "variadic"
        if value == "none" and re.search(r"\[(string|array|number)\]", description):
            value = "variadic" if "[array]" in description else "required"
        if names:
            grammar.add(Option(tuple(names), value, _choices(block)))
    return grammar


# ---------------------------------------------------------------------------------------
# Command line


class UsageError(Exception):
    def __init__(self, flag: str, reason: str = "unknown") -> None:
        super().__init__(flag)
        self.flag, self.reason = flag, reason


@dataclass
class Parsed:
    flags: dict[str, list[str]] = field(default_factory=dict)
    positionals: list[str] = field(default_factory=list)

    def has(self, *names: str) -> bool:
        return any(name in self.flags for name in names)

    def get(self, *names: str) -> str | None:
        for name in names:
            if name in self.flags:
                return self.flags[name][-1] if self.flags[name] else ""
        return None


def parse_args(grammar: Grammar, args: list[str]) -> Parsed:
    parsed = Parsed()
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            parsed.positionals += args[i:]
            break
        if not arg.startswith("-") or arg == "-":
            parsed.positionals.append(arg)
            continue
        name, eq, inline = arg.partition("=")
        option = grammar.options.get(name)
        if option is None:
            raise UsageError(name)
        key = option.names[-1]
        values: list[str] = []
        if eq:
            if option.value == "none":
                raise UsageError(name, "takes no value")
            values = [inline]
        elif option.value == "required":
            if i >= len(args):
                raise UsageError(name, "needs a value")
            values = [args[i]]
            i += 1
        elif option.value in ("optional", "variadic"):
            while i < len(args) and not args[i].startswith("-"):
                values.append(args[i])
                i += 1
                if option.value == "optional":
                    break
            if option.value == "variadic" and not values:
                raise UsageError(name, "needs a value")
        for value in values:
            if option.choices and value not in option.choices:
                raise UsageError(name, f"invalid value {value!r} (choices: {', '.join(option.choices)})")
        parsed.flags.setdefault(key, []).extend(values)
    return parsed


def usage_error(tool: str, error: UsageError) -> int:
    if error.reason == "unknown":
        recorded = (FIXTURES / tool / "unknown-flag.txt").read_text()
        bare = error.flag.lstrip("-")
        camel = re.sub(r"-([a-z])", lambda m: m.group(1).upper(), bare)
        message = recorded.replace("--bogus-flag", error.flag).replace("bogusFlag", camel).replace("bogus-flag", bare)
    else:
        message = f"error: {error.flag}: {error.reason}\n"
    sys.stderr.write(message)
    return USAGE_ERROR


# ---------------------------------------------------------------------------------------
# Output


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def emit_json(event: dict) -> None:
    emit(json.dumps(event))


def words(text: str) -> list[str]:
    """Chunks that concatenate back to `text`: each word with the whitespace before it."""
    chunks = re.findall(r"\s*\S+", text)
    tail = text[sum(map(len, chunks)) :]
    if tail:
        chunks = [*chunks[:-1], chunks[-1] + tail] if chunks else [tail]
    return chunks


def pause() -> None:
    delay = float(os.environ.get("FAKE_CLI_DELAY", "0") or 0)
    if delay:
        time.sleep(delay)


def recorded_status(tool: str, name: str) -> int:
    for line in (FIXTURES / tool / "exit-status.txt").read_text().splitlines():
        file, _, status = line.rpartition(" ")
        if file == name:
            return int(status)
    raise KeyError(name)


def read_stdin() -> str:
    return sys.stdin.read() if not sys.stdin.isatty() else ""


# ---------------------------------------------------------------------------------------
# The tools


def answer_codex(parsed: Parsed, prompt: str) -> int:
    answer_parts = ["codex:", prompt]
    if not parsed.has("--json"):
        emit("\n\n".join(answer_parts))
        return 0
    emit_json({"type": "thread.started", "thread_id": str(uuid.uuid4())})
    emit_json({"type": "turn.started"})
    for n, text in enumerate(answer_parts):
        if n:
            pause()
        emit_json({"type": "item.completed", "item": {"id": f"item_{n}", "type": "agent_message", "text": text}})
    emit_json({"type": "turn.completed", "usage": {"input_tokens": 7, "cached_input_tokens": 0, "output_tokens": 3}})
    return 0


def answer_copilot(parsed: Parsed, prompt: str) -> int:
    answer = f"copilot: {prompt}"
    if parsed.get("--output-format") != "json":
        for chunk in words(answer):
            sys.stdout.write(chunk)
            sys.stdout.flush()
            pause()
        emit("")
        return 0
    message_id = str(uuid.uuid4())
    model = parsed.get("--model") or "fake-copilot-model"

    def event(kind: str, data: dict, **extra: object) -> None:
        emit_json({"type": kind, "id": str(uuid.uuid4()), "timestamp": "2026-11-26T00:00:00Z", "data": data, **extra})

    event("user.message", {"content": prompt})
    event("assistant.turn_start", {"turnId": "0"})
    if parsed.get("--stream") != "off":
        for n, chunk in enumerate(words(answer)):
            if n:
                pause()
            event("assistant.message_delta", {"messageId": message_id, "deltaContent": chunk}, ephemeral=True)
    event("assistant.message", {"messageId": message_id, "content": answer, "toolRequests": [], "model": model})
    event("assistant.usage", {"model": model, "inputTokens": 7, "outputTokens": 3}, ephemeral=True)
    event("assistant.turn_end", {"turnId": "0"})
    emit_json({"type": "result", "sessionId": str(uuid.uuid4()), "exitCode": 0, "usage": {"premiumRequests": 1}})
    return 0


def answer_gemini(parsed: Parsed, prompt: str) -> int:
    answer = f"gemini: {prompt}"
    form = parsed.get("--output-format") or "text"
    model = parsed.get("--model") or "fake-gemini-model"
    if form == "text":
        for chunk in words(answer):
            sys.stdout.write(chunk)
            sys.stdout.flush()
            pause()
        emit("")
        return 0
    if form == "json":
        emit(json.dumps({"session_id": str(uuid.uuid4()), "response": answer, "stats": {}}, indent=2))
        return 0
    now = "2026-11-26T00:00:00.000Z"
    emit_json({"type": "init", "timestamp": now, "session_id": str(uuid.uuid4()), "model": model})
    emit_json({"type": "message", "timestamp": now, "role": "user", "content": prompt})
    for n, chunk in enumerate(words(answer)):
        if n:
            pause()
        emit_json({"type": "message", "timestamp": now, "role": "assistant", "content": chunk, "delta": True})
    stats = {"total_tokens": 10, "input_tokens": 7, "output_tokens": 3, "duration_ms": 1, "tool_calls": 0}
    emit_json({"type": "result", "timestamp": now, "status": "success", "stats": stats})
    return 0


def answer_claude(parsed: Parsed, prompt: str) -> int:
    answer = f"claude: {prompt}"
    form = parsed.get("--output-format") or "text"
    model = parsed.get("--model") or "fake-claude-model"
    session = str(uuid.uuid4())
    if form == "text":
        emit(answer)
        return 0
    result = {
        "type": "result", "subtype": "success", "is_error": False, "result": answer, "session_id": session,
        "num_turns": 1, "usage": {"input_tokens": 7, "output_tokens": 3},
    }  # fmt: skip
    if form == "json":
        emit_json(result)
        return 0
    tools = [] if parsed.get("--tools") == "" else ["Bash", "Edit", "Read"]
    emit_json({"type": "system", "subtype": "init", "session_id": session, "model": model, "tools": tools})
    message_id = f"msg_{uuid.uuid4().hex[:24]}"

    def stream(event: dict) -> None:
        emit_json({"type": "stream_event", "event": event, "session_id": session, "parent_tool_use_id": None})

    if parsed.has("--include-partial-messages"):
        stream({"type": "message_start", "message": {"id": message_id, "role": "assistant", "content": []}})
        stream({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        for n, chunk in enumerate(words(answer)):
            if n:
                pause()
            stream({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": chunk}})
        stream({"type": "content_block_stop", "index": 0})
        stream({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}})
        stream({"type": "message_stop"})
    message = {"id": message_id, "role": "assistant", "model": model, "content": [{"type": "text", "text": answer}]}
    emit_json({"type": "assistant", "message": message, "parent_tool_use_id": None, "session_id": session})
    emit_json(result)
    return 0


def login(tool: str, parsed: Parsed) -> int:
    if tool == "codex":
        # What codex reports when the API refuses a request without credentials (codex-rs
        # UnexpectedResponseError: "unexpected status {status}: {body}"); inferred, not recorded.
        message = "unexpected status 401 Unauthorized: Missing bearer or basic authentication in header"
        emit_json({"type": "thread.started", "thread_id": str(uuid.uuid4())})
        emit_json({"type": "turn.started"})
        emit_json({"type": "error", "message": message})
        emit_json({"type": "turn.failed", "error": {"message": message}})
        return 1
    if tool == "claude":
        name = "not-logged-in.txt" if parsed.get("--output-format") == "stream-json" else "not-logged-in-text.txt"
        sys.stdout.write((FIXTURES / tool / name).read_text())
        return recorded_status(tool, name)
    sys.stderr.write((FIXTURES / tool / "not-logged-in.txt").read_text())
    return recorded_status(tool, "not-logged-in.txt")


def hang() -> int:
    if os.environ.get("FAKE_CLI_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
    pidfile = os.environ.get("FAKE_CLI_PIDFILE")
    if pidfile:
        with open(pidfile + ".tmp", "w") as fh:
            fh.write(f"{child.pid}\n{os.getpgrp()}\n")  # the grandchild, then the group it is in
        os.replace(pidfile + ".tmp", pidfile)  # readers never see a half-written file
    while True:
        time.sleep(3600)


def main(argv: list[str]) -> int:
    tool = os.environ.get("FAKE_CLI_TOOL") or Path(argv[0]).name.removesuffix(".py")
    if tool not in TOOLS:
        sys.stderr.write(f"fake_cli: unknown tool {tool!r} (set FAKE_CLI_TOOL to one of {', '.join(TOOLS)})\n")
        return USAGE_ERROR
    args = argv[1:]
    if args in (["--version"], ["-V"] if tool == "codex" else ["-v"]):
        sys.stdout.write((FIXTURES / tool / "version.txt").read_text())
        return 0
    subcommand = tool == "codex" and args[:1] in (["exec"], ["e"])
    help_file = "exec-help.txt" if subcommand else "help.txt"
    grammar = parse_help((FIXTURES / tool / help_file).read_text())
    try:
        parsed = parse_args(grammar, args[1:] if subcommand else args)
    except UsageError as exc:
        return usage_error(tool, exc)
    if parsed.has("--help"):
        sys.stdout.write((FIXTURES / tool / help_file).read_text())
        return 0

    if tool == "codex":
        if not subcommand:
            sys.stderr.write("fake codex: only `codex exec` is faked (the interactive TUI is not)\n")
            return USAGE_ERROR
        prompt = parsed.positionals[0] if parsed.positionals else "-"
        if prompt == "-":
            prompt = read_stdin()
    elif tool == "claude":
        if not parsed.has("--print"):
            sys.stderr.write("fake claude: only print mode (-p) is faked\n")
            return USAGE_ERROR
        if parsed.get("--output-format") == "stream-json" and not parsed.has("--verbose"):
            sys.stderr.write("Error: When using --print, --output-format=stream-json requires --verbose\n")
            return 1
        prompt = " ".join(parsed.positionals) or read_stdin()
    else:
        prompt = parsed.get("--prompt")
        if prompt is None:
            sys.stderr.write(f"fake {tool}: only --prompt (non-interactive) mode is faked\n")
            return USAGE_ERROR
        if tool == "gemini":
            piped = read_stdin()
            prompt = f"{piped}\n\n{prompt}" if piped else prompt
    prompt = prompt.strip("\n")

    mode = os.environ.get("FAKE_CLI_MODE", "answer")
    if mode == "login":
        return login(tool, parsed)
    if mode == "fail":
        sys.stderr.write(f"fake {tool}: scripted failure (FAKE_CLI_MODE=fail)\n")
        return 1
    if mode == "hang":
        return hang()
    answer = {"codex": answer_codex, "copilot": answer_copilot, "gemini": answer_gemini, "claude": answer_claude}
    return answer[tool](parsed, prompt)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
