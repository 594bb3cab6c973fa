"""Models of real shapes with random weights, written as GGUF files, so that the benchmarks' figures at 1.1B, 3B
and 7B exist without downloading a model.

    python bench/shapes.py tinyllama-1.1b /tmp/tinyllama-q8_0.gguf --type q8_0
    python bench/peers.py --model /tmp/tinyllama-q8_0.gguf           # camelid against llama.cpp on that file

The shape is one of camelid's presets (`tinyllama-1.1b`, `llama-2-7b`, `llama-3-8b`, ... : camelid.config
PRESETS); the vocabulary is SmolLM2's 49,152 tokens (the tokenizer written with the file), so TinyLlama's shape
has 1.17B parameters. The weights are N(0, 0.02) (norms 1), drawn in bfloat16 so that a 7B shape fits in memory
while it is written (13.5 GB); each tensor is widened to float32 only as it is quantized. Decoding such a model
gives meaningless text at the speed and memory of a real one.
"""

import argparse
import time
from pathlib import Path

import torch

from camelid.checkpoint import LoadedModel, build_model, load_tokenizer_and_template
from camelid.config import PRESETS, preset
from camelid.export import export_gguf
from camelid.model import Llama
from camelid.named_models import DEFAULT_MODEL


def random_model(shape: str, seed: int = 0) -> LoadedModel:
    """`shape`'s preset with SmolLM2's tokenizer and random bfloat16 weights."""
    tokenizer, template = load_tokenizer_and_template(DEFAULT_MODEL)
    config = preset(shape)
    config.vocab_size = tokenizer.vocab_size
    config.bos_token_id, config.eos_token_id = tokenizer.bos_id, tokenizer.eos_id
    with torch.device("meta"):
        skeleton = Llama(config)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in skeleton.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if "norm" in name:
            state[name] = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            state[name] = (torch.randn(p.shape, generator=generator) * 0.02).to(torch.bfloat16)
    model = build_model(config, state, dtype=torch.bfloat16)
    return LoadedModel(model, tokenizer, template.source, Path(shape))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=list(PRESETS), help="the preset shape")
    parser.add_argument("out", type=Path, help="the GGUF file to write")
    parser.add_argument("--type", default="q8_0", help="the GGUF type, as `camelid export gguf --type` (default q8_0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args()
    start = time.perf_counter()
    loaded = random_model(args.shape, args.seed)
    params = sum(p.numel() for p in loaded.model.parameters())
    export_gguf(loaded, args.out, type=args.type, name=f"random {args.shape}", overwrite=args.force)
    print(f"wrote {args.out}: {args.shape} shape, {params / 1e9:.2f}B parameters, {args.type}, "
          f"{args.out.stat().st_size / 1e9:.2f} GB, in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
