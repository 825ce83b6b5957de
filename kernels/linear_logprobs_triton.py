"""Triton kernels for :func:`lite_rlhf.kernels.linear_logprobs` (math, shapes and dtypes: see ``linear_logprobs.py``).

Loaded only through :func:`lite_rlhf.kernels.backend.load_triton_module`, on CUDA or under
``TRITON_INTERPRET=1``.

- ``_logprobs_fwd_kernel``: one program per block of rows. It walks the vocabulary in blocks,
  computes each ``[BLOCK_N, BLOCK_V]`` logits block with ``tl.dot`` over ``H``, keeps the online
  log-sum-exp (running max ``m`` and sum ``s``), picks the target logit, and (when hidden needs a
  gradient) keeps ``a = sum_v exp(z_v - m) W_v`` rescaled like ``s``. ``a`` lives in the output buffer
  ``[N, H]`` fp32 (read-modify-write of rows this program owns: no atomics, deterministic); at the end
  it becomes ``d logp / d hidden = W_t - a / s``.
- ``_logprobs_dweight_kernel``: one program per block of vocabulary rows. It walks all token rows,
  recomputes the logits block, forms ``g (onehot - p)`` from the saved ``lse`` and accumulates
  ``dW`` into an fp32 ``[V, H]`` buffer it owns.

Soft-capping (``SOFTCAP``): each logits block becomes ``c tanh(z / c)`` right after its dot, and the slope
``1 - tanh^2(z / c)`` multiplies the probabilities that reach the gradient dots (``linear_logprobs.py``).
``tanh(u)`` is computed as ``2 sigmoid(2u) - 1`` (``tl.sigmoid`` runs on the GPU and in the interpreter).

Dot products. The logits dot takes the inputs as they are on a GPU (bf16/fp16 products are exact in
fp32, accumulated in fp32); under the interpreter ``tl.dot`` on bf16 operands gives wrong numbers, so
there, and for mixed dtypes, operands are cast to fp32 first (``DOT_FP32``). The two gradient dots
(``p @ W`` and ``dz^T @ x``) keep the probabilities in fp32 and cast the other operand to fp32, so the
GPU computes the same thing the interpreter tests check (rounding p to bf16 would cost ~3 digits).
fp32 dots use TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` allows it (torch's rule).

Not tuned: block sizes are a first guess and the forward launches one program per 32 rows (64
programs for 2048 tokens), which may leave SMs idle on a large GPU; the accumulator read-modify-write
per vocabulary block is L2 traffic. No GPU was available when this was written: measure with
``benchmarks/bench_logprobs.py`` on one before relying on its speed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)  # how the kernels below were jitted


@triton.jit
def _tanh(u):
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _logprobs_fwd_kernel(
    hidden_ptr,  # [N, H] input dtype; row stride stride_hn, unit stride along H
    weight_ptr,  # [V, H] input dtype; row stride stride_wv, unit stride along H
    targets_ptr,  # [N] int64
    logp_ptr,  # [N] fp32 out: log p(target), 0 at ignored rows
    lse_ptr,  # [N] fp32 out: log-sum-exp of the logits row (saved for the weight gradient)
    dlogp_ptr,  # [N, H] fp32 out, zero-filled on entry: d logp / d hidden (only if COMPUTE_GRAD)
    N,  # number of rows
    V,  # vocabulary size
    H,  # hidden size
    stride_hn,  # elements between rows of hidden
    stride_wv,  # elements between rows of weight
    stride_dn,  # elements between rows of dlogp
    ignore_index,
    softcap,  # the logit soft-cap c (read only when SOFTCAP)
    COMPUTE_GRAD: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,  # cast dot operands to fp32 (interpreter, mixed dtypes)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Long: one pass over the vocabulary that keeps the online log-sum-exp and the gradient accumulator
    # together; split into helpers, Triton would pass the [BLOCK_N, BLOCK_H] accumulators through calls.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
    row_ok = rows < N
    tgt = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (tgt != ignore_index)

    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    target_logit = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # [BLOCK_V]
        col_ok = cols < V
        z = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hc = h0 + tl.arange(0, BLOCK_H)
            h_ok = hc < H
            x = tl.load(
                hidden_ptr + rows[:, None] * stride_hn + hc[None, :], row_ok[:, None] & h_ok[None, :], other=0.0
            )
            w = tl.load(
                weight_ptr + cols[:, None] * stride_wv + hc[None, :], col_ok[:, None] & h_ok[None, :], other=0.0
            )
            if DOT_FP32:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            z = tl.dot(x, tl.trans(w), z, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_V]
        if SOFTCAP:
            t = _tanh(z / softcap)
            z = softcap * t
            slope = 1.0 - t * t  # d(capped logit) / d(logit)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        target_logit += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)  # 0 on the first block (m = -inf)
        p = tl.exp(z - m_new[:, None])  # [BLOCK_N, BLOCK_V], 0 on masked columns
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new
        if COMPUTE_GRAD:
            if SOFTCAP:
                p = p * slope
            for h0 in range(0, H, BLOCK_H):
                hc = h0 + tl.arange(0, BLOCK_H)
                h_ok = hc < H
                w = tl.load(
                    weight_ptr + cols[:, None] * stride_wv + hc[None, :], col_ok[:, None] & h_ok[None, :], other=0.0
                )
                a_ptrs = dlogp_ptr + rows[:, None] * stride_dn + hc[None, :]
                a_mask = row_ok[:, None] & h_ok[None, :]
                a = tl.load(a_ptrs, a_mask, other=0.0) * alpha[:, None]
                a = tl.dot(p, w.to(tl.float32), a, input_precision=DOT_PRECISION)  # p stays fp32
                tl.store(a_ptrs, a, a_mask)

    lse = m + tl.log(s)
    tl.store(lse_ptr + rows, lse, row_ok)
    tl.store(logp_ptr + rows, tl.where(valid, target_logit - lse, 0.0), row_ok)
    if COMPUTE_GRAD:
        safe_tgt = tl.where(valid, tgt, 0)
        slope_t = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
        if SOFTCAP:
            slope_t = 1.0 - (target_logit / softcap) * (target_logit / softcap)
        for h0 in range(0, H, BLOCK_H):
            hc = h0 + tl.arange(0, BLOCK_H)
            h_ok = hc < H
            w_t = tl.load(weight_ptr + safe_tgt[:, None] * stride_wv + hc[None, :], valid[:, None] & h_ok[None, :], 0.0)
            a_ptrs = dlogp_ptr + rows[:, None] * stride_dn + hc[None, :]
            a_mask = row_ok[:, None] & h_ok[None, :]
            a = tl.load(a_ptrs, a_mask, other=0.0)
            grad = tl.where(valid[:, None], w_t.to(tl.float32) * slope_t[:, None] - a / s[:, None], 0.0)
            tl.store(a_ptrs, grad, a_mask)


@triton.jit
def _logprobs_dweight_kernel(
    hidden_ptr,  # [N, H] input dtype; row stride stride_hn
    weight_ptr,  # [V, H] input dtype; row stride stride_wv
    targets_ptr,  # [N] int64
    lse_ptr,  # [N] fp32 from the forward
    grad_ptr,  # [N] fp32 upstream gradient of logp, 0 at ignored rows
    dweight_ptr,  # [V, H] fp32 out, zero-filled on entry; row stride stride_dv
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    stride_dv,
    softcap,  # the logit soft-cap c (read only when SOFTCAP)
    SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)  # [BLOCK_V] vocabulary rows this program owns
    col_ok = cols < V
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < N
        tgt = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
        z = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hc = h0 + tl.arange(0, BLOCK_H)
            h_ok = hc < H
            x = tl.load(
                hidden_ptr + rows[:, None] * stride_hn + hc[None, :], row_ok[:, None] & h_ok[None, :], other=0.0
            )
            w = tl.load(
                weight_ptr + cols[:, None] * stride_wv + hc[None, :], col_ok[:, None] & h_ok[None, :], other=0.0
            )
            if DOT_FP32:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            z = tl.dot(x, tl.trans(w), z, input_precision=DOT_PRECISION)
        slope = tl.full([BLOCK_N, BLOCK_V], 1.0, dtype=tl.float32)
        if SOFTCAP:
            t = _tanh(z / softcap)
            z = softcap * t
            slope = 1.0 - t * t
        p = tl.exp(z - lse[:, None])
        onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
        dz = tl.where(col_ok[None, :], g[:, None] * (onehot - p) * slope, 0.0)  # [BLOCK_N, BLOCK_V] d loss / d z
        dz_t = tl.trans(dz)  # [BLOCK_V, BLOCK_N]
        for h0 in range(0, H, BLOCK_H):
            hc = h0 + tl.arange(0, BLOCK_H)
            h_ok = hc < H
            x = tl.load(
                hidden_ptr + rows[:, None] * stride_hn + hc[None, :], row_ok[:, None] & h_ok[None, :], other=0.0
            )
            d_ptrs = dweight_ptr + cols[:, None] * stride_dv + hc[None, :]
            d_mask = col_ok[:, None] & h_ok[None, :]
            acc = tl.load(d_ptrs, d_mask, other=0.0)
            acc = tl.dot(dz_t, x.to(tl.float32), acc, input_precision=DOT_PRECISION)  # dz stays fp32
            tl.store(d_ptrs, acc, d_mask)


def _dot_config(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[bool, str]:
    dot_fp32 = INTERPRETED or hidden.dtype != weight.dtype or hidden.dtype == torch.float32
    precision = "tf32" if (not INTERPRETED and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    return dot_fp32, precision


def _block_sizes(h_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps). The interpreter prefers few, large blocks."""
    if INTERPRETED:
        return 32, 128, min(128, triton.next_power_of_2(h_dim)), 1
    return 32, 128, 64, 4


