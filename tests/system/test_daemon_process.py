"""The daemon as a real process: start, status, info, generate through it, drain on SIGTERM, refusals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.test_cli import RESULT_KEYS

pytestmark = pytest.mark.system


def test_start_status_info_generate_and_stop(start_daemon, accelmesh_cmd):
    with start_daemon("alice") as alice:
        data = str(alice.data_dir)
        status = accelmesh_cmd("status", "--data-dir", data, "--json", check=True)
        assert json.loads(status.stdout)["state"] == "running"
        info = json.loads(accelmesh_cmd("info", "--json", "--data-dir", data, check=True).stdout)
        assert info["peer_id"] == alice.info["peer_id"] and info["addrs"] == alice.info["multiaddrs"]
        assert set(info["stats"]) == {"inferences", "cache"}
        out = accelmesh_cmd("generate", "hi there", "--provider", "echo", "--json", "--data-dir", data, check=True)
        result = json.loads(out.stdout)
        assert set(result) == RESULT_KEYS, "the daemon path prints exactly the in-process shape"
        assert result["text"] == "echo: hi there" and result["peer"] == alice.info["peer_id"]
        info = json.loads(accelmesh_cmd("info", "--json", "--data-dir", data, check=True).stdout)
        assert info["stats"]["inferences"] == 1 and info["stats"]["cache"]["miss"] == 1
        stopped = accelmesh_cmd("stop", "--data-dir", data, check=True)
        assert "stopped" in stopped.stdout
        assert alice.wait(timeout=30) == 0
        assert not (alice.data_dir / "daemon.json").exists()


def test_sigterm_drains_the_request_in_flight_then_exits_zero(start_daemon, accelmesh_cmd, subprocess_env):
    with start_daemon("alice", "--echo-latency-ms", "6000") as alice:  # long: the status polls are slow under load
        data = str(alice.data_dir)
        slow = subprocess.Popen(["accelmesh", "generate", "slow", "--provider", "echo", "--json", "--data-dir", data],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env)
        deadline = time.monotonic() + 30
        while json.loads(accelmesh_cmd("status", "--json", "--data-dir", data, check=True).stdout)["in_flight"] == 0:
            assert time.monotonic() < deadline and slow.poll() is None, slow.stderr.read() if slow.poll() else ""
            time.sleep(0.05)
        alice.signal(signal.SIGTERM)
        out, err = slow.communicate(timeout=30)
        assert slow.returncode == 0, err
        assert json.loads(out)["text"] == "echo: slow", "the request in flight finished during the drain"
        assert alice.wait(timeout=30) == 0
        assert "draining: 1 request(s) in flight" in alice.stderr(), alice.stderr()
        assert not (alice.data_dir / "daemon.json").exists()


def test_a_second_daemon_on_the_same_data_dir_exits_non_zero(start_daemon):
    with start_daemon("alice") as alice:
        with start_daemon("alice", wait=False) as again:
            assert again.wait(timeout=60) != 0
            assert "another daemon" in again.stderr() and str(alice.proc.pid) in again.stderr()
        assert alice.proc.poll() is None


def test_listening_beyond_loopback_without_key_or_allowlist_is_refused(start_daemon):
    with start_daemon("open", "--listen", "/ip4/0.0.0.0/tcp/0", wait=False) as daemon:
        assert daemon.wait(timeout=60) == 2
        err = daemon.stderr()
        assert "listening beyond loopback needs a cluster key" in err and "--open" in err
        assert not (daemon.data_dir / "daemon.json").exists()


OUTSIDER = textwrap.dedent("""
    import sys, trio
    from libp2p.peer.id import ID
    from node.mesh.host import HostConfig, make_host, peer_info, run_host
    from protocols.records import Identity

    async def main(addr, peer, protocol):
        host = make_host(HostConfig(Identity.generate(), listen=()))
        async with run_host(host, []):
            try:
                with trio.fail_after(20):
                    await host.connect(peer_info(addr))
                    stream = await host.new_stream(ID.from_base58(peer), [protocol])
                    await stream.write(b"\\x00")
                    if await stream.read(1):
                        print("GOT-ANSWER")
                        return
            except Exception as exc:
                print("REFUSED", type(exc).__name__)
                return
            print("REFUSED closed")

    trio.run(main, *sys.argv[1:])
