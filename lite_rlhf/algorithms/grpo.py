"""GRPO and RLOO (loop.algorithm=grpo | rloo): every answer of the iteration trains, weighted by how it did
against the other answers to its prompt; the math is in `policy_gradient.py`, the stages here. Per iteration t:

    rollouts_t = the iteration's scored answers (unscored ones dropped), each with the per-token log-probs of
                 policy_{t-1} (`old`: the policy that sampled) and of π0 (`ref`: the base with adapters off,
                 when beta > 0), both at the sampling temperature and computed once, by the trainer; then each
                 prompt's group gives the advantages (GRPO: against the group's mean, over its std; RLOO: against
                 the mean of the others, on the reward less beta x the answer's log-ratio to π0); a group whose
                 rewards are all equal has no signal: counted, and dropped unless `drop_no_signal` is false
    policy_t   = `epochs` (μ) passes of the clipped objective over rollouts_t, from policy_{t-1}

The old log-probs are the trainer's, not the engine's sampler's: the ratio of the first step is then 1 (up to
the rounding of another batch's shapes) whatever the engine computes in (vLLM samples in bf16 on GPUs; its
log-probs differ from the trainer's there, and at a temperature other than 1 the sampler reports the unscaled
ones). It costs one forward pass without gradient per answer, beside the two (forward and backward) of each update.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from lite_rlhf import dist
from lite_rlhf.algorithms.policy_gradient import (
    clipped_policy_loss,
    group_advantages,
    k3_kl,
    kl_penalized,
    sequence_policy_loss,
)
from lite_rlhf.batching import IGNORE, Row, fits, make_batch
from lite_rlhf.config import Config, DataConfig, GRPOConfig, RLOOConfig
from lite_rlhf.context import Context, derive_seed, update_policy
from lite_rlhf.generate import Sample
from lite_rlhf.runstate import kill_point, read_jsonl
from lite_rlhf.train import group_by_length, longest_micro_batch, optimize, plan_steps


@dataclasses.dataclass
class Rollout:
    prompt_id: str
    index: int
    response_ids: list[int]
    reward: float  # as ranked (after pairs.length_penalty)
    advantage: float
    old_logps: list[float]  # per response token within data.max_length: policy_{t-1}, at the sampling temperature
    ref_logps: list[float] | None  # the same for π0; None when beta is 0


def section(cfg: Config) -> GRPOConfig | RLOOConfig:
    return cfg.grpo if cfg.loop.algorithm == "grpo" else cfg.rloo


def start(ctx: Context) -> list:
    return []


def iteration(ctx: Context, t: int, samples: list[Sample], rewards: list[float | None], kept: list) -> list:
    """policy_t = the policy-gradient update on this iteration's answers, from policy_{t-1}; nothing is kept."""
    batch = rollouts(ctx, t, samples, rewards)
    algo = ctx.cfg.loop.algorithm
    update_policy(ctx, t, algo, f"{algo.upper()} on {len(batch)} answers", len(batch), lambda on_step: train_pg(
        ctx.model, batch, ctx.ids, ctx.cfg, seed=derive_seed(ctx.cfg, t, algo), quiet=ctx.cfg.run.quiet,
        on_step=on_step,
    ))  # fmt: skip
    return []


# --------------------------------------------------------------------------- rollouts


def rollouts(ctx: Context, t: int, samples: list[Sample], rewards: list[float | None]) -> list[Rollout]:
    """The scored answers that fit data.max_length, with their old and π0 log-probs and their advantages."""
    name, path = f"iter_{t:03d}/rollouts", ctx.rd.iter_dir(t) / "rollouts.jsonl"
    if ctx.rd.done(name):
        return [Rollout(**row) for row in read_jsonl(path)]
    cfg, sec = ctx.cfg, section(ctx.cfg)
    kept, old, ref, dropped, entropy = scored_with_logps(ctx, t, samples, rewards, sec.micro_batch,
                                                         with_ref=bool(sec.beta))  # fmt: skip
    scored = [(s, r) for s, r in zip(samples, rewards, strict=True) if r is not None]
    made = [Rollout(s.prompt_id, s.index, s.token_ids, r, 0.0, old[i], ref[i] if ref else None)
            for i, (s, r) in enumerate(kept)]  # fmt: skip
    made, groups, with_signal = with_advantages(made, cfg)
    if sec.drop_no_signal:
        made = [m for m in made if m.prompt_id in with_signal]
    dropped["no_signal"] = len(kept) - len(made)
    record = {
        "stage": "rollouts",
        "iteration": t,
        "rollouts_kept": len(made),
        **{f"dropped_{k}": v for k, v in sorted(dropped.items())},
        "rollout_reward": sum(r for _, r in scored) / len(scored) if scored else 0.0,
        "rollout_tokens": sum(len(s.token_ids) for s, _ in scored) / len(scored) if scored else 0.0,
        "signal_share": len(with_signal) / groups if groups else 0.0,
        "rollout_entropy": entropy,
    }
    ctx.rd.commit(name, {path: [dataclasses.asdict(m) for m in made]}, [record])
    ctx.say(f"iteration {t}: {len(made)} answers to train on; {len(with_signal)} of {groups} groups with signal, "
            f"dropped {dict(dropped)}")  # fmt: skip
    return made


