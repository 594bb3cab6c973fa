"""The LLaMA-family decoder: RMSNorm, rotary embeddings, grouped-query attention, a gated MLP, and a KV cache.

One decoder serves every family; the switches ModelConfig derives from `model_type` (biases, q/k norms, sliding
windows, layers without rope, Gemma's scaled embeddings, offset norms, GeGLU and extra norms) are read below.
Module names follow transformers' (`model.layers.0.self_attn.q_proj`, ...), so the state dict of a camelid model
*is* a Hugging Face state dict and LoRA adapters get peft's names for free.

Shapes: B batch, T new tokens, S cached slots, H query heads, K key/value heads, G = H // K, D head dim.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camelid.config import ModelConfig

IGNORE = -100  # the target of a position that is not trained on (PyTorch's and transformers' ignore_index)


class RMSNorm(nn.Module):
    """RMSNorm; with `offset` 1 (Gemma) the stored weight is how far the scale is from 1, and the product is
    taken in float32 before rounding to the activation dtype (as transformers' Gemma3RMSNorm)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNorm.apply(x, self.weight, self.eps, self.offset)
        return rms_norm(x, self.weight, self.eps, self.offset)


def rms_norm(x: Tensor, weight: Tensor, eps: float, offset: float = 0.0) -> Tensor:
    if x.dtype == torch.float32:  # one fused kernel; bit-identical to the steps below in float32
        return F.rms_norm(x, (x.shape[-1],), weight + offset if offset else weight, eps)
    # Normalise in float32 at least, then scale in the activation dtype (as transformers' Llama), or scale in
    # float32 and round once (as its Gemma).
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (wide * (weight.to(wide.dtype) + offset)).to(x.dtype)
    return weight * wide.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """rms_norm keeping only its input (and one number per row) for backward.

    Autograd would run the norm as five separate steps and keep their intermediates; here the forward is the
    fused kernel and backward works from x again.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, offset: float) -> Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.linalg.vector_norm(wide, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        return rms_norm(x, weight, eps, offset)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        grad = grad.to(rstd.dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        # d/dx of s * x * rstd(x), s = offset + w: rstd * (gs - xhat * mean(gs * xhat)), gs = grad * s
        gw = grad * (weight.to(rstd.dtype) + ctx.offset)
        mean = (gw * xhat).mean(-1, keepdim=True)
        grad_x = gw.sub_(xhat.mul_(mean)).mul_(rstd).to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, None, None


def rope_inv_freq(config: ModelConfig, local: bool = False) -> Tensor:
    """Inverse frequencies of the rotary embedding, with linear or Llama-3.1 scaling applied (float32, [D/2]).

    `local`: those of Gemma 3's sliding-window layers (base rope_local_base_freq, never scaled)."""
    dim = config.head_dim
    base = config.rope_local_base_freq if local else config.rope_theta
    # on the CPU even while a model is built on the meta device (meta arithmetic imports torch._dynamo: 2 s)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = {} if local else config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and signed sin for integer positions [B, T], as [B, T, 1, D] in `dtype` (computed in float32).

    The first half of `sin` is negated so that rotating is x * cos + roll(x, D/2) * sin (see apply_rope).
    """
    freqs = positions[..., None].float() * inv_freq  # [B, T, D/2]
    cos, sin = freqs.cos(), freqs.sin()
    cos = torch.cat([cos, cos], dim=-1)[:, :, None, :]
    sin = torch.cat([-sin, sin], dim=-1)[:, :, None, :]
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, T, heads, D] by position; pairs are (i, i + D/2), the Hugging Face layout.

    Equal to transformers' x * cos + rotate_half(x) * sin: roll swaps the halves, the signed sin negates one.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rope.apply(x, cos, sin)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class _Rope(torch.autograd.Function):
    """apply_rope in two allocations instead of four; backward rotates the gradient back (nothing is kept).

    y = x * cos + R(x) * sin, with R the half swap (its own inverse), so dL/dx = g * cos + R(g * sin).
    """

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return (x * cos).addcmul_(x.roll(x.shape[-1] // 2, dims=-1), sin)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        return (grad * sin).roll(grad.shape[-1] // 2, dims=-1).addcmul_(grad, cos), None, None


class KVCache:
    """Keys and values for every layer in fixed buffers [B, K, S, D], and how many slots each row has filled.

    Rows are independent: row b's next tokens are written at slots lengths[b], lengths[b] + 1, ... so
    prompts of different lengths share a batch without padding on the left, and a row can be reset alone.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows start..stop-1 as a cache of their own that shares this one's memory (writes go through)."""
        view = KVCache.__new__(KVCache)
        view.k = [k[start:stop] for k in self.k]
        view.v = [v[start:stop] for v in self.v]
        view.lengths = self.lengths[start:stop]
        view.max_len = self.max_len
        return view


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.rope = config.rope_in(layer)  # SmolLM3 leaves the rotary embedding out of some layers (NoPE)
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=config.o_bias)
        # Inference may replace q/k/v by one product over their stacked weights (camelid.quantize).
        self.qkv_proj: nn.Module | None = None
        # Qwen3, Gemma 3: each head's q and k RMS-normalised over the head dimension, before the rotary embedding.
        offset = config.norm_offset
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, offset) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, offset) if config.qk_norm else None
        self.scale = config.attention_scale  # None: SDPA's own 1/sqrt(head_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache=None) -> Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv, self.head_dim
        G = H // K
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([H * D, K * D, K * D], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = q.view(B, T, H, D), k.view(B, T, K, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.view(B, T, K, D)
        if cache is not None:
            k_buf, v_buf, rows, slots, kv_len = cache
            if rows is None:  # one row: a plain slice write, cheaper than scattering
                start = slots
                k_buf[0, :, start : start + T] = k[0].transpose(0, 1)
                v_buf[0, :, start : start + T] = v[0].transpose(0, 1)
            else:
                k_buf[rows, :, slots] = k  # rows [B, 1], slots [B, T]: writes [B, T, K, D]
                v_buf[rows, :, slots] = v
            k, v = k_buf[:, :, :kv_len], v_buf[:, :, :kv_len]  # [B, K, S, D]
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        if cache is None:
            # Training and scoring: causal, or `mask` [B, 1, T, T] (True = may attend) keeping packed examples
            # apart. SDPA shares each KV head among its G query heads itself, without copying K/V.
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=G > 1, scale=self.scale
            ).transpose(1, 2)
        else:
            # GQA without copying K/V: the G query heads that share a KV head are folded into the query
            # length, [B, K, G*T, D]; `mask` was folded the same way and made additive (0 or -inf), [B, 1, G*T, S].
            q = q.view(B, T, K, G, D).permute(0, 2, 3, 1, 4).reshape(B, K, G * T, D)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            out = out.view(B, K, G, T, D).permute(0, 3, 1, 2, 4)
        return self.o_proj(out.reshape(B, T, H * D))


class MLP(nn.Module):
    """The gated MLP: down(act(gate(x)) * up(x)), act SiLU (SwiGLU) or tanh-approximated GELU (Gemma's GeGLU)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gelu = config.hidden_act == "gelu_pytorch_tanh"
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.gate_up_proj: nn.Module | None = None  # as Attention.qkv_proj

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            return self.down_proj(_GatedUnit.apply(gate, up, self.gelu))
        return self.down_proj(_activation(gate, self.gelu) * up)


def _activation(x: Tensor, gelu: bool) -> Tensor:
    return F.gelu(x, approximate="tanh") if gelu else F.silu(x)


class _GatedUnit(torch.autograd.Function):
    """act(gate) * up, keeping only gate and up for backward (autograd would also keep act(gate)).

    In a small model the MLP's [tokens, intermediate] activations are the largest thing training stores.
    """

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, gelu: bool) -> Tensor:
        ctx.save_for_backward(gate, up)
        ctx.gelu = gelu
        return _activation(gate, gelu).mul_(up)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # What autograd would compute from act(gate) * up, in three allocations: the activation's own backward kernel.
        gate, up = ctx.saved_tensors
        d_gate = None
        if ctx.needs_input_grad[0]:
            if ctx.gelu:
                d_gate = torch.ops.aten.gelu_backward(grad * up, gate, approximate="tanh")
            else:
                d_gate = torch.ops.aten.silu_backward(grad * up, gate)
        d_up = _activation(gate, ctx.gelu).mul_(grad) if ctx.needs_input_grad[1] else None
        return d_gate, d_up, None


class Block(nn.Module):
    """One layer. LLaMA: x + attn(norm(x)), then + mlp(post_attention_layernorm(x)). Gemma normalises on both
    sides of each: its post_attention_layernorm normalises the attention's output, and the MLP sits between
    pre_feedforward_layernorm and post_feedforward_layernorm (transformers' names, so state dicts match)."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.sandwich = config.gemma
        offset = config.norm_offset
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache=None) -> Tensor:
        if not self.sandwich:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # Built on the meta device (to load a checkpoint into), the embedding is left uninitialised: normal_ on a
        # meta tensor imports torch._dynamo, which took 2 s of a load that otherwise takes half a second.
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if weight.device.type != "meta":
            nn.init.normal_(weight)  # nn.Embedding's own initialisation
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)


