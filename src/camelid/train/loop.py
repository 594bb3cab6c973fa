"""Fine-tuning, full or LoRA, in one process or many (`torchrun`): `camelid train`, supervised or on preferences
(camelid.train.preference).

The run directory (`out`) holds:
  config.json           the settings (a different run in the same directory is refused)
  metrics.jsonl         one line per optimizer step (loss, lr, grad norm, tokens/s) and per evaluation
  loss.png              the loss curve (preference objectives: beside the reward margin and accuracy)
  reference_logps.safetensors   DPO's and KTO's reference log-probs, computed before the first step
  checkpoints/step-N/   model (adapter or full) + trainer_state.pt, every `save_every` steps
  model/                the final model: an adapter directory (LoRA) or an HF model directory (full)

Every step's data is a function of (seed, step) alone (camelid.train.schedule): rows are packed once, each
epoch shuffles them, and step s takes the next `batch_size` rows. So resuming needs only the step number, and N
processes see exactly the rows one process would (each takes every N-th), with the loss normalised by the
supervised tokens of the whole global batch: 2 processes compute the same update as 1.
"""

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from camelid.errors import CamelidError
from camelid.memory import release_freed_memory as release_heap
from camelid.files import atomic_dir, write_atomic
from camelid.examples import Row, collate
from camelid.train.recipe import RESUMABLE_KEYS, TrainConfig
from camelid.train.schedule import Schedule, check_batch_size, eval_batches

STATE_FILE = "trainer_state.pt"


@dataclass
class Processes:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def processes(device: str | None) -> Iterator[Processes]:
    """This process's place among those `torchrun` started (or the only one), and its device.

    A process group this starts is destroyed when the block ends, returned from or raised out of; one that was
    already running belongs to the caller and is left as it is.
    """
    from camelid.checkpoint import check_device, default_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = world > 1 and not dist.is_initialized()
    if started:
        use_cuda = (device or default_device()).startswith("cuda")
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        rank = dist.get_rank() if world > 1 else 0
        name = check_device(device or default_device())
        if name == "cuda":  # each process its own GPU under torchrun
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        if name.startswith("cuda"):
            torch.cuda.set_device(torch.device(name))
        yield Processes(rank, world, torch.device(name))
    finally:
        if started:
            dist.destroy_process_group()


def _peak_memory() -> str:
    """This process's peak resident memory so far, and the largest of its finished child processes' (the data
    workers'), as the kernel counts them."""
    import resource

    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return f"peak memory {mine:.2f} GiB" + (f" (data workers: at most {children:.2f} GiB each)" if children else "")


def _barrier(procs: Processes) -> None:
    if procs.world > 1:
        dist.barrier()


# -- data --------------------------------------------------------------------------------------------------------


def prepared_rows(cfg: TrainConfig, template, tokenizer, procs: Processes, log):
    """The run's rows (camelid.train.data): the first process reads and tokenizes into the cache, the others
    then find it there, so that no two processes write the same cache files."""
    from camelid.train.data import training_rows

    if not procs.main:
        _barrier(procs)
    rows = training_rows(cfg, template, tokenizer, log)
    if procs.main:
        _barrier(procs)
    return rows


# -- the model ---------------------------------------------------------------------------------------------------


def prepare_model(cfg: TrainConfig, procs: Processes):
    """The model to train (base weights loaded, LoRA applied when asked), its template, and the trainable params."""
    from camelid.chat import chat_template_for
    from camelid.checkpoint import load_model
    from camelid.lora import apply_lora

    cuda = procs.device.type == "cuda"
    # LoRA's frozen base can sit in bf16 on a GPU; weights that are trained stay float32 (autocast does bf16).
    dtype = torch.bfloat16 if (cuda and cfg.method == "lora") else torch.float32
    loaded = load_model(cfg.model, device=str(procs.device), dtype=dtype)
    template = chat_template_for(loaded, cfg.template)
    model = loaded.model
    if cfg.method == "lora":
        apply_lora(model, cfg.lora_config())
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        model.requires_grad_(True)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return loaded, template


