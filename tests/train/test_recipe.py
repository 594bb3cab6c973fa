"""The recipes in recipes/: each one reads into a TrainConfig, cites its source, and says the published numbers;
overrides, unknown keys, bad YAML and wrong types give the errors a user can act on."""

import dataclasses
from pathlib import Path

import pytest
from helpers import RECIPES

from camelid.chat_template import BUILTIN_TEMPLATES
from camelid.cli import main
from camelid.errors import CamelidError
from camelid.train.recipe import FIELDS, HELP, TrainConfig, find_recipe, read_recipe

ALL = sorted(p.stem for p in RECIPES.glob("*.yaml"))
SEEDS = ["alpaca", "vicuna", "koala", "gpt4all"]  # the 2023 models, each in its own prompt format
PREFERENCE = ["zephyr-dpo", "simpo", "orpo", "kto"]  # after SFT: the model's own template, or ORPO's chatml
PUBLISHED = SEEDS + PREFERENCE

# What each recipe must say: the numbers its sources publish (and, for Koala, the stated estimates), so that an
# accidental edit of a recipe fails here. See each YAML's `source` and `notes`.
EXPECTED = {
    "alpaca": dict(
        model="./llama-7b-hf", data=["alpaca_data.json"], template="alpaca", method="full", seq_len=512,
        packing=False, batch_size=128, epochs=3.0, lr=2e-5, warmup_ratio=0.03, weight_decay=0.0, min_lr_ratio=0.0,
        gradient_checkpointing=False, parallel="fsdp",
    ),
    "vicuna": dict(
        model="./llama-13b-hf", data=["ShareGPT_V3_unfiltered_cleaned_split.json"], template="vicuna_v1.1",
        method="full", seq_len=2048, packing=False, batch_size=128, epochs=3.0, lr=2e-5, warmup_ratio=0.03,
        weight_decay=0.0, min_lr_ratio=0.0, gradient_checkpointing=True, eval_fraction=0.02, parallel="fsdp",
    ),
    "koala": dict(
        model="./llama-13b-hf", template="koala_v1", method="full", packing=True, epochs=2.0, seq_len=2048,
        batch_size=8, lr=2e-5, warmup_ratio=0.03, weight_decay=0.0, min_lr_ratio=0.0, parallel="fsdp",
    ),
    "gpt4all": dict(
        model="./llama-7b-hf", template="alpaca", method="lora", lora_r=8, lora_alpha=32.0, lora_dropout=0.1,
        lora_targets=["q_proj", "v_proj"], seq_len=1024, packing=False, batch_size=32, micro_batch_size=4,
        epochs=4.0, lr=5e-5, warmup_ratio=0.002, weight_decay=0.0, min_lr_ratio=1.0, gradient_checkpointing=False,
        eval_fraction=0.05, parallel="ddp",
    ),
    "zephyr-dpo": dict(
        objective="dpo", beta=0.01, method="full", lr=5e-7, epochs=1.0, seq_len=1024, max_prompt_len=512,
        batch_size=128, warmup_ratio=0.1, min_lr_ratio=0.0, packing=False,
    ),
    "simpo": dict(objective="simpo", beta=10.0, simpo_gamma=3.0, lr=1e-6, epochs=1.0, seq_len=2048,
                  max_prompt_len=1800, batch_size=128, warmup_ratio=0.1, packing=False),
    "orpo": dict(objective="orpo", beta=0.1, lr=5e-6, epochs=5.0, seq_len=2048, max_prompt_len=1792, batch_size=32,
                 packing=False),
    "kto": dict(objective="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, lr=1e-6),
}


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = "model: ./m\ndata: d.json\nout: runs/x\n"


def test_the_published_recipes_are_there():
    assert set(PUBLISHED) <= set(ALL), f"recipes/ holds {ALL}"
    assert (RECIPES / "README.md").is_file()


@pytest.mark.parametrize("name", ALL)
def test_every_recipe_reads_by_name_and_by_path(name):
    by_name = read_recipe(name)
    by_path = read_recipe(RECIPES / f"{name}.yaml")
    assert isinstance(by_name, TrainConfig)
    assert by_name == by_path
    assert find_recipe(name).resolve() == (RECIPES / f"{name}.yaml").resolve()


def test_names_are_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./recipes here: the directory beside the source tree is used
    assert read_recipe("alpaca") == read_recipe(RECIPES / "alpaca.yaml")


@pytest.mark.parametrize("name", ALL)
def test_every_recipe_cites_a_source_and_uses_a_known_template(name):
    cfg = read_recipe(name)
    assert cfg.source.strip(), f"{name}.yaml has no source"
    assert cfg.template is None or cfg.template in BUILTIN_TEMPLATES


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_recipes_use_a_builtin_template_and_link_their_sources(name):
    cfg = read_recipe(name)
    assert cfg.template in BUILTIN_TEMPLATES or (name in PREFERENCE and cfg.template is None)
    assert "https://" in cfg.source
    assert cfg.notes.strip()


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_numbers(name):
    got = read_recipe(name).to_dict()
    for key, value in EXPECTED[name].items():
        assert got[key] == pytest.approx(value) if isinstance(value, float) else got[key] == value, (
            f"{name}.yaml: {key} is {got[key]!r}, the published value is {value!r}"
        )


def test_koala_says_which_values_are_estimates():
    notes = read_recipe("koala").notes.lower()
    assert "estimate" in notes
    for key in ("seq_len", "batch_size", "lr"):
        assert key in notes


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_recipes_divide_evenly_over_8_gpus(name):
    # The training loop requires batch_size to be a multiple of micro_batch_size x processes.
    cfg = read_recipe(name)
    assert cfg.batch_size % (8 * cfg.micro_batch_size) == 0


@pytest.mark.parametrize("name", PUBLISHED)
def test_recipe_files_set_every_key_they_rely_on(name):
    # The published numbers must be in the file itself, not inherited from TrainConfig's defaults (which can change).
    import yaml

    keys = set(yaml.safe_load((RECIPES / f"{name}.yaml").read_text(encoding="utf-8")))
    assert set(EXPECTED[name]) <= keys
    assert {"source", "notes", "micro_batch_size", "gradient_checkpointing", "parallel"} <= keys


def test_overrides_apply_and_coerce_types():
    cfg = read_recipe(
        "alpaca",
        ["lr=1e-4", "packing=false", "method=lora", "lora_targets=q_proj,k_proj", "seq_len=1024", "epochs=1",
         "max_steps=none", "template=vicuna_v1.1"],
    )
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.packing is False
    assert cfg.method == "lora"
    assert cfg.lora_targets == ["q_proj", "k_proj"]
    assert cfg.seq_len == 1024 and isinstance(cfg.seq_len, int)
    assert cfg.epochs == 1.0 and isinstance(cfg.epochs, float)
    assert cfg.max_steps is None
    assert cfg.template == "vicuna_v1.1"
    assert cfg.batch_size == 128  # keys not overridden keep the recipe's values
    assert read_recipe("vicuna", ["packing=true"]).packing is True


def test_an_override_with_a_wrong_type_names_the_key():
    with pytest.raises(CamelidError, match="seq_len"):
        read_recipe("alpaca", ["seq_len=long"])


def test_an_unknown_override_names_the_key():
    with pytest.raises(CamelidError, match="learning_rate"):
        read_recipe("alpaca", ["learning_rate=1e-4"])


def test_an_override_that_is_not_key_value_is_an_error():
    with pytest.raises(CamelidError, match="key=value"):
        read_recipe("alpaca", ["lr"])


def test_an_unknown_key_in_a_yaml_is_named_with_the_known_keys(tmp_path):
    path = write(tmp_path, MINIMAL + "learning_rate: 2.0e-5\n")
    with pytest.raises(CamelidError) as err:
        read_recipe(path)
    message = str(err.value)
    assert "learning_rate" in message
    known = message.split("known keys:", 1)[1]
    for name in FIELDS:
        assert name in known


def test_invalid_yaml_is_one_line_with_file_and_line(tmp_path):
    path = write(tmp_path, MINIMAL + "lr: 2e-5: oops\n")
    with pytest.raises(CamelidError) as err:
        read_recipe(path)
    message = str(err.value)
    assert "\n" not in message
    assert f"{path}:4" in message
    assert "not valid YAML" in message


def test_a_yaml_that_is_not_a_mapping_is_an_error(tmp_path):
    with pytest.raises(CamelidError, match="mapping"):
        read_recipe(write(tmp_path, "- model\n- data\n"))


def test_a_wrong_type_in_a_yaml_names_the_key(tmp_path):
    with pytest.raises(CamelidError, match="'epochs'"):
        read_recipe(write(tmp_path, MINIMAL + "epochs: many\n"))


def test_an_unknown_recipe_name_lists_the_recipes():
    with pytest.raises(CamelidError) as err:
        read_recipe("llama-9000")
    for name in PUBLISHED:
        assert name in str(err.value)


def test_the_cli_reports_a_bad_recipe_as_one_line(tmp_path, capsys):
    path = write(tmp_path, MINIMAL + "learning_rate: 2.0e-5\n")
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("camelid: error: ") and err.count("\n") == 1
    assert "learning_rate" in err


def test_train_help_lists_every_recipe_key(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert set(HELP) == set(FIELDS)
    for field in dataclasses.fields(TrainConfig):
        assert f"  {field.name} " in out, f"`camelid train --help` does not list {field.name}"
