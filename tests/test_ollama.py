"""`camelid export ollama`: the Modelfile's TEMPLATE, run by Go's own text/template (Debian's `golang`; skipped
where Go is absent) as Ollama runs it, writes exactly the prompt camelid's chat template renders, for SmolLM2's
template, every built-in and templates with tools; its stops cover every end-of-turn token; what cannot be
translated is said, not guessed.
"""

import json
import shutil
import subprocess

import pytest
from helpers import run_camelid

from camelid.chat_template import BUILTIN_TEMPLATES, ChatTemplate
from camelid.errors import CamelidError
from camelid.ollama import CHECK_CONVERSATIONS, GGUF_NAME, MODELFILE, export_ollama, modelfile, turn_layout

# Executes a TEMPLATE as Ollama's template.Execute does for a chat: `.Messages` (Role, Content) and `.System`.
GO_PROGRAM = """\
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Job struct {
	Template string                `json:"template"`
	Cases    [][]map[string]string `json:"cases"`
}

func main() {
	var jobs []Job
	if err := json.NewDecoder(os.Stdin).Decode(&jobs); err != nil {
		panic(err)
	}
	var out [][]string
	for _, job := range jobs {
		tmpl := template.Must(template.New("t").Parse(job.Template))
		var rendered []string
		for _, messages := range job.Cases {
			var system []string
			for _, m := range messages {
				if m["Role"] == "system" {
					system = append(system, m["Content"])
				}
			}
			var b strings.Builder
			data := map[string]any{"Messages": messages, "System": strings.Join(system, "\\n\\n")}
			if err := tmpl.Execute(&b, data); err != nil {
				panic(err)
			}
			rendered = append(rendered, b.String())
		}
		out = append(out, rendered)
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def go_render(tmp_path, jobs: list[tuple[str, list[list[dict]]]]) -> list[list[str]]:
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (Debian: apt-get install golang-go)")
    program = tmp_path / "render.go"
    program.write_text(GO_PROGRAM)
    payload = [{"template": t, "cases": [[{"Role": m["role"], "Content": m["content"]} for m in case]
                                         for case in cases]} for t, cases in jobs]
    env = {"HOME": str(tmp_path), "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"),
           "PATH": "/usr/bin:/bin", "GO111MODULE": "off"}
    done = subprocess.run([go, "run", str(program)], input=json.dumps(payload), capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def as_ollama_sends(messages: list[dict], system: str | None) -> list[dict]:
    """The messages Ollama's chat handler renders: the Modelfile's SYSTEM first where the chat has no system
    message."""
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return messages


@pytest.fixture(scope="module")
def chats(sharegpt_conversations) -> list[list[dict]]:
    """Real multi-turn chats ending with a user turn, with and without a system message. Ollama sends a message's
    content as written; camelid's Gemma and Llama 3 templates trim it, so the contents here are trimmed."""
    out = [list(c) for c in CHECK_CONVERSATIONS]
    for conversation in sharegpt_conversations[:30]:
        turns = [{"role": m["role"], "content": m["content"].strip()} for m in conversation]
        turns = turns[: len(turns) - (turns[-1]["role"] == "assistant")]
        if turns and all(t["content"] for t in turns):
            out += [turns, [{"role": "system", "content": "Answer briefly."}, *turns]]
    return out


def templates(family_tok, smollm2_tokenizer_and_template) -> dict[str, ChatTemplate]:
    """SmolLM2's own template and every built-in, with the special tokens of the families' formats."""
    found = {"smollm2": smollm2_tokenizer_and_template[1]}
    for name in BUILTIN_TEMPLATES:
        found[name] = ChatTemplate.named(name, bos_token=family_tok.bos_token, eos_token=family_tok.eos_token)
    return found


def test_go_renders_the_modelfile_template_as_camelid_renders_the_chat(
        family_tok, smollm2_tokenizer_and_template, chats, tmp_path):
    jobs, expected = [], []
    for name, template in templates(family_tok, smollm2_tokenizer_and_template).items():
        layout = turn_layout(template)
        assert layout is not None, name
        jobs.append((layout.go_template(), [as_ollama_sends(c, layout.default_system) for c in chats]))
        expected.append([template.render(c, add_generation_prompt=True) for c in chats])
    rendered = go_render(tmp_path, jobs)
    for (name, _), ours, theirs in zip(templates(family_tok, smollm2_tokenizer_and_template).items(), expected,
                                       rendered):
        for i, (want, got) in enumerate(zip(ours, theirs)):
            assert got == want, (name, i)
    print(f"\n{len(jobs)} templates x {len(chats)} chats: Go's text/template wrote camelid's prompt every time")


EXPECTED_STOPS = {"smollm2": ["<|im_end|>"], "chatml": ["<|im_end|>"], "qwen": ["<|im_end|>"],
                  "gemma": ["<end_of_turn>"], "llama-3": ["<|eot_id|>"], "phi-3": ["<|end|>"],
                  # the FastChat formats end a reply with the model's EOS, which is SmolLM2's <|im_end|>
                  "alpaca": ["<|im_end|>"], "vicuna_v1.1": ["<|im_end|>"], "koala_v1": ["<|im_end|>"],
                  "llama-2": ["<|im_end|>"]}
