"""Memory on the CPU: how much loading a model will take (estimated from its config before any weight is read),
how much this machine has left, and handing freed pages back to the system.

The estimate counts the weights at the chosen `--quantize`, the float32 copies that exist for a while during
loading, the file's pages that reading leaves resident, and the model's key/value cache per token of context.
Measured against the peaks of real loads (README, "Benchmarks") it is within 20%.
"""

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from camelid.config import ModelConfig
from camelid.kquants import use_more_bits

OVERHEAD = 400_000_000  # bytes of Python, PyTorch and camelid themselves (0.23-0.35 GB measured after imports)
SCALE_BLOCK = 64  # int8 weights per float32 scale (native.c's SCALE_BLOCK)
INT8_BYTES = 1 + 4 / SCALE_BLOCK  # an int8 weight and its share of its block's scale
INT4_BYTES = 0.5 + 4 / 32  # a 4-bit weight and its share of its block's two float16 (native.c's Q4_BLOCK: 32)
SKIP_CHECK = "CAMELID_SKIP_MEMORY_CHECK"  # set to 1 to load even where the estimate says it will not fit


@dataclass
class MemoryNeed:
    """What loading a model takes, in bytes."""

    weights: int  # the loaded model's weights
    loading: int  # in use at the worst moment of loading (float32 copies, file pages), beyond OVERHEAD
    cache_per_token: int  # the key/value cache of one sequence, per token of context

    def peak(self, context: int = 0) -> int:
        """The process's peak: OVERHEAD, and the larger of loading and the loaded model with its cache."""
        return OVERHEAD + self.beyond_overhead(context)

    def beyond_overhead(self, context: int = 0) -> int:
        return max(self.loading, self.weights + self.cache_per_token * context)


def memory_need(config: ModelConfig, quantize: str, *, dtype: torch.dtype = torch.float32, file_bytes: int = 0,
                from_gguf: bool = False, stored: dict | None = None) -> MemoryNeed:
    """How much loading a model of `config` at `quantize` takes. `file_bytes`: the size of its weight files, whose
    pages reading leaves resident; `from_gguf`: a GGUF file, which is dequantized to float32 before anything else;
    `stored` (int8, int4 from a GGUF): "four_bit", whether every layer's matrix is stored in a type the 4-bit
    kernels take as it is (then int4 has no int8 layers and no float32 copy of a layer), "exact_ends", whether
    the head and embeddings are made int8 from their rows (no float32 copy of them). Quantized loads go a
    decoder layer at a time (checkpoint.build_quantized_model)."""
    c = config
    stored = stored or {}
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    linear, table = c.num_hidden_layers * per_layer, c.vocab_size * c.hidden_size
    head = 0 if c.tie_word_embeddings else table
    full = torch.finfo(dtype).bits // 8
    layer_copy, ends_copy = 4 * per_layer, 4 * (table + head)  # float32 copies while converting
    if quantize == "int8":  # the embeddings as int8 rows too, shared with a tied head
        weights, ends = INT8_BYTES * (linear + table + head), INT8_BYTES * (table + head)
    elif quantize == "int4":  # int8 ends, and int8 products where Q4_K_M gives more bits (quantize.product_bits)
        more = sum(use_more_bits(i, c.num_hidden_layers) for i in range(c.num_hidden_layers))
        layers = c.num_hidden_layers
        by_width = {"qkv": (c.hidden_size, (q + 2 * kv) * c.hidden_size), "o": (q, c.hidden_size * q),
                    "gate_up": (c.hidden_size, 2 * c.intermediate_size * c.hidden_size),
                    "down": (c.intermediate_size, c.hidden_size * c.intermediate_size)}
        wide = sum(size * (layers if width % 256 else more if p in ("qkv", "down") else 0)
                   for p, (width, size) in by_width.items())
        wide = 0 if stored.get("four_bit") else wide
        ends = INT8_BYTES * (table + head)
        weights = INT4_BYTES * (linear - wide) + INT8_BYTES * wide + ends
        layer_copy = 0 if stored.get("four_bit") else layer_copy
    elif quantize == "f16":  # the embeddings stay float32; the head gets a float16 copy even where tied
        weights, ends = 2 * linear + 6 * table, 6 * table
    else:
        weights, ends = full * (linear + table + head), 0
    if quantize != "none":  # the head and embeddings first, then a layer at a time
        ends_copy = 0 if stored.get("exact_ends") else ends_copy
        loading = max(ends_copy + ends, weights + layer_copy)
    elif from_gguf and full != 4:  # dequantized to float32, then copied to `dtype`
        loading = file_bytes + 4 * (linear + table + head) + weights
    else:  # the file's pages beside the model as read
        loading = file_bytes + weights
    return MemoryNeed(weights=int(weights), loading=int(loading), cache_per_token=2 * c.num_hidden_layers * kv * full)


def available_memory() -> int | None:
    """Bytes this process can still take: the system's available memory, or what is left under this cgroup's
    (v2) limit where that is less, counting the page cache the kernel would reclaim as free, as MemAvailable
    does; None where neither can be read (not Linux)."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit.isdigit():
            used = int((cgroup / "memory.current").read_text())
            stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
            used -= int(stat.get("inactive_file", 0))
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def fits(need: MemoryNeed, context: int = 0) -> tuple[bool, int | None]:
    """Whether `need` fits what is available (this process's own OVERHEAD is already spent), and what is; True
    where that cannot be read, or where SKIP_CHECK is set."""
    available = available_memory()
    if available is None or os.environ.get(SKIP_CHECK, "") not in ("", "0"):
        return True, available
    return need.beyond_overhead(context) <= available, available


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing). glibc keeps the
    pages of freed tensors resident, so work that frees large temporaries again and again (a training step,
    converting a model layer by layer) holds far more memory than it uses at once without this."""
    if (trim := _malloc_trim()) is not None:
        trim(0)
