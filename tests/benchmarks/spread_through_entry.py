"""The backend manager as a user meets it: prompts through an entry daemon to three serving daemons of
different speeds, per strategy, then what `accelmesh peers --json` says of them.

    python -m tests.benchmarks.spread_through_entry             # 60 prompts, 6 at a time, per strategy
    python -m tests.benchmarks.spread_through_entry 300 30 2    # 300 prompts, 30 at a time; SIGKILL one after 2 s
    SPREAD_LATENCY_MS=50-500 python -m tests.benchmarks.spread_through_entry 200 200 1   # issue 15's scenario
    SPREAD_LATENCY_MS=50-500 SPREAD_STRATEGIES=power_of_two python -m tests.benchmarks.spread_through_entry 200 200
                                                                                          # ... its baseline

The entry daemon serves nothing itself (ACCELMESH_ECHO_ENABLED=0); the serving daemons answer
echo in 50, 100 and 200 ms. Every prompt names the three with `on_peers` (issue 14's scenario)
and is unique (nothing hits a cache). Prints one JSON line per strategy (who served how many,
outcomes, p50 and p99 in ms) and the entry daemon's `peers` fields. With a kill, also the requests
the kill affected (those the entry's log says it retried on another node: `mesh: request ID: ...
failed`), their p50 and p99 beside the others', and how many answers any request got twice. Not
part of `make bench`.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import trio

import node
from node.client import DaemonClient
from node.config import LOAD_BALANCING_STRATEGIES
from node.datadir import DataDir
from tests.benchmarks.run import percentile

SPEEDS = {"fast": "50", "medium": "100", "slow": "200"}  # echo latency, ms
if os.environ.get("SPREAD_LATENCY_MS"):  # e.g. 50-500: the same for every serving daemon (issue 15's scenario)
    SPEEDS = dict.fromkeys(SPEEDS, os.environ["SPREAD_LATENCY_MS"])


def start(data: str, *args: str, **env: str) -> tuple[subprocess.Popen, dict]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ACCELMESH_")} | env
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "daemon", "--data-dir", data,
                             "--listen", "/ip4/127.0.0.1/tcp/0", *args],
                            env=environment, stdout=subprocess.DEVNULL, stderr=open(data + ".log", "w"))
    deadline = time.monotonic() + 30
    path = os.path.join(data, "daemon.json")
    while not os.path.exists(path):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit(f"a daemon did not start; see {data}.log")
        time.sleep(0.1)
    return proc, json.loads(open(path).read())


async def load(client: node.Client, names: dict[str, str], on: tuple[str, ...], strategy: str, n: int,
               width: int, kill: subprocess.Popen | None, kill_after: float | None,
               entry_log: str | None = None) -> dict:
    served: collections.Counter = collections.Counter()
    outcomes: collections.Counter = collections.Counter()
    latencies: dict[str, float] = {}  # by request id
    answers: collections.Counter = collections.Counter()  # by prompt
    limit = trio.Semaphore(width)

    async def one(i: int) -> None:
        async with limit:
            started, prompt, rid = time.monotonic(), f"{strategy} {i} {uuid.uuid4().hex}", uuid.uuid4().hex
            try:
                result = await client.acomplete(prompt, provider="mesh", model_name="echo", on_peers=on,
                                                strategy=strategy, request_id=rid)
            except Exception as exc:  # counted by type
                outcomes[type(exc).__name__] += 1
                return
            if result.text != f"echo: {prompt}":
                outcomes["wrong text"] += 1
                return
            latencies[rid] = (time.monotonic() - started) * 1000
            answers[prompt] += 1
            served[names.get(result.peer or "", "?")] += 1
            outcomes["ok"] += 1

    async def killer() -> None:
        assert kill is not None and kill_after is not None
        await trio.sleep(kill_after)
        kill.kill()

    async with trio.open_nursery() as nursery:
        if kill is not None:
            nursery.start_soon(killer)
        for i in range(n):
            nursery.start_soon(one, i)
    every = list(latencies.values())
    figures = {"strategy": strategy, "served_by": dict(served), "outcomes": dict(outcomes),
               "answered_twice": sum(1 for n in answers.values() if n > 1),
               "p50_ms": round(percentile(every, 0.5)), "p99_ms": round(percentile(every, 0.99))}
    if entry_log is not None:
        retried = set(re.findall(r"mesh: request (\w+): \S+ failed", open(entry_log).read())) & set(latencies)
        affected = [latencies[r] for r in retried]
        others = [ms for r, ms in latencies.items() if r not in retried]
        figures["affected"] = {"n": len(affected), "p50_ms": round(percentile(affected, 0.5)) if affected else None,
                               "p99_ms": round(percentile(affected, 0.99)) if affected else None}
        figures["unaffected"] = {"n": len(others), "p50_ms": round(percentile(others, 0.5)),
                                 "p99_ms": round(percentile(others, 0.99))}
    return figures


async def peers(data: str) -> list[dict]:
    """The entry daemon's `peers --json` entries, through its control protocol."""
    async with DaemonClient.connect(DataDir(data)) as control:
        return (await control.command("peers"))["peers"]


def main(n: int = 60, width: int = 6, kill_after: float | None = None) -> None:
    root = tempfile.mkdtemp()
    procs: list[subprocess.Popen] = []
    try:
        entry_proc, entry = start(f"{root}/entry", ACCELMESH_ECHO_ENABLED="0")
        procs.append(entry_proc)
        names, serving = {}, {}
        for name, ms in SPEEDS.items():
            proc, info = start(f"{root}/{name}", "--bootstrap", entry["multiaddrs"][0],
                               ACCELMESH_ECHO_LATENCY_MS=ms)
            procs.append(proc)
            names[info["peer_id"]] = name
            serving[name] = proc
        client = node.connect(data_dir=f"{root}/entry")
        deadline = time.monotonic() + 20
        while len(trio.run(peers, f"{root}/entry")) < 3:
            if time.monotonic() > deadline:
                raise SystemExit("the entry daemon did not learn the three serving daemons")
            time.sleep(0.2)
        on = tuple(names)
        strategies = ["power_of_two"] if kill_after is not None else list(LOAD_BALANCING_STRATEGIES)
        if os.environ.get("SPREAD_STRATEGIES"):  # e.g. power_of_two: the no-kill baseline of a kill run
            strategies = os.environ["SPREAD_STRATEGIES"].split(",")
        for strategy in strategies:
            kill = serving["fast"] if kill_after is not None else None
            log = f"{root}/entry.log" if kill is not None else None
            print(json.dumps(trio.run(load, client, names, on, strategy, n, width, kill, kill_after, log)),
                  flush=True)
        for peer in trio.run(peers, f"{root}/entry"):
            print(json.dumps({"peer": names[peer["peer_id"]], **{k: peer.get(k) for k in (
                "health", "cooldown_until", "latency_ms", "ttfc_ms", "rtt_ms", "in_flight", "failure_ratio",
                "cooldowns")}}))
        client.close()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]), *(float(a) for a in sys.argv[3:4]))
