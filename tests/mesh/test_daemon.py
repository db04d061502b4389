"""The daemon's life cycle, identity, secure defaults and control channel (in-process, real hosts)."""

from __future__ import annotations

import json
import os
import socket
import stat
from contextlib import aclosing
from functools import partial

import multiaddr
import pytest
import trio
from libp2p.host.exceptions import StreamFailure
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.peer.id import ID

from node.client import DaemonClient
from node.config import load_settings
from node.daemon import Daemon, check_listen_policy, mdns_enabled
from node.datadir import DataDir
from node.errors import ConfigError, DaemonError, ProviderFailed
from node.mesh.host import make_swarm_key, peer_info
from protocols.control.messages import PROTOCOL_ID as CONTROL
from protocols.inference.messages import Request, Result
from protocols.records import Identity
from tests.mesh.conftest import LOOPBACK, caused_by, connect, peer_host, running_daemon


async def test_daemon_json_is_written_when_up_and_removed_on_exit(tmp_path):
    async with running_daemon(tmp_path) as daemon:
        info = json.loads((daemon.data_dir.path / "daemon.json").read_text())
        assert set(info) >= {"peer_id", "multiaddrs", "pid", "version"}
        assert info["peer_id"] == daemon.peer_id and info["pid"] == os.getpid()
        assert info["multiaddrs"][0].startswith("/ip4/127.0.0.1/tcp/")
        assert all(a.endswith(f"/p2p/{daemon.peer_id}") for a in info["multiaddrs"])
        assert not list(daemon.data_dir.path.glob(".daemon.json.*")), "written through a temp file + rename"
        async with peer_host() as friend:  # what daemon.json names is really listening
            await connect(friend, daemon)
    assert not (daemon.data_dir.path / "daemon.json").exists()


async def test_identity_persists_and_keys_are_private(tmp_path):
    async with running_daemon(tmp_path) as first:
        peer = first.peer_id
    for name in ("identity.key", "client.key"):
        assert stat.S_IMODE((first.data_dir.path / name).stat().st_mode) == 0o600
    async with running_daemon(tmp_path) as again:
        assert again.peer_id == peer


async def test_an_identity_key_readable_by_others_is_refused(tmp_path):
    data = DataDir(tmp_path / "alice")
    data.identity()
    data.identity_file.chmod(0o644)
    settings = load_settings(env={"ACCELMESH_DATA_DIR": str(data.path), "ACCELMESH_LISTEN": LOOPBACK})
    with pytest.raises(DaemonError, match="readable by others"):
        await Daemon(settings).run()


async def test_a_second_daemon_on_the_same_data_dir_refuses_to_start(tmp_path):
    async with running_daemon(tmp_path) as first:
        second = Daemon(load_settings(env={"ACCELMESH_DATA_DIR": str(first.data_dir.path),
                                           "ACCELMESH_LISTEN": LOOPBACK}))
        with pytest.raises(DaemonError, match=f"another daemon \\(pid {os.getpid()}\\) is running"):
            await second.run()
        assert (first.data_dir.path / "daemon.json").exists(), "the refused daemon left the first one alone"


@pytest.mark.parametrize("listen", ["/ip4/0.0.0.0/tcp/0", "/ip6/::/tcp/0", "/ip4/10.1.2.3/tcp/4001"])
def test_listening_beyond_loopback_needs_a_key_an_allowlist_or_open(tmp_path, listen):
    key = tmp_path / "swarm.key"
    key.write_text(make_swarm_key())
    base = {"ACCELMESH_LISTEN": listen}
    with pytest.raises(ConfigError, match="--cluster-key"):
        check_listen_policy(load_settings(env=base))
    for extra in ({"ACCELMESH_CLUSTER_KEY": str(key)}, {"ACCELMESH_ALLOW": Identity.generate().peer_id},
                  {"ACCELMESH_OPEN": "1"}):
        check_listen_policy(load_settings(env={**base, **extra}))
    check_listen_policy(load_settings(env={"ACCELMESH_LISTEN": "/ip4/127.0.0.1/tcp/0,/ip6/::1/tcp/0"}))


