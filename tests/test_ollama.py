"""`camelid export ollama`: the Modelfile's TEMPLATE, run by Go's own text/template (Debian's `golang`; skipped
where Go is absent) as Ollama runs it, writes exactly the prompt camelid's chat template renders, for SmolLM2's
template, every built-in and templates with tools; its stops cover every end-of-turn token; what cannot be
translated is said, not guessed.
"""

import importlib.metadata
import json
import shutil
import subprocess
import sys
import tarfile

import pytest
from helpers import run_camelid

from camelid.chat_template import BUILTIN_TEMPLATES, ChatTemplate
from camelid.errors import CamelidError
from camelid.ollama import (CHECK_CONVERSATIONS, CHECK_TOOL_CONVERSATIONS, CHECK_TOOLS, GGUF_NAME, MODELFILE, NO_ORDER,
                            ONE_CALL, export_ollama, go_template, modelfile, turn_layout)

# Executes a TEMPLATE as Ollama's template package does for a chat (written here after its documented behaviour):
# parsing refuses a template, action or branch without a pipeline; consecutive messages of one role (but tool's)
# are joined by a blank line; `.Messages` (Role, Content, ToolCalls with Function.Name and .Arguments, a map),
# `.System` (the system messages joined) and `.Tools` (type, then function: name, description, parameters: type,
# required, properties) are given in structs shaped as Ollama's, with its `json` function (Go's json.Marshal). A
# case whose execution fails comes back as "error: ..." (Ollama answers such a request with the error).
GO_PROGRAM = """\
package main

import (
	"encoding/json"
	"errors"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

type ToolCallFunction struct {
	Name      string
	Arguments map[string]any
}

type ToolCall struct {
	Function ToolCallFunction
}

type Message struct {
	Role      string
	Content   string
	ToolCalls []ToolCall
}

type Parameters struct {
	Type       string                     `json:"type"`
	Required   []string                   `json:"required,omitempty"`
	Properties map[string]json.RawMessage `json:"properties"`
}

type ToolFunction struct {
	Name        string     `json:"name"`
	Description string     `json:"description"`
	Parameters  Parameters `json:"parameters"`
}

type Tool struct {
	Type     string       `json:"type"`
	Function ToolFunction `json:"function"`
}

type Case struct {
	Messages []Message `json:"messages"`
	Tools    []Tool    `json:"tools"`
}

type Job struct {
	Template string `json:"template"`
	Cases    []Case `json:"cases"`
}

var funcs = template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}

// pipelines fails on a template call, action or branch without a pipeline, as Ollama's parser does
func pipelines(node parse.Node) error {
	switch n := node.(type) {
	case *parse.ListNode:
		if n == nil {
			return nil
		}
		for _, child := range n.Nodes {
			if err := pipelines(child); err != nil {
				return err
			}
		}
	case *parse.TemplateNode:
		if n.Pipe == nil {
			return errors.New("undefined template specified")
		}
	case *parse.ActionNode:
		if n.Pipe == nil {
			return errors.New("undefined action in template")
		}
	case *parse.IfNode:
		return branch(&n.BranchNode)
	case *parse.RangeNode:
		return branch(&n.BranchNode)
	case *parse.WithNode:
		return branch(&n.BranchNode)
	}
	return nil
}

func branch(b *parse.BranchNode) error {
	if b.Pipe == nil {
		return errors.New("undefined branch")
	}
	if err := pipelines(b.List); err != nil {
		return err
	}
	return pipelines(b.ElseList)
}

func collate(messages []Message) (string, []Message) {
	var system []string
	var out []Message
	for _, m := range messages {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role && m.Role != "tool" {
			out[len(out)-1].Content += "\\n\\n" + m.Content
		} else {
			out = append(out, m)
		}
	}
	return strings.Join(system, "\\n\\n"), out
}

func main() {
	var jobs []Job
	if err := json.NewDecoder(os.Stdin).Decode(&jobs); err != nil {
		panic(err)
	}
	var out [][]string
	for _, job := range jobs {
		tmpl := template.Must(template.New("t").Funcs(funcs).Parse(job.Template))
		if err := pipelines(tmpl.Tree.Root); err != nil {
			panic("Ollama would refuse this TEMPLATE: " + err.Error())
		}
		var rendered []string
		for _, c := range job.Cases {
			system, messages := collate(c.Messages)
			var b strings.Builder
			data := map[string]any{"Messages": messages, "System": system, "Tools": c.Tools}
			if err := tmpl.Execute(&b, data); err != nil {
				rendered = append(rendered, "error: "+err.Error())
			} else {
				rendered = append(rendered, b.String())
			}
		}
		out = append(out, rendered)
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def go_render(tmp_path, jobs: list[tuple[str, list[tuple[list[dict], list[dict] | None]]]]) -> list[list[str]]:
    """Each job's TEMPLATE executed by Go for each of its cases (messages, tools)."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (Debian: apt-get install golang-go)")
    program = tmp_path / "render.go"
    program.write_text(GO_PROGRAM)
    payload = [{"template": t, "cases": [{"messages": [as_ollama_message(m) for m in messages], "tools": tools}
                                         for messages, tools in cases]} for t, cases in jobs]
    env = {"HOME": str(tmp_path), "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"),
           "PATH": "/usr/bin:/bin", "GO111MODULE": "off"}
    done = subprocess.run([go, "run", str(program)], input=json.dumps(payload), capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def as_ollama_message(message: dict) -> dict:
    calls = [{"Function": {"Name": c["function"]["name"], "Arguments": c["function"]["arguments"]}}
             for c in message.get("tool_calls") or []]
    return {"Role": message["role"], "Content": message["content"], "ToolCalls": calls}


def as_ollama_tool(tool: dict) -> dict:
    """A tool with its fields in the order Ollama's structs marshal them (parameters: type, required, then the
    properties by name)."""
    function, parameters = tool["function"], tool["function"]["parameters"]
    ordered = {"type": parameters["type"]}
    if parameters.get("required"):
        ordered["required"] = parameters["required"]
    ordered["properties"] = dict(sorted(parameters["properties"].items()))
    return {"type": tool["type"], "function": {"name": function["name"], "description": function["description"],
                                               "parameters": ordered}}


def go_json(value, sort_keys: bool = False) -> str:
    """`value` as Go's json.Marshal writes it (no spaces, <>& escaped; a map's keys sorted, a struct's not)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def as_ollama_writes_json(prompt: str, messages: list[dict], tools: list[dict] | None, layout) -> str:
    """camelid's `prompt` with each JSON text the template wrote (a tool, a call's arguments, a content written as
    a JSON string) as Ollama's serializer writes the same value: the prompt Ollama's TEMPLATE must write."""
    for tool in tools or []:
        ours, theirs = (tool["function"], as_ollama_tool(tool)["function"]) if layout.tools.function_only else (
            tool, as_ollama_tool(tool))
        prompt = prompt.replace(json.dumps(ours, ensure_ascii=False, indent=layout.tools.indent), go_json(theirs))
    for message in messages:
        for call in message.get("tool_calls") or []:
            arguments = call["function"]["arguments"]
            prompt = prompt.replace(json.dumps(arguments, ensure_ascii=False), go_json(arguments, sort_keys=True))
        if message["role"] in layout.json_content:
            prompt = prompt.replace(json.dumps(message["content"], ensure_ascii=False), go_json(message["content"]))
    return prompt


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


def go_template_checked(tmp_path, cases_of: dict[str, tuple[ChatTemplate, list[tuple[list[dict], list | None]]]]):
    """Each template's TEMPLATE (from its layouts), executed by Go for its cases (messages, tools), writes the prompt
    camelid's template renders, JSON texts as Ollama writes them, or refuses where camelid's does (or, for
    UNUSUAL_ORDERS, where the layout does not cover their order). Returns the layouts."""
    jobs, expected, layouts = [], [], {}
    for name, (template, cases) in cases_of.items():
        plain = turn_layout(template)
        with_tools = turn_layout(template, tools=True) if any(tools for _, tools in cases) else None
        assert plain is not None, name
        layouts[name] = plain, with_tools
        sent = [(as_ollama_sends(messages, plain.default_system), tools) for messages, tools in cases]
        jobs.append((go_template(plain, with_tools), sent))
        expected.append([rendered(template, messages, tools, with_tools if tools else plain)
                         for messages, tools in cases])
    for name, ours, theirs in zip(cases_of, expected, go_render(tmp_path, jobs)):
        for i, (want, got) in enumerate(zip(ours, theirs, strict=True)):
            unusual = any(cases_of[name][1][i][0] is c for c in UNUSUAL_ORDERS)
            refused = got.startswith("error: ") and (ONE_CALL in got or NO_ORDER in got)
            if want is None:  # the template refuses the conversation (two calls a message, a system message)
                assert refused, (name, i, got)
            elif unusual:  # an order Go may refuse where the template writes it otherwise than elsewhere
                assert got == want or (refused and NO_ORDER in got), (name, i)
            else:
                assert got == want, (name, i)
    return layouts


def rendered(template: ChatTemplate, messages: list[dict], tools: list[dict] | None, layout) -> str | None:
    """The prompt Ollama must write: camelid's, JSON as Ollama writes it; None where the template refuses."""
    try:
        prompt = template.render(messages, add_generation_prompt=True, **({"tools": tools} if tools else {}))
    except CamelidError:
        return None
    return as_ollama_writes_json(prompt, messages, tools, layout)


