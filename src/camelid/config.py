"""The model configuration: one dataclass, named presets, and the Hugging Face `config.json` it is stored as.

Field names are those of transformers' configs (`LlamaConfig`, `Qwen2Config`, ...), so a camelid checkpoint
directory is an HF directory and a user who knows one knows the other. The families differ in a few switches of
the one decoder (camelid.model); `model_type` says which, and the properties below derive the switches from it
as transformers' model code does.
"""

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError
from camelid.files import read_json, write_atomic

# model_type -> the architecture transformers names in config.json.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "phi3": "Phi3ForCausalLM"}
# The activation of the gated MLP, by transformers' name: SwiGLU, or GeGLU with the tanh approximation (Gemma).
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' names for what each layer attends to
ROPE_TYPES = ("default", "linear", "llama3")
ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

# The precisions a model's weights are loaded in and written as, by name. They live here, free of torch, so that
# `camelid --help` lists them without loading it (camelid.checkpoint maps the names to torch's dtypes).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "f16", "int8", "int4")  # how camelid.quantize stores the linear weights for decoding
# The largest each size may be, far above released models' (vocabulary 262,144, width 16,384, MLP 53,248,
# 126 layers, 128 heads, head_dim 256, 10M positions), so that a damaged or hostile config.json or GGUF file
# cannot make camelid build a billion layers before its tensors are looked at.
SIZE_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18,
               "num_hidden_layers": 1 << 10, "num_attention_heads": 1 << 10, "num_key_value_heads": 1 << 10,
               "head_dim": 1 << 12, "max_position_embeddings": 1 << 26}
