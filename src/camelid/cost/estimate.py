"""The estimate of `camelid cost`: time, GPU-hours, dollars and memory of a recipe, and its table and JSON.

The method, and the published figures behind the default utilisation, are in the package docstring
(camelid.cost); the FLOP formulas in camelid.cost.flops, the token counts in camelid.cost.tokens.
"""

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from camelid.config import PRESETS, ModelConfig, preset
from camelid.cost.flops import Flops, attention_width, count_parameters, lora_parameters, run_flops
from camelid.cost.gpus import GPU, find_gpu
from camelid.cost.tokens import Tokens, tokens_from_counts, tokens_from_data
from camelid.data.sources import source_exists
from camelid.errors import CamelidError

DEFAULT_UTILIZATION = 0.20  # the 2023 stack's share of peak; the package docstring gives the published figures
BYTES_FULL = 16  # float32 weight + float32 gradient + Adam's two float32 moments
BYTES_FROZEN = 2  # a frozen base weight in bf16 (LoRA on a GPU)


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
    `tokens_per_example` / `tokens` when any is given, else from the recipe's data files (see
    camelid.cost.tokens).
    """
    from camelid.train.recipe import TrainConfig, read_recipe

    cfg = recipe if isinstance(recipe, TrainConfig) else read_recipe(recipe, list(overrides))
    name = recipe if isinstance(recipe, (str, Path)) else "recipe"
    card = find_gpu(gpu)
    _check_numbers(count, utilization, price)
    counts = dict(examples=examples, tokens_per_example=tokens_per_example, tokens=tokens)
    shapes, n_params, model_how = _model_and_data(cfg, preset_name, model_config, model_size, counts)
    if any(v is not None for v in counts.values()):
        toks = tokens_from_counts(cfg, count, **counts)
    else:
        toks = tokens_from_data(cfg, count, tokenizer)

    total, n, lora = _parameters(cfg, shapes, n_params)
    flops = run_flops(toks, n=n, n_lora=lora, width=attention_width(shapes) if shapes is not None else 0,
                      lora=cfg.method == "lora", checkpointing=cfg.gradient_checkpointing)
    shards = count if (cfg.parallel == "fsdp" and count > 1) else 1
    state = BYTES_FULL * total if cfg.method == "full" else BYTES_FROZEN * total + BYTES_FULL * lora
    estimate = CostEstimate(recipe=str(name), method=cfg.method, model=model_how, parameters=total, n=n,
                            lora_parameters=lora, tokens=toks, flops=flops, gpu=card, count=count,
                            utilization=utilization, price=price, memory_gb=state / shards / 1e9)
    estimate.warnings = _warnings(estimate, cfg, shards)
    estimate.assumptions = _assumptions(estimate, cfg, shapes, shards)
    return estimate


def _model_and_data(cfg, preset_name, model_config, model_size, counts: dict):
    """The model's shapes or size, checked together with the data: a missing model and missing data are reported
    in one line."""
    problems = []
    try:
        shapes, n_params, model_how = _model_size(cfg, preset_name, model_config, model_size)
    except CamelidError as exc:
        problems.append(str(exc))
    counts_given = any(v is not None for v in counts.values())
    missing = [] if counts_given else [p for p in cfg.data if not source_exists(p)]
    if missing:
        problems.append(f"{missing[0]}: no such file, so its tokens cannot be counted; give the counts instead: "
                        "--examples N (with --tokens-per-example T) or --tokens N")
    if problems:
        raise CamelidError("; and ".join(problems))
    return shapes, n_params, model_how


def _parameters(cfg, shapes: ModelConfig | None, n_params: float | None) -> tuple[int, int, int]:
    """(all parameters, N, N_lora) of the model, from its shapes or from a bare size."""
    lora = 0
    if cfg.method == "lora":
        if shapes is None:
            raise CamelidError("LoRA's adapter size needs the model's shapes: give --preset or a model directory "
                               "instead of --model-size")
        lora = lora_parameters(shapes, cfg.lora_config())
    if shapes is None:
        return round(n_params), round(n_params), lora
    params = count_parameters(shapes)
    return params.total, params.matmul, lora


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
