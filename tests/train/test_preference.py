"""Preference objectives against TRL's own trainers: on the same tiny model, LoRA adapter, tokens and beta,
camelid's DPO, SimPO, ORPO and KTO losses and rewards equal TRL's DPOTrainer, CPOTrainer (loss_type simpo),
ORPOTrainer and KTOTrainer's, and one AdamW step moves the adapter the same way. Then the pieces TRL does not
have: one forward pass per pair (prompt once) equals two separate sequences, the data a run refuses or counts,
and runs of every objective end to end.

TRL is handed exactly the tokens camelid trains on (prompt, and each answer's tokens as the chat template's
mask gives them), so what is compared is the objective, not two tokenizations.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import shared_file

from camelid.checkpoint import load_model
from camelid.chat import chat_template_for
from camelid.errors import CamelidError
from camelid.lora import LoRAConfig, adapters_disabled, apply_lora
from camelid.model import IGNORE
from camelid.train.preference import (
    answer_log_probs, collate_pairs, fit_pair_example, make_pair_example, metric_means, micro_batch_terms, pair_row,
    step_totals,
)
from camelid.train.recipe import Preference

trl = pytest.importorskip("trl")
TOL = 1e-5


def _records(n: int) -> list[dict]:
    """The shortest pairs of LLaMA-Factory's demo file, as camelid reads them."""
    from camelid.data.formats import iter_conversations

    items = list(iter_conversations(str(shared_file("preference/dpo_en_demo.json"))))
    items.sort(key=lambda r: len(json.dumps(r.messages)) + len(r.rejected["content"]))
    return [{"messages": r.messages, "rejected": r.rejected} for r in items[:n]]


@pytest.fixture(scope="module")
def setup(tiny_chat_dir):
    """camelid's model with a LoRA adapter whose B is not zero (so policy and reference differ), the same
    adapter in a peft model of transformers, and the examples."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # In float64: the answers' log-probs are sums of tens of tokens, which float32 rounds differently per library.
    loaded = load_model(tiny_chat_dir, device="cpu", dtype="float32")
    loaded.model.double()
    template = chat_template_for(loaded, None)
    torch.manual_seed(0)
    apply_lora(loaded.model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj")))
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    loaded.model.eval()
    hf = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float64)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    _copy_adapter(loaded.model, peft_model)
    peft_model.eval()
    examples = [_short(make_pair_example(template, loaded.tokenizer, r)) for r in _records(4)]
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    return loaded, template, peft_model, tokenizer, examples


def _short(example):
    """The example with answers cut to 8 tokens: TRL computes log-probs in float32 whatever the model's dtype,
    and a random model's answer costs ~10.8 nats a token; short answers keep TRL's rounding below 1e-6."""
    example, status = fit_pair_example(example, example.prompt_len + 8, "truncate", None)
    assert status == "truncated"
    return example


def _copy_adapter(ours, peft_model) -> None:
    theirs = peft_model.state_dict()
    with torch.no_grad():
        for key, value in ours.state_dict().items():
            if "lora_" in key:
                theirs["base_model.model." + key.replace(".weight", ".default.weight")].copy_(value)


def _answers(example) -> tuple[list[int], list[int], list[int]]:
    """TRL's pieces of a camelid example: prompt ids, chosen ids, rejected ids (each answer as far as its mask)."""
    p = example.prompt_len
    chosen_end = max(j for j in range(len(example.targets)) if example.targets[j] != IGNORE) + 1
    rejected_end = max(j for j in range(len(example.branch_targets)) if example.branch_targets[j] != IGNORE) + 1
    return example.tokens[:p], example.tokens[p : chosen_end + 1], example.branch_tokens[1 : rejected_end + 1]


def _camelid(model, pref, examples, labels=None, partners=None):
    """camelid's loss and metrics over `examples` as one batch, the reference being the adapter switched off."""
    rows = [pair_row([ex], [partners[i] if partners else None], 10_000) for i, ex in enumerate(examples)]
    batch = collate_pairs(rows)
    reference = None
    if pref.objective in ("dpo", "kto"):
        with torch.no_grad(), adapters_disabled(model):
            reference, _ = answer_log_probs(model, batch)
    terms = micro_batch_terms(pref, model, batch, reference, step_totals(rows), world=1)
    return terms.loss, metric_means(terms.sums, 1, "cpu")


