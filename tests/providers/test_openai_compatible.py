"""openai_compatible and openrouter against a real HTTP server on loopback."""

import pytest
import trio

import node
from node import RouterDeps
from node.config import load_settings
from node.errors import ModelNotFound, ProviderAuthError, ProviderFailed, ProviderTimeout, RateLimited
from node.providers.base import ProviderRequest
from node.providers.openai_compatible import (
    OpenAICompatibleProvider,
    OpenRouterProvider,
    SSEDecoder,
    normalise_base_url,
)
from tests.fakes.openai_server import FakeOpenAIServer


@pytest.fixture
def server():
    with FakeOpenAIServer(api_key="sk-test", slow_seconds=3.0) as srv:
        yield srv


@pytest.fixture
def provider(server):
    return OpenAICompatibleProvider(base_url=server.base_url, api_key="sk-test", default_model="gpt-test")


def req(prompt="hello world", model=None, **params):
    return ProviderRequest("generate", prompt, None, model, params=params, timeout=10.0)


def test_generate_sends_the_openai_wire_format(provider, server):
    completion = provider.complete_sync(req(max_tokens=5, stop=["x"], seed=3))
    assert completion.text == "answer to: hello world" and completion.model == "gpt-test"
    assert (completion.prompt_tokens, completion.completion_tokens) == (5, 4)
    sent = server.requests[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["headers"]["Authorization"] == "Bearer sk-test"
    assert sent["body"] == {"model": "gpt-test", "messages": [{"role": "user", "content": "hello world"}],
                            "stream": False, "temperature": 0.0, "max_tokens": 5, "stop": ["x"], "seed": 3}


async def test_streaming_yields_deltas_in_order_then_the_completion(provider, server):
    with trio.fail_after(10):
        items = [x async for x in provider.astream(req())]
    assert items[:-1] == ["answer", " to:", " hello", " world"]
    assert items[-1].text == "answer to: hello world" and items[-1].completion_tokens == 4
    assert server.requests[-1]["body"]["stream"] is True


async def test_chat_messages_are_sent_as_messages(provider, server):
    messages = ({"role": "system", "content": "s"}, {"role": "user", "content": "q"})
    with trio.fail_after(10):
        items = [x async for x in provider.astream(ProviderRequest("chat", None, messages, None, timeout=10))]
    assert items[-1].text == "answer to: q"
    assert server.requests[-1]["body"]["messages"] == [dict(m) for m in messages]


@pytest.mark.parametrize(
    "model,error,check",
    [
        ("auth", ProviderAuthError, lambda e: "401" in str(e) and not e.retryable),
        ("missing", ModelNotFound, lambda e: "404" in str(e)),
        ("busy", RateLimited, lambda e: e.retry_after == 7.0 and e.retryable),
        ("busy-date", RateLimited, lambda e: 25.0 <= e.retry_after <= 30.0 and e.retryable),
        ("busy-garbage", RateLimited, lambda e: e.retry_after is None and e.retryable and "429" in str(e)),
        ("broken", ProviderFailed, lambda e: "500" in str(e) and e.retryable),
        ("bad-request", ProviderFailed, lambda e: "400" in str(e) and not e.retryable),
    ],
)
async def test_http_errors_map_to_typed_errors(provider, model, error, check):
    with pytest.raises(error) as info:
        provider.complete_sync(req(model=model))
    assert check(info.value)
    with trio.fail_after(10), pytest.raises(error) as info:
        async for _ in provider.astream(req(model=model)):
            pass
    assert check(info.value)


async def test_wrong_api_key_is_an_auth_error(server):
    bad = OpenAICompatibleProvider(base_url=server.base_url, api_key="wrong", default_model="m")
    with pytest.raises(ProviderAuthError, match="check the API key"):
        bad.complete_sync(req())


@pytest.mark.parametrize("model,match", [("malformed", "malformed stream event"), ("truncated", "truncated")])
async def test_malformed_and_truncated_streams_fail_cleanly(provider, model, match):
    seen = []
    with trio.fail_after(10), pytest.raises(ProviderFailed, match=match) as info:
        async for item in provider.astream(req(model=model)):
            seen.append(item)
    assert info.value.retryable
    assert seen == ["answer"] or seen == ["answer", " to:"]


async def test_a_server_that_ignores_stream_true_still_works(provider):
    with trio.fail_after(10):
        items = [x async for x in provider.astream(req(model="no-sse"))]
    assert items[0] == "answer to: hello world" and items[-1].text == items[0]


def test_timeout_is_a_provider_timeout(provider):
    with pytest.raises(ProviderTimeout):
        provider.complete_sync(ProviderRequest("generate", "x", None, "slow", timeout=0.5))


def test_unreachable_server_is_a_retryable_failure():
    import socket

    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = OpenAICompatibleProvider(base_url=f"http://127.0.0.1:{port}/v1", default_model="m")
    with pytest.raises(ProviderFailed, match="cannot reach") as info:
        p.complete_sync(req())
    assert info.value.retryable


def test_readiness_says_what_to_configure():
    assert not OpenAICompatibleProvider().available().ok
    assert "base_url" in OpenAICompatibleProvider().available().reason
    assert "not an http" in OpenAICompatibleProvider(base_url="ftp://x").available().reason
    assert not OpenRouterProvider(base_url="https://openrouter.ai/api/v1").available().ok
    assert "OPENROUTER_API_KEY" in OpenRouterProvider().available().reason


def test_openrouter_reads_its_key_from_openrouter_api_key(server):
    settings = load_settings(env={"OPENROUTER_API_KEY": "sk-test",
                                  "ACCELMESH_PROVIDERS_OPENROUTER_BASE_URL": server.base_url})
    provider = OpenRouterProvider.from_settings(settings)
    assert provider.available().ok and provider.default_model() == "openrouter/auto"
    assert provider.complete_sync(req()).text == "answer to: hello world"
    assert server.requests[-1]["headers"]["X-Title"] == "accelmesh"


def test_both_names_are_listed_and_route_through_the_router(server):
    deps = RouterDeps(settings=load_settings(env={
        "ACCELMESH_PROVIDERS_OPENAI_COMPATIBLE_BASE_URL": server.base_url,
        "ACCELMESH_PROVIDERS_OPENAI_COMPATIBLE_API_KEY": "sk-test",
        "ACCELMESH_PROVIDERS_OPENAI_COMPATIBLE_DEFAULT_MODEL": "gpt-test",
    }))
    names = [i.name for i in node.describe_llm_providers(deps=deps)]
    assert "openai_compatible" in names and "openrouter" in names
    result = node.complete("hi", provider="openai_compatible", deps=deps)
    assert result.text == "answer to: hi" and result.model == f"openai_compatible/gpt-test@{server.base_url}"
    assert node.complete("hi", provider="openai_compatible", deps=deps).cache == "memory"


def test_sse_decoder_handles_split_lines_crlf_comments_and_multiline_data():
    d = SSEDecoder()
    assert d.feed("data: {\"a\"") == []
    assert d.feed(": 1}\r\n\r\n: comment\n\ndata: x\ndata: y\n") == ['{"a": 1}']
    assert d.feed("\n") == ["x\ny"]


def test_the_same_model_name_on_two_servers_never_shares_a_cached_answer():
    with FakeOpenAIServer(api_key="sk-test") as alice, FakeOpenAIServer(api_key="sk-test") as bob:
        deps = RouterDeps()  # one response cache for both
        for name, srv in (("alice_api", alice), ("bob_api", bob)):
            node.register_llm_provider(name, lambda srv=srv: OpenAICompatibleProvider(
                base_url=srv.base_url, api_key="sk-test", default_model="gpt-test"))
        first = node.complete("hi", provider="alice_api", deps=deps)
        second = node.complete("hi", provider="bob_api", deps=deps)
        assert first.key != second.key and (first.cache, second.cache) == ("miss", "miss")
        assert len(alice.requests) == 1 and len(bob.requests) == 1, "each server answered once"


@pytest.mark.parametrize(
    "url,expected",
    [
        ("https://API.Example.com:443/v1/", "https://api.example.com/v1"),
        ("http://127.0.0.1:80/v1", "http://127.0.0.1/v1"),
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("https://user:secret@host/v1?api-key=k#x", "https://host/v1"),
        ("http://[::1]:8000/v1", "http://[::1]:8000/v1"),
        ("", ""),
    ],
)
def test_base_url_in_the_model_identity_is_normalised_and_carries_no_secrets(url, expected):
    assert normalise_base_url(url) == expected
    provider = OpenAICompatibleProvider(base_url=url, default_model="m")
    assert provider.model_identity(None) == (f"openai_compatible/m@{expected}" if expected else "openai_compatible/m")
    assert provider.model_identity("other").startswith("openai_compatible/other")
