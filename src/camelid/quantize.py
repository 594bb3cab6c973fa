"""Smaller weights for faster CPU inference, as a module swap of `nn.Linear`.

At batch 1 a small model's decode reads every weight once per token, so it is bound by memory traffic, not
arithmetic. `f16` keeps the linear weights (output head included) in float16: half the bytes per token. What
was measured on a 2-core AVX2 CPU decided the details:
- a float16 matrix-vector product took ~0.55x the time of the float32 one for SmolLM2's head, but float16
  matrix-matrix products are 2x slower than float32 on CPUs without AVX512-FP16, so batches of more than
  a few rows (prefill, big decode batches) widen the weights to float32 and compute in float32;
- SmolLM2's perplexity moved by 0.005% and 99.8% of next-token choices were unchanged;
- fbgemm's dynamic int8 linear was faster still, but its per-tensor activation quantization tripled
  SmolLM2's perplexity (the inputs of down_proj have large outliers), so it is not offered.
Quantize a model loaded for inference, not one being trained: the float32 weights are not kept.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camelid.errors import CamelidError
from camelid.model import Llama

QUANTIZATIONS = ("none", "f16")
F16_MAX_ROWS = 4  # up to this many rows the float16 product is the faster one


class HalfWeightLinear(nn.Module):
    """A linear layer whose weight is stored in float16; activations stay in float32."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().half(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @classmethod
    def stacked(cls, linears: list[nn.Linear]) -> "HalfWeightLinear":
        """One layer computing several that read the same input (q, k, v; gate, up): one product, not three."""
        biases = [lin.bias for lin in linears]
        bias = None if biases[0] is None else torch.cat(biases)
        return cls(torch.cat([lin.weight for lin in linears]), bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[:-1].numel() <= F16_MAX_ROWS:
            y = F.linear(x.half(), self.weight).to(x.dtype)
        else:
            y = F.linear(x, self.weight.to(x.dtype))
        return y if self.bias is None else y + self.bias


def check_quantization(kind: str) -> str:
    """`kind` if it is a known quantization, else a one-line error listing them (checked before slow loads)."""
    if kind not in QUANTIZATIONS:
        raise CamelidError(f"unknown quantization {kind!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    return kind


def quantize_model(model: Llama, kind: str) -> Llama:
    """Store every linear layer (the output head included) as `kind`, in place.

    q/k/v and gate/up are stacked into one layer each: at batch 1, fewer and larger products were ~12% faster.
    A quantized model is for inference: it cannot be trained or saved as a checkpoint.
    """
    if check_quantization(kind) == "none":
        return model
    weight = model.model.embed_tokens.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise CamelidError("--quantize f16 is for float32 models on the CPU; on a GPU use --dtype bfloat16")
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = HalfWeightLinear.stacked([attn.q_proj, attn.k_proj, attn.v_proj])
        attn.q_proj = attn.k_proj = attn.v_proj = None
        attn.o_proj = HalfWeightLinear(attn.o_proj.weight, attn.o_proj.bias)
        mlp.gate_up_proj = HalfWeightLinear.stacked([mlp.gate_proj, mlp.up_proj])
        mlp.gate_proj = mlp.up_proj = None
        mlp.down_proj = HalfWeightLinear(mlp.down_proj.weight, mlp.down_proj.bias)
    model.lm_head = HalfWeightLinear(model.lm_head.weight)
    model.quantization = kind
    return model
