r"""The critic-free policy-gradient family, GRPO and RLOO: advantages from each prompt's group of n answers, and
the token-level clipped-ratio objective with a KL penalty to π0. Plain torch on ``[answers, tokens]`` log-probs
(the fused kernel gives them without the logits); the loop's stages come with the algorithm modules.

Advantages. A group is one prompt's n answers with rewards r_1..r_n; an unscored answer (reward None, NaN here)
is left out of its group's statistics and gets advantage 0, as does every answer of a group with no signal
(fewer than two scored answers, or all scored rewards equal)::

    grpo   A_i = (r_i - mean(r)) / (std(r) + 1e-4)     DeepSeekMath (Shao et al. 2024, arXiv:2402.03300), sec. 4.1.2;
                                                      std with Bessel's correction, as torch.std
           A_i =  r_i - mean(r)                       scale=False: Dr. GRPO (Liu et al. 2025, arXiv:2503.20783)
    rloo   A_i =  r_i - (sum_{j != i} r_j) / (m - 1)   the leave-one-out baseline over the m scored answers
                                                      (Ahmadian et al. 2024, arXiv:2402.14740)

Loss. With per-token log-probs ``logp`` of the policy being trained, ``old`` of the policy that sampled (equal to
``logp`` in value when each batch is used once: the ratio is then 1 and only its gradient acts) and ``ref`` of π0,
over the answer tokens (``mask``)::

    ratio_t = exp(logp_t - old_t)
    loss_t  = -min(ratio_t A, clip(ratio_t, 1 - eps_low, 1 + eps_high) A) + beta k3_t     (eps_high: DAPO's upper clip)
    k3_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                                   (Schulman's k3, >= 0)

aggregated by ``aggregation``: ``sequence`` (each answer's token mean, then the mean over answers: GRPO as
published), ``token`` (the sum over every token of the batch over their number: DAPO), ``constant`` (the sum over
every token over answers x max_tokens: Dr. GRPO, no length bias). Also returned: the share of tokens whose ratio
was clipped and the mean k3 per token.

RLOO as its paper and TRL's RLOOTrainer run it works on whole answers: the KL to π0 enters the reward
(r - beta sum_t (old_t - ref_t), the first-order estimate summed over the answer: `kl_penalized`), and the ratio
is the answer's (exp of the summed log-prob difference), clipped the same way, averaged over answers
(`sequence_policy_loss`).
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["sequence", "token", "constant"]


def group_advantages(
    rewards: torch.Tensor, estimator: Literal["grpo", "rloo"], scale: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards ``[groups, n]`` (NaN: unscored) -> (advantages ``[groups, n]``, fp64 like the rewards, 0 where
    unscored or without signal; ``has_signal`` ``[groups]`` bool)."""
    rewards = rewards.double()
    scored = ~torch.isnan(rewards)
    m = scored.sum(dim=1, keepdim=True)
    filled = torch.where(scored, rewards, torch.zeros_like(rewards))
    total = filled.sum(dim=1, keepdim=True)
    mean = total / m.clamp(min=1)
    spread = torch.where(scored, (rewards - mean) ** 2, torch.zeros_like(rewards)).sum(dim=1, keepdim=True)
    std = (spread / (m - 1).clamp(min=1)).sqrt()
    has_signal = (m.squeeze(1) >= 2) & (std.squeeze(1) > 0)
    if estimator == "grpo":
        adv = rewards - mean
        if scale:
            adv = adv / (std + 1e-4)
    elif estimator == "rloo":
        adv = rewards - (total - filled) / (m - 1).clamp(min=1)
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r}; valid: grpo, rloo")
    keep = scored & has_signal.unsqueeze(1)
    return torch.where(keep, adv, torch.zeros_like(adv)), has_signal


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    aggregation: Aggregation = "sequence",
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of ``R`` answers from ``[R, T]`` per-token log-probs (module docstring); ``advantages`` ``[R]`` (one
    per answer) or ``[R, T]`` (per token: PPO's GAE), ``mask`` ``[R, T]`` (1 on answer tokens). ``ref_logp``
    may be None when ``beta`` is 0. Returns the loss
    (0-dim, differentiable through ``logp``) and detached figures: ``clip_fraction``, ``kl``."""
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logp)
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = k3(logp, ref_logp)
        per_token = per_token + beta * kl
    tokens = mask.sum().clamp(min=1)
    if aggregation == "sequence":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    elif aggregation == "token":
        loss = (per_token * mask).sum() / tokens
    elif aggregation == "constant":
        if not max_tokens:
            raise ValueError("aggregation 'constant' divides by answers x max_tokens: give max_tokens")
        loss = (per_token * mask).sum() / (logp.shape[0] * max_tokens)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: sequence, token, constant")
    with torch.no_grad():
        was_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        figures = {
            "clip_fraction": float((was_clipped.to(mask.dtype) * mask).sum() / tokens),
            "kl": float((kl * mask).sum() / tokens),
        }
    return loss, figures


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(π‖π0) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """The mean k3 over the tokens of `mask` (a figure, no gradient)."""
    with torch.no_grad():
        mask = mask.to(logp.dtype)
        return float((k3(logp, ref_logp) * mask).sum() / mask.sum().clamp(min=1))


def kl_penalized(
    rewards: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """RLOO's reward: r - beta x the answer's summed first-order log-ratio to π0 (``[R]``; NaN stays NaN)."""
    kl = ((old_logp - ref_logp) * mask.to(old_logp.dtype)).sum(dim=1)
    return rewards - beta * kl.to(rewards.dtype)


def sequence_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """RLOO's loss: the clipped objective on each answer's ratio exp(sum_t logp_t - sum_t old_t), mean over answers."""
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    ratio = torch.exp(((logp - old_logp) * mask).sum(dim=1))
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.minimum(ratio * adv, clipped * adv).mean()
    with torch.no_grad():
        was_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return loss, {"clip_fraction": float(was_clipped.float().mean())}
