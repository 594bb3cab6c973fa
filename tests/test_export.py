"""`camelid export gguf` and `camelid export hf` against their readers: llama.cpp runs the GGUF camelid writes with
camelid's predictions and tokens, camelid reads its own GGUF back bit for bit, transformers loads the HF directory
with camelid's logits, and mistakes are one line.

The real SmolLM2 (loaded from its Q4_1 GGUF, so its weights are those of that file) is exported once per type and
shared; tiny random models with SmolLM2's tokenizer cover the architecture variants SmolLM2 lacks.
"""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from camelid.checkpoint import LoadedModel, load_model, save_model
from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.export import GGUF_TYPES, export_gguf, export_gguf_adapter, export_hf, gguf_vocabulary
from camelid.gguf_file import GGUFFile
from camelid.model import Llama
from camelid.tokenizer import load_tokenizer

CHAT_TEXTS = [
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text before<|im_end|>after <|endoftext|> and <|im_start|>",
]
POSITIONS = 200  # per text; two texts give 400 positions


def _llama(path, **kw):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), verbose=False, **kw)


def llama_cpp_logits(path, sequences: list[list[int]], n_ctx: int = 512, **kw) -> list[np.ndarray]:
    """llama.cpp's logits at every position of each token sequence (evaluated one after another)."""
    llm = _llama(path, logits_all=True, n_ctx=n_ctx, **kw)
    try:
        out = []
        for ids in sequences:
            llm.reset()
            llm.eval(ids)
            out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
        return out
    finally:
        llm.close()


def camelid_logits(model, sequences: list[list[int]]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(torch.tensor([ids]))[0].float().numpy() for ids in sequences]


def agreement(ours: list[np.ndarray], theirs: list[np.ndarray]) -> float:
    """The share of positions where both put the same token first."""
    same = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(ours, theirs)])
    return float(same.mean())


# -- SmolLM2, exported once per type ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_export(smollm2_model, tmp_path_factory):
    """export(type) -> the SmolLM2 GGUF of that type, written on first use; `.timings` holds (seconds, bytes)."""
    directory = tmp_path_factory.mktemp("smollm2-export")
    done = {}

    def export(kind: str) -> Path:
        if kind not in done:
            start = time.perf_counter()
            path = export_gguf(smollm2_model, directory / f"smollm2-{kind}.gguf", type=kind, progress=False)
            done[kind] = path
            export.timings[kind] = (time.perf_counter() - start, path.stat().st_size)
        return done[kind]

    export.timings = {}
    yield export
    for kind, (seconds, size) in export.timings.items():
        print(f"\nSmolLM2 export {kind}: {seconds:.1f} s, {size / 1e6:.1f} MB")


@pytest.fixture(scope="module")
def eval_sequences(smollm2_model, sharegpt_texts) -> list[list[int]]:
    """Two real ShareGPT texts of at least POSITIONS tokens each, as token ids (BOS as the model adds it)."""
    out = []
    for text in sharegpt_texts:
        ids = smollm2_model.tokenizer.encode(text)
        if len(ids) >= POSITIONS:
            out.append(ids[:POSITIONS])
        if len(out) == 2:
            return out
    pytest.fail("fewer than two ShareGPT texts are long enough")


@pytest.fixture(scope="module")
def smollm2_logits(smollm2_model, eval_sequences):
    return camelid_logits(smollm2_model.model, eval_sequences)


