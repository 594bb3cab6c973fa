"""Chat templates: a model's own Jinja template, or a named classic format, rendered in a sandbox.

A chat template is untrusted input (it comes with a downloaded model), so it runs in Jinja's
`ImmutableSandboxedEnvironment`, set up the way `transformers` sets up its chat templates (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML) so that
real models' templates render here exactly as they do there.

The built-ins reproduce FastChat's conversation formats for alpaca, vicuna_v1.1, koala_v1 and llama-2, and the
ChatML format (FastChat's ChatML style with the usual "You are a helpful assistant." system prompt). For model
files that carry no template of their own (`family_template` names the one for an architecture), four more render
what those families' official Hugging Face templates render for plain conversations: gemma (Gemma 2/3), qwen
(Qwen2.5-Instruct: ChatML with Qwen's default system prompt), llama-3 (Llama 3 Instruct, 3.0's format) and phi-3
(Phi-3-mini-instruct). A leading system message replaces a format's default system prompt; Gemma, which has no
system role, opens the first user turn with it.

BOS and EOS. `render`'s text is meant to be encoded with `add_special=False`, as transformers'
`apply_chat_template` does, so a template that wants a BOS token writes `bos_token` itself:

- A model's own template gets the tokenizer's tokens, as transformers gives them, and decides for itself:
  `ChatTemplate(source, bos_token=tok.bos_token, eos_token=tok.eos_token)`.
- A built-in writes `bos_token` at the start of the conversation (llama-2: before every `[INST]`, as Meta's
  format does) when one is given, and nothing when it is not; qwen and phi-3 never write one, as their official
  templates do not. So give it exactly when the model's tokenizer adds BOS to a sequence:
  `ChatTemplate.named(name, bos_token=tok.bos_token if tok.add_bos else None, eos_token=tok.eos_token)`.
  Without that, a LLaMA model would see a conversation with no BOS, and a model that never uses one (SmolLM2,
  most ChatML models) would see a stray token.
- The FastChat formats end each assistant turn with `eos_token` (FastChat's `</s>`, LLaMA's EOS, when none is
  given), so a fine-tuned model learns to stop with its own EOS. The others end turns with their family's
  end-of-turn token: `<|im_end|>` (chatml, qwen), `<end_of_turn>` (gemma), `<|eot_id|>` (llama-3), `<|end|>`
  (phi-3, whose template also ends a conversation that has no generation prompt with `eos_token`).

Training masks (`assistant_spans`) come from the template itself: the conversation is rendered up to each
assistant turn and through it, and the difference is that turn's text. Nothing is split on separator strings.
"""

import json
import re
from bisect import bisect_left, bisect_right
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from camelid.errors import CamelidError
from camelid.files import read_json

# Earlier jinja2 releases have known sandbox escapes; a chat template is code from the internet.
MIN_JINJA2 = (3, 1, 6)


# -- the built-in formats ----------------------------------------------------------------------------------


def _literal(text: str) -> str:
    """`text` as a Jinja string literal (Jinja reads JSON's escapes)."""
    return json.dumps(text)


# Shared opening of every built-in: a leading system message replaces the default system prompt.
_SYSTEM_SPLIT = """\
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system_message = messages[0]['content'] -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system_message = DEFAULT_SYSTEM -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
"""

_ALTERNATION_CHECK = """\
    {%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}
        {{- raise_exception('NAME: after an optional system message, roles must alternate user, assistant, ...') -}}
    {%- endif -%}
"""


def _colon_two(name: str, system: str, user: str, assistant: str, sep: str) -> str:
    """FastChat's ADD_COLON_TWO style: `system SEP USER: u SEP ASSISTANT: a EOS USER: ...`."""
    return (
        _SYSTEM_SPLIT.replace("DEFAULT_SYSTEM", _literal(system))
        + "{%- set eos = eos_token if eos_token else '</s>' -%}\n"
        + "{{- bos_token if bos_token else '' -}}\n"
        + f"{{{{- system_message + {_literal(sep)} -}}}}\n"
        + "{%- for message in loop_messages -%}\n"
        + _ALTERNATION_CHECK.replace("NAME", name)
        + "    {%- if message['role'] == 'user' -%}\n"
        + f"        {{{{- {_literal(user + ': ')} + message['content'] + {_literal(sep)} -}}}}\n"
        + "    {%- else -%}\n"
        + f"        {{{{- {_literal(assistant + ': ')} + message['content'] + eos -}}}}\n"
        + "    {%- endif -%}\n"
        + "{%- endfor -%}\n"
        + "{%- if add_generation_prompt -%}\n"
        + f"    {{{{- {_literal(assistant + ':')} -}}}}\n"
        + "{%- endif -%}\n"
    )


