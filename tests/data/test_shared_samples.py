"""Every shared sample file, written at test time as .json, .jsonl.gz, .parquet and a datasets save_to_disk folder,
read by every verb (data stats, curate and mix; train's rows; eval perplexity's texts; cost's token counts): each
kind of source gives each verb exactly what the JSON file gives it, and each sample is read in its own format."""

import gzip
import json
from dataclasses import asdict

import datasets
import pytest

from camelid.chat_template import ChatTemplate
from camelid.data.curate import curate
from camelid.data.formats import read_conversations
from camelid.data.mix import MixSource, mix_datasets
from camelid.data.sources import source_records
from camelid.data.stats import dataset_stats
from camelid.errors import CamelidError
from camelid.eval.likelihood import read_texts
from camelid.train.data import training_rows
from camelid.train.recipe import TrainConfig
from helpers import read_jsonl, shared_file

LIMIT = 150  # records taken from each sample: enough for every shape in it, quick to tokenize four times over

# name: (file in ../shared/data, the format its records are read in, how many of its first LIMIT are bad)
SAMPLES = {
    "alpaca": ("sft/alpaca_en_demo.json", "alpaca", 0),
    "gpteacher": ("sft/gpteacher_toolformer_dedupe.json", "alpaca", 0),
    "dpo": ("preference/dpo_en_demo.json", "sharegpt-preference", 0),
    "kto": ("preference/kto_en_demo.json", "kto", 0),
    "hh": ("preference/hh_rlhf_harmless_base_test.jsonl.gz", "hh-rlhf", 1),  # line 87: an empty chosen answer
    "glaive": ("tools/glaive_toolcall_en_demo.json", "sharegpt", 0),
}
KINDS = ("json", "jsonl.gz", "parquet", "save_to_disk")

