"""IFEval (Zhou et al. 2023, arXiv:2311.07911): does the model follow instructions a program can check?

Each of IFEval's 541 prompts carries one to three verifiable instructions ("answer in fewer than 50 words", "no
commas", "wrap the answer in JSON"). A model answers every prompt as one user turn, greedily, and each answer is
checked by the instruction checkers of lm-evaluation-harness's `ifeval` task (`lm_eval.tasks.ifeval`, the
checkers of Google's reference code): camelid calls lm-eval's own `process_results` on every answer rather than
writing the 25 checkers again. The four standard figures follow: prompt-level accuracy (every instruction of a
prompt followed) and instruction-level accuracy (each instruction on its own), strict (the answer as written)
and loose (also with the first or last line, or the markdown asterisks, taken away), with a table and a plot by
instruction type.

The answers come from `camelid.eval.answers.generate_answers`, so a local model answers by continuous batching
and an endpoint concurrently, and a second run resumes. OUT holds:

    answers.jsonl     FastChat's answer schema, appended as answers come (what a re-run resumes from)
    responses.jsonl   {"key", "prompt", "response"} per prompt: Google's input_response_data for rescoring
    results.jsonl     per prompt: each instruction's strict and loose verdict
    scores.json       the four figures, per instruction type, and the settings they were measured with
    report.md         the same as tables
    ifeval.png        accuracy by instruction type, strict and loose

Offline checker data: two checkers count sentences and one tokenizes words with NLTK's Punkt model, whose
tables (`punkt_tab`) lm-eval downloads with `nltk.download` at import. camelid takes Punkt's English tables from
the `llama-index-core` wheel on the package index, which bundles them, into its cache, checks their SHA-256, and
puts that folder on NLTK's data path before lm-eval is imported; NLTK (3.9 and later) builds its tokenizer from
these plain-text tables, never from a pickle. Two checkers draw random numbers (langdetect, and the letter
checker where a prompt gives no letter): both are seeded with 0 while scoring, and put back afterwards, so that
scoring the same answers twice agrees.
"""

import contextlib
import functools
import json
import random
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError
from camelid.files import cache_dir, read_appended, write_atomic

PROMPTS = "hf:google/IFEval"  # what lm-eval's ifeval task reads
MAX_TOKENS = 1280  # lm-eval's max_gen_toks for ifeval
PROMPTS_HINT = ("expected IFEval's input_data.jsonl: key, prompt, instruction_id_list, kwargs (one object per "
                "instruction)")
RESPONSES_HINT = "expected JSONL of {prompt, response} (Google's input_response_data, optionally with key) or " \
                 "camelid's answers.jsonl"

# Punkt's English tables, from the llama-index-core wheel (it bundles NLTK's punkt_tab for its own splitter).
PUNKT_WHEEL = "llama-index-core==0.14.25"
PUNKT_MEMBER = "llama_index/core/_static/nltk_cache/tokenizers/punkt_tab/english/"
PUNKT_FILES = {
    "abbrev_types.txt": "92a3e070f43d9b4c5534758ca40ad7343b04e7e29bfe0c2eb658a39445a4f779",
    "collocations.tab": "8e2da1225e4dd2cc9dba261ee231ccb134859e21b46006e7f472c5ee269af0cf",
    "ortho_context.tab": "4bbcca25ed3d3f06c02402abf8419b9f033b8adc06e7b482eca4e45f81a5dc4c",
    "sent_starters.txt": "f3f8535483e1dba487241b764945168123bca3209a9645e59acd1225dc76edac",
}
FIGURES = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")


@dataclass(frozen=True)
class IFEvalPrompt:
    key: int
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict, ...]

    def doc(self) -> dict:
        """The prompt as a row of lm-eval's ifeval dataset."""
        return {"key": self.key, "prompt": self.prompt, "instruction_id_list": list(self.instruction_id_list),
                "kwargs": [dict(k) for k in self.kwargs]}


