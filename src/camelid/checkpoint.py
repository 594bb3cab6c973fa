"""Loading and saving models: Hugging Face directories (safetensors) and GGUF files, never pickles.

`load_model("smollm2-135m-instruct" | "model.gguf" | "hf_dir/")` gives a `LoadedModel`: the network, its
tokenizer and its chat template. `save_model` writes an HF directory that transformers loads, atomically.
"""

import functools
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from camelid.config import DTYPE_NAMES, ModelConfig, gemma3_layer_types, no_rope_every
from camelid.errors import CamelidError, shown
from camelid.files import atomic_dir
from camelid.files import read_json
from camelid.gguf_file import GGUFFile
from camelid.memory import SKIP_CHECK, MemoryNeed, fits, memory_need
from camelid.model import Llama, rope_inv_freq
from camelid.named_models import NAMED_MODELS, named_model_path

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # float32, bfloat16, float16


@dataclass
class LoadedModel:
    model: Llama
    tokenizer: "Tokenizer"  # noqa: F821 (camelid.tokenizer.Tokenizer)
    chat_template: str | None  # the model's own Jinja template, if it has one
    source: Path

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def resolve_model_path(spec: str | Path) -> Path:
    """A MODEL argument as a path: a named model's file, a GGUF file, or an HF-format directory."""
    path = Path(spec)
    if path.exists():
        return path
    if str(spec).lower() in NAMED_MODELS:
        return named_model_path(str(spec))
    if path.suffix == ".gguf" or os.sep in str(spec):
        raise CamelidError(f"{spec}: no such file or directory")
    return named_model_path(str(spec))  # raises with the list of names


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """The device name if torch can use it here, else a one-line error."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise CamelidError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CamelidError(f"device {device} asked for, but this torch build or machine has no CUDA GPU; use --device cpu")
    if kind not in ("cpu", "cuda"):
        raise CamelidError(f"device {device} is not supported; use cpu, cuda or cuda:N")
    return device


def default_dtype(device: str) -> torch.dtype:
    # bf16 matmuls are ~200x slower than fp32 on CPUs without AVX-512 BF16; on GPUs bf16 is the norm.
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise CamelidError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}") from None


def load_model(spec: str | Path, *, device: str | None = None, dtype=None, quantize: str = "none") -> LoadedModel:
    """Load a model with its tokenizer and chat template from a name, a GGUF file or an HF directory, or a LoRA
    adapter directory (its base model with the adapter merged in).

    `quantize="f16"`, `"int8"` or `"int4"` stores the linear weights smaller for faster CPU decoding (see
    camelid.quantize).
    """
    from camelid.chat_template import read_chat_template
    from camelid.quantize import check_quantizable, check_quantization, quantize_model
    from camelid.tokenizer import load_tokenizer, tokenizer_from_gguf
    from camelid.lora import is_adapter_dir

    check_quantization(quantize)
    path = resolve_model_path(spec)
    device = check_device(device or default_device())
    dtype = parse_dtype(dtype) or default_dtype(device)
    if is_adapter_dir(path):
        return _load_adapter_as_model(path, device=device, dtype=dtype, quantize=quantize)
    weights = HFWeights(path) if path.is_dir() else GGUFWeights(GGUFFile(path))
    config = weights.config
    if quantize != "none":
        check_quantizable(config, quantize)
    check_memory(path, config, quantize, dtype, device, None if path.is_dir() else weights.gguf)
    # quantized on the CPU, the whole model never exists in float32: a layer at a time, converted as it comes
    streamed = quantize != "none" and device == "cpu" and dtype == torch.float32
    shapes = weights.shapes() if streamed else None
    state = None if streamed else weights.read()
    if path.is_dir():
        tokenizer, template = load_tokenizer(path), read_chat_template(path)
    else:
        tokenizer = tokenizer_from_gguf(weights.gguf.metadata)
        template = weights.gguf.metadata.get("tokenizer.chat_template")
    if streamed:
        model = build_quantized_model(config, shapes, weights.read, quantize,
                                      weights if isinstance(weights, GGUFWeights) else None)
    else:
        model = quantize_model(build_model(config, state, device=device, dtype=dtype), quantize)
    return LoadedModel(model=model, tokenizer=tokenizer, chat_template=template, source=path)


def memory_need_of(path: Path, quantize: str, dtype: torch.dtype = torch.float32,
                   config: ModelConfig | None = None, gguf: GGUFFile | None = None) -> MemoryNeed | None:
    """camelid.memory's estimate for loading `path` (a GGUF file or an HF directory) at `quantize`; None for a
    LoRA adapter directory, which has no config of its own. `gguf`: the file's header, where already read."""
    from camelid.lora import is_adapter_dir

    if path.is_dir() and (is_adapter_dir(path) or not (path / "config.json").is_file()):
        return None
    files = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size
    stored = None
    if not path.is_dir() and quantize in ("int8", "int4"):
        from camelid.native import EXACT, FOUR_BIT

        gguf = gguf or GGUFFile(path)
        types = {name: info.ggml_type for name, info in gguf.tensors.items() if len(info.shape) == 2}
        config = config or read_config(path)
        # as build_quantized_model takes them (a fused projection's blocks it does not)
        stored = {"four_bit": not config.fused_projections and all(
                      t in FOUR_BIT for name, t in types.items() if name.startswith("blk.")),
                  "exact_ends": all(t in EXACT for name, t in types.items() if not name.startswith("blk."))}
    return memory_need(config or read_config(path), quantize, dtype=dtype, file_bytes=files,
                       from_gguf=not path.is_dir(), stored=stored)


