"""N concurrent calls through `node.connect(data_dir=)` to one daemon process, as a user would make them.

    python -m tests.benchmarks.load_through_daemon sync 320 1000        # 320 calls from threads, echo 1 s
    python -m tests.benchmarks.load_through_daemon async 400 1000       # 400 calls in one trio loop
    python -m tests.benchmarks.load_through_daemon sync 300 1000 3      # ... and SIGKILL the daemon after 3 s

Prints one JSON line: how many calls were answered, and every other outcome by error type.
The daemon holds 64 running and 256 queued (INTERFACES.md): beyond that a call hears node.Busy.
Not part of `make bench` (no timing target); kept to rerun the load scenarios of the issues.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import trio

import node


def start_daemon(data: str, latency_ms: int) -> subprocess.Popen:
    """`accelmesh daemon` on loopback with echo slowed to `latency_ms`; returns once daemon.json exists."""
    env = dict(os.environ, ACCELMESH_ECHO_LATENCY_MS=str(latency_ms))
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "daemon", "--data-dir", data,
                             "--listen", "/ip4/127.0.0.1/tcp/0"],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(data + ".log", "w"))
    deadline = time.monotonic() + 20
    while not os.path.exists(os.path.join(data, "daemon.json")):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit(f"the daemon did not start; see {data}.log")
        time.sleep(0.1)
    return proc


def outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, node.Busy):
        return f"Busy(retry_after={exc.retry_after})"
    return f"{type(exc).__name__}: {str(exc)[:60]}"


def sync_calls(client: node.Client, n: int) -> collections.Counter:
    def one(i: int) -> BaseException | None:
        try:
            client.generate_text(f"hello {i}", provider="echo")
        except Exception as exc:  # counted by type
            return exc
        return None

    with ThreadPoolExecutor(n) as pool:
        return collections.Counter(outcome(exc) for exc in pool.map(one, range(n)))


def async_calls(client: node.Client, n: int) -> collections.Counter:
    outcomes: collections.Counter = collections.Counter()

    async def one(i: int) -> None:
        try:
            await client.agenerate_text(f"hello {i}", provider="echo")
            outcomes[outcome(None)] += 1
        except Exception as exc:  # counted by type
            outcomes[outcome(exc)] += 1

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        await client.aclose()

    trio.run(run)
    return outcomes


def main(mode: str, n: int, latency_ms: int, kill_after: float | None = None) -> None:
    data = tempfile.mkdtemp() + "/d"
    proc = start_daemon(data, latency_ms)
    if kill_after is not None:
        threading.Timer(kill_after, proc.kill).start()
    try:
        client = node.connect(data_dir=data)
        started = time.monotonic()
        outcomes = sync_calls(client, n) if mode == "sync" else async_calls(client, n)
        print(json.dumps({"mode": mode, "n": n, "latency_ms": latency_ms,
                          "seconds": round(time.monotonic() - started, 2), "outcomes": dict(outcomes)}))
        client.close()
    finally:
        proc.terminate()
        proc.wait(20)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else None)
