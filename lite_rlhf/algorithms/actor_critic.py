r"""PPO's actor-critic math: per-token rewards, GAE, the clipped value loss, a running reward normaliser. Plain
torch on ``[answers, tokens]`` tensors whose answer tokens are marked by ``mask`` (one contiguous run per row, as
`batching.make_batch` lays them out); the loop's stages are in `ppo.py`, the policy loss is `policy_gradient`'s
token-level clipped objective with per-token advantages.

PPO: Schulman et al. 2017, arXiv:1707.06347; GAE: Schulman et al. 2016, arXiv:1506.02438; the RLHF form (the KL to
π0 as a per-token reward, the oracle's score on the last token): Ziegler et al. 2019, Ouyang et al. 2022.

Per-token reward of an answer with last token L, oracle score s (normalised), old policy and π0 log-probs::

    r_t = -kl_coef (old_t - ref_t) + [t = L] s

GAE over the answer's tokens, with V_{L+1} = 0 (the answer ends the episode)::

    delta_t = r_t + gamma V_{t+1} - V_t
    A_t     = delta_t + gamma lambda A_{t+1}          (A_{L+1} = 0)
    R_t     = A_t + V_t                               the value's target

The clipped value loss (as OpenAI's baselines and the Qwen report, clip c), a mean over the answer tokens::

    V_clip = V_old + clip(V - V_old, -c, c)
    L_V    = 1/2 mean_t max((V_t - R_t)^2, (V_clip_t - R_t)^2)

The running normaliser keeps the count, mean and sum of squared deviations of every score seen (Chan et al.'s
parallel form of Welford's update), and maps a score to s - mean (or (s - mean) / std).
"""

from __future__ import annotations

import dataclasses
import math

import torch


def token_rewards(
    scores: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """``[R, T]`` per-token rewards (module docstring) from ``scores`` ``[R]`` and ``[R, T]`` log-probs; 0 off
    the answers. ``ref_logp`` may be None when ``kl_coef`` is 0."""
    mask = mask.to(old_logp.dtype)
    rewards = torch.zeros_like(old_logp)
    if kl_coef:
        rewards = -kl_coef * (old_logp - ref_logp) * mask
    last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(dim=1)  # each row's last answer token
    rewards[torch.arange(len(last), device=mask.device), last] += scores.to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each ``[R, T]`` and 0 off the answers, by the backward recursion of the module
    docstring over each row's answer tokens."""
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])  # A_{t+1}
    next_value = torch.zeros_like(values[:, 0])  # V_{t+1}
    for t in reversed(range(values.shape[1])):
        on = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        advantages[:, t] = torch.where(on, step, torch.zeros_like(step))
        running = torch.where(on, step, running)
        next_value = torch.where(on, values[:, t], next_value)
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` less its mean over the answer tokens, over their std (0 off the answers)."""
    mask = mask.to(x.dtype)
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_V of the module docstring (``clip`` None: the plain squared error), a mean over the answer tokens; and
    detached figures: ``value_clip_fraction`` (tokens where the clipped term was the larger)."""
    mask = mask.to(values.dtype)
    plain = (values - returns) ** 2
    if clip is None:
        per_token, clipped_share = plain, 0.0
    else:
        v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
        clipped = (v_clip - returns) ** 2
        per_token = torch.maximum(plain, clipped)
        with torch.no_grad():
            clipped_share = float(((clipped > plain).to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1))
    loss = 0.5 * (per_token * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"value_clip_fraction": clipped_share}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the answer tokens: 1 a perfect value, 0 no better than the mean."""
    on = mask.bool()
    r, v = returns[on].double(), values[on].double()
    var = r.var(unbiased=False)
    return float(1 - (r - v).var(unbiased=False) / var) if var > 0 else float("nan")


@dataclasses.dataclass
class RunningMoments:
    """The running mean and variance of every score seen (module docstring); part of the run state."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 1.0

    def update(self, xs: list[float]) -> None:
        if not xs:
            return
        n, mean = len(xs), sum(xs) / len(xs)
        m2 = sum((x - mean) ** 2 for x in xs)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    def normalize(self, xs: list[float], scale: bool) -> list[float]:
        std = self.std if scale and self.std > 0 else 1.0
        return [(x - self.mean) / std for x in xs]
