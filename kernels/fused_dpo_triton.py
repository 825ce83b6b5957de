"""Triton kernels for the per-sequence reduction and the DPO loss of :func:`lite_rlhf.kernels.fused_dpo_loss`.

Math, shapes and dtypes: see ``fused_dpo.py`` and ``dpo_loss.py``. Loaded only through
:func:`lite_rlhf.kernels.backend.load_triton_module`.

- ``_dpo_fwd_kernel``: one program per pair ``i``. It sums the log-probs and counts the scored tokens
  of rows ``i`` (chosen) and ``B + i`` (rejected), forms the margin ``h``, the pair's loss divided by
  ``B``, both rewards, and the per-row gradient coefficients ``c_r = d loss / d logp[r, t]``.
- ``_dpo_bwd_kernel``: ``grad_logp[r, t] = grad_loss * c_r`` at scored positions, 0 elsewhere.

Scalar math is fp32. ``log sigma(x) = min(x, 0) - log(1 + exp(-|x|))`` never overflows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dpo_loss import LOSS_TYPES

INTERPRETED = bool(triton.knobs.runtime.interpret)  # how the kernels below were jitted


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _dpo_fwd_kernel(
    logp_ptr,  # [2B, T] fp32 per-token policy log-probs (0 at ignored positions); row stride stride_lr
    targets_ptr,  # [2B, T] int64; row stride stride_tr
    ref_chosen_ptr,  # [B] fp32 summed reference log-probs of the chosen answers
    ref_rejected_ptr,  # [B] fp32 summed reference log-probs of the rejected answers
    loss_ptr,  # [B] fp32 out: loss of pair i divided by B (their sum is the mean loss)
    chosen_reward_ptr,  # [B] fp32 out: beta * (policy - reference), chosen
    rejected_reward_ptr,  # [B] fp32 out: beta * (policy - reference), rejected
    coef_ptr,  # [2B] fp32 out: d mean loss / d logp[r, t] for every scored t of row r
    B,  # number of pairs
    T,  # sequence length
    stride_lr,
    stride_tr,
    beta,
    label_smoothing,
    ignore_index,
    LOSS_TYPE: tl.constexpr,  # 0 sigmoid, 1 ipo, 2 hinge (index in dpo_loss.LOSS_TYPES)
    BLOCK_T: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)
    row_c = pair
    row_r = pair + B
    sum_c = tl.zeros([BLOCK_T], dtype=tl.float32)
    sum_r = tl.zeros([BLOCK_T], dtype=tl.float32)
    cnt_c = tl.zeros([BLOCK_T], dtype=tl.float32)
    cnt_r = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        ok = cols < T
        tgt_c = tl.load(targets_ptr + row_c * stride_tr + cols, mask=ok, other=ignore_index)
        tgt_r = tl.load(targets_ptr + row_r * stride_tr + cols, mask=ok, other=ignore_index)
        scored_c = tgt_c != ignore_index
        scored_r = tgt_r != ignore_index
        sum_c += tl.load(logp_ptr + row_c * stride_lr + cols, mask=ok & scored_c, other=0.0)
        sum_r += tl.load(logp_ptr + row_r * stride_lr + cols, mask=ok & scored_r, other=0.0)
        cnt_c += scored_c.to(tl.float32)
        cnt_r += scored_r.to(tl.float32)
    pol_c = tl.sum(sum_c, axis=0)
    pol_r = tl.sum(sum_r, axis=0)
    ref_c = tl.load(ref_chosen_ptr + pair)
    ref_r = tl.load(ref_rejected_ptr + pair)
    scale_c = 1.0
    scale_r = 1.0
    if LOSS_TYPE == 1:  # ipo: length-averaged log-probs, policy and reference alike
        scale_c = 1.0 / tl.maximum(tl.sum(cnt_c, axis=0), 1.0)
        scale_r = 1.0 / tl.maximum(tl.sum(cnt_r, axis=0), 1.0)
    ratio_c = (pol_c - ref_c) * scale_c
    ratio_r = (pol_r - ref_r) * scale_r
    h = ratio_c - ratio_r
    if LOSS_TYPE == 0:  # sigmoid, cDPO when label_smoothing > 0
        bh = beta * h
        loss = -(1.0 - label_smoothing) * _log_sigmoid(bh) - label_smoothing * _log_sigmoid(-bh)
        dloss_dh = beta * (
            -(1.0 - label_smoothing) * tl.exp(_log_sigmoid(-bh)) + label_smoothing * tl.exp(_log_sigmoid(bh))
        )
    elif LOSS_TYPE == 1:  # ipo
        d = h - 0.5 / beta
        loss = d * d
        dloss_dh = 2.0 * d
    else:  # hinge
        z = 1.0 - beta * h
        loss = tl.maximum(z, 0.0)
        dloss_dh = tl.where(z > 0.0, -beta, 0.0)
    tl.store(loss_ptr + pair, loss / B)
    tl.store(chosen_reward_ptr + pair, beta * ratio_c)
    tl.store(rejected_reward_ptr + pair, beta * ratio_r)
    tl.store(coef_ptr + row_c, dloss_dh * scale_c / B)
    tl.store(coef_ptr + row_r, -dloss_dh * scale_r / B)


@triton.jit
def _dpo_bwd_kernel(
    grad_loss_ptr,  # [] fp32 upstream gradient of the mean loss
    coef_ptr,  # [2B] fp32 from the forward
    targets_ptr,  # [2B, T] int64; row stride stride_tr
    grad_logp_ptr,  # [2B, T] fp32 out; row stride stride_gr
    T,
    stride_tr,
    stride_gr,
    ignore_index,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = cols < T
    tgt = tl.load(targets_ptr + row * stride_tr + cols, mask=ok, other=ignore_index)
    g = tl.load(grad_loss_ptr) * tl.load(coef_ptr + row)
    tl.store(grad_logp_ptr + row * stride_gr + cols, tl.where(tgt != ignore_index, g, 0.0), mask=ok)


def _block_t(seq_len: int) -> int:
    return min(1024, triton.next_power_of_2(max(seq_len, 16)))


class TritonDpoLoss(torch.autograd.Function):
    """(logp [2B, T], targets, ref [B], ref [B]) -> (mean loss, chosen rewards, rejected rewards)."""

    @staticmethod
    def forward(ctx, logp, targets, ref_chosen, ref_rejected, beta, loss_type, label_smoothing, ignore_index):
        logp = logp.contiguous()
        targets = targets.contiguous()
        n_rows, seq_len = logp.shape
        n_pairs = n_rows // 2
        device = logp.device
        losses = torch.empty(n_pairs, dtype=torch.float32, device=device)
        chosen_rewards = torch.empty(n_pairs, dtype=torch.float32, device=device)
        rejected_rewards = torch.empty(n_pairs, dtype=torch.float32, device=device)
        coef = torch.empty(n_rows, dtype=torch.float32, device=device)
        _dpo_fwd_kernel[(n_pairs,)](
            logp, targets, ref_chosen.contiguous(), ref_rejected.contiguous(),
            losses, chosen_rewards, rejected_rewards, coef,
            n_pairs, seq_len, logp.stride(0), targets.stride(0), float(beta), float(label_smoothing), ignore_index,
            LOSS_TYPE=LOSS_TYPES.index(loss_type), BLOCK_T=_block_t(seq_len),
        )  # fmt: skip
        ctx.save_for_backward(coef, targets)
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(chosen_rewards, rejected_rewards)
        return losses.sum(), chosen_rewards, rejected_rewards

    @staticmethod
    def backward(ctx, grad_loss, _grad_chosen_rewards, _grad_rejected_rewards):
        coef, targets = ctx.saved_tensors
        n_rows, seq_len = targets.shape
        grad_logp = torch.empty(n_rows, seq_len, dtype=torch.float32, device=targets.device)
        block_t = _block_t(seq_len)
        if seq_len > 0:
            _dpo_bwd_kernel[(n_rows, triton.cdiv(seq_len, block_t))](
                grad_loss.float().contiguous(), coef, targets, grad_logp,
                seq_len, targets.stride(0), grad_logp.stride(0), ctx.ignore_index, BLOCK_T=block_t,
            )  # fmt: skip
        return grad_logp, None, None, None, None, None, None, None
