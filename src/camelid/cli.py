"""The `camelid` command line: a thin layer over the library; each verb calls one library function."""

import argparse
import dataclasses
import sys

from camelid.checkpoint import DTYPES
from camelid.errors import CamelidError
from camelid.quantize import QUANTIZATIONS
from camelid.models import DEFAULT_MODEL

MODEL_HELP = (
    f"a named model (see `camelid models`; default {DEFAULT_MODEL}), a GGUF file, a Hugging Face model directory, "
    "or a LoRA adapter directory (which names its base)"
)


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
        help="f16: keep the weights in float16 for ~2x faster CPU decoding (perplexity +0.01%% on SmolLM2); "
        "none: exact float32, equal to transformers (default)",
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


def cmd_models(args) -> None:
    from camelid.models import NAMED_MODELS

    width = max(len(n) for n in NAMED_MODELS)
    for model in NAMED_MODELS.values():
        path = model.path()
        where = str(path) if path else f"not installed; install with: {model.install}"
        print(f"{model.name:<{width}}  {model.description}\n{'':<{width}}  {where}")


def cmd_chat(args) -> None:
    from camelid.chat import run_chat

    params = _sampling(args)  # validate flags before the slow load
    run_chat(_load(args), params, template_name=args.template, system=args.system)


def cmd_generate(args) -> None:
    from camelid.chat import chat_template_for, encode_chat
    from camelid.generate import stream

    params = _sampling(args)
    loaded = _load(args)
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
    from camelid.checkpoint import load_model, save_model

    loaded = load_model(args.src, device="cpu", dtype="float32")
    out = save_model(loaded, args.dst, dtype=args.dtype, overwrite=args.force)
    print(f"wrote {out} ({loaded.model.num_parameters() / 1e6:.1f}M parameters, {args.dtype or 'float32'})")


def cmd_export_merge(args) -> None:
    from camelid.checkpoint import load_model, save_model
    from camelid.train.lora import is_adapter_dir

    if not is_adapter_dir(args.adapter):
        raise CamelidError(f"{args.adapter}: not a LoRA adapter directory (no adapter_config.json); "
                           "to copy a full model use `camelid convert`")
    loaded = load_model(args.adapter, device="cpu", dtype="float32")  # the base with the adapter merged in
    out = save_model(loaded, args.out, dtype=args.dtype, overwrite=args.force)
    print(f"wrote {out} ({loaded.model.num_parameters() / 1e6:.1f}M parameters, {args.dtype or 'float32'})")


def cmd_serve(args) -> None:
    from camelid.serve.api import ServerLimits
    from camelid.serve.server import API_KEY_ENV, serve

    for flag in ("max_batch", "max_queue", "max_tokens_limit", "max_body_bytes", "port"):
        value = getattr(args, flag)
        if value < (0 if flag == "port" else 1):
            raise CamelidError(f"--{flag.replace('_', '-')} must be at least {0 if flag == 'port' else 1}, not {value}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not (args.api_key or _env(API_KEY_ENV)):
        print(f"camelid: warning: serving on {args.host} without an API key: anyone who can reach it may use it "
              f"(set --api-key or {API_KEY_ENV})", file=sys.stderr)
    limits = ServerLimits(max_tokens=args.max_tokens_limit, max_body_bytes=args.max_body_bytes)
    serve(args.model or [DEFAULT_MODEL], host=args.host, port=args.port, api_key=args.api_key, limits=limits,
          votes=args.votes, device=args.device, dtype=args.dtype, quantize=args.quantize, max_batch=args.max_batch,
          max_queue=args.max_queue, context=args.context, template=args.template,
          log=lambda m: print(m, file=sys.stderr))


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
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="complete one prompt and print the result as it is generated")
    _add_model_args(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the chat template (default: raw completion)")
    _add_template_args(p, implies_chat=True)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="write a model (name, GGUF or HF directory) as an HF-format directory")
    p.add_argument("src", metavar="SRC", help=MODEL_HELP)
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

    from camelid.train.identity import DEFAULT_CREATOR, DEFAULT_NAME

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
                   help="f16: float16 weights, ~2x faster CPU decoding; none: exact float32 (default)")
    p.add_argument("--template", choices=list(BUILTIN_TEMPLATES), metavar="NAME",
                   help=f"a built-in chat template for every model instead of their own: {', '.join(BUILTIN_TEMPLATES)}")
    p.add_argument("--max-batch", type=int, default=8,
                   help="sequences decoded together per model; more waits in line (default 8)")
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
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="write a model in another form (see: camelid export --help)")
    export = p.add_subparsers(dest="export_command", required=True, metavar="KIND")
    p = export.add_parser("merge", help="fold a LoRA adapter into its base model; write an HF-format directory")
    p.add_argument("adapter", metavar="ADAPTER",
                   help="a LoRA adapter directory (adapter_config.json naming its base, adapter_model.safetensors)")
    p.add_argument("out", metavar="OUT", help="the directory to create (must not exist, or be empty)")
    p.add_argument("--dtype", choices=list(DTYPES), help="precision of the written weights (default float32)")
    p.add_argument("--force", action="store_true", help="replace OUT if it is an existing directory")
    p.set_defaults(func=cmd_export_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
