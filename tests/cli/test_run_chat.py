"""The `camelid` command and its chat loop: output equal to the library's, user mistakes as one line, and a chat
in a real terminal.

The command runs as the installed console script in a subprocess, as a user runs it. Tiny random models with
SmolLM2's real tokenizer and chat template stand in wherever the test is not about the real model's answers.
"""

import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import camelid.chat
from helpers import CAMELID, run_camelid
from camelid.chat import run_chat
from camelid.checkpoint import LoadedModel, load_model, save_model
from camelid.config import ModelConfig
from camelid.generate import SamplingParams, generate
from camelid.model import Llama
from camelid.named_models import DEFAULT_MODEL

TINY_CONTEXT = 128
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # its template's default


def chatml(*turns: tuple[str, str]) -> str:
    """A conversation as SmolLM2's ChatML template renders it, ending where the assistant's answer begins."""
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns) + "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tiny_loaded(smollm2_gguf) -> LoadedModel:
    """A random 2-layer model with SmolLM2's tokenizer and chat template and a 128-token context."""
    from camelid.gguf_file import GGUFFile
    from camelid.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_gguf)
    config = ModelConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=TINY_CONTEXT, bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Llama(config)
        with torch.no_grad():  # weights spread wider than usual: varied text, clear-cut greedy choices
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.2)
    template = GGUFFile(smollm2_gguf).metadata["tokenizer.chat_template"]
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, chat_template=template, source=Path("tiny-random"))


# -- camelid models, camelid generate -------------------------------------------------------------------------


def test_models_lists_the_default_model_and_its_path(smollm2_gguf):
    result = run_camelid("models")
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].split()[0] == DEFAULT_MODEL
    assert lines[1].strip() == "instruction-tuned (chat); 98 MB; license: Apache-2.0"
    assert lines[2].strip() == str(smollm2_gguf)
    assert re.fullmatch(r"memory to load on the CPU: ~[\d.]+ GB float32, ~[\d.]+ GB f16, ~[\d.]+ GB int8, "
                        r"~[\d.]+ GB int4( \([\d.]+ GB available\))?", lines[3].strip()), lines[3]


def test_generate_prints_what_the_library_generates(tiny_loaded, tmp_path):
    """On a tiny model saved to disk: sampling flags reach the library unchanged (seeded, so comparable)."""
    directory = save_model(tiny_loaded, tmp_path / "tiny")
    flags = ["--temperature", "0.9", "--top-k", "50", "--top-p", "0.9", "--min-p", "0.02", "--seed", "7",
             "--repetition-penalty", "1.1", "-n", "12", "--device", "cpu", "--dtype", "float32"]
    result = run_camelid("generate", "-m", directory, "-p", "Once upon a time", *flags)
    assert result.returncode == 0, result.stderr
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, seed=7, repetition_penalty=1.1,
                            max_new_tokens=12)
    tok = tiny_loaded.tokenizer
    [expected] = generate(tiny_loaded.model, tok, [tok.encode("Once upon a time")], params)
    assert len(expected.token_ids) > 3
    assert result.stdout == expected.text + "\n"


def test_generate_with_a_system_prompt_sends_a_chat_through_the_template(tiny_loaded, tmp_path):
    """--system implies --chat: the prompt goes as a user message after the system message, rendered by the
    model's own template; --template picks a built-in one instead."""
    directory = save_model(tiny_loaded, tmp_path / "tiny")
    tok, params = tiny_loaded.tokenizer, SamplingParams(temperature=0, max_new_tokens=8)
    result = run_camelid("generate", "-m", directory, "-p", "Hi", "--system", "Be brief.", "-t", "0", "-n", "8")
    assert result.returncode == 0, result.stderr
    chat_ids = tok.encode(chatml(("system", "Be brief."), ("user", "Hi")), add_special=False)
    [expected] = generate(tiny_loaded.model, tok, [chat_ids], params)
    assert result.stdout == expected.text + "\n"

    result = run_camelid("generate", "-m", directory, "-p", "Hi", "--template", "vicuna_v1.1", "-t", "0", "-n", "8")
    assert result.returncode == 0, result.stderr
    vicuna = camelid.chat.chat_template_for(tiny_loaded, "vicuna_v1.1")
    prompt = vicuna.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    [expected] = generate(tiny_loaded.model, tok, [tok.encode(prompt, add_special=False)], params)
    assert result.stdout == expected.text + "\n"