# Orders of messages beyond system-user-assistant turns: the TEMPLATE writes each as camelid does, or refuses it
UNUSUAL_ORDERS = [
    [{"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Tell me a joke."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "system", "content": "From now on, answer in French."}, {"role": "user", "content": "How are you?"}],
    [{"role": "system", "content": "Be kind."}, {"role": "assistant", "content": "Welcome!"},
     {"role": "user", "content": "Thanks."}],
    [{"role": "user", "content": "Continue this: once upon"}, {"role": "assistant", "content": "a time"}],
]


def test_go_renders_the_modelfile_template_as_camelid_renders_the_chat(
        family_tok, smollm2_tokenizer_and_template, chats, tmp_path):
    found = templates(family_tok, smollm2_tokenizer_and_template)
    cases = [(c, None) for c in chats + UNUSUAL_ORDERS]
    go_template_checked(tmp_path, {name: (t, cases) for name, t in found.items()})
    print(f"\n{len(found)} templates x {len(cases)} chats: Go's text/template wrote camelid's prompt every time")


# The families' own templates, as llama.cpp's source keeps them for its tests (read from the llama-cpp-python source
# package at test time): name -> (file, whether it writes tools and tool calls).
FAMILY_TEMPLATES = {"qwen2.5": ("Qwen-Qwen2.5-7B-Instruct", True), "qwen3": ("Qwen-Qwen3-0.6B", True),
                    "llama-3.1": ("meta-llama-Llama-3.1-8B-Instruct", True),
                    "llama-3.2": ("meta-llama-Llama-3.2-3B-Instruct", True),
                    "llama-3.3": ("meta-llama-Llama-3.3-70B-Instruct", True),
                    "smollm3": ("HuggingFaceTB-SmolLM3-3B", False),
                    "phi-3.5": ("microsoft-Phi-3.5-mini-instruct", False),
                    "gemma-2": ("google-gemma-2-2b-it", False)}  # Gemma 2's refuses system messages


