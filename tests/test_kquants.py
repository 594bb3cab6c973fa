"""`camelid export gguf --type q4_k_m` and the other K-quant mixes against llama.cpp's own llama-quantize: the same
f32 GGUF quantized by both gives the same type and the same bytes for every tensor (camelid.kquants writes the
Q4_K, Q5_K and Q6_K blocks; export.py picks each tensor's type as llama-quantize's mixes do), on SmolLM2 and on
tiny random models of each family whose rows fill 256-weight blocks.
"""

import ctypes

import numpy as np
import pytest
import torch

from camelid.checkpoint import LoadedModel
from camelid.config import ModelConfig
from camelid.export import K_MIXES, export_gguf
from camelid.gguf_file import GGUFFile
from camelid.kquants import quantize_q2_k, quantize_q3_k, quantize_q4_k, quantize_q5_k, quantize_q6_k
from camelid.model import Llama
from camelid.tokenizer import load_tokenizer

FTYPES = {"q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17,
          "q6_k": 18}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def llama_quantize(src, dst, mix: str):
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[mix]
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def differences(ours_path, theirs_path) -> list[str]:
    """Every tensor whose type or bytes differ between the two files (empty when they are the same)."""
    ours, theirs = GGUFFile(ours_path), GGUFFile(theirs_path)
    assert set(ours.tensors) == set(theirs.tensors)
    found = []
    for name, info in theirs.tensors.items():
        if ours.tensors[name].ggml_type != info.ggml_type:
            found.append(f"{name}: type {ours.tensors[name].ggml_type}, llama.cpp's {info.ggml_type}")
        elif not np.array_equal(ours.raw(name), theirs.raw(name)):
            found.append(f"{name}: bytes differ")
    return found


def test_blocks_of_zeros_and_of_one_value_are_what_ggml_writes():
    """Edge cases of the scale searches: an all-zero super-block, all-zero groups beside others, a constant row."""
    rows = np.zeros((3, 256), np.float32)
    rows[1, 16:] = np.linspace(-1, 1, 240, dtype=np.float32)
    rows[2] = 0.25
    for quantize, size in ((quantize_q2_k, 84), (quantize_q3_k, 110), (quantize_q4_k, 144), (quantize_q5_k, 176),
                           (quantize_q6_k, 210)):
        out = quantize(rows)
        assert out.shape == (3, size) and not out[0].any()  # zeros quantize to zero bytes
    # dequantized by the gguf package (llama.cpp's own layout), the values come back within a block's step
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    for quantize, qtype, levels in ((quantize_q2_k, Q.Q2_K, 3), (quantize_q3_k, Q.Q3_K, 7), (quantize_q4_k, Q.Q4_K, 15),
                                    (quantize_q5_k, Q.Q5_K, 31), (quantize_q6_k, Q.Q6_K, 63)):
        back = dequantize(quantize(rows), qtype).reshape(rows.shape)
        assert np.abs(back - rows).max() <= 2.5 / levels


BLOCKS = {"q2_K": (quantize_q2_k, 84), "q3_K": (quantize_q3_k, 110), "q4_K": (quantize_q4_k, 144),
          "q5_K": (quantize_q5_k, 176), "q6_K": (quantize_q6_k, 210)}


