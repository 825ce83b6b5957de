"""PPO (loop.algorithm=ppo) with the value model as one more adapter on the shared base; the math is in
`actor_critic.py`, the policy loss is `policy_gradient.clipped_policy_loss` with per-token advantages. Before the
first iteration the value starts as a copy of the reward model's adapter and head, or fresh (`ppo.value_init`):
iter_000/value. Per iteration t:

    rollouts_t        = the iteration's scored answers (unscored and too long ones dropped), each with the
                        per-token log-probs of policy_{t-1} (old) and of π0 (ref) at the sampling temperature,
                        computed once by the trainer, and its score less the running mean of every score so far
                        (over their std with reward_norm=mean_std); the moments after this batch are
                        iter_t/reward_norm.json, which iteration t+1 reads: a resumed run continues them exactly
    value warm-up     (t = 1) `value_warmup_steps` optimizer steps of the value alone on the discounted returns
                        of rollouts_1 (as GAE with V = 0 and λ = 1); the policy does not move
    policy_t, value_t = from policy_{t-1} and value_{t-1} (after the warm-up at t = 1): the old values, per-token
                        rewards (the score on the last token, -kl_coef x (old - ref) on each) and GAE give the
                        advantages (whitened over the batch's tokens) and the value targets; then μ passes of the
                        clipped policy objective over the policy adapter, and μ passes of the clipped value loss
                        over the value adapter, through the same minibatches. The adapters share no trainable
                        weight (the base is frozen), so training one after the other equals interleaving them.

Log-probs and values come from the same hidden-states path (`SharedModel.hidden_states`): the fused log-prob
kernel for the policy and π0, the value head on the value role's hidden states; never the `[tokens, vocab]` logits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from lite_rlhf.algorithms.actor_critic import (
    RunningMoments,
    clipped_value_loss,
    explained_variance,
    gae,
    token_rewards,
    whiten,
)
from lite_rlhf.algorithms.grpo import Figures, per_token, scatter, scored_with_logps
from lite_rlhf.algorithms.policy_gradient import clipped_policy_loss, k3_kl
from lite_rlhf.batching import IGNORE, Row, make_batch
from lite_rlhf.config import Config, PPOConfig
from lite_rlhf.context import Context, derive_seed, update_policy
from lite_rlhf.data import DataError
from lite_rlhf.generate import Sample
from lite_rlhf.runstate import kill_point, read_json, read_jsonl
from lite_rlhf.train import Steps, group_by_length, longest_micro_batch, optimize, plan_steps


@dataclasses.dataclass
class Rollout:
    prompt_id: str
    index: int
    response_ids: list[int]
    score: float  # the oracle's, as ranked (after pairs.length_penalty)
    reward: float  # the score normalised by the running moments
    old_logps: list[float]  # per response token within data.max_length: policy_{t-1}, at the sampling temperature
    ref_logps: list[float]  # the same for π0


def start(ctx: Context) -> list:
    """The value role: a copy of the reward model, or fresh (`ppo.value_init`), committed as iter_000/value."""
    ctx.model.add_value(derive_seed(ctx.cfg, 0, "value"))
    name, path = "iter_000/value", ctx.rd.iter_dir(0) / "value"
    if not ctx.rd.done(name):
        if from_reward(ctx.cfg):
            ctx.model.copy_reward_to_value()
        ctx.rd.commit(name, {path: lambda tmp: ctx.model.save_value(tmp)})
    return []


def from_reward(cfg: Config) -> bool:
    ours = cfg.reward.kind == "bt" and not cfg.reward.model  # the oracle is our reward adapter and head
    return cfg.ppo.value_init == "reward" or (cfg.ppo.value_init == "auto" and ours)


def iteration(ctx: Context, t: int, samples: list[Sample], rewards: list[float | None], kept: list) -> list:
    """policy_t and value_t from this iteration's rollouts (after the value's warm-up at t = 1); nothing is kept."""
    batch = rollouts(ctx, t, samples, rewards)
    if t == 1 and ctx.cfg.ppo.value_warmup_steps:
        value_warmup(ctx, batch)
    value_path = ctx.rd.iter_dir(t) / "value"
    if not ctx.rd.done(f"iter_{t:03d}/policy"):
        ctx.model.load_value(value_before(ctx, t))  # what value_t is when nothing trains
    update_policy(ctx, t, "ppo", f"PPO on {len(batch)} answers", len(batch), lambda on_step: train_ppo(
        ctx, t, batch, seed=derive_seed(ctx.cfg, t, "ppo"), on_step=on_step,
    ), extra={value_path: lambda tmp: ctx.model.save_value(tmp)})  # fmt: skip
    return []


def value_before(ctx: Context, t: int):
    """The value adapter directory policy_t's update starts from."""
    if t == 1 and ctx.cfg.ppo.value_warmup_steps:
        return ctx.rd.iter_dir(1) / "value_warmup"
    return ctx.rd.iter_dir(t - 1) / "value"


