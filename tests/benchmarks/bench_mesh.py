"""Remote inference: a client peer to zero-latency echo on a daemon in another process, vs in-process,
and through an entry node that forwards to it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import aclosing
from pathlib import Path

import trio

import node
from node import RouterDeps
from node.client import PeerClient
from node.config import load_settings
from protocols.inference.messages import Request
from tests.benchmarks.run import Section, percentile, series

TITLE = "Remote inference (issue 8)"
DURATION = 6.0  # seconds per concurrency level
CONCURRENCY = (1, 8, 64)
WORDS = 200  # streaming: an answer of 201 chunks


def pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


def start_daemon(tmp: Path, name: str, cpu: int, *extra: str) -> tuple[subprocess.Popen, dict]:
    data = tmp / name
    proc = subprocess.Popen([*pin(cpu), sys.executable, "-m", "node.cli", "daemon", "--data-dir", str(data), "--listen",
                             "/ip4/127.0.0.1/tcp/0", "--limits-request-rate", "100000", "--limits-request-burst",
                             "100000", "--limits-max-concurrent", "256", "--limits-max-queue", "1024",
                             "--log-level", "info", *extra], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / f"{name}.log", "w"))
    deadline = time.monotonic() + 90
    while not (data / "daemon.json").exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"the benchmark daemon {name} did not start; see {tmp / f'{name}.log'}")
        time.sleep(0.05)
    return proc, json.loads((data / "daemon.json").read_text())


def request(i: int, stream: bool, prompt: str | None = None, via: str | None = None) -> Request:
    """An echo request; `via` set: a mesh request the entry node must forward to that peer."""
    if via:
        return Request(id=uuid.uuid4().hex, task="generate", prompt=prompt or f"bench prompt {i}", model="echo",
                       provider="mesh", on_peers=(via,), stream=stream, cache="no-cache", timeout_ms=60_000)
    return Request(id=uuid.uuid4().hex, task="generate", prompt=prompt or f"bench prompt {i}", provider="echo",
                   stream=stream, cache="no-cache", timeout_ms=60_000)


async def closed_loop(concurrency: int, duration: float, call) -> tuple[list[float], float]:
    """`concurrency` tasks each awaiting `call(i)` back to back for `duration` s: latencies (ms) and calls/s."""
    latencies: list[float] = []
    stop_at = trio.current_time() + duration

    async def worker(w: int) -> None:
        i = 0
        while trio.current_time() < stop_at:
            t = trio.current_time()
            await call(w * 100000 + i)
            latencies.append((trio.current_time() - t) * 1000)
            i += 1

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for w in range(concurrency):
            nursery.start_soon(worker, w)
    return latencies, len(latencies) / (trio.current_time() - start)


async def load(addr: str, concurrency: int, stream: bool, via: str | None = None) -> tuple[list[float], float]:
    """Latencies (ms) of requests issued by `concurrency` tasks for DURATION seconds, and requests/s."""
    async with PeerClient.connect(addr) as client:
        async def one(i: int) -> None:
            async with aclosing(client.generate(request(i, stream, via=via))) as items:
                async for item in items:
                    if via and not isinstance(item, str):
                        assert item.peer == via, "the entry node forwarded it"

        for i in range(20):  # warm up the connection and the daemon
            await one(i)
        return await closed_loop(concurrency, DURATION, one)


async def until_forwarding_works(addr: str, via: str) -> None:
    """Wait until the entry node knows the serving node (its advert arrived)."""
    with trio.fail_after(30):
        async with PeerClient.connect(addr) as client:
            while True:
                try:
                    async with aclosing(client.generate(request(0, False, via=via))) as items:
                        async for _ in items:
                            pass
                    return
                except Exception:  # the entry does not know the serving node yet
                    await trio.sleep(0.1)


async def streaming(addr: str) -> tuple[list[float], list[float]]:
    """Time to first chunk (ms) and chunks per second, for answers of WORDS + 1 chunks."""
    ttfc, rates = [], []
    prompt = " ".join(f"w{i}" for i in range(WORDS))
    async with PeerClient.connect(addr) as client:
        for i in range(30):
            t = trio.current_time()
            first, n = None, 0
            async with aclosing(client.generate(request(i, True, prompt))) as items:
                async for item in items:
                    if isinstance(item, str):
                        n += 1
                        first = first or trio.current_time() - t
            total = trio.current_time() - t
            if i >= 5:
                ttfc.append(first * 1000)
                rates.append(n / total)
    return ttfc, rates


async def in_process(concurrency: int) -> tuple[list[float], float]:
    deps = RouterDeps(settings=load_settings(env={}))

    async def one(i: int) -> None:
        await node.acomplete(f"bench prompt {i}", provider="echo", deps=deps, cache="no-cache")

    return await closed_loop(concurrency, DURATION / 2, one)


def run() -> Section:
    if pin(0):
        os.sched_setaffinity(0, {0})  # the client on core 0, the daemon on core 1
    rows, forwarded, samples, measured = [], [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        server, server_info = start_daemon(Path(tmp), "server", 1)
        addr, server_id = server_info["multiaddrs"][0], server_info["peer_id"]
        entry = None
        try:
            for c in CONCURRENCY:
                base, base_rps = trio.run(in_process, c)
                remote, rps = trio.run(load, addr, c, False)
                rows.append((c, statistics.median(base), percentile(base, 0.99), base_rps,
                             statistics.median(remote), percentile(remote, 0.99), rps))
                samples += series({"mode": "in_process", "concurrency": c}, base)
                samples += series({"mode": "mesh", "concurrency": c}, remote)
                measured += len(base) + len(remote)
            ttfc, rates = trio.run(streaming, addr)
            samples += [{"mode": "stream_ttfc", "ms": v} for v in ttfc]
            samples += [{"mode": "stream_chunks_per_s", "value": v} for v in rates]
            measured += len(ttfc) + len(rates)
            # through an entry node (core 0, beside the client) that forwards to the serving node
            entry, entry_info = start_daemon(Path(tmp), "entry", 0, "--bootstrap", addr)
            entry_addr = entry_info["multiaddrs"][0]
            trio.run(until_forwarding_works, entry_addr, server_id)
            for c in CONCURRENCY:
                via, via_rps = trio.run(load, entry_addr, c, False, server_id)
                forwarded.append((c, statistics.median(via), percentile(via, 0.99), via_rps))
                samples += series({"mode": "via_entry_node", "concurrency": c}, via)
                measured += len(via)
        finally:
            for proc in (server, entry):
                if proc is not None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=30)
    lines = [
        "A client peer (this process, core 0) sends non-streaming requests over `/accelmesh/infer/1.0.0` to a",
        "daemon in another process (core 1) that answers with zero-latency `echo`, cache off (every request",
        f"runs the provider); {DURATION:g} s per concurrency level, one connection, keep-alive streams (one per concurrent caller, reused across its requests).",
        "In-process: `node.acomplete(provider='echo')` in one trio loop. Overhead = mesh p50 - in-process p50.",
        "",
        "| concurrency | in-process p50 (ms) | p99 | req/s | mesh p50 (ms) | p99 | req/s | p50 overhead (ms) |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {c} | {b50:.2f} | {b99:.2f} | {brps:,.0f} | {m50:.2f} | {m99:.2f} | {mrps:,.0f} | {m50 - b50:+.2f} |"
          for c, b50, b99, brps, m50, m99, mrps in rows),
        "",
        f"Targets: p50 overhead under 3 ms (concurrency 1: **{rows[0][4] - rows[0][1]:.2f} ms**); at least 300",
        f"requests/s per serving node (best: **{max(r[6] for r in rows):,.0f} req/s**).",
        "",
        "Through an entry node: the client sends `provider='mesh', on_peers=[serving node]` to a second",
        "daemon (core 0, beside the client), whose mesh provider forwards it over its own keep-alive stream;",
        "the full path of a prompt submitted on one node and served by another (two hops).",
        "",
        "| concurrency | via entry p50 (ms) | p99 | req/s | p50 over direct (ms) |",
        "|---|---|---|---|---|",
        *(f"| {c} | {v50:.2f} | {v99:.2f} | {vrps:,.0f} | {v50 - r[4]:+.2f} |"
          for (c, v50, v99, vrps), r in zip(forwarded, rows)),
        "",
        f"Streaming ({WORDS + 1}-chunk answers, credit window 32, 25 runs): time to first chunk median "
        f"{statistics.median(ttfc):.2f} ms (p99 {percentile(ttfc, 0.99):.2f} ms), "
        f"{statistics.median(rates):,.0f} chunks/s.",
    ]
    return Section("\n".join(lines), samples, sample_count=measured)

