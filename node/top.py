"""`accelmesh top`: a live view of this node and its peers, sampled from the daemon's control commands.

A `Sample` is one reading of the daemon: its `status`, `info` and `peers` answers (the same JSON as
`accelmesh status|info|peers --json`) and when it was taken. `render_frame(previous, current, seconds)`
turns two samples into one frame, a `rich` renderable; it is pure (no clock, no I/O), so tests hand it
fixed dicts. `run_top(client, ...)` is the thin I/O around it: sample every `interval` seconds over one
control connection and show each frame, full-screen (`rich.live.Live`) on a terminal, else as plain
text, one frame after another (no escape codes). `--once` takes two samples `interval` apart, so its
rates are real, prints one frame and returns.

Rates are the deltas of the daemon's counters between the two samples divided by the seconds between
them (`Rates`); the counters only grow while the daemon lives, so a counter that went down, another
peer id or a shorter uptime means the daemon restarted between the samples and the frame shows no
rates rather than wrong ones.

Imported only by `accelmesh top` (rich and trio are not loaded by `import node`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Protocol

import trio
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from protocols.vocabulary import CACHE_TIERS

__all__ = ["DEFAULT_INTERVAL", "MIN_INTERVAL", "Sample", "Rates", "rates", "render_frame", "take_sample",
           "make_console", "run_top"]

DEFAULT_INTERVAL = 1.0  # seconds between samples: top's pace; each sample is three control commands
MIN_INTERVAL = 0.1  # a faster refresh only loads the daemon and blurs the rates into noise
HIT_TIERS = ("memory", "local", "cluster")  # tiers that answered from a cache; `miss` ran a provider
LOOKUP_TIERS = (*HIT_TIERS, "miss")  # answers that looked in the cache (`bypass` skipped it)
PLAIN_WIDTH = 120  # columns of the plain-text frame when stdout is not a terminal and $COLUMNS is unset
SHORT_PEER_ID = 12  # trailing characters of a peer id in the peers table, as `accelmesh peers` shows it
MAX_MODELS_SHOWN = 3  # models listed per provider in the peers table; the rest become "+N"


class ControlClient(Protocol):
    """What `run_top` needs of a daemon client (node.client.DaemonClient, or a test's fake)."""

    def command(self, name: str, **args: Any) -> Awaitable[Any]: ...


@dataclass(frozen=True)
class Sample:
    """One reading of the daemon."""

    status: Mapping[str, Any]  # `status`: state, uptime_s, connections ({} when unknown)
    info: Mapping[str, Any]  # `info`: peer_id, load, capacity, stats (inferences, cache by tier), mesh
    peers: Sequence[Mapping[str, Any]]  # `peers`'s list: health, load, latency_ms, cooldown_until, ...
    at: float  # Unix time of the reading: what "cooling until" counts down from
    clock: float  # monotonic seconds (trio's clock) when `info` was asked: the rates' time base


@dataclass(frozen=True)
class Rates:
    """Per-second rates between two samples of the same daemon life (`rates()`)."""

    seconds: float
    requests: float  # answers given: the sum of every cache tier (memory, local, cluster, miss, bypass)
    inferences: float  # provider runs on this node (a cache hit is not one)
    planned: float  # requests the mesh's backend manager planned (sent through the mesh provider)
    by_tier: Mapping[str, float]  # answers per tier
    tier_deltas: Mapping[str, int]  # answers per tier in the interval (for the interval's hit ratios)
    sent: Mapping[str, float]  # peer id -> requests this node started on that peer


def _answers(info: Mapping[str, Any]) -> dict[str, int]:
    cache = info.get("stats", {}).get("cache", {})
    return {tier: int(cache.get(tier, 0)) for tier in _tiers(info)}


def _tiers(info: Mapping[str, Any]) -> tuple[str, ...]:
    """The known tiers in their order, then any tier a newer daemon reports that this view does not know."""
    cache = info.get("stats", {}).get("cache", {})
    return (*CACHE_TIERS, *sorted(set(cache) - set(CACHE_TIERS)))


def rates(previous: Sample | None, current: Sample, seconds: float) -> Rates | None:
    """The rates between `previous` and `current`, `seconds` apart; None without a previous sample, with no
    time between them, or when the daemon restarted in between (another peer id, a shorter uptime, or a
    counter that went down)."""
    if previous is None or seconds <= 0:
        return None
    if previous.info.get("peer_id") != current.info.get("peer_id"):
        return None
    if current.status.get("uptime_s", 0.0) < previous.status.get("uptime_s", 0.0):
        return None
    before, after = _answers(previous.info), _answers(current.info)
    deltas = {tier: after[tier] - before.get(tier, 0) for tier in after}
    inferences = _count(current.info, "inferences") - _count(previous.info, "inferences")
    planned = _planned(current.info) - _planned(previous.info)
    if min(deltas.values(), default=0) < 0 or inferences < 0 or planned < 0:
        return None
    started_before = {p["peer_id"]: int(p.get("started", 0)) for p in previous.peers}
    sent = {}
    for peer in current.peers:
        was = started_before.get(peer["peer_id"])
        if was is not None and int(peer.get("started", 0)) >= was:  # a peer forgotten and met again: no rate
            sent[peer["peer_id"]] = (int(peer.get("started", 0)) - was) / seconds
    return Rates(seconds=seconds, requests=sum(deltas.values()) / seconds, inferences=inferences / seconds,
                 planned=planned / seconds, by_tier={tier: n / seconds for tier, n in deltas.items()},
                 tier_deltas=deltas, sent=sent)


def _count(info: Mapping[str, Any], name: str) -> int:
    return int(info.get("stats", {}).get(name, 0))


def _planned(info: Mapping[str, Any]) -> int:
    return int(info.get("mesh", {}).get("planned", 0))


# -- the frame (pure) --------------------------------------------------------------------------------


def render_frame(previous: Sample | None, current: Sample, seconds: float, *, footer: str = "") -> RenderableType:
    """One frame of `accelmesh top` from two samples `seconds` apart.

    What it derives (everything else is shown as the daemon reported it):
    - requests/s: the growth of the sum of the cache tiers' counters (every answer is counted in exactly
      one tier: memory, local, cluster, miss or bypass), divided by `seconds`;
    - inferences/s and per tier /s: the growth of that counter, divided by `seconds`;
    - a tier's share: its answers over the answers that looked in the cache (memory + local + cluster +
      miss; `bypass` skipped it, so it has no share), since the daemon started and within the interval;
      the hit ratio is the three hit tiers' shares together;
    - a peer's sent/s: the growth of `started` (requests this node began on that peer), over `seconds`;
    - "cooling": how long a cooling peer has left, `cooldown_until` minus the sample's time.
    Rates read "-" without a previous sample or across a restart (`rates()`), and a share reads "-"
    when nothing looked in the cache: nothing is ever divided by zero.
    """
    r = rates(previous, current, seconds)
    info, status = current.info, current.status
    title = Text.assemble(("accelmesh top", "bold"), f"  {time.strftime('%H:%M:%S', time.localtime(current.at))}",
                          f"  (rates over {seconds:.1f} s)" if r is not None else "  (rates: waiting for a second sample)")
    parts: list[RenderableType] = [title, _node_table(info, status, r), _cache_table(info, r),
                                   _peers_table(current, r)]
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)


