"""The codex_cli, copilot_cli, gemini_cli and claude_code providers, run against the strict fake CLIs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from node.errors import ProviderAuthError, ProviderFailed, ProviderTimeout, ProviderUnavailable
from node.providers import cli_base
from node.providers.base import Completion, ProviderRequest
from node.providers.claude_code import ClaudeCodeProvider, ClaudeParser
from node.providers.cli_base import MAX_ARG_BYTES, CLIProvider, CLIRun, JSONLParser
from node.providers.codex_cli import CodexCLIProvider, CodexParser
from node.providers.copilot_cli import CopilotCLIProvider
from node.providers.gemini_cli import GeminiCLIProvider
from tests.fakes.cli import FIXTURES, fake_cli_bin  # noqa: F401 - fake_cli_bin is a fixture

PROVIDERS: dict[str, tuple[type[CLIProvider], str]] = {
    "codex": (CodexCLIProvider, "codex_cli"),
    "copilot": (CopilotCLIProvider, "copilot_cli"),
    "gemini": (GeminiCLIProvider, "gemini_cli"),
    "claude": (ClaudeCodeProvider, "claude_code"),
}
TOOLS = list(PROVIDERS)
LOGIN_COMMANDS = {"codex": "codex login", "copilot": "copilot login", "gemini": "GEMINI_API_KEY", "claude": "/login"}
PROMPT = "why is the sky blue"


def expected_answer(tool: str, prompt: str = PROMPT) -> str:
    """What the fake answers: codex sends two whole agent messages (it has no deltas)."""
    return f"codex:\n\n{prompt}" if tool == "codex" else f"{tool}: {prompt}"


def request(prompt: str = PROMPT, *, timeout: float = 10.0, model: str | None = None) -> ProviderRequest:
    return ProviderRequest(task="generate", prompt=prompt, messages=None, model=model, timeout=timeout)


def make(tool: str, bin_dir: Path, **kwargs: object) -> CLIProvider:
    cls, _ = PROVIDERS[tool]
    return cls(binary=str(bin_dir / tool), **kwargs)  # type: ignore[arg-type]


def process_state(pid: int) -> str | None:
    """The state letter of `pid` from /proc, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def is_alive(pid: int) -> bool:
    """Running or sleeping; a zombie waiting for its reaper is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return process_state(pid) not in (None, "Z", "X")


def process_group(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[2])


def live_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if process_group(int(entry.name)) == pgid and is_alive(int(entry.name)):
                    members.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
                continue
    return members


def read_pidfile(path: Path) -> tuple[int, int]:
    """The grandchild's pid and the process group of the fake that started it."""
    grandchild, pgid = path.read_text().split()
    return int(grandchild), int(pgid)


async def wait_for_pidfile(path: Path) -> tuple[int, int]:
    with trio.fail_after(10):
        while not path.exists():
            await trio.sleep(0.01)
    return read_pidfile(path)


async def assert_group_gone(grandchild: int, pgid: int) -> None:
    """The grandchild and every other member of the run's process group die within 2 s."""
    with trio.fail_after(2):
        while is_alive(grandchild) or live_members(pgid):
            await trio.sleep(0.02)


