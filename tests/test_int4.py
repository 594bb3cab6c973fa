"""camelid's 4-bit weights (--quantize int4): the rounding against llama.cpp's own Q4_K, the kernels against
PyTorch on the dequantized weights, and GGUF files' 4-bit blocks taken as they are.

The 4-bit products round each block of 32 inputs to int8 (as llama.cpp's Q8_0 does for its 4-bit products), so
the reference is PyTorch's float32 product on the dequantized weights, off by at most that rounding."""

import copy

import numpy as np
import pytest
import torch

from camelid import native
from camelid.checkpoint import LoadedModel, load_model
from camelid.config import ModelConfig
from camelid.export import export_gguf
from camelid.gguf_file import GGUFFile
from camelid.model import Llama
from camelid.native import FOUR_BIT, Blocks, Int4Linear, dequantize4, quantize_rows4, rows4
from camelid.quantize import product_bits, quantize_model
from camelid.tokenizer import load_tokenizer

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="the 4-bit kernels need a C compiler")


def rounding_error(w: np.ndarray, kind: str) -> float:
    """The root-mean-square error of rounding `w` to llama.cpp's Q4_K (camelid's byte-identical port, dequantized
    by the gguf package) or to camelid's 4-bit."""
    if kind == "q4_k":
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        from camelid.kquants import quantize_q4_k

        back = dequantize(quantize_q4_k(w).reshape(w.shape[0], -1), GGMLQuantizationType.Q4_K)
    else:
        back = dequantize4(*rows4(quantize_rows4(torch.from_numpy(w)))).numpy()
    return float(np.sqrt(((back - w) ** 2).mean()))


@pytest.mark.parametrize("draw", ["normal", "heavy-tailed", "one-signed"])
def test_4_bit_rounding_is_at_least_as_close_as_llama_cpp_q4_k(draw):
    rng = np.random.default_rng(0)
    w = {"normal": rng.standard_normal((64, 1024)), "heavy-tailed": rng.standard_t(3, (64, 1024)),
         "one-signed": np.abs(rng.standard_normal((64, 1024))) + 0.5}[draw].astype(np.float32)
    assert rounding_error(w, "int4") <= rounding_error(w, "q4_k")


def test_4_bit_blocks_round_each_weight_to_the_nearest_code_of_their_stored_grid():
    """The pair (d, m) is a weighted least-squares fit, which may leave a block's extremes outside its grid
    (clipped to code 0 or 15, as Q4_K's may); each weight gets the nearest code on the float16 pair stored."""
    torch.manual_seed(0)
    w = torch.randn(16, 96) * torch.logspace(-3, 1, 16)[:, None]
    w[3] = 0.25  # a constant block: its offset alone
    w[5, 40] = 100.0  # an outlier coarsens only its own block
    q, dm = rows4(quantize_rows4(w))
    assert q.shape == (16, 48) and dm.shape == (16, 3, 2) and dm.dtype == torch.float16
    d, m = (dm[..., i].float().repeat_interleave(32, 1) for i in (0, 1))
    codes = native.unpack4(q).float()
    nearest = torch.where(d != 0, torch.round((w - m) / d).clamp(0, 15), torch.zeros_like(w))
    assert (codes - nearest).abs().max() <= 1 and (codes == nearest).float().mean() > 0.999
    assert torch.equal(dequantize4(q, dm)[3], torch.full((96,), 0.25))
    assert dm[5, 0, 0] < 0.01 < dm[5, 1, 0]


@pytest.mark.parametrize("out_features, in_features", [(8, 32), (48, 96), (304, 256), (16, 4096)])
@pytest.mark.parametrize("rows", [1, 3, 8, 70])
def test_int4_linear_equals_the_dequantized_product(out_features, in_features, rows):
    """Shapes cover one group of 8 rows, one block of 32, long rows; batches of 1 (decode), 3 (a partial tile),
    8 and 70 (more than one block of input rows)."""
    g = torch.Generator().manual_seed(out_features * rows)
    w = torch.randn(out_features, in_features, generator=g) * in_features**-0.5
    x = torch.randn(rows, in_features, generator=g)
    x[:, 3] *= 50  # an outlier channel, as real activations have
    layer = Int4Linear([w], bias=torch.randn(out_features, generator=g))
    deq = layer.dequantized()
    expected = x @ deq.T + layer.bias
    got = layer(x)
    # the inputs' rounding to int8 per block of 32: at most max |block| / 254 per element
    step = x.view(rows, -1, 32).abs().amax(-1) / 254
    bound = step @ deq.abs().view(out_features, -1, 32).sum(-1).T * 1.001 + 1e-4
    assert ((got - expected).abs() <= bound).all()
    weights_error = (x @ w.T + layer.bias - expected).norm()  # what rounding the weights to 4 bits costs
    assert (got - expected).norm() < 0.3 * weights_error