@pytest.fixture(scope="module")
def family_templates(tmp_path_factory) -> dict[str, ChatTemplate]:
    """FAMILY_TEMPLATES from the source package of the llama-cpp-python installed (pip's cache has it where pip
    built it); skipped where it cannot be had."""
    pytest.importorskip("llama_cpp")
    version = importlib.metadata.version("llama-cpp-python")
    where = tmp_path_factory.mktemp("llama-cpp-python-sdist")
    done = subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                           "--no-binary", ":all:", "--quiet", "-d", str(where)], capture_output=True, text=True,
                          timeout=600)
    archives = list(where.glob("*.tar.gz"))
    if done.returncode != 0 or not archives:
        pytest.skip(f"llama-cpp-python {version}'s source package could not be downloaded: {done.stderr[-300:]}")
    wanted = {f"{file}.jinja": name for name, (file, _) in FAMILY_TEMPLATES.items()}
    found = {}
    with tarfile.open(archives[0]) as tar:
        for member in tar:
            parts = member.name.split("/")
            if parts[-1] in wanted and "/vendor/llama.cpp/models/templates/" in member.name:
                found[wanted[parts[-1]]] = tar.extractfile(member).read().decode()
    assert sorted(found) == sorted(FAMILY_TEMPLATES), "llama.cpp's source keeps these templates elsewhere now"
    return {name: ChatTemplate(source, name=name, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
            for name, source in found.items()}


@pytest.mark.llamacpp
def test_go_renders_each_familys_own_template_with_tools_as_camelid_does(family_templates, chats, tmp_path):
    cases_of = {}
    for name, template in family_templates.items():
        cases = [(c, None) for c in chats + UNUSUAL_ORDERS]
        if FAMILY_TEMPLATES[name][1]:
            cases += [(c, None) for c in CHECK_TOOL_CONVERSATIONS]
            cases += [(c, tools) for c in chats[:20] + CHECK_TOOL_CONVERSATIONS
                      for tools in (CHECK_TOOLS[:1], CHECK_TOOLS)]
        cases_of[name] = (template, cases)
    layouts = go_template_checked(tmp_path, cases_of)
    for name, (plain, with_tools) in layouts.items():
        writes_tools = FAMILY_TEMPLATES[name][1]
        assert (plain.calls is not None) == writes_tools and (with_tools is not None) == writes_tools, name
    print(f"\n{len(cases_of)} families' templates, {sum(len(c) for _, c in cases_of.values())} chats "
          "(with tools where the template lists them): Go's text/template wrote camelid's prompt every time")


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
    # said, not hidden: Gemma's and Llama 3's templates trim each message, which Go cannot; the templates that
    # write any role as a turn also write tool results, but not the calls before them, so Ollama refuses those
    expected = []
    if name in ("smollm2", "chatml", "qwen", "llama-3", "phi-3"):
        expected.append("tool calls and results: the template writes them in a way this TEMPLATE cannot, so Ollama "
                        "refuses conversations that hold them")
    if name in ("gemma", "llama-3"):
        expected.append("the template trims the whitespace around each message, which a Go template cannot: Ollama "
                        "writes messages as they are sent")
    assert missing == expected


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


CHAT = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_tool_list_written_as_one_json_array_is_translated(chats, tmp_path):
    source = "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}" + CHAT
    cases = [(c, tools) for c in chats[:10] for tools in (None, CHECK_TOOLS[:1], CHECK_TOOLS)]
    plain, with_tools = go_template_checked(tmp_path, {"array": (ChatTemplate(source), cases)})["array"]
    assert with_tools.tools.between == ", " and plain.calls is None  # it writes no calls: plain chat with tools


def test_what_cannot_be_translated_is_named(family_tok):
    # tools written as Python signatures, not JSON: the TEMPLATE covers chat without tools, and says so
    source = "{% if tools %}{% for t in tools %}def {{ t.function.name }}(): ...\n{% endfor %}{% endif %}" + CHAT
    text, missing = modelfile(ChatTemplate(source), family_tok, source="x", sampling={})
    assert 'TEMPLATE """' in text and ".Tools" not in text
    # (and, as CHAT writes a tool's result as any turn but not the calls before it, that is said too)
    assert [note.split(":")[0] for note in missing] == ["tools", "tool calls and results"]
    # today's date, as Llama 3.2's template writes it, is fixed at the export
    source = "<|im_start|>system\nToday: {{ strftime_now('%d %b %Y') }}<|im_end|>\n" + CHAT
    text, missing = modelfile(ChatTemplate(source), family_tok, source="x", sampling={})
    assert 'TEMPLATE """' in text and "today's date" in missing[-1]


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
