"""f16 and int8 weights for CPU inference: the same model, to within their rounding, in every path.

The int8 kernels themselves are tested against PyTorch in test_native.py."""

import copy

import pytest
import torch
import torch.nn.functional as F

from camelid.checkpoint import LoadedModel, load_model, save_model
from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.model import Llama
from camelid.native import Int8Linear, NativeDecoder, compiler
from camelid.quantize import HalfWeightLinear, quantize_model

needs_compiler = pytest.mark.skipif(compiler() is None, reason="int8 builds its kernels with a C compiler")


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    exact = Llama(config).eval()
    return exact, quantize_model(copy.deepcopy(exact), "f16")


def test_f16_logits_close_to_float32_in_prefill_and_decode(pair):
    exact, half = pair
    tokens = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = exact(tokens)
        torch.testing.assert_close(half(tokens), ref, atol=2e-3, rtol=2e-3)  # many rows: float32 products
        cache = half.new_cache(2, 40)
        steps = [half(tokens[:, :20], cache)] + [half(tokens[:, t : t + 1], cache) for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), ref, atol=2e-3, rtol=2e-3)
    assert half.model.layers[0].self_attn.q_proj is None and isinstance(half.lm_head, HalfWeightLinear)


@needs_compiler
def test_int8_logits_close_to_float32_in_prefill_and_decode(pair):
    exact, _ = pair
    small = quantize_model(copy.deepcopy(exact), "int8")
    assert isinstance(small.lm_head, Int8Linear) and isinstance(small.native, NativeDecoder)
    assert small.model.layers[0].mlp.down_proj is None  # the float weights are not kept
    tokens = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = exact(tokens)
        # int8 rounds each weight by up to 1/254 of its block's largest, and a prompt's (or one row's) inputs by as
        # much: logits move by ~1e-2 here, 0.024 at most
        torch.testing.assert_close(small(tokens), ref, atol=3e-2, rtol=1e-2)
        cache = small.new_cache(2, 40)
        steps = [small(tokens[:, :20], cache)] + [small(tokens[:, t : t + 1], cache) for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), ref, atol=3e-2, rtol=1e-2)


