"""Dataset statistics: exact counts on a crafted file, token counts equal to rendering and encoding by hand
with SmolLM2's real tokenizer and template, the histogram as a real PNG, and languages of real sentences."""

import json
import sys
from pathlib import Path

import pytest

from camelid.data.formats import BadRecord
from camelid.data.stats import dataset_stats, stats_text, summary
from camelid.errors import CamelidError

RECORDS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}], "source": "web", "condition": "helpful"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                  {"role": "assistant", "content": "6"}], "source": "web", "condition": "unhelpful"},
    {"instruction": "Name a colour.", "output": "Blue.", "system": "You are terse.", "source": "alpaca"},
    {"conversations": [{"from": "human", "value": "Bonjour"}, {"from": "gpt", "value": "Salut !"}]},
    {"messages": [{"role": "user", "content": "a" * 10}, {"role": "assistant", "content": "b" * 20},
                  {"role": "user", "content": "c"}, {"role": "assistant", "content": "d" * 5},
                  {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]},
]

# The same conversations as training reads them, written out by hand.
CONVERSATIONS = [
    RECORDS[0]["messages"],
    RECORDS[1]["messages"],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Bonjour"}, {"role": "assistant", "content": "Salut !"}],
    RECORDS[4]["messages"],
]


@pytest.fixture
def crafted(tmp_path) -> Path:
    path = tmp_path / "crafted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "{not json\n")
    return path


def test_counts_on_a_crafted_file_are_exact(crafted):
    with pytest.raises(BadRecord, match=f"{crafted}:6: invalid JSON"):
        dataset_stats(crafted)
    report = dataset_stats(crafted, skip_bad=True)
    f = report.facts
    assert (report.read, dict(report.dropped)) == (6, {"invalid JSON": 1})
    assert f["conversations"] == 5
    assert f["messages"] == {"system": 3, "user": 8, "assistant": 8}
    assert f["exchanges per conversation"] == {"min": 1, "mean": 1.6, "median": 1, "p90": 3, "p99": 3, "max": 3}
    assert f["system prompts"] == {"conversations with one": 3, "distinct": 2}
    assert f["sources"] == {"web": 2, "alpaca": 1, "(none)": 2}
    assert f["conditions"] == {"helpful": 1, "unhelpful": 1, "(none)": 3}
    chars = f["characters per message"]
    assert chars["system"] == {"min": 9, "mean": 10.67, "median": 9, "p90": 14, "p99": 14, "max": 14}
    # user: 2, 4, 8, 14, 7, 10, 1, 1
    assert chars["user"] == {"min": 1, "mean": 5.88, "median": 5.5, "p90": 14, "p99": 14, "max": 14}
    # assistant: 6, 1, 1, 5, 7, 20, 5, 1
    assert chars["assistant"] == {"min": 1, "mean": 5.75, "median": 5, "p90": 20, "p99": 20, "max": 20}
    assert "tokens per conversation" not in f and "languages" not in f
    text = stats_text(report)
    assert "conversations" in text and "5 (skipped 1 bad records: 1 invalid JSON)" in text
    assert "sources" in text and "web 2, alpaca 1, (none) 2" in text


def test_summary_uses_nearest_rank_percentiles():
    values = list(range(1, 101))  # 1..100
    assert summary(values) == {"min": 1, "mean": 50.5, "median": 50.5, "p90": 90, "p99": 99, "max": 100}
    assert summary([7]) == {"min": 7, "mean": 7, "median": 7, "p90": 7, "p99": 7, "max": 7}
    assert summary([]) == {}


def test_token_counts_are_the_template_rendering_encoded_as_training_does(crafted, smollm2_tokenizer_and_template,
                                                                          tmp_path):
    tok, template = smollm2_tokenizer_and_template
    by_hand = [len(tok.encode(template.render(m), add_special=False)) for m in CONVERSATIONS]
    # Learned tokens: each answer and the <|im_end|> after it (ChatML), encoded on its own.
    learned = sum(len(tok.encode(m["content"] + "<|im_end|>", add_special=False))
                  for c in CONVERSATIONS for m in c if m["role"] == "assistant")
    ordered = sorted(by_hand)
    assert len(set(ordered)) == 5  # distinct, so the limits below split them exactly
    limits = (ordered[1], ordered[3])  # longer than: 3 and 1 conversations
    report = dataset_stats(crafted, tokenizer=tok, template=template, context_lengths=limits, skip_bad=True)
    f = report.facts
    assert f["tokens"] == {"all": sum(by_hand), "learned": learned}
    assert f["tokens per conversation"]["min"] == ordered[0]
    assert f["tokens per conversation"]["median"] == ordered[2]
    assert f["tokens per conversation"]["max"] == ordered[4]
    assert f["longer than"] == {str(limits[0]): 3, str(limits[1]): 1}
    assert f["template"] == "the model's own"
    assert f"longer than {limits[1]:,} tokens" in stats_text(report)


def test_histogram_is_a_real_png(crafted, smollm2_tokenizer_and_template, tmp_path):
    import matplotlib.image

    tok, template = smollm2_tokenizer_and_template
    png = tmp_path / "lengths.png"
    report = dataset_stats(crafted, tokenizer=tok, template=template, histogram=png, skip_bad=True)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert matplotlib.image.imread(png).shape[:2] == (440, 770)  # 7 x 4 inches at 110 dpi
    assert report.outputs == {"histogram": str(png)}
    assert not list(tmp_path.glob(".*.tmp"))


def test_languages_of_the_first_user_turns(tmp_path):
    firsts = [
        "How do I bake sourdough bread at home without a proofing basket?",
        "What is the best way to learn to play the guitar as an adult?",
        "Comment puis-je apprendre à programmer en Python rapidement ?",
        "Wie funktioniert eigentlich ein Elektromotor?",
        "¿Cuál es la capital de Australia y por qué no es Sídney?",
        "请解释一下量子计算的基本原理。",
        "Как работает двигатель внутреннего сгорания?",
        "東京でおすすめの観光地を教えてください。",
    ]
    path = tmp_path / "multi.jsonl"
    # The answers are all English: only the first user turn decides.
    path.write_text("".join(json.dumps({"instruction": q, "output": "Here is an answer in English."}) + "\n"
                            for q in firsts))
    expected = {"en": 2, "fr": 1, "de": 1, "es": 1, "zh": 1, "ru": 1, "ja": 1}  # ISO 639-1, as sharegpt reports
    report = dataset_stats(path, languages=["en", "fr", "de", "es", "zh", "ru", "ja"])
    assert report.facts["languages"] == expected
    assert "en 2, fr 1" in stats_text(report)
    assert dataset_stats(path, languages=True).facts["languages"] == expected
    with pytest.raises(CamelidError, match="unknown language code 'xx'"):
        dataset_stats(path, languages=["en", "xx"])


def test_languages_without_lingua_is_one_line_naming_the_extra(crafted, monkeypatch):
    monkeypatch.setitem(sys.modules, "lingua", None)  # as if not installed: importing it raises ImportError
    for languages in (True, ["en", "fr"]):
        with pytest.raises(CamelidError, match=r"^language detection needs lingua: pip install 'camelid\[lang\]'$"):
            dataset_stats(crafted, languages=languages, skip_bad=True)


def test_tokens_need_both_a_tokenizer_and_a_template(crafted, smollm2_tokenizer_and_template, tmp_path):
    tok, _ = smollm2_tokenizer_and_template
    with pytest.raises(CamelidError, match="need both a tokenizer and a chat template"):
        dataset_stats(crafted, tokenizer=tok)
    with pytest.raises(CamelidError, match="histogram needs a tokenizer"):
        dataset_stats(crafted, histogram=tmp_path / "h.png")


def test_a_histogram_into_a_missing_directory_is_refused_before_any_work(crafted, smollm2_tokenizer_and_template,
                                                                         tmp_path, monkeypatch):
    import camelid.data.stats

    tokenizer, template = smollm2_tokenizer_and_template

    def no_tokenizing(*args):
        raise AssertionError("tokenized before the histogram's directory was checked")

    monkeypatch.setattr(camelid.data.stats, "_token_counts", no_tokenizing)
    png = tmp_path / "plots" / "lengths.png"
    with pytest.raises(CamelidError) as error:
        dataset_stats(crafted, tokenizer=tokenizer, template=template, histogram=png, skip_bad=True)
    assert str(error.value) == f"{png}: there is no directory {png.parent} to write it in; create it"
    assert not png.parent.exists()
