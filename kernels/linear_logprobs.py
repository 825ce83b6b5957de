r"""Fused "LM head -> log-softmax -> gather": per-token log-probs without the ``[tokens, vocab]`` logits.

Math. For a row ``n`` with hidden state ``x_n`` (``[H]``), LM head ``W`` (``[V, H]``) and target ``t_n``::

    z_nv      = x_n . W_v                                   logits, never stored for all v
    lse_n     = log sum_v exp(z_nv)                         online: walk v in blocks, keep (m, s)
    logp_n    = z_{n,t_n} - lse_n                           0 where t_n == ignore_index
    p_nv      = exp(z_nv - lse_n)                           softmax
    dlogp_n / dx_n = W_{t_n} - sum_v p_nv W_v               [H]
    dlogp_n / dW_v = (1[v == t_n] - p_nv) x_n               [V, H]

Soft-capping (Gemma 2's ``final_logit_softcapping``, optional). With a cap ``c`` the logits are
``y_nv = c tanh(z_nv / c)`` and everything above holds with ``y`` for ``z`` and the chain rule's
``g_nv = dy/dz = 1 - tanh^2(z_nv / c)`` on every term that reaches ``x`` or ``W``::

    dlogp_n / dx_n = g_{n,t_n} W_{t_n} - sum_v p_nv g_nv W_v
    dlogp_n / dW_v = (1[v == t_n] - p_nv) g_nv x_n

A linear logit scale (Granite's ``1 / logits_scaling``, a sampling temperature) is not an argument: the caller
multiplies ``hidden`` by it (under a cap ``c``, ``c tanh(z / c) / T`` is the cap ``c / T`` on ``z / T``).

Online log-sum-exp over vocabulary blocks: with a running max ``m`` and a running sum
``s = sum exp(z - m)``, a new block updates ``m' = max(m, max_block z)``,
``s' = s * exp(m - m') + sum_block exp(z - m')``. The same rescaling keeps a running
``a = sum_v exp(z_nv - m) W_v`` (``[H]`` per row, as flash attention does with its values), so at the
end ``sum_v p_nv W_v = a / s``. The gradient with respect to ``hidden`` per unit upstream gradient is
therefore formed in the forward pass, with one extra matmul per block and no second walk over the
vocabulary: forward + backward do two ``N x V x H`` matmuls in total, like the naive version. The
backward only scales it by the upstream gradient. When the LM head trains too, the backward walks the
vocabulary again (recomputing the logits block by block from the saved ``lse``) to accumulate ``dW``.

Shapes. ``hidden [..., H]``, ``weight [V, H]``, ``targets [...]`` (integer); output ``[...]`` fp32.

Dtypes. fp32, bf16 and fp16 inputs. Everything is accumulated in fp32 (logits, max, sums, the
gradient accumulator); the log-probs are returned in fp32 and the gradients in the dtype of the input
they belong to.

Memory. Naive autograd keeps ``[N, V]`` logits, log-softmax and their gradient (3 x 4 x N x V bytes:
~3 GiB for N = 2048 tokens at V = 128,256). Here the largest temporaries are one block of logits
(``rows x vocab_block``, a few tens of MiB) and the ``[N, H]`` fp32 gradient saved for backward.
Only positions whose target is not ``ignore_index`` are computed (``N`` counts those): prompt and
padding positions are dropped before the vocabulary walk and get 0 (and no gradient) back.

Implementations, chosen by :func:`lite_rlhf.kernels.kernel_path`: Triton kernels (CUDA, or CPU under
``TRITON_INTERPRET=1``; in ``linear_logprobs_triton.py``), and the chunked torch path below (CPU).
:func:`linear_logprobs_reference` is the specification and the test oracle.
"""

from __future__ import annotations

import torch

from .backend import KernelPath, kernel_path, load_triton_module

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Chunked torch path: one logits block holds about this many fp32 values (4M = 16 MiB). Blocks of this
# size keep the matmuls large enough to run at full speed on a CPU while the memory stays flat.
_BLOCK_ELEMENTS = 4 * 1024 * 1024
_MAX_ROWS = 1024  # rows per chunk: bounds the [rows, H] accumulators for very long batches


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> torch.Tensor:
    """Naive fp32 log p(target): full logits (soft-capped when `softcap` is set), log-softmax, gather. The
    specification and the test oracle."""
    logits = softcap_logits(hidden.float() @ weight.float().t(), softcap)  # [..., V]
    logprobs = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    picked = logprobs.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0)


