"""`camelid eval answers | judge | report | perplexity | choice | ratings`: measuring models."""

import sys

from camelid.cli.options import (
    SOURCE_HELP, add_endpoint, add_json, add_model_to_run, add_no_progress, add_on_error, add_out, add_reading,
    add_skip_bad, add_system, add_template, endpoint_client, load_model_of, reading_of,
)
from camelid.errors import CamelidError
from camelid.named_models import DEFAULT_MODEL

JUDGE_URL = "http://127.0.0.1:8000/v1"  # `camelid serve` on this machine


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate: answers, LLM-as-a-judge, reports, perplexity, multiple choice, ratings, IFEval")
    ev = p.add_subparsers(dest="eval_command", required=True, metavar="VERB")
    for add in (_add_answers, _add_judge, _add_report, _add_perplexity, _add_choice, _add_ratings, _add_ifeval):
        add(ev)


def _report_skipped(skipped, what: str) -> None:
    if skipped:
        print(f"skipped {len(skipped)} bad {what} (first: {skipped[0].where}: {skipped[0].reason})", file=sys.stderr)


def _add_answerer(p) -> None:
    """Who answers: a local --model, or an --endpoint; and the name written into the answers."""
    add_model_to_run(p)
    add_template(p)
    p.add_argument("--endpoint", metavar="URL",
                   help="answer through this OpenAI-compatible base URL instead of loading --model")
    p.add_argument("--endpoint-model", metavar="NAME", help="the model name to request (default: --model)")
    p.add_argument("--model-id", help="the name written into the answers (default: the model's)")


def _answerer(args):
    """(local model, None) or (None, endpoint client), as `_add_answerer`'s options say; options that only the
    other one takes are refused rather than ignored."""
    local = [f for f, given in (("--quantize", args.quantize != "none"), ("--device", args.device),
                                ("--dtype", args.dtype), ("--template", args.template)) if given]
    if args.endpoint:
        if local:
            raise CamelidError(f"{local[0]} applies to a local model, not to --endpoint (the server decides)")
        return None, endpoint_client(args, args.endpoint, args.endpoint_model or args.model)
    if args.endpoint_model:
        raise CamelidError("--endpoint-model needs --endpoint")
    return load_model_of(args), None


def _add_answers(ev) -> None:
    p = ev.add_parser(
        "answers", help="answer a question set (FastChat schema: Vicuna-80, MT-bench) with a model or an endpoint",
        description="Writes FastChat's answer schema, one line per question, appending as it goes: run again to "
        "resume. A second turn is asked with the first question and answer in the conversation. Each category "
        "has its temperature (FastChat's MT-bench settings: writing and roleplay 0.7, math, coding, reasoning and "
        "extraction 0, stem and humanities 0.1, others 0.7).",
    )
    p.add_argument("questions", metavar="QUESTIONS", help="a question file (JSONL: question_id, category, turns)")
    add_out(p, "OUT.jsonl", "the answer file, appended to and resumed")
    _add_answerer(p)
    add_system(p, "a system prompt for every question (default: none)")
    p.add_argument("--temperature", type=float, help="one temperature for every question instead of the category's")
    p.add_argument("--category-temperature", action="append", default=[], metavar="CATEGORY=T",
                   help="override one category's temperature (repeatable)")
    p.add_argument("--max-tokens", type=int, default=1024, help="most tokens per answer (default 1024, as MT-bench)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling of each question and turn (default 0)")
    p.add_argument("--question-id", action="append", metavar="ID", help="answer only this question (repeatable)")
    p.add_argument("--limit", type=int, help="answer only the first N questions")
    p.add_argument("--batch-size", type=int, default=8, help="questions generated together by a local model (default 8)")
    add_no_progress(p)
    add_endpoint(p, "--endpoint")
    p.set_defaults(func=cmd_eval_answers)


def cmd_eval_answers(args) -> None:
    from camelid.eval.answers import generate_answers, parse_category_temperatures

    temperatures = parse_category_temperatures(args.category_temperature)
    model, client = _answerer(args)
    report = generate_answers(
        args.questions, args.out, model=model, client=client, model_id=args.model_id, temperature=args.temperature,
        category_temperatures=temperatures or None, max_tokens=args.max_tokens, seed=args.seed,
        question_ids=args.question_id or None, limit=args.limit, system=args.system, batch_size=args.batch_size,
        template=args.template, progress=not args.no_progress,
    )
    print(report.text())


