"""The `camelid` commands in README.md's shell blocks work as written (issue 17: `camelid export hf
runs/mine/adapter` named a folder no run has).

Every verb and flag a command uses is in that verb's `--help`, every command parses, every path under runs/ is one
`camelid train` writes into a run some command trains, and a GGUF file a command reads is one a command writes.
The commands on the trained run `runs/mine` (train, resume, export, perplexity, multiple choice) then run as
written, on a tiny model and small files of the names they read.
"""

import argparse
import contextlib
import functools
import io
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from helpers import FIXTURES, TESTS, write_jsonl

from camelid.cli import build_parser, main
from camelid.cli.run import quickstart_of

README = TESTS.parent / "README.md"
# What `camelid train` writes in its run directory (camelid.train.loop's docstring); held to a real run below.
RUN_LAYOUT = ["checkpoints", "config.json", "loss.png", "metrics.jsonl", "model"]
IN_A_RUN = re.compile(r"config\.json|metrics\.jsonl|loss\.png|model|checkpoints(/step-\d{6}(/model)?)?")
QUICKSTART_RUN = "run"  # `camelid quickstart [alpaca] --out OUT` trains into OUT/run
TRAINED = "runs/mine"  # the run whose commands are run below
RUN_HERE = [("train",), ("export", "gguf"), ("export", "hf"), ("export", "merge"), ("export", "gguf-adapter"),
            ("export", "ollama"), ("eval", "perplexity"),
            ("eval", "choice")]
NOT_RUN_HERE = {("chat",): "it waits for a person at a terminal",
                ("eval", "answers"): "it generates up to 1,024 tokens for each of MT-bench's 80 questions",
                ("eval", "ifeval"): "it answers IFEval's 541 prompts (tests/eval/test_ifeval.py runs it on a tiny "
                                    "model)"}
TINY = ["max_steps=1", "seq_len=256"]  # added to a train command's keys, with model=: later keys override the recipe


def readme_commands() -> list[list[str]]:
    """The arguments after `camelid` of each command line in README.md's ```sh blocks (`torchrun -m camelid` too)."""
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in ("camelid", "torchrun") and "camelid" in words:
                argv = words[words.index("camelid") + 1 :]
                commands.append(argv[:-1] if argv[-1:] == ["&"] else argv)  # `camelid serve &`
    return commands


COMMANDS = readme_commands()


def shown(argv: list[str]) -> str:
    return "camelid " + shlex.join(argv)


@functools.cache
def camelid_parser() -> argparse.ArgumentParser:
    return build_parser()


def verb_of(argv: list[str]) -> tuple[str, ...]:
    """The verb words a command starts with (`eval judge`), as the real parser's subcommands define them."""
    parser, verb = camelid_parser(), []
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
        verb.append(word)
    return tuple(verb)


def parse(argv: list[str]) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return camelid_parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"{shown(argv)}: {err.getvalue().strip()}") from None


def test_the_readme_has_commands_and_each_starts_with_a_verb():
    assert len(COMMANDS) >= 30, "README.md's ```sh blocks should hold the examples"
    assert not [shown(argv) for argv in COMMANDS if not verb_of(argv)]


