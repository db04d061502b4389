"""Shared fixtures: every test runs with a clean accelmesh environment and fresh router state."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_CONFIG_PREFIXES = ("ACCELMESH_", "IPFS_ACCELERATE_PY_")


def _config_names() -> frozenset[str]:
    """Every environment name the settings read: the prefixes' names plus each alias (a developer's
    real OPENROUTER_API_KEY must neither fail a test nor reach OpenRouter)."""
    from node.config import iter_specs

    names = {spec.env for spec in iter_specs()} | {spec.alias for spec in iter_specs() if spec.alias}
    return frozenset(names | {"OPENROUTER_API_KEY"})


_CONFIG_NAMES = _config_names()


def _is_config_name(name: str) -> bool:
    return name.startswith(_CONFIG_PREFIXES) or name in _CONFIG_NAMES


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """No inherited accelmesh settings, a private data dir, offline Hugging Face."""
    for name in list(os.environ):
        if _is_config_name(name):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from node.deps import set_default_router_deps
    from node.providers import registry

    registered = dict(registry._registered)
    set_default_router_deps(None)
    yield
    set_default_router_deps(None)
    registry._registered.clear()
    registry._registered.update(registered)


@pytest.fixture
def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """Environment for `accelmesh` subprocesses: this venv first on PATH, no inherited settings."""
    env = {k: v for k, v in os.environ.items() if not _is_config_name(k)}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env