@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_blocks_are_byte_identical_to_ggmls_reference_quantizer(kind):
    """Each block type against ggml's own quantize_row_<kind>_ref (the C that llama-quantize runs without an
    importance matrix), called in llama-cpp-python's libggml-base, on weights of several distributions."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from pathlib import Path

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    quantize, size = BLOCKS[kind]
    rng = np.random.default_rng(0)
    cases = {"normal": rng.normal(0, 0.02, (300, 256)), "heavy tails": rng.standard_t(3, (300, 256)),
             "sparse": np.where(rng.random((300, 256)) < 0.3, 0, rng.normal(0, 1, (300, 256))),
             "one sign": np.abs(rng.normal(0, 1, (100, 256))), "edges": np.zeros((3, 256))}
    cases["edges"][1, 16:], cases["edges"][2] = np.linspace(-1, 1, 240), 0.25
    for name, x in cases.items():
        x = np.ascontiguousarray(x, dtype=np.float32)
        theirs = np.zeros((len(x), size), np.uint8)
        getattr(lib, f"quantize_row_{kind}_ref")(x.ctypes.data_as(ctypes.c_void_p),
                                                 theirs.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
        differing = np.nonzero((quantize(x) != theirs).any(-1))[0]
        assert len(differing) == 0, f"{kind} {name}: blocks {differing[:10]} of {len(x)} differ"


@pytest.fixture(scope="module")
def smollm2_f32(smollm2_model, tmp_path_factory):
    return export_gguf(smollm2_model, tmp_path_factory.mktemp("kq") / "smollm2-f32.gguf", type="f32", progress=False)


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("mix", list(K_MIXES))
def test_smollm2_k_quants_are_byte_identical_to_llama_quantize(mix, smollm2_model, smollm2_f32, tmp_path):
    """SmolLM2's rows of 576 are too short for 256-weight blocks except ffn_down's: those are K-quants, the rest
    fall back to Q5_0, Q5_1 or Q8_0 as llama-quantize does; all identical."""
    ours = export_gguf(smollm2_model, tmp_path / "ours.gguf", type=mix, progress=False)
    theirs = llama_quantize(smollm2_f32, tmp_path / "theirs.gguf", mix)
    assert differences(ours, theirs) == []
    types = {info.ggml_type for info in GGUFFile(ours).tensors.values()}
    assert types & {10, 11, 12, 13, 14}  # some K-quant tensors (Q2_K to Q6_K) were compared


# Rows of 256 and 512 so that every linear layer is a K-quant, eight layers so that the mixes' choice of layers
# with more bits shows, and the families' differences: GQA (k/v narrower), q/k norms, tied embeddings, fused qkv.
TINY = dict(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama-tied": ModelConfig(**TINY, tie_word_embeddings=True),
    "llama-untied": ModelConfig(**TINY),
    "qwen2": ModelConfig(**TINY, model_type="qwen2", tie_word_embeddings=True),
    "qwen3": ModelConfig(**{**TINY, "head_dim": 128}, model_type="qwen3"),
    "gemma3": ModelConfig(**{**TINY, "head_dim": 64}, model_type="gemma3_text", hidden_act="gelu_pytorch_tanh",
                          query_pre_attn_scalar=64, tie_word_embeddings=True),
    "phi3": ModelConfig(**{**TINY, "num_key_value_heads": 4}, model_type="phi3"),
    # four query heads a key/value head: Q2_K gives attn_v more bits
    "llama-gqa4": ModelConfig(**{**TINY, "num_attention_heads": 8}),
}


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


def tiny(family: str, tokenizer, where) -> LoadedModel:
    torch.manual_seed(0)
    model = Llama(FAMILIES[family])
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.05 if "norm" in name else 0.02)
    return LoadedModel(model.eval(), tokenizer, None, where / family)


def check_family(family: str, mixes, tokenizer, tmp_path) -> None:
    loaded = tiny(family, tokenizer, tmp_path)
    f32 = export_gguf(loaded, tmp_path / "f32.gguf", type="f32", progress=False)
    for mix in mixes:
        ours = export_gguf(loaded, tmp_path / f"{mix}.gguf", type=mix, progress=False)
        theirs = llama_quantize(f32, tmp_path / f"{mix}-llama.gguf", mix)
        assert differences(ours, theirs) == [], (family, mix)


@pytest.mark.llamacpp
def test_a_tiny_llama_in_q4_k_m_is_byte_identical_to_llama_quantize(tokenizer, tmp_path):
    """The development loop's check (the whole matrix below is slow: ~15 s a file on two cores)."""
    check_family("llama-untied", ["q4_k_m"], tokenizer, tmp_path)


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_models_of_each_family_are_byte_identical_to_llama_quantize(family, tokenizer, tmp_path):
    check_family(family, list(K_MIXES), tokenizer, tmp_path)


@pytest.mark.llamacpp
@pytest.mark.slow
def test_an_80_layer_model_gets_llama_cpps_70b_choices(tokenizer, tmp_path):
    """llama.cpp counts a llama with 80 layers and grouped keys as 70B and gives its attn_v Q5_K where a mix has
    Q3_K or Q4_K: so does camelid (a narrow 80-layer model, two of the mixes that change)."""
    FAMILIES["llama-80"] = ModelConfig(**{**TINY, "num_hidden_layers": 80})
    try:
        check_family("llama-80", ["q3_k_m", "q4_k_m"], tokenizer, tmp_path)
        f32 = tiny("llama-80", tokenizer, tmp_path)
        ours = export_gguf(f32, tmp_path / "again.gguf", type="q3_k_m", progress=False)
        assert GGUFFile(ours).tensors["blk.40.attn_v.weight"].ggml_type == 13  # Q5_K, not q3_k_m's Q4_K
    finally:
        del FAMILIES["llama-80"]
