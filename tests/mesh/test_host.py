"""The daemon's host: Noise only, Yamux, identify and ping, cluster keys and allowlists."""

from __future__ import annotations

import time

import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.host.ping import PingService
from libp2p.network.config import ConnectionConfig
from libp2p.network.exceptions import SwarmDialAllFailedError, SwarmException
from libp2p.peer.id import ID
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.secio.transport import ID as SECIO_ID
from libp2p.security.secio.transport import Transport as SecioTransport

from node.errors import ConfigError
from node.mesh.host import HostConfig, is_loopback_multiaddr, load_swarm_key, make_host, make_swarm_key, peer_info, run_host
from protocols.control.messages import PROTOCOL_ID as CONTROL
from protocols.records import Identity
from tests.mesh.conftest import connect, peer_host, running_daemon

TEST_PROTOCOL = "/accelmesh-test/echo/1.0.0"


def legacy_dialer(kind: str):
    kp = create_new_key_pair()
    transport = {"plaintext": (PLAINTEXT_PROTOCOL_ID, InsecureTransport(kp)),
                 "secio": (SECIO_ID, SecioTransport(kp))}[kind]
    return new_host(key_pair=kp, sec_opt=dict([transport]), connection_config=ConnectionConfig(
        max_connections_per_peer=1, outbound_upgrade_timeout=3.0))


@pytest.mark.parametrize("kind", ["plaintext", "secio"])
async def test_plaintext_and_secio_dialers_are_refused(tmp_path, kind):
    async with running_daemon(tmp_path) as daemon:
        dialer = legacy_dialer(kind)
        async with dialer.run(listen_addrs=[]):
            with trio.fail_after(20), pytest.raises(SwarmDialAllFailedError) as info:
                await dialer.connect(peer_info(daemon.addrs()[0]))
                await dialer.new_stream(ID.from_base58(daemon.peer_id), [CONTROL])
            assert "failed to negotiate the secure protocol" in str(info.value.__cause__)
            await dialer.close()


async def test_noise_and_yamux_are_negotiated_and_identify_and_ping_answer(tmp_path):
    async with running_daemon(tmp_path) as daemon, peer_host() as friend:
        await connect(friend, daemon)
        conn = friend.get_network().connections[ID.from_base58(daemon.peer_id)][0]
        assert conn.get_negotiated_security_protocol() == "/noise"
        assert conn.get_negotiated_muxer_protocol() == "/yamux/1.0.0"
        with trio.fail_after(5):
            rtts = await PingService(friend).ping(ID.from_base58(daemon.peer_id), ping_amt=3)
        assert len(rtts) == 3
        with trio.fail_after(5):
            while "/ipfs/id/1.0.0" not in (friend.get_peerstore().get_protocols(ID.from_base58(daemon.peer_id)) or []):
                await trio.sleep(0.05)


async def test_at_least_ten_pings_a_second_from_one_peer_are_served(tmp_path):
    async with running_daemon(tmp_path, ACCELMESH_OPEN="1", ACCELMESH_LIMITS_REQUEST_RATE="1",  # friend: a stranger
                              ACCELMESH_LIMITS_REQUEST_BURST="1") as d, \
            peer_host() as friend:
        await connect(friend, d)
        ping = PingService(friend)
        start = trio.current_time()
        with trio.fail_after(10):
            for _ in range(20):
                assert len(await ping.ping(ID.from_base58(d.peer_id), ping_amt=1)) == 1
        assert 20 / (trio.current_time() - start) >= 10, "ping is exempt from the request rate"


def write_key(path) -> str:
    path.write_text(make_swarm_key())
    return str(path)


async def test_same_cluster_key_connects_and_a_wrong_or_missing_key_fails_in_seconds(tmp_path):
    key = write_key(tmp_path / "swarm.key")
    other = write_key(tmp_path / "other.key")
    async with running_daemon(tmp_path, ACCELMESH_CLUSTER_KEY=key) as daemon:
        async with peer_host(cluster_key=load_swarm_key(key)) as member:
            await connect(member, daemon)
        for outsider_key in (load_swarm_key(other), None):
            async with peer_host(cluster_key=outsider_key) as outsider:
                started = time.monotonic()
                with trio.fail_after(20), pytest.raises(SwarmDialAllFailedError):
                    await outsider.connect(peer_info(daemon.addrs()[0]))
                    await outsider.new_stream(ID.from_base58(daemon.peer_id), [CONTROL])
                assert time.monotonic() - started < 15, "a wrong key must fail in seconds"