def _trainer(kind, model, tokenizer, tmp_path, **args):
    """TRL's trainer of `kind` over `model`, its reference being the base with the adapter off (as camelid's).

    Handed a peft model that already has an adapter, TRL keeps a copy of it as the reference ("ref"); camelid's
    test adapter stands for one being trained, so that copy is removed.
    """
    trainer = _new_trainer(kind, model, tokenizer, tmp_path, **args)
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
    return trainer


def _new_trainer(kind, model, tokenizer, tmp_path, **args):
    from datasets import Dataset

    dummy = Dataset.from_list([{"prompt": "Hi", "chosen": " there", "rejected": " no"}] * 2)
    common = dict(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=2, use_cpu=True)
    if kind == "dpo":
        return trl.DPOTrainer(model=model, args=trl.DPOConfig(**common, **args), train_dataset=dummy,
                              processing_class=tokenizer)
    if kind == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOTrainer(model=model, args=CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, **args),
                          train_dataset=dummy, processing_class=tokenizer)
    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer(model=model, args=ORPOConfig(**common, **args), train_dataset=dummy,
                           processing_class=tokenizer)
    dummy = Dataset.from_list([{"prompt": "Hi", "completion": " there", "label": True},
                               {"prompt": "Hi", "completion": " no", "label": False}])
    return trl.KTOTrainer(model=model, args=trl.KTOConfig(**common, **args), train_dataset=dummy,
                          processing_class=tokenizer)


def _paired_batch(examples) -> dict:
    """The batch TRL's CPO and ORPO trainers take: chosen/rejected input ids, masks and labels (prompt -100)."""
    rows = {"chosen": [], "rejected": []}
    for ex in examples:
        prompt, chosen, rejected = _answers(ex)
        rows["chosen"].append((prompt, chosen))
        rows["rejected"].append((prompt, rejected))
    batch = {}
    for side, pieces in rows.items():
        T = max(len(p) + len(a) for p, a in pieces)
        ids = torch.zeros(len(pieces), T, dtype=torch.long)
        mask = torch.zeros(len(pieces), T, dtype=torch.long)
        labels = torch.full((len(pieces), T), -100, dtype=torch.long)
        for b, (p, a) in enumerate(pieces):
            n = len(p) + len(a)
            ids[b, :n] = torch.tensor(p + a)
            mask[b, :n] = 1
            labels[b, len(p) : n] = torch.tensor(a)
        batch |= {f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels}
    return batch