# A ChatML template that writes tools, tool calls and tool results as the Hermes format (Qwen2.5's) does; the
# built-ins and SmolLM2's own template write none of them.
TOOL_TEMPLATE = """\
{%- if tools %}<|im_start|>system
You may call these functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def sample_records(name: str) -> list[dict]:
    path = shared_file(SAMPLES[name][0])
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for _, line in zip(range(LIMIT), f)]
    return json.loads(path.read_text(encoding="utf-8"))[:LIMIT]


def write_as(records: list[dict], kind: str, folder) -> str:
    """The records as a source of `kind` in `folder`; returns its path."""
    if kind == "json":
        path = folder / "data.json"
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    elif kind == "jsonl.gz":
        path = folder / "data.jsonl.gz"
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    elif kind == "parquet":
        path = folder / "data.parquet"
        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        path = folder / "saved"
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module", params=list(SAMPLES))
def sample(request, tmp_path_factory):
    """(sample name, {kind: source path}) with the sample written in every kind."""
    records = sample_records(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    sources = {}
    for kind in KINDS:
        (folder / kind).mkdir()
        sources[kind] = write_as(records, kind, folder / kind)
    return request.param, sources


@pytest.fixture(scope="module")
def tools_template(smollm2_gguf):
    from camelid.checkpoint import load_tokenizer_and_template

    tokenizer, _ = load_tokenizer_and_template(smollm2_gguf)
    return tokenizer, ChatTemplate(TOOL_TEMPLATE, eos_token="<|im_end|>", name="hermes-tools")


def without_where(record) -> dict:
    return {k: v for k, v in asdict(record).items() if k != "where"}


def test_every_kind_reads_the_same_records_in_the_samples_format(sample):
    name, sources = sample
    _, form, bad = SAMPLES[name]
    reads = {kind: read_conversations(path, skip_bad=True) for kind, path in sources.items()}
    first = reads["json"]
    assert len(first.records) == LIMIT - bad and len(first.skipped) == bad
    assert {r.format for r in first.records} == {form}
    for kind, read in reads.items():
        assert [without_where(r) for r in read.records] == [without_where(r) for r in first.records], kind
        assert [reason for _, reason in read.skipped] == [reason for _, reason in first.skipped], kind
    if name == "glaive":
        assert any(m.get("tool_calls") for r in first.records for m in r.messages)
        assert any(m["role"] == "tool" for r in first.records for m in r.messages)
        assert all(isinstance(r.tools, list) for r in first.records if r.tools)
    if name == "kto":
        assert {r.label for r in first.records} == {True, False}


def test_data_stats_is_the_same_from_every_kind(sample, tools_template):
    _, sources = sample
    tokenizer, template = tools_template
    facts = {}
    for kind, path in sources.items():
        report = dataset_stats(path, tokenizer=tokenizer, template=template, skip_bad=True)
        facts[kind] = {k: v for k, v in report.facts.items() if k != "file"}
        assert report.facts["tokens"]["learned"] > 0
    assert all(f == facts["json"] for f in facts.values())


def test_data_curate_keeps_the_same_records_from_every_kind(sample, tmp_path):
    name, sources = sample
    outputs = {}
    for kind, path in sources.items():
        report = curate(path, tmp_path / f"{kind}.jsonl", skip_bad=True)
        outputs[kind] = read_jsonl(tmp_path / f"{kind}.jsonl")
        assert report.written == len(outputs[kind]) > 0
    assert all(o == outputs["json"] for o in outputs.values())
    # What curate writes reads back as the same records, in camelid's layout of their kind.
    again = read_conversations(tmp_path / "json.jsonl").records
    assert {r.kind for r in again} == {r.kind for r in read_conversations(sources["json"], skip_bad=True).records}


def test_data_mix_takes_the_same_examples_from_every_kind(sample, tmp_path):
    _, sources = sample
    outputs = {}
    for kind, path in sources.items():
        mix_datasets([MixSource(path, "s", count=40)], tmp_path / f"{kind}.jsonl", skip_bad=True, seed=3)
        outputs[kind] = read_jsonl(tmp_path / f"{kind}.jsonl")
    assert len(outputs["json"]) == 40
    assert all(o == outputs["json"] for o in outputs.values())


def test_train_rows_and_perplexity_texts_are_the_same_from_every_kind(sample, tools_template):
    _, sources = sample
    tokenizer, template = tools_template
    rows, texts = {}, {}
    for kind, path in sources.items():
        cfg = TrainConfig(model="unused", data=[path], out="unused", seq_len=512, skip_bad=True, eval_fraction=0.1)
        train, held_out = training_rows(cfg, template, tokenizer, lambda line: None)
        rows[kind] = [(r.tokens, r.targets, r.lengths) for r in list(train) + list(held_out)]
        texts[kind] = read_texts(path, skip_bad=True)[0]
    learned = [r for r in read_conversations(sources["json"], skip_bad=True).records if r.for_sft() is not None]
    assert [t["messages"] if isinstance(t, dict) else t for t in texts["json"]] == [r.messages for r in learned]
    assert rows["json"] and all(r == rows["json"] for r in rows.values())
    assert all(t == texts["json"] for t in texts.values())


def test_cost_counts_the_same_tokens_from_every_kind(sample, smollm2_gguf):
    from camelid.cost.tokens import tokens_from_data

    name, sources = sample
    counted = {}
    for kind, path in sources.items():
        cfg = TrainConfig(model=str(smollm2_gguf), data=[path], out="unused", seq_len=512, skip_bad=True,
                          batch_size=8, micro_batch_size=4, template="chatml")
        if name == "glaive":  # the chatml built-in writes no tool calls: cost refuses as training would
            with pytest.raises(CamelidError, match=r"chat template 'chatml' does not write tool calls \(the tool "):
                tokens_from_data(cfg, 1)
            continue
        tokens = tokens_from_data(cfg, 1)
        counted[kind] = {k: v for k, v in asdict(tokens).items() if k != "how"}  # `how` names the path
        assert tokens.rows > 0
    assert all(c == counted["json"] for c in counted.values())


def test_records_of_a_columnar_source_carry_no_padding_columns(sample):
    """Arrow pads a struct field that only some messages have (OpenAI's tool_calls) with None; the reader drops
    those at the top level and the formats treat a None field as absent, so nothing of Arrow's shows."""
    _, sources = sample
    for where, value in source_records(sources["parquet"]):
        assert None not in value.values(), where
