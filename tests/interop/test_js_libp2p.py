"""Interop: an independent libp2p implementation (js-libp2p 2.x on Node.js) against our daemon.

The contract keeps identify and ping enabled so that js-libp2p 2.x can connect over
TCP + Noise + Yamux and run both. `js/dial.mjs` is that peer: it dials the daemon's multiaddr,
runs identify once and pings, and prints one JSON line. The js stack is pinned exactly in
`js/package.json` and `js/package-lock.json`; `npm ci` installs it into `js/node_modules` on
the first run (and again when the lock file changes).

Needs `node` (>= 20.19) and `npm` on PATH: a missing tool fails the test, it is not skipped
(`make test` installs them through the Makefile's SYSTEM_PACKAGES).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.system.conftest import start_daemon  # noqa: F401  (the fixture, shared with the system tests)

pytestmark = [pytest.mark.system, pytest.mark.interop]

JS_DIR = Path(__file__).resolve().parent / "js"
NODE_MIN = (20, 19)  # the oldest Node the locked tree declares it supports (@noble/* 2.x "engines")
NPM_CI_TIMEOUT = 300.0  # seconds; a warm npm cache makes it a few seconds
DIAL_TIMEOUT = 60.0  # seconds for the whole js run (each of its steps is bounded at 10 s inside)
INSTALL_HINT = (
    "install Node.js >= 20.19 with npm: `make test` does it (SYSTEM_PACKAGES), or by hand "
    "`sudo apt-get install nodejs npm` (Debian/Ubuntu; check `node --version`, older releases ship "
    "Node 18) or the NodeSource / nodejs.org packages for Node 20 or later"
)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH: the js-libp2p interop tests need it; {INSTALL_HINT}", pytrace=False)
    return path


def _node() -> str:
    node = _tool("node")
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    match = re.fullmatch(r"v(\d+)\.(\d+)\.\d+.*", out)
    if match is None or (int(match[1]), int(match[2])) < NODE_MIN:
        pytest.fail(f"`node --version` says {out!r}; js-libp2p 2.x needs Node >= "
                    f"{NODE_MIN[0]}.{NODE_MIN[1]}: {INSTALL_HINT}", pytrace=False)
    return node


def _npm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELMESH_", "IPFS_ACCELERATE_PY_"))}
    env.update(npm_config_update_notifier="false", npm_config_fund="false", npm_config_audit="false")
    return env


def ensure_js_deps() -> None:
    """`npm ci` in js/ unless node_modules already matches package-lock.json.

    npm ci writes node_modules/.package-lock.json; it is redone when the committed lock is newer.
    A file lock keeps two pytest processes from installing into the same folder at once.
    """
    npm = _tool("npm")
    lock, installed = JS_DIR / "package-lock.json", JS_DIR / "node_modules" / ".package-lock.json"

    def current() -> bool:
        return installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime

    if current():
        return
    with open(Path(tempfile.gettempdir()) / "accelmesh-interop-npm-ci.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if current():
            return
        cmd = [npm, "ci", "--no-audit", "--no-fund"]
        try:
            proc = subprocess.run(cmd, cwd=JS_DIR, capture_output=True, text=True, env=_npm_env(),
                                  timeout=NPM_CI_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(cmd)}` in {JS_DIR} took over {NPM_CI_TIMEOUT:g} s "
                        "(it needs the npm registry, or a warm npm cache)", pytrace=False)
        if proc.returncode != 0:
            pytest.fail(f"`{' '.join(cmd)}` in {JS_DIR} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}",
                        pytrace=False)


def prepare_js() -> str:
    """node (checked), with js/node_modules installed; called before any daemon starts."""
    node = _node()
    ensure_js_deps()
    return node


def dial_from_js(node: str, daemon, *args: str) -> dict:
    """Run js/dial.mjs against the daemon's first multiaddr; its JSON result (ok checked)."""
    addr = daemon.info["multiaddrs"][0]
    cmd = [node, "dial.mjs", addr, *args]
    try:
        proc = subprocess.run(cmd, cwd=JS_DIR, capture_output=True, text=True, env=_npm_env(), timeout=DIAL_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        pytest.fail(f"`node dial.mjs {addr}` did not finish in {DIAL_TIMEOUT:g} s\nstderr:\n{err}\n"
                    f"daemon log:\n{daemon.stderr()}", pytrace=False)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    context = (f"`node dial.mjs {' '.join(cmd[2:])}` exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
               f"stderr:\n{proc.stderr}\ndaemon log:\n{daemon.stderr()}")
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        pytest.fail(f"no JSON result from the js peer\n{context}", pytrace=False)
    assert proc.returncode == 0 and result.get("ok") is True, context
    return result


def test_js_libp2p_connects_over_noise_and_yamux_and_runs_identify_and_ping(start_daemon):  # noqa: F811
    node = prepare_js()
    with start_daemon("alice") as alice:
        result = dial_from_js(node, alice, "--pings", "10")
        assert result["peer"] == alice.info["peer_id"]
        assert result["security"] == "/noise"
        assert result["muxer"] == "/yamux/1.0.0"
        assert {"/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"} <= set(result["protocols"]), result["protocols"]
        assert result["agent"], "identify returned no agent version"
        assert len(result["pings"]) == 10
        assert all(isinstance(rtt, (int, float)) and rtt >= 0 for rtt in result["pings"]), result["pings"]
        assert result["connections"] == 1, "identify and every ping ran on the one connection"
        assert alice.proc.poll() is None, "the daemon is still up"


def test_ten_pings_within_a_second_are_all_answered_despite_the_request_rate_limit(start_daemon):  # noqa: F811
    # One stream per peer, then one every 1000 s: were ping subject to the per-peer request
    # rate, the second ping would be refused. js-libp2p opens a new stream for every ping.
    node = prepare_js()
    with start_daemon("alice", "--limits-request-rate", "0.001", "--limits-request-burst", "1") as alice:
        result = dial_from_js(node, alice, "--pings", "10")
        assert len(result["pings"]) == 10, result
        assert result["pings_ms"] < 1000, f"10 pings took {result['pings_ms']} ms, not within one second"
        assert alice.proc.poll() is None, "the daemon is still up"
