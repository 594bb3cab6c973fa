"""Writing a model out: a Hugging Face directory that transformers loads, or a GGUF file that llama.cpp runs.

`export_gguf` is the inverse of reading a GGUF (camelid.checkpoint.read_gguf_weights, config_from_gguf and
camelid.tokenizer.tokenizer_from_gguf): camelid loads its own f32 export back with identical weights, config and
tokenization. Tensors are named, laid out and typed as llama.cpp's own converter writes them: q/k rows in
llama.cpp's interleaved rotary order, 1-D tensors (norms, biases, rope factors) in f32, no output.weight for
tied embeddings. The vocabulary is rebuilt from the tokenizer as GGUF metadata and read back before anything is
written, so a tokenizer GGUF cannot express is refused instead of exported to tokenize differently.
"""

import contextlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from camelid.checkpoint import (
    FUSED_PROJECTIONS,
    GGUF_ARCHS,
    INTERLEAVED_ROPE_ARCHS,
    SMOLLM3_NOPE_STEP,
    LoadedModel,
    fuse_projections,
    gemma3_attention_scalar,
    gguf_names,
    load_model,
    save_model,
)
from camelid.config import GGUF_TYPES, ModelConfig, no_rope_every  # GGUF_TYPES: what --type offers
from camelid.errors import CamelidError
from camelid.kquants import quantize_q2_k, quantize_q3_k, quantize_q4_k, quantize_q5_k, quantize_q6_k, use_more_bits
from camelid.model import rope_inv_freq
from camelid.tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    Tokenizer,
    tokenizer_from_gguf,
)

FUSED_PARTS = {path.split(".")[1]: parts for path, parts in FUSED_PROJECTIONS.items()}  # qkv_proj -> q, k, v

# 4- and 5-bit files keep the vocabulary projection (output.weight, or the tied embedding that serves as one) in
# Q8_0: llama-quantize keeps it at 6 bits or more for these types, since every logit goes through it.
_LOW_BIT = ("q5_1", "q5_0", "q4_1", "q4_0")


def export_hf(model: LoadedModel | str | Path, out: str | Path, *, dtype=None, overwrite: bool = False) -> Path:
    """Write `model` as an HF-format directory (config.json, model.safetensors, tokenizer, chat template).

    `model` is a LoadedModel or anything `load_model` takes; a LoRA adapter directory comes merged into its base.
    `dtype` is float32 (default), bfloat16 or float16.
    """
    out = Path(out)
    check_output(out, overwrite=overwrite)
    loaded = _loaded(model)
    return save_model(loaded, out, dtype=dtype, overwrite=overwrite)


