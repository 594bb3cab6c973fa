"""The estimate: the FLOP formula on a case small enough to check by hand, time and dollars, token counts from
the command line, the published Alpaca and Vicuna runs, and the CLI's table, JSON and errors."""

import json
import math

import pytest

from camelid.cli import main
from camelid.config import ModelConfig
from camelid.cost import DEFAULT_UTILIZATION, estimate_cost, parse_count
from camelid.train.recipe import build_config, read_recipe


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


def test_model_size_gives_six_n_d():
    est = estimate_cost(tiny_recipe(), gpu="A100-80GB", model_size=parse_count("1.5K", "--model-size"),
                        examples=4, tokens_per_example=8)
    assert est.n == 1500 and est.flops.weights == 6 * 1500 * 32 and est.flops.attention == 0


def test_tokens_alone_is_one_epoch_in_rows_of_seq_len():
    est = estimate_cost(tiny_recipe(packing=True, epochs=2), gpu="A100-80GB", model_config=TINY, tokens=64)
    assert (est.tokens.rows, est.tokens.steps, est.tokens.processed) == (8, 8, 8 * 2 * 8)  # 2 epochs of 64
    recipe = read_recipe("alpaca")  # the recipe as a TrainConfig works as well as its name
    assert estimate_cost(recipe, gpu="T4", preset_name="llama-2-7b", tokens=26.6e6).tokens.processed > 0


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
     "batch_size 128 is not a multiple of micro_batch_size 4 x 3 GPU(s); training would refuse it: change --count"),
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
