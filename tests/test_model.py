"""The model against transformers' LlamaForCausalLM: same weights, same logits (fp32, atol 1e-4)."""

import pytest
import torch

from camelid.config import PRESETS, ModelConfig, preset
from camelid.model import Llama

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, max_position_embeddings=256)
CASES = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mqa-headdim": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24),
    "linear-rope": dict(num_attention_heads=4, num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama3-rope": dict(
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    ),
    "biases": dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
}


def twin_models(case: str, seed: int = 0):
    """A random camelid model and the transformers model holding the same weights."""
    config = ModelConfig(**TINY, **CASES[case])
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf())).eval()
    ours = Llama(config).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing)
    return ours, hf


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers(case):
    ours, hf = twin_models(case)
    tokens = torch.randint(0, 97, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["gqa-tied", "llama3-rope"])
def test_cached_decoding_equals_full_forward(case):
    ours, _ = twin_models(case)
    tokens = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(tokens)
        cache = ours.new_cache(3, 64)
        steps = [ours(tokens[:, :25], cache)] + [ours(tokens[:, t : t + 1], cache) for t in range(25, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [40, 40, 40]


def test_rows_of_different_lengths_are_independent():
    """Right-padded rows in one cached batch give the same logits as each row alone."""
    ours, _ = twin_models("gqa-tied")
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 97, (n,), generator=gen) for n in (7, 19, 12)]
    batch = torch.zeros(3, 19, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, : len(r)] = r
    nxt = torch.randint(0, 97, (3, 1), generator=gen)
    with torch.no_grad():
        cache = ours.new_cache(3, 32)
        first = ours(batch, cache, valid=torch.tensor([7, 19, 12]))
        second = ours(nxt, cache)
        for i, r in enumerate(rows):
            alone = ours(torch.cat([r, nxt[i]])[None])
            torch.testing.assert_close(first[i, len(r) - 1], alone[0, -2], atol=1e-5, rtol=0)
            torch.testing.assert_close(second[i, 0], alone[0, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float32(dtype):
    ours, _ = twin_models("gqa-tied")
    tokens = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = ours(tokens)
        got = ours.to(dtype)(tokens)
    assert got.dtype == dtype
    assert (got.float().argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    torch.testing.assert_close(got.float(), ref, atol=0.1, rtol=0.05)


def test_presets_match_their_parameter_counts():
    """Each preset's size matches the published parameter count of the model it names."""
    published = {"smollm2-135m": 134.5e6, "tinyllama-1.1b": 1.10e9, "llama-2-7b": 6.74e9, "llama-3-8b": 8.03e9,
                 "mistral-7b": 7.24e9, "llama-2-13b": 13.0e9}
    for name, count in published.items():
        with torch.device("meta"):
            n = Llama(preset(name)).num_parameters()
        assert abs(n - count) / count < 0.01, (name, n)
    assert set(published) | {"llama-3.1-8b"} == set(PRESETS)


def test_config_round_trips_through_hf_json(tmp_path):
    config = preset("llama-3.1-8b")
    config.save(tmp_path)
    assert ModelConfig.load(tmp_path) == config
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.rope_scaling["rope_type"] == "llama3" and hf.num_key_value_heads == 8


@pytest.mark.parametrize("gelu", [False, True], ids=["swiglu", "geglu"])
def test_gated_unit_keeps_less_but_computes_the_same_gradients(gelu):
    from camelid.model import _GatedUnit

    gate = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, u: _GatedUnit.apply(g, u, gelu), (gate, up))
    act = torch.nn.functional.gelu(gate, approximate="tanh") if gelu else torch.nn.functional.silu(gate)
    torch.testing.assert_close(_GatedUnit.apply(gate, up, gelu), act * up)


def test_training_norm_and_rope_compute_what_autograd_would():
    """The hand-written backward passes of RMSNorm and RoPE against autograd through the plain formulas."""
    from camelid.model import _RMSNorm, _Rope, rope_cos_sin

    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    for offset in (0.0, 1.0):  # Gemma's norms scale by 1 + w
        assert torch.autograd.gradcheck(lambda x, w: _RMSNorm.apply(x, w, 1e-5, offset), (x, w))
        torch.testing.assert_close(_RMSNorm.apply(x, w, 1e-5, offset),
                                   (offset + w) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    q = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_cos_sin(1.0 / 10000 ** (torch.arange(0, 8, 2) / 8), torch.arange(5).expand(2, 5), torch.float64)
    assert torch.autograd.gradcheck(lambda q: _Rope.apply(q, cos, sin), (q,))
    angles = torch.arange(5, dtype=torch.float64)[:, None] * (1.0 / 10000 ** (torch.arange(0, 8, 2) / 8))
    cos_hf, sin_hf = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
    rotate_half = torch.cat([-q[..., 4:], q[..., :4]], dim=-1)  # transformers' formulation
    torch.testing.assert_close(_Rope.apply(q, cos, sin), q * cos_hf + rotate_half * sin_hf)
