"""Restart safety and store integrity on real daemons (issue 16): what a daemon stored survives a
restart on the same data dir; a flipped byte in a stored block is caught and the answer fetched
again from the cluster; a damaged store file is moved aside rather than stopping the daemon; and
concurrent identical requests make one lookup and one inference."""

from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from contextlib import aclosing

import pytest
import trio

from node.cache.store import (
    SCHEMA_VERSION,
    CorruptStoreError,
    LocalStore,
    StoreError,
    open_store,
)
from node.client import PeerClient
from node.config import load_settings
from node.daemon import Daemon
from node.requests import Result
from protocols.cid import cid_of
from protocols.inference.messages import Request
from tests.mesh.conftest import LOOPBACK, PATIENT, running_daemon

QUIET = {"ACCELMESH_ADVERTS_INTERVAL": "1"}


def request(prompt: str) -> Request:
    return Request(id=uuid.uuid4().hex, task="generate", prompt=prompt, provider="echo", timeout_ms=20_000)


async def ask_with(client: PeerClient, prompt: str) -> Result:
    """`prompt` answered through an open client (the daemon's own echo: where it comes from is its cache)."""
    async with aclosing(client.generate(request(prompt))) as items:
        result = [item async for item in items][-1]
    assert result.verify()["text"] == f"echo: {prompt}", "the bytes hash to the CID and answer the prompt"
    return result


async def ask(daemon: Daemon, prompt: str) -> Result:
    async with PeerClient.connect(daemon.addrs()[0]) as client:
        return await ask_with(client, prompt)


async def ask_all(daemon: Daemon, prompts: list[str], *, at_once: int = 16) -> dict[str, Result]:
    """Every prompt answered over one client connection, `at_once` at a time (within the per-peer stream limits)."""
    results: dict[str, Result] = {}
    limit = trio.CapacityLimiter(at_once)

    async def one(client: PeerClient, prompt: str) -> None:
        async with limit:
            results[prompt] = await ask_with(client, prompt)

    async with PeerClient.connect(daemon.addrs()[0]) as client, trio.open_nursery() as nursery:
        for prompt in prompts:
            nursery.start_soon(one, client, prompt)
    return results


async def until(predicate, what: str, timeout: float = 20.0) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"not within {timeout:g} s: {what}")


def inferences(daemon: Daemon) -> int:
    return daemon.deps.statistics().inferences


async def test_a_restarted_daemon_answers_what_it_stored_from_disk_with_zero_inferences(tmp_path):
    prompts = [f"remember me #{i}" for i in range(100)]
    with trio.fail_after(60):
        async with running_daemon(tmp_path, "alice") as alice:
            peer_id = alice.peer_id
            started = time.monotonic()
            first = await ask_all(alice, prompts)
            computed = time.monotonic() - started
            assert {r.cache for r in first.values()} == {"miss"} and inferences(alice) == 100
        assert not alice.data_dir.store_file.with_name("cache.sqlite-wal").exists(), "a clean stop checkpoints the WAL"

        async with running_daemon(tmp_path, "alice") as again:  # the same name: the same data dir and identity
            assert again.peer_id == peer_id and again.data_dir.path == alice.data_dir.path
            assert again.store.statistics().blocks == 100
            started = time.monotonic()
            second = await ask_all(again, prompts)
            from_disk = time.monotonic() - started
            assert {p: r.cache for p, r in second.items()} == {p: "local" for p in prompts}
            assert {p: r.cid for p, r in second.items()} == {p: r.cid for p, r in first.items()}
            assert inferences(again) == 0 and again.deps.statistics().cache["local"] == 100
            assert again.cluster.statistics().lookups == 0, "a local hit never asks the cluster"
    print(f"100 prompts: computed in {computed:.2f} s, answered from disk after a restart in {from_disk:.2f} s")


def flip_a_byte_of(path, needle: bytes) -> None:
    """Bit rot: one byte of `needle` changed where it lies in the file, behind sqlite's back."""
    raw = bytearray(path.read_bytes())
    assert raw.count(needle) == 1, "the block's bytes are in the file once (a clean stop checkpointed the WAL)"
    at = raw.index(needle) + len(needle) - 1
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


async def test_a_flipped_byte_in_a_stored_block_is_caught_and_the_answer_fetched_again_from_the_cluster(tmp_path):
    prompt = "keep me whole"
    with trio.fail_after(60):
        async with running_daemon(tmp_path, "alice", **QUIET, **PATIENT) as alice:
            async with running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **QUIET,
                                      **PATIENT) as bob:
                await until(lambda: all(d.dht.statistics().routing_peers >= 1 for d in (alice, bob)), "routing")
                first = await ask(alice, prompt)
                assert first.cache == "miss" and inferences(alice) == 1
                await until(lambda: alice.cluster.statistics().published == 1, "the record is published")
                hit = await ask(bob, prompt)
                assert (hit.cache, hit.cid) == ("cluster", first.cid) and bob.store.has(first.cid)
                store_file = bob.data_dir.store_file

            flip_a_byte_of(store_file, f"echo: {prompt}".encode())

            async with running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **QUIET,
                                      **PATIENT) as bob:
                await until(lambda: bob.dht.statistics().routing_peers >= 1, "bob is back in the cluster")
                assert bob.store.statistics().blocks == 1, "the damaged block is still there, unread"
                again = await ask(bob, prompt)
                assert (again.cache, again.cid, again.served_from) == ("cluster", first.cid, alice.peer_id)
                assert bob.store.statistics().corrupt == 1, "the local store refused the block and evicted it"
                assert inferences(bob) == 0 and inferences(alice) == 1
                assert bob.store.get_block(first.cid) == again.response, "kept again, whole"
                assert (await ask(bob, prompt)).cache in ("memory", "local")