@pytest.fixture(scope="module")
def smollm2_cli(smollm2_gguf):
    """Greedy 20-token completions printed by `camelid generate`, raw and --chat, and the library's own."""
    prompt = "What is the capital of France?"
    common = ["-m", smollm2_gguf, "-p", prompt, "--temperature", "0", "-n", "20", "--device", "cpu",
              "--dtype", "float32"]
    with ThreadPoolExecutor(2) as pool:  # the two commands run while the library loads the model here
        raw = pool.submit(run_camelid, "generate", *common)
        chat = pool.submit(run_camelid, "generate", *common, "--chat")
        loaded = load_model(smollm2_gguf, device="cpu", dtype="float32")
        tok, params = loaded.tokenizer, SamplingParams(temperature=0, max_new_tokens=20)
        chat_ids = tok.encode(chatml(("system", SMOLLM2_SYSTEM), ("user", prompt)), add_special=False)
        [lib_raw, lib_chat] = [generate(loaded.model, tok, [ids], params)[0] for ids in (tok.encode(prompt), chat_ids)]
        return SimpleNamespace(raw=raw.result(), chat=chat.result(), lib_raw=lib_raw, lib_chat=lib_chat)


@pytest.mark.slow
def test_generate_greedy_on_smollm2_equals_the_library(smollm2_cli):
    assert smollm2_cli.raw.returncode == 0, smollm2_cli.raw.stderr
    assert smollm2_cli.raw.stdout == smollm2_cli.lib_raw.text + "\n"


@pytest.mark.slow
def test_generate_chat_renders_the_models_template(smollm2_cli):
    assert smollm2_cli.chat.returncode == 0, smollm2_cli.chat.stderr
    assert smollm2_cli.chat.stdout == smollm2_cli.lib_chat.text + "\n"
    assert "Paris" in smollm2_cli.chat.stdout
    assert smollm2_cli.lib_chat.text != smollm2_cli.lib_raw.text  # the template made a difference


# -- user mistakes: one line on stderr, no traceback, non-zero exit ----------------------------------------------


@pytest.fixture(scope="module")
def mistakes(smollm2_gguf, tiny_loaded, tmp_path_factory):
    """Each bad invocation's result, with the regular expression its error line must match."""
    d = tmp_path_factory.mktemp("mistakes")
    with open(smollm2_gguf, "rb") as f:
        (d / "truncated.gguf").write_bytes(f.read(1 << 20))
    (d / "notes.gguf").write_text("these are my notes, not a model\n")
    tiny = save_model(tiny_loaded, d / "tiny")
    untemplated = save_model(LoadedModel(tiny_loaded.model, tiny_loaded.tokenizer, None, Path("x")), d / "bare")
    (d / "parent" / "occupied").mkdir(parents=True)
    (d / "parent" / "occupied" / "keep.txt").write_text("mine")
    gguf = smollm2_gguf
    cases = {
        "missing-file": (["generate", "-m", d / "absent.gguf", "-p", "hi"], r"absent\.gguf: no such file"),
        "truncated-gguf": (["generate", "-m", d / "truncated.gguf", "-p", "hi"], r"truncated\.gguf: .*truncated"),
        "not-a-gguf": (["generate", "-m", d / "notes.gguf", "-p", "hi"], r"notes\.gguf: not a GGUF file"),
        "unknown-name": (["generate", "-m", "llama-9000", "-p", "hi"],
                         rf"unknown model name 'llama-9000'.*{DEFAULT_MODEL}"),
        "negative-temperature": (["generate", "-m", gguf, "-p", "hi", "--temperature", "-1"],
                                 r"invalid temperature -1"),
        "top-p-above-one": (["generate", "-m", gguf, "-p", "hi", "--top-p", "1.5"], r"invalid top.p 1\.5"),
        "temperature-not-a-number": (["chat", "-m", gguf, "--temperature", "warm"],
                                     r"temperature: invalid float value: 'warm'"),
        "prompt-too-long": (["generate", "-m", tiny, "-p", "hello " * 200],
                            rf"prompt is \d+ tokens.*context is {TINY_CONTEXT}"),
        "no-chat-template": (["generate", "-m", untemplated, "-p", "hi", "--chat"], r"bare has no chat template"),
        "unknown-template": (["chat", "-m", tiny, "--template", "nope"], r"invalid choice: 'nope' \(choose from 'alpaca'"),
        "convert-onto-nonempty-dir": (["convert", tiny, d / "parent" / "occupied"], r"occupied already exists"),
    }
    with ThreadPoolExecutor(3) as pool:
        results = dict(zip(cases, pool.map(lambda args: run_camelid(*args), [a for a, _ in cases.values()])))
    return {name: (results[name], pattern) for name, (_, pattern) in cases.items()} | {"dir": d}


