"""`camelid quickstart alpaca` end to end on a tiny random model (the plumbing; the measured run on Gemma 3 270M
is in the README): the split, the answers and IFEval before and after, what it writes, and the end-of-turn count."""

import json

import pytest

from camelid.cli import main
from camelid.errors import CamelidError
from camelid.eval.ifeval import punkt_dir
from camelid.eval.alpaca_quickstart import (
    HELD_OUT, _end_of_turn_id, alpaca_summary, run_alpaca_quickstart, split_instructions,
)

QUICK = ["template=null", "method=lora", "max_steps=1", "batch_size=2", "micro_batch_size=2", "seq_len=128"]

needs_punkt = pytest.mark.skipif(
    not (punkt_dir() / "tokenizers" / "punkt_tab" / "english" / "ortho_context.tab").is_file(),
    reason="IFEval's Punkt tables are not in camelid's cache (`camelid eval ifeval` installs them)")


def _instructions(path, n):
    path.write_text(json.dumps([{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}"}
                                for i in range(n)]))
    return path


def _ifeval_prompts(path):
    rows = [
        {"key": 1, "prompt": "Write a short poem without commas.", "instruction_id_list": ["punctuation:no_comma"],
         "kwargs": [{}]},
        {"key": 2, "prompt": "Describe the sea in lowercase letters only.",
         "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_last_records_are_held_out_and_never_trained_on(tmp_path):
    train, prompts = split_instructions(_instructions(tmp_path / "a.json", HELD_OUT + 7), tmp_path)
    trained = [json.loads(line)["instruction"] for line in train.read_text().splitlines()]
    assert trained == [f"Say the number {i}." for i in range(7)]
    assert prompts == [f"Say the number {i}." for i in range(7, HELD_OUT + 7)]
    assert len((tmp_path / "heldout.jsonl").read_text().splitlines()) == HELD_OUT
    with pytest.raises(CamelidError, match=f"holds out {HELD_OUT}"):
        split_instructions(_instructions(tmp_path / "b.json", HELD_OUT), tmp_path / "b")


def test_the_end_of_turn_token_is_the_templates(gemma3_gguf, tiny_chat_loaded):
    from camelid.chat import chat_template_for
    from camelid.checkpoint import load_model

    chatml = _end_of_turn_id(tiny_chat_loaded, chat_template_for(tiny_chat_loaded, None))
    assert tiny_chat_loaded.tokenizer.decode([chatml]) == "<|im_end|>"
    gemma = load_model(gemma3_gguf)
    assert gemma.tokenizer.decode([_end_of_turn_id(gemma, chat_template_for(gemma, "gemma"))]) == "<end_of_turn>"


@needs_punkt
def test_alpaca_quickstart_answers_scores_trains_and_reports(tiny_chat_dir, tmp_path):
    out = tmp_path / "run"
    result = run_alpaca_quickstart(
        model=str(tiny_chat_dir), data=str(_instructions(tmp_path / "a.json", HELD_OUT + 6)),
        prompts=str(_ifeval_prompts(tmp_path / "ifeval.jsonl")), out=str(out), overrides=QUICK, ifeval_tokens=4,
        progress=False, log=lambda m: None)
    assert (result.model_dir / "adapter_config.json").is_file()
    for name in ("base", "tuned"):
        scores = json.loads((out / f"ifeval-{name}" / "scores.json").read_text())
        assert scores["prompts"] == 2 and scores["max_tokens"] == 4 and scores["model_id"] == name
        assert len((out / f"ifeval-{name}" / "responses.jsonl").read_text().splitlines()) == 2
    held = json.loads((out / "heldout.json").read_text())
    assert [h["instruction"] for h in held] == result.prompts and len(held) == HELD_OUT
    assert [h["before_ended"] for h in held] == result.before.ended
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ended_with_end_of_turn_before"] == result.before.ended_share
    assert summary["end_of_turn_token"] == "<|im_end|>"
    assert set(summary["seconds"]) == {"base model: held-out answers and IFEval", "fine-tuning",
                                       "fine-tuned model: held-out answers and IFEval"}
    text = alpaca_summary(result)
    assert "| prompt-level loose |" in text and result.prompts[0] in text and str(result.model_dir) in text


def test_the_cli_refuses_identity_flags_and_unknown_quickstarts(tmp_path, capsys):
    assert main(["quickstart", "alpaca", "--name", "Nimbus", "--out", str(tmp_path / "x")]) == 1
    assert "--name and --creator belong to the identity quickstart" in capsys.readouterr().err
    assert main(["quickstart", "alpacca", "--out", str(tmp_path / "x")]) == 1
    assert "unknown quickstart 'alpacca'" in capsys.readouterr().err
    for flags in (["--data", "x.json"], ["--ifeval-tokens", "64"], ["--prompts", "hf:google/IFEval"]):
        assert main(["quickstart", *flags, "--out", str(tmp_path / "x")]) == 1
        assert f"{flags[0]} belongs to `camelid quickstart alpaca`" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
