"""`node.embed` / `node.aembed`: embeddings through the router, like text (task `embed`).

    node.embed(["a text", "another"])                  # -> [[0.01, ...], [...]] (384 floats each)
    await node.aembed("one text", cache="no-cache")   # the reserved keyword arguments apply

One request per input text: its own request key and response CID, cached and shared like any
answer (a repeat is a cache hit with the same CID). The texts of one call run concurrently, so
those that reach the same provider together are computed in one forward pass
(node.providers.embed.Batcher); through the mesh each goes to the node the backend manager picks.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import aclosing
from functools import partial
from typing import Any

from node.errors import InvalidRequest
from node.requests import Request, Result, build_request

__all__ = ["EMBED_CONCURRENCY", "aembed", "aembed_results", "embed", "embed_requests"]

# Texts of one call sent to a daemon at once (the rest wait their turn): a node's default
# max_concurrent, so a long list neither overflows its queue nor its per-peer stream limits.
EMBED_CONCURRENCY = 64


def embed_requests(texts: str | Sequence[str], *, model_name: str | None, kwargs: dict[str, Any],
                   default_timeout: float) -> list[Request]:
    """One `embed` request per text. A `request_id` given becomes `ID:0`, `ID:1`, ... (one per text)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise InvalidRequest("embed needs at least one text")
    if not all(isinstance(text, str) for text in texts):
        raise InvalidRequest("embed takes a string or a list of strings")
    request_id = kwargs.get("request_id")
    return [build_request(text, model_name=model_name, task="embed", default_timeout=default_timeout,
                          kwargs={**kwargs, "request_id": f"{request_id}:{i}"} if request_id else kwargs)
            for i, text in enumerate(texts)]


async def aembed_results(texts: str | Sequence[str], *, model_name: str | None = None, provider: str | None = None,
                         deps: Any = None, **kwargs: Any) -> list[Result]:
    """Each text's `Result` (with `.embedding`, `.key`, `.cid`, `.cache`), in the order given."""
    import trio

    from node import router
    from node.deps import get_default_router_deps

    deps = deps if deps is not None else get_default_router_deps()
    requests = embed_requests(texts, model_name=model_name, kwargs=kwargs,
                              default_timeout=deps.current_settings().request_timeout)
    results: list[Result | None] = [None] * len(requests)
    errors: list[Exception] = []

    async def one(i: int, request: Request) -> None:
        try:
            async with aclosing(router.arun(request, provider=provider, deps=deps)) as items:
                async for item in items:
                    if isinstance(item, Result):
                        results[i] = item
        except Exception as exc:  # the first failure is raised below, once every text has ended
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for i, request in enumerate(requests):
            nursery.start_soon(one, i, request)
    if errors:
        raise errors[0]
    return [result for result in results if result is not None]


async def aembed(texts: str | Sequence[str], *, model_name: str | None = None, deps: Any = None,
                 **kwargs: Any) -> list[list[float]]:
    """The embedding of each text, in order (INTERFACES.md `aembed`)."""
    results = await aembed_results(texts, model_name=model_name, deps=deps, **kwargs)
    return [list(result.embedding or ()) for result in results]


def embed(texts: str | Sequence[str], *, model_name: str | None = None, deps: Any = None,
          **kwargs: Any) -> list[list[float]]:
    """`aembed` for synchronous code (its own trio loop; inside one, `await node.aembed`)."""
    import trio

    from node.router import _refuse_inside_trio

    _refuse_inside_trio("embed", "aembed")
    return trio.run(partial(aembed, texts, model_name=model_name, deps=deps, **kwargs))
