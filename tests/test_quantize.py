"""f16 weights for CPU inference: the same model, to within float16 rounding, in every path."""

import copy

import pytest
import torch
import torch.nn.functional as F

from camelid.checkpoint import LoadedModel, load_model, save_model
from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.model import Llama
from camelid.quantize import F16_MAX_ROWS, quantize_model


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
    assert tokens.shape[0] <= F16_MAX_ROWS  # the decode steps above took the float16 product
    torch.testing.assert_close(torch.cat(steps, 1), ref, atol=2e-3, rtol=2e-3)
    assert half.model.layers[0].self_attn.q_proj is None and half.lm_head.weight.dtype == torch.float16


def test_unknown_kind_and_saving_a_quantized_model_are_refused(pair, tmp_path):
    exact, half = pair
    with pytest.raises(CamelidError, match="unknown quantization 'int3'; choose one of: none, f16"):
        quantize_model(copy.deepcopy(exact), "int3")
    with pytest.raises(CamelidError, match="load it without"):
        save_model(LoadedModel(model=half, tokenizer=None, chat_template=None, source=tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_f16_smollm2_perplexity_within_a_tenth_of_a_percent(smollm2_gguf, sharegpt_texts):
    exact = load_model(smollm2_gguf, device="cpu")
    half = load_model(smollm2_gguf, device="cpu", quantize="f16")
    ids = torch.tensor([exact.tokenizer.encode("\n".join(sharegpt_texts[:20]))[:256]])
    nll = {}
    with torch.no_grad():
        for name, loaded in (("exact", exact), ("half", half)):
            cache = loaded.model.new_cache(1, ids.shape[1])
            # one token at a time, the decode path that float16 speeds up
            logits = torch.cat([loaded.model(ids[:, t : t + 1], cache) for t in range(ids.shape[1])], dim=1)
            nll[name] = F.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert abs(nll["half"] - nll["exact"]) / nll["exact"] < 1e-3, nll