def test_dpo_equals_trl_per_pair(setup, tmp_path):
    loaded, _, peft_model, tokenizer, examples = setup
    pref = Preference("dpo", beta=0.1)
    trainer = _trainer("dpo", peft_model, tokenizer, tmp_path, beta=0.1, loss_type=["sigmoid"])
    for ex in examples:
        prompt, chosen, rejected = _answers(ex)
        inputs = trainer.data_collator([{"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}])
        theirs = float(trainer._compute_loss(peft_model, inputs, return_outputs=False))
        metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
        loss, ours = _camelid(loaded.model, pref, [ex])
        assert float(loss) == pytest.approx(theirs, abs=TOL)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                    "logps/rejected"):
            assert ours[key] == pytest.approx(metrics[key], abs=TOL), key


def test_conservative_dpo_is_the_label_smoothed_sigmoid():
    """TRL 1.16's DPO sigmoid loss has no label smoothing (its CPO loss has, tested through SimPO above); cDPO's
    loss is checked against its definition."""
    from camelid.train.preference import pair_losses

    logps = torch.tensor([[-10.0, -12.0], [-8.0, -7.5]], dtype=torch.float64)
    reference = torch.tensor([[-11.0, -11.0], [-8.0, -8.0]], dtype=torch.float64)
    out = pair_losses(Preference("dpo", beta=0.2, label_smoothing=0.1), logps, torch.ones_like(logps), reference)
    margin = 0.2 * torch.tensor([2.0, -0.5], dtype=torch.float64)  # beta x (chosen - rejected log-ratio)
    expected = -0.9 * torch.log(torch.sigmoid(margin)) - 0.1 * torch.log(torch.sigmoid(-margin))
    torch.testing.assert_close(out["losses"], expected)


def test_simpo_equals_trl_cpo_simpo_per_pair(setup, tmp_path):
    loaded, _, peft_model, tokenizer, examples = setup
    pref = Preference("simpo", beta=2.0, simpo_gamma=0.5, label_smoothing=0.1)
    trainer = _trainer("simpo", peft_model, tokenizer, tmp_path, beta=2.0, simpo_gamma=0.5, label_smoothing=0.1)
    for ex in examples:
        theirs, metrics = trainer.get_batch_loss_metrics(peft_model, _paired_batch([ex]), train_eval="train")
        loss, ours = _camelid(loaded.model, pref, [ex])
        assert float(loss) == pytest.approx(float(theirs), abs=TOL)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                    "logps/rejected"):
            assert ours[key] == pytest.approx(metrics[key], abs=TOL), key


def test_orpo_equals_trl_per_pair_but_for_the_nll_over_the_answer_alone(setup, tmp_path):
    """TRL's ORPOTrainer takes its NLL term over prompt and answer; camelid over the answer (the paper's
    L_SFT). Everything else is equal: the odds-ratio term, rewards, log-odds, and the loss less the NLL."""
    loaded, _, peft_model, tokenizer, examples = setup
    pref = Preference("orpo", beta=0.1)
    trainer = _trainer("orpo", peft_model, tokenizer, tmp_path, beta=0.1)
    for ex in examples:
        theirs, metrics = trainer.get_batch_loss_metrics(peft_model, _paired_batch([ex]), train_eval="train")
        loss, ours = _camelid(loaded.model, pref, [ex])
        assert float(loss) - ours["nll_loss"] == pytest.approx(float(theirs) - metrics["nll_loss"], abs=TOL)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                    "logps/rejected", "log_odds_ratio", "log_odds_chosen"):
            assert ours[key] == pytest.approx(metrics[key], abs=TOL), key
        # camelid's NLL is the chosen answer's mean cross-entropy per token
        assert ours["nll_loss"] == pytest.approx(-metrics["logps/chosen"], abs=TOL)


def test_kto_equals_trl_over_a_batch(setup, tmp_path):
    """KTO's KL term couples a batch's examples: the batch's loss, KL and rewards are compared."""
    import copy

    loaded, template, peft_model, tokenizer, examples = setup
    records = _records(4)
    labelled = [_short(make_pair_example(template, loaded.tokenizer, {"messages": r["messages"], "label": i % 2 == 0}))
                for i, r in enumerate(records)]
    partners = [labelled[i - 1] for i in range(len(labelled))]  # TRL's: each answer's KL answer is the one before
    ours_model, theirs_model = copy.deepcopy(loaded.model), copy.deepcopy(peft_model)
    # KL is clamped at 0, which would compare nothing: first move the adapter towards the mismatched answers.
    batch = collate_pairs([pair_row([ex], [other], 10_000) for ex, other in zip(labelled, partners)])
    adapter = [p for p in ours_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(adapter, lr=1e-2)
    for _ in range(5):
        (-answer_log_probs(ours_model, batch)[0][:, 1].sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    _copy_adapter(ours_model, theirs_model)
    assert _raw_kl(ours_model, labelled, partners) > 0
    pref = Preference("kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)
    loss, ours = _camelid(ours_model, pref, labelled, partners=partners)
    trainer = _trainer("kto", theirs_model, tokenizer, tmp_path, beta=0.1, desirable_weight=1.0,
                       undesirable_weight=1.5)
    rows = []
    for ex, other in zip(labelled, partners):
        p = ex.prompt_len
        end = max(j for j in range(len(ex.targets)) if ex.targets[j] != IGNORE) + 1
        other_end = max(j for j in range(len(other.targets)) if other.targets[j] != IGNORE) + 1
        rows.append({"prompt_ids": ex.tokens[:p], "completion_ids": ex.tokens[p : end + 1],
                     "KL_completion_ids": other.tokens[other.prompt_len : other_end + 1], "label": bool(ex.label)})
    theirs = float(trainer._compute_loss(theirs_model, trainer.data_collator(rows), return_outputs=False))
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    assert float(loss) == pytest.approx(theirs, abs=TOL)
    assert ours["kl"] == pytest.approx(metrics["kl"], abs=TOL)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert ours[key] == pytest.approx(metrics[key], abs=TOL), key


def _raw_kl(model, labelled, partners) -> float:
    rows = [pair_row([ex], [other], 10_000) for ex, other in zip(labelled, partners)]
    batch = collate_pairs(rows)
    with torch.no_grad():
        policy, _ = answer_log_probs(model, batch)
        with adapters_disabled(model):
            reference, _ = answer_log_probs(model, batch)
    return float((policy[:, 1] - reference[:, 1]).mean())


def test_one_adamw_step_moves_the_adapter_as_trl_does(setup, tmp_path):
    loaded, _, peft_model, tokenizer, examples = setup
    import copy

    ours_model, theirs_model = copy.deepcopy(loaded.model), copy.deepcopy(peft_model)
    pref = Preference("dpo", beta=0.1)
    trainer = _trainer("dpo", theirs_model, tokenizer, tmp_path, beta=0.1, loss_type=["sigmoid"])
    ours_params = {k: p for k, p in ours_model.named_parameters() if p.requires_grad}
    theirs_params = {k: p for k, p in theirs_model.named_parameters() if p.requires_grad}
    loss, _ = _camelid(ours_model, pref, examples)
    loss.backward()
    pieces = [dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), _answers(ex))) for ex in examples]
    trainer._compute_loss(theirs_model, trainer.data_collator(pieces), return_outputs=False).backward()
    for model_params in (ours_params, theirs_params):
        optimizer = torch.optim.AdamW(list(model_params.values()), lr=1e-3)
        optimizer.step()
    assert len(ours_params) == len(theirs_params) == 8
    for key, p in ours_params.items():
        q = theirs_params["base_model.model." + key.replace(".weight", ".default.weight")]
        assert torch.allclose(p, q, atol=1e-6), key
        assert p.grad.abs().max() > 0


