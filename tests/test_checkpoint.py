"""Checkpoints against their references: GGUF files read as transformers and llama.cpp read them, HF
directories that transformers loads, and clear refusals of damaged or unsupported files."""

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from camelid.checkpoint import build_model, load_model, read_gguf_weights, save_model
from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.gguf_file import GGUFFile
from camelid.model import Llama

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType

# Dimensions are multiples of 256 so that the K-quants (256-value super-blocks) apply to every matrix.
# The vocabulary is SmolLM2's first 512 tokens (no merges): the model's reference is transformers, whose GGUF
# reader takes seconds per 50K-token vocabulary; the llama.cpp test uses the whole vocabulary.
TINY = ModelConfig(
    vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rope_theta=100000.0, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)
# K-quant block layouts: byte offsets of their float16 scale fields, which must hold sane values.
K_QUANT_SCALES = {Q.Q4_K: (144, [0, 2]), Q.Q5_K: (176, [0, 2]), Q.Q6_K: (210, [208]), Q.Q2_K: (84, [80, 82]),
                  Q.Q3_K: (110, [108])}


def _llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's conversion of q/k rows from the HF rotary layout to its interleaved one."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_k_quant(shape, qtype, rng) -> np.ndarray:
    """Random blocks of a K-quant type (which the gguf package cannot quantize) with small, finite scales."""
    block_bytes, scale_offsets = K_QUANT_SCALES[qtype]
    n_blocks = int(np.prod(shape)) // 256
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in scale_offsets:
        raw[:, off : off + 2] = np.frombuffer(np.float16(rng.uniform(0.001, 0.004)).tobytes(), np.uint8)
    return raw.reshape(shape[0], -1)