# --------------------------------------------------------------------------- rollouts


def rollouts(ctx: Context, t: int, samples: list[Sample], rewards: list[float | None]) -> list[Rollout]:
    """The scored answers that fit data.max_length, with old and π0 log-probs and normalised scores."""
    name, path = f"iter_{t:03d}/rollouts", ctx.rd.iter_dir(t) / "rollouts.jsonl"
    if ctx.rd.done(name):
        return [Rollout(**row) for row in read_jsonl(path)]
    sec = ctx.cfg.ppo
    kept, old, ref, dropped, entropy = scored_with_logps(ctx, t, samples, rewards, sec.micro_batch, with_ref=True)
    moments = RunningMoments(**read_json(ctx.rd.iter_dir(t - 1) / "reward_norm.json")) if t > 1 else RunningMoments()
    scores = [r for _, r in kept]
    moments.update(scores)
    normed = scores if sec.reward_norm == "none" else moments.normalize(scores, scale=sec.reward_norm == "mean_std")
    made = [Rollout(s.prompt_id, s.index, s.token_ids, r, n, old[i], ref[i])
            for i, ((s, r), n) in enumerate(zip(kept, normed, strict=True))]  # fmt: skip
    record = {
        "stage": "rollouts",
        "iteration": t,
        "rollouts_kept": len(made),
        **{f"dropped_{k}": v for k, v in sorted(dropped.items())},
        "rollout_reward": sum(scores) / len(scores) if scores else 0.0,
        "rollout_reward_normalized": sum(normed) / len(normed) if normed else 0.0,
        "rollout_tokens": sum(len(s.token_ids) for s, _ in kept) / len(kept) if kept else 0.0,
        "rollout_entropy": entropy,
    }
    files = {path: [dataclasses.asdict(m) for m in made], ctx.rd.iter_dir(t) / "reward_norm.json": vars(moments)}
    ctx.rd.commit(name, files, [record])
    ctx.say(f"iteration {t}: {len(made)} answers to train on, dropped {dict(dropped)}")
    return made


# --------------------------------------------------------------------------- the value's warm-up and the update


def value_warmup(ctx: Context, batch: list[Rollout]) -> None:
    """`value_warmup_steps` optimizer steps of the value alone on rollouts_1's discounted returns."""
    name, out = "iter_001/value_warmup", ctx.rd.iter_dir(1) / "value_warmup"
    if ctx.rd.done(name):
        return
    sec = ctx.cfg.ppo
    ctx.model.load_value(ctx.rd.iter_dir(0) / "value")
    records: list[dict] = []
    if batch:
        per_step = sec.micro_batch * sec.grad_accum
        cycles = dataclasses.replace(sec, epochs=float(math.ceil(sec.value_warmup_steps * per_step / len(batch))))
        steps = plan_steps(len(batch), cycles, derive_seed(ctx.cfg, 1, "value"))[: sec.value_warmup_steps]
        targets = returns(ctx.cfg, batch, [[0.0] * len(r.old_logps) for r in batch], lam=1.0)[1]
        ctx.say(f"value warm-up: {len(steps)} steps on {len(batch)} answers; the policy does not move")
        ctx.engine.sleep()
        train_value(ctx, batch, None, targets, steps, clip=None, name="value warm-up", on_step=lambda rec: (
            records.append({"stage": "value_warmup", "iteration": 1, **rec}), kill_point(f"{name}:step")))
        ctx.engine.wake()
    ctx.rd.commit(name, {out: lambda tmp: ctx.model.save_value(tmp)}, records)


