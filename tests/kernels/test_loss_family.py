"""Every DPO-family loss of `dpo.loss_type` against TRL 1.16's own DPOTrainer._compute_loss on the same sequence
log-probs: value and gradient. TRL's method runs unchanged on an object carrying the attributes it reads, whose
model returns the given per-token log-probs (the reference ones precomputed, as `precompute_ref_log_probs` does)."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from lite_rlhf.kernels.dpo_loss import LENGTH_AVERAGED, LOSS_TYPES, SMOOTHED, dpo_loss

PAIRS, LENGTH = 5, 7


def per_token(seed: int):
    """Policy per-token log-probs [2B, T-1] (chosen rows first) with a completion mask of various lengths, and the
    reference's sequence sums."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, LENGTH, (2 * PAIRS,), generator=gen)
    mask = (torch.arange(LENGTH)[None] < lengths[:, None] + 1) & (torch.arange(LENGTH)[None] >= 1)  # [2B, T]
    logp = -torch.rand(2 * PAIRS, LENGTH - 1, generator=gen) * 3 * mask[:, 1:]
    ref = logp.sum(1) + torch.randn(2 * PAIRS, generator=gen) * 2
    return logp, mask.long(), ref


def trl_loss(logp: torch.Tensor, mask: torch.Tensor, ref: torch.Tensor, loss_type: str, beta: float, eps: float):
    from trl import DPOTrainer

    rows = logp.shape[0]
    zeros = torch.zeros_like(logp)
    outputs = SimpleNamespace(log_probs=logp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    fake = SimpleNamespace(
        model=lambda **kw: outputs, accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x,
                                                                gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=eps, use_weighting=False,
        args=SimpleNamespace(discopop_tau=0.05), _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1,
    )  # fmt: skip
    fake.model.training = True
    inputs = {
        "input_ids": torch.ones(rows, LENGTH, dtype=torch.long),
        "attention_mask": torch.ones(rows, LENGTH),
        "completion_mask": mask,
        "ref_chosen_logps": ref[: rows // 2],
        "ref_rejected_logps": ref[rows // 2 :],
    }
    return DPOTrainer._compute_loss(fake, fake.model, inputs, return_outputs=False)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_equals_trls(loss_type):
    logp, mask, ref = per_token(seed=LOSS_TYPES.index(loss_type))
    eps = 0.1 if loss_type in SMOOTHED and loss_type != "sigmoid" else 0.0
    beta = 0.1
    mine = logp.clone().requires_grad_(True)
    sums, refs = mine.sum(1), ref.clone()
    if loss_type in LENGTH_AVERAGED:  # per-token log-probs, as fused_dpo_loss hands them over
        n = mask[:, 1:].sum(1).clamp(min=1)
        sums, refs = sums / n, refs / n
    loss, _, _ = dpo_loss(sums[:PAIRS], sums[PAIRS:], refs[:PAIRS], refs[PAIRS:], beta=beta, loss_type=loss_type,
                          label_smoothing=eps)  # fmt: skip
    loss.backward()
    theirs = logp.clone().requires_grad_(True)
    trl = trl_loss(theirs, mask, ref, loss_type, beta, eps)
    trl.backward()
    assert_close(loss, trl, rtol=1e-5, atol=1e-6)
    assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7)
    assert mine.grad.abs().sum() > 0


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t not in ("sigmoid", "ipo", "hinge")])
def test_every_loss_on_the_fused_path_equals_the_full_logit_path(loss_type):
    """The losses the Triton reduction does not cover reduce in torch on the fused kernel's log-probs. (sppo_hard at
    beta 1: at 0.1 its squared targets of ±5 scale a summation-order rounding past the gradient tolerance.)"""
    from kernel_checks import check_fused_dpo

    eps = 0.1 if loss_type in SMOOTHED else 0.0
    check_fused_dpo(3, 29, 48, 700, loss_type, 1.0 if loss_type == "sppo_hard" else 0.1, eps, torch.float32, True)


def test_the_config_offers_the_kernels_losses():
    """config.py repeats two lists of the kernel's (reading a config imports no torch): they must agree."""
    import typing

    from lite_rlhf.config import SMOOTHED_LOSSES, DPOConfig

    assert typing.get_args(typing.get_type_hints(DPOConfig)["loss_type"]) == LOSS_TYPES
    assert SMOOTHED_LOSSES == SMOOTHED
