"""Token counts from a real data file against what the training code itself batches, and what a real training
run reports."""

import json
import math

import pytest

from camelid.config import preset
from camelid.cost.estimate import estimate_cost
from camelid.cost.flops import count_parameters, lora_parameters
from camelid.errors import CamelidError
from camelid.train.recipe import build_config


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
    from camelid.train.data import training_rows
    from camelid.train.schedule import Schedule

    loaded = load_model(cfg.model, device="cpu", dtype="float32")
    template = chat_template_for(loaded, cfg.template)
    rows, eval_rows = training_rows(cfg, template, loaded.tokenizer, print)
    steps = math.ceil(cfg.epochs * math.ceil(len(rows) / cfg.batch_size))
    schedule = Schedule.plan(cfg, len(rows), world)
    real = processed = squares = 0
    for step in range(steps):
        global_rows = [rows[i] for i in schedule.rows_for_step(step)]
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
def test_tokens_from_data_equal_what_training_batches(tmp_path, tiny_chat_dir, packing, world):
    # tiny_chat_dir carries SmolLM2's tokenizer and chat template (from the smollm2_gguf fixture)
    cfg = data_recipe(tmp_path, tiny_chat_dir, packing=packing)
    est = estimate_cost(cfg, gpu="A100-80GB", count=world)
    t = est.tokens
    assert (t.steps, t.real, t.processed, t.squares, t.eval_processed) == batched_by_training(cfg, world)
    if not packing:
        assert t.processed > t.real  # micro-batches padded to their longest row
    assert any("truncated" in line for line in t.how)  # the training code's own report, passed on


def test_tokens_from_data_equal_a_real_training_run(tmp_path, tiny_chat_dir):
    from camelid.train.loop import train

    cfg = data_recipe(tmp_path, tiny_chat_dir)
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
