"""A scripted, deterministic stand-in for an OpenAI-compatible chat server, on a free port of 127.0.0.1.

    def respond(body: dict, index: int) -> Response:   # index: 0 for the first request received, 1 next...
        return completion("hello") if index else error(429, retry_after=0.1)

    with FakeTeacher(respond) as teacher:
        client = ChatClient(teacher.base_url, "m")       # base_url ends in /v1
        ...
    teacher.requests        # the JSON bodies received, in order of arrival
    teacher.max_in_flight   # the most requests it was answering at once

Any path answers (the server is a script, not a router); `teacher.paths` and `teacher.headers` record them.
"""

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


@dataclass
class Response:
    """What the fake sends back: a status, a body and headers, after `delay` seconds.

    A dict body is sent as JSON; where it has `usage` with `prompt_tokens` None, the words of the request's
    message contents are counted into it (and into `total_tokens`).
    """

    status: int = 200
    body: bytes | dict = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


def completion(text: str, finish_reason: str = "stop", *, usage: bool = True, delay: float = 0.0) -> Response:
    """A chat completion of `text`; its usage counts whitespace-separated words, of the request's messages and
    of `text`. `usage=False` leaves usage out, as some servers do."""
    body = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
    }
    if usage:
        body["usage"] = {"prompt_tokens": None, "completion_tokens": len(text.split()), "total_tokens": None}
    return Response(200, body, {"Content-Type": "application/json"}, delay)


def error(status: int, message: str = "", *, retry_after: str | float | None = None, delay: float = 0.0) -> Response:
    """An HTTP error in OpenAI's shape, optionally with a Retry-After header."""
    body = {"error": {"message": message or f"fake error {status}", "type": "fake_error", "param": None,
                      "code": None}}
    headers = {"Content-Type": "application/json"}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return Response(status, json.dumps(body).encode(), headers, delay)


def garbage(text: str = "<html>502 upstream hiccup</html>", *, status: int = 200, delay: float = 0.0) -> Response:
    """A body that is not JSON at all."""
    return Response(status, text.encode(), {"Content-Type": "text/html"}, delay)


def slow(response: Response, seconds: float) -> Response:
    """`response`, sent after `seconds` (to test timeouts and how many requests are in flight)."""
    return replace(response, delay=seconds)


def in_order(*responses: Response) -> Callable[[dict, int], Response]:
    """A script answering request i with `responses[i]`, and every request after the last with the last."""
    return lambda body, index: responses[min(index, len(responses) - 1)]


class FakeTeacher:
    """A threaded HTTP server answering each POST with `respond(body, index)`; a context manager."""

    def __init__(self, respond: Callable[[dict, int], Response]):
        self.respond = respond
        self.requests: list[dict] = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._server.block_on_close = False  # a handler still sleeping in a delay must not hold up the test
        self.port = self._server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _answer(self, path: str, headers: dict[str, str], raw: bytes) -> Response:
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"unparsed": raw.decode("utf-8", "replace")}
        with self._lock:
            index = len(self.requests)
            self.requests.append(body)
            self.paths.append(path)
            self.headers.append(headers)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = self.respond(body, index)
            if isinstance(response.body, dict):
                response = replace(response, body=json.dumps(_with_prompt_tokens(response.body, body)).encode())
            if response.delay:
                time.sleep(response.delay)
            return response
        except Exception as exc:  # a broken script is a 500 the test will see, not a hung request
            return error(500, f"the fake's script raised {type(exc).__name__}: {exc}")

    def _done(self) -> None:
        with self._lock:
            self.in_flight -= 1


def _handler_for(teacher: FakeTeacher) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                response = teacher._answer(self.path, dict(self.headers), raw)
                self.send_response(response.status)
                for key, value in response.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(response.body)))
                self.end_headers()
                self.wfile.write(response.body)
            except OSError:
                pass  # the client gave up (a timeout test); nothing to answer
            finally:
                teacher._done()

        def log_message(self, *args):
            pass

    return Handler


def prompt_words(request: dict) -> int:
    """The prompt tokens the fake reports for `request`: the words of all its message contents."""
    messages = request.get("messages") or []
    return sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))


def _with_prompt_tokens(body: dict, request: dict) -> dict:
    usage = body.get("usage")
    if isinstance(usage, dict) and usage.get("prompt_tokens") is None:
        prompt = prompt_words(request)
        usage = {**usage, "prompt_tokens": prompt, "total_tokens": prompt + usage.get("completion_tokens", 0)}
        body = {**body, "usage": usage}
    return body
