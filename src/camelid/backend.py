"""Which backend runs a model: camelid's own PyTorch model, or a GGUF file on llama.cpp.

`camelid chat`, `generate` and `serve` load through `load_backend`, so the choice is made in one place: the
options of camelid's own backend that llama.cpp has no use for are refused there rather than ignored, and the
thread counts are settled there. Importing this module loads no torch; loading a model does.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from camelid.errors import CamelidError

BACKENDS = ("camelid", "llamacpp")
# The serving engine allocates its cache whole, rows x context: a default of 4K tokens keeps SmolLM2's 8 rows at
# 1.5 GB (llama.cpp caps its own context the same way).
DEFAULT_CONTEXT = 4096

# What llama.cpp settles for itself, so the options of camelid's own backend it refuses, and why.
_NOT_FOR_LLAMACPP = {
    "device": "llama.cpp runs where llama-cpp-python was built to run",
    "dtype": "llama.cpp computes in the GGUF file's own types",
    "quantize": "llama.cpp runs the GGUF file's own quantization; pick a quantized GGUF file instead",
}


@dataclass
class Backend:
    """A loaded model on its backend; `stream(model, tokenizer, prompt, params)` decodes it."""

    name: str  # one of BACKENDS: camelid.serve.server starts the engine that goes with it
    loaded: Any  # a camelid.checkpoint.LoadedModel, or a camelid.llamacpp.LlamaCppModel standing where one does
    stream: Callable
    context: int  # tokens of context per sequence when served


def check_backend(backend: str, *, device: str | None = None, dtype: str | None = None, quantize: str | None = None,
                  threads: int | None = None) -> None:
    """Refuse an unknown backend, a thread count below one, and options that `backend` does not take."""
    if backend not in BACKENDS:
        raise CamelidError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if threads is not None and threads < 1:
        raise CamelidError(f"--threads must be at least 1, not {threads}")
    if backend != "llamacpp":
        return
    given = {"device": device, "dtype": dtype, "quantize": quantize}
    for option, reason in _NOT_FOR_LLAMACPP.items():
        if given[option] not in (None, "none"):
            raise CamelidError(f"--{option} does not apply to --backend llamacpp ({reason}); leave it out")


def set_threads(backend: str, threads: int | None) -> int | None:
    """Apply `threads` and return the count the backend computes on.

    On camelid's backend it is torch's thread count (None keeps torch's own: one per core). On llama.cpp it is
    llama.cpp's (default: torch's), and torch, which only samples there, gets one thread: more would only wait for
    the cores llama.cpp's threads are using. Calling it again with the returned count changes nothing.
    """
    import torch

    if backend == "camelid":
        if threads:
            torch.set_num_threads(threads)
        return threads
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def load_backend(spec: str, *, backend: str = "camelid", device: str | None = None, dtype: str | None = None,
                 quantize: str = "none", threads: int | None = None, n_ctx: int | None = None) -> Backend:
    """Load model `spec` (a name, a GGUF file, an HF or LoRA adapter directory) on `backend`.

    `device`, `dtype` and `quantize` are camelid's own backend's (see camelid.checkpoint.load_model); llama.cpp
    refuses them. `threads`: see `set_threads`. `n_ctx`: tokens of context per sequence, prompt and answer
    together (default: the model's own, at most DEFAULT_CONTEXT): llama.cpp's context, and the length of the
    serving engine's cache on camelid's backend.
    """
    check_backend(backend, device=device, dtype=dtype, quantize=quantize, threads=threads)
    threads = set_threads(backend, threads)
    if backend == "llamacpp":
        from camelid.llamacpp import load_llamacpp, stream

        loaded = load_llamacpp(spec, n_ctx=n_ctx, threads=threads)
        return Backend(backend, loaded, stream, loaded.config.max_sequence_length)
    from camelid.checkpoint import load_model
    from camelid.generate import stream

    loaded = load_model(spec, device=device, dtype=dtype, quantize=quantize)
    return Backend(backend, loaded, stream, n_ctx or min(loaded.config.max_sequence_length, DEFAULT_CONTEXT))
