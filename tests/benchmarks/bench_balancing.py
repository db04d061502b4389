"""Load balancing: each strategy under open-loop Poisson load through an entry daemon to three unequal
echo daemons, against the JSED oracle replayed on the same arrivals; and the pure policy's cost.

    python -m tests.benchmarks.run balancing                                  # 1,000 per point: about 10 min
    ACCELMESH_BENCH_BALANCING_N=50 python -m tests.benchmarks.run balancing   # a smoke run, about 1.5 min

Four daemons in subprocesses (data dirs in a temporary directory, every one stopped on the way out,
Ctrl-C included); the client and the simulation in this process.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import trio

import node
from node.client import DaemonClient
from node.config import LOAD_BALANCING_STRATEGIES as ALL_STRATEGIES
from node.datadir import DataDir
from node.mesh.balancer import BackendView, order, routing_key
from tests.benchmarks import balancing_sim as sim
from tests.benchmarks.run import Section, percentile, series

TITLE = "Load balancing (issue 14)"
N = int(os.environ.get("ACCELMESH_BENCH_BALANCING_N", "1000"))  # requests per point; the issue asks for 1,000
# A subset for a quick look (comma-separated names; round_robin is always run: the targets compare with it).
LOAD_BALANCING_STRATEGIES = tuple(s for s in ALL_STRATEGIES if s == "round_robin" or s in os.environ.get(
    "ACCELMESH_BENCH_BALANCING_STRATEGIES", ",".join(ALL_STRATEGIES)).split(","))
LOADS = (0.4, 0.8)  # offered load, as a share of the cluster's capacity
SLOTS = 2  # echo.concurrency on every serving daemon
BACKENDS = (sim.Backend("alice", 50, 150, SLOTS), sim.Backend("bob", 100, 300, SLOTS),
            sim.Backend("carol", 200, 600, SLOTS))  # mean service 1 : 2 : 4
SEED = 14  # arrivals and the oracle's service times
WARMUP = 30  # round-robin requests before the first point: every backend answers, streams open
PAUSE = 2.0  # seconds between points: the last point's adverts (load) settle
TIMEOUT = 120.0  # each request's deadline (seconds)
ENTRY_CPU_TARGET = 30.0  # percent of one core
SIZES = (10, 100, 1000)  # backends, for the selection cost
LIMITS = ("--limits-request-rate", "100000", "--limits-request-burst", "100000", "--limits-max-concurrent", "256",
          "--limits-max-queue", "1024", "--limits-max-streams-per-peer", "4096",
          "--limits-max-streams-per-protocol", "4096")  # only echo's slots may queue a request


@dataclass
class Point:
    """One strategy at one load, as measured."""

    load: float
    strategy: str
    latencies: list[float] = field(default_factory=list)  # ms from the scheduled start, answered requests only
    lags: list[float] = field(default_factory=list)  # ms the request started after its scheduled time
    errors: collections.Counter = field(default_factory=collections.Counter)  # by exception type
    served_by: collections.Counter = field(default_factory=collections.Counter)  # by backend name
    wall: float = 0.0  # seconds from the first scheduled start to the last answer
    entry_cpu: float = 0.0  # percent of one core, over `wall`
    client_cpu: float = 0.0  # this process, percent of one core, over `wall`

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0


def schedule(load: float) -> list[float]:
    """The arrival times at `load` (the same for every strategy)."""
    return sim.poisson_arrivals(load * sim.capacity(BACKENDS), N, random.Random(SEED * 1000 + round(load * 100)))


def oracle(arrivals: list[float], policy: sim.Policy) -> list[float]:
    """Latencies (ms) of `policy` in the simulation, on `arrivals`, service times drawn from BACKENDS (seeded)."""
    service = sim.draw_service_times(BACKENDS, len(arrivals), random.Random(SEED))
    return [v * 1000 for v in sim.simulate(arrivals, service, BACKENDS, policy).latencies]


def expected_seconds() -> float:
    """How long the default run takes: startup, warm-up, each point's arrivals, pauses, round robin's drain."""
    total = 20.0 + WARMUP / 10
    for load in LOADS:
        arrivals = schedule(load)
        drain = max(a + v / 1000 for a, v in zip(arrivals, oracle(arrivals, sim.round_robin))) - arrivals[-1]
        total += len(LOAD_BALANCING_STRATEGIES) * (arrivals[-1] + PAUSE) + drain
    return total


# -- the daemons ------------------------------------------------------------------------------


def start_daemon(tmp: Path, name: str, env: dict[str, str], *extra: str) -> tuple[subprocess.Popen, dict]:
    """`accelmesh daemon` on loopback with `env` added; returns once daemon.json exists."""
    data = tmp / name
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELMESH_", "IPFS_ACCELERATE_PY_"))}
    with open(tmp / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "node.cli", "daemon", "--data-dir", str(data), "--listen",
                                 "/ip4/127.0.0.1/tcp/0", *LIMITS, *extra], env={**clean, **env},
                                stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 90
    while not (data / "daemon.json").exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            tail = (tmp / f"{name}.log").read_text()[-2000:]
            raise RuntimeError(f"the benchmark daemon {name} did not start:\n{tail}")
        time.sleep(0.05)
    return proc, json.loads((data / "daemon.json").read_text())


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every daemon still running (each drains), SIGKILL one that takes over 20 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid`, all its threads, in seconds (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_peers_ready(entry: Path, names: dict[str, str]) -> None:
    """Wait until the entry node's peer table holds every serving node with echo ready."""
    with trio.fail_after(60):
        async with DaemonClient.connect(DataDir(entry)) as control:
            while True:
                table = (await control.command("peers"))["peers"]
                ready = {p["peer_id"] for p in table if any(x["name"] == "echo" and x["ready"]
                                                             for x in p["providers"])}
                if set(names) <= ready:
                    return
                await trio.sleep(0.2)