class Llama(nn.Module):
    """A LLaMA-family causal language model (the equivalent of transformers' `LlamaForCausalLM`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config).to(self.lm_head.weight.device), persistent=False)
        if config.rope_local_base_freq is not None:  # Gemma 3's sliding-window layers rotate at another base
            self.register_buffer("inv_freq_local", rope_inv_freq(config, local=True).to(self.inv_freq.device),
                                 persistent=False)
        # Gemma multiplies embeddings by sqrt(hidden_size), rounded to the weights' dtype as transformers does.
        self.embed_scale = config.hidden_size**0.5 if config.gemma else None
        self.gradient_checkpointing = False
        self.quantization = "none"  # set by camelid.quantize.quantize_model
        self.native = None  # a camelid.native.NativeDecoder (--quantize int8), which then runs `hidden`
        self.lora = None  # the camelid.lora.LoRAConfig of unmerged adapters, set by apply_lora, cleared by merge_lora

    def forward(self, tokens: Tensor, cache: KVCache | None = None, *, targets: Tensor | None = None,
                per_token: bool = False, **kw) -> Tensor:
        """Logits for every position, [B, T, vocab]; or, given `targets` [B, T], the summed cross-entropy (with
        `per_token`, the cross-entropy of each supervised position [N], in the order of `targets != IGNORE`).

        Targets are the next token to predict at each position, IGNORE where there is nothing to learn. The
        vocabulary projection is computed only at supervised positions, in chunks (see linear_cross_entropy).
        """
        hidden = self.hidden(tokens, cache, **kw)
        if targets is None:
            return self.lm_head(hidden)
        keep = targets != IGNORE
        if per_token:
            return linear_token_cross_entropy(hidden[keep], self.lm_head.weight, targets[keep])
        return linear_cross_entropy(hidden[keep], self.lm_head.weight, targets[keep])

    def hidden(
        self,
        tokens: Tensor,
        cache: KVCache | None = None,
        *,
        valid: Tensor | None = None,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states [B, T, hidden] (after the last norm); apply `lm_head` only where logits are needed.

        With a cache, row b's tokens continue from cache.lengths[b]; `valid` [B] says how many of each row's T
        tokens are real (the rest are right padding), and the cache advances by that much.
        Without a cache, attention is causal over the T tokens; training may pass `positions` [B, T] and a
        boolean `mask` [B, T, T] (True = may attend) to keep packed examples apart.
        """
        if self.native is not None:
            return self.native.hidden(tokens, cache, valid=valid, positions=positions, mask=mask)
        B, T = tokens.shape
        x = self.model.embed_tokens(tokens)
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        layer_cache = [None] * len(self.model.layers)
        if cache is not None:
            if positions is not None or mask is not None:
                raise ValueError("positions and mask are derived from the cache when a cache is given")
            positions = cache.lengths[:, None] + torch.arange(T, device=tokens.device)  # [B, T]
            kv_len = int(positions.max()) + 1
            if kv_len > cache.max_len:
                raise ValueError(f"sequence of {kv_len} tokens does not fit the cache of {cache.max_len}")
            slots = torch.arange(kv_len, device=tokens.device)
            query_at, key_at = positions, slots  # [B, T] and [S]: where each query and key sits in its row
            mask = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]: causal within each row
            rows, slots = torch.arange(B, device=tokens.device)[:, None], positions
            if B == 1:
                rows, slots = None, int(positions[0, 0])
            layer_cache = [(cache.k[i], cache.v[i], rows, slots, kv_len) for i in range(len(self.model.layers))]
        else:
            if positions is None:
                positions = torch.arange(T, device=tokens.device).expand(B, T)
            # Where tokens sit, for sliding windows: their indices, or with a mask (packed examples, the branching
            # answers of preference pairs) their positions, which say how far apart two tokens that see each other are.
            query_at = key_at = positions if mask is not None else torch.arange(T, device=tokens.device)
        windows = [self.config.window(i) for i in range(len(self.model.layers))]
        masks = {w: self._attention_mask(mask, query_at, key_at, w, cache is not None, x.dtype) for w in set(windows)}
        local = [self.config.local_rope(i) for i in range(len(self.model.layers))]
        ropes = {kind: rope_cos_sin(self.inv_freq_local if kind else self.inv_freq, positions, x.dtype)
                 for kind in set(local)}
        for layer, lc, window, kind in zip(self.model.layers, layer_cache, windows, local):
            cos, sin = ropes[kind]
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, masks[window], lc, use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks[window], lc)
        if cache is not None:
            cache.lengths += T if valid is None else valid.to(cache.lengths.device)
        return self.model.norm(x)

    def _attention_mask(self, allowed: Tensor | None, query_at: Tensor, key_at: Tensor, window: int | None,
                        cached: bool, dtype: torch.dtype) -> Tensor | None:
        """What Attention takes for one kind of layer: None (plainly causal), a boolean [B, 1, T, T] without a
        cache, or an additive [B, 1, G*T, S] with one (query heads folded as Attention folds them).

        `allowed` [B, T, S] says which keys each query may see (None: causal); `query_at` ([B, T] or [T]) and
        `key_at` ([B, S] or [S]) are where queries and keys sit. A sliding window of W keeps the W nearest keys,
        the query's own included (transformers' rule).
        """
        if window is not None:
            near = key_at[..., None, :] > query_at[..., None] - window  # [B, T, S] or [T, S]
            if allowed is None:
                allowed = (near & (key_at[..., None, :] <= query_at[..., None])).expand(1, *near.shape[-2:])
            else:
                allowed = allowed & near
        if allowed is None:
            return None
        if not cached:
            return allowed[:, None]  # broadcast over heads
        B, T, S = allowed.shape
        G = self.config.num_attention_heads // self.config.num_key_value_heads
        allowed = allowed[:, None, None].expand(B, 1, G, T, S).reshape(B, 1, G * T, S)
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.model.embed_tokens.weight  # (the head may have been swapped for a quantized one)
        max_len = min(max_len or self.config.max_sequence_length, self.config.max_sequence_length)
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


