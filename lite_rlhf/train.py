"""The optimizer-step helper every trainer uses (reward model, DPO, and the trainers to come).

A trainer says what one micro-batch costs; this module owns the rest, the same way for all:
AdamW, a cosine schedule with linear warm-up, gradient accumulation over the micro-batches of an
optimizer step, clipping, a stop on a non-finite loss or gradient, a progress bar, one metrics
record per optimizer step. Each trainer keeps its config section (`reward`, `dpo`, ...) with the
same common fields, read here: lr, epochs, micro_batch, grad_accum, warmup_ratio, max_grad_norm,
weight_decay.

Accumulation: the micro-batch loss is the *sum* of its examples' losses (of its tokens' losses for
SFT); dividing by the number of examples (tokens) in the whole optimizer step makes the accumulated
gradient the step's mean, whatever the micro-batch sizes (the last one of an epoch may be short) and
however the step's examples are grouped into micro-batches (`group_by_length`). Under torchrun each rank
runs its part of every step's micro-batches (`dist.my_part`) and the gradients are summed over ranks
before clipping, so the step is the single-process step; the step's record combines the ranks' figures.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from tqdm.auto import tqdm

from lite_rlhf import dist


class NonFiniteLoss(RuntimeError):
    """The loss or gradient became NaN or inf; training stops and the last good adapter is kept."""


class TrainSection(Protocol):
    lr: float
    epochs: float
    micro_batch: int
    grad_accum: int
    warmup_ratio: float
    max_grad_norm: float
    weight_decay: float


Steps = list[list[list[int]]]  # optimizer steps -> micro-batches -> example indices
COUNTS = ("tokens",)  # step figures that are counts (summed over ranks); every other one is a mean
_carried: dict[str, dict] | None = None  # the optimizer states `carrying` lends to `optimize`, by trainer name


@contextlib.contextmanager
def carrying(states: dict[str, dict]) -> Iterator[dict[str, dict]]:
    """Within: `optimize(name=...)` starts from `states[name]` (an optimizer's state_dict()["state"]) when it is
    there, and puts its own there when it ends. The learning rate, schedule and decay come from the section each
    time; only the moments and step counts carry (TRL's online trainers keep one optimizer for the whole run)."""
    global _carried
    before, _carried = _carried, states
    try:
        yield states
    finally:
        _carried = before


def plan_steps(n: int, sec: TrainSection, seed: int) -> Steps:
    """`sec.epochs` shuffled passes over n examples (a fractional last pass is cut short), in micro-batches
    of `sec.micro_batch`, `sec.grad_accum` of them per optimizer step."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(sec.epochs))])
    order = order[: math.ceil(sec.epochs * n)].tolist()
    micro = [order[i : i + sec.micro_batch] for i in range(0, len(order), sec.micro_batch)]
    return [micro[i : i + sec.grad_accum] for i in range(0, len(micro), sec.grad_accum)]


def group_by_length(steps: Steps, lengths: list[int]) -> Steps:
    """The same examples in every optimizer step, reordered so that similar lengths share a micro-batch
    (less padding); the micro-batch sizes stay. The step's gradient is the same up to rounding."""
    out = []
    for step in steps:
        flat = sorted((i for mb in step for i in mb), key=lambda i: (-lengths[i], i))
        sizes, grouped, at = [len(mb) for mb in step], [], 0
        for size in sizes:
            grouped.append(flat[at : at + size])
            at += size
        out.append(grouped)
    return out


def longest_micro_batch(steps: Steps, lengths: list[int], rows_per_example: int = 1) -> int:
    """Tokens (rows x padded width) of the largest micro-batch in `steps`: what sizes activation memory."""
    return max((rows_per_example * len(mb) * max(lengths[i] for i in mb) for step in steps for mb in step), default=0)


def schedule(warmup: int, total: int) -> Callable[[int], float]:
    """The lr factor of step k (from 0): a linear warm-up over `warmup` steps that never runs a step at 0
    ((k+1)/(warmup+1): a one-step warm-up runs at half the rate), then a cosine from 1 towards 0 over
    the rest (the last step still moves)."""

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, total - warmup)))

    return factor


def optimize(
    params: list[torch.nn.Parameter],
    sec: TrainSection,
    steps: Steps,
    micro_loss: Callable[[list[int]], torch.Tensor | Iterator[torch.Tensor]],
    step_stats: Callable[[], dict],
    *,
    name: str,
    quiet: bool,
    on_step: Callable[[dict], None],
    weight: Callable[[list[int]], float] = len,
) -> None:
    """Run `steps`: `micro_loss(indices)` returns the summed loss of a micro-batch (and may keep its own
    statistics); `step_stats()` returns and resets them once per step; `on_step(record)` receives
    `{step, **stats, lr, grad_norm}` (lr: the rate the step used). The summed losses of a step are
    divided by the sum of `weight(micro-batch)` over the step: its examples (default) or tokens. A `micro_loss`
    that yields its loss in parts (a generator) has each part backpropagated before it computes the next, so the
    parts' graphs never sit in memory together (PPO-ptx: the policy's, then the pretraining windows')."""
    opt = torch.optim.AdamW(params, lr=sec.lr, weight_decay=sec.weight_decay)
    if _carried is not None and name in _carried:  # before the schedule: it sets the rate from the section's lr
        opt.load_state_dict({"state": _carried[name], "param_groups": opt.state_dict()["param_groups"]})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(math.ceil(sec.warmup_ratio * len(steps)), len(steps)))
    clip = sec.max_grad_norm if sec.max_grad_norm > 0 else float("inf")
    with tqdm(total=len(steps), desc=name, unit="step", disable=quiet) as bar:
        for k, step in enumerate(steps, start=1):
            n = sum(weight(mb) for mb in step)
            mine = dist.my_part(step)
            for mb in mine:
                losses = micro_loss(mb)
                for loss in [losses] if isinstance(losses, torch.Tensor) else losses:
                    if not torch.isfinite(loss):
                        raise NonFiniteLoss(f"{name} loss is {loss.item()} at step {k}")
                    (loss / n).backward()
            dist.sum_gradients(params)
            stats = combine(dist.all_gather((step_stats() if mine else {}, sum(weight(mb) for mb in mine))))
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            if not torch.isfinite(grad_norm):
                raise NonFiniteLoss(f"{name} gradient norm is {grad_norm.item()} at step {k}")
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            record = {"step": k, **stats, "lr": lr, "grad_norm": float(grad_norm)}
            on_step(record)
            bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}")
            bar.update(1)
    if _carried is not None:
        _carried[name] = opt.state_dict()["state"]


def combine(parts: list[tuple[dict, float]]) -> dict:
    """One step's figures from the ranks' (figures, weight): means weighted by the ranks' shares of the
    step, counts (`COUNTS`) summed, labels (strings, e.g. PPO's part) as rank 0 has them. A single part comes
    back as it is."""
    parts = [(stats, w) for stats, w in parts if stats]
    if len(parts) <= 1:
        return parts[0][0] if parts else {}
    total = sum(w for _, w in parts)
    first = parts[0][0]
    return {
        key: first[key] if isinstance(first[key], str)
        else sum(s[key] for s, _ in parts) if key in COUNTS else sum(s[key] * w for s, w in parts) / total
        for key in first
    }  # fmt: skip
