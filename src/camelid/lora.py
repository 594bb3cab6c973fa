"""LoRA: low-rank adapters on a frozen model, merged back for inference, saved as peft saves them.

`apply_lora` swaps chosen linear layers for `LoRALinear`, which adds (alpha / r) * B @ A to the frozen weight
(Hu et al. 2021). Attribute names follow peft's (`q_proj.base_layer`, `q_proj.lora_A`), so an adapter
directory written by `save_adapter` loads in `peft.PeftModel.from_pretrained` and one written by peft for a
LLaMA model loads here with `load_adapter`. Only safetensors files are read, never pickles.

Phi-3's transformers model fuses q/k/v into qkv_proj and gate/up into gate_up_proj, where camelid keeps the
parts apart; its adapters travel as peft's on the fused layers, converted exactly both ways (see _fuse_adapters
and _split_fused_adapters), and an adapter camelid wrote comes back with the parts, ranks and tensors it had.
"""

import contextlib
import json
import math
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from camelid.checkpoint import FUSED_PROJECTIONS, fused_rows
from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.files import atomic_dir, read_json
from camelid.model import Llama

# The linear layers of a block that may carry an adapter, and the module holding each.
TARGET_PARENTS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
# transformers' fused layers (Phi-3) -> camelid's layers that make them up, in the order of their rows.
FUSED_TARGETS = {path.split(".")[1]: parts for path, parts in FUSED_PROJECTIONS.items()}
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's saved keys: the PeftModel's own prefix before the model's names


