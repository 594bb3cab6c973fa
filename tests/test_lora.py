"""LoRA against peft: adapters that peft loads on the transformers twin of our model with equal logits, peft's
adapters loaded here, merging that changes nothing, and adapter directories loading as models and merging to
directories that transformers loads."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from camelid.checkpoint import LoadedModel, load_model, save_model
from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.model import Llama
from camelid.lora import (
    LoRAConfig, LoRALinear, apply_lora, is_adapter_dir, load_adapter, merge_lora, save_adapter,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# Biases on q/k/v/o so that merging must keep them; GQA so that k/v differ in shape from q.
TINY = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, attention_bias=True)
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENS = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(1))
BASE_TEMPLATE = "{% for m in messages %}base {{ m.content }}\n{% endfor %}"
ADAPTER_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"


def twin_models(seed: int = 0):
    """A random camelid model and the transformers model holding the same weights, both in eval mode."""
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY.to_hf())).eval()
    with torch.no_grad():  # transformers zero-initialises biases; random ones prove that merging keeps them
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    ours = Llama(TINY).eval()
    ours.load_state_dict(hf.state_dict())
    return ours, hf


def tiny_tokenizer():
    """A word-level tokenizer over TINY's vocabulary: <unk>, <s>, </s>, then w3 ... w96."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from camelid.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, TINY.vocab_size)}}
    backend = Backend(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return Tokenizer(backend, bos_id=1, eos_id=2)


def randomize_adapters(model: torch.nn.Module, seed: int) -> None:
    """Non-zero B everywhere (a fresh adapter's B is zero, which would make every comparison trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


def adapted(seed: int = 0, config: LoRAConfig = LoRAConfig(targets=ALL_TARGETS, dropout=0.1)) -> Llama:
    model = apply_lora(twin_models(seed)[0], config)
    randomize_adapters(model, seed + 100)
    return model


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# -- the adapter layer --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    (dict(r=0), "r must be an integer of at least 1, not 0"),
    (dict(r=2.5), "r must be an integer"),
    (dict(alpha=0), "alpha must be a number above 0, not 0"),
    (dict(dropout=1.0), "dropout must be a number from 0 up to"),
    (dict(dropout=-0.1), "dropout must be"),
    (dict(targets=()), "targets are empty; choose some of: q_proj, k_proj"),
    (dict(targets=("q_proj", "lm_head")), r"unknown LoRA target 'lm_head'; choose from: q_proj, k_proj, v_proj"),
])
def test_config_refuses_bad_values(bad, match):
    with pytest.raises(CamelidError, match=match):
        LoRAConfig(**bad)
    assert LoRAConfig(targets="o_proj").targets == ("o_proj",)
    assert LoRAConfig(targets=["v_proj", "q_proj", "v_proj"]).targets == ("v_proj", "q_proj")


def test_new_adapter_changes_nothing_and_merged_model_equals_adapted_one():
    base, _ = twin_models()
    expected_base = logits(base)
    model = apply_lora(base, LoRAConfig(targets=ALL_TARGETS, dropout=0.1))
    assert isinstance(model.model.layers[1].mlp.down_proj, LoRALinear)
    assert not model.model.layers[0].self_attn.q_proj.lora_dropout.training  # follows the model's eval mode
    torch.testing.assert_close(logits(model), expected_base, atol=0, rtol=0)  # B starts at zero
    randomize_adapters(model, 7)
    unmerged = logits(model)
    assert (unmerged - expected_base).abs().max() > 0.01
    assert torch.equal(logits(model), unmerged)  # dropout is off in eval mode

    merged = merge_lora(model)
    assert merged.lora is None and not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(Llama(TINY).state_dict())  # plain names again: save_model works
    assert merged.model.layers[0].self_attn.q_proj.bias is not None
    torch.testing.assert_close(logits(merged), unmerged, atol=1e-5, rtol=0)


def test_only_adapter_weights_train():
    model = apply_lora(twin_models()[0].train(), LoRAConfig(r=4, targets=("q_proj", "v_proj", "down_proj")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"model.layers.{i}.{parent}.{name}.lora_{ab}.weight"
        for i in range(TINY.num_hidden_layers)
        for parent, name in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj"))
        for ab in "AB"
    }
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.shape == (4, 64)
    assert model.model.layers[0].mlp.down_proj.lora_B.weight.shape == (64, 4)
    torch.nn.functional.cross_entropy(model(TOKENS).flatten(0, 1), TOKENS.flatten()).backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # B starts at zero, so it is B that first gets a gradient
    assert all(model.model.layers[i].self_attn.q_proj.lora_B.weight.grad.abs().sum() > 0 for i in range(2))
    with pytest.raises(CamelidError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig())


def test_quantized_model_is_refused():
    from camelid.quantize import quantize_model

    model = quantize_model(twin_models()[0], "f16")
    with pytest.raises(CamelidError, match="without --quantize"):
        apply_lora(model, LoRAConfig())


# -- adapter directories ----------------------------------------------------------------------------------------


def test_save_and_load_round_trip_in_peft_format(tmp_path):
    model = adapted()
    tokenizer = tiny_tokenizer()
    out = save_adapter(model, tmp_path / "adapter", base_model="some/base", tokenizer=tokenizer,
                       chat_template=ADAPTER_TEMPLATE)
    assert is_adapter_dir(out) and not is_adapter_dir(tmp_path)
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                                                 "chat_template.jinja"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary directory left behind
    tensors = load_file(out / "adapter_model.safetensors")
    assert len(tensors) == 2 * 7 * TINY.num_hidden_layers
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in tensors
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.1)
    assert config["target_modules"] == list(ALL_TARGETS) and config["base_model_name_or_path"] == "some/base"

    loaded = load_adapter(twin_models()[0], out)
    assert loaded.lora == model.lora
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)

    with pytest.raises(CamelidError, match="already exists"):
        save_adapter(model, out, base_model="some/base")
    save_adapter(model, out, base_model="other", overwrite=True)
    assert "tokenizer.json" not in {p.name for p in out.iterdir()}  # replaced whole
    with pytest.raises(CamelidError, match="no LoRA adapters to save"):
        save_adapter(twin_models()[0], tmp_path / "none", base_model="x")


def test_peft_loads_our_adapter(tmp_path):
    model = adapted(config=LoRAConfig(r=4, alpha=12, targets=ALL_TARGETS))
    save_adapter(model, tmp_path / "adapter", base_model="base")
    _, hf = twin_models()
    reference = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    expected = logits(reference)
    assert (expected - logits(twin_models()[1])).abs().max() > 0.01  # the adapter does something
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_we_load_peft_adapters(tmp_path, targets):
    ours, hf = twin_models()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets, task_type="CAUSAL_LM")
    reference = peft.get_peft_model(hf, config)
    randomize_adapters(reference, 3)
    reference.save_pretrained(tmp_path / "peft")
    model = load_adapter(ours, tmp_path / "peft")
    assert model.lora.targets == (("q_proj", "v_proj") if targets != "all-linear" else ALL_TARGETS)
    assert (model.lora.r, model.lora.alpha) == (4, 8)
    torch.testing.assert_close(logits(model), logits(reference.eval()), atol=1e-5, rtol=0)


def test_adapter_names_in_keys_are_accepted(tmp_path):
    """Some tools save peft's in-memory names, with the adapter's name (`lora_A.default.weight`)."""
    model = adapted()
    out = save_adapter(model, tmp_path / "adapter", base_model="base")
    weights = out / "adapter_model.safetensors"
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in load_file(weights).items()}
    save_file(renamed, weights)
    torch.testing.assert_close(logits(load_adapter(twin_models()[0], out)), logits(model), atol=0, rtol=0)


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, match", [
    (dict(use_dora=True), "use_dora = true is not supported"),
    (dict(use_rslora=True), "use_rslora = true is not supported"),
    (dict(bias="all"), 'bias = "all" is not supported'),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(layers_to_transform=[0]), "layers_to_transform"),
    (dict(rank_pattern={"q_proj": 4}), "rank_pattern"),
    (dict(init_lora_weights="pissa"), "init_lora_weights 'pissa' changes the base weights"),
    (dict(peft_type="IA3"), "peft_type is 'IA3'; camelid loads only LoRA adapters"),
    (dict(task_type="SEQ_CLS"), "task_type is 'SEQ_CLS'"),
    (dict(target_modules=".*q_proj"), "target_modules is the pattern '.*q_proj'"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "unknown LoRA target 'embed_tokens'; choose from: q_proj"),
    (dict(r=0), r"adapter_config.json: LoRA r must be an integer of at least 1, not 0"),
    (dict(r=16), r"tensor model.layers.0.self_attn.q_proj.lora_A.weight has shape \(8, 64\), this model needs \(16, 6"),
    (dict(target_modules=["q_proj"]),
     r"unexpected tensor base_model.model.model.layers.0.mlp.down_proj.lora_A.weight \(24 unexpected, 0 missing\)"),
    (dict(target_modules=["model.layers.0.self_attn.q_proj", "self_attn.k_proj", *ALL_TARGETS[2:]]), None),
    (dict(target_modules=[*ALL_TARGETS[:6]]), "unexpected tensor .*down_proj"),
])
def test_unsupported_or_damaged_adapters_are_refused(tmp_path, changes, match):
    out = save_adapter(adapted(), tmp_path / "adapter", base_model="base")
    _edit_config(out, **changes)
    model = twin_models()[0]
    if match is None:  # peft's suffix-matched full names are read as the layer names they end in
        assert load_adapter(model, out).lora.targets == ALL_TARGETS
        return
    with pytest.raises(CamelidError, match=match) as exc_info:
        load_adapter(model, out)
    one_line(exc_info)
    assert model.lora is None and not any(isinstance(m, LoRALinear) for m in model.modules())


def test_adapter_files_that_are_missing_pickled_or_for_another_model(tmp_path):
    out = save_adapter(adapted(), tmp_path / "adapter", base_model="base")
    other = Llama(ModelConfig(**{**TINY.__dict__, "hidden_size": 32, "num_attention_heads": 2,
                                 "num_key_value_heads": 1}))
    with pytest.raises(CamelidError, match="has shape .* was the adapter trained on another base model"):
        load_adapter(other, out)
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(CamelidError, match="unreadable safetensors file"):
        load_adapter(twin_models()[0], out)
    weights.unlink()
    with pytest.raises(CamelidError, match="no adapter_model.safetensors"):
        load_adapter(twin_models()[0], out)
    (out / "adapter_model.bin").write_bytes(b"\x80\x04 never unpickled")
    with pytest.raises(CamelidError, match=r"only in a pickle file \(adapter_model.bin\), which camelid never loads"):
        load_model(out)
    (out / "adapter_config.json").write_text("{not json")
    with pytest.raises(CamelidError, match="not valid adapter config"):
        load_adapter(twin_models()[0], out)


# -- adapter directories as models ----------------------------------------------------------------------------


@pytest.fixture
def base_and_adapter(tmp_path):
    """A tiny base saved as an HF directory (with a tokenizer and template) and an adapter saved beside it."""
    base, _ = twin_models()
    tokenizer = tiny_tokenizer()
    save_model(LoadedModel(base, tokenizer, BASE_TEMPLATE, Path("tiny")), tmp_path / "base")
    model = adapted()
    adapter = save_adapter(model, tmp_path / "adapter", base_model="../base", tokenizer=tokenizer,
                           chat_template=ADAPTER_TEMPLATE)
    return tmp_path / "base", adapter, model


def test_adapter_directory_loads_as_its_merged_model(base_and_adapter, tmp_path, monkeypatch):
    base, adapter, model = base_and_adapter
    loaded = load_model(adapter, device="cpu", dtype="float32")
    assert loaded.source == adapter and loaded.chat_template == ADAPTER_TEMPLATE
    assert loaded.model.lora is None and not any(isinstance(m, LoRALinear) for m in loaded.model.modules())
    assert loaded.tokenizer.encode("w5 w6") == [5, 6]
    expected = logits(model)
    torch.testing.assert_close(logits(loaded.model), expected, atol=1e-5, rtol=0)
    quantized = load_model(adapter, device="cpu", dtype="float32", quantize="f16")  # merged, then quantized
    assert quantized.model.quantization == "f16"
    torch.testing.assert_close(logits(quantized.model), expected, atol=0.05, rtol=0)

    # Without its own tokenizer the adapter uses the base's, template included; a relative base may also be
    # found from the current directory.
    bare = save_adapter(model, tmp_path / "adapters" / "bare", base_model="base")
    monkeypatch.chdir(tmp_path)
    loaded = load_model(bare, device="cpu", dtype="float32")
    assert loaded.chat_template == BASE_TEMPLATE
    torch.testing.assert_close(logits(loaded.model), expected, atol=1e-5, rtol=0)


def test_missing_base_is_one_line_saying_where_it_was_looked_for(base_and_adapter, tmp_path):
    _, adapter, model = base_and_adapter
    _edit_config(adapter, base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    with pytest.raises(CamelidError, match=r"adapter .*adapter needs its base model 'meta-llama/Llama-2-7b-hf', "
                                           r"which is neither at .* nor a camelid model name") as exc_info:
        load_model(adapter, device="cpu")
    assert "base_model_name_or_path" in one_line(exc_info)
    _edit_config(adapter, base_model_name_or_path=None)
    with pytest.raises(CamelidError, match="no base_model_name_or_path; set it"):
        load_model(adapter, device="cpu")
    _edit_config(adapter, base_model_name_or_path=".")
    with pytest.raises(CamelidError, match="names the adapter itself"):
        load_model(adapter, device="cpu")


def test_save_model_refuses_unmerged_adapters(tmp_path):
    loaded = LoadedModel(adapted(), tiny_tokenizer(), None, Path("tiny"))
    with pytest.raises(CamelidError, match="unmerged LoRA adapters"):
        save_model(loaded, tmp_path / "out")


# -- camelid export merge ---------------------------------------------------------------------------------------


def test_export_merge_writes_a_model_transformers_loads(base_and_adapter, tmp_path, capsys):
    from camelid.cli import main

    base, adapter, _ = base_and_adapter
    out = tmp_path / "merged"
    assert main(["export", "merge", str(adapter), str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    hf_base = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    expected = logits(peft.PeftModel.from_pretrained(hf_base, adapter).eval())  # peft applies the adapter
    merged = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == ADAPTER_TEMPLATE

    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()  # (transformers' progress bars)
    assert main(["export", "merge", str(adapter), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err
    assert sorted(p.name for p in out.iterdir()) == before
    assert main(["export", "merge", str(adapter), str(out), "--force", "--dtype", "bfloat16"]) == 0
    assert load_file(out / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16

    assert main(["export", "merge", str(base), str(tmp_path / "x")]) == 1
    assert "not a LoRA adapter directory" in capsys.readouterr().err


def test_export_merge_help(capsys):
    from camelid.cli import main

    for argv in (["export", "--help"], ["export", "merge", "--help"]):
        with pytest.raises(SystemExit) as exc_info:
            main(argv)
        assert exc_info.value.code == 0
    text = capsys.readouterr().out
    assert "merge" in text and "ADAPTER" in text and "--force" in text and "--dtype" in text
    with pytest.raises(SystemExit) as exc_info:
        main(["export"])
    assert exc_info.value.code == 2


def test_fused_adapter_update_has_the_gradients_of_dropout_then_two_linears():
    """The training path (one-byte masks, x kept once) against plain autograd with the same dropout mask."""
    from camelid.lora import _LoRAUpdate

    x = torch.randn(3, 4, 16, dtype=torch.float64, requires_grad=True)
    a = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: _LoRAUpdate.apply(x, a, b, 0.0, 2.0), (x, a, b))

    torch.manual_seed(7)
    out = _LoRAUpdate.apply(x, a, b, 0.25, 2.0)
    grads = torch.autograd.grad(out.pow(2).sum(), (x, a, b))
    torch.manual_seed(7)
    keep = torch.empty(x.shape, dtype=torch.bool).bernoulli_(0.75)  # the same draw as inside the function
    assert 0 < keep.double().mean() < 1
    reference = ((x * keep / 0.75) @ a.T @ b.T) * 2.0
    torch.testing.assert_close(out, reference)
    for mine, theirs in zip(grads, torch.autograd.grad(reference.pow(2).sum(), (x, a, b))):
        torch.testing.assert_close(mine, theirs)


def test_adapters_on_a_bfloat16_base_train_under_autocast():
    """The CUDA recipe (bfloat16 base, float32 adapters, bf16 autocast), run on the CPU: it must give the
    float32 run's adapter gradients to within bfloat16's precision."""
    reference = adapted(3).train()
    mixed = adapted(3).train()
    for name, p in mixed.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    targets = TOKENS.roll(-1, dims=1)
    grads = []
    for model, autocast in ((reference, False), (mixed, True)):
        torch.manual_seed(5)  # the same dropout masks in both
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(TOKENS, targets=targets)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g.dtype == torch.float32 for g in grads[1].values())
    for name, g in grads[0].items():
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), grads[1][name].flatten(), dim=0)
        assert cosine > 0.99, (name, float(cosine))


def test_a_lora_training_pass_keeps_only_what_backward_needs():
    """Training memory is the activations autograd keeps. Per block that is: the two norms' inputs, the x the
    q and v adapters read (once) and their one-byte dropout masks, attention's q, k, v and output, the MLP's
    gate and up, and a few numbers per token. Anything more (a normalised copy, a dropped-out copy of x, silu's
    output, the vocabulary's logits) is a regression of the memory camelid promises."""
    model = apply_lora(twin_models()[0].train(), LoRAConfig(r=4, targets=("q_proj", "v_proj"), dropout=0.1))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    B, T = TOKENS.shape
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(TOKENS, targets=TOKENS.roll(-1, dims=1))
    c = TINY
    d, heads, kv, inter, r = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, 4
    dim = c.hidden_size // heads
    per_block = 4 * B * T * (2 * d + d + 2 * heads * dim + 2 * kv * dim + 2 * inter)  # float32 activations
    per_block += 2 * B * T * d  # the two bool masks
    per_block += 4 * B * T * (2 + heads + 2 * r)  # norms' 1/rms, attention's logsumexp, the adapters' x @ A.T
    rest = 4 * B * T * (2 * dim + d + 1 + d) + 8 * B * T  # cos/sin, the final norm, the loss's d/dhidden, indices
    assert sum(kept.values()) <= c.num_hidden_layers * per_block + rest
    loss.backward()


def test_all_linear_names_every_linear_layer_of_a_block():
    assert LoRAConfig(targets="all-linear").targets == LoRAConfig(targets=["all-linear"]).targets == ALL_TARGETS
    with pytest.raises(CamelidError, match="unknown LoRA target 'all-linear'"):
        LoRAConfig(targets=["all-linear", "q_proj"])  # a name for all of them, not one of them


# -- Phi-3's fused layers -----------------------------------------------------------------------------------------

PHI3 = ModelConfig(**{**TINY.__dict__, "model_type": "phi3", "attention_bias": False})  # qkv_proj, gate_up_proj


def phi3_model() -> Llama:
    """The same random Phi-3 model at every call."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Llama(PHI3).eval()


def saved_files(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((directory / "adapter_config.json").read_text()), load_file(directory / "adapter_model.safetensors")


@pytest.mark.parametrize("targets, ranks", [
    (("q_proj", "v_proj"), {"qkv_proj": 4}),
    ("all-linear", {"qkv_proj": 6, "gate_up_proj": 4}),
    (("k_proj", "o_proj", "up_proj"), {"qkv_proj": 2, "gate_up_proj": 2}),
])
def test_a_phi3_adapter_saved_loaded_and_saved_again_is_the_same_file(tmp_path, targets, ranks):
    """Saving stacks the parts' A and puts their B block-diagonal; loading cuts each part's block back out. So a
    rank-2 adapter stays rank 2 through any number of loads and saves (not 6, then 18), and one on q and v does
    not come back adapted on k too."""
    model = apply_lora(phi3_model(), LoRAConfig(r=2, alpha=6, targets=targets))
    randomize_adapters(model, 5)
    first = save_adapter(model, tmp_path / "first", base_model="base")
    config, tensors = saved_files(first)
    assert config["rank_pattern"] == ranks and config["alpha_pattern"] == {k: 3 * v for k, v in ranks.items()}

    back = load_adapter(phi3_model(), first)
    assert back.lora == model.lora and back.lora.rank_pattern == {}
    torch.testing.assert_close(logits(back), logits(model), atol=0, rtol=0)
    again_config, again_tensors = saved_files(save_adapter(back, tmp_path / "again", base_model="base"))
    assert again_config == config and again_tensors.keys() == tensors.keys()
    assert all(torch.equal(again_tensors[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), "all-linear"])
def test_an_untrained_phi3_adapter_saved_loaded_and_saved_again_is_the_same_file(tmp_path, targets):
    """A new adapter's B is zero, so its file cannot tell which parts it was on: it comes back with the parts'
    number and rank from adapter_config.json, which writes the same file again."""
    model = apply_lora(phi3_model(), LoRAConfig(r=2, alpha=6, targets=targets))
    first = save_adapter(model, tmp_path / "first", base_model="base")
    back = load_adapter(phi3_model(), first)
    assert (back.lora.r, back.lora.rank_pattern, len(back.lora.targets)) == (2, {}, len(model.lora.targets))
    (config, tensors), (again_config, again_tensors) = saved_files(first), saved_files(
        save_adapter(back, tmp_path / "again", base_model="base"))
    assert again_config == config and again_tensors.keys() == tensors.keys()
    assert all(torch.equal(again_tensors[k], v) for k, v in tensors.items())


def test_a_phi3_adapter_with_zero_columns_keeps_only_the_columns_in_use(tmp_path):
    """A fused adapter whose parts use only some of its columns loads with the columns used (exactly): rank and
    alpha shrink together, and a part that uses none is not adapted."""
    model = apply_lora(phi3_model(), LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj")))
    randomize_adapters(model, 6)
    out = save_adapter(model, tmp_path / "adapter", base_model="base")
    _, tensors = saved_files(out)
    for name, tensor in tensors.items():
        if "qkv_proj.lora_B" in name:  # q keeps columns 0 and 2 of its 0..3, v column 5 of its 4..7
            tensor[: PHI3.hidden_size, [1, 3]] = 0
            tensor[PHI3.hidden_size :, 4:] = tensor[PHI3.hidden_size :, 4:] * torch.tensor([0, 1, 0, 0])
    save_file(tensors, out / "adapter_model.safetensors")
    back = load_adapter(phi3_model(), out)
    assert back.lora.targets == ("q_proj", "v_proj") and back.lora.rank_pattern == {"qkv_proj": 2}
    assert back.lora.alpha_pattern == {"qkv_proj": 2 * 16 / 8}  # the fused scale 16 / 8 at rank 2
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.lora_B.weight[:, [1, 3]] = 0
            attn.v_proj.lora_B.weight[:, [0, 2, 3]] = 0
    torch.testing.assert_close(logits(back), logits(model), atol=1e-6, rtol=0)
