"""The framework's ceiling for bench_http: Hypercorn's trio worker + Starlette, configured as the
daemon configures them (node.http.server), answering a constant, whole or as three SSE events.

    python -m tests.benchmarks.bare_asgi     # prints its URL on stdout, serves until killed
"""

from __future__ import annotations

import json
import sys

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from node.http.server import bind_http, serve_http

ANSWER = json.dumps({"id": "cmpl-0", "object": "text_completion", "created": 0, "model": "echo",
                     "choices": [{"index": 0, "text": "echo: bench", "finish_reason": "stop", "logprobs": None}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}).encode()
EVENTS = [b'data: {"choices":[{"index":0,"text":"echo:"}]}\n\n', b'data: {"choices":[{"index":0,"text":" bench"}]}\n\n',
          b"data: [DONE]\n\n"]


async def completions(request: Request) -> Response:
    body = json.loads(await request.body())
    if body.get("stream"):
        async def events():
            for event in EVENTS:
                yield event
        return StreamingResponse(events(), media_type="text/event-stream")
    return Response(ANSWER, media_type="application/json")


async def main() -> None:
    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    listener = bind_http("127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        url = await nursery.start(lambda task_status: serve_http(app, listener, task_status=task_status))
        print(url, flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        sys.exit(0)
