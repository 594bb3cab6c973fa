"""Tokenizer tests: ids against transformers, llama.cpp and SentencePiece on real ShareGPT text.

Two vocabularies: the real SmolLM2 GGUF (byte-level BPE), and a small SentencePiece BPE model trained here on
ShareGPT text and written to a vocab-only GGUF, since no real SentencePiece GGUF is available offline.
"""

import ctypes
import itertools
import json
import re
from pathlib import Path

import pytest

from camelid.errors import CamelidError
from camelid.gguf_file import GGUFFile
from camelid.tokenizer import load_tokenizer, tokenizer_from_gguf

CHAT_TEXTS = [
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text before<|im_end|>after <|endoftext|> and <|im_start|>",
    "<|im_end|><|im_end|>\n\n<|im_start|>",
]
# Edge cases every tokenizer must agree on: whitespace runs, digits, contractions, non-Latin scripts, emoji.
EDGE_TEXTS = [
    "",
    "\n",
    "   ",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "tabs\tand\nnewlines\r\n\n\nend",
    "Numbers 1234567 and 3.14159, 1,000,000 and ٣٤٥ and ½",
    "I'm sure they'll say it's 'quoted' -- THEY'RE",
    "日本語のテキストを書きます。",
    "Привет, как дела? Всё хорошо.",
    "मशीन लर्निंग और कृत्रिम बुद्धि",
    "emoji 🦙🔥👍🏽 and symbols ∑∫√ ©®™",
    "ﬁ ligature, combining é (e\u0301), zero\u200bwidth",
    "```python\ndef f(x):\n    return x ** 2\n```",
]


def _first_difference(ours: list[int], theirs: list[int]) -> str:
    i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return f"first difference at token {i}: ours {ours[i:i + 6]} vs reference {theirs[i:i + 6]}"


def _assert_same_ids(texts, ours, reference, name: str) -> None:
    mismatches = [(text, a, b) for text in texts if (a := ours(text)) != (b := reference(text))]
    if mismatches:
        text, a, b = mismatches[0]
        example = f"e.g. {text[:80]!r}: {_first_difference(a, b)}"
        pytest.fail(f"{len(mismatches)} of {len(texts)} texts differ from {name}; {example}")


