"""`camelid serve` before the server starts: model names, flags, and a real start-up answering over HTTP."""

import subprocess
import sys

import pytest
from helpers import serve_command

from camelid import native
from camelid.errors import CamelidError
from camelid.serve.server import parse_model_specs

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")


def test_models_are_named_by_flag_or_by_their_file():
    assert parse_model_specs(["smollm2-135m-instruct", "mine=runs/q/run/model", "/m/tiny-q8.gguf"]) == [
        ("smollm2-135m-instruct", "smollm2-135m-instruct"), ("mine", "runs/q/run/model"), ("tiny-q8", "/m/tiny-q8.gguf"),
    ]
    with pytest.raises(CamelidError, match="two models are served as 'a'; name them with NAME=MODEL"):
        parse_model_specs(["a=x", "a=y"])
    with pytest.raises(CamelidError, match="bad --model '=x'"):
        parse_model_specs(["=x"])


@pytest.mark.parametrize("flags, message", [
    (["--max-batch", "0"], "--max-batch must be at least 1, not 0"),
    (["--port", "-1"], "--port must be at least 0, not -1"),
    (["--max-body-bytes", "0"], "--max-body-bytes must be at least 1, not 0"),
    (["--prefill-chunk", "-1"], "--prefill-chunk must be at least 0, not -1"),
])
def test_bad_flags_are_one_line(flags, message):
    done = subprocess.run([sys.executable, "-m", "camelid", "serve", *flags], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stderr.strip() == f"camelid: error: {message}"


def test_a_missing_model_is_one_line_before_listening():
    done = subprocess.run([sys.executable, "-m", "camelid", "serve", "-m", "no/such/model"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "no/such/model" in done.stderr


def test_the_command_serves_a_model_and_honours_the_key_from_the_environment(tiny_chat_dir):
    args = ["-m", f"tiny={tiny_chat_dir}", "--max-batch", "2"]
    with serve_command(args, {"CAMELID_API_KEY": "k3y"}) as (server, url):
        assert httpx.get(f"{url}/v1/models").status_code == 401
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k3y"}).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
    assert f"serving tiny at {url}" in server.stderr.read()


@pytest.mark.skipif(native.compiler() is None, reason="int8 needs a C compiler")
def test_an_int8_model_serves_batched_requests_as_it_answers_each_alone(tiny_chat_dir):
    """The engine's worker thread drives the int8 kernels: rows decoded together in one batch (joining and
    finishing at different steps) get exactly the tokens each gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    openai = pytest.importorskip("openai")
    prompts = ["Hello there", "Name three camels, please", "Why?"]
    with serve_command(["-m", f"tiny={tiny_chat_dir}", "--quantize", "int8", "--max-batch", "4"]) as (_, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")

        def ask(i: int):
            reply = client.chat.completions.create(model="tiny", temperature=0, max_tokens=8 + 4 * i,
                                                   messages=[{"role": "user", "content": prompts[i]}])
            return reply.choices[0].message.content, reply.usage.completion_tokens

        alone = [ask(i) for i in range(len(prompts))]
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(ask, range(len(prompts))))
    assert together == alone
    assert all(tokens > 0 for _, tokens in alone)
