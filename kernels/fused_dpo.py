r"""The DPO loss from final hidden states: fused log-probs, per-sequence sums, loss and its backward.

Math. ``hidden [2B, T, H]`` holds the B chosen rows first, then the B rejected rows (row ``i`` and row
``B + i`` are one pair); ``targets [2B, T]`` are already shifted (target ``t`` is the token predicted
from position ``t``) with ``ignore_index`` at prompt and padding positions. Then::

    logp[r, t] = linear_logprobs(hidden, weight, targets)         [2B, T] fp32, 0 where ignored (soft-capped
                                                                  logits when `softcap` is given)
    S_r        = sum_t logp[r, t],   n_r = #{t : target[r, t] != ignore_index}
    p_r        = S_r                 (most losses)
               = S_r / max(n_r, 1)   (ipo, sigmoid_norm, simpo: length-averaged, as TRL and the IPO authors do;
                                      the reference sums are averaged with the same n_r)
    term_k     = dpo_loss_k(p_chosen, p_rejected, ref_chosen, ref_rejected)   (see dpo_loss.py)
    sft        = -sum_{i<B} S_i / max(sum_{i<B} n_i, 1)   the chosen answers' mean NLL per token
    loss       = sum_k w_k term_k    (TRL's loss_type list with loss_weights; rpo_alpha > 0 adds w = rpo_alpha
                                      on sft: RPO, Liu et al. 2024, arXiv:2405.16436. Like TRL's, sft is a mean
                                      over the tokens of the B pairs given, so with it a step depends on how its
                                      pairs are split into micro-batches)

Backward: ``d loss / d logp[r, t] = c_r`` for every scored ``t`` of row ``r``, where
``c_i = (1/B) dL_i/dh`` and ``c_{B+i} = -(1/B) dL_i/dh`` (divided by ``n_r`` for ipo). These per-row
coefficients come out of the forward kernel; the backward kernel broadcasts them over the tokens,
and the log-prob kernel's backward turns them into the hidden (and weight) gradient. The NLL term is
torch ops on ``logp`` (its gradient, ``-rpo_alpha / sum n_i`` on every scored chosen token, joins the
loss kernel's through autograd); so are the losses outside the Triton reduction's (``TRITON_LOSSES``).
No ``[2B, T, V]`` tensor exists at any point.

Shapes: ``ref_chosen_logps``, ``ref_rejected_logps``: ``[B]`` SUMMED reference log-probs (computed
once per pair, e.g. with :func:`sequence_logps` under ``torch.no_grad()`` and the adapter off; not read
when every term is reference-free: sft, simpo).

Dtypes: hidden and weight fp32/bf16/fp16; all sums and the loss in fp32; outputs fp32.

Implementations: Triton kernels for the per-sequence reduction and the loss (CUDA, or CPU under
``TRITON_INTERPRET=1``; in ``fused_dpo_triton.py``), torch ops on the ``[2B, T]`` log-probs otherwise.
:func:`fused_dpo_loss_reference` (naive log-probs, then :func:`dpo_loss`) is the specification.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .backend import KernelPath, kernel_path, load_triton_module
from .dpo_loss import DISCOPOP_TAU, LENGTH_AVERAGED, SIMPO_GAMMA, SMOOTHED, check_loss_args, dpo_loss, loss_recipe
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
    loss: torch.Tensor  # 0-dim fp32, differentiable: the weighted sum of the terms
    chosen_rewards: torch.Tensor  # [B] detached beta * (policy - reference), from the first pairwise term
    rejected_rewards: torch.Tensor  # [B]
    chosen_nll: torch.Tensor  # [B] detached: each chosen answer's mean NLL per token (for logging: per pair, so a
    # step's figure does not depend on how its pairs were split into micro-batches and ranks)
    terms: dict[str, torch.Tensor]  # each term's detached value before its weight, by loss name (sft: RPO's NLL)


class LossSpec(NamedTuple):
    """What the loss is: the (name, weight) terms of :func:`loss_recipe` and their parameters."""

    recipe: tuple[tuple[str, float], ...]
    beta: float
    label_smoothing: float = 0.0
    discopop_tau: float = DISCOPOP_TAU
    simpo_gamma: float = SIMPO_GAMMA


def _chosen_nll(logp: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    n_pairs = logp.shape[0] // 2
    scored = targets[:n_pairs] != ignore_index
    return -logp[:n_pairs][scored].sum() / scored.sum().clamp(min=1)


def preference_loss(
    logp: torch.Tensor,  # [2B, T] fp32 per-token policy log-probs, 0 where ignored
    targets: torch.Tensor,  # [2B, T]
    ref_chosen_logps: torch.Tensor,  # [B] summed (not read when every term is reference-free)
    ref_rejected_logps: torch.Tensor,  # [B]
    spec: LossSpec,
    ignore_index: int = -100,
    triton: bool = False,
) -> DpoOutput:
    """The weighted sum of ``spec``'s terms from per-token log-probs: each pairwise term on its sequence sums
    (length-averaged where it asks), through the Triton reduction when ``triton`` and it is one of
    ``TRITON_LOSSES``; the sft term as the chosen tokens' mean NLL over the batch."""
    total, terms, rewards = 0.0, {}, None
    for name, weight in spec.recipe:
        eps = spec.label_smoothing if name in SMOOTHED else 0.0  # in a list, read by the losses that read it
        if name == "sft":
            value = _chosen_nll(logp, targets, ignore_index)
        elif triton and name in TRITON_LOSSES:
            triton_impl = load_triton_module("fused_dpo_triton")
            value, *pair_rewards = triton_impl.TritonDpoLoss.apply(
                logp, targets.long(), ref_chosen_logps, ref_rejected_logps,
                spec.beta, name, eps, ignore_index,
            )  # fmt: skip
            rewards = rewards or pair_rewards
        else:
            seq = _sequence_terms(logp, targets, ref_chosen_logps, ref_rejected_logps, name, ignore_index)
            value, *pair_rewards = dpo_loss(*seq, beta=spec.beta, loss_type=name, label_smoothing=eps,
                                            discopop_tau=spec.discopop_tau, simpo_gamma=spec.simpo_gamma)  # fmt: skip
            rewards = rewards or pair_rewards
        total = total + weight * value
        terms[name] = value.detach()
    n_pairs = logp.shape[0] // 2
    with torch.no_grad():
        if rewards is None:  # sft alone: the policy's summed log-probs, as a reference-free loss reports them
            rewards = [spec.beta * logp[:n_pairs].sum(dim=1), spec.beta * logp[n_pairs:].sum(dim=1)]
        per_answer = -logp[:n_pairs].sum(dim=1) / (targets[:n_pairs] != ignore_index).sum(dim=1).clamp(min=1)
    return DpoOutput(total, *rewards, per_answer, terms)