def _write_vocab_gguf(path, *, model, tokens, types, scores=None, merges=None, pre=None, ids=None, add_bos=None):
    """A vocab-only GGUF: the tokenizer keys plus the few hyperparameters llama.cpp reads before the vocabulary."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(16)
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    for key, value in (ids or {}).items():
        getattr(writer, f"add_{key}_token_id")(value)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _llama_cpp_vocab(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


# -- SmolLM2: the real GGUF, byte-level BPE ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_metadata(smollm2_gguf):
    return GGUFFile(smollm2_gguf).metadata


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_metadata):
    return tokenizer_from_gguf(smollm2_metadata)


@pytest.fixture(scope="module")
def texts(sharegpt_texts):
    assert len(sharegpt_texts) >= 1000
    return sharegpt_texts + CHAT_TEXTS + EDGE_TEXTS


def test_smollm2_special_token_facts(smollm2_tokenizer, smollm2_metadata):
    tokens = smollm2_metadata["tokenizer.ggml.tokens"]
    assert smollm2_tokenizer.vocab_size == len(tokens) == 49152
    assert (smollm2_tokenizer.bos_id, smollm2_tokenizer.eos_id, smollm2_tokenizer.pad_id) == (1, 2, 2)
    assert (smollm2_tokenizer.bos_token, smollm2_tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smollm2_tokenizer.add_bos is smollm2_metadata["tokenizer.ggml.add_bos_token"] is False
    assert smollm2_tokenizer.stop_ids == {tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")}
    ids = smollm2_tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 5  # specials whole, "user", "\n", "hi"


def test_smollm2_decode_round_trips(smollm2_tokenizer, texts):
    bad = [t for t in texts if smollm2_tokenizer.decode(smollm2_tokenizer.encode(t)) != t]
    assert not bad, f"{len(bad)} texts do not survive encode/decode, e.g. {bad[0][:80]!r}"
    assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(CHAT_TEXTS[0]), skip_special=True) == "user\nhi"


def test_offsets_index_the_text(smollm2_tokenizer, texts):
    for text in texts:
        ids, offsets = smollm2_tokenizer.encode_with_offsets(text)
        assert len(ids) == len(offsets)
        assert all(0 <= start <= end <= len(text) for start, end in offsets)
        if text.isascii():  # every token is whole characters, so the pieces tile the text
            assert "".join(text[s:e] for s, e in offsets) == text
    ids, offsets = smollm2_tokenizer.encode_with_offsets("<|im_start|>user")
    assert offsets == [(0, 12), (12, 16)]


@pytest.fixture(scope="module")
def transformers_smollm2(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.mark.slow
def test_smollm2_ids_match_transformers(smollm2_tokenizer, transformers_smollm2, texts):
    """transformers builds the vocabulary and specials from the same GGUF; on text without digits it must agree."""
    digitless = [t for t in texts if not re.search(r"\d", t)]
    assert len(digitless) >= 500
    _assert_same_ids(digitless, smollm2_tokenizer.encode, transformers_smollm2.encode, "transformers (GGUF)")


@pytest.mark.slow
def test_smollm2_ids_match_transformers_with_smollm2_digit_rule(smollm2_tokenizer, transformers_smollm2, texts):
    """transformers' GGUF loader splits 'smollm' text with the GPT-2 rule only. SmolLM2's own tokenizer.json (and
    llama.cpp for pre='smollm') first cut every digit apart; with that one step added, all texts must agree."""
    from tokenizers import pre_tokenizers

    reference = transformers_smollm2.backend_tokenizer
    original = reference.pre_tokenizer
    reference.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), original])
    try:
        _assert_same_ids(texts, smollm2_tokenizer.encode, transformers_smollm2.encode, "transformers + SmolLM2's digit split")
    finally:
        reference.pre_tokenizer = original


# A quick sample for every run, all texts for the slow runs (llama.cpp takes seconds over 1,500 texts).
SAMPLES = [pytest.param(50, id="sample"), pytest.param(None, id="all", marks=pytest.mark.slow)]


def _sample(texts, limit):
    return texts if limit is None else texts[:limit] + CHAT_TEXTS + EDGE_TEXTS


def _assert_llama_cpp_ids(ours, path_or_vocab, texts):
    """Every text the same ids as llama.cpp's, with and without BOS, with and without parsing special tokens."""
    vocab = _llama_cpp_vocab(path_or_vocab) if isinstance(path_or_vocab, (str, Path)) else path_or_vocab
    for add_special, parse_special in itertools.product((True, False), (True, False)):
        _assert_same_ids(
            texts,
            lambda t: ours.encode(t, add_special=add_special, parse_special=parse_special),
            lambda t: vocab.tokenize(t.encode("utf-8"), add_bos=add_special, special=parse_special),
            f"llama.cpp (add_special={add_special}, parse_special={parse_special})",
        )


@pytest.mark.llamacpp
@pytest.mark.parametrize("limit", SAMPLES)
def test_smollm2_ids_match_llama_cpp(limit, smollm2_tokenizer, smollm2_gguf, texts):
    _assert_llama_cpp_ids(smollm2_tokenizer, smollm2_gguf, _sample(texts, limit))


