"""The OpenAI-compatible HTTP API of a real in-process daemon, called with the official `openai`
SDK (sync, in a worker thread: the SDK's async client runs on asyncio, the daemon on trio) and
with httpx.AsyncClient on the daemon's own trio loop."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import httpx
import openai
import pytest
import trio

from node.config import load_settings
from node.daemon import Daemon
from node.errors import (
    AllProvidersFailed,
    Busy,
    ConfigError,
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
)
from node.http.auth import BearerAuth, is_loopback_host
from node.http.server import parse_bind
from node.http._openai import error_response, parse_call
from tests.mesh.conftest import LOOPBACK, running_daemon

QUIET = {"ACCELMESH_ADVERTS_INTERVAL": "60"}


@dataclass
class Api:
    daemon: Daemon
    url: str  # http://HOST:PORT, as daemon.json says
    token: str  # http.token

    def sdk(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.token, max_retries=0, timeout=20,
                             http_client=httpx.Client(trust_env=False), **kwargs)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, trust_env=False, timeout=20,
                                 headers={"authorization": f"Bearer {self.token}"})


@asynccontextmanager
async def api(tmp_path, name: str = "alice", http: str = "127.0.0.1:0", **env: str) -> AsyncIterator[Api]:
    async with running_daemon(tmp_path, name, **{"ACCELMESH_HTTP": http, **QUIET, **env}) as daemon:
        info = json.loads((daemon.data_dir.path / "daemon.json").read_text())
        token = (daemon.data_dir.path / "http.token").read_text().strip()
        yield Api(daemon, info["http_url"], token)


def in_thread(fn, *args, **kwargs):
    return trio.to_thread.run_sync(partial(fn, *args, **kwargs))


# -- the server -------------------------------------------------------------------------------------


async def test_the_first_request_a_starting_daemon_answers_knows_its_models(tmp_path):
    """A client polling the port while the daemon starts (make run, then curl): the API serves
    once this node's first advert lists its models, so the first answer is never a 404."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = load_settings(env={"ACCELMESH_DATA_DIR": str(tmp_path / "alice"), "ACCELMESH_LISTEN": LOOPBACK,
                                  "ACCELMESH_HTTP": f"127.0.0.1:{port}", **QUIET})
    body = {"model": "echo", "messages": [{"role": "user", "content": "Hello, mesh"}]}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            daemon = Daemon(settings)
            nursery.start_soon(daemon.run)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                while True:
                    try:
                        r = await client.post("/v1/chat/completions", json=body)
                        break
                    except httpx.TransportError:  # not bound yet
                        await trio.sleep(0.005)
            assert r.status_code == 200, r.text
            nursery.cancel_scope.cancel()


async def test_daemon_json_names_the_http_url_and_the_token_file_is_private(tmp_path):
    with trio.fail_after(20):
        async with api(tmp_path) as a:
            assert a.url.startswith("http://127.0.0.1:") and not a.url.endswith(":0")
            mode = stat.S_IMODE(os.stat(a.daemon.data_dir.path / "http.token").st_mode)
            assert mode == 0o600 and len(a.token) >= 40
            async with a.client() as client:
                assert (await client.get("/healthz")).json()["peer_id"] == a.daemon.peer_id
        assert not (tmp_path / "alice" / "http.token").exists(), "removed on clean exit"


async def test_an_http_address_in_use_stops_start_up_with_one_error_naming_http(tmp_path):
    import socket

    with socket.socket() as taken, trio.fail_after(20):
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = load_settings(env={"ACCELMESH_DATA_DIR": str(tmp_path / "d"), "ACCELMESH_LISTEN": LOOPBACK,
                                      "ACCELMESH_HTTP": f"127.0.0.1:{port}"})
        with pytest.raises(ConfigError, match=f"http='127.0.0.1:{port}'.*cannot listen there"):
            await Daemon(settings).run()
        assert not (tmp_path / "d" / "daemon.json").exists()
        async with running_daemon(tmp_path, name="d"):  # nothing was left locked
            pass


# -- the official SDK ---------------------------------------------------------------------------------