@dataclass
class LoRAConfig:
    """Rank, scale (alpha / r), dropout on the adapter's input, and which linear layers of every block get one.

    The defaults are the LoRA paper's and FastChat's: rank 8 on the query and value projections. A fused layer's
    name (qkv_proj, gate_up_proj) targets its parts. `rank_pattern` and `alpha_pattern` are peft's, for fused
    layers only: the rank and alpha of each part's adapter where a Phi-3 adapter loaded needs other values than
    r and alpha (see _split_fused_adapters); the parts of a fused layer share them.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise CamelidError(f"LoRA r must be an integer of at least 1, not {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise CamelidError(f"LoRA alpha must be a number above 0, not {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise CamelidError(f"LoRA dropout must be a number from 0 up to (not including) 1, not {self.dropout!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if targets == ("all-linear",):  # peft's name for every linear layer of the blocks (not the head)
            targets = tuple(TARGET_PARENTS)
        targets = tuple(part for t in targets for part in FUSED_TARGETS.get(t, (t,)))
        if not targets:
            raise CamelidError(f"LoRA targets are empty; choose some of: {', '.join(TARGET_PARENTS)}")
        for target in targets:
            if target not in TARGET_PARENTS:
                raise CamelidError(f"unknown LoRA target {target!r}; choose from: {', '.join(TARGET_PARENTS)}")
        self.targets = tuple(dict.fromkeys(targets))  # in the order given, once each
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict) or set(pattern) - set(FUSED_TARGETS):
                raise CamelidError(f"{name} = {json.dumps(pattern)} is not supported: camelid reads it only for "
                                   f"Phi-3's fused layers ({', '.join(FUSED_TARGETS)})")
        bad = [v for v in self.rank_pattern.values() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        bad += [v for v in self.alpha_pattern.values()
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0]
        if bad:
            raise CamelidError(f"LoRA rank_pattern and alpha_pattern must give numbers above 0 (whole ranks), not {bad[0]!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def rank(self, target: str) -> int:
        """The rank of `target`'s adapters: r, or rank_pattern's for the fused layer it is part of."""
        return self.rank_pattern.get(_FUSED_OF.get(target), self.r)

    def alpha_of(self, target: str) -> float:
        """The alpha of `target`'s adapters: alpha, or alpha_pattern's for the fused layer it is part of."""
        return self.alpha_pattern.get(_FUSED_OF.get(target), self.alpha)


_FUSED_OF = {part: fused for fused, parts in FUSED_TARGETS.items() for part in parts}


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = W x + b + (alpha / r) * B A dropout(x).

    B starts at zero, so a new adapter leaves the model's outputs unchanged; A starts as peft's does.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        w = base_layer.weight
        self.base_layer = base_layer.requires_grad_(False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r
        self.disabled = False  # set by adapters_disabled: the layer is then its base alone

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled:
            return self.base_layer(x)
        # The adapter's weights may be kept in float32 while the base is bfloat16 (as peft does for training).
        a, b = self.lora_A.weight, self.lora_B.weight
        p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) and self.training else 0.0
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or x.requires_grad):
            update = _LoRAUpdate.apply(x, a, b, p, self.scaling)
        else:
            update = (x.to(a.dtype) @ a.T) @ b.T * self.scaling
        return self.base_layer(x).add_(update.to(x.dtype))  # in place: the base output is kept by no one

    def merged(self) -> nn.Linear:
        """A plain linear layer computing the same function (without dropout): W + scaling * B @ A, bias kept."""
        base = self.base_layer
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        weight = (base.weight.float() + self.scaling * delta).to(base.weight.dtype)
        with torch.device("meta"):  # no throwaway random initialisation
            merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        merged.weight = nn.Parameter(weight.detach(), requires_grad=base.weight.requires_grad)
        merged.bias = base.bias
        return merged


class _LoRAUpdate(torch.autograd.Function):
    """scaling * dropout(x) @ A.T @ B.T, keeping for backward only x and a one-byte dropout mask.

    nn.Dropout followed by a linear layer would keep the dropped-out copy of x and a mask as large as x; the
    q and v adapters of a block read the same x, which is kept once. Same result, a third of the memory. The
    dropout's 1 / (1 - p) and the scaling are applied to the rank-r products, never to a tensor as wide as x.
    """

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, b: Tensor, p: float, scaling: float) -> Tensor:
        keep = None
        if p > 0:
            keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p)  # one byte each
            h = (x * keep).to(a.dtype) @ a.T * (1 / (1 - p))  # [..., r]
        else:
            h = x.to(a.dtype) @ a.T
        ctx.save_for_backward(x, keep, a, b, h)
        ctx.p, ctx.scaling = p, scaling
        return h @ (b.T * scaling)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, keep, a, b, h = ctx.saved_tensors
        p, scaling = ctx.p, ctx.scaling
        # In the adapter's dtype throughout: under autocast the forward's products (h among them) were bfloat16.
        g = grad.to(b.dtype).reshape(-1, grad.shape[-1])
        grad_h = (g @ b).mul_(scaling)  # [N, r]
        grad_b = (g.T @ h.to(b.dtype).reshape(-1, h.shape[-1])).mul_(scaling) if ctx.needs_input_grad[2] else None
        grad_x = grad_a = None
        if keep is not None:
            grad_h.mul_(1 / (1 - p))
        if ctx.needs_input_grad[1]:
            xin = x if keep is None else x * keep
            grad_a = grad_h.T @ xin.to(a.dtype).reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = (grad_h @ a).view(x.shape)
            if keep is not None:
                grad_x.mul_(keep)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_a, grad_b, None, None


def _check_adaptable(model: Llama) -> None:
    """A one-line refusal unless `model` is a plain model with no adapters yet."""
    if model.lora is not None:
        raise CamelidError("this model already has LoRA adapters; merge them (merge_lora) before adding new ones")
    if model.quantization != "none":
        raise CamelidError(f"LoRA needs a model loaded without --quantize (this one is {model.quantization})")
    for layer in model.model.layers:
        if layer.self_attn.qkv_proj is not None or layer.mlp.gate_up_proj is not None:
            raise CamelidError("this model's projections are stacked for inference; load it again to add LoRA")


def _adapter_shapes(model: Llama, config: LoRAConfig) -> dict[str, tuple[int, int]]:
    """The name and shape of every adapter weight that `config` gives `model` (A is [r, in], B is [out, r])."""
    _check_adaptable(model)
    shapes = {}
    for i, layer in enumerate(model.model.layers):
        for name in config.targets:
            parent = TARGET_PARENTS[name]
            linear = getattr(getattr(layer, parent), name)
            r = config.rank(name)
            shapes[f"model.layers.{i}.{parent}.{name}.lora_A.weight"] = (r, linear.in_features)
            shapes[f"model.layers.{i}.{parent}.{name}.lora_B.weight"] = (linear.out_features, r)
    return shapes


def apply_lora(model: Llama, config: LoRAConfig) -> Llama:
    """Freeze every weight of `model` and give each targeted linear layer a new adapter, in place.

    Afterwards only the adapters' `lora_A`/`lora_B` weights require gradients. The config is kept as `model.lora`.
    """
    _check_adaptable(model)
    slots = [(getattr(layer, TARGET_PARENTS[name]), name) for layer in model.model.layers for name in config.targets]
    for parent, name in slots:
        if type(getattr(parent, name)) is not nn.Linear:
            kind = type(getattr(parent, name)).__name__
            raise CamelidError(f"cannot add LoRA to {name}: it is a {kind}, not a plain linear layer")
    model.requires_grad_(False)
    for parent, name in slots:
        adapter = LoRALinear(getattr(parent, name), config.rank(name), config.alpha_of(name), config.dropout)
        setattr(parent, name, adapter.train(model.training))  # new modules start in training mode
    model.lora = config
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block, every adapter of `model` is switched off: the model computes its base, with no second
    copy of the weights (preference tuning's reference model, as peft's `disable_adapter`)."""
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for adapter in adapters:
        adapter.disabled = True
    try:
        yield model
    finally:
        for adapter in adapters:
            adapter.disabled = False


