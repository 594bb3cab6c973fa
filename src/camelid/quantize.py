"""Smaller weights for faster CPU inference, as a module swap of `nn.Linear`.

At batch 1 a small model's decode reads every weight once per token, so it is bound by memory traffic, not
arithmetic; at batch 8 and in prefill the arithmetic counts too. Each kind stores every linear layer smaller;
which storage a layer gets was chosen by measuring each layer of SmolLM2 on a 2-core AVX2 CPU
(`bench/quantize.py` prints the table):

- `f16`: float16 weights everywhere, multiplied by fbgemm's float16 kernels (the weights are widened to
  float32 in registers, so the arithmetic is float32's). Half the bytes of float32: SmolLM2 decoded 1.6-2.1x
  (batch 1) and 1.7-2.4x (batch 8) as fast as in float32 in two runs of bench/peers.py, though one small matrix alone, in cache, can
  still be faster in float32 (bench/quantize.py). SmolLM2's perplexity moved by 0.005%.
- `int8`: as f16, except the output head, which is stored as int8 with a scale per row: at 49,152 x 576 it
  is a fifth of SmolLM2's weights and the largest single product per token. fbgemm's int8 products also
  quantize the activations, with one scale for the whole input and only 7 bits (its AVX2 kernels would
  overflow with 8); done plainly that made SmolLM2's head alone cost 4% of perplexity, and all layers 270%.
  Here each row is scaled to [-1, 1] first (a per-token scale in effect) and what the 7-bit rounding loses is
  fed through the same product as extra rows, which gives ~14-bit activations: SmolLM2's perplexity moved by
  -0.06% (measured on ShareGPT answers). The decoder's own layers stay float16: for matrices of their size the
  eight extra element-wise steps cost more time than the int8 product saves.
Without fbgemm (non-x86 CPUs) `f16` falls back to PyTorch's float16 products and `int8` is refused.
Quantize a model loaded for inference, not one being trained: the float32 weights are not kept.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camelid.errors import CamelidError
from camelid.model import Llama

QUANTIZATIONS = ("none", "f16", "int8")
F16_MAX_ROWS = 4  # without fbgemm: up to this many rows the float16 product is the faster one


def has_fbgemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


class HalfWeightLinear(nn.Module):
    """A linear layer whose weight is stored in float16; activations stay in float32.

    With fbgemm the product is its float16 kernel. Without it, PyTorch's float16 matrix-vector product was
    ~0.55x the time of float32's, but its float16 matrix-matrix products are 2x slower than float32 on CPUs
    without AVX512-FP16, so batches of more than a few rows widen the weights to float32 instead.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), None) if has_fbgemm() else None
        self.weight = nn.Parameter(weight.detach().half(), requires_grad=False) if self.packed is None else None
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.packed is not None:
            y = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, self.in_features), self.packed)
            y = y.view(*x.shape[:-1], self.out_features)
        elif x.shape[:-1].numel() <= F16_MAX_ROWS:
            y = F.linear(x.half(), self.weight).to(x.dtype)
        else:
            y = F.linear(x, self.weight.to(x.dtype))
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (a scale per output row) computed by fbgemm's int8 products.

    fbgemm quantizes its whole input with one scale taken from the input's minimum and maximum. Each call
    stacks three things: the rows scaled to [-1, 1], what rounding them to that grid loses (scaled up to
    [-1, 1] too), and one row holding -1 and 1, which pins the range, so the grid is known here and the lost
    part can be computed exactly.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(1).clamp_min(1e-12) / 127
        with warnings.catch_warnings():  # quantized tensors are deprecated, but fbgemm's int8 products take them
            warnings.simplefilter("ignore", UserWarning)
            zeros = torch.zeros(len(w), dtype=torch.long)
            qweight = torch.quantize_per_channel(w, scale.double(), zeros, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.out_features, self.in_features = w.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        pin = torch.zeros(1, self.in_features)
        pin[0, 0], pin[0, -1] = -1.0, 1.0
        self.register_buffer("pin", pin, persistent=False)
        # the grid fbgemm picks for inputs spanning [-1, 1] (7 bits: its AVX2 kernels need reduce_range)
        self.step, self.zero = torch._choose_qparams_per_tensor(pin, True)
        self.gain = 2 / self.step  # the rounding loss is at most step / 2: scaled to at most 1

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).float()
        n = rows.shape[0]
        size = rows.abs().amax(-1, keepdim=True).clamp_min_(1e-30)
        scaled = rows / size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            lost = torch.quantize_per_tensor(scaled, self.step, self.zero, torch.quint8).dequantize()
        lost = torch.sub(scaled, lost).mul_(self.gain)
        y = torch.ops.quantized.linear_dynamic(torch.cat([scaled, lost, self.pin]), self.packed, True)
        y = y[:n].add_(y[n : 2 * n], alpha=1 / self.gain).mul_(size)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


# The storage of each kind: (the decoder blocks' linear layers, the output head).
PLAN = {"f16": (HalfWeightLinear, HalfWeightLinear), "int8": (HalfWeightLinear, Int8Linear)}


def check_quantization(kind: str) -> str:
    """`kind` if it is a known quantization, else a one-line error listing them (checked before slow loads)."""
    if kind not in QUANTIZATIONS:
        raise CamelidError(f"unknown quantization {kind!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    if kind == "int8" and not has_fbgemm():
        raise CamelidError("--quantize int8 needs PyTorch's fbgemm kernels (x86 CPUs); use --quantize f16")
    return kind


def quantize_model(model: Llama, kind: str) -> Llama:
    """Store every linear layer (the output head included) as `kind` says (see PLAN), in place.

    q/k/v and gate/up are stacked into one layer each: at batch 1, fewer and larger products were ~12% faster.
    A quantized model is for inference: it cannot be trained or saved as a checkpoint.
    """
    if check_quantization(kind) == "none":
        return model
    weight = model.model.embed_tokens.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise CamelidError(f"--quantize {kind} is for float32 models on the CPU; on a GPU use --dtype bfloat16")
    block, head = PLAN[kind]

    def stacked(layers: list[nn.Linear], linear=block) -> nn.Module:
        """One layer computing several that read the same input (q, k, v; gate, up): one product, not three."""
        biases = [lin.bias for lin in layers]
        bias = None if biases[0] is None else torch.cat(biases)
        return linear(torch.cat([lin.weight for lin in layers]), bias)

    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = stacked([attn.q_proj, attn.k_proj, attn.v_proj])
        attn.q_proj = attn.k_proj = attn.v_proj = None
        attn.o_proj = stacked([attn.o_proj])
        mlp.gate_up_proj = stacked([mlp.gate_proj, mlp.up_proj])
        mlp.gate_proj = mlp.up_proj = None
        mlp.down_proj = stacked([mlp.down_proj])
    model.lm_head = stacked([model.lm_head], head)
    model.quantization = kind
    return model
