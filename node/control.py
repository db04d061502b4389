"""The control protocol's commands as a table: each name's handler, given a read-only view of the node.

`/accelmesh/control/1.0.0` (protocols/control/SPEC.md) carries one first frame: a `Command`,
answered here by the handler `COMMANDS` names for it with exactly one `Reply`; or an inference
`Request` (`accelmesh generate --data-dir`), handed to the inference server with the front
door's runner. A handler receives a `ControlContext` (values and callables the daemon wires
up, never the daemon) and the command's args, and returns the JSON object the CLI prints for
`--json` (INTERFACES.md); any failure it reports becomes the protocol's `failed` error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import trio

from node.cache.commands import CACHE_COMMANDS, run_cache_command
from node.errors import DaemonError
from node.mesh.adverts import accelerator_json, provider_json
from node.mesh.server import Runner, serve_inference
from protocols.codec import decode, encode
from protocols.control.messages import MAX_ERROR_MESSAGE_CHARS, MAX_FRAME_SIZE, Command, ErrorInfo, Reply
from protocols.framing import encode_frame
from protocols.inference.machine import LIMITS as INFER_LIMITS
from protocols.inference.machine import InferenceStream, Role
from protocols.inference.messages import Request

if TYPE_CHECKING:
    from node.admission import AdmissionStatistics
    from node.cache.store import LocalStore
    from node.deps import RouterStatistics
    from node.mesh.adverts import PeerEntry
    from node.mesh.streams import FramedStream, GuardStatistics
    from protocols.advert.messages import Advert

__all__ = ["COMMANDS", "AFTER_REPLY", "ControlContext", "Handler", "answer", "run_command", "serve_control",
           "status", "info", "peers", "stop"]

# A command's own failures, answered `failed`: DaemonError, or a ValueError for a malformed argument
# (a CID that does not parse). Anything else is a bug: the stream guard logs its traceback.
FAILURES = (DaemonError, ValueError)


@dataclass(frozen=True)
class ControlContext:
    """What the control commands may read and do: a few values and callables, never the daemon."""

    peer_id: str
    version: str  # the release, as daemon.json gives it
    pid: int
    drain_grace: float  # seconds in-flight work may finish after `stop`
    addrs: Callable[[], Sequence[str]]  # this node's full multiaddrs, loopback first
    state: Callable[[], str]  # starting, running, draining, stopped
    uptime: Callable[[], float]  # seconds since the daemon came up
    connections: Callable[[], int]  # open libp2p connections
    admission: Callable[[], AdmissionStatistics]
    streams: Callable[[], GuardStatistics]
    peer_entries: Callable[[], Sequence[PeerEntry]]  # the peer table, sorted by peer id
    peer_health: Callable[[str], Mapping[str, Any]]  # the backend manager's view of a peer (health, latency)
    balancing: Callable[[], Any]  # the backend manager's statistics() (node.mesh.manager.ManagerStatistics)
    advert: Callable[[], Advert | None]  # this node's current advert
    router: Callable[[], RouterStatistics]
    store: LocalStore  # the local store the cache commands work on
    request_stop: Callable[[], None]
    cluster: Callable[[], Mapping[str, Any] | None] = lambda: None  # the cluster cache's view (None: it is off)


# -- what each command answers (sync: they only read) ------------------------------------------


def status(context: ControlContext) -> dict[str, Any]:
    """`accelmesh status`: is the daemon up, and how busy it is."""
    admission = context.admission()
    return {
        "state": context.state(), "peer_id": context.peer_id, "pid": context.pid, "version": context.version,
        "uptime_s": round(context.uptime(), 3), "in_flight": admission.in_flight, "queued": admission.queued,
        "connections": context.connections(), "streams": context.streams().to_json(),
    }


def info(context: ControlContext) -> dict[str, Any]:
    """`accelmesh info --json`: this node, its advert's fields, and its router's counts since start."""
    advert, admission = context.advert(), context.admission()
    return {
        "peer_id": context.peer_id, "addrs": list(context.addrs()), "version": context.version,
        "providers": [provider_json(p) for p in advert.providers] if advert else [],
        "accelerators": [accelerator_json(a) for a in advert.accelerators] if advert else [],
        "capacity": admission.max_concurrent, "queue": admission.max_queue,
        "load": {"in_flight": admission.in_flight, "queued": admission.queued},
        "peers": len(context.peer_entries()),
        "stats": context.router().to_json(),
        "mesh": context.balancing().to_json(),
    }


def peers(context: ControlContext) -> dict[str, Any]:
    """`accelmesh peers --json`: every peer in the table (never this node, never a client)."""
    return {"peers": [{**entry.to_json(), **context.peer_health(entry.advert.peer_id)}
                      for entry in context.peer_entries()]}


def stop(context: ControlContext) -> dict[str, Any]:
    """`accelmesh stop`: what the drain will wait for (the stop itself follows the reply: AFTER_REPLY)."""
    return {"stopping": True, "in_flight": context.admission().in_flight, "drain_grace": context.drain_grace}


# -- the table ---------------------------------------------------------------------------------

Handler = Callable[[ControlContext, dict[str, Any]], Awaitable[Any]]  # (context, args) -> JSON result


def _report(fn: Callable[[ControlContext], Any]) -> Handler:
    async def handler(context: ControlContext, args: dict[str, Any]) -> Any:
        return fn(context)

    return handler


async def _cache(name: str, context: ControlContext, args: dict[str, Any]) -> Any:
    result = await trio.to_thread.run_sync(run_cache_command, context.store, name, args)  # sqlite blocks
    if name == "stats":
        result = {**result, "cluster": context.cluster()}  # records published, announcements pending, ...
    return result


COMMANDS: Mapping[str, Handler] = MappingProxyType({
    "status": _report(status),
    "info": _report(info),
    "peers": _report(peers),
    "stop": _report(stop),
    **{f"cache-{name}": partial(_cache, name) for name in CACHE_COMMANDS},
})
# Done once the reply is written: `stop` drains only after its caller has heard the answer.
AFTER_REPLY: Mapping[str, Callable[[ControlContext], None]] = MappingProxyType({
    "stop": lambda context: context.request_stop(),
})


async def run_command(context: ControlContext, name: str, args: dict[str, Any]) -> Any:
    """The JSON result of command `name`; raises one of FAILURES (`DaemonError` for an unknown name)."""
    handler = COMMANDS.get(name)
    if handler is None:
        raise DaemonError(f"unknown command {name!r}")
    return await handler(context, args)


async def answer(context: ControlContext, command: Command) -> Reply:
    """The one Reply to `command`: its result, or the `failed` error saying why (one line for stderr)."""
    try:
        return Reply(ok=True, result=await run_command(context, command.command, dict(command.args)))
    except FAILURES as exc:
        return Reply(ok=False, error=ErrorInfo(code="failed", message=str(exc)[:MAX_ERROR_MESSAGE_CHARS]))


async def serve_control(framed: FramedStream, peer: str, *, context: ControlContext, runner: Runner) -> None:
    """One control stream: a Command gets its Reply; an inference Request is served with `runner`."""
    frame = await framed.read_frame()
    if frame is None:
        return
    message = decode(frame, (Command, Request), INFER_LIMITS)  # a Request as the infer protocol bounds it
    if isinstance(message, Request):
        machine = InferenceStream(Role.SERVER, max_inbound_frame_size=framed.limits.max_frame_size)
        machine.receive_message(message)
        framed.decoder = machine
        await serve_inference(framed, machine, message, runner)
        return
    assert isinstance(message, Command)
    await framed.write(encode_frame(encode(await answer(context, message)), MAX_FRAME_SIZE))
    then = AFTER_REPLY.get(message.command)
    if then is not None:
        then(context)