async def test_outsider_not_on_the_allowlist_can_open_no_stream(tmp_path):
    friend_id, mallory_id = Identity.generate(), Identity.generate()
    async with running_daemon(tmp_path, ACCELMESH_ALLOW=friend_id.peer_id) as daemon:
        daemon.host.set_stream_handler(TEST_PROTOCOL, daemon.guard.wrap(TEST_PROTOCOL, _echo_frames))
        async with peer_host(friend_id) as friend:
            await connect(friend, daemon)
            stream = await friend.new_stream(ID.from_base58(daemon.peer_id), [TEST_PROTOCOL])
            await stream.close()
        async with peer_host(mallory_id) as mallory:
            for protocol in (TEST_PROTOCOL, CONTROL, "/ipfs/ping/1.0.0"):
                with trio.fail_after(10), pytest.raises(SwarmException):  # "No valid connections available"
                    try:
                        await mallory.connect(peer_info(daemon.addrs()[0]))  # returns: refused after Noise
                    except Exception:
                        pass
                    await trio.sleep(0.2)  # the daemon closed it right after the handshake
                    await mallory.new_stream(ID.from_base58(daemon.peer_id), [protocol])


async def _echo_frames(framed, peer):
    while (frame := await framed.read_frame()) is not None:
        from protocols.framing import encode_frame

        await framed.write(encode_frame(frame))


def test_swarm_key_files_are_validated_with_the_reason(tmp_path):
    good = tmp_path / "good.key"
    good.write_text(make_swarm_key())
    assert len(load_swarm_key(good)) == 64
    cases = {
        "missing": (None, "cannot read"),
        "header": ("/key/swarm/psk/2.0.0/\n/base16/\n" + "ab" * 32, "not a swarm.key"),
        "hex": ("/key/swarm/psk/1.0.0/\n/base16/\n" + "zz" * 32, "not hexadecimal"),
        "short": ("/key/swarm/psk/1.0.0/\n/base16/\n" + "ab" * 16, "16 bytes"),
    }
    for name, (text, reason) in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(ConfigError, match=reason):
            load_swarm_key(path)


@pytest.mark.parametrize("addr,loopback", [
    ("/ip4/127.0.0.1/tcp/4001", True), ("/ip4/127.8.9.1/tcp/1", True), ("/ip6/::1/tcp/4001", True),
    ("/dns/localhost/tcp/1", True), ("/ip4/0.0.0.0/tcp/4001", False), ("/ip6/::/tcp/4001", False),
    ("/ip4/10.0.0.5/tcp/4001", False), ("/ip4/8.8.8.8/tcp/1", False), ("/dns/example.com/tcp/1", False),
])
def test_what_counts_as_loopback(addr, loopback):
    assert is_loopback_multiaddr(addr) is loopback


def test_allowlist_entries_must_be_peer_ids():
    with pytest.raises(ConfigError, match="peer id"):
        make_host(HostConfig(Identity.generate(), allow=frozenset({"not-a-peer-id"})))


class SlowSecureConn:
    """The part of a secured connection Yamux writes through: takes bytes slowly, or never."""

    is_initiator = True

    def __init__(self, stall: bool = False) -> None:
        self.sent = bytearray()
        self.stall = stall
        self.closed = False

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise trio.ClosedResourceError("closed")
        if self.stall:
            await trio.sleep_forever()
        for i in range(0, len(data), 10):
            self.sent += data[i:i + 10]
            await trio.sleep(0.01)

    async def close(self) -> None:
        self.closed = True


def yamux_over(conn: SlowSecureConn):
    from libp2p.stream_muxer.yamux.yamux import Yamux

    from node.mesh.host import _atomic_muxer_writes

    _atomic_muxer_writes()  # what make_host installs
    return Yamux(conn, ID(b"peer"), is_initiator=True)


async def test_a_cancelled_muxer_write_still_sends_its_whole_frame():
    # py-libp2p 0.8.1 would leave the frame half sent: the peer's Noise decryption then fails
    # and every stream of the connection dies.
    conn = SlowSecureConn()
    muxer = yamux_over(conn)
    frame = bytes(range(100))
    with trio.fail_after(5):
        with trio.move_on_after(0.015) as scope:
            await muxer._write_frame(frame)
        assert scope.cancelled_caught  # the caller was cancelled, at the end of the frame
        assert bytes(conn.sent) == frame
        await muxer._write_frame(b"next")  # and the connection still writes
    assert bytes(conn.sent) == frame + b"next"


