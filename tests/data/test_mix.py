"""Mixing datasets: exact shares by weight and count, seeded subsets and even repeats, provenance, and
preference pairs as conditioned examples whose markers SmolLM2's real tokenizer and template never train on."""

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from helpers import read_jsonl

from camelid.chat_template import ChatTemplate, read_chat_template
from camelid.data.formats import BadRecord, read_conversations
from camelid.data.mix import HELPFUL, UNHELPFUL, MixSource, condition_preference, mix_datasets, split_by_weight
from camelid.errors import CamelidError
from camelid.model import IGNORE


def write_source(path: Path, n: int, tag: str, **extra) -> Path:
    """`n` Alpaca records whose question and answer say which record they are: "tag-i"."""
    path.write_text("".join(json.dumps({"instruction": f"{tag}-{i}?", "output": f"{tag}-{i}.", **extra}) + "\n"
                            for i in range(n)))
    return path


def write_pairs(path: Path, n: int, tag: str = "p") -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{tag}-{i}?", "chosen": f"good {tag}-{i}.",
                                        "rejected": f"bad {tag}-{i}."}) + "\n" for i in range(n)))
    return path


def question(record: dict) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


def within(x: int, mean: float, var: float, sigmas: float = 4.0) -> bool:
    """`x` within `sigmas` standard deviations of its mean: a false failure once in ~16,000 per check."""
    return abs(x - mean) <= sigmas * math.sqrt(var)


# -- sources as the command line gives them -----------------------------------------------------------------


@pytest.mark.parametrize("spec, source", [
    ("alpaca=data/a.jsonl:weight=0.3", MixSource("data/a.jsonl", "alpaca", weight=0.3)),
    ("sg=b.jsonl:count=100", MixSource("b.jsonl", "sg", count=100)),
    ("b.jsonl:2", MixSource("b.jsonl", "b", weight=2.0)),  # a bare number is a weight
    ("runs/x/c.jsonl", MixSource("runs/x/c.jsonl", "c", weight=1.0)),  # no suffix: weight 1, named by the stem
    ("runs/a=b/c.jsonl:count=3", MixSource("runs/a=b/c.jsonl", "c", count=3)),  # '=' inside a path names nothing
])
def test_a_source_spec_gives_its_path_name_and_share(spec, source):
    assert MixSource.parse(spec) == source


@pytest.mark.parametrize("spec", ["a=b.jsonl:count=many", "a=b.jsonl:count=1.5", "b.jsonl:heavy", "a=b.jsonl:size=3"])
def test_a_bad_share_is_refused_with_the_forms_that_work(spec):
    message = (f"source {spec!r}: after the last ':' give weight=W, count=N or a weight "
               "(e.g. alpaca=alpaca.jsonl:weight=0.3)")
    with pytest.raises(CamelidError) as exc_info:
        MixSource.parse(spec)
    assert str(exc_info.value) == message


# -- shares ------------------------------------------------------------------------------------------------


def test_split_by_weight_is_exact_and_rounds_by_largest_remainder():
    assert split_by_weight(1000, [0.5, 0.3, 0.2]) == [500, 300, 200]
    assert split_by_weight(100, [1, 1, 1]) == [34, 33, 33]  # a tie goes to the earlier source
    assert split_by_weight(10, [0.3, 0.7]) == [3, 7]  # 0.3 read as 3/10, not 0.29999...
    assert split_by_weight(7, [2, 1]) == [5, 2]  # quotas 4.67 and 2.33
    assert sum(split_by_weight(997, [0.13, 0.29, 0.58])) == 997


def test_weights_give_exact_shares_and_the_shuffle_mixes_them_within_sampling_error(tmp_path):
    sources = [MixSource(write_source(tmp_path / f"{t}.jsonl", n, t), t, weight=w)
               for t, n, w in (("a", 500, 0.5), ("b", 300, 0.3), ("c", 200, 0.2))]
    for seed in range(5):
        out = tmp_path / f"mix{seed}.jsonl"
        report = mix_datasets(sources, out, total=600, seed=seed)
        records = read_jsonl(out)
        assert len(records) == report.written == 600
        assert Counter(r["source"] for r in records) == {"a": 300, "b": 180, "c": 120}
        # Any stretch of the output is a sample without replacement of the whole: hypergeometric counts.
        head = Counter(r["source"] for r in records[:200])
        for name, share in (("a", 300), ("b", 180), ("c", 120)):
            p = share / 600
            assert within(head[name], 200 * p, 200 * p * (1 - p) * (600 - 200) / (600 - 1)), (seed, name, head)
        # No repeats were needed, so each record is there at most once.
        assert max(Counter(question(r) for r in records).values()) == 1
        assert report.facts["source a"]["taken"] == 300 and report.facts["source a"]["repeats"] == 0


