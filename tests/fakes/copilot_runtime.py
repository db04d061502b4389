"""A fake Copilot CLI runtime: just enough of the SDK's JSON-RPC protocol to answer one prompt.

Run as ``python copilot_runtime.py --scenario NAME --record DIR [SDK args]``; the SDK starts
it like the real CLI (``--headless --no-auto-update --log-level L --stdio``) and talks
LSP-style framed JSON-RPC 2.0 (``Content-Length: N\\r\\n\\r\\n{json}``) on stdin/stdout, or,
with ``--port P``, on one TCP connection at a time (it prints ``listening on port N``).

It implements what `github-copilot-sdk` 1.0.27 sends for one streamed turn:
``connect`` (protocol version 3), ``auth.getStatus``, ``session.create``,
``session.options.update``, ``session.send`` (then ``session.event`` notifications:
``assistant.message_delta`` ..., ``assistant.message``, ``assistant.usage``, ``session.idle``),
``session.abort``, ``session.delete``, ``session.detach`` and ``runtime.shutdown``.
Anything else gets JSON-RPC error -32601, and is recorded.

Scenarios: ``ok`` (answers ``copilot says: <prompt>`` word by word), ``no-deltas`` (only the
final message), ``hang`` (a delta every 50 ms until aborted or killed), ``deaf`` (like ``hang``, but
once the prompt is sent it answers no request and ignores end-of-input: only a kill stops it),
``logged-out`` (auth.getStatus says not authenticated), ``auth-error`` (session.error 401
with remediation sign_in), ``error`` (session.error "model exploded").

Recording, under DIR: ``pid`` (this process's id) and ``calls.jsonl`` (one line per request:
method and params), so tests can check what the SDK sent and that the process is gone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

PROTOCOL_VERSION = 3  # what copilot/_sdk_protocol_version.py in SDK 1.0.27 requires
DELTA_INTERVAL = 0.05  # seconds between streamed deltas: slow enough to observe ordering and cancel


class FakeRuntime:
    def __init__(self, reader: BinaryIO, writer: BinaryIO, scenario: str, record: Path) -> None:
        self.reader, self.writer, self.scenario, self.record = reader, writer, scenario, record
        self.write_lock = threading.Lock()
        self.aborted = threading.Event()
        self.deaf = False

    # -- framing -----------------------------------------------------------------------

    def read(self) -> dict[str, Any] | None:
        length = None
        while True:
            line = self.reader.readline()
            if not line:
                return None
            line = line.strip()
            if not line:
                break
            match = re.match(rb"Content-Length:\s*(\d+)", line, re.I)
            if match:
                length = int(match.group(1))
        if length is None:
            return None
        body = self.reader.read(length)
        return json.loads(body) if len(body) == length else None

    def write(self, message: dict[str, Any]) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode()
        with self.write_lock:
            self.writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
            self.writer.flush()

    def event(self, session_id: str, type_: str, data: dict[str, Any], **extra: Any) -> None:
        event = {
            "id": str(uuid.uuid4()),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "type": type_,
            "data": data,
            **extra,
        }
        self.write({"method": "session.event", "params": {"sessionId": session_id, "event": event}})

    # -- serving -----------------------------------------------------------------------

    def serve(self) -> None:
        while (message := self.read()) is not None:
            method, params, id_ = message.get("method"), message.get("params") or {}, message.get("id")
            if method is None or id_ is None:
                continue  # a response or a notification ($/cancelRequest): nothing to do
            with open(self.record / "calls.jsonl", "a") as f:
                f.write(json.dumps({"method": method, "params": params}) + "\n")
            if self.deaf:
                continue
            try:
                result = self.handle(method, params)
            except LookupError:
                self.write({"id": id_, "error": {"code": -32601, "message": f"Unhandled method {method}"}})
                continue
            self.write({"id": id_, "result": result})
            if method == "session.send":
                threading.Thread(target=self.turn, args=(params,), daemon=True).start()
                self.deaf = self.scenario == "deaf"
        while self.deaf:
            time.sleep(1)  # end of input changes nothing: like an orphaned native CLI

    def handle(self, method: str, params: dict[str, Any]) -> Any:
        if method == "connect":
            return {"ok": True, "protocolVersion": PROTOCOL_VERSION, "version": "0.0.0-fake"}
        if method == "auth.getStatus":
            if self.scenario == "logged-out":
                return {"isAuthenticated": False, "statusMessage": "No GitHub credentials found"}
            return {"isAuthenticated": True, "authType": "user", "login": "alice"}
        if method == "session.create":
            return {"sessionId": params["sessionId"], "workspacePath": None}
        if method == "session.options.update":
            return {"success": True}
        if method == "session.send":
            return {"messageId": str(uuid.uuid4())}
        if method == "session.abort":
            self.aborted.set()
            return {}
        if method in ("session.delete", "session.detach"):
            return {"success": True}
        if method == "runtime.shutdown":
            return {}
        raise LookupError(method)

    def turn(self, params: dict[str, Any]) -> None:
        sid, prompt = params["sessionId"], params["prompt"]
        message_id = str(uuid.uuid4())
        if self.scenario == "auth-error":
            data = {"errorType": "authentication", "message": "Bad credentials", "statusCode": 401}
            self.event(sid, "session.error", {**data, "remediation": "sign_in"})
            return
        if self.scenario == "error":
            self.event(sid, "session.error", {"errorType": "model_error", "message": "model exploded"})
            return
        answer = f"copilot says: {prompt}"
        words = re.findall(r"\s*\S+", answer)
        if self.scenario in ("hang", "deaf"):
            words = iter(lambda: " more", None)  # endless
        if self.scenario != "no-deltas":
            for word in words:
                if self.aborted.is_set():
                    self.event(sid, "session.idle", {"aborted": True})
                    return
                delta = {"deltaContent": word, "messageId": message_id}
                self.event(sid, "assistant.message_delta", delta, ephemeral=True)
                time.sleep(DELTA_INTERVAL)
        self.event(sid, "assistant.message", {"content": answer, "messageId": message_id, "model": "fake-model"})
        self.event(sid, "assistant.usage", {"model": "fake-model", "inputTokens": 7, "outputTokens": len(words)})
        self.event(sid, "session.idle", {})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", default="ok")
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--port", type=int, default=None)
    args, _sdk_args = parser.parse_known_args()
    args.record.mkdir(parents=True, exist_ok=True)
    (args.record / "pid").write_text(str(os.getpid()))
    if args.port is None:
        FakeRuntime(sys.stdin.buffer, sys.stdout.buffer, args.scenario, args.record).serve()
        return
    with socket.create_server(("127.0.0.1", args.port)) as server:
        print(f"listening on port {server.getsockname()[1]}", flush=True)
        while True:
            conn, _ = server.accept()
            with conn, conn.makefile("rb") as reader, conn.makefile("wb") as writer:
                FakeRuntime(reader, writer, args.scenario, args.record).serve()


if __name__ == "__main__":
    main()