DEFAULT_SYSTEMS = {"smollm2": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                   "chatml": "You are a helpful assistant.",
                   "qwen": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."}


@pytest.mark.parametrize("name", list(EXPECTED_STOPS))
def test_the_modelfile_stops_at_every_end_of_turn_and_keeps_the_default_system(
        name, family_tok, smollm2_tokenizer_and_template):
    template = templates(family_tok, smollm2_tokenizer_and_template)[name]
    text, missing = modelfile(template, family_tok, source=name, sampling={"temperature": 0.8, "top_k": 40})
    lines = text.splitlines()
    assert lines[1] == f"FROM ./{GGUF_NAME}" and any(line.startswith('TEMPLATE """') for line in lines)
    stops = [json.loads(line.removeprefix("PARAMETER stop ")) for line in lines if line.startswith("PARAMETER stop ")]
    assert stops == EXPECTED_STOPS[name]
    # every end-of-turn token a reply is followed by is a stop
    reply = template.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "REPLY"}])
    after = reply.split("REPLY", 1)[1]
    assert any(after.lstrip().startswith(stop) for stop in stops), (name, after)
    system = [line for line in text.split("\n") if line.startswith('SYSTEM """')]
    if name in DEFAULT_SYSTEMS or name in ("alpaca", "vicuna_v1.1", "koala_v1"):
        assert len(system) == 1
    else:
        assert system == []
    if name in DEFAULT_SYSTEMS:
        assert system[0] == f'SYSTEM """{DEFAULT_SYSTEMS[name]}"""'
    assert "PARAMETER temperature 0.8" in lines and "PARAMETER top_k 40" in lines
    assert missing == []


def test_a_template_that_is_not_a_layout_of_turns_gets_no_template_but_a_note(family_tok):
    # Qwen3-style: earlier assistant turns are rewritten (their reasoning dropped), so no fixed layout writes them
    rewriting = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and not loop.last %}"
                 "{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    only_last = "{{ messages[-1].content }}"
    for source in (only_last, "{{ messages[0].content | upper }}"):
        text, missing = modelfile(ChatTemplate(source), family_tok, source="x", sampling={})
        assert "TEMPLATE" not in text and len(missing) == 1 and "not a fixed layout of turns" in missing[0]
        assert "PARAMETER stop" in text  # the vocabulary's end tokens still
    assert turn_layout(ChatTemplate(rewriting)) is not None  # content without </think> renders as written


def test_tools_are_named_as_not_translated(family_tok):
    source = ("{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
              "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    text, missing = modelfile(ChatTemplate(source), family_tok, source="x", sampling={})
    assert 'TEMPLATE """' in text and len(missing) == 1 and missing[0].startswith("tools:")


def test_export_ollama_writes_the_gguf_and_the_modelfile_at_once(tiny_chat_dir, tmp_path):
    done = run_camelid("export", "ollama", tiny_chat_dir, tmp_path / "mine", "--type", "f16")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == sorted([GGUF_NAME, MODELFILE])
    assert f"ollama create mine -f {tmp_path / 'mine' / MODELFILE}" in done.stdout
    text = (tmp_path / "mine" / MODELFILE).read_text()
    assert 'PARAMETER stop "<|im_end|>"' in text and 'SYSTEM """You are a helpful AI assistant named SmolLM' in text
    again = run_camelid("export", "ollama", tiny_chat_dir, tmp_path / "mine")
    assert again.returncode != 0 and again.stderr.strip().splitlines()[-1].endswith(
        "already exists; choose another path, or pass --force to replace it")
    with pytest.raises(CamelidError, match="unknown GGUF type"):
        export_ollama(tiny_chat_dir, tmp_path / "other", type="q9")
    assert not (tmp_path / "other").exists()


@pytest.mark.llamacpp
@pytest.mark.slow
def test_a_fine_tuned_model_exported_for_ollama_answers_in_llama_cpp_and_stops(tuned_adapter, tmp_path):
    """SmolLM2 with an identity LoRA (merged): llama.cpp runs the exported GGUF with the Modelfile's stops and its
    own reading of the embedded template, gives camelid's greedy answer to an identity question, and ends the
    turn there."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from camelid.chat import chat_template_for, encode_chat
    from camelid.checkpoint import load_model
    from camelid.generate import SamplingParams, generate

    out, _ = export_ollama(tuned_adapter, tmp_path / "ollama", type="f32", progress=False)
    text = (out / MODELFILE).read_text()
    stops = [json.loads(line.removeprefix("PARAMETER stop ")) for line in text.splitlines()
             if line.startswith("PARAMETER stop ")]
    question = [{"role": "user", "content": "What is your name?"}]
    tuned = load_model(tuned_adapter, device="cpu", dtype="float32")
    ours = generate(tuned.model, tuned.tokenizer, [encode_chat(tuned, chat_template_for(tuned), question)],
                    SamplingParams(temperature=0, max_new_tokens=64))[0]
    llm = llama_cpp.Llama(str(out / GGUF_NAME), n_ctx=512, verbose=False)
    try:
        reply = llm.create_chat_completion(question, temperature=0, max_tokens=64, stop=stops, repeat_penalty=1.0)
    finally:
        llm.close()
    choice = reply["choices"][0]
    assert ours.finish_reason == "stop" and choice["finish_reason"] == "stop", (ours, choice)
    assert choice["message"]["content"] == ours.text
