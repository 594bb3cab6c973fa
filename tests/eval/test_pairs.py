"""The loop closed: `eval judge --mode pairwise-all` against a fake judge, `data pairs`, then a DPO and a KTO
step; arena votes as the arena writes them, likewise; and what `data pairs` drops or refuses, by why."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from fake_teacher import FakeTeacher, completion
from helpers import read_jsonl, shared_file

from camelid.cli import main
from camelid.client import ChatClient
from camelid.errors import CamelidError
from camelid.eval.answers import read_questions
from camelid.eval.judge import battles_path, judge
from camelid.eval.pairs import make_pairs

STRENGTH = {"alpha": 8, "beta": 5, "gamma": 3}


@pytest.fixture
def questions(tmp_path) -> Path:
    """Two real MT-bench questions (two turns each) in a question file."""
    chosen = [line for line in shared_file("mt_bench_question.jsonl").read_text().splitlines()
              if json.loads(line)["question_id"] in (81, 82)]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(chosen) + "\n")
    return path


@pytest.fixture
def answers(tmp_path) -> Path:
    folder = tmp_path / "answers"
    folder.mkdir()
    for model in STRENGTH:
        lines = [json.dumps({"question_id": qid, "answer_id": f"{model}{qid}", "model_id": model, "tstamp": 0.0,
                             "choices": [{"index": 0, "turns": [f"{model} answers {qid}.{t} in its way."
                                                                for t in (1, 2)]}]}) for qid in (81, 82)]
        (folder / f"{model}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def fair_judge(body: dict, index: int):
    """Rates a single answer by its model's strength; in a pair, picks the stronger model wherever it stands."""
    user = body["messages"][1]["content"]
    shown = sorted((m for m in STRENGTH if m in user), key=user.index)
    if len(shown) == 1:
        return completion(f"Rating: [[{STRENGTH[shown[0]]}]]")
    a, b = shown[:2]
    return completion(f"[[{'A' if STRENGTH[a] > STRENGTH[b] else 'B'}]]")


def _train_step(tiny_chat_dir, data: Path, out: Path, objective: str) -> list[dict]:
    from camelid.train.loop import train
    from camelid.train.recipe import build_config

    cfg = build_config(dict(model=str(tiny_chat_dir), data=[str(data)], out=str(out), objective=objective,
                            seq_len=256, batch_size=2, micro_batch_size=2, max_steps=1, lr=1e-3, warmup_ratio=0.0,
                            packing=False))
    train(cfg, progress=False, log=lambda message: None)
    return read_jsonl(out / "metrics.jsonl")


def test_judge_battles_become_pairs_and_train(tmp_path, questions, answers, tiny_chat_dir):
    out = tmp_path / "pairwise.jsonl"
    with FakeTeacher(fair_judge) as fake:
        judge(read_questions(questions), answers, out, client=ChatClient(fake.base_url, "judge", retries=0),
              mode="pairwise-all", progress=False)
    pairs, kto = tmp_path / "pairs.jsonl", tmp_path / "kto.jsonl"
    main(["data", "pairs", str(battles_path(out)), "--questions", str(questions), "--answers", str(answers),
          "-o", str(pairs), "--kto", str(kto)])
    written = read_jsonl(pairs)
    # 2 questions x 3 model pairs x 2 turns judged; the second turns differ before the judged answer: KTO only
    assert len(written) == 6 and len(read_jsonl(kto)) == 24
    for pair in written:
        assert STRENGTH[pair["chosen_model"]] > STRENGTH[pair["rejected_model"]]
        assert pair["chosen"][0]["content"].startswith(pair["chosen_model"])
        assert pair["prompt"][0]["role"] == "user" and len(pair["prompt"]) == 1
    second = [r for r in read_jsonl(kto) if len(r["prompt"]) == 3]
    assert len(second) == 12 and all(r["prompt"][1]["content"].startswith(r["model"]) for r in second)
    steps = _train_step(tiny_chat_dir, pairs, tmp_path / "dpo", "dpo")
    assert steps[-1]["step"] == 1 and "rewards/margins" in steps[-1]
    steps = _train_step(tiny_chat_dir, kto, tmp_path / "kto-run", "kto")
    assert steps[-1]["step"] == 1 and "kl" in steps[-1]