def merge_lora(model: Llama) -> Llama:
    """Fold every adapter into its linear layer, in place: the model becomes a plain one, as fast as the base."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, module.merged())
    model.lora = None
    return model


# -- adapter directories (peft's format) ----------------------------------------------------------------------


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is an adapter directory (it has an adapter_config.json) rather than a full model."""
    return (Path(path) / CONFIG_FILE).is_file()


def save_adapter(
    model: Llama,
    out_dir: str | Path,
    *,
    base_model: str,
    tokenizer=None,
    chat_template: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapters of `model` as peft does, atomically: adapter_config.json and adapter_model.safetensors.

    `base_model` (a camelid model name, or the base's directory, relative to the adapter directory or absolute)
    is recorded so that `load_model(out_dir)` finds the base. A tokenizer and chat template given are saved too,
    so the directory carries the template the adapter was trained with.
    """
    config = model.lora
    if config is None:
        raise CamelidError("this model has no LoRA adapters to save; apply_lora first (or save_model a full model)")
    weights = {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}
    return write_adapter(weights, config, out_dir, base_model=base_model, model_config=model.config,
                         tokenizer=tokenizer, chat_template=chat_template, overwrite=overwrite)


def write_adapter(
    weights: dict[str, Tensor],
    config: LoRAConfig,
    out_dir: str | Path,
    *,
    base_model: str,
    model_config: ModelConfig,
    tokenizer=None,
    chat_template: str | None = None,
    overwrite: bool = False,
) -> Path:
    """An adapter directory from adapter weights under the model's names (`model.layers.0...lora_A.weight`).

    `model_config` is the base's, and required: for a family whose layers transformers fuses (Phi-3), the
    adapters are written as peft's on the fused layers, so that peft loads them on transformers' model.
    """
    from safetensors.torch import save_file

    weights, patterns = dict(weights), {"rank_pattern": {}, "alpha_pattern": {}}
    if model_config.fused_projections:
        weights, patterns = _fuse_adapters(weights, config, model_config)
    tensors = {f"{PEFT_PREFIX}{name}": v.detach().contiguous().cpu() for name, v in weights.items()}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        peft_config = _peft_config(config, str(base_model), **patterns)
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        shutil.copymode(tmp / CONFIG_FILE, tmp / WEIGHTS_FILE)  # safetensors writes it 0600
        if tokenizer is not None:
            tokenizer.save(tmp, chat_template=chat_template)
    return Path(out_dir)


def _fuse_adapters(weights: dict[str, Tensor], config: LoRAConfig, model_config: ModelConfig):
    """Adapters on camelid's parts as peft's on transformers' fused layers, exactly: the parts' A stacked and
    their B block-diagonal (a part not adapted gets zero rows), so a fused adapter's rank is r times the parts
    adapted, and its alpha as many times alpha to keep the scale. (weights, peft's rank_pattern and alpha_pattern).
    _split_fused_adapters reads this layout back as it was."""
    rows = fused_rows(model_config)
    ranks, alphas = {}, {}
    for path, parts in FUSED_PROJECTIONS.items():
        parent, fused = path.split(".")
        adapted = [p for p in parts if p in config.targets]
        if not adapted:
            continue
        r = config.rank(adapted[0])  # the parts of a fused layer share its rank and alpha
        ranks[fused], alphas[fused] = r * len(adapted), config.alpha_of(adapted[0]) * len(adapted)
        for i in range(model_config.num_hidden_layers):
            prefix = f"model.layers.{i}.{parent}."
            a = [weights.pop(f"{prefix}{p}.lora_A.weight") for p in adapted]
            b = {p: weights.pop(f"{prefix}{p}.lora_B.weight") for p in adapted}
            block = b[adapted[0]].new_zeros(sum(rows[path]), ranks[fused])  # [out of all parts, r x parts adapted]
            row = 0
            for part, n in zip(parts, rows[path]):
                if part in b:
                    col = adapted.index(part) * r
                    block[row : row + n, col : col + r] = b[part]
                row += n
            weights[f"{prefix}{fused}.lora_A.weight"] = torch.cat(a)
            weights[f"{prefix}{fused}.lora_B.weight"] = block
    return weights, {"rank_pattern": ranks, "alpha_pattern": alphas}


def _peft_config(config: LoRAConfig, base_model: str, rank_pattern: dict, alpha_pattern: dict) -> dict:
    """adapter_config.json as peft writes it; options left out take peft's defaults when peft reads it."""
    # a part written into its fused layer (which rank_pattern then names) is targeted by the fused layer's name
    targets = dict.fromkeys(_FUSED_OF[t] if _FUSED_OF.get(t) in rank_pattern else t for t in config.targets)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
    }


# peft options that change what an adapter computes or which layers it covers; each is supported only when
# absent or at its plain value (None, False, "none", empty). (rank_pattern and alpha_pattern are read for fused
# layers: see LoRAConfig.)
UNSUPPORTED_OPTIONS = (
    "bias", "fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "use_qalora", "use_bdlora", "modules_to_save",
    "layers_to_transform", "layers_pattern", "exclude_modules", "layer_replication",
    "trainable_token_indices", "target_parameters", "alora_invocation_tokens", "arrow_config", "megatron_config",
)
# Initialisations that only choose A and B; the others (PiSSA, OLoRA, LoftQ, ...) also change the base weights.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def read_adapter_config(directory: str | Path) -> tuple[LoRAConfig, dict]:
    """The LoRA settings of an adapter directory and its whole adapter_config.json, or a one-line refusal."""
    path = Path(directory) / CONFIG_FILE
    raw = read_json(path, "adapter config")
    if not isinstance(raw, dict):
        raise CamelidError(f"{path}: expected a JSON object; repair or replace the file")
    if raw.get("peft_type") != "LORA":
        raise CamelidError(f"{path}: peft_type is {raw.get('peft_type')!r}; camelid loads only LoRA adapters")
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise CamelidError(f"{path}: task_type is {raw['task_type']!r}; camelid loads only CAUSAL_LM adapters")
    for key in UNSUPPORTED_OPTIONS:
        if raw.get(key) not in (None, False, "none", {}, []):
            raise CamelidError(f"{path}: {key} = {json.dumps(raw[key])} is not supported; train the adapter without it")
    if raw.get("init_lora_weights", True) not in PLAIN_INITS:
        raise CamelidError(
            f"{path}: init_lora_weights {raw['init_lora_weights']!r} changes the base weights, which camelid does "
            "not support; save it with peft's path_initial_model_for_weight_conversion to get a plain LoRA adapter"
        )
    targets = raw.get("target_modules")
    if targets == "all-linear":  # peft's shorthand: every linear layer but the output head
        targets = list(TARGET_PARENTS)
    elif isinstance(targets, str):
        raise CamelidError(
            f"{path}: target_modules is the pattern {targets!r}, which camelid does not read; "
            f"list the module names instead (from: {', '.join(TARGET_PARENTS)})"
        )
    elif not isinstance(targets, list):
        raise CamelidError(f"{path}: target_modules must be a list of module names, not {targets!r}")
    # peft matches names by suffix and may save full ones ("model.layers.0.mlp.up_proj"); the layer name is what
    # counts here, and load_adapter refuses a file that lacks some layer's tensors.
    targets = [t.rpartition(".")[2] if isinstance(t, str) else t for t in targets]
    try:
        config = LoRAConfig(
            r=raw.get("r", 8), alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0), targets=targets,
            rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {},
        )
    except CamelidError as exc:
        raise CamelidError(f"{path}: {exc}") from None
    config.targets = tuple(t for t in TARGET_PARENTS if t in config.targets)  # peft saves them in any order
    return config, raw


def _our_name(key: str) -> str:
    """A saved peft key as this model's parameter name: without peft's prefix and any adapter name.

    base_model.model.model.layers.0.self_attn.q_proj.lora_A[.default].weight -> model.layers.0...lora_A.weight
    """
    key = key.removeprefix(PEFT_PREFIX)
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)


