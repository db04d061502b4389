"""`accelmesh cache stats|ls|get|rm|verify`: operations on the local store, shaped as JSON."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

from node.cache.store import LocalStore
from node.errors import DaemonError
from protocols.canonical import decode_response
from protocols.errors import MalformedMessage

__all__ = ["run_cache_command", "CACHE_COMMANDS"]

CACHE_COMMANDS = ("stats", "ls", "get", "rm", "verify")


def _cid(args: dict[str, Any]) -> str:
    cid = args.get("cid")
    if not isinstance(cid, str) or not cid:
        raise DaemonError("this cache command needs a CID")
    return cid


def run_cache_command(store: LocalStore, name: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run one cache command on `store` (blocking: sqlite) and return its JSON result."""
    if name == "stats":
        return dataclasses.asdict(store.statistics())
    if name == "ls":
        limit = args.get("limit")
        blocks = store.list(int(limit) if isinstance(limit, int) else None)
        return {"blocks": [dataclasses.asdict(b) for b in blocks]}
    if name == "get":
        cid = _cid(args)
        data = store.get_block(cid)
        if data is None:
            raise DaemonError(f"{cid} is not in the local store")
        try:
            response: Any = decode_response(data, trusted=True)
        except MalformedMessage:
            response = None
        return {"cid": cid, "size": len(data), "response": response,
                "bytes_base64": base64.b64encode(data).decode()}
    if name == "rm":
        cid = _cid(args)
        return {"cid": cid, "removed": store.delete(cid)}
    if name == "verify":
        report = store.verify()
        return {"checked": report.checked, "corrupt": list(report.corrupt)}
    raise DaemonError(f"unknown cache command {name!r}; expected one of {', '.join(CACHE_COMMANDS)}")