@dataclass
class IFEvalScores:
    """The four figures over `prompts` prompts, and the verdicts behind them."""

    figures: dict[str, float]
    by_instruction: dict[str, dict[str, float]]  # instruction id -> {"count", "strict", "loose"}
    results: list[dict]  # per prompt: key, instruction_id_list, strict, loose, prompt_strict, prompt_loose, missing
    prompts: int
    missing: int  # prompts with no response, counted as failed
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**{k: round(v, 6) for k, v in self.figures.items()}, "prompts": self.prompts,
                "instructions": sum(len(r["strict"]) for r in self.results), "missing_responses": self.missing,
                "by_instruction": self.by_instruction, **self.settings}

    def line(self) -> str:
        """The four figures on one line, in percent."""
        f = self.figures
        return (f"prompt strict {100 * f['prompt_level_strict_acc']:.1f}  inst strict "
                f"{100 * f['inst_level_strict_acc']:.1f}  prompt loose {100 * f['prompt_level_loose_acc']:.1f}  "
                f"inst loose {100 * f['inst_level_loose_acc']:.1f}  ({self.prompts} prompts)")

    def markdown(self) -> str:
        """The four figures, then one row per instruction type, as Markdown tables."""
        f = self.figures
        lines = ["| prompt-level strict | instruction-level strict | prompt-level loose | instruction-level loose |",
                 "|---:|---:|---:|---:|",
                 "| " + " | ".join(f"{100 * f[k]:.1f}" for k in FIGURES) + " |", "",
                 f"{self.prompts} prompt{'s' * (self.prompts != 1)}, "
                 f"{sum(len(r['strict']) for r in self.results)} instructions"
                 + (f"; {self.missing} prompts had no response and count as failed" if self.missing else ""), "",
                 "| instruction | count | strict | loose |", "|---|---:|---:|---:|"]
        for name, row in sorted(self.by_instruction.items()):
            lines.append(f"| {name} | {row['count']} | {100 * row['strict']:.1f} | {100 * row['loose']:.1f} |")
        return "\n".join(lines)


# -- the checkers, offline ---------------------------------------------------------------------------------------


def punkt_dir() -> Path:
    """The NLTK data folder in camelid's cache that holds Punkt's English tables."""
    return cache_dir() / "nltk_data"


