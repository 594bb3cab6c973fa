"""`camelid cost`: parameter counts against real models (camelid's on the meta device, transformers'), the FLOP
formula on a case small enough to check by hand, token counts against what the training code itself batches
(and what a real training run reports), the published Alpaca and Vicuna runs, and the CLI's errors and JSON."""

import json
import math

import pytest
import torch
from torch import nn

from camelid.cli import main
from camelid.config import PRESETS, ModelConfig, preset
from camelid.cost import (
    DEFAULT_UTILIZATION,
    GPUS,
    count_parameters,
    estimate_cost,
    find_gpu,
    lora_parameters,
    parse_count,
)
from camelid.errors import CamelidError
from camelid.model import Llama
from camelid.train.recipe import build_config, read_recipe


def meta_model(config: ModelConfig) -> Llama:
    with torch.device("meta"):
        return Llama(config)


# -- parameters ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_counts_equal_the_model_built_from_each_preset(name):
    config = preset(name)
    model = meta_model(config)
    counted = count_parameters(config)
    unique = {id(p): p for p in model.parameters()}.values()  # a tied head is the embedding's tensor
    assert counted.total == model.num_parameters() == sum(p.numel() for p in unique)
    # N of the FLOP formulas: every weight of every linear layer, the head included (once, even when tied)
    linear = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                 for m in model.modules() if isinstance(m, nn.Linear))
    assert counted.matmul == linear
    assert counted.embedding == model.model.embed_tokens.weight.numel()
    assert (counted.head == 0) == config.tie_word_embeddings


def test_llama_7b_and_13b_counts_are_the_published_ones():
    # LLaMA-1 7B/13B have Llama-2's shapes: 6,738,415,616 and 13,015,864,320 parameters (their HF checkpoints)
    assert count_parameters(preset("llama-2-7b")).total == 6_738_415_616
    assert count_parameters(preset("llama-2-13b")).total == 13_015_864_320
    assert count_parameters(preset("llama-2-7b")).matmul == 6_738_415_616 - 32000 * 4096 - (2 * 32 + 1) * 4096


@pytest.mark.parametrize("variant", [
    dict(tie_word_embeddings=True),
    dict(tie_word_embeddings=False, num_key_value_heads=2),
    dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True, head_dim=32),
])
def test_parameter_counts_equal_transformers(variant):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=variant.pop("num_key_value_heads", 4),
                                  **variant)
    expected = transformers.LlamaForCausalLM(hf).num_parameters()
    assert count_parameters(ModelConfig.from_hf(hf.to_dict())).total == expected


def test_lora_parameters_equal_the_adapters_apply_lora_adds():
    from camelid.lora import LoRAConfig, apply_lora

    config = preset("tinyllama-1.1b")  # grouped-query attention: k and v are narrower than q
    lora = LoRAConfig(r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    model = apply_lora(meta_model(config), lora)
    assert lora_parameters(config, lora) == sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- the formula on a hand-checkable case -------------------------------------------------------------------------

TINY = ModelConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)


def tiny_recipe(**kw):
    values = dict(model="./not-here", data="not-here.jsonl", out="runs/x", method="full", seq_len=8, packing=False,
                  batch_size=2, micro_batch_size=1, epochs=1)
    return build_config({**values, **kw})


def tiny_estimate(**kw):
    return estimate_cost(tiny_recipe(**kw), gpu="A100-80GB", model_config=TINY, examples=4, tokens_per_example=8)


def test_flops_by_hand():
    # N: q, k, v, o 4x4 each = 64; gate, up, down 4x8 each = 96; head 10x4 = 40 -> 200 (embedding and norms out).
    # 4 examples, one per row, 2 a step, 1 epoch -> 2 steps x 2 rows x 8 tokens: D = 32; S = 32 x 8 = 256.
    est = tiny_estimate()
    assert est.n == 200 and est.parameters == 40 + 200 + 3 * 4  # + embedding 40, norms 3 x 4
    assert (est.tokens.steps, est.tokens.processed, est.tokens.squares) == (2, 32, 256)
    assert est.flops.weights == 6 * 200 * 32 == 38_400
    assert est.flops.attention == 12 * 1 * 4 * 256 == 12_288  # 12·L·d·S
    assert est.flops.recompute == 0 and est.flops.evaluation == 0
    assert est.seconds == pytest.approx(50_688 / (312e12 * DEFAULT_UTILIZATION))
    assert est.gpu_hours == est.hours and est.dollars is None

    again = tiny_estimate(gradient_checkpointing=True)  # the forward once more: 2·N·D + 4·L·d·S
    assert again.flops.recompute == 2 * 200 * 32 + 4 * 4 * 256 == 16_896
    assert again.flops.training == 67_584

    lora = tiny_estimate(method="lora", lora_r=2, lora_targets="q_proj,v_proj")
    assert lora.lora_parameters == 2 * (4 + 4) + 2 * (4 + 4) == 32
    # frozen weights: forward and activation gradients 4·N·D; adapters 6·N_lora·D; attention as before
    assert lora.flops.weights == 4 * 200 * 32 + 6 * 32 * 32 == 31_744
    assert lora.flops.training == 31_744 + 12_288


