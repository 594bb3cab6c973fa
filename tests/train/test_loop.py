"""The training loop end to end on a tiny random model with SmolLM2's real tokenizer and chat template:
what a run writes, that its models load in camelid and transformers, gradient accumulation, kill-and-resume
equal to an uninterrupted run, 2 processes equal to 1, and one-line refusals of bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_CHAT

from camelid.checkpoint import load_model
from camelid.errors import CamelidError
from camelid.data.identity import identity_conversations
from camelid.train.loop import train
from camelid.train.recipe import build_config


@pytest.fixture(scope="module")
def base_dir(tiny_chat_dir) -> Path:
    return tiny_chat_dir


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "identity.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in identity_conversations()))
    return path


def config(base_dir, data_file, out, **kw):
    values = dict(model=str(base_dir), data=[str(data_file)], out=str(out), seq_len=256, batch_size=4,
                  micro_batch_size=2, max_steps=6, lr=1e-3, warmup_ratio=0.0, seed=3)
    values.update(kw)
    return build_config({k: v for k, v in values.items()})


def run_quietly(cfg, **kw):
    kw.setdefault("log", lambda message: None)
    return train(cfg, progress=False, **kw)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lora_run_writes_everything_and_its_adapter_loads(base_dir, data_file, tmp_path):
    from PIL import Image

    cfg = config(base_dir, data_file, tmp_path / "run", eval_fraction=0.1, eval_every=2, save_every=2,
                 keep_checkpoints=2, max_steps=30, lr=1e-2, lora_targets=["q_proj", "v_proj", "gate_proj", "down_proj"])
    result = run_quietly(cfg)
    run = result.run
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000028", "step-000030"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all(r["supervised_tokens"] > 0 and r["lr"] > 0 for r in records)
    assert sum("eval_loss" in r for r in records) == 15
    # A random 2-layer model learns slowly through rank-8 adapters, but it must learn.
    assert result.losses[-1] < result.losses[0] - 0.1, "the loss did not go down"
    assert Image.open(run / "loss.png").size[0] > 300
    assert json.loads((run / "config.json").read_text())["lr"] == 1e-2

    # The adapter directory is a model: the base with the adapter merged, and only adapter weights on disk.
    from safetensors.torch import load_file

    saved = load_file(result.model_dir / "adapter_model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)
    tuned = load_model(result.model_dir, device="cpu", dtype="float32")
    base = load_model(base_dir, device="cpu", dtype="float32")
    tokens = torch.tensor([tuned.tokenizer.encode("<|im_start|>user\nWho are you?<|im_end|>\n")])
    with torch.no_grad():
        assert not torch.allclose(tuned.model(tokens), base.model(tokens), atol=1e-3)
    assert tuned.chat_template == base.chat_template


def test_full_fine_tune_writes_a_model_transformers_loads(base_dir, data_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    result = run_quietly(config(base_dir, data_file, tmp_path / "run", method="full", max_steps=3))
    ours = load_model(result.model_dir, device="cpu", dtype="float32").model
    theirs = transformers.LlamaForCausalLM.from_pretrained(result.model_dir).eval()
    tokens = torch.randint(0, TINY_CHAT.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, atol=1e-4, rtol=1e-4)


def test_gradient_accumulation_equals_one_big_micro_batch(base_dir, data_file, tmp_path):
    one = run_quietly(config(base_dir, data_file, tmp_path / "a", micro_batch_size=4, lora_dropout=0.0))
    four = run_quietly(config(base_dir, data_file, tmp_path / "b", micro_batch_size=1, lora_dropout=0.0))
    assert one.losses == pytest.approx(four.losses, rel=1e-5)


def test_unpacked_rows_train_on_the_same_tokens(base_dir, data_file, tmp_path):
    packed = run_quietly(config(base_dir, data_file, tmp_path / "a", max_steps=1))
    padded = run_quietly(config(base_dir, data_file, tmp_path / "b", max_steps=1, packing=False))
    # Different rows, same model: both first-step losses are the untrained model's loss on real examples.
    assert padded.losses[0] == pytest.approx(packed.losses[0], rel=0.05)


def _cli(*args, env=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return [sys.executable, "-m", "camelid", *args], env


def _keys(base_dir, data_file, out, **kw):
    values = dict(model=base_dir, data=data_file, out=out, seq_len=256, batch_size=4, micro_batch_size=2,
                  max_steps=40, lr=1e-3, save_every=3, seed=3)
    values.update(kw)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_losses(base_dir, data_file, tmp_path):
    """SIGKILL mid-run, --resume: model, optimizer, schedule, random state (dropout) and data position return."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    cmd, env = _cli("train", *_keys(base_dir, data_file, whole), "--no-progress")
    subprocess.run(cmd, env=env, check=True, capture_output=True)

    cmd, env = _cli("train", *_keys(base_dir, data_file, killed), "--no-progress")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-000006").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(losses(killed)) < 40

    cmd, env = _cli("train", *_keys(base_dir, data_file, killed), "--no-progress", "--resume")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    assert losses(killed) == pytest.approx(losses(whole), rel=1e-6, abs=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("method, parallel", [("lora", "ddp"), ("full", "fsdp"), ("lora", "fsdp")])
def test_two_processes_equal_one(base_dir, data_file, tmp_path, method, parallel):
    """torchrun with 2 gloo processes on CPU computes the same losses and weights as 1 process."""
    from safetensors.torch import load_file

    keys = dict(method=method, parallel=parallel, lora_dropout=0.0, micro_batch_size=1, max_steps=4, save_every=0)
    cmd, env = _cli("train", *_keys(base_dir, data_file, tmp_path / "one", **keys), "--no-progress")
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "camelid"]
    two = subprocess.run(torchrun + cmd[3:-1] + ["out=" + str(tmp_path / "two"), "--no-progress"],
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 process(es)" in two.stderr
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_file(tmp_path / "one" / "model" / name), load_file(tmp_path / "two" / "model" / name)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


TEARDOWN = """
import json, os, sys
import torch.distributed as dist
from camelid.errors import CamelidError
from camelid.train.loop import train
from camelid.train.recipe import build_config

if sys.argv[2] == "caller's":
    dist.init_process_group("gloo")
try:
    train(build_config(json.loads(sys.argv[1])), progress=False, log=lambda message: None)
    outcome = "returned"
except CamelidError:
    outcome = "raised"
# one file per process: two processes printing to one pipe may interleave their words
with open(f"{sys.argv[3]}.{os.environ['RANK']}", "w") as out:
    out.write(f"{outcome} {'group running' if dist.is_initialized() else 'no group'}")
"""


@pytest.mark.slow
@pytest.mark.parametrize("keys, group, expected", [
    (dict(max_steps=1), "train's", "returned no group"),
    (dict(batch_size=6), "train's", "raised no group"),  # 6 rows do not split into 2 processes x 2
    (dict(max_steps=1), "caller's", "returned group running"),
])
def test_train_destroys_the_process_group_it_started(base_dir, data_file, tmp_path, keys, group, expected):
    """Under torchrun, train ends the process group it began, returning or raising; a caller's group stays."""
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN)
    values = dict(model=str(base_dir), data=[str(data_file)], out=str(tmp_path / "run"), seq_len=256, batch_size=4,
                  micro_batch_size=2)
    _, env = _cli()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    outcome = tmp_path / "outcome"
    done = subprocess.run(torchrun + [str(script), json.dumps({**values, **keys}), group, str(outcome)], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [Path(f"{outcome}.{rank}").read_text() for rank in (0, 1)] == [expected, expected]


# -- refusals ------------------------------------------------------------------------------------------------


def test_a_directory_holding_another_run_is_refused_and_left_alone(base_dir, data_file, tmp_path):
    run_quietly(config(base_dir, data_file, tmp_path / "run", max_steps=1))
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    with pytest.raises(CamelidError, match=r"holds a different run \(it differs in: lr\)"):
        run_quietly(config(base_dir, data_file, tmp_path / "run", max_steps=1, lr=5e-4))
    with pytest.raises(CamelidError, match="already holds this run; pass --resume"):
        run_quietly(config(base_dir, data_file, tmp_path / "run", max_steps=1))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CamelidError, match="not a camelid run"):
        run_quietly(config(base_dir, data_file, tmp_path / "other", max_steps=1))


