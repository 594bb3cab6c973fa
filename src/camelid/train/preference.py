"""Preference tuning after SFT: DPO, SimPO, ORPO and KTO (`camelid train objective=dpo|simpo|orpo|kto`).

What is compared is the log-probability of the *last* answer of a conversation, summed over its tokens (DPO,
KTO) or averaged (SimPO, ORPO), with the answer's tokens found as SFT finds them: from the chat template itself.

A pair is one training row, its prompt computed once. The row is the prompt, the chosen answer, then the
prompt's last token again and the rejected answer:

    tokens     p0 p1 .. pn | c0 c1 .. cm | pn' r0 r1 .. rk
    positions  0  1  .. n  | n+1  ..     | n   n+1  ..
    sees       causal      | prompt, c   | prompt (but pn), pn', r

The rejected answer sees the prompt and itself, never the chosen one; `pn'` stands at pn's position and sees
what pn saw, so it has pn's hidden state and predicts r0 as pn predicts c0. One forward pass gives both
answers' log-probabilities at about half the cost of two sequences with the prompt in each (HH-RLHF's prompts
are most of its tokens). A KTO row is built the same way: its judged answer, then another row's answer to the
same prompt, whose log-probability estimates the KL term (TRL's mismatched pairs). Rows of several pairs are
packed with a block mask, as SFT packs conversations.

The reference model's log-probabilities (DPO, KTO) are computed once before training, with the LoRA adapters
switched off or, for full fine-tuning, from the weights as loaded, and cached beside the run
(`reference_logps.safetensors`); a resumed run reads them back. SimPO and ORPO need no reference.

Losses, rewards and metric names are TRL's (`rewards/chosen`, `rewards/margins`, `logps/chosen`, ...), checked
against TRL's trainers in tests/train/test_preference.py. Where camelid differs: ORPO's NLL term is over the
chosen answer's tokens (the paper's L_SFT), where TRL's ORPOTrainer takes prompt and answer; KTO's KL estimate
is over each micro-batch, all processes together, as TRL's.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from camelid.errors import CamelidError
from camelid.examples import NO_ANSWER_LEFT, Example, make_example
from camelid.model import IGNORE

MAIN, OTHER = 1, 2  # the branches of a row after its prompt (0): the chosen or judged answer, the other answer
REFERENCE_FILE = "reference_logps.safetensors"


# -- examples ----------------------------------------------------------------------------------------------------


@dataclass
class PairExample:
    """One record as a row's pieces: the prompt and main answer as rendered (`tokens`, targets on the answer
    alone), how many of its tokens are the shared prompt, and the other answer's branch: the prompt's last token
    and the rejected answer's tokens, with their targets (empty for a KTO row, whose branch is made later from
    another row's answer). `label`: 1 desirable, 0 undesirable (KTO), -1 for a pair."""

    tokens: list[int]
    targets: list[int]
    prompt_len: int
    branch_tokens: list[int]
    branch_targets: list[int]
    label: int

    @property
    def length(self) -> int:
        return len(self.tokens) + len(self.branch_tokens)

    @property
    def supervised(self) -> int:
        return sum(t != IGNORE for t in self.targets) + sum(t != IGNORE for t in self.branch_targets)


def make_pair_example(template, tokenizer, record: dict) -> PairExample | str:
    """A record ({"messages" ending with the chosen/judged answer, "rejected" or "label", "tools"}) as a
    PairExample, or the reason it cannot be one (chosen equals rejected)."""
    tools = record.get("tools")
    main = make_example(template, tokenizer, record["messages"], tools, last_only=True)
    prompt_len = _answer_start(main) + 1
    if "rejected" not in record:
        return PairExample(main.tokens, main.targets, prompt_len, [], [], int(bool(record["label"])))
    other = make_example(template, tokenizer, record["messages"][:-1] + [record["rejected"]], tools, last_only=True)
    if other.tokens == main.tokens:
        return "chosen equals rejected"
    # The prompt is what both renderings share up to the first answer token (a template could write the answers'
    # headers differently; whatever differs is part of each branch, unsupervised).
    shared = next((i for i, (a, b) in enumerate(zip(main.tokens, other.tokens)) if a != b),
                  min(len(main.tokens), len(other.tokens)))
    prompt_len = max(1, min(prompt_len, _answer_start(other) + 1, shared))
    return PairExample(main.tokens, main.targets, prompt_len, other.tokens[prompt_len - 1:],
                       other.targets[prompt_len - 1:], -1)