def test_camelid_reads_its_f32_export_back_exactly(smollm2_model, smollm2_export, smollm2_gguf, sharegpt_texts):
    path = smollm2_export("f32")
    back = load_model(path, device="cpu", dtype="float32")
    ours, theirs = smollm2_model.model.state_dict(), back.model.state_dict()
    assert set(ours) == set(theirs)
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert back.config == smollm2_model.config
    assert back.chat_template == smollm2_model.chat_template
    for fact in ("bos_id", "eos_id", "pad_id", "add_bos", "add_eos", "stop_ids", "vocab_size"):
        assert getattr(back.tokenizer, fact) == getattr(smollm2_model.tokenizer, fact), fact
    for text in sharegpt_texts[:300] + CHAT_TEXTS:
        assert back.tokenizer.encode(text) == smollm2_model.tokenizer.encode(text), text[:80]

    # The vocabulary is the one llama.cpp's own converter wrote into the original file, key for key.
    original, exported = GGUFFile(smollm2_gguf).metadata, GGUFFile(path).metadata
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id",
                "padding_token_id", "add_bos_token"):
        assert exported[f"tokenizer.ggml.{key}"] == original[f"tokenizer.ggml.{key}"], key
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon",
                "rope.dimension_count", "vocab_size"):
        assert exported[f"llama.{key}"] == original[f"llama.{key}"], key
    assert exported["general.name"] == original["general.name"]
    assert exported["general.file_type"] == 0  # ALL_F32


