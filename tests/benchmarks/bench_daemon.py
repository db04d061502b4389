"""The daemon: start-up to daemon.json, connect time with and without a cluster key, cost of the stream guard."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from node.mesh.host import HostConfig, load_swarm_key, make_host, make_swarm_key, peer_info, run_host
from node.mesh.streams import FramedStream, StreamGuard, StreamLimits
from protocols.framing import encode_frame
from protocols.records import Identity
from tests.benchmarks.run import Section, summary

TITLE = "Daemon (issue 6)"
STARTS = 5
CONNECTS = 30
STREAMS = 300
PROTOCOL = "/accelmesh-bench/echo/1.0.0"
GUARDED = "/accelmesh-bench/guarded-echo/1.0.0"
WARMUP = 50  # streams of each kind before measuring


def start_times() -> list[float]:
    bin_dir = Path(sys.executable).parent
    times = []
    for _ in range(STARTS):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
            t = time.perf_counter()
            proc = subprocess.Popen([str(bin_dir / "accelmesh"), "daemon", "--data-dir", tmp, "--listen",
                                     "/ip4/127.0.0.1/tcp/0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=env)
            deadline = time.monotonic() + 90
            while not (Path(tmp) / "daemon.json").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(f"the daemon did not start (exit code {proc.poll()})")
                time.sleep(0.005)
            times.append(time.perf_counter() - t)
            proc.terminate()
            proc.wait(timeout=30)
    return times


async def connect_times(cluster_key: str | None) -> list[float]:
    server = make_host(HostConfig(Identity.generate(), cluster_key=cluster_key))
    times = []
    async with run_host(server, ["/ip4/127.0.0.1/tcp/0"]):
        addr = str(server.get_addrs()[0])
        for _ in range(CONNECTS):
            client = make_host(HostConfig(Identity.generate(), listen=(), cluster_key=cluster_key))
            async with run_host(client, []):
                t = trio.current_time()
                await client.connect(peer_info(addr))
                times.append((trio.current_time() - t) * 1000)
    return times


async def stream_times() -> tuple[list[float], list[float]]:
    """Per-stream times without and with the guard: one server, both handlers, warmed up, alternating."""
    server = make_host(HostConfig(Identity.generate()))
    guard = StreamGuard(StreamLimits(request_rate=1e6, request_burst=10**6))

    async def echo(framed: FramedStream, peer: str) -> None:
        frame = await framed.read_frame()
        if frame is not None:
            await framed.write(encode_frame(frame))

    async def plain(stream) -> None:  # the same work with no guard: frames read directly
        framed = FramedStream(stream, StreamLimits())
        try:
            await echo(framed, "")
        finally:
            await stream.close()

    times: dict[str, list[float]] = {PROTOCOL: [], GUARDED: []}
    async with run_host(server, ["/ip4/127.0.0.1/tcp/0"]):
        server.set_stream_handler(PROTOCOL, plain)
        server.set_stream_handler(GUARDED, guard.wrap(GUARDED, echo))
        client = make_host(HostConfig(Identity.generate(), listen=()))
        async with run_host(client, []):
            await client.connect(peer_info(str(server.get_addrs()[0])))
            for i in range(WARMUP + STREAMS):
                for protocol in (PROTOCOL, GUARDED) if i % 2 else (GUARDED, PROTOCOL):
                    t = trio.current_time()
                    stream = await client.new_stream(server.get_id(), [protocol])
                    await stream.write(encode_frame(b"ping"))
                    await FramedStream(stream, StreamLimits()).read_frame()
                    await stream.close()
                    if i >= WARMUP:
                        times[protocol].append((trio.current_time() - t) * 1000)
    return times[PROTOCOL], times[GUARDED]


def run() -> Section:
    starts = start_times()
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "swarm.key"
        key_file.write_text(make_swarm_key())
        key = load_swarm_key(key_file)
    plain_connect = trio.run(connect_times, None)
    psk_connect = trio.run(connect_times, key)
    unguarded, guarded = trio.run(stream_times)

    guard = StreamGuard(StreamLimits(request_rate=1e9, request_burst=10**9), clock=time.monotonic)
    n = 100_000
    t = time.perf_counter()
    for i in range(n):
        guard.admit(f"peer{i % 50}", PROTOCOL)
        guard.release(f"peer{i % 50}", PROTOCOL)
    admit_us = (time.perf_counter() - t) / n * 1e6

    s = summary(starts)
    pc, kc, ug, gd = summary(plain_connect), summary(psk_connect), summary(unguarded), summary(guarded)
    lines = [
        f"`accelmesh daemon` start to daemon.json written (a fresh data dir, so keys are generated): "
        f"median **{s['median']:.2f} s** (p99 {s['p99']:.2f} s, {STARTS} starts; mostly Python imports).",
        "",
        f"| connect to a daemon host, loopback ({CONNECTS} fresh dialers) | median (ms) | p99 (ms) |",
        "|---|---|---|",
        f"| Noise + Yamux | {pc['median']:.1f} | {pc['p99']:.1f} |",
        f"| cluster key (pnet) + Noise + Yamux | {kc['median']:.1f} | {kc['p99']:.1f} |",
        "",
        f"| new stream + one 4-byte frame echoed + close ({STREAMS} streams of each kind after {WARMUP} "
        "warm-up ones, alternating, one connection) | median (ms) | p99 (ms) |",
        "|---|---|---|",
        f"| handler without the stream guard | {ug['median']:.2f} | {ug['p99']:.2f} |",
        f"| handler behind `StreamGuard.wrap` (allow check, rate, per-peer and per-protocol counts) | "
        f"{gd['median']:.2f} | {gd['p99']:.2f} |",
        "",
        f"The guard's own bookkeeping (`admit` + `release`): {admit_us:.2f} us per stream.",
    ]
    samples = [{"metric": "start_s", "value": v} for v in starts]
    samples += [{"metric": "connect_ms", "value": v} for v in plain_connect]
    samples += [{"metric": "connect_psk_ms", "value": v} for v in psk_connect]
    samples += [{"metric": "stream_unguarded_ms", "value": v} for v in unguarded]
    samples += [{"metric": "stream_guarded_ms", "value": v} for v in guarded]
    samples.append({"metric": "guard_admit_release_us", "value": admit_us})
    return Section("\n".join(lines), samples, sample_count=len(samples))
