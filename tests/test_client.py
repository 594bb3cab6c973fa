"""ChatClient against a scripted OpenAI-compatible server: retries, errors, concurrency and accounting."""

import asyncio
import socket
import time

import pytest
from fake_teacher import FakeTeacher, Response, completion, error, garbage, in_order, prompt_words, slow

from camelid.client import ChatClient, TeacherError
from camelid.errors import CamelidError

FAST = {"backoff": 0.001, "max_backoff": 0.01}  # retries without waiting, unless a test means to wait


def ask(client: ChatClient, n: int = 1, **params):
    """n chats of "question i" sent at once; their replies, in order. The client is closed afterwards."""
    async def run():
        async with client:
            return await asyncio.gather(*(client.chat([{"role": "user", "content": f"question {i}"}], **params)
                                          for i in range(n)))
    return asyncio.run(run())


def test_a_reply_and_the_request_it_answers(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeTeacher(in_order(completion("Paris is the capital.", "stop"))) as fake:
        client = ChatClient(fake.base_url + "/", "teacher-model", api_key="sk-test")  # a trailing slash is fine
        [reply] = ask(client, temperature=0.5, max_tokens=7, seed=3)
    assert (reply.text, reply.finish_reason, reply.completion_tokens, reply.has_usage) == (
        "Paris is the capital.", "stop", 4, True)
    assert reply.prompt_tokens == 2  # "question 0"
    assert fake.paths == ["/v1/chat/completions"]
    assert fake.requests == [{"model": "teacher-model", "messages": [{"role": "user", "content": "question 0"}],
                              "temperature": 0.5, "max_tokens": 7, "seed": 3}]
    assert fake.headers[0]["Authorization"] == "Bearer sk-test"


def test_api_key_from_the_environment_or_none(monkeypatch):
    with FakeTeacher(in_order(completion("ok"))) as fake:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
        ask(ChatClient(fake.base_url, "m"))
        monkeypatch.delenv("OPENAI_API_KEY")
        ask(ChatClient(fake.base_url, "m"))
    assert fake.headers[0]["Authorization"] == "Bearer sk-env"
    assert "Authorization" not in fake.headers[1]


def test_429_waits_as_long_as_retry_after_says():
    with FakeTeacher(in_order(error(429, "slow down", retry_after=0.5), completion("ok"))) as fake:
        client = ChatClient(fake.base_url, "m", **FAST | {"max_backoff": 5})
        start = time.monotonic()
        [reply] = ask(client)
        took = time.monotonic() - start
    assert reply.text == "ok" and len(fake.requests) == 2
    assert 0.5 <= took < 2.0  # Retry-After, not the 1 ms backoff
    assert (client.usage.requests, client.usage.retries, client.usage.failures) == (1, 1, 0)


def test_retry_after_is_capped_by_max_backoff():
    with FakeTeacher(in_order(error(429, retry_after=100), completion("ok"))) as fake:
        start = time.monotonic()
        [reply] = ask(ChatClient(fake.base_url, "m", backoff=0.001, max_backoff=0.05))
    assert reply.text == "ok" and time.monotonic() - start < 2.0


def test_server_errors_are_retried_until_a_reply():
    with FakeTeacher(in_order(error(500), error(503), error(502), completion("ok"))) as fake:
        client = ChatClient(fake.base_url, "m", retries=3, **FAST)
        [reply] = ask(client)
    assert reply.text == "ok" and len(fake.requests) == 4
    assert (client.usage.requests, client.usage.retries, client.usage.failures) == (1, 3, 0)


@pytest.mark.parametrize("bad", [garbage(), Response(200, {"object": "chat.completion"}),
                                 Response(200, b"null"), Response(200, {"choices": [{"message": {"content": 7}}]})])
def test_a_200_that_is_not_a_completion_is_retried(bad):
    with FakeTeacher(in_order(bad, completion("ok"))) as fake:
        client = ChatClient(fake.base_url, "m", **FAST)
        [reply] = ask(client)
    assert reply.text == "ok" and len(fake.requests) == 2 and client.usage.retries == 1


def test_a_200_that_is_never_a_completion_names_the_problem():
    with FakeTeacher(in_order(garbage())) as fake, pytest.raises(TeacherError) as caught:
        ask(ChatClient(fake.base_url, "m", retries=1, **FAST))
    assert str(caught.value) == (f"{fake.base_url}/chat/completions: HTTP 200 but not a chat completion (not JSON) "
                                 "after 2 tries; check that the URL is an OpenAI-compatible endpoint ending in /v1")


def test_401_raises_at_once_naming_the_fix():
    with FakeTeacher(in_order(error(401, "Incorrect API key provided"), completion("never"))) as fake:
        client = ChatClient(fake.base_url, "m", api_key="wrong", **FAST)
        with pytest.raises(TeacherError) as caught:
            ask(client)
    assert len(fake.requests) == 1
    assert str(caught.value) == (f"{fake.base_url}/chat/completions: HTTP 401 (Incorrect API key provided); "
                                 "check --api-key (or the OPENAI_API_KEY environment variable)")
    assert caught.value.retryable is False  # asking again cannot help: a run stops here even with --on-error skip
    assert (client.usage.requests, client.usage.retries, client.usage.failures) == (1, 0, 1)


@pytest.mark.parametrize("status, fix", [(400, "check the parameters"), (404, "ends in /v1"),
                                         (413, "shorten the prompt"), (422, "check the parameters")])
def test_other_client_errors_are_not_retried(status, fix):
    with FakeTeacher(in_order(error(status, "no such\nthing"), completion("never"))) as fake:
        with pytest.raises(TeacherError) as caught:
            ask(ChatClient(fake.base_url, "m", **FAST))
    assert len(fake.requests) == 1 and caught.value.retryable is False
    message = str(caught.value)
    assert f"HTTP {status} (no such thing)" in message and fix in message and "\n" not in message


@pytest.mark.parametrize("location, target, fix", [
    ("https://api.example.com/v1/chat/completions", "https://api.example.com/v1/chat/completions",
     "use https://api.example.com/v1 as the endpoint URL"),
    ("/openai/v1/chat/completions", "{host}/openai/v1/chat/completions", "use {host}/openai/v1 as the endpoint URL"),
    ("https://example.com/login", "https://example.com/login",
     "use that URL's base (the part before /chat/completions) as the endpoint URL"),
])
def test_a_redirect_names_where_to_and_is_not_followed(location, target, fix):
    with FakeTeacher(in_order(Response(307, b"", {"Location": location}), completion("never"))) as fake:
        with pytest.raises(TeacherError) as caught:
            ask(ChatClient(fake.base_url, "m", **FAST))
    host = fake.base_url.removesuffix("/v1")
    assert len(fake.requests) == 1 and caught.value.retryable is False
    assert str(caught.value) == (f"{fake.base_url}/chat/completions: HTTP 307, redirected to "
                                 f"{target.format(host=host)}; {fix.format(host=host)}")


def test_exhausted_retries_raise_with_the_last_problem():
    with FakeTeacher(in_order(error(429, "rate limited"))) as fake:
        client = ChatClient(fake.base_url, "m", retries=2, **FAST)
        with pytest.raises(TeacherError) as caught:
            ask(client)
    assert len(fake.requests) == 3
    assert str(caught.value) == (f"{fake.base_url}/chat/completions: HTTP 429 (rate limited) after 3 tries; "
                                 "lower --concurrency, or wait and run again")
    assert (client.usage.requests, client.usage.retries, client.usage.failures) == (1, 2, 1)
    assert isinstance(caught.value, CamelidError)  # the CLI prints it as one line
    assert caught.value.retryable is True  # it may pass: a run with --on-error skip goes on


def test_a_body_that_will_not_decode_is_retried_then_reported():
    not_gzip = Response(200, b"this is not gzip", {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    with FakeTeacher(in_order(not_gzip, completion("ok"))) as fake:
        [reply] = ask(ChatClient(fake.base_url, "m", **FAST))
    assert reply.text == "ok" and len(fake.requests) == 2
    with FakeTeacher(in_order(not_gzip)) as fake, pytest.raises(TeacherError) as caught:
        ask(ChatClient(fake.base_url, "m", retries=1, **FAST))
    message = str(caught.value)
    assert message.startswith(f"{fake.base_url}/chat/completions: request failed (DecodingError: ")
    assert message.endswith("after 2 tries; check the server and the URL") and caught.value.retryable is True


def test_a_timeout_is_retried_then_reported():
    with FakeTeacher(in_order(slow(completion("late"), 1.5), completion("ok"))) as fake:
        [reply] = ask(ChatClient(fake.base_url, "m", timeout=0.2, **FAST))
    assert reply.text == "ok" and len(fake.requests) == 2
    with FakeTeacher(in_order(slow(completion("late"), 1.5))) as fake, pytest.raises(TeacherError) as caught:
        ask(ChatClient(fake.base_url, "m", timeout=0.2, retries=1, **FAST))
    assert str(caught.value).endswith("no reply within 0.2 s after 2 tries; raise --timeout or lower --concurrency")


def test_a_dead_port_says_to_start_the_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(TeacherError) as caught:
        ask(ChatClient(f"http://127.0.0.1:{port}/v1", "m", retries=1, **FAST))
    message = str(caught.value)
    assert message.startswith(f"http://127.0.0.1:{port}/v1/chat/completions: cannot connect (")
    assert message.endswith("after 2 tries; is the server running? start it with `camelid serve`, or check the URL")


def test_no_more_than_concurrency_requests_in_flight():
    with FakeTeacher(lambda body, index: slow(completion(body["messages"][0]["content"]), 0.2)) as fake:
        client = ChatClient(fake.base_url, "m", concurrency=3)
        replies = ask(client, n=9)
    assert [r.text for r in replies] == [f"question {i}" for i in range(9)]
    assert fake.max_in_flight == 3  # never more, and the client did use all three


def test_usage_and_cost_sum_exactly():
    texts = ["one", "two words", "now three words", "and then four words", "five " * 5]
    with FakeTeacher(lambda body, index: completion(texts[index % 5] + " x" * index)) as fake:
        client = ChatClient(fake.base_url, "m", concurrency=2, price_in=0.15, price_out=0.6)
        replies = ask(client, n=12)
    completion_tokens = sum(len(texts[i % 5].split()) + i for i in range(12))
    prompt_tokens = sum(prompt_words(body) for body in fake.requests)
    assert sum(r.completion_tokens for r in replies) == completion_tokens
    usage = client.usage
    assert (usage.requests, usage.retries, usage.failures, usage.without_usage) == (12, 0, 0, 0)
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, completion_tokens) == (24, 99)
    assert usage.cost == (24 * 0.15 + 99 * 0.6) / 1e6


def test_a_reply_without_usage_counts_zero_tokens_and_is_noted():
    with FakeTeacher(in_order(completion("no usage here", usage=False), completion("a b"))) as fake:
        client = ChatClient(fake.base_url, "m", concurrency=1, price_out=1.0)
        first, second = ask(client, n=2)
    assert (first.has_usage, first.prompt_tokens, first.completion_tokens) == (False, 0, 0)
    assert second.has_usage and second.completion_tokens == 2
    assert (client.usage.without_usage, client.usage.completion_tokens, client.usage.cost) == (1, 2, 2 / 1e6)


def test_usage_since_a_snapshot():
    import dataclasses

    with FakeTeacher(in_order(completion("a b c"))) as fake:
        client = ChatClient(fake.base_url, "m", price_in=1.0, price_out=2.0)
        ask(client)
        before = dataclasses.replace(client.usage)
        ask(client, n=2)  # the client opens new connections after being closed, in a new event loop
    spent = client.usage.since(before)
    assert (spent.requests, spent.completion_tokens, spent.prompt_tokens) == (2, 6, 4)
    assert spent.cost == (4 * 1.0 + 6 * 2.0) / 1e6


@pytest.mark.parametrize("kwargs, message", [
    ({"concurrency": 0}, "--concurrency must be at least 1 (got 0)"),
    ({"retries": -1}, "--retries must be at least 0 (got -1)"),
    ({"timeout": 0}, "--timeout must be above 0 seconds (got 0)"),
    ({"price_in": -1.0}, "--price-in must be at least 0 (got -1.0)"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(CamelidError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
        ChatClient("http://127.0.0.1:1/v1", "m", **kwargs)
    with pytest.raises(CamelidError, match="must start with http:// or https://"):
        ChatClient("127.0.0.1:8000/v1", "m")