# What `camelid export gguf --type` offers: the types the `gguf` package quantizes in Python bit for bit as ggml's
# reference code does, and llama.cpp's K-quant mixes (camelid.kquants writes their blocks; each mix gives some
# tensors more bits, as llama-quantize does).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1",
              "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (multi-head attention)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, {"rope_type": "linear", "factor": f}, or {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} as in transformers.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # Keys a query sees at most in sliding-window layers, itself included: every layer of Mistral v0.1, the
    # layers that `layer_types` marks "sliding_attention" where it is given.
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer, one of LAYER_TYPES; None: all alike
    no_rope_layers: list[int] | None = None  # SmolLM3: per layer, 1 with the rotary embedding, 0 without (NoPE)
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None  # kept so that config.json round-trips (some families' defaults do not fit)
    hidden_act: str = "silu"  # one of ACTIVATIONS (Gemma's config.json calls it hidden_activation)
    # Gemma 3: the rope base of its sliding-window layers (its global layers use rope_theta and rope_scaling), and
    # the number whose inverse square root scales attention scores (None: head_dim, as everywhere else).
    rope_local_base_freq: float | None = None
    query_pre_attn_scalar: float | None = None
    model_type: str = "llama"  # a key of ARCHITECTURES: which family's switches the decoder takes

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            supported = ", ".join(ARCHITECTURES)
            raise CamelidError(f"model_type {self.model_type!r} is not supported (supported: {supported})")
        # A config comes with a downloaded model: every size is checked before anything is built from it.
        for name, most in SIZE_LIMITS.items():
            value = getattr(self, name)
            if value is None and name in ("num_key_value_heads", "head_dim"):
                continue
            if type(value) is not int or not 1 <= value <= most:
                raise CamelidError(f"config {name} must be a whole number from 1 to {most:,}, not {value!r}")
        for name in ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is None and name in ("rope_local_base_freq", "query_pre_attn_scalar"):
                continue
            if type(value) not in (int, float) or not 0 < value < float("inf") or (name == "rms_norm_eps" and value >= 1):
                raise CamelidError(f"config {name} must be a positive number{' below 1' * (name == 'rms_norm_eps')}, "
                                   f"not {value!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            if not all(i is None or (type(i) is int and i >= 0) for i in ids):
                raise CamelidError(f"config {name} must be a token id (a whole number from 0), not {value!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim < 2 or self.head_dim % 2:
            raise CamelidError(f"config head_dim must be even (the rotary embedding turns pairs), not {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CamelidError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise CamelidError(f"model_type {self.model_type}: hidden activation {self.hidden_act!r} is not supported "
                               f"(supported: {', '.join(ACTIVATIONS)})")
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise CamelidError(f"config layer_types must name one of {', '.join(LAYER_TYPES)} for each of the "
                                   f"{self.num_hidden_layers} layers")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise CamelidError("config layer_types has sliding_attention layers but no sliding_window")
        if self.no_rope_layers is not None:
            self.no_rope_layers = list(self.no_rope_layers)
            if len(self.no_rope_layers) != self.num_hidden_layers or not set(self.no_rope_layers) <= {0, 1}:
                raise CamelidError(f"config no_rope_layers must give 1 (rope) or 0 (none) for each of the "
                                   f"{self.num_hidden_layers} layers")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise CamelidError(f"config sliding_window must be a positive integer, not {self.sliding_window!r}")
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            kind = self.rope_scaling.setdefault("rope_type", self.rope_scaling.pop("type", "default"))
            if kind not in ROPE_TYPES:
                raise CamelidError(f"model_type {self.model_type}: rope_scaling type {kind!r} is not supported "
                                   f"(supported: {', '.join(ROPE_TYPES)})")
            missing = [k for k in ROPE_KEYS[kind] if k not in self.rope_scaling]
            if missing:
                raise CamelidError(f"rope_scaling of type {kind} lacks {', '.join(missing)}")
            if kind == "default":
                self.rope_scaling = None

    @property
    def qkv_bias(self) -> bool:
        """Whether q, k and v have biases: always in Qwen2 (transformers hard-codes them), else attention_bias."""
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        """Whether the attention output has a bias: never in Qwen2, else attention_bias."""
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        """Whether each head's q and k are RMS-normalised (over head_dim) before the rotary embedding: Qwen3, Gemma 3."""
        return self.model_type in ("qwen3", "gemma3_text")

    @property
    def gemma(self) -> bool:
        """Gemma's switches: embeddings scaled by sqrt(hidden_size), RMSNorm weights stored as an offset from 1
        (the norm multiplies by 1 + weight), and a norm after attention and after the MLP as well as before."""
        return self.model_type == "gemma3_text"

    @property
    def fused_projections(self) -> bool:
        """Whether transformers stores q, k and v as one qkv_proj and gate and up as one gate_up_proj (Phi-3);
        camelid's decoder keeps them apart (camelid.checkpoint splits and fuses them)."""
        return self.model_type == "phi3"

    @property
    def norm_offset(self) -> float:
        """What every RMSNorm adds to its stored weight: 1 in Gemma (see gemma), else 0."""
        return 1.0 if self.gemma else 0.0

    @property
    def attention_scale(self) -> float | None:
        """What attention scores are multiplied by, where it is not 1/sqrt(head_dim) (None)."""
        return None if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar**-0.5

    def local_rope(self, layer: int) -> bool:
        """Whether layer `layer` rotates by rope_local_base_freq (Gemma 3's sliding-window layers)."""
        return self.rope_local_base_freq is not None and self.window(layer) is not None

    def rope_in(self, layer: int) -> bool:
        """Whether layer `layer` applies the rotary embedding (all do but SmolLM3's NoPE layers)."""
        return self.no_rope_layers is None or bool(self.no_rope_layers[layer])

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None where it attends to the whole context."""
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def max_sequence_length(self) -> int:
        """The longest sequence camelid runs: the model's context (sliding windows are attended to as they are)."""
        return self.max_position_embeddings

    def to_hf(self) -> dict[str, Any]:
        fields_ = {k: v for k, v in asdict(self).items() if k != "model_type"}
        out = {"architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type, **fields_}
        if self.model_type in ("qwen2", "qwen3", "smollm3"):
            out["use_sliding_window"] = self.sliding_window is not None  # else their window is not used
        if self.gemma:  # Gemma3TextConfig's names; softcapping, which Gemma 2 had, is off
            out.update(hidden_activation=out.pop("hidden_act"), final_logit_softcapping=None,
                       attn_logit_softcapping=None)
        for key in ("sliding_window", "layer_types", "no_rope_layers", "rope_local_base_freq", "query_pre_attn_scalar"):
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        if not isinstance(hf, dict):
            raise CamelidError("config.json must hold a JSON object")
        arch = hf.get("model_type")
        if arch == "gemma3":  # Gemma 3 with its vision tower: the language model's part
            hf = {"model_type": "gemma3_text", **(hf.get("text_config") or {})}
            arch = hf["model_type"]
        if arch not in ARCHITECTURES:
            raise CamelidError(f"model_type {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
        layers = hf.get("num_hidden_layers")
        if layers is not None and (type(layers) is not int or not 1 <= layers <= SIZE_LIMITS["num_hidden_layers"]):
            # checked first: the layer patterns below are lists of this length
            raise CamelidError(f"config num_hidden_layers must be a whole number from 1 to "
                               f"{SIZE_LIMITS['num_hidden_layers']:,}, not {layers!r}")
        if arch == "gemma3_text":
            hf = _gemma3_text(hf)
        if arch == "phi3":
            _check_phi3(hf)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in hf.items() if k in known}
        if arch in ("qwen2", "qwen3", "smollm3"):
            values.update(_qwen_layer_types(hf))
        if arch == "smollm3" and "no_rope_layers" not in hf and isinstance(hf.get("no_rope_layer_interval"), int):
            values["no_rope_layers"] = no_rope_every(hf["no_rope_layer_interval"], hf.get("num_hidden_layers", 0))
        # transformers >= 5 writes theta and scaling together as rope_parameters
        rope = hf.get("rope_parameters")
        if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):  # per kind of layer (Gemma 3)
            local = rope.get("sliding_attention") or {}
            if local.get("rope_type", "default") != "default":
                raise CamelidError(f"model_type {arch}: rope scaling in sliding-window layers "
                                   f"({local['rope_type']!r}) is not supported")
            values["rope_local_base_freq"] = local.get("rope_theta", values.get("rope_local_base_freq"))
            rope = rope["full_attention"]
        if isinstance(rope, dict):
            values["rope_theta"] = rope.get("rope_theta", values.get("rope_theta", 10000.0))
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            values["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
        return cls(**values)

    def save(self, directory: str | Path) -> None:
        write_atomic(Path(directory) / "config.json", json.dumps(self.to_hf(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "ModelConfig":
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise CamelidError(f"{directory}: no config.json; is this a Hugging Face model directory?")
        try:
            return cls.from_hf(read_json(path))
        except TypeError as exc:
            raise CamelidError(f"{path}: a field has the wrong type ({exc})") from None


# Gemma3TextConfig's defaults, for the keys a Gemma 3 config.json leaves out (the text_config of the multimodal
# models names only a few).
GEMMA3_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1,
    "bos_token_id": 2, "tie_word_embeddings": True, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
}


def _gemma3_text(hf: dict[str, Any]) -> dict[str, Any]:
    """A Gemma 3 text config.json in camelid's terms: defaults filled in, the activation under camelid's name,
    and the layer pattern spelled out (every sliding_window_pattern-th layer global, the others local)."""
    hf = {**GEMMA3_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k not in GEMMA3_DEFAULTS}}
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise CamelidError(f"model_type gemma3_text: {key} is not supported (Gemma 3 is published without it)")
    if hf.get("use_bidirectional_attention"):
        raise CamelidError("model_type gemma3_text: use_bidirectional_attention (EmbeddingGemma) is not supported")
    hf["hidden_act"] = hf.pop("hidden_activation", None) or hf.get("hidden_act")
    if not hf.get("layer_types"):
        pattern = next((hf[k] for k in ("sliding_window_pattern", "_sliding_window_pattern") if hf.get(k) is not None), 6)
        hf["layer_types"] = gemma3_layer_types(pattern, hf["num_hidden_layers"])
    return hf


def _check_phi3(hf: dict[str, Any]) -> None:
    """Refuse in one line what camelid's decoder does not run of a Phi-3 config.json: a rotary
    embedding on part of each head (Phi-4-mini), and longrope (Phi-3-mini-128k, Phi-3.5), which transformers
    also reads under its earlier names su and yarn. A sliding_window given applies to every layer, as Mistral's."""
    rope = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    scaling = hf.get("rope_scaling") if isinstance(hf.get("rope_scaling"), dict) else {}
    partial = hf.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise CamelidError(f"model_type phi3: partial_rotary_factor {partial} (the rotary embedding on part of each "
                           "head, as in Phi-4-mini) is not supported")
    for where in (rope, scaling):  # longrope itself is refused with the other rope types camelid lacks
        kind = where.get("rope_type", where.get("type"))
        if kind in ("su", "yarn"):
            raise CamelidError(f"model_type phi3: rope_scaling type {kind!r} (longrope) is not supported")


def gemma3_layer_types(pattern: int, layers: int) -> list[str]:
    """Gemma 3's interleaving as transformers and llama.cpp derive it: every pattern-th layer (counted from 1)
    attends to the whole context, the others to a sliding window; with 0, every layer slides (llama.cpp's rule)."""
    if not isinstance(pattern, int) or pattern < 0:
        raise CamelidError(f"model_type gemma3_text: sliding_window_pattern must be a whole number, not {pattern!r}")
    return ["full_attention" if pattern and (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]


def no_rope_every(interval: int, layers: int) -> list[int]:
    """SmolLM3's NoPE pattern as transformers and llama.cpp derive it: every interval-th layer (counted from 1)
    goes without the rotary embedding (0), the others keep it (1)."""
    return [int((i + 1) % interval != 0) for i in range(layers)]


def _qwen_layer_types(hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen2/Qwen3/SmolLM3's window settings as transformers reads them: a sliding_window is used only with
    use_sliding_window, and then in the layers from max_window_layers on (unless layer_types says)."""
    if not hf.get("use_sliding_window"):
        return {"sliding_window": None, "layer_types": None}  # a window the file names but does not use
    layers = hf.get("num_hidden_layers")
    first = hf.get("max_window_layers", layers)
    types = hf.get("layer_types") or [
        "sliding_attention" if isinstance(first, int) and i >= first else "full_attention" for i in range(layers)]
    return {"sliding_window": hf.get("sliding_window"), "layer_types": types}


# Each preset copies the config.json of the model it names; the source is given beside it.
PRESETS: dict[str, ModelConfig] = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct) config.json
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    ),
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0 config.json
    "tinyllama-1.1b": ModelConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0,
    ),
    # meta-llama/Llama-2-7b-hf config.json
    "llama-2-7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, rope_theta=10000.0,
    ),
    # meta-llama/Meta-Llama-3-8B config.json
    "llama-3-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        bos_token_id=128000, eos_token_id=128001,
    ),
    # meta-llama/Llama-3.1-8B config.json (the "llama3" frequency scaling)
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=128001,
    ),
    # mistralai/Mistral-7B-v0.1 config.json (4,096-token sliding window)
    "mistral-7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, rope_theta=10000.0, sliding_window=4096,
    ),
    # meta-llama/Llama-2-13b-hf config.json (Vicuna-13B's base)
    "llama-2-13b": ModelConfig(
        vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=40, max_position_embeddings=4096, rope_theta=10000.0,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return ModelConfig(**asdict(PRESETS[name.lower()]))
    except KeyError:
        raise CamelidError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None