async def test_a_refused_start_leaves_no_daemon_json_and_no_lock(tmp_path):
    settings = load_settings(env={"ACCELMESH_DATA_DIR": str(tmp_path / "d"), "ACCELMESH_LISTEN": "/ip4/0.0.0.0/tcp/0"})
    with pytest.raises(ConfigError):
        await Daemon(settings).run()
    assert not (tmp_path / "d" / "daemon.json").exists()
    async with running_daemon(tmp_path, name="d"):
        pass


@pytest.mark.parametrize("env,expected", [
    ({}, False),  # loopback only
    ({"ACCELMESH_LISTEN": "/ip4/0.0.0.0/tcp/0", "ACCELMESH_ALLOW": "x"}, True),  # beyond loopback: on
    ({"ACCELMESH_LISTEN": "/ip4/0.0.0.0/tcp/0", "ACCELMESH_OPEN": "1"}, False),  # --open: off unless asked
    ({"ACCELMESH_LISTEN": "/ip4/0.0.0.0/tcp/0", "ACCELMESH_OPEN": "1", "ACCELMESH_MDNS": "1"}, True),
    ({"ACCELMESH_MDNS": "0", "ACCELMESH_LISTEN": "/ip4/0.0.0.0/tcp/0"}, False),
])
def test_mdns_defaults(env, expected):
    assert mdns_enabled(load_settings(env=env)) is expected


async def test_control_status_info_and_stop_from_the_client_key(tmp_path):
    async with running_daemon(tmp_path) as daemon:
        async with DaemonClient.connect(daemon.data_dir) as client:
            status = await client.command("status")
            assert status["state"] == "running" and status["peer_id"] == daemon.peer_id
            info = await client.command("info")
            assert info["peer_id"] == daemon.peer_id and info["addrs"] == daemon.addrs()
            assert info["stats"] == {"inferences": 0, "cache": {"memory": 0, "local": 0, "cluster": 0, "miss": 0,
                                                               "bypass": 0}}
            assert (await client.command("stop"))["stopping"] is True
        with trio.fail_after(10):
            while daemon.state != "stopped":
                await trio.sleep(0.05)


async def test_control_is_refused_to_every_other_peer_even_an_allowed_one(tmp_path):
    friend_id = Identity.generate()
    async with running_daemon(tmp_path, ACCELMESH_ALLOW=friend_id.peer_id) as daemon, peer_host(friend_id) as friend:
        await connect(friend, daemon)
        # Where the reset lands races the client's reader task inside py-libp2p: before the protocol ack
        # is read (new_stream fails), before our write (StreamReset), or after it (the read sees EOF).
        with trio.fail_after(10), pytest.raises((StreamFailure, StreamReset, StreamEOF)) as info:
            stream = await friend.new_stream(ID.from_base58(daemon.peer_id), [CONTROL])
            await stream.write(b"\x00")
            await stream.read(1)  # any answer fails the test
        if isinstance(info.value, StreamFailure):  # a reset, not e.g. an unknown protocol
            assert caused_by(info.value, StreamReset), repr(info.value)
        assert daemon.guard.refused["not_allowed"] == 1


async def test_generate_through_the_control_channel_streams_and_returns_a_verified_result(tmp_path):
    async with running_daemon(tmp_path) as daemon, DaemonClient.connect(daemon.data_dir) as client:
        request = Request(id="r1", task="generate", prompt="hello over control", provider="echo", timeout_ms=10_000)
        with trio.fail_after(20):
            async with aclosing(client.generate(request)) as items:
                got = [item async for item in items]
        *chunks, result = got
        assert "".join(chunks) == "echo: hello over control" and isinstance(result, Result)
        assert result.verify()["text"] == "echo: hello over control"
        assert (result.peer, result.provider, result.cache) == (daemon.peer_id, "echo", "miss")
        assert (daemon.data_dir.path / "cache.sqlite").exists()
        assert daemon.info()["stats"]["inferences"] == 1


