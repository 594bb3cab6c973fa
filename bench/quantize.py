"""Time of one linear layer per storage kind, for every layer shape of a model: how camelid.quantize's plan
was chosen.

For each shape (q/k/v stacked, o, gate/up stacked, down, the output head) and each number of rows (1: batch-1
decode; 8: batch-8 decode; 128: a prefill chunk) it prints microseconds per product and the ratio to float32.

    python bench/quantize.py [--preset smollm2-135m] [--threads 2] [--rows 1 8 128]
"""

import argparse
import time

import torch
import torch.nn.functional as F

from camelid.config import preset
from camelid.quantize import HalfWeightLinear, Int8Linear


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    c = preset(args.preset)
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    shapes = {
        "q/k/v": (qkv, c.hidden_size),
        "o": (c.hidden_size, c.num_attention_heads * c.head_dim),
        "gate/up": (2 * c.intermediate_size, c.hidden_size),
        "down": (c.hidden_size, c.intermediate_size),
        "head": (c.vocab_size, c.hidden_size),
    }
    kinds = {"f16": HalfWeightLinear, "int8": Int8Linear}
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


if __name__ == "__main__":
    main()