def read_config(path: Path) -> ModelConfig:
    """A model's config without its weights: an HF directory's config.json, or a GGUF file's header."""
    return ModelConfig.load(path) if path.is_dir() else config_from_gguf(GGUFFile(path))


def check_memory(path: Path, config: ModelConfig, quantize: str, dtype: torch.dtype, device: str,
                 gguf: GGUFFile | None = None) -> None:
    """Refuse, in one line and before anything is loaded, a CPU load that will not fit this machine's memory
    (rather than the kernel's OOM killer halfway), naming the --quantize that would."""
    if not device.startswith("cpu"):
        return
    need = memory_need_of(path, quantize, dtype, config, gguf)
    ok, available = fits(need) if need is not None else (True, None)
    if ok:
        return
    smaller = []
    for kind in ("f16", "int8", "int4"):
        other = memory_need_of(path, kind, dtype, config, gguf)
        if kind != quantize and fits(other)[0]:
            smaller.append(f"--quantize {kind} needs ~{other.peak() / 1e9:.1f} GB")
    raise CamelidError(f"{path.name} needs ~{need.peak() / 1e9:.1f} GB of memory to load at --quantize {quantize} "
                       f"({need.weights / 1e9:.1f} GB of weights), and {available / 1e9:.1f} GB is available; "
                       f"{', '.join(smaller) + ', or ' if smaller else ''}use a smaller model or free memory "
                       f"(or set {SKIP_CHECK}=1 to try anyway)")


def load_tokenizer_and_template(spec: str | Path, template_name: str | None = None):
    """A model's tokenizer and chat template without its weights: (Tokenizer, ChatTemplate).

    `spec` is what `load_model` takes; a LoRA adapter directory gives its own tokenizer and template where it
    carries them, else its base's. A built-in `template_name` (chatml, vicuna_v1.1, ...) replaces the model's
    template, as in `camelid chat --template`.
    """
    from camelid.chat_template import template_for

    path = resolve_model_path(spec)
    tokenizer, source = _tokenizer_and_template_source(path)
    model_type = None if template_name or source else _model_type(path)
    return tokenizer, template_for(tokenizer, source, model_type, name=template_name, what=path.name)


def _model_type(path: Path) -> str | None:
    """The family a model file or directory says it is (config.json's model_type, GGUF's architecture)."""
    from camelid.lora import adapter_base, is_adapter_dir

    if is_adapter_dir(path):
        return _model_type(resolve_model_path(adapter_base(path)))
    if path.is_dir():
        config = path / "config.json"
        hf = read_json(config) if config.is_file() else {}
        return hf.get("model_type") if isinstance(hf, dict) else None  # a tokenizer-only directory has none
    return GGUFFile(path).metadata.get("general.architecture")


def _tokenizer_and_template_source(path: Path):
    from camelid.chat_template import read_chat_template
    from camelid.tokenizer import load_tokenizer, tokenizer_from_gguf
    from camelid.lora import adapter_base, is_adapter_dir

    if is_adapter_dir(path):
        tokenizer = load_tokenizer(path) if (path / "tokenizer.json").is_file() else None
        source = read_chat_template(path)
        if tokenizer is None or source is None:
            base_tokenizer, base_source = _tokenizer_and_template_source(resolve_model_path(adapter_base(path)))
            tokenizer, source = tokenizer or base_tokenizer, source or base_source
        return tokenizer, source
    if path.is_dir():
        return load_tokenizer(path), read_chat_template(path)
    metadata = GGUFFile(path).metadata  # the header only: the weights stay on disk
    return tokenizer_from_gguf(metadata), metadata.get("tokenizer.chat_template") or None


