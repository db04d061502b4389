"""`make demo`: a 3-node cluster on loopback, prompts streamed through one node and served by all three.

    python -m node.demo [--keep]

Starts three daemons as subprocesses (own data dirs under a temporary directory, free ports,
the second and third bootstrapped from the first, echo slowed to 40 ms per answer so the
streaming shows), waits until each knows the other two, then submits prompts through the
first one with `node.connect()`: model `echo` round robin across the cluster, one pinned to
the third node (`on_peers`), and one from a separate client peer dialing the first node
directly. It prints which node served each answer and the tokens as they arrive, then stops
every daemon with SIGTERM and exits 0 (non-zero if anything went wrong).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

START_TIMEOUT = 90.0
NAMES = ("alpha", "beta", "gamma")


def _accelmesh() -> list[str]:
    return [sys.executable, "-m", "node.cli"]


def start(name: str, base: Path, procs: list[subprocess.Popen[bytes]], *extra: str) -> Path:
    """Start daemon `name` (added to `procs` at once, so it is stopped even if it never comes up)."""
    data = base / name
    with open(base / f"{name}.log", "w") as log:
        proc = subprocess.Popen([*_accelmesh(), "daemon", "--data-dir", str(data), "--listen", "/ip4/127.0.0.1/tcp/0",
                                 "--echo-latency-ms", "40", *extra], stdout=log, stderr=log, start_new_session=True)
    procs.append(proc)
    deadline = time.monotonic() + START_TIMEOUT
    while not (data / "daemon.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"daemon {name} did not start; see {base / f'{name}.log'}")
        time.sleep(0.05)
    return data


def info(data: Path) -> dict[str, Any]:
    return json.loads((data / "daemon.json").read_text())


def peers(data: Path) -> set[str]:
    out = subprocess.run([*_accelmesh(), "peers", "--json", "--data-dir", str(data)], capture_output=True,
                         text=True, timeout=60)
    return {p["peer_id"] for p in json.loads(out.stdout)["peers"]} if out.returncode == 0 else set()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    args = parser.parse_args()
    import node

    base = Path(tempfile.mkdtemp(prefix="accelmesh-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    try:
        first_data = start(NAMES[0], base, procs)
        bootstrap = info(first_data)["multiaddrs"][0]
        datas = [first_data]
        for name in NAMES[1:]:
            datas.append(start(name, base, procs, "--bootstrap", bootstrap))
        ids = {name: info(data)["peer_id"] for name, data in zip(NAMES, datas)}
        names = {peer: name for name, peer in ids.items()}
        for name, peer in ids.items():
            print(f"{name:<6} {peer}  {info(datas[NAMES.index(name)])['multiaddrs'][0]}")
        deadline = time.monotonic() + 30
        while not all(peers(d) == set(ids.values()) - {ids[n]} for n, d in zip(NAMES, datas)):
            if time.monotonic() > deadline:
                raise SystemExit("the cluster did not converge within 30 s")
            time.sleep(0.2)
        print(f"cluster converged: every node lists the other two ({time.monotonic() - started:.1f} s after start)\n")

        served: dict[str, int] = {}

        def show(label: str, items: Any) -> None:
            print(f"{label}: ", end="", flush=True)
            for item in items:
                if isinstance(item, str):
                    print(item, end="", flush=True)
                else:
                    who = names.get(item.peer or "", item.peer)
                    served[who] = served.get(who, 0) + 1
                    print(f"\n    served by {who} ({item.provider}, cache {item.cache}, {item.latency_ms:.0f} ms, "
                          f"cid {item.cid[:16]}...)", flush=True)

        with node.connect(data_dir=datas[0]) as client:
            for i in range(6):
                show(f"[via alpha] prompt {i}", client.iter_request(f"tell me about node {i} of the mesh",
                                                                    model_name="echo", provider="mesh"))
            show("[via alpha, on gamma]", client.iter_request("only gamma may answer this", model_name="echo",
                                                              provider="mesh", on_peers=[ids["gamma"]]))
            show("[via alpha, repeated]", client.iter_request("tell me about node 0 of the mesh", model_name="echo",
                                                              provider="mesh"))
        with node.connect(peer=bootstrap) as outsider_client:
            show("[client peer -> alpha]", outsider_client.iter_request("hello from a client peer", model_name="echo",
                                                                        provider="mesh"))
        print(f"\nanswers by node: {dict(sorted(served.items()))}")
        if len(served) < 3:
            raise SystemExit("expected every node to serve at least one prompt")
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [_stopped(proc) for proc in procs]
        print(f"stopped all daemons (exit codes {codes}) after {time.monotonic() - started:.1f} s")
        if args.keep:
            print(f"data dirs and logs kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
        if any(codes):
            os._exit(1)


def _stopped(proc: subprocess.Popen[bytes]) -> int:
    """Wait for a daemon given SIGTERM; one that outlives its drain is killed (its exit code is then non-zero)."""
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