async def test_sigterm_style_stop_drains_in_flight_work_before_exit(tmp_path):
    async with running_daemon(tmp_path, ACCELMESH_ECHO_LATENCY_MS="1500") as daemon, \
            DaemonClient.connect(daemon.data_dir) as client:
        request = Request(id="slow", task="generate", prompt="slow one", provider="echo", timeout_ms=10_000)
        finished = []

        async def generate():
            async with aclosing(client.generate(request)) as items:
                finished.extend([item async for item in items])

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(generate)
                while daemon.admission.in_flight == 0:
                    await trio.sleep(0.01)
                daemon.request_stop()  # what SIGTERM does
                await trio.sleep(0.2)
                assert daemon.state == "draining"
        assert isinstance(finished[-1], Result), "the in-flight request completed during the drain"
        with trio.fail_after(10):
            while daemon.state != "stopped":
                await trio.sleep(0.05)


async def test_drain_grace_bounds_the_wait(tmp_path):
    async with running_daemon(tmp_path, ACCELMESH_ECHO_LATENCY_MS="30000",
                              ACCELMESH_DAEMON_DRAIN_GRACE="0.5") as daemon, \
            DaemonClient.connect(daemon.data_dir) as client:
        request = Request(id="stuck", task="generate", prompt="x", provider="echo", timeout_ms=60_000)

        async def generate():
            with pytest.raises(ProviderFailed, match="the stream ended before the result"):
                async with aclosing(client.generate(request)) as items:
                    async for _ in items:
                        pass

        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(generate)
                while daemon.admission.in_flight == 0:
                    await trio.sleep(0.01)
                started = trio.current_time()
                daemon.request_stop()
                while daemon.state != "stopped":
                    await trio.sleep(0.02)
                assert trio.current_time() - started < 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_bootstrap_peer_is_dialed_and_redialed_after_it_restarts(tmp_path):
    alice_env = {"ACCELMESH_DATA_DIR": str(tmp_path / "alice"), "ACCELMESH_LISTEN": f"/ip4/127.0.0.1/tcp/{free_port()}"}

    async def run_alice(nursery) -> Daemon:
        return await nursery.start(Daemon(load_settings(env=alice_env)).run)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            alice = await run_alice(nursery)
            async with running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0]) as bob:
                alice_id = ID.from_base58(alice.peer_id)
                while not bob._connected(alice_id):
                    await trio.sleep(0.05)
                alice.request_stop(force=True)
                while alice.state != "stopped" or bob._connected(alice_id):
                    await trio.sleep(0.05)
                alice_again = await run_alice(nursery)  # same identity, same port
                assert alice_again.peer_id == alice.peer_id
                while not bob._connected(alice_id):
                    await trio.sleep(0.1)
                alice_again.request_stop(force=True)


# -- wildcard listen addresses ----------------------------------------------------------------------


async def test_a_daemon_listening_on_0000_reports_dialable_addresses_loopback_first(tmp_path):
    from node.mesh.host import interface_addresses

    env = {"ACCELMESH_LISTEN": "/ip4/0.0.0.0/tcp/0", "ACCELMESH_OPEN": "1"}
    with trio.fail_after(30):
        async with running_daemon(tmp_path, "wild", **env) as daemon:
            addrs = daemon.addrs()
            port = addrs[0].split("/tcp/")[1].split("/")[0]
            assert addrs[0] == f"/ip4/127.0.0.1/tcp/{port}/p2p/{daemon.peer_id}"
            assert not any("/0.0.0.0/" in a for a in addrs), addrs
            assert {a.split("/")[2] for a in addrs} == set(interface_addresses()[0])  # one per IPv4 address
            assert json.loads((daemon.data_dir.path / "daemon.json").read_text())["multiaddrs"] == addrs
            assert daemon.info()["addrs"] == addrs
            assert list(daemon.adverts.current.addrs) == addrs[:16]
            for addr in addrs:  # every address is really dialable
                async with peer_host() as friend:
                    await friend.connect(peer_info(addr))
                    assert friend.get_network().connections.get(ID.from_base58(daemon.peer_id))
            async with running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=addrs[-1]) as bob:
                while daemon.peer_id not in bob.table:
                    await trio.sleep(0.05)
                seen = (await bob.command("peers", {}))["peers"]
                (entry,) = [p for p in seen if p["peer_id"] == daemon.peer_id]
                assert entry["addrs"] == addrs  # what `accelmesh peers --json` shows elsewhere
                # identify told bob the same addresses (py-libp2p would have sent /ip4/0.0.0.0/...)
                known = [str(a) for a in bob.host.get_peerstore().addrs(ID.from_base58(daemon.peer_id))]
                assert not any("/0.0.0.0/" in a for a in known), known


