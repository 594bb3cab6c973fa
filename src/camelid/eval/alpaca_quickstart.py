"""`camelid quickstart alpaca`: the Alpaca moment on a laptop, measured (in eval/: it trains, then measures).

A *base* model (Gemma 3 270M, which continues text rather than answers) is fine-tuned on Alpaca-style
instructions with the `alpaca-cpu` recipe, and IFEval says, before and after, how well it follows instructions.
The steps, each timed:

1. split the instruction file: the last HELD_OUT records are never trained on;
2. the base model answers the held-out instructions and IFEval's prompts (greedy, at most `ifeval_tokens` each);
3. the recipe trains on the rest;
4. the fine-tuned model answers the same held-out instructions and IFEval's prompts.

OUT holds train.jsonl and heldout.jsonl (the split), ifeval-base/ and ifeval-tuned/ (`camelid eval ifeval`'s
files), heldout.json (every held-out answer before and after, and how it ended), summary.json, and the training
run in OUT/run with the model in OUT/run/model.
"""

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from camelid.errors import CamelidError
from camelid.files import write_atomic
from camelid.train.quickstart import clear_run_directory, two_columns

RECIPE = "alpaca-cpu"
HELD_OUT = 50
IFEVAL_PROMPTS = "../shared/data/ifeval/input_data.jsonl"
IFEVAL_TOKENS = 256  # lm-eval allows 1,280; a rambling base model would take 5x as long on a CPU
ANSWER_TOKENS = 256
QUANTIZE = "f16"  # answering only: f16 decodes 2.4x faster than float32 at batch 8 on Gemma 3 270M (README)
GOOGLE_IFEVAL = 51.2  # Gemma 3 270M IT's IFEval on Google's model card (Google's own post-training)


@dataclass
class Answers:
    texts: list[str]
    ended: list[bool]  # each answer ended with the template's end-of-turn token (not the token limit)

    @property
    def ended_share(self) -> float:
        return sum(self.ended) / len(self.ended) if self.ended else 0.0


@dataclass
class AlpacaResult:
    run: Path
    model_dir: Path
    prompts: list[str]
    before: Answers
    after: Answers
    ifeval_before: object  # camelid.eval.ifeval.IFEvalScores
    ifeval_after: object
    seconds: dict[str, float] = field(default_factory=dict)
    end_of_turn: str = ""

    def to_dict(self) -> dict:
        return {
            "model_dir": str(self.model_dir),
            "ifeval_before": self.ifeval_before.figures, "ifeval_after": self.ifeval_after.figures,
            "ifeval_prompts": self.ifeval_after.prompts,
            "ifeval_max_tokens": self.ifeval_after.settings.get("max_tokens"),
            "held_out": len(self.prompts), "end_of_turn_token": self.end_of_turn,
            "ended_with_end_of_turn_before": self.before.ended_share,
            "ended_with_end_of_turn_after": self.after.ended_share,
            "seconds": self.seconds, "seconds_total": round(sum(self.seconds.values()), 1),
        }


def split_instructions(source: str | Path, out: Path, held_out: int = HELD_OUT) -> tuple[Path, list[str]]:
    """Write the records of `source` but the last `held_out` to OUT/train.jsonl and those to OUT/heldout.jsonl;
    returns the training file and the held-out instructions (each record's first user message)."""
    from camelid.data.formats import strict_records, to_record

    records = [(where, value) for where, value in strict_records(source, "expected Alpaca-style records")]
    if len(records) <= held_out:
        raise CamelidError(f"{source}: {len(records)} records; the quickstart holds out {held_out} and needs more to "
                           "train on")
    train, kept = records[:-held_out], records[-held_out:]
    prompts = []
    for where, value in kept:
        messages = to_record(value, where).messages
        prompts.append(next(m["content"] for m in messages if m["role"] == "user"))
    lines = lambda rs: "".join(json.dumps(v, ensure_ascii=False) + "\n" for _, v in rs)  # noqa: E731
    write_atomic(out / "train.jsonl", lines(train))
    write_atomic(out / "heldout.jsonl", lines(kept))
    return out / "train.jsonl", prompts


