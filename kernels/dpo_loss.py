r"""DPO-family losses on sequence log-probs: ``sigmoid`` (DPO, with cDPO label smoothing), ``ipo``, ``hinge``.

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

The loss is the mean over pairs. ``dh/dpc = 1``, ``dh/dpr = -1``; gradients reach only the policy
log-probs (reference log-probs are data). The rewards ``beta (p - r)`` of each answer are returned
detached, for logging (reward accuracy, margins).

Dtypes: inputs of any float dtype are computed in fp32; outputs are fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def check_loss_args(beta: float, loss_type: str, label_smoothing: float) -> None:
    """ValueError naming what is wrong with a (beta, loss_type, label_smoothing) choice."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    if label_smoothing != 0.0 and loss_type != "sigmoid":
        raise ValueError(
            f"label_smoothing={label_smoothing} applies only to loss_type='sigmoid' (cDPO), not {loss_type!r}; "
            "set label_smoothing=0.0"
        )
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-family loss over ``B`` pairs of sequence log-probs (each ``[B]``).

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: the mean loss (0-dim fp32) and the detached
        ``beta * (policy - reference)`` of each answer (``[B]`` fp32).
    """
    check_loss_args(beta, loss_type, label_smoothing)
    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1.0 - beta * h)
    return losses.mean(), (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()
