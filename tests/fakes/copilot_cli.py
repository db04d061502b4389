"""A fake `copilot` executable (a shell wrapper around copilot_runtime.py) for the copilot_sdk provider."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

FAKE = Path(__file__).resolve().parent / "copilot_runtime.py"


class FakeCLI:
    """A `copilot` executable (a shell wrapper around the fake runtime) and what it recorded."""

    def __init__(self, root: Path, scenario: str) -> None:
        self.bin = root / f"bin-{scenario}"
        self.record = root / f"record-{scenario}"
        self.bin.mkdir()
        self.path = self.bin / "copilot"
        self.path.write_text(
            f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" --scenario {scenario} --record "{self.record}" "$@"\n'
        )
        self.path.chmod(0o755)

    def calls(self) -> list[dict]:
        lines = (self.record / "calls.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def methods(self) -> list[str]:
        return [c["method"] for c in self.calls()]

    def pid(self) -> int:
        return int((self.record / "pid").read_text())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
