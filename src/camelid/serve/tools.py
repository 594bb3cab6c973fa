"""Tool calling: OpenAI's `tools` and `tool_choice` put into the prompt, the model's calls read back out of its
answer (whole, or as a stream goes), and decoding constrained where a call is required.

Two formats of call are read, chosen by what the model's chat template writes:

- hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call. The templates of
  Qwen2.5, Qwen3, SmolLM3 and Hermes 2 Pro take `tools` and write this.
- llama-3: the whole answer one JSON object `{"name": ..., "parameters": {...}}`, as the templates of Llama 3.1,
  3.2 and 3.3 ask for their JSON tool calls (a `<|python_tag|>` before it is allowed; the built-in tools' Python
  calls are not read).

A template that takes no `tools` (SmolLM2's, the built-ins) gets the fallback: a system message, written here,
that lists the tools as JSON schemas and asks for hermes blocks; earlier calls are written into their assistant
turns as hermes blocks, and tool results into user turns as `<tool_response>` blocks, as Qwen's template does.

With `tool_choice` "required" or a named function, a grammar (camelid.grammar) makes the answer exactly calls in
the model's format, each naming a given function with arguments valid under its `parameters`; "auto" leaves the
model free and reads whatever calls it wrote; "none" leaves the tools out of the prompt. An answer whose blocks do
not parse, or name no given tool, is content, as vLLM reads it.
"""

import json
import re
import uuid
from dataclasses import dataclass

from camelid.chat_template import ChatTemplate
from camelid.grammar import JSON_OPTIONS, Grammar, GrammarError, json_schema_grammar, lark_grammar
from camelid.serve.protocol import APIError, ChatRequest, NamedToolChoice

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1's mark before a call
MAX_CALLS = 8  # calls in one required answer: a small greedy model may otherwise repeat its calls to max_tokens
HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)

FALLBACK_PROMPT = """\
You can call functions to answer. Each is described by a JSON schema of its arguments:
<tools>
{tools}
</tools>
To call a function, answer with its name and arguments as a JSON object between <tool_call> and </tool_call>:
<tool_call>
{{"name": "the function's name", "arguments": {{"an argument": "its value"}}}}
</tool_call>
Call several functions with one block each. Their results come back between <tool_response> and \
</tool_response>."""


@dataclass
class ToolUse:
    """What a chat request asks of tools: the functions, the format its model calls them in, and the choice."""

    tools: list[dict]  # OpenAI's {"type": "function", "function": {...}}
    native: str | None  # the format of the model's own template ("hermes", "llama-3"), or None: the fallback's
    choice: str  # "auto", "required", or the one function's name
    parallel: bool

    @property
    def format(self) -> str:
        return self.native or "hermes"

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}


def tool_use(body: ChatRequest, template: ChatTemplate | None) -> ToolUse | None:
    """The request's tool use (None when it has no tools, or `tool_choice` is "none"); 400 for a choice that
    names no given tool."""
    tools = body.tools or []
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, f"two tools are named {max(names, key=names.count)!r}", param="tools")
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                           param="tool_choice")
        choice = choice.function.name
    elif choice == "required" and not tools:
        raise APIError(400, "tool_choice is required but no tools are given", param="tool_choice")
    if not tools or choice == "none":
        return None
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, "give tools or a JSON response_format, not both", param="response_format")
    return ToolUse([t.model_dump(exclude_none=True) for t in tools], call_format(template), choice or "auto",
                   body.parallel_tool_calls)


def call_format(template: ChatTemplate | None) -> str | None:
    """The format the template's model calls tools in: "hermes" or "llama-3" for a template that renders tools
    in one of them, None for any other (the fallback prompt then asks for hermes blocks)."""
    if template is None or not template.reads("tools"):
        return None
    if OPEN in template.source:
        return "hermes"
    if PYTHON_TAG in template.source:
        return "llama-3"
    return None


# -- the prompt ----------------------------------------------------------------------------------------------------


def with_tools(messages: list[dict], use: ToolUse | None, template: ChatTemplate | None
               ) -> tuple[list[dict], dict]:
    """The messages and the template variables that put `use`'s tools (None: no tools) before the model: a
    template that renders tools gets them as `tools`, and the conversation's calls and results as they are; for
    any other the fallback writes them all into the messages themselves."""
    if call_format(template) is not None:
        return messages, ({"tools": use.tools} if use is not None else {})
    if use is None and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return messages, {}
    out = []
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
        elif m.get("tool_calls"):
            calls = [f"{OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']})}"
                     f"\n{CLOSE}" for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(filter(None, [m["content"], *calls]))})
        else:
            out.append(m)
    out = [{k: v for k, v in m.items() if k != "tool_results"} for m in out]
    if use is not None:
        listed = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t) for t in use.tools))
        if out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + listed}
        else:
            out.insert(0, {"role": "system", "content": listed})
    return out, {}


# -- constrained calls ---------------------------------------------------------------------------------------------


def call_grammar(use: ToolUse, tokenizer, vocab_size: int) -> Grammar | None:
    """With a required or named choice, the grammar of an answer that is only calls (several, if parallel calls
    are allowed and no one function is named), each valid under its function's parameters; None for "auto"."""
    if use.choice == "auto":
        return None
    wanted = [t["function"] for t in use.tools if use.choice in ("required", t["function"]["name"])]
    key = "parameters" if use.format == "llama-3" else "arguments"
    calls = {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]}, key: closed(f["parameters"])},
                        "required": ["name", key], "additionalProperties": False} for f in wanted],
             "x-guidance": JSON_OPTIONS}
    if use.format == "llama-3":
        lark = f"start: %json {json.dumps(calls)}"
    else:
        many = f"{{1,{MAX_CALLS}}}" if use.parallel and use.choice == "required" else ""
        lark = (f'start: call{many}\ncall: "{OPEN}\\n" %json {json.dumps(calls)} "\\n{CLOSE}\\n"')
    try:
        return lark_grammar(tokenizer, vocab_size, lark)
    except GrammarError as exc:
        raise APIError(400, f"the tools' parameters cannot be enforced: {exc}", param="tools") from None