async def test_chat_completion_through_the_openai_sdk_carries_the_accelmesh_object_and_headers(tmp_path):
    with trio.fail_after(30):
        async with api(tmp_path) as a:
            sdk = a.sdk()
            raw = await in_thread(sdk.chat.completions.with_raw_response.create, model="echo",
                                  messages=[{"role": "user", "content": "hello mesh"}])
            answer = raw.parse()
            assert answer.choices[0].message.content == "echo: hello mesh"
            assert answer.choices[0].finish_reason == "stop" and answer.object == "chat.completion"
            mesh = answer.model_extra["accelmesh"]
            assert set(mesh) >= {"key", "cid", "provider", "peer", "cache", "served_from"}
            assert mesh["peer"] == a.daemon.peer_id and mesh["cache"] == "miss" and mesh["served_from"] is None
            assert raw.headers["x-accelmesh-peer"] == a.daemon.peer_id
            assert raw.headers["x-accelmesh-cid"] == mesh["cid"] and raw.headers["x-accelmesh-cache"] == "miss"
            assert raw.headers["x-request-id"] == mesh["request_id"]


async def test_a_repeat_is_a_cache_hit_with_the_same_cid(tmp_path):
    with trio.fail_after(30):
        async with api(tmp_path) as a:
            sdk = a.sdk()
            ask = partial(sdk.chat.completions.create, model="echo", messages=[{"role": "user", "content": "again"}])
            first, second = await in_thread(ask), await in_thread(ask)
            one, two = first.model_extra["accelmesh"], second.model_extra["accelmesh"]
            assert one["cache"] == "miss" and two["cache"] in ("memory", "local")
            assert (two["cid"], two["key"]) == (one["cid"], one["key"])
            assert second.choices[0].message.content == first.choices[0].message.content


async def test_streamed_chat_through_the_openai_sdk_ends_with_usage_and_the_accelmesh_object(tmp_path):
    with trio.fail_after(30):
        async with api(tmp_path) as a:
            sdk = a.sdk()

            def stream():
                return list(sdk.chat.completions.create(
                    model="echo", messages=[{"role": "user", "content": "one two three"}], stream=True,
                    stream_options={"include_usage": True}))

            chunks = await in_thread(stream)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "echo: one two three"
            assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 4, "word by word"
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
            last = chunks[-1]
            assert last.choices == [] and last.usage is not None
            assert last.model_extra["accelmesh"]["peer"] == a.daemon.peer_id
            assert all("accelmesh" not in (c.model_extra or {}) for c in chunks[:-1])


async def test_completions_whole_and_streamed(tmp_path):
    with trio.fail_after(30):
        async with api(tmp_path) as a:
            sdk = a.sdk()
            whole = await in_thread(sdk.completions.create, model="echo", prompt="plain prompt")
            assert whole.choices[0].text == "echo: plain prompt" and whole.object == "text_completion"
            assert whole.model_extra["accelmesh"]["cid"]
            chunks = await in_thread(lambda: list(sdk.completions.create(model="echo", prompt="streamed prompt",
                                                                         stream=True)))
            assert "".join(c.choices[0].text for c in chunks) == "echo: streamed prompt"
            assert chunks[-1].model_extra["accelmesh"]["cid"] and chunks[-1].choices[0].finish_reason == "stop"


async def test_models_lists_echo_with_the_peer_that_serves_it(tmp_path):
    with trio.fail_after(30):
        async with api(tmp_path) as a:
            models = await in_thread(lambda: list(a.sdk().models.list()))
            echo = next(m for m in models if m.id == "echo")
            assert echo.object == "model" and a.daemon.peer_id in echo.model_extra["peers"]


async def test_an_unknown_model_is_404_in_openais_error_shape(tmp_path):
    with trio.fail_after(30):
        async with api(tmp_path) as a:
            with pytest.raises(openai.NotFoundError) as info:
                await in_thread(a.sdk().chat.completions.create, model="no-such-model",
                                messages=[{"role": "user", "content": "hi"}])
            assert info.value.status_code == 404 and info.value.code == "model_not_found"