def _answer_start(example: Example) -> int:
    """The position that predicts the answer's first token."""
    return next(i for i, t in enumerate(example.targets) if t != IGNORE)


def fit_pair_example(example: PairExample, seq_len: int, overflow: str,
                     max_prompt_len: int | None) -> tuple[PairExample | None, str]:
    """The example as training takes it, and what happened: "kept", "truncated" (a prompt cut to its last
    `max_prompt_len` tokens, or prompt + answer cut to `seq_len`), or None and why it was dropped."""
    cut = False
    if max_prompt_len is not None and example.prompt_len > max_prompt_len:
        drop = example.prompt_len - max_prompt_len  # the prompt's start goes; its end leads to the answer
        example = PairExample(example.tokens[drop:], example.targets[drop:], max_prompt_len,
                              example.branch_tokens, example.branch_targets, example.label)
        cut = True
    if example.prompt_len >= seq_len:
        return None, "prompt fills the sequence length"
    too_long = len(example.tokens) > seq_len or example.prompt_len - 1 + len(example.branch_tokens) > seq_len
    if too_long and overflow == "drop":
        return None, "longer than the sequence length"
    if too_long:
        example = PairExample(*_cut(example.tokens, example.targets, seq_len), example.prompt_len,
                              *_cut(example.branch_tokens, example.branch_targets, seq_len - example.prompt_len + 1),
                              example.label)
        cut = True
    if not any(t != IGNORE for t in example.targets) or (
            example.label < 0 and not any(t != IGNORE for t in example.branch_targets)):
        return None, NO_ANSWER_LEFT if cut else "nothing to learn"
    return example, "truncated" if cut else "kept"


def _cut(tokens: list[int], targets: list[int], n: int) -> tuple[list[int], list[int]]:
    if len(tokens) <= n:
        return tokens, targets
    return tokens[:n], targets[: n - 1] + [IGNORE]  # the last target lies beyond the cut


# -- rows and batches --------------------------------------------------------------------------------------------


@dataclass
class PairRow:
    """One training row: one or more pairs (or KTO rows with their KL branch) end to end."""

    tokens: list[int]
    targets: list[int]
    positions: list[int]
    branches: list[int]  # per token: 0 the prompt but its last token, MAIN from that token on, OTHER
    lengths: list[int]  # tokens of each pair
    labels: list[int]  # each pair's label (-1 pair, 1 desirable, 0 undesirable)

    @property
    def supervised(self) -> int:
        return sum(t != IGNORE for t in self.targets)

    @property
    def pairs(self) -> int:
        return len(self.lengths)

    @property
    def main_supervised(self) -> int:
        """Supervised tokens of the main answers (ORPO's NLL is normalised by them)."""
        return sum(t != IGNORE and b != OTHER for t, b in zip(self.targets, self.branches))


def pair_row(examples: list[PairExample], others: list[PairExample | None], seq_len: int) -> PairRow:
    """The row of `examples` (each with the example whose answer is its KL branch, for KTO, else None)."""
    row = PairRow([], [], [], [], [], [])
    for ex, other in zip(examples, others):
        branch_tokens, branch_targets = ex.branch_tokens, ex.branch_targets
        if other is not None:  # KTO: pn' and the other row's answer, unsupervised at its own prompt
            answer = other.tokens[other.prompt_len:]
            branch_tokens, branch_targets = _cut([ex.tokens[ex.prompt_len - 1]] + answer,
                                                 other.targets[other.prompt_len - 1:], seq_len - ex.prompt_len + 1)
        p = ex.prompt_len
        row.tokens += ex.tokens + branch_tokens
        row.targets += ex.targets + branch_targets
        row.positions += list(range(len(ex.tokens))) + list(range(p - 1, p - 1 + len(branch_tokens)))
        # The prompt's last token goes with the main answer: the other branch sees its copy instead.
        row.branches += [0] * (p - 1) + [MAIN] * (len(ex.tokens) - p + 1) + [OTHER] * len(branch_tokens)
        row.lengths.append(len(ex.tokens) + len(branch_tokens))
        row.labels.append(ex.label)
    return row


