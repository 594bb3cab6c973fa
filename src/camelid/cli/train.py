"""`camelid train`: supervised fine-tuning from a recipe, in one process or many under torchrun."""

import argparse
import dataclasses
import os

from camelid.cli.options import RECIPE_HELP, add_no_progress, add_overrides


def add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a model, full or LoRA, from a recipe (one process, or many under torchrun)",
        description="Supervised fine-tuning on chat data, learning only the assistant turns. Writes OUT/model "
        "(an adapter or a full model), checkpoints, metrics.jsonl and loss.png into the run directory OUT.",
        epilog=_recipe_keys(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", metavar="RECIPE", nargs="?",
                   help=f"{RECIPE_HELP}; leave it out to give every key as KEY=VALUE")
    add_overrides(p, "set or override a recipe key (listed below)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its latest checkpoint (model, optimizer, schedule, random "
                   "state and data position), reproducing the uninterrupted run")
    add_no_progress(p, "no progress bar (the log lines stay)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> None:
    from camelid.train.loop import train
    from camelid.train.recipe import build_config, read_recipe

    overrides, recipe = list(args.overrides), args.recipe
    if recipe and "=" in recipe:  # no recipe: every key on the command line
        overrides, recipe = [recipe, *overrides], None
    cfg = read_recipe(recipe, overrides) if recipe else build_config({}, overrides)
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, the first process speaks for all
        return
    rate = f"{result.tokens_per_second:,.0f} tokens/s"
    print(f"trained {result.steps} steps in {result.seconds:.0f} s ({rate}); final loss {result.losses[-1]:.4f}"
          + (f", held-out loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""))
    print(f"model: {result.model_dir}   loss curve: {result.run / 'loss.png'}")
    print(f"chat with it: camelid chat -m {result.model_dir}")


def _recipe_keys() -> str:
    """The epilog of `camelid train --help`: every recipe key with its help and default, then examples."""
    from camelid.train.recipe import FIELDS, HELP

    lines = ["recipe keys (YAML keys, or KEY=VALUE on the command line; lists comma-separated):"]
    for name, f in FIELDS.items():
        default = f.default_factory() if callable(f.default_factory) else f.default
        shown = "required" if default is dataclasses.MISSING else f"default {default!r}"
        # a key whose default depends on the objective says so in its help
        lines.append(f"  {name:<24}{HELP[name]}" + ("" if "default" in HELP[name] else f" ({shown})"))
    lines += [
        "",
        "examples:",
        "  camelid train quickstart                       # the CPU recipe in recipes/quickstart.yaml",
        "  camelid train alpaca model=./llama-7b data=alpaca_data.json out=runs/alpaca",
        "  camelid train model=smollm2-135m-instruct data=chats.jsonl out=runs/mine method=lora lr=2e-4",
        "  camelid train quickstart-dpo                   # LoRA DPO on HH-RLHF pairs (recipes/quickstart-dpo.yaml)",
        "  camelid train model=runs/mine/model data=pairs.jsonl out=runs/dpo objective=dpo beta=0.1 lr=5e-6",
        "  torchrun --nproc-per-node 8 -m camelid train vicuna model=./llama-13b data=sharegpt.json out=runs/v",
    ]
    return "\n".join(lines)