# -- the load ---------------------------------------------------------------------------------


async def open_loop(client: node.Client, point: Point, arrivals: list[float], names: dict[str, str],
                    entry_pid: int, tag: str) -> None:
    """Start request i at `arrivals[i]` s, each on its own task, whatever the others do; fill `point`."""

    async def one(i: int, due: float) -> None:
        point.lags.append((trio.current_time() - due) * 1000)
        try:
            result = await client.acomplete(f"{tag} {point.load} {point.strategy} {i}", provider="mesh",
                                            model_name="echo", strategy=point.strategy, cache="no-store",
                                            timeout=TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - counted by type: the table says how many and which
            point.errors[type(exc).__name__] += 1
            return
        point.latencies.append((trio.current_time() - due) * 1000)
        point.served_by[names.get(result.peer or "", "other")] += 1

    cpu, process = cpu_seconds(entry_pid), time.process_time()
    start = trio.current_time() + 0.05
    async with trio.open_nursery() as nursery:
        for i, at in enumerate(arrivals):
            await trio.sleep_until(start + at)
            nursery.start_soon(one, i, start + at)
    point.wall = trio.current_time() - start
    point.entry_cpu = 100 * (cpu_seconds(entry_pid) - cpu) / point.wall
    point.client_cpu = 100 * (time.process_time() - process) / point.wall


async def measure(entry: Path, entry_pid: int, names: dict[str, str]) -> list[Point]:
    await wait_peers_ready(entry, names)
    tag = uuid.uuid4().hex[:8]  # every prompt unique: nothing is answered from a cache
    points = []
    async with node.connect(data_dir=entry) as client:
        await open_loop(client, Point(0.0, "round_robin"), [i / 10 for i in range(WARMUP)], names, entry_pid,
                        f"warm-up {tag}")
        for load in LOADS:
            arrivals = schedule(load)
            for strategy in LOAD_BALANCING_STRATEGIES:
                await trio.sleep(PAUSE)
                point = Point(load, strategy)
                await open_loop(client, point, arrivals, names, entry_pid, tag)
                print(f"  load {load:.0%} {strategy}: p99 {percentile(point.latencies, 0.99):,.0f} ms, "
                      f"{sum(point.errors.values())} errors, entry CPU {point.entry_cpu:.0f}%", flush=True)
                points.append(point)
    return points


# -- the pure policy's cost -------------------------------------------------------------------


def selection_cost() -> list[tuple[str, int, list[float]]]:
    """Microseconds per `order()` call, per strategy and number of backends (varied loads and latencies)."""
    rng = random.Random(SEED)
    key = routing_key("generate", "echo", prompt="selection cost")
    out = []
    for n in SIZES:
        views = [BackendView(peer_id=f"12D3KooW{i:08d}", in_flight=rng.randint(0, 4), advert_load=rng.randint(0, 6),
                             capacity=rng.choice((1, 2, 4, 8, None)),
                             latency=None if rng.random() < 0.1 else rng.uniform(0.05, 0.6)) for i in range(n)]
        for strategy in LOAD_BALANCING_STRATEGIES:
            pick, calls, timings = random.Random(1), max(200, 20_000 // n), []
            for turn in range(calls):
                t = time.perf_counter_ns()
                order(strategy, views, rng=pick, turn=turn, key=key)
                timings.append((time.perf_counter_ns() - t) / 1000)
            out.append((strategy, n, timings))
    return out


# -- the report -------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "**pass**" if ok else "**FAIL**"


def p99(values: list[float]) -> float:
    return percentile(values, 0.99)


def load_table(load: float, points: dict[str, Point], best: list[float], rr: list[float]) -> list[str]:
    """One load's table: every strategy measured, then the oracle and round robin simulated."""
    lines = [
        f"Load {load:.0%}: {load * sim.capacity(BACKENDS):g} req/s offered.",
        "",
        "| strategy | n | p50 (ms) | p99 (ms) | req/s | errors | entry CPU % | p99 / oracle | "
        + " / ".join(b.name for b in BACKENDS) + " |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for strategy, p in points.items():
        share = " / ".join(f"{p.served_by[b.name] / max(1, len(p.latencies)):.0%}" for b in BACKENDS)
        lines.append(f"| {strategy} | {len(p.latencies) + p.errors.total()} | {percentile(p.latencies, 0.5):,.0f} | "
                     f"{p99(p.latencies):,.0f} | {p.throughput:.1f} | {p.errors.total()} | {p.entry_cpu:.0f} | "
                     f"{p99(p.latencies) / p99(best):.2f} | {share} |")
    for label, values in (("oracle (JSED, simulated)", best), ("sim round_robin", rr)):
        lines.append(f"| {label} | {len(values)} | {percentile(values, 0.5):,.0f} | {p99(values):,.0f} | | | | "
                     f"{p99(values) / p99(best):.2f} | |")
    errors = sum((p.errors for p in points.values()), collections.Counter())
    lag = max(p99(p.lags) for p in points.values())
    client = max(p.client_cpu for p in points.values())
    return [*lines, "", (f"Errors by type: {', '.join(f'{k} {v}' for k, v in errors.items()) or 'none'}. "
                         f"Client start lag p99 (worst point): {lag:.1f} ms; client CPU up to {client:.0f}%."), ""]


def targets(by: dict[tuple[float, str], Point], oracle_p99: dict[float, float]) -> list[tuple[str, bool]]:
    """The issue's targets, each with what was measured."""
    low, checks = LOADS[0], []
    rr = p99(by[(low, "round_robin")].latencies)
    judged = [s for s in ("power_of_two", "least_loaded", "least_delay") if s in LOAD_BALANCING_STRATEGIES]
    for s in judged:  # the issue names the first two; least_delay is ours, held to the same bars
        mine = p99(by[(low, s)].latencies)
        text = f"at {low:.0%}, {s} p99 at most half of round_robin's ({mine:,.0f} / {rr:,.0f} ms = {mine / rr:.2f})"
        checks.append((text, mine <= rr / 2))
    for load in LOADS:
        for s in judged:
            ratio = p99(by[(load, s)].latencies) / oracle_p99[load]
            checks.append((f"at {load:.0%}, {s} p99 within 1.2x of the oracle's ({ratio:.2f}x)", ratio <= 1.2))
    cpu = max(p.entry_cpu for p in by.values())
    failed = sum(p.errors.total() for p in by.values())
    return [*checks, (f"entry CPU below {ENTRY_CPU_TARGET:g}% at every point (highest {cpu:.0f}%)",
                      cpu < ENTRY_CPU_TARGET), (f"no errors ({failed})", failed == 0)]


def cost_table(costs: list[tuple[str, int, list[float]]]) -> list[str]:
    lines = [
        "Selection cost: `node.mesh.balancer.order()` alone (pure policy, no I/O) on n `BackendView`s with random",
        "loads, capacities (some unlimited) and latencies (10% unknown); microseconds per call, median (p99).",
        "",
        "| strategy | " + " | ".join(f"n = {n:,}" for n in SIZES) + " |",
        "|---|" + "---|" * len(SIZES),
    ]
    for strategy in LOAD_BALANCING_STRATEGIES:
        cells = [f"{statistics.median(t):,.1f} ({p99(t):,.1f})" for s, _, t in costs if s == strategy]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return lines


def run() -> Section:
    print(f"  {N} requests per point, {len(LOADS) * len(LOAD_BALANCING_STRATEGIES)} points: expected "
          f"{expected_seconds() / 60:.1f} min", flush=True)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="bench-balancing-") as tmp:
        try:
            names, bootstrap = {}, []
            for seed, b in enumerate(BACKENDS, 1):
                proc, info = start_daemon(Path(tmp), b.name, {
                    "ACCELMESH_ECHO_LATENCY_MS": f"{b.min_ms:g}-{b.max_ms:g}",
                    "ACCELMESH_ECHO_CONCURRENCY": str(b.slots), "ACCELMESH_ECHO_SEED": str(seed)})
                procs.append(proc)
                names[info["peer_id"]] = b.name
                bootstrap += ["--bootstrap", info["multiaddrs"][0]]
            proc, info = start_daemon(Path(tmp), "entry", {"ACCELMESH_ECHO_ENABLED": "0"}, *bootstrap)
            procs.append(proc)
            points = trio.run(measure, Path(tmp) / "entry", info["pid"], names)
        finally:
            stop(procs)
    costs = selection_cost()

    lines = [
        "An entry daemon that serves nothing itself (`ACCELMESH_ECHO_ENABLED=0`) forwards over",
        "`/accelmesh/infer/1.0.0` to three echo daemons, `echo.concurrency = 2` each, latency uniform on",
        ", ".join(f"{b.name} {b.min_ms:g}-{b.max_ms:g} ms" for b in BACKENDS) + " (means 1 : 2 : 4); capacity "
        f"{sim.capacity(BACKENDS):g} req/s (sum of slots / mean service).",
        "A client in this process submits through `node.connect(data_dir=entry)` (`provider='mesh',",
        "model_name='echo', strategy=..., cache='no-store'`, every prompt unique), open loop: request i starts",
        f"at its Poisson arrival time whatever the others do; {N} requests per point, the same arrival times",
        f"(seed {SEED}) for every strategy at a load. Latency runs from the scheduled start to the answer; p50",
        "and p99 are over answered requests. Throughput: answered / (first scheduled start to last answer).",
        "Entry CPU: the entry daemon's utime + stime over the point, percent of one core. The last column: the",
        "share of answers each serving daemon gave.",
        "Oracle: the simulation `tests/benchmarks/balancing_sim.py` (join-the-shortest-expected-delay with exact",
        "queue knowledge, no network) replayed on the same arrival times, service times drawn from the same",
        "distributions (seeded); `sim round_robin` is the same simulation under round robin, as a sanity check.",
        "",
    ]
    by = {(p.load, p.strategy): p for p in points}
    samples, oracle_p99 = [], {}
    for load in LOADS:
        arrivals = schedule(load)
        best, rr = oracle(arrivals, sim.jsed), oracle(arrivals, sim.round_robin)
        oracle_p99[load] = p99(best)
        lines += load_table(load, {s: by[(load, s)] for s in LOAD_BALANCING_STRATEGIES}, best, rr)
        samples += series({"load": load, "strategy": "oracle_jsed", "simulated": True}, best)
        samples += series({"load": load, "strategy": "sim_round_robin", "simulated": True}, rr)
    for p in points:
        samples += series({"load": p.load, "strategy": p.strategy}, p.latencies)
        samples.append({"load": p.load, "strategy": p.strategy, "errors": dict(p.errors), "wall_s": round(p.wall, 3),
                        "throughput": round(p.throughput, 3), "entry_cpu_pct": round(p.entry_cpu, 1),
                        "client_cpu_pct": round(p.client_cpu, 1), "served_by": dict(p.served_by),
                        "start_lag_p99_ms": round(p99(p.lags), 3)})
    lines += ["Targets:", "", *(f"- {text}: {verdict(ok)}" for text, ok in targets(by, oracle_p99)), ""]
    if N < 1000:
        lines += [f"_A smoke run: {N} requests per point, under the issue's 1,000; a p99 of so few is noise._", ""]
    lines += cost_table(costs)
    for strategy, n, timings in costs:
        samples += series({"selection_cost": strategy, "backends": n}, timings, unit="us")
    measured = sum(len(p.latencies) for p in points) + sum(len(t) for _, _, t in costs)
    return Section("\n".join(lines), samples, sample_count=measured)
