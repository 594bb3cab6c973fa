"""`camelid serve`: load the models, start one engine each, and run the app under uvicorn."""

import os
import time
from pathlib import Path

from camelid.backend import Backend
from camelid.errors import CamelidError
from camelid.serve.api import ServedModel, ServerLimits, create_app

API_KEY_ENV = "CAMELID_API_KEY"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")  # addresses only this machine reaches: no key needed


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


def load_served_models(specs: list[str], *, backend: str = "camelid", device: str | None = None,
                       dtype: str | None = None, quantize: str = "none", threads: int | None = None,
                       context: int | None = None, max_batch: int = 8, max_queue: int = 64,
                       template: str | None = None, prefill_chunk: int | None = None,
                       prefix_cache: bool = True) -> list[ServedModel]:
    """Load each model of `specs` (MODEL or NAME=MODEL) on `backend` and start an engine for it.

    `backend`, `device`, `dtype`, `quantize`, `threads` and `context` (tokens per sequence) are those of
    camelid.backend.load_backend; `template` names a built-in chat template for every model instead of its own.
    `prefill_chunk` (None: the engine's default) and `prefix_cache` are camelid.engine.BatchingEngine's.
    """
    from camelid.backend import check_backend, load_backend, set_threads
    from camelid.chat import chat_template_for

    check_backend(backend, device=device, dtype=dtype, quantize=quantize, threads=threads)
    check_engine_options(backend, prefill_chunk=prefill_chunk, prefix_cache=prefix_cache)
    threads = set_threads(backend, threads)  # once: llama.cpp's default is torch's count before torch gets one
    served = []
    try:
        for name, spec in parse_model_specs(specs):
            model = load_backend(spec, backend=backend, device=device, dtype=dtype, quantize=quantize,
                                 threads=threads, n_ctx=context)
            try:
                chat_template = chat_template_for(model.loaded, template)
            except CamelidError:
                chat_template = None  # completions only
            engine = start_engine(model, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                                  prefix_cache=prefix_cache)
            served.append(ServedModel(name, model.loaded, engine, chat_template, int(time.time())))
    except BaseException:  # a later model failed to load: stop the engines already started
        for m in served:
            m.engine.close()
        raise
    return served


def check_engine_options(backend: str, *, prefill_chunk: int | None, prefix_cache: bool) -> None:
    """Refuse the batching engine's options on llama.cpp, which has no use for them (before a model loads)."""
    if backend != "llamacpp":
        return
    if prefill_chunk is not None:
        raise CamelidError("--prefill-chunk does not apply to --backend llamacpp (it answers one request at a "
                           "time, prompt first); leave it out")
    if not prefix_cache:
        raise CamelidError("--no-prefix-cache does not apply to --backend llamacpp (llama.cpp keeps the previous "
                           "prompt's cache itself); leave it out")


def start_engine(model: Backend, *, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int | None = None,
                 prefix_cache: bool = True):
    """The engine that serves a loaded model: continuous batching on camelid's backend; on llama.cpp, one request
    at a time (`max_batch` then only bounds a request's n)."""
    if model.name == "llamacpp":
        from camelid.serve.llamacpp_engine import LlamaCppEngine

        check_engine_options(model.name, prefill_chunk=prefill_chunk, prefix_cache=prefix_cache)
        return LlamaCppEngine(model.loaded, max_batch=max_batch, max_queue=max_queue)
    from camelid.engine import PREFILL_BUDGET, BatchingEngine

    return BatchingEngine(model.loaded, max_batch=max_batch, max_queue=max_queue, max_len=model.context,
                          prefill_chunk=PREFILL_BUDGET if prefill_chunk is None else prefill_chunk,
                          prefix_cache=prefix_cache)


def serve(specs: list[str], *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: ServerLimits | None = None, votes: str | Path | None = None, log=print, **load) -> None:
    """Serve `specs` (MODEL or NAME=MODEL) at http://host:port until interrupted: the OpenAI-compatible API under
    /v1, the chat page at / and the arena at /arena.

    `api_key` (default: $CAMELID_API_KEY) guards the API; `limits` bounds requests; arena votes are appended to
    `votes`; `load` holds load_served_models' options (backend, device, dtype, quantize, threads, context,
    max_batch, max_queue, template, prefill_chunk, prefix_cache). `log` gets the lines a person reads (the address,
    warnings).
    """
    import uvicorn

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if host not in LOCAL_HOSTS and not api_key:  # said before the models load, which may take minutes
        log(f"camelid: warning: serving on {host} without an API key: anyone who can reach it may use it "
            f"(set --api-key or {API_KEY_ENV})")
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