def test_int4_linear_stacks_parts_as_alone_in_whole_groups():
    """(Thread-count invariance: test_native.py, with int8's.)"""
    torch.manual_seed(0)
    parts = [torch.randn(24, 64), torch.randn(8, 64) * 10, torch.randn(16, 64) * 0.1]
    layer = Int4Linear(parts)
    alone = [Int4Linear([p]) for p in parts]
    assert torch.equal(layer.dequantized(), torch.cat([a.dequantized() for a in alone]))
    with pytest.raises(ValueError, match="groups of 8 rows"):
        Int4Linear([torch.randn(12, 64)])


CONFIG = ModelConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                     eos_token_id=2)


def test_product_bits_follow_q4_k_m_and_what_the_kernels_take():
    """Q4_K_M gives attn_v and ffn_down more bits in the first and last eighth of the layers and every third
    between (layers 0, 3, 6, 7 of 8 here), and rows not a multiple of 256 wide Q5_0: int8 there, unless the
    file stores them in 4 bits already."""
    config = ModelConfig(**{**CONFIG.__dict__, "num_hidden_layers": 8})
    wide = [i for i in range(8) if product_bits("int4", config, i)["down"] == 8]
    assert wide == [0, 3, 6, 7]
    assert product_bits("int4", config, 0) == {"qkv": 8, "o": 4, "gate_up": 4, "down": 8}
    assert product_bits("int4", config, 0, {"qkv", "down"}) == {"qkv": 4, "o": 4, "gate_up": 4, "down": 4}
    smollm2 = ModelConfig(**{**CONFIG.__dict__, "hidden_size": 576, "num_attention_heads": 9,
                             "num_key_value_heads": 3, "intermediate_size": 1536})
    # rows 576 wide: Q4_K_M gives them Q5_0 (Q4_K's blocks are 256 long), so int8; down's 1536 are 4-bit
    assert product_bits("int4", smollm2, 1) == {"qkv": 8, "o": 8, "gate_up": 8, "down": 4}
    assert product_bits("int4", smollm2, 1, {"qkv", "o", "gate_up"}) == {"qkv": 4, "o": 4, "gate_up": 4, "down": 4}
    odd = ModelConfig(**{**CONFIG.__dict__, "intermediate_size": 500})  # rows not a multiple of 32 wide
    assert product_bits("int4", odd, 1) == {"qkv": 4, "o": 4, "gate_up": 8, "down": 8}
    assert product_bits("int8", config, 1) is None


