"""`--resume` on a run that was stopped before its first checkpoint: it says there is nothing to resume from,
starts again from step 0, and keeps the metrics of the attempt before (issue 17)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from camelid.data.identity import identity_conversations
from camelid.train.loop import train
from camelid.train.recipe import build_config

SETTINGS = dict(seq_len=256, batch_size=4, micro_batch_size=2, lr=1e-3, warmup_ratio=0.0, seed=3, save_every=0)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "identity.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in identity_conversations()))
    return path


def settings(model: Path, data: Path, run: Path, **kw) -> dict:
    return {"model": str(model), "data": str(data), "out": str(run), **SETTINGS, **kw}


def run_quietly(values: dict, **kw):
    return train(build_config(values), progress=False, log=lambda message: None, **kw)


def steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def stop_before_first_checkpoint(run: Path, steps_done: int) -> str:
    """Make `run` what a kill after `steps_done` steps, before any checkpoint, leaves; returns its metrics."""
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "model")
    (run / "loss.png").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)[:steps_done]
    (run / "metrics.jsonl").write_text("".join(lines))
    return "".join(lines)


def test_resume_without_a_checkpoint_starts_over_and_keeps_the_metrics(tiny_chat_dir, data_file, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = settings(tiny_chat_dir, data_file, run, max_steps=3)
    first = run_quietly(cfg)
    earlier = stop_before_first_checkpoint(run, 2)
    capsys.readouterr()

    again = run_quietly(cfg, resume=True)
    err = capsys.readouterr().err
    assert err == (f"camelid: no checkpoint to resume from in {run / 'checkpoints'}; starting from step 0 "
                   f"(the metrics so far are kept in {run / 'metrics.jsonl.1'})\n")
    assert (run / "metrics.jsonl.1").read_text() == earlier
    assert steps(run / "metrics.jsonl") == [1, 2, 3]
    # It really started over: the same seed gives the first attempt's losses, and only this attempt's are returned.
    assert again.losses == pytest.approx(first.losses, rel=1e-6)
    assert (run / "model").is_dir()

    # Stopped early again: the next copy gets the next number, the first stays as it was.
    second = stop_before_first_checkpoint(run, 1)
    run_quietly(cfg, resume=True)
    assert "metrics.jsonl.2" in capsys.readouterr().err
    assert (run / "metrics.jsonl.1").read_text() == earlier
    assert (run / "metrics.jsonl.2").read_text() == second


def test_resume_without_a_checkpoint_or_metrics_says_so_and_starts(tiny_chat_dir, data_file, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = settings(tiny_chat_dir, data_file, run, max_steps=1)
    run_quietly(cfg)
    stop_before_first_checkpoint(run, 0)
    (run / "metrics.jsonl").unlink()
    capsys.readouterr()
    run_quietly(cfg, resume=True)
    assert capsys.readouterr().err == (
        f"camelid: no checkpoint to resume from in {run / 'checkpoints'}; starting from step 0\n"
    )
    assert steps(run / "metrics.jsonl") == [1]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("metrics")) == ["metrics.jsonl"]


@pytest.mark.slow
def test_killed_before_its_first_checkpoint_through_the_command(tiny_chat_dir, data_file, tmp_path):
    """The reported case as it happens: `camelid train` killed mid-run with no checkpoint yet, then `--resume`."""
    run = tmp_path / "run"
    keys = settings(tiny_chat_dir, data_file, run, max_steps=30, save_every=1000)
    cmd = [sys.executable, "-m", "camelid", "train", *(f"{k}={v}" for k, v in keys.items()), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "checkpoints").exists()
    earlier = metrics.read_text()

    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"no checkpoint to resume from in {run / 'checkpoints'}; starting from step 0" in done.stderr
    assert (run / "metrics.jsonl.1").read_text() == earlier
    assert steps(metrics) == list(range(1, 31))
