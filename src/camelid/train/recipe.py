"""A training run's settings: a typed dataclass, read from a recipe YAML and `key=value` overrides.

Recipes in `recipes/` name whole runs (Alpaca, Vicuna, Koala, GPT4All, a CPU quickstart); every key of the
YAML is a field below, and an unknown key is an error that lists the known ones.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from camelid.errors import CamelidError

METHODS = ("lora", "full")
PARALLEL = ("ddp", "fsdp")
OBJECTIVES = ("sft", "dpo", "simpo", "orpo", "kto")
PAIRED = ("dpo", "simpo", "orpo")  # the objectives that learn from chosen/rejected pairs
# beta's default per objective: TRL's for DPO, ORPO and KTO; SimPO's paper tunes 2.0-2.5 (TRL's CPO has 0.1).
BETA = {"dpo": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}
# The keys that only some objectives read, and their defaults (TRL's). Set for another objective, they are refused.
OBJECTIVE_KEYS = {
    "beta": (("dpo", "simpo", "orpo", "kto"), None),
    "label_smoothing": (("dpo", "simpo"), 0.0),
    "simpo_gamma": (("simpo",), 0.5),
    "desirable_weight": (("kto",), 1.0),
    "undesirable_weight": (("kto",), 1.0),
    "max_prompt_len": (("dpo", "simpo", "orpo", "kto"), None),
}


@dataclass(frozen=True)
class Preference:
    """The settings of a preference objective, with their defaults filled in (see HELP)."""

    objective: str
    beta: float
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    max_prompt_len: int | None = None


@dataclass
class TrainConfig:
    """Everything a training run depends on; each key is explained in HELP (and by `camelid train --help`)."""

    model: str
    data: list[str]
    out: str
    template: str | None = None
    method: str = "lora"
    objective: str = "sft"
    beta: float | None = None
    label_smoothing: float | None = None
    simpo_gamma: float | None = None
    desirable_weight: float | None = None
    undesirable_weight: float | None = None
    max_prompt_len: int | None = None
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    seq_len: int = 2048
    packing: bool = True
    overflow: str = "truncate"
    batch_size: int = 128
    micro_batch_size: int = 4
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float = 2e-5
    min_lr_ratio: float = 0.0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    eval_fraction: float = 0.0
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 42
    skip_bad: bool = False
    data_format: str | None = None
    columns: list[str] = field(default_factory=list)
    data_workers: int | None = None
    device: str | None = None
    parallel: str = "ddp"
    source: str = ""
    notes: str = ""

    def __post_init__(self):
        if isinstance(self.data, str):
            self.data = [self.data]
        checks = [
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}, not {self.method!r}"),
            (self.objective in OBJECTIVES,
             f"objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}"),
            (self.parallel in PARALLEL, f"parallel must be one of {', '.join(PARALLEL)}, not {self.parallel!r}"),
            (self.overflow in ("truncate", "drop"), f"overflow must be truncate or drop, not {self.overflow!r}"),
            (bool(self.data), "data is empty; give at least one dataset file"),
            (self.seq_len >= 8, f"seq_len must be at least 8, not {self.seq_len}"),
            (self.micro_batch_size >= 1, f"micro_batch_size must be at least 1, not {self.micro_batch_size}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, not {self.batch_size}"),
            (self.epochs > 0 or self.max_steps, "epochs must be above 0 (or set max_steps)"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be at least 1, not {self.max_steps}"),
            (self.lr > 0, f"lr must be above 0, not {self.lr}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be between 0 and 1, not {self.min_lr_ratio}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be from 0 up to 1, not {self.warmup_ratio}"),
            (0 <= self.eval_fraction < 1, f"eval_fraction must be from 0 up to 1, not {self.eval_fraction}"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be 0 or more, not {self.max_grad_norm}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be at least 1, not {self.keep_checkpoints}"),
            (min(self.eval_every, self.save_every) >= 0, "eval_every and save_every must be 0 or more"),
            (self.data_workers is None or self.data_workers >= 1, "data_workers must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise CamelidError(message)
        self._check_objective_keys()
        from camelid.chat_template import BUILTIN_TEMPLATES

        if self.template is not None and self.template not in BUILTIN_TEMPLATES:
            raise CamelidError(
                f"unknown template {self.template!r}; choose one of {', '.join(BUILTIN_TEMPLATES)} (or none for the model's own)"
            )
        if self.method == "lora":
            self.lora_config()  # validates rank, alpha, dropout and targets
        from camelid.data.formats import Reading, parse_columns

        Reading(self.data_format, parse_columns(",".join(self.columns)))  # validates the format and the columns

    def _check_objective_keys(self) -> None:
        for key, (objectives, _) in OBJECTIVE_KEYS.items():
            if getattr(self, key) is not None and self.objective not in objectives:
                raise CamelidError(f"{key} applies to objective {' or '.join(objectives)}, not {self.objective}; "
                                   f"remove it or set objective")
        if self.objective == "sft":
            return
        p = self.preference()
        checks = [
            (p.beta > 0, f"beta must be above 0, not {p.beta}"),
            (0 <= p.label_smoothing < 0.5, f"label_smoothing must be from 0 up to 0.5, not {p.label_smoothing}"),
            (min(p.desirable_weight, p.undesirable_weight) > 0, "desirable_weight and undesirable_weight must be above 0"),
            (p.max_prompt_len is None or 1 <= p.max_prompt_len < self.seq_len,
             f"max_prompt_len must be from 1 up to seq_len ({self.seq_len}), not {p.max_prompt_len}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CamelidError(message)

    def preference(self) -> Preference | None:
        """The preference objective's settings with defaults filled in; None for supervised fine-tuning."""
        if self.objective == "sft":
            return None
        values = {k: getattr(self, k) for k, (objectives, _) in OBJECTIVE_KEYS.items()
                  if self.objective in objectives and getattr(self, k) is not None}
        return Preference(self.objective, **({"beta": BETA[self.objective]} | values))

    def lora_config(self):
        from camelid.lora import LoRAConfig

        return LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=tuple(self.lora_targets))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


