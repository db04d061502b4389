"""Fake codex, copilot, gemini and claude executables for the CLI providers' tests.

`make_fake_bin(directory)` writes four small sh wrappers named like the real tools, each running
this interpreter on fake_cli.py with ``FAKE_CLI_TOOL`` set; the `fake_cli_bin` fixture gives a
fresh directory of them. Behaviour is scripted per test with the ``FAKE_CLI_*`` environment
variables that fake_cli.py documents (set them with ``monkeypatch.setenv``: the providers pass
their environment on to the tool).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

__all__ = ["FAKE_CLI", "FIXTURES", "TOOLS", "make_fake_bin", "fake_cli_bin"]

FAKE_CLI = Path(__file__).resolve().parent / "fake_cli.py"
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "cli"
TOOLS = ("codex", "copilot", "gemini", "claude")


def make_fake_bin(directory: Path) -> Path:
    """Write executables `codex`, `copilot`, `gemini` and `claude` into `directory`; return it."""
    directory.mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        script = directory / tool
        script.write_text(
            "#!/bin/sh\n"
            f"FAKE_CLI_TOOL={tool} exec {shlex.quote(sys.executable)} {shlex.quote(str(FAKE_CLI))} \"$@\"\n"
        )
        script.chmod(0o755)
    return directory


@pytest.fixture
def fake_cli_bin(tmp_path: Path) -> Path:
    """A directory holding fake `codex`, `copilot`, `gemini` and `claude` executables."""
    return make_fake_bin(tmp_path / "fake-bin")