@dataclass
class PairBatch:
    tokens: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T, T], True = may attend
    slots: torch.Tensor  # [N]: for each supervised token (in row-major order), 2 * pair + (0 main, 1 other)
    labels: torch.Tensor  # [P]

    def to(self, device) -> "PairBatch":
        return PairBatch(*(t.to(device) for t in (self.tokens, self.targets, self.positions, self.mask, self.slots,
                                                  self.labels)))

    @property
    def pairs(self) -> int:
        return len(self.labels)


def collate_pairs(rows: list[PairRow], pad_id: int = 0) -> PairBatch:
    """Rows right-padded to the longest, with the mask of the module docstring (per pair, per branch)."""
    B, T = len(rows), max(len(r.tokens) for r in rows)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    branch = torch.zeros((B, T), dtype=torch.long)
    pair = torch.full((B, T), -1, dtype=torch.long)  # the pair each token belongs to, numbered over the batch
    first = 0
    for b, row in enumerate(rows):
        n = len(row.tokens)
        tokens[b, :n], targets[b, :n] = torch.tensor(row.tokens), torch.tensor(row.targets)
        positions[b, :n], branch[b, :n] = torch.tensor(row.positions), torch.tensor(row.branches)
        pair[b, :n] = first + torch.repeat_interleave(torch.arange(len(row.lengths)), torch.tensor(row.lengths))
        positions[b, n:] = torch.arange(T - n)
        first += len(row.lengths)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same_branch = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    mask = (pair[:, :, None] == pair[:, None, :]) & causal & same_branch
    supervised = targets != IGNORE
    slots = 2 * pair[supervised] + (branch[supervised] == OTHER).long()
    labels = torch.tensor([label for row in rows for label in row.labels], dtype=torch.long)
    return PairBatch(tokens, targets, positions, mask, slots, labels)