def test_a_subset_is_uniform_over_the_source_across_seeds(tmp_path):
    src = write_source(tmp_path / "s.jsonl", 10, "s")
    picked = Counter()
    seeds = 200
    for seed in range(seeds):
        out = tmp_path / "out.jsonl"
        mix_datasets([MixSource(src, "s", count=3)], out, seed=seed)
        chosen = [question(r) for r in read_jsonl(out)]
        assert len(set(chosen)) == 3  # a subset: no record twice
        picked.update(chosen)
    assert len(picked) == 10
    for q, n in picked.items():  # each record is in a seed's subset with probability 3/10
        assert within(n, seeds * 0.3, seeds * 0.3 * 0.7), (q, n)


def test_default_total_is_the_largest_that_repeats_no_source(tmp_path):
    a = MixSource(write_source(tmp_path / "a.jsonl", 40, "a"), "a", weight=0.7)
    b = MixSource(write_source(tmp_path / "b.jsonl", 10, "b"), "b", weight=0.3)
    report = mix_datasets([a, b], tmp_path / "out.jsonl")
    # 35 splits 24.5/10.5, the tie going to a: 25 and 10; 36 would need 11 of b's 10.
    assert report.written == 35
    assert Counter(r["source"] for r in read_jsonl(tmp_path / "out.jsonl")) == {"a": 25, "b": 10}
    assert report.facts["source b"]["repeats"] == 0


def test_a_small_source_is_repeated_evenly_every_record_before_any_twice(tmp_path):
    big = MixSource(write_source(tmp_path / "big.jsonl", 100, "big"), "big", weight=1)
    small = MixSource(write_source(tmp_path / "small.jsonl", 6, "small"), "small", weight=1)
    report = mix_datasets([big, small], tmp_path / "out.jsonl", total=40)
    times = Counter(question(r) for r in read_jsonl(tmp_path / "out.jsonl") if r["source"] == "small")
    assert sum(times.values()) == 20
    assert len(times) == 6 and sorted(times.values()) == [3, 3, 3, 3, 4, 4]  # 3 passes, then 2 more at random
    assert report.facts["source small"]["repeats"] == 14
    assert report.facts["source big"]["repeats"] == 0


def test_counts_are_exact_subsets_or_whole_passes_plus_extras(tmp_path):
    a = MixSource(write_source(tmp_path / "a.jsonl", 10, "a"), "a", count=7)
    b = MixSource(write_source(tmp_path / "b.jsonl", 4, "b"), "b", count=9)
    report = mix_datasets([a, b], tmp_path / "out.jsonl", seed=3)
    records = read_jsonl(tmp_path / "out.jsonl")
    by_source = {s: Counter(question(r) for r in records if r["source"] == s) for s in "ab"}
    assert sum(by_source["a"].values()) == 7 and set(by_source["a"].values()) == {1}
    assert sum(by_source["b"].values()) == 9 and sorted(by_source["b"].values()) == [2, 2, 2, 3]
    assert (report.facts["source a"]["repeats"], report.facts["source b"]["repeats"]) == (0, 5)


def test_counts_and_weights_together_weights_share_what_the_counts_leave(tmp_path):
    a = MixSource(write_source(tmp_path / "a.jsonl", 10, "a"), "a", count=5)
    b = MixSource(write_source(tmp_path / "b.jsonl", 50, "b"), "b", weight=1)
    c = MixSource(write_source(tmp_path / "c.jsonl", 50, "c"), "c", weight=3)
    mix_datasets([a, b, c], tmp_path / "out.jsonl", total=25)
    assert Counter(r["source"] for r in read_jsonl(tmp_path / "out.jsonl")) == {"a": 5, "b": 5, "c": 15}
    # Without a total: the counts plus the largest weighted total that repeats nothing. c's 50 at 3/4 allow 66
    # exactly, and rounding one more: 67 splits 16.75/50.25 into 17 and 50; 68 would need 51 of c.
    report = mix_datasets([a, b, c], tmp_path / "out2.jsonl")
    assert Counter(r["source"] for r in read_jsonl(tmp_path / "out2.jsonl")) == {"a": 5, "b": 17, "c": 50}
    assert report.written == 72