def install_punkt(wheel: str | Path | None = None, log=print) -> Path:
    """Put Punkt's English tables into punkt_dir() (a no-op when they are there), from `wheel` or from the
    llama-index-core wheel that pip downloads (no dependencies, nothing installed); checked by SHA-256."""
    import hashlib

    target = punkt_dir() / "tokenizers" / "punkt_tab" / "english"
    if all((target / name).is_file() for name in PUNKT_FILES):
        return target
    with tempfile.TemporaryDirectory(prefix="camelid-punkt-") as tmp:
        if wheel is None:
            log(f"downloading {PUNKT_WHEEL} (12 MB) for NLTK's Punkt sentence tables, which IFEval's checkers use")
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                                   "--only-binary=:all:", "--dest", tmp, PUNKT_WHEEL],
                                  check=False, capture_output=True, text=True)
            found = sorted(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not found:
                why = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                raise CamelidError(f"could not download {PUNKT_WHEEL} ({why}); without a package index, download "
                                   "that wheel elsewhere and pass it with --punkt-wheel FILE")
            wheel = found[0]
        try:
            with zipfile.ZipFile(wheel) as archive:
                data = {name: archive.read(PUNKT_MEMBER + name) for name in PUNKT_FILES}
        except (OSError, zipfile.BadZipFile, KeyError) as exc:
            raise CamelidError(f"{wheel}: not a {PUNKT_WHEEL.split('==')[0]} wheel holding Punkt's English tables "
                               f"({exc}); give the wheel of {PUNKT_WHEEL}") from None
        for name, raw in data.items():
            if hashlib.sha256(raw).hexdigest() != PUNKT_FILES[name]:
                raise CamelidError(f"{wheel}: {name} is not the file expected (SHA-256 differs); give the wheel of "
                                   f"{PUNKT_WHEEL}")
        try:
            target.mkdir(parents=True, exist_ok=True)
            for name, raw in data.items():
                write_atomic(target / name, raw)
        except OSError as exc:
            raise CamelidError(f"cannot write {target} ({exc.strerror}); set CAMELID_CACHE to a directory you can "
                               "write") from None
    log(f"installed Punkt's English tables: {target}")
    return target


def check_checker_packages() -> None:
    """Refuse, in one line, when a package IFEval's checkers import is missing (before any download)."""
    import importlib.util

    for module in ("lm_eval", "nltk", "langdetect", "immutabledict"):
        if importlib.util.find_spec(module) is None:
            raise CamelidError(f"IFEval's checkers need the {module} package: pip install 'camelid[ifeval]'")


@functools.cache
def checkers():
    """lm-eval's ifeval `utils` module, with NLTK finding the Punkt tables in camelid's cache."""
    check_checker_packages()
    install_punkt(log=lambda m: print(m, file=sys.stderr))
    import nltk

    if str(punkt_dir()) not in nltk.data.path:
        nltk.data.path.insert(0, str(punkt_dir()))  # where lm-eval's import looks for punkt_tab
    from lm_eval.tasks.ifeval import utils

    return utils


def instructions() -> Mapping[str, type]:
    """lm-eval's instruction checkers by id (punctuation:no_comma -> its class)."""
    checkers()  # first: lm-eval's import would try to download the Punkt tables
    from lm_eval.tasks.ifeval import instructions_registry

    return instructions_registry.INSTRUCTION_DICT


# -- reading -----------------------------------------------------------------------------------------------------


def read_prompts(source: str | Path = PROMPTS, *, skip_bad: bool = False) -> tuple[list[IFEvalPrompt], list]:
    """IFEval's prompts from `source` (input_data.jsonl, or any data source such as hf:google/IFEval), and the
    records skipped (BadRecord) when `skip_bad`; a bad record otherwise raises, naming `file:line`."""
    from camelid.data.sources import BadRecord, source_exists, source_records

    known = instructions()
    if not source_exists(source):
        raise CamelidError(f"{source}: no such file; give --prompts IFEval's input_data.jsonl, or hf:google/IFEval "
                           "where the Hugging Face Hub is reachable")
    prompts, skipped, seen = [], [], {}
    for where, value in source_records(source):
        try:
            if isinstance(value, BadRecord):
                raise CamelidError(f"{where}: {value.reason}" + (f" ({value.detail})" if value.detail else ""))
            with _own_random():
                prompt = _prompt(value, where, known)
            if prompt.key in seen:
                raise CamelidError(f"{where}: key {prompt.key} again (first at {seen[prompt.key]}); keys must be "
                                   "unique")
        except CamelidError as exc:
            if not skip_bad:
                raise CamelidError(f"{exc}; {PROMPTS_HINT} (or --skip-bad)") from None
            skipped.append(BadRecord(where, str(exc).removeprefix(f"{where}: ")))
            continue
        seen[prompt.key] = where
        prompts.append(prompt)
    if not prompts:
        raise CamelidError(f"{source}: no usable IFEval prompt; {PROMPTS_HINT}")
    return prompts, skipped


def _prompt(value: Any, where: str, known: Mapping[str, type]) -> IFEvalPrompt:
    if not isinstance(value, dict):
        raise CamelidError(f"{where}: not a JSON object")
    key, prompt, ids, kwargs = (value.get(k) for k in ("key", "prompt", "instruction_id_list", "kwargs"))
    if isinstance(key, bool) or not isinstance(key, int):
        raise CamelidError(f"{where}: 'key' is {'missing' if key is None else 'not an integer'}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise CamelidError(f"{where}: 'prompt' is missing or empty")
    if not (isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids)):
        raise CamelidError(f"{where}: 'instruction_id_list' is not a non-empty list of strings")
    if unknown := [i for i in ids if i not in known]:
        raise CamelidError(f"{where}: unknown instruction {unknown[0]!r} (lm-eval's checkers know "
                           f"{len(known)}, e.g. punctuation:no_comma)")
    if not (isinstance(kwargs, list) and len(kwargs) == len(ids) and all(isinstance(k, dict) for k in kwargs)):
        raise CamelidError(f"{where}: 'kwargs' is not a list of {len(ids)} objects, one per instruction")
    for name, given in zip(ids, kwargs):
        try:  # as lm-eval builds it, so a misspelt or mistyped argument is named here, not after the answers
            known[name](name).build_description(**{k: v for k, v in given.items() if v})
        except (TypeError, ValueError) as exc:
            raise CamelidError(f"{where}: the arguments of {name} ({exc})") from None
    return IFEvalPrompt(key, prompt, tuple(ids), tuple(kwargs))


def read_responses(path: str | Path) -> dict[Any, str]:
    """Responses by prompt key (camelid's answers.jsonl, or records with a key) or else by prompt text (Google's
    input_response_data); a bad record raises, naming `file:line`."""
    from camelid.data.formats import strict_records

    responses: dict[Any, str] = {}
    for where, value in strict_records(path, RESPONSES_HINT):
        if not isinstance(value, dict):
            raise CamelidError(f"{where}: not a JSON object; {RESPONSES_HINT}")
        if "choices" in value:
            try:
                ident, text = value["question_id"], value["choices"][0]["turns"][0]
            except (KeyError, IndexError, TypeError):
                raise CamelidError(f"{where}: no question_id and choices[0].turns[0]; {RESPONSES_HINT}") from None
        else:
            ident, text = value.get("key", value.get("prompt")), value.get("response")
        if ident is None or not isinstance(text, str):
            raise CamelidError(f"{where}: needs a 'response' string and a 'key' or 'prompt'; {RESPONSES_HINT}")
        if ident in responses:
            raise CamelidError(f"{where}: a second response to {str(ident)[:60]!r}; keep one")
        responses[ident] = text
    return responses


def response_for(prompt: IFEvalPrompt, responses: Mapping[Any, str]) -> str | None:
    return responses.get(prompt.key, responses.get(prompt.prompt))


# -- scoring -----------------------------------------------------------------------------------------------------


def score(prompts: Iterable[IFEvalPrompt], responses: Mapping[Any, str], settings: dict | None = None) -> IFEvalScores:
    """Check every prompt's response (looked up by key, else by prompt text) with lm-eval's ifeval checkers; a
    prompt without a response counts as failed."""
    process_results = checkers().process_results
    results, missing = [], 0
    by_instruction: dict[str, list[int]] = {}
    with _own_random():
        # A checker given no letter or keyword draws one from Python's `random` (two of IFEval's prompts give '#'
        # and '!' as the letter): seeded with 0 once, as lm-eval's simple_evaluate seeds it, the same prompts and
        # answers score the same in every run, and as in lm-eval's own.
        random.seed(0)
        for prompt in prompts:
            response = response_for(prompt, responses)
            missing += response is None
            verdict = process_results(prompt.doc(), [response or ""])
            _tally(prompt, verdict, response is None, results, by_instruction)
    if not results:
        raise CamelidError("no prompts to score")
    if missing == len(results) and responses:
        raise CamelidError(f"none of the {len(responses)} responses answers one of these prompts (matched by key, "
                           "else by the prompt's text); are they for IFEval's prompts?")
    flat = [(s, lo) for r in results for s, lo in zip(r["strict"], r["loose"])]
    figures = {
        "prompt_level_strict_acc": sum(r["prompt_strict"] for r in results) / len(results),
        "inst_level_strict_acc": sum(s for s, _ in flat) / len(flat),
        "prompt_level_loose_acc": sum(r["prompt_loose"] for r in results) / len(results),
        "inst_level_loose_acc": sum(lo for _, lo in flat) / len(flat),
    }
    table = {name: {"count": n, "strict": s / n, "loose": lo / n} for name, (n, s, lo) in by_instruction.items()}
    return IFEvalScores(figures, table, results, len(results), missing, dict(settings or {}))


@contextlib.contextmanager
def _own_random():
    """Python's `random` and langdetect's seed, which lm-eval's checkers draw from, put back afterwards."""
    import langdetect

    saved, seed = random.getstate(), langdetect.DetectorFactory.seed
    langdetect.DetectorFactory.seed = 0
    try:
        yield
    finally:
        random.setstate(saved)
        langdetect.DetectorFactory.seed = seed


def _tally(prompt: IFEvalPrompt, verdict: dict, missing: bool, results: list, by_instruction: dict) -> None:
    strict, loose = verdict["inst_level_strict_acc"], verdict["inst_level_loose_acc"]
    results.append({"key": prompt.key, "instruction_id_list": list(prompt.instruction_id_list),
                    "strict": strict, "loose": loose, "prompt_strict": verdict["prompt_level_strict_acc"],
                    "prompt_loose": verdict["prompt_level_loose_acc"], "missing": missing})
    for name, s, lo in zip(prompt.instruction_id_list, strict, loose):
        row = by_instruction.setdefault(name, [0, 0, 0])
        row[0] += 1
        row[1] += s
        row[2] += lo


def write_scores(scores: IFEvalScores, prompts: list[IFEvalPrompt], responses: Mapping[Any, str] | None,
                 out: Path) -> None:
    """results.jsonl, scores.json, report.md and ifeval.png into `out`, and with `responses`, responses.jsonl
    (the prompts answered, in order); the plot is drawn before anything is written."""
    import io

    picture = io.BytesIO()
    scores_plot(scores, picture)
    out.mkdir(parents=True, exist_ok=True)
    if responses is not None:
        write_atomic(out / "responses.jsonl", "".join(
            json.dumps({"key": p.key, "prompt": p.prompt, "response": response_for(p, responses)},
                       ensure_ascii=False) + "\n" for p in prompts if response_for(p, responses) is not None))
    write_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in scores.results))
    write_atomic(out / "scores.json", json.dumps(scores.to_dict(), indent=2) + "\n")
    write_atomic(out / "report.md", "# IFEval\n\n" + scores.markdown() + "\n")
    write_atomic(out / "ifeval.png", picture.getvalue())


