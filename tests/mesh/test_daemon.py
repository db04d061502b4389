"""The daemon's life cycle, identity, secure defaults and control channel (in-process, real hosts)."""

from __future__ import annotations

import json
import os
import socket
import stat
from contextlib import aclosing

import pytest
import trio
from libp2p.peer.id import ID

from node.client import DaemonClient
from node.config import load_settings
from node.daemon import Daemon, check_listen_policy, mdns_enabled
from node.datadir import DataDir
from node.errors import ConfigError, DaemonError
from node.mesh.host import make_swarm_key
from protocols.control.messages import PROTOCOL_ID as CONTROL
from protocols.inference.messages import Request, Result
from protocols.records import Identity
from tests.mesh.conftest import LOOPBACK, connect, peer_host, running_daemon


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
        with trio.fail_after(10), pytest.raises(Exception):
            stream = await friend.new_stream(ID.from_base58(daemon.peer_id), [CONTROL])
            await stream.write(b"\x00")
            if not await stream.read(1):
                raise ConnectionError("closed")
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
            with pytest.raises(Exception):
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