async def test_a_store_file_that_is_not_a_database_is_moved_aside_and_the_daemon_serves(tmp_path, caplog):
    with trio.fail_after(30):
        async with running_daemon(tmp_path, "alice") as alice:
            await ask(alice, "soon forgotten")
        store_file = alice.data_dir.store_file
        garbage = b"\x00garbage, not sqlite\xff" * 200
        store_file.write_bytes(garbage)

        with caplog.at_level(logging.WARNING, logger="node.cache.store"):
            async with running_daemon(tmp_path, "alice") as alice:
                assert alice.store.statistics().blocks == 0, "a fresh store"
                answer = await ask(alice, "soon forgotten")
                assert answer.cache == "miss" and inferences(alice) == 1
                assert (await ask(alice, "soon forgotten")).cache == "memory"
    aside = [p for p in store_file.parent.iterdir() if p.name.startswith("cache.sqlite.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == garbage, "the damaged file is kept for a post-mortem"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and r.name == "node.cache.store"]
    assert len(warnings) == 1, warnings
    assert str(store_file) in warnings[0] and str(aside[0]) in warnings[0]


def test_a_malformed_store_is_moved_aside_and_replaced_by_an_empty_one(tmp_path, caplog):
    path = tmp_path / "cache.sqlite"
    store = LocalStore(path)
    for i in range(100):
        data = b"%08d" % i * 100
        store.put(f"k{i}", data, cid_of(data))
    store.close()
    raw = bytearray(path.read_bytes())
    raw[4096:3 * 4096] = b"\xff" * 8192  # a valid header, damaged pages: sqlite says "malformed"
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError, match="malformed"):
        LocalStore(path)
    with caplog.at_level(logging.WARNING, logger="node.cache.store"):
        fresh = open_store(path)
    assert fresh.statistics().blocks == 0 and fresh.get("k1") is None
    [aside] = tmp_path.glob("cache.sqlite.corrupt-*")
    assert aside.read_bytes() == bytes(raw), "kept for a post-mortem"
    [warning] = [r.getMessage() for r in caplog.records if r.name == "node.cache.store"]
    assert str(path) in warning and str(aside) in warning
    fresh.close()


async def test_a_store_file_from_a_newer_schema_is_still_refused_and_left_alone(tmp_path):
    with trio.fail_after(30):
        async with running_daemon(tmp_path, "alice") as alice:
            await ask(alice, "written by a future accelmesh")
        store_file = alice.data_dir.store_file
        with sqlite3.connect(store_file) as db:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        before = store_file.read_bytes()
        settings = load_settings(env={"ACCELMESH_DATA_DIR": str(alice.data_dir.path), "ACCELMESH_LISTEN": LOOPBACK})
        with pytest.raises(StoreError, match="newer than this accelmesh"):
            await Daemon(settings).run()
    assert store_file.read_bytes() == before, "not moved aside, not migrated"
    assert [p.name for p in store_file.parent.iterdir() if ".corrupt-" in p.name] == []


async def fifty_at_once(tmp_path):
    """Fifty identical requests at once to alice (a 300 ms echo), over one client, with bob in the
    cluster: (alice, bob, the fifty answers)."""
    slow = {"ACCELMESH_ECHO_LATENCY_MS": "300", **QUIET}
    async with running_daemon(tmp_path, "alice", **slow) as alice, \
            running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0], **slow) as bob:
        await until(lambda: all(d.dht.statistics().routing_peers >= 1 for d in (alice, bob)), "routing")
        answers = []

        async def one(client: PeerClient) -> None:
            answers.append(await ask_with(client, "fifty at once"))

        async with PeerClient.connect(alice.addrs()[0]) as client, trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one, client)
        return alice, bob, answers


async def test_fifty_identical_concurrent_requests_make_one_inference(tmp_path):
    with trio.fail_after(60):
        alice, bob, answers = await fifty_at_once(tmp_path)
    assert len(answers) == 50 and len({a.cid for a in answers}) == 1
    assert [a.cache for a in answers].count("miss") == 1, "one computed it, 49 waited for it"
    assert inferences(alice) == 1 and inferences(bob) == 0


async def test_fifty_identical_concurrent_requests_make_one_cluster_lookup(tmp_path):
    with trio.fail_after(60):
        alice, _, _ = await fifty_at_once(tmp_path)
    assert alice.cluster.statistics().lookups == 1, "one cluster lookup for all fifty"