def wrap_model(model, cfg: TrainConfig, procs: Processes):
    """The model as the training step calls it: itself, DDP, or FSDP2 (`fully_shard` on each block and the root)."""
    if procs.world == 1:
        return model
    if cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [procs.device.index] if procs.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _unwrapped(model):
    return getattr(model, "module", model)


def make_optimizer(model, cfg: TrainConfig, total_steps: int):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # As transformers' Trainer: no weight decay on biases and norm weights.
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps
    )
    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:  # linear warmup, then cosine down to min_lr_ratio (transformers' schedule)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- checkpoints -------------------------------------------------------------------------------------------------


def _sharded(model) -> bool:
    """Whether FSDP holds the parameters as shards (DTensors) spread over the processes."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def _full_weights(model, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The trained weights as whole CPU tensors under the model's own names (gathered from all processes)."""
    wanted = lambda name: cfg.method == "full" or "lora_" in name  # noqa: E731
    if not _sharded(model):
        return {k: v.detach().cpu() for k, v in _unwrapped(model).state_dict().items() if wanted(k)}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=cfg.method == "lora")
    return {k: v for k, v in get_model_state_dict(model, options=options).items() if wanted(k)}


def write_model_dir(loaded, cfg: TrainConfig, weights: dict, out: Path, template_source: str | None) -> None:
    """The trained model as a directory camelid, transformers and peft read: an adapter or a full HF model."""
    from camelid.checkpoint import write_model_files
    from camelid.lora import write_adapter

    if cfg.method == "lora":
        write_adapter(weights, cfg.lora_config(), out, base_model=base_model_ref(cfg.model), model_config=loaded.config,
                      tokenizer=loaded.tokenizer, chat_template=template_source, overwrite=True)
    else:
        write_model_files(loaded.config, weights, out, tokenizer=loaded.tokenizer, chat_template=template_source,
                          overwrite=True)


def base_model_ref(model: str) -> str:
    """How an adapter names its base: a model name as it is, a path as an absolute path."""
    from camelid.named_models import NAMED_MODELS

    if model.lower() in NAMED_MODELS and not Path(model).exists():
        return model
    return str(Path(model).resolve())


def save_checkpoint(run: Path, step: int, model, optimizer, scheduler, loaded, cfg, procs, template_source) -> None:
    weights = _full_weights(model, cfg)
    optim_state = _optimizer_state(model, optimizer)
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if procs.device.type == "cuda" else None}
    rngs = [None] * procs.world
    if procs.world > 1:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if procs.main:
        with atomic_dir(run / "checkpoints" / f"step-{step:06d}", overwrite=True) as tmp:
            write_model_dir(loaded, cfg, weights, tmp / "model", template_source)
            state = {"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rngs,
                     "world": procs.world}
            torch.save(state, tmp / STATE_FILE)
        for old in checkpoints(run)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(procs)


def _optimizer_state(model, optimizer) -> dict:
    if _sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def checkpoints(run: Path) -> list[Path]:
    """Complete step checkpoints, oldest first (a checkpoint directory appears only once fully written)."""
    directory = run / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("step-*") if (p / STATE_FILE).is_file())