def scored_with_logps(
    ctx: Context, t: int, samples: list[Sample], rewards: list[float | None], micro_batch: int, *, with_ref: bool
) -> tuple[list[tuple[Sample, float]], list, list | None, Counter, float]:
    """The scored answers that fit data.max_length, with the per-token log-probs of the policy that sampled them
    (policy_{t-1}) and of π0 (`with_ref`), at the sampling temperature, computed once by the trainer; the drops
    counted (unscored, too long); and the sampling policy's mean entropy per token on these answers (from the
    same forward passes as its log-probs). The rollouts stage of GRPO, RLOO and PPO."""
    d, temperature, quiet = ctx.cfg.data, ctx.cfg.generation.temperature, ctx.cfg.run.quiet
    dropped = Counter(unscored=sum(r is None for r in rewards))
    scored = [(s, r) for s, r in zip(samples, rewards, strict=True) if r is not None]
    kept = [(s, r) for s, r in scored if fits([(ctx.ids[s.prompt_id], s.token_ids)], d.max_length, d.truncation)]
    dropped["too_long"] = len(scored) - len(kept)
    rows = [(ctx.ids[s.prompt_id], s.token_ids) for s, _ in kept]
    ctx.model.load_adapter("policy", ctx.rd.iter_dir(t - 1) / "policy")  # the policy that sampled them
    kill_point(f"iter_{t:03d}/rollouts:logps")
    old, ent = token_logps(ctx.model, "policy", rows, d, micro_batch, temperature, quiet=quiet, entropy=True)
    ref = token_logps(ctx.model, "reference", rows, d, micro_batch, temperature, quiet=quiet) if with_ref else None
    tokens = sum(map(len, ent))
    return kept, old, ref, dropped, sum(map(sum, ent)) / tokens if tokens else 0.0


def with_advantages(made: list[Rollout], cfg: Config) -> tuple[list[Rollout], int, set[str]]:
    """The rollouts with their advantages (`group_advantages` over each prompt's answers; RLOO on the reward less
    beta x the answer's log-ratio to π0), the number of groups, and the prompts whose group has signal."""
    algo, sec = cfg.loop.algorithm, section(cfg)
    prompts = list(dict.fromkeys(m.prompt_id for m in made))
    at = {p: g for g, p in enumerate(prompts)}
    reward = torch.tensor([m.reward for m in made], dtype=torch.float64)
    if algo == "rloo" and sec.beta and made:  # each answer's summed log-probs: one "token" per answer
        old = torch.tensor([[sum(m.old_logps)] for m in made], dtype=torch.float64)
        ref = torch.tensor([[sum(m.ref_logps)] for m in made], dtype=torch.float64)
        reward = kl_penalized(reward, old, ref, torch.ones_like(old), sec.beta)
    table = torch.full((len(prompts), cfg.generation.n), float("nan"), dtype=torch.float64)
    for m, r in zip(made, reward.tolist(), strict=True):
        table[at[m.prompt_id], m.index] = r
    adv, signal = group_advantages(table, algo, scale=getattr(sec, "scale_advantages", True))
    out = [dataclasses.replace(m, advantage=float(adv[at[m.prompt_id], m.index])) for m in made]
    return out, len(prompts), {p for p in prompts if signal[at[p]]}


def token_logps(
    model, role: str, rows: list[Row], d: DataConfig, micro_batch: int, temperature: float, *, quiet: bool,
    entropy: bool = False,
):  # fmt: skip
    """Each row's per-response-token log-probs under `role` at `temperature`, without gradient, in batches of
    similar length; returned in the order given. Under torchrun each rank computes its share. With `entropy`,
    (log-probs, per-token entropies of the same distributions), from the same forward passes."""

    def logps(batch):
        with model.role(role):
            return torch.stack(model.token_logps(batch, temperature, entropy=True), -1) if entropy else (
                model.token_logps(batch, temperature))  # fmt: skip

    out = per_token(model, rows, d, micro_batch, logps, f"{role} log-probs", quiet=quiet)
    if not entropy:
        return out
    return [[lp for lp, _ in row] for row in out], [[h for _, h in row] for row in out]


