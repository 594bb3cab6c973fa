"""`camelid --help` and the help of every verb: complete, and quick because building the parser loads no torch."""

import json
import subprocess
import sys

import pytest
from helpers import run_camelid

# Builds the parser and prints, as JSON, the help of every parser in it, whether torch got loaded, and the
# camelid modules that did (to find the one that brought torch in).
PRINT_EVERY_HELP = """
import argparse, json, sys
from camelid.cli import build_parser

def helps(parser, prog):
    yield prog, parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from helps(sub, f"{prog} {name}")

found = dict(helps(build_parser(), "camelid"))
print(json.dumps({"helps": found, "torch": "torch" in sys.modules,
                  "camelid": sorted(m for m in sys.modules if m.startswith("camelid."))}))
"""
VERBS = ["models", "chat", "generate", "convert", "train", "quickstart", "cost", "serve", "export", "data", "eval"]
SUBVERBS = {"export": ["gguf", "gguf-adapter", "hf", "merge", "ollama"], "data": ["selfinstruct", "sharegpt", "mix", "curate", "stats", "pairs"],
            "eval": ["answers", "judge", "report", "perplexity", "choice", "ratings", "ifeval"]}


@pytest.fixture(scope="module")
def every_help() -> dict:
    done = subprocess.run([sys.executable, "-c", PRINT_EVERY_HELP], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_verb_has_its_help(every_help):
    expected = ["camelid", *(f"camelid {v}" for v in VERBS),
                *(f"camelid {v} {s}" for v, names in SUBVERBS.items() for s in names)]
    assert sorted(every_help["helps"]) == sorted(expected)
    for prog, text in every_help["helps"].items():
        assert text.startswith(f"usage: {prog}"), prog


def test_no_help_loads_torch(every_help):
    loaded = ", ".join(every_help["camelid"])
    assert not every_help["torch"], f"building the parser or printing a help imported torch; camelid loaded {loaded}"


def test_a_shared_option_reads_the_same_in_every_verb(every_help):
    """Options defined once: --template offers the same templates and --dtype the same precisions everywhere."""
    from camelid.chat_template import BUILTIN_TEMPLATES
    from camelid.checkpoint import DTYPES

    helps = every_help["helps"]
    for prog in ("camelid chat", "camelid generate", "camelid serve", "camelid data stats", "camelid eval answers"):
        flat = " ".join(helps[prog].split())
        assert "--template NAME a built-in chat template instead of" in flat, prog
        assert ", ".join(BUILTIN_TEMPLATES) in flat, prog
    for prog in ("camelid chat", "camelid convert", "camelid export hf", "camelid serve", "camelid eval choice"):
        assert f"--dtype {{{','.join(DTYPES)}}}" in helps[prog], prog


def test_help_through_the_console_script_and_python_m():
    script = run_camelid("data", "mix", "--help")
    module = subprocess.run([sys.executable, "-m", "camelid", "data", "mix", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert script.returncode == module.returncode == 0
    assert script.stdout == module.stdout and "NAME=PATH[:weight=W|:count=N]" in script.stdout


def test_a_usage_mistake_is_one_line_naming_the_help():
    done = run_camelid("eval", "choice")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("camelid: error: the following arguments are required: DATA "
                           "(see: camelid eval choice --help)\n")