""")


def test_an_outsider_can_open_no_protocol_stream(start_daemon, subprocess_env):
    with start_daemon("alice") as alice:
        for protocol in ("/accelmesh/control/1.0.0",):
            out = subprocess.run([sys.executable, "-c", OUTSIDER, alice.info["multiaddrs"][0], alice.info["peer_id"],
                                  protocol], capture_output=True, text=True, env=subprocess_env, timeout=60)
            assert out.stdout.startswith("REFUSED"), out.stdout + out.stderr


def test_with_a_cluster_key_an_outsider_cannot_even_connect(start_daemon, accelmesh_cmd, subprocess_env, tmp_path):
    key = tmp_path / "swarm.key"
    accelmesh_cmd("keygen", "--cluster-key", str(key), check=True)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    with start_daemon("alice", "--cluster-key", str(key)) as alice:
        data = str(alice.data_dir)
        # the local CLI reads the cluster key from daemon.json and still gets in
        assert json.loads(accelmesh_cmd("status", "--json", "--data-dir", data, check=True).stdout)["state"] == "running"
        out = subprocess.run([sys.executable, "-c", OUTSIDER, alice.info["multiaddrs"][0], alice.info["peer_id"],
                              "/ipfs/ping/1.0.0"], capture_output=True, text=True, env=subprocess_env, timeout=60)
        assert out.stdout.startswith("REFUSED"), out.stdout + out.stderr


def test_an_allowlisted_identity_is_served_through_peer_and_any_other_executes_nothing(
        start_daemon, accelmesh_cmd, tmp_path):
    out = accelmesh_cmd("init", "--data-dir", str(tmp_path / "client"), check=True).stdout
    client_id = out.split("peer id")[1].split()[0]  # the peer id of the identity.key it made
    identity = tmp_path / "client" / "identity.key"
    with start_daemon("alice", "--allow", client_id) as alice:
        entry = alice.info["multiaddrs"][0]
        out = accelmesh_cmd("generate", "who may ask", "--provider", "echo", "--json", "--peer", entry,
                            "--identity", str(identity), check=True)
        result = json.loads(out.stdout)
        assert set(result) == RESULT_KEYS and result["peer"] == alice.info["peer_id"]
        stranger = accelmesh_cmd("generate", "me too", "--provider", "echo", "--peer", entry, timeout=120)
        assert stranger.returncode != 0 and "Traceback" not in stranger.stderr
        info = json.loads(accelmesh_cmd("info", "--json", "--data-dir", str(alice.data_dir), check=True).stdout)
        assert info["stats"]["inferences"] == 1, "only the allowlisted identity's request ran"


def test_cli_without_a_daemon_says_so(accelmesh_cmd, tmp_path):
    for command in ("status", "info", "stop"):
        out = accelmesh_cmd(command, "--data-dir", str(tmp_path / "none"))
        assert out.returncode == 1 and "no daemon is running" in out.stderr


def test_init_creates_both_keys_and_prints_the_ids(accelmesh_cmd, tmp_path):
    out = accelmesh_cmd("init", "--data-dir", str(tmp_path / "d"), check=True)
    assert "peer id    12D3KooW" in out.stdout and "client id  12D3KooW" in out.stdout
    assert (tmp_path / "d" / "identity.key").exists() and (tmp_path / "d" / "client.key").exists()


def test_json_logs_are_one_object_per_line(start_daemon, accelmesh_cmd):
    with start_daemon("alice", "--log-format", "json") as alice:
        accelmesh_cmd("stop", "--data-dir", str(alice.data_dir), check=True)
        assert alice.wait(timeout=30) == 0
    lines = [line for line in alice.stderr().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is JSON: nothing else on stderr
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    started = next(r for r in records if "listening on" in r["msg"])
    assert started["peer"].startswith("12D3KooW") and started["level"] == "info"
    assert any(r["msg"].startswith("draining") for r in records)


def test_three_daemons_bootstrapped_from_the_first_list_each_other_within_5_s(start_daemon, accelmesh_cmd):
    with start_daemon("n0") as first:
        bootstrap = first.info["multiaddrs"][0]
        with start_daemon("n1", "--bootstrap", bootstrap) as n1, start_daemon("n2", "--bootstrap", bootstrap) as n2:
            nodes = [first, n1, n2]
            ids = {d.info["peer_id"] for d in nodes}
            started = time.monotonic()
            pending = set(range(3))
            while pending and time.monotonic() - started < 5.0:
                for i in list(pending):
                    out = accelmesh_cmd("peers", "--json", "--data-dir", str(nodes[i].data_dir), check=True)
                    listed = {p["peer_id"] for p in json.loads(out.stdout)["peers"]}
                    if listed == ids - {nodes[i].info["peer_id"]}:
                        pending.discard(i)
                time.sleep(0.1)
            assert not pending, f"nodes {pending} did not list the other two within 5 s"
            peer = json.loads(accelmesh_cmd("peers", "--json", "--data-dir", str(n1.data_dir), check=True).stdout)
            entry = peer["peers"][0]
            assert {"peer_id", "addrs", "providers", "accelerators", "load", "last_seen", "latency_ms", "health",
                    "cooldown_until"} <= set(entry)
            assert any(p["name"] == "echo" and p["ready"] for p in entry["providers"])
            assert any(a["kind"] == "cpu" for a in entry["accelerators"])
            table = accelmesh_cmd("peers", "--data-dir", str(n1.data_dir), check=True).stdout
            assert table.splitlines()[0].split()[:2] == ["PEER", "PROVIDERS"] and len(table.splitlines()) == 3
            info = json.loads(accelmesh_cmd("info", "--json", "--data-dir", str(n1.data_dir), check=True).stdout)
            assert info["accelerators"][-1]["kind"] == "cpu" and info["capacity"] == 64
            served = set()
            for i in range(6):  # a strategy named per request, through the entry daemon's backend manager
                out = accelmesh_cmd("generate", f"spread {i}", "--provider", "mesh", "--strategy", "least_loaded",
                                    "--json", "--data-dir", str(first.data_dir), check=True)
                served.add(json.loads(out.stdout)["peer"])
            assert served and served <= ids, served
            peers = json.loads(accelmesh_cmd("peers", "--json", "--data-dir", str(first.data_dir), check=True).stdout)
            measured = [p for p in peers["peers"] if p["peer_id"] in served]
            assert measured and all(p["health"] == "ok" and p["latency_ms"] is not None for p in measured)


def test_a_busy_daemon_is_one_clear_line_not_a_traceback(start_daemon, accelmesh_cmd, subprocess_env):
    # One slot, no queue: while a slow request holds the slot, the next one is answered busy at once.
    with start_daemon("alice", "--limits-max-concurrent", "1", "--limits-max-queue", "0",
                      env={"ACCELMESH_ECHO_LATENCY_MS": "20000"}) as alice:
        data = str(alice.data_dir)
        holder = subprocess.Popen(["accelmesh", "generate", "hold", "--provider", "echo", "--data-dir", data],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env)
        try:
            deadline = time.monotonic() + 30
            while json.loads(accelmesh_cmd("status", "--json", "--data-dir", data, check=True).stdout)["in_flight"] < 1:
                assert time.monotonic() < deadline, "the first request never started"
                time.sleep(0.1)
            out = accelmesh_cmd("generate", "x", "--provider", "echo", "--data-dir", data)
        finally:
            holder.kill()
            holder.wait(10)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert out.stderr.startswith("accelmesh: error: ") and out.stderr.count("\n") == 1
        assert "busy" in out.stderr and "retry after" in out.stderr
