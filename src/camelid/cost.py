"""What a training recipe costs: tokens, FLOPs, hours and dollars on a given GPU (`camelid cost`).

Parameters. N is the number of weights that multiply every token: the attention and MLP projections of every
block (biases included) and the vocabulary head, counted once even when it is tied to the input embedding. The
input embedding is a lookup and costs no FLOPs; norm weights cost a few FLOPs each and are left out. So N is
all parameters less the embedding table and the norms (plus the head again when it is tied): for LLaMA-7B,
6,607,077,376 of 6,738,415,616.

Tokens. D is every token position a run puts through the model, padding included (a padded position costs the
same matmuls), over all its optimizer steps. From a recipe's data file it is counted exactly as `camelid train`
batches it: the same held-out split, examples, truncation, packing or one-example rows, shuffled order,
processes and micro-batches, each micro-batch padded to its longest row. Without the data, counts come from
the command line: examples x tokens per row (padding included; with `packing: false` it defaults to seq_len,
every row padded to the full length as FastChat did, an upper bound for camelid, which pads a micro-batch only
to its longest row), or the total tokens of one epoch.

FLOPs (L layers, d = attention heads x head dim, S = the sum over rows of their padded length squared):

    full fine-tuning         6·N·D                       forward 2ND; backward 2ND for activations, 2ND for weights
    LoRA                     4·N·D + 6·N_lora·D          frozen weights: forward and activation gradients only
    attention scores         + 12·L·d·S                  QKᵀ and AV: 4·L·d·T a token forward, 8·L·d·T backward
    gradient checkpointing   + 2·(N + N_lora)·D + 4·L·d·S   every block's forward runs again in backward
    evaluation               + 2·(N + N_lora)·D_eval + 4·L·d·S_eval   a pass over the held-out rows (forward only)

With every row T tokens long the attention term is the usual 12·L·d·T per token; like PaLM's appendix B it
counts the whole T x T product, not the causal half. camelid computes the vocabulary head only at supervised
positions, so its own head cost is lower than counted here; the 2023 trainers computed it everywhere.

Time = FLOPs / (GPUs x peak dense bf16 tensor FLOP/s x utilisation); evaluation runs on every process at once,
so its FLOPs are divided by one GPU's rate. Dollars = hours x GPUs x price per GPU-hour.

Utilisation. The share of peak that the FLOPs above reach over a whole run. With gradient checkpointing the
recomputed forward is counted as work, so strictly it is hardware FLOPs utilisation; without checkpointing it
is model FLOPs utilisation (MFU). The default, 0.20, stands for the stack the published 2023 recipes ran on —
the Hugging Face Trainer with PyTorch FSDP, padded rows, eager or early flash attention — and is read off
published figures, not fitted to the Alpaca and Vicuna timings:
  - tuned Megatron-LM reached 41.5% MFU (22B) to 56% (1T) on A100-80GB (Korthikanti et al. 2022,
    arXiv:2205.05198), the ceiling for that generation;
  - the FlashAttention paper trained GPT-2 on 8 A100s with Hugging Face's implementation 2.0x (small) and 1.8x
    (medium) slower than with Megatron-LM's (Dao et al. 2022, arXiv:2205.14135, Table 2): about 41.5% / 2 ≈ 21%;
  - PaLM's comparison puts GPT-3's own training at 21.3% MFU (Chowdhery et al. 2022, arXiv:2204.02311, Table 3).
Tuned FSDP stacks of 2024 (FlashAttention-2, torch.compile, packed rows) report 50-57%; pass --utilization 0.5
to estimate a run like that.

Memory. Full fine-tuning keeps float32 weights, float32 gradients and Adam's two float32 moments: 16 bytes a
parameter; LoRA keeps the frozen base in bf16 (2 bytes) and 16 bytes per adapter weight. FSDP shards them over
the GPUs; DDP keeps a whole copy on each. Activations come on top and are not estimated.
"""

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from camelid.config import PRESETS, ModelConfig, preset
from camelid.errors import CamelidError