def answer_held_out(loaded, template, prompts: list[str], max_tokens: int = ANSWER_TOKENS,
                    batch_size: int = 25) -> Answers:
    """Greedy answers to single-turn instructions, and which ended with the template's end-of-turn token."""
    from camelid.chat import encode_chat
    from camelid.generate import SamplingParams, generate

    end = _end_of_turn_id(loaded, template)
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
    texts, ended = [], []
    for start in range(0, len(prompts), batch_size):
        batch = [encode_chat(loaded, template, [{"role": "user", "content": p}])
                 for p in prompts[start: start + batch_size]]
        for c in generate(loaded.model, loaded.tokenizer, batch, params):
            texts.append(c.text.strip())
            ended.append(c.stop_token == end)
    return Answers(texts, ended)


def _end_of_turn_id(loaded, template) -> int | None:
    """The token the template closes an assistant turn with (Gemma: <end_of_turn>) when that is one token, else
    the end-of-sequence token."""
    answer = "\x00answer\x00"
    rendered = template.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": answer}])
    after = rendered[rendered.rindex(answer) + len(answer):].strip()
    ids = loaded.tokenizer.encode(after, add_special=False) if after else []
    return ids[0] if len(ids) == 1 else loaded.tokenizer.eos_id


def run_alpaca_quickstart(*, model: str | None = None, data: str | None = None, prompts: str = IFEVAL_PROMPTS,
                          out: str = "runs/alpaca", overrides: list[str] = (), force: bool = False,
                          ifeval_tokens: int = IFEVAL_TOKENS, ifeval_limit: int | None = None,
                          batch_size: int = 32, progress: bool = True,
                          log=lambda m: print(m, file=sys.stderr)) -> AlpacaResult:
    """Split `data`, measure the recipe's model, fine-tune it with the alpaca-cpu recipe (`overrides` applied),
    measure the result, and write OUT's files (see the module); every setting is checked before anything is
    loaded or removed. IFEval answers are cut at `ifeval_tokens`, over the first `ifeval_limit` prompts."""
    from camelid.eval.ifeval import check_run_settings, install_punkt, read_prompts
    from camelid.train.loop import train
    from camelid.train.recipe import read_recipe

    run = Path(out)
    keys = [f"out={run / 'run'}"] + ([f"model={model}"] if model else []) + list(overrides)
    cfg = read_recipe(RECIPE, keys + [f"data={run / 'train.jsonl'}"])
    source = data or read_recipe(RECIPE, keys).data[0]
    if not Path(source).is_file():
        raise CamelidError(f"{source}: no such file; give the Alpaca-style instruction file with --data")
    check_run_settings(ifeval_tokens, batch_size, ifeval_limit)
    install_punkt(log=log)
    ifeval_prompts, _ = read_prompts(prompts)
    clear_run_directory(run, force, marker="heldout.jsonl", what="an alpaca quickstart run")
    run.mkdir(parents=True, exist_ok=True)
    _, held_out = split_instructions(source, run)
    laps = _Laps(log)
    measure = dict(held_out=held_out, prompts=ifeval_prompts, template=cfg.template, max_tokens=ifeval_tokens,
                   limit=ifeval_limit, batch_size=batch_size, progress=progress, log=log)
    before, ifeval_before, end_text = _measure(cfg.model, run / "ifeval-base", "base", **measure)
    laps("base model: held-out answers and IFEval")
    result = train(cfg, progress=progress, log=log)
    laps("fine-tuning")
    after, ifeval_after, _ = _measure(result.model_dir, run / "ifeval-tuned", "tuned", **measure)
    laps("fine-tuned model: held-out answers and IFEval")
    outcome = AlpacaResult(run, result.model_dir, held_out, before, after, ifeval_before, ifeval_after, laps.seconds,
                           end_text)
    write_atomic(run / "heldout.json", json.dumps(
        [{"instruction": p, "before": b, "before_ended": be, "after": a, "after_ended": ae}
         for p, b, be, a, ae in zip(held_out, before.texts, before.ended, after.texts, after.ended)],
        indent=2, ensure_ascii=False) + "\n")
    write_atomic(run / "summary.json", json.dumps(outcome.to_dict(), indent=2) + "\n")
    return outcome