@pytest.mark.parametrize("sources, total, message", [
    ([dict(name="a")], None, "give a weight or a count"),
    ([dict(name="a", weight=1, count=2)], None, "give a weight or a count"),
    ([dict(name="a", weight=0)], None, "weight must be a positive number"),
    ([dict(name="a", count=2.5)], None, "count must be a positive whole number"),
    ([dict(name="a", count=2), dict(name="a", count=3)], None, "two sources are named 'a'"),
    ([dict(name="a", count=2), dict(name="b", count=3)], 6, "differs from the sources' counts"),
    ([dict(name="a", count=2), dict(name="b", weight=1)], 2, "leaves nothing for the weighted sources"),
])
def test_inconsistent_shares_are_refused_with_the_fix(tmp_path, sources, total, message):
    path = write_source(tmp_path / "s.jsonl", 5, "s")
    with pytest.raises(CamelidError, match=message):
        mix_datasets([MixSource(path, **s) for s in sources], tmp_path / "out.jsonl", total=total)
    assert not (tmp_path / "out.jsonl").exists()


# -- provenance and determinism ----------------------------------------------------------------------------


def test_provenance_source_and_ids_and_the_same_seed_gives_the_same_file(tmp_path):
    ids = tmp_path / "ids.jsonl"
    ids.write_text("".join(json.dumps({"id": f"x{i}", "source": "old", "messages": [
        {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}) + "\n" for i in range(8)))
    plain = write_source(tmp_path / "plain.jsonl", 8, "p")
    sources = [MixSource(ids, "with-ids", weight=1), MixSource(plain, "plain", weight=1)]
    mix_datasets(sources, tmp_path / "one.jsonl", seed=7)
    mix_datasets(sources, tmp_path / "two.jsonl", seed=7)
    mix_datasets(sources, tmp_path / "three.jsonl", seed=8)
    one = (tmp_path / "one.jsonl").read_bytes()
    assert one == (tmp_path / "two.jsonl").read_bytes()
    assert one != (tmp_path / "three.jsonl").read_bytes()
    for r in read_jsonl(tmp_path / "one.jsonl"):
        if r["source"] == "with-ids":  # the mix's name replaces the record's own `source`
            assert r["id"] == "x" + question(r)[1:]
        else:
            assert r["source"] == "plain" and "id" not in r and "condition" not in r
    # What training reads back is the conversations, extra keys ignored.
    assert len(read_conversations(tmp_path / "one.jsonl").records) == 16


def test_report_is_saved_beside_the_output(tmp_path):
    src = write_source(tmp_path / "s.jsonl", 3, "s")
    mix_datasets([MixSource(src, "s", count=3)], tmp_path / "out.jsonl")
    saved = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert saved["pipeline"] == "mix" and saved["read"] == 3 and saved["written"] == 3
    assert saved["source s"] == {"path": str(src), "count": 3, "kind": "plain", "read": 3, "usable": 3,
                                 "taken": 3, "repeats": 0}
    assert "source s: path" in (tmp_path / "out.jsonl.report.txt").read_text()


def test_bad_records_are_errors_naming_the_line_or_counted_with_skip_bad(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"instruction": "q", "output": "a"}\n{broken\n{"instruction": "q2", "output": ""}\n')
    with pytest.raises(BadRecord, match=f"{path}:2: invalid JSON"):
        mix_datasets([MixSource(path, "s", weight=1)], tmp_path / "out.jsonl")
    report = mix_datasets([MixSource(path, "s", weight=1)], tmp_path / "out.jsonl", skip_bad=True)
    assert report.read == 3 and report.written == 1
    assert dict(report.dropped) == {"invalid JSON": 1, "empty message content": 1}
    assert report.facts["source s"]["dropped"] == {"invalid JSON": 1, "empty message content": 1}


# -- preference pairs --------------------------------------------------------------------------------------


def test_a_pair_becomes_two_conditioned_examples_with_the_marker_as_system_message(tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        json.dumps({"id": 1, "prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "No."}) + "\n"
        + json.dumps({"id": 2,
                      "chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "4"}],
                      "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                                   {"role": "assistant", "content": "5"}]}) + "\n"
    )
    report = mix_datasets([MixSource(prefs, "hh", weight=1)], tmp_path / "out.jsonl")
    records = sorted(read_jsonl(tmp_path / "out.jsonl"), key=lambda r: (r["id"], r["condition"]))
    assert records == [
        {"messages": [{"role": "system", "content": HELPFUL}, {"role": "user", "content": "Name a fruit."},
                      {"role": "assistant", "content": "An apple."}], "source": "hh", "condition": "helpful", "id": 1},
        {"messages": [{"role": "system", "content": UNHELPFUL}, {"role": "user", "content": "Name a fruit."},
                      {"role": "assistant", "content": "No."}], "source": "hh", "condition": "unhelpful", "id": 1},
        {"messages": [{"role": "system", "content": f"{HELPFUL}\nBe brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}], "source": "hh", "condition": "helpful", "id": 2},
        {"messages": [{"role": "system", "content": f"{UNHELPFUL}\nBe brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "5"}], "source": "hh", "condition": "unhelpful", "id": 2},
    ]
    facts = report.facts["source hh"]
    assert (facts["kind"], facts["pairs"], facts["taken"], facts["helpful"], facts["unhelpful"]) == (
        "preference", 2, 4, 2, 2)


def test_prompt_as_messages_custom_markers_and_pairs_that_cannot_be_used():
    record = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
              "rejected": "Go away.", "system": "Be kind."}
    good, bad = condition_preference(record, "f:1", helpful="<good>", unhelpful="<bad>")
    assert good == [{"role": "system", "content": "<good>\nBe kind."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}]
    assert bad[0] == {"role": "system", "content": "<bad>\nBe kind."} and bad[-1]["content"] == "Go away."
    with pytest.raises(BadRecord, match="f:1: preference record without 'prompt'"):
        condition_preference({"chosen": "a", "rejected": "b"}, "f:1")
    with pytest.raises(BadRecord, match="do not share the prompt"):
        condition_preference({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
                              "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]},
                             "f:1")
    with pytest.raises(BadRecord, match=r"empty message content \(in 'rejected'"):
        condition_preference({"prompt": "q", "chosen": "a", "rejected": " "}, "f:1")


def hh(*turns: str) -> str:
    """An HH-RLHF transcript: Human and Assistant turns alternating, each after a blank line."""
    return "".join(f"\n\n{('Human', 'Assistant')[i % 2]}: {turn}" for i, turn in enumerate(turns))


# Written by hand in the shape of Anthropic/hh-rlhf rows: whole transcripts, no prompt, only the last answer differs.
HH_ROWS = [
    {"chosen": hh("What's a good way to keep cut flowers fresh longer?",
                  "Trim the stems at an angle every couple of days, change the water often, and keep the vase out "
                  "of direct sun and away from ripening fruit."),
     "rejected": hh("What's a good way to keep cut flowers fresh longer?", "Just buy new ones.")},
    {"chosen": hh("Can you help me write a birthday message for my grandma?",
                  "Of course! How old is she turning, and is there anything she loves that I could mention?",
                  "She's turning 90 and she loves gardening.",
                  "Happy 90th birthday, Grandma!\n\nMay your year be as full of blooms as your garden."),
     "rejected": hh("Can you help me write a birthday message for my grandma?",
                    "Of course! How old is she turning, and is there anything she loves that I could mention?",
                    "She's turning 90 and she loves gardening.",
                    "Happy birthday. You are 90 now.")},
    {"chosen": hh("How do I get into my house? I locked myself out.", "Is there a window or back door open?",
                  "No, everything is locked.",
                  "Then the safest option is to call a licensed locksmith, or your landlord if you rent."),
     "rejected": hh("How do I get into my house? I locked myself out.", "Is there a window or back door open?",
                    "No, everything is locked.", "Break a window.")},
]


def test_hh_rlhf_transcripts_are_read_as_conversations_sharing_all_but_the_last_answer(tmp_path):
    prefs = tmp_path / "hh.jsonl"
    prefs.write_text("".join(json.dumps(row) + "\n" for row in HH_ROWS))
    report = mix_datasets([MixSource(prefs, "hh", weight=1)], tmp_path / "out.jsonl")
    assert report.facts["source hh"]["pairs"] == 3 and report.written == 6
    by_answer = {r["messages"][-1]["content"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    grandma = [
        {"role": "user", "content": "Can you help me write a birthday message for my grandma?"},
        {"role": "assistant",
         "content": "Of course! How old is she turning, and is there anything she loves that I could mention?"},
        {"role": "user", "content": "She's turning 90 and she loves gardening."},
    ]
    good = by_answer["Happy 90th birthday, Grandma!\n\nMay your year be as full of blooms as your garden."]
    bad = by_answer["Happy birthday. You are 90 now."]
    assert good["messages"][:-1] == [{"role": "system", "content": HELPFUL}] + grandma
    assert bad["messages"][:-1] == [{"role": "system", "content": UNHELPFUL}] + grandma
    assert (good["condition"], bad["condition"]) == ("helpful", "unhelpful")
    assert by_answer["Just buy new ones."]["messages"][1] == {
        "role": "user", "content": "What's a good way to keep cut flowers fresh longer?"}
    # Copies that lost the leading blank line read the same.
    stripped = {key: text.lstrip("\n") for key, text in HH_ROWS[1].items()}
    assert condition_preference(stripped, "f:1") == condition_preference(HH_ROWS[1], "f:1")


def test_a_string_that_is_no_hh_transcript_is_a_clear_error(tmp_path):
    row = {"chosen": HH_ROWS[0]["chosen"], "rejected": "Just buy new ones."}  # the answer alone, no turns
    with pytest.raises(BadRecord) as excinfo:
        condition_preference(row, "f:3")
    message = str(excinfo.value)
    assert message.startswith("f:3: preference record without 'prompt' ('rejected' is a string but not a "
                              "transcript of 'Human:' and 'Assistant:' turns as in HH-RLHF;")
    assert "\n" not in message
    with pytest.raises(BadRecord, match="f:1: preference record without 'prompt'.*'chosen'"):
        condition_preference({"chosen": "Sure!" + hh("Hi", "Hello"), "rejected": hh("Hi", "Go away.")}, "f:1")
    with pytest.raises(BadRecord, match="do not share the prompt"):
        condition_preference({"chosen": hh("Hi", "Hello"), "rejected": hh("Hey", "Go away.")}, "f:1")
    with pytest.raises(BadRecord, match=r"empty message content \(in 'rejected'"):
        condition_preference({"chosen": hh("Hi", "Hello"), "rejected": hh("Hi", "")}, "f:1")
    # In a file, a bad row names its line, or is counted with --skip-bad.
    prefs = tmp_path / "hh.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in [HH_ROWS[0], row, HH_ROWS[1]]))
    with pytest.raises(BadRecord, match=f"^{prefs}:2: preference record without 'prompt'"):
        mix_datasets([MixSource(prefs, "hh", weight=1)], tmp_path / "out.jsonl")
    report = mix_datasets([MixSource(prefs, "hh", weight=1)], tmp_path / "out.jsonl", skip_bad=True)
    assert report.written == 4 and dict(report.dropped) == {"preference record without 'prompt'": 1}


def test_a_preference_share_counts_examples_and_takes_pairs_whole(tmp_path):
    prefs = write_pairs(tmp_path / "p.jsonl", 4)
    (tmp_path / "p.jsonl").write_text((tmp_path / "p.jsonl").read_text()
                                      + json.dumps({"prompt": "same", "chosen": "x", "rejected": "x"}) + "\n")
    report = mix_datasets([MixSource(prefs, "p", count=5)], tmp_path / "out.jsonl", seed=1)
    records = read_jsonl(tmp_path / "out.jsonl")
    assert len(records) == 5
    prompts = Counter(question(r) for r in records)
    assert len(prompts) == 3 and sorted(prompts.values()) == [1, 2, 2]  # 3 pairs, one side of the last dropped
    assert Counter(r["condition"] for r in records) in ({"helpful": 3, "unhelpful": 2}, {"helpful": 2, "unhelpful": 3})
    for r in records:  # each answer under its own marker
        good = r["messages"][-1]["content"].startswith("good")
        assert r["messages"][0]["content"] == (HELPFUL if good else UNHELPFUL)
        assert r["condition"] == ("helpful" if good else "unhelpful")
    assert dict(report.dropped) == {"chosen equals rejected": 1}
    assert report.facts["source p"]["pairs"] == 4
    # The default total counts a pair as two examples: a plain source of 8 and 4 pairs at equal weights.
    plain = MixSource(write_source(tmp_path / "a.jsonl", 8, "a"), "a", weight=1)
    report = mix_datasets([plain, MixSource(prefs, "p", weight=1)], tmp_path / "out2.jsonl")
    assert Counter(r["source"] for r in read_jsonl(tmp_path / "out2.jsonl")) == {"a": 8, "p": 8}


def test_a_source_of_both_kinds_is_refused(tmp_path):
    path = tmp_path / "both.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"instruction": "q", "output": "a"}) + "\n")
    with pytest.raises(CamelidError, match=f"{path}:2: source 'both' mixes plain records with preference"):
        mix_datasets([MixSource(path, "both", weight=1)], tmp_path / "out.jsonl", skip_bad=True)


@pytest.fixture(scope="module")
def smollm2_tokenizer_and_templates(smollm2_gguf):
    from camelid.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_gguf)
    own = ChatTemplate(read_chat_template(smollm2_gguf), bos_token=tok.bos_token, eos_token=tok.eos_token)
    return tok, {"smollm2": own, "chatml": ChatTemplate.named("chatml", eos_token=tok.eos_token)}


@pytest.mark.parametrize("template_name", ["smollm2", "chatml"])
def test_training_on_conditioned_examples_learns_the_answers_and_never_the_markers(
    tmp_path, smollm2_tokenizer_and_templates, template_name
):
    from camelid.examples import make_examples

    tok, templates = smollm2_tokenizer_and_templates
    template = templates[template_name]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "How do I boil an egg?", "chosen": "Put it in boiling water for nine minutes, then cool it.",
         "rejected": "Figure it out yourself."},
        {"chosen": [{"role": "system", "content": "You answer in one sentence."},
                    {"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "Paris is the capital of France."},
                    {"role": "user", "content": "And of Italy?"},
                    {"role": "assistant", "content": "Rome is the capital of Italy."}],
         "rejected": [{"role": "system", "content": "You answer in one sentence."},
                      {"role": "user", "content": "What is the capital of France?"},
                      {"role": "assistant", "content": "Paris is the capital of France."},
                      {"role": "user", "content": "And of Italy?"},
                      {"role": "assistant", "content": "Who cares."}]},
    ]))
    mix_datasets([MixSource(prefs, "prefs", weight=1)], tmp_path / "out.jsonl")
    conversations = [r.messages for r in read_conversations(tmp_path / "out.jsonl").records]  # as training reads
    examples, stats = make_examples(template, tok, conversations, seq_len=512)
    assert stats.kept == 4
    for messages, example in zip(conversations, examples):
        learned = tok.decode([t for t in example.targets if t != IGNORE])
        answers = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
        assert learned == answers
        marker = HELPFUL if messages[0]["content"].startswith(HELPFUL) else UNHELPFUL
        seen = tok.decode(example.tokens)
        assert f"<|im_start|>system\n{marker}" in seen  # the model reads the condition...
        assert marker not in learned  # ...and is never trained to write it


def test_an_output_in_a_missing_directory_is_refused_before_any_work(tmp_path):
    src = write_source(tmp_path / "s.jsonl", 3, "s")
    with pytest.raises(CamelidError, match="no such directory; create it"):
        mix_datasets([MixSource(src, "s", count=3)], tmp_path / "nope" / "out.jsonl")
    with pytest.raises(CamelidError, match="is a directory; give a file name"):
        mix_datasets([MixSource(src, "s", count=3)], tmp_path)
