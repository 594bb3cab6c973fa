"""Curation rules measured on real data: the refusal patterns on a held-out list of real answers, and issue 17's
files (Alpaca, GPTeacher Toolformer) from ../shared/data, skipped where those are absent.

The held-out list (tests/fixtures/refusals_held_out.jsonl) holds answers cut to a sentence or two from ShareGPT,
Anthropic HH (harmless-base test), Alpaca and GPTeacher, each labelled by reading it: a refusal declines what was
asked (or part of it), or says that as a model it cannot or does not; an apology for a mistake, a requested
apology, a story's "I can't" and a role statement are not. It was drawn and labelled before the patterns were
measured on it, and must not be used to tune them: a pattern written from it would make these figures a fit.
"""

from helpers import FIXTURES, read_jsonl, shared_file, write_jsonl

from camelid.data.curate import REFUSAL_PATTERNS, curate, dropped_path


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def dropped_by(out, rule: str) -> list[dict]:
    return [d for d in read_jsonl(dropped_path(out)) if d["rule"] == rule]


def test_refusal_patterns_on_the_held_out_list(tmp_path):
    rows = read_jsonl(FIXTURES / "refusals_held_out.jsonl")
    assert sum(r["refusal"] for r in rows) >= 60 and sum(not r["refusal"] for r in rows) >= 60
    src = write_jsonl(tmp_path / "in.jsonl", [chat("Go on.", r["text"]) for r in rows])
    out = tmp_path / "out.jsonl"
    curate(src, out, refusal_patterns=REFUSAL_PATTERNS, failure_patterns=[], min_response_words=0,
           near_duplicate_threshold=None, drop_cut_off=False, write_dropped=True)
    flagged = {int(d["where"].rsplit(":", 1)[1]) - 1 for d in dropped_by(out, "refusal")}
    hits = sum(rows[i]["refusal"] for i in flagged)
    precision, recall = hits / len(flagged), hits / sum(r["refusal"] for r in rows)
    print(f"refusal patterns on {len(rows)} held-out answers: precision {precision:.3f}, recall {recall:.3f}")
    # Measured when the patterns were written: precision 0.909 (30 of 33), recall 0.435 (30 of 69).
    assert precision >= 0.90 and recall >= 0.42, (precision, recall)


def test_alpaca_keeps_right_one_word_answers_requested_apologies_and_role_statements(tmp_path):
    src = shared_file("sft/alpaca_en_demo.json")
    out = tmp_path / "out.jsonl"
    report = curate(src, out, write_dropped=True)
    # Before issue 17: 13 tiny responses ("fog.", "3", "bird", "google.com"...), every one of them right.
    assert "tiny response" not in report.dropped
    kept = {r["messages"][-1]["content"] for r in read_jsonl(out)}
    assert {"fog.", "3", "bird", "google.com", "Negative"} <= kept
    answers = [a for a in kept if a.startswith(("I'm sorry, but I'm unable to come into work", "As an AI assistant"))]
    assert len(answers) == 4  # the excuse letter asked for, and three role statements that refuse nothing
    refused = [d["messages"][-1]["content"] for d in dropped_by(out, "refusal")]
    assert any(a.startswith("As an AI, I don't have a physical house") for a in refused)
    assert report.dropped["refusal"] == 30, report.dropped


def test_gpteacher_toolformer_is_not_a_near_duplicate_of_itself(tmp_path):
    src = shared_file("sft/gpteacher_toolformer_dedupe.json")
    out = tmp_path / "out.jsonl"
    report = curate(src, out, write_dropped=True)
    # Before issue 17: 5,558 of 7,673 dropped, because every prompt opens with the same tool description. After:
    # 1,129; of 40 read, 36 were copies (the rest: template siblings such as "the square root of 81" and "of 196").
    print(f"GPTeacher Toolformer: {report.dropped['near duplicate']} near duplicates of {report.read}")
    assert 1000 <= report.dropped["near duplicate"] <= 1250, report.dropped
    kept = {r["messages"][-1]["content"] for r in read_jsonl(out)}
    # The pair: the Waterloo answer was dropped as a copy of the French Revolution one (similarity 0.81).
    assert {"Summary of the French Revolution: wikipedia('French Revolution')",
            "Here's a summary of the Battle of Waterloo: wikipedia('Battle of Waterloo')"} <= kept