def train_ppo(ctx: Context, t: int, batch: list[Rollout], *, seed: int, on_step) -> None:
    """policy_t and value_t (in place) from policy_{t-1} and the value before t (both loaded by the caller)."""
    cfg, sec, model = ctx.cfg, ctx.cfg.ppo, ctx.model
    rows = [(ctx.ids[r.prompt_id], r.response_ids) for r in batch]
    old_values = per_token(model, rows, cfg.data, sec.micro_batch, model.values, "values", quiet=cfg.run.quiet)
    advantages, targets = returns(cfg, batch, old_values, lam=sec.lam)
    flat_v, flat_r = torch.tensor([x for v in old_values for x in v]), torch.tensor([x for v in targets for x in v])
    ones = torch.ones_like(flat_v, dtype=torch.bool)
    if sec.whiten_advantages:
        flat_a = whiten(torch.tensor([x for a in advantages for x in a]), ones)
        advantages = _split(flat_a.tolist(), advantages)
    on_step({"part": "advantages", "explained_variance": explained_variance(flat_v, flat_r, ones),
             "return_mean": float(flat_r.mean()), "value_mean": float(flat_v.mean())})  # fmt: skip
    lengths = [min(cfg.data.max_length, len(ctx.ids[r.prompt_id]) + len(r.response_ids)) for r in batch]
    steps = group_by_length(plan_steps(len(batch), sec, seed), lengths)
    model.fit_checkpointing("ppo", longest_micro_batch(steps, lengths), quiet=cfg.run.quiet)
    train_policy(ctx, batch, advantages, steps, on_step)
    train_value(ctx, batch, old_values, targets, steps, clip=sec.value_clip or None, name="ppo value",
                on_step=on_step)  # fmt: skip


def train_policy(ctx: Context, batch: list[Rollout], advantages: list[list[float]], steps: Steps, on_step) -> None:
    """The policy adapter (in place) on the clipped objective, plus ptx_coef x the mean NLL per token of windows of
    data.ptx (PPO-ptx: a micro-batch starting at rollout i reads windows i, i+1, ... of the text, cyclically, one
    per rollout). The windows' term is backpropagated after the policy's and in parts no larger than the policy
    micro-batch (rows x padded width; one window at least): the peak stays the policy micro-batch's, the one
    gradient checkpointing was sized for."""
    cfg, sec, model = ctx.cfg, ctx.cfg.ppo, ctx.model
    stats, ptx = Figures(), {"nll": 0.0, "n": 0}
    windows = ptx_windows(ctx) if sec.ptx_coef else []

    def micro_loss(indices: list[int]) -> Iterator[torch.Tensor]:
        b, mask = _batch(ctx, [batch[i] for i in indices])
        logp = model.token_logps(b, cfg.generation.temperature)
        old = scatter([batch[i].old_logps for i in indices], mask)
        adv = scatter([advantages[i] for i in indices], mask)
        loss, figures = clipped_policy_loss(logp, old, None, adv, mask, eps_low=sec.eps_low, eps_high=sec.eps_high,
                                            aggregation="token")  # fmt: skip
        figures["kl"] = k3_kl(logp.detach(), scatter([batch[i].ref_logps for i in indices], mask), mask)
        tokens = int(mask.sum())
        stats.add(loss.item() * tokens, tokens, figures, len(indices), tokens, True)
        yield loss * tokens  # the micro-batch's sum over tokens; the helper divides by the step's
        if windows:
            mine = [windows[(indices[0] + j) % len(windows)] for j in range(len(indices))]
            targets, per_part = sum(len(w) - 1 for w in mine), max(1, b.input_ids.numel() // max(map(len, mine)))
            nll = 0.0
            for k in range(0, len(mine), per_part):
                part = pretraining_nll(ctx, mine[k : k + per_part])
                nll += part.item()
                yield sec.ptx_coef * tokens * part / targets
            ptx["nll"], ptx["n"] = ptx["nll"] + nll / targets, ptx["n"] + 1

    def flush() -> dict:
        out = {"part": "policy", **stats.flush()}
        if windows:
            out["ptx_nll"] = ptx["nll"] / max(1, ptx["n"])
            ptx.update(nll=0.0, n=0)
        return out

    model.train()
    with model.role("policy"):
        optimize(model.parameters("policy"), sec, steps, micro_loss, flush, name="ppo policy", quiet=cfg.run.quiet,
                 on_step=on_step, weight=_tokens(batch))  # fmt: skip
    model.eval()


def train_value(ctx: Context, batch, old_values, targets, steps: Steps, *, clip, name: str, on_step) -> None:
    """The value adapter and head (in place) on the clipped value loss (`clip` None: plain squared error, and no
    old values needed), at ppo.value_lr."""
    cfg, model = ctx.cfg, ctx.model
    sums = {"value_loss": 0.0, "value_clip_fraction": 0.0, "tokens": 0}

    def micro_loss(indices: list[int]) -> torch.Tensor:
        b, mask = _batch(ctx, [batch[i] for i in indices])
        values = model.values(b)
        old = scatter([old_values[i] for i in indices], mask) if old_values is not None else values.detach()
        loss, figures = clipped_value_loss(values, old, scatter([targets[i] for i in indices], mask), mask, clip)
        tokens = int(mask.sum())
        sums["value_loss"] += loss.item() * tokens
        sums["value_clip_fraction"] += figures["value_clip_fraction"] * tokens
        sums["tokens"] += tokens
        return loss * tokens

    def flush() -> dict:
        n = max(1, sums["tokens"])
        out = {"part": "value", "value_loss": sums["value_loss"] / n,
               "value_clip_fraction": sums["value_clip_fraction"] / n, "tokens": sums["tokens"]}  # fmt: skip
        sums.update(value_loss=0.0, value_clip_fraction=0.0, tokens=0)
        return out

    value_sec = dataclasses.replace(cfg.ppo, lr=cfg.ppo.value_lr)
    model.train()
    optimize(model.parameters("value"), value_sec, steps, micro_loss, flush, name=name, quiet=cfg.run.quiet,
             on_step=on_step, weight=_tokens(batch))  # fmt: skip
    model.eval()


# --------------------------------------------------------------------------- helpers


def returns(cfg: Config, batch: list[Rollout], values: list[list[float]], lam: float):
    """Each answer's (advantages, returns) per token by GAE on its per-token rewards (`actor_critic`), all answers
    in one `[answers, longest]` pass."""
    sec: PPOConfig = cfg.ppo
    if not batch:
        return [], []
    lengths = [len(v) for v in values]
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]  # each answer's tokens, left-aligned
    dense = lambda rows: torch.zeros(mask.shape, dtype=torch.float64).masked_scatter(  # noqa: E731
        mask, torch.tensor([x for row in rows for x in row], dtype=torch.float64))
    scores = torch.tensor([r.reward for r in batch], dtype=torch.float64)
    rewards = token_rewards(scores, dense([r.old_logps for r in batch]), dense([r.ref_logps for r in batch]), mask,
                            sec.kl_coef)  # fmt: skip
    adv, ret = gae(rewards, dense(values), mask, sec.gamma, lam)
    return [a[:n].tolist() for a, n in zip(adv, lengths, strict=True)], [
        r[:n].tolist() for r, n in zip(ret, lengths, strict=True)]  # fmt: skip