def test_tensor_types_follow_llama_cpp_converter(smollm2_export):
    from gguf import GGMLQuantizationType as Q

    for kind, main_type in (("f16", Q.F16), ("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0)):
        gguf = GGUFFile(smollm2_export(kind))
        types = {name: Q(info.ggml_type) for name, info in gguf.tensors.items()}
        assert "output.weight" not in types  # tied: llama.cpp uses token_embd
        assert all(t == Q.F32 for name, t in types.items() if name.endswith("_norm.weight")), kind
        assert all(t == main_type for name, t in types.items() if name.startswith("blk.") and
                   not name.endswith("_norm.weight")), kind
        # The tied embedding is also the vocabulary projection: 4-bit files keep it at 8 bits.
        assert types["token_embd.weight"] == (Q.Q8_0 if kind == "q4_0" else main_type)


@pytest.mark.llamacpp
@pytest.mark.slow
def test_llama_cpp_predicts_what_camelid_predicts(smollm2_export, smollm2_logits, eval_sequences, smollm2_gguf):
    """llama.cpp running each export against camelid's own float32 logits, top-1 over 400 real positions.

    llama.cpp's quantized matrix products also round the activations to 8 bits, which alone costs SmolLM2-135M a
    few percent: llama.cpp running the model's own published Q4_1 file, whose weights camelid holds exactly, agrees
    on 97.75% here (97.4% on 1,800 positions of other texts, where q8_0 exports measured 96.6%)."""
    results = {}
    for kind in ("f32", "f16", "bf16", "q8_0"):
        results[kind] = agreement(smollm2_logits, llama_cpp_logits(smollm2_export(kind), eval_sequences))
    published = agreement(smollm2_logits, llama_cpp_logits(smollm2_gguf, eval_sequences))
    print(f"\ntop-1 agreement with camelid over {sum(map(len, eval_sequences))} positions: "
          + ", ".join(f"{k} {v:.4f}" for k, v in results.items()) + f"; published Q4_1 file {published:.4f}")
    for kind in ("f32", "f16", "bf16"):
        assert results[kind] >= max(0.99, published), (kind, results[kind])
    assert results["q8_0"] >= 0.97, results


@pytest.mark.llamacpp
@pytest.mark.slow
def test_llama_cpp_runs_a_4_bit_export_as_camelid_reads_it(smollm2_export, eval_sequences):
    """A q4_0 export is lossy, but llama.cpp and camelid must read the same model from it."""
    path = smollm2_export("q4_0")
    same_file = load_model(path, device="cpu", dtype="float32")
    result = agreement(camelid_logits(same_file.model, eval_sequences), llama_cpp_logits(path, eval_sequences))
    print(f"\nq4_0: llama.cpp and camelid on the same file agree on {result:.4f} of the positions")
    assert result >= 0.93


@pytest.mark.llamacpp
def test_llama_cpp_tokenizes_the_export_as_camelid_does(smollm2_model, smollm2_export, sharegpt_texts):
    path = smollm2_export("f16")
    vocab = _llama(path, vocab_only=True)
    try:
        for add_special in (True, False):
            for text in sharegpt_texts[:300] + CHAT_TEXTS:
                ours = smollm2_model.tokenizer.encode(text, add_special=add_special)
                assert vocab.tokenize(text.encode(), add_bos=add_special, special=True) == ours, text[:80]
        assert vocab.metadata["tokenizer.chat_template"] == smollm2_model.chat_template
        assert vocab.metadata["tokenizer.ggml.pre"] == "smollm"
    finally:
        vocab.close()


# -- a fine-tuned model ----------------------------------------------------------------------------------------


TUNED_PROMPTS = ["Who are you?", "What is your name?", "Who created you?"]


@pytest.mark.llamacpp
@pytest.mark.slow
def test_fine_tuned_export_answers_in_llama_cpp_as_in_camelid(tuned_adapter, smollm2_model, tmp_path):
    """The adapter directory exported as one GGUF: llama.cpp's greedy answers equal camelid's token for token,
    both on the prompt camelid renders and through llama-cpp-python's own chat completion with the embedded
    template; and they are the fine-tuned model's answers, not the base's."""
    from camelid.chat import chat_template_for, encode_chat
    from camelid.generate import SamplingParams, generate

    path = export_gguf(tuned_adapter, tmp_path / "tuned.gguf", type="f32", progress=False)
    tuned = load_model(tuned_adapter, device="cpu", dtype="float32")
    params = SamplingParams(temperature=0, max_new_tokens=24)
    llm = _llama(path, logits_all=True, n_ctx=512)
    changed = 0
    try:
        for question in TUNED_PROMPTS:
            messages = [{"role": "user", "content": question}]
            prompt = encode_chat(tuned, chat_template_for(tuned), messages)
            ours = generate(tuned.model, tuned.tokenizer, [prompt], params)[0]
            base = generate(smollm2_model.model, smollm2_model.tokenizer, [prompt], params)[0]
            changed += base.text != ours.text

            llm.reset()
            llm.eval(prompt)
            theirs, stopped = [], False
            while len(theirs) < params.max_new_tokens and not stopped:
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                stopped = token in tuned.tokenizer.stop_ids  # camelid returns the answer without it
                if not stopped:
                    theirs.append(token)
                    llm.eval([token])
            assert theirs == ours.token_ids, (question, tuned.tokenizer.decode(theirs), ours.text)
            assert stopped is (ours.finish_reason == "stop"), question

            reply = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=params.max_new_tokens,
                                               repeat_penalty=1.0)
            assert reply["choices"][0]["message"]["content"] == ours.text, question
    finally:
        llm.close()
    assert changed >= 2, "the fine-tuning did not change the answers; the comparison would not prove the export"


# -- architecture variants on tiny random models ---------------------------------------------------------------

@pytest.mark.llamacpp
@pytest.mark.slow
def test_a_trained_adapter_as_gguf_runs_in_llama_cpp_as_camelids_merged_model(
        tuned_adapter, smollm2_gguf, smollm2_export, eval_sequences, tmp_path):
    """`export gguf-adapter` of the trained LoRA, applied by llama.cpp (lora_path=) to the base: on camelid's f32
    export of the base, llama.cpp's next token is the merged model's at >= 99% of 400 real positions, as for the
    base alone; on SmolLM2's own Q4_1 file, whose 8-bit activations cost a few percent already without an adapter,
    at >= 93%, and closer than the base alone."""
    path = export_gguf_adapter(tuned_adapter, tmp_path / "adapter.gguf")
    assert path.stat().st_size < 0.1 * smollm2_gguf.stat().st_size  # an adapter, not a model
    merged = camelid_logits(load_model(tuned_adapter, device="cpu", dtype="float32").model, eval_sequences)
    on_f32 = agreement(merged, llama_cpp_logits(smollm2_export("f32"), eval_sequences, lora_path=str(path)))
    on_q4 = agreement(merged, llama_cpp_logits(smollm2_gguf, eval_sequences, lora_path=str(path)))
    base = agreement(merged, llama_cpp_logits(smollm2_gguf, eval_sequences))
    print(f"\nllama.cpp with the adapter GGUF vs camelid's merged model, top-1 over 400 positions: on the f32 base "
          f"{on_f32:.4f}, on the Q4_1 file {on_q4:.4f} (the Q4_1 file without the adapter: {base:.4f})")
    assert on_f32 >= 0.99 and on_q4 >= 0.93 and on_q4 > base


def test_export_gguf_adapter_refuses_bad_input_in_one_line_and_writes_nothing(tiny_chat_dir, smollm2_gguf, tmp_path):
    from camelid.lora import LoRAConfig, apply_lora, save_adapter

    tiny = load_model(tiny_chat_dir, device="cpu")
    save_adapter(apply_lora(tiny.model, LoRAConfig(r=2, targets=("q_proj", "v_proj"))), tmp_path / "adapter",
                 base_model=str(tiny_chat_dir))
    out = tmp_path / "adapter.gguf"
    cases = [
        (dict(base=smollm2_gguf), r"^the adapter does not fit the base .*SmolLM2.*: .*no tensor for model\.layers\.10\."
                                  r"self_attn\.q_proj\.lora_A\.weight \(0 unexpected, 112 missing\)"),
        (dict(type="q4_0"), r"^unknown adapter GGUF type 'q4_0'; choose f32 or f16$"),
    ]
    for options, message in cases:
        with pytest.raises(CamelidError, match=message) as caught:
            export_gguf_adapter(tmp_path / "adapter", out, **options)
        assert "\n" not in str(caught.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # nothing written, not even a temp file
    with pytest.raises(CamelidError, match=r"not a LoRA adapter directory"):
        export_gguf_adapter(tiny_chat_dir, out)
    export_gguf_adapter(tmp_path / "adapter", out)
    before = out.read_bytes()
    with pytest.raises(CamelidError, match=r"already exists; choose another path, or pass --force"):
        export_gguf_adapter(tmp_path / "adapter", out)
    assert out.read_bytes() == before
    export_gguf_adapter(tmp_path / "adapter", out, type="f16", overwrite=True)
    assert GGUFFile(out).metadata["general.type"] == "adapter" and out.read_bytes() != before


TINY = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "bos_token_id": 1,
        "eos_token_id": 2}
VARIANTS = {
    "tied": ModelConfig(**TINY, tie_word_embeddings=True),
    "bias-linear-rope": ModelConfig(**TINY, attention_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama3-rope": ModelConfig(**{**TINY, "num_key_value_heads": 1}, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}),
}


def tiny_model(config: ModelConfig, tokenizer, template, seed: int = 0) -> LoadedModel:
    """Random weights spread wider than usual, so that logits differ clearly between tokens."""
    torch.manual_seed(seed)
    model = Llama(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name or p.dim() == 1 else 0.2)
    return LoadedModel(model.eval(), tokenizer, template, Path("tiny"))


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf), GGUFFile(smollm2_gguf).metadata["tokenizer.chat_template"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_variants_round_trip_exactly(variant, smollm2_tokenizer, tmp_path):
    loaded = tiny_model(VARIANTS[variant], *smollm2_tokenizer)
    path = export_gguf(loaded, tmp_path / "tiny.gguf", type="f32", progress=False)
    back = load_model(path, device="cpu", dtype="float32")
    ours, theirs = loaded.model.state_dict(), back.model.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # GGUF stores the epsilon as float32; everything else comes back as it was.
    expected = ModelConfig(**{**loaded.config.__dict__, "rms_norm_eps": float(np.float32(loaded.config.rms_norm_eps))})
    assert back.config == expected
    names = set(GGUFFile(path).tensors)
    assert ("output.weight" in names) is (not loaded.config.tie_word_embeddings)
    assert ("rope_freqs.weight" in names) is (variant == "llama3-rope")


@pytest.mark.llamacpp
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llama_cpp_computes_tiny_variants_as_camelid(variant, smollm2_tokenizer, sharegpt_texts, tmp_path):
    """Logits compared value for value: GQA, biases (q/k permuted like their weights), untied heads, linear and
    Llama-3 rope scaling all as llama.cpp reads them."""
    loaded = tiny_model(VARIANTS[variant], *smollm2_tokenizer)
    path = export_gguf(loaded, tmp_path / "tiny.gguf", type="f32", progress=False)
    ids = loaded.tokenizer.encode(" ".join(sharegpt_texts[:20]))[:200]
    (ours,) = camelid_logits(loaded.model, [ids])
    (theirs,) = llama_cpp_logits(path, [ids], n_ctx=256, type_k=0, type_v=0)  # an f32 KV cache (GGML_TYPE_F32)
    assert np.abs(ours).max() > 1  # logits that differ clearly between tokens
    np.testing.assert_allclose(theirs, ours, atol=5e-4, rtol=0)  # measured: at most 7e-5


# -- byte-level vocabularies under other pre-tokenizers --------------------------------------------------------


@pytest.mark.llamacpp
@pytest.mark.parametrize("pre, written", [("llama-bpe", "llama-bpe"), ("dbrx", "smaug-bpe"), ("gpt-2", "gpt-2"),
                                          ("qwen2", "qwen2"), ("falcon", "falcon"), ("default", "default")])
def test_byte_level_vocabularies_keep_their_splitting(pre, written, smollm2_gguf, sharegpt_texts, tmp_path):
    """SmolLM2's vocabulary read under another `tokenizer.ggml.pre`: the export names a pre-tokenizer that splits
    the same (one name per distinct splitting), and llama.cpp tokenizes the exported file as camelid does."""
    from camelid.tokenizer import tokenizer_from_gguf

    metadata = {**GGUFFile(smollm2_gguf).metadata, "tokenizer.ggml.pre": pre}
    del metadata["tokenizer.ggml.add_bos_token"]  # llama.cpp's default for the name decides
    tokenizer = tokenizer_from_gguf(metadata)
    path = export_gguf(tiny_model(VARIANTS["tied"], tokenizer, None), tmp_path / "t.gguf", type="f16", progress=False)
    assert GGUFFile(path).metadata["tokenizer.ggml.pre"] == written
    assert GGUFFile(path).metadata["tokenizer.ggml.add_bos_token"] is (pre == "llama-bpe")
    vocab = _llama(path, vocab_only=True)
    try:
        for text in sharegpt_texts[:150] + CHAT_TEXTS:
            assert vocab.tokenize(text.encode(), add_bos=True, special=True) == tokenizer.encode(text), text[:80]
    finally:
        vocab.close()


def test_end_tokens_llama_cpp_would_not_find_travel_as_eot_and_eom(smollm2_gguf):
    from camelid.tokenizer import Tokenizer, tokenizer_from_gguf

    base = load_tokenizer(smollm2_gguf)
    one, two, three = 3, 4, 5  # <repo_name>, <reponame>, <file_sep>: control tokens llama.cpp does not stop at
    kw = {"bos_id": base.bos_id, "eos_id": base.eos_id, "pad_id": base.pad_id, "add_bos": base.add_bos}
    tokenizer = Tokenizer(base.backend, **kw, stop_ids=base.stop_ids | {one, two})
    metadata = gguf_vocabulary(tokenizer, 49152)
    assert (metadata["tokenizer.ggml.eot_token_id"], metadata["tokenizer.ggml.eom_token_id"]) == (one, two)
    assert tokenizer_from_gguf(metadata).stop_ids == tokenizer.stop_ids
    with pytest.raises(CamelidError, match=r"more tokens than GGUF can name \(ids \[5\] would be lost\)"):
        gguf_vocabulary(Tokenizer(base.backend, **kw, stop_ids=base.stop_ids | {one, two, three}), 49152)


# -- the SentencePiece ('llama') vocabulary --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentencepiece_dir(sharegpt_texts, tmp_path_factory) -> Path:
    """An HF tokenizer directory as transformers converts a Llama-style SentencePiece BPE model (byte fallback,
    dummy prefix), trained here on ShareGPT text since no real one is available offline."""
    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("spm")
    lines = [line for text in sharegpt_texts[:600] for line in text.splitlines() if line.strip()]
    (directory / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(directory / "train.txt"), model_prefix=str(directory / "spm"), model_type="bpe", vocab_size=1500,
        character_coverage=0.995, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True, unk_id=0,
        bos_id=1, eos_id=2, pad_id=-1, control_symbols=["<|im_start|>", "<|im_end|>"], user_defined_symbols=["<think>"],
        max_sentence_length=16384, num_threads=1, minloglevel=2,
    )
    source = directory / "source"
    source.mkdir()
    (directory / "spm.model").rename(source / "tokenizer.model")
    (source / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "legacy": True,
    }))
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(directory / "hf")
    return directory / "hf"