def test_time_gpu_hours_and_dollars_follow_count_utilization_and_price():
    one = estimate_cost(tiny_recipe(), gpu="H100-SXM", model_config=TINY, examples=4, tokens_per_example=8)
    two = estimate_cost(tiny_recipe(), gpu="H100-SXM", count=2, utilization=0.4, price=3.0, model_config=TINY,
                        examples=4, tokens_per_example=8)
    assert one.flops.training == two.flops.training
    assert two.hours == pytest.approx(one.hours / 4)  # twice the GPUs, twice the utilisation
    assert two.gpu_hours == pytest.approx(2 * two.hours) and two.dollars == pytest.approx(two.gpu_hours * 3.0)


def test_steps_round_as_training_does_and_evaluation_is_counted():
    # 10 examples, 1 held out: 9 rows, batches of 2 -> 5 steps an epoch, 1.5 epochs -> 8 steps (ceil), wrapping
    est = estimate_cost(tiny_recipe(epochs=1.5, eval_fraction=0.1, eval_every=3), gpu="A100-80GB",
                        model_config=TINY, examples=10, tokens_per_example=6)
    t = est.tokens
    assert (t.rows, t.steps, t.processed) == (9, 8, 8 * 2 * 6)
    assert (t.eval_processed, t.evaluations) == (6, 3)  # after steps 3 and 6, and at the end
    assert est.flops.evaluation == 3 * (2 * 200 * 6 + 4 * 4 * 6 * 6)


# -- tokens from a real data file ---------------------------------------------------------------------------------


def write_chats(path, n=30):
    """Alpaca records of very different lengths; a few longer than the sequence length."""
    words = "the camel crossed the desert carrying water salt and silk for the long road".split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            answer = " ".join(words[j % len(words)] for j in range(3 + (i * 7) % 45))
            record = {"instruction": f"Tell me about camel number {i}.", "input": "", "output": answer}
            f.write(json.dumps(record) + "\n")
    return path


def data_recipe(tmp_path, model, **kw):
    values = dict(model=str(model), data=str(write_chats(tmp_path / "chats.jsonl")), out=str(tmp_path / "run"),
                  method="full", seq_len=64, packing=False, batch_size=4, micro_batch_size=2, epochs=2,
                  eval_fraction=0.1, lr=1e-3, warmup_ratio=0.0, seed=5)
    return build_config({**values, **kw})