def test_malformed_rows_stop_with_file_and_line_unless_skipped(base_dir, data_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = data_file.read_text().splitlines()
    lines.insert(5, json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}))
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(CamelidError, match=rf"{bad}:6: unknown role 'robot'.*set skip_bad=true to drop"):
        run_quietly(config(base_dir, bad, tmp_path / "run", max_steps=1))
    assert not (tmp_path / "run").exists()
    messages = []
    run_quietly(config(base_dir, bad, tmp_path / "run2", max_steps=1, skip_bad=True), log=messages.append)
    assert any(f"{bad}: " in m and "; skipped 1 of " in m and ": 1 unknown role" in m for m in messages), messages


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(template="vicuna"), r"unknown template 'vicuna'; choose one of alpaca, vicuna_v1.1"),
        (dict(method="qlora"), "method must be one of lora, full"),
        (dict(lora_targets=["q_proj", "wq"]), "unknown LoRA target 'wq'"),
        (dict(batch_size=6), "batch_size 6 is not a multiple of micro_batch_size 4"),
        (dict(batch_size=400, micro_batch_size=4), "fewer than one batch"),
    ],
)
def test_bad_settings_are_one_line(base_dir, data_file, tmp_path, change, match):
    values = dict(micro_batch_size=4, batch_size=4)
    values.update(change)
    with pytest.raises(CamelidError, match=match) as info:
        run_quietly(config(base_dir, data_file, tmp_path / "run", **values))
    assert "\n" not in str(info.value)


def test_missing_base_model_is_one_line_through_the_cli(data_file, tmp_path, capsys):
    from camelid.cli import main

    code = main(["train", f"model={tmp_path / 'nope'}", f"data={data_file}", f"out={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "no such file or directory" in err
    assert not (tmp_path / "run").exists()


def test_gradient_checkpointing_recomputes_exactly(base_dir, data_file, tmp_path):
    """Recomputing each block in backward (dropout replayed from the saved random state) changes nothing."""
    plain = run_quietly(config(base_dir, data_file, tmp_path / "a", max_steps=3, lora_dropout=0.1))
    again = run_quietly(config(base_dir, data_file, tmp_path / "b", max_steps=3, lora_dropout=0.1,
                               gradient_checkpointing=True))
    assert again.losses == pytest.approx(plain.losses, rel=1e-6)