def _add_judge(ev) -> None:
    from camelid.eval.judge import MODES, REFERENCE_CATEGORIES

    p = ev.add_parser(
        "judge", help="LLM-as-a-judge: grade answers 1-10, or compare them in pairs in both orders",
        description="single: a [[rating]] from 1 to 10 per answer and turn. pairwise-baseline / pairwise-all: each "
        "pair judged twice with the answers swapped ([[A]], [[B]] or [[C]] for a tie); when the two orders "
        "disagree, it is a tie. Categories that need one (math, reasoning, coding) are judged against the "
        "question's reference answer; the second turn is judged with the whole dialogue shown. Judgments are "
        "cached, so a re-run pays only for what is new; pairwise runs also write OUT.battles.jsonl for "
        "`camelid eval ratings`.",
    )
    p.add_argument("questions", metavar="QUESTIONS", help="the question file the answers are to")
    p.add_argument("answers", metavar="ANSWERS", nargs="+", help="answer files (or directories of them)")
    add_out(p, "OUT.jsonl", "the judgment file, resumed if it exists")
    p.add_argument("--judge", default=JUDGE_URL,
                   help=f"the judge's OpenAI-compatible base URL (default {JUDGE_URL}: `camelid serve`)")
    p.add_argument("--judge-model", default=DEFAULT_MODEL, help=f"the judge model's name (default {DEFAULT_MODEL})")
    p.add_argument("--mode", choices=list(MODES), default="single", help="how to judge (default single)")
    p.add_argument("--baseline", metavar="MODEL", help="the model every other is compared with (pairwise-baseline)")
    p.add_argument("--model", action="append", metavar="MODEL",
                   help="judge only this model's answers (repeatable; default: every model in ANSWERS)")
    p.add_argument("--reference-categories", default=",".join(REFERENCE_CATEGORIES),
                   help="categories judged against the question's reference (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=1024, help="most tokens per judgment (default 1024)")
    p.add_argument("--no-reminder", action="store_true",
                   help="do not ask again, once, for the verdict when a judgment has none")
    p.add_argument("--cache", metavar="FILE", help="the cache of judge replies (default OUT.cache.jsonl)")
    p.add_argument("--no-cache", action="store_true", help="ask the judge again even for judgments already paid for")
    add_on_error(p, "when a request fails after its retries: stop (default) or skip it (a re-run retries it)")
    add_no_progress(p)
    add_endpoint(p, "--judge")
    p.set_defaults(func=cmd_eval_judge)


def cmd_eval_judge(args) -> None:
    from camelid.eval.judge import judge

    cache = False if args.no_cache else (args.cache or True)
    report = judge(
        args.questions, args.answers, args.out, client=endpoint_client(args, args.judge, args.judge_model),
        mode=args.mode, baseline=args.baseline, models=args.model or None,
        reference_categories=tuple(c.strip() for c in args.reference_categories.split(",") if c.strip()),
        max_tokens=args.max_tokens, reminder=not args.no_reminder, cache=cache, on_error=args.on_error,
        progress=not args.no_progress,
    )
    print(report.text())


def _add_report(ev) -> None:
    p = ev.add_parser(
        "report", help="tables (Markdown) and plots (PNG) of judgments: scores by model, turn and category, win rates",
        description="Writes OUT/report.md, OUT/summary.json, OUT/scores_by_category.png and "
        "OUT/pairwise_outcomes.png; win rates count a tie as half a win.",
    )
    p.add_argument("judgments", metavar="JUDGMENTS", nargs="+", help="judgment files of `camelid eval judge`")
    add_out(p, "DIR", "the directory for the report and plots")
    p.add_argument("--questions", metavar="FILE", help="the question file, for the per-category tables and plot")
    p.set_defaults(func=cmd_eval_report)


def cmd_eval_report(args) -> None:
    from camelid.eval.report import eval_report

    print(eval_report(args.judgments, args.out, questions=args.questions).markdown)


def _add_perplexity(ev) -> None:
    p = ev.add_parser(
        "perplexity", help="perplexity of a model on text or on a dataset's assistant turns",
        description="A .txt file is one text; records with a `text` field are texts, and conversations (any format "
        "of `camelid data --help`) are scored on their assistant tokens only, rendered as training renders them. "
        "Long texts are scored in sliding windows, every token once.",
    )
    p.add_argument("data", metavar="DATA", help="a text file, or a data source of texts or conversations: "
                   + SOURCE_HELP.removeprefix("a data source: "))
    add_model_to_run(p)
    add_template(p, instead_of="the model's own, for conversations")
    p.add_argument("--context", type=int, help="most tokens in one forward pass (default: the model's context)")
    p.add_argument("--stride", type=int,
                   help="how far each window moves (default context/2); every token sees at least context-stride+1 "
                   "tokens of history; stride = context is lm-eval's rolling windows")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    add_skip_bad(p, "malformed records")
    add_reading(p)
    add_no_progress(p)
    p.set_defaults(func=cmd_eval_perplexity)


def cmd_eval_perplexity(args) -> None:
    from camelid.eval.likelihood import perplexity, read_texts

    texts, skipped = read_texts(args.data, skip_bad=args.skip_bad, reading=reading_of(args))
    _report_skipped(skipped, "records")
    r = perplexity(load_model_of(args), texts, template=args.template, context=args.context, stride=args.stride,
                   batch_size=args.batch_size, progress=not args.no_progress)
    print(f"perplexity {r.ppl:.4f}  (loss {r.loss:.4f} nats/token over {r.tokens:,} tokens of {len(texts):,} "
          f"texts; context {r.context}, stride {r.stride})")


def _add_choice(ev) -> None:
    from camelid.eval import NORMALISATIONS, PROMPT

    p = ev.add_parser(
        "choice", help="multiple-choice accuracy by log-likelihood (acc and length-normalised acc_norm, as lm-eval)",
        description="DATA is JSONL of {question, choices: [...], answer: index or the choice's text}. Each choice is "
        "scored by the log-probability of ' CHOICE' after the prompt; acc takes the best sum, acc_norm the best "
        "sum divided by the choice's length.",
    )
    p.add_argument("data", metavar="DATA", help="JSONL of {question, choices, answer}")
    add_model_to_run(p)
    p.add_argument("--normalise", choices=list(NORMALISATIONS), default="chars",
                   help="what acc_norm divides by: chars (lm-eval's acc_norm; default), bytes, tokens, none")
    p.add_argument("--prompt", default=PROMPT,
                   help="the text before each choice; {question} is replaced (default %(default)r)")
    p.add_argument("--batch-size", type=int, default=16, help="prompt+choice sequences per forward pass (default 16)")
    add_skip_bad(p, "malformed questions")
    add_no_progress(p)
    p.set_defaults(func=cmd_eval_choice)


def cmd_eval_choice(args) -> None:
    from camelid.eval.likelihood import choice_accuracy, read_questions

    questions, skipped = read_questions(args.data, skip_bad=args.skip_bad)
    _report_skipped(skipped, "questions")
    r = choice_accuracy(load_model_of(args), questions, normalise=args.normalise, prompt=args.prompt,
                        batch_size=args.batch_size, progress=not args.no_progress)
    print(f"acc       {r.acc:.4f} ± {r.acc_stderr:.4f}\nacc_norm  {r.acc_norm:.4f} ± {r.acc_norm_stderr:.4f}  "
          f"(normalised by {r.normalise})\n{r.questions} questions")


def _add_ratings(ev) -> None:
    from camelid.eval.ratings import METHODS

    p = ev.add_parser(
        "ratings", help="Bradley-Terry or Elo ratings with bootstrap intervals from arena votes or pairwise judgments",
        description="Reads battles {model_a, model_b, winner: model_a|model_b|tie|tie (bothbad)} from JSONL "
        "(the arena's votes, the pairwise judge's battles) and prints a table, best first.",
    )
    p.add_argument("votes", metavar="FILE", nargs="+", help="JSONL (or JSON array) files of battles")
    p.add_argument("--method", choices=list(METHODS), default="bradley-terry",
                   help="bradley-terry: maximum likelihood, order-free (default); elo: online, in file order")
    p.add_argument("--rounds", type=int, default=1000, help="bootstrap resamples for the intervals; 0 for none "
                   "(default 1000)")
    p.add_argument("--level", type=float, default=0.95, help="the intervals' coverage (default 0.95)")
    p.add_argument("--anchor", metavar="MODEL",
                   help="put this model at --center; intervals are then differences to it (default: the mean is "
                   "--center)")
    p.add_argument("--center", type=float, default=1000.0, help="the rating level (default 1000)")
    p.add_argument("--k", type=float, default=4.0, help="Elo's step size (default 4, as the Chatbot Arena)")
    p.add_argument("--l2", type=float, default=0.01,
                   help="Bradley-Terry's weak prior keeping unbeaten models finite (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="makes the resamples repeatable (default 0)")
    p.add_argument("--plot", metavar="PNG", help="write the ratings with their intervals here")
    p.add_argument("--win-rates", metavar="PNG", help="write predicted and observed win rates as heatmaps here")
    add_json(p, "print JSON instead of a Markdown table")
    add_skip_bad(p, "malformed votes")
    p.set_defaults(func=cmd_eval_ratings)


def cmd_eval_ratings(args) -> None:
    import json

    from camelid.eval.ratings import compute_ratings, ratings_plot, ratings_table, read_battles, win_rate_plot

    battles, skipped = read_battles(args.votes, skip_bad=args.skip_bad)
    _report_skipped(skipped, "battles")
    r = compute_ratings(battles, method=args.method, rounds=args.rounds, level=args.level, seed=args.seed,
                        anchor=args.anchor, center=args.center, k=args.k, l2=args.l2)
    print(json.dumps(r.to_dict(), indent=2) if args.json else ratings_table(r))
    if args.plot:
        ratings_plot(r, args.plot)
    if args.win_rates:
        win_rate_plot(r, args.win_rates, battles=battles)


def _add_ifeval(ev) -> None:
    from camelid.eval.ifeval import MAX_TOKENS, PROMPTS

    p = ev.add_parser(
        "ifeval", help="IFEval: instruction following checked by program (lm-eval's checkers), four figures",
        description="Answers IFEval's prompts (each as one user turn, greedy) with a local model or an endpoint "
        "and scores every answer with lm-evaluation-harness's ifeval checkers: prompt-level and instruction-level "
        "accuracy, strict and loose, and each instruction type's. OUT gets answers.jsonl (resumed by a re-run), "
        "responses.jsonl (Google's {prompt, response} format), results.jsonl, scores.json, report.md and "
        "ifeval.png. --responses scores a file of answers instead, without a model.",
    )
    add_out(p, "DIR", "the directory for the answers, scores, table and plot")
    p.add_argument("--prompts", default=PROMPTS, metavar="SRC",
                   help=f"IFEval's prompts: input_data.jsonl or any data source (default {PROMPTS}, as lm-eval)")
    _add_answerer(p)
    p.add_argument("--responses", metavar="FILE",
                   help="score these answers instead of generating: JSONL of {prompt, response} (optionally key), "
                   "or an answers.jsonl of camelid")
    add_system(p, "a system prompt for every prompt (default: none, as IFEval)")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                   help=f"most tokens per answer (default {MAX_TOKENS}, lm-eval's; an answer cut short is scored as "
                   "it stands)")
    p.add_argument("--limit", type=int, help="only the first N prompts (the figures are then over those N)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="answers a local model decodes at once, by continuous batching (default 16)")
    p.add_argument("--punkt-wheel", metavar="FILE",
                   help="install NLTK's Punkt tables from this llama-index-core wheel instead of downloading it")
    add_skip_bad(p, "malformed prompts")
    add_no_progress(p)
    add_endpoint(p, "--endpoint")
    p.set_defaults(func=cmd_eval_ifeval)


def cmd_eval_ifeval(args) -> None:
    from camelid.eval.ifeval import (
        MAX_TOKENS, check_checker_packages, check_run_settings, install_punkt, read_prompts, rescore, run_ifeval,
    )

    check_run_settings(args.max_tokens, args.batch_size, args.limit)
    if args.responses:
        answering = [f for f, given in (
            ("--endpoint", args.endpoint), ("--model", args.model != DEFAULT_MODEL),
            ("--quantize", args.quantize != "none"),
            ("--device", args.device), ("--dtype", args.dtype), ("--template", args.template),
            ("--system", args.system), ("--model-id", args.model_id), ("--endpoint-model", args.endpoint_model),
            ("--max-tokens", args.max_tokens != MAX_TOKENS), ("--batch-size", args.batch_size != 16)) if given]
        if answering:
            raise CamelidError(f"{answering[0]} is for answering; --responses scores answers already written")
    check_checker_packages()
    install_punkt(args.punkt_wheel, log=lambda m: print(m, file=sys.stderr))
    prompts, skipped = read_prompts(args.prompts, skip_bad=args.skip_bad)
    _report_skipped(skipped, "prompts")
    if args.responses:
        scores = rescore(prompts, args.responses, args.out, limit=args.limit)
    else:
        model, client = _answerer(args)
        shown = len(prompts) if args.limit is None else min(args.limit, len(prompts))
        print(f"IFEval: {shown} of {len(prompts)} prompts, greedy, at most {args.max_tokens} tokens per answer "
              "(lm-eval: 1,280)", file=sys.stderr)
        scores = run_ifeval(prompts, args.out, model=model, client=client, model_id=args.model_id,
                            max_tokens=args.max_tokens, limit=args.limit, system=args.system,
                            batch_size=args.batch_size, template=args.template, progress=not args.no_progress)
    print(scores.markdown())
    if cut := scores.settings.get("answers_cut_at_max_tokens"):
        print(f"\n{cut} answers reached --max-tokens {args.max_tokens} and were scored as they stood")
    print(f"\nwritten to {args.out}: scores.json, report.md, ifeval.png, results.jsonl, responses.jsonl")