def export_gguf(
    model: LoadedModel | str | Path,
    out: str | Path,
    *,
    type: str = "f16",
    name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write `model` as one GGUF file that llama.cpp runs: weights, config, tokenizer and chat template.

    `model` is a LoadedModel or anything `load_model` takes (a LoRA adapter directory comes merged). `type` is one
    of GGUF_TYPES; 1-D tensors stay f32 whatever it is. `name` is stored as general.name (default: a GGUF's own,
    the run's name for a model `camelid train` wrote, the Hub id an HF directory came from, else the file or
    directory name). The file appears whole or not at all; an existing `out` is replaced only with `overwrite`.
    """
    from gguf import GGMLQuantizationType

    qtype = _gguf_type(type)
    out = Path(out)
    if out.is_dir():
        raise CamelidError(f"{out} is a directory; give the file to write, e.g. {out / 'model.gguf'}")
    check_output(out, overwrite=overwrite)
    loaded = _loaded(model)
    config = loaded.config
    _check_exportable(loaded)
    metadata = gguf_vocabulary(loaded.tokenizer, config.vocab_size)
    tensors = _gguf_tensor_plan(config, loaded.model.state_dict(), type)

    with _gguf_writer(out, gguf_architecture(config)) as writer:
        _add_model_metadata(writer, config, name or _default_name(loaded.source), qtype)
        for key, value in metadata.items():
            _add_value(writer, key, value)
        if loaded.chat_template:
            writer.add_chat_template(loaded.chat_template)
        for gguf_name, (tensor, tensor_type) in tensors.items():
            nbytes = _nbytes(tensor.shape, tensor_type)
            # The dtype only matters to the writer for raw byte arrays; the shape is the logical one.
            writer.add_tensor_info(gguf_name, tuple(tensor.shape), np.dtype(np.float32), nbytes,
                                   raw_dtype=GGMLQuantizationType[tensor_type.upper()])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(_nbytes(t.shape, k) for t, k in tensors.values())
        # On a terminal only (disable=None): seconds for SmolLM2, minutes for a 7B model.
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}",
                  disable=None if progress else True) as bar:
            for gguf_name, (tensor, tensor_type) in tensors.items():
                data = _encode(gguf_name, tensor, tensor_type, config)  # one tensor in memory at a time
                writer.write_tensor_data(data)
                bar.update(data.nbytes)
    return out


@contextlib.contextmanager
def _gguf_writer(out: Path, arch: str):
    """A GGUFWriter on a temporary file beside `out`, which becomes `out` when the block ends without an error and
    is removed when it does not: a GGUF file appears whole or not at all."""
    from gguf import GGUFWriter

    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    writer = GGUFWriter(tmp, arch)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        yield writer
        writer.close()
        os.replace(tmp, out)
    except OSError as exc:
        raise CamelidError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)


ADAPTER_TYPES = ("f32", "f16")  # what an adapter GGUF's lora_a / lora_b tensors are stored as


def export_gguf_adapter(adapter: str | Path, out: str | Path, *, base: str | Path | None = None,
                        type: str = "f32", overwrite: bool = False) -> Path:
    """Write a LoRA adapter directory as llama.cpp's adapter GGUF, for `llama-cli --lora` or llama-cpp-python's
    `lora_path=` on the base model's GGUF: `general.type` adapter, `adapter.type` lora, `adapter.lora.alpha`, and
    `blk.N.<tensor>.weight.lora_a` ([r, in]) and `.lora_b` ([out, r]) beside each adapted tensor's GGUF name.

    `base` is the model the adapter is meant for (its GGUF, HF directory or name; default: the base its
    adapter_config.json names); the adapter must fit it, tensor by tensor. Laid out as camelid's `export gguf`
    writes the base: q/k rows of B in llama.cpp's interleaved rotary order where the architecture has it, and
    adapters on Phi-3's q/k/v (gate/up) as one adapter on the fused tensor (A stacked, B block-diagonal). llama.cpp
    scales each tensor's update by alpha / its rank; where that is not the adapter's scale (a fused tensor's rank
    is the parts' sum), the factor is folded into B, so the file computes exactly the merged model's weights.
    """
    from camelid.checkpoint import resolve_model_path
    from camelid.lora import adapter_base, is_adapter_dir, read_adapter

    if type not in ADAPTER_TYPES:
        raise CamelidError(f"unknown adapter GGUF type {type!r}; choose {' or '.join(ADAPTER_TYPES)}")
    adapter, out = Path(adapter), Path(out)
    if not is_adapter_dir(adapter):
        raise CamelidError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json); `camelid export "
                           "gguf` writes whole models")
    if out.is_dir():
        raise CamelidError(f"{out} is a directory; give the file to write, e.g. {out / 'adapter.gguf'}")
    check_output(out, overwrite=overwrite)
    base_path = resolve_model_path(base if base is not None else adapter_base(adapter))
    if is_adapter_dir(base_path):
        raise CamelidError(f"{base_path} is an adapter itself; give the base model's GGUF file or directory")
    config = _base_config(base_path)
    _check_exportable_config(config)
    with torch.device("meta"):
        from camelid.model import Llama

        skeleton = Llama(config)  # shapes only: the adapter is checked against the base without its weights
    try:
        lora, weights = read_adapter(skeleton, adapter)
    except CamelidError as exc:
        raise CamelidError(f"the adapter does not fit the base {base_path}: {exc}") from None
    tensors = _adapter_tensors(weights, lora, config)

    with _gguf_writer(out, gguf_architecture(config)) as writer:
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(lora.alpha))
        writer.add_name(f"{_default_name(adapter)} (LoRA adapter)")
        dtype = np.float32 if type == "f32" else np.float16
        for name, tensor in tensors.items():
            writer.add_tensor(name, np.ascontiguousarray(tensor.numpy().astype(dtype)))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return out


def _base_config(path: Path) -> ModelConfig:
    from camelid.checkpoint import config_from_gguf
    from camelid.gguf_file import GGUFFile

    return ModelConfig.load(path) if path.is_dir() else config_from_gguf(GGUFFile(path))


def _adapter_tensors(weights: dict[str, torch.Tensor], lora, config: ModelConfig) -> dict[str, torch.Tensor]:
    """GGUF name -> float32 tensor of an adapter's A and B, laid out as llama.cpp applies them to the base."""
    from camelid.lora import _fuse_adapters

    weights = {k: v.detach().float().cpu() for k, v in weights.items()}
    targets = {k.split(".")[-3] for k in weights}
    scale = {t: lora.alpha_of(t) / lora.rank(t) for t in targets}  # the update each target adds, per unit of BA
    if config.fused_projections:
        weights, patterns = _fuse_adapters(weights, lora, config)
        parts = {fused: FUSED_PARTS[fused] for fused in patterns["rank_pattern"]}
        scale.update({fused: scale[next(p for p in ps if p in targets)] for fused, ps in parts.items()})
    arch = gguf_architecture(config)
    out = {}
    for name, tensor in weights.items():
        module, which = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]  # model.layers.3.self_attn.q_proj, lora_A
        gguf_name = hf_to_gguf_name(f"{module}.weight", arch)
        if which == "lora_B":
            rank = tensor.shape[1]
            tensor = tensor * (scale[module.rsplit(".", 1)[1]] * rank / lora.alpha)  # llama.cpp: alpha / rank
            if arch in INTERLEAVED_ROPE_ARCHS and gguf_name.split(".")[2] in ("attn_q", "attn_k"):
                heads = config.num_attention_heads if ".attn_q." in gguf_name else config.num_key_value_heads
                tensor = _permute_rope(tensor, heads)
        out[f"{gguf_name}.{which.lower()}"] = tensor
    return out


def check_output(out: str | Path, *, overwrite: bool = False) -> None:
    """Refuse an existing `out` (an empty directory is fine) unless `overwrite`, before any slow work."""
    out = Path(out)
    if out.is_dir() and not any(out.iterdir()):
        return
    if out.exists() and not overwrite:
        raise CamelidError(f"{out} already exists; choose another path, or pass --force to replace it")


def _loaded(model: LoadedModel | str | Path) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    return load_model(model, device="cpu", dtype="float32")


def _check_exportable(loaded: LoadedModel) -> None:
    model = loaded.model
    if model.quantization != "none":
        raise CamelidError(
            f"this model was loaded with --quantize {model.quantization}; "
            "load it without (quantize='none') to export it"
        )
    if model.lora is not None:
        raise CamelidError("this model has unmerged LoRA adapters; merge them first (merge_lora)")
    _check_exportable_config(loaded.config)


def _check_exportable_config(config: ModelConfig) -> None:
    """A one-line refusal where llama.cpp's architecture cannot hold a model of this config."""
    if config.mlp_bias:
        raise CamelidError("this model has MLP biases, which GGUF's llama architecture has no tensors for")
    if config.model_type == "smollm3" and config.no_rope_layers not in (
            None, no_rope_every(SMOLLM3_NOPE_STEP, config.num_hidden_layers)):
        raise CamelidError(f"llama.cpp's smollm3 leaves the rotary embedding out of every {SMOLLM3_NOPE_STEP}th layer "
                           "only; this model's no_rope_layers differ, so it cannot be exported as GGUF")
    if config.model_type == "phi3" and config.num_attention_heads * config.head_dim != config.hidden_size:
        raise CamelidError("llama.cpp's phi3 needs num_attention_heads x head_dim = hidden_size; this model's "
                           f"{config.num_attention_heads} x {config.head_dim} is not {config.hidden_size}, so it "
                           "cannot be exported as GGUF")
    if config.gemma:
        scalar = gemma3_attention_scalar(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                                         config.head_dim)
        if config.query_pre_attn_scalar != scalar:
            raise CamelidError(f"llama.cpp's gemma3 scales attention scores by 1/sqrt({scalar}); this model's "
                               f"query_pre_attn_scalar is {config.query_pre_attn_scalar}, so it cannot be exported "
                               "as GGUF")


def gguf_architecture(config: ModelConfig) -> str:
    """llama.cpp's architecture for a family: Mistral v0.1 is written as llama, the others under their own name."""
    if config.model_type == "mistral":
        return "llama"
    return next(arch for arch, model_type in GGUF_ARCHS.items() if model_type == config.model_type)


def _gguf_type(kind: str):
    """The file type `kind` names: a tensor type, or a K-quant mix (LlamaFileType's MOSTLY_Q4_K_M, ...)."""
    from gguf import GGMLQuantizationType, LlamaFileType

    if kind not in GGUF_TYPES:
        raise CamelidError(f"unknown GGUF type {kind!r}; choose one of: {', '.join(GGUF_TYPES)}")
    return LlamaFileType[f"MOSTLY_{kind.upper()}"] if kind in K_MIXES else GGMLQuantizationType[kind.upper()]


def _default_name(source: str | Path) -> str:
    """The general.name a model is exported under when none is given: a GGUF file's own general.name (else its
    stem); for a model `camelid train` wrote, its run's name (RUN/model -> RUN, RUN/checkpoints/step-N/model ->
    RUN-step-N); for an HF directory, the Hub id transformers saved in its config.json, without the organisation;
    else the directory's name. A train run's model directory is always called `model`, which says nothing."""
    source = Path(source)
    if source.is_file():
        from camelid.gguf_file import GGUFFile

        try:
            return str(GGUFFile(source).metadata.get("general.name") or source.stem)
        except CamelidError:
            return source.stem
    return _run_name(source) or _hub_name(source) or source.resolve().name


def _run_name(directory: Path) -> str | None:
    """The run's name if `directory` is a model in a `camelid train` run directory (camelid.train.loop), else None."""
    directory = directory.resolve()
    if directory.name != "model":
        return None
    step = directory.parent
    run, suffix = (step.parent.parent, f"-{step.name}") if step.parent.name == "checkpoints" else (step, "")
    is_run = (run / "config.json").is_file() and (run / "metrics.jsonl").is_file()
    return run.name + suffix if is_run else None


def _hub_name(directory: Path) -> str | None:
    """The model name in an HF directory's config.json `_name_or_path` (HuggingFaceTB/SmolLM2-135M-Instruct ->
    SmolLM2-135M-Instruct), if it is a Hub id rather than a path on the machine that saved it; else None."""
    try:
        value = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    # As llama.cpp's converter decides: a Hub id is "name" or "org/name"; "/fsx/run-3/ckpt" or "./out" are paths.
    if isinstance(value, str) and re.fullmatch(r"[\w-][\w.-]*(/[\w-][\w.-]*)?", value):
        return value.rsplit("/", 1)[-1]
    return None


# -- the model -------------------------------------------------------------------------------------------------

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def hf_to_gguf_name(name: str, arch: str = "llama") -> str:
    """The GGUF name of a camelid (HF) tensor name: model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight."""
    hf_to_gguf = {hf: gguf for gguf, hf in gguf_names(arch).items()}
    if m := _LAYER.fullmatch(name):
        template = hf_to_gguf.get(f"model.layers.{{i}}.{m[2]}")
        if template is not None:
            return template.format(i=m[1])
    elif name in hf_to_gguf:
        return hf_to_gguf[name]
    raise CamelidError(f"tensor {name} has no counterpart in llama.cpp's GGUF names; this model cannot be exported")


def _gguf_tensor_plan(config: ModelConfig, state: dict[str, torch.Tensor], kind: str) -> dict[str, tuple]:
    """GGUF name -> (tensor in camelid's layout, type name), in the order they are written."""
    plan = {}
    if (config.rope_scaling or {}).get("rope_type") == "llama3":
        # llama.cpp keeps Llama-3.1 scaling as per-frequency divisors of the plain frequencies.
        plain = rope_inv_freq(ModelConfig(**{**config.__dict__, "rope_scaling": None}))
        plan["rope_freqs.weight"] = ((plain / rope_inv_freq(config)).float(), "f32")
    counts = {}  # of the attn_v (or attn_qkv) tensors so far, as llama-quantize counts them
    for hf_name, tensor in fuse_projections(state, config).items():  # Phi-3's attn_qkv and gate-and-up ffn_up
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses token_embd for the output when there is no output.weight
        gguf_name = hf_to_gguf_name(hf_name, gguf_architecture(config))
        if kind in K_MIXES and len(tensor.shape) >= 2 and gguf_name.endswith(".weight"):
            part = gguf_name.split(".")[-2]
            group = "attn_v" if part in ("attn_v", "attn_qkv") else part
            index = counts[group] = counts.get(group, -1) + 1
            plan[gguf_name] = (tensor, _k_mix_type(gguf_name, tensor.shape[-1], kind, index, config))
        else:
            plan[gguf_name] = (tensor, _tensor_type(gguf_name, tensor.shape, kind, config))
    return plan


# A K-quant mix -> the type of most of its tensors. llama-quantize gives some tensors more bits (_k_mix_type).
K_MIXES = {"q2_k": "q2_k", "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k", "q4_k_s": "q4_k", "q4_k_m": "q4_k",
           "q5_k_s": "q5_k", "q5_k_m": "q5_k", "q6_k": "q6_k"}
# A 256-weight K-quant block that a row is too short for -> the 32-weight type llama-quantize uses instead.
_K_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def _k_mix_type(gguf_name: str, columns: int, mix: str, index: int, config: ModelConfig) -> str:
    """The type llama-quantize gives a 2-D weight in a file of K-quant `mix` (its llama_tensor_get_type for
    models without experts): the vocabulary projection Q6_K; more bits for attn_v (attn_qkv) and ffn_down (for
    q4_k_m and q5_k_m in the first and last eighth of the layers and every third between; for q4_k_s and q3_k_m
    in the first few), and for attn_output in q3_k_m, q3_k_l and q2_k; attn_v at least Q5_K in a 70B model;
    the rest the mix's type. `index` counts the tensors of the same kind before this one. Rows not a multiple of
    256 wide take a 32-weight type (Q4_0, Q5_0, Q5_1, Q8_0), rows not a multiple of 32 f16."""
    layers = config.num_hidden_layers
    more_bits = use_more_bits(index, layers)
    part = gguf_name.split(".")[-2]
    kind = K_MIXES[mix]
    if gguf_name == "output.weight" or (gguf_name == "token_embd.weight" and config.tie_word_embeddings):
        kind = "q8_0" if columns % 256 else "q6_k"
    elif part in ("attn_v", "attn_qkv"):
        if mix == "q2_k":
            kind = "q4_k" if config.num_attention_heads // config.num_key_value_heads >= 4 else "q3_k"
        elif mix == "q3_k_m":
            kind = "q5_k" if index < 2 else "q4_k"
        elif mix == "q3_k_l":
            kind = "q5_k"
        elif mix in ("q4_k_m", "q5_k_m") and more_bits:
            kind = "q6_k"
        elif mix == "q4_k_s" and index < 4:
            kind = "q5_k"
        if _is_70b(config) and kind in ("q3_k", "q4_k"):  # 70B's attn_v is small (8 query heads to one): cheap
            kind = "q5_k"
    elif part == "ffn_down":
        if mix == "q2_k":
            kind = "q3_k"
        elif mix == "q3_k_m":
            kind = "q5_k" if index < layers // 16 else "q4_k"
        elif mix == "q3_k_l":
            kind = "q5_k"
        elif mix in ("q4_k_m", "q5_k_m") and more_bits:
            kind = "q6_k"
        elif mix == "q4_k_s" and index < layers // 8:
            kind = "q5_k"
    elif part == "attn_output":
        kind = {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(mix, kind)
    if kind in _K_FALLBACK and columns % 256:
        kind = _K_FALLBACK[kind]
    return "f16" if columns % 32 else kind


def _is_70b(config: ModelConfig) -> bool:
    """Whether llama.cpp counts the model as 70B (80 layers: Llama 2/3 70B with grouped keys, Qwen2 72B)."""
    arch = gguf_architecture(config)
    return config.num_hidden_layers == 80 and (
        arch == "qwen2" or (arch == "llama" and config.num_attention_heads != config.num_key_value_heads))


def _tensor_type(gguf_name: str, shape, kind: str, config: ModelConfig) -> str:
    """The type llama.cpp's converter would give this tensor in a file of type `kind`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) < 2 or not gguf_name.endswith(".weight"):
        return "f32"  # norms and biases: tiny, and precision-critical
    if kind in _LOW_BIT and (gguf_name == "output.weight" or (gguf_name == "token_embd.weight"
                                                               and config.tie_word_embeddings)):
        kind = "q8_0"
    block, _ = GGML_QUANT_SIZES[GGMLQuantizationType[kind.upper()]]
    if shape[-1] % block:
        return "f16"  # rows that do not fill whole blocks cannot be quantized; the converter falls back the same way
    return kind


def _nbytes(shape, kind: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind.upper()]]
    return int(np.prod(shape, dtype=np.int64)) // block * block_bytes


def _permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from the HF half-split rotary layout to llama.cpp's interleaved pairs (inverse of _unpermute_rope)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _encode(gguf_name: str, tensor: torch.Tensor, kind: str, config: ModelConfig) -> np.ndarray:
    """The tensor's bytes as GGUF stores them."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    w = tensor.detach().to(device="cpu", dtype=torch.float32)
    if config.gemma and gguf_name.endswith("norm.weight"):
        w = w + 1  # llama.cpp's gemma3 multiplies by the norm weight as stored
    if gguf_architecture(config) in INTERLEAVED_ROPE_ARCHS:  # the others keep the Hugging Face rotary layout
        if ".attn_q." in gguf_name:
            w = _permute_rope(w, config.num_attention_heads)
        elif ".attn_k." in gguf_name:
            w = _permute_rope(w, config.num_key_value_heads)
    if kind in _K_QUANTIZERS:
        return _K_QUANTIZERS[kind](w.numpy().reshape(-1, w.shape[-1]))
    return quantize(np.ascontiguousarray(w.numpy()), GGMLQuantizationType[kind.upper()])


_K_QUANTIZERS = {"q2_k": quantize_q2_k, "q3_k": quantize_q3_k, "q4_k": quantize_q4_k, "q5_k": quantize_q5_k,
                 "q6_k": quantize_q6_k}


def _add_model_metadata(writer, config: ModelConfig, name: str, qtype) -> None:
    from gguf import GGML_QUANT_VERSION, LlamaFileType, RopeScalingType

    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(qtype if isinstance(qtype, LlamaFileType) else
                         LlamaFileType["ALL_F32" if qtype.name == "F32" else f"MOSTLY_{qtype.name}"])
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    context = config.max_position_embeddings
    if config.gemma and config.sliding_window:  # llama.cpp's gemma3 runs the local layers' windows
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern([config.window(i) is not None for i in range(config.num_hidden_layers)])
        writer.add_rope_freq_base_swa(config.rope_local_base_freq)
    else:  # llama.cpp runs the other architectures without sliding windows: a model with one is exact up to it
        context = min(context, config.sliding_window or context)
        if config.model_type == "phi3":  # kept as llama.cpp's converter writes it (0: none), though phi3 ignores it
            writer.add_sliding_window(config.sliding_window or 0)
    writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    # llama3 scaling travels as the rope_freqs tensor, as llama.cpp's converter writes it.


def _add_value(writer, key: str, value: Any) -> None:
    """One metadata value, typed as llama.cpp reads it (ids uint32, flags bool, arrays by element)."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


# -- the vocabulary --------------------------------------------------------------------------------------------

# Texts that tell llama.cpp's pre-tokenizers apart (digits one by one, in threes or in runs; case-insensitive
# contractions; punctuation glued to letters or newlines; whitespace runs) and check a rebuilt vocabulary.
PROBE_TEXTS = (
    "Hello world! I'm here, you're there; THEY'LL say 'hi' and we'd've gone. It's 'quoted' -- DON'T.",
    "Numbers: 7, 42, 314, 2718, 31415926 and 3.14159 or 1,000,000 (in 2024) cost $5.99 + 10% = <x>",
    "  two spaces,\tthen a tab\nand lines\r\n\n\n   indented\n\n",
    "code: def f(x):\n    return {'a': [1, 2, 3]}  # done...!?\n```python\nprint(f(2) ** 2)\n```",
    "ünïcödé café naïve — 日本語のテキスト, Привет мир, مرحبا بالعالم, हिन्दी, 🦙🔥👍🏽 emoji ½ ٣٤٥",
    "(parenthesised)words\"quoted\"and...ellipsis!!! ~^|`<=> @user #tag https://example.com/a?b=c&d=e",
    " leading space",
    "trailing space ",
    "\n",
    "",
)
# A preferred name for each distinct pre-tokenizer camelid and llama.cpp know, tried in this order.
_PRE_NAMES = ("llama-bpe", "smaug-bpe", "smollm", "gpt-2", "qwen2", "falcon", "default")


def gguf_vocabulary(tokenizer: Tokenizer, vocab_size: int | None = None) -> dict[str, Any]:
    """The tokenizer.ggml.* metadata that makes llama.cpp and `tokenizer_from_gguf` tokenize as `tokenizer` does.

    Byte-level BPE (SmolLM2, Llama 3, GPT-2) becomes model 'gpt2' with its merges and the llama.cpp pre-tokenizer
    name whose splitting it matches; SentencePiece-style BPE (Llama 2, TinyLlama, Mistral) becomes model 'llama'
    with scores ranked as its merges are. The vocabulary is padded with unused tokens to `vocab_size` (the
    embedding's rows), as llama.cpp requires. The result is read back and compared with `tokenizer` on test texts;
    a tokenizer GGUF cannot express raises.
    """
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise CamelidError(
            f"a {model.get('type')} tokenizer cannot be written to GGUF; camelid writes byte-level BPE ('gpt2') "
            "and SentencePiece-style BPE ('llama') vocabularies"
        )
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    tokens, types = _token_list(tokenizer, model, byte_level, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {"tokenizer.ggml.model": "gpt2" if byte_level else "llama"}
    if byte_level:
        meta["tokenizer.ggml.pre"] = _pre_tokenizer_name(tokenizer, bool(model.get("ignore_merges")))
    meta["tokenizer.ggml.tokens"] = tokens
    meta["tokenizer.ggml.token_type"] = types
    if byte_level:
        meta["tokenizer.ggml.merges"] = merges
    else:
        meta["tokenizer.ggml.scores"] = _scores_from_merges(tokens, types, merges)
        meta["tokenizer.ggml.add_space_prefix"] = _adds_space_prefix(spec)
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "unknown": _unk_id(tokenizer, model),
           "padding": tokenizer.pad_id}
    meta.update({f"tokenizer.ggml.{key}_token_id": i for key, i in ids.items() if i is not None})
    meta["tokenizer.ggml.add_bos_token"] = tokenizer.add_bos
    meta["tokenizer.ggml.add_eos_token"] = tokenizer.add_eos

    rebuilt = tokenizer_from_gguf(meta)
    # Stop tokens that llama.cpp would not find by their text go in its two extra end-of-generation slots.
    extra = sorted(tokenizer.stop_ids - rebuilt.stop_ids)
    if extra:
        meta.update(dict(zip(("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"), extra)))
        rebuilt = tokenizer_from_gguf(meta)
    _check_same_tokenization(tokenizer, rebuilt, byte_level)
    return meta


def _token_list(tokenizer: Tokenizer, model: dict, byte_level: bool, vocab_size: int | None):
    backend = tokenizer.backend
    by_id = {i: token for token, i in backend.get_vocab(with_added_tokens=True).items()}
    added = backend.get_added_tokens_decoder()
    n = max(by_id) + 1
    if vocab_size is not None and n > vocab_size:
        raise CamelidError(
            f"the tokenizer has {n} tokens but the model's embedding only {vocab_size} rows; "
            "the two do not belong together"
        )
    unk_id = _unk_id(tokenizer, model)
    byte_fallback = bool(model.get("byte_fallback"))
    tokens, types = [], []
    for i in range(max(n, vocab_size or 0)):
        token = by_id.get(i)
        if token is None:  # a gap, or padding up to the embedding's rows: llama.cpp's converter names these so
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        if i == unk_id and not byte_level:
            kind = UNKNOWN
        elif i in added:
            kind = CONTROL if added[i].special else USER_DEFINED
        elif byte_fallback and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            kind = BYTE
        else:
            kind = NORMAL
        tokens.append(token)
        types.append(kind)
    return tokens, types


def _unk_id(tokenizer: Tokenizer, model: dict) -> int | None:
    unk = model.get("unk_token")
    return tokenizer.backend.token_to_id(unk) if unk else None


def _scores_from_merges(tokens: list[str], types: list[int], merges: list[str]) -> list[float]:
    """SentencePiece-style scores that rank tokens as the merges do.

    llama.cpp (and tokenizer_from_gguf) merge the adjacent pair whose joined text is the best-scoring token, so a
    token scores minus the rank of the first merge that makes it; tokens no merge makes score below them all.
    """
    first = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1)
        first.setdefault(left + right, rank)
    floor = -float(len(merges))
    return [0.0 if kind in (CONTROL, BYTE, UNKNOWN) else -float(first[t]) if t in first else floor
            for t, kind in zip(tokens, types)]


def _adds_space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts '▁' before the text (a Prepend normalizer or a Metaspace
    pre-tokenizer that prepends), as `add_dummy_prefix` did in SentencePiece."""
    normalizer = json.dumps(spec.get("normalizer"))
    if '"Prepend"' in normalizer:
        return True
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never") != "never"
    return False


def _pre_tokenizer_name(tokenizer: Tokenizer, ignore_merges: bool) -> str:
    """The llama.cpp pre-tokenizer name whose splitting equals this byte-level tokenizer's on PROBE_TEXTS."""
    from tokenizers import Regex, pre_tokenizers

    # The split tables tokenizer_from_gguf builds from: one source for reading and writing.
    from camelid.tokenizer import _LLAMA3_LIKE, _SPLITS_BY_PRE

    probe = "\n".join(PROBE_TEXTS)
    ours = [piece for piece, _ in tokenizer.backend.pre_tokenizer.pre_tokenize_str(probe)]
    for name in _PRE_NAMES:
        if (name in _LLAMA3_LIKE) != ignore_merges:
            continue  # whole-word lookup before merging comes with the Llama-3 names only
        candidate = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _SPLITS_BY_PRE[name]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
        )
        if [piece for piece, _ in candidate.pre_tokenize_str(probe)] == ours:
            return name
    raise CamelidError(
        "this byte-level tokenizer splits text unlike any llama.cpp pre-tokenizer camelid knows "
        f"({', '.join(_PRE_NAMES)}); it cannot be written to GGUF"
    )


def _check_same_tokenization(ours: Tokenizer, rebuilt: Tokenizer, byte_level: bool) -> None:
    facts = ("bos_id", "eos_id", "pad_id", "add_bos", "add_eos")
    for fact in facts:
        if getattr(ours, fact) != getattr(rebuilt, fact):
            raise CamelidError(
                f"the tokenizer's {fact} ({getattr(ours, fact)}) does not survive as GGUF metadata "
                f"(read back: {getattr(rebuilt, fact)}); it cannot be exported"
            )
    if lost := sorted(ours.stop_ids - rebuilt.stop_ids):
        raise CamelidError(
            f"the tokenizer ends turns with more tokens than GGUF can name (ids {lost} would be lost); "
            "it cannot be exported"
        )
    if byte_level:
        specials = [t.content for t in ours.backend.get_added_tokens_decoder().values()]
        texts = [*PROBE_TEXTS, *(f"{s}user\n{PROBE_TEXTS[0]}{s}\n" for s in specials[:50])]
    else:
        # Where Hugging Face's SentencePiece emulation is known to differ from SentencePiece, the GGUF follows
        # SentencePiece (as llama.cpp does): the '▁' prefix goes before text that starts with a space, and after
        # every special token, not only the first. So these are checked on plain text that starts with no space.
        texts = [t for t in PROBE_TEXTS if not t[:1].isspace()]
    for text in texts:
        if ours.encode(text) != rebuilt.encode(text):
            raise CamelidError(
                f"the tokenizer cannot be written as a GGUF vocabulary that tokenizes the same (it differs on "
                f"{text[:40]!r}); export to an HF directory instead (camelid export hf)"
            )
