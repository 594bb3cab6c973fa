"""Tokenizers: a Hugging Face `tokenizers.Tokenizer` plus the special-token facts a checkpoint states.

Two sources are read. An HF-format directory carries `tokenizer.json` (and usually `tokenizer_config.json`);
a GGUF file carries only the vocabulary as metadata, so the tokenizer is rebuilt from it here the way llama.cpp
interprets the same keys, since llama.cpp is the program those files are made for:

- `tokenizer.ggml.model = "gpt2"`: byte-level BPE from the stored tokens and merges, split first by the regular
  expressions that llama.cpp uses for the file's `tokenizer.ggml.pre` value.
- `tokenizer.ggml.model = "llama"`: SentencePiece BPE. llama.cpp merges the adjacent pair whose joined text is
  the highest-scoring token of any type, which is BPE with merges ranked by the merged token's score; characters
  missing from the vocabulary fall back to `<0xNN>` byte tokens, and a space is prefixed to every run of text (the
  start, and after each special token) when `add_space_prefix` is set (Gemma's files say it is not).

Token types in a GGUF vocabulary: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte. Unknown and
control tokens become special added tokens, user-defined ones plain added tokens. llama.cpp cuts all three whole
out of the text before anything else (with `parse_special`), and so does `encode` here; with
`parse_special=False` it still cuts out the user-defined ones (Gemma's runs of spaces, tabs and newlines, its HTML
tags), and unknown and control tokens are text like any other. Each stretch of text between them is tokenized on
its own. (llama.cpp cuts the longest token out everywhere first, `tokenizers` takes the leftmost longest match;
they part only where two such tokens overlap and the choice changes the result, as no text tested here does.) llama.cpp
also makes a control token of each token named in `END_OF_GENERATION_TOKENS`, whatever type the file gives it,
and stops generation at it: Gemma 3's user-defined HTML `</s>` too (llama.cpp 0.3.36 lists `</s>` for another
model), except in a vocabulary with `<|tool_response>` or `<|plamo:eos|>` (Gemma 4, PLaMo), where `</s>` is
made a normal token.

Measured (llama-cpp-python 0.3.36): ids equal llama.cpp's on 1,500 ShareGPT messages and edge texts for SmolLM2
(49,152 tokens, byte-level BPE) and Gemma 3 (262,144 tokens, SentencePiece BPE), with and without BOS, with and
without `parse_special`. Building Gemma 3's tokenizer from its metadata takes 1.1 s on a 2-core CPU (llama.cpp
loads the same vocabulary in 0.34 s): half listing the 515K merges (each split of a token into two tokens), a
third building the BPE model from them in `tokenizers`.
"""

import copy
import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from camelid.errors import CamelidError, shown
from camelid.files import read_json, write_atomic

# GGUF token types (llama.cpp's `llama_token_type`).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn or a document. Many files name only one EOS id, so llama.cpp finds the others by these
# texts (llama.cpp 0.3.36's list), and makes them control tokens (parsed whole from text, not with
# parse_special=False) whatever type the file gives them.
END_OF_GENERATION_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<end_of_utterance>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "</s>",
    "[EOT]",
    "[EOS]",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",  # DeepSeek's, with full-width bars
    "[e~[",
)
# A vocabulary with one of these has a `</s>` that is ordinary text (Gemma 4, PLaMo), as llama.cpp decides.
_NORMAL_END_OF_SENTENCE_MARKERS = ("<|tool_response>", "<|plamo:eos|>")

# The split expressions llama.cpp applies, one after another, before byte-level BPE, by `tokenizer.ggml.pre`.
# Each one splits every piece the previous one left into its matches and the text between them.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_SPLITS_BY_PRE = {
    # llama.cpp's own fallback for a vocabulary whose pre-tokenizer its converter did not recognise.
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais"), (_GPT2,)),
    # Each digit on its own first (SmolLM, StarCoder and relatives).
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"), (r"\p{N}", _GPT2)
    ),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "dbrx", "smaug-bpe"), (_LLAMA3,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), (_QWEN2,)),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
}
# Llama 3 and kin: BPE takes a whole pre-token that is itself a token before merging (tiktoken's rule, which
# llama.cpp applies to these names only), and BOS is added unless the file says otherwise.
_LLAMA3_LIKE = {"llama-bpe", "llama3", "llama-v3", "falcon3"}

