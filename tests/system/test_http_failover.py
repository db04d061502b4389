"""The failover issue's SIGKILL test through the entry daemon's HTTP API: 200 concurrent requests
from the official `openai` SDK's async client (asyncio, in this process; the daemons are
subprocesses), one serving node killed when half were sent. Every request must get exactly one
correct answer."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from contextlib import ExitStack

import httpx
import openai
import pytest

from tests.system.test_failover_process import cluster, peers, wait_for

pytestmark = pytest.mark.system


async def sdk_load(url: str, token: str, n: int, on_half) -> tuple[dict[str, int], list[str], set[str]]:
    answered: dict[str, int] = {}
    errors: list[str] = []
    served_by: set[str] = set()
    async with httpx.AsyncClient(trust_env=False, limits=httpx.Limits(max_connections=n)) as http:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=60, http_client=http)

        async def one(prompt: str) -> None:
            try:
                answer = await client.chat.completions.create(
                    model="echo", messages=[{"role": "user", "content": prompt}],
                    extra_headers={"x-accelmesh-provider": "mesh"})
            except Exception as exc:  # counted, and shown on failure
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            assert answer.choices[0].message.content == f"echo: {prompt}"
            served_by.add(answer.model_extra["accelmesh"]["peer"])
            answered[prompt] = answered.get(prompt, 0) + 1

        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(one(f"prompt {i} {uuid.uuid4().hex[:8]}")))
            if i == n // 2:
                on_half()
            await asyncio.sleep(0.005)  # 200 requests dispatched over about a second
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    return answered, errors, served_by


def test_a_serving_node_killed_mid_load_loses_no_request_sent_through_the_http_api(start_daemon, accelmesh_cmd):
    echo = {"ACCELMESH_ECHO_LATENCY_MS": "50-500"}
    with ExitStack() as stack:
        entry, serving = cluster(start_daemon, stack, [echo, echo, echo],
                                 entry_env={"ACCELMESH_HTTP": "127.0.0.1:0"})
        ids = [s.info["peer_id"] for s in serving]
        wait_for(lambda: set(ids) <= set(peers(accelmesh_cmd, entry)), 20, "the entry knows the three")
        info = json.loads((entry.data_dir / "daemon.json").read_text())
        token = (entry.data_dir / "http.token").read_text().strip()
        victim = serving[1]
        answered, errors, served_by = asyncio.run(
            sdk_load(info["http_url"], token, 200, lambda: victim.signal(signal.SIGKILL)))
        assert errors == [] and len(answered) == 200 and set(answered.values()) == {1}, (len(answered), errors[:3])
        assert served_by <= set(ids) and len(served_by) >= 2
        info = json.loads(accelmesh_cmd("info", "--json", "--data-dir", str(entry.data_dir), check=True).stdout)
        assert info["mesh"]["backends"][ids[1]]["failed"] >= 1, "requests were on the victim when it died"
