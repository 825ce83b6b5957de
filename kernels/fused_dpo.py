r"""The DPO loss from final hidden states: fused log-probs, per-sequence sums, loss and its backward.

Math. ``hidden [2B, T, H]`` holds the B chosen rows first, then the B rejected rows (row ``i`` and row
``B + i`` are one pair); ``targets [2B, T]`` are already shifted (target ``t`` is the token predicted
from position ``t``) with ``ignore_index`` at prompt and padding positions. Then::

    logp[r, t] = linear_logprobs(hidden, weight, targets)         [2B, T] fp32, 0 where ignored
    S_r        = sum_t logp[r, t],   n_r = #{t : target[r, t] != ignore_index}
    p_r        = S_r                 (sigmoid, hinge)
               = S_r / max(n_r, 1)   (ipo: length-averaged, as TRL and the IPO authors do;
                                      the reference sums are averaged with the same n_r)
    loss, rewards = dpo_loss(p_chosen, p_rejected, ref_chosen, ref_rejected)   (see dpo_loss.py)
    nll        = -sum_{i<B} S_i / max(sum_{i<B} n_i, 1)   the chosen answers' mean NLL per token
    loss      += rpo_alpha * nll    (RPO, Liu et al. 2024, arXiv:2405.16436: the SFT term on the chosen
                                     answer; TRL's loss_type ["sigmoid", "sft"] with loss_weights [1, rpo_alpha]:
                                     like TRL's, a mean over the tokens of the B pairs given, so with
                                     rpo_alpha > 0 a step depends on how its pairs are split into micro-batches)

Backward: ``d loss / d logp[r, t] = c_r`` for every scored ``t`` of row ``r``, where
``c_i = (1/B) dL_i/dh`` and ``c_{B+i} = -(1/B) dL_i/dh`` (divided by ``n_r`` for ipo). These per-row
coefficients come out of the forward kernel; the backward kernel broadcasts them over the tokens,
and the log-prob kernel's backward turns them into the hidden (and weight) gradient. The NLL term is
torch ops on ``logp`` (its gradient, ``-rpo_alpha / sum n_i`` on every scored chosen token, joins the
loss kernel's through autograd). No ``[2B, T, V]`` tensor exists at any point.

Shapes: ``ref_chosen_logps``, ``ref_rejected_logps``: ``[B]`` SUMMED reference log-probs (computed
once per pair, e.g. with :func:`sequence_logps` under ``torch.no_grad()`` and the adapter off).

Dtypes: hidden and weight fp32/bf16/fp16; all sums and the loss in fp32; outputs fp32.

Implementations: Triton kernels for the per-sequence reduction and the loss (CUDA, or CPU under
``TRITON_INTERPRET=1``; in ``fused_dpo_triton.py``), torch ops on the ``[2B, T]`` log-probs otherwise.
:func:`fused_dpo_loss_reference` (naive log-probs, then :func:`dpo_loss`) is the specification.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .backend import KernelPath, kernel_path, load_triton_module
from .dpo_loss import LENGTH_AVERAGED, check_loss_args, dpo_loss
from .linear_logprobs import linear_logprobs, linear_logprobs_reference

TRITON_LOSSES = ("sigmoid", "ipo", "hinge")  # the Triton reduction's; the others reduce in torch on the log-probs


def _sequence_terms(
    logp: torch.Tensor,  # [2B, T] fp32
    targets: torch.Tensor,  # [2B, T]
    ref_chosen_logps: torch.Tensor,  # [B]
    ref_rejected_logps: torch.Tensor,  # [B]
    loss_type: str,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy chosen, policy rejected, ref chosen, ref rejected), each [B], length-averaged for ipo and
    sigmoid_norm."""
    n_pairs = logp.shape[0] // 2
    sums = logp.sum(dim=1)  # [2B]; ignored positions hold 0
    ref_chosen, ref_rejected = ref_chosen_logps.float(), ref_rejected_logps.float()
    if loss_type in LENGTH_AVERAGED:
        n_tokens = (targets != ignore_index).sum(dim=1).clamp(min=1).float()  # [2B]
        sums = sums / n_tokens
        ref_chosen = ref_chosen / n_tokens[:n_pairs]
        ref_rejected = ref_rejected / n_tokens[n_pairs:]
    return sums[:n_pairs], sums[n_pairs:], ref_chosen, ref_rejected


class DpoOutput(NamedTuple):
    loss: torch.Tensor  # 0-dim fp32, differentiable: the DPO-family loss plus rpo_alpha times chosen_nll
    chosen_rewards: torch.Tensor  # [B] detached beta * (policy - reference)
    rejected_rewards: torch.Tensor  # [B]
    chosen_nll: torch.Tensor  # [B] detached: each chosen answer's mean NLL per token (for logging: per pair, so a
    # step's figure does not depend on how its pairs were split into micro-batches and ranks)