HELP = {
    "model": 'MODEL to start from: a name from `camelid models`, a GGUF file, an HF directory, an adapter',
    "data": 'data sources: JSON/JSONL (also .gz, .zst), Parquet, Arrow, CSV files, datasets folders (PATH:SPLIT), '
            'hf:ORG/NAME; any format of `camelid data --help`, told by its keys',
    "out": 'the run directory: checkpoints, metrics, loss curve, and the final model in OUT/model',
    "template": "a built-in chat template (alpaca, vicuna_v1.1, koala_v1, chatml, llama-2); empty = the model's own",
    "method": 'lora (train low-rank adapters on a frozen model) or full (train every weight)',
    "objective": "what is learned: sft (the answers of conversations), dpo, simpo, orpo (chosen over rejected "
                 "answers of preference pairs) or kto (answers labelled desirable or not)",
    "beta": "preference strength: DPO's and KTO's KL weight (default 0.1), SimPO's reward scale (2.0), ORPO's "
            "odds-ratio weight lambda (0.1)",
    "label_smoothing": "dpo, simpo: the assumed share of pairs whose labels are flipped (conservative DPO), 0 up to 0.5",
    "simpo_gamma": "simpo: the target reward margin gamma (default 0.5)",
    "desirable_weight": "kto: weight of the desirable answers' losses (default 1)",
    "undesirable_weight": "kto: weight of the undesirable answers' losses (default 1)",
    "max_prompt_len": "preference objectives: a longer prompt keeps its last max_prompt_len tokens (default: "
                      "only seq_len limits prompt + answer)",
    "lora_r": 'LoRA rank',
    "lora_alpha": 'LoRA scale numerator: updates are scaled by alpha / r',
    "lora_dropout": "dropout on each adapter's input",
    "lora_targets": "linear layers of every block that get an adapter (comma-separated on the command line; "
                    "all-linear: all seven)",
    "seq_len": 'tokens per training sequence (preference objectives: per prompt + answer; a row holds a prompt once '
               'and both its answers, up to 2 x seq_len)',
    "packing": 'pack short examples into one sequence (else one example per row, grouped by length)',
    "overflow": 'what to do with a conversation longer than seq_len: truncate | drop',
    "batch_size": 'sequences per optimizer step, all processes together',
    "micro_batch_size": 'sequences per forward pass in each process (gradient accumulation makes up the rest)',
    "epochs": 'passes over the training sequences',
    "max_steps": 'stop after this many optimizer steps (overrides epochs)',
    "lr": 'peak learning rate (AdamW)',
    "min_lr_ratio": 'the cosine schedule ends at lr * min_lr_ratio',
    "warmup_ratio": 'share of the steps spent warming up linearly from 0',
    "weight_decay": 'AdamW decoupled weight decay (not on norms and biases)',
    "adam_beta1": 'AdamW beta1',
    "adam_beta2": 'AdamW beta2',
    "adam_eps": 'AdamW epsilon',
    "max_grad_norm": 'clip the global gradient norm to this (0 = no clipping)',
    "gradient_checkpointing": "recompute each block's activations in backward: less memory, ~30% slower",
    "eval_fraction": 'share of the conversations held out for the evaluation loss',
    "eval_every": 'steps between held-out evaluations (0 = only at the end)',
    "save_every": 'steps between checkpoints (0 = only at the end)',
    "keep_checkpoints": 'how many step checkpoints to keep (the newest)',
    "seed": 'seeds the held-out split, packing order, data order and initialisation',
    "skip_bad": 'drop malformed dataset records (counted and reported) instead of stopping',
    "data_format": 'read every record in this format instead of telling it by its keys (see `camelid data --help`)',
    "columns": "rename the data's columns to the keys a format reads: instruction=question,output=answer",
    "data_workers": 'processes that tokenize the data (default: up to 8 from 20,000 conversations, else 1)',
    "device": 'cpu | cuda | cuda:N; default: cuda when there is one (each process its own under torchrun)',
    "parallel": 'how several processes share the work under torchrun: ddp | fsdp',
    "source": "where the recipe's settings come from (documentation only)",
    "notes": 'anything else a reader should know (documentation only)',
}

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Keys that may differ between a run and its resumption (they do not change what is computed).
RESUMABLE_KEYS = {"save_every", "keep_checkpoints", "eval_every", "notes", "source", "device", "data_workers"}


