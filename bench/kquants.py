"""K-quant export time: camelid's `export gguf --type q4_k_m` (and the other mixes) against llama.cpp's own
llama-quantize of the same f32 GGUF, in one run, with the bytes compared tensor by tensor.

    python bench/kquants.py                                  # SmolLM2-135M-Instruct, q4_k_m
    python bench/kquants.py --shape tinyllama-1.1b --mixes q4_k_m,q6_k   # random weights of TinyLlama's shape

camelid's time is the whole export (the tensors' K-quant blocks in numpy, and the file written); llama.cpp's is
llama_model_quantize from the f32 file, with as many threads as --threads.
"""

import argparse
import ctypes
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

FTYPES = {"q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def cpu() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")),
                platform.processor())
    isa = "AVX-512" if " avx512f " in flags else "AVX2" if " avx2 " in flags else "no AVX2"
    return f"{name} ({isa})"


def model(args):
    from camelid.checkpoint import LoadedModel, load_model
    from camelid.config import preset
    from camelid.model import Llama

    if args.shape is None:
        return load_model(args.model, device="cpu", dtype="float32")
    base = load_model(args.model, device="cpu", dtype="float32")  # for its tokenizer
    config = preset(args.shape)
    config.vocab_size = base.config.vocab_size
    torch.manual_seed(0)
    with torch.device("meta"):
        skeleton = Llama(config)
    state = {name: torch.randn(p.shape) * (1.0 if "norm" in name else 0.02) for name, p in skeleton.state_dict().items()}
    from camelid.checkpoint import build_model

    return LoadedModel(build_model(config, state), base.tokenizer, base.chat_template, Path(args.shape))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="the model to export (a name, GGUF file or HF directory; default SmolLM2-135M-Instruct)")
    parser.add_argument("--shape", help="a preset shape (e.g. tinyllama-1.1b) with random weights, instead of "
                        "--model's weights (its tokenizer is kept)")
    parser.add_argument("--mixes", default="q4_k_m", help="comma-separated K-quant mixes (default q4_k_m; "
                        f"choose from {', '.join(FTYPES)})")
    parser.add_argument("--threads", type=int, default=2, help="threads for llama-quantize and torch (default 2)")
    args = parser.parse_args()
    import llama_cpp

    from camelid.export import export_gguf
    from camelid.gguf_file import GGUFFile

    torch.set_num_threads(args.threads)
    loaded = model(args)
    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"{args.shape or args.model}: {params / 1e6:.0f}M parameters; CPU {cpu()}, {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f32 = export_gguf(loaded, tmp / "f32.gguf", type="f32", progress=False)
        print("| mix | camelid export s | llama-quantize s | ratio | tensors identical |")
        print("|---|---:|---:|---:|---|")
        for mix in args.mixes.split(","):
            start = time.perf_counter()
            ours = export_gguf(loaded, tmp / f"{mix}.gguf", type=mix, progress=False)
            camelid_s = time.perf_counter() - start
            qparams = llama_cpp.llama_model_quantize_default_params()
            qparams.ftype, qparams.nthread = FTYPES[mix], args.threads
            start = time.perf_counter()
            assert llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp / "l.gguf").encode(),
                                                  ctypes.byref(qparams)) == 0
            llama_s = time.perf_counter() - start
            a, b = GGUFFile(ours), GGUFFile(tmp / "l.gguf")
            same = sum(a.tensors[n].ggml_type == i.ggml_type and np.array_equal(a.raw(n), b.raw(n))
                       for n, i in b.tensors.items())
            print(f"| {mix} | {camelid_s:.1f} | {llama_s:.1f} | {camelid_s / llama_s:.1f}x | {same} of {len(b.tensors)} |")
            (tmp / f"{mix}.gguf").unlink()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
