"""K-quant export time: camelid's `export gguf --type q4_k_m` (and the other mixes) against llama.cpp's own
llama-quantize of the same f32 GGUF, in one run, with the bytes compared tensor by tensor.

    python bench/kquants.py                                  # SmolLM2-135M-Instruct, q4_k_m
    python bench/kquants.py --shape tinyllama-1.1b --mixes q4_k_m,q6_k   # random weights of TinyLlama's shape
    python bench/kquants.py --perplexity README.md            # and the perplexity of each file from llama.cpp's logits
    python bench/kquants.py --perplexity README.md --camelid none int8 int4   # and camelid's own, at each --quantize

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

FTYPES = {"q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17,
          "q6_k": 18}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


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
        loaded = load_model(args.model, device="cpu", dtype="float32")
        if args.jitter:  # a published GGUF's weights lie on its own 4-bit grid, which favours a like format
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in loaded.model.parameters():
                    if p.dim() == 2:
                        p.add_(torch.randn(p.shape, generator=g) * (args.jitter * float(p.std())))
        return loaded
    base = load_model(args.model, device="cpu", dtype="float32")  # for its tokenizer
    config = preset(args.shape)
    config.vocab_size = base.config.vocab_size
    torch.manual_seed(0)
    with torch.device("meta"):
        skeleton = Llama(config)
    state = {name: torch.randn(p.shape) * (1.0 if "norm" in name else 0.02) for name, p in skeleton.state_dict().items()}
    from camelid.checkpoint import build_model

    return LoadedModel(build_model(config, state), base.tokenizer, base.chat_template, Path(args.shape))


def perplexity(path: Path, text: str, args, kind: str | None = None) -> float:
    """The perplexity of `path` on `text` from llama.cpp's logits (or, with `kind`, from camelid's with the file
    loaded at --quantize `kind`, on the same tokens): every next token of the first --windows windows of 512
    tokens (the first window starts with BOS, the others do not)."""
    import llama_cpp

    from camelid.checkpoint import load_model

    llm = llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, n_threads=args.threads, verbose=False)
    ours = None if kind is None else load_model(path, device="cpu", quantize=kind).model
    try:
        tokens = llm.tokenize(text.encode(), add_bos=True)
        total, count = 0.0, 0
        for start in range(0, min(len(tokens) - 1, 512 * args.windows), 512):
            window = tokens[start : start + 512]
            if ours is None:
                llm.reset()
                llm.eval(window)
                logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
            else:
                with torch.inference_mode():
                    logits = ours(torch.tensor([window[:-1]]))[0].double().numpy()
            logits -= logits.max(-1, keepdims=True)
            log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            total -= log_probs[np.arange(len(window) - 1), window[1:]].sum()
            count += len(window) - 1
    finally:
        llm.close()
    return float(np.exp(total / count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="the model to export (a name, GGUF file or HF directory; default SmolLM2-135M-Instruct)")
    parser.add_argument("--shape", help="a preset shape (e.g. tinyllama-1.1b) with random weights, instead of "
                        "--model's weights (its tokenizer is kept)")
    parser.add_argument("--mixes", default="q4_k_m", help="comma-separated K-quant mixes (default q4_k_m; "
                        f"choose from {', '.join(FTYPES)})")
    parser.add_argument("--threads", type=int, default=2, help="threads for llama-quantize and torch (default 2)")
    parser.add_argument("--perplexity", metavar="TEXT", help="a text file: the perplexity of camelid's file, of "
                        "llama-quantize's and of the f32 file from llama.cpp's logits, every token of its first "
                        "windows of 512 (each from the start of its window: not llama-perplexity's method, whose "
                        "published figures score each window's second half only)")
    parser.add_argument("--windows", type=int, default=8, help="windows of 512 tokens for --perplexity (default 8)")
    parser.add_argument("--jitter", type=float, default=0.0, metavar="F",
                        help="add normal noise of F times each weight matrix's standard deviation first (a published "
                        "file's weights lie on its own 4-bit grid: SmolLM2's on Q4_1's)")
    parser.add_argument("--camelid", nargs="*", default=[], metavar="KIND",
                        help="with --perplexity: also camelid's perplexity of the f32 file loaded at each --quantize "
                        "KIND (none, f16, int8, int4), on the same tokens and windows")
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
        text = Path(args.perplexity).read_text() if args.perplexity else None
        head = "| mix | camelid export s | llama-quantize s | ratio | tensors identical |"
        if text is not None:
            f32_perplexity = perplexity(f32, text, args)
            print(f"perplexity of {args.perplexity} from llama.cpp's logits: the f32 file {f32_perplexity:.4f}")
            for kind in args.camelid:
                ppl = perplexity(f32, text, args, kind)
                print(f"from camelid's logits, the f32 file at --quantize {kind}: {ppl:.4f} "
                      f"({100 * (ppl / f32_perplexity - 1):+.2f}% from llama.cpp's f32)")
            head += " perplexity, camelid's file | perplexity, llama-quantize's |"
        print(head)
        print("|---" * head.count("|", 1) + "|")
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
            row = (f"| {mix} | {camelid_s:.1f} | {llama_s:.1f} | {camelid_s / llama_s:.1f}x | "
                   f"{same} of {len(b.tensors)} |")
            if text is not None:
                row += f" {perplexity(ours, text, args):.4f} | {perplexity(tmp / 'l.gguf', text, args):.4f} |"
            print(row)
            (tmp / f"{mix}.gguf").unlink()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
