"""Smaller weights for faster CPU inference, as a module swap of `nn.Linear`.

At batch 1 a small model's decode reads every weight once per token, so it is bound by memory traffic, not
arithmetic; at batch 8 and in prefill the arithmetic counts too. Each kind stores every linear layer smaller
(`bench/quantize.py` times each of SmolLM2's layer shapes per kind, and measures perplexity):

- `f16`: float16 weights everywhere, multiplied by fbgemm's float16 kernels (the weights are widened to
  float32 in registers, so the arithmetic is float32's). Half the bytes of float32: SmolLM2 decoded 1.6-2.1x
  (batch 1) and 1.7-2.4x (batch 8) as fast as in float32 in two runs of bench/peers.py, though one small
  matrix alone, in cache, can still be faster in float32 (bench/quantize.py). SmolLM2's perplexity moved by
  0.005%.
- `int8`: every linear layer, the output head included, stored as int8 with a scale per block of 64 weights
  along each row, and the whole decoder run by camelid's own kernels (camelid.native: C built on first use
  with the machine's compiler). About a quarter of float32's bytes, one call per forward pass instead of ~10
  PyTorch operations per layer, and activations rounded to int8 per 32, as llama.cpp's Q8_0 rounds them, so
  that the products are integer dot products (vpdpbusd: 32 a instruction): SmolLM2's perplexity moved by +0.71%
  (bench/quantize.py --perplexity; +0.15% when the activations were rounded to int16 per row, for 0.6x the
  prompt speed). One weight scale per row instead of per 64 cost +0.62%. One sequence's decode steps round
  alike and get the products a prompt of 16 tokens or more would, to the bit; 2 to 15 rows in one call (several
  sequences decoded together, a short prompt) round to int16 per row, which measured faster at 8 on SmolLM2.
- `int4`: the decoder's products as 4-bit weights (per 32 weights of a row, codes 0..15 and a float16 scale and
  offset: 5 bits a weight, rounded closer than llama.cpp's Q4_K) multiplied against inputs rounded to int8 per
  32, on the same native decoder; where llama.cpp's Q4_K_M gives a tensor more bits (attn_v and ffn_down in
  about half the layers, rows not 256 wide) the product stays int8, and the head and embeddings are int8. A
  GGUF file's Q4_0, Q4_1 and Q4_K blocks are used directly (repacked, never made float; Q4_0's kept at its
  4.5 bits, without offsets). At a 1.1B shape it decoded at 0.9-1.16x llama.cpp's speed on the same Q4_0 file,
  reading the same bytes, and prefilled at 0.87-1.31x (README, "Benchmarks"; the ratios moved between runs).
Without fbgemm (non-x86 CPUs) `f16` falls back to PyTorch's float16 products; `int8` and `int4` need a C
compiler.
Quantize a model loaded for inference, not one being trained: the float32 weights are not kept.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camelid.config import QUANTIZATIONS  # the names, free of torch for the command line's help
from camelid.errors import CamelidError
from camelid.kquants import use_more_bits
from camelid.model import Llama
from camelid.native import (NO_COMPILER, Q4_BLOCK, Q4_ROWS, Int8Embedding, Int8Linear, NativeDecoder, check_native,
                            compiler, native_layer)

NATIVE = ("int8", "int4")  # the kinds camelid's own kernels run (camelid.native)
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


def check_quantization(kind: str) -> str:
    """`kind` if it is a known quantization, else a one-line error listing them (checked before slow loads)."""
    if kind not in QUANTIZATIONS:
        raise CamelidError(f"unknown quantization {kind!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    if kind in NATIVE and compiler() is None:
        raise CamelidError(NO_COMPILER)
    return kind


def quantize_model(model: Llama, kind: str) -> Llama:
    """Store every linear layer (the output head included) as `kind` says (see PLAN), in place.

    q/k/v and gate/up are stacked into one layer each: at batch 1, fewer and larger products were ~12% faster.
    A quantized model is for inference: it cannot be trained or saved as a checkpoint.
    """
    if check_quantization(kind) == "none":
        return model
    check_quantizable(model.config, kind, model.model.embed_tokens.weight)
    native = runs_native(model.config)
    layers = [quantize_layer(block, kind, product_bits(kind, model.config, i), native=native)
              for i, block in enumerate(model.model.layers)]
    return finish_quantization(model, kind, layers)


def check_quantizable(config, kind: str, weight: Tensor | None = None) -> None:
    """Refuse, before any weight is converted (or loaded), what `kind` cannot run: weights other than float32 on
    the CPU."""
    if weight is not None and (weight.device.type != "cpu" or weight.dtype != torch.float32):
        raise CamelidError(f"--quantize {kind} is for float32 models on the CPU; on a GPU use --dtype bfloat16")


def product_bits(kind: str, config, index: int, stored4: set[str] = frozenset()) -> dict[str, int] | None:
    """The bits of layer `index`'s products (qkv, o, gate_up, down) under `kind`: None (all int8) for int8.

    int4 follows llama.cpp's Q4_K_M, whose 4-bit tensors camelid's 4-bit matches or betters: a product is 4-bit
    where Q4_K_M stores all its weights in 4 bits, and int8 where it gives any of them more: Q6_K to attn_v and
    ffn_down in the first and last eighth of the layers and every third between (q/k/v stacked stay int8 there),
    Q5_0 to rows not a multiple of 256 wide (its 4-bit blocks are 256 long). A product whose weights the file
    stores in 4 bits already (`stored4`) is 4-bit regardless: int8 would only spend bytes. One the 4-bit kernels
    cannot take (rows not a multiple of 32 wide, or not in whole groups of 8) is int8.
    """
    if kind != "int4":
        return None
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    # (each part's rows in whole groups: q's, k's and v's; gate's and up's, which the decoder splits by halves)
    shapes = {"qkv": (math.gcd(q, kv), c.hidden_size), "o": (c.hidden_size, q),
              "gate_up": (c.intermediate_size, c.hidden_size), "down": (c.hidden_size, c.intermediate_size)}
    more = use_more_bits(index, c.num_hidden_layers)
    bits = {}
    for p, (rows, width) in shapes.items():
        wider = (more and p in ("qkv", "down")) or width % 256
        bits[p] = 8 if rows % Q4_ROWS or width % Q4_BLOCK or (wider and p not in stored4) else 4
    return bits


def quantize_layer(block: nn.Module, kind: str, bits: dict[str, int] | None = None, blocks: dict | None = None,
                   native: bool = True):
    """Convert one decoder layer in place, so that a model being loaded never holds all its float weights at
    once. For int8 and int4 (`bits`: product_bits'; `blocks`: weights as a file stores them, see native_layer)
    the native decoder's weights are returned and the float ones dropped; with `native` False (a family the
    native decoder does not run, see runs_native) the layer keeps running in PyTorch, its products (q/k/v and
    gate/up stacked) on camelid's kernels."""
    attn, mlp = block.self_attn, block.mlp
    if kind in NATIVE:
        part = native_layer(block, bits, blocks, _threads())
        attn.q_proj = attn.k_proj = attn.v_proj = attn.o_proj = None
        mlp.gate_proj = mlp.up_proj = mlp.down_proj = None
        if native:
            return part
        attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj = part.qkv, part.o, part.gate_up, part.down
        return None
    attn.qkv_proj = _half_stacked([attn.q_proj, attn.k_proj, attn.v_proj])
    attn.q_proj = attn.k_proj = attn.v_proj = None
    attn.o_proj = _half_stacked([attn.o_proj])
    mlp.gate_up_proj = _half_stacked([mlp.gate_proj, mlp.up_proj])
    mlp.gate_proj = mlp.up_proj = None
    mlp.down_proj = _half_stacked([mlp.down_proj])
    return None