def per_token(model, rows: list[Row], d: DataConfig, micro_batch: int, fn, desc: str, *, quiet: bool):
    """`fn(batch)` (a `[B, T]` figure per token: log-probs, values) of each row's response tokens, without
    gradient, in batches of similar length; returned in the order given. Under torchrun each rank computes its
    share."""
    return dist.map_sharded(rows, lambda part: _per_token(model, part, d, micro_batch, fn, desc, quiet))


def _per_token(model, rows: list[Row], d: DataConfig, micro_batch: int, fn, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
    out: list[list[float] | None] = [None] * len(rows)
    model.eval()
    with torch.no_grad():
        for at in tqdm(range(0, len(rows), micro_batch), desc=desc, unit="batch", disable=quiet):
            chunk = order[at : at + micro_batch]
            batch = make_batch([rows[i] for i in chunk], model.pad_id, d.max_length, d.truncation)
            values, scored = fn(batch).float().cpu(), batch.targets != IGNORE
            for j, i in enumerate(chunk):
                out[i] = values[j][scored[j]].tolist()
    return out


# --------------------------------------------------------------------------- the update


def train_pg(
    model, batch: list[Rollout], ids: dict[str, list[int]], cfg: Config, *, seed: int, quiet: bool, on_step
) -> None:
    """`epochs` passes of GRPO's (or RLOO's) clipped objective over `batch` on the policy adapter (in place);
    one record per optimizer step: loss, clip fraction, KL to π0 (k3, per token; with beta > 0), tokens."""
    algo, sec, d = cfg.loop.algorithm, section(cfg), cfg.data
    by_token = algo == "grpo" and sec.aggregation == "token"
    stats = Figures()

    def micro_loss(indices: list[int]) -> torch.Tensor:
        chunk = [batch[i] for i in indices]
        rows = [(ids[r.prompt_id], r.response_ids) for r in chunk]
        b = make_batch(rows, model.pad_id, d.max_length, d.truncation)
        mask = (b.targets != IGNORE).to(model.device)
        logp = model.token_logps(b, cfg.generation.temperature)  # [B, T], 0 off the response
        old = scatter([r.old_logps for r in chunk], mask)
        ref = scatter([r.ref_logps for r in chunk], mask) if sec.beta else None
        adv = torch.tensor([r.advantage for r in chunk], dtype=torch.float32, device=model.device)
        clip = {"eps_low": sec.eps_low, "eps_high": sec.eps_high}
        if algo == "grpo":
            loss, figures = clipped_policy_loss(logp, old, ref, adv, mask, beta=sec.beta, aggregation=sec.aggregation,
                                                max_tokens=cfg.generation.max_new_tokens, **clip)  # fmt: skip
        else:
            loss, figures = sequence_policy_loss(logp, old, adv, mask, **clip)
            figures["kl"] = k3_kl(logp.detach(), ref, mask) if ref is not None else 0.0
        tokens = int(mask.sum())
        total = loss * (tokens if by_token else len(chunk))  # the micro-batch's sum; the helper divides by the step's
        stats.add(float(total), tokens if by_token else len(chunk), figures, len(chunk), tokens, algo == "grpo")
        return total

    lengths = [min(d.max_length, len(ids[r.prompt_id]) + len(r.response_ids)) for r in batch]
    steps = group_by_length(plan_steps(len(batch), sec, seed), lengths)
    weight = (lambda mb: sum(len(batch[i].old_logps) for i in mb)) if by_token else len
    model.fit_checkpointing(algo, longest_micro_batch(steps, lengths), quiet=quiet)
    model.train()
    with model.role("policy"):
        optimize(model.parameters("policy"), sec, steps, micro_loss, stats.flush, name=algo, quiet=quiet,
                 on_step=on_step, weight=weight)  # fmt: skip
    model.eval()


def scatter(rows: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    """Per-token lists back onto the `[B, T]` positions of `mask` (row-major, as they were read off)."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    out[mask] = torch.tensor([x for r in rows for x in r], dtype=torch.float32, device=mask.device)
    return out


class Figures:
    """One optimizer step's figures: the loss (normalized as the helper does), the clip fraction (over tokens for
    GRPO, answers for RLOO), the KL per token, the tokens."""

    def __init__(self):
        self.total, self.weight, self.clip, self.clip_n, self.kl, self.tokens = 0.0, 0, 0.0, 0, 0.0, 0

    def add(self, total: float, weight: int, figures: dict, answers: int, tokens: int, per_token_clip: bool) -> None:
        self.total += total
        self.weight += weight
        n = tokens if per_token_clip else answers
        self.clip += figures["clip_fraction"] * n
        self.clip_n += n
        self.kl += figures["kl"] * tokens
        self.tokens += tokens

    def flush(self) -> dict:
        out = {
            "loss": self.total / max(1, self.weight),
            "clip_fraction": self.clip / max(1, self.clip_n),
            "kl": self.kl / max(1, self.tokens),
            "tokens": self.tokens,
        }
        self.__init__()
        return out