def load_checkpoint(path: Path, model, optimizer, scheduler, cfg: TrainConfig, procs: Processes) -> int:
    """Restore weights, optimizer, schedule and random state from a checkpoint; returns its step."""
    from safetensors.torch import load_file

    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    model_dir = path / "model"
    if cfg.method == "lora":
        from camelid.lora import PEFT_PREFIX, WEIGHTS_FILE

        weights = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(model_dir / WEIGHTS_FILE).items()}
    else:
        weights = load_file(model_dir / "model.safetensors")
    if _sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    else:
        target = _unwrapped(model)
        params = dict(target.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                if name in params:
                    params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rngs = state["rng"]
    if len(rngs) == procs.world:
        torch.set_rng_state(rngs[procs.rank]["cpu"])
        if procs.device.type == "cuda" and rngs[procs.rank]["cuda"] is not None:
            torch.cuda.set_rng_state(rngs[procs.rank]["cuda"])
    return int(state["step"])


# -- the run directory -------------------------------------------------------------------------------------------


def check_run_dir(run: Path, cfg: TrainConfig, resume: bool) -> bool:
    """Whether the run continues from a checkpoint; refuses a directory that holds something else.

    A run resumed before its first checkpoint starts again from step 0 and says so on stderr, and its
    metrics.jsonl so far is moved aside to metrics.jsonl.N, not overwritten.
    """
    saved = run / "config.json"
    if run.exists() and not run.is_dir():
        raise CamelidError(f"{run} is a file; choose a directory for out")
    if not saved.is_file():
        if run.is_dir() and any(run.iterdir()):
            raise CamelidError(f"{run} already exists and is not a camelid run; choose a new out directory")
        if resume:
            print(f"camelid: no run to resume in {run}; starting it", file=sys.stderr)
        return False
    try:
        previous = json.loads(saved.read_text())
    except (OSError, json.JSONDecodeError):
        raise CamelidError(f"{saved} is unreadable; choose a new out directory") from None
    current = cfg.to_dict()
    changed = sorted(k for k in set(previous) | set(current) if k not in RESUMABLE_KEYS and previous.get(k) != current.get(k))
    if changed:
        raise CamelidError(
            f"{run} holds a different run (it differs in: {', '.join(changed)}); choose a new out directory"
        )
    if not resume:
        raise CamelidError(f"{run} already holds this run; pass --resume to continue it, or choose a new out directory")
    if checkpoints(run):
        return True
    kept = _set_aside(run / "metrics.jsonl")
    note = f" (the metrics so far are kept in {kept})" if kept else ""
    print(f"camelid: no checkpoint to resume from in {run / 'checkpoints'}; starting from step 0{note}",
          file=sys.stderr)
    return False


def _set_aside(path: Path) -> Path | None:
    """Rename `path`, if it exists, to the first free `path.N` (N = 1, 2, ...); returns the new path.

    Why aside and not appended to: metrics.jsonl is read back as one attempt's steps in order (the loss plot, the
    losses a resumed run returns), and a second step 1 after step 40 would draw a curve that doubles back.
    """
    if not path.is_file():
        return None
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    return path.rename(path.with_name(f"{path.name}.{n}"))


def _read_metrics(path: Path, up_to_step: int) -> list[dict]:
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("step", 0) <= up_to_step]


# -- training ----------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run: Path
    model_dir: Path
    steps: int
    losses: list[float]  # the training loss of every step of this run (resumed steps from metrics.jsonl)
    eval_loss: float | None
    seconds: float
    tokens_per_second: float  # all tokens (supervised or not) processed per second, all processes


# Why training on the CPU hands freed memory back to the system, several times a step. glibc keeps the pages of
# freed tensors resident; the temporaries a forward pass frees between the activations it keeps pile up, and
# each pass lays its tensors out differently. Measured for SmolLM2-135M LoRA at 4 x 512 tokens (bench/train.py):
# resident memory rose 3.4 GB during training for 1.7 GB of tensors at once; releasing after every third of the
# blocks and after each backward pass keeps the rise to 1.9-2.0 GB, for a few percent more time (the pages are
# touched again).


def release_freed_memory(device: torch.device) -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim) when training on the CPU; else nothing."""
    if device.type == "cpu":
        release_heap()


def release_memory_during_forward(layers: torch.nn.ModuleList, device: torch.device) -> list:
    """Release freed memory after every third of `layers` in each forward pass on the CPU. Returns the hooks."""
    if device.type != "cpu":
        return []
    every = max(1, len(layers) // 3)
    return [
        layers[i].register_forward_hook(lambda *_: release_freed_memory(device))
        for i in range(every - 1, len(layers), every)
    ]


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, log=None) -> TrainResult:
    """Fine-tune `cfg.model` on `cfg.data` and write the run directory `cfg.out` (see the module docstring).

    Under `torchrun` this starts the process group, and destroys it again when training returns or raises.
    """
    with processes(cfg.device) as procs:
        return _train(cfg, procs, resume, progress, log)


def _resuming(run: Path, cfg: TrainConfig, resume: bool, procs: Processes) -> bool:
    """check_run_dir's verdict, decided on rank 0 (which can see the directory) and shared, so none is left waiting."""
    if procs.world == 1:
        return check_run_dir(run, cfg, resume)
    verdict = [None]
    if procs.main:
        try:
            verdict[0] = ("ok", check_run_dir(run, cfg, resume))
        except CamelidError as exc:
            verdict[0] = ("error", str(exc))
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0][0] == "error":
        raise CamelidError(verdict[0][1])
    return verdict[0][1]


