"""A daemon that lies, for system tests: `python -m tests.fakes.lying_daemon --lie MODE <accelmesh daemon args>`.

A genuine daemon (node.daemon.Daemon, with `accelmesh daemon`'s arguments and settings) with one
lie injected through a real interface:

- `--lie cid` models a node that corrupts its answers after hashing them (a rotting disk or
  cache, a buggy or hostile relay): every Result it sends, to its clients and to other nodes,
  carries the bytes of another answer (the honest text + " (tampered)") under the honest CID.
  Whoever hashes the bytes must refuse them (node.mesh.requesting) and ask another node.
  Injected by a FrontDoor whose runner rewrites each Result, which a Daemon subclass hands to
  the inference and control handlers (`Daemon._register_handlers`).
- `--lie text` models a node whose provider computes a wrong answer and hashes it honestly:
  `echo` answers "echo: <prompt> (forged)", its CID matches its bytes, its model identity is the
  honest echo's ("echo"), so only comparing the answers of several nodes catches it. Injected
  through the provider registry: `echo` is registered as `ForgedEcho`, then `accelmesh daemon`
  runs (node.cli.main) unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

from node import cli
from node.daemon import Daemon
from node.providers import registry
from node.providers.base import ProviderRequest
from node.providers.echo import EchoProvider
from node.serving import FrontDoor
from protocols.canonical import decode_response, response_bytes
from protocols.inference.messages import Request as WireRequest
from protocols.inference.messages import Result as WireResult

__all__ = ["LIES", "CIDLiar", "ForgedEcho", "TamperingFrontDoor", "command", "main", "tampered"]

LIES = ("cid", "text")


def command(lie: str) -> tuple[str, ...]:
    """The command line of a daemon lying about `lie`, less the daemon's arguments (run it with the
    repository root on PYTHONPATH, as tests/system/conftest.py's start_daemon does)."""
    return (sys.executable, "-m", "tests.fakes.lying_daemon", "--lie", lie)


def tampered(result: WireResult) -> WireResult:
    """`result` carrying the bytes of another answer (its text + " (tampered)") under its own CID."""
    body = decode_response(result.response)
    other = response_bytes(task=body["task"], model=body["model"], text=body.get("text", "") + " (tampered)",
                           finish_reason=body["finish_reason"], usage=body["usage"])
    return dataclasses.replace(result, response=other)


class TamperingFrontDoor(FrontDoor):
    """The daemon's own front door (the same admission, deps and state, shared), except that every
    Result its runners put on the wire is `tampered`."""

    def __init__(self, honest: FrontDoor) -> None:
        vars(self).update(vars(honest))

    def runner(self, entry: str) -> Any:
        honest = super().runner(entry)

        async def run_wire(message: WireRequest, caller: str) -> AsyncIterator[str | WireResult]:
            async with aclosing(honest(message, caller)) as items:
                async for item in items:
                    yield tampered(item) if isinstance(item, WireResult) else item

        return run_wire


class CIDLiar(Daemon):
    """A daemon whose inference and control handlers run requests through a TamperingFrontDoor."""

    def _register_handlers(self, host: Any, context: Any, front_door: FrontDoor) -> None:
        self.front_door = TamperingFrontDoor(front_door)  # `_infer` reads self.front_door
        super()._register_handlers(host, context, self.front_door)


class ForgedEcho(EchoProvider):
    """`echo`, same name, model and model identity, answering "echo: <prompt> (forged)"."""

    def answer_text(self, request: ProviderRequest) -> str:
        return super().answer_text(request) + " (forged)"


def run_daemon(daemon_class: type[Daemon], argv: Sequence[str]) -> int:
    """`accelmesh daemon ARGV` with `daemon_class` for Daemon: the CLI's parser, settings and signals."""
    from node.config import load_settings
    from node.logs import configure_logging

    args = cli.build_parser().parse_args(["daemon", *argv])
    settings = load_settings(config=getattr(args, "config", None), flags=cli._setting_flags(args))
    configure_logging("info", settings.log_format)
    return cli.serve_daemon(daemon_class(settings))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.lying_daemon", allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lie", choices=LIES, required=True, help="what this daemon lies about")
    lie, daemon_args = parser.parse_known_args(argv)
    if lie.lie == "text":
        registry.register("echo", ForgedEcho)
        return cli.main(["daemon", *daemon_args])
    return run_daemon(CIDLiar, daemon_args)


if __name__ == "__main__":
    sys.exit(main())