def softcap_logits(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``c tanh(z / c)`` (the logits unchanged when ``softcap`` is None): the cap as transformers applies it."""
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _check_softcap(softcap: float | None) -> None:
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap}")


def _cap_block(z: torch.Tensor, softcap: float | None, need_slope: bool) -> torch.Tensor | None:
    """Soft-cap a logits block in place; returns the slope ``1 - tanh^2(z / c)`` when asked (else None)."""
    if softcap is None:
        return None
    z.div_(softcap).tanh_()
    slope = 1 - z * z if need_slope else None
    z.mul_(softcap)
    return slope


def _chunk_shape(n_rows: int, weight: torch.Tensor) -> tuple[int, int]:
    """(rows, vocab block) for the chunked path: a [rows, vocab block] fp32 block of ~_BLOCK_ELEMENTS. A 16-bit
    LM head is read in fp32 one block of rows at a time, a copy of vocab block x H values: that block is held to
    ~_BLOCK_ELEMENTS too. (Bounded by the logits alone, a few rows took the whole vocabulary in one block: with
    124 rows a 33,825-row copy of Qwen2.5-1.5B's head, 208 MiB, and 554 MiB of Llama 3 8B's; bench_scale.py.)"""
    vocab, h_dim = weight.shape
    rows = max(1, min(n_rows, _MAX_ROWS))
    block = max(256, min(vocab, _BLOCK_ELEMENTS // rows))
    if weight.dtype != torch.float32:
        block = max(256, min(block, _BLOCK_ELEMENTS // h_dim))
    return rows, block


def _block_buffer(n_rows: int, vocab: int, rows: int, block: int, device: torch.device) -> torch.Tensor:
    """One buffer reused for every logits block: allocating (and page-faulting) a fresh block each
    time costs as much memory traffic as the naive version's full logits."""
    return torch.empty(min(n_rows, rows) * min(vocab, block), dtype=torch.float32, device=device)


def _block_view(buffer: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    return buffer[: n_rows * n_cols].view(n_rows, n_cols)  # contiguous, also for the tail blocks


def _chunked_forward(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    targets: torch.Tensor,  # [N] int64
    ignore_index: int,
    need_grad: bool,
    rows: int,
    block: int,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """log p(target) [N], lse [N] and (if need_grad) d logp / d hidden [N, H], all fp32."""
    n, h_dim = hidden.shape
    vocab = weight.shape[0]
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    dlogp_dh = torch.empty(n, h_dim, dtype=torch.float32, device=hidden.device) if need_grad else None
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    z_buffer = _block_buffer(n, vocab, rows, block, hidden.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        x = hidden[r0:r1].float()  # [R, H]; a view when hidden is fp32
        m = torch.full((r1 - r0,), float("-inf"), dtype=torch.float32, device=hidden.device)
        s = torch.zeros(r1 - r0, dtype=torch.float32, device=hidden.device)
        acc = dlogp_dh[r0:r1] if need_grad else None  # running sum_v exp(z - m) W_v, [R, H]
        for v0 in range(0, vocab, block):
            w = weight[v0 : v0 + block].float()  # [Vb, H]
            z = torch.mm(x, w.t(), out=_block_view(z_buffer, r1 - r0, w.shape[0]))  # [R, Vb] logits block
            slope = _cap_block(z, softcap, acc is not None)  # [R, Vb] or None
            m_new = torch.maximum(m, z.amax(dim=1))
            alpha = (m - m_new).exp_()  # rescales what was summed under the old max; 0 on the first block
            z.sub_(m_new[:, None]).exp_()  # now exp(z - m_new), in place
            s.mul_(alpha).add_(z.sum(dim=1))
            if slope is not None:
                z.mul_(slope)  # the accumulator sums exp(y - m) dy/dz W_v
            if acc is not None and v0 == 0:
                torch.mm(z, w, out=acc)
            elif acc is not None:
                acc.mul_(alpha[:, None]).addmm_(z, w)
            m = m_new
        w_t = weight[safe_targets[r0:r1]].float()  # [R, H] the target rows of W
        lse_c = m + s.log()
        lse[r0:r1] = lse_c
        ok = valid[r0:r1]
        z_t = (x * w_t).sum(dim=1)  # [R] the target logits
        slope_t = _cap_block(z_t, softcap, acc is not None)
        logp[r0:r1] = torch.where(ok, z_t - lse_c, 0.0)
        if acc is not None:
            # d logp / dx = g_t W_t - a / s, and 0 for ignored rows
            w_t = w_t if slope_t is None else w_t * slope_t[:, None]
            acc.div_(s[:, None]).neg_().add_(w_t).mul_(ok[:, None])
    return logp, lse, dlogp_dh


def _chunked_weight_grad(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    targets: torch.Tensor,  # [N] int64
    lse: torch.Tensor,  # [N] fp32
    grad: torch.Tensor,  # [N] fp32 upstream gradient, already 0 at ignored rows
    rows: int,
    block: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """dL/dW = sum_n grad_n (onehot(t_n) - p_n) g_n x_n, one vocabulary block at a time (logits recomputed; g the
    soft-cap's slope, 1 without a cap)."""
    n = hidden.shape[0]
    vocab = weight.shape[0]
    x_all = hidden.float()  # [N, H]; a view when hidden is fp32
    valid = grad != 0
    p_buffer = _block_buffer(n, vocab, rows, block, hidden.device)
    grad_weight = torch.empty_like(weight)
    for v0 in range(0, vocab, block):
        v1 = min(vocab, v0 + block)
        w = weight[v0:v1].float()  # [Vb, H]
        dw = torch.zeros_like(w)  # [Vb, H] fp32
        for r0 in range(0, n, rows):
            x = x_all[r0 : r0 + rows]  # [R, H]
            p = torch.mm(x, w.t(), out=_block_view(p_buffer, x.shape[0], w.shape[0]))  # [R, Vb]
            slope = _cap_block(p, softcap, True)
            p.sub_(lse[r0 : r0 + rows, None]).exp_().mul_(-grad[r0 : r0 + rows, None])  # -grad * softmax
            if slope is not None:
                p.mul_(slope)
            dw.addmm_(p.t(), x)
        hit = valid & (targets >= v0) & (targets < v1)  # the one-hot part: + grad_n g_n x_n on row t_n
        coef = grad[hit]
        if softcap is not None:
            coef = coef * (1 - torch.tanh((x_all[hit] * w[targets[hit] - v0]).sum(dim=1) / softcap) ** 2)
        dw.index_add_(0, targets[hit] - v0, x_all[hit] * coef[:, None])
        grad_weight[v0:v1] = dw
    return grad_weight


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """Chunked torch path. Saves d logp / d hidden ([N, H] fp32) and, if W trains, only the inputs and lse."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, need_dh, need_dw, rows, block, softcap):
        logp, lse, dlogp_dh = _chunked_forward(hidden, weight, targets, ignore_index, need_dh, rows, block, softcap)
        ctx.need_dh, ctx.need_dw = need_dh, need_dw
        ctx.ignore_index, ctx.rows, ctx.block, ctx.softcap = ignore_index, rows, block, softcap
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
            grad_weight = _chunked_weight_grad(hidden, weight, targets, lse, grad, ctx.rows, ctx.block, ctx.softcap)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_logprobs: hidden [..., H] and weight [V, H] disagree: hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)} (pass the LM head weight, e.g. model.lm_head.weight)"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"linear_logprobs: targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"linear_logprobs: {name} is {t.dtype}; supported: fp32, bf16, fp16")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"linear_logprobs: targets must be integer token ids, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"linear_logprobs: tensors on different devices: hidden {hidden.device}, weight {weight.device}, "
            f"targets {targets.device}"
        )


def _check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    # Only on CPU: on CUDA the check would synchronize the device on every call.
    if targets.device.type != "cpu" or targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(
            f"linear_logprobs: target id {value} is outside the vocabulary [0, {vocab}) and is not "
            f"ignore_index={ignore_index}: the tokenizer and the LM head disagree"
        )


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    path: KernelPath | None = None,
) -> torch.Tensor:
    """Per-token ``log softmax(hidden @ weight.T)[target]`` in fp32, without materializing the logits; with
    ``softcap`` c, of the soft-capped logits ``c tanh(hidden @ weight.T / c)``.

    Args:
        hidden: ``[..., H]`` final hidden states (fp32, bf16 or fp16).
        weight: ``[V, H]`` LM head weight. It may be frozen (LoRA, 4-bit base) or trainable.
        targets: ``[...]`` token ids; positions equal to ``ignore_index`` give 0 and no gradient.
        ignore_index: the target value of prompt and padding positions.
        softcap: the model's final logit soft-cap (Gemma 2's ``final_logit_softcapping``), or None.
        path: the implementation (default: :func:`kernel_path` of the device; `dpo.kernel` sets it).

    Returns:
        ``[...]`` fp32 log-probabilities. Differentiable with respect to ``hidden`` and ``weight``.
    """
    _check_inputs(hidden, weight, targets)
    _check_softcap(softcap)
    lead_shape = targets.shape
    h_dim = hidden.shape[-1]
    x = hidden.reshape(-1, h_dim)  # [N, H]
    if x.stride(-1) != 1:
        x = x.contiguous()
    t = targets.reshape(-1).long()  # [N]
    _check_target_range(t, weight.shape[0], ignore_index)
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    path = path or kernel_path(hidden.device)
    # Only the scored positions reach the LM head: prompt and padding positions (often half of a batch) cost
    # nothing. (One nonzero() per call: on CUDA a synchronization, small beside the vocabulary walk.)
    scored = (t != ignore_index).nonzero().squeeze(1)
    compact = scored.numel() < t.numel()
    xs, ts = (x[scored], t[scored]) if compact else (x, t)
    if path == "chunked-torch":
        rows, block = _chunk_shape(xs.shape[0], weight)
        out = _ChunkedLinearLogprobs.apply(xs, weight, ts, ignore_index, need_dh, need_dw, rows, block, softcap)
    else:
        triton_impl = load_triton_module("linear_logprobs_triton")
        out = triton_impl.TritonLinearLogprobs.apply(xs, weight, ts, ignore_index, need_dh, need_dw, softcap)
    if compact:
        out = torch.zeros(t.shape, dtype=out.dtype, device=out.device).index_copy(0, scored, out)
    return out.view(lead_shape)


def linear_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, *, softcap: float | None = None
) -> torch.Tensor:
    """Per-token entropy of ``softmax(hidden @ weight.T)`` (the logits soft-capped by ``softcap`` when set) in
    fp32 (0 where ``mask`` is False), without the ``[tokens, vocab]`` logits and without gradient: a figure for
    the log (the policy's entropy on its answers).

    One walk over vocabulary blocks per chunk of rows, as the log-probs' forward, keeping the running max ``m``,
    ``s = sum exp(z - m)`` and ``u = sum exp(z - m) (z - m)``. A block with a higher max ``m'`` rescales both by
    ``a = exp(m - m')``: ``s' = a s``, ``u' = a (u + (m - m') s)``; at the end ``H = log s - u / s`` (with
    ``p = exp(z - m) / s``, ``-sum p log p = log s - u / s``). Torch ops on every device: the Triton kernels
    compute log-probs only, and this costs one more no-gradient matmul per scored token, like their forward.
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1] or tuple(mask.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"linear_entropy: hidden [..., H], weight [V, H] and mask [...] disagree: hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}, mask {tuple(mask.shape)}")  # fmt: skip
    _check_softcap(softcap)
    x = hidden.reshape(-1, hidden.shape[-1])
    scored = mask.reshape(-1).to(x.device).nonzero().squeeze(1)
    out = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    n, vocab = scored.numel(), weight.shape[0]
    rows, block = _chunk_shape(max(1, n), weight)
    z_buffer, e_buffer = (_block_buffer(max(1, n), vocab, rows, block, x.device) for _ in range(2))
    with torch.no_grad():
        for r0 in range(0, n, rows):
            xs = x[scored[r0 : r0 + rows]].float()  # [R, H]
            m = torch.full((xs.shape[0],), float("-inf"), dtype=torch.float32, device=x.device)
            s, u = torch.zeros_like(m), torch.zeros_like(m)
            for v0 in range(0, vocab, block):
                w = weight[v0 : v0 + block].float()  # [Vb, H]
                z = torch.mm(xs, w.t(), out=_block_view(z_buffer, xs.shape[0], w.shape[0]))  # [R, Vb] logits
                _cap_block(z, softcap, False)
                m_new = torch.maximum(m, z.amax(dim=1))
                shift = torch.where(s > 0, m - m_new, 0.0)  # 0 before the first block (m = -inf, s = 0)
                a = shift.exp()
                z.sub_(m_new[:, None])  # z - m'
                e = torch.exp(z, out=_block_view(e_buffer, *z.shape))
                u = a * (u + shift * s) + z.mul_(e).sum(dim=1)  # z no longer needed: (z - m') exp(z - m') in place
                s = a * s + e.sum(dim=1)
                m = m_new
            out[scored[r0 : r0 + rows]] = s.log() - u / s
    return out.view(mask.shape)


def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each sequence and its number of scored tokens.

    Args:
        hidden: ``[B, T, H]`` final hidden states.
        weight: ``[V, H]`` LM head weight.
        targets: ``[B, T]`` shifted targets (target ``t`` is predicted from position ``t``), with
            ``ignore_index`` at prompt and padding positions.

    Returns:
        ``(sum_logps [B] fp32, n_tokens [B] int64)``. The mean log-prob is ``sum_logps / n_tokens.clamp(min=1)``.
    """
    if hidden.dim() != 3:
        raise ValueError(f"sequence_logps: hidden must be [B, T, H], got {tuple(hidden.shape)}")
    logp = linear_logprobs(hidden, weight, targets, ignore_index=ignore_index, softcap=softcap)  # [B, T]
    return logp.sum(dim=-1), (targets != ignore_index).sum(dim=-1)
