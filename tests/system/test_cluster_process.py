"""Remote inference between daemon processes: a cluster with a key, a client peer, and an outsider."""

from __future__ import annotations

import json
import time

import pytest

from tests.test_cli import RESULT_KEYS

pytestmark = pytest.mark.system


def stats(accelmesh_cmd, daemon) -> dict:
    return json.loads(accelmesh_cmd("info", "--json", "--data-dir", str(daemon.data_dir), check=True).stdout)["stats"]


def test_a_client_peer_with_the_key_is_served_by_remote_peers_and_an_outsider_executes_nothing(
        start_daemon, accelmesh_cmd, tmp_path, subprocess_env):
    key = tmp_path / "swarm.key"
    accelmesh_cmd("keygen", "--cluster-key", str(key), check=True)
    for name in ("n0", "n1", "n2"):  # fixed identities, made before the daemons start
        accelmesh_cmd("init", "--data-dir", str(tmp_path / name), check=True)
    with start_daemon("n0", "--cluster-key", str(key)) as n0:
        entry = n0.info["multiaddrs"][0]
        with start_daemon("n1", "--cluster-key", str(key), "--bootstrap", entry) as n1, \
                start_daemon("n2", "--cluster-key", str(key), "--bootstrap", entry) as n2:
            daemons = [n0, n1, n2]
            ids = {d.info["peer_id"] for d in daemons}
            deadline = time.monotonic() + 20
            while len({p["peer_id"] for p in json.loads(accelmesh_cmd(
                    "peers", "--json", "--data-dir", str(n0.data_dir), check=True).stdout)["peers"]}) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.2)

            # an outsider without the key: nothing runs anywhere
            out = accelmesh_cmd("generate", "let me in", "--provider", "mesh", "--model", "echo",
                                "--peer", entry, timeout=120)
            assert out.returncode != 0 and "Traceback" not in out.stderr
            assert all(stats(accelmesh_cmd, d)["inferences"] == 0 for d in daemons)

            # a client peer with the key and its own identity: served across the cluster
            identity = tmp_path / "client-identity.key"
            accelmesh_cmd("init", "--data-dir", str(tmp_path / "client"), check=True)
            identity.write_bytes((tmp_path / "client" / "identity.key").read_bytes())
            identity.chmod(0o600)
            served = []
            for i in range(6):
                out = accelmesh_cmd("generate", f"prompt number {i}", "--provider", "mesh", "--model", "echo",
                                    "--peer", entry, "--cluster-key", str(key), "--identity", str(identity),
                                    "--json", check=True)
                result = json.loads(out.stdout)
                assert set(result) == RESULT_KEYS
                assert result["text"] == f"echo: prompt number {i}" and result["peer"] in ids
                served.append(result["peer"])
            remote = [p for p in served if p != n0.info["peer_id"]]
            assert len(set(served)) == 3 and len(remote) == 4, served
            # --stream --json through --peer: deltas, then the final object
            out = accelmesh_cmd("generate", "a b c", "--provider", "mesh", "--model", "echo", "--stream", "--json",
                                "--peer", entry, "--cluster-key", str(key), check=True)
            lines = [json.loads(line) for line in out.stdout.splitlines()]
            assert [x["delta"] for x in lines[:-1]] == ["echo:", " a", " b", " c"] and lines[-1]["peer"] in ids
            assert all(set(x) == {"delta"} for x in lines[:-1]) and set(lines[-1]) == RESULT_KEYS
            total = sum(stats(accelmesh_cmd, d)["inferences"] for d in daemons)
            assert total == 7
            listed = {p["peer_id"] for p in json.loads(accelmesh_cmd(
                "peers", "--json", "--data-dir", str(n1.data_dir), check=True).stdout)["peers"]}
            assert listed == ids - {n1.info["peer_id"]}, "client peers are never listed"
