"""The cluster cache on real daemons (real libp2p hosts, the DHT, the block exchange, sqlite stores):
an answer computed once is a cluster hit everywhere, with zero inferences anywhere else."""

from __future__ import annotations

import sqlite3
import uuid
from contextlib import AsyncExitStack, aclosing

import trio

from node.client import PeerClient
from protocols.inference.messages import Request
from tests.mesh.conftest import PATIENT, running_daemon

QUIET = {"ACCELMESH_ADVERTS_INTERVAL": "1"}


async def ask(daemon, prompt: str, **fields):
    """`prompt` answered by `daemon`'s own echo unless `fields` say otherwise (no mesh: where the answer
    comes from is its cache)."""
    request = Request(**{"id": uuid.uuid4().hex, "task": "generate", "prompt": prompt, "provider": "echo",
                         "timeout_ms": 20_000, **fields})
    async with PeerClient.connect(daemon.addrs()[0]) as client, aclosing(client.generate(request)) as items:
        result = [item async for item in items][-1]
    assert result.verify()["text"] == f"echo: {prompt}", "the bytes hash to the CID and answer the prompt"
    return result


async def until(predicate, what: str, timeout: float = 20.0) -> float:
    started = trio.current_time()
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
    return trio.current_time() - started


def inferences(daemon) -> int:
    return daemon.deps.statistics().inferences


async def test_an_answer_computed_at_one_end_of_a_line_is_a_cluster_hit_at_the_other(tmp_path):
    async with AsyncExitStack() as stack:
        line = [await stack.enter_async_context(running_daemon(tmp_path, "n1", **QUIET))]
        for i in range(2, 6):  # each connected to the one before it
            line.append(await stack.enter_async_context(
                running_daemon(tmp_path, f"n{i}", ACCELMESH_BOOTSTRAP=line[-1].addrs()[0], **PATIENT, **QUIET)))
        for a, b in zip(line, line[1:]):
            await until(lambda a=a, b=b: b.peer_id in a.table and a.peer_id in b.table, "neighbours know each other")
        # Adverts travel the line, and each node puts every member it learns of into its DHT routing
        # table (with the advert's addresses): then a record is stored at the members closest to its key.
        await until(lambda: all(d.dht.statistics().routing_peers == 4 for d in line), "routing tables filled")
        first = await ask(line[0], "the cluster remembers")
        assert first.cache == "miss" and inferences(line[0]) == 1
        await until(lambda: line[0].cluster.statistics().published == 1, "the record is published")
        again = await ask(line[4], "the cluster remembers")
        assert (again.cache, again.cid, again.key) == ("cluster", first.cid, first.key)
        assert again.served_from is not None
        assert [inferences(d) for d in line] == [1, 0, 0, 0, 0], "zero inferences anywhere but node 1"
        local = await ask(line[4], "the cluster remembers")
        assert local.cache in ("memory", "local"), "kept locally after the cluster hit"

        late = await stack.enter_async_context(
            running_daemon(tmp_path, "n6", ACCELMESH_BOOTSTRAP=line[4].addrs()[0], **PATIENT, **QUIET))
        started = trio.current_time()
        # (until its table holds its neighbour, a lookup may have to dial a member farther away first,
        # which can take longer than the default 0.1 s budget: a miss, and an inference)
        await until(lambda: late.dht.statistics().routing_peers == 5, "n6 has every member in its routing table")
        joined = await ask(late, "the cluster remembers")
        took = trio.current_time() - started
        assert joined.cache == "cluster" and joined.cid == first.cid and inferences(late) == 0
        print(f"a node joining afterwards: its first cluster hit {took:.2f} s after it was up")


async def test_private_and_no_store_answers_are_never_published(tmp_path):
    async with running_daemon(tmp_path, "alice", **QUIET) as alice, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **QUIET) as bob:
        await until(lambda: alice.dht.statistics().routing_peers == bob.dht.statistics().routing_peers == 1,
                    "each in the other's DHT routing table")
        await ask(alice, "mine only", cache="private")
        await ask(alice, "nobody's", cache="no-store")
        await ask(alice, "everyone's")
        await until(lambda: alice.cluster.statistics().published == 1, "the default one is published")
        await trio.sleep(0.5)
        assert alice.cluster.statistics().published == 1
        assert (await ask(bob, "mine only")).cache == "miss"
        assert (await ask(bob, "everyone's")).cache == "cluster"