def _node_table(info: Mapping[str, Any], status: Mapping[str, Any], r: Rates | None) -> Table:
    table = Table(title="this node", title_justify="left", show_header=False, box=box.SIMPLE, pad_edge=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("peer id", str(info.get("peer_id", "?")))
    state = str(status.get("state", "?"))
    if status.get("uptime_s") is not None:
        state += f", up {_duration(float(status['uptime_s']))}"
    if status.get("connections") is not None:
        state += f", {status['connections']} connection(s)"
    table.add_row("state", state)
    load = info.get("load", {})
    table.add_row("load", f"{load.get('in_flight', 0)}/{info.get('capacity', '?')} in flight, "
                          f"{load.get('queued', 0)}/{info.get('queue', '?')} queued")
    table.add_row("requests/s", _rate(r.requests if r else None) + f" ({sum(_answers(info).values())} answered)")
    table.add_row("inferences/s", _rate(r.inferences if r else None) + f" ({_count(info, 'inferences')} run)")
    mesh = info.get("mesh", {})
    if mesh:
        table.add_row("mesh", f"{mesh.get('strategy', '?')}: {_rate(r.planned if r else None)} planned/s "
                              f"({_planned(info)} planned), {mesh.get('cooling', 0)} backend(s) cooling")
    table.add_row("peers", f"{info.get('peers', 0)} known")
    return table


def _cache_table(info: Mapping[str, Any], r: Rates | None) -> Table:
    totals = _answers(info)
    lookups = sum(totals[t] for t in LOOKUP_TIERS)
    recent = sum(r.tier_deltas.get(t, 0) for t in LOOKUP_TIERS) if r else 0
    table = Table(title="cache (answers by tier)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("tier", "answers", "/s", "share", "share (interval)"):
        table.add_column(name, justify="left" if name == "tier" else "right")
    for tier, total in totals.items():
        looked = tier in LOOKUP_TIERS
        table.add_row(tier, str(total), _rate(r.by_tier.get(tier) if r else None),
                      _share(total, lookups) if looked else "-",
                      _share(r.tier_deltas.get(tier, 0), recent) if looked and r else "-")
    hits = sum(totals[t] for t in HIT_TIERS)
    table.add_row(Text("hit ratio", style="bold"), str(hits),
                  _rate(sum(r.by_tier.get(t, 0.0) for t in HIT_TIERS) if r else None), _share(hits, lookups),
                  _share(sum(r.tier_deltas.get(t, 0) for t in HIT_TIERS), recent) if r else "-")
    return table


def _peers_table(current: Sample, r: Rates | None) -> RenderableType:
    if not current.peers:
        return Text("peers: none yet", style="dim")
    table = Table(title="peers", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("peer", "health", "load", "latency", "rtt", "cooling", "sent/s"):
        table.add_column(name, justify="right" if name in ("latency", "rtt", "sent/s") else "left", no_wrap=True)
    table.add_column("ready providers: models", ratio=1)  # the one column that wraps
    for peer in current.peers:
        peer_id = str(peer["peer_id"])
        health = str(peer.get("health") or "-")
        until = peer.get("cooldown_until")
        cooling = "-"
        if until is not None:
            left = max(0.0, float(until) - current.at)
            cooling = f"{_duration(left)} until {time.strftime('%H:%M:%S', time.localtime(float(until)))}"
        load = peer.get("load", {})
        queued = load.get("queued", 0)
        load_text = f"{load.get('in_flight', 0)}/{peer.get('capacity', '?')}" + (f" +{queued} queued" if queued else "")
        table.add_row(peer_id[-SHORT_PEER_ID:], Text(health, style="yellow" if health == "cooling" else "green"),
                      load_text, _ms(peer.get("latency_ms")), _ms(peer.get("rtt_ms")), cooling,
                      _rate(r.sent.get(peer_id) if r else None), _providers(peer.get("providers", ())))
    return table


def _providers(providers: Sequence[Mapping[str, Any]]) -> str:
    shown = []
    for p in providers:
        if not p.get("ready"):
            continue
        models = list(p.get("models", ()))
        more = f" +{len(models) - MAX_MODELS_SHOWN}" if len(models) > MAX_MODELS_SHOWN else ""
        shown.append(f"{p['name']}: {','.join(models[:MAX_MODELS_SHOWN]) or '-'}{more}")
    return "; ".join(shown) or "none ready"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _share(part: int, whole: int) -> str:
    return "-" if whole <= 0 else f"{100 * part / whole:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _duration(seconds: float) -> str:
    """`42s`, `3m07s`, `2h05m`, `3d04h`."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


# -- sampling and showing (I/O) ----------------------------------------------------------------------


async def take_sample(client: ControlClient, *, wall: Callable[[], float] = time.time) -> Sample:
    """Read the daemon once: `status`, `info`, `peers` (DaemonError when it cannot answer)."""
    status = await client.command("status")
    clock = trio.current_time()
    info = await client.command("info")
    peers = await client.command("peers")
    return Sample(status=status, info=info, peers=tuple(peers.get("peers", ())), at=wall(), clock=clock)


def make_console(file: IO[str] | None = None) -> Console:
    """The console frames go to: a terminal as rich sees it, else plain text (no colour, no escape codes),
    `PLAIN_WIDTH` columns wide unless $COLUMNS says otherwise."""
    file = file if file is not None else sys.stdout
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        return Console(file=file, highlight=False)
    width = None if os.environ.get("COLUMNS") else PLAIN_WIDTH
    return Console(file=file, force_terminal=False, force_interactive=False, color_system=None, no_color=True,
                   highlight=False, emoji=False, width=width)


async def run_top(client: ControlClient, *, interval: float = DEFAULT_INTERVAL, once: bool = False,
                  console: Console | None = None, wall: Callable[[], float] = time.time) -> int:
    """Show frames until Ctrl-C (SIGINT), then return 0; with `once`, print one frame and return 0.

    On a terminal the frame redraws in place on the alternate screen, like top, from the first sample
    on. Elsewhere (a pipe, a file) each frame is printed as plain text after the previous one, from the
    second sample on, so that every printed frame has rates.
    """
    console = console if console is not None else make_console()
    if once:
        first = await take_sample(client, wall=wall)
        await trio.sleep(interval)
        second = await take_sample(client, wall=wall)
        _show(console, render_frame(first, second, second.clock - first.clock))
        return 0
    async with trio.open_nursery() as nursery:
        if threading.current_thread() is threading.main_thread():
            nursery.start_soon(_cancel_on_sigint, nursery.cancel_scope)
        if console.is_terminal:
            await _refresh_live(client, console, interval, wall)
        else:
            await _print_frames(client, console, interval, wall)
    return 0


async def _cancel_on_sigint(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def _refresh_live(client: ControlClient, console: Console, interval: float,
                        wall: Callable[[], float]) -> None:
    footer = f"every {interval:g} s; Ctrl-C quits"
    previous = await take_sample(client, wall=wall)
    with Live(render_frame(None, previous, 0.0, footer=footer), console=console, screen=True,
              auto_refresh=False) as live:
        while True:
            await trio.sleep(interval)
            current = await take_sample(client, wall=wall)
            live.update(render_frame(previous, current, current.clock - previous.clock, footer=footer),
                        refresh=True)
            previous = current


async def _print_frames(client: ControlClient, console: Console, interval: float,
                        wall: Callable[[], float]) -> None:
    previous = await take_sample(client, wall=wall)
    while True:
        await trio.sleep(interval)
        current = await take_sample(client, wall=wall)
        _show(console, render_frame(previous, current, current.clock - previous.clock))
        console.file.write("\n")
        console.file.flush()
        previous = current


def _show(console: Console, frame: RenderableType) -> None:
    """Print `frame`; as plain text without the spaces rich pads table lines with, off a terminal."""
    if console.is_terminal:
        console.print(frame)
        return
    with console.capture() as captured:
        console.print(frame)
    console.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