class _Laps:
    """The seconds each step took, logged as each ends."""

    def __init__(self, log):
        self.log, self.seconds, self.clock = log, {}, time.monotonic()

    def __call__(self, step: str) -> None:
        now = time.monotonic()
        self.seconds[step] = round(now - self.clock, 1)
        self.clock = now
        self.log(f"{step}: {self.seconds[step]:.0f} s")


def _measure(model_source, out: Path, name: str, *, held_out: list[str], prompts, template: str | None,
             max_tokens: int, limit: int | None, batch_size: int, progress: bool, log):
    """One model's held-out answers and IFEval (into `out`), and the text of its end-of-turn token."""
    from camelid.chat import chat_template_for
    from camelid.checkpoint import load_model
    from camelid.eval.ifeval import run_ifeval

    loaded = load_model(model_source, quantize=QUANTIZE)
    chat_template = chat_template_for(loaded, template)
    log(f"{name}: answering {len(held_out)} held-out instructions ...")
    answers = answer_held_out(loaded, chat_template, held_out)
    count = len(prompts) if limit is None else min(limit, len(prompts))
    log(f"{name}: IFEval, {count} prompts, at most {max_tokens} tokens an answer (lm-eval: 1,280) ...")
    scores = run_ifeval(prompts, out, model=loaded, model_id=name, max_tokens=max_tokens, limit=limit,
                        batch_size=batch_size, template=template, progress=progress)
    log(f"{name}: IFEval {scores.line()}")
    return answers, scores, _token_text(loaded, chat_template)


def _token_text(loaded, template) -> str:
    token = _end_of_turn_id(loaded, template)
    return "" if token is None else loaded.tokenizer.decode([token])


def alpaca_summary(result: AlpacaResult, shown: int = 5, answer_chars: int = 400) -> str:
    """What a person reads at the end: a few held-out answers side by side, IFEval before and after, the share of
    answers that ended their turn, the time of each step, and where the model is."""
    from camelid.eval.ifeval import FIGURES

    rows = [(f"[held out] {p}", _cut(b, answer_chars), _cut(a, answer_chars))
            for p, b, a in zip(result.prompts[:shown], result.before.texts, result.after.texts)]
    b, a = result.ifeval_before.figures, result.ifeval_after.figures
    names = {"prompt_level_strict_acc": "prompt-level strict", "inst_level_strict_acc": "instruction-level strict",
             "prompt_level_loose_acc": "prompt-level loose", "inst_level_loose_acc": "instruction-level loose"}
    table = ["| IFEval | base | fine-tuned | change |", "|---|---:|---:|---:|"]
    table += [f"| {names[k]} | {100 * b[k]:.1f} | {100 * a[k]:.1f} | {100 * (a[k] - b[k]):+.1f} |" for k in FIGURES]
    tokens = result.ifeval_after.settings.get("max_tokens")
    lines = [
        two_columns(rows), *table, "",
        f"IFEval over {result.ifeval_after.prompts} prompts, greedy, answers cut at {tokens} tokens (lm-eval: "
        f"1,280). Google's instruction-tuned Gemma 3 270M reports {GOOGLE_IFEVAL} on IFEval after its own, far "
        "larger post-training (different data and compute).",
        f"answers that ended with {result.end_of_turn or 'the end-of-turn token'} on {len(result.prompts)} held-out "
        f"instructions: {100 * result.before.ended_share:.0f}% before, {100 * result.after.ended_share:.0f}% after",
        "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
        + f"; total {sum(result.seconds.values()) / 60:.1f} min",
        f"\nthe fine-tuned model is in {result.model_dir}; chat with it:\n  camelid chat -m {result.model_dir}",
    ]
    return "\n".join(lines)


def _cut(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[:chars].rstrip() + " ..."