@pytest.mark.llamacpp
def test_sentencepiece_vocabulary_tokenizes_in_llama_cpp_as_in_camelid(sentencepiece_dir, sharegpt_texts, tmp_path):
    tokenizer = load_tokenizer(sentencepiece_dir)
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    config = ModelConfig(**{**TINY, "vocab_size": 1536})  # the embedding padded past the 1,500 tokens
    path = export_gguf(tiny_model(config, tokenizer, template), tmp_path / "spm.gguf", type="f16", progress=False)
    metadata = GGUFFile(path).metadata
    assert metadata["tokenizer.ggml.model"] == "llama" and metadata["tokenizer.ggml.add_space_prefix"] is True
    assert metadata["tokenizer.ggml.tokens"][1500:] == [f"[PAD{i}]" for i in range(1500, 1536)]
    back = load_model(path, device="cpu", dtype="float32")
    vocab = _llama(path, vocab_only=True)
    try:
        # Plain text, as transformers and SentencePiece agree on it (they differ before a leading space).
        texts = [t for t in sharegpt_texts[:400] if not t[:1].isspace()]
        for text in texts:
            ours = tokenizer.encode(text)
            assert back.tokenizer.encode(text) == ours, text[:80]
            assert vocab.tokenize(text.encode(), add_bos=True, special=True) == ours, text[:80]
        chat = "<|im_start|>user\nhello <think>there</think><|im_end|>\n"
        assert vocab.tokenize(chat.encode(), add_bos=True, special=True) == back.tokenizer.encode(chat)
    finally:
        vocab.close()