def test_unknown_kind_and_saving_a_quantized_model_are_refused(pair, tmp_path):
    exact, half = pair
    with pytest.raises(CamelidError, match="unknown quantization 'int3'; choose one of: none, f16, int8"):
        quantize_model(copy.deepcopy(exact), "int3")
    with pytest.raises(CamelidError, match="load it without"):
        save_model(LoadedModel(model=half, tokenizer=None, chat_template=None, source=tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind, limit", [("f16", 1e-3), pytest.param("int8", 1e-2, marks=needs_compiler)])
def test_smollm2_perplexity_close_to_float32(smollm2_gguf, sharegpt_texts, kind, limit):
    """Perplexity of held-out text within 0.1% (f16) and 1% (int8) of float32's, scored one token at a time
    (the decode path quantization speeds up) and as whole windows (prefill)."""
    exact = load_model(smollm2_gguf, device="cpu")
    small = load_model(smollm2_gguf, device="cpu", quantize=kind)
    ids = torch.tensor([exact.tokenizer.encode("\n".join(sharegpt_texts[:40]))[:1024]])
    ppl = {}
    with torch.no_grad():
        for name, loaded in (("exact", exact), (kind, small)):
            cache = loaded.model.new_cache(1, 256)
            stepwise = torch.cat([loaded.model(ids[:, t : t + 1], cache) for t in range(256)], dim=1)
            windows = torch.cat([loaded.model(ids[:, s : s + 256]) for s in range(256, 1024, 256)], dim=1)
            targets = torch.cat([ids[0, s + 1 : s + 256] for s in range(0, 1024, 256)])
            logits = torch.cat([stepwise[0, :-1], windows[0].view(3, 256, -1)[:, :-1].reshape(-1, windows.shape[-1])])
            ppl[name] = F.cross_entropy(logits, targets).exp().item()
    assert abs(ppl[kind] / ppl["exact"] - 1) < limit, ppl


@pytest.mark.parametrize("kind", ["f16", pytest.param("int8", marks=needs_compiler)])
def test_a_gguf_loads_quantized_layer_by_layer_into_the_same_model(kind, smollm2_gguf, monkeypatch):
    """--quantize from a GGUF reads one decoder layer's weights at a time (never the whole model in float32) and
    gives exactly the model that loading it whole and quantizing it gives."""
    from camelid import checkpoint
    from camelid.gguf_file import GGUFFile

    whole_config, state = checkpoint.read_gguf_weights(GGUFFile(smollm2_gguf))
    whole = quantize_model(checkpoint.build_model(whole_config, state), kind)
    del state
    reads, real = [], checkpoint.read_gguf_weights

    def counted(gguf, keep=None, config=None):
        config, got = real(gguf, keep, config)
        reads.append(sorted({name.split(".")[2] if name.startswith("model.layers.") else "outside" for name in got}))
        return config, got

    monkeypatch.setattr(checkpoint, "read_gguf_weights", counted)
    streamed = load_model(smollm2_gguf, device="cpu", dtype="float32", quantize=kind).model
    assert reads == [["outside"]] + [[str(i)] for i in range(whole_config.num_hidden_layers)]
    tokens = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(streamed(tokens), whole(tokens))
    assert streamed.model.layers[3].mlp.gate_proj is None and streamed.quantization == kind


def test_a_gguf_that_does_not_fit_its_config_is_refused_before_any_weight_is_read(smollm2_gguf, monkeypatch):
    from camelid import checkpoint

    def shrunk(gguf):
        config = real(gguf)
        config.intermediate_size = 1024
        return config

    real = checkpoint.config_from_gguf
    monkeypatch.setattr(checkpoint, "config_from_gguf", shrunk)
    monkeypatch.setattr(checkpoint, "read_gguf_weights", lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(CamelidError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \(1536, 576\), "
                                           r"the config implies \(1024, 576\)"):
        load_model(smollm2_gguf, device="cpu", dtype="float32", quantize="f16")


def test_a_load_that_will_not_fit_is_refused_in_one_line_before_any_weight_is_read(smollm2_gguf, monkeypatch):
    from camelid import checkpoint

    from camelid import memory

    needs = {kind: checkpoint.memory_need_of(smollm2_gguf, kind) for kind in ("none", "f16", "int8", "int4")}
    need = {kind: n.peak() for kind, n in needs.items()}
    # SmolLM2's head is tied: int8 shares it with the embeddings
    assert need["int4"] < need["int8"] < need["f16"] < need["none"]
    monkeypatch.setattr(checkpoint, "read_gguf_weights", lambda *a, **k: pytest.fail("a weight was read"))
    between = (needs["int8"].beyond_overhead() + needs["f16"].beyond_overhead()) // 2
    monkeypatch.setattr(memory, "available_memory", lambda: between)
    monkeypatch.delenv(memory.SKIP_CHECK, raising=False)
    with pytest.raises(CamelidError) as refused:
        load_model(smollm2_gguf, device="cpu", dtype="float32")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{smollm2_gguf.name} needs ~{need['none'] / 1e9:.1f} GB")
    assert (f"--quantize int8 needs ~{need['int8'] / 1e9:.1f} GB, --quantize int4 needs ~{need['int4'] / 1e9:.1f} GB, "
            "or use a smaller model or free memory") in message
    monkeypatch.setenv(memory.SKIP_CHECK, "1")  # the way around a wrong estimate, which the message names
    assert memory.fits(needs["none"]) == (True, between)


@pytest.mark.parametrize("kind", ["f16", pytest.param("int8", marks=needs_compiler),
                                  pytest.param("int4", marks=needs_compiler)])
def test_an_hf_directory_loads_quantized_layer_by_layer_into_the_same_model(kind, tiny_chat_dir, monkeypatch):
    from camelid import checkpoint

    config, state = checkpoint.read_hf_weights(tiny_chat_dir)
    whole = quantize_model(checkpoint.build_model(config, state), kind)
    reads, real = [], checkpoint.HFWeights.read

    def counted(self, keep=None):
        got = real(self, keep)
        reads.append(sorted({name.split(".")[2] if name.startswith("model.layers.") else "outside" for name in got}))
        return got

    monkeypatch.setattr(checkpoint.HFWeights, "read", counted)
    streamed = load_model(tiny_chat_dir, device="cpu", dtype="float32", quantize=kind).model
    assert reads == [["outside"]] + [[str(i)] for i in range(config.num_hidden_layers)]
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(streamed(tokens), whole(tokens))
