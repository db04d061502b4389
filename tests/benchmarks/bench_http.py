"""The HTTP API (issue 17): a daemon's /v1/completions to zero-latency echo, against the same call
in-process and against bare Hypercorn + Starlette answering a constant (the framework's ceiling),
at concurrency 1, 16 and 64, whole and streamed; and `accelmesh generate --data-dir` through a
daemon, over HTTP and over the control protocol.

The servers (and the in-process floor) run on core 0, the load generator (tests/benchmarks/loadgen:
raw sockets, keep-alive) on core 1. CPU ms per request is the server process's user + system time
over the requests it answered in the window.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import trio

from tests.benchmarks.loadgen import LoadResult, http_request, run_load
from tests.benchmarks.run import Section, percentile, series

TITLE = "HTTP API (issue 17)"
CONCURRENCY = (1, 16, 64)
SECONDS = 4.0
CLI_RUNS = 20
SERVER_CORE, CLIENT_CORE = 0, 1
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _pin(core: int) -> None:
    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {core})


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


@contextmanager
def server(cmd: list[str], env: dict[str, str], url_from) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: _pin(SERVER_CORE), text=True)
    try:
        url = url_from(proc)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def daemon(data_dir: str, http: bool = True):
    cmd = [sys.executable, "-m", "node.cli", "daemon", "--data-dir", data_dir, "--listen", "/ip4/127.0.0.1/tcp/0"]
    if http:
        cmd += ["--http", "127.0.0.1:0"]

    def url_from(proc: subprocess.Popen) -> str:
        info = Path(data_dir) / "daemon.json"
        deadline = time.monotonic() + 60
        while not info.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the daemon did not start")
            time.sleep(0.02)
        return json.loads(info.read_text()).get("http_url") or ""

    return server(cmd, {"ACCELMESH_ECHO_LATENCY_MS": "0", "ACCELMESH_LOG_LEVEL": "warning",
                        "ACCELMESH_ADVERTS_INTERVAL": "60"}, url_from)


def bare():
    return server([sys.executable, "-m", "tests.benchmarks.bare_asgi"], {}, lambda proc: proc.stdout.readline().strip())


def body(prompt: str, stream: bool) -> bytes:
    return json.dumps({"model": "echo", "prompt": prompt, "stream": stream}).encode()


def load(url: str, pid: int, concurrency: int, stream: bool, *, unique: bool) -> tuple[LoadResult, float]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    headers = {"x-accelmesh-provider": "echo", "x-accelmesh-cache-mode": "no-store" if unique else "default"}
    fixed = http_request("/v1/completions", body("bench", stream), headers)

    def make(i: int) -> bytes:
        return http_request("/v1/completions", body(f"bench {i}", stream), headers) if unique else fixed

    cpu: dict[str, float] = {}
    result = run_load(host, int(port), make, concurrency=concurrency, seconds=SECONDS,
                      on_window=lambda edge: cpu.__setitem__(edge, cpu_seconds(pid)))
    assert set(result.statuses) == {200}, result.statuses
    return result, (cpu["end"] - cpu["start"]) * 1000.0 / len(result.latencies_ms)


def in_process(concurrency: int, stream: bool) -> tuple[list[float], float, float]:
    """node.acomplete / node.astream_text to echo (no-store), `concurrency` tasks for SECONDS:
    (latencies or times to the first chunk in ms, requests/s, CPU ms per request)."""
    import node

    deps = node.RouterDeps()
    times: list[float] = []
    counter = 0

    async def worker(stop_at: float) -> None:
        nonlocal counter
        while trio.current_time() < stop_at:
            counter += 1
            started = trio.current_time()
            if stream:
                first = None
                async for _ in node.astream_text(f"bench {counter}", provider="echo", cache="no-store", deps=deps):
                    first = first or trio.current_time()
                times.append(((first or trio.current_time()) - started) * 1000.0)
            else:
                await node.acomplete(f"bench {counter}", provider="echo", cache="no-store", deps=deps)
                times.append((trio.current_time() - started) * 1000.0)

    async def main() -> tuple[float, float]:
        async with trio.open_nursery() as nursery:  # warm-up
            for _ in range(concurrency):
                nursery.start_soon(worker, trio.current_time() + 0.5)
        times.clear()
        cpu, wall = time.process_time(), trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker, trio.current_time() + SECONDS)
        return time.process_time() - cpu, trio.current_time() - wall

    cpu, wall = trio.run(main)
    return times, len(times) / wall, cpu * 1000.0 / len(times)


def cli_times(data_dir: str) -> list[float]:
    cmd = [str(Path(sys.executable).parent / "accelmesh"), "generate", "hello", "--data-dir", data_dir,
           "--provider", "echo"]
    times = []
    for _ in range(CLI_RUNS):
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        times.append((time.perf_counter() - started) * 1000.0)
        assert done.returncode == 0 and done.stdout.strip() == "echo: hello", done.stderr
    return times


def python_start_times() -> list[float]:
    times = []
    for _ in range(CLI_RUNS):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append((time.perf_counter() - started) * 1000.0)
    return times


def run() -> Section:
    samples: list[dict] = []
    rows: dict[tuple[str, str, int], dict[str, float]] = {}

    def record(target: str, mode: str, concurrency: int, values: list[float], rps: float, cpu_ms: float) -> None:
        rows[(target, mode, concurrency)] = {"p50": statistics.median(values), "p99": percentile(values, 0.99),
                                             "rps": rps, "cpu": cpu_ms}
        samples.extend(series({"target": target, "mode": mode, "concurrency": concurrency,
                               "requests_per_s": round(rps, 1), "cpu_ms_per_request": round(cpu_ms, 3)}, values))

    _pin(SERVER_CORE)
    for concurrency in CONCURRENCY:  # the floor, in this process on the server's core
        for stream in (False, True):
            values, rps, cpu = in_process(concurrency, stream)
            record("in-process", "stream" if stream else "whole", concurrency, values, rps, cpu)
    _pin(CLIENT_CORE)
    with tempfile.TemporaryDirectory() as tmp:
        targets = [("bare Hypercorn+Starlette", bare, False), ("daemon, echo (no-store)", lambda: daemon(tmp), True),
                   ("daemon, memory hit", lambda: daemon(tmp + "-hit"), False)]
        for name, start, unique in targets:
            with start() as (proc, url):
                for concurrency in CONCURRENCY:
                    for stream in (False, True):
                        result, cpu = load(url, proc.pid, concurrency, stream, unique=unique)
                        values = result.first_byte_ms if stream else result.latencies_ms
                        record(name, "stream" if stream else "whole", concurrency, values, result.requests_per_s, cpu)
        with daemon(tmp + "-cli") as (_, url):
            cli_http = cli_times(tmp + "-cli")
        with daemon(tmp + "-control", http=False) as _:
            cli_control = cli_times(tmp + "-control")
    python_floor = python_start_times()
    samples += series({"target": "accelmesh generate --data-dir", "path": "http"}, cli_http)
    samples += series({"target": "accelmesh generate --data-dir", "path": "control protocol"}, cli_control)
    samples += series({"target": "python -c pass"}, python_floor)

    lines = [
        "`POST /v1/completions` with `x-accelmesh-provider: echo` (latency 0) from a raw-socket,",
        "keep-alive load generator (`tests/benchmarks/loadgen.py`) on core 1; servers on core 0. `whole`:",
        "request to last byte; `stream` (`stream: true`): request to first body byte (time to first",
        "token). `in-process`: `node.acomplete` / `node.astream_text` with the same arguments, on core 0,",
        f"concurrency as tasks. {SECONDS:g} s per row after 1 s of warm-up. The daemon's echo rows use",
        "a unique prompt per request with `no-store` (every request is an inference); `memory hit`",
        "repeats one prompt. CPU ms/req: the server process's user + system time per answered request.",
        "",
        "| target | mode | concurrency | p50 ms | p99 ms | requests/s | CPU ms/req |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (target, mode, concurrency), row in rows.items():
        lines.append(f"| {target} | {mode} | {concurrency} | {row['p50']:.2f} | {row['p99']:.2f} | "
                     f"{row['rps']:.0f} | {row['cpu']:.2f} |")
    overhead = rows[("daemon, echo (no-store)", "whole", 1)]["p50"] - rows[("in-process", "whole", 1)]["p50"]
    ratios = {c: rows[("daemon, echo (no-store)", "whole", c)]["rps"] / rows[("bare Hypercorn+Starlette", "whole", c)]["rps"]
              for c in CONCURRENCY}
    best = max(ratios.values())
    lines += [
        "",
        f"- p50 overhead of the HTTP API over in-process at concurrency 1: **{overhead:.2f} ms** (target < 2 ms).",
        "- Non-streaming requests/s, daemon / bare framework: "
        + ", ".join(f"{ratios[c]:.0%} at {c}" for c in CONCURRENCY)
        + f" (target >= 50%; best {best:.0%}).",
        f"- `accelmesh generate --data-dir` through a daemon, median of {CLI_RUNS} (echo): **"
        f"{statistics.median(cli_http):.0f} ms** over HTTP (target < 300 ms), "
        f"{statistics.median(cli_control):.0f} ms over the control protocol (libp2p); `python -c pass`: "
        f"{statistics.median(python_floor):.0f} ms.",
    ]
    return Section("\n".join(lines), samples, sum(len(s.get("samples", [])) for s in samples))