def _train(cfg: TrainConfig, procs: Processes, resume: bool, progress: bool, log) -> TrainResult:
    run = Path(cfg.out)
    started = time.perf_counter()

    def say(message: str) -> None:
        if procs.main:
            (log or (lambda m: print(m, file=sys.stderr)))(message)

    resuming = _resuming(run, cfg, resume, procs)
    check_batch_size(cfg, procs.world)  # before the model loads
    torch.manual_seed(cfg.seed)  # the same new adapter weights in every process (FSDP keeps each one's shard)
    loaded, template = prepare_model(cfg, procs)
    torch.manual_seed(cfg.seed + procs.rank)  # dropout differs between processes, as their data does
    template_source = template.source
    rows, eval_rows = prepared_rows(cfg, template, loaded.tokenizer, procs, say)
    schedule = Schedule.plan(cfg, len(rows), procs.world)

    model = wrap_model(loaded.model, cfg, procs)
    model.train()
    releasing = release_memory_during_forward(_unwrapped(model).model.layers, procs.device)
    optimizer, scheduler = make_optimizer(model, cfg, schedule.steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in _unwrapped(loaded.model).parameters() if p.requires_grad)
    say(
        f"{cfg.method} fine-tuning of {cfg.model}: {n_trainable:,} trainable parameters, {schedule.steps} steps "
        f"of {cfg.batch_size} sequences x {cfg.seq_len} tokens, {procs.world} process(es) on {procs.device.type}"
    )

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if procs.device.type == "cuda" else contextlib.nullcontext()
    )
    if procs.main:
        run.mkdir(parents=True, exist_ok=True)
        write_atomic(run / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    _barrier(procs)
    pref = cfg.preference()
    reference = eval_reference = None
    if pref is not None and pref.objective in ("dpo", "kto"):  # before a checkpoint's weights are loaded
        reference, eval_reference = _reference(run, model, rows, eval_rows, cfg, procs, autocast, progress, say)

    start = 0
    if resuming:
        latest = checkpoints(run)[-1]
        start = load_checkpoint(latest, model, optimizer, scheduler, cfg, procs)
        say(f"resuming from {latest} (step {start})")
    metrics_path = run / "metrics.jsonl"
    metrics = _read_metrics(metrics_path, start) if procs.main else []
    if procs.main:
        write_atomic(metrics_path, "".join(json.dumps(m) + "\n" for m in metrics))
    _barrier(procs)

    def evaluated() -> dict:
        if pref is None:
            return {"eval_loss": evaluate(model, eval_rows, cfg, procs, autocast)}
        return evaluate_preference(model, eval_rows, eval_reference, pref, cfg, procs, autocast)

    if pref is not None and eval_rows and start == 0:  # the held-out accuracy before training, for the curve
        record = {"step": 0} | {k: round(v, 6) for k, v in evaluated().items()}
        say("before training: " + ", ".join(f"{k} {v}" for k, v in record.items() if k != "step"))
        if procs.main:
            metrics.append(record)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
    eval_loss = None
    losses = [m["loss"] for m in metrics if "loss" in m]
    bar = None
    if progress and procs.main:
        from tqdm import tqdm

        bar = tqdm(total=schedule.steps, initial=start, desc="training", unit="step", file=sys.stderr,
                   dynamic_ncols=True)
    say(f"ready to train after {time.perf_counter() - started:.1f} s; {_peak_memory()}")
    began, tokens_seen = time.perf_counter(), 0
    for step in range(start, schedule.steps):
        step_start = time.perf_counter()
        ids = schedule.rows_for_step(step)
        global_rows = [rows[i] for i in ids]
        supervised = sum(r.supervised for r in global_rows)
        parts = schedule.micro_batches(ids, procs.rank)
        if pref is None:
            loss_sum = _accumulate_gradients(model, [[rows[i] for i in p] for p in parts], supervised, procs, autocast)
            step_metrics = {}
        else:
            loss_sum, step_metrics = _accumulate_preference_gradients(model, rows, parts, global_rows, reference,
                                                                      pref, procs, autocast)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf"))
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if procs.world > 1:
            dist.all_reduce(loss_sum)
        step_tokens = sum(len(r.tokens) for r in global_rows)
        tokens_seen += step_tokens
        loss_value = float(loss_sum) / (supervised if pref is None else 1)  # preference losses come as means
        losses.append(loss_value)
        record = {
            "step": step + 1,
            "epoch": round((step + 1) / schedule.steps_per_epoch, 4),
            "loss": round(loss_value, 6),
            "lr": lr,
            "grad_norm": round(float(_local(grad_norm)), 6),
            "tokens": step_tokens,
            "supervised_tokens": supervised,
            "tokens_per_second": round(step_tokens / (time.perf_counter() - step_start), 1),
        } | {k: round(v, 6) for k, v in step_metrics.items()}
        if eval_rows and schedule.evaluates_after(step):
            held_out = evaluated()
            eval_loss = held_out["eval_loss"]
            record |= {k: round(v, 6) for k, v in held_out.items()}
        if procs.main:
            metrics.append(record)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.4f}", **({"eval": f"{eval_loss:.4f}"} if eval_loss else {}))
            bar.update(1)
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == schedule.steps:
            save_checkpoint(run, step + 1, model, optimizer, scheduler, loaded, cfg, procs, template_source)
            if procs.main:
                _plot(metrics, run)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - began
    for hook in releasing:
        hook.remove()

    model_dir = run / "model"
    weights = _full_weights(model, cfg)
    if procs.main:
        write_model_dir(loaded, cfg, weights, model_dir, template_source)
        _plot(metrics, run)
    _barrier(procs)
    return TrainResult(
        run=run,
        model_dir=model_dir,
        steps=schedule.steps,
        losses=losses,
        eval_loss=eval_loss,
        seconds=seconds,
        tokens_per_second=tokens_seen / seconds if seconds > 0 else 0.0,
    )