DEFAULT_UTILIZATION = 0.20
BYTES_FULL = 16  # float32 weight + float32 gradient + Adam's two float32 moments
BYTES_FROZEN = 2  # a frozen base weight in bf16 (LoRA on a GPU)


# -- GPUs ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    name: str
    tflops: float  # peak dense (no sparsity) bf16 tensor TFLOP/s, or fp16 where the chip has no bf16
    memory_gb: float
    source: str  # where the two numbers are published
    bf16: bool = True
    note: str = ""


A100_DATASHEET = ("NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS dense (624 with sparsity), "
                  "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
                  "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf")
H100_DATASHEET = ("NVIDIA H100 Tensor Core GPU datasheet, "
                  "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet")

GPUS = {
    g.name: g
    for g in [
        GPU("A100-40GB", 312.0, 40, A100_DATASHEET),
        GPU("A100-80GB", 312.0, 80, A100_DATASHEET),
        GPU("H100-SXM", 989.5, 80, f"{H100_DATASHEET}: BF16 1,979 TFLOPS with sparsity, halved"),
        GPU("H100-PCIe", 756.5, 80, f"{H100_DATASHEET}: BF16 1,513 TFLOPS with sparsity, halved"),
        GPU("H200", 989.5, 141, "NVIDIA H200 datasheet (H200 SXM): BF16 1,979 TFLOPS with sparsity, halved; 141 GB "
            "HBM3e, https://www.nvidia.com/en-us/data-center/h200/"),
        GPU("L40S", 362.05, 48, "NVIDIA L40S datasheet: BF16 362.05 TFLOPS dense (733 with sparsity), 48 GB GDDR6, "
            "https://www.nvidia.com/en-us/data-center/l40s/"),
        GPU("A10G", 70.0, 24, "Baseten, 'NVIDIA A10 vs A10G for ML model inference' (spec table), "
            "https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/",
            note="AWS's variant of the A10 (G5 instances); NVIDIA publishes no A10G datasheet, so this figure is "
            "third-party (the A10's own datasheet gives 125)"),
        GPU("RTX-4090", 165.2, 24, "NVIDIA Ada GPU Architecture whitepaper, GeForce RTX 4090: BF16 tensor with FP32 "
            "accumulate 165.2 TFLOPS dense, https://images.nvidia.com/aem-dam/Solutions/geforce/ada/"
            "nvidia-ada-gpu-architecture.pdf",
            note="GeForce cards run FP32-accumulate tensor math at half their FP16-accumulate rate (330.3)"),
        GPU("RTX-3090", 71.0, 24, "NVIDIA Ampere GA102 GPU Architecture whitepaper, GeForce RTX 3090: BF16 tensor "
            "with FP32 accumulate 71 TFLOPS dense, https://www.nvidia.com/content/PDF/"
            "nvidia-ampere-ga-102-gpu-architecture-whitepaper-v2.pdf",
            note="as the RTX 4090: half rate with FP32 accumulate (142 with FP16 accumulate)"),
        GPU("V100", 125.0, 32, "NVIDIA V100 Tensor Core GPU datasheet (V100 SXM2): 125 TFLOPS tensor (FP16), 32 GB "
            "HBM2, https://images.nvidia.com/content/technologies/volta/pdf/"
            "volta-v100-datasheet-update-us-1165301-r5.pdf",
            bf16=False, note="no bf16: fp16 mixed precision only (a 16 GB model exists; the PCIe card is 112)"),
        GPU("T4", 65.0, 16, "NVIDIA T4 Tensor Core GPU datasheet: mixed precision (FP16/FP32) 65 TFLOPS, 16 GB "
            "GDDR6, https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/"
            "t4-tensor-core-datasheet-951643.pdf",
            bf16=False, note="no bf16: fp16 mixed precision only"),
    ]
}


def find_gpu(name: str) -> GPU:
    """A GPU of the table by name (case, spaces and underscores do not matter), or a one-line error listing them."""
    key = re.sub(r"[\s_]+", "-", name.strip()).lower()
    for gpu in GPUS.values():
        if gpu.name.lower() == key:
            return gpu
    raise CamelidError(f"unknown GPU {name!r}; choose one of: {', '.join(GPUS)} (see: camelid cost --list-gpus)")


