"""GPU smoke check: logits against transformers on CUDA, LoRA and full training steps in bf16, generation speed.

For the few minutes a GPU machine is lent. The models are random (no weights can travel there) but shaped as
SmolLM2-135M and TinyLlama-1.1B, with SmolLM2's real tokenizer and chat template from TOKENIZER_DIR, which
`--save-tokenizer DIR` writes here beforehand. Prints one line per measurement; asserts nothing but the
logits comparison.

    python bench/gpu_smoke.py --save-tokenizer gpu/tok         # on this machine
    PYTHONPATH=src python3 bench/gpu_smoke.py --tokenizer gpu/tok   # on the GPU machine
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def save_tokenizer(out: Path) -> None:
    from camelid.checkpoint import load_model

    loaded = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    loaded.tokenizer.save(out, chat_template=loaded.chat_template)
    print(f"wrote {out}")


def random_model_dir(preset: str, tokenizer_dir: Path, out: Path) -> Path:
    """A random model of a preset's shape (std 0.02, as transformers initialises) with SmolLM2's tokenizer."""
    from dataclasses import replace

    from camelid.checkpoint import write_model_files
    from camelid.config import preset as get_preset
    from camelid.model import Llama
    from camelid.tokenizer import load_tokenizer
    from camelid.chat_template import read_chat_template

    config = replace(get_preset(preset), vocab_size=49152, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Llama(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.02)
    write_model_files(config, model.state_dict(), out, tokenizer=load_tokenizer(tokenizer_dir),
                      chat_template=read_chat_template(tokenizer_dir))
    return out


def check_logits(model_dir: Path) -> None:
    import transformers

    from camelid.checkpoint import load_model

    ours = load_model(model_dir, device="cuda", dtype="float32").model
    theirs = transformers.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).cuda().eval()
    tokens = torch.randint(0, 49152, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        a, b = ours(tokens), theirs(tokens).logits
    diff = (a - b).abs().max().item()
    print(f"logits vs transformers {transformers.__version__} on CUDA, float32: max |diff| {diff:.2e}")
    assert diff < 1e-3, diff


def train_run(model_dir: Path, data: Path, work: Path, method: str, steps: int, batch: int, seq_len: int) -> None:
    from camelid.train.loop import train
    from camelid.train.recipe import build_config

    cfg = build_config(dict(
        model=str(model_dir), data=[str(data)], out=str(work / f"run-{model_dir.name}-{method}"), method=method,
        seq_len=seq_len, batch_size=batch, micro_batch_size=batch, max_steps=steps, lr=1e-4, seed=0,
    ))
    torch.cuda.reset_peak_memory_stats()
    result = train(cfg, progress=False, log=lambda m: None)
    peak = torch.cuda.max_memory_allocated() / 2**30
    records = [json.loads(line) for line in (result.run / "metrics.jsonl").read_text().splitlines()]
    steady = [r["tokens_per_second"] for r in records[2:]] or [records[-1]["tokens_per_second"]]
    print(f"{model_dir.name} {method} bf16 train: {sorted(steady)[len(steady) // 2]:,.0f} tok/s (median step), "
          f"peak {peak:.2f} GiB, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}, {steps} steps x "
          f"{batch} x {seq_len}")
    return result.model_dir


def generation(model_dir: Path, batch: int, new_tokens: int = 128) -> None:
    from camelid.chat import chat_template_for, encode_chat
    from camelid.checkpoint import load_model
    from camelid.generate import SamplingParams, generate

    loaded = load_model(model_dir, device="cuda", dtype="bfloat16")
    template = chat_template_for(loaded)
    prompt = encode_chat(loaded, template, [{"role": "user", "content": "Tell me about llamas and alpacas."}])
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    generate(loaded.model, loaded.tokenizer, [prompt], SamplingParams(max_new_tokens=8, temperature=0.0))
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(loaded.model, loaded.tokenizer, [prompt] * batch, params)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in out)
    print(f"{model_dir.name} bf16 generate: batch {batch}, {new_tokens} new tokens: {tokens / seconds:,.0f} tok/s "
          f"({seconds:.2f} s)")


def attempt(what: str, fn, *args, **kw):
    """Run one check; report a failure and go on (this is a smoke check: one run should say everything)."""
    try:
        return fn(*args, **kw)
    except Exception as exc:
        print(f"{what}: FAILED {type(exc).__name__}: {exc}")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save-tokenizer", type=Path, help="write SmolLM2's tokenizer and template here and stop")
    parser.add_argument("--tokenizer", type=Path, default=Path("gpu/tok"), help="a directory written by --save-tokenizer")
    parser.add_argument("--presets", default="smollm2-135m,tinyllama-1.1b", help="model shapes to try")
    parser.add_argument("--steps", type=int, default=12, help="training steps per run")
    args = parser.parse_args()
    if args.save_tokenizer:
        save_tokenizer(args.save_tokenizer)
        return
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    from camelid.data.identity import identity_conversations

    work = Path(tempfile.mkdtemp())
    data = work / "identity.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in identity_conversations() * 4))
    for name in args.presets.split(","):
        model_dir = random_model_dir(name, args.tokenizer, work / name)
        if name == "smollm2-135m":
            attempt(f"{name} logits", check_logits, model_dir)
        for method in ("lora", "full"):
            trained = attempt(f"{name} {method} training", train_run, model_dir, data, work, method, args.steps,
                              batch=8, seq_len=512)
            if method == "lora" and trained is not None:
                for batch in (1, 16):
                    attempt(f"{name} generation", generation, trained, batch)
        torch.cuda.empty_cache()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