def test_every_flag_is_in_its_verbs_help():
    flags: dict[tuple[str, ...], set[str]] = {}
    for argv in COMMANDS:
        used = {w.split("=")[0] for w in argv if re.match(r"--?[A-Za-z]", w)}
        flags.setdefault(verb_of(argv), set()).update(used)

    def help_of(verb):  # what a user reads: `python -m camelid VERB --help`
        return subprocess.run([sys.executable, "-m", "camelid", *verb, "--help"], capture_output=True, text=True,
                              timeout=60)

    with ThreadPoolExecutor(4) as pool:
        helps = dict(zip(flags, pool.map(help_of, flags)))
    for verb, used in flags.items():
        done = helps[verb]
        assert done.returncode == 0, f"camelid {' '.join(verb)} --help: {done.stderr}"
        missing = sorted(f for f in used if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", done.stdout))
        assert not missing, f"camelid {' '.join(verb)} --help names no {', '.join(missing)}"


def test_every_command_parses():
    wrong = []
    for argv in COMMANDS:
        try:
            parse(argv)
        except AssertionError as exc:
            wrong.append(str(exc))
    assert not wrong, "\n".join(wrong)


def run_directories() -> set[str]:
    """The run directories the README's commands train into: train's out=, quickstart's --out/run."""
    runs = set()
    for argv in COMMANDS:
        if verb_of(argv) == ("train",):
            runs.update(w.removeprefix("out=") for w in argv if w.startswith("out="))
        elif verb_of(argv) == ("quickstart",):
            runs.add(f"{quickstart_of(parse(argv))[1]}/{QUICKSTART_RUN}")
    return runs


def test_paths_in_runs_are_what_train_writes():
    runs = run_directories()
    assert TRAINED in runs and f"runs/quickstart/{QUICKSTART_RUN}" in runs
    wrong = []
    for argv in COMMANDS:
        for value in (w.split("=", 1)[-1] for w in argv):  # out=PATH, NAME=PATH and plain PATH
            if value.startswith("runs/") and value.rstrip("/") not in runs and not any(
                value.startswith(run + "/") and IN_A_RUN.fullmatch(value[len(run) + 1 :].rstrip("/")) for run in runs
            ):
                wrong.append(f"{value} in `{shown(argv)}`")
    assert not wrong, f"not a path `camelid train` writes in a run the README trains: {wrong}"


def test_a_gguf_file_a_command_reads_is_one_a_command_writes():
    written = {parse(argv).out for argv in COMMANDS if verb_of(argv) == ("export", "gguf")}
    read = [(value, argv) for argv in COMMANDS for flag, value in zip(argv, argv[1:]) if flag in ("-m", "--model")]
    wrong = [f"{shown(argv)}" for value, argv in read
             if value.endswith(".gguf") and not value.startswith("path/to/") and value.split("=", 1)[-1] not in written]
    assert not wrong, f"these read a GGUF file no README command writes: {wrong}"


def write_inputs() -> None:
    """Small files under the names the README's commands on runs/mine read."""
    from camelid.data.identity import identity_conversations

    chats = [{"messages": c} for c in identity_conversations()]
    for name in ("curated.jsonl", "my_chats.jsonl"):
        write_jsonl(Path(name), chats)
    Path("data/sharegpt").mkdir(parents=True)
    write_jsonl(Path("data/sharegpt/test.jsonl"), chats[:4])
    shutil.copy(FIXTURES / "choice_questions.jsonl", "questions.jsonl")


def run_as_written(argv: list[str], capsys) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, f"{shown(argv)}: {err}"


def test_commands_on_a_trained_run_run_as_written(tiny_chat_dir, tmp_path, monkeypatch, capsys):
    on_the_run = [argv for argv in COMMANDS if any(TRAINED in w for w in argv)]
    unknown = {verb_of(argv) for argv in on_the_run} - set(RUN_HERE) - set(NOT_RUN_HERE)
    assert not unknown, f"add these verbs to RUN_HERE or NOT_RUN_HERE: {unknown}"
    monkeypatch.chdir(tmp_path)
    write_inputs()

    tiny = [f"model={tiny_chat_dir}", *TINY]
    trains = [argv for argv in on_the_run if verb_of(argv) == ("train",)]
    for argv in trains:
        if "--resume" not in argv:  # each is a run of its own, in the same directory
            shutil.rmtree(TRAINED, ignore_errors=True)
        keys, flags = [w for w in argv if not w.startswith("-")], [w for w in argv if w.startswith("-")]
        run_as_written([*keys, *tiny, *flags, "--no-progress"], capsys)
    assert any("--resume" in argv for argv in trains)
    run = Path(TRAINED)
    assert sorted(p.name for p in run.iterdir()) == RUN_LAYOUT
    assert (run / "checkpoints" / "step-000001" / "model").is_dir()

    for argv in on_the_run:
        if verb_of(argv) in RUN_HERE and verb_of(argv) != ("train",):
            run_as_written(argv, capsys)
    assert Path("mine.gguf").is_file() and Path("mine-hf/config.json").is_file()
    assert Path("mine-lora.gguf").is_file() and Path("mine-ollama/Modelfile").is_file()
    assert Path("out/merged/config.json").is_file()
