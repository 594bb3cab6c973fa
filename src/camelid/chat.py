"""Chatting with a model: turning a conversation into prompt tokens, and the interactive terminal session."""

import sys
from collections.abc import Callable

from camelid.checkpoint import LoadedModel
from camelid.errors import CamelidError
from camelid.generate import SamplingParams, stream

CHAT_HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt and start over (/system alone removes it)
  /help           show this help
  /exit           leave (Ctrl-D too); Ctrl-C stops an answer in progress"""


def chat_template_for(loaded: LoadedModel, name: str | None = None):
    """The template to chat with: a named built-in when given, else the model's own, else the built-in in its
    family's format (a Gemma 3 base GGUF carries none: `gemma`)."""
    from camelid.chat_template import template_for

    model_type = None if name or loaded.chat_template else loaded.config.model_type  # the family, only if needed
    return template_for(loaded.tokenizer, loaded.chat_template, model_type, name=name, what=loaded.source.name)


def family_template_name(loaded: LoadedModel) -> str | None:
    """The built-in template in the model family's format, for a model without a template of its own."""
    from camelid.chat_template import family_template

    return family_template(loaded.config.model_type, loaded.tokenizer)


def model_notes(loaded: LoadedModel, template_name: str | None = None) -> list[str]:
    """What a person chatting with this model should know first: that a base model was not taught to chat, and
    which built-in template stands in for one the file lacks."""
    from camelid.named_models import named_model_at

    notes = []
    named = named_model_at(loaded.source)
    if named is not None and not named.instruct:
        notes.append(f"{named.name} is a base model, not instruction-tuned: it continues text rather than follows "
                     "instructions; fine-tune it (camelid train, camelid quickstart) for an assistant")
    if not template_name and not loaded.chat_template:
        notes.append(f"{loaded.source.name} has no chat template; using the built-in "
                     f"{family_template_name(loaded)!r} (its family's format)")
    return notes


def encode_chat(loaded: LoadedModel, template, messages: list[dict], *, keep_tokens: int = 0) -> list[int]:
    """Prompt tokens for a conversation, ending where the assistant's next turn begins.

    When the conversation no longer fits the context (less `keep_tokens` for the answer), the oldest turns
    after the system message are dropped, a user turn and its answer at a time, as chat front-ends do.
    """
    limit = loaded.config.max_sequence_length - keep_tokens
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    while True:
        ids = loaded.tokenizer.encode(template.render(system + turns, add_generation_prompt=True), add_special=False)
        if len(ids) <= limit or len(turns) <= 1:
            return ids
        turns = turns[2:]


def with_system_prompt(system: str | None, turns: list[dict]) -> list[dict]:
    """A conversation's messages: the system prompt first when there is one, then the turns (a new list)."""
    return ([{"role": "system", "content": system}] if system else []) + list(turns)


def encode_prompt(loaded: LoadedModel, text: str, *, chat: bool = False, template_name: str | None = None,
                  system: str | None = None) -> list[int]:
    """Prompt tokens for one completion, as `camelid generate` sends them: the text as it is or, with `chat`, a
    template name or a system prompt, the text as a user message rendered by the chat template."""
    if not (chat or template_name or system):
        return loaded.tokenizer.encode(text)
    template = chat_template_for(loaded, template_name)
    return encode_chat(loaded, template, with_system_prompt(system, [{"role": "user", "content": text}]))


def run_chat(
    loaded: LoadedModel,
    params: SamplingParams,
    *,
    template_name: str | None = None,
    system: str | None = None,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = lambda s: (sys.stdout.write(s), sys.stdout.flush()),
    stream_answer: Callable | None = None,
) -> None:
    """The `camelid chat` loop: read a line, stream the answer, keep the history; commands start with '/'.

    `stream_answer` is `camelid.generate.stream` (the default), or `camelid.llamacpp.stream` for a model on
    llama.cpp."""
    stream_answer = stream_answer or stream
    template = chat_template_for(loaded, template_name)
    history: list[dict] = []
    write(f"camelid chat with {loaded.source.name} — /help for commands, Ctrl-D to leave\n")
    for note in model_notes(loaded, template_name):
        write(f"note: {note}\n")
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n(use /exit or Ctrl-D to leave)\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                history = []
                write("(conversation cleared)\n")
            elif command == "/system":
                system, history = (arg.strip() or None), []
                write(f"(system prompt {'set' if system else 'removed'}; conversation cleared)\n")
            elif command == "/help":
                write(CHAT_HELP + "\n")
            else:
                write(f"unknown command {command}; /help lists the commands\n")
            continue
        messages = with_system_prompt(system, [*history, {"role": "user", "content": text}])
        try:
            prompt = encode_chat(loaded, template, messages, keep_tokens=min(params.max_new_tokens, 512))
            if len(prompt) >= loaded.config.max_sequence_length:
                raise CamelidError(
                    f"that message is too long: {len(prompt)} tokens with the template, the model's context "
                    f"is {loaded.config.max_sequence_length}; send a shorter one"
                )
        except CamelidError as exc:  # a message the model cannot take ends this turn, not the conversation
            write(f"error: {exc}\n")
            continue
        history.append({"role": "user", "content": text})
        answer = ""
        try:
            for piece in stream_answer(loaded.model, loaded.tokenizer, prompt, params):
                answer += piece
                write(piece)
        except KeyboardInterrupt:
            write(" [stopped]")
        write("\n")
        history.append({"role": "assistant", "content": answer})