async def test_a_peer_that_takes_no_frame_gets_its_connection_closed(autojump_clock):
    from node.mesh.host import WRITE_TIMEOUT

    conn = SlowSecureConn(stall=True)
    muxer = yamux_over(conn)
    started = trio.current_time()
    with trio.fail_after(WRITE_TIMEOUT + 10), pytest.raises(trio.BrokenResourceError):
        await muxer._write_frame(b"stuck")
    assert trio.current_time() - started >= WRITE_TIMEOUT
    assert conn.closed and muxer.is_closed


# -- negotiation timeout, addresses -----------------------------------------------------------------


@pytest.mark.parametrize("setting,seconds", [(0.001, 1), (0.5, 1), (1.0, 1), (1.2, 2), (2.0, 2), (10.0, 10)])
def test_negotiation_timeouts_are_whole_seconds_rounded_up(setting, seconds):
    from node.mesh.host import negotiate_seconds

    assert negotiate_seconds(setting) == seconds


def test_a_fractional_negotiate_timeout_reaches_libp2p_rounded_up_not_truncated():
    host = make_host(HostConfig(Identity.generate(), negotiate_timeout=0.5))
    config = host.get_network().connection_config
    assert config.inbound_stream_protocol_negotiation_timeout == 1
    assert config.outbound_stream_protocol_negotiation_timeout == 1
    assert host.negotiate_timeout == 1


FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
        +-- 192.0.2.0/30 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
     |-- 10.9.8.7
        /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 127.0.0.1
        /32 host LOCAL
     |-- 192.0.2.2
        /32 host LOCAL
"""  # recorded on this test machine (plus a secondary address 10.9.8.7)

IF_INET6 = """00000000000000000000000000000001 01 80 10 80       lo
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
fd000000000000000000000000000002 04 40 00 82     eth0
20010db8000000000000000000000005 04 40 00 40     eth0
"""  # lo, a link-local (needs a zone: left out), a global one, a tentative one (left out)


def test_interface_addresses_are_read_from_proc():
    from node.mesh.host import parse_fib_trie, parse_if_inet6

    assert parse_fib_trie(FIB_TRIE) == ["127.0.0.1", "192.0.2.2", "10.9.8.7"]
    assert parse_if_inet6(IF_INET6) == ["::1", "fd00::2"]


def test_wildcard_listen_addresses_expand_to_interface_addresses_loopback_first():
    from node.mesh.host import expand_wildcard_addrs

    interfaces = (["192.0.2.2", "127.0.0.1"], ["fd00::2", "::1"])
    pid = Identity.generate().peer_id
    got = expand_wildcard_addrs([f"/ip4/0.0.0.0/tcp/4001/p2p/{pid}", f"/ip6/::/tcp/4002/p2p/{pid}",
                                 f"/ip4/10.0.0.1/tcp/4003/p2p/{pid}", f"/ip4/0.0.0.0/tcp/4001/p2p/{pid}"], interfaces)
    assert got == [f"/ip4/127.0.0.1/tcp/4001/p2p/{pid}", f"/ip6/::1/tcp/4002/p2p/{pid}",
                   f"/ip4/192.0.2.2/tcp/4001/p2p/{pid}", f"/ip6/fd00::2/tcp/4002/p2p/{pid}",
                   f"/ip4/10.0.0.1/tcp/4003/p2p/{pid}"]
    assert expand_wildcard_addrs(["/ip4/127.0.0.1/tcp/1"], interfaces) == ["/ip4/127.0.0.1/tcp/1"]


def test_this_machine_has_a_loopback_and_its_interface_addresses_are_real():
    import socket

    from node.mesh.host import interface_addresses

    v4, v6 = interface_addresses()
    assert "127.0.0.1" in v4
    for ip in v4:  # each one is an address of this host: it can be bound
        with socket.socket() as s:
            s.bind((ip, 0))


@pytest.mark.lan  # starts zeroconf, which multicasts beyond loopback: `make test-lan`
async def test_mdns_announces_dialable_addresses_not_the_wildcard():
    # py-libp2p's broadcaster would put /ip4/0.0.0.0/... in the TXT records
    host = make_host(HostConfig(Identity.generate(), listen=("/ip4/0.0.0.0/tcp/0",), mdns=True))
    with trio.fail_after(20):
        async with run_host(host, ["/ip4/0.0.0.0/tcp/0"]):
            port = host.get_transport_addrs()[0].value_for_protocol("tcp")
            announced = host.mDNS.broadcaster._resolve_host_addrs()
            txt = [v.decode() for v in host.mDNS.broadcaster.service_info.properties.values()]
    assert announced and announced[0] == f"/ip4/127.0.0.1/tcp/{port}"
    assert not any("0.0.0.0" in a for a in announced + txt), (announced, txt)
    assert all(a.endswith(f"/tcp/{port}/p2p/{host.get_id()}") for a in txt)