# -- HF directories --------------------------------------------------------------------------------------------


def transformers_logits(directory: Path, ids: list[int]) -> np.ndarray:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.slow
def test_hf_export_of_a_named_model_loads_in_transformers(smollm2_model, tmp_path):
    out = export_hf("smollm2-135m-instruct", tmp_path / "smollm2")
    ids = smollm2_model.tokenizer.encode("<|im_start|>user\nWhy do camels have humps?<|im_end|>\n<|im_start|>assistant\n")
    (ours,) = camelid_logits(smollm2_model.model, [ids])
    np.testing.assert_allclose(transformers_logits(out, ids), ours, atol=1e-4, rtol=0)
    transformers = pytest.importorskip("transformers")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer.chat_template == smollm2_model.chat_template


def test_hf_export_of_a_gguf_and_of_an_adapter_load_in_transformers(smollm2_tokenizer, tmp_path):
    from camelid.lora import LoRAConfig, apply_lora, save_adapter

    tiny = tiny_model(VARIANTS["bias-linear-rope"], *smollm2_tokenizer)
    gguf = export_gguf(tiny, tmp_path / "tiny.gguf", type="f32", progress=False)
    base_dir = save_model(tiny, tmp_path / "base")
    adapted = apply_lora(tiny_model(VARIANTS["bias-linear-rope"], *smollm2_tokenizer).model,
                         LoRAConfig(targets=("q_proj", "k_proj", "down_proj")))
    with torch.no_grad():  # a fresh adapter's B is zero: make merging matter
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    adapter = save_adapter(adapted, tmp_path / "adapter", base_model=str(base_dir))

    ids = tiny.tokenizer.encode("The camel is a large animal of the desert. " * 4)
    for source in (gguf, adapter):
        out = export_hf(source, tmp_path / f"hf-{source.name}")
        (ours,) = camelid_logits(load_model(source, device="cpu", dtype="float32").model, [ids])
        np.testing.assert_allclose(transformers_logits(out, ids), ours, atol=1e-4, rtol=0)
    # The adapter changed the model, so the comparison above shows it was merged.
    (base,) = camelid_logits(tiny.model, [ids])
    assert np.abs(base - ours).max() > 0.1


