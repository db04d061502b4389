"""A real HTTP server on loopback that speaks the OpenAI chat-completions wire format.

Behaviour is chosen by the requested model name:

    any other name   a normal answer: "answer to: <last user message>" (JSON, or SSE word by word)
    auth             401 with an OpenAI-style error body
    missing          404        busy       429 with Retry-After: 7
    busy-date        429 with Retry-After: an HTTP date 30 s ahead
    busy-garbage     429 with Retry-After: not-a-date (neither seconds nor a date)
    broken           500        bad-request 400
    malformed        an SSE stream whose second event is not JSON
    truncated        an SSE stream that stops (connection closed) before finishing
    slow             waits `slow_seconds` before answering
    no-sse           answers a stream request with one JSON body

Every request is recorded (path, headers, JSON body) in `requests`.
"""

from __future__ import annotations

import email.utils
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOpenAIServer:
    def __init__(self, api_key: str | None = None, slow_seconds: float = 5.0) -> None:
        self.api_key = api_key
        self.slow_seconds = slow_seconds
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                try:
                    server.handle(self, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up (it stops reading a malformed stream)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- behaviour ---------------------------------------------------------------------

    def handle(self, h: BaseHTTPRequestHandler, body: Any) -> None:
        if h.path != "/v1/chat/completions" or not isinstance(body, dict):
            return self.json(h, 404, {"error": {"message": f"no route {h.path}"}})
        if self.api_key is not None and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self.json(h, 401, {"error": {"message": "Invalid API key", "code": 401}})
        model = body.get("model")
        errors = {"auth": (401, "Invalid API key"), "missing": (404, f"model {model} not found"),
                  "busy": (429, "rate limited"), "busy-date": (429, "rate limited"),
                  "busy-garbage": (429, "rate limited"), "broken": (500, "internal error"),
                  "bad-request": (400, "bad request")}
        retry_after = {"busy": "7", "busy-date": email.utils.formatdate(time.time() + 30, usegmt=True),
                       "busy-garbage": "not-a-date"}
        if model in errors:
            status, message = errors[model]
            return self.json(h, status, {"error": {"message": message}},
                             {"Retry-After": retry_after[model]} if model in retry_after else {})
        if model == "slow":
            time.sleep(self.slow_seconds)
        messages = body.get("messages") or [{}]
        user = [m for m in messages if m.get("role") == "user"] or [{}]
        text = f"answer to: {user[-1].get('content', '')}"
        usage = {"prompt_tokens": len(str(messages).split()), "completion_tokens": len(text.split()),
                 "total_tokens": 0}
        if not body.get("stream") or model == "no-sse":
            return self.json(h, 200, {
                "id": "cmpl-1", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
                "usage": usage,
            })
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.end_headers()
        words = text.split(" ")
        for i, word in enumerate(words):
            if model == "malformed" and i == 1:
                h.wfile.write(b"data: {this is not json\n\n")
                h.wfile.flush()
                continue
            if model == "truncated" and i == 2:
                return  # connection closes: no finish_reason, no [DONE]
            delta = {"content": word if i == 0 else " " + word}
            self.event(h, {"id": "c", "object": "chat.completion.chunk", "model": model,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        self.event(h, {"id": "c", "object": "chat.completion.chunk", "model": model,
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        self.event(h, {"id": "c", "object": "chat.completion.chunk", "model": model, "choices": [],
                       "usage": usage})
        h.wfile.write(b": a comment line, ignored\n\ndata: [DONE]\n\n")
        h.wfile.flush()

    @staticmethod
    def event(h: BaseHTTPRequestHandler, data: dict[str, Any]) -> None:
        h.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        h.wfile.flush()

    @staticmethod
    def json(h: BaseHTTPRequestHandler, status: int, data: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(data).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(payload)
