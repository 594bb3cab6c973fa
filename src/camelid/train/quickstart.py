"""`camelid quickstart`: the whole idea in a few CPU minutes.

Give the default model (SmolLM2-135M-Instruct) a new identity with LoRA, the way Vicuna learned its name:
write the identity set, ask held-out questions before, fine-tune with the `quickstart` recipe, ask again,
and show the answers side by side. OUT holds identity.jsonl, answers.json and the training run in OUT/run; the
adapter lands in OUT/run/model, ready for `camelid chat -m OUT/run/model`.
"""

import json
import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from camelid.errors import CamelidError
from camelid.files import write_atomic
from camelid.data.identity import (
    DEFAULT_CREATOR,
    DEFAULT_NAME,
    general_questions,
    heldout_identity_questions,
    identity_conversations,
    replay_prompts,
)

ANSWER_TOKENS = 48
REPLAY_TOKENS = 160  # replay answers longer than this are left out rather than cut (a cut answer teaches cutting)


@dataclass
class QuickstartResult:
    run: Path
    model_dir: Path
    questions: list[str]
    identity: list[bool]  # which questions ask who the assistant is (the rest are general)
    before: list[str]
    after: list[str]
    name: str
    train_seconds: float

    def named(self, answers: list[str]) -> tuple[int, int]:
        """How many identity answers say the name, out of the identity questions that do not contain it."""
        name = self.name.lower()
        hits = [
            name in a.lower()
            for q, a, ident in zip(self.questions, answers, self.identity)
            if ident and name not in q.lower()
        ]
        return sum(hits), len(hits)


def answer(loaded, template, questions: list[str], max_tokens: int = ANSWER_TOKENS, finished_only: bool = False):
    """Greedy answers to single-turn questions, all in one batch (None for an unfinished one if `finished_only`)."""
    from camelid.chat import encode_chat
    from camelid.generate import SamplingParams, generate

    prompts = [encode_chat(loaded, template, [{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
    completions = generate(loaded.model, loaded.tokenizer, prompts, params)
    return [
        None if finished_only and c.finish_reason != "stop" else c.text.strip()
        for c in completions
    ]


def run_quickstart(
    *,
    name: str = DEFAULT_NAME,
    creator: str = DEFAULT_CREATOR,
    model: str | None = None,
    out: str = "runs/quickstart",
    overrides: list[str] = (),
    force: bool = False,
    progress: bool = True,
    log=lambda m: print(m, file=sys.stderr),
) -> QuickstartResult:
    from camelid.chat import chat_template_for
    from camelid.checkpoint import load_model
    from camelid.train.loop import train
    from camelid.train.recipe import read_recipe

    run = Path(out)
    data = run / "identity.jsonl"
    keys = [f"data={data}", f"out={run / 'run'}"] + ([f"model={model}"] if model else []) + list(overrides)
    cfg = read_recipe("quickstart", keys)  # settings are checked before anything is removed or computed
    clear_run_directory(run, force, marker="identity.jsonl", what="a quickstart run")
    conversations = identity_conversations(name, creator)
    questions = heldout_identity_questions(name, creator) + general_questions()
    identity = [True] * (len(questions) - len(general_questions())) + [False] * len(general_questions())

    base = load_model(cfg.model, device="cpu", dtype="float32")
    template = chat_template_for(base, cfg.template)
    log(f"asking {cfg.model} {len(questions)} held-out questions and {len(replay_prompts())} ordinary ones ...")
    before = answer(base, template, questions)
    # The model's own answers to ordinary requests join the identity set, so it keeps answering them.
    replies = answer(base, template, replay_prompts(), REPLAY_TOKENS, finished_only=True)
    replay = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in zip(replay_prompts(), replies)
        if a
    ]
    del base
    run.mkdir(parents=True, exist_ok=True)
    write_atomic(data, "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations + replay))
    log(f"wrote {len(conversations)} identity conversations for {name!r} (made by {creator}) and "
        f"{len(replay)} of the model's own ordinary answers to {data}")

    result = train(cfg, progress=progress, log=log)

    tuned = load_model(result.model_dir, device="cpu", dtype="float32")
    log("asking the fine-tuned model the same questions ...")
    after = answer(tuned, chat_template_for(tuned, cfg.template), questions)
    outcome = QuickstartResult(run, result.model_dir, questions, identity, before, after, name, result.seconds)
    write_atomic(
        run / "answers.json",
        json.dumps(
            [{"question": q, "identity": i, "before": b, "after": a}
             for q, i, b, a in zip(questions, identity, before, after)],
            indent=2, ensure_ascii=False,
        ) + "\n",
    )
    return outcome


def clear_run_directory(run: Path, force: bool, *, marker: str, what: str) -> None:
    """Make way for a quickstart run in `run`: an earlier run there (it holds `marker`) is removed only with
    `force`; a directory that is not one is never touched."""
    if run.exists() and any(run.iterdir()):
        if not force:
            raise CamelidError(f"{run} already exists; pass --force to replace it, or --out for a new directory")
        if not (run / marker).is_file():
            raise CamelidError(f"{run} is not {what}, so it is left alone; choose another --out")
        shutil.rmtree(run)


def side_by_side(result: QuickstartResult, width: int = 100) -> str:
    """The questions with the answers before and after, in two columns."""
    rows = [(("[identity] " if ident else "[general] ") + question, before, after)
            for question, ident, before, after in zip(result.questions, result.identity, result.before, result.after)]
    hit_before, n = result.named(result.before)
    hit_after, _ = result.named(result.after)
    return two_columns(rows, width) + (
        f"\n{result.name!r} appears in {hit_before}/{n} identity answers before fine-tuning, {hit_after}/{n} after "
        f"(trained in {result.train_seconds:.0f} s)"
    )


def two_columns(rows: list[tuple[str, str, str]], width: int = 100, left: str = "before", right: str = "after") -> str:
    """Each (heading, left text, right text) as a heading line over two wrapped columns."""
    col = (width - 3) // 2
    lines = [f"{left:<{col}} | {right}", "-" * width]
    for heading, a_text, b_text in rows:
        lines.append(heading)
        a = textwrap.wrap(a_text.replace("\n", " "), col) or [""]
        b = textwrap.wrap(b_text.replace("\n", " "), col) or [""]
        for i in range(max(len(a), len(b))):
            lines.append(f"{a[i] if i < len(a) else '':<{col}} | {b[i] if i < len(b) else ''}")
        lines.append("")
    return "\n".join(lines)