def runs_native(config) -> bool:
    """Whether the native decoder runs this family's layers (else int8 and int4 run them in PyTorch)."""
    try:
        check_native(config)
    except CamelidError:
        return False
    return True


def quantize_ends(model: Llama, kind: str, stored: dict | None = None) -> None:
    """The output head as `kind`, and for int8 and int4 the output head and the token embeddings as int8 rows
    (shared where they are tied; Q4_K_M too keeps the head in more bits, Q6_K), in place; a loading model
    converts these first, so that their float32 copies go at once. `stored`: "lm_head.weight" or
    "model.embed_tokens.weight" as native.Blocks, made int8 from those instead of a float weight."""
    if not isinstance(model.lm_head, nn.Linear):
        return
    if kind not in NATIVE:
        model.lm_head = _half_stacked([model.lm_head])
        return
    stored = stored or {}
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    embed = stored.get("model.embed_tokens.weight", model.model.embed_tokens.weight)
    model.lm_head = Int8Linear(embed if tied else stored.get("lm_head.weight", model.lm_head.weight),
                               model.lm_head.bias, _threads())
    model.model.embed_tokens = Int8Embedding(embed, model.lm_head if tied else None)


def finish_quantization(model: Llama, kind: str, layers: list) -> Llama:
    """The head and embeddings as `kind` (if not yet), and for int8 and int4 the native decoder over `layers`
    (quantize_layer's of each, None where the layers run in PyTorch)."""
    quantize_ends(model, kind)
    if kind in NATIVE and all(part is not None for part in layers):
        model.native = NativeDecoder(model, _threads(), layers)
    model.quantization = kind
    return model


def _threads() -> int:
    """The kernels' threads, captured now: decoding loops set PyTorch to one thread (torch_single_threaded)."""
    return torch.get_num_threads()


def _half_stacked(layers: list[nn.Linear]) -> nn.Module:
    """One layer computing several that read the same input (q, k, v; gate, up): one product, not three."""
    biases = [lin.bias for lin in layers]
    bias = None if biases[0] is None else torch.cat(biases)
    return HalfWeightLinear(torch.cat([lin.weight for lin in layers]), bias)
