"""`accelmesh top`: the pure frame from fixed samples, the sampling loop against a scripted daemon under
trio's autojump clock, and the command against a real in-process daemon."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
from typing import Any

import trio
from rich.console import Console

import node
from node.cli import main
from node.top import Sample, make_console, rates, render_frame, run_top
from tests.mesh.conftest import running_daemon

ALICE = "12D3KooWAliceAliceAliceAliceAliceAliceAliceAliceAlice"
BOB = "12D3KooWBobBobBobBobBobBobBobBobBobBobBobBobBobBob0bob"
CAROL = "12D3KooWCarolCarolCarolCarolCarolCarolCarolCarolCarol"
QUIET = {"ACCELMESH_ADVERTS_INTERVAL": "60"}
NOW = 1_800_000_000.0  # the samples' Unix time


def info_json(*, peer_id: str = ALICE, inferences: int = 0, planned: int = 0, **cache: int) -> dict[str, Any]:
    tiers = {"memory": 0, "local": 0, "cluster": 0, "miss": 0, "bypass": 0, **cache}
    return {"peer_id": peer_id, "capacity": 64, "queue": 256, "load": {"in_flight": 2, "queued": 1}, "peers": 2,
            "stats": {"inferences": inferences, "cache": tiers},
            "mesh": {"strategy": "round_robin", "planned": planned, "cooling": 0, "backends": {}}}


def peer_json(peer_id: str, *, health: str = "ok", cooldown_until: float | None = None, started: int = 0,
              latency_ms: float | None = 12.0) -> dict[str, Any]:
    return {"peer_id": peer_id, "health": health, "cooldown_until": cooldown_until, "started": started,
            "latency_ms": latency_ms, "rtt_ms": 1.0, "capacity": 8, "load": {"in_flight": 3, "queued": 0},
            "providers": [{"name": "echo", "ready": True, "models": ["echo"]},
                          {"name": "openrouter", "ready": False, "models": ["openrouter/auto"]}]}


def sample(info: dict[str, Any], peers: tuple[dict[str, Any], ...] = (), *, uptime: float = 100.0,
           clock: float = 0.0) -> Sample:
    return Sample(status={"state": "running", "uptime_s": uptime, "connections": 3}, info=info, peers=peers,
                  at=NOW, clock=clock)


def plain(renderable: Any) -> str:
    buf = io.StringIO()
    make_console(buf).print(renderable)
    return buf.getvalue()


def row(text: str, label: str) -> list[str]:
    """The cells of the line that starts with `label`, split on runs of spaces."""
    for line in text.splitlines():
        if line.strip().startswith(label):
            return re.split(r"\s{2,}", line.strip())
    raise AssertionError(f"no line starts with {label!r} in:\n{text}")


# -- the frame ----------------------------------------------------------------------------------------


def test_requests_per_second_is_the_growth_of_every_cache_tier_over_the_seconds_between_samples():
    before = sample(info_json(inferences=6, planned=1, memory=2, local=2, miss=6), (peer_json(BOB, started=3),))
    after = sample(info_json(inferences=10, planned=5, memory=6, local=2, cluster=2, miss=10, bypass=2),
                   (peer_json(BOB, started=7),), clock=2.0)
    r = rates(before, after, 2.0)
    assert r is not None
    assert r.requests == 6.0  # (4 memory + 2 cluster + 4 miss + 2 bypass) / 2 s
    assert r.inferences == 2.0 and r.planned == 2.0 and r.sent == {BOB: 2.0}
    assert r.by_tier == {"memory": 2.0, "local": 0.0, "cluster": 1.0, "miss": 2.0, "bypass": 1.0}

    text = plain(render_frame(before, after, 2.0))
    assert row(text, "requests/s")[1] == "6.0 (22 answered)"
    assert row(text, "inferences/s")[1] == "2.0 (10 run)"
    # tier, answers, /s, share of lookups since start (20), share in the interval (10 lookups)
    assert row(text, "memory") == ["memory", "6", "2.0", "30.0%", "40.0%"]
    assert row(text, "cluster") == ["cluster", "2", "1.0", "10.0%", "20.0%"]
    assert row(text, "miss") == ["miss", "10", "2.0", "50.0%", "40.0%"]
    assert row(text, "bypass") == ["bypass", "2", "1.0", "-", "-"]  # it skipped the cache: no share
    assert row(text, "hit ratio") == ["hit ratio", "10", "3.0", "50.0%", "60.0%"]
    bob = row(text, BOB[-12:])
    assert bob[:5] == [BOB[-12:], "ok", "3/8", "12 ms", "1 ms"] and bob[6] == "2.0"
    assert bob[7] == "echo: echo"  # only the ready providers
    assert ALICE in text and "running, up 1m40s, 3 connection(s)" in text


def test_a_cooling_peer_is_shown_cooling_with_the_time_it_has_left():
    peers = (peer_json(BOB), peer_json(CAROL, health="cooling", cooldown_until=NOW + 75))
    text = plain(render_frame(sample(info_json(), peers), sample(info_json(), peers, clock=1.0), 1.0))
    carol = row(text, CAROL[-12:])
    assert carol[1] == "cooling" and carol[5].startswith("1m15s until ")
    assert row(text, BOB[-12:])[1] == "ok" and row(text, BOB[-12:])[5] == "-"


def test_nothing_happened_shows_zero_rates_and_no_shares_without_dividing_by_zero():
    quiet = sample(info_json())
    text = plain(render_frame(quiet, sample(info_json(), clock=1.0), 1.0))
    assert row(text, "requests/s")[1] == "0.0 (0 answered)"
    assert row(text, "memory") == ["memory", "0", "0.0", "-", "-"]
    assert row(text, "hit ratio") == ["hit ratio", "0", "0.0", "-", "-"]
    assert "peers: none yet" in text
    for previous, seconds in ((None, 1.0), (quiet, 0.0), (quiet, -1.0)):  # no rates to show, and no error
        assert rates(previous, quiet, seconds) is None
        assert row(plain(render_frame(previous, quiet, seconds)), "requests/s")[1] == "- (0 answered)"


def test_a_restart_between_the_samples_shows_no_rates_rather_than_negative_ones():
    before = sample(info_json(miss=5, inferences=5), uptime=100.0)
    assert rates(before, sample(info_json(miss=1, inferences=1), uptime=101.0, clock=1.0), 1.0) is None
    assert rates(before, sample(info_json(miss=6, inferences=6), uptime=0.5, clock=1.0), 1.0) is None
    assert rates(before, sample(info_json(peer_id=CAROL, miss=6), uptime=101.0, clock=1.0), 1.0) is None
    forgotten = rates(sample(info_json(), (peer_json(BOB, started=9),)),
                      sample(info_json(), (peer_json(BOB, started=1), peer_json(CAROL, started=2)), clock=1.0), 1.0)
    assert forgotten is not None and forgotten.sent == {}  # bob was met again, carol is new: no rate yet


def test_a_tier_a_newer_daemon_reports_is_shown_after_the_known_ones():
    info = info_json(miss=1)
    info["stats"]["cache"]["edge"] = 3
    text = plain(render_frame(None, sample(info), 0.0))
    assert row(text, "edge") == ["edge", "3", "-", "-", "-"]
    assert text.index("bypass") < text.index("edge")


# -- the loop, against a scripted daemon --------------------------------------------------------------


class ScriptedDaemon:
    """A daemon whose counters grow with trio's clock: 3 misses and 1 memory hit per second."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def command(self, name: str, **args: Any) -> Any:
        await trio.lowlevel.checkpoint()
        self.asked.append(name)
        t = int(trio.current_time())
        if name == "status":
            return {"state": "running", "uptime_s": float(t), "connections": 1}
        if name == "info":
            return info_json(inferences=3 * t, miss=3 * t, memory=t)
        return {"peers": [peer_json(BOB, started=2 * t)]}


