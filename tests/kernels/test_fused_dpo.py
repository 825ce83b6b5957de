"""fused_dpo_loss on the chunked torch path: equal to "log-probs, then loss" in value and gradient,
and to TRL's and Liger's formulas."""

import pytest
import torch
from kernel_checks import (
    DPO_CASES,
    DPO_LOSS_SETTINGS,
    DPO_LOSS_TOL,
    DTYPES,
    GRAD_TOL,
    IGNORE,
    check_fused_dpo,
    check_rpo_against_trl_formula,
    llp_module,
    make_dpo_inputs,
)
from lite_rlhf.kernels import fused_dpo_loss, kernel_path, linear_logprobs_reference
from torch.testing import assert_close


@pytest.fixture(autouse=True)
def _chunked_path():
    assert kernel_path("cpu") == "chunked-torch", "these tests are for the chunked path: unset TRITON_INTERPRET"


@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen-W", "trainable-W"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("loss_type, beta, eps", DPO_LOSS_SETTINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("case", DPO_CASES, ids=lambda c: c[0])
def test_matches_logprobs_then_loss(case, loss_type, beta, eps, dtype, train_weight, monkeypatch):
    _, n_pairs, seq, h_dim, vocab = case
    monkeypatch.setattr(llp_module, "_chunk_shape", lambda n_rows, v: (16, 128))  # several blocks
    check_fused_dpo(n_pairs, seq, h_dim, vocab, loss_type, beta, eps, dtype, train_weight)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_softcap(loss_type):
    """Soft-capped logits (cap 3 on logits of spread ~2) reach the DPO loss and its gradients."""
    check_fused_dpo(2, 37, 64, 1000, loss_type, 0.1, 0.0, torch.float32, True, softcap=3.0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_rpo_term_matches_logprobs_then_loss(loss_type):
    check_fused_dpo(2, 37, 64, 1000, loss_type, 0.1, 0.0, torch.float32, True, rpo_alpha=0.5)


def test_rpo_matches_trl_sigmoid_plus_sft_formula():
    check_rpo_against_trl_formula()


def test_ipo_matches_trl_length_normalized_formula():
    # TRL 1.16 DPOTrainer, loss_type="ipo": chosen_avg_score = chosen_logratios / chosen_mask.sum(1).clamp(min=1),
    # the same for rejected, per_sequence_loss = (chosen_avg - rejected_avg - 1 / (2 beta)) ** 2, mean.
    hidden, weight, targets, ref_c, ref_r = make_dpo_inputs(3, 20, 32, 300, torch.float32)
    beta = 0.1
    with torch.no_grad():
        sums = linear_logprobs_reference(hidden, weight, targets, ignore_index=IGNORE).sum(1)
    counts = (targets != IGNORE).sum(1).clamp(min=1.0)
    chosen_avg = (sums[:3] - ref_c) / counts[:3]
    rejected_avg = (sums[3:] - ref_r) / counts[3:]
    trl = ((chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2).mean()
    loss = fused_dpo_loss(hidden, weight, targets, ref_c, ref_r, beta=beta, loss_type="ipo").loss
    assert_close(loss, trl, **DPO_LOSS_TOL, msg=lambda m: f"TRL ipo: {m}")


@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen-W", "trainable-W"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_matches_liger_fused_linear_dpo(loss_type, train_weight):
    # Liger's LigerFusedLinearDPOLoss computes the reference log-probs itself from ref_input/ref_weight;
    # we take them precomputed, summed (average_log_prob=False is Liger's DPO default).
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    hidden, weight, targets, _, _ = make_dpo_inputs(2, 24, 32, 500, torch.float32)
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_sums = linear_logprobs_reference(ref_hidden, weight, targets, ignore_index=IGNORE).sum(1)
    liger_fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE, beta=0.1, compiled=False, loss_type=loss_type)
    grads = []
    for which in ("ours", "liger"):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(train_weight)
        if which == "ours":
            loss, chosen_rewards, rejected_rewards, *_ = fused_dpo_loss(
                h, w, targets, ref_sums[:2], ref_sums[2:], beta=0.1, loss_type=loss_type
            )
        else:
            loss, aux = liger_fn(w, h, targets, ref_input=ref_hidden, ref_weight=weight)
            chosen_rewards, rejected_rewards = aux[5], aux[6]
        loss.backward()
        grads.append((loss.detach(), chosen_rewards, rejected_rewards, h.grad, w.grad))
    (loss, cr, rr, gh, gw), (l_loss, l_cr, l_rr, l_gh, l_gw) = grads
    # Liger builds the full fp32 logits of a pair and uses autograd: the numbers agree with ours
    # to fp32 summation order, as with our own reference (see kernel_checks.DPO_LOSS_TOL, GRAD_TOL).
    assert_close(loss, l_loss, **DPO_LOSS_TOL, msg=lambda m: f"Liger loss: {m}")
    assert_close(cr, l_cr, **DPO_LOSS_TOL, msg=lambda m: f"Liger chosen rewards: {m}")
    assert_close(rr, l_rr, **DPO_LOSS_TOL, msg=lambda m: f"Liger rejected rewards: {m}")
    assert_close(gh, l_gh, **GRAD_TOL[torch.float32], msg=lambda m: f"Liger hidden grad: {m}")
    if train_weight:
        assert_close(gw, l_gw, **GRAD_TOL[torch.float32], msg=lambda m: f"Liger weight grad: {m}")


def test_low_precision_inputs_give_fp32_outputs():
    for dtype in (torch.bfloat16, torch.float16):
        hidden, weight, targets, ref_c, ref_r = make_dpo_inputs(2, 8, 16, 64, dtype)
        outs = fused_dpo_loss(hidden.requires_grad_(), weight, targets, ref_c.to(dtype), ref_r.to(dtype), beta=0.1)
        assert all(t.dtype == torch.float32 for t in (*outs[:4], *outs.terms.values()))
        outs[0].backward()
        assert hidden.grad.dtype == dtype


def test_sigmoid_gradient_sign():
    # Lowering the loss must raise the chosen answers' log-probs and lower the rejected ones: one step of
    # gradient descent on hidden moves the margin h up.
    hidden, weight, targets, ref_c, ref_r = make_dpo_inputs(2, 12, 16, 64, torch.float32)
    hidden.requires_grad_(True)
    loss, cr, rr, *_ = fused_dpo_loss(hidden, weight, targets, ref_c, ref_r, beta=0.1)
    loss.backward()
    with torch.no_grad():
        loss2, cr2, rr2, *_ = fused_dpo_loss(hidden - 0.5 * hidden.grad, weight, targets, ref_c, ref_r, beta=0.1)
    assert loss2 < loss and bool(((cr2 - rr2) > (cr - rr)).all())


def test_bad_inputs():
    hidden, weight, targets, ref_c, ref_r = make_dpo_inputs(2, 8, 16, 64, torch.float32)
    with pytest.raises(ValueError, match=r"\[2B, T, H\]"):
        fused_dpo_loss(hidden[:3], weight, targets[:3], ref_c, ref_r, beta=0.1)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        fused_dpo_loss(hidden, weight, targets, ref_c[:1], ref_r, beta=0.1)
    with pytest.raises(ValueError, match="targets"):
        fused_dpo_loss(hidden, weight, targets[:, :4], ref_c, ref_r, beta=0.1)
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge"):
        fused_dpo_loss(hidden, weight, targets, ref_c, ref_r, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        fused_dpo_loss(hidden, weight, targets, ref_c, ref_r, beta=0.1, loss_type="hinge", label_smoothing=0.1)