MISTAKES = ["missing-file", "truncated-gguf", "not-a-gguf", "unknown-name", "negative-temperature", "top-p-above-one",
            "temperature-not-a-number", "prompt-too-long", "no-chat-template", "unknown-template",
            "convert-onto-nonempty-dir"]


@pytest.mark.parametrize("case", MISTAKES)
def test_a_mistake_is_one_error_line(case, mistakes):
    result, pattern = mistakes[case]
    assert result.returncode not in (0, None)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("camelid: error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert result.stdout == ""


def test_convert_refusal_leaves_nothing_behind(mistakes):
    parent = mistakes["dir"] / "parent"
    assert sorted(p.name for p in parent.iterdir()) == ["occupied"]  # no half-written sibling
    assert [p.name for p in (parent / "occupied").iterdir()] == ["keep.txt"]
    assert (parent / "occupied" / "keep.txt").read_text() == "mine"


# -- the chat loop, scripted -----------------------------------------------------------------------------------


class Terminal:
    """Scripted read/write functions for run_chat: each line read in turn (an exception is raised), then EOF."""

    def __init__(self, *lines):
        self.lines, self.shown = list(lines), []

    def read(self, prompt: str) -> str:
        self.shown.append(prompt)
        if not self.lines:
            raise EOFError
        line = self.lines.pop(0)
        if isinstance(line, BaseException):
            raise line
        return line

    def write(self, text: str) -> None:
        self.shown.append(text)

    @property
    def screen(self) -> str:
        return "".join(self.shown)


@pytest.fixture
def turns(monkeypatch):
    """Every answer the chat loop streams: its prompt (as text) and the text it received."""
    seen = []
    real_stream = camelid.chat.stream

    def recording_stream(model, tokenizer, prompt, params):
        seen.append(SimpleNamespace(prompt=tokenizer.decode(prompt), answer=""))
        for piece in real_stream(model, tokenizer, prompt, params):
            seen[-1].answer += piece
            yield piece

    monkeypatch.setattr(camelid.chat, "stream", recording_stream)
    return seen


CHAT_PARAMS = SamplingParams(temperature=0, max_new_tokens=8)


def chat(loaded, *lines, **kw) -> Terminal:
    term = Terminal(*lines)
    run_chat(loaded, CHAT_PARAMS, read=term.read, write=term.write, **kw)
    return term


def test_chat_keeps_the_conversation(tiny_loaded, turns):
    term = chat(tiny_loaded, "What is 2+2?", "", "And 3+3?")
    first, second = turns
    assert first.answer and first.answer in term.screen
    assert first.prompt == chatml(("system", SMOLLM2_SYSTEM), ("user", "What is 2+2?"))
    assert second.prompt == chatml(
        ("system", SMOLLM2_SYSTEM), ("user", "What is 2+2?"), ("assistant", first.answer), ("user", "And 3+3?")
    )
    assert term.screen.count(">>> ") == 4  # three lines read, then end of input


def test_chat_commands_reset_and_set_the_system_prompt(tiny_loaded, turns):
    term = chat(
        tiny_loaded, "Hello", "/reset", "Hi again", "/system You are a pirate.", "Ahoy", "/system", "Plain again",
        "/help", "/nope", "/exit", "never read", system="Be brief.",
    )
    assert [t.prompt for t in turns] == [
        chatml(("system", "Be brief."), ("user", "Hello")),
        chatml(("system", "Be brief."), ("user", "Hi again")),  # /reset forgets the turns, keeps the system prompt
        chatml(("system", "You are a pirate."), ("user", "Ahoy")),
        chatml(("system", SMOLLM2_SYSTEM), ("user", "Plain again")),  # /system alone: back to the template's
    ]
    for shown in ["(conversation cleared)", "(system prompt set; conversation cleared)",
                  "(system prompt removed; conversation cleared)", "/reset", "unknown command /nope"]:
        assert shown in term.screen
    assert term.lines == ["never read"]


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(tiny_loaded, turns):
    calls = []

    def interrupt_fourth_step(module, inputs, output):
        calls.append(1)
        if len(calls) == 4:  # prefill, then the 2nd and 3rd decoding steps; the 4th is interrupted
            raise KeyboardInterrupt

    hook = tiny_loaded.model.lm_head.register_forward_hook(interrupt_fourth_step)
    try:
        term = chat(tiny_loaded, "Tell me a story", KeyboardInterrupt(), "Go on")
    finally:
        hook.remove()
    stopped, after = turns
    assert stopped.answer and f"{stopped.answer} [stopped]\n" in term.screen
    tok = tiny_loaded.tokenizer
    [whole] = generate(tiny_loaded.model, tok, [tok.encode(turns[0].prompt, add_special=False)], CHAT_PARAMS)
    assert len(whole.token_ids) > 3 and stopped.answer == tok.decode(whole.token_ids[:3])  # three steps made it
    assert "(use /exit or Ctrl-D to leave)" in term.screen  # Ctrl-C at the prompt
    assert after.prompt == chatml(
        ("system", SMOLLM2_SYSTEM), ("user", "Tell me a story"), ("assistant", stopped.answer), ("user", "Go on")
    )
    assert after.answer and term.screen.endswith(f"{after.answer}\n>>> \n")
    assert not torch.is_inference_mode_enabled()


def test_a_message_longer_than_the_context_is_refused_and_the_chat_goes_on(tiny_loaded, turns):
    term = chat(tiny_loaded, "words " * 300, "Short question")
    assert re.search(rf"error: .*too long.*context is {TINY_CONTEXT}", term.screen)
    [answered] = turns
    assert answered.prompt == chatml(("system", SMOLLM2_SYSTEM), ("user", "Short question"))


# -- a real terminal -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")
def test_chat_in_a_real_terminal(smollm2_gguf):
    """`camelid chat` with the default model in tmux: a question typed at the prompt is answered, /exit leaves."""
    tmux = ["tmux", "-L", f"camelid-test-{os.getpid()}", "-f", "/dev/null"]  # a private server

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", "chat"], capture_output=True, text=True).stdout

    def wait_for(condition, seconds: float) -> str:
        deadline = time.monotonic() + seconds
        while not condition(text := screen()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert condition(text), f"gave up waiting; the terminal shows:\n{text}"
        return text

    # the shell prints the exit status on the pane, which stays open after the program ends
    command = f"{CAMELID} chat --temperature 0 --device cpu; echo \"[exit status $?]\"; sleep 60"
    subprocess.run([*tmux, "new-session", "-d", "-x", "200", "-y", "50", "-s", "chat", command], check=True)
    try:
        wait_for(lambda s: s.rstrip().endswith(">>>"), 120)
        subprocess.run([*tmux, "send-keys", "-t", "chat", "What is the capital of France?", "Enter"], check=True)
        text = wait_for(lambda s: s.rstrip().endswith(">>>") and s.count(">>>") >= 2, 120)
        answer = text.split("What is the capital of France?", 1)[1]
        assert "Paris" in answer, text
        subprocess.run([*tmux, "send-keys", "-t", "chat", "/exit", "Enter"], check=True)
        text = wait_for(lambda s: "[exit status" in s, 30)
        assert "[exit status 0]" in text, text
        assert "Traceback" not in screen()
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def test_builtin_template_writes_bos_only_where_the_tokenizer_adds_one(smollm2_gguf):
    """SmolLM2 adds no BOS, so `--template vicuna_v1.1` must not start with its BOS text '<|im_start|>'."""
    from camelid.chat import chat_template_for
    from camelid.checkpoint import LoadedModel
    from camelid.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_gguf)
    assert not tokenizer.add_bos
    loaded = LoadedModel(model=None, tokenizer=tokenizer, chat_template=None, source=smollm2_gguf)
    for name in ("vicuna_v1.1", "koala_v1", "llama-2"):
        text = chat_template_for(loaded, name).render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
        assert not text.startswith(tokenizer.bos_token), (name, text)
    chatml = chat_template_for(loaded, "chatml").render([{"role": "user", "content": "Hi"}])
    assert chatml.startswith("<|im_start|>system") and not chatml.startswith(tokenizer.bos_token * 2)
    assert chat_template_for(loaded, "vicuna_v1.1").render([{"role": "user", "content": "Hi"}]).startswith("A chat")