# -- httpx: raw bodies and headers --------------------------------------------------------------------


async def test_invalid_json_wrong_types_and_unsupported_parameters_are_400(tmp_path):
    with trio.fail_after(30):
        async with api(tmp_path) as a, a.client() as client:
            bad = await client.post("/v1/chat/completions", content=b"{not json",
                                    headers={"content-type": "application/json"})
            assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
            assert "not valid JSON" in bad.json()["error"]["message"]
            for body, words in [({"model": "echo", "messages": "hi"}, "messages"),
                                ({"model": "echo", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
                                 "temperature"),
                                ({"model": "echo", "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
                                 "tools"),
                                ({"model": "echo", "messages": [{"role": "user", "content": "x"}], "bogus": 1},
                                 "bogus")]:
                r = await client.post("/v1/chat/completions", json=body)
                assert r.status_code == 400 and words in r.json()["error"]["message"], (body, r.text)
            ok = await client.post("/v1/chat/completions", json={"model": "echo", "messages": [
                {"role": "user", "content": "still serving"}]})
            assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "echo: still serving"


async def test_a_body_over_the_limit_is_413_and_the_daemon_keeps_serving(tmp_path):
    with trio.fail_after(30):
        async with api(tmp_path) as a, a.client() as client:
            a.daemon.http.max_body_bytes = 1000
            big = await client.post("/v1/completions", json={"model": "echo", "prompt": "x" * 2000})
            assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
            ok = await client.post("/v1/completions", json={"model": "echo", "prompt": "small"})
            assert ok.status_code == 200


async def test_request_headers_map_to_the_reserved_arguments(tmp_path):
    with trio.fail_after(30):
        async with api(tmp_path) as a, a.client() as client:
            body = {"model": "echo", "prompt": "headers"}
            first = await client.post("/v1/completions", json=body, headers={"x-request-id": "my-id-1"})
            assert first.headers["x-request-id"] == "my-id-1" and first.json()["accelmesh"]["request_id"] == "my-id-1"
            bypass = await client.post("/v1/completions", json=body, headers={"x-accelmesh-cache-mode": "no-cache"})
            assert bypass.json()["accelmesh"]["cache"] != "memory"
            named = await client.post("/v1/completions", json=body, headers={"x-accelmesh-provider": "echo"})
            assert named.json()["accelmesh"]["provider"] == "echo"
            pinned = await client.post("/v1/completions", json={**body, "prompt": "pinned"},
                                       headers={"x-accelmesh-on-peers": a.daemon.peer_id})
            assert pinned.status_code == 200 and pinned.json()["accelmesh"]["peer"] == a.daemon.peer_id
            for header, value in [("x-accelmesh-strategy", "nope"), ("x-accelmesh-verify", "two"),
                                  ("x-accelmesh-cache-mode", "sometimes"), ("x-accelmesh-accelerator", "abacus")]:
                r = await client.post("/v1/completions", json=body, headers={header: value})
                assert r.status_code == 400, (header, r.text)
            missing = await client.post("/v1/completions", json=body, headers={"x-accelmesh-provider": "nobody"})
            assert missing.status_code == 400 and missing.json()["error"]["code"] == "provider_not_found"


async def test_a_missing_temperature_is_deterministic_and_keys_like_temperature_zero(tmp_path):
    with trio.fail_after(30):
        async with api(tmp_path) as a, a.client() as client:
            base = {"model": "echo", "prompt": "same question"}
            plain = (await client.post("/v1/completions", json=base)).json()["accelmesh"]
            zero = (await client.post("/v1/completions", json={**base, "temperature": 0})).json()["accelmesh"]
            assert zero["key"] == plain["key"] and zero["cache"] in ("memory", "local")


async def test_a_full_node_answers_429_with_retry_after(tmp_path):
    env = {"ACCELMESH_ECHO_LATENCY_MS": "3000", "ACCELMESH_LIMITS_MAX_CONCURRENT": "1",
           "ACCELMESH_LIMITS_MAX_QUEUE": "0"}
    with trio.fail_after(30):
        async with api(tmp_path, **env) as a, a.client() as client, trio.open_nursery() as nursery:
            nursery.start_soon(partial(client.post, "/v1/completions", json={"model": "echo", "prompt": "hold"}))
            with trio.fail_after(5):
                while a.daemon.admission.in_flight < 1:
                    await trio.sleep(0.01)
            r = await client.post("/v1/completions", json={"model": "echo", "prompt": "no room"})
            assert r.status_code == 429 and r.json()["error"]["code"] == "busy"
            assert int(r.headers["retry-after"]) >= 1
            nursery.cancel_scope.cancel()


async def test_a_client_that_disconnects_mid_stream_frees_the_slot_within_a_second(tmp_path):
    env = {"ACCELMESH_ECHO_WORD_DELAY_MS": "500"}
    with trio.fail_after(30):
        async with api(tmp_path, **env) as a:
            async with a.client() as client:
                body = {"model": "echo", "prompt": " ".join(["word"] * 100), "stream": True}
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            break
                    assert a.daemon.admission.in_flight == 1
            with trio.fail_after(1):  # the connection closed: the work is cancelled, the slot freed
                while a.daemon.admission.in_flight:
                    await trio.sleep(0.01)
            assert a.daemon.http.disconnected >= 1


async def test_a_client_that_leaves_before_a_whole_answer_frees_the_slot_within_a_second(tmp_path):
    # Watched from WATCH_AFTER on (a sweep starts the watcher): a client gone at once is noticed
    # within two sweeps; one gone later, within one.
    with trio.fail_after(30):
        async with api(tmp_path, ACCELMESH_ECHO_LATENCY_MS="20000") as a:
            for wait_before_leaving in (0.0, 1.0):
                async with a.client() as client:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(partial(client.post, "/v1/completions", json={
                            "model": "echo", "prompt": f"left after {wait_before_leaving}"}))
                        with trio.fail_after(5):
                            while a.daemon.admission.in_flight < 1:
                                await trio.sleep(0.01)
                        await trio.sleep(wait_before_leaving)
                        nursery.cancel_scope.cancel()  # closes the connection
                with trio.fail_after(1):
                    while a.daemon.admission.in_flight:
                        await trio.sleep(0.01)
            assert a.daemon.http.disconnected == 2


async def test_without_a_lifespan_each_request_is_watched_at_once(tmp_path):
    """A server that runs no ASGI lifespan: the app watches every request from its start."""
    from node.http.app import HttpApi
    from node.http.server import bind_http, serve_http

    left = trio.Event()
    started = trio.Event()

    async def run(ctx):
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            left.set()
        yield ""  # (an async generator, as FrontDoor.run)

    settings = load_settings(env={})
    http = HttpApi(run=run, models=lambda: {"echo": ("me",)}, settings=settings)
    app = http.app().app  # past _Lifespan: the server never starts the sweeps
    listener = bind_http("127.0.0.1:0")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(lambda task_status: serve_http(app, listener, task_status=task_status))
            async with httpx.AsyncClient(base_url=url) as client, trio.open_nursery() as requests:
                requests.start_soon(partial(client.post, "/v1/completions", json={"model": "echo", "prompt": "x"}))
                await started.wait()
                requests.cancel_scope.cancel()
            with trio.fail_after(1):
                await left.wait()  # the work cancelled...
                while not http.disconnected:  # ...and counted as the client's leaving
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


async def test_a_slow_client_gets_408_and_the_daemon_serves_others_meanwhile(tmp_path):
    with trio.fail_after(30):
        async with api(tmp_path) as a, a.client() as client:
            a.daemon.http.body_timeout = 1.0  # (30 s in a daemon)
            host, port = a.url.removeprefix("http://").rsplit(":", 1)
            slow = await trio.open_tcp_stream(host, int(port))
            await slow.send_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                b"content-length: 100\r\n\r\n{\"model\": ")  # ...and nothing more
            started = trio.current_time()
            for i in range(5):  # the slow one holds a task, not an admission slot
                r = await client.post("/v1/completions", json={"model": "echo", "prompt": f"fast {i}"})
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == f"echo: fast {i}"
            assert a.daemon.admission.in_flight == 0 and a.daemon.http.disconnected == 0  # answered, not cut
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                data = await slow.receive_some()
                if not data:
                    break
                answer += data
            await slow.aclose()
            assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer
            assert 0.9 <= trio.current_time() - started < 5 and a.daemon.http.slow_bodies == 1


async def test_sse_lines_are_data_events_ending_with_done(tmp_path):
    with trio.fail_after(30):
        async with api(tmp_path) as a, a.client() as client:
            body = {"model": "echo", "messages": [{"role": "user", "content": "a b"}], "stream": True}
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                assert response.headers["x-request-id"]
                events = [line for line in [line async for line in response.aiter_lines()] if line]
            assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
            last = json.loads(events[-2][6:])
            assert last["choices"][0]["finish_reason"] == "stop" and "usage" not in last
            assert last["accelmesh"]["cache"] == "miss"


# -- auth ------------------------------------------------------------------------------------------


async def test_beyond_loopback_a_bearer_token_is_required(tmp_path):
    with trio.fail_after(30):
        async with api(tmp_path, http="0.0.0.0:0") as a:
            port = a.url.rsplit(":", 1)[1]
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=20) as anon:
                r = await anon.get("/v1/models")
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
                r = await anon.get("/v1/models", headers={"authorization": "Bearer wrong"})
                assert r.status_code == 401
                r = await anon.get("/v1/models", headers={"authorization": f"Bearer {a.token}"})
                assert r.status_code == 200
            with pytest.raises(openai.AuthenticationError):
                await in_thread(lambda: openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0,
                                                      http_client=httpx.Client(trust_env=False)).models.list())