def _load_adapter_as_model(path: Path, *, device: str, dtype: torch.dtype, quantize: str) -> LoadedModel:
    """A LoRA adapter directory as a model: its base with the adapter merged in (as fast as the base), and the
    adapter directory's own tokenizer and chat template where it carries them (those it was trained with)."""
    from camelid.chat_template import read_chat_template
    from camelid.quantize import quantize_model
    from camelid.tokenizer import load_tokenizer
    from camelid.lora import adapter_base, load_adapter, merge_lora

    base = load_model(adapter_base(path), device=device, dtype=dtype)
    model = merge_lora(load_adapter(base.model, path))  # merged before quantizing: quantize needs plain linears
    tokenizer = load_tokenizer(path) if (path / "tokenizer.json").is_file() else base.tokenizer
    template = read_chat_template(path) or base.chat_template
    return LoadedModel(model=quantize_model(model, quantize), tokenizer=tokenizer, chat_template=template, source=path)


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], *, device="cpu", dtype=torch.float32) -> Llama:
    """A model holding exactly `state`, built without first allocating random weights."""
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    model = _checked_skeleton(config, state)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    return _finish_model(model, config, device)


def build_quantized_model(config: ModelConfig, shapes: dict[str, torch.Tensor], read, kind: str,
                          blocks=None) -> Llama:
    """build_model and then quantize_model (float32 on the CPU), a decoder layer at a time: the float32 weights of
    one layer exist at once, not of the whole model. `shapes` holds a meta tensor for every weight (checked
    before any is read); read(keep) gives the weights whose names `keep` accepts; `blocks`, a GGUFWeights where
    given, the weights the kernels take as the file stores them (its `blocks`): int4's 4-bit products from Q4_0,
    Q4_1 and Q4_K, the int8 head and embeddings from Q8_0, Q4_0 and Q4_1."""
    from camelid.memory import release_freed_memory
    from camelid.native import EXACT, FOUR_BIT, PRODUCTS
    from camelid.quantize import (NATIVE, check_quantizable, finish_quantization, product_bits, quantize_ends,
                                  quantize_layer, runs_native)

    check_quantizable(config, kind)
    if config.tie_word_embeddings:
        shapes = {k: v for k, v in shapes.items() if k != "lm_head.weight"}
    model = _checked_skeleton(config, shapes)

    def assign(keep) -> None:
        state = {k: v for k, v in read(keep).items() if k in shapes}
        model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=False, assign=True)

    # the native kinds make the head and the embeddings int8 from a file's Q8_0/Q4_0/Q4_1 rows directly
    ends = {}
    if kind in NATIVE and blocks is not None:
        ends = blocks.blocks(["model.embed_tokens.weight", "lm_head.weight"], EXACT)
    assign(lambda name: not name.startswith("model.layers.") and name not in ends)
    model = _finish_model(model, config, "cpu")
    quantize_ends(model, kind, ends)
    if ends:
        blocks.release(ends)
    layers, native = [], runs_native(config)
    for i, block in enumerate(model.model.layers):
        # int4 takes a file's 4-bit blocks as they are: those weights are never made float
        names = {product: [f"model.layers.{i}.{module}.{name}.weight" for name in parts]
                 for product, (module, parts) in PRODUCTS.items()}
        wanted = [n for parts in names.values() for n in parts]
        four = blocks.blocks(wanted, FOUR_BIT) if kind == "int4" and blocks is not None else {}
        bits = product_bits(kind, config, i, {p for p, parts in names.items() if all(n in four for n in parts)})
        # what each product takes as stored: 4-bit blocks for a 4-bit product, Q8_0/Q4_0/Q4_1 rows for an int8 one
        exact = blocks.blocks(wanted, EXACT) if kind in NATIVE and blocks is not None else {}
        found = {}
        for product, parts in names.items():
            source = four if bits and bits[product] == 4 else exact
            found.update({n: source[n] for n in parts if n in source})
        assign(lambda name, prefix=f"model.layers.{i}.": name.startswith(prefix) and name not in found)
        layers.append(quantize_layer(block, kind, bits, {name.split(".")[-2]: b for name, b in found.items()}, native))
        if found:
            blocks.release(found)
        release_freed_memory()  # the layer's float32 pages, not kept by the C heap for the next
    return finish_quantization(model, kind, layers)