async def test_once_takes_two_samples_an_interval_apart_and_prints_one_plain_frame(autojump_clock):
    daemon, buf = ScriptedDaemon(), io.StringIO()
    with trio.fail_after(10):
        assert await run_top(daemon, interval=2.0, once=True, console=make_console(buf)) == 0
    text = buf.getvalue()
    assert daemon.asked == ["status", "info", "peers"] * 2
    assert text.count("accelmesh top") == 1 and "(rates over 2.0 s)" in text
    assert row(text, "requests/s")[1].startswith("4.0")  # 3 misses + 1 hit a second
    assert row(text, "hit ratio")[4] == "25.0%" and row(text, BOB[-12:])[6] == "2.0"
    assert "\x1b" not in text and all(line == line.rstrip() for line in text.splitlines())


async def test_off_a_terminal_the_view_prints_one_frame_per_interval_each_with_rates(autojump_clock):
    daemon, buf = ScriptedDaemon(), io.StringIO()
    with trio.move_on_after(5.5):
        await run_top(daemon, interval=1.0, console=make_console(buf))
    text = buf.getvalue()
    assert text.count("accelmesh top") == 5  # samples at 0..5 s; the first has nothing to compare with
    assert text.count("(rates over 1.0 s)") == 5 and "waiting for a second sample" not in text
    assert "\x1b" not in text