def _field_type(name: str):
    hint = typing.get_type_hints(TrainConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return args[0], True
    return hint, False


def _coerce(name: str, value):
    """A YAML or command-line value as the field's type, or a one-line error naming the key."""
    kind, optional = _field_type(name)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none", "")):
        if optional:
            return None
        raise CamelidError(f"recipe key {name!r} needs a value")
    origin = typing.get_origin(kind)
    try:
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
                raise ValueError
            return [str(v) for v in value]
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)  # also takes YAML's "2e-5", which YAML 1.1 reads as a string
        if kind is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    label = f"a list of {typing.get_args(kind)[0].__name__}" if origin is list else f"a {kind.__name__}"
    raise CamelidError(f"recipe key {name!r} must be {label}, not {value!r}")


def _unknown(keys) -> CamelidError:
    names = ", ".join(sorted(keys))
    return CamelidError(f"unknown recipe key(s): {names}; known keys: {', '.join(FIELDS)}")


def build_config(values: dict, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from a mapping (a parsed recipe) and `key=value` strings that take precedence."""
    values = dict(values)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CamelidError(f"override {item!r} is not key=value (e.g. lr=1e-4)")
        values[key.strip()] = value.strip()
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise _unknown(unknown)
    missing = [name for name in ("model", "data", "out") if values.get(name) in (None, "", [])]
    if missing:
        raise CamelidError(f"the recipe does not say {', '.join(missing)}; add it to the YAML or pass {missing[0]}=...")
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


def read_recipe(spec: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """A recipe by file path or by name (`alpaca` → recipes/alpaca.yaml), with overrides applied."""
    import yaml

    path = find_recipe(spec)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CamelidError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise CamelidError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise CamelidError(f"{path}: a recipe must be a YAML mapping of key: value")
    return build_config(values, overrides)


def recipe_dirs() -> list[Path]:
    """Where named recipes are looked up: ./recipes, then the recipes beside the package's source tree."""
    here = Path(__file__).resolve().parents[3] / "recipes"
    return [Path("recipes"), here]


def find_recipe(spec: str | Path) -> Path:
    path = Path(spec)
    if path.is_file():
        return path
    if path.suffix not in (".yaml", ".yml") and "/" not in str(spec):
        for directory in recipe_dirs():
            candidate = directory / f"{spec}.yaml"
            if candidate.is_file():
                return candidate
        names = sorted({p.stem for d in recipe_dirs() if d.is_dir() for p in d.glob("*.yaml")})
        raise CamelidError(f"no recipe named {spec!r}; known recipes: {', '.join(names) or 'none found'}")
    raise CamelidError(f"{spec}: no such recipe file")
