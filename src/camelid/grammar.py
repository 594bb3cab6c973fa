"""Constrained decoding: answers that must follow a grammar (any JSON object, a JSON schema, a tool call), by
llguidance.

A `Grammar` is compiled once per request for the served model's tokenizer; each choice walks it with a `Matcher`,
which masks the next token's logits to the tokens the grammar allows and accepts the token sampled. The end of
generation (the tokenizer's stop tokens) is allowed only where the grammar is complete, so a finished answer
always parses.

Why llguidance (bench/grammar.py, 2-core Xeon, against xgrammar on the same vocabularies): a token's mask takes
19-33 us on SmolLM2's 49,152 tokens and Gemma 3's 262,144 (xgrammar: 3-24 us), compiling a schema 0.3-0.7 ms
(xgrammar: 3-28 ms). Both masks are under 0.2% of a decode step (20-50 ms here); every request brings its own
schema, so compile time counts more. llguidance also reads Lark grammars with JSON schemas inside them (a tool call
in the model's own format, `<tool_call>{...}</tool_call>`), and names the schema keywords it cannot enforce
(`not`, `if`, `uniqueItems`, ...), which the server refuses by name rather than ignoring.
"""

import json
import threading
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from camelid.errors import CamelidError
from camelid.tokenizer import Tokenizer

MAX_SCHEMA_CHARS = 64_000  # a schema is compiled per request: bound the work a client can ask for
MAX_SCHEMA_DEPTH = 64  # objects and lists within each other
# Whitespace between JSON tokens: at most 32 characters at a time (a newline and 15 levels of indentation), so a
# sampled answer cannot wander off into blank lines until max_tokens.
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,32}"}


class GrammarError(CamelidError):
    """A grammar or schema that cannot be enforced (what llguidance said about it)."""


_lock = threading.Lock()
_tokenizers: "weakref.WeakKeyDictionary[Tokenizer, object]" = weakref.WeakKeyDictionary()


def grammar_tokenizer(tokenizer: Tokenizer, vocab_size: int):
    """llguidance's view of `tokenizer` (each token's bytes, the stop tokens), made once per tokenizer: Gemma 3's
    262,144 tokens take 1.3 s."""
    import llguidance

    with _lock:
        made = _tokenizers.get(tokenizer)
        if made is None or made.vocab_size != vocab_size:
            made = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer, vocab_size)),
                                          n_vocab=vocab_size, eos_token=sorted(tokenizer.stop_ids))
            _tokenizers[tokenizer] = made
        return made


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads of a tokenizer."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.tokens = [tokenizer.token_bytes(i) if i < tokenizer.vocab_size else b"" for i in range(vocab_size)]
        self.eos_token_id = min(tokenizer.stop_ids) if tokenizer.stop_ids else None
        self.bos_token_id = None
        self.special_token_ids = sorted(tokenizer.stop_ids)

    def __call__(self, text: bytes | str) -> list[int]:
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return self.tokenizer.encode(text, add_special=False, parse_special=False)


@dataclass(frozen=True)
class Grammar:
    """A grammar (llguidance's Lark) checked against a model's tokenizer; `matcher()` starts one choice on it."""

    lark: str
    tokenizer: object  # llguidance.LLTokenizer

    def matcher(self) -> "Matcher":
        return Matcher(self)


def json_schema_grammar(tokenizer: Tokenizer, vocab_size: int, schema: dict | bool, *, strict: bool = False
                        ) -> Grammar:
    """Answers that are JSON valid under `schema`. A keyword llguidance does not implement is an error when it
    would change what is valid (`not`, `if`, `uniqueItems`...); with `strict`, so are its warnings."""
    if schema is False:
        raise GrammarError("the schema is false: no answer is valid under it")
    if (depth := _depth(schema)) > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"the schema nests {depth} levels deep; at most {MAX_SCHEMA_DEPTH} are compiled")
    schema = {**({} if schema is True else schema), "x-guidance": JSON_OPTIONS}
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_CHARS:
        raise GrammarError(f"the schema is {len(text)} characters; at most {MAX_SCHEMA_CHARS} are compiled")
    return lark_grammar(tokenizer, vocab_size, f"start: %json {text}", strict=strict)


def _depth(value, limit: int = MAX_SCHEMA_DEPTH + 1) -> int:
    """How deep objects and lists nest in `value` (counted up to `limit`, no further)."""
    if not isinstance(value, (dict, list)) or limit == 0:
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


def json_object_grammar(tokenizer: Tokenizer, vocab_size: int) -> Grammar:
    """Answers that are one JSON object (OpenAI's JSON mode)."""
    return json_schema_grammar(tokenizer, vocab_size, {"type": "object"})


def lark_grammar(tokenizer: Tokenizer, vocab_size: int, lark: str, *, strict: bool = False) -> Grammar:
    """A Lark grammar in llguidance's dialect (`%json {schema}` embeds a JSON schema)."""
    import llguidance

    made = grammar_tokenizer(tokenizer, vocab_size)
    try:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(lark, made)
    except (ValueError, RuntimeError) as exc:
        raise GrammarError(str(exc)) from None
    if is_error or (strict and messages):
        raise GrammarError("; ".join(messages) or "the grammar is not valid")
    return Grammar(lark, made)


class Matcher:
    """One choice's place in a grammar: `mask` the next token's logits, `accept` the token sampled."""

    def __init__(self, grammar: Grammar):
        import llguidance  # not llguidance.torch: it compiles a kernel with torch.compile on import (2 s)

        self._matcher = llguidance.LLMatcher(grammar.tokenizer, grammar.lark, log_level=0)
        self._bits = torch.full((1, (grammar.tokenizer.vocab_size + 31) // 32), -1, dtype=torch.int32)  # 1: allowed
        self._shifts = torch.arange(32, dtype=torch.int32)

    def mask(self, logits: Tensor) -> Tensor:
        """`logits` [1, vocab] with the tokens the grammar does not allow next set to -inf."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        allowed = ((self._bits[0, :, None] >> self._shifts) & 1).flatten()[: logits.shape[-1]].bool()
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self._matcher.get_error()}")

    @property
    def is_stopped(self) -> bool:
        """Nothing but the end of the answer may follow."""
        return self._matcher.is_stopped()