@pytest.fixture
def hang(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Make the fakes hang after starting a grandchild; returns the file that gets its pid."""
    pidfile = tmp_path / "grandchild.pid"
    monkeypatch.setenv("FAKE_CLI_MODE", "hang")
    monkeypatch.setenv("FAKE_CLI_PIDFILE", str(pidfile))
    return pidfile


@pytest.fixture(autouse=True)
def clean_fake_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FAKE_CLI_MODE", "FAKE_CLI_DELAY", "FAKE_CLI_PIDFILE", "FAKE_CLI_IGNORE_TERM"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------------------
# Answers


@pytest.mark.parametrize("tool", TOOLS)
async def test_generate_returns_the_tools_answer(tool: str, fake_cli_bin: Path) -> None:
    provider = make(tool, fake_cli_bin)
    with trio.fail_after(15):
        completion = await provider.acomplete(request())
    assert completion.text == expected_answer(tool)
    assert (completion.prompt_tokens, completion.completion_tokens) == (7, 3)
    assert provider.statistics().succeeded == 1 and provider.statistics().in_flight == 0


@pytest.mark.parametrize("tool", TOOLS)
async def test_stream_yields_several_chunks_in_order_that_join_to_the_answer(
    tool: str, fake_cli_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CLI_DELAY", "0.02")
    provider = make(tool, fake_cli_bin)
    items: list[str | Completion] = []
    with trio.fail_after(15):
        async for item in provider.astream(request()):
            items.append(item)
    *chunks, completion = items
    assert all(isinstance(chunk, str) for chunk in chunks) and len(chunks) > 1
    assert isinstance(completion, Completion)
    assert "".join(chunks) == completion.text == expected_answer(tool)


@pytest.mark.parametrize("tool", TOOLS)
def test_complete_sync_returns_the_same_answer(tool: str, fake_cli_bin: Path) -> None:
    provider = make(tool, fake_cli_bin)
    assert provider.complete_sync(request()).text == expected_answer(tool)
    assert provider.generate(PROMPT) == expected_answer(tool)


@pytest.mark.parametrize("tool", TOOLS)
async def test_the_model_flag_reaches_the_tool(tool: str, fake_cli_bin: Path) -> None:
    provider = make(tool, fake_cli_bin, model="configured-model")
    with trio.fail_after(15):
        configured = await provider.acomplete(request())
        asked = await provider.acomplete(request(model="asked-model"))
    assert (configured.model, asked.model) == ("configured-model", "asked-model")
    assert "--model" in provider.argv(request()) and "configured-model" in provider.argv(request())
    assert "asked-model" in provider.argv(request(model="asked-model"))
    assert "--model" not in make(tool, fake_cli_bin).argv(request())


@pytest.mark.parametrize("tool", TOOLS)
async def test_a_chat_request_is_sent_as_role_lines(tool: str, fake_cli_bin: Path) -> None:
    chat = ProviderRequest(
        task="chat",
        prompt=None,
        messages=({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}),
        model=None,
    )
    with trio.fail_after(15):
        completion = await make(tool, fake_cli_bin).acomplete(chat)
    assert completion.text == expected_answer(tool, "system: be brief\nuser: hi")


@pytest.mark.parametrize("tool", ["copilot", "gemini"])
async def test_a_prompt_starting_with_a_dash_stays_a_prompt(tool: str, fake_cli_bin: Path) -> None:
    with trio.fail_after(15):
        completion = await make(tool, fake_cli_bin).acomplete(request("--help me"))
    assert completion.text == expected_answer(tool, "--help me")


def test_model_identity_names_the_model_when_one_is_set(fake_cli_bin: Path) -> None:
    for tool, (_, name) in PROVIDERS.items():
        assert make(tool, fake_cli_bin).model_identity(None) == name
        assert make(tool, fake_cli_bin, model="m1").model_identity(None) == f"{name}/m1"
        assert make(tool, fake_cli_bin, model="m1").model_identity("m2") == f"{name}/m2"


# ---------------------------------------------------------------------------------------
# The fake is strict, and our command lines pass it


@pytest.mark.parametrize("tool", TOOLS)
def test_the_fake_rejects_a_flag_missing_from_the_recorded_help(tool: str, fake_cli_bin: Path) -> None:
    prefix = ["exec"] if tool == "codex" else []
    out = subprocess.run(
        [str(fake_cli_bin / tool), *prefix, "--made-up-flag", "x"], capture_output=True, text=True, timeout=10
    )
    assert out.returncode == 2
    assert "made-up-flag" in out.stderr


@pytest.mark.parametrize("tool", TOOLS)
def test_the_fake_rejects_a_value_outside_the_listed_choices(tool: str, fake_cli_bin: Path) -> None:
    flag = {"codex": ["exec", "--sandbox", "everything"], "copilot": ["--output-format", "xml"],
            "gemini": ["--approval-mode", "sometimes"], "claude": ["-p", "--output-format", "xml"]}[tool]  # fmt: skip
    out = subprocess.run([str(fake_cli_bin / tool), *flag], capture_output=True, text=True, timeout=10)
    assert out.returncode == 2, out.stderr


@pytest.mark.parametrize("tool", TOOLS)
def test_our_command_line_passes_the_fakes_check(tool: str, fake_cli_bin: Path, tmp_path: Path) -> None:
    provider = make(tool, fake_cli_bin, model="m1")
    invocation = provider.invocation(request())
    stdin = invocation.stdin.encode() if invocation.stdin is not None else b""
    out = subprocess.run(list(invocation.argv), input=stdin, capture_output=True, timeout=10, cwd=tmp_path)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout


@pytest.mark.parametrize("tool", TOOLS)
def test_every_flag_we_pass_is_in_the_recorded_help(tool: str, fake_cli_bin: Path) -> None:
    help_text = (FIXTURES / tool / ("exec-help.txt" if tool == "codex" else "help.txt")).read_text()
    for arg in make(tool, fake_cli_bin, model="m1").argv(request()):
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in help_text, arg


# ---------------------------------------------------------------------------------------
# Failures


@pytest.mark.parametrize("tool", TOOLS)
async def test_a_tool_that_is_not_logged_in_raises_an_auth_error_saying_how_to_log_in(
    tool: str, fake_cli_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CLI_MODE", "login")
    provider = make(tool, fake_cli_bin)
    chunks = []
    with trio.fail_after(15), pytest.raises(ProviderAuthError) as info:
        async for item in provider.astream(request()):
            chunks.append(item)
    assert chunks == []  # claude's "Not logged in" message is not passed on as an answer
    assert "not logged in" in info.value.message
    assert LOGIN_COMMANDS[tool] in info.value.message
    with pytest.raises(ProviderAuthError):
        provider.complete_sync(request())


@pytest.mark.parametrize("tool", TOOLS)
async def test_a_failing_tool_raises_provider_failed_quoting_stderr(
    tool: str, fake_cli_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CLI_MODE", "fail")
    provider = make(tool, fake_cli_bin)
    with trio.fail_after(15), pytest.raises(ProviderFailed) as info:
        await provider.acomplete(request())
    assert "exited with status 1" in info.value.message
    assert f"fake {tool}: scripted failure" in info.value.message
    with pytest.raises(ProviderFailed, match="scripted failure"):
        provider.complete_sync(request())
    assert provider.statistics().failed == 2


async def test_a_missing_executable_raises_provider_unavailable(tmp_path: Path) -> None:
    provider = CodexCLIProvider(binary=str(tmp_path / "no-such-codex"))
    with trio.fail_after(5), pytest.raises(ProviderUnavailable, match="npm install -g @openai/codex"):
        await provider.acomplete(request())
    with pytest.raises(ProviderUnavailable):
        provider.complete_sync(request())


def test_a_prompt_too_long_for_one_argument_fails_before_anything_runs(fake_cli_bin: Path) -> None:
    for tool in ("copilot", "gemini"):
        provider = make(tool, fake_cli_bin)
        fits = "x" * (MAX_ARG_BYTES - len("--prompt="))
        assert f"--prompt={fits}" in provider.argv(request(fits))
        with pytest.raises(ProviderFailed, match="too long"):
            provider.argv(request(fits + "x"))
    # codex and claude read the prompt from stdin: no such limit
    assert make("codex", fake_cli_bin).invocation(request("x" * 2 * MAX_ARG_BYTES)).stdin is not None


# ---------------------------------------------------------------------------------------
# Cancellation and timeouts kill the whole process group


@pytest.mark.parametrize("tool", TOOLS)
async def test_cancelling_a_stream_kills_the_process_group_and_the_grandchild(
    tool: str, fake_cli_bin: Path, hang: Path
) -> None:
    provider = make(tool, fake_cli_bin)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:

            async def consume() -> None:
                async for _ in provider.astream(request(timeout=60)):
                    pass

            nursery.start_soon(consume)
            grandchild, pgid = await wait_for_pidfile(hang)
            assert pgid != os.getpgrp()  # the tool runs in a group of its own
            nursery.cancel_scope.cancel()
    await assert_group_gone(grandchild, pgid)
    stats = provider.statistics()
    assert (stats.cancelled, stats.in_flight) == (1, 0)


@pytest.mark.parametrize("tool", TOOLS)
async def test_a_hung_tool_times_out_and_its_process_group_is_killed(
    tool: str, fake_cli_bin: Path, hang: Path
) -> None:
    provider = make(tool, fake_cli_bin, timeout=60)
    with trio.fail_after(15), pytest.raises(ProviderTimeout, match="no answer within 1 s"):
        await provider.acomplete(request(timeout=1.0))
    await assert_group_gone(*read_pidfile(hang))
    assert provider.statistics().timed_out == 1


@pytest.mark.parametrize("tool", TOOLS)
async def test_complete_sync_times_out_the_same_way(tool: str, fake_cli_bin: Path, hang: Path) -> None:
    provider = make(tool, fake_cli_bin, timeout=1.0)  # the provider's own timeout is the shorter one
    with pytest.raises(ProviderTimeout):
        await trio.to_thread.run_sync(provider.complete_sync, request(timeout=60))
    await assert_group_gone(*read_pidfile(hang))


async def test_a_consumer_that_stops_early_stops_the_tool(
    fake_cli_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CLI_DELAY", "30")  # the second chunk would come 30 s later
    provider = make("gemini", fake_cli_bin)
    with trio.fail_after(5):
        async with contextlib.aclosing(provider.astream(request(timeout=60))) as stream:
            async for chunk in stream:
                assert chunk == "gemini:"
                break
    stats = provider.statistics()
    assert (stats.cancelled, stats.in_flight) == (1, 0)


def test_an_answer_missing_from_the_output_is_a_failure_not_an_empty_answer(fake_cli_bin: Path) -> None:
    provider = make("claude", fake_cli_bin)
    run = provider.new_run()
    run.feed(b"this is not the stream-json format\n")
    run.close()
    with pytest.raises(ProviderFailed, match="no answer text in the expected format"):
        provider.outcome(run, 0, "", request())


async def test_a_tool_ignoring_sigterm_is_killed_after_the_grace(
    fake_cli_bin: Path, hang: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CLI_IGNORE_TERM", "1")
    provider = make("claude", fake_cli_bin)
    provider.kill_grace = 0.2
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:

            async def consume() -> None:
                await provider.acomplete(request(timeout=60))

            nursery.start_soon(consume)
            grandchild, pgid = await wait_for_pidfile(hang)
            nursery.cancel_scope.cancel()
    await assert_group_gone(grandchild, pgid)


# ---------------------------------------------------------------------------------------
# Readiness


@pytest.mark.parametrize("tool", TOOLS)
def test_a_missing_binary_is_not_ready_and_says_how_to_install_it(tool: str, tmp_path: Path) -> None:
    cls, name = PROVIDERS[tool]
    on_path = cls(binary=f"no-such-{tool}-binary")
    ready, reason = on_path.available()
    assert not ready
    assert f"`no-such-{tool}-binary` not found on PATH" in reason
    assert f"npm install -g {cls.package}" in reason and f"[providers.{name}] binary" in reason
    ready, reason = cls(binary=str(tmp_path / tool)).available()
    assert not ready and "does not exist or is not executable" in reason


@pytest.mark.parametrize("tool", TOOLS)
def test_the_fake_binary_is_ready_and_the_reason_gives_its_version(tool: str, fake_cli_bin: Path) -> None:
    version = (FIXTURES / tool / "version.txt").read_text().splitlines()[0]
    ready, reason = make(tool, fake_cli_bin).available()
    assert ready
    assert version in reason and str(fake_cli_bin / tool) in reason


def test_readiness_is_found_on_path_and_cached(fake_cli_bin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{fake_cli_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    provider = GeminiCLIProvider()
    assert provider.available() == (True, f"0.61.0 ({fake_cli_bin / 'gemini'})")
    (fake_cli_bin / "gemini").unlink()
    assert provider.available().ok  # reused for READINESS_TTL seconds
    monkeypatch.setattr(cli_base, "READINESS_TTL", 0.0)
    assert not provider.available().ok


def test_a_failing_version_check_is_not_ready(tmp_path: Path) -> None:
    broken = tmp_path / "codex"
    broken.write_text("#!/bin/sh\necho 'codex: broken install' >&2\nexit 3\n")
    broken.chmod(0o755)
    ready, reason = CodexCLIProvider(binary=str(broken)).available()
    assert not ready and "exited with status 3: codex: broken install" in reason


def test_from_settings_reads_the_providers_section() -> None:
    from node.config import load_settings

    settings = load_settings(
        env={"ACCELMESH_PROVIDERS_CLAUDE_CODE_MODEL": "sonnet", "ACCELMESH_PROVIDERS_CLAUDE_CODE_TIMEOUT": "12"}
    )
    provider = ClaudeCodeProvider.from_settings(settings)
    assert (provider.binary, provider.model, provider.timeout) == ("claude", "sonnet", 12.0)
    assert CodexCLIProvider.from_settings(settings).binary == "codex"


# ---------------------------------------------------------------------------------------
# Output handling, without processes


class _Lines(JSONLParser):
    def feed_event(self, event: dict) -> list[str]:  # type: ignore[override]
        return [str(event.get("t", ""))]


def test_a_line_at_the_limit_is_read_and_one_byte_over_fails() -> None:
    limit = 64
    at_limit = b'{"t":"' + b"x" * (limit - 8) + b'"}'
    assert len(at_limit) == limit
    run = CLIRun("p", _Lines(), max_line_bytes=limit)
    assert run.feed(at_limit + b"\n") == ["x" * (limit - 8)]
    with pytest.raises(ProviderFailed, match="line longer than 64 bytes"):
        CLIRun("p", _Lines(), max_line_bytes=limit).feed(b'{"t":"' + b"x" * (limit - 7) + b'"}\n')
    with pytest.raises(ProviderFailed, match="line longer"):  # also while the line is still arriving
        CLIRun("p", _Lines(), max_line_bytes=limit).feed(b"x" * (limit + 1))


def test_output_at_the_limit_is_read_and_one_byte_over_fails() -> None:
    run = CLIRun("p", _Lines(), max_output_bytes=20)
    assert run.feed(b'{"t":"a"}\n{"t":"b"}\n') == ["a", "b"]  # 20 bytes
    with pytest.raises(ProviderFailed, match="more than 20 bytes"):
        run.feed(b"\n")


def test_a_line_split_across_reads_and_a_last_line_without_newline_are_parsed() -> None:
    run = CLIRun("p", _Lines())
    assert run.feed(b'{"t":"he') == []
    assert run.feed(b'llo"}\n{"t":" world"}') == ["hello"]
    assert run.close() == [" world"]
    assert run.text == "hello world"


def test_codex_reconnecting_errors_recorded_offline_are_not_fatal() -> None:
    run = CLIRun("codex_cli", CodexParser())
    run.feed((FIXTURES / "codex" / "exec-offline.txt").read_bytes())
    run.close()
    assert run.parser.error is None and run.text == ""
    assert run.parser.warning and "Reconnecting" in run.parser.warning


def test_claude_not_logged_in_recording_is_an_auth_failure_without_answer_text() -> None:
    run = CLIRun("claude_code", ClaudeParser())
    assert run.feed((FIXTURES / "claude" / "not-logged-in.txt").read_bytes()) == []
    assert run.close() == []
    assert run.parser.auth_failed and run.parser.error == "Not logged in · Please run /login"


def test_claude_result_text_is_the_answer_when_no_deltas_arrived() -> None:
    run = CLIRun("claude_code", ClaudeParser())
    run.feed(b'{"type":"result","subtype":"success","is_error":false,"result":"4"}\n')
    assert run.close() == ["4"]


def test_signal_names_appear_in_failures(fake_cli_bin: Path) -> None:
    provider = make("codex", fake_cli_bin)
    run = provider.new_run()
    with pytest.raises(ProviderFailed, match="was killed by SIGKILL"):
        provider.outcome(run, -signal.SIGKILL, "", request())