@pytest.mark.llamacpp
@pytest.mark.parametrize("limit", SAMPLES)
def test_smollm2_decode_matches_llama_cpp(limit, smollm2_tokenizer, smollm2_gguf, texts):
    vocab = _llama_cpp_vocab(smollm2_gguf)
    for text in _sample(texts, limit):
        ids = smollm2_tokenizer.encode(text)
        assert smollm2_tokenizer.decode(ids) == vocab.detokenize(ids, special=True).decode("utf-8"), text[:80]


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("pre", ["gpt-2", "default", "llama-bpe", "dbrx", "qwen2", "falcon"])
def test_other_pre_tokenizers_match_llama_cpp(pre, smollm2_metadata, texts, tmp_path):
    """The same byte-level vocabulary under other `tokenizer.ggml.pre` values: the split rules (and llama-bpe's
    whole-word lookup and BOS default) must follow llama.cpp's."""
    m = smollm2_metadata
    path = _write_vocab_gguf(
        tmp_path / f"{pre}.gguf",
        model="gpt2",
        pre=pre,
        tokens=m["tokenizer.ggml.tokens"],
        types=m["tokenizer.ggml.token_type"],
        merges=m["tokenizer.ggml.merges"],
        ids={"bos": 1, "eos": 2},
    )
    ours = load_tokenizer(path)
    assert ours.add_bos is (pre == "llama-bpe")  # llama.cpp's default when the file does not say
    vocab = _llama_cpp_vocab(path)

    def reference(text):
        return vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    _assert_same_ids(texts, ours.encode, reference, f"llama.cpp pre={pre}")


# -- SentencePiece BPE: a model trained here, written as a 'llama' GGUF --------------------------------------------

SPM_CONTROL, SPM_USER_DEFINED = ["<|im_start|>", "<|im_end|>"], ["<think>"]
SPM_SPECIAL_TEXTS = [
    "<s>hello</s>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "reasoning<think>step one</think> done",
    "unknown <unk> token",
]


