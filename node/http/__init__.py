"""The OpenAI-compatible HTTP API (INTERFACES.md "HTTP") and its client.

    node.http.app     the ASGI app over the daemon's front door (Starlette)
    node.http.server  Hypercorn's trio worker in the daemon's nursery
    node.http.auth    bearer tokens, http.token
    node.http.client  node.connect(http_url=...) and the CLI: no libp2p, no server stack
    node.http._openai OpenAI's shapes and ours, both ways (pure)

This package imports nothing itself, so the client does not pull in the server. docs/api.md
shows how to call the API.
"""
