"""A training run's FLOPs from a model's shapes and the tokens it runs (`camelid cost`).

Parameters. N is the number of weights that multiply every token: the attention and MLP projections of every
block (biases included) and the vocabulary head, counted once even when it is tied to the input embedding. The
input embedding is a lookup and costs no FLOPs; norm weights cost a few FLOPs each and are left out. So N is
all parameters less the embedding table and the norms (plus the head again when it is tied): for LLaMA-7B,
6,607,077,376 of 6,738,415,616.

FLOPs (L layers, d = attention heads x head dim, D = token positions, S = the sum over rows of their padded
length squared; see camelid.cost.tokens):

    full fine-tuning         6·N·D                       forward 2ND; backward 2ND for activations, 2ND for weights
    LoRA                     4·N·D + 6·N_lora·D          frozen weights: forward and activation gradients only
    attention scores         + 12·L·d·S                  QKᵀ and AV: 4·L·d·T a token forward, 8·L·d·T backward
    gradient checkpointing   + 2·(N + N_lora)·D + 4·L·d·S   every block's forward runs again in backward
    evaluation               + 2·(N + N_lora)·D_eval + 4·L·d·S_eval   a pass over the held-out rows (forward only)

With every row T tokens long the attention term is the usual 12·L·d·T per token; like PaLM's appendix B it
counts the whole T x T product, not the causal half. camelid computes the vocabulary head only at supervised
positions, so its own head cost is lower than counted here; the 2023 trainers computed it everywhere.
"""

from dataclasses import dataclass

from camelid.config import ModelConfig
from camelid.cost.tokens import Tokens


@dataclass(frozen=True)
class ParamCount:
    """A model's parameters by kind, from its config alone (exactly what camelid.model.Llama holds)."""

    embedding: int  # the input embedding table
    attention: int  # q, k, v and o projections of every block, biases included
    mlp: int  # gate, up and down projections of every block, biases included
    norms: int  # RMSNorm weights: two per block and the final one
    head: int  # the vocabulary projection when it has its own weights; 0 when tied to the embedding
    head_matmul: int  # the head's weights as multiplied for every token (vocab x hidden, tied or not)

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.norms + self.head

    @property
    def matmul(self) -> int:
        """N of the FLOP formulas: every weight that multiplies each token."""
        return self.attention + self.mlp + self.head_matmul


def _widths(config: ModelConfig) -> tuple[int, int, int, int]:
    """(hidden, q, k and v, MLP) widths of a block."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return config.hidden_size, q, kv, config.intermediate_size


def count_parameters(config: ModelConfig) -> ParamCount:
    h, q, kv, inter = _widths(config)
    L = config.num_hidden_layers
    attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if config.qkv_bias else 0) + (h if config.o_bias else 0)
    mlp = 3 * h * inter + ((2 * inter + h) if config.mlp_bias else 0)
    vocab = config.vocab_size * h
    qk_norms = 2 * config.head_dim if config.qk_norm else 0
    return ParamCount(embedding=vocab, attention=L * attention, mlp=L * mlp, norms=(2 * L + 1) * h + L * qk_norms,
                      head=0 if config.tie_word_embeddings else vocab, head_matmul=vocab)


def lora_parameters(config: ModelConfig, lora) -> int:
    """The adapter weights `lora` (a camelid.lora.LoRAConfig) adds to a `config` model: r·(in + out) each."""
    h, q, kv, inter = _widths(config)
    sides = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
             "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    return config.num_hidden_layers * sum(lora.r * sum(sides[t]) for t in lora.targets)


def attention_width(config: ModelConfig) -> int:
    """L·d of the attention term: layers x attention heads x head dim."""
    return config.num_hidden_layers * config.num_attention_heads * config.head_dim


@dataclass
class Flops:
    weights: float  # 6ND, or 4ND + 6·N_lora·D for LoRA
    attention: float  # 12·L·d·S
    recompute: float  # gradient checkpointing: 2·(N + N_lora)·D + 4·L·d·S
    evaluation: float  # all held-out passes of one process: 2·(N + N_lora)·D_eval + 4·L·d·S_eval each

    @property
    def training(self) -> float:
        return self.weights + self.attention + self.recompute


def run_flops(tokens: Tokens, *, n: int, n_lora: int, width: int, lora: bool, checkpointing: bool) -> Flops:
    """The FLOPs of the table above: N = `n`, N_lora = `n_lora`, L·d = `width` (0 leaves the attention out)."""
    D, S = tokens.processed, tokens.squares
    forward = 2 * (n + n_lora)  # FLOPs a token of one forward pass through the weights
    return Flops(
        weights=float((4 * n * D + 6 * n_lora * D) if lora else (6 * n * D)),
        attention=float(12 * width * S),
        recompute=float(forward * D + 4 * width * S) if checkpointing else 0.0,
        evaluation=float(tokens.evaluations * (forward * tokens.eval_processed + 4 * width * tokens.eval_squares)),
    )