def test_one_forward_per_pair_equals_two_sequences(setup):
    """The prompt once with both answers branching from it gives each answer the log-prob it has alone."""
    loaded, _, _, _, examples = setup
    model = loaded.model
    with torch.no_grad():
        shared, counts = answer_log_probs(model, collate_pairs([pair_row(examples, [None] * 4, 10_000)]))
        for i, ex in enumerate(examples):
            for side, (tokens, targets) in enumerate([(ex.tokens, ex.targets), (
                    ex.tokens[: ex.prompt_len - 1] + ex.branch_tokens,
                    [IGNORE] * (ex.prompt_len - 1) + ex.branch_targets)]):
                alone = -model(torch.tensor([tokens]), targets=torch.tensor([targets]))
                assert float(shared[i, side]) == pytest.approx(float(alone), rel=1e-5)
                assert int(counts[i, side]) == sum(t != IGNORE for t in targets)


def test_sliding_windows_count_positions_across_the_branches(setup):
    """With a sliding window, the rejected answer's distance to the prompt is its position's, not its index in
    the row (the chosen answer lies between them there)."""
    import dataclasses

    from camelid.model import Llama
    from helpers import TINY_CHAT

    loaded, _, _, _, examples = setup
    config = dataclasses.replace(TINY_CHAT, sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(1)
    model = Llama(config).double().eval()
    ex = examples[0]
    with torch.no_grad():
        shared, _ = answer_log_probs(model, collate_pairs([pair_row([ex], [None], 10_000)]))
        tokens = ex.tokens[: ex.prompt_len - 1] + ex.branch_tokens
        targets = [IGNORE] * (ex.prompt_len - 1) + ex.branch_targets
        alone = -model(torch.tensor([tokens]), targets=torch.tensor([targets]))
    assert float(shared[0, 1]) == pytest.approx(float(alone), rel=1e-9)


# -- runs ----------------------------------------------------------------------------------------------------------


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """40 short pairs of the demo file in TRL's layout (prompt, chosen, rejected as messages)."""
    records = [{"prompt": r["messages"][:-1], "chosen": r["messages"][-1:], "rejected": [r["rejected"]]}
               for r in _records(40)]
    return _write(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", records)


def _run(base, data, out, log=None, **keys):
    from camelid.train.loop import train
    from camelid.train.recipe import build_config

    values = dict(model=str(base), data=[str(data)], out=str(out), seq_len=192, batch_size=4, micro_batch_size=2,
                  max_steps=3, lr=1e-3, warmup_ratio=0.0, seed=3, eval_fraction=0.1, eval_every=3) | keys
    lines = []
    result = train(build_config(values), progress=False, log=log or lines.append)
    return result, lines


@pytest.mark.parametrize("objective, method", [("dpo", "lora"), ("dpo", "full"), ("simpo", "lora"), ("orpo", "full"),
                                               ("kto", "lora")])
def test_every_objective_trains_and_writes_trl_s_metrics(tiny_chat_dir, pairs_file, tmp_path, objective, method):
    result, lines = _run(tiny_chat_dir, pairs_file, tmp_path / "run", objective=objective, method=method)
    records = [json.loads(line) for line in (result.run / "metrics.jsonl").read_text().splitlines()]
    before, steps = records[0], records[1:]
    assert before["step"] == 0 and "eval_loss" in before  # the held-out metrics before training
    assert [r["step"] for r in steps] == [1, 2, 3]
    expected = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"}
    expected |= {"kto": {"kl"}, "orpo": {"nll_loss", "log_odds_ratio", "log_odds_chosen"}}.get(objective, set())
    expected |= set() if objective == "kto" else {"rewards/accuracies"}
    assert expected <= set(steps[0]) and all(math.isfinite(steps[0][k]) for k in expected)
    assert {f"eval_{k}" for k in expected - {"loss"}} <= set(steps[-1])
    if objective in ("dpo", "kto"):
        assert (result.run / "reference_logps.safetensors").is_file()
        assert before["eval_rewards/chosen"] == pytest.approx(0, abs=1e-4)  # the policy is the reference
    assert (result.run / "loss.png").stat().st_size > 10_000
    assert (result.model_dir / ("adapter_config.json" if method == "lora" else "config.json")).is_file()
    if objective == "kto":
        assert any("labelled answers (a pair gives two)" in line for line in lines)


def test_dpo_learns_to_prefer_the_chosen_answers(tiny_chat_dir, pairs_file, tmp_path):
    """Twelve steps over the same pairs: the loss falls and the chosen answers gain on the rejected ones."""
    result, _ = _run(tiny_chat_dir, pairs_file, tmp_path / "run", objective="dpo", method="full", max_steps=12,
                     lr=3e-3, beta=0.5, eval_fraction=0.0, eval_every=0, epochs=1)
    records = [json.loads(line) for line in (result.run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"] - 0.05
    assert sum(r["rewards/margins"] for r in records[-4:]) > 0


def test_a_resumed_run_reads_its_reference_back(tiny_chat_dir, pairs_file, tmp_path):
    """Full fine-tuning cannot give its reference again once trained: a resumed run reads the cached one, and
    ends where the uninterrupted run ended; without the cache, it is refused."""
    import shutil

    whole, _ = _run(tiny_chat_dir, pairs_file, tmp_path / "whole", objective="dpo", method="full", max_steps=4,
                    save_every=2, eval_every=2)
    run = tmp_path / "cut"
    _run(tiny_chat_dir, pairs_file, run, objective="dpo", method="full", max_steps=4, save_every=2, eval_every=2)
    shutil.rmtree(run / "checkpoints" / "step-000004")
    from camelid.train.loop import train
    from camelid.train.recipe import build_config

    values = dict(model=str(tiny_chat_dir), data=[str(pairs_file)], out=str(run), seq_len=192, batch_size=4,
                  micro_batch_size=2, max_steps=4, lr=1e-3, warmup_ratio=0.0, seed=3, eval_fraction=0.1, eval_every=2,
                  objective="dpo", method="full", save_every=2)
    lines = []
    resumed = train(build_config(values), resume=True, progress=False, log=lines.append)
    assert any("reference log-probs read from" in line for line in lines)
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-6)
    (run / "reference_logps.safetensors").unlink()
    with pytest.raises(CamelidError, match="reference_logps.safetensors is missing .* start the run in a new out"):
        train(build_config(values), resume=True, progress=False, log=lines.append)


def test_bad_pairs_are_counted_and_nothing_crashes(tiny_chat_dir, tmp_path):
    good = [{"prompt": r["messages"][:-1], "chosen": r["messages"][-1:], "rejected": [r["rejected"]]}
            for r in _records(12)]
    same = dict(good[0], rejected=good[0]["chosen"])
    long_prompt = dict(good[1], prompt=[{"role": "user", "content": "word " * 400}])
    plain = {"messages": good[2]["prompt"] + good[2]["chosen"]}
    data = _write(tmp_path / "mixed.jsonl", good + [same, long_prompt, plain])
    result, lines = _run(tiny_chat_dir, data, tmp_path / "run", objective="dpo", eval_fraction=0.0, eval_every=0)
    text = "\n".join(lines)
    assert "15 records; 14 preference pairs; 1 records unused by dpo (not a pair)" in text
    assert "1 dropped (chosen equals rejected)" in text
    assert "1 dropped (prompt fills the sequence length)" in text
    assert result.steps == 3
    # with max_prompt_len the long prompt keeps its end instead
    _, lines = _run(tiny_chat_dir, data, tmp_path / "cut", objective="dpo", eval_fraction=0.0, eval_every=0,
                    max_prompt_len=96)
    assert "prompt fills" not in "\n".join(lines) and "truncated to the sequence length" in "\n".join(lines)


def test_an_empty_answer_is_refused_with_its_line(tiny_chat_dir, pairs_file, tmp_path):
    records = [json.loads(line) for line in pairs_file.read_text().splitlines()][:6]
    records[3]["rejected"] = [{"role": "assistant", "content": ""}]
    data = _write(tmp_path / "empty.jsonl", records)
    with pytest.raises(CamelidError, match=r"empty\.jsonl:4: .*empty"):
        _run(tiny_chat_dir, data, tmp_path / "run", objective="dpo")


@pytest.mark.parametrize("records, match", [
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "label": True}] * 6,
     "objective kto needs answers labelled desirable and undesirable; the data holds only desirable ones"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 6,
     "the data holds no preference pairs for objective dpo"),
])
def test_data_an_objective_cannot_learn_from_is_refused(tiny_chat_dir, tmp_path, records, match):
    data = _write(tmp_path / "data.jsonl", records)
    objective = "kto" if "label" in records[0] else "dpo"
    with pytest.raises(CamelidError, match=match):
        _run(tiny_chat_dir, data, tmp_path / "run", objective=objective, eval_fraction=0.0, eval_every=0)