@pytest.fixture(scope="module")
def spm_model(sharegpt_texts, tmp_path_factory):
    """A Llama-style SentencePiece BPE model (identity normalization, dummy prefix, byte fallback, split digits)
    trained on the first 600 ShareGPT texts, and the same vocabulary as a vocab-only 'llama' GGUF."""
    spm = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2

    directory = tmp_path_factory.mktemp("spm")
    lines = [line for text in sharegpt_texts[:600] for line in text.splitlines() if line.strip()]
    (directory / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(directory / "train.txt"),
        model_prefix=str(directory / "spm"),
        model_type="bpe",
        vocab_size=1500,
        character_coverage=0.995,  # rare characters stay out of the vocabulary and need byte fallback
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        control_symbols=SPM_CONTROL,
        user_defined_symbols=SPM_USER_DEFINED,
        max_sentence_length=16384,
        num_threads=2,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((directory / "spm.model").read_bytes())
    # SentencePiece's piece types use the same numbers as GGUF's token types.
    gguf_path = _write_vocab_gguf(
        directory / "spm.gguf",
        model="llama",
        tokens=[p.piece for p in proto.pieces],
        scores=[p.score for p in proto.pieces],
        types=[int(p.type) for p in proto.pieces],
        ids={"bos": 1, "eos": 2, "unk": 0},
        add_bos=True,
    )
    return spm.SentencePieceProcessor(model_file=str(directory / "spm.model")), gguf_path


@pytest.fixture(scope="module")
def spm_tokenizer(spm_model):
    return load_tokenizer(spm_model[1])


def test_spm_special_token_facts(spm_tokenizer, spm_model):
    processor, _ = spm_model
    assert spm_tokenizer.vocab_size == processor.get_piece_size() == 1500
    assert (spm_tokenizer.bos_token, spm_tokenizer.eos_token) == ("<s>", "</s>")
    assert spm_tokenizer.add_bos is True
    assert spm_tokenizer.stop_ids == {2, processor.piece_to_id("<|im_end|>")}
    assert spm_tokenizer.encode("hi")[0] == 1 and spm_tokenizer.encode("hi", add_special=False)[0] != 1


def test_spm_ids_match_sentencepiece(spm_tokenizer, spm_model, texts):
    """SentencePiece itself, on text without special tokens (it does not parse them out of text)."""
    processor, _ = spm_model
    plain = [t for t in texts if t not in CHAT_TEXTS]
    _assert_same_ids(plain, lambda t: spm_tokenizer.encode(t, add_special=False), processor.encode, "sentencepiece")
    # The comparison must have exercised byte fallback and non-Latin text.
    byte_ids = {processor.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
    assert sum(bool(byte_ids & set(processor.encode(t))) for t in plain) >= 20
    assert sum(bool(re.search(r"[^\x00-\u024f]", t)) for t in plain) >= 20


def test_spm_decode_round_trips(spm_tokenizer, spm_model, texts):
    processor, _ = spm_model
    for text in texts:
        if text not in CHAT_TEXTS:
            ids = spm_tokenizer.encode(text)  # with BOS, which SentencePiece's decode drops as a control token
            assert spm_tokenizer.decode(ids, skip_special=True) == processor.decode(ids) == text, text[:80]
            assert spm_tokenizer.decode(ids[1:]) == text, text[:80]


@pytest.fixture(scope="module")
def transformers_spm(spm_model):
    transformers = pytest.importorskip("transformers")
    _, path = spm_model
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.slow
def test_spm_ids_match_transformers(spm_tokenizer, transformers_spm, texts):
    """transformers' GGUF loader agrees on all text except the two cases of the next tests."""
    compared = [t for t in texts if t not in CHAT_TEXTS and not t.startswith(" ")]
    assert len(compared) >= 1000
    _assert_same_ids(compared, spm_tokenizer.encode, transformers_spm.encode, "transformers (GGUF)")


@pytest.mark.slow
def test_spm_leading_space_follows_sentencepiece_not_transformers(spm_tokenizer, transformers_spm, spm_model):
    """Text that starts with a space: SentencePiece (and llama.cpp) put the dummy prefix before it all the same;
    transformers' Metaspace(prepend_scheme='first') does not. SentencePiece made the vocabulary, so it decides."""
    processor, _ = spm_model
    for text in [" leading space", "  two leading spaces"]:
        assert spm_tokenizer.encode(text, add_special=False) == processor.encode(text)
        assert spm_tokenizer.encode(text) != transformers_spm.encode(text)


@pytest.mark.slow
@pytest.mark.llamacpp
def test_spm_text_after_special_tokens_follows_llama_cpp_not_transformers(spm_tokenizer, transformers_spm, spm_model):
    """Text right after a special token: llama.cpp starts a new run of text with its own space prefix (as Meta's
    Llama 2 code did by encoding each piece separately); transformers (legacy=False) does not. SentencePiece
    cannot say, since it does not parse special tokens out of text. The file is llama.cpp's, so it decides."""
    vocab = _llama_cpp_vocab(spm_model[1])
    for text in CHAT_TEXTS[:2] + SPM_SPECIAL_TEXTS[:3]:
        ours = spm_tokenizer.encode(text)
        assert ours == vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert ours != transformers_spm.encode(text)


@pytest.mark.llamacpp
@pytest.mark.parametrize("limit", SAMPLES)
def test_spm_ids_match_llama_cpp(limit, spm_tokenizer, spm_model, texts):
    """Including special and user-defined tokens in the text, after which llama.cpp starts a new run of text
    with its own space prefix, and text that starts with spaces."""
    _assert_llama_cpp_ids(spm_tokenizer, spm_model[1], _sample(texts, limit) + SPM_SPECIAL_TEXTS)


# -- Gemma 3: the real GGUF, SentencePiece BPE with 262,144 tokens -------------------------------------------------

# Gemma's vocabulary keeps runs of up to 31 newlines, spaces or tabs and some HTML tags as user-defined tokens,
# which llama.cpp matches whole even without parse_special; `<start_of_turn>`, `<bos>`, `<unusedN>` are control
# tokens, matched only with it; no space is prefixed; rare characters fall back to byte tokens.
GEMMA_TEXTS = [
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "<bos>after bos<eos> and <pad><unk><mask> <unused0><unused6241> [multimodal] <start_of_image><end_of_image>",
    "a user's </s> strikethrough: <s>old</s>, <b>bold</b> <table><tr><td>cell</td></tr></table> <tr > <TD>",
    "byte tokens as text: <0x0A> <0xFF> <0x41>, and [EOS] <|im_end|> <end_of_turn",
    "def f(x):\n\tif x:\n\t\treturn [x]  # two spaces\n" + "    " * 12 + "deep\n\n\n\tmixed \t \t\n",
    " " * 31 + "|" + " " * 32 + "|" + " " * 70 + "|" + "\t" * 40 + "|" + "\n" * 45 + "|" + " \n" * 5,
    "\r\n\r\n windows\r\nlines \u00a0non-breaking\u3000ideographic space\x0bvertical\x0cform feed",
    "3141592653589793238462643383279502884197169399375105820974944592 and 1,000,000.00 and 0x7fff_ffff",
    "中文文本，日本語の文章、한국어 문장。 ꙮ 𠀀𠀁 𐌀𐌁𐌂 𓀀 \x00\x01\x07",
    "🦙🐪 family: 👨\u200d👩\u200d👧\u200d👦 flags: 🇯🇵🇺🇸 skin: 👍🏿 new: \U0001fae8",
    "\u2581 SentencePiece's space mark \u2581\u2581 in the text",
    " leading and trailing ",
    "   ",
    " ",
    "\n",
]
LLAMA_TOKEN_ATTR_UNKNOWN, LLAMA_TOKEN_ATTR_CONTROL, LLAMA_TOKEN_ATTR_USER_DEFINED = 1, 8, 16  # llama.h


@pytest.fixture(scope="module")
def gemma3_tokenizer(gemma3_gguf):
    return load_tokenizer(gemma3_gguf)


@pytest.fixture(scope="module")
def gemma3_llama_cpp(gemma3_gguf):
    return _llama_cpp_vocab(gemma3_gguf)


def _llama_cpp_detokenize(llm, ids: list[int], *, special: bool) -> str:
    """llama.cpp's own detokenizer: llama-cpp-python's `detokenize` drops a space after BOS and empties any piece
    longer than its 32-byte buffer."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    size = 64 + 64 * len(ids)
    text = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(llm._model.vocab, tokens, len(ids), text, size, False, special)
    assert 0 <= n <= size
    return text.raw[:n].decode("utf-8")


def test_gemma3_special_token_facts(gemma3_tokenizer):
    tok = gemma3_tokenizer
    assert tok.vocab_size == 262144
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert tok.add_bos is True and tok.encode("hi")[:1] == [2]
    user, hi = tok.backend.token_to_id("user"), tok.backend.token_to_id("hi")  # no "▁": no space prefix
    assert tok.encode("<start_of_turn>user\nhi<end_of_turn>\n", add_special=False) == [105, user, 107, hi, 106, 107]
    assert tok.encode("<start_of_turn>", add_special=False, parse_special=False) != [105]
    assert tok.encode("a  b", add_special=False, parse_special=False)[1] == tok.backend.token_to_id("  ")


@pytest.mark.llamacpp
@pytest.mark.parametrize("which, infill_ends", [("smollm2", {"<reponame>"}), ("gemma3", set())])
def test_special_and_stop_tokens_are_llama_cpps(which, infill_ends, request):
    """Which tokens are matched whole in text (only with parse_special: control and unknown; always:
    user-defined) and which end generation: llama.cpp's token attributes and end-of-generation set, which it
    derives from the file's token types and its own list of end-of-turn texts. llama.cpp also stops at the
    code-infilling tokens it finds by name (SmolLM2's <reponame>, as a repository marker); camelid does not."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tok = request.getfixturevalue(f"{which}_tokenizer")
    llm = _llama_cpp_vocab(request.getfixturevalue(f"{which}_gguf"))  # kept: its vocabulary dies with it
    vocab = llm._model.vocab
    attrs = [llama_cpp.llama_vocab_get_attr(vocab, i) for i in range(tok.vocab_size)]
    added = tok.backend.get_added_tokens_decoder()
    special = {i for i, a in enumerate(attrs) if a & (LLAMA_TOKEN_ATTR_CONTROL | LLAMA_TOKEN_ATTR_UNKNOWN)}
    user_defined = {i for i, a in enumerate(attrs) if a & LLAMA_TOKEN_ATTR_USER_DEFINED} - special
    assert {i for i, t in added.items() if t.special} == special
    assert {i for i, t in added.items() if not t.special} == user_defined
    ends = {i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert tok.stop_ids == ends - {tok.backend.token_to_id(t) for t in infill_ends}
    if which == "gemma3":  # <eos>, <end_of_turn>, and the HTML </s>, which llama.cpp 0.3.36 counts as an end
        assert tok.stop_ids == {1, 106, 212} and len(user_defined) == 164


@pytest.mark.llamacpp
@pytest.mark.parametrize("limit", SAMPLES)
def test_gemma3_ids_match_llama_cpp(limit, gemma3_tokenizer, gemma3_llama_cpp, texts):
    """With and without BOS and parse_special; the texts must have exercised byte fallback and user-defined
    tokens (whitespace runs, tags) for the comparison to mean anything."""
    compared = _sample(texts, limit) + GEMMA_TEXTS
    _assert_llama_cpp_ids(gemma3_tokenizer, gemma3_llama_cpp, compared)
    byte_ids = {gemma3_tokenizer.backend.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    user_defined = {i for i, t in gemma3_tokenizer.backend.get_added_tokens_decoder().items() if not t.special}
    encoded = [set(gemma3_tokenizer.encode(t, add_special=False)) for t in compared]
    assert sum(bool(ids & byte_ids) for ids in encoded) >= (5 if limit else 10)
    assert sum(bool(ids & user_defined) for ids in encoded) >= (40 if limit else 800)


@pytest.mark.llamacpp
@pytest.mark.parametrize("limit", SAMPLES)
def test_gemma3_decode_matches_llama_cpp_and_round_trips(limit, gemma3_tokenizer, gemma3_llama_cpp, texts):
    tok = gemma3_tokenizer
    for text in _sample(texts, limit) + GEMMA_TEXTS:
        ids = tok.encode(text)  # BOS, and special tokens in the text parsed
        for skip in (False, True):
            assert tok.decode(ids, skip_special=skip) == _llama_cpp_detokenize(gemma3_llama_cpp, ids, special=not skip)
        if "\u2581" in text:  # SentencePiece's space mark reads back as a space, in llama.cpp too
            continue
        assert tok.decode(ids[1:]) == text, text[:80]
        literal = tok.encode(text, parse_special=False)  # special-token texts stay text, and come back as such
        assert tok.decode(literal, skip_special=True) == text, text[:80]
    assert tok.decode(tok.encode("\u2581a \u2581")) == "<bos> a  "


# -- save / load ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2_tokenizer", "spm_tokenizer"])
def test_saved_directory_loads_in_transformers_with_same_ids(which, request, texts, tmp_path, smollm2_metadata):
    transformers = pytest.importorskip("transformers")
    ours = request.getfixturevalue(which)
    template = smollm2_metadata["tokenizer.chat_template"]
    ours.save(tmp_path, chat_template=template)

    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert reference.chat_template == template
    assert (reference.bos_token, reference.eos_token) == (ours.bos_token, ours.eos_token)
    _assert_same_ids(texts, ours.encode, reference.encode, "transformers loading the saved directory")
    _assert_same_ids(
        texts,
        lambda t: ours.encode(t, add_special=False),
        lambda t: reference.encode(t, add_special_tokens=False),
        "transformers loading the saved directory (no specials)",
    )

    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (tmp_path / "chat_template.jinja").read_text() == template
    assert config["add_bos_token"] is ours.add_bos
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["eos_token"] == ours.eos_token

    reloaded = load_tokenizer(tmp_path)
    facts = ("bos_id", "eos_id", "pad_id", "bos_token", "eos_token", "add_bos", "stop_ids", "vocab_size")
    assert {f: getattr(reloaded, f) for f in facts} == {f: getattr(ours, f) for f in facts}
    _assert_same_ids(texts, ours.encode, reloaded.encode, "the reloaded copy")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["transformers_smollm2", "transformers_spm"])
def test_load_directory_written_by_transformers(which, request, texts, tmp_path):
    """A directory transformers wrote itself (its tokenizer.json, its config) loads to transformers' ids."""
    reference = request.getfixturevalue(which)
    reference.save_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    assert (ours.bos_token, ours.eos_token) == (reference.bos_token, reference.eos_token)
    assert ours.add_bos is (reference.encode("x")[0] == reference.bos_token_id)
    _assert_same_ids(texts, ours.encode, reference.encode, f"{which} saved by transformers")


def test_load_directory_takes_add_bos_from_config(smollm2_tokenizer, tmp_path):
    smollm2_tokenizer.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.add_bos is True
    assert reloaded.encode("hi") == [smollm2_tokenizer.bos_id] + smollm2_tokenizer.encode("hi")


# -- user mistakes ----------------------------------------------------------------------------------------------


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CamelidError, match="no such file or directory"):
        load_tokenizer(tmp_path / "nowhere")


def test_directory_without_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CamelidError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_file_that_is_not_gguf_is_a_clear_error(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(CamelidError, match="not a GGUF file"):
        load_tokenizer(tmp_path / "model.bin")


def test_unsupported_gguf_tokenizer_model_is_a_clear_error(tmp_path):
    tokens, types = ["<pad>", "</s>", "<unk>", "\u2581a"], [3, 3, 2, 1]
    path = _write_vocab_gguf(tmp_path / "t5.gguf", model="t5", tokens=tokens, types=types)
    with pytest.raises(CamelidError, match="tokenizer model 't5' is not supported.*'gpt2'.*'llama'"):
        load_tokenizer(path)


def test_unknown_pre_tokenizer_is_a_clear_error(smollm2_metadata):
    with pytest.raises(CamelidError, match="pre-tokenizer 'brand-new' is not supported; supported: .*smollm"):
        tokenizer_from_gguf({**smollm2_metadata, "tokenizer.ggml.pre": "brand-new"})


def test_gguf_without_vocabulary_is_a_clear_error():
    with pytest.raises(CamelidError, match="no tokenizer"):
        tokenizer_from_gguf({"general.architecture": "llama"})


def test_token_bytes_rebuild_the_text_even_mid_character(smollm2_tokenizer, texts):
    for text in [*texts[:200], "おくない", "naïve café 🐪", "\u2581 leading"]:
        ids = smollm2_tokenizer.encode(text, add_special=False)
        assert b"".join(smollm2_tokenizer.token_bytes(i) for i in ids) == text.encode(), text[:80]
    split = [smollm2_tokenizer.token_bytes(i) for i in smollm2_tokenizer.encode("🐪", add_special=False)]
    assert len(split) > 1 and all(len(b) < 4 for b in split)  # a character cut across tokens


@pytest.mark.llamacpp
def test_token_bytes_match_llama_cpp(smollm2_tokenizer, smollm2_gguf):
    vocab = _llama_cpp_vocab(smollm2_gguf)
    longer = 0
    for token in range(smollm2_tokenizer.vocab_size):
        ours = smollm2_tokenizer.token_bytes(token)
        if len(ours) > 32:  # llama-cpp-python's detokenize gives b"" for pieces over its 32-byte buffer
            longer += 1
            continue
        assert ours == vocab.detokenize([token], special=True), token
    assert longer < 100


@pytest.mark.llamacpp
def test_gemma3_from_tokenizer_json_keeps_llama_cpps_ids(gemma3_tokenizer, gemma3_llama_cpp, texts, tmp_path):
    """Gemma's vocabulary as a Hugging Face directory (tokenizer.json, as camelid writes it when it saves or exports
    a model): camelid reading the directory, and transformers' fast tokenizer reading it, give llama.cpp's ids."""
    transformers = pytest.importorskip("transformers")
    gemma3_tokenizer.save(tmp_path)
    from_json = load_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    compared = _sample(texts, 150) + GEMMA_TEXTS
    _assert_llama_cpp_ids(from_json, gemma3_llama_cpp, compared)
    for text in compared:
        assert hf(text)["input_ids"] == from_json.encode(text), text[:80]