def _checked_skeleton(config: ModelConfig, state: dict[str, torch.Tensor]) -> Llama:
    """A model of `config` on the meta device, once `state` (real or meta tensors) is checked to be exactly its
    weights: the layers, the names and the shapes."""
    layers = {int(m[1]) for name in state if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    have = max(layers) + 1 if layers else 0
    if have != config.num_hidden_layers:  # before the layers are built
        raise CamelidError(f"the config says {config.num_hidden_layers} layers, but the checkpoint has tensors for "
                           f"{have}; config and weights do not belong together")
    with torch.device("meta"):
        model = Llama(config)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        detail = "; ".join(
            f"{what}: {', '.join(sorted(names)[:4])}{' ...' if len(names) > 4 else ''}"
            for what, names in (("missing", missing), ("unexpected", unexpected))
            if names
        )
        raise CamelidError(f"the checkpoint's tensors do not fit a {config.num_hidden_layers}-layer {config.model_type} "
                           f"model ({detail})")
    for name, param in model.state_dict().items():
        if name in state and tuple(state[name].shape) != tuple(param.shape):
            raise CamelidError(
                f"tensor {name} has shape {tuple(state[name].shape)}, the config implies {tuple(param.shape)}"
            )
    return model


def _finish_model(model: Llama, config: ModelConfig, device) -> Llama:
    """The tied head and the rotary buffers of a model whose weights are assigned (the buffers were left on the
    meta device)."""
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config).to(device)
    if config.rope_local_base_freq is not None:
        model.inv_freq_local = rope_inv_freq(config, local=True).to(device)
    return model.eval()


# -- Hugging Face directories ----------------------------------------------------------------------------------