async def test_configured_api_keys_and_a_key_file_open_the_api_beyond_loopback(tmp_path):
    from_env, from_file = "k" * 24, "f" * 32
    keys = tmp_path / "keys"
    keys.write_text(f"# team keys\n\n{from_file}\n")
    with trio.fail_after(30):
        async with api(tmp_path, http="0.0.0.0:0", ACCELMESH_HTTP_API_KEYS=from_env,
                       ACCELMESH_HTTP_API_KEYS_FILE=str(keys)) as a:
            url = f"http://127.0.0.1:{a.url.rsplit(':', 1)[1]}"
            async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=20) as anon:
                for key, status in ((from_env, 200), (from_file, 200), (a.token, 200), ("# team keys", 401),
                                    ("k" * 23, 401)):
                    r = await anon.get("/v1/models", headers={"authorization": f"Bearer {key}"})
                    assert r.status_code == status, key


async def test_an_unusable_api_key_stops_start_up_naming_the_setting(tmp_path):
    from node.config import load_settings
    from tests.mesh.conftest import LOOPBACK

    def daemon(**env: str) -> Daemon:
        return Daemon(load_settings(env={"ACCELMESH_DATA_DIR": str(tmp_path / "d"), "ACCELMESH_LISTEN": LOOPBACK,
                                         "ACCELMESH_HTTP": "127.0.0.1:0", **env}))

    with trio.fail_after(30):
        with pytest.raises(ConfigError, match="http_api_keys=.*at least 16 characters") as short:
            await daemon(ACCELMESH_HTTP_API_KEYS="short").run()
        assert "short" not in str(short.value)  # a key is a secret: never in a message
        with pytest.raises(ConfigError, match="http_api_keys_file=.*cannot read"):
            await daemon(ACCELMESH_HTTP_API_KEYS_FILE=str(tmp_path / "missing")).run()
        assert not (tmp_path / "d" / "daemon.json").exists()


