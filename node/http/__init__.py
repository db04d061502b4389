"""The OpenAI-compatible HTTP API (INTERFACES.md "HTTP"): an ASGI app over the daemon's front door,
served by Hypercorn's trio worker in the daemon's nursery. docs/api.md shows how to call it."""

from node.http.app import HttpApi
from node.http.auth import TOKEN_FILE, BearerAuth, is_loopback_host, write_token
from node.http.server import HttpListener, bind_http, parse_bind, serve_http

__all__ = ["TOKEN_FILE", "BearerAuth", "HttpApi", "HttpListener", "bind_http", "is_loopback_host", "parse_bind",
           "serve_http", "write_token"]
