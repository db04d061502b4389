"""Daemons as real subprocesses (the `system` tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

START_TIMEOUT = 60.0  # seconds for a daemon to write daemon.json (imports dominate on a slow CI core)
ROOT = Path(__file__).resolve().parents[2]  # on the daemons' PYTHONPATH, so that they can import `tests.fakes`
DAEMON = ("accelmesh", "daemon")  # start_daemon's default command (tests.fakes.lying_daemon.command: another)


class DaemonProcess:
    def __init__(self, data_dir: Path, proc: subprocess.Popen, log: Path) -> None:
        self.data_dir, self.proc, self.log = data_dir, proc, log

    @property
    def info(self) -> dict:
        return json.loads((self.data_dir / "daemon.json").read_text())

    def stderr(self) -> str:
        return self.log.read_text()

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def accelmesh_cmd(subprocess_env):
    def run(*args: str, timeout: float = 60, check: bool = False, input: str | None = None):
        proc = subprocess.run(["accelmesh", *args], capture_output=True, text=True, env=subprocess_env,
                              timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"accelmesh {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
        return proc

    return run


@pytest.fixture
def start_daemon(subprocess_env, tmp_path):
    started: list[DaemonProcess] = []

    @contextmanager
    def start(name: str, *args: str, wait: bool = True, env: dict | None = None,
              command: tuple[str, ...] = DAEMON) -> Iterator[DaemonProcess]:
        data_dir = tmp_path / name
        log = tmp_path / f"{name}.log"
        path = os.pathsep.join(filter(None, [str(ROOT), subprocess_env.get("PYTHONPATH")]))
        proc = subprocess.Popen(
            [*command, "--data-dir", str(data_dir), "--listen", "/ip4/127.0.0.1/tcp/0", *args],
            stdout=subprocess.DEVNULL, stderr=open(log, "w"),
            env={**subprocess_env, "PYTHONPATH": path, **(env or {})}, start_new_session=True,
        )
        daemon = DaemonProcess(data_dir, proc, log)
        started.append(daemon)
        if wait:
            deadline = time.monotonic() + START_TIMEOUT
            while not (data_dir / "daemon.json").exists():
                if proc.poll() is not None:
                    raise AssertionError(f"daemon {name} exited {proc.returncode}:\n{log.read_text()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"daemon {name} did not start:\n{log.read_text()}")
                time.sleep(0.05)
        try:
            yield daemon
        finally:
            stop(daemon)

    def stop(daemon: DaemonProcess) -> None:
        if daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGTERM)
            try:
                daemon.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.proc.pid, signal.SIGKILL)
                daemon.proc.wait(timeout=10)

    yield start
    for daemon in started:
        stop(daemon)