def test_native_decoder_in_int4_equals_pytorch_on_the_dequantized_weights():
    """Prefill, then decode steps: the 4-bit model's logits against PyTorch's on the same rounded weights, to
    within the inputs' int8 rounding; its greedy choice agrees at nearly every position."""
    from test_native import dequantized_reference

    torch.manual_seed(0)
    exact = Llama(ModelConfig(**{**CONFIG.__dict__, "vocab_size": 512})).eval()
    small = quantize_model(copy.deepcopy(exact), "int4")
    bits = [{p: getattr(part, p).bits for p in ("qkv", "o", "gate_up", "down")} for part in small.native.layers]
    assert bits[0] == {"qkv": 4, "o": 4, "gate_up": 4, "down": 4} and bits[3]["down"] == 8  # layers 2, 3 wide
    ref = dequantized_reference(exact, small)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(tokens)
        whole = small(tokens)
        cache = small.new_cache(2, 30)
        steps = [small(tokens[:, :16], cache)] + [small(tokens[:, t : t + 1], cache) for t in range(16, 24)]
        steps = torch.cat(steps, 1)
    for got in (whole, steps):
        assert (got - want).norm() < 0.02 * want.norm()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, smollm2_gguf):
    """A tiny llama (untied) in float32, Q8_0, Q4_0, Q4_1 and Q4_K_M GGUF files, exported by camelid."""
    where = tmp_path_factory.mktemp("int4")
    torch.manual_seed(0)
    model = Llama(CONFIG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.05 if "norm" in name else 0.02)
    loaded = LoadedModel(model.eval(), load_tokenizer(smollm2_gguf), None, where / "tiny")
    return {kind: export_gguf(loaded, where / f"{kind}.gguf", type=kind, progress=False)
            for kind in ("f32", "q8_0", "q4_0", "q4_1", "q4_k_m")}


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q4_k_m"])
def test_a_gguf_file_s_4_bit_blocks_are_taken_as_they_are(tiny_files, kind, monkeypatch):
    """Q4_0 and Q4_1 blocks become camelid's exactly, Q4_K's within float16 rounding of their scales; the 4-bit
    weights are never dequantized to float, and the model agrees with the float model of the same file."""
    from camelid import checkpoint

    path = tiny_files[kind]
    gguf = GGUFFile(path)
    for name, info in gguf.tensors.items():
        stored = gguf.blocks(name, FOUR_BIT)
        if stored is None:
            continue
        want = gguf.dequantize(name)
        got = Int4Linear([Blocks(*stored, *info.shape)]).dequantized()
        if kind == "q4_k_m":
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
        else:
            assert torch.equal(got, want), name
    dequantized = []
    real = GGUFFile.dequantize
    monkeypatch.setattr(GGUFFile, "dequantize",
                        lambda self, name, **kw: dequantized.append(name) or real(self, name, **kw))
    small = load_model(path, device="cpu", quantize="int4").model
    parts = {"qkv": ["attn_q", "attn_k", "attn_v"], "o": ["attn_output"], "gate_up": ["ffn_gate", "ffn_up"],
             "down": ["ffn_down"]}
    four = {f"blk.{i}.{part}.weight" for i, layer in enumerate(small.native.layers) for product, names in parts.items()
            if getattr(layer, product).bits == 4 for part in names}
    assert not four & set(dequantized)
    # every product is 4-bit where all its parts are stored in 4 bits (Q4_K_M's Q6_K attn_v keeps q/k/v int8)
    stored4 = {name for name in gguf.tensors if gguf.blocks(name, FOUR_BIT) is not None}
    assert four == {f"blk.{i}.{part}.weight" for i in range(CONFIG.num_hidden_layers) for names in parts.values()
                    if all(f"blk.{i}.{n}.weight" in stored4 for n in names) for part in names}
    assert len(four) >= (14 if kind == "q4_k_m" else 28)
    monkeypatch.undo()
    full = checkpoint.load_model(path, device="cpu").model
    layer, attn = small.native.layers[1], full.model.layers[1].self_attn  # q and k: llama.cpp's row order undone
    want = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight])
    got = torch.cat([layer.qkv.dequantized(), layer.o.dequantized()])
    if kind == "q4_k_m":
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-4)
    else:
        assert torch.equal(got, want)
    tokens = torch.randint(0, CONFIG.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = small(tokens)[0], full(tokens)[0]
    # (a random model's top logits lie close: q4_k_m, whose int8 products also take int8 inputs, agrees at 36 of 40)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert (got - want).norm() < 0.05 * want.norm()


def test_q4_0_blocks_keep_only_their_scales_and_multiply_as_with_their_offsets(tiny_files):
    """llama.cpp's Q4_0 has no offsets (each is -8 times its scale): its layers keep 4.5 bits a weight, as the
    file does, and their products equal, to the bit on every instruction-set path, those of the same blocks with
    the offsets stored (written as Q4_1)."""
    gguf = GGUFFile(tiny_files["q4_0"])
    name = "blk.0.ffn_gate.weight"
    raw, kind = gguf.blocks(name, FOUR_BIT)
    assert kind == native.Q4_0
    rows, cols = gguf.tensors[name].shape
    blocks = torch.from_numpy(np.array(raw)).view(rows, cols // 32, 18)
    d = blocks[:, :, :2].contiguous()
    m = (d.view(torch.float16) * -8).view(torch.uint8)
    as_q4_1 = torch.cat([d, m, blocks[:, :, 2:]], dim=2).reshape(rows, -1)
    scales_only = Int4Linear([Blocks(raw, kind, rows, cols)])
    with_offsets = Int4Linear([Blocks(as_q4_1, native.Q4_1, rows, cols)])
    assert (scales_only.pairs, with_offsets.pairs) == (1, 2)
    assert 2 * scales_only.scale.numel() == with_offsets.scale.numel()
    assert torch.equal(scales_only.dequantized(), with_offsets.dequantized())
    assert torch.equal(scales_only.dequantized(), gguf.dequantize(name))
    x = torch.randn(40, cols, generator=torch.Generator().manual_seed(5))
    for isa in native.available_isas():
        lib = native.library(isa)
        for n in (1, 5, 40):
            assert torch.equal(scales_only.multiply(x[:n], lib), with_offsets.multiply(x[:n], lib)), (isa, n)


def test_int4_from_a_float_file_rounds_every_4_bit_product_as_quantize_model(tiny_files):
    small = load_model(tiny_files["f32"], device="cpu", quantize="int4").model
    whole = quantize_model(load_model(tiny_files["f32"], device="cpu").model, "int4")
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(small(tokens), whole(tokens))


def test_the_4_bit_decoder_agrees_on_every_instruction_set_path(monkeypatch):
    """The whole decoder on each path this CPU has ($CAMELID_ISA), against the path chosen by default."""
    torch.manual_seed(0)
    small = quantize_model(Llama(ModelConfig(**{**CONFIG.__dict__, "vocab_size": 512})).eval(), "int4")
    tokens = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(2))
    outs = {}
    try:
        for isa in native.available_isas():
            monkeypatch.setenv(native.ISA_VARIABLE, isa)
            native.library.cache_clear()
            with torch.no_grad():
                outs[isa] = small(tokens)
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    best = outs[native.chosen_isa()]
    for isa, got in outs.items():
        if isa != "generic":  # the same vector code: only the order of float additions may differ
            torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-4, msg=isa)
        else:  # plain C sums in another order, and an input that lands on a rounding tie may round the other way
            assert (got - best).norm() < 0.01 * best.norm()
            assert torch.equal(got.argmax(-1), best.argmax(-1))