def gpu_table() -> str:
    """The GPU table as Markdown, each row with its source."""
    lines = ["| GPU | peak dense bf16 TFLOP/s | memory GB | source |", "|:--|--:|--:|:--|"]
    for g in GPUS.values():
        peak = f"{g.tflops:g}" + ("" if g.bf16 else " (fp16)")
        lines.append(f"| {g.name} | {peak} | {g.memory_gb:g} | {g.source} |")
    notes = [f"- {g.name}: {g.note}" for g in GPUS.values() if g.note]
    sparsity = "Tensor-core peaks without structured sparsity (datasheets quote twice these with it)."
    return "\n".join([*lines, "", sparsity, *notes])


# -- parameters ---------------------------------------------------------------------------------------------------


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


def count_parameters(config: ModelConfig) -> ParamCount:
    h, L, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv + h) if config.attention_bias else 0)
    mlp = 3 * h * inter + ((2 * inter + h) if config.mlp_bias else 0)
    vocab = config.vocab_size * h
    return ParamCount(embedding=vocab, attention=L * attention, mlp=L * mlp, norms=(2 * L + 1) * h,
                      head=0 if config.tie_word_embeddings else vocab, head_matmul=vocab)


def lora_parameters(config: ModelConfig, lora) -> int:
    """The adapter weights `lora` (a camelid.lora.LoRAConfig) adds to a `config` model: r·(in + out) each."""
    h, inter = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    sides = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
             "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    return config.num_hidden_layers * sum(lora.r * sum(sides[t]) for t in lora.targets)


def read_model_config(spec: str) -> ModelConfig:
    """The config of a MODEL as `camelid train` takes it (name, GGUF, HF directory, adapter: its base's)."""
    from camelid.checkpoint import config_from_gguf, resolve_model_path
    from camelid.gguf_file import GGUFFile
    from camelid.lora import adapter_base, is_adapter_dir

    path = resolve_model_path(spec)
    if is_adapter_dir(path):
        path = resolve_model_path(adapter_base(path))
    if path.is_dir():
        return ModelConfig.load(path)
    return config_from_gguf(GGUFFile(path))


