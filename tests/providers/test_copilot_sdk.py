"""copilot_sdk: the real github-copilot-sdk driving a fake Copilot CLI (tests/fakes/copilot_runtime.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import aclosing
from pathlib import Path

import pytest
import trio

from node.config import load_settings
from node.errors import ProviderAuthError, ProviderFailed, ProviderTimeout, ProviderUnavailable
from node.providers.base import Completion, ProviderRequest
from node.providers import copilot_sdk
from node.providers.copilot_sdk import CopilotSDKProvider
from tests.fakes.copilot_cli import FAKE, FakeCLI, alive


LIMIT = 30.0  # seconds any one test may take (the SDK's first import alone takes ~2 s)


@pytest.fixture
def fake_cli(tmp_path):
    return lambda scenario="ok": FakeCLI(tmp_path, scenario)


def request(prompt: str = "hello there world", *, model: str | None = None, timeout: float = 20.0) -> ProviderRequest:
    return ProviderRequest("generate", prompt, None, model, timeout=timeout)


async def collect(provider: CopilotSDKProvider, req: ProviderRequest) -> list[str | Completion]:
    with trio.fail_after(LIMIT):
        async with aclosing(provider.astream(req)) as stream:
            return [item async for item in stream]


# -- readiness and identity -----------------------------------------------------------------


def test_missing_cli_is_not_ready_and_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    readiness = CopilotSDKProvider(cli_path="copilot").available()
    assert not readiness.ok
    assert "'copilot' not found" in readiness.reason and "npm install -g @github/copilot" in readiness.reason


def test_cli_on_path_is_ready(fake_cli, monkeypatch):
    cli = fake_cli()
    monkeypatch.setenv("PATH", str(cli.bin))
    readiness = CopilotSDKProvider(cli_path="copilot").available()
    assert readiness.ok and str(cli.path) in readiness.reason and "github-copilot-sdk" in readiness.reason


def test_cli_url_is_ready_without_a_local_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    readiness = CopilotSDKProvider(cli_url="127.0.0.1:4321").available()
    assert readiness.ok and "127.0.0.1:4321" in readiness.reason


def test_malformed_cli_url_is_not_ready():
    readiness = CopilotSDKProvider(cli_url="localhost/copilot").available()
    assert not readiness.ok and "host:port" in readiness.reason
    assert CopilotSDKProvider(cli_url="http://[::1]:3000").available().ok


def test_readiness_is_cached_for_a_while(fake_cli):
    cli = fake_cli()
    provider = CopilotSDKProvider(cli_path=str(cli.path))
    first = provider.available()
    cli.path.unlink()
    assert first.ok and provider.available() is first


def test_model_identity_names_the_model_when_one_is_set():
    assert CopilotSDKProvider().model_identity(None) == "copilot_sdk"
    assert CopilotSDKProvider(model="gpt-5").model_identity(None) == "copilot_sdk/gpt-5"
    assert CopilotSDKProvider(model="gpt-5").model_identity("claude-sonnet-4.5") == "copilot_sdk/claude-sonnet-4.5"


def test_from_settings_reads_providers_copilot_sdk():
    env = {
        "ACCELMESH_PROVIDERS_COPILOT_SDK_CLI_PATH": "/opt/copilot",
        "ACCELMESH_PROVIDERS_COPILOT_SDK_MODEL": "gpt-5",
        "ACCELMESH_PROVIDERS_COPILOT_SDK_TIMEOUT": "12",
    }
    provider = CopilotSDKProvider.from_settings(load_settings(env=env))
    assert (provider.cli_path, provider.cli_url, provider.model, provider.timeout) == ("/opt/copilot", "", "gpt-5", 12.0)


# -- generation ------------------------------------------------------------------------------


async def test_stream_yields_deltas_in_order_then_exactly_one_completion(fake_cli, monkeypatch):
    monkeypatch.setenv("COPILOT_SKIP_CLI_DOWNLOAD", "0")
    cli = fake_cli()
    provider = CopilotSDKProvider(cli_path=str(cli.path), model="gpt-5")
    items = await collect(provider, request())
    assert items[:-1] == ["copilot", " says:", " hello", " there", " world"]
    completion = items[-1]
    assert isinstance(completion, Completion) and completion.text == "copilot says: hello there world"
    assert (completion.model, completion.prompt_tokens, completion.completion_tokens) == ("gpt-5", 7, 5)
    assert os.environ["COPILOT_SKIP_CLI_DOWNLOAD"] == "1"


async def test_session_is_tool_less_streamed_deleted_and_the_cli_stopped(fake_cli):
    cli = fake_cli()
    await collect(CopilotSDKProvider(cli_path=str(cli.path), model="gpt-5"), request())
    assert cli.methods() == [
        "connect", "auth.getStatus", "session.create", "session.options.update",
        "session.send", "session.delete", "runtime.shutdown",
    ]
    create = cli.calls()[2]["params"]
    assert create["model"] == "gpt-5" and create["streaming"] is True and create["availableTools"] == []
    assert create["requestPermission"] is True
    assert cli.calls()[3]["params"]["skipCustomInstructions"] is True
    assert cli.calls()[4]["params"]["prompt"] == "hello there world"
    assert not alive(cli.pid())


async def test_request_model_overrides_the_configured_one(fake_cli):
    cli = fake_cli()
    items = await collect(CopilotSDKProvider(cli_path=str(cli.path), model="gpt-5"), request(model="o3"))
    assert items[-1].model == "o3" and cli.calls()[2]["params"]["model"] == "o3"


async def test_without_a_model_the_sdk_default_is_used(fake_cli):
    cli = fake_cli()
    items = await collect(CopilotSDKProvider(cli_path=str(cli.path)), request())
    assert "model" not in cli.calls()[2]["params"] and items[-1].model == "fake-model"


async def test_final_message_without_deltas_arrives_as_one_chunk(fake_cli):
    cli = fake_cli("no-deltas")
    items = await collect(CopilotSDKProvider(cli_path=str(cli.path)), request())
    assert items[0] == "copilot says: hello there world" and items[1].text == items[0] and len(items) == 2


def test_complete_sync_answers_without_trio(fake_cli):
    cli = fake_cli()
    completion = CopilotSDKProvider(cli_path=str(cli.path)).complete_sync(request("sync please"))
    assert completion.text == "copilot says: sync please"
    assert not alive(cli.pid())


# -- cancellation and timeouts -----------------------------------------------------------------


async def test_closing_the_stream_aborts_the_turn_and_leaves_no_process(fake_cli):
    cli = fake_cli("hang")
    provider = CopilotSDKProvider(cli_path=str(cli.path))
    with trio.fail_after(LIMIT):
        async with aclosing(provider.astream(request())) as stream:
            assert [await stream.__anext__() for _ in range(3)] == [" more"] * 3
    assert "session.abort" in cli.methods()
    assert not alive(cli.pid())
    assert provider.statistics().in_flight == 0


async def test_a_cancel_scope_stops_the_work_and_leaves_no_process(fake_cli):
    cli = fake_cli("hang")
    provider = CopilotSDKProvider(cli_path=str(cli.path))
    received = 0
    with trio.fail_after(LIMIT):
        with trio.CancelScope() as scope:
            async for _ in provider.astream(request()):
                received += 1
                if received == 2:
                    scope.cancel()
    assert scope.cancelled_caught and received == 2
    assert "session.abort" in cli.methods() and not alive(cli.pid())


async def test_a_cli_that_ignores_abort_and_shutdown_is_killed(fake_cli, monkeypatch):
    monkeypatch.setattr(copilot_sdk, "ABORT_GRACE", 0.2)
    monkeypatch.setattr(copilot_sdk, "STOP_GRACE", 0.5)
    cli = fake_cli("deaf")
    provider = CopilotSDKProvider(cli_path=str(cli.path))
    with trio.fail_after(LIMIT):
        async with aclosing(provider.astream(request())) as stream:
            await stream.__anext__()
            started = trio.current_time()
    assert trio.current_time() - started < 10
    assert {"session.abort", "session.delete"} <= set(cli.methods())  # asked, never answered
    assert not alive(cli.pid())


@pytest.mark.parametrize(("configured", "per_request"), [(0.5, 20.0), (300.0, 0.5)])
async def test_running_out_of_time_raises_provider_timeout_and_kills_the_cli(fake_cli, configured, per_request):
    cli = fake_cli("hang")
    provider = CopilotSDKProvider(cli_path=str(cli.path), timeout=configured)
    with trio.fail_after(LIMIT), pytest.raises(ProviderTimeout, match="within 0.5 s"):
        await collect(provider, request(timeout=per_request))
    assert not alive(cli.pid())


def test_complete_sync_times_out_too(fake_cli):
    cli = fake_cli("hang")
    with pytest.raises(ProviderTimeout):
        CopilotSDKProvider(cli_path=str(cli.path), timeout=0.5).complete_sync(request())
    assert not alive(cli.pid())


# -- errors ------------------------------------------------------------------------------------


async def test_logged_out_cli_raises_auth_error_saying_how_to_log_in(fake_cli):
    cli = fake_cli("logged-out")
    with pytest.raises(ProviderAuthError, match="not logged in.*No GitHub credentials found.*/login"):
        await collect(CopilotSDKProvider(cli_path=str(cli.path)), request())
    assert "session.create" not in cli.methods() and not alive(cli.pid())


async def test_credentials_refused_mid_turn_raise_auth_error(fake_cli):
    cli = fake_cli("auth-error")
    with pytest.raises(ProviderAuthError, match="Bad credentials.*COPILOT_GITHUB_TOKEN"):
        await collect(CopilotSDKProvider(cli_path=str(cli.path)), request())


async def test_other_session_errors_raise_provider_failed_with_the_sdk_message(fake_cli):
    cli = fake_cli("error")
    with pytest.raises(ProviderFailed, match="model_error: model exploded"):
        await collect(CopilotSDKProvider(cli_path=str(cli.path)), request())


def test_cli_gone_after_readiness_raises_unavailable(tmp_path):
    with pytest.raises(ProviderUnavailable, match="npm install -g @github/copilot"):
        CopilotSDKProvider(cli_path=str(tmp_path / "copilot")).complete_sync(request())


# -- an already running CLI server (cli_url) ------------------------------------------------------


async def test_cli_url_connects_to_a_running_server_and_leaves_it_running(tmp_path):
    server = subprocess.Popen(
        [sys.executable, str(FAKE), "--port", "0", "--record", str(tmp_path / "server")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        line = await trio.to_thread.run_sync(server.stdout.readline)
        port = int(line.rsplit(" ", 1)[1])
        items = await collect(CopilotSDKProvider(cli_url=f"127.0.0.1:{port}"), request("over tcp"))
        assert items[-1].text == "copilot says: over tcp"
        methods = [json.loads(x)["method"] for x in (tmp_path / "server" / "calls.jsonl").read_text().splitlines()]
        assert "runtime.shutdown" not in methods and server.poll() is None
    finally:
        server.kill()
        server.wait(timeout=10)
