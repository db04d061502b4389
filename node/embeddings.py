"""`node.embed` / `node.aembed`: embeddings through the router, like text (task `embed`).

    node.embed(["a text", "another"])                  # -> [[0.01, ...], [...]] (384 floats each)
    await node.aembed("one text", cache="no-cache")   # the reserved keyword arguments apply

One request per input text: its own request key and response CID, cached and shared like any
answer (a repeat is a cache hit with the same CID). The texts of one call run concurrently, so
those that reach the same provider together are computed in one forward pass
(node.providers.embed.Batcher); through the mesh each goes to the node the backend manager picks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from functools import partial
from typing import Any, TypeVar

from node.errors import DaemonError, InvalidRequest
from node.requests import Request, Result, build_request

__all__ = ["EMBED_CONCURRENCY", "aembed", "aembed_results", "answer_all", "embed", "embed_requests"]

T = TypeVar("T")

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


async def answer_all(items: Sequence[T], answer: Callable[[T], AsyncIterator[Any]], *,
                     limit: int | None = None) -> list[Result]:
    """Each item's Result from `answer(item)` (text chunks are dropped), all at once, at most
    `limit` together; the first failure is raised once every item has ended."""
    import trio

    results: list[Result | None] = [None] * len(items)
    errors: list[Exception] = []
    limiter = trio.CapacityLimiter(limit or max(1, len(items)))

    async def one(i: int, item: T) -> None:
        try:
            async with limiter:
                if errors:  # one failed: the whole call fails, so the rest are not asked
                    return
                async with aclosing(answer(item)) as answers:
                    async for answered in answers:
                        if isinstance(answered, Result):
                            results[i] = answered
        except Exception as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for i, item in enumerate(items):
            nursery.start_soon(one, i, item)
    if errors:
        raise errors[0]
    if any(result is None for result in results):
        raise DaemonError("an input got no answer")  # (the router and the daemons always end with one)
    return [result for result in results if result is not None]


async def aembed_results(texts: str | Sequence[str], *, model_name: str | None = None, provider: str | None = None,
                         deps: Any = None, **kwargs: Any) -> list[Result]:
    """Each text's `Result` (with `.embedding`, `.key`, `.cid`, `.cache`), in the order given."""
    from node import router
    from node.deps import get_default_router_deps

    deps = deps if deps is not None else get_default_router_deps()
    requests = embed_requests(texts, model_name=model_name, kwargs=kwargs,
                              default_timeout=deps.current_settings().request_timeout)
    return await answer_all(requests, lambda request: router.arun(request, provider=provider, deps=deps))


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
