"""Shared cases and checks for the kernel tests: the chunked torch path (test_*.py) and the Triton path
(triton_cases.py, run under TRITON_INTERPRET=1) go through the very same table and tolerances."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from lite_rlhf.kernels import fused_dpo_loss, fused_dpo_loss_reference, linear_logprobs, linear_logprobs_reference
from torch.testing import assert_close

# The package re-exports functions named like their modules; reach the modules themselves this way.
llp_module = importlib.import_module("lite_rlhf.kernels.linear_logprobs")

IGNORE = -100


@dataclass(frozen=True)
class Case:
    name: str
    lead: tuple[int, ...]  # leading shape of hidden / shape of targets
    hidden_size: int
    vocab: int
    ignore: str = "some"  # none | some (prompt prefix + padding) | rows (whole rows) | all
    logit_scale: float = 2.0  # std of the logits; 12 gives peaked rows whose max moves between blocks

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("3x37 H64 V1000", (3, 37), 64, 1000),
    Case("one-token rows", (5, 1), 48, 257),
    Case("ignored rows", (4, 9), 32, 300, ignore="rows"),
    Case("all ignored", (2, 6), 32, 100, ignore="all"),
    Case("flat H72 V513 peaked", (50,), 72, 513, ignore="none", logit_scale=12.0),
    Case("single row, no batch dims", (), 40, 130, ignore="none"),
    Case("empty", (0, 5), 16, 64, ignore="none"),
]

# Soft-capped logits (Gemma 2's final_logit_softcapping is 30): caps at and below the logits' spread, so tanh
# bends most of them (the peaked case's logits reach ~60, far into the flat part of c tanh(z / c)).
SOFTCAP_CASES = [(CASES[0], 3.0), (CASES[2], 5.0), (CASES[4], 30.0), (CASES[4], 4.0)]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Forward: both sides compute in fp32 from the very same input values (the reference upcasts the
# bf16/fp16 inputs too), so the log-probs differ only by fp32 summation order: dot products of H
# terms and a log-sum-exp of V terms, ~(H + log V) * 1.2e-7 * |logit| <= ~1e-5 for |logits| <= 60
# here. Observed: ~1e-6. The same tolerance therefore holds for every input dtype.
LOGP_TOL = {"rtol": 1e-5, "atol": 2e-5}
# At real sizes on a GPU (H = 1,024..4,096-term dot products), fp32 summation-order error grows to ~1e-4
# on |logits| ~ 2..10; TF32 stays off unless torch allows it (torch.backends.cuda.matmul.allow_tf32).
REAL_SIZE_LOGP_TOL = {"rtol": 1e-4, "atol": 2e-4}

# Gradients: the fp32 gradients agree to ~1e-6 (sums of V or N terms of size <= 1, observed <= 2e-6);
# for bf16/fp16 inputs both sides then round that fp32 value to the input dtype, so they can differ
# by one unit in the last place where the two fp32 values straddle a rounding boundary: 2^-7
# relative for bf16 (8-bit significand) and 2^-10 for fp16 (11-bit). atol covers the fp32
# disagreement on entries near zero (gradient entries here are O(0.1..1)).
GRAD_TOL = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-5},
    torch.float16: {"rtol": 2**-10, "atol": 1e-5},
}


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0, device: str | torch.device = "cpu"):
    """hidden [*lead, H] and weight [V, H] in `dtype` (leaf tensors, no grad), targets [*lead] int64, drawn on
    `device` (the numbers depend on the device's generator; on the CPU they are the suite's)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h_dim, vocab = case.hidden_size, case.vocab
    hidden = torch.randn(*case.lead, h_dim, generator=g, device=device)
    weight = torch.randn(vocab, h_dim, generator=g, device=device) * (case.logit_scale / h_dim**0.5)
    targets = torch.randint(0, vocab, case.lead, generator=g, device=device)
    if case.ignore == "all":
        targets.fill_(IGNORE)
    elif case.ignore == "rows":
        targets[::2] = IGNORE
    elif case.ignore == "some" and len(case.lead) == 2 and case.lead[1] > 1:
        seq = case.lead[1]
        for row in range(case.lead[0]):  # prompt prefix and right padding, of random lengths
            prompt = int(torch.randint(0, seq // 2, (1,), generator=g, device=device))
            pad = int(torch.randint(0, seq // 3, (1,), generator=g, device=device))
            targets[row, :prompt] = IGNORE
            targets[row, seq - pad :] = IGNORE
    elif case.ignore == "some":  # one-token rows: ignore some rows
        targets.view(-1)[1::3] = IGNORE
    return hidden.to(dtype), weight.to(dtype), targets


def _msg(label: str):
    return lambda default: f"{label}: {default}"  # assert_close's default text holds the observed difference


def max_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest absolute difference (0 for empty tensors), for reports beside the pass/fail."""
    return float((actual.detach().float() - expected.detach().float()).abs().max()) if actual.numel() else 0.0


def check_logprobs(
    case: Case,
    dtype: torch.dtype,
    train_weight: bool,
    fn=linear_logprobs,
    seed: int = 0,
    device: str | torch.device = "cpu",
    logp_tol: dict | None = None,
    softcap: float | None = None,
) -> dict[str, float]:
    """Forward and backward of `fn` against linear_logprobs_reference on one case (with the logits soft-capped at
    `softcap` when given); returns the largest absolute difference of each compared quantity. `logp_tol`
    replaces LOGP_TOL (real sizes on a GPU)."""
    hidden, weight, targets = make_inputs(case, dtype, seed, device)
    upstream = torch.randn(case.lead, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    results = []
    for impl in (fn, linear_logprobs_reference):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(train_weight)
        out = impl(h, w, targets, ignore_index=IGNORE, **({"softcap": softcap} if softcap else {}))
        (out * upstream).sum().backward()
        results.append((out, h.grad, w.grad))
    (out, gh, gw), (ref, ref_gh, ref_gw) = results
    label = f"{case} {dtype} train_weight={train_weight} softcap={softcap}"
    assert out.dtype == torch.float32 and out.shape == targets.shape, label
    assert_close(out, ref, **(logp_tol or LOGP_TOL), msg=_msg(f"log-probs, {label}"))
    assert bool((out[targets == IGNORE] == 0).all()), f"ignored positions must give 0: {label}"
    assert gh.dtype == dtype, label
    assert_close(gh, ref_gh, **GRAD_TOL[dtype], msg=_msg(f"hidden grad, {label}"))
    diffs = {"log-probs": max_difference(out, ref), "hidden grad": max_difference(gh, ref_gh)}
    if train_weight:
        assert gw.dtype == dtype, label
        assert_close(gw, ref_gw, **GRAD_TOL[dtype], msg=_msg(f"weight grad, {label}"))
        diffs["weight grad"] = max_difference(gw, ref_gw)
    else:
        assert gw is None and ref_gw is None
    return diffs


# Fused DPO: the loss is a smooth function of per-sequence sums of <= 40 log-probs, each within 2e-5
# of the reference (LOGP_TOL), so the sums agree to ~1e-4 at worst; sigmoid and hinge have
# |dL/dh| <= beta = 0.1 and ipo averages over >= 1 token then has |dL/dh| = 2|h - 1/(2 beta)| <= ~30
# here. Observed differences are ~1e-6 (most of the per-token errors cancel in the sums).
DPO_LOSS_TOL = {"rtol": 1e-5, "atol": 1e-4}
# Gradients: products of the per-row coefficient (exact up to rounding) and d logp / d hidden (GRAD_TOL).
DPO_CASES = [
    # (name, B pairs, T, H, V)
    ("2 pairs x 37 tokens", 2, 37, 64, 1000),
    ("3 pairs x 1 token", 3, 1, 32, 130),
]
DPO_LOSS_SETTINGS = [("sigmoid", 0.1, 0.0), ("sigmoid", 0.1, 0.2), ("ipo", 0.1, 0.0), ("hinge", 0.1, 0.0)]


def make_dpo_inputs(
    n_pairs: int,
    seq: int,
    h_dim: int,
    vocab: int,
    dtype: torch.dtype,
    seed: int = 0,
    device: str | torch.device = "cpu",
):
    """hidden [2B, T, H], weight [V, H], targets [2B, T] with prompts, padding and one all-ignored
    rejected row; summed reference log-probs [B] near the policy's so the losses are not saturated."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(2 * n_pairs, seq, h_dim, generator=g, device=device)
    weight = torch.randn(vocab, h_dim, generator=g, device=device) * (2.0 / h_dim**0.5)
    targets = torch.randint(0, vocab, (2 * n_pairs, seq), generator=g, device=device)
    for row in range(2 * n_pairs):
        prompt = int(torch.randint(0, max(1, seq // 3), (1,), generator=g, device=device))
        targets[row, :prompt] = IGNORE
    targets[-1] = IGNORE  # a rejected answer with no scored token (its log-prob sum is 0)
    with torch.no_grad():
        sums = linear_logprobs_reference(hidden, weight, targets, ignore_index=IGNORE).sum(dim=1)
    ref = sums + torch.randn(2 * n_pairs, generator=g, device=device) * 3.0
    return hidden.to(dtype), weight.to(dtype), targets, ref[:n_pairs].clone(), ref[n_pairs:].clone()


def check_fused_dpo(
    n_pairs,
    seq,
    h_dim,
    vocab,
    loss_type,
    beta,
    label_smoothing,
    dtype,
    train_weight,
    fn=fused_dpo_loss,
    device: str | torch.device = "cpu",
    rpo_alpha: float = 0.0,
    softcap: float | None = None,
) -> dict[str, float]:
    """Value, rewards and gradients of `fn` against fused_dpo_loss_reference ("log-probs, then loss"), on
    soft-capped logits when `softcap` is given; returns the largest absolute difference of each compared
    quantity."""
    hidden, weight, targets, ref_c, ref_r = make_dpo_inputs(n_pairs, seq, h_dim, vocab, dtype, device=device)
    kwargs = {"beta": beta, "loss_type": loss_type, "label_smoothing": label_smoothing, "ignore_index": IGNORE,
              "rpo_alpha": rpo_alpha} | ({"softcap": softcap} if softcap else {})  # fmt: skip
    results = []
    for impl in (fn, fused_dpo_loss_reference):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(train_weight)
        loss, chosen_rewards, rejected_rewards, *_ = impl(h, w, targets, ref_c, ref_r, **kwargs)
        loss.backward()
        results.append((loss, chosen_rewards, rejected_rewards, h.grad, w.grad))
    label = (f"{loss_type} eps={label_smoothing} rpo={rpo_alpha} B={n_pairs} T={seq} {dtype} "
             f"train_weight={train_weight} softcap={softcap}")  # fmt: skip
    (loss, cr, rr, gh, gw), (ref_loss, ref_cr, ref_rr, ref_gh, ref_gw) = results
    assert loss.dtype == torch.float32 and loss.dim() == 0, label
    assert not cr.requires_grad and not rr.requires_grad, label
    assert_close(loss, ref_loss, **DPO_LOSS_TOL, msg=_msg(f"loss, {label}"))
    assert_close(cr, ref_cr, **DPO_LOSS_TOL, msg=_msg(f"chosen rewards, {label}"))
    assert_close(rr, ref_rr, **DPO_LOSS_TOL, msg=_msg(f"rejected rewards, {label}"))
    assert_close(gh, ref_gh, **GRAD_TOL[dtype], msg=_msg(f"hidden grad, {label}"))
    diffs = {
        "loss": max_difference(loss, ref_loss),
        "rewards": max(max_difference(cr, ref_cr), max_difference(rr, ref_rr)),
        "hidden grad": max_difference(gh, ref_gh),
    }
    if train_weight:
        assert_close(gw, ref_gw, **GRAD_TOL[dtype], msg=_msg(f"weight grad, {label}"))
        diffs["weight grad"] = max_difference(gw, ref_gw)
    else:
        assert gw is None
    return diffs


def check_rpo_against_trl_formula(fn=fused_dpo_loss, device: str | torch.device = "cpu") -> dict[str, float]:
    """DPO plus rpo_alpha x the chosen tokens' mean NLL, in plain torch from full logits as TRL 1.16's DPOTrainer
    computes loss_type ["sigmoid", "sft"] with loss_weights [1, alpha] (its sft term:
    -chosen_per_token_logps[chosen_mask].mean()): the loss, the NLL term and both gradients."""
    hidden, weight, targets, ref_c, ref_r = make_dpo_inputs(3, 20, 32, 300, torch.float32, device=device)
    targets[0, :12] = IGNORE  # chosen answers of different lengths: a mean over tokens, not over answers
    beta, alpha = 0.1, 0.7
    results = []
    for which in ("ours", "plain"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if which == "ours":
            loss, _, _, nll, _ = fn(h, w, targets, ref_c, ref_r, beta=beta, ignore_index=IGNORE, rpo_alpha=alpha)
        else:
            mask = targets != IGNORE
            logp = torch.log_softmax(h @ w.T, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            sums = (logp * mask).sum(1)
            margin = (sums[:3] - ref_c) - (sums[3:] - ref_r)
            loss = -torch.nn.functional.logsigmoid(beta * margin).mean() + alpha * -logp[:3][mask[:3]].mean()
            nll = -sums[:3] / mask[:3].sum(1)  # logged: each chosen answer's mean, not the batch's token mean
        loss.backward()
        results.append((loss.detach(), nll.detach(), h.grad, w.grad))
    (loss, nll, gh, gw), (p_loss, p_nll, p_gh, p_gw) = results
    assert_close(loss, p_loss, **DPO_LOSS_TOL, msg=_msg("rpo loss"))
    assert_close(nll, p_nll, **DPO_LOSS_TOL, msg=_msg("chosen nll"))
    assert_close(gh, p_gh, **GRAD_TOL[torch.float32], msg=_msg("rpo hidden grad"))
    assert_close(gw, p_gw, **GRAD_TOL[torch.float32], msg=_msg("rpo weight grad"))
    return {"loss": max_difference(loss, p_loss), "hidden grad": max_difference(gh, p_gh)}


def check_mixed_dtypes(fn=linear_logprobs, device: str | torch.device = "cpu") -> dict[str, float]:
    """bf16 hidden states with an fp32 LM head (and the reverse): each gradient in its input's dtype."""
    case = CASES[0]
    diffs: dict[str, float] = {}
    for h_dtype, w_dtype in ((torch.bfloat16, torch.float32), (torch.float32, torch.float16)):
        hidden, _, targets = make_inputs(case, h_dtype, device=device)
        _, weight, _ = make_inputs(case, w_dtype, device=device)
        grads = []
        for impl in (fn, linear_logprobs_reference):
            h = hidden.clone().requires_grad_(True)
            w = weight.clone().requires_grad_(True)
            out = impl(h, w, targets, ignore_index=IGNORE)
            out.sum().backward()
            grads.append((out, h.grad, w.grad))
        (out, gh, gw), (ref, ref_gh, ref_gw) = grads
        label = f"hidden {h_dtype}, weight {w_dtype}"
        assert gh.dtype == h_dtype and gw.dtype == w_dtype, label
        assert_close(out, ref, **LOGP_TOL, msg=_msg(f"log-probs, {label}"))
        assert_close(gh, ref_gh, **GRAD_TOL[h_dtype], msg=_msg(f"hidden grad, {label}"))
        assert_close(gw, ref_gw, **GRAD_TOL[w_dtype], msg=_msg(f"weight grad, {label}"))
        for what, a, b in (("log-probs", out, ref), ("hidden grad", gh, ref_gh), ("weight grad", gw, ref_gw)):
            diffs[what] = max(diffs.get(what, 0.0), max_difference(a, b))
    return diffs
