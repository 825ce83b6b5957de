"""Ranks: the loop under torchrun, each rank a whole trainer (shared model and engine) on its own device.

    torchrun --nproc-per-node=N -m lite_rlhf run CONFIG [k=v ...]

Everything goes through `torch.distributed` (gloo on CPU, nccl on CUDA); nothing here talks to another
process any other way. What a rank does differently from a single process:
- every batched call of the loop's workhorses (generation, scoring, each tournament round, reference
  log-probs, the KL estimate) runs on this rank's share of its items and the results are gathered back
  in the original order (`map_sharded`), so every rank holds the whole result afterwards;
- training: each optimizer step's micro-batches are split across ranks (`my_part`) and the gradients
  summed over ranks before the optimizer step (`sum_gradients`); every rank divides its loss by the
  whole step's count, so the sum is the single-process gradient, whatever the shards' sizes;
- rank 0 alone writes the run directory; the others wait at the barrier that ends each commit
  (`runstate.RunDir.commit`) and then read what it wrote (adapters, evaluations).

Cheap deterministic work (pair selection, figures, the report's inputs) runs on every rank. The run
directory must be on a filesystem every node sees. `LITE_RLHF_DIST_TIMEOUT` (seconds, default 1800)
bounds every collective: a dead rank ends the others' wait with an error instead of a hang.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from lite_rlhf.config import ConfigError

T = TypeVar("T")
R = TypeVar("R")

_active = False  # the process group was started here (`start`)
_seconds = 0.0  # wall time spent inside collectives since the last `take_seconds`


def world() -> int:
    """Ranks of this job (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return _active


def start() -> None:
    """Join the job torchrun launched (a no-op for a single process): gloo on CPU, nccl on CUDA, each rank on
    cuda:LOCAL_RANK. Before any vLLM engine starts: an engine started first takes the default group itself."""
    global _active
    if world() == 1 or _active:
        return
    setting = os.environ.get("LITE_RLHF_DIST_TIMEOUT", "1800")
    try:
        timeout = datetime.timedelta(seconds=float(setting))
    except ValueError:
        raise ConfigError(f"LITE_RLHF_DIST_TIMEOUT={setting!r} is not a number of seconds") from None
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        tdist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank()))
    else:
        tdist.init_process_group("gloo", timeout=timeout)
    _active = True


def finish() -> None:
    global _active
    if _active and tdist.is_initialized():
        tdist.destroy_process_group()
    _active = False


def device() -> str | None:
    """The device this rank trains and generates on: cuda:LOCAL_RANK under torchrun on CUDA, else the default."""
    return f"cuda:{local_rank()}" if _active and torch.cuda.is_available() else None


def _timed(fn: Callable[..., R], *args) -> R:
    global _seconds
    start_at = time.perf_counter()
    try:
        return fn(*args)
    finally:
        _seconds += time.perf_counter() - start_at


def take_seconds() -> float:
    """Seconds this rank spent in collectives (waiting for the others included) since the last call."""
    global _seconds
    out, _seconds = _seconds, 0.0
    return out


def barrier() -> None:
    if _active:
        _timed(tdist.barrier)


def all_gather(value: T) -> list[T]:
    """Every rank's `value` (any picklable object), in rank order."""
    if not _active:
        return [value]
    out: list[Any] = [None] * world()
    _timed(tdist.all_gather_object, out, value)
    return out


def map_sharded(items: Sequence[T], fn: Callable[[list[T]], list[R]]) -> list[R]:
    """`fn(items)`, computed as `fn` of every rank's share (items rank, rank + world, ...) and gathered back
    in the order of `items`; `fn` returns one result per item. The same on every rank."""
    if not _active:
        return list(fn(list(items)))
    mine = list(items[rank() :: world()])
    out = list(fn(mine)) if mine else []
    if len(out) != len(mine):
        raise AssertionError(f"map_sharded: {len(out)} results for {len(mine)} items")
    parts = all_gather(out)
    return [parts[i % world()][i // world()] for i in range(len(items))]


def my_part(step: list[list[int]]) -> list[list[int]]:
    """This rank's micro-batches of an optimizer step: every world-th micro-batch; a step with fewer
    micro-batches than ranks is split by example instead (a rank may get none)."""
    if not _active:
        return step
    if len(step) >= world():
        return step[rank() :: world()]
    examples = [i for mb in step for i in mb][rank() :: world()]
    return [examples] if examples else []


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over ranks (one all-reduce of them flattened); a rank without a
    micro-batch in the step adds zeros."""
    if not _active:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    _timed(tdist.all_reduce, flat)
    at = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[at : at + g.numel()].view_as(g).clone()
        at += g.numel()