def test_the_memory_estimate_knows_a_file_whose_layers_are_4_bit_already(tiny_files):
    """From Q4_0 layers int4 keeps every product 4-bit and never makes a layer float32: less than from f32."""
    from camelid.checkpoint import memory_need_of

    stored, converted = (memory_need_of(tiny_files[kind], "int4") for kind in ("q4_0", "f32"))
    assert stored.weights < converted.weights and stored.loading < converted.loading


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_int8_from_a_gguf_s_blocks_equals_int8_from_its_floats_without_making_them_float(tiny_files, kind,
                                                                                          monkeypatch):
    """A file's Q8_0/Q4_0/Q4_1 rows are made int8 a row at a time, the same bits as from the dequantized matrix."""
    path = tiny_files[kind]
    whole = quantize_model(load_model(path, device="cpu").model, "int8")
    dequantized = []
    real = GGUFFile.dequantize
    monkeypatch.setattr(GGUFFile, "dequantize",
                        lambda self, name, **kw: dequantized.append(name) or real(self, name, **kw))
    streamed = load_model(path, device="cpu", quantize="int8").model
    assert [n for n in dequantized if n.endswith("weight") and "norm" not in n] == []
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(streamed(tokens), whole(tokens))


def test_the_4_bit_quantizer_writes_the_same_bytes_on_every_instruction_set_path():
    """Its sums run in the same order on each path (vector lanes imitated in plain C), so a model rounded to 4
    bits on one machine is the same model on another."""
    w = torch.from_numpy(np.random.default_rng(1).standard_t(3, (40, 256)).astype(np.float32))
    made = {}
    for isa in native.available_isas():
        raw = torch.empty(40, 256 // 32 * 20, dtype=torch.uint8)
        native.library(isa).camelid_quantize_rows4(w.data_ptr(), 40, 256, raw.data_ptr(), 2)
        made[isa] = raw
    for isa, raw in made.items():
        assert torch.equal(raw, made[native.available_isas()[0]]), isa