def _chosen_nll(logp: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    n_pairs = logp.shape[0] // 2
    count = (targets[:n_pairs] != ignore_index).sum().clamp(min=1)
    return -logp[:n_pairs].sum() / count


def _with_nll(out: tuple, logp: torch.Tensor, targets: torch.Tensor, ignore_index: int, rpo_alpha: float) -> DpoOutput:
    loss, chosen_rewards, rejected_rewards = out
    if rpo_alpha:
        loss = loss + rpo_alpha * _chosen_nll(logp, targets, ignore_index)
    with torch.no_grad():
        n_pairs = logp.shape[0] // 2
        per_answer = -logp[:n_pairs].sum(dim=1) / (targets[:n_pairs] != ignore_index).sum(dim=1).clamp(min=1)
    return DpoOutput(loss, chosen_rewards, rejected_rewards, per_answer)


def fused_dpo_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    rpo_alpha: float = 0.0,
) -> DpoOutput:
    """Naive fp32 version of :func:`fused_dpo_loss` (full logits, then the loss): the specification."""
    logp = linear_logprobs_reference(hidden, weight, targets, ignore_index=ignore_index)  # [2B, T]
    terms = _sequence_terms(logp, targets, ref_chosen_logps, ref_rejected_logps, loss_type, ignore_index)
    out = dpo_loss(*terms, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    return _with_nll(out, logp, targets, ignore_index, rpo_alpha)


def _check_inputs(hidden, targets, ref_chosen_logps, ref_rejected_logps) -> None:
    if hidden.dim() != 3 or hidden.shape[0] % 2 != 0 or hidden.shape[0] == 0:
        raise ValueError(
            f"fused_dpo_loss: hidden must be [2B, T, H] with B >= 1 (B chosen rows, then B rejected rows), "
            f"got {tuple(hidden.shape)}"
        )
    n_pairs = hidden.shape[0] // 2
    if tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"fused_dpo_loss: targets must be {tuple(hidden.shape[:2])}, got {tuple(targets.shape)}")
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if tuple(ref.shape) != (n_pairs,):
            raise ValueError(f"fused_dpo_loss: {name} must be [B] = [{n_pairs}], got {tuple(ref.shape)}")


def fused_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    rpo_alpha: float = 0.0,
    path: KernelPath | None = None,
) -> DpoOutput:
    """DPO-family loss of B pairs straight from the final hidden states, without the logits.

    Args:
        hidden: ``[2B, T, H]`` final hidden states, the B chosen rows first, then the B rejected rows.
        weight: ``[V, H]`` LM head weight (frozen or trainable).
        targets: ``[2B, T]`` shifted targets, ``ignore_index`` at prompt and padding positions.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` summed reference log-probs.
        beta, loss_type, label_smoothing: see :func:`dpo_loss` (``loss_type``: sigmoid, ipo, hinge).
        rpo_alpha: weight of the chosen answers' mean NLL per token added to the loss (RPO); 0: plain DPO.
        path: the implementation (default: :func:`kernel_path` of the device; `dpo.kernel` sets it).

    Returns:
        :class:`DpoOutput` ``(loss, chosen_rewards, rejected_rewards, chosen_nll)``: mean loss (0-dim fp32,
        differentiable with respect to ``hidden`` and ``weight``), detached ``beta * (policy - reference)``
        per pair (``[B]``; for ipo from the length-averaged log-probs the loss sees), and the detached NLL term.
    """
    if not rpo_alpha >= 0:
        raise ValueError(f"rpo_alpha is a weight, >= 0; got {rpo_alpha}")
    check_loss_args(beta, loss_type, label_smoothing)
    _check_inputs(hidden, targets, ref_chosen_logps, ref_rejected_logps)
    ref_chosen_logps = ref_chosen_logps.to(device=hidden.device, dtype=torch.float32)
    ref_rejected_logps = ref_rejected_logps.to(device=hidden.device, dtype=torch.float32)
    path = path or kernel_path(hidden.device)
    logp = linear_logprobs(hidden, weight, targets, ignore_index=ignore_index, path=path)  # [2B, T]
    if path == "chunked-torch" or loss_type not in TRITON_LOSSES:
        terms = _sequence_terms(logp, targets, ref_chosen_logps, ref_rejected_logps, loss_type, ignore_index)
        out = dpo_loss(*terms, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    else:
        triton_impl = load_triton_module("fused_dpo_triton")
        out = triton_impl.TritonDpoLoss.apply(
            logp, targets.long(), ref_chosen_logps, ref_rejected_logps,
            beta, loss_type, label_smoothing, ignore_index,
        )  # fmt: skip
    return _with_nll(out, logp, targets, ignore_index, rpo_alpha)
