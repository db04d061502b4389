"""Hedging (`mesh.hedge_after`): a second copy goes to another node when the first sends no chunk in
time; the first answer wins and the other is cancelled. The other nodes are test_failover's
scripted stream pool; time is trio's `autojump_clock`."""

from __future__ import annotations

import pytest
import trio

from node.errors import ConfigError
from node.mesh.manager import HEDGE_MIN_SAMPLES, hedge_rule
from tests.mesh.test_failover import PROMPT, ScriptedPool, collect, mesh, nodes, request


async def test_a_slow_first_node_is_hedged_and_the_loser_is_cancelled(autojump_clock):
    pool = ScriptedPool({"A": [("stall", 5.0)], "B": ["ok"]})
    provider = mesh(pool, nodes("A", "B"))
    provider.hedge_after = 0.5
    started = trio.current_time()
    with trio.fail_after(30):
        chunks, final = await collect(provider, request())
    took = trio.current_time() - started
    assert "".join(chunks) == final.text == "echo: " + PROMPT and final.remote.peer == "B"
    assert 0.5 <= took < 1.0, f"hedged at 0.5 s, not after A's 5 s ({took:.2f} s)"
    assert pool.abandoned == ["A"], "the loser's stream was closed (the serving node stops)"
    a = provider.manager.backend("A").statistics()
    assert a.in_flight == 0 and a.failed == 0, "cancelled, not failed: a hedge says nothing against A"
    assert provider.hedged == 1


async def test_no_hedge_when_the_first_chunk_comes_in_time(autojump_clock):
    pool = ScriptedPool({"A": ["ok"], "B": ["ok"]})
    provider = mesh(pool, nodes("A", "B"))
    provider.hedge_after = 0.5
    with trio.fail_after(30):
        _, final = await collect(provider, request())
    assert final.remote.peer == "A" and pool.asked == ["A"] and provider.hedged == 0


async def test_when_the_hedge_fails_the_first_node_still_answers(autojump_clock):
    pool = ScriptedPool({"A": [("stall", 1.0)], "B": [("die_after", 0)]})
    provider = mesh(pool, nodes("A", "B"))
    provider.hedge_after = 0.2
    with trio.fail_after(30):
        _, final = await collect(provider, request())
    assert final.remote.peer == "A" and pool.asked == ["A", "B"]
    assert provider.manager.backend("B").statistics().failed == 1


async def test_when_both_fail_the_request_fails_over_to_a_third_node(autojump_clock):
    pool = ScriptedPool({p: ["ok"] for p in "ABC"})
    provider = mesh(pool, nodes("A", "B", "C"), liveness_floor=1.0)
    provider.hedge_after = 0.2
    with trio.fail_after(60):
        for _ in range(3):  # all measured, so A's silence is cut by its liveness timeout (1 s)
            await collect(provider, request())
        pool.script = {"A": ["silent"], "B": [("die_after", 0)], "C": ["ok"]}
        pool.asked.clear()
        _, final = await collect(provider, request())
    assert final.remote.peer == "C" and pool.asked == ["A", "B", "C"]
    assert {p: provider.manager.backend(p).statistics().failed for p in "ABC"} == {"A": 1, "B": 1, "C": 0}


async def test_p95_hedges_only_after_enough_samples_and_at_the_recent_tail(autojump_clock):
    stalls = [0.01 * i for i in range(1, 21)]  # times to first chunk of 10 ms to 200 ms
    pool = ScriptedPool({"A": [("stall", s) for s in stalls]})
    provider = mesh(pool, nodes("A"))
    assert provider.manager.hedge_delay("A", "p95") is None, "no samples: no hedge"
    with trio.fail_after(60):
        for i in range(len(stalls)):
            await collect(provider, request())
            if i + 1 < HEDGE_MIN_SAMPLES:
                assert provider.manager.hedge_delay("A", "p95") is None
    assert provider.manager.hedge_delay("A", "p95") == pytest.approx(0.19, abs=0.005), "the 19th of 20"
    assert provider.manager.hedge_delay("A", 0.25) == 0.25 and provider.manager.hedge_delay("A", None) is None


def test_hedge_after_setting_parses_or_names_the_key():
    assert hedge_rule("off") is None and hedge_rule("p95") == "p95" and hedge_rule("0.25") == 0.25
    for bad in ("0", "-1", "fast", "nan"):
        with pytest.raises(ConfigError, match="mesh.hedge_after"):
            hedge_rule(bad)