def read_hf_weights(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    weights = HFWeights(directory)
    return weights.config, weights.read()


class HFWeights:
    """An HF directory's config and safetensors weights under camelid's names, read all at once or a few at a
    time (`read(keep)`): the shards' headers are read first, each tensor only when asked for."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.config = ModelConfig.load(directory)
        self.files = _hf_weight_files(directory)
        found = {}  # the checkpoint's names -> the shard holding each
        for name in self.files:
            with self._open(name) as shard:
                found.update(dict.fromkeys(shard.keys(), name))
        found.pop("model.rotary_emb.inv_freq", None)  # stored by some old exports; recomputed from the config
        # camelid's name (before fused projections are split) -> (shard, the checkpoint's name)
        self.where = {ours: (found[theirs], theirs) for ours, theirs in _language_model({n: n for n in found}).items()}

    def _open(self, name: str):
        from safetensors import SafetensorError, safe_open

        try:
            return safe_open(self.directory / name, framework="pt")
        except FileNotFoundError:
            raise CamelidError(f"{self.directory}: weight shard {shown(name)} named in the index is missing") from None
        except (SafetensorError, OSError) as exc:
            raise CamelidError(f"{self.directory / name}: unreadable safetensors file ({exc}); is it truncated?") from None

    def shapes(self) -> dict[str, torch.Tensor]:
        """Every weight as a meta tensor of its shape (from the shards' headers)."""
        shapes = {}
        for name in self.files:
            with self._open(name) as shard:
                shapes.update({ours: torch.empty(shard.get_slice(theirs).get_shape(), device="meta")
                               for ours, (file, theirs) in self.where.items() if file == name})
        return split_fused_projections(shapes, self.config)

    def read(self, keep=None) -> dict[str, torch.Tensor]:
        """The weights whose (unsplit) names `keep` accepts, all where it is None."""
        from safetensors import SafetensorError

        state = {}
        for name in self.files:
            wanted = {ours: theirs for ours, (file, theirs) in self.where.items()
                      if file == name and (keep is None or keep(ours))}
            if not wanted:
                continue
            try:
                with self._open(name) as shard:
                    state.update({ours: shard.get_tensor(theirs) for ours, theirs in wanted.items()})
            except (SafetensorError, OSError) as exc:
                raise CamelidError(f"{self.directory / name}: unreadable safetensors file ({exc}); is it "
                                   "truncated?") from None
        return split_fused_projections(state, self.config)


def _hf_weight_files(directory: Path) -> list[str]:
    """The safetensors shards of an HF directory (its index's, else every *.safetensors), each checked to be in it."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "safetensors index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise CamelidError(f"{index}: no weight_map object; the index is damaged")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    for name in files:
        _check_inside(directory, name)
    if not files:
        pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
        if pickles:
            raise CamelidError(
                f"{directory}: weights are only in pickle files ({pickles[0]}), which camelid never loads; "
                "convert them to safetensors with transformers' save_pretrained(safe_serialization=True)"
            )
        raise CamelidError(f"{directory}: no *.safetensors weights found")
    return files


def _check_inside(directory: Path, name) -> None:
    """Refuse a weight file that is not inside the model directory: an index naming `../elsewhere/x.safetensors`
    or an absolute path, or a link to a file outside. Hugging Face's own cache is allowed its layout, where a
    snapshot's files link into the same repository's `blobs` folder."""
    if not isinstance(name, str) or not name:
        raise CamelidError(f"{directory}: the safetensors index names a shard {name!r}, not a file name")
    root = directory.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<revision>/
        allowed.append(root.parent.parent / "blobs")
    target = (directory / name).resolve()
    lexical = Path(os.path.normpath(root / name))
    if not (lexical.is_relative_to(root) and any(target.is_relative_to(a) for a in allowed)):
        raise CamelidError(f"{directory}: weight file {shown(name)} lies outside the model directory; camelid loads "
                           "weights only from inside it (move the file in, or fix the index)")


# Where a multimodal checkpoint (Gemma 3 4B and up) keeps its language model, by transformers version.
_LANGUAGE_MODEL_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                            "language_model.lm_head.": "lm_head."}


def _language_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The language model's tensors under a plain causal LM's names; a multimodal checkpoint's vision tower and
    projector are left out (camelid reads and writes text only)."""
    if not any(name.startswith(prefix) for name in state for prefix in _LANGUAGE_MODEL_PREFIXES):
        return state
    text = {}
    for name, tensor in state.items():
        for prefix, plain in _LANGUAGE_MODEL_PREFIXES.items():
            if name.startswith(prefix):
                text[plain + name[len(prefix):]] = tensor
                break
        else:
            if name == "lm_head.weight":
                text[name] = tensor
    return text


# transformers' Phi-3 keeps q/k/v and gate/up stacked by rows in one linear layer each; camelid's decoder keeps
# the parts apart (as quantize and LoRA expect them). In the order the rows are stacked:
FUSED_PROJECTIONS = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}
_FUSED = re.compile(r"(model\.layers\.\d+\.)(self_attn\.qkv_proj|mlp\.gate_up_proj)\.(.+)")
_PART = re.compile(r"(model\.layers\.\d+\.)(?:self_attn|mlp)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(.+)")
_FUSED_OF = {part: fused for fused, parts in FUSED_PROJECTIONS.items() for part in parts}


def fused_rows(config: ModelConfig) -> dict[str, list[int]]:
    """How many rows each part has in each fused projection of `config`'s family ({} where nothing is fused)."""
    if not config.fused_projections:
        return {}
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {"self_attn.qkv_proj": [q, kv, kv], "mlp.gate_up_proj": [config.intermediate_size] * 2}


def split_fused_projections(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """`state` with each fused projection (model.layers.0.self_attn.qkv_proj.weight, also .bias or .lora_B.weight)
    cut by rows into camelid's parts (q_proj, k_proj, v_proj); the inverse of fuse_projections."""
    rows = fused_rows(config)
    out = {}
    for name, tensor in state.items():
        m = _FUSED.fullmatch(name) if rows else None
        if m is None:
            out[name] = tensor
            continue
        if tensor.shape[0] != sum(rows[m[2]]):
            raise CamelidError(f"tensor {name} has {tensor.shape[0]} rows, the config implies {sum(rows[m[2]])}")
        parent = m[2].split(".")[0]
        for part, piece in zip(FUSED_PROJECTIONS[m[2]], tensor.split(rows[m[2]])):
            out[f"{m[1]}{parent}.{part}.{m[3]}"] = piece
    return out


def fuse_projections(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """`state` with camelid's parts stacked by rows into the projections transformers fuses for `config`'s family
    (q_proj, k_proj, v_proj -> qkv_proj); the inverse of split_fused_projections."""
    if not config.fused_projections:
        return state
    out = {}
    for name, tensor in state.items():
        m = _PART.fullmatch(name)
        if m is None:
            out[name] = tensor
            continue
        fused = _FUSED_OF[m[2]]
        parent, parts = fused.split(".")[0], FUSED_PROJECTIONS[fused]
        if m[2] == parts[0]:  # the first part gathers the others
            out[f"{m[1]}{fused}.{m[3]}"] = torch.cat([state[f"{m[1]}{parent}.{p}.{m[3]}"] for p in parts])
    return out


def save_model(loaded: LoadedModel, out: str | Path, *, dtype=None, overwrite: bool = False) -> Path:
    """Write an HF-format directory (config, safetensors, tokenizer, chat template) atomically."""
    if loaded.model.quantization != "none":
        raise CamelidError(f"this model was loaded with --quantize {loaded.model.quantization}; load it without to save it")
    if loaded.model.lora is not None:
        raise CamelidError("this model has unmerged LoRA adapters; merge them first (merge_lora) or use save_adapter")
    return write_model_files(
        loaded.config, loaded.model.state_dict(), out, tokenizer=loaded.tokenizer,
        chat_template=loaded.chat_template, dtype=dtype, overwrite=overwrite,
    )


def write_model_files(
    config: ModelConfig, state: dict, out: str | Path, *, tokenizer, chat_template: str | None,
    dtype=None, overwrite: bool = False,
) -> Path:
    """An HF-format directory holding `state` (a Llama state dict), written atomically."""
    from safetensors.torch import save_file

    dtype = parse_dtype(dtype)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        config.save(tmp)
        state = {
            k: v.detach().to(dtype or v.dtype).contiguous().cpu()
            for k, v in state.items()
            if not (k == "lm_head.weight" and config.tie_word_embeddings)
        }
        state = fuse_projections(state, config)  # transformers' own layout where it fuses (Phi-3)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        shutil.copymode(tmp / "config.json", tmp / "model.safetensors")  # safetensors writes it 0600
        tokenizer.save(tmp, chat_template=chat_template)
        gen = {"bos_token_id": tokenizer.bos_id, "eos_token_id": sorted(tokenizer.stop_ids) or None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return Path(out)


# -- GGUF ------------------------------------------------------------------------------------------------------

# GGUF tensor name -> HF name; {i} is the layer index.
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# Gemma's four norms a layer: llama.cpp's ffn_norm is the one before the MLP, as in LLaMA, but transformers calls
# that one pre_feedforward_layernorm there, and post_attention_layernorm the norm of the attention's output.
GEMMA3_GGUF_NAMES = {
    **GGUF_NAMES,
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}
# Phi-3 as llama.cpp's phi3 holds it: q, k and v in one attn_qkv (or apart, as in GGUF_NAMES), and gate and up in
# one ffn_up of twice the MLP's width, gate first (what its fused SwiGLU splits); transformers' fused names.
PHI3_GGUF_NAMES = {
    **GGUF_NAMES,
    "blk.{i}.attn_qkv.weight": "model.layers.{i}.self_attn.qkv_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.gate_up_proj.weight",
}
# llama.cpp's architectures that camelid reads -> the model_type of the same family. llama and smollm3 store q/k
# rows in interleaved rotary order; the others keep the Hugging Face layout (llama.cpp's "neox" rope).
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "smollm3": "smollm3", "gemma3": "gemma3_text",
              "phi3": "phi3"}
SUPPORTED_GGUF_ARCHS = tuple(GGUF_ARCHS)
INTERLEAVED_ROPE_ARCHS = ("llama", "smollm3")
# llama.cpp's gemma3 takes Gemma 3's defaults where the file is silent: every 6th layer global, local layers
# rotating at base 10,000. Its norms hold 1 + w (the converter adds the 1 that transformers' Gemma3RMSNorm adds).
GEMMA3_PATTERN, GEMMA3_LOCAL_BASE = 6, 10000.0
# llama.cpp's smollm3 leaves the rotary embedding out of every 4th layer (as SmolLM3 is published), a rule it
# keeps in code, not in the file.
SMOLLM3_NOPE_STEP = 4
# Llama-3.1/3.2 scaling as released; a GGUF keeps only the resulting per-frequency factors (rope_freqs).
KNOWN_LLAMA3_SCALINGS = [
    {"factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for f in (8.0, 32.0)
]


def gguf_names(arch: str) -> dict[str, str]:
    """GGUF tensor name -> HF name for one of llama.cpp's architectures; {i} is the layer index."""
    return {"gemma3": GEMMA3_GGUF_NAMES, "phi3": PHI3_GGUF_NAMES}.get(arch, GGUF_NAMES)


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    names = gguf_names(arch)
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 2:
        return names.get(".".join(["blk", "{i}", *parts[2:]]), "").format(i=parts[1]) or None
    return names.get(name)


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise CamelidError(
            f"{gguf.path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_GGUF_ARCHS)})"
        )
    if f"{arch}.expert_count" in meta and meta[f"{arch}.expert_count"]:
        raise CamelidError(f"{gguf.path}: mixture-of-experts models are not supported")

    def get(key, default=None, kind="count"):
        """Metadata `arch.key`, checked: a count is a whole number of at least 1, a real a positive number."""
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CamelidError(f"{gguf.path}: metadata {arch}.{key} is missing; the file is incomplete")
        fits = (type(value) is int and value >= 1 if kind == "count" else
                type(value) in (int, float) and 0 < value < float("inf"))
        if not fits:
            what = "a whole number of at least 1" if kind == "count" else "a positive number"
            raise CamelidError(f"{gguf.path}: metadata {arch}.{key} is {shown(value)}, not {what}; the file is damaged")
        return value

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    if "token_embd.weight" not in gguf.tensors:
        raise CamelidError(f"{gguf.path}: no token_embd.weight tensor; this is not a complete LLaMA model")
    _check_block_count(gguf, get("block_count"))
    try:
        return _config_from_metadata(gguf, arch, get, heads, hidden)
    except (TypeError, ValueError, ZeroDivisionError) as exc:  # a value of the wrong type that no check above names
        raise CamelidError(f"{gguf.path}: a metadata value has the wrong type or range ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())}); the file is damaged") from None


def _check_block_count(gguf: GGUFFile, layers: int) -> None:
    """The layer count the metadata gives must be the one the tensors have, before any list of layers is made."""
    found = {int(parts[1]) for name in gguf.tensors if (parts := name.split("."))[0] == "blk" and parts[1].isdigit()}
    have = max(found) + 1 if found else 0
    if layers != have:
        arch = gguf.metadata["general.architecture"]
        raise CamelidError(f"{gguf.path}: metadata {arch}.block_count is {layers}, but the file has tensors for "
                           f"{have} layers; the file is damaged")


def _config_from_metadata(gguf: GGUFFile, arch: str, get, heads: int, hidden: int) -> ModelConfig:
    from camelid.tokenizer import gguf_special_ids

    meta, special = gguf.metadata, gguf_special_ids(gguf.metadata)
    config = ModelConfig(
        vocab_size=gguf.tensors["token_embd.weight"].shape[0],  # the tensor says it; metadata may omit padding
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length", hidden // heads),
        max_position_embeddings=get("context_length"),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", kind="real")),
        rope_theta=float(get("rope.freq_base", 10000.0, kind="real")),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        attention_bias="blk.0.attn_q.bias" in gguf.tensors,
        model_type=GGUF_ARCHS[arch],
        no_rope_layers=no_rope_every(SMOLLM3_NOPE_STEP, get("block_count")) if arch == "smollm3" else None,
        bos_token_id=special.get("bos_token_id"),
        eos_token_id=special.get("eos_token_id"),
        **(_gemma3_settings(gguf, get) if arch == "gemma3" else {}),
        **(_phi3_settings(gguf, get) if arch == "phi3" else {}),
    )
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type == "linear":
        config.rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", kind="real"))}
    elif scaling_type not in ("none", None):
        raise CamelidError(f"{gguf.path}: rope scaling {scaling_type!r} is not supported (supported: linear, llama3)")
    if "rope_freqs.weight" in gguf.tensors:
        config.rope_scaling = _llama3_scaling_from_factors(config, gguf.dequantize("rope_freqs.weight").numpy(), gguf.path)
    return config


def _gemma3_settings(gguf: GGUFFile, get) -> dict:
    """What llama.cpp's gemma3 reads besides the common keys, as ModelConfig fields."""
    if float(gguf.metadata.get("gemma3.final_logit_softcapping") or 0.0):
        raise CamelidError(f"{gguf.path}: gemma3 with final_logit_softcapping is not supported")
    layers, heads, hidden = get("block_count"), get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length", hidden // heads)
    settings = dict(hidden_act="gelu_pytorch_tanh",
                    query_pre_attn_scalar=gemma3_attention_scalar(layers, hidden, heads, head_dim))
    window = gguf.metadata.get("gemma3.attention.sliding_window")
    if window:
        pattern = gguf.metadata.get("gemma3.attention.sliding_window_pattern", GEMMA3_PATTERN)
        if isinstance(pattern, list):  # per layer, true where it slides
            types = ["sliding_attention" if swa else "full_attention" for swa in pattern[:layers]]
        else:
            types = gemma3_layer_types(int(pattern), layers)
        settings.update(sliding_window=int(window), layer_types=types,
                        rope_local_base_freq=float(gguf.metadata.get("gemma3.rope.freq_base_swa", GEMMA3_LOCAL_BASE)))
    return settings


def _phi3_settings(gguf: GGUFFile, get) -> dict:
    """What a phi3 file says besides the common keys, as ModelConfig fields; longrope and a rotary embedding on
    part of each head (Phi-3-mini-128k, Phi-3.5, Phi-4-mini) are refused."""
    if "rope_factors_long.weight" in gguf.tensors or "rope_factors_short.weight" in gguf.tensors:
        raise CamelidError(f"{gguf.path}: phi3 with longrope (rope_factors_long/short) is not supported")
    head_dim = get("attention.key_length", get("embedding_length") // get("attention.head_count"))
    if get("rope.dimension_count", head_dim) != head_dim:
        raise CamelidError(f"{gguf.path}: phi3 with a rotary embedding on part of each head (rope.dimension_count "
                           f"{get('rope.dimension_count')} of {head_dim}) is not supported")
    # llama.cpp runs Phi-3 without its window (see its phi3.cpp), but the file keeps it, as transformers runs it
    window = gguf.metadata.get("phi3.attention.sliding_window")
    return {"sliding_window": int(window) if window else None}


def gemma3_attention_scalar(layers: int, hidden: int, heads: int, head_dim: int) -> int:
    """The query_pre_attn_scalar llama.cpp's gemma3 assumes: head_dim, but hidden / heads in the 27B (62 layers),
    as Google's own configs have it."""
    return hidden // heads if layers == 62 else head_dim


def _llama3_scaling_from_factors(config: ModelConfig, factors: np.ndarray, path) -> dict:
    """The Llama-3.1 scaling whose per-frequency factors are those llama.cpp stored in `rope_freqs`."""
    plain = rope_inv_freq(ModelConfig(**{**config.__dict__, "rope_scaling": None}))
    for candidate in KNOWN_LLAMA3_SCALINGS:
        scaling = {"rope_type": "llama3", **candidate}
        scaled = rope_inv_freq(ModelConfig(**{**config.__dict__, "rope_scaling": scaling}))
        if np.allclose((plain / scaled).numpy(), factors, rtol=1e-4):
            return scaling
    raise CamelidError(f"{path}: its rope_freqs factors match no known Llama-3 scaling; this file is not supported")


def _unpermute_rope(w: torch.Tensor, n_heads: int, name: str = "q/k") -> torch.Tensor:
    """Undo llama.cpp's reordering of q/k rows (interleaved rotary pairs back to the HF half-split layout)."""
    if w.shape[0] % (2 * n_heads):
        raise CamelidError(f"tensor {name} has {w.shape[0]} rows, which do not split into rotary pairs for "
                           f"{n_heads} heads; the file's tensors do not fit its metadata")
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf_weights(gguf: GGUFFile, keep=None, config: ModelConfig | None = None
                      ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The file's config and weights as float32 under camelid's names: all of them, or those whose name `keep`
    accepts (each dequantized only then, and its pages of the file let go after)."""
    config = config or config_from_gguf(gguf)
    state = {}
    for name, hf_name in _gguf_names(gguf, config).items():
        if keep is not None and not keep(hf_name):
            continue
        w = gguf.dequantize(name, release=keep is not None)
        if config.gemma and name.endswith("norm.weight"):
            w = w - 1  # llama.cpp's gemma3 stores the whole scale; transformers and camelid its offset from 1
        if config.model_type in INTERLEAVED_ROPE_ARCHS:  # back from interleaved rotary pairs
            if name.endswith("attn_q.weight") or name.endswith("attn_q.bias"):
                w = _unpermute_rope(w, config.num_attention_heads, name)
            elif name.endswith("attn_k.weight") or name.endswith("attn_k.bias"):
                w = _unpermute_rope(w, config.num_key_value_heads, name)
        state[hf_name] = w
    return config, split_fused_projections(state, config)


class GGUFWeights:
    """A GGUF file's config and weights under camelid's names, as HFWeights gives an HF directory's: read all at
    once or a few at a time (`read(keep)`), each tensor dequantized only then."""

    def __init__(self, gguf: GGUFFile):
        self.gguf = gguf
        self.config = config_from_gguf(gguf)

    def shapes(self) -> dict[str, torch.Tensor]:
        return gguf_weight_shapes(self.gguf, self.config)

    def read(self, keep=None) -> dict[str, torch.Tensor]:
        return read_gguf_weights(self.gguf, keep, self.config)[1]

    def blocks(self, names, types) -> dict:
        """Those of the weights `names` (camelid's) that the file stores in one of `types` (ggml's numbers), by
        name, as native.Blocks for the kernels to take as they are: never made float. Their pages of the file
        are let go by release(found)."""
        from camelid.native import Blocks

        found = {}
        for name, hf_name in self._names.items():
            if hf_name not in names or (stored := self.gguf.blocks(name, types)) is None:
                continue
            rows, cols = self.gguf.tensors[name].shape
            order = None
            if self.config.model_type in INTERLEAVED_ROPE_ARCHS and name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = self.config.num_attention_heads if "attn_q" in name else self.config.num_key_value_heads
                order = _unpermute_rope(torch.arange(rows), heads, name)
            found[hf_name] = Blocks(stored[0], stored[1], rows, cols, order, name)
        return found

    @functools.cached_property
    def _names(self) -> dict[str, str]:
        return _gguf_names(self.gguf, self.config)

    def release(self, found: dict) -> None:
        """Let go of the file's pages that the Blocks of `found` (blocks'), now repacked, were read from."""
        for blocks in found.values():
            self.gguf.release(blocks.name)


def gguf_weight_shapes(gguf: GGUFFile, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every weight of the file as a meta tensor of its shape under camelid's names, read from the header only."""
    shapes = {hf_name: torch.empty(gguf.tensors[name].shape, device="meta")
              for name, hf_name in _gguf_names(gguf, config).items()}
    return split_fused_projections(shapes, config)


def _gguf_names(gguf: GGUFFile, config: ModelConfig) -> dict[str, str]:
    """The file's tensor names -> camelid's (a fused projection's before it is split), llama.cpp's rope_freqs
    left out; a tensor camelid has no place for is an error."""
    names = {}
    for name in gguf.tensors:
        if name == "rope_freqs.weight":
            continue
        hf_name = gguf_to_hf_name(name, gguf.metadata["general.architecture"])
        if hf_name is None:
            raise CamelidError(f"{gguf.path}: unexpected tensor {shown(name)}, which camelid's {config.model_type} has "
                               "no place for; the file holds parts camelid does not run")
        names[name] = hf_name
    return names