def _accumulate_gradients(model, parts: list[list[Row]], supervised: int, procs: Processes, autocast) -> torch.Tensor:
    """Forward and backward over this process's micro-batches of one step; returns the sum of their losses."""
    loss_sum = torch.zeros((), device=procs.device)
    for k, part in enumerate(parts):
        batch = collate(part).to(procs.device)
        with _no_sync(model, procs, last=k == len(parts) - 1), autocast:
            loss = model(batch.tokens, positions=batch.positions, mask=batch.mask, targets=batch.targets)
        # Normalised by the global batch's supervised tokens; DDP/FSDP average over processes, hence * world.
        (loss * (procs.world / supervised)).backward()
        loss_sum += loss.detach()
        release_freed_memory(procs.device)
    return loss_sum


def _accumulate_preference_gradients(model, rows, parts: list[list[int]], global_rows, reference, pref,
                                     procs: Processes, autocast) -> tuple[torch.Tensor, dict]:
    """Forward and backward of a preference objective over this process's micro-batches of one step; returns
    the step's loss (this process's share of the mean) and the step's metrics, all processes together."""
    from camelid.train.preference import add_sums, collate_pairs, metric_means, micro_batch_terms, step_totals

    totals = step_totals(global_rows)
    loss_sum, sums = torch.zeros((), device=procs.device), {}
    for k, part in enumerate(parts):
        batch = collate_pairs([rows[i] for i in part]).to(procs.device)
        ref = None if reference is None else torch.cat([reference[i] for i in part]).float().to(procs.device)
        with _no_sync(model, procs, last=k == len(parts) - 1), autocast:
            terms = micro_batch_terms(pref, model, batch, ref, totals, procs.world)
        (terms.loss * procs.world).backward()  # DDP/FSDP average over processes, hence * world
        loss_sum += terms.loss.detach()
        add_sums(sums, terms.sums)
        release_freed_memory(procs.device)
    return loss_sum, metric_means(sums, procs.world, procs.device)