async def test_on_a_terminal_the_view_redraws_on_the_alternate_screen_and_restores_it(autojump_clock):
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120, height=50)
    with trio.move_on_after(2.5):
        await run_top(ScriptedDaemon(), interval=1.0, console=console)
    out = buf.getvalue()
    assert out.index("\x1b[?1049h") < out.index("accelmesh top") < out.rindex("\x1b[?1049l")
    assert "waiting for a second sample" in out and "(rates over 1.0 s)" in out  # drawn at once, then redrawn
    assert "Ctrl-C quits" in out


def test_an_interval_below_the_minimum_is_a_usage_error(tmp_path, capsys):
    assert main(["top", "--interval", "0", "--data-dir", str(tmp_path)]) == 2
    assert "--interval must be at least" in capsys.readouterr().err


# -- the command, against a real daemon ---------------------------------------------------------------


def top_command(data_dir: Any, *args: str) -> list[str]:
    return [sys.executable, "-m", "node.cli", "top", "--data-dir", str(data_dir), *args]


async def test_top_once_prints_the_nodes_peer_id_cache_tiers_and_requests_per_second(tmp_path, subprocess_env):
    with trio.fail_after(60):
        async with running_daemon(tmp_path, "alice", **QUIET) as daemon:
            client = node.connect(data_dir=daemon.data_dir.path)
            for prompt in ("one", "two", "one"):  # the second "one" is a memory hit
                assert await client.agenerate_text(prompt, provider="echo") == f"echo: {prompt}"
            await client.aclose()
            done = await trio.run_process(top_command(daemon.data_dir.path, "--once", "--interval", "0.2"),
                                          capture_stdout=True, capture_stderr=True, check=False, env=subprocess_env)
    text = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert daemon.peer_id in text and "running, up " in text
    assert re.fullmatch(r"\d+\.\d \(3 answered\)", row(text, "requests/s")[1])
    assert row(text, "memory")[:2] == ["memory", "1"] and row(text, "miss")[:2] == ["miss", "2"]
    assert all(row(text, tier) for tier in ("local", "cluster", "bypass", "hit ratio"))
    assert "\x1b" not in text  # piped: plain text


async def test_ctrl_c_stops_the_live_view_with_exit_code_0(tmp_path, subprocess_env):
    stderr = tmp_path / "stderr.txt"
    with trio.fail_after(60):
        async with running_daemon(tmp_path, "alice", **QUIET) as daemon:
            with stderr.open("wb") as err:
                proc = await trio.lowlevel.open_process(top_command(daemon.data_dir.path, "--interval", "0.2"),
                                                        stdout=subprocess.PIPE, stderr=err, env=subprocess_env)
            out = b""
            while b"rates over" not in out:  # a first frame: the view is up
                chunk = await proc.stdout.receive_some()
                assert chunk, f"top exited early: {stderr.read_text()}"
                out += chunk
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 0, stderr.read_text()
            await proc.stdout.aclose()
    assert "Traceback" not in stderr.read_text() and "interrupted" not in stderr.read_text()