_SPIECE_SPACE = "\u2581"  # SentencePiece writes a space as '▁'


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the checkpoint's special-token facts."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        stop_ids: Iterable[int] = (),
        vocab_size: int | None = None,
    ):
        self.backend = backend
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos = add_bos and bos_id is not None  # a flag without the token cannot be honoured
        self.add_eos = add_eos and eos_id is not None
        self.stop_ids = frozenset(stop_ids) | ({eos_id} if eos_id is not None else set())
        self.vocab_size = vocab_size if vocab_size is not None else backend.get_vocab_size(with_added_tokens=True)
        # The backend's post-processor adds BOS/EOS for `add_special_tokens=True`; make it say what the file says,
        # so that `encode`, `backend.encode` and transformers loading a saved copy all agree.
        wanted = [bos_id] * self.add_bos + [eos_id] * self.add_eos
        if backend.encode("", add_special_tokens=True).ids != wanted:
            bos = self.bos_token if self.add_bos else None
            eos = self.eos_token if self.add_eos else None
            backend.post_processor = _wrapping(bos, bos_id, eos, eos_id)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.backend.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.backend.id_to_token(self.eos_id)

    @property
    def pad_token(self) -> str | None:
        return None if self.pad_id is None else self.backend.id_to_token(self.pad_id)

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; BOS is added when `add_special` and the checkpoint adds one. Special tokens written
        in the text are parsed as such when `parse_special` (as llama.cpp's tokenize(special=True), and as chat
        and serving render templates); without it they are tokenized as the text they are, as llama.cpp's
        special=False, and only user-defined tokens are still matched whole."""
        backend = self.backend if parse_special else self._literal_backend
        return backend.encode(text, add_special_tokens=add_special).ids

    @functools.cached_property
    def _literal_backend(self) -> BackendTokenizer:
        """A copy of the backend that leaves special tokens in text as text: a second tokenizer, not a switch on
        the shared one that another thread could see flipped. Made on first use (Gemma 3's: 1.1 s, 300 MB)."""
        backend = copy.deepcopy(self.backend)
        backend.encode_special_tokens = True
        return backend

    def encode_with_offsets(
        self, text: str, *, add_special: bool = False
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character offsets into `text` (an added BOS gets (0, 0))."""
        encoding = self.backend.encode(text, add_special_tokens=add_special)
        return encoding.ids, [tuple(span) for span in encoding.offsets]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """An upper bound on the characters of text one token stands for: twice its longest vocabulary entry (a
        normalizer may join characters, as NFC joins a letter and its accent). Text longer than `n` times this
        cannot be fewer than `n` tokens, which says so without tokenizing it."""
        return 2 * max(len(piece) for piece in self.backend.get_vocab(with_added_tokens=True))

    @functools.cached_property
    def _added_ids(self) -> frozenset[int]:
        # built by the backend anew on each call: thousands of tokens on Gemma (8 ms), so asked once
        return frozenset(self.backend.get_added_tokens_decoder())

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, which may be part of a character (decode() would show U+FFFD)."""
        piece = self.backend.id_to_token(int(token_id))
        if piece is None:
            return b""
        if int(token_id) in self._added_ids:
            return piece.encode()
        decoder = type(self.backend.decoder).__name__
        if decoder == "ByteLevel":  # GPT-2's byte-to-printable-character alphabet
            table = _printable_to_byte()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            return piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()  # SentencePiece's word-boundary mark is a space

    def save(self, directory: str | Path, *, chat_template: str | None = None) -> None:
        """Write an HF-format tokenizer that `transformers.AutoTokenizer.from_pretrained` loads to the same ids."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        special = {
            name: token
            for name, token in (
                ("bos_token", self.bos_token),
                ("eos_token", self.eos_token),
                ("pad_token", self.pad_token),
                ("unk_token", _unk_token(self.backend)),
            )
            if token is not None
        }
        config = {
            # The generic class loads tokenizer.json as written; a model-specific class (LlamaTokenizer, ...)
            # would rebuild its own pre-tokenizer and could tokenize differently from this one.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False,
        }
        if chat_template is not None:
            config["chat_template"] = chat_template
        write_atomic(directory / "tokenizer.json", self.backend.to_str(pretty=False))
        write_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        write_atomic(directory / "special_tokens_map.json", json.dumps(special, indent=2, ensure_ascii=False) + "\n")
        if chat_template is not None:
            write_atomic(directory / "chat_template.jinja", chat_template)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"add_bos={self.add_bos}, stop_ids={sorted(self.stop_ids)})"
        )


# -- loading ---------------------------------------------------------------------------------------------------


@functools.cache
def _printable_to_byte() -> dict[str, int]:
    """The inverse of byte-level BPE's alphabet: printable bytes stand for themselves, the other 68 are moved
    to the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in kept}
    shifted = 0
    for b in range(256):
        if b not in kept:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of an HF-format directory (`tokenizer.json` [+ `tokenizer_config.json`]) or a GGUF file."""
    path = Path(path)
    if path.is_dir():
        return _tokenizer_from_directory(path)
    if path.is_file():
        with open(path, "rb") as f:
            is_gguf = f.read(4) == b"GGUF"
        if is_gguf:
            from camelid.gguf_file import GGUFFile

            return tokenizer_from_gguf(GGUFFile(path).metadata)
        raise CamelidError(f"{path}: not a GGUF file or a directory; give a .gguf model or an HF tokenizer directory")
    raise CamelidError(f"{path}: no such file or directory; give a .gguf model or an HF tokenizer directory")


def _tokenizer_from_directory(directory: Path) -> Tokenizer:
    tokenizer_json = directory / "tokenizer.json"
    if not tokenizer_json.is_file():
        hint = (
            " (it has a SentencePiece tokenizer.model: convert it once with transformers, "
            "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
            if (directory / "tokenizer.model").is_file()
            else ""
        )
        raise CamelidError(f"{directory}: no tokenizer.json in this directory{hint}")
    try:
        backend = BackendTokenizer.from_file(str(tokenizer_json))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise CamelidError(f"{tokenizer_json}: cannot read this tokenizer ({exc})") from None
    config = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")

    def token_id(name: str) -> int | None:
        token = config.get(name, special_map.get(name))
        if isinstance(token, dict):  # a serialised AddedToken
            token = token.get("content")
        return backend.token_to_id(token) if isinstance(token, str) else None

    bos_id, eos_id, pad_id = token_id("bos_token"), token_id("eos_token"), token_id("pad_token")
    # transformers rebuilds the post-processor from add_bos_token when the config states it; otherwise the
    # post-processor in tokenizer.json decides.
    add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
    wrapped = backend.encode("", add_special_tokens=True).ids
    if add_bos is None:
        add_bos = bos_id is not None and wrapped[:1] == [bos_id]
    if add_eos is None:
        add_eos = eos_id is not None and wrapped[-1:] == [eos_id]

    specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    stop_ids = {specials[text] for text in END_OF_GENERATION_TOKENS if text in specials}
    # A model's generation_config.json may list several end ids (Llama 3: end_of_text, eom_id, eot_id).
    generation_eos = _read_json(directory / "generation_config.json").get("eos_token_id")
    if not isinstance(generation_eos, list):
        generation_eos = [generation_eos]
    stop_ids |= {i for i in generation_eos if isinstance(i, int)}
    return Tokenizer(
        backend,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        add_bos=bool(add_bos),
        add_eos=bool(add_eos),
        stop_ids=stop_ids,
    )


# The types llama.cpp's loader reads each tokenizer key as: lists of one type, or one value.
_GGUF_TOKENIZER_TYPES = {"tokens": (list, str), "merges": (list, str), "token_type": (list, int),
                         "scores": (list, (int, float)), "pre": (None, str), "add_bos_token": (None, bool),
                         "add_eos_token": (None, bool), "add_space_prefix": (None, bool)}


def _check_gguf_tokenizer_types(metadata: dict[str, Any]) -> None:
    """Each tokenizer key of the type llama.cpp reads it as, and token_type and scores one value per token."""
    tokens = metadata["tokenizer.ggml.tokens"]
    for key, (container, kind) in _GGUF_TOKENIZER_TYPES.items():
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is None:
            continue
        kinds = kind if isinstance(kind, tuple) else (kind,)
        items = [value] if container is None else value if isinstance(value, list) else [None]
        if not all(type(item) in kinds for item in items):
            shape = "" if container is None else "a list of "
            name = "number" if isinstance(kind, tuple) else kind.__name__
            raise CamelidError(f"GGUF metadata tokenizer.ggml.{key} is not {shape}{name} values; the file is damaged")
        if key in ("token_type", "scores") and len(value) != len(tokens):
            raise CamelidError(f"GGUF metadata tokenizer.ggml.{key} does not give one value per token of the "
                               f"{len(tokens)}; the file is damaged")


def gguf_special_ids(metadata: dict[str, Any]) -> dict[str, int]:
    """The special tokens a GGUF file names (`bos_token_id`, `eos_token_id`, ... without `tokenizer.ggml.`), each
    checked to be a token of its vocabulary: an id outside it is an error that names the key (llama.cpp warns and
    drops it, which would leave a model that never stops or never starts right)."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    size = len(tokens) if isinstance(tokens, list) else 0
    named = {}
    for key, value in metadata.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            if type(value) is not int or not 0 <= value < size:
                raise CamelidError(f"GGUF metadata {shown(key)} is {shown(value)}, not a token of the {size}-token vocabulary; "
                                   "the file is damaged")
            named[key.removeprefix("tokenizer.ggml.")] = value
    return named


def tokenizer_from_gguf(metadata: dict[str, Any]) -> Tokenizer:
    """Build the tokenizer that a GGUF file's `tokenizer.ggml.*` metadata describes."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise CamelidError("this GGUF file has no tokenizer (no tokenizer.ggml.model/tokens); use a full model file")
    if kind not in ("gpt2", "llama"):
        raise CamelidError(
            f"GGUF tokenizer model {kind!r} is not supported; camelid reads 'gpt2' (byte-level BPE) and "
            "'llama' (SentencePiece) vocabularies"
        )
    _check_gguf_tokenizer_types(metadata)
    # llama.cpp names an empty token so that the text -> id map stays one-to-one.
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    types = list(metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}  # on a duplicate the last id wins, as in llama.cpp

    named = gguf_special_ids(metadata)

    def special_id(key: str, default: int | None) -> int | None:
        return named.get(key, default)

    for text in END_OF_GENERATION_TOKENS:  # control tokens whatever the file says, as in llama.cpp
        if text in vocab:
            types[vocab[text]] = CONTROL
    if "</s>" in vocab and any(marker in vocab for marker in _NORMAL_END_OF_SENTENCE_MARKERS):
        types[vocab["</s>"]] = NORMAL

    if kind == "gpt2":
        pre = metadata.get("tokenizer.ggml.pre", "default")  # files older than the key get llama.cpp's default
        backend = _byte_level_bpe(vocab, metadata.get("tokenizer.ggml.merges"), pre)
        bos_id, eos_id = special_id("bos_token_id", None), special_id("eos_token_id", None)
        add_bos_default = pre in _LLAMA3_LIKE
    else:
        # llama.cpp's defaults for a SentencePiece vocabulary that does not name them.
        bos_id, eos_id = special_id("bos_token_id", 1), special_id("eos_token_id", 2)
        unk_id = special_id("unknown_token_id", 0)
        add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        backend = _sentencepiece_bpe(tokens, types, scores, vocab, unk_id, add_space_prefix)
        add_bos_default = True

    added = [
        AddedToken(token, special=token_type != USER_DEFINED, normalized=False)
        for token, token_type in zip(tokens, types)
        if token_type in (UNKNOWN, CONTROL, USER_DEFINED)
    ]
    backend.add_tokens(added)

    stop_ids = {vocab[text] for text in END_OF_GENERATION_TOKENS if text in vocab and types[vocab[text]] == CONTROL}
    stop_ids |= {i for key in ("eot_token_id", "eom_token_id") if (i := special_id(key, None)) is not None}
    return Tokenizer(
        backend,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=special_id("padding_token_id", None),
        add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        stop_ids=stop_ids,
        vocab_size=len(tokens),
    )


def _byte_level_bpe(vocab: dict[str, int], merges: list[str] | None, pre: str) -> BackendTokenizer:
    if not merges:
        raise CamelidError("this GGUF 'gpt2' vocabulary has no tokenizer.ggml.merges; the file is incomplete")
    splits = _SPLITS_BY_PRE.get(pre)
    if splits is None:
        raise CamelidError(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(_SPLITS_BY_PRE))}"
        )
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    try:
        model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _LLAMA3_LIKE)
    except Exception as exc:  # tokenizers raises plain Exceptions; the file's data is what is wrong
        raise CamelidError(f"GGUF metadata tokenizer.ggml.merges does not fit the vocabulary "
                           f"({shown(' '.join(str(exc).split()), 120)}); the file is damaged") from None
    backend = BackendTokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        # The splitting is done above; ByteLevel only maps bytes to its printable alphabet. Offsets are left
        # untrimmed so that the tokens of a text tile it exactly.
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


# The squared token lengths a SentencePiece vocabulary may sum to: its merges are found by splitting every token
# at every place, which costs that much (Gemma 3's 262,144 tokens: 10.8M, half a second).
MAX_SPLIT_WORK = 32_000_000


def _sentencepiece_bpe(
    tokens: list[str],
    types: list[int],
    scores: list[float],
    vocab: dict[str, int],
    unk_id: int | None,
    add_space_prefix: bool,
) -> BackendTokenizer:
    # llama.cpp merges the adjacent pair whose joined text is the best-scoring token (leftmost on a tie), whatever
    # its type: control, unknown and byte tokens too, which only text that is not parsed for special tokens can
    # spell. That is BPE whose merges are every split of a token into two tokens, ranked by the joined token's score.
    work = sum(len(token) ** 2 for token in tokens)  # what the splits below cost
    if work > MAX_SPLIT_WORK:
        raise CamelidError(f"GGUF metadata tokenizer.ggml.tokens holds longer tokens than any released SentencePiece "
                           f"vocabulary (squared lengths summing to {work:,}, Gemma 3's: 10.8M); the file is damaged")
    mergeable = sorted(range(len(tokens)), key=lambda i: -scores[i])
    # One comprehension: for Gemma's 262K tokens it tests 1.1M splits, half a second of the load.
    merges = [
        (left, right)
        for token in (tokens[i] for i in mergeable)
        for k in range(1, len(token))
        if (left := token[:k]) in vocab and (right := token[k:]) in vocab
    ]
    unk = tokens[unk_id] if unk_id is not None else None
    backend = BackendTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=BYTE in types)
    )
    # A normalizer, not Metaspace: it runs on every stretch of text between special tokens and always prefixes,
    # even text that starts with a space, which is what llama.cpp (and SentencePiece itself) do.
    steps = [normalizers.Prepend(_SPIECE_SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", _SPIECE_SPACE)])
    backend.pre_tokenizer = None
    strip = [decoders.Strip(content=" ", left=1, right=0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()] + strip
    )
    return backend


# -- helpers ---------------------------------------------------------------------------------------------------


def _wrapping(bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None) -> processors.PostProcessor:
    """A post-processor that puts BOS before and/or EOS after each sequence (either may be None)."""

    def wrap(sequence: str, type_id: int) -> list[str]:
        return [f"{bos}:{type_id}"] * bool(bos) + [f"${sequence}:{type_id}"] + [f"{eos}:{type_id}"] * bool(eos)

    special = [(token, i) for token, i in ((bos, bos_id), (eos, eos_id)) if token]
    return processors.TemplateProcessing(single=wrap("A", 0), pair=wrap("A", 0) + wrap("B", 1), special_tokens=special)


def _unk_token(backend: BackendTokenizer) -> str | None:
    return getattr(backend.model, "unk_token", None)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    value = read_json(path)
    return value if isinstance(value, dict) else {}