@torch.no_grad()
def evaluate_preference(model, rows, reference, pref, cfg: TrainConfig, procs: Processes, autocast) -> dict:
    """The objective's loss and metrics over the held-out rows, as `eval_*` (every process computes all of them)."""
    from camelid.train.preference import add_sums, collate_pairs, metric_means, micro_batch_terms, step_totals

    was_training = model.training
    model.eval()
    target = model if procs.world > 1 and cfg.parallel == "fsdp" else _unwrapped(model)
    totals = step_totals(list(rows))
    loss, sums = 0.0, {}
    for part in eval_batches(len(rows), cfg.micro_batch_size):
        batch = collate_pairs(rows[part]).to(procs.device)
        ref = None if reference is None else torch.cat(reference[part]).float().to(procs.device)
        with autocast:
            terms = micro_batch_terms(pref, target, batch, ref, totals, world=1)
        loss += float(terms.loss)
        add_sums(sums, terms.sums)
    model.train(was_training)
    return {"eval_loss": loss} | {f"eval_{k}": v for k, v in metric_means(sums, 1, procs.device).items()}


def _reference(run: Path, model, rows, eval_rows, cfg: TrainConfig, procs: Processes, autocast, progress: bool,
               say) -> tuple[list, list]:
    """The reference log-probs of the training and held-out rows: read from the run's cache, or computed now
    (from the weights as loaded: before any step) and cached."""
    from camelid.train.preference import REFERENCE_FILE, read_reference, reference_log_probs, write_reference

    cached = {name: read_reference(run, name, r) for name, r in (("train", rows), ("held_out", eval_rows))}
    _barrier(procs)
    if all(v is not None for v in cached.values()):
        say(f"reference log-probs read from {run / REFERENCE_FILE}")
        return cached["train"], cached["held_out"]
    if checkpoints(run) and cfg.method == "full":
        raise CamelidError(f"{run / REFERENCE_FILE} is missing or was made for other data, and a fully fine-tuned "
                           "checkpoint cannot give the reference again; start the run in a new out directory")
    began = time.perf_counter()
    values = {name: reference_log_probs(model, r, cfg.micro_batch_size, procs, autocast, progress)
              for name, r in (("train", rows), ("held_out", eval_rows))}
    if procs.main:
        write_reference(run, values)
    _barrier(procs)
    what = "the base with the adapters off" if cfg.method == "lora" else "the weights as loaded"
    say(f"reference log-probs ({what}) in {time.perf_counter() - began:.1f} s, cached in {run / REFERENCE_FILE}")
    return values["train"], values["held_out"]


def _local(value):
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _no_sync(model, procs: Processes, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if procs.world == 1 or last:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    model.set_requires_gradient_sync(False)  # FSDP2; the last micro-batch turns it back on below

    @contextlib.contextmanager
    def restore():
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return restore()


@torch.no_grad()
def evaluate(model, rows: list[Row], cfg: TrainConfig, procs: Processes, autocast) -> float:
    """Mean cross-entropy per supervised token over the held-out rows (every process computes all of them)."""
    was_training = model.training
    model.eval()
    target = model if procs.world > 1 and cfg.parallel == "fsdp" else _unwrapped(model)
    total, count = 0.0, 0
    for part in eval_batches(len(rows), cfg.micro_batch_size):
        batch = collate(rows[part]).to(procs.device)
        with autocast:
            total += float(target(batch.tokens, positions=batch.positions, mask=batch.mask, targets=batch.targets))
        count += batch.supervised
    model.train(was_training)
    return total / max(count, 1)


def _plot(metrics: list[dict], run: Path) -> None:
    from camelid.plots import loss_curve, preference_curves

    try:
        if any("rewards/chosen" in m for m in metrics):
            preference_curves(metrics, run / "loss.png", title=f"{run.name}")
        else:
            loss_curve(metrics, run / "loss.png", title=f"{run.name}: loss per supervised token")
    except ImportError:
        pass  # matplotlib is a dependency; a broken install should not end a finished run
