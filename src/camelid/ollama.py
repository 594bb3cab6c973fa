"""`camelid export ollama`: a model as a GGUF file beside an Ollama Modelfile that renders and stops as camelid does.

A model imported into Ollama "talks gibberish or never stops" when its Modelfile lost the chat template or the stop
tokens. Ollama's TEMPLATE is a Go text/template, not Jinja, so camelid cannot copy the model's template over; it
translates what the template does instead. Rendering conversations of every shape with camelid's own template (the
model's Jinja template, or the built-in it chats with) gives the text written before the first message and between
two messages of given roles, and after the last one with the generation prompt. A template that is such a layout
of turns (ChatML, Llama 2 and 3, Gemma, Phi-3, the FastChat formats, ...) becomes a Go template that writes the
same strings around `.Content`, and is checked against camelid's rendering of further conversations before it is
written. The text a template writes when a conversation has no system message becomes SYSTEM, when it is a system
message of its own: Ollama then sends it as one, and the prompt comes out the same.

What is not translated, said in the Modelfile and by the command, never guessed: a template that is not a layout
of turns (one that rewrites earlier turns, or says where tools go), tool definitions, and the whitespace some
templates trim from messages (Ollama sends the content as written).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from camelid.chat_template import ChatTemplate
from camelid.errors import CamelidError

MODELFILE = "Modelfile"
GGUF_NAME = "model.gguf"
# Contents that no template writes by itself, so they mark where each message's content went.
_MARKS = {"system": "Sys7qX", "user": "Usr7qX", "assistant": "Ast7qX"}


@dataclass(frozen=True)
class TurnLayout:
    """What a chat template writes around the messages of a conversation that ends with a user turn."""

    start_system: str  # before a first system message's content
    start_user: str  # before a first user message's content (with any default system turn)
    system_user: str  # after a system message's content, before the next user message's
    user_assistant: str  # after a user message's content, before the assistant's reply
    assistant_user: str  # after an assistant reply, before the next user message's content
    end: str  # after the last user message's content: its end and the generation prompt

    @property
    def default_system(self) -> str | None:
        """The system message the template writes when a conversation has none, or None (it writes none)."""
        if len(self.start_user) <= len(self.start_system) + len(self.system_user):
            return None
        if self.start_user.startswith(self.start_system) and self.start_user.endswith(self.system_user):
            return self.start_user[len(self.start_system) : len(self.start_user) - len(self.system_user)]
        return None

    def render(self, messages: list[dict]) -> str:
        """The prompt the Go template (go_template) writes for `messages`: the layout, applied in Python."""
        out, prev = [], None
        for message in messages:
            role = message["role"]
            if prev is None:
                out.append(self.start_system if role == "system" else self.start_user)
            elif prev == "system":
                out.append(self.system_user)
            elif role == "assistant":
                out.append(self.user_assistant)
            else:
                out.append(self.assistant_user)
            out.append(message["content"])
            prev = role
        return "".join(out) + self.end

    def go_template(self) -> str:
        """The layout as an Ollama TEMPLATE (Go text/template over `.Messages`): every literal is a quoted Go
        string inside an action, so that no whitespace trimming can touch it."""

        def lit(text: str) -> str:
            return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"  # JSON's escapes are Go's too

        return (
            '{{- $prev := "" }}\n'
            "{{- range .Messages }}\n"
            f'{{{{- if eq $prev "" }}}}{{{{ if eq .Role "system" }}}}{lit(self.start_system)}'
            f"{{{{ else }}}}{lit(self.start_user)}{{{{ end }}}}\n"
            f'{{{{- else if eq $prev "system" }}}}{lit(self.system_user)}\n'
            f'{{{{- else if eq .Role "assistant" }}}}{lit(self.user_assistant)}\n'
            f"{{{{- else }}}}{lit(self.assistant_user)}\n"
            "{{- end }}\n"
            "{{- .Content }}\n"
            "{{- $prev = .Role }}\n"
            "{{- end }}\n"
            f"{{{{- {json.dumps(self.end, ensure_ascii=False)} }}}}"
        )


def turn_layout(template: ChatTemplate) -> TurnLayout | None:
    """The layout of turns that `template` renders conversations in, or None where it is not one (checked on
    conversations of every shape the layout covers, with contents of several lines, braces and non-ASCII)."""
    s, u, a = _MARKS["system"], _MARKS["user"], _MARKS["assistant"]
    try:
        plain = _split(template, [("user", u + "1"), ("assistant", a + "1"), ("user", u + "2")])
        with_system = _split(template, [("system", s), ("user", u + "1")])
    except CamelidError:
        return None  # a template that refuses one of these shapes (e.g. one without system messages)
    if plain is None or with_system is None or plain[3] != with_system[2]:
        return None
    layout = TurnLayout(start_system=with_system[0], start_user=plain[0], system_user=with_system[1],
                        user_assistant=plain[1], assistant_user=plain[2], end=plain[3])
    try:
        ok = all(layout.render(c) == template.render(c, add_generation_prompt=True) for c in CHECK_CONVERSATIONS)
    except CamelidError:
        return None
    return layout if ok else None


def _split(template: ChatTemplate, turns: list[tuple[str, str]]) -> list[str] | None:
    """`template`'s rendering of the conversation of `turns` cut at each content: the strings around them."""
    text = template.render([{"role": r, "content": c} for r, c in turns], add_generation_prompt=True)
    pieces = []
    for _, content in turns:
        if text.count(content) != 1:
            return None  # changed (trimmed, cased), left out, or repeated: not a layout of turns
        before, text = text.split(content)
        pieces.append(before)
    return pieces + [text]


# Conversations the layout must render exactly as the template does before it is written.
CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And {{ 3 }}+3?\nShow it as `code`."}],
    [{"role": "system", "content": "Réponds en français.\nSois bref."}, {"role": "user", "content": "Bonjour"},
     {"role": "assistant", "content": "Bonjour ! 🦙"}, {"role": "user", "content": "Ça va ?"},
     {"role": "assistant", "content": "Oui.\n\nEt toi ?"}, {"role": "user", "content": "{% raw %} \"quoted\""}],
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
    lines = [f"# Written by camelid export ollama from {source}.", f"FROM ./{GGUF_NAME}"]
    missing = []
    if layout is None:
        missing.append("the chat template is not a fixed layout of turns that a Go template can write, so there is "
                       "no TEMPLATE: Ollama falls back to its own guess from the GGUF's template; check its answers")
    else:
        lines.append(f'TEMPLATE """{layout.go_template()}"""')
        system = layout.default_system
        if system is not None:
            if '"""' in system:
                missing.append("the default system prompt holds three quotes in a row, which a Modelfile cannot")
            else:
                lines.append(f'SYSTEM """{system}"""')
        if template.reads("tools"):
            missing.append("tools: the template can list tools, which this TEMPLATE does not (plain chat only)")
    stops = stop_tokens(template, tokenizer) if layout is not None else sorted(
        t for i in tokenizer.stop_ids if (t := tokenizer.backend.id_to_token(i)) in END_OF_GENERATION_TOKENS)
    lines += [f"PARAMETER stop {json.dumps(token, ensure_ascii=False)}" for token in stops]
    lines += [f"PARAMETER {name} {_number(value)}" for name, value in sampling.items()]
    return "\n".join(lines) + "\n", missing


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
