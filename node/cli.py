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
from collections.abc import Callable, Sequence
from typing import Any

from node import __version__

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


def _add_setting_options(parser: argparse.ArgumentParser, *, skip: frozenset[str] = frozenset()) -> None:
    """One flag per setting (the mapping rule: [section] key = --section-key)."""
    from node.config import iter_specs

    group = parser.add_argument_group("settings (docs/configuration.md; flags beat env beat the TOML file)")
    for spec in iter_specs():
        if spec.dotted in _GLOBAL_SETTINGS or spec.dotted in skip:
            continue
        dest = _SETTING_PREFIX + spec.dotted.replace(".", "__")
        help_text = f"{spec.doc} [{spec.env}]"
        if spec.kind == "bool":
            group.add_argument(spec.flag, dest=dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
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
                *, settings: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        _add_global_options(p, suppress=True)
        if settings:
            _add_setting_options(p)
        p.set_defaults(func=fn)
        return p

    g = command("generate", "generate text for a prompt (in-process, or through a running daemon)", cmd_generate)
    g.add_argument("prompt", metavar="PROMPT", help="the prompt; - reads it from stdin")
    g.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (default 0: greedy, cached)")
    g.add_argument("--max-tokens", type=int, metavar="N", help="maximum tokens to generate")
    g.add_argument("--stream", action="store_true", help="print chunks as they arrive")
    g.add_argument("--cache", dest="cache_mode", metavar="MODE",
                   choices=("default", "no-store", "no-cache", "only-if-cached", "force", "private"),
                   help="cache mode: default, no-store, no-cache, only-if-cached, force, private")
    g.add_argument("--no-cache", dest="cache_mode", action="store_const", const="no-cache",
                   help="skip cache lookups (same as --cache no-cache)")
    g.add_argument("--on", dest="on_peers", action="append", metavar="PEER_ID", default=[],
                   help="only these peers may serve (repeatable; needs the mesh)")
    g.add_argument("--accelerator", metavar="KIND", choices=("cuda", "rocm", "mps", "cpu"),
                   help="only peers with this accelerator may serve (needs the mesh)")
    g.add_argument("--json", action="store_true", help="print one JSON object (with --stream: JSON lines)")

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
    from node import router

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
    deps = _router_deps(args, settings)
    call = {"provider": settings.provider, "model_name": settings.model, "deps": deps, **kwargs}
    out = sys.stdout
    if args.stream:
        for item in router.iter_request_sync(prompt, **call):
            if isinstance(item, str):
                out.write(json.dumps({"delta": item}, ensure_ascii=False) + "\n" if args.json else item)
                out.flush()
            elif args.json:
                out.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
            else:
                out.write("\n")
        return EXIT_OK
    result = router.complete(prompt, **call)
    if args.json:
        out.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
    else:
        out.write(result.text + "\n")
    return EXIT_OK


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
    except AccelmeshError as exc:
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