def scores_plot(scores: IFEvalScores, path, title: str = "IFEval by instruction type") -> None:
    """Horizontal bars, each instruction type's strict and loose accuracy, as a PNG into `path` (a file name or a
    binary file object)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from camelid.plots import save_png

    names = sorted(scores.by_instruction, reverse=True)
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(names) + 1.6), dpi=110)
    ys = range(len(names))
    ax.barh([y + 0.2 for y in ys], [100 * scores.by_instruction[n]["strict"] for n in names], height=0.4,
            label="strict", color="tab:blue")
    ax.barh([y - 0.2 for y in ys], [100 * scores.by_instruction[n]["loose"] for n in names], height=0.4,
            label="loose", color="tab:orange", alpha=0.8)
    ax.set_yticks(list(ys), [f"{n} ({scores.by_instruction[n]['count']})" for n in names], fontsize=7)
    ax.set_xlim(0, 100)
    ax.set_xlabel("instructions followed (%)")
    f = scores.figures
    ax.set_title(f"{title}\nprompt-level strict {100 * f['prompt_level_strict_acc']:.1f}, loose "
                 f"{100 * f['prompt_level_loose_acc']:.1f}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    if isinstance(path, str | Path):
        save_png(fig, path)
    else:
        fig.savefig(path, format="png")
    plt.close(fig)


# -- the run -----------------------------------------------------------------------------------------------------


def run_ifeval(prompts: list[IFEvalPrompt], out: str | Path, *, model=None, client=None, model_id: str | None = None,
               max_tokens: int = MAX_TOKENS, limit: int | None = None, system: str | None = None,
               batch_size: int = 16, template: str | None = None, progress: bool = True) -> IFEvalScores:
    """Answer the prompts (the first `limit`) with a local `model` or an OpenAI-compatible `client`, greedily, into
    OUT/answers.jsonl (resumed when it is there), then score them and write OUT's files (see the module)."""
    from camelid.eval.answers import Question, is_answer_record, generate_answers

    check_run_settings(max_tokens, batch_size, limit)
    out = Path(out)
    chosen = prompts[:limit] if limit is not None else prompts
    quantize = getattr(getattr(model, "model", None), "quantization", None)  # a LoadedModel's
    _same_settings(out, {"max_tokens": max_tokens, "system": system, "template": template, "quantize": quantize})
    questions = [Question(p.key, "ifeval", (p.prompt,)) for p in chosen]
    report = generate_answers(questions, out / "answers.jsonl", model=model, client=client, model_id=model_id,
                              temperature=0.0, max_tokens=max_tokens, limit=None, system=system,
                              batch_size=batch_size, template=template, strip=False, progress=progress)
    records, _ = read_appended(out / "answers.jsonl", is_answer_record, "an answer record")
    responses = {r["question_id"]: r["choices"][0]["turns"][0] for r in records}
    cut = sum(r.get("finish_reasons", [None])[0] == "length" for r in records)
    settings = {"model_id": report.facts.get("model_id"), "max_tokens": max_tokens, "limit": len(chosen),
                "system": system, "answers_cut_at_max_tokens": cut, "answer_seconds": report.seconds,
                "backend": report.facts.get("backend")}
    scores = score(chosen, responses, settings)
    write_scores(scores, chosen, responses, out)
    return scores