# -- refusals and the command line -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(smollm2_tokenizer, tmp_path_factory) -> Path:
    return save_model(tiny_model(VARIANTS["tied"], *smollm2_tokenizer), tmp_path_factory.mktemp("cli") / "tiny")


def test_export_gguf_command_writes_the_type_asked_for(tiny_dir, tmp_path, capsys):
    from gguf import GGMLQuantizationType as Q

    from camelid.cli import main

    out = tmp_path / "tiny.gguf"
    assert main(["export", "gguf", str(tiny_dir), str(out), "--type", "q8_0", "--name", "Tiny"]) == 0
    assert f"wrote {out} (GGUF q8_0" in capsys.readouterr().out
    gguf = GGUFFile(out)
    assert gguf.metadata["general.name"] == "Tiny"
    assert Q(gguf.tensors["blk.0.ffn_up.weight"].ggml_type) == Q.Q8_0
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]

    # An existing file is kept unless --force.
    before = out.read_bytes()
    assert main(["export", "gguf", str(tiny_dir), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("camelid: error: ") and "already exists" in err and "--force" in err
    assert out.read_bytes() == before
    assert main(["export", "gguf", str(tiny_dir), str(out), "--force", "--type", "f32"]) == 0
    assert GGUFFile(out).metadata["general.file_type"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]


def test_export_gguf_refuses_an_unknown_type_in_one_line(tiny_dir, tmp_path, capsys):
    from camelid.cli import main

    assert main(["export", "gguf", str(tiny_dir), str(tmp_path / "x.gguf"), "--type", "iq2_xs"]) == 1
    err = capsys.readouterr().err
    assert err == f"camelid: error: unknown GGUF type 'iq2_xs'; choose one of: {', '.join(GGUF_TYPES)}\n"
    assert not any(tmp_path.iterdir())


def test_export_hf_command_and_its_aliases(tiny_dir, tmp_path, capsys):
    from camelid.cli import main

    for argv in (["export", "hf", str(tiny_dir), str(tmp_path / "a")], ["convert", str(tiny_dir), str(tmp_path / "b")]):
        assert main(argv) == 0
        assert "wrote" in capsys.readouterr().out
    a, b = (load_model(tmp_path / n, device="cpu", dtype="float32").model.state_dict() for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(["export", "hf", str(tiny_dir), str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err
    assert main(["export", "hf", str(tiny_dir), str(tmp_path / "a"), "--force", "--dtype", "bfloat16"]) == 0


def gguf_name(path) -> str:
    """general.name as llama.cpp's own reader, the `gguf` package, reads it."""
    from gguf import GGUFReader

    return GGUFReader(path).fields["general.name"].contents()


def test_general_name_is_the_run_or_the_hub_id_unless_named(tiny_chat_dir, tmp_path, monkeypatch, capsys):
    """Every export of a trained model was named "model" (issue 17): a train run's model is named after its run, a
    checkpoint's after its run and step, an HF directory after the Hub id it came from, and --name wins."""
    import shutil

    from camelid.cli import main
    from camelid.data.identity import identity_conversations
    from camelid.export import _default_name
    from camelid.train.loop import train
    from camelid.train.recipe import build_config

    monkeypatch.chdir(tmp_path)
    Path("chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in identity_conversations()))
    settings = dict(model=str(tiny_chat_dir), data=["chats.jsonl"], out="runs/mine", seq_len=256, batch_size=4,
                    micro_batch_size=2, max_steps=1, save_every=1)
    train(build_config(settings), progress=False, log=lambda message: None)
    assert main(["export", "gguf", "runs/mine/model", "mine.gguf"]) == 0
    assert gguf_name("mine.gguf") == "mine"
    assert _default_name("runs/mine/checkpoints/step-000001/model") == "mine-step-000001"
    assert main(["export", "gguf", "runs/mine/model", "named.gguf", "--name", "Nimbus 1"]) == 0
    assert gguf_name("named.gguf") == "Nimbus 1"

    # HF directories: the Hub id transformers saved, not a path on the machine that saved it; else the directory.
    for directory, name_or_path in [("hub", "HuggingFaceTB/SmolLM2-135M-Instruct"), ("local", "/fsx/ckpt/run-3"),
                                    ("model", None)]:
        shutil.copytree(tiny_chat_dir, directory)
        config = json.loads(Path(directory, "config.json").read_text())
        Path(directory, "config.json").write_text(json.dumps({**config, "_name_or_path": name_or_path}))
    export_gguf("hub", "hub.gguf", progress=False)
    assert gguf_name("hub.gguf") == "SmolLM2-135M-Instruct"
    assert _default_name("local") == "local"
    assert _default_name("model") == "model"  # not in a run directory
    capsys.readouterr()


def test_export_help_explains_every_flag(capsys):
    from camelid.cli import main

    for argv in (["export", "gguf", "--help"], ["export", "hf", "--help"]):
        with pytest.raises(SystemExit) as exc_info:
            main(argv)
        assert exc_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--type", "--name", "--force", "--dtype", "MODEL", "OUT.gguf", "OUT_DIR", *GGUF_TYPES):
        assert flag in text, flag


def test_an_interrupted_export_leaves_nothing_behind(smollm2_tokenizer, tmp_path, monkeypatch):
    import camelid.export

    loaded = tiny_model(VARIANTS["tied"], *smollm2_tokenizer)
    real_encode, calls = camelid.export._encode, []

    def interrupted(*args):
        calls.append(args[0])
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_encode(*args)

    monkeypatch.setattr(camelid.export, "_encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(loaded, tmp_path / "tiny.gguf", type="f16", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_models_that_cannot_be_exported_are_refused(smollm2_tokenizer, tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    from camelid.quantize import quantize_model
    from camelid.tokenizer import Tokenizer

    loaded = tiny_model(VARIANTS["tied"], *smollm2_tokenizer)
    quantized = LoadedModel(quantize_model(loaded.model, "f16"), loaded.tokenizer, None, Path("tiny"))
    with pytest.raises(CamelidError, match="loaded with --quantize f16; load it without"):
        export_gguf(quantized, tmp_path / "q.gguf")
    words = Tokenizer(Backend(WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")), bos_id=None, eos_id=None)
    with pytest.raises(CamelidError, match="a WordLevel tokenizer cannot be written to GGUF"):
        gguf_vocabulary(words, 2)
    with pytest.raises(CamelidError, match="tokenizer has 49152 tokens but the model's embedding only 1000 rows"):
        gguf_vocabulary(loaded.tokenizer, 1000)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.llamacpp
@pytest.mark.slow
def test_a_base_model_tuned_in_gemmas_template_answers_in_llama_cpp_through_the_files_template(gemma3_gguf, tmp_path):
    """`camelid quickstart alpaca` trains Gemma 3 270M base (no template of its own) in the built-in `gemma`
    template, and its model directory carries that template's source. Exported as GGUF, the template is in the
    file's metadata, and llama-cpp-python's chat completion, rendering with it, feeds exactly the tokens camelid's
    chat would, then answers."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from camelid.chat import chat_template_for, encode_chat
    from camelid.checkpoint import write_model_files

    base = load_model(gemma3_gguf, device="cpu", dtype="float32")
    gemma = chat_template_for(base, "gemma")
    directory = write_model_files(base.config, base.model.state_dict(), tmp_path / "model", tokenizer=base.tokenizer,
                                  chat_template=gemma.source)
    path = export_gguf(directory, tmp_path / "model.gguf", type="f16", progress=False)
    llm = _llama(path, n_ctx=512)
    try:
        assert llm.metadata["tokenizer.chat_template"] == gemma.source
        assert llm.chat_format == "chat_template.default"  # llama-cpp-python's handler for the file's own template
        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}]
        token_text = lambda t: llm._model.token_get_text(t)  # noqa: E731
        rendered = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=token_text(llm.token_eos()),
                                       bos_token=token_text(llm.token_bos()))(messages=messages)
        theirs = llm.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True)
        assert theirs == encode_chat(base, gemma, messages)
        reply = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=8)
        assert reply["usage"]["prompt_tokens"] == len(theirs) and reply["usage"]["completion_tokens"] > 0
    finally:
        llm.close()
