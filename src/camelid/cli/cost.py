"""`camelid cost`: what training a recipe costs in tokens, FLOPs, hours and dollars on a given GPU."""

import argparse

from camelid.cli.options import RECIPE_HELP, add_json, add_overrides
from camelid.errors import CamelidError


def add_cost(sub) -> None:
    from camelid.config import PRESETS
    from camelid.cost import DEFAULT_UTILIZATION

    p = sub.add_parser(
        "cost", help="estimate a recipe's training tokens, FLOPs, hours and dollars on a given GPU",
        description="Estimates what training RECIPE costs on --count GPUs of kind --gpu: the tokens it processes, "
        "its FLOPs, hours at a stated utilisation, GPU-hours and dollars, with the assumptions; warns when the "
        "weights and optimizer state will not fit the GPUs' memory.",
        epilog=_formulas(DEFAULT_UTILIZATION), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", metavar="RECIPE", nargs="?", help=RECIPE_HELP)
    add_overrides(p, "override a recipe key as `camelid train` does (e.g. epochs=1 seq_len=1024)")
    p.add_argument("--gpu", metavar="NAME", help="the GPU kind (see --list-gpus), e.g. A100-80GB")
    p.add_argument("--count", type=int, default=1, help="how many GPUs train together (default 1)")
    p.add_argument("--price", type=float, metavar="DOLLARS",
                   help="dollars per GPU-hour, for the dollar cost (default: none, dollars not computed)")
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
    add_json(p, "print the estimate as JSON")
    p.add_argument("--list-gpus", action="store_true",
                   help="print the GPU table (peak dense bf16 TFLOP/s, memory, source of each) and exit")
    p.set_defaults(func=cmd_cost)


def cmd_cost(args) -> None:
    from camelid.cost import GPUS, cost_json, cost_table, estimate_cost, gpu_table, parse_count

    if args.list_gpus:
        print(gpu_table())
        return
    if not args.recipe:
        raise CamelidError("give a RECIPE (a name from recipes/ or a YAML file), or --list-gpus")
    if not args.gpu:
        raise CamelidError(f"give --gpu NAME, one of: {', '.join(GPUS)} (see: camelid cost --list-gpus)")
    given = {"--examples": args.examples, "--tokens-per-example": args.tokens_per_example, "--tokens": args.tokens,
             "--model-size": args.model_size}  # counts such as 52002, 70K or 6.7B
    counts = {flag: None if value is None else parse_count(value, flag) for flag, value in given.items()}
    estimate = estimate_cost(
        args.recipe, gpu=args.gpu, count=args.count, utilization=args.utilization, price=args.price,
        overrides=args.overrides, preset_name=args.preset, model_size=counts["--model-size"],
        examples=counts["--examples"], tokens_per_example=counts["--tokens-per-example"], tokens=counts["--tokens"],
        tokenizer=args.tokenizer,
    )
    print(cost_json(estimate) if args.json else cost_table(estimate))


def _formulas(default_utilization: float) -> str:
    """The epilog of `camelid cost --help`: the formulas, the defaults' sources, and examples."""
    return f"""\
FLOPs (N: weights that multiply each token, i.e. all but the input embedding and norms, a tied head counted;
D: token positions run, padding included; S: sum of padded row lengths squared; L layers; d = heads x head dim):
  full fine-tuning        6·N·D + 12·L·d·S
  LoRA                    4·N·D + 6·N_lora·D + 12·L·d·S    (frozen weights get no weight gradients)
  gradient checkpointing  + 2·(N + N_lora)·D + 4·L·d·S      (the forward runs again in backward)
  evaluation              + 2·(N + N_lora)·D_eval + 4·L·d·S_eval a pass over the held-out rows, on every GPU
hours = FLOPs / (count x peak dense bf16 TFLOP/s x utilisation) / 3600; dollars = hours x count x price.
The default utilisation, {default_utilization:g}, is what the Hugging Face Trainer with FSDP reached in 2023
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