def check_run_settings(max_tokens: int, batch_size: int, limit: int | None) -> None:
    for name, value in (("--max-tokens", max_tokens), ("--batch-size", batch_size), ("--limit", limit)):
        if value is not None and value < 1:
            raise CamelidError(f"{name} must be at least 1 (got {value})")


def _same_settings(out: Path, settings: dict) -> None:
    """Record how OUT's answers are made (OUT/answers.settings.json); refuse to resume them with other settings,
    which would score a mix."""
    from camelid.files import read_json

    path = out / "answers.settings.json"
    if (out / "answers.jsonl").is_file() and path.is_file():
        before = read_json(path)
        if changed := [k for k in settings if before.get(k) != settings[k]]:
            k = changed[0]
            raise CamelidError(f"{out} holds answers made with {k} {before.get(k)!r}, not {settings[k]!r}; give the "
                               f"same setting to resume, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(settings, indent=2) + "\n")


def rescore(prompts: list[IFEvalPrompt], responses_file: str | Path, out: str | Path, *,
            limit: int | None = None) -> IFEvalScores:
    """Score the responses of a file (see read_responses) against the prompts, writing OUT's files."""
    chosen = prompts[:limit] if limit is not None else prompts
    responses = read_responses(responses_file)
    scores = score(chosen, responses, {"responses": str(responses_file), "limit": limit})
    write_scores(scores, chosen, None, Path(out))  # the responses are the file given, not rewritten
    return scores