# FastChat's LLAMA2 style: `[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{u1} [/INST] {a1} </s><s>[INST] {u2} [/INST]`,
# with the BOS that LLaMA's tokenizer adds in front. No default system prompt. The BOS of FastChat's separator
# " </s><s>" opens the next [INST] turn here, so a conversation that ends with a reply ends with "</s>", not a
# dangling "<s>", and a reply's text ends at its EOS.
_LLAMA_2 = (
    _SYSTEM_SPLIT.replace("DEFAULT_SYSTEM", "''")
    + """\
{%- set eos = eos_token if eos_token else '</s>' -%}
{%- for message in loop_messages -%}
"""
    + _ALTERNATION_CHECK.replace("NAME", "llama-2")
    + """\
    {%- if message['role'] == 'user' -%}
        {{- bos_token if bos_token else '' -}}
        {%- if loop.first and system_message -%}
            {{- '[INST] <<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] + ' ' -}}
        {%- else -%}
            {{- '[INST] ' + message['content'] + ' ' -}}
        {%- endif -%}
    {%- else -%}
        {{- '[/INST] ' + message['content'] + ' ' + eos -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '[/INST]' -}}
{%- endif -%}
"""
)


def _chatml(default_system: str, *, bos: bool) -> str:
    """ChatML: `<|im_start|>role\ncontent<|im_end|>\n` per message, the system block always present."""
    return (
        _SYSTEM_SPLIT.replace("DEFAULT_SYSTEM", _literal(default_system))
        + ("{{- bos_token if bos_token else '' -}}\n" if bos else "")
        + """\
{{- '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' -}}
{%- for message in loop_messages -%}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""
    )


# Gemma 2/3's turns, assistant written `model`, contents trimmed. Gemma has no system role: as Gemma 3's own
# template does, a system message's text and a blank line open the first user turn (Gemma 2's refuses one).
_GEMMA = (
    _SYSTEM_SPLIT.replace("DEFAULT_SYSTEM", "none")
    + """\
{%- set first_prefix = system_message + '\\n\\n' if system_message is not none else '' -%}
{{- bos_token if bos_token else '' -}}
{%- for message in loop_messages -%}
"""
    + _ALTERNATION_CHECK.replace("NAME", "gemma")
    + """\
    {{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\\n' -}}
    {{- (first_prefix if loop.first else '') + (message['content'] | trim) + '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\\n' -}}
{%- endif -%}
"""
)

# Llama 3's instruct format as Meta-Llama-3-8B-Instruct's template writes it: a header per message, contents
# trimmed, BOS before the first one, no default system prompt. This is 3.0's plain format, as FastChat's llama-3
# (after 0.2.36) writes it: Llama 3.1's template also opens every conversation with a system block of its own
# ("Cutting Knowledge Date: December 2023", "Today Date: 26 Jul 2024", and 3.2's the day it runs), which models
# trained on 3.0's format never saw and which makes 3.2's rendering depend on the date.
_LLAMA_3 = """\
{%- for message in messages -%}
    {{- bos_token if loop.first and bos_token else '' -}}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}
    {{- (message['content'] | trim) + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{%- endif -%}
"""

# Phi-3-mini-instruct's format: `<|role|>\ncontent<|end|>\n` for system, user and assistant messages (others are
# left out, as Phi-3's template leaves them), no BOS, no default system prompt. Without a generation prompt the
# conversation ends with EOS, as there (assistant_spans leaves that EOS out of the last turn).
_PHI_3 = """\
{%- for message in messages -%}
    {%- if message['role'] in ['system', 'user', 'assistant'] -%}
        {{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>\\n' -}}
{%- else -%}
    {{- eos_token if eos_token else '' -}}
{%- endif -%}
"""

BUILTIN_TEMPLATES: dict[str, str] = {
    "alpaca": _colon_two(
        "alpaca",
        system="Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.",
        user="### Instruction",
        assistant="### Response",
        sep="\n\n",
    ),
    "vicuna_v1.1": _colon_two(
        "vicuna_v1.1",
        system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        user="USER",
        assistant="ASSISTANT",
        sep=" ",
    ),
    "koala_v1": _colon_two("koala_v1", system="BEGINNING OF CONVERSATION:", user="USER", assistant="GPT", sep=" "),
    "chatml": _chatml("You are a helpful assistant.", bos=True),
    "llama-2": _LLAMA_2,
    "gemma": _GEMMA,
    # Qwen2.5-Instruct's default system prompt; Qwen's tokenizers have no BOS and its template writes none.
    "qwen": _chatml("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", bos=False),
    "llama-3": _LLAMA_3,
    "phi-3": _PHI_3,
}
_BUILTIN_SOURCES = frozenset(BUILTIN_TEMPLATES.values())
# Real templates are a few thousand characters (Llama 3.1's with tools: ~5,000), and render what they are given
# (the conversation, tool definitions) plus at most some thousands of characters of their own.
MAX_TEMPLATE_CHARS = 200_000
MAX_RENDER_CHARS = 1_000_000  # what a model's template may write beyond twice its variables' size as JSON


# -- the sandbox -------------------------------------------------------------------------------------------


class _Refusal(TemplateError):
    """Raised by a template's own `raise_exception(message)`: the template rejects the conversation."""


def _raise_exception(message):
    raise _Refusal(str(message))


def _strftime_now(format):
    return datetime.now().strftime(format)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & for HTML; chat templates need the plain JSON text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _DictGlobal:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the `dict` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace()`, refusing underscore names, which could shadow Python internals."""

    def __init__(*args, **kwargs):  # no named `self`, like Jinja's, so that namespace(self=...) works
        namespace, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for key in attrs:
            _Namespace._check(key)
        jinja2.utils.Namespace.__init__(namespace, attrs)

    def __setitem__(self, key, value):
        _Namespace._check(key)
        jinja2.utils.Namespace.__setitem__(self, key, value)

    @staticmethod
    def _check(key):
        if isinstance(key, str) and key.startswith("_"):
            raise SecurityError(f"a chat template may not set the underscore attribute {key!r} on a namespace")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' marker for assistant text, renders its body as is.

    Masks here come from prefix renderings instead, but templates written for transformers must still compile.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, also refusing `'x' * 10**10` and `2 ** 10**9`, the obvious memory bombs.

    A best effort, not a bound: filters such as `center` or `%`-formatting can still build large strings.

    Intercepting these operators also stops Jinja from folding them at compile time.
    """

    intercepted_binops = frozenset({"*", "**"})
    MAX_ITEMS = 10_000_000  # characters or elements a repetition may build
    MAX_BITS = 1_000_000  # bits an integer power may have

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > self.MAX_ITEMS:
                    raise SecurityError(f"a repetition of more than {self.MAX_ITEMS} items")
        elif isinstance(left, int) and isinstance(right, int) and right > 0:
            if max(left.bit_length(), 1) * right > self.MAX_BITS:
                raise SecurityError(f"an integer power of more than {self.MAX_BITS} bits")
        return super().call_binop(context, operator, left, right)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


@lru_cache(maxsize=1)
def _environment() -> _Sandbox:
    if _version_tuple(jinja2.__version__) < MIN_JINJA2:
        wanted = ".".join(map(str, MIN_JINJA2))
        raise CamelidError(
            f"jinja2 {jinja2.__version__} has known sandbox escapes and cannot run chat templates safely; "
            f"upgrade it: pip install -U 'jinja2>={wanted}'"
        )
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictGlobal()
    env.globals["namespace"] = _Namespace
    return env


@lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    return _environment().from_string(source)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _plain(value):
    """A copy of `value` made of JSON types only: what the template sees can carry no methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    raise CamelidError(
        f"chat messages and template variables must be JSON data (str, number, bool, list, dict), "
        f"not {type(value).__name__}; convert it before rendering"
    )


# Names a message's reasoning goes by; like transformers, each template finds it under the two it may read.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _plain_message(message) -> dict:
    if not isinstance(message, Mapping):
        raise CamelidError(f"a chat message must be a dict with 'role' and 'content', not {type(message).__name__}")
    # Like transformers: a key set to None (OpenAI's content=None, tool_calls=None) counts as absent.
    plain = {key: _plain(value) for key, value in message.items() if value is not None}
    reasoning = next((plain[key] for key in _REASONING_KEYS if key in plain), None)
    if reasoning is not None:
        plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
    return plain


# -- templates ---------------------------------------------------------------------------------------------


class ChatTemplate:
    """A compiled chat template and the special tokens it is given.

    `ChatTemplate(source)` for a model's own Jinja template, `ChatTemplate.named("vicuna_v1.1")` for a built-in.
    See the module docstring for which `bos_token` to give.
    """

    def __init__(
        self, source: str, *, bos_token: str | None = None, eos_token: str | None = None, name: str | None = None
    ):
        self.source = source
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        if not isinstance(source, str) or len(source) > MAX_TEMPLATE_CHARS:
            size = f"{len(source):,} characters" if isinstance(source, str) else type(source).__name__
            raise CamelidError(f"chat template {self._label()} is {size}, not a string of at most "
                               f"{MAX_TEMPLATE_CHARS:,} characters; use a built-in one ({', '.join(BUILTIN_TEMPLATES)})")
        # camelid's own templates render in process; any other is compiled and rendered in a bounded worker
        self._template = _compile(source) if source in _BUILTIN_SOURCES else None
        if self._template is None:
            self._checked(self._ask({"source": source}))  # one that does not compile is refused now

    @classmethod
    def named(cls, name: str, *, bos_token: str | None = None, eos_token: str | None = None) -> "ChatTemplate":
        """A built-in template by name: alpaca, vicuna_v1.1, koala_v1, chatml, llama-2, gemma, qwen, llama-3, phi-3."""
        key = name.lower()
        if key not in BUILTIN_TEMPLATES:
            raise CamelidError(f"unknown chat template {name!r}; built-in templates: {', '.join(BUILTIN_TEMPLATES)}")
        return cls(BUILTIN_TEMPLATES[key], bos_token=bos_token, eos_token=eos_token, name=key)

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, bos_token={self.bos_token!r}, eos_token={self.eos_token!r})"

    def _label(self) -> str:
        return repr(self.name) if self.name else "(unnamed)"

    def reads(self, variable: str) -> bool:
        """Whether the template uses `variable` at all (`tools`: it can put tool definitions in the prompt)."""
        from jinja2 import meta

        try:  # parsing runs nothing, and the source is at most MAX_TEMPLATE_CHARS
            return variable in meta.find_undeclared_variables(_environment().parse(self.source))
        except (TemplateError, RecursionError):
            return False

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False, **extra) -> str:
        """The conversation as the model's text. `extra` are further template variables (tools, documents, ...)."""
        # The variables transformers passes: special tokens, then the caller's, then the conversation.
        variables = {"tools": None, "documents": None}
        if self.bos_token is not None:
            variables["bos_token"] = self.bos_token
        if self.eos_token is not None:
            variables["eos_token"] = self.eos_token
        variables.update({key: _plain(value) for key, value in extra.items()})
        variables["messages"] = [_plain_message(m) for m in messages]
        variables["add_generation_prompt"] = bool(add_generation_prompt)
        if self._template is not None:
            reply = render_request({"variables": variables}, self._template)
        else:
            reply = self._ask({"source": self.source, "variables": variables})
        return self._checked(reply)["text"]

    def _ask(self, request: dict) -> dict:
        """A worker's reply to `request` (camelid.template_worker); its failures as one-line errors."""
        from camelid.template_worker import RENDER_SECONDS, WORKER_MEMORY, Stopped, ask

        try:
            reply = ask(request)
        except Stopped as exc:
            limit = (f"took more than {RENDER_SECONDS:g} s to render" if exc.reason == "time" else
                     f"used more than its {WORKER_MEMORY >> 20} MiB of memory" if exc.reason == "memory" else
                     f"stopped its worker process ({exc.reason})")
            raise CamelidError(f"chat template {self._label()} {limit} and was stopped (a template limit); "
                               f"do not use this template, or pick a built-in one ({', '.join(BUILTIN_TEMPLATES)})"
                               ) from None
        return reply

    def _checked(self, reply: dict) -> dict:
        error = reply.get("error")
        if error is None:
            return reply
        detail, fix = reply.get("message", ""), f"use a built-in template ({', '.join(BUILTIN_TEMPLATES)})"
        raise CamelidError({
            "syntax": f"chat template {self._label()} does not compile: {detail}; fix it or {fix}",
            "refusal": f"chat template {self._label()} refused the conversation: {detail}",
            "security": f"chat template {self._label()} tried something the sandbox forbids: {detail}; "
                        "do not use this template",
            "length": f"chat template {self._label()} rendered more than {detail} characters and was stopped "
                      f"(a template limit); do not use this template, or {fix}",
            "memory": f"chat template {self._label()} ran out of memory and was stopped (a template limit); {fix}",
        }.get(error, f"chat template {self._label()} failed to render: {detail}; check the messages it expects "
                     f"or {fix}"))


def render_request(request: dict, template: jinja2.Template | None = None) -> dict:
    """What a request to render (or only compile) a template gives: {"text": ...} or {"error": kind, "message"}.

    Run by the template workers on a model's template, and in process on a built-in (`template`, compiled).
    `request` holds the template's `source` (when not given compiled) and, to render, the `variables`. A model's
    template stops at MAX_RENDER_CHARS plus twice the variables' size as JSON, so that text it makes up cannot
    grow without bound while a long conversation, or many tools, still renders.
    """
    trusted = template is not None
    try:
        template = template or _compile(request["source"])
    except TemplateSyntaxError as exc:
        return {"error": "syntax", "message": f"{_one_line(exc)} (line {exc.lineno})"}
    except MemoryError:
        return {"error": "memory"}
    except Exception as exc:  # RecursionError on deep nesting, SecurityError while folding constants, ...
        return {"error": "failure", "message": f"{type(exc).__name__} while compiling: {_one_line(exc)}"}
    variables = request.get("variables")
    if variables is None:
        return {"text": ""}
    # camelid's own templates cannot run away; a model's may write only so much beyond what it was given
    limit = None if trusted else MAX_RENDER_CHARS + 2 * len(json.dumps(variables, ensure_ascii=False))
    try:
        pieces, size = [], 0
        for piece in template.generate(**variables):
            size += len(piece)
            if limit is not None and size > limit:
                return {"error": "length", "message": f"{limit:,}"}
            pieces.append(piece)
        return {"text": "".join(pieces)}
    except _Refusal as exc:
        return {"error": "refusal", "message": _one_line(exc)}
    except SecurityError as exc:
        return {"error": "security", "message": _one_line(exc)}
    except MemoryError:
        return {"error": "memory"}
    except Exception as exc:  # the template is untrusted input: any failure of it is the template's
        return {"error": "failure", "message": f"{type(exc).__name__}: {_one_line(exc)}"}


def read_chat_template(path: str | Path) -> str | None:
    """A model's own chat template, or None when it has none.

    `path` is a GGUF file (`tokenizer.chat_template` metadata) or a Hugging Face directory: its
    `chat_template.jinja` (recent transformers), else `tokenizer_config.json`'s `chat_template`, a string or a
    list of `{"name", "template"}` of which the `default` one is taken.
    """
    path = Path(path)
    if path.is_dir():
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8") or None
        config_file = path / "tokenizer_config.json"
        if not config_file.is_file():
            return None
        config = read_json(config_file)
        if not isinstance(config, dict):
            raise CamelidError(f"{config_file}: expected a JSON object; repair or replace the file")
        return _template_from_config(config.get("chat_template"), config_file)
    if path.is_file():
        from camelid.gguf_file import GGUFFile  # here, not above: it loads torch, which template names do not need

        value = GGUFFile(path).metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value else None
    raise CamelidError(f"{path}: no such file or directory; give a GGUF file or a Hugging Face model directory")


def _template_from_config(value, config_file: Path) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and "name" in t and "template" in t for t in value):
        named = {t["name"]: t["template"] for t in value}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise CamelidError(
            f"{config_file} has chat templates {', '.join(map(str, named))} but none named 'default'; "
            "give a template explicitly"
        )
    raise CamelidError(
        f"{config_file}: 'chat_template' must be a string or a list of {{name, template}}, "
        f"not {type(value).__name__}; repair the file"
    )


# -- training masks ----------------------------------------------------------------------------------------


def assistant_spans(template: ChatTemplate, messages: list[dict], tokenizer, **extra) -> list[tuple[int, int]]:
    """Token spans [start, end) of the assistant turns in the conversation's tokens.

    The tokens are `tokenizer.encode(template.render(messages, **extra), add_special=False)`, `extra` being
    further template variables (`tools`); the tokenizer needs
    `encode_with_offsets(text, add_special=False) -> (ids, [(start_char, end_char)])`.

    A turn's text is what the model must generate after the prompt that `add_generation_prompt` ends with: the
    rendering through the turn minus the rendering of the conversation before it with the generation prompt,
    i.e. the content and the end-of-turn marker after it (`<|im_end|>`, `</s>`). Whitespace the template writes
    after that marker (ChatML's newline) is left out, since the model stops before it, and so is an EOS that the
    template writes only at the end of a conversation without a generation prompt (Phi-3's, after `<|end|>\n`):
    that closes the conversation, not the turn. A token that straddles a span's edge belongs to the span. There is
    one span per assistant message, in order (empty if the turn renders no text).

    Raises CamelidError when the template renders an earlier part of the conversation differently from how the
    whole conversation starts (e.g. it rewrites earlier turns): then no mask would match what the model sees.
    """
    full = template.render(messages, **extra)
    char_spans = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True, **extra)
        closing = _closing_eos(template, messages[:i], prompt, extra)
        through = template.render(messages[: i + 1], **extra).removesuffix(closing)
        if not (through.startswith(prompt) and full.removesuffix(closing).startswith(through)):
            raise CamelidError(
                f"chat template {template._label()} does not render the conversation before message {i} as the "
                "start of the whole conversation, so its assistant turns cannot be masked exactly; "
                "train with a built-in template (e.g. chatml) instead"
            )
        start = len(prompt)
        char_spans.append((start, max(start, len(through.rstrip()))))

    _, offsets = tokenizer.encode_with_offsets(full, add_special=False)
    token_starts = [s for s, _ in offsets]
    token_ends = [e for _, e in offsets]
    spans = []
    for char_start, char_end in char_spans:
        if char_start == char_end:
            first = bisect_left(token_starts, char_start)
            spans.append((first, first))
            continue
        first = bisect_right(token_ends, char_start)  # the first token ending inside or after the span's start
        last = bisect_left(token_starts, char_end)  # the first token starting at or after the span's end
        spans.append((first, max(first, last)))
    return spans


def _closing_eos(template: ChatTemplate, before: list[dict], prompt: str, extra: dict) -> str:
    """`template`'s EOS if it ends the conversation `before` with it but writes the generation prompt (`prompt`) in
    its place, as Phi-3's does; else ''. Such an EOS closes a finished conversation, and no turn learns it."""
    eos = template.eos_token
    if not eos:
        return ""
    ended = template.render(before, **extra)
    if not prompt.startswith(ended) and ended.endswith(eos) and prompt.startswith(ended.removesuffix(eos)):
        return eos
    return ""


# -- a built-in per model family ---------------------------------------------------------------------------

# model_type -> the built-in in that family's format and the tokens the format needs whole in the vocabulary.
_FAMILY_TEMPLATES = {
    "gemma3": ("gemma", ("<start_of_turn>", "<end_of_turn>")),
    "gemma3_text": ("gemma", ("<start_of_turn>", "<end_of_turn>")),
    "qwen2": ("qwen", ("<|im_start|>", "<|im_end|>")),
    "phi3": ("phi-3", ("<|user|>", "<|assistant|>", "<|end|>")),
    # Llama 2, Mistral and SmolLM2 files say `llama` too: only Llama 3's vocabulary has these.
    "llama": ("llama-3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
}


def template_for(tokenizer, source: str | None, model_type: str | None, *, name: str | None = None,
                 what: str = "the model") -> "ChatTemplate":
    """The template to render a model's chats with: the built-in `name` when given, else the model's own Jinja
    `source`, else the built-in in its family's format (family_template), else a one-line error about `what`."""
    name = name or (None if source else family_template(model_type, tokenizer))
    if name:
        # A built-in writes BOS itself, so only where this tokenizer would have added one.
        bos = tokenizer.bos_token if tokenizer.add_bos else None
        return ChatTemplate.named(name, bos_token=bos, eos_token=tokenizer.eos_token)
    if not source:
        raise CamelidError(f"{what} has no chat template; pick a built-in with --template "
                           f"({', '.join(BUILTIN_TEMPLATES)})")
    return ChatTemplate(source, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)


def family_template(model_type: str | None, tokenizer) -> str | None:
    """The name of the built-in template in a model family's format, for a model file that carries none.

    `model_type` is config.json's `model_type` or a GGUF file's `general.architecture`; `tokenizer` is the
    model's (camelid.tokenizer.Tokenizer). None when the family has no built-in or the vocabulary lacks the
    tokens its format is written in. Qwen3 (`qwen3`) has none: its own template writes no default system prompt
    and handles reasoning, unlike Qwen2.5's that `qwen` follows.
    """
    name, tokens = _FAMILY_TEMPLATES.get(model_type, (None, ()))
    if name is None or any(tokenizer.backend.token_to_id(token) is None for token in tokens):
        return None
    return name
