"""`camelid serve`: models over an OpenAI-compatible API, with a chat page and a blind arena."""

import sys

from camelid.cli.options import MODEL_HELP, add_backend, add_device, add_model, add_template, backend_options
from camelid.errors import CamelidError
from camelid.named_models import DEFAULT_MODEL

LEAST = {"max_batch": 1, "max_queue": 1, "max_tokens_limit": 1, "max_body_bytes": 1, "port": 0,
         "prefill_chunk": 0}  # flag: its minimum


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve models over an OpenAI-compatible API, with a chat page and a blind arena",
        description="Serves each MODEL at /v1 (chat/completions, completions, models; SSE streaming), a chat "
        "page at /, a side-by-side arena at /arena, /health and /metrics (Prometheus). Concurrent requests "
        "share decode steps (continuous batching).",
    )
    add_model(p, f"a model to serve (repeatable), named NAME in the API (default: its file or model name); MODEL is "
              f"{MODEL_HELP}", action="append", metavar="[NAME=]MODEL")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a LoRA adapter directory (camelid's or peft's) to serve on the model as NAME (repeatable): "
                   "every adapter shares the one copy of the base weights and its batch, and a request's model "
                   "picks the adapter, or the base by the base's name (camelid's backend, unquantized base)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 and the arena's API "
                   "(default: the CAMELID_API_KEY environment variable; none when unset)")
    add_device(p)
    add_template(p, instead_of="each model's own")
    p.add_argument("--max-batch", type=int, default=8,
                   help="sequences decoded together per model; more waits in line (default 8; with --backend "
                   "llamacpp requests are answered one at a time and this only bounds a request's n)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a batch row per model before the server answers 503 (default 64)")
    p.add_argument("--context", type=int,
                   help="tokens of context per sequence, prompt and answer together (default: the model's own, at most "
                   "4096; the cache for every row is allocated up front)")
    p.add_argument("--prefill-chunk", type=int, metavar="TOKENS",
                   help="prompt tokens prefilled per decode step while other requests decode, so that a long prompt "
                   "does not stall their streams (default 16; 0: each prompt whole before the next step)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="prefill every prompt whole, instead of reusing what a batch row holds of an earlier request "
                   "with the same beginning (a system prompt, a chat's earlier turns); answers are the same either way")
    p.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="the largest max_tokens a request may ask for (default 4096)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="the largest request body accepted; larger is refused with 413 (default 1048576)")
    p.add_argument("--votes", default="arena-votes.jsonl",
                   help="the JSONL file arena votes are appended to (default arena-votes.jsonl)")
    add_backend(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> None:
    from camelid.serve.protocol import ServerLimits
    from camelid.serve.server import serve

    for flag, least in LEAST.items():
        if getattr(args, flag) is not None and getattr(args, flag) < least:
            raise CamelidError(f"--{flag.replace('_', '-')} must be at least {least}, not {getattr(args, flag)}")
    limits = ServerLimits(max_tokens=args.max_tokens_limit, max_body_bytes=args.max_body_bytes)
    serve(args.model or [DEFAULT_MODEL], host=args.host, port=args.port, api_key=args.api_key, limits=limits,
          votes=args.votes, max_batch=args.max_batch, max_queue=args.max_queue, context=args.context,
          template=args.template, prefill_chunk=args.prefill_chunk, prefix_cache=args.prefix_cache,
          adapters=args.adapter, log=lambda m: print(m, file=sys.stderr), **backend_options(args))
