"""`camelid export ollama`: a model as a GGUF file beside an Ollama Modelfile that renders and stops as camelid does.

A model imported into Ollama "talks gibberish or never stops" when its Modelfile lost the chat template or the stop
tokens. Ollama's TEMPLATE is a Go text/template, not Jinja, so camelid cannot copy the model's template over; it
translates what the template does instead. Rendering probe conversations of every shape with camelid's own
template (the model's Jinja template, or the built-in it chats with) and cutting them at each message's content
gives the text the template writes between two messages of given kinds: system, user, assistant, an assistant's
tool calls (each call's name and arguments are cut out too) and a tool's result; and the text after the last
message with the generation prompt. With tools given, the same is done again, and where the list of tools lands
in that text (as the JSON of each tool, or of each tool's function) is cut out as well. A template that is such a
layout (ChatML, Llama 2 and 3, Gemma, Phi-3, Qwen2.5 and 3 with their tools, the FastChat formats, ...) becomes a
Go template that writes the same strings around `.Content`, `.ToolCalls` and `.Tools`, and is checked against
camelid's rendering of further conversations, with and without tools, before it is written. The text a template
writes when a conversation has no system message becomes SYSTEM, when it is a system message of its own: Ollama
then sends it as one, and the prompt comes out the same.

What is not translated, said in the Modelfile and by the command, never guessed: a template that is not a layout
(one that rewrites earlier turns, or writes tools other than as JSON), and the whitespace some templates trim from
messages (Ollama sends the content as written). Where the template writes JSON (tool definitions, a call's
arguments), Ollama writes it with its own serializer (Go's: no spaces, map keys sorted, <>& escaped), so those
texts match up to that formatting only.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from camelid.chat_template import ChatTemplate
from camelid.errors import CamelidError

MODELFILE = "Modelfile"
GGUF_NAME = "model.gguf"

# What the Go template refuses (by naming a template that does not exist: an error Ollama answers with): an order
# of messages it was not shown how to write (one the chat template refuses, or writes inconsistently), and a
# second tool call in a message where the chat template takes one.
NO_ORDER = "this template does not write messages in this order"
ONE_CALL = "this template takes one tool call a message"
# Glue is what a template writes between two contents: one string, or (before, after) the list of tools.
Glue = tuple[str, ...]


@dataclass(frozen=True)
class ToolList:
    """How a template writes the list of tools: each tool (or its `function`) as JSON, `between` two."""

    function_only: bool
    indent: int | None
    between: str

    def text(self, tools: list[dict]) -> str:
        return self.between.join(_json(t["function"] if self.function_only else t, self.indent) for t in tools)


@dataclass(frozen=True)
class CallLayout:
    """How a template writes an assistant message's tool calls: [before_content + content + before_first, or
    before_first alone when there is no content], then each call's name, name_to_args, its arguments as JSON, and
    `between` two calls (None: one call a message, as Llama 3.1's template allows)."""

    before_first: str
    before_content: str | None  # None: the template leaves such a message's content out
    content_to_first: str
    name_to_args: str
    between: str | None


@dataclass(frozen=True)
class Layout:
    """What a chat template writes around the contents of a conversation, with or without tools."""

    glue: dict[tuple[str, str], Glue]  # (kind of the message before, or "" for none; kind) -> glue before content
    end: dict[str, Glue]  # kind of the last message -> its end and the generation prompt
    json_content: frozenset[str] = frozenset()  # kinds whose content the template writes as a JSON string
    calls: CallLayout | None = None
    tools: ToolList | None = None

    @property
    def default_system(self) -> str | None:
        """The system message the template writes when a conversation has none, or None (it writes none)."""
        if not self.takes_system:
            return None
        start_user, start_system = "".join(self.glue[("", "user")]), "".join(self.glue[("", "system")])
        system_user = "".join(self.glue[("system", "user")])
        if len(start_user) <= len(start_system) + len(system_user):
            return None
        if start_user.startswith(start_system) and start_user.endswith(system_user):
            return start_user[len(start_system): len(start_user) - len(system_user)]
        return None

    @property
    def takes_system(self) -> bool:
        """Whether the template writes system messages (Gemma 2's refuses them)."""
        return ("", "system") in self.glue

    def _known(self, glue: Glue | None) -> Glue:
        if glue is None:
            raise CamelidError(NO_ORDER)
        return glue

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The prompt the Go template (go_template) writes for `messages` (and `tools`, given to a layout with
        tools), JSON written as the Jinja template writes it: the layout, applied in Python."""
        out, prev = [], ""
        for message in messages:
            kind = _kind(message)
            out.append(self._glue(self._known(self.glue.get((prev, kind))), tools))
            content = message.get("content") or ""
            if kind == "calls":
                calls = self.calls
                if content and calls.before_content is not None:
                    out.append(calls.before_content + content + calls.content_to_first)
                else:
                    out.append(calls.before_first)
                for i, call in enumerate(message["tool_calls"]):
                    if i and calls.between is None:
                        raise CamelidError(ONE_CALL)
                    function = call["function"]
                    out.append((calls.between if i else "") + function["name"] + calls.name_to_args
                               + _json(function["arguments"]))
            else:
                out.append(_json(content) if kind in self.json_content else content)
            prev = kind
        out.append(self._glue(self._known(self.end.get(prev)), tools))
        return "".join(out)

    def _glue(self, glue: Glue, tools: list[dict] | None) -> str:
        return glue[0] if len(glue) == 1 else glue[0] + self.tools.text(tools) + glue[1]

    def go_loop(self) -> str:
        """The layout as Go text/template actions over Ollama's `.Messages` (and `$.Tools`). Every literal is a
        quoted Go string inside an action, so that no whitespace trimming can touch it."""
        cases = [(f'and (eq $prev "{prev}") (eq $kind "{kind}")', glue) for (prev, kind), glue in self.glue.items()]
        content = "{{ .Content }}"
        if self.json_content:
            test = " ".join(f'(eq $kind "{kind}")' for kind in sorted(self.json_content))
            content = f"{{{{ if or {test} }}}}{{{{ json .Content }}}}{{{{ else }}}}{{{{ .Content }}}}{{{{ end }}}}"
        lines = ['{{- $prev := "" }}', "{{- range .Messages }}",
                 '{{- $kind := .Role }}{{ if and (eq .Role "assistant") .ToolCalls }}{{ $kind = "calls" }}{{ end }}',
                 *self._go_cases(cases + [(None, None)])]
        if self.calls is None:
            lines.append('{{- "" }}' + content)
        else:
            calls = self.calls
            lead = _lit(calls.before_first)
            if calls.before_content is not None:
                lead = (f"{{{{ if .Content }}}}{_lit(calls.before_content)}{{{{ .Content }}}}"
                        f"{_lit(calls.content_to_first)}{{{{ else }}}}{lead}{{{{ end }}}}")
            between = _lit(calls.between) if calls.between is not None else _refusal(ONE_CALL)
            lines += ['{{- if eq $kind "calls" }}' + lead,
                      "{{- range $i, $c := .ToolCalls }}{{ if $i }}" + between + "{{ end }}{{ $c.Function.Name }}"
                      + _lit(calls.name_to_args) + "{{ json $c.Function.Arguments }}{{ end }}",
                      "{{- else }}" + content + "{{ end }}"]
        lines += ["{{- $prev = $kind }}", "{{- end }}"]
        ends = [(f'eq $prev "{kind}"', glue) for kind, glue in self.end.items()]
        return "\n".join(lines + self._go_cases(ends + [(None, None)]))

    def _go_cases(self, cases: list[tuple[str | None, Glue | None]]) -> list[str]:
        """Go actions writing the glue of the first case whose test holds (a test of None: otherwise; a glue of None:
        the refusal of an order not known)."""
        if cases[0][0] is None:
            return ['{{- "" }}' + self._go_glue(cases[0][1])]
        lines = []
        for i, (test, glue) in enumerate(cases):
            action = "else" if test is None else ("if " if i == 0 else "else if ") + test
            lines.append(f"{{{{- {action} }}}}{self._go_glue(glue)}")
        return lines + ["{{- end }}"]

    def _go_glue(self, glue: Glue | None) -> str:
        if glue is None:
            return _refusal(NO_ORDER)
        if len(glue) == 1:
            return _lit(glue[0])
        item = "json $t.Function" if self.tools.function_only else "json $t"
        return (_lit(glue[0]) + "{{ range $i, $t := $.Tools }}{{ if $i }}" + _lit(self.tools.between)
                + "{{ end }}{{ " + item + " }}{{ end }}" + _lit(glue[1]))


def go_template(plain: Layout, with_tools: Layout | None = None) -> str:
    """An Ollama TEMPLATE: `with_tools`'s layout when a request gives tools, `plain`'s otherwise."""
    if with_tools is None:
        return plain.go_loop()
    return "{{- if .Tools }}\n" + with_tools.go_loop() + "\n{{- else }}\n" + plain.go_loop() + "\n{{- end }}"


def _refusal(reason: str) -> str:
    """A Go action that fails with `reason`: it names a template that does not exist, so Ollama answers with the
    error, as camelid's chat template refuses the conversation."""
    return '{{ template "camelid: ' + reason + '" . }}'  # with a pipeline, as Ollama's parser requires


def _lit(text: str) -> str:
    # JSON's escapes are Go's too; all in ASCII, since Ollama's Modelfile reader drops characters Go does not
    # count as printable (no-break and zero-width spaces, line separators)
    return "{{ " + json.dumps(text) + " }}"


def _json(value, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)  # as chat templates' `tojson` writes it


def _kind(message: dict) -> str:
    """A message's kind: its role, or "calls" for an assistant message with tool calls."""
    return "calls" if message["role"] == "assistant" and message.get("tool_calls") else message["role"]


# -- probing the template ------------------------------------------------------------------------------------------

_X = "7qX"  # in every probe text, so that no template writes one by itself


def _probe_tool(letter: str) -> dict:
    return {"type": "function", "function": {
        "name": f"fn{letter}{_X}", "description": f"Finds {letter}{_X}.",
        "parameters": {"type": "object", "properties": {f"q{letter}{_X}": {"type": "string"}},
                       "required": [f"q{letter}{_X}"]}}}


PROBE_TOOLS = [_probe_tool("A"), _probe_tool("B")]


def _probe(kind: str, i: int, calls: str = "", content: str = "") -> dict:
    if kind == "calls":
        return {"role": "assistant", "content": content, "tool_calls": [
            {"type": "function", "function": {"name": f"fn{c}{_X}", "arguments": {f"q{c}{_X}": f"v{i}{c}{_X}"}}}
            for c in calls]}
    # a tool's result holds a quote, so that one written as a JSON string (Llama 3.1's) is told from one written
    return {"role": kind, "content": {"system": "Sys", "user": "Usr", "assistant": "Ast", "tool": 'Too"'}[kind]
            + f"{i}{_X}"}


@dataclass
class _Cut:
    glues: list[Glue]  # before each cut text, and after the last
    json_content: set[str] = field(default_factory=set)
    dropped: bool = False  # a tool-calling message's content was not written
    between: str | None = None  # between two tools of the list


def _cut(template: ChatTemplate, messages: list[dict], tools: list[dict] | None, tool_list: ToolList | None
         ) -> _Cut | None:
    """`template`'s rendering of `messages` (with `tools`) cut at each content, call name and arguments: the glue
    around them; None where the rendering does not hold each of them once and in order."""
    try:
        text = template.render(messages, add_generation_prompt=True, **({"tools": tools} if tools else {}))
    except CamelidError:
        return None
    marks = []
    if tools:  # each tool's JSON becomes a mark, so that the names it holds are not taken for a call's
        for i, written in enumerate(tool_list.text([t]) for t in tools):
            if text.count(written) != 1:
                return None
            marks.append(f"\x00{i}\x00")
            text = text.replace(written, marks[-1])
    out = _Cut(glues=[])
    pieces = []  # (candidates, kind): each written once, as the first candidate found
    for message in messages:
        kind = _kind(message)
        if message.get("content"):
            pieces.append(([message["content"], _json(message["content"])], kind))
        for call in message.get("tool_calls") or []:
            pieces += [([call["function"]["name"]], None), ([_json(call["function"]["arguments"])], None)]
    for candidates, kind in pieces:
        found = [c for c in candidates if text.count(c) == 1]
        if not found:
            if kind == "calls":
                out.dropped = True  # checked against further conversations below
                continue
            return None
        before, text = text.split(found[0])
        out.glues.append((before,))
        if found[0] != candidates[0]:
            out.json_content.add(kind)
    out.glues.append((text,))
    if marks:  # the list of tools lies in one glue: before, the tools `between` each other, after
        holding = [i for i, (glue,) in enumerate(out.glues) if marks[0] in glue]
        if len(holding) != 1:
            return None
        before, rest = out.glues[holding[0]][0].split(marks[0])
        between, second, after = rest.partition(marks[1])
        if not second or any(mark in between + after for mark in marks):
            return None
        out.glues[holding[0]] = (before, after)
        out.between = between
    return out


def _tool_list(template: ChatTemplate) -> ToolList | None:
    """How `template` writes a list of tools: each as JSON (whole, or its function; indented or not)."""
    try:
        text = template.render([_probe("user", 1)], add_generation_prompt=True, tools=PROBE_TOOLS)
    except CamelidError:
        return None
    for function_only in (False, True):
        for indent in (None, 4, 2):
            tool_list = ToolList(function_only, indent, between="")
            if text.count(tool_list.text(PROBE_TOOLS[:1])) == 1:
                return tool_list
    return None


def _layout(template: ChatTemplate, tools: bool, with_calls: bool) -> Layout | None:
    """The layout `template` writes conversations in (with tools, given `tools`), with tool calls and results
    where `with_calls`; None where the probes do not cut into one."""
    tool_list = _tool_list(template) if tools else None
    if tools and tool_list is None:
        return None
    given = PROBE_TOOLS if tools else None

    def cut(*messages) -> _Cut | None:
        return _cut(template, list(messages), given, tool_list)

    u1, u2, a1 = _probe("user", 1), _probe("user", 2), _probe("assistant", 1)
    plain, system = cut(u1, a1, u2), cut(_probe("system", 1), u1)
    if plain is None or (system is None and not _refuses(template, [_probe("system", 1), u1], given)):
        return None
    glue = {("", "user"): plain.glues[0], ("user", "assistant"): plain.glues[1], ("assistant", "user"): plain.glues[2]}
    end = {"user": plain.glues[3]}
    if system is not None:  # else it takes no system message
        if plain.glues[3] != system.glues[2]:
            return None
        glue.update({("", "system"): system.glues[0], ("system", "user"): system.glues[1]})
    if tools:
        tool_list = ToolList(tool_list.function_only, tool_list.indent, plain.between)
    _more_orders(cut, glue, end)
    calls, json_content = _call_glue(cut, glue, end) if with_calls else (None, set())
    if with_calls and calls is None:
        return None
    return Layout(glue=glue, end=end, json_content=frozenset(json_content), calls=calls, tools=tool_list)


def _more_orders(cut, glue: dict, end: dict) -> None:
    """Add to `glue` and `end` the orders of messages beyond those every layout is built from (an assistant
    first, a system message later on, the generation prompt after an assistant or a system message), each where
    the template writes it consistently with the rest; the Go template refuses those left out."""
    u1, u2, a1 = _probe("user", 1), _probe("user", 2), _probe("assistant", 1)
    s1, s2 = _probe("system", 1), _probe("system", 2)
    probes = [((a1, u1), [("", "assistant"), ("assistant", "user")], "user"),
              ((s1, a1, u1), [("", "system"), ("system", "assistant"), ("assistant", "user")], "user"),
              ((u1, s2, u2), [("", "user"), ("user", "system"), ("system", "user")], "user"),
              ((u1, a1, s2, u2), [("", "user"), ("user", "assistant"), ("assistant", "system"), ("system", "user")],
               "user"),
              ((u1, a1), [("", "user"), ("user", "assistant")], "assistant"),
              ((s1,), [("", "system")], "system")]
    for messages, keys, last in probes:
        found = cut(*messages)
        if found is None:
            continue
        pairs = dict(zip(keys, found.glues))
        if any(glue.get(k, g) != g for k, g in pairs.items()) or end.get(last, found.glues[-1]) != found.glues[-1]:
            continue  # written otherwise here than elsewhere: not a layout that covers this order
        glue.update(pairs)
        end[last] = found.glues[-1]


def _call_glue(cut, glue: dict, end: dict) -> tuple[CallLayout | None, set[str]]:
    """How the template writes tool calls and results, added to `glue` and `end`, and the kinds whose content
    it writes as JSON strings; (None, ...) where it writes none, or not as a layout."""
    u1, u2, a1, t1, t2 = _probe("user", 1), _probe("user", 2), _probe("assistant", 1), _probe("tool", 1), _probe(
        "tool", 2)
    many = cut(u1, _probe("calls", 1, "AB"), t1, t2, a1, u2)
    first_call = many if many is not None else cut(u1, _probe("calls", 1, "A"), t1, t2, a1, u2)
    talk = cut(u1, _probe("calls", 2, "A", content="Cnt1" + _X), t1)
    again = cut(u1, _probe("calls", 1, "A"), t1, _probe("calls", 2, "B"), t2)
    after = cut(u1, _probe("calls", 1, "A"), t1, u2)
    cuts = [c for c in (first_call, talk, again) if c is not None]
    if len(cuts) < 3 or any(len(g) > 1 for c in cuts for g in c.glues[1:]):
        return None, set()  # no tool messages (or the tools listed among them)
    g = [g[0] for g in first_call.glues]
    if many is not None:  # u1 | nameA argsA nameB argsB | t1 t2 a1 u2
        first, name_to_args, between, rest = g[1], g[2], g[3], g[5:]
        if g[4] != name_to_args:
            return None, set()
    else:  # u1 | nameA argsA | t1 t2 a1 u2: one call a message
        first, name_to_args, between, rest = g[1], g[2], None, g[3:]
    if (rest[3],) != glue[("assistant", "user")]:
        return None, set()
    glue.update({("calls", "tool"): (rest[0],), ("tool", "tool"): (rest[1],), ("tool", "assistant"): (rest[2],)})
    if talk.dropped:  # u1 | nameA argsA | t1
        before_first, before_content, content_to_first = "", None, ""
        glue[("user", "calls")] = (first,)
    else:  # u1 | content | nameA argsA | t1: the glue both share, then what each writes
        shared = _common_prefix(first, talk.glues[1][0])
        before_first, before_content = first[len(shared):], talk.glues[1][0][len(shared):]
        content_to_first = talk.glues[2][0]
        glue[("user", "calls")] = (shared,)
    end["tool"] = talk.glues[-1]
    g = [g[0] for g in again.glues]  # u1 | nameA argsA | t1 | nameB argsB | t2
    if not g[4].endswith(before_first) or (g[-1],) != end["tool"]:
        return None, set()
    glue[("tool", "calls")] = (g[4][: len(g[4]) - len(before_first)],)
    if after is not None:
        glue[("tool", "user")] = after.glues[-2]
    json_content = set().union(*(c.json_content for c in cuts))
    return CallLayout(before_first, before_content, content_to_first, name_to_args, between), json_content


def _refuses(template: ChatTemplate, messages: list[dict], tools: list[dict] | None) -> bool:
    try:
        template.render(messages, add_generation_prompt=True, **({"tools": tools} if tools else {}))
    except CamelidError:
        return True
    return False


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def turn_layout(template: ChatTemplate, tools: bool = False) -> Layout | None:
    """The layout `template` writes conversations in (with `tools` given, or without), tool calls and results
    included where it writes them; None where it is not one. Checked on conversations of every shape the layout
    covers, with contents of several lines, braces and non-ASCII, before it is returned."""
    for with_calls in (True, False):
        layout = _layout(template, tools, with_calls)
        conversations = CHECK_CONVERSATIONS + (CHECK_TOOL_CONVERSATIONS if with_calls else [])
        if layout is not None and all(_same(template, layout, c, tools) for c in conversations):
            return layout
    return None


def _same(template: ChatTemplate, layout: Layout, messages: list[dict], tools: bool) -> bool:
    """Whether the layout renders `messages` as `template` does (with one and with three tools, given `tools`),
    or both refuse them."""
    for given in (CHECK_TOOLS[:1], CHECK_TOOLS) if tools else (None,):
        try:
            theirs = template.render(messages, add_generation_prompt=True, **({"tools": given} if given else {}))
        except CamelidError:
            theirs = None
        try:
            ours = layout.render(messages, given)
        except CamelidError:
            ours = None
        if ours != theirs:
            return False
    return True


# Conversations a layout must render exactly as the template does before it is written.
CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And {{ 3 }}+3?\nShow it as `code`."}],
    [{"role": "system", "content": "Réponds en français.\nSois bref."}, {"role": "user", "content": "Bonjour"},
     {"role": "assistant", "content": "Bonjour ! 🦙"}, {"role": "user", "content": "Ça va ?"},
     {"role": "assistant", "content": "Oui.\n\nEt toi ?"}, {"role": "user", "content": "{% raw %} \"quoted\""}],
]


