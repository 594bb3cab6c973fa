"""The options that several verbs take, each defined here once, with what turns parsed options into library
arguments: the model and where it runs, the backend, sampling, the chat template and system prompt, an
OpenAI-compatible endpoint, recipes, and the input/output flags (-o, --force, --skip-bad, --no-progress, --json).

Nothing here imports torch: the choices offered are plain names from torch-free modules.
"""

import argparse

from camelid.backend import BACKENDS
from camelid.config import DTYPE_NAMES, QUANTIZATIONS
from camelid.named_models import DEFAULT_MODEL

MODEL_KINDS = (
    "a named model (see `camelid models`), a GGUF file, a Hugging Face model directory, or a LoRA adapter directory "
    "(which names its base)"
)
MODEL_HELP = f"{MODEL_KINDS}; default {DEFAULT_MODEL}"
RECIPE_HELP = "a recipe name (alpaca, vicuna, koala, gpt4all, quickstart: recipes/NAME.yaml) or a YAML file"


# -- the model and where it runs ----------------------------------------------------------------------------------


def add_model(p: argparse.ArgumentParser, help: str = MODEL_HELP, **kwargs) -> None:
    """-m/--model: which model; `help` says what it is for where that differs from loading it to run."""
    kwargs.setdefault("metavar", "MODEL")
    p.add_argument("-m", "--model", help=help, **kwargs)


def add_device(p: argparse.ArgumentParser) -> None:
    """--device, --dtype and --quantize: where camelid's own backend runs a model, and in what precision."""
    p.add_argument("--device", help="where to run: cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument(
        "--dtype", choices=list(DTYPE_NAMES),
        help="weight and activation precision (default: float32 on CPU, bfloat16 on CUDA)",
    )
    p.add_argument(
        "--quantize", choices=list(QUANTIZATIONS), default="none",
        help="f16: float16 weights, ~2x faster CPU decoding (SmolLM2's perplexity +0.005%%); int8: int8 weights "
        "on camelid's own C kernels, built on first use with the system's C compiler: ~7x faster (perplexity "
        "+0.71%%, prompts rounded as llama.cpp's Q8_0); int4: 4-bit weights on the same kernels (a GGUF's Q4_0/Q4_1/Q4_K blocks used directly), "
        "about 0.6x int8's memory; none: exact float32, equal to transformers (default)",
    )


def add_model_to_run(p: argparse.ArgumentParser) -> None:
    """The model a verb loads to run itself, with the default model, and where it runs."""
    add_model(p, default=DEFAULT_MODEL)
    add_device(p)


def add_written_dtype(p: argparse.ArgumentParser) -> None:
    """--dtype of the verbs that write a model's weights."""
    p.add_argument("--dtype", choices=list(DTYPE_NAMES),
                   help="precision of the written weights (default float32: exact for any source)")


def load_model_of(args):
    """The model that `add_model_to_run`'s options name, loaded on camelid's own backend."""
    from camelid.checkpoint import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)


def add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend", choices=list(BACKENDS), default="camelid",
        help="camelid: camelid's own PyTorch model (default); llamacpp: run a GGUF file on llama.cpp "
        "(pip install 'camelid[llamacpp]'), with camelid's tokenizer, chat template, sampling and stop strings "
        "around its logits; --device, --dtype and --quantize do not apply to it",
    )
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for the model's arithmetic (default: torch's, one per core); with llamacpp, "
                   "llama.cpp's threads (torch samples on one)")


def backend_options(args) -> dict:
    """The keyword arguments of camelid.backend.load_backend that `add_device` and `add_backend` parsed."""
    return dict(backend=args.backend, device=args.device, dtype=args.dtype, quantize=args.quantize,
                threads=args.threads)


# -- sampling, chat template and system prompt --------------------------------------------------------------------


def add_sampling(p: argparse.ArgumentParser) -> None:
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


def sampling_params(args):
    """`add_sampling`'s options as camelid.generate.SamplingParams, which checks them."""
    from camelid.generate import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop),
    )


def add_template(p: argparse.ArgumentParser, instead_of: str = "the model's own", implies_chat: bool = False) -> None:
    """--template: a built-in chat template, listed by name, in place of `instead_of`."""
    from camelid.chat_template import BUILTIN_TEMPLATES

    also = " (implies --chat)" if implies_chat else ""
    p.add_argument("--template", choices=list(BUILTIN_TEMPLATES), metavar="NAME",
                   help=f"a built-in chat template instead of {instead_of}{also}: {', '.join(BUILTIN_TEMPLATES)}")


def add_system(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--system", help=help)


# -- an OpenAI-compatible endpoint --------------------------------------------------------------------------------


def add_endpoint(p: argparse.ArgumentParser, what: str) -> None:
    """How to talk to the endpoint that the flag `what` names (a teacher, a judge)."""
    g = p.add_argument_group(f"the {what} endpoint")
    g.add_argument("--api-key", help="its API key (default: the OPENAI_API_KEY environment variable)")
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    g.add_argument("--retries", type=int, default=5,
                   help="retries of a request on 429, 5xx, timeouts and garbled replies, with backoff (default 5)")
    g.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for one reply (default 600: a CPU server is slow)")
    g.add_argument("--price-in", type=float, default=0.0, help="dollars per million prompt tokens, for the cost")
    g.add_argument("--price-out", type=float, default=0.0, help="dollars per million completion tokens")


def endpoint_client(args, url: str, model: str):
    """A camelid.client.ChatClient for `model` at `url`, as `add_endpoint`'s options ask."""
    from camelid.client import ChatClient

    return ChatClient(url, model, api_key=args.api_key, concurrency=args.concurrency, retries=args.retries,
                      timeout=args.timeout, price_in=args.price_in, price_out=args.price_out)


def add_on_error(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--on-error", choices=["stop", "skip"], default="stop", help=help)


# -- recipes -------------------------------------------------------------------------------------------------------


def add_overrides(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help=help)


# -- input and output ----------------------------------------------------------------------------------------------


def add_out(p: argparse.ArgumentParser, metavar: str, help: str) -> None:
    p.add_argument("-o", "--out", required=True, metavar=metavar, help=help)


def add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what}")


def add_skip_bad(p: argparse.ArgumentParser, what: str = "unreadable records") -> None:
    p.add_argument("--skip-bad", action="store_true", help=f"skip {what}, counted, instead of stopping")


SOURCE_HELP = ("a data source: a JSON/JSONL file (also .gz, .zst), a Parquet, Arrow or CSV file, a datasets folder "
               "(save_to_disk, the Hub's layout, shards; PATH:SPLIT picks a split), or hf:ORG/NAME[:SPLIT]")


def add_reading(p: argparse.ArgumentParser) -> None:
    """--format and --columns: how each record of a data source is read (camelid.data.formats.Reading)."""
    from camelid.data.formats import FORMATS

    p.add_argument("--format", choices=list(FORMATS), metavar="NAME",
                   help="read every record in this format instead of telling it by its keys: "
                   + ", ".join(FORMATS))
    p.add_argument("--columns", metavar="KEY=COLUMN,...",
                   help="read the source's COLUMN as the format's KEY, e.g. instruction=question,output=answer")


def reading_of(args):
    from camelid.data.formats import Reading, parse_columns

    return Reading(args.format, parse_columns(args.columns))


def add_no_progress(p: argparse.ArgumentParser, help: str = "no progress bar") -> None:
    p.add_argument("--no-progress", action="store_true", help=help)


def add_json(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--json", action="store_true", help=help)