def answer_log_probs(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each answer's summed log-probability and its token count, both [P, 2] (main, other)."""
    token_losses = model(batch.tokens, positions=batch.positions, mask=batch.mask, targets=batch.targets,
                         per_token=True)
    sums = torch.zeros(2 * batch.pairs, dtype=token_losses.dtype, device=token_losses.device)
    sums = sums.index_add(0, batch.slots, -token_losses)
    counts = torch.bincount(batch.slots, minlength=2 * batch.pairs).to(sums.dtype)
    return sums.view(-1, 2), counts.view(-1, 2)


# -- objectives --------------------------------------------------------------------------------------------------


@dataclass
class Terms:
    """One micro-batch's contribution to a step: the loss (already divided by the step's totals) and the sums
    that become the step's metrics."""

    loss: torch.Tensor
    sums: dict  # metric name -> (sum, count) as floats


def _smoothed(logits: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    """-log sigmoid(beta * logits), with a share `smoothing` of the labels assumed flipped (conservative DPO)."""
    return -(1 - smoothing) * F.logsigmoid(beta * logits) - smoothing * F.logsigmoid(-beta * logits)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler's rule)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_losses(pref, logps: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None) -> dict:
    """Per-pair losses and rewards of a paired objective, with the log-probabilities it compares.

    `logps` and `counts` [P, 2] are answer_log_probs'; `reference` [P, 2] the reference's summed log-probs (DPO).
    """
    if pref.objective == "dpo":
        chosen, rejected = logps[:, 0], logps[:, 1]
        ratios = logps - reference  # each answer's log-ratio to the reference
        losses = _smoothed(ratios[:, 0] - ratios[:, 1], pref.beta, pref.label_smoothing)
        rewards = (ratios * pref.beta).detach()
    else:  # SimPO and ORPO compare answers by their mean log-probability per token
        average = logps / counts.clamp(min=1)
        chosen, rejected = average[:, 0], average[:, 1]
        rewards = (average * pref.beta).detach()
        if pref.objective == "simpo":
            losses = _smoothed(chosen - rejected - pref.simpo_gamma / pref.beta, pref.beta, pref.label_smoothing)
        else:
            log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
            losses = -pref.beta * F.logsigmoid(log_odds)
            return {"losses": losses, "rewards": rewards, "chosen": chosen, "rejected": rejected,
                    "log_odds_chosen": log_odds.detach(), "log_odds_ratio": F.logsigmoid(log_odds).detach()}
    return {"losses": losses, "rewards": rewards, "chosen": chosen, "rejected": rejected}


def kto_losses(pref, logps: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor) -> dict:
    """Per-example KTO losses (weighted) and rewards. `kl` is the batch's KL estimate, clamped at 0, detached."""
    ratios = logps[:, 0] - reference[:, 0]
    desirable = labels == 1
    losses = torch.where(desirable, pref.desirable_weight * (1 - torch.sigmoid(pref.beta * (ratios - kl))),
                         pref.undesirable_weight * (1 - torch.sigmoid(pref.beta * (kl - ratios))))
    return {"losses": losses, "rewards": (pref.beta * ratios).detach(), "desirable": desirable}


def kto_kl(logps: torch.Tensor, reference: torch.Tensor, world: int) -> torch.Tensor:
    """KTO's KL estimate: the mean over the batch's mismatched answers of policy minus reference log-prob,
    averaged over the processes (as TRL gathers it), clamped at 0, without gradient."""
    kl = (logps[:, 1] - reference[:, 1]).detach().mean()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(kl)
        kl = kl / world
    return kl.clamp(min=0)


def micro_batch_terms(pref, model, batch: PairBatch, reference: torch.Tensor | None, totals: dict,
                      world: int) -> Terms:
    """The objective over one micro-batch: its loss divided by the step's totals (pairs, or main answer tokens
    for ORPO's NLL), so that the micro-batches' losses add up to the step's mean, and its metric sums."""
    logps, counts = answer_log_probs(model, batch)
    sums = {}
    if pref.objective == "kto":
        kl = kto_kl(logps, reference, world)
        out = kto_losses(pref, logps, reference, batch.labels, kl)
        good, bad = out["desirable"], ~out["desirable"]
        loss = out["losses"].sum() / totals["pairs"]
        sums["kl"] = (float(kl) * batch.pairs, batch.pairs)
        sums["rewards/chosen"] = (float(out["rewards"][good].sum()), int(good.sum()))
        sums["rewards/rejected"] = (float(out["rewards"][bad].sum()), int(bad.sum()))
        sums["logps/chosen"] = (float(logps[good, 0].sum()), int(good.sum()))
        sums["logps/rejected"] = (float(logps[bad, 0].sum()), int(bad.sum()))
        return Terms(loss, sums)
    out = pair_losses(pref, logps, counts, reference)
    loss = out["losses"].sum() / totals["pairs"]
    rewards = out["rewards"]
    P = batch.pairs
    if pref.objective == "orpo":
        nll = -logps[:, 0].sum()
        loss = loss + nll / totals["main_tokens"]
        sums["nll_loss"] = (float(nll), int(counts[:, 0].sum()))
        sums["log_odds_ratio"] = (float(out["log_odds_ratio"].sum()), P)  # TRL's names
        sums["log_odds_chosen"] = (float(out["log_odds_chosen"].sum()), P)
    sums["rewards/chosen"] = (float(rewards[:, 0].sum()), P)
    sums["rewards/rejected"] = (float(rewards[:, 1].sum()), P)
    sums["rewards/accuracies"] = (float((rewards[:, 0] > rewards[:, 1]).sum()), P)
    sums["rewards/margins"] = (float((rewards[:, 0] - rewards[:, 1]).sum()), P)
    sums["logps/chosen"] = (float(out["chosen"].detach().sum()), P)
    sums["logps/rejected"] = (float(out["rejected"].detach().sum()), P)
    return Terms(loss, sums)


def step_totals(rows: list[PairRow]) -> dict:
    return {"pairs": sum(r.pairs for r in rows), "main_tokens": sum(r.main_supervised for r in rows)}


def add_sums(into: dict, sums: dict) -> None:
    for name, (total, count) in sums.items():
        before = into.get(name, (0.0, 0))
        into[name] = (before[0] + total, before[1] + count)


def metric_means(sums: dict, world: int, device) -> dict:
    """The metrics of a step or an evaluation: each sum over its count, all processes together."""
    names = sorted(sums)
    if world > 1:
        import torch.distributed as dist

        packed = torch.tensor([[sums[n][0], sums[n][1]] for n in names], dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        sums = {n: (float(packed[i, 0]), float(packed[i, 1])) for i, n in enumerate(names)}
    means = {n: sums[n][0] / sums[n][1] for n in names if sums[n][1]}
    if "rewards/margins" not in means and {"rewards/chosen", "rewards/rejected"} <= set(means):  # KTO, as TRL
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    return means


# -- the reference ---------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_log_probs(model, rows, micro_batch_size: int, procs, autocast, progress: bool) -> list[torch.Tensor]:
    """The reference model's summed answer log-probabilities of every row, [pairs, 2] each: `model` with its
    adapters switched off (LoRA) or as loaded (full fine-tuning, before the first step).

    Each process computes every world-th batch and the results are summed over the processes; under FSDP every
    process takes part in every batch (the forward pass gathers the shards).
    """
    from camelid.lora import adapters_disabled
    from camelid.train.schedule import eval_batches

    target = getattr(model, "module", model)
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
    was_training = model.training
    model.eval()
    sizes = rows.pair_counts()
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    flat = torch.zeros(starts[-1], 2, dtype=torch.float64, device=procs.device)
    batches = eval_batches(len(rows), micro_batch_size)
    mine = batches if sharded else batches[procs.rank :: procs.world]
    bar = None
    if progress and procs.main:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc="reference log-probs", unit="batch", dynamic_ncols=True)
    for part in mine:
        batch = collate_pairs(rows[part]).to(procs.device)
        with adapters_disabled(target), autocast:
            logps, _ = answer_log_probs(model if sharded else target, batch)
        if not sharded or procs.main:
            flat[starts[part.start] : starts[part.stop]] = logps.double()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if procs.world > 1:
        import torch.distributed as dist

        dist.all_reduce(flat)
    model.train(was_training)
    return list(torch.split(flat.cpu(), sizes))


def read_reference(run, name: str, rows) -> list[torch.Tensor] | None:
    """The cached reference log-probs of `rows` (`name`: train or held_out), or None when the run has none for
    rows of these sizes."""
    from safetensors.torch import load_file

    path = run / REFERENCE_FILE
    if not path.is_file():
        return None
    saved = load_file(path)
    sizes = rows.pair_counts()
    if f"{name}.pairs" not in saved or saved[f"{name}.pairs"].tolist() != sizes:
        return None
    return list(torch.split(saved[f"{name}.logps"], sizes))


def write_reference(run, references: dict[str, list[torch.Tensor]]) -> None:
    """Cache the reference log-probs (name -> one [pairs, 2] tensor per row) beside the run, atomically."""
    from safetensors.torch import save

    from camelid.files import write_atomic

    tensors = {}
    for name, values in references.items():
        tensors[f"{name}.logps"] = torch.cat(values) if values else torch.zeros(0, 2, dtype=torch.float64)
        tensors[f"{name}.pairs"] = torch.tensor([len(v) for v in values], dtype=torch.int64)
    write_atomic(run / REFERENCE_FILE, save(tensors))


def check_labels(rows) -> None:
    """KTO learns from both kinds of answer: data with only one is refused."""
    counts = rows.label_counts()
    if counts.get(1, 0) == 0 or counts.get(0, 0) == 0:
        have = "desirable" if counts.get(1) else "undesirable"
        raise CamelidError(f"objective kto needs answers labelled desirable and undesirable; the data holds only "
                           f"{have} ones ({sum(counts.values()):,}); add the other kind or use objective sft")