def _function(name: str, description: str, **properties) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {k: {"type": v} for k, v in properties.items()},
        "required": list(properties)}}}


CHECK_TOOLS = [_function("get_weather", "The weather now in a city.", city="string", celsius="boolean"),
               _function("add", "a + b", a="number", b="number"),
               _function("search_notes", "Search my notes (full text, \"quoted\" phrases).", query="string")]


def _call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CHECK_TOOL_CONVERSATIONS = [
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", city="Paris", celsius=True)]},
     {"role": "tool", "content": '{"temperature": 21, "sky": "clear"}'}],
    [{"role": "system", "content": "Use tools.\nBe brief."}, {"role": "user", "content": "2+3, and 4+5?"},
     {"role": "assistant", "content": "", "tool_calls": [_call("add", a=2, b=3), _call("add", a=4, b=5)]},
     {"role": "tool", "content": "5"}, {"role": "tool", "content": "9"},
     {"role": "assistant", "content": "5 and 9."}, {"role": "user", "content": "Thanks! Any notes on \"llamas\"?"},
     {"role": "assistant", "content": "Let me look.", "tool_calls": [_call("search_notes", query="llamas")]},
     {"role": "tool", "content": "Llamas hum.\nAlpacas too."}],
    [{"role": "user", "content": "Weather in Zürich and Köln?"},
     {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", city="Zürich", celsius=True)]},
     {"role": "tool", "content": "{\"temperature\": 3}"},
     {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", city="Köln", celsius=False)]},
     {"role": "tool", "content": "{\"temperature\": 41}"}, {"role": "user", "content": "Which is warmer?"}],
]


def stop_tokens(template: ChatTemplate, tokenizer) -> list[str]:
    """The end-of-turn and end-of-text tokens the template writes (what Ollama must stop at), in the order they
    first appear in a conversation of two turns."""
    text = template.render(CHECK_CONVERSATIONS[2][:2] + [CHECK_CONVERSATIONS[2][0]], add_generation_prompt=True)
    found = {}
    for token_id in sorted(tokenizer.stop_ids):
        token = tokenizer.backend.id_to_token(token_id)
        if token and token in text:
            found[token] = text.index(token)
    return sorted(found, key=found.get)


def modelfile(template: ChatTemplate, tokenizer, *, source: str, sampling: dict[str, float]) -> tuple[str, list[str]]:
    """The Modelfile's text for a GGUF named GGUF_NAME beside it, and what it could not carry (one line each)."""
    from camelid.tokenizer import END_OF_GENERATION_TOKENS

    layout = turn_layout(template)
    with_tools = turn_layout(template, tools=True) if layout is not None and template.reads("tools") else None
    lines = [f"# Written by camelid export ollama from {source}.", f"FROM ./{GGUF_NAME}"]
    missing = []
    if layout is None:
        missing.append("the chat template is not a fixed layout of turns that a Go template can write, so there is "
                       "no TEMPLATE: Ollama falls back to its own guess from the GGUF's template; check its answers")
    else:
        lines.append(f'TEMPLATE """{go_template(layout, with_tools)}"""')
        system = layout.default_system
        if system is not None:
            if '"""' in system:
                missing.append("the default system prompt holds three quotes in a row, which a Modelfile cannot")
            else:
                lines.append(f'SYSTEM """{system}"""')
        if template.reads("tools") and with_tools is None:
            missing.append("tools: the template lists tools in a way this TEMPLATE cannot write, so it covers chat "
                           "without tools only")
        if layout.calls is None and not _refuses(template, CHECK_TOOL_CONVERSATIONS[0], None):
            missing.append("tool calls and results: the template writes them in a way this TEMPLATE cannot, so "
                           "Ollama refuses conversations that hold them")
        if _trims(template):
            missing.append("the template trims the whitespace around each message, which a Go template cannot: "
                           "Ollama writes messages as they are sent")
        if "strftime_now" in template.source:
            missing.append("the template writes today's date, which this TEMPLATE fixes at the date of the export")
    stops = stop_tokens(template, tokenizer) if layout is not None else sorted(
        t for i in tokenizer.stop_ids if (t := tokenizer.backend.id_to_token(i)) in END_OF_GENERATION_TOKENS)
    lines += [f"PARAMETER stop {json.dumps(token, ensure_ascii=False)}" for token in stops]
    lines += [f"PARAMETER {name} {_number(value)}" for name, value in sampling.items()]
    return "\n".join(lines) + "\n", missing


def _trims(template: ChatTemplate) -> bool:
    """Whether `template` writes a message without the whitespace around it (Llama 3's and Gemma's do)."""
    content = f" Usr1{_X}\n"
    try:
        return content not in template.render([{"role": "user", "content": content}], add_generation_prompt=True)
    except CamelidError:
        return False


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def sampling_defaults(model_dir: Path | None) -> dict[str, float]:
    """Ollama's names for the model's sampling defaults: its generation_config.json where it says them, else
    camelid's (those of `camelid chat`, which are llama.cpp's)."""
    from camelid.files import read_json
    from camelid.generate import SamplingParams

    chat = SamplingParams()
    out = {"temperature": chat.temperature, "top_k": chat.top_k, "top_p": chat.top_p,
           "repeat_penalty": chat.repetition_penalty}
    config = model_dir / "generation_config.json" if model_dir is not None and model_dir.is_dir() else None
    given = read_json(config) if config is not None and config.is_file() else {}
    if isinstance(given, dict) and given.get("do_sample") is not False:
        for ours, theirs in (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
                             ("repeat_penalty", "repetition_penalty")):
            value = given.get(theirs)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[ours] = value
    return out


def export_ollama(model, out: str | Path, *, type: str = "q8_0", template_name: str | None = None,
                  name: str | None = None, overwrite: bool = False, progress: bool = True) -> tuple[Path, list[str]]:
    """Write directory `out` with GGUF_NAME (`export gguf` of `model`, of `type`) and a MODELFILE for it, all at
    once; (out, what the Modelfile could not carry). `template_name` is a built-in to chat in instead of the
    model's own template, as in `camelid chat --template`."""
    from camelid.chat import chat_template_for
    from camelid.checkpoint import load_model
    from camelid.export import check_output, export_gguf
    from camelid.files import atomic_dir

    out = Path(out)
    check_output(out, overwrite=overwrite)
    loaded = load_model(model, device="cpu", dtype="float32")
    template = chat_template_for(loaded, template_name)
    source = Path(str(model)).name if Path(str(model)).exists() else str(model)
    text, missing = modelfile(template, loaded.tokenizer, source=source,
                              sampling=sampling_defaults(loaded.source if loaded.source.is_dir() else None))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        export_gguf(loaded, tmp / GGUF_NAME, type=type, name=name, progress=progress)
        (tmp / MODELFILE).write_text(text, encoding="utf-8")
    return out, missing
