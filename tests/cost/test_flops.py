"""Parameter counts against real models: camelid's own built on the meta device, and transformers'."""

import pytest
import torch
from torch import nn

from camelid.config import PRESETS, ModelConfig, preset
from camelid.cost.flops import count_parameters, lora_parameters
from camelid.model import Llama


def meta_model(config: ModelConfig) -> Llama:
    with torch.device("meta"):
        return Llama(config)


FAMILIES = {  # the switches other families add: biases on q/k/v only (Qwen2), per-head q/k norms (Qwen3)
    "qwen2": ModelConfig(model_type="qwen2", vocab_size=1000, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": ModelConfig(model_type="qwen3", vocab_size=1000, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24),
}


@pytest.mark.parametrize("name", list(PRESETS) + list(FAMILIES))
def test_parameter_counts_equal_the_model_built_from_each_preset(name):
    config = FAMILIES.get(name) or preset(name)
    model = meta_model(config)
    counted = count_parameters(config)
    unique = {id(p): p for p in model.parameters()}.values()  # a tied head is the embedding's tensor
    assert counted.total == model.num_parameters() == sum(p.numel() for p in unique)
    # N of the FLOP formulas: every weight of every linear layer, the head included (once, even when tied)
    linear = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                 for m in model.modules() if isinstance(m, nn.Linear))
    assert counted.matmul == linear
    assert counted.embedding == model.model.embed_tokens.weight.numel()
    assert (counted.head == 0) == config.tie_word_embeddings


def test_llama_7b_and_13b_counts_are_the_published_ones():
    # LLaMA-1 7B/13B have Llama-2's shapes: 6,738,415,616 and 13,015,864,320 parameters (their HF checkpoints)
    assert count_parameters(preset("llama-2-7b")).total == 6_738_415_616
    assert count_parameters(preset("llama-2-13b")).total == 13_015_864_320
    assert count_parameters(preset("llama-2-7b")).matmul == 6_738_415_616 - 32000 * 4096 - (2 * 32 + 1) * 4096


@pytest.mark.parametrize("variant", [
    dict(tie_word_embeddings=True),
    dict(tie_word_embeddings=False, num_key_value_heads=2),
    dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True, head_dim=32),
])
def test_parameter_counts_equal_transformers(variant):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=variant.pop("num_key_value_heads", 4),
                                  **variant)
    expected = transformers.LlamaForCausalLM(hf).num_parameters()
    assert count_parameters(ModelConfig.from_hf(hf.to_dict())).total == expected


def test_lora_parameters_equal_the_adapters_apply_lora_adds():
    from camelid.lora import LoRAConfig, apply_lora

    config = preset("tinyllama-1.1b")  # grouped-query attention: k and v are narrower than q
    lora = LoRAConfig(r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    model = apply_lora(meta_model(config), lora)
    assert lora_parameters(config, lora) == sum(p.numel() for p in model.parameters() if p.requires_grad)