# -- training loss ---------------------------------------------------------------------------------------------


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 128) -> Tensor:
    """sum(cross_entropy(hidden @ weight.T, targets)) without holding the [N, vocab] logits.

    hidden [N, d], weight [V, d], targets [N]. For a small model the logits dominate training memory (4 x 512
    tokens x 49K vocab x 4 bytes = 400 MB, three times over with softmax and gradients). Here `chunk` rows are
    projected at a time and, when gradients are wanted, the loss's gradients are worked out in the same pass,
    so nothing of size vocab survives the chunk and backward costs no second projection.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)
    wide = torch.promote_types(hidden.dtype, torch.float32)  # the softmax is done in float32 at least
    total = hidden.new_zeros((), dtype=wide)
    for s in range(0, hidden.shape[0], chunk):
        logits = (hidden[s : s + chunk] @ weight.T).to(wide)
        total += F.cross_entropy(logits, targets[s : s + chunk], reduction="sum")
    return total


def linear_token_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 128) -> Tensor:
    """cross_entropy(hidden @ weight.T, targets) of each row [N], without holding the [N, vocab] logits.

    For losses that weigh tokens unequally (preference tuning weighs each answer's tokens by its pair's margin).
    Each row's gradient with respect to its hidden state is worked out in the forward pass, as in
    linear_cross_entropy; the weight's gradient, which mixes rows by their upstream gradients, costs a second
    projection in backward and is computed only when the weight is trained.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearTokenCrossEntropy.apply(hidden, weight, targets, chunk)
    wide = torch.promote_types(hidden.dtype, torch.float32)
    return torch.cat([F.cross_entropy((hidden[s : s + chunk] @ weight.T).to(wide), targets[s : s + chunk],
                                      reduction="none") for s in range(0, hidden.shape[0], chunk)]
                     or [hidden.new_zeros(0, dtype=wide)])


