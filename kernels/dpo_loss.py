r"""DPO-family losses on sequence log-probs: ``sigmoid`` (DPO, with cDPO label smoothing), ``ipo``, ``hinge``,
and TRL's other pairwise losses.

For one pair, with policy log-probs ``pc, pr`` and reference log-probs ``rc, rr`` of the chosen and
rejected answers, the implicit reward margin is ``h = (pc - rc) - (pr - rr)`` and

- ``sigmoid`` (DPO, Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, eq. 7), with the
  conservative-DPO label smoothing ``eps`` (cDPO, Mitchell 2023, https://ericmitchell.ai/cdpo.pdf:
  a fraction ``eps`` of the labels is assumed flipped)::

      L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
      dL/dh = beta [ -(1 - eps) sigma(-beta h) + eps sigma(beta h) ]      since d/dx log sigma(x) = sigma(-x)

  With ``eps = 0``, ``h = 0``: ``L = log 2 = 0.6931``, ``dL/dh = -beta / 2``.

- ``ipo`` (Azar et al. 2023, https://arxiv.org/abs/2310.12036, eq. 17, beta is their tau)::

      L = (h - 1 / (2 beta))^2,     dL/dh = 2 (h - 1 / (2 beta))

  IPO is meant for length-averaged log-probs (TRL divides each sequence's log-ratio by its number of
  completion tokens, as the IPO authors confirmed); :func:`fused_dpo_loss` does that averaging. This
  function takes whatever log-probs it is given.

- ``hinge`` (SLiC, Zhao et al. 2023, https://arxiv.org/abs/2305.10425, the calibration loss with
  margin 1/beta, scaled by beta as in TRL)::

      L = max(0, 1 - beta h),       dL/dh = -beta if beta h < 1 else 0

TRL's other pairwise losses, each with TRL 1.16's meaning (``DPOTrainer``; ``c``/``r`` below are the chosen and
rejected log-ratios ``p - ref``, ``eps`` is ``label_smoothing``, ``s`` the sigmoid, ``ls`` log-sigmoid):

- ``robust`` (Chowdhury et al. 2024, arXiv:2403.00409): ``[-(1-eps) ls(beta h) + eps ls(-beta h)] / (1 - 2 eps)``,
  unbiased under a known rate ``eps`` of flipped labels;
- ``exo_pair`` (Ji et al. 2024, arXiv:2402.00856, eq. 16): ``q log(q / (1-eps)) + (1-q) log((1-q) / eps)`` with
  ``q = s(beta h)`` (needs ``eps`` > 0);
- ``nca_pair`` (Chen et al. 2024): ``-ls(beta c) - ls(-beta c) / 2 - ls(-beta r) / 2``;
- ``bco_pair``: ``-ls(beta c) - ls(-beta r)`` (TRL's form, without BCO's running reward mean);
- ``sppo_hard`` (Wu et al. 2024, arXiv:2405.00675, hard probabilities): ``(c - 1/(2 beta))^2 + (r + 1/(2 beta))^2``;
- ``aot``, ``aot_unpaired`` (Melnyk et al. 2024, arXiv:2406.05882): the sigmoid loss on the sorted-within-batch
  log-ratio differences (policy vs reference for ``aot``, chosen vs rejected log-ratios for ``aot_unpaired``); a
  micro-batch's pairs act together, as in TRL;
- ``apo_zero``, ``apo_down`` (D'Oosterlinck et al. 2024, arXiv:2408.06266, eqs. 7 and 8):
  ``1 - s(beta c) + s(beta r)`` and ``s(beta c) + 1 - s(beta h)``;
- ``discopop`` (Chris Lu et al. 2024, arXiv:2406.08414, eq. 5): with ``x = beta h`` and ``m = s(x / tau)``,
  ``-ls(x) (1 - m) + exp(-x) m``;
- ``sigmoid_norm``: the sigmoid loss on length-averaged log-probs (as ``ipo``, :func:`fused_dpo_loss` averages).

Two more, beyond TRL's ``DPOTrainer``:

- ``simpo`` (Meng et al. 2024, arXiv:2405.14734, eq. 6), reference-free: with ``pc, pr`` the length-averaged
  policy log-probs (:func:`fused_dpo_loss` averages) and the target margin ``gamma``,
  ``-(1-eps) ls(beta (pc - pr) - gamma) - eps ls(-(beta (pc - pr) - gamma))`` (the label smoothing as TRL's
  CPO trainer applies it to SimPO); the reference log-probs are not read, and the rewards are ``beta p``;
- ``sft``: the chosen answers' mean NLL per token, over the tokens of the batch (TRL's ``sft`` term, RPO's
  regulariser): a token-level term, computed by :func:`fused_dpo_loss` from the per-token log-probs, not here.

The loss is the mean over pairs. ``dh/dpc = 1``, ``dh/dpr = -1``; gradients reach only the policy
log-probs (reference log-probs are data). The rewards ``beta (p - r)`` of each answer are returned
detached, for logging (reward accuracy, margins).

Dtypes: inputs of any float dtype are computed in fp32; outputs are fp32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "simpo")  # fmt: skip
SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo")  # the losses that read label_smoothing
LENGTH_AVERAGED = ("ipo", "sigmoid_norm", "simpo")  # on log-probs per token (fused_dpo_loss divides by the counts)
REFERENCE_FREE = ("sft", "simpo")  # the losses that never read π0's log-probs
DISCOPOP_TAU = 0.05  # discopop's temperature: TRL's default (DPOConfig.discopop_tau)
SIMPO_GAMMA = 0.5  # SimPO's target margin: TRL's default (CPOConfig.simpo_gamma)


def loss_recipe(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None = None,
                rpo_alpha: float = 0.0) -> tuple[tuple[str, float], ...]:  # fmt: skip
    """The (name, weight) terms whose weighted sum is the loss, TRL's `loss_type` list with `loss_weights` (1 each
    by default); `rpo_alpha` > 0 adds ("sft", rpo_alpha), RPO as TRL's `rpo_alpha` names it."""
    names = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    weights = (1.0,) * len(names) if loss_weights is None or len(loss_weights) == 0 else tuple(loss_weights)
    if not names or len(weights) != len(names):
        raise ValueError(f"{len(weights)} loss weight(s) for the {len(names)} loss(es) {', '.join(names)}")
    if len(set(names)) < len(names):
        raise ValueError(f"loss_type names a loss twice: {', '.join(names)}; give it once, with its weight")
    if not rpo_alpha >= 0:
        raise ValueError(f"rpo_alpha is a weight, >= 0; got {rpo_alpha}")
    if rpo_alpha and "sft" in names:
        raise ValueError("rpo_alpha adds the sft term, and loss_type already names sft: give its weight once")
    return tuple(zip(names, map(float, weights), strict=True)) + ((("sft", float(rpo_alpha)),) if rpo_alpha else ())