def launch_forward(
    hidden: torch.Tensor,  # [N, H], unit stride along H
    weight: torch.Tensor,  # [V, H]
    targets: torch.Tensor,  # [N] int64
    ignore_index: int,
    need_grad: bool,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """log p(target) [N], lse [N] and (if need_grad) d logp / d hidden [N, H], all fp32."""
    n, h_dim = hidden.shape
    vocab = weight.shape[0]
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    dlogp = torch.zeros(n if need_grad else 1, h_dim, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return logp, lse, dlogp if need_grad else None
    block_n, block_v, block_h, warps = _block_sizes(h_dim)
    dot_fp32, precision = _dot_config(hidden, weight)
    grid = (triton.cdiv(n, block_n),)
    _logprobs_fwd_kernel[grid](
        hidden, weight, targets, logp, lse, dlogp,
        n, vocab, h_dim, hidden.stride(0), weight.stride(0), dlogp.stride(0), ignore_index, softcap or 1.0,
        COMPUTE_GRAD=need_grad, SOFTCAP=softcap is not None, DOT_FP32=dot_fp32, DOT_PRECISION=precision,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=warps,
    )  # fmt: skip
    return logp, lse, dlogp if need_grad else None


def launch_weight_grad(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    targets: torch.Tensor,  # [N] int64
    lse: torch.Tensor,  # [N] fp32
    grad: torch.Tensor,  # [N] fp32, 0 at ignored rows
    softcap: float | None = None,
) -> torch.Tensor:
    """dL/dW [V, H] in weight's dtype."""
    n, h_dim = hidden.shape
    vocab = weight.shape[0]
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    dweight = torch.zeros(vocab, h_dim, dtype=torch.float32, device=weight.device)
    if n > 0:
        block_n, block_v, block_h, warps = _block_sizes(h_dim)
        dot_fp32, precision = _dot_config(hidden, weight)
        grid = (triton.cdiv(vocab, block_v),)
        _logprobs_dweight_kernel[grid](
            hidden, weight, targets, lse, grad.contiguous(), dweight,
            n, vocab, h_dim, hidden.stride(0), weight.stride(0), dweight.stride(0),
            softcap or 1.0, SOFTCAP=softcap is not None, DOT_FP32=dot_fp32, DOT_PRECISION=precision,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=warps,
        )  # fmt: skip
    return dweight.to(weight.dtype)


class TritonLinearLogprobs(torch.autograd.Function):
    """Triton path. Saves d logp / d hidden ([N, H] fp32) and, if W trains, only the inputs and lse."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, need_dh, need_dw, softcap):
        logp, lse, dlogp_dh = launch_forward(hidden, weight, targets, ignore_index, need_dh, softcap)
        ctx.need_dh, ctx.need_dw, ctx.ignore_index, ctx.softcap = need_dh, need_dw, ignore_index, softcap
        ctx.hidden_dtype = hidden.dtype
        if need_dw:
            ctx.save_for_backward(dlogp_dh, hidden, weight, targets, lse)
        else:
            ctx.save_for_backward(dlogp_dh)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        dlogp_dh, *rest = ctx.saved_tensors
        grad_logp = grad_logp.float()
        grad_hidden = grad_weight = None
        if ctx.need_dh:
            grad_hidden = (dlogp_dh * grad_logp[:, None]).to(ctx.hidden_dtype)
        if ctx.need_dw:
            hidden, weight, targets, lse = rest
            grad = torch.where(targets != ctx.ignore_index, grad_logp, 0.0)
            grad_weight = launch_weight_grad(hidden, weight, targets, lse, grad, ctx.softcap)
        return grad_hidden, grad_weight, None, None, None, None, None