def _softmax_minus_target(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The cross-entropy of each row and its gradient with respect to the logits (softmax - one_hot), the
    latter computed in place over `logits`."""
    lse = logits.logsumexp(-1)
    losses = lse - logits.gather(1, targets[:, None]).squeeze(1)
    grad = logits.sub_(lse[:, None]).exp_()
    grad[torch.arange(len(targets), device=targets.device), targets] -= 1
    return losses, grad


class _LinearTokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        wide = torch.promote_types(hidden.dtype, torch.float32)
        losses = hidden.new_empty(hidden.shape[0], dtype=wide)
        grad_hidden = torch.empty_like(hidden)  # row i: d(loss_i)/d(hidden_i)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s : s + chunk] @ weight.T).to(wide)
            losses[s : s + chunk], grad = _softmax_minus_target(logits, targets[s : s + chunk])
            grad_hidden[s : s + chunk] = grad.to(hidden.dtype) @ weight
        ctx.chunk = chunk
        ctx.save_for_backward(grad_hidden, hidden if ctx.needs_input_grad[1] else None,
                              weight if ctx.needs_input_grad[1] else None, targets)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        grad_hidden, hidden, weight, targets = ctx.saved_tensors
        grad_w = None
        if weight is not None:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            wide = torch.promote_types(hidden.dtype, torch.float32)
            for s in range(0, hidden.shape[0], ctx.chunk):
                h = hidden[s : s + ctx.chunk]
                _, grad = _softmax_minus_target((h @ weight.T).to(wide), targets[s : s + ctx.chunk])
                grad_w += ((grad * grad_losses[s : s + ctx.chunk, None]).T @ h.float())
            grad_w = grad_w.to(weight.dtype)
        return grad_hidden * grad_losses[:, None].to(grad_hidden.dtype), grad_w, None, None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        want_w = ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        wide = torch.promote_types(hidden.dtype, torch.float32)
        total = hidden.new_zeros((), dtype=wide)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s : s + chunk], targets[s : s + chunk]
            logits = (h @ weight.T).to(wide)  # [n, V]
            lse = logits.logsumexp(-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            # d(loss)/d(logits) = softmax - one_hot(target), computed in place over the logits
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(len(t), device=t.device), t] -= 1
            grad = grad.to(hidden.dtype)
            grad_hidden[s : s + chunk] = grad @ weight
            if want_w:
                grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_w = None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden * grad_total.to(grad_hidden.dtype), grad_w, None, None