def write_gguf(path: Path, model: Llama, qtype, tokenizer_meta: dict, rng=None) -> dict[str, np.ndarray]:
    """Write `model` as llama.cpp would, with `qtype` for the 2-D weights; returns the float weights written."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model(tokenizer_meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(tokenizer_meta["tokenizer.ggml.pre"])
    full_vocab = c.vocab_size == len(tokenizer_meta["tokenizer.ggml.tokens"])
    w.add_token_list(tokenizer_meta["tokenizer.ggml.tokens"][: c.vocab_size])
    w.add_token_types(tokenizer_meta["tokenizer.ggml.token_type"][: c.vocab_size])
    w.add_token_merges(tokenizer_meta["tokenizer.ggml.merges"] if full_vocab else [])
    w.add_bos_token_id(tokenizer_meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(tokenizer_meta["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(tokenizer_meta["tokenizer.chat_template"])
    names = {v: k for k, v in _gguf_names(c).items()}
    written = {}
    for hf_name, tensor in model.state_dict().items():
        a = tensor.float().numpy()
        heads = c.num_attention_heads if ".q_proj." in hf_name else c.num_key_value_heads if ".k_proj." in hf_name else 0
        if heads:
            a = _llamacpp_permute(a, heads)
        name = names[hf_name]
        if a.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, a)
        elif qtype in K_QUANT_SCALES:
            raw = _random_k_quant(a.shape, qtype, rng)
            w.add_tensor(name, raw, raw_dtype=qtype)
            a = gguf.quants.dequantize(raw, qtype).reshape(a.shape)
        else:
            raw = gguf.quants.quantize(a, qtype)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
            a = gguf.quants.dequantize(raw, qtype).reshape(a.shape)
        if heads:  # back to the HF layout: the order camelid must have restored
            a = a.reshape(heads, a.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(a.shape)
        written[hf_name] = a
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def _gguf_names(c: ModelConfig) -> dict[str, str]:
    from camelid.checkpoint import gguf_to_hf_name

    names = ["token_embd.weight", "output_norm.weight", "output.weight"] + [
        f"blk.{i}.{t}.weight"
        for i in range(c.num_hidden_layers)
        for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
    ]
    return {n: gguf_to_hf_name(n) for n in names}


@pytest.fixture(scope="module")
def tokenizer_meta(smollm2_gguf):
    meta = GGUFFile(smollm2_gguf).metadata
    return {k: v for k, v in meta.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Llama(TINY).eval()


@pytest.fixture(scope="module")
def tiny_model_full_vocab():
    torch.manual_seed(0)
    return Llama(ModelConfig(**{**TINY.__dict__, "vocab_size": 49152})).eval()


TEXT_IDS = torch.tensor([[1, 504, 375, 282, 469, 314, 72, 30, 378, 355, 282, 421, 314, 2, 77, 500]])

QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_gguf_weights_equal_what_was_written_and_logits_equal_transformers(tmp_path, tiny_model, tokenizer_meta, qtype):
    path = tmp_path / "tiny.gguf"
    written = write_gguf(path, tiny_model, qtype, tokenizer_meta, rng=np.random.default_rng(0))
    config, state = read_gguf_weights(GGUFFile(path))
    assert config.num_key_value_heads == 2 and not config.tie_word_embeddings
    for name, expected in written.items():
        np.testing.assert_array_equal(state[name].numpy(), expected, err_msg=name)
    ours = build_model(config, state)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(TEXT_IDS), hf.eval()(TEXT_IDS).logits, atol=1e-4, rtol=0)


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_K], ids=lambda q: q.name)
def test_gguf_logits_match_llamacpp(tmp_path, tiny_model_full_vocab, tokenizer_meta, qtype):
    """llama.cpp's own kernels on the same file: same next-token choices, logits close."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_model_full_vocab, qtype, tokenizer_meta, rng=np.random.default_rng(0))
    ours = build_model(*read_gguf_weights(GGUFFile(path)))
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    ids = TEXT_IDS[0].tolist()
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        mine = ours(TEXT_IDS)[0]
    assert (mine.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9
    # llama.cpp rounds activations to 8 bits for quantized matmuls: close, not equal
    assert (mine - theirs).abs().max() < (1e-3 if qtype == Q.F32 else 0.05 if qtype == Q.F16 else 0.5)


@pytest.mark.slow
def test_smollm2_logits_equal_transformers(smollm2_gguf):
    loaded = load_model(smollm2_gguf, device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([loaded.tokenizer.encode("The capital of France is Paris. Camels store fat in their humps, and")])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_convert_round_trip_loads_in_transformers(tmp_path, smollm2_gguf):
    from camelid.cli import main

    out = tmp_path / "smollm2-hf"
    assert main(["convert", str(smollm2_gguf), str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    ours = load_model(smollm2_gguf, device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    assert hf_tok(text, add_special_tokens=False).input_ids == ours.tokenizer.encode(text, add_special=False)
    messages = [{"role": "user", "content": "Hi there"}]
    assert "<|im_start|>assistant" in hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([ours.tokenizer.encode(text, add_special=False)])
    reloaded = load_model(out, device="cpu")
    with torch.no_grad():
        expected = ours.model(ids)
        torch.testing.assert_close(hf(ids).logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(reloaded.model(ids), expected, atol=0, rtol=0)
    assert reloaded.chat_template == ours.chat_template


def test_sharded_hf_directory_loads(tmp_path):
    """A transformers checkpoint saved in several safetensors shards with an index."""
    torch.manual_seed(1)
    config = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=1e5,
                         rope_scaling={"rope_type": "linear", "factor": 2.0})
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf())).eval()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    from camelid.checkpoint import read_hf_weights

    config_read, state = read_hf_weights(tmp_path)
    assert (config_read.rope_theta, config_read.rope_scaling) == (1e5, {"rope_type": "linear", "factor": 2.0})
    model = build_model(config_read, state)
    ids = torch.arange(20)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


# -- bad input ---------------------------------------------------------------------------------------------------


def test_truncated_gguf_is_refused(tmp_path, smollm2_gguf):
    data = smollm2_gguf.read_bytes()
    for cut in (10, 2_000_000, len(data) // 2):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CamelidError, match="truncated|damaged"):
            load_model(bad, device="cpu")


def test_not_a_gguf_is_refused(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("hello, I am not a model")
    with pytest.raises(CamelidError, match="not a GGUF file"):
        load_model(bad, device="cpu")
    empty = tmp_path / "empty.gguf"
    empty.touch()
    with pytest.raises(CamelidError, match="empty"):
        load_model(empty, device="cpu")


def test_unsupported_architecture_is_refused(tmp_path, tiny_model, tokenizer_meta):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_model, Q.F32, tokenizer_meta)
    data = path.read_bytes().replace(b"llama", b"gpt2_", 1)  # general.architecture
    path.write_bytes(data)
    with pytest.raises(CamelidError,
                       match=r"architecture 'gpt2_' is not supported \(supported: llama, qwen2, qwen3, smollm3, gemma3, "
                             r"phi3\)"):
        load_model(path, device="cpu")


@pytest.mark.parametrize("rope_dims, factors, message", [
    (16, True, r"phi3 with longrope \(rope_factors_long/short\) is not supported$"),  # Phi-3-mini-128k, Phi-3.5
    (12, False, r"phi3 with a rotary embedding on part of each head \(rope.dimension_count 12 of 16\) is not "
                r"supported$"),  # Phi-4-mini
])
def test_phi3_gguf_that_camelid_does_not_run_is_refused_in_one_line(tmp_path, rope_dims, factors, message):
    path = tmp_path / "phi3.gguf"
    w = gguf.GGUFWriter(str(path), "phi3")
    for add, value in [(w.add_context_length, 4096), (w.add_embedding_length, 64), (w.add_block_count, 1),
                       (w.add_feed_forward_length, 128), (w.add_head_count, 4), (w.add_head_count_kv, 4),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_dimension_count, rope_dims)]:
        add(value)
    w.add_tensor("token_embd.weight", np.zeros((32, 64), np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))  # the one layer block_count says
    if factors:  # as llama.cpp's converter writes longrope's per-frequency factors
        w.add_tensor("rope_factors_long.weight", np.ones(8, np.float32))
        w.add_tensor("rope_factors_short.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CamelidError, match=message) as caught:
        load_model(path, device="cpu")
    assert "\n" not in str(caught.value)


def test_missing_and_unknown_models(tmp_path):
    with pytest.raises(CamelidError, match="no such file"):
        load_model(tmp_path / "nope.gguf")
    with pytest.raises(CamelidError, match="unknown model name 'gpt-9'.*smollm2-135m-instruct"):
        load_model("gpt-9")


def test_hf_directory_problems(tmp_path):
    torch.manual_seed(2)
    config = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf()))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    config.save(pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 not opened: camelid refuses pickles by name")
    with pytest.raises(CamelidError, match="only in pickle files.*never loads"):
        load_model(pickled)
    hf.save_pretrained(tmp_path / "ok")
    with pytest.raises(CamelidError, match="tokenizer"):
        load_model(tmp_path / "ok")  # weights fine, no tokenizer.json
    weights = tmp_path / "ok" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CamelidError, match="truncated"):
        load_model(tmp_path / "ok")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CamelidError, match="no config.json"):
        load_model(tmp_path / "empty")
    bad_arch = tmp_path / "bad"
    bad_arch.mkdir()
    (bad_arch / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CamelidError, match="model_type 'gpt2' is not supported"):
        load_model(bad_arch)
    (bad_arch / "config.json").write_text(json.dumps({"model_type": "llama", "num_key_value_heads": 0}))
    with pytest.raises(CamelidError, match="num_key_value_heads must be a whole number from 1"):
        load_model(bad_arch)
    (bad_arch / "config.json").write_text(json.dumps({"model_type": "llama", "rope_scaling": {"rope_type": "llama3"}}))
    with pytest.raises(CamelidError, match="rope_scaling of type llama3 lacks factor"):
        load_model(bad_arch)
    (bad_arch / "config.json").write_text("[1, 2]")
    with pytest.raises(CamelidError, match="must hold a JSON object"):
        load_model(bad_arch)


def test_save_refuses_existing_directory_and_leaves_nothing_behind(tmp_path, smollm2_gguf):
    loaded = load_model(smollm2_gguf, device="cpu")
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(CamelidError, match="already exists"):
        save_model(loaded, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # --force replaces it whole; files get the permissions of any file the user creates
    save_model(loaded, target, overwrite=True)
    assert "keep.txt" not in {p.name for p in target.iterdir()} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in target.iterdir()} == {0o666 & ~umask}
    shutil.rmtree(target)


def test_unusable_devices_are_refused(smollm2_gguf):
    with pytest.raises(CamelidError, match="unknown device 'gpu'"):
        load_model(smollm2_gguf, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(CamelidError, match="no CUDA GPU; use --device cpu"):
            load_model(smollm2_gguf, device="cuda")


@pytest.mark.slow
@pytest.mark.llamacpp
def test_smollm2_next_token_agreement_with_llamacpp(smollm2_gguf, sharegpt_texts, record_property):
    """Top-1 next token, camelid (fp32 from the dequantized file) vs llama.cpp (its Q4_1 kernels with 8-bit
    activations), over 400+ positions of real conversation text."""
    llama_cpp = pytest.importorskip("llama_cpp")
    loaded = load_model(smollm2_gguf, device="cpu")
    llm = llama_cpp.Llama(str(smollm2_gguf), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    agree = total = 0
    for text in sharegpt_texts[:40]:
        ids = loaded.tokenizer.encode(text)[:128]
        if len(ids) < 16:
            continue
        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)]).argmax(-1)
        with torch.no_grad():
            mine = loaded.model(torch.tensor([ids]))[0].argmax(-1).numpy()
        agree += int((mine == theirs).sum())
        total += len(ids)
        if total >= 400:
            break
    rate = agree / total
    record_property("llamacpp_top1_agreement", f"{rate:.4f} over {total} positions")
    print(f"top-1 agreement with llama.cpp: {rate:.2%} over {total} positions")
    assert total >= 200 and rate >= 0.95