def batched_by_training(cfg, world):
    """What `camelid train` feeds the model, using its own functions: (steps, real tokens, D, S, eval D)."""
    from camelid.chat import chat_template_for
    from camelid.checkpoint import load_model
    from camelid.examples import collate
    from camelid.train.loop import build_rows, load_conversations, rows_for_step

    loaded = load_model(cfg.model, device="cpu", dtype="float32")
    template = chat_template_for(loaded, cfg.template)
    rows, eval_rows = build_rows(cfg, template, loaded.tokenizer, load_conversations(cfg, print), print)
    steps = math.ceil(cfg.epochs * math.ceil(len(rows) / cfg.batch_size))
    real = processed = squares = 0
    for step in range(steps):
        global_rows = [rows[i] for i in rows_for_step(len(rows), step, cfg.batch_size, cfg.seed)]
        for rank in range(world):
            mine = global_rows[rank::world]
            for k in range(cfg.batch_size // (world * cfg.micro_batch_size)):
                part = mine[k * cfg.micro_batch_size : (k + 1) * cfg.micro_batch_size]
                B, T = collate(part).tokens.shape
                real += sum(len(r.tokens) for r in part)
                processed += B * T
                squares += B * T * T
    eval_processed = sum(collate(eval_rows[s : s + cfg.micro_batch_size]).tokens.numel()
                         for s in range(0, len(eval_rows), cfg.micro_batch_size))
    return steps, real, processed, squares, eval_processed


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("world", [1, 2])
def test_tokens_from_data_equal_what_training_batches(tmp_path, tiny_chat_model, packing, world):
    # tiny_chat_model carries SmolLM2's tokenizer and chat template (from the smollm2_gguf fixture)
    cfg = data_recipe(tmp_path, tiny_chat_model, packing=packing)
    est = estimate_cost(cfg, gpu="A100-80GB", count=world)
    t = est.tokens
    assert (t.steps, t.real, t.processed, t.squares, t.eval_processed) == batched_by_training(cfg, world)
    if not packing:
        assert t.processed > t.real  # micro-batches padded to their longest row
    assert any("truncated" in line for line in t.how)  # the training code's own report, passed on


def test_tokens_from_data_equal_a_real_training_run(tmp_path, tiny_chat_model):
    from camelid.train.loop import train

    cfg = data_recipe(tmp_path, tiny_chat_model)
    est = estimate_cost(cfg, gpu="A100-80GB")
    train(cfg, progress=False, log=lambda message: None)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert est.tokens.steps == len(metrics)
    assert est.tokens.real == sum(m["tokens"] for m in metrics)


def test_the_model_config_is_read_from_a_gguf_and_data_tokenized_with_it(tmp_path, smollm2_gguf):
    cfg = data_recipe(tmp_path, smollm2_gguf, method="lora")
    est = estimate_cost(cfg, gpu="RTX-4090")
    assert est.parameters == count_parameters(preset("smollm2-135m")).total
    assert est.lora_parameters == lora_parameters(preset("smollm2-135m"), cfg.lora_config())
    assert est.tokens.real > 0 and "its own chat template" in est.tokens.how[0]


def test_missing_model_points_to_tokenizer_when_data_is_here(tmp_path, smollm2_gguf):
    cfg = data_recipe(tmp_path, "./not-here")
    with pytest.raises(CamelidError, match="--tokenizer MODEL"):
        estimate_cost(cfg, gpu="A100-80GB", preset_name="smollm2-135m")
    est = estimate_cost(cfg, gpu="A100-80GB", preset_name="smollm2-135m", tokenizer=str(smollm2_gguf))
    assert est.tokens.real > 0


# -- the published runs -------------------------------------------------------------------------------------------


def test_alpaca_lands_within_2x_of_the_published_3_hours():
    # Alpaca: LLaMA-7B, 52,002 examples, 3 epochs, 512 tokens, 8 A100-80GB: "3 hours" (the release post)
    est = estimate_cost("alpaca", gpu="A100-80GB", count=8, preset_name="llama-2-7b", examples=52002)
    assert 3 / 2 <= est.hours <= 3 * 2, est.hours
    assert est.tokens.processed == 1221 * 128 * 512  # ceil(52002 / 128) = 407 steps an epoch, every row 512
    assert not est.warnings


def test_vicuna_lands_within_2x_of_the_published_day():
    # Vicuna-13B: ~70K ShareGPT conversations, 3 epochs, 2,048 tokens, 8 A100s, "about one day" (release post)
    est = estimate_cost("vicuna", gpu="A100-80GB", count=8, preset_name="llama-2-13b", examples=70000)
    assert 24 / 2 <= est.hours <= 24 * 2, est.hours
    assert est.flops.recompute > 0  # the recipe turns on gradient checkpointing
    assert not est.warnings


def test_memory_warnings():
    whole = estimate_cost("vicuna", gpu="A100-80GB", count=1, preset_name="llama-2-13b", examples=70000)
    assert whole.memory_gb == pytest.approx(16 * 13_015_864_320 / 1e9)
    assert "does not fit" in whole.warnings[0]
    lora = estimate_cost("gpt4all", gpu="A10G", count=8, preset_name="llama-2-7b", examples=437605)
    assert lora.memory_gb < 24 and not lora.warnings  # bf16 frozen base, a copy per GPU (ddp)
    old = estimate_cost("alpaca", gpu="V100", count=8, preset_name="llama-2-7b", examples=52002)
    assert any("no bf16" in w for w in old.warnings)


# -- the command line ---------------------------------------------------------------------------------------------


def run(capsys, *argv):
    code = main(["cost", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_a_table_with_the_numbers(capsys):
    code, out, err = run(capsys, "alpaca", "--gpu", "A100-80GB", "--count", "8", "--preset", "llama-2-7b",
                         "--examples", "52K", "--price", "1.5")
    assert code == 0 and not err
    for needle in ("| hours", "| GPU-hours", "| dollars", "| training FLOPs", "| tokens processed", "assumptions:",
                   "52,000 examples (--examples)", "6·N·D"):
        assert needle in out


def test_cli_json_parses(capsys):
    code, out, _ = run(capsys, "vicuna", "epochs=1", "--gpu", "h100-sxm", "--count", "8", "--preset", "llama-2-13b",
                       "--examples", "70000", "--json")
    data = json.loads(out)
    assert code == 0 and data["gpu"]["name"] == "H100-SXM" and data["count"] == 8
    assert data["hours"] > 0 and data["dollars"] is None and data["flops"]["training"] > 0
    assert data["tokens"]["steps"] == math.ceil(68600 / 128)  # epochs=1 override; 2% held out


def test_cli_lists_every_gpu_with_a_source(capsys):
    code, out, _ = run(capsys, "--list-gpus")
    assert code == 0
    for name in ("A100-40GB", "A100-80GB", "H100-SXM", "H100-PCIe", "H200", "L40S", "A10G", "RTX-4090", "RTX-3090",
                 "V100", "T4"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
        assert "https://" in row
    assert set(GPUS) == {find_gpu(name.lower()).name for name in GPUS}


@pytest.mark.parametrize("argv, message", [
    (["alpaca", "--gpu", "B200", "--preset", "llama-2-7b", "--examples", "5"],
     "unknown GPU 'B200'; choose one of: A100-40GB"),
    (["alpaca", "--preset", "llama-2-7b", "--examples", "5"], "give --gpu NAME"),
    (["alpaca", "--gpu", "T4", "--count", "0", "--preset", "llama-2-7b", "--examples", "5"], "--count must be"),
    (["alpaca", "--gpu", "T4", "--utilization", "1.5", "--preset", "llama-2-7b", "--examples", "5"],
     "--utilization must be above 0 and at most 1"),
    (["alpaca", "--gpu", "T4", "--price", "-1", "--preset", "llama-2-7b", "--examples", "5"], "--price must be"),
    (["alpaca", "--gpu", "T4", "--preset", "llama-2-7b", "--examples", "many"], "--examples: 'many' is not a number"),
    (["alpaca", "--gpu", "T4", "--preset", "llama-2-7b", "--examples", "0"], "--examples must be above 0"),
    (["alpaca", "--gpu", "T4", "--preset", "llama-2-7b", "--examples", "52002", "--tokens-per-example", "900"],
     "more than seq_len 512"),
    (["alpaca", "--gpu", "T4", "--preset", "llama-9b", "--examples", "5"], "unknown preset 'llama-9b'"),
    (["alpaca", "--gpu", "T4", "--count", "3", "--preset", "llama-2-7b", "--examples", "52002"],
     "batch_size 128 is not a multiple of micro_batch_size 4 x 3 GPU(s)"),
    (["koala", "--gpu", "T4", "--preset", "llama-2-13b", "--examples", "5000"], "packing is on"),
    (["gpt4all", "--gpu", "T4", "--model-size", "7B", "--examples", "5000"], "LoRA's adapter size needs"),
    # the bare command on a machine without LLaMA or Alpaca's data: both fixes in one line
    (["alpaca", "--gpu", "A100-80GB", "--count", "8"], "give its shapes with --preset NAME"),
    (["alpaca", "--gpu", "A100-80GB", "--count", "8"], "alpaca_data.json: no such file"),
    (["no-such-recipe", "--gpu", "T4"], "no recipe named 'no-such-recipe'"),
])
def test_cli_errors_are_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 1 and not out
    assert err.startswith("camelid: error: ") and err.count("\n") == 1 and message in err, err


def test_model_size_gives_six_n_d():
    est = estimate_cost(tiny_recipe(), gpu="A100-80GB", model_size=parse_count("1.5K", "--model-size"),
                        examples=4, tokens_per_example=8)
    assert est.n == 1500 and est.flops.weights == 6 * 1500 * 32 and est.flops.attention == 0


def test_tokens_alone_is_one_epoch_in_rows_of_seq_len():
    est = estimate_cost(tiny_recipe(packing=True, epochs=2), gpu="A100-80GB", model_config=TINY, tokens=64)
    assert (est.tokens.rows, est.tokens.steps, est.tokens.processed) == (8, 8, 8 * 2 * 8)  # 2 epochs of 64
    recipe = read_recipe("alpaca")  # the recipe as a TrainConfig works as well as its name
    assert estimate_cost(recipe, gpu="T4", preset_name="llama-2-7b", tokens=26.6e6).tokens.processed > 0