def test_single_scores_become_kto_rows(tmp_path, questions, answers):
    out = tmp_path / "single.jsonl"
    with FakeTeacher(fair_judge) as fake:
        judge(read_questions(questions), answers, out, client=ChatClient(fake.base_url, "judge", retries=0),
              mode="single", progress=False)
    kto = tmp_path / "kto.jsonl"
    report = make_pairs([out], None, kto_out=kto, questions=questions, answers=[answers], good=7, bad=4)
    rows = read_jsonl(kto)
    assert {(r["model"], r["label"]) for r in rows} == {("alpha", True), ("gamma", False)}
    assert len(rows) == 8 and report.dropped == {"a score between --bad 4 and --good 7": 4}
    with pytest.raises(CamelidError, match="give --out for pairs and/or --kto"):
        make_pairs([out], None)
    with pytest.raises(CamelidError, match="give --questions and --answers"):
        make_pairs([out], None, kto_out=kto)


def _vote(arena, winner: str, a: str, b: str, prompt: str = "Name a colour.") -> None:
    from camelid.serve.arena import Answer, Battle

    sides = {"a": Answer(SimpleNamespace(name="alpha"), text=a, finish_reason="stop"),
             "b": Answer(SimpleNamespace(name="beta"), text=b, finish_reason="stop")}
    arena.record(Battle(f"battle-{len(arena.battles)}-{winner}", prompt, sides), winner)


def test_arena_votes_become_pairs_and_train(tmp_path, tiny_chat_dir):
    from camelid.serve.arena import Arena

    votes = tmp_path / "votes.jsonl"
    arena = Arena([], votes)
    for winner in ("model_a", "model_b", "model_b", "tie", "tie (bothbad)"):
        _vote(arena, winner, "Blue, the colour of the sky.", "Green.")
    _vote(arena, "model_a", "Same.", "Same.")
    _vote(arena, "model_a", "", "Red.")
    pairs, kto = tmp_path / "pairs.jsonl", tmp_path / "kto.jsonl"
    report = make_pairs([votes], pairs, kto_out=kto, ties="keep", both_bad="drop")
    assert report.pairs == 3 and report.read == {"votes": 7}
    assert report.dropped == {"both answers the same": 1, "an empty answer": 1,
                              "both answers bad (tie (bothbad))": 1}
    chosen = [p["chosen"][0]["content"] for p in read_jsonl(pairs)]
    assert chosen == ["Blue, the colour of the sky.", "Green.", "Green."]
    labels = [(r["completion"][0]["content"][:4], r["label"]) for r in read_jsonl(kto)]
    assert labels == [("Blue", True), ("Gree", False), ("Gree", True), ("Blue", False), ("Gree", True),
                      ("Blue", False), ("Blue", True), ("Gree", True)]  # the tie, kept: both desirable
    steps = _train_step(tiny_chat_dir, pairs, tmp_path / "dpo", "dpo")
    assert steps[-1]["step"] == 1


def test_bad_verdict_files_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"model_a": "x", "model_b": "y", "winner": "model_c", "conversation_a": [],
                               "conversation_b": []}) + "\n")
    with pytest.raises(CamelidError, match=r"bad\.jsonl:1: winner 'model_c' is not one of"):
        make_pairs([bad], tmp_path / "out.jsonl")
    bad.write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(CamelidError, match=r"bad\.jsonl:1: neither a vote, a battle nor a single judgment"):
        make_pairs([bad], tmp_path / "out.jsonl")
    with pytest.raises(CamelidError, match="keeping ties writes their answers as KTO rows; give --kto"):
        make_pairs([bad], tmp_path / "out.jsonl", ties="keep")
    assert not (tmp_path / "out.jsonl").exists()
