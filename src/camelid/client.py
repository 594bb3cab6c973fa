"""A client for any OpenAI-compatible chat endpoint: a teacher that writes data, or a judge that grades answers.

`ChatClient.chat` sends one chat completion request and returns its text. At most `concurrency` requests are in
flight at once; a request that fails for a reason that may pass (429, 5xx, a dropped connection, a timeout, a
200 whose body is not a completion) is retried with exponential backoff, honouring the server's `Retry-After`.
A failure that will not pass (a bad key, an unknown model, a redirect) or one that outlasts the retries raises
`TeacherError`, one line naming the endpoint, what went wrong and what to do; its `retryable` says which of the
two it was. `client.usage` counts requests, retries, failures, tokens and their cost as requests complete.
"""

import asyncio
import json
import os
import random
from dataclasses import dataclass, fields
from typing import Any, NamedTuple, Self

import httpx

from camelid.errors import CamelidError

RETRYABLE_STATUS = {408, 409, 429}  # and every 5xx; the openai client retries the same


class TeacherError(CamelidError):
    """The model endpoint (a teacher or a judge) could not give a completion.

    `retryable` is True when the failure may pass (a 429, a 5xx, a dropped connection: the retries ran out) and
    False when asking again cannot help (a bad key, an unknown model or URL, a refused request).
    """

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class Reply:
    """One completion: its text, why it ended ("stop", "length"...) and the tokens the server counted."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    has_usage: bool = True  # False when the server reported no `usage`; the token counts are then 0


@dataclass
class Usage:
    """What a client has spent so far. Prices are dollars per million prompt and completion tokens."""

    requests: int = 0  # chat() calls that ended, with a reply or with TeacherError
    retries: int = 0  # attempts beyond each request's first
    failures: int = 0  # requests that ended with TeacherError
    prompt_tokens: int = 0
    completion_tokens: int = 0
    without_usage: int = 0  # replies whose server reported no token counts (counted as 0)
    price_in: float = 0.0
    price_out: float = 0.0

    @property
    def cost(self) -> float:
        """Dollars spent, from the token totals (not summed per request, so it is exact for the totals)."""
        return (self.prompt_tokens * self.price_in + self.completion_tokens * self.price_out) / 1e6

    def since(self, before: "Usage") -> "Usage":
        """What was spent after the snapshot `before` (taken with `dataclasses.replace(client.usage)`)."""
        counts = {f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self) if f.type is int}
        return Usage(**counts, price_in=self.price_in, price_out=self.price_out)


class _Problem(NamedTuple):
    """Why one attempt failed, what the user can do about it, and whether trying again may help."""

    what: str
    fix: str
    retry: bool
    retry_after: float | None = None


class ChatClient:
    """Chat completions from `{base_url}/chat/completions`, e.g. base_url "http://127.0.0.1:8000/v1".

    `api_key` falls back to the environment's OPENAI_API_KEY; without either no Authorization is sent.
    `retries` is how many times a failed request is tried again; the wait before retry k is `backoff * 2**(k-1)`
    seconds with jitter, at most `max_backoff`, or the server's Retry-After (also at most `max_backoff`). The
    concurrency slot is held through the waits, so a rate-limited server sees fewer requests, not more.

    Use one event loop at a time: `aclose()` (or leaving `async with`) closes the connections, and the client
    opens new ones on its next request, in whichever loop that runs.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, concurrency: int = 4,
                 retries: int = 5, timeout: float = 120.0, backoff: float = 1.0, max_backoff: float = 30.0,
                 price_in: float = 0.0, price_out: float = 0.0):
        if not base_url.startswith(("http://", "https://")):
            raise CamelidError(f"endpoint URL {base_url!r} must start with http:// or https://, "
                               "e.g. http://127.0.0.1:8000/v1")
        for name, value, least in (("--concurrency", concurrency, 1), ("--retries", retries, 0)):
            if value < least:
                raise CamelidError(f"{name} must be at least {least} (got {value})")
        if not timeout > 0:
            raise CamelidError(f"--timeout must be above 0 seconds (got {timeout})")
        for name, value in (("--backoff", backoff), ("--max-backoff", max_backoff), ("--price-in", price_in),
                            ("--price-out", price_out)):
            if not value >= 0:
                raise CamelidError(f"{name} must be at least 0 (got {value})")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.concurrency, self.retries, self.timeout = concurrency, retries, timeout
        self.backoff, self.max_backoff = backoff, max_backoff
        self.usage = Usage(price_in=price_in, price_out=price_out)
        self._random = random.Random()  # jitter only; never the caller's random state
        self._http: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            http, self._http, self._slots = self._http, None, None
            await http.aclose()

    async def chat(self, messages: list[dict], **params: Any) -> Reply:
        """One completion of `messages`; `params` (temperature, max_tokens, stop, seed...) go into the body."""
        if self._http is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._http = httpx.AsyncClient(headers=headers, timeout=self.timeout)
            self._slots = asyncio.Semaphore(self.concurrency)
        http, body = self._http, {"model": self.model, "messages": messages, **params}
        async with self._slots:
            tries = 0
            while True:
                tries += 1
                try:
                    response = await http.post(self.url, json=body)
                    reply, problem = _read_response(response)
                except httpx.TimeoutException:
                    reply, problem = None, _Problem(f"no reply within {self.timeout:g} s",
                                                    "raise --timeout or lower --concurrency", retry=True)
                except httpx.ConnectError as exc:
                    reply, problem = None, _Problem(
                        f"cannot connect ({_one_line(str(exc)) or type(exc).__name__})",
                        "is the server running? start it with `camelid serve`, or check the URL", retry=True)
                except httpx.RequestError as exc:  # a dropped connection, a body that will not decode...
                    reply, problem = None, _Problem(f"request failed ({type(exc).__name__}: {_one_line(str(exc))})",
                                                    "check the server and the URL", retry=True)
                if reply is not None:
                    self._count(reply)
                    return reply
                if not problem.retry or tries > self.retries:
                    self.usage.requests += 1
                    self.usage.failures += 1
                    after = f" after {tries} tries" if tries > 1 else ""
                    raise TeacherError(f"{self.url}: {problem.what}{after}; {problem.fix}", retryable=problem.retry)
                self.usage.retries += 1
                await asyncio.sleep(self._wait(tries, problem.retry_after))

    def _wait(self, tries: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        return min(self.backoff * 2 ** (tries - 1), self.max_backoff) * self._random.uniform(0.5, 1.0)

    def _count(self, reply: Reply) -> None:
        self.usage.requests += 1
        self.usage.prompt_tokens += reply.prompt_tokens
        self.usage.completion_tokens += reply.completion_tokens
        self.usage.without_usage += not reply.has_usage


def _read_response(response: httpx.Response) -> tuple[Reply | None, _Problem | None]:
    """The reply in a response, or why there is none."""
    status = response.status_code
    if status == 200:
        try:
            body = response.json()
        except ValueError:
            body = None
        if (reply := _reply(body)) is not None:
            return reply, None
        why = "not JSON" if body is None else "no choices[0].message.content"
        return None, _Problem(f"HTTP 200 but not a chat completion ({why})",
                              "check that the URL is an OpenAI-compatible endpoint ending in /v1", retry=True)
    what = f"HTTP {status}" + (f" ({message})" if (message := _error_message(response)) else "")
    if status == 429:
        return None, _Problem(what, "lower --concurrency, or wait and run again", True, _retry_after(response))
    if status >= 500 or status in RETRYABLE_STATUS:
        return None, _Problem(what, "the server failed; see its log", True, _retry_after(response))
    if status in (401, 403):
        return None, _Problem(what, "check --api-key (or the OPENAI_API_KEY environment variable)", retry=False)
    if status == 404:
        return None, _Problem(what, "check that the URL ends in /v1 and that the server has the model", retry=False)
    if status == 413:
        return None, _Problem(what, "the request is too large for the server; shorten the prompt", retry=False)
    if 300 <= status < 400:
        return None, _redirected(response)
    return None, _Problem(what, "the server refused the request; check the parameters", retry=False)


def _redirected(response: httpx.Response) -> _Problem:
    """A redirect, which is not followed: a POST may not survive it, and the user should fix the URL once."""
    location = response.headers.get("location")
    if not location:
        return _Problem(f"HTTP {response.status_code} (a redirect without a Location)", "check the URL", retry=False)
    target = str(response.request.url.join(location))
    endpoint = target.removesuffix("/chat/completions")
    fix = (f"use {endpoint} as the endpoint URL" if endpoint != target else
           "use that URL's base (the part before /chat/completions) as the endpoint URL")
    return _Problem(f"HTTP {response.status_code}, redirected to {target}", fix, retry=False)


def _reply(body: Any) -> Reply | None:
    """A chat completion body as a Reply, or None when it is not one."""
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"]
    except (LookupError, TypeError):
        return None
    if text is None:
        text = ""  # a completion with no text, e.g. only a refusal or a tool call
    if not isinstance(text, str) or not isinstance(choice, dict):
        return None
    finish_reason = choice.get("finish_reason")
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return Reply(text, finish_reason, 0, 0, has_usage=False)
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not (isinstance(prompt, int) and isinstance(completion, int)):
        return Reply(text, finish_reason, 0, 0, has_usage=False)
    return Reply(text, finish_reason, prompt, completion)


def _error_message(response: httpx.Response) -> str:
    """The server's own words about an error: OpenAI's `error.message`, FastAPI's `detail`, or the text."""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        return _one_line(response.text)
    if isinstance(body, dict):
        error = body.get("error", body.get("detail"))
        if isinstance(error, dict):
            error = error.get("message")
        if isinstance(error, str):
            return _one_line(error)
    return _one_line(json.dumps(body))


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds; the HTTP-date form is not used by the API servers this talks to."""
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
