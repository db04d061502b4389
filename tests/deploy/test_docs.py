"""docs/operations.md and deploy/README.md: the example commands marked to run, run here (with the
system paths pointed at temporary ones); the tables of limits, alerts and errors agree with the
code; every error the code can raise is in the troubleshooting section."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import stat
import sys
import time
from pathlib import Path

import pytest
import yaml

import node.errors
import node.mesh.errors
import protocols.errors
from node.cache.store import CorruptStoreError, StoreError
from node.config import load_settings
from node.http.auth import api_keys
from node.mesh.host import load_swarm_key
from protocols.control.messages import ERROR_CODES as CONTROL_ERROR_CODES
from protocols.inference.messages import ERROR_CODES as INFER_ERROR_CODES
from tests.deploy._tools import DEPLOY, ROOT, run, tool

OPERATIONS = ROOT / "docs" / "operations.md"
DEPLOY_README = DEPLOY / "README.md"
MARKER = "<!-- runs in tests/deploy/test_docs.py -->"
SECTIONS = ("Keys", "Rotation without downtime", "Bootstrap and discovery", "Limits", "Other limits and timeouts",
            "Deployment", "Metrics and health", "Alert rules", "Upgrades", "Backup", "Troubleshooting")


def runnable_blocks(path: Path) -> list[str]:
    """The ```sh blocks right after the marker, verbatim."""
    return re.findall(re.escape(MARKER) + r"\n```sh\n(.*?)```", path.read_text(), re.DOTALL)


def block(path: Path, first_words: str) -> str:
    (found,) = [b for b in runnable_blocks(path) if b.startswith(first_words)]
    return found


def section(title: str, level: str = "##") -> str:
    text = OPERATIONS.read_text()
    body = text.split(f"\n{level} {title}\n", 1)[1]
    return re.split(rf"\n#{{2,{len(level)}}} ", body, maxsplit=1)[0]


def run_block(script: str, env: dict, cwd: Path = ROOT, timeout: float = 120):
    return run(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=cwd, timeout=timeout)


def test_operations_guide_has_every_section():
    headings = re.findall(r"^#{2,3} (.+)$", OPERATIONS.read_text(), re.MULTILINE)
    assert [h for h in SECTIONS if h not in headings] == []


def test_every_marked_block_is_found():
    assert len(runnable_blocks(OPERATIONS)) == 4 and len(runnable_blocks(DEPLOY_README)) == 1
    assert OPERATIONS.read_text().count(MARKER) == 4 and DEPLOY_README.read_text().count(MARKER) == 1


# -- the example commands ----------------------------------------------------------------------


def test_the_keys_example_makes_every_key_private_and_loadable(tmp_path, subprocess_env):
    data, etc = tmp_path / "data", tmp_path / "etc"
    script = block(OPERATIONS, "install -d").replace("/var/lib/accelmesh", str(data)).replace("/etc/accelmesh", str(etc))
    out = run_block(script, subprocess_env)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^peer id\s+12D3KooW\w+$", out.stdout, re.MULTILINE), out.stdout
    for path in (data / "identity.key", data / "client.key", etc / "swarm.key", etc / "http-api-key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert len(load_swarm_key(etc / "swarm.key")) == 64
    assert len(api_keys((), str(etc / "http-api-key"))) == 1


def test_two_api_keys_in_the_file_are_both_accepted_as_the_rotation_needs(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# rotation: the old key, then the new one\n" + "o" * 20 + "\n" + "n" * 20 + "\n")
    assert api_keys((), str(keys)) == frozenset({"o" * 20, "n" * 20})


@pytest.mark.system
def test_the_bootstrap_example_prints_full_multiaddrs_another_node_can_bootstrap_from(start_daemon, subprocess_env,
                                                                                     accelmesh_cmd):
    with start_daemon("alice") as alice:
        script = block(OPERATIONS, "accelmesh info").replace("/var/lib/accelmesh", str(alice.data_dir))
        out = run_block(script, subprocess_env, timeout=60)
        assert out.returncode == 0, out.stderr
        addrs = out.stdout.split()
        assert addrs and all(a.endswith(f"/p2p/{alice.info['peer_id']}") for a in addrs), addrs
        with start_daemon("bob", "--bootstrap", addrs[0]) as bob:
            for _ in range(100):
                peers = json.loads(accelmesh_cmd("peers", "--json", "--data-dir", str(bob.data_dir), check=True).stdout)
                if [p["peer_id"] for p in peers["peers"]] == [alice.info["peer_id"]]:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"bob never listed alice: {peers}")


def test_the_alert_rules_example_passes_promtool(subprocess_env):
    script = block(OPERATIONS, "promtool")
    out = run_block(script.replace("promtool", tool("promtool"), 1), subprocess_env)
    assert out.returncode == 0 and "SUCCESS" in out.stdout + out.stderr, out.stdout + out.stderr


@pytest.mark.system
def test_the_backup_example_runs_while_the_daemon_serves_and_the_backup_restores(start_daemon, accelmesh_cmd,
                                                                                subprocess_env, tmp_path):
    backups = tmp_path / "backups"
    with start_daemon("alice") as alice:
        data, peer_id = str(alice.data_dir), alice.info["peer_id"]
        accelmesh_cmd("generate", "kept in the store", "--provider", "echo", "--data-dir", data, check=True)
        script = block(OPERATIONS, "BACKUP=").replace("/var/lib/accelmesh", data).replace("/var/backups/accelmesh", str(backups))
        out = run_block(script, subprocess_env)
        assert out.returncode == 0, out.stderr
    (backup,) = backups.iterdir()
    assert sorted(p.name for p in backup.iterdir()) == ["cache.sqlite", "client.key", "identity.key"]
    assert stat.S_IMODE(backup.stat().st_mode) == 0o700
    restored = tmp_path / "restored"
    restored.mkdir(mode=0o700)
    for path in backup.iterdir():
        shutil.copy2(path, restored / path.name)
    init = accelmesh_cmd("init", "--data-dir", str(restored), check=True).stdout
    assert peer_id in init  # the same identity
    blocks = json.loads(accelmesh_cmd("cache", "ls", "--json", "--data-dir", str(restored), check=True).stdout)["blocks"]
    assert len(blocks) == 1


def test_the_deploy_readme_checks_run(subprocess_env):
    env = {**subprocess_env, "PATH": f"{Path(sys.executable).parent}:{os.path.dirname(tool('promtool'))}:"
                                     f"{os.path.dirname(tool('shellcheck'))}:{subprocess_env['PATH']}"}
    for name in ("hadolint", "kubernetes-validate"):
        tool(name)
    out = run_block(block(DEPLOY_README, "hadolint"), env)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_deploy_readme_lists_every_file_in_deploy():
    listed = set(re.findall(r"^\| `([^`]+)` \|", DEPLOY_README.read_text(), re.MULTILINE))
    files = {str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*") if p.is_file()
             and p.name not in ("README.md", ".gitignore") and "wheels" not in p.parts}
    assert files - listed == set(), sorted(files - listed)
    assert {name for name in listed if not name.endswith("/")} - files == set()


def test_toml_examples_load_with_accelmeshs_loader(tmp_path):
    blocks = re.findall(r"```toml\n(.*?)```", OPERATIONS.read_text(), re.DOTALL)
    assert blocks
    for i, text in enumerate(blocks):
        path = tmp_path / f"{i}.toml"
        path.write_text(text)
        load_settings(config=path, env={})


# -- tables against the code -------------------------------------------------------------------

UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def numbers(cell: str) -> list[float]:
    return [float(n) * UNITS.get(unit, 1) for n, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(KiB|MiB|GiB)?", cell)]


def table_rows(text: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line.startswith("| `")]
    return rows


def test_the_limit_tables_give_the_settings_defaults():
    defaults = load_settings(env={})
    checked = set()
    for title, prefix in (("Limits", "limits."), ("Other limits and timeouts", "")):
        text = section(title) if title == "Limits" else section(title, "###")
        rows = table_rows(text.split("\n### ", 1)[0] if title == "Limits" else text.split("Fixed by the wire")[0])
        assert rows, title
        for keys_cell, default_cell, *_ in rows:
            keys = [prefix + key for key in re.findall(r"`([a-z_.]+)`", keys_cell)]
            expected = []
            for key in keys:
                value = defaults
                for part in key.split("."):
                    value = getattr(value, part)
                expected.append(float(value))
            assert numbers(default_cell)[:len(keys)] == expected, (keys, default_cell)
            checked.update(keys)
    assert {f"limits.{name}" for name in defaults.limits.__dataclass_fields__} <= checked


def test_the_wire_limits_table_gives_the_constants():
    import importlib

    text = section("Other limits and timeouts", "###").split("Fixed by the wire", 1)[1]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and "`" in line]
    assert len(rows) == 5
    for _, value, constant in rows:
        module, name = constant.strip("`").rsplit(".", 1)
        assert numbers(value)[0] == getattr(importlib.import_module(module), name), constant


def test_the_alert_table_matches_the_shipped_rules():
    rules = [rule for group in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
             for rule in group["rules"]]
    rows = {row[0].strip("`"): row for row in table_rows(section("Alert rules", "###"))}
    assert set(rows) == {rule["alert"] for rule in rules}
    for rule in rules:
        _, _, for_, severity, _ = rows[rule["alert"]]
        assert (for_, severity) == (rule["for"], rule["labels"]["severity"]), rule["alert"]


def error_classes() -> set[type]:
    found = {getattr(node.errors, name) for name in node.errors.__all__}
    found |= {getattr(node.mesh.errors, name) for name in node.mesh.errors.__all__
              if isinstance(getattr(node.mesh.errors, name), type)}
    found |= {StoreError, CorruptStoreError}
    found |= {getattr(protocols.errors, name) for name in protocols.errors.__all__}
    return found


def test_every_error_class_is_in_troubleshooting():
    text = section("Troubleshooting")
    bases = {"AccelmeshError", "ProviderError", "ProtocolError"}  # the trees' roots: no one meets them as such
    missing = sorted(cls.__name__ for cls in error_classes() if cls.__name__ not in bases and f"`{cls.__name__}`" not in text)
    assert missing == []


def test_every_wire_error_code_and_http_status_is_in_troubleshooting():
    from node.http._openai import _STATUS

    text = section("Troubleshooting")
    assert [code for code in (*INFER_ERROR_CODES, *CONTROL_ERROR_CODES) if f"`{code}`" not in text] == []
    table = [line for line in section("Request errors", "###").splitlines() if line.startswith("|")]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table[2:]]  # header, rule
    statuses = {cell for row in rows for cell in re.findall(r"\b[45]\d\d\b", row[2])}
    assert {str(status) for status, _ in _STATUS.values()} | {"401", "429"} <= statuses


RAISED = ("DaemonError", "ConfigError", "StoreError", "CorruptStoreError", "_UsageError", "_DaemonStillRunning")


def raised_messages() -> list[tuple[str, str]]:
    """(where, the longest literal piece of the message) for every error a command or the daemon
    stops with; a ConfigError's message is its `reason` (third argument)."""
    found = []
    for path in sorted((ROOT / "node").rglob("*.py")):
        for item in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(item, ast.Raise) and isinstance(item.exc, ast.Call)
                    and isinstance(item.exc.func, ast.Name) and item.exc.func.id in RAISED):
                continue
            args = item.exc.args
            message = args[2] if item.exc.func.id == "ConfigError" else args[0] if args else None
            pieces = _literal_pieces(message)
            if pieces:  # a message passed through from elsewhere (str(exc), a reply's) has none
                found.append((f"{path.relative_to(ROOT)}:{item.lineno}", max(pieces, key=len)))
    return found


def _literal_pieces(expr: ast.expr | None) -> list[str]:
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return [expr.value]
    if isinstance(expr, ast.JoinedStr):
        return [v.value for v in expr.values if isinstance(v, ast.Constant)]
    if isinstance(expr, ast.IfExp):
        return _literal_pieces(expr.body) + _literal_pieces(expr.orelse)
    return []


def _normal(text: str) -> str:
    return " ".join(text.replace("`", "").split())


def test_every_message_a_command_or_the_daemon_stops_with_is_in_troubleshooting():
    messages = raised_messages()
    assert len(messages) >= 50, messages  # the scan finds them
    text = _normal(section("Troubleshooting"))
    missing = [(where, piece) for where, piece in messages if len(_normal(piece)) >= 8 and _normal(piece) not in text]
    assert missing == []