def needs_reference(loss_type: str | Sequence[str]) -> bool:
    """Whether any of the losses reads π0's log-probs (all but sft and simpo)."""
    return any(name not in REFERENCE_FREE for name in ((loss_type,) if isinstance(loss_type, str) else loss_type))


def check_loss_args(beta: float, loss_type: str | Sequence[str], label_smoothing: float) -> None:
    """ValueError naming what is wrong with a (beta, loss_type or list of them, label_smoothing) choice."""
    names = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    for name in names:
        if name not in LOSS_TYPES:
            raise ValueError(f"unknown DPO loss_type {name!r}; valid: {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    if label_smoothing != 0.0 and not any(name in SMOOTHED for name in names):
        raise ValueError(
            f"label_smoothing={label_smoothing} applies to loss_type {', '.join(SMOOTHED)}, not {', '.join(names)}; "
            "set label_smoothing=0.0"
        )
    if "exo_pair" in names and label_smoothing == 0.0:
        raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (its target puts eps on the rejected answer)")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing is the assumed fraction of flipped labels, in [0, 0.5); got {label_smoothing}"
        )


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = DISCOPOP_TAU,
    simpo_gamma: float = SIMPO_GAMMA,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pairwise DPO-family loss over ``B`` pairs of sequence log-probs (each ``[B]``; the reference ones are
    not read by simpo).

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: the mean loss (0-dim fp32) and the detached
        ``beta * (policy - reference)`` of each answer (``[B]`` fp32).
    """
    check_loss_args(beta, loss_type, label_smoothing)
    if loss_type == "sft":
        raise ValueError("the sft term is a mean over tokens: fused_dpo_loss computes it from per-token log-probs")
    if loss_type in REFERENCE_FREE:  # simpo: the rewards and the margin are the policy's alone
        ref_chosen_logps, ref_rejected_logps = torch.zeros_like(ref_chosen_logps), torch.zeros_like(ref_rejected_logps)
    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.float()
    policy_margin = policy_chosen_logps.float() - policy_rejected_logps.float()  # aot's
    ref_margin = ref_chosen_logps.float() - ref_rejected_logps.float()
    losses = _losses(chosen_logratios, rejected_logratios, policy_margin, ref_margin, beta, loss_type, label_smoothing,
                     discopop_tau, simpo_gamma)  # fmt: skip
    return losses.mean(), (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def _losses(c, r, policy_margin, ref_margin, beta: float, loss_type: str, eps: float, tau: float, gamma: float):
    """Per-pair losses from the chosen and rejected log-ratios (module docstring)."""
    h = c - r
    ls = F.logsigmoid
    if loss_type in ("sigmoid", "sigmoid_norm"):
        return -(1.0 - eps) * ls(beta * h) - eps * ls(-beta * h)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * h)
    if loss_type == "robust":
        return (-(1.0 - eps) * ls(beta * h) + eps * ls(-beta * h)) / (1.0 - 2.0 * eps)
    if loss_type == "exo_pair":
        q, log_q, log_not_q = torch.sigmoid(beta * h), ls(beta * h), ls(-beta * h)
        return q * (log_q - math.log1p(-eps)) + (1 - q) * (log_not_q - math.log(eps))
    if loss_type == "nca_pair":
        return -ls(beta * c) - 0.5 * ls(-beta * c) - 0.5 * ls(-beta * r)
    if loss_type == "bco_pair":
        return -ls(beta * c) - ls(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        a, b = (policy_margin, ref_margin) if loss_type == "aot" else (c, r)
        delta = torch.sort(a, dim=0).values - torch.sort(b, dim=0).values
        return -(1.0 - eps) * ls(beta * delta) - eps * ls(-beta * delta)
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * h)
    if loss_type == "discopop":
        x = beta * h
        mix = torch.sigmoid(x / tau)
        return -ls(x) * (1 - mix) + torch.exp(-x) * mix
    if loss_type == "simpo":
        x = beta * policy_margin - gamma
        return -(1.0 - eps) * ls(x) - eps * ls(-x)
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