async def test_the_entry_node_answers_a_cached_request_without_dispatching_it(tmp_path):
    """An entry node that serves nothing keys the request with the identity its peers advertise for
    the model (advert 1.2), and a repeat is answered from its cache or the cluster: no node asked."""
    async with running_daemon(tmp_path, "entry", ACCELMESH_ECHO_ENABLED="0", **QUIET) as entry, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=entry.addrs()[0], **QUIET) as bob, \
            running_daemon(tmp_path, "carol", ACCELMESH_BOOTSTRAP=entry.addrs()[0], **QUIET) as carol:
        await until(lambda: all(d.dht.statistics().routing_peers == 2 for d in (entry, bob, carol)), "a cluster")
        first = await ask(bob, "asked of bob")  # computed by bob, published
        await until(lambda: bob.cluster.statistics().published == 1, "published")
        via_entry = await ask(entry, "asked of bob", provider="mesh", model="echo")
        assert (via_entry.cache, via_entry.cid) == ("cluster", first.cid)
        assert entry.manager.statistics().planned == 0, "no node was chosen: nothing was dispatched"
        again = await ask(entry, "asked of bob", provider="mesh", model="echo")
        assert again.cache in ("memory", "local") and entry.manager.statistics().planned == 0
        assert inferences(bob) == 1 and inferences(carol) == 0 and inferences(entry) == 0


async def test_a_member_with_the_cluster_cache_off_leaves_the_routing_table_and_stops_costing_lookups(tmp_path):
    async with running_daemon(tmp_path, "alice", **QUIET) as alice, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], ACCELMESH_CACHE_CLUSTER="off",
                           **QUIET) as bob:
        assert bob.cluster is None and bob.dht is None
        await until(lambda: alice.dht.statistics().routing_peers == 1, "bob's advert put him in alice's table")
        for i in range(3):  # misses: each asks the members of the table, bob among them, until he is dropped
            assert (await ask(alice, f"nobody has this {i}")).cache == "miss"
        s = alice.dht.statistics()
        assert s.routing_peers == 0 and s.dropped >= 1, s


async def test_a_member_serving_bytes_that_fail_their_cid_is_penalised_and_an_honest_copy_is_used(tmp_path):
    """mallory publishes an honest answer, then serves it corrupted (its store does not re-hash on
    read, and a byte of the block changed on disk): bob, asking the publisher first, refuses the
    bytes, counts it against mallory's health, and takes carol's copy."""
    async with running_daemon(tmp_path, "mallory", ACCELMESH_CACHE_VERIFY_ON_READ="0", **QUIET) as mallory, \
            running_daemon(tmp_path, "carol", ACCELMESH_BOOTSTRAP=mallory.addrs()[0], **QUIET) as carol, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=mallory.addrs()[0], **QUIET) as bob:
        daemons = (mallory, carol, bob)
        await until(lambda: all(d.dht.statistics().routing_peers == 2 for d in daemons), "a cluster")
        first = await ask(mallory, "poisoned later")
        await until(lambda: mallory.cluster.statistics().published == 1, "published")
        assert (await ask(carol, "poisoned later")).cache == "cluster"
        await until(lambda: carol.cluster.statistics().announced >= 1, "carol announced her copy")
        with sqlite3.connect(mallory.data_dir.store_file) as db:  # the disk under mallory's store rots
            (data,) = db.execute("SELECT data FROM blocks WHERE cid = ?", (first.cid,)).fetchone()
            db.execute("UPDATE blocks SET data = ? WHERE cid = ?", (bytes([data[0] ^ 1]) + data[1:], first.cid))
        got = await ask(bob, "poisoned later")
        assert (got.cache, got.cid, got.served_from) == ("cluster", first.cid, carol.peer_id)
        assert bob.manager.backend(mallory.peer_id).statistics().failed == 1, "mallory's bytes counted against her"
        assert bob.exchange.statistics().fetch_failures == 1 and inferences(bob) == 0
