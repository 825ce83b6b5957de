"""What every stage of the loop sees, and the policy update they share.

`Context` carries the run directory, the config, the task, the shared model, the engine, the oracle and the
prompts' token ids. `update_policy` trains policy_t from policy_{t-1} with the engine asleep and commits it; an
algorithm (`lite_rlhf/algorithms/`) calls it with its own training step. With loop.keep_optimizer the optimizer's
moments go from one update to the next (`train.carrying`), saved beside each policy (iter_t/optimizer/) so that a
killed run resumes with them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import torch

from lite_rlhf import dist
from lite_rlhf.config import Config
from lite_rlhf.generate import LazyEngine
from lite_rlhf.roles import SharedModel
from lite_rlhf.runstate import RunDir, kill_point
from lite_rlhf.scoring import Oracle
from lite_rlhf.task import Task
from lite_rlhf.train import carrying

OPTIMIZER = "optimizer"  # iter_t/optimizer/state.pt: the optimizer states after update t (loop.keep_optimizer)


@dataclasses.dataclass
class Context:
    rd: RunDir
    cfg: Config
    task: Task
    model: SharedModel
    engine: LazyEngine
    oracle: Oracle
    ids: dict[str, list[int]]  # prompt id -> prompt token ids, under the one chat template
    say: Say


class Say:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, *args) -> None:
        if not self.quiet:
            print("[lite-rlhf]", *args, flush=True)


def derive_seed(cfg: Config, t: int, purpose: str) -> int:
    """A seed per (run seed, iteration, purpose), stable across runs and resumes."""
    codes = {"generate": 1, "dpo": 2, "eval": 3, "noise": 4, "raft": 5, "grpo": 6, "rloo": 7, "ppo": 8, "value": 9}
    code = codes[purpose]
    return (cfg.run.seed * 1_000_003 + t * 101 + code) % (2**31 - 1)


def commit_policy(ctx: Context, t: int, records: list[dict] = (), extra: dict | None = None) -> None:
    name = f"iter_{t:03d}/policy"
    if not ctx.rd.done(name):
        policy = {ctx.rd.iter_dir(t) / "policy": lambda tmp: ctx.model.save_adapter("policy", tmp)}
        ctx.rd.commit(name, policy | (extra or {}), records)


def update_policy(ctx: Context, t: int, stage: str, what: str, n: int, train, extra: dict | None = None) -> None:
    """policy_t = `train(on_step)` from policy_{t-1}, with the engine asleep, committed with `extra` (files
    trained beside it: PPO's value). Killed inside, it restarts from the previous policy with the same seed, so the
    result is identical."""
    name = f"iter_{t:03d}/policy"
    if ctx.rd.done(name):
        return
    ctx.model.load_adapter("policy", ctx.rd.iter_dir(t - 1) / "policy")
    keep = ctx.cfg.loop.keep_optimizer
    states = read_optimizer(ctx.rd.iter_dir(t - 1) / OPTIMIZER) if keep else {}
    records: list[dict] = []
    if not n:  # said whatever run.quiet: a run that trains on nothing is not done (loop.main_run)
        if dist.is_main():
            print(f"lite-rlhf: warning: iteration {t} has nothing to train on ({what}); the policy is unchanged",
                  file=sys.stderr, flush=True)  # fmt: skip
    else:
        ctx.say(f"iteration {t}: {what}")
        ctx.engine.sleep()
        with carrying(states) if keep else contextlib.nullcontext():
            train(lambda rec: (records.append({"stage": stage, "iteration": t, **rec}), kill_point(f"{name}:step")))
        ctx.engine.wake()
    if keep:  # the states as they are after this update (unchanged when it trained on nothing)
        extra = (extra or {}) | {ctx.rd.iter_dir(t) / OPTIMIZER: lambda tmp: torch.save(states, tmp / "state.pt")}
    commit_policy(ctx, t, records, extra)


def read_optimizer(path: Path) -> dict[str, dict]:
    """The optimizer states saved after an update ({} before the first: iter_000 has none)."""
    f = path / "state.pt"
    return torch.load(f, map_location="cpu", weights_only=True) if f.exists() else {}
