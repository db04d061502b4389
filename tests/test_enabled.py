"""`enabled = false` in a provider's section: not served, not advertised, listed as not ready ("disabled")."""

from __future__ import annotations

import json
import subprocess

import pytest
import trio

import node
from node.config import load_settings, provider_section
from node.deps import RouterDeps
from node.errors import ProviderUnavailable
from node.providers import registry

BUILTINS = [name for name in registry.BUILTIN_PROVIDERS if name != "mesh"]


def env_name(name: str) -> str:
    return "ACCELMESH_ECHO_ENABLED" if name == "echo" else f"ACCELMESH_PROVIDERS_{name.upper()}_ENABLED"


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_provider_has_enabled_on_by_default_and_each_can_be_switched_off(name):
    assert provider_section(load_settings(env={}), name).enabled is True
    settings = load_settings(env={env_name(name): "0"})
    assert provider_section(settings, name).enabled is False
    info = {i.name: i for i in node.describe_llm_providers(deps=RouterDeps(settings=settings))}[name]
    assert (info.ready, info.reason) == (False, "disabled")


def test_a_disabled_provider_named_in_a_call_says_so_and_the_chain_skips_it(monkeypatch):
    monkeypatch.setenv("ACCELMESH_ECHO_ENABLED", "off")
    with pytest.raises(ProviderUnavailable, match="echo: not ready: disabled"):
        node.generate_text("hi", provider="echo")
    assert node.builtin_provider("echo") is None
    node.register_llm_provider("mine", lambda: type("Mine", (), {"generate": lambda self, p, **k: "mine"})())
    assert node.generate_text("hi") == "mine"


def test_the_flag_switches_it_off_too(tmp_path, subprocess_env):
    out = subprocess.run(["accelmesh", "providers", "--json", "--no-echo-enabled"], capture_output=True, text=True,
                         env=subprocess_env, timeout=60, check=True)
    echo = next(p for p in json.loads(out.stdout)["providers"] if p["name"] == "echo")
    assert (echo["ready"], echo["reason"]) == (False, "disabled")


async def test_a_daemon_neither_serves_nor_advertises_a_disabled_provider(tmp_path):
    from tests.mesh.conftest import running_daemon

    with trio.fail_after(30):
        async with running_daemon(tmp_path, ACCELMESH_ECHO_ENABLED="0") as daemon:
            while daemon.adverts.current is None:
                await trio.sleep(0.05)
            assert "echo" not in [p.name for p in daemon.adverts.current.providers]
            assert "echo" not in [p["name"] for p in daemon.info()["providers"]]