def ptx_windows(ctx: Context) -> list[list[int]]:
    """data.ptx's tokens in windows of data.max_length (the last one kept when it holds two tokens or more)."""
    text = Path(ctx.cfg.data.ptx).read_text(encoding="utf-8")
    ids = ctx.model.tokenizer(text, add_special_tokens=False)["input_ids"]
    width = ctx.cfg.data.max_length
    windows = [ids[i : i + width] for i in range(0, len(ids), width)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise DataError(f"{ctx.cfg.data.ptx}: fewer than two tokens of text for ppo.ptx_coef")
    return windows


def pretraining_nll(ctx: Context, windows: list[list[int]]) -> torch.Tensor:
    """The active role's summed NLL over `windows` (every token after each window's first), through the fused
    log-prob kernel."""
    rows: list[Row] = [(w[:1], w[1:]) for w in windows]
    b = make_batch(rows, ctx.model.pad_id, ctx.cfg.data.max_length, ctx.cfg.data.truncation)
    return -ctx.model.token_logps(b).sum()


def _split(flat: list[float], like) -> list[list[float]]:
    out, at = [], 0
    for part in like:
        out.append(flat[at : at + len(part)])
        at += len(part)
    return out


def _batch(ctx: Context, chunk: list[Rollout]):
    rows: list[Row] = [(ctx.ids[r.prompt_id], r.response_ids) for r in chunk]
    b = make_batch(rows, ctx.model.pad_id, ctx.cfg.data.max_length, ctx.cfg.data.truncation)
    return b, (b.targets != IGNORE).to(ctx.model.device)


def _tokens(batch: list[Rollout]):
    return lambda mb: sum(len(batch[i].old_logps) for i in mb)
