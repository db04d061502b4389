"""The backend manager on real daemons: strategies spread traffic, a failing node is cooled and comes back."""

from __future__ import annotations

import collections
import uuid
from contextlib import aclosing

import trio

from node.client import PeerClient
from protocols.inference.messages import Request
from tests.mesh.conftest import running_daemon

QUIET = {"ACCELMESH_ADVERTS_INTERVAL": "60"}
# A health policy scaled down so a test sees a whole cycle in seconds (the defaults: 30 s, 20, 5 s).
FAST_HEALTH = {"ACCELMESH_MESH_HEALTH_WINDOW": "5", "ACCELMESH_MESH_HEALTH_MIN_REQUESTS": "4",
               "ACCELMESH_MESH_COOLDOWN": "1"}


async def ask(client: PeerClient, i: int, **fields) -> str:
    request = Request(id=uuid.uuid4().hex, task="generate", prompt=f"p{i}", model="echo", provider="mesh", timeout_ms=20_000,
                      **fields)
    async with aclosing(client.generate(request)) as items:
        result = [item async for item in items][-1]
    assert result.verify()["text"] == f"echo: p{i}"
    return result.peer


async def wait_for_peers(entry, *others) -> None:
    with trio.fail_after(10):
        while not all(o.peer_id in entry.table for o in others):
            await trio.sleep(0.02)


async def test_a_node_whose_provider_starts_failing_is_cooled_and_gets_traffic_again_after_it_recovers(tmp_path):
    async with running_daemon(tmp_path, "alice", ACCELMESH_ECHO_ENABLED="0", **FAST_HEALTH, **QUIET) as alice, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **QUIET) as bob, \
            running_daemon(tmp_path, "carol", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **QUIET) as carol:
        await wait_for_peers(alice, bob, carol)
        echo = bob.deps.get_provider("echo", bob.settings)
        async with PeerClient.connect(alice.addrs()[0]) as client:
            with trio.fail_after(60):
                served = collections.Counter([await ask(client, i) for i in range(6)])
                assert served == {bob.peer_id: 3, carol.peer_id: 3}, "round robin while both are healthy"

                echo.failure_rate = 1.0  # bob's provider starts failing (fault injection on his real provider)
                started = trio.current_time()
                i = 6
                while alice.manager.backend(bob.peer_id).statistics().health != "cooling":
                    assert await ask(client, i) == carol.peer_id, "every request still answered, by carol"
                    i += 1
                cooled_after = trio.current_time() - started
                assert cooled_after < 5.0, "within the configured window"
                stats = alice.manager.backend(bob.peer_id).statistics()
                assert stats.failed >= 2 and stats.cooldowns == 1
                assert (await alice.command("peers", {}))["peers"][0]["health"] in ("cooling", "ok")

                asked = bob.admission.statistics().served
                for j in range(4):  # while cooling, bob is not even asked
                    assert await ask(client, 100 + j) == carol.peer_id
                assert bob.admission.statistics().served == asked

                echo.failure_rate = 0.0  # bob recovers
                await trio.sleep(1.2)  # the 1 s cooldown ends: bob is probed with the next request
                served = collections.Counter([await ask(client, 200 + j) for j in range(6)])
        assert served[bob.peer_id] >= 2, f"bob gets traffic again: {served}"
        assert alice.manager.backend(bob.peer_id).statistics().health == "ok"


async def test_peers_json_shows_health_and_latency_measured_by_requests(tmp_path):
    async with running_daemon(tmp_path, "alice", ACCELMESH_ECHO_ENABLED="0", **QUIET) as alice, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], ACCELMESH_ECHO_LATENCY_MS="20",
                           **QUIET) as bob:
        await wait_for_peers(alice, bob)
        async with PeerClient.connect(alice.addrs()[0]) as client:
            with trio.fail_after(30):
                for i in range(3):
                    assert await ask(client, i) == bob.peer_id
        (entry,) = (await alice.command("peers", {}))["peers"]
        assert entry["peer_id"] == bob.peer_id and entry["health"] == "ok" and entry["cooldown_until"] is None
        assert entry["latency_ms"] >= 20.0 and entry["ttfc_ms"] >= 20.0 and entry["in_flight"] == 0


async def test_the_strategy_a_request_names_is_the_one_used(tmp_path):
    async with running_daemon(tmp_path, "alice", ACCELMESH_ECHO_ENABLED="0", **QUIET) as alice, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **QUIET) as bob, \
            running_daemon(tmp_path, "carol", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **QUIET) as carol:
        await wait_for_peers(alice, bob, carol)
        async with PeerClient.connect(alice.addrs()[0]) as client:
            with trio.fail_after(30):
                # cache_affinity: the same prompt lands on the same node every time (cache="no-store": no hits)
                firsts = {await ask(client, 7, strategy="cache_affinity", cache="no-store") for _ in range(4)}
        assert len(firsts) == 1
        assert alice.manager.statistics().by_strategy["cache_affinity"] == 4


async def test_a_hedged_request_is_answered_by_the_fast_node_and_the_slow_one_frees_its_slot_within_a_second(
        tmp_path):
    async with running_daemon(tmp_path, "alice", ACCELMESH_ECHO_ENABLED="0", ACCELMESH_MESH_HEDGE_AFTER="0.3",
                              **QUIET) as alice, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], ACCELMESH_ECHO_LATENCY_MS="5000",
                           **QUIET) as bob, \
            running_daemon(tmp_path, "carol", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **QUIET) as carol:
        await wait_for_peers(alice, bob, carol)
        mesh = alice.deps.get_provider("mesh", alice.settings)
        async with PeerClient.connect(alice.addrs()[0]) as client:
            with trio.fail_after(30):
                for i in range(2):  # round robin: one of the two starts on bob, who takes 5 s
                    started = trio.current_time()
                    assert await ask(client, i) == carol.peer_id, "carol answers, first or as the hedge"
                    assert trio.current_time() - started < 2.0, "not bob's 5 s"
                    answered = trio.current_time()
                    while bob.admission.in_flight:  # the hedge's loser: its stream reset, its slot freed
                        await trio.sleep(0.01)
                    assert trio.current_time() - answered < 1.0
        assert mesh.hedged == 1 and alice.manager.backend(bob.peer_id).statistics().failed == 0