def parse_count(text: str | int | float, what: str) -> float:
    """A count as a number: 52002, 6.7e9, 70K, 6.7B, 135M."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBtT]?)\s*", str(text))
    if not match:
        raise CamelidError(f"{what}: {text!r} is not a number; give e.g. 52002, 70K, 6.7B or 6.7e9")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2).lower()]
    return float(match.group(1)) * scale


# -- tokens -------------------------------------------------------------------------------------------------------


@dataclass
class Tokens:
    """What a run puts through the model: D and S of the formulas, for training and for evaluation."""

    how: list[str]  # how the numbers were obtained, in words, one line each
    rows: int  # training sequences per epoch
    steps: int  # optimizer steps
    batch_size: int  # sequences per step
    processed: int  # D: token positions of all steps, padding included
    squares: int  # S: the sum over the rows run of their padded length squared
    real: int | None = None  # the tokens of D that are not padding (known when counted from the data)
    eval_processed: int = 0  # one pass over the held-out rows, padding included
    eval_squares: int = 0
    evaluations: int = 0  # passes over the held-out rows during the run


def _check_batching(cfg, world: int, rows: int) -> None:
    """The refusals `camelid train` would give before its first step."""
    if cfg.batch_size % (world * cfg.micro_batch_size):
        raise CamelidError(
            f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size {cfg.micro_batch_size} x {world} "
            f"GPU(s), so training would refuse it; change --count, or override batch_size= or micro_batch_size="
        )
    if rows < cfg.batch_size:
        raise CamelidError(
            f"the data makes {rows} training sequences, fewer than one batch ({cfg.batch_size}); "
            "lower batch_size or add data"
        )


def total_steps(rows: int, cfg) -> int:
    return cfg.max_steps or math.ceil(cfg.epochs * math.ceil(rows / cfg.batch_size))


def evaluations(steps: int, eval_every: int) -> int:
    """How often training evaluates: every `eval_every` steps, and at the end."""
    if not eval_every:
        return 1
    return steps // eval_every + (1 if steps % eval_every else 0)


def batched_lengths(lengths: list[int], cfg, world: int) -> tuple[int, int, int, int]:
    """(steps, real tokens, D, S) of a run over rows of these lengths, batched exactly as `camelid train` does.

    Step s takes `batch_size` rows of the epoch's seeded order (wrapping around at its end, as
    camelid.train.loop.rows_for_step), process r takes every world-th of them, and each micro-batch is padded
    to its longest row.
    """
    from camelid.examples import shuffled

    n, bs, micro = len(lengths), cfg.batch_size, cfg.micro_batch_size
    per_epoch = math.ceil(n / bs)
    steps = total_steps(n, cfg)
    real = processed = squares = 0
    order, order_epoch = None, None
    for step in range(steps):
        epoch, i = divmod(step, per_epoch)
        if epoch != order_epoch:  # one shuffle per epoch, the same one rows_for_step draws at every step
            order, order_epoch = shuffled(range(n), cfg.seed + 1 + epoch), epoch
        ids = [order[(i * bs + j) % n] for j in range(bs)]
        for rank in range(world):
            mine = ids[rank::world]
            for k in range(0, len(mine), micro):
                chunk = [lengths[j] for j in mine[k : k + micro]]
                longest = max(chunk)
                real += sum(chunk)
                processed += len(chunk) * longest
                squares += len(chunk) * longest * longest
    return steps, real, processed, squares


def tokens_from_data(cfg, world: int, tokenizer: str | None = None) -> Tokens:
    """D and S counted from the recipe's data files, tokenized with the model's (or `tokenizer`'s) tokenizer."""
    from camelid.checkpoint import load_tokenizer_and_template
    from camelid.train.loop import build_rows, load_conversations

    spec = tokenizer or cfg.model
    try:
        tok, template = load_tokenizer_and_template(spec, cfg.template)
    except CamelidError as exc:
        if tokenizer:
            raise
        raise CamelidError(
            f"cannot count the tokens of {', '.join(cfg.data)}: the recipe's model is not readable here ({exc}); "
            "give --tokenizer MODEL (one with the same tokenizer), or counts with --examples N"
        ) from None
    said: list[str] = []
    conversations = load_conversations(cfg, said.append)
    rows, eval_rows = build_rows(cfg, template, tok, conversations, said.append)
    _check_batching(cfg, world, len(rows))
    steps, real, processed, squares = batched_lengths([len(r.tokens) for r in rows], cfg, world)
    eval_processed = eval_squares = 0
    for s in range(0, len(eval_rows), cfg.micro_batch_size):  # as camelid.train.loop.evaluate batches them
        chunk = [len(r.tokens) for r in eval_rows[s : s + cfg.micro_batch_size]]
        eval_processed += len(chunk) * max(chunk)
        eval_squares += len(chunk) * max(chunk) ** 2
    template_name = f"the {cfg.template} template" if cfg.template else "its own chat template"
    how = [f"counted from the data as training builds its rows: {spec}'s tokenizer, {template_name}", *said]
    return Tokens(how=how, rows=len(rows), steps=steps, batch_size=cfg.batch_size, processed=processed,
                  squares=squares, real=real, eval_processed=eval_processed, eval_squares=eval_squares,
                  evaluations=evaluations(steps, cfg.eval_every) if eval_rows else 0)


def tokens_from_counts(cfg, world: int, *, examples=None, tokens_per_example=None, tokens=None) -> Tokens:
    """D and S from counts given on the command line (see the module docstring for the defaults)."""
    if tokens is not None and tokens_per_example is not None:
        raise CamelidError("give --tokens or --tokens-per-example, not both (tokens = examples x tokens per example)")
    for value, flag in ((examples, "--examples"), (tokens_per_example, "--tokens-per-example"), (tokens, "--tokens")):
        if value is not None and not value > 0:
            raise CamelidError(f"{flag} must be above 0, not {value:g}")
    if examples is not None and examples != int(examples):
        raise CamelidError(f"--examples must be a whole number, not {examples:g}")
    how = []
    if examples is not None:
        n = int(examples)
        held_out = round(n * cfg.eval_fraction) or (1 if cfg.eval_fraction else 0)  # as build_rows splits
        train_n = n - held_out
        how.append(f"{n:,} examples (--examples)" + (f", {held_out:,} held out (eval_fraction {cfg.eval_fraction:g})"
                                                      if held_out else ""))
        if tokens is not None:
            tokens_per_example = tokens / n
            how.append(f"{tokens / n:,.1f} tokens per example: --tokens {tokens:,.0f} / --examples")
        elif tokens_per_example is not None:
            how.append(f"{tokens_per_example:,.1f} tokens per example, padding included (--tokens-per-example)")
        elif not cfg.packing:
            tokens_per_example = cfg.seq_len
            how.append(f"every row counted as padded to seq_len {cfg.seq_len}, as FastChat padded (packing is off and "
                       "no --tokens-per-example was given); camelid pads a micro-batch only to its longest row, so "
                       "for camelid this is an upper bound")
        else:
            raise CamelidError(
                "packing is on, so the tokens are the data's own: give --tokens-per-example T (the mean example "
                "length) or --tokens N (the whole data set)"
            )
    elif tokens is not None:
        held_out = 0
        train_n = 0
        how.append(f"{tokens:,.0f} tokens in one pass over the data, padding included (--tokens), as rows of "
                   f"seq_len {cfg.seq_len}")
    else:
        raise CamelidError("no counts given: pass --examples N (and --tokens-per-example T) or --tokens N")
    if tokens_per_example is not None and tokens_per_example > cfg.seq_len:
        raise CamelidError(
            f"{tokens_per_example:,g} tokens per example is more than seq_len {cfg.seq_len}, which training cuts "
            f"rows to; give at most {cfg.seq_len}"
        )
    if examples is not None and not cfg.packing:
        rows, row_len = train_n, tokens_per_example
        eval_rows, eval_len = held_out, tokens_per_example
    else:  # packed, or only a total: rows of (nearly) seq_len tokens
        epoch_tokens = train_n * tokens_per_example if examples is not None else tokens * (1 - cfg.eval_fraction)
        eval_tokens = held_out * tokens_per_example if examples is not None else tokens * cfg.eval_fraction
        rows = math.ceil(epoch_tokens / cfg.seq_len)
        row_len = epoch_tokens / rows if rows else 0
        eval_rows = math.ceil(eval_tokens / cfg.seq_len)
        eval_len = eval_tokens / eval_rows if eval_rows else 0
    _check_batching(cfg, world, rows)
    steps = total_steps(rows, cfg)
    processed = steps * cfg.batch_size * row_len
    return Tokens(how=how, rows=rows, steps=steps, batch_size=cfg.batch_size, processed=round(processed),
                  squares=round(processed * row_len), eval_processed=round(eval_rows * eval_len),
                  eval_squares=round(eval_rows * eval_len * eval_len),
                  evaluations=evaluations(steps, cfg.eval_every) if eval_rows else 0)


# -- the estimate -------------------------------------------------------------------------------------------------


@dataclass
class Flops:
    weights: float  # 6ND, or 4ND + 6·N_lora·D for LoRA
    attention: float  # 12·L·d·S
    recompute: float  # gradient checkpointing: 2·(N + N_lora)·D + 4·L·d·S
    evaluation: float  # all held-out passes of one process: 2·(N + N_lora)·D_eval + 4·L·d·S_eval each

    @property
    def training(self) -> float:
        return self.weights + self.attention + self.recompute


@dataclass
class CostEstimate:
    recipe: str
    method: str
    model: str  # where the model's size came from
    parameters: int  # all of them
    n: int  # N of the formulas
    lora_parameters: int
    tokens: Tokens
    flops: Flops
    gpu: GPU
    count: int
    utilization: float
    price: float | None  # dollars per GPU-hour
    memory_gb: float  # weights, gradients and optimizer state on each GPU
    warnings: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        rate = self.gpu.tflops * 1e12 * self.utilization
        return self.flops.training / (self.count * rate) + self.flops.evaluation / rate

    @property
    def hours(self) -> float:
        return self.seconds / 3600

    @property
    def gpu_hours(self) -> float:
        return self.hours * self.count

    @property
    def dollars(self) -> float | None:
        return None if self.price is None else self.gpu_hours * self.price

    def to_dict(self) -> dict:
        out = asdict(self)
        out["flops"]["training"] = self.flops.training
        out.update(seconds=self.seconds, hours=self.hours, gpu_hours=self.gpu_hours, dollars=self.dollars)
        return out


def estimate_cost(
    recipe,
    *,
    gpu: str,
    count: int = 1,
    utilization: float = DEFAULT_UTILIZATION,
    price: float | None = None,
    overrides: list[str] = (),
    preset_name: str | None = None,
    model_config: ModelConfig | None = None,
    model_size: float | None = None,
    examples: float | None = None,
    tokens_per_example: float | None = None,
    tokens: float | None = None,
    tokenizer: str | None = None,
) -> CostEstimate:
    """Tokens, FLOPs, hours, GPU-hours and dollars of training `recipe` on `count` GPUs of kind `gpu`.

    `recipe` is a TrainConfig, or a recipe name or YAML path (read with `overrides`, as `camelid train`). The
    model's shapes come from `preset_name` or `model_config`, else from the recipe's model when it is here; a bare
    `model_size` (parameters) gives 6·N·D without the attention term. Tokens come from `examples` /
    `tokens_per_example` / `tokens` when any is given, else from the recipe's data files (see the module
    docstring).
    """
    from camelid.train.recipe import TrainConfig, read_recipe

    cfg = recipe if isinstance(recipe, TrainConfig) else read_recipe(recipe, list(overrides))
    name = recipe if isinstance(recipe, (str, Path)) else "recipe"
    card = find_gpu(gpu)
    _check_numbers(count, utilization, price)
    problems = []  # a missing model and missing data are reported together, in one line
    try:
        shapes, n_params, model_how = _model_size(cfg, preset_name, model_config, model_size)
    except CamelidError as exc:
        problems.append(str(exc))
    counts_given = any(v is not None for v in (examples, tokens_per_example, tokens))
    missing = [] if counts_given else [p for p in cfg.data if not Path(p).is_file()]
    if missing:
        problems.append(f"{missing[0]}: no such file, so its tokens cannot be counted; give the counts instead: "
                        "--examples N (with --tokens-per-example T) or --tokens N")
    if problems:
        raise CamelidError("; and ".join(problems))
    if counts_given:
        toks = tokens_from_counts(cfg, count, examples=examples, tokens_per_example=tokens_per_example, tokens=tokens)
    else:
        toks = tokens_from_data(cfg, count, tokenizer)

    lora = 0
    if cfg.method == "lora":
        if shapes is None:
            raise CamelidError("LoRA's adapter size needs the model's shapes: give --preset or a model directory "
                               "instead of --model-size")
        lora = lora_parameters(shapes, cfg.lora_config())
    if shapes is not None:
        params = count_parameters(shapes)
        total, n = params.total, params.matmul
        per_square = shapes.num_hidden_layers * shapes.num_attention_heads * shapes.head_dim  # L·d
    else:
        total = n = round(n_params)
        per_square = 0
    D, S = toks.processed, toks.squares
    flops = Flops(
        weights=float((6 * n * D) if cfg.method == "full" else (4 * n * D + 6 * lora * D)),
        attention=float(12 * per_square * S),
        recompute=float(2 * (n + lora) * D + 4 * per_square * S) if cfg.gradient_checkpointing else 0.0,
        evaluation=float(toks.evaluations * (2 * (n + lora) * toks.eval_processed
                                             + 4 * per_square * toks.eval_squares)),
    )

    shards = count if (cfg.parallel == "fsdp" and count > 1) else 1
    state = BYTES_FULL * total if cfg.method == "full" else BYTES_FROZEN * total + BYTES_FULL * lora
    memory_gb = state / shards / 1e9
    estimate = CostEstimate(recipe=str(name), method=cfg.method, model=model_how, parameters=total, n=n,
                            lora_parameters=lora, tokens=toks, flops=flops, gpu=card, count=count,
                            utilization=utilization, price=price, memory_gb=memory_gb)
    estimate.warnings = _warnings(estimate, cfg, shards)
    estimate.assumptions = _assumptions(estimate, cfg, shapes, shards)
    return estimate


def _check_numbers(count, utilization, price) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise CamelidError(f"--count must be a whole number of GPUs, at least 1, not {count!r}")
    if not 0 < utilization <= 1:
        raise CamelidError(f"--utilization must be above 0 and at most 1 (a share of peak, e.g. 0.2), "
                           f"not {utilization!r}")
    if price is not None and not price >= 0:
        raise CamelidError(f"--price must be 0 or more dollars per GPU-hour, not {price!r}")


def _model_size(cfg, preset_name, model_config, model_size) -> tuple[ModelConfig | None, float | None, str]:
    given = [x for x in (preset_name, model_config, model_size) if x is not None]
    if len(given) > 1:
        raise CamelidError("give the model's size one way: --preset or --model-size, not both")
    if preset_name is not None:
        return preset(preset_name), None, f"{cfg.model}, with the shapes of preset {preset_name} (--preset)"
    if model_config is not None:
        return model_config, None, f"{cfg.model}, with the shapes given"
    if model_size is not None:
        if not model_size >= 1:
            raise CamelidError(f"--model-size must be a parameter count of at least 1, not {model_size:g}")
        return None, float(model_size), f"{cfg.model}, {model_size:,.0f} parameters (--model-size; no shapes)"
    try:
        return read_model_config(cfg.model), None, f"{cfg.model} (its config)"
    except CamelidError as exc:
        raise CamelidError(
            f"the recipe's model is not readable here ({exc}); give its shapes with --preset NAME "
            f"({', '.join(PRESETS)}) or its size with --model-size (e.g. 6.7B)"
        ) from None


def _warnings(est: CostEstimate, cfg, shards: int) -> list[str]:
    out = []
    gpu = est.gpu
    kept = "sharded over the GPUs with FSDP" if shards > 1 else "a whole copy on each GPU"
    if est.memory_gb > gpu.memory_gb:
        if shards > 1:
            fixes = "more GPUs or larger ones"
        elif est.count > 1:  # ddp: a whole copy on each
            fixes = "parallel=fsdp to shard it over the GPUs, or larger GPUs"
        else:
            fixes = "several GPUs with parallel=fsdp, or a larger GPU"
        out.append(
            f"does not fit: weights, gradients and optimizer state need {est.memory_gb:.1f} GB per GPU ({kept}), "
            f"more than the {gpu.memory_gb:g} GB of a {gpu.name}; use {fixes}"
        )
    elif est.memory_gb > 0.8 * gpu.memory_gb:
        out.append(f"tight: weights, gradients and optimizer state take {est.memory_gb:.1f} of the "
                   f"{gpu.memory_gb:g} GB of each GPU, leaving little for activations")
    if not gpu.bf16:
        out.append(f"the {gpu.name} has no bf16 tensor cores; camelid trains with bf16 autocast on CUDA, so it will "
                   "not reach the fp16 peak assumed here")
    return out


def _assumptions(est: CostEstimate, cfg, shapes: ModelConfig | None, shards: int) -> list[str]:
    toks = est.tokens
    out = [f"tokens: {line}" for line in toks.how]
    if shapes is not None:
        out.append(f"N = {est.n:,}: the weights that multiply every token (attention, MLP, head); the input "
                   "embedding is a lookup and the norms are negligible")
        L, d = shapes.num_hidden_layers, shapes.num_attention_heads * shapes.head_dim
        attn = f" + 12·L·d·S (L {L}, d {d}, S = Σ padded row length²)"
    else:
        out.append(f"N = {est.n:,} (--model-size): all of it counted as multiplying every token; no attention term")
        attn = ""
    if cfg.method == "full":
        formula = "6·N·D" + attn
    else:
        targets = ", ".join(cfg.lora_targets)
        formula = f"4·N·D + 6·N_lora·D{attn} (N_lora = {est.lora_parameters:,}: rank {cfg.lora_r} on {targets})"
    if cfg.gradient_checkpointing:
        again = "2·N·D" if cfg.method == "full" else "2·(N + N_lora)·D"
        formula += f", + {again}" + (" + 4·L·d·S" if attn else "") + " for gradient checkpointing"
    out.append(f"FLOPs = {formula}")
    if toks.evaluations:
        passes = "1 pass" if toks.evaluations == 1 else f"{toks.evaluations} passes"
        out.append(f"evaluation: {passes} over the held-out rows, forward only, run by every GPU")
    out.append(f"peak {est.gpu.tflops:g} TFLOP/s per {est.gpu.name} ({'bf16' if est.gpu.bf16 else 'fp16'} tensor, "
               f"dense) at utilisation {est.utilization:g}" +
               (" (the default: Hugging Face Trainer + FSDP in 2023; see `camelid cost --help`)"
                if est.utilization == DEFAULT_UTILIZATION else ""))
    per_param = f"{BYTES_FULL} bytes a parameter" if cfg.method == "full" else \
        f"{BYTES_FROZEN} bytes a frozen parameter, {BYTES_FULL} per adapter weight"
    where = f"sharded over {shards} GPUs (FSDP)" if shards > 1 else "a whole copy on each GPU"
    out.append(f"memory: {per_param}, {where}; activations not included")
    out.append("not counted: loading, checkpoint saving, data preparation, restarts")
    return out


# -- text ---------------------------------------------------------------------------------------------------------


def _si(x: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:g}"


def _amount(x: float) -> str:
    return f"{x:,.2f}" if x >= 0.01 else f"{x:.2g}"


def cost_table(est: CostEstimate) -> str:
    """The estimate as a Markdown table, then its warnings and assumptions."""
    toks, f = est.tokens, est.flops
    method = "full fine-tuning" if est.method == "full" else "LoRA"
    dollars = (f"${est.dollars:,.2f} at ${est.price:,.2f} per GPU-hour" if est.price is not None
               else "give --price (dollars per GPU-hour)")
    tokens = f"{_si(toks.processed)} ({toks.processed:,}; padding included)"
    if toks.real is not None:
        tokens += f", {_si(toks.real)} without padding"
    rows = [
        ("model", est.model),
        ("parameters", f"{_si(est.parameters)} ({est.parameters:,}); N = {_si(est.n)}"
         + (f"; {_si(est.lora_parameters)} trained (LoRA)" if est.method == "lora" else "")),
        ("steps", f"{toks.steps:,} of {toks.batch_size:,} sequences ({toks.rows:,} sequences an epoch)"),
        ("tokens processed", tokens),
        ("training FLOPs", f"{f.training:.3e}" + (f" (incl. {f.recompute:.2e} recomputed)" if f.recompute else "")),
        ("evaluation FLOPs", f"{f.evaluation:.3e} per GPU" if f.evaluation else "none"),
        ("hours", _amount(est.hours)),
        ("GPU-hours", _amount(est.gpu_hours)),
        ("dollars", dollars),
        ("memory per GPU", f"{est.memory_gb:,.1f} GB of {est.gpu.memory_gb:g} GB (weights, gradients, Adam state)"),
    ]
    w = max(len(k) for k, _ in rows)
    v = max(len(x) for _, x in rows)
    lines = [f"{est.recipe}: {method} on {est.count} x {est.gpu.name}", "",
             f"| {'':<{w}} | {'estimate':<{v}} |", f"|:{'-' * (w + 1)}|:{'-' * (v + 1)}|"]
    lines += [f"| {k:<{w}} | {x:<{v}} |" for k, x in rows]
    if est.warnings:
        lines += ["", "warnings:", *[f"- {x}" for x in est.warnings]]
    lines += ["", "assumptions:", *[f"- {x}" for x in est.assumptions]]
    return "\n".join(lines)


def cost_json(est: CostEstimate) -> str:
    return json.dumps(est.to_dict(), indent=2)