# -- the http setting (the API itself: tests/http) -------------------------------------------------


async def test_a_malformed_http_setting_is_refused_before_anything_starts(tmp_path):
    settings = load_settings(env={"ACCELMESH_DATA_DIR": str(tmp_path / "d"), "ACCELMESH_LISTEN": LOOPBACK,
                                  "ACCELMESH_HTTP": "no-port-here"})
    with pytest.raises(ConfigError, match="http.*expected HOST:PORT"):
        await Daemon(settings).run()
    assert not (tmp_path / "d" / "daemon.json").exists()
    async with running_daemon(tmp_path, name="d"):  # nothing was left locked
        pass


def test_accelmesh_daemon_with_a_malformed_http_exits_2_with_one_line_naming_the_setting(tmp_path, subprocess_env):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "node.cli", "daemon", "--data-dir", str(tmp_path / "d"),
                           "--listen", LOOPBACK, "--http", "127.0.0.1:notaport"],
                          capture_output=True, text=True, env=subprocess_env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "http" in errors[0] and "HOST:PORT" in errors[0], proc.stderr
    assert not (tmp_path / "d" / "daemon.json").exists()


# -- mDNS: the daemon dials what it finds -----------------------------------------------------------


def test_discovery_backoff_doubles_up_to_its_maximum_and_starts_over_after_a_lasting_connection():
    from node.mesh.discovery import Backoff

    b = Backoff(0.5, 4.0)
    assert b.due("p", 0.0)
    assert [b.attempted("p", t) for t in (0.0, 0.5, 1.5, 3.5, 7.5, 11.5)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert not b.due("p", 15.4) and b.due("p", 15.5)
    b.reset("p")
    assert b.due("p", 0.0) and b.attempted("p", 20.0) == 0.5
    b.attempted("q", 0.0)
    b.forget_except({"q"})
    assert len(b) == 1 and b.due("p", 0.0)


class Found:
    """A discovery source, as `mdns_peers(host)` is one: the PeerInfos found so far."""

    def __init__(self) -> None:
        self.peers: list = []

    def add(self, peer_id: str, addr: str) -> None:
        from libp2p.peer.peerinfo import PeerInfo

        self.peers.append(PeerInfo(ID.from_base58(peer_id), [multiaddr.Multiaddr(addr.split("/p2p/")[0])]))

    def __call__(self) -> list:
        return list(self.peers)


async def test_a_peer_found_by_discovery_is_dialed_and_its_advert_fetched(tmp_path):
    found = Found()
    with trio.fail_after(30):
        async with running_daemon(tmp_path, "alice") as alice, running_daemon(tmp_path, "bob") as bob, \
                trio.open_nursery() as nursery:
            dialer = alice.discovery_dialer(found)
            nursery.start_soon(dialer.run)
            await trio.sleep(2 * dialer.poll)
            assert bob.peer_id not in alice.table and dialer.dials == 0  # nothing found, nothing dialed
            found.add(bob.peer_id, bob.addrs()[0])
            while bob.peer_id not in alice.table:
                await trio.sleep(0.05)
            assert alice._connected(ID.from_base58(bob.peer_id))
            while alice.peer_id not in bob.table:  # bob asks for alice's advert on his side: it may land later
                await trio.sleep(0.05)
            assert (dialer.dials, dialer.connected) == (1, 1), "and bob learned alice over that one connection"
            nursery.cancel_scope.cancel()


async def test_discovered_peers_outside_the_allowlist_are_not_dialed(tmp_path):
    from node.mesh.host import HostConfig, make_host, run_host

    friend_id, found = Identity.generate(), Found()
    friend = make_host(HostConfig(friend_id, listen=(LOOPBACK,)))
    with trio.fail_after(30):
        async with running_daemon(tmp_path, "alice", ACCELMESH_ALLOW=friend_id.peer_id) as alice, \
                running_daemon(tmp_path, "bob") as outsider, run_host(friend, [LOOPBACK]), \
                trio.open_nursery() as nursery:
            dialer = alice.discovery_dialer(found)
            nursery.start_soon(dialer.run)
            found.add(outsider.peer_id, outsider.addrs()[0])
            found.add(friend_id.peer_id, str(friend.get_addrs()[0]))
            while not alice._connected(friend.get_id()):  # the allowed one is dialed...
                await trio.sleep(0.05)
            await trio.sleep(3 * dialer.poll)
            assert not alice._connected(ID.from_base58(outsider.peer_id))  # ...the outsider never
            assert dialer.dials == 1 and dialer.connected == 1
            nursery.cancel_scope.cancel()


async def test_a_find_that_never_answers_does_not_hold_back_the_next_one(tmp_path):
    async def silent(stream):  # accepts TCP, never says a word: the dial hangs in its handshake
        await trio.sleep_forever()

    found = Found()
    with trio.fail_after(30):
        async with running_daemon(tmp_path, "alice") as alice, running_daemon(tmp_path, "bob") as bob, \
                trio.open_nursery() as nursery:
            (listener,) = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
            dialer = alice.discovery_dialer(found)
            dialer.dial_timeout = 20.0
            found.add(Identity.generate().peer_id, f"/ip4/127.0.0.1/tcp/{listener.socket.getsockname()[1]}")
            nursery.start_soon(dialer.run)
            await trio.sleep(2 * dialer.poll)
            found.add(bob.peer_id, bob.addrs()[0])
            start = trio.current_time()
            while bob.peer_id not in alice.table:
                await trio.sleep(0.05)
            assert trio.current_time() - start < 10.0, "bob waited for the unreachable dial"
            nursery.cancel_scope.cancel()


def test_mdns_peers_reads_what_the_mdns_listener_recorded():
    """`mdns_peers` against py-libp2p's own listener records and peerstore (no zeroconf started)."""
    import time
    from types import SimpleNamespace

    from libp2p.peer.peerstore import PeerStore

    from node.mesh.discovery import mdns_peers

    peerstore, known, unknown = PeerStore(), Identity.generate(), Identity.generate()
    pid = ID.from_base58(known.peer_id)
    peerstore.add_addrs(pid, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/4001")], 120)
    listener = SimpleNamespace(discovered_services={  # what listener.add_service records
        "a._p2p._udp.local.": (pid, time.time()),
        "b._p2p._udp.local.": (ID.from_base58(unknown.peer_id), time.time()),  # no addresses: left out
    })
    host = SimpleNamespace(mDNS=SimpleNamespace(listener=listener), get_peerstore=lambda: peerstore)
    (info,) = mdns_peers(host)
    assert info.peer_id == pid and [str(a) for a in info.addrs] == ["/ip4/127.0.0.1/tcp/4001"]
    assert mdns_peers(SimpleNamespace(mDNS=None)) == []


def multicast_loops_back() -> bool:
    """Whether a multicast datagram sent here comes back here (what two mDNS nodes on one host need)."""
    group = "239.255.42.99"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as recv, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as send:
        try:
            recv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            recv.bind(("", 0))
            port = recv.getsockname()[1]
            recv.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                            socket.inet_aton(group) + socket.inet_aton("0.0.0.0"))
            recv.settimeout(1.0)
            send.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            send.sendto(b"probe", (group, port))
            return recv.recv(16) == b"probe"
        except OSError:
            return False


@pytest.mark.lan  # multicast goes beyond loopback: `make test-lan`, not `make test`
async def test_two_daemons_find_each_other_over_real_multicast_mdns(tmp_path):
    assert multicast_loops_back(), "multicast does not loop back on this machine: mDNS cannot be observed here"
    with trio.fail_after(30):
        async with running_daemon(tmp_path, "alice", ACCELMESH_MDNS="1") as alice, \
                running_daemon(tmp_path, "bob", ACCELMESH_MDNS="1") as bob:  # no bootstrap: only mDNS
            while bob.peer_id not in alice.table or alice.peer_id not in bob.table:
                await trio.sleep(0.05)