@pytest.mark.parametrize("keys, match", [
    ({"objective": "dpo", "simpo_gamma": 1}, "simpo_gamma applies to objective simpo, not dpo"),
    ({"beta": 0.1}, "beta applies to objective dpo or simpo or orpo or kto, not sft"),
    ({"objective": "dpo", "label_smoothing": 0.5}, "label_smoothing must be from 0 up to 0.5"),
    ({"objective": "kto", "max_prompt_len": 4096}, "max_prompt_len must be from 1 up to seq_len"),
    ({"objective": "ppo"}, "objective must be one of sft, dpo, simpo, orpo, kto"),
])
def test_settings_of_another_objective_are_refused(keys, match):
    from camelid.train.recipe import build_config

    with pytest.raises(CamelidError, match=match):
        build_config({"model": "m", "data": ["d"], "out": "o"} | keys)


@pytest.mark.slow
@pytest.mark.parametrize("objective, method, parallel", [("dpo", "lora", "ddp"), ("dpo", "full", "fsdp"),
                                                         ("orpo", "full", "ddp")])
def test_two_processes_equal_one(tiny_chat_dir, pairs_file, tmp_path, objective, method, parallel):
    """torchrun with 2 gloo processes: the same losses, metrics and weights as 1 process (the reference computed
    half by each process under DDP, by both together under FSDP)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    keys = dict(model=tiny_chat_dir, data=pairs_file, seq_len=192, batch_size=4, micro_batch_size=1, max_steps=3,
                lr=1e-3, seed=3, objective=objective, method=method, parallel=parallel, lora_dropout=0.0,
                packing=False, eval_fraction=0.1, eval_every=3)
    args = [f"{k}={v}" for k, v in keys.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "camelid", "train", *args, f"out={tmp_path / 'one'}", "--no-progress"],
                         env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "camelid",
                          "train", *args, f"out={tmp_path / 'two'}", "--no-progress"], env=env, capture_output=True,
                         text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 process(es)" in two.stderr
    records = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("one", "two")]
    for a, b in zip(*records):
        for key in a:
            if key not in ("tokens_per_second", "lr"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_file(tmp_path / "one" / "model" / name), load_file(tmp_path / "two" / "model" / name)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
