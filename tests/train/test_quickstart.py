"""`camelid quickstart` end to end on a tiny random model (the plumbing; the real behaviour change on SmolLM2 is
measured by running the command itself, see the README): the data it writes, the answers before and after, the
adapter it leaves, and what it refuses to overwrite."""

import json

import pytest

from camelid.cli import main
from camelid.errors import CamelidError
from camelid.data.identity import heldout_identity_questions, identity_conversations, replay_prompts
from camelid.train.quickstart import QuickstartResult, run_quickstart, side_by_side

QUICK = ["epochs=1", "batch_size=2", "micro_batch_size=2", "seq_len=256"]


def test_quickstart_trains_and_reports_before_and_after(tiny_chat_dir, tmp_path):
    out = tmp_path / "qs"
    result = run_quickstart(name="Nimbus", creator="the Orbit Lab", model=str(tiny_chat_dir), out=str(out),
                            overrides=QUICK, progress=False, log=lambda m: None)
    rows = [json.loads(line)["messages"] for line in (out / "identity.jsonl").read_text().splitlines()]
    identity = identity_conversations("Nimbus", "the Orbit Lab")
    assert rows[: len(identity)] == identity
    replayed = rows[len(identity):]
    assert all(r[0]["content"] in replay_prompts() and r[1]["role"] == "assistant" for r in replayed)
    assert (result.model_dir / "adapter_config.json").is_file()
    assert len(result.before) == len(result.after) == len(result.questions)
    answers = json.loads((out / "answers.json").read_text())
    assert [a["question"] for a in answers] == result.questions
    report = side_by_side(result)
    assert "appears in" in report and heldout_identity_questions("Nimbus", "the Orbit Lab")[0] in report


def test_the_name_count_ignores_questions_that_contain_the_name():
    result = QuickstartResult(
        run=None, model_dir=None, name="Nimbus", train_seconds=1.0,
        questions=["Who are you?", "Is Nimbus your name?", "Who made you?", "2 + 2?"],
        identity=[True, True, True, False],
        before=["A bot.", "Yes, Nimbus.", "Nobody.", "4"],
        after=["I'm Nimbus.", "Yes, Nimbus.", "The Orbit Lab.", "Nimbus"],
    )
    assert result.named(result.before) == (0, 2)
    assert result.named(result.after) == (1, 2)


def test_an_earlier_run_is_kept_unless_forced_and_other_directories_always(tiny_chat_dir, tmp_path, capsys):
    out = tmp_path / "qs"
    out.mkdir()
    (out / "identity.jsonl").write_text("")
    args = ["quickstart", "-m", str(tiny_chat_dir), "--out", str(out), "--no-progress", *QUICK]
    assert main(args) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CamelidError, match="not a quickstart run"):
        run_quickstart(model=str(tiny_chat_dir), out=str(other), overrides=QUICK, force=True, log=lambda m: None)
    assert (other / "notes.txt").read_text() == "keep me"
    assert main(args[:-len(QUICK)] + ["bogus_key=1"]) == 1
    assert "unknown recipe key(s): bogus_key" in capsys.readouterr().err
    assert (out / "identity.jsonl").exists()
