"""`camelid serve`: load the models, start one engine each, and run the app under uvicorn."""

import os
import time
from pathlib import Path

from camelid.errors import CamelidError
from camelid.serve.api import ServedModel, ServerLimits, create_app
from camelid.serve.engine import Engine

API_KEY_ENV = "CAMELID_API_KEY"
DEFAULT_CONTEXT = 4096
BACKENDS = ("camelid", "llamacpp")


def parse_model_specs(specs: list[str]) -> list[tuple[str, str]]:
    """`NAME=MODEL` or `MODEL` (named after the model) into (name, model) pairs; names must differ."""
    pairs = []
    for spec in specs:
        name, sep, model = spec.partition("=")
        if not sep:
            model = spec
            path = Path(spec)
            name = path.stem if path.suffix == ".gguf" else (path.name or spec)
        if not name or not model:
            raise CamelidError(f"bad --model {spec!r}: give MODEL or NAME=MODEL")
        pairs.append((name, model))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise CamelidError(f"two models are served as {max(names, key=names.count)!r}; name them with NAME=MODEL")
    return pairs


def load_served_models(specs: list[str], *, device: str = "cpu", dtype: str = "float32", quantize: str = "none",
                       max_batch: int = 8, max_queue: int = 64, context: int | None = None,
                       template: str | None = None, backend: str = "camelid",
                       threads: int | None = None) -> list[ServedModel]:
    """`backend="llamacpp"` runs GGUF files on llama.cpp with `threads` (device, dtype and quantize are camelid's)."""
    from camelid.chat import chat_template_for
    from camelid.checkpoint import load_model

    if backend not in BACKENDS:
        raise CamelidError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    served = []
    for name, spec in parse_model_specs(specs):
        if backend == "llamacpp":
            from camelid.llamacpp import load_llamacpp
            from camelid.serve.llamacpp_engine import LlamaCppEngine

            loaded = load_llamacpp(spec, n_ctx=context, threads=threads)
            engine = LlamaCppEngine(loaded, max_batch=max_batch, max_queue=max_queue)
        else:
            loaded = load_model(spec, device=device, dtype=dtype, quantize=quantize)
            # The cache is allocated whole, rows x context: a default of 4K tokens keeps SmolLM2's 8 rows at 1.5 GB.
            length = context or min(loaded.config.max_sequence_length, DEFAULT_CONTEXT)
            engine = Engine(loaded, max_batch=max_batch, max_queue=max_queue, max_len=length)
        try:
            chat_template = chat_template_for(loaded, template)
        except CamelidError:
            chat_template = None  # completions only
        served.append(ServedModel(name, loaded, engine, chat_template, int(time.time())))
    return served


def serve(specs: list[str], *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: ServerLimits | None = None, votes: str | Path | None = None, log=print, **load) -> None:
    import uvicorn

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    models = load_served_models(specs, **load)
    app = create_app(models, api_key=api_key, limits=limits, votes=votes)
    where = f"http://{host}:{port}"
    log(f"serving {', '.join(m.name for m in models)} at {where} (chat page {where}/, arena {where}/arena, "
        f"API {where}/v1){'; API key required' if api_key else ''}")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        for m in models:
            m.engine.close()
