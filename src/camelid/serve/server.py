"""`camelid serve`: load the models, start one engine each, and run the app under uvicorn."""

import os
import time
from dataclasses import replace
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


def parse_adapter_specs(specs: list[str], model_names: list[str]) -> list[tuple[str, str]]:
    """`NAME=PATH` into (name, path) pairs; names must differ from each other and from the models'."""
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise CamelidError(f"bad --adapter {spec!r}: give NAME=PATH (the name requests use as their model)")
        if name in model_names or name in (n for n, _ in pairs):
            raise CamelidError(f"two models are served as {name!r}; give the adapter another NAME")
        pairs.append((name, path))
    return pairs


def load_served_models(specs: list[str], *, backend: str = "camelid", device: str | None = None,
                       dtype: str | None = None, quantize: str = "none", threads: int | None = None,
                       context: int | None = None, max_batch: int = 8, max_queue: int = 64,
                       template: str | None = None, prefill_chunk: int | None = None,
                       prefix_cache: bool = True, adapters: list[str] = ()) -> list[ServedModel]:
    """Load each model of `specs` (MODEL or NAME=MODEL) on `backend` and start an engine for it.

    `backend`, `device`, `dtype`, `quantize`, `threads` and `context` (tokens per sequence) are those of
    camelid.backend.load_backend; `template` names a built-in chat template for every model instead of its own.
    `prefill_chunk` (None: the engine's default) and `prefix_cache` are camelid.engine.BatchingEngine's.
    `adapters` (NAME=PATH, LoRA adapter directories) are served on the one model of `specs`, sharing its weights
    and engine (see add_adapters).
    """
    from camelid.backend import check_backend, load_backend, set_threads

    pairs = parse_model_specs(specs)
    adapter_pairs = parse_adapter_specs(list(adapters), [n for n, _ in pairs])
    check_adapter_options(adapter_pairs, backend=backend, quantize=quantize, models=len(pairs))
    check_backend(backend, device=device, dtype=dtype, quantize=quantize, threads=threads)
    check_engine_options(backend, prefill_chunk=prefill_chunk, prefix_cache=prefix_cache)
    threads = set_threads(backend, threads)  # once: llama.cpp's default is torch's count before torch gets one
    served = []
    try:
        for name, spec in pairs:
            model = load_backend(spec, backend=backend, device=device, dtype=dtype, quantize=quantize,
                                 threads=threads, n_ctx=context)
            loaded = [(name, model.loaded)] + add_adapters(model.loaded, adapter_pairs)  # before the engine runs
            engine = start_engine(model, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                                  prefix_cache=prefix_cache)
            now = int(time.time())
            served += [ServedModel(n, lm, engine, _chat_template(lm, template), now, adapter=index)
                       for index, (n, lm) in enumerate(loaded)]
    except BaseException:  # a later model failed to load: stop the engines already started
        for m in served:
            m.engine.close()
        raise
    return served


def _chat_template(loaded, template: str | None):
    """The template a model chats with, or None (completions only) when it has none."""
    from camelid.chat import chat_template_for

    try:
        return chat_template_for(loaded, template)
    except CamelidError:
        return None


def check_adapter_options(adapters: list, *, backend: str, quantize: str, models: int) -> None:
    """Refuse --adapter where it cannot work, before any model loads."""
    if not adapters:
        return
    if backend == "llamacpp":
        raise CamelidError("--adapter is for camelid's backend; leave out --backend llamacpp (or serve an adapter "
                           "merged into its base alone: -m PATH)")
    if quantize != "none":
        raise CamelidError(f"--adapter needs a float base, not --quantize {quantize}; leave out --quantize (or "
                           f"serve an adapter merged into its base alone: -m PATH --quantize {quantize})")
    if models != 1:
        raise CamelidError(f"--adapter serves adapters on one base model, but {models} models are given; give one -m")


def add_adapters(base, adapters: list[tuple[str, str]]) -> list:
    """Add each (name, adapter directory) to the base's model (camelid.adapters: its weights are shared), as
    adapter 1, 2, ...; return (name, LoadedModel) for each: the base's model and tokenizer, the adapter's own chat
    template where it carries one. An adapter that does not fit the base is a one-line refusal naming it."""
    from camelid.adapters import add_adapter
    from camelid.chat_template import read_chat_template
    from camelid.tokenizer import load_tokenizer

    out = []
    for index, (name, path) in enumerate(adapters, start=1):
        path = Path(path)
        try:
            add_adapter(base.model, path, index)
        except CamelidError as exc:
            raise CamelidError(f"--adapter {name}: {exc}") from None
        if (path / "tokenizer.json").is_file() and \
                load_tokenizer(path).backend.get_vocab() != base.tokenizer.backend.get_vocab():
            raise CamelidError(f"--adapter {name}: {path} carries a vocabulary other than the served base's; serve "
                               f"it on its own base (-m {path})")
        out.append((name, replace(base, chat_template=read_chat_template(path) or base.chat_template, source=path)))
    return out


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
    max_batch, max_queue, template, prefill_chunk, prefix_cache, adapters). `log` gets the lines a person reads
    (the address, warnings).
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
        for engine in {id(m.engine): m.engine for m in models}.values():  # adapters share their base's
            engine.close()