def closed(schema):
    """`schema` with every object that does not say otherwise closed to keys beyond its `properties`: a call's
    arguments are the parameters declared (OpenAI's strict mode asks for this), not whatever else the model adds."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def check_parameters(use: ToolUse, tokenizer, vocab_size: int) -> None:
    """400 naming the tool whose `parameters` is no schema a grammar can be made of (checked in "auto" too)."""
    for tool in use.tools:
        function = tool["function"]
        try:
            json_schema_grammar(tokenizer, vocab_size, function["parameters"])
        except GrammarError as exc:
            raise APIError(400, f"the parameters of tool {function['name']!r} are not a schema this server can "
                           f"enforce: {exc}", param="tools") from None


# -- reading the answer --------------------------------------------------------------------------------------------


def read_calls(text: str, use: ToolUse) -> tuple[str | None, list[dict]]:
    """(content, tool calls in OpenAI's shape) of a whole answer: calls that parse and name a given tool, or no
    calls at all and the whole text as content."""
    if use.format == "llama-3":
        call = _call(text.strip().removeprefix(PYTHON_TAG), use, "parameters")
        return (None, [call]) if call is not None else (text, [])
    if OPEN not in text:
        return text, []
    calls = [_call(body, use, "arguments") for body in HERMES_BLOCK.findall(text)]
    if not calls or any(c is None for c in calls):
        return text, []
    return "\n".join(_outside(text)) or None, calls


def _outside(text: str) -> list[str]:
    """The stretches of `text` between its call blocks, stripped, the empty ones left out."""
    return [piece.strip() for piece in HERMES_BLOCK.sub("\0", text).split("\0") if piece.strip()]


def _call(body: str, use: ToolUse, key: str) -> dict | None:
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in use.names:
        return None
    arguments = call.get(key, call.get("arguments", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as OpenAI sends them
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


class CallStream:
    """Reads a streamed answer's calls as its text arrives: `feed` text, get OpenAI's deltas back (content, or a
    call's id and name and then its arguments once its block is complete); `end` at the answer's end.

    Text that may be the start of a call is held back until it is known not to be; a call is sent when its block
    closes, as two deltas (the call's id and name, then its arguments). What is sent joins up to what `read_calls`
    makes of the whole answer: the same calls, and the same content but for whitespace at its very start and end.
    """

    def __init__(self, use: ToolUse):
        self.use = use
        self.held = ""  # text not yet known to be content or a call
        self.calls = 0
        self.content = ""  # the content sent
        self.blank = ""  # whitespace at the end of the content so far: sent only if more content follows
        self.after_call = False  # a call came since the last content (the next content starts a new stretch)

    def feed(self, text: str) -> list[dict]:
        self.held += text
        if self.use.format == "llama-3":
            return self._llama_feed()
        deltas = []
        while True:
            start = self.held.find(OPEN)
            if start < 0:
                keep = _partial_suffix(self.held, OPEN)
                deltas += self._content(self.held[: len(self.held) - keep])
                self.held = self.held[len(self.held) - keep :]
                return deltas
            deltas += self._content(self.held[:start])
            end = self.held.find(CLOSE, start)
            if end < 0:
                self.held = self.held[start:]
                return deltas
            deltas += self._block(self.held[start : end + len(CLOSE)])
            self.held = self.held[end + len(CLOSE) :].lstrip()

    def end(self) -> tuple[list[dict], bool]:
        """The deltas left at the answer's end, and whether the answer made calls (finish_reason tool_calls)."""
        held, self.held = self.held, ""
        if self.use.format == "llama-3":
            _, calls = read_calls(held, self.use) if held else (None, [])
            return (self._call_deltas(calls) if calls else self._content(held)), bool(calls)
        deltas = self._block(held) if held.startswith(OPEN) else self._content(held)
        return deltas, self.calls > 0

    def _llama_feed(self) -> list[dict]:
        """A Llama 3 call is the whole answer: an answer that may be one waits for its end; others stream."""
        start = self.held.lstrip()
        may_be_call = start.startswith(("{", PYTHON_TAG)) or PYTHON_TAG.startswith(start)
        if self.content or not may_be_call:
            held, self.held = self.held, ""
            return self._content(held)
        return []

    def _block(self, block: str) -> list[dict]:
        _, calls = read_calls(block, self.use)
        return self._call_deltas(calls) if calls else self._content(block)

    def _call_deltas(self, calls: list[dict]) -> list[dict]:
        deltas = []
        for call in calls:
            head = {"index": self.calls, "id": call["id"], "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""}}
            arguments = {"index": self.calls, "function": {"arguments": call["function"]["arguments"]}}
            deltas += [{"tool_calls": [head]}, {"tool_calls": [arguments]}]
            self.calls += 1
        self.after_call, self.blank = True, ""
        return deltas

    def _content(self, text: str) -> list[dict]:
        text = self.blank + text
        body = text.rstrip()
        self.blank = text[len(body) :]
        if self.after_call:  # a new stretch between calls: stripped and on a line of its own, as read_calls joins
            body = body.lstrip()
            if not body:
                return []
            body = ("\n" if self.content else "") + body
            self.after_call = False
        if not body:
            return []
        self.content += body
        return [{"content": body}]


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