async def test_cors_headers_only_for_configured_origins_and_preflight_needs_no_key(tmp_path):
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization,content-type,x-accelmesh-cache-mode"}
    with trio.fail_after(30):
        async with api(tmp_path, "plain") as a, a.client() as client:
            r = await client.get("/v1/models", headers={"origin": "https://app.example"})
            assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        async with api(tmp_path, "cors", http="0.0.0.0:0", ACCELMESH_HTTP_CORS_ORIGINS="https://app.example") as a:
            url = f"http://127.0.0.1:{a.url.rsplit(':', 1)[1]}"
            async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=20) as anon:
                r = await anon.options("/v1/chat/completions", headers=preflight)
                assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
                assert "x-accelmesh-cache-mode" in r.headers["access-control-allow-headers"].lower()
                r = await anon.options("/v1/chat/completions", headers={**preflight, "origin": "https://evil.example"})
                assert r.status_code == 400
                r = await anon.post("/v1/completions", json={"model": "echo", "prompt": "hi"},
                                    headers={"origin": "https://app.example", "authorization": f"Bearer {a.token}"})
                assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
                assert "x-accelmesh-cid" in r.headers["access-control-expose-headers"].lower()


def test_bearer_auth_compares_every_token_and_loopback_needs_none():
    auth = BearerAuth(frozenset({"alpha", "beta"}), required=True)
    assert auth.allows("Bearer beta") and auth.allows("bearer alpha")
    assert not auth.allows(None) and not auth.allows("Bearer gamma") and not auth.allows("Basic alpha")
    assert BearerAuth(frozenset(), required=False).allows(None)
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1") and is_loopback_host("localhost")
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("::") and not is_loopback_host("10.0.0.1")