def fused_dpo_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    rpo_alpha: float = 0.0,
    discopop_tau: float = DISCOPOP_TAU,
    simpo_gamma: float = SIMPO_GAMMA,
    softcap: float | None = None,
) -> DpoOutput:
    """Naive fp32 version of :func:`fused_dpo_loss` (full logits, then the loss): the specification."""
    spec = _spec(beta, loss_type, loss_weights, label_smoothing, rpo_alpha, discopop_tau, simpo_gamma)
    logp = linear_logprobs_reference(hidden, weight, targets, ignore_index=ignore_index, softcap=softcap)  # [2B, T]
    return preference_loss(logp, targets, ref_chosen_logps, ref_rejected_logps, spec, ignore_index)


def _spec(beta, loss_type, loss_weights, label_smoothing, rpo_alpha, discopop_tau, simpo_gamma) -> LossSpec:
    check_loss_args(beta, loss_type, label_smoothing)
    if not discopop_tau > 0 or not simpo_gamma >= 0:
        raise ValueError(f"discopop_tau must be > 0 and simpo_gamma >= 0, got {discopop_tau} and {simpo_gamma}")
    return LossSpec(loss_recipe(loss_type, loss_weights, rpo_alpha), beta, label_smoothing, discopop_tau, simpo_gamma)


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
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    rpo_alpha: float = 0.0,
    discopop_tau: float = DISCOPOP_TAU,
    simpo_gamma: float = SIMPO_GAMMA,
    softcap: float | None = None,
    path: KernelPath | None = None,
) -> DpoOutput:
    """DPO-family loss of B pairs straight from the final hidden states, without the logits.

    Args:
        hidden: ``[2B, T, H]`` final hidden states, the B chosen rows first, then the B rejected rows.
        weight: ``[V, H]`` LM head weight (frozen or trainable).
        targets: ``[2B, T]`` shifted targets, ``ignore_index`` at prompt and padding positions.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` summed reference log-probs (any values when every loss is
            reference-free: sft, simpo).
        beta, label_smoothing, discopop_tau, simpo_gamma: see :func:`dpo_loss`.
        loss_type, loss_weights: one loss of ``LOSS_TYPES`` or a list of them, with a weight each (TRL's form).
        rpo_alpha: weight of the chosen answers' mean NLL per token added to the loss (RPO); 0: none.
        softcap: the model's final logit soft-cap (see :func:`linear_logprobs`), or None.
        path: the implementation (default: :func:`kernel_path` of the device; `dpo.kernel` sets it).

    Returns:
        :class:`DpoOutput` ``(loss, chosen_rewards, rejected_rewards, chosen_nll, terms)``: the loss (0-dim fp32,
        differentiable with respect to ``hidden`` and ``weight``), detached ``beta * (policy - reference)``
        per pair (``[B]``; for length-averaged losses from the averaged log-probs the loss sees), each chosen
        answer's NLL per token, and each term's value.
    """
    spec = _spec(beta, loss_type, loss_weights, label_smoothing, rpo_alpha, discopop_tau, simpo_gamma)
    _check_inputs(hidden, targets, ref_chosen_logps, ref_rejected_logps)
    ref_chosen_logps = ref_chosen_logps.to(device=hidden.device, dtype=torch.float32)
    ref_rejected_logps = ref_rejected_logps.to(device=hidden.device, dtype=torch.float32)
    path = path or kernel_path(hidden.device)
    logp = linear_logprobs(hidden, weight, targets, ignore_index=ignore_index, softcap=softcap, path=path)  # [2B, T]
    return preference_loss(logp, targets, ref_chosen_logps, ref_rejected_logps, spec, ignore_index,
                           triton=path != "chunked-torch")  # fmt: skip


def reductions(loss_type: str | Sequence[str], path: KernelPath) -> str:
    """Which reduction each loss runs on `path`, for the run's log and `doctor`: e.g. "sigmoid: Triton, sft: torch"."""
    names = (loss_type,) if isinstance(loss_type, str) else loss_type
    return ", ".join(f"{n}: {'Triton' if path != 'chunked-torch' and n in TRITON_LOSSES else 'torch'}" for n in names)