def _weights_file(directory: Path) -> Path:
    """The adapter's safetensors file, or a one-line refusal (a pickle is never opened)."""
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [p.name for p in directory.glob("adapter_model*.bin")] + [p.name for p in directory.glob("*.pt")]
        if pickles:
            raise CamelidError(
                f"{directory}: the adapter is only in a pickle file ({pickles[0]}), which camelid never loads; "
                "save it again with peft's save_pretrained(safe_serialization=True)"
            )
        raise CamelidError(f"{directory}: no {WEIGHTS_FILE} in this adapter directory")
    return weights


def load_adapter(model: Llama, directory: str | Path) -> Llama:
    """Add the adapters saved in `directory` (by camelid or peft) to `model`, in place; see `merge_lora`."""
    config, saved = read_adapter(model, directory)
    apply_lora(model, config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    return model


def read_adapter(model: Llama, directory: str | Path) -> tuple[LoRAConfig, dict[str, Tensor]]:
    """The LoRA settings and weights (under `model`'s names) saved in `directory`, checked to fit `model`: a
    one-line refusal naming the first tensor that does not."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config, _ = read_adapter_config(directory)
    weights = _weights_file(directory)
    try:
        saved = {_our_name(k): v for k, v in load_file(weights).items()}
    except (SafetensorError, OSError) as exc:
        raise CamelidError(f"{weights}: unreadable safetensors file ({exc}); is it truncated?") from None
    try:
        saved, config = _split_fused_adapters(saved, config, model.config)
    except CamelidError as exc:
        raise CamelidError(f"{weights}: {exc}; was the adapter trained on another base model?") from None

    expected = _adapter_shapes(model, config)
    missing, unknown = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if unknown or missing:
        what = f"unexpected tensor {PEFT_PREFIX}{unknown[0]}" if unknown else f"no tensor for {missing[0]}"
        raise CamelidError(
            f"{weights}: {what} ({len(unknown)} unexpected, {len(missing)} missing); "
            f"its adapter_config.json says r={config.r} on {', '.join(config.targets)} of every layer"
        )
    for name, shape in expected.items():
        if tuple(saved[name].shape) != shape:
            raise CamelidError(
                f"{weights}: tensor {name} has shape {tuple(saved[name].shape)}, this model needs {shape}; "
                "was the adapter trained on another base model?"
            )
    return config, saved


def _split_fused_adapters(
    saved: dict[str, Tensor], config: LoRAConfig, model_config: ModelConfig
) -> tuple[dict[str, Tensor], LoRAConfig]:
    """peft's adapters on transformers' fused layers as adapters on camelid's parts, exactly, and the config that
    describes them: each part adapted takes some rows of the fused A and the same columns of its own rows of B
    (which parts, and which columns: _part_columns). The parts of a fused layer share one rank, the columns kept;
    its alpha is the fused alpha times kept / fused rank, so that the scale alpha / rank stays the fused one."""
    if not model_config.fused_projections:
        return saved, config
    rows, out = fused_rows(model_config), dict(saved)
    targets, ranks, alphas = list(config.targets), dict(config.rank_pattern), dict(config.alpha_pattern)
    for path, parts in FUSED_PROJECTIONS.items():
        parent, fused = path.split(".")
        prefixes = [f"model.layers.{i}.{parent}" for i in range(model_config.num_hidden_layers)]
        layers = {p: (out.pop(f"{p}.{fused}.lora_A.weight"), out.pop(f"{p}.{fused}.lora_B.weight"))
                  for p in prefixes if f"{p}.{fused}.lora_A.weight" in out and f"{p}.{fused}.lora_B.weight" in out}
        for prefix, (_, b) in layers.items():
            if b.ndim != 2 or b.shape[0] != sum(rows[path]):
                raise CamelidError(f"tensor {prefix}.{fused}.lora_B.weight has {b.shape[0]} rows, the config "
                                   f"implies {sum(rows[path])}")
        if not layers:
            continue
        rank = config.rank(parts[0])
        if set(parts) <= set(config.targets) and all(a.shape[0] == b.shape[1] == rank for a, b in layers.values()):
            cols = _part_columns([b.split(rows[path]) for _, b in layers.values()], parts, rank, config)
            width, alpha = len(next(iter(cols.values()))), config.alpha_of(parts[0])
            alpha = alpha if width == rank else alpha * width / rank
            targets = [t for t in targets if t not in parts or t in cols]
            ranks.pop(fused, None)
            alphas.pop(fused, None)
            if width != config.r or not math.isclose(alpha, config.alpha):  # else the plain r and alpha say it
                ranks[fused], alphas[fused] = width, alpha
        else:  # shapes that are not this config's: A kept whole, for load_adapter to name what is wrong
            cols = dict.fromkeys(parts)
        for prefix, (a, b) in layers.items():
            for part, piece in zip(parts, b.split(rows[path])):
                if part in cols:
                    index = slice(None) if cols[part] is None else torch.tensor(cols[part], dtype=torch.long)
                    out[f"{prefix}.{part}.lora_A.weight"] = a[index]
                    out[f"{prefix}.{part}.lora_B.weight"] = piece[:, index]
    return out, replace(config, targets=tuple(targets), rank_pattern=ranks, alpha_pattern=alphas)


def _part_columns(b_parts: list[tuple[Tensor, ...]], parts: tuple[str, ...], rank: int, config: LoRAConfig):
    """Which parts a fused layer's adapter of `rank` adapts, and the columns of B (rows of A) each keeps, given
    each layer's B cut into the parts' rows: {part: [column, ...]}, every list as long.

    A part keeps the columns where its rows of B are nonzero in some layer; one whose rows are zero in every layer
    is not adapted (so an adapter camelid wrote for q and v comes back without k). The parts share one rank, so
    one with fewer columns than another gets some more of those where its B is zero (the update is unchanged).
    camelid's block-diagonal layout so comes back as the per-part adapters it was made from; peft's adapters,
    trained on the whole fused layer, use every column in every part and keep them all.
    An untrained adapter (B zero everywhere) tells nothing by its B: where its ranks are camelid's (fused rank
    r x k and alpha x k, k parts) it comes back as the first k parts, each with its own r columns, which writes
    the same file again; else as every part with every column, as its config says."""
    used = [torch.stack([b[j].ne(0).any(0) for b in b_parts]).any(0) for j in range(len(parts))]  # [rank] each
    cols = {part: u.nonzero().flatten().tolist() for part, u in zip(parts, used) if u.any()}
    if cols:
        width = max(len(c) for c in cols.values())
        return {part: sorted(c + [i for i in range(rank) if i not in c][: width - len(c)]) for part, c in cols.items()}
    k, fused = rank // config.r, _FUSED_OF[parts[0]]
    if fused in config.rank_pattern and rank == k * config.r and k <= len(parts) and \
            math.isclose(config.alpha_of(parts[0]), k * config.alpha):
        return {part: list(range(j * config.r, (j + 1) * config.r)) for j, part in enumerate(parts[:k])}
    return {part: list(range(rank)) for part in parts}


def adapter_base(directory: str | Path) -> str:
    """The base model an adapter directory names, as a path that exists or a camelid model name.

    A relative path is resolved against the adapter directory first (so "../base" still works when the two
    move together), then against the current directory.
    """
    from camelid.named_models import NAMED_MODELS

    directory = Path(directory)
    _, raw = read_adapter_config(directory)
    _weights_file(directory)  # the adapter's own problems first, before the (slow) base is looked for
    base = raw.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise CamelidError(
            f"{directory / CONFIG_FILE}: no base_model_name_or_path; set it to the base model's name or directory"
        )
    candidates = [Path(base)] if Path(base).is_absolute() else [directory / base, Path.cwd() / base]
    for candidate in candidates:
        if candidate.exists():
            if candidate.resolve() == directory.resolve():
                raise CamelidError(f"{directory}: base_model_name_or_path names the adapter itself; name its base")
            return str(candidate)
    if base.lower() in NAMED_MODELS:
        return base
    raise CamelidError(
        f"adapter {directory} needs its base model {base!r}, which is neither at "
        f"{' nor '.join(str(c) for c in candidates)} nor a camelid model name; put the base there "
        "or set base_model_name_or_path in adapter_config.json to its directory"
    )