# -- pure translations ------------------------------------------------------------------------------


def test_errors_map_to_openai_statuses():
    assert error_response(InvalidRequest("x"))[0] == 400
    assert error_response(ModelNotFound("echo", "no such model", retryable=False))[0] == 404
    status, body, headers = error_response(Busy(2.5))
    assert status == 429 and dict(headers)[b"retry-after"] == b"3" and body["error"]["code"] == "busy"
    assert error_response(AllProvidersFailed([("echo", "not ready")]))[0] == 503
    assert error_response(DeadlineExceeded(1.0))[0] == 504
    assert error_response(RuntimeError("bug"))[0] == 500


def test_parse_call_and_bind():
    call = parse_call("chat", {"model": "echo", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_completion_tokens": 5, "user": "me"})
    assert call.prompt == [{"role": "user", "content": "ab"}] and call.params == {"max_tokens": 5}
    with pytest.raises(InvalidRequest, match="n must be 1"):
        parse_call("completion", {"model": "echo", "prompt": "x", "n": 2})
    assert parse_bind("127.0.0.1:0") == ("127.0.0.1", 0) and parse_bind("[::1]:8400") == ("::1", 8400)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_bind("8400")


# -- docs/api.md ------------------------------------------------------------------------------------


async def test_the_openai_sdk_example_in_docs_api_md_runs(tmp_path, capsys):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    (example,) = re.findall(r"```python\n(import json\n.*?)```", doc, re.DOTALL)
    with trio.fail_after(30):
        async with api(tmp_path) as a:
            code = example.replace('".data/node"', repr(str(a.daemon.data_dir.path)))
            await in_thread(exec, compile(code, "docs/api.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "echo: hello miss" and out[1] == "echo: hi" and "'echo'" in out[2]


async def test_the_curl_examples_in_docs_api_md_run(tmp_path):
    import os
    import re
    import sys
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    (example,) = re.findall(r"```sh\n(URL=.*?)```", doc, re.DOTALL)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    with trio.fail_after(30):
        async with api(tmp_path) as a:
            script = example.replace(".data/node", str(a.daemon.data_dir.path))
            done = await trio.run_process(["bash", "-euo", "pipefail", "-c", script], capture_stdout=True,
                                          capture_stderr=True, env=env, check=False)
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    chat, end = json.JSONDecoder().raw_decode(out)  # curl -s prints it without a newline
    assert chat["choices"][0]["message"]["content"] == "echo: hello" and chat["accelmesh"]["cache"] == "miss"
    events = [line for line in out[end:].splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["usage"]["completion_tokens"] >= 1
    assert "echo" in [m["id"] for m in json.loads(out.splitlines()[-1])["data"]]  # GET /v1/models, printed last
