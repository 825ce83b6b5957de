"""Every DPO-family loss of `dpo.loss_type` against TRL 1.16's own DPOTrainer._compute_loss on the same per-token
log-probs, alone and weighted in a list: value and gradient. TRL's method runs unchanged on an object carrying the
attributes it reads, whose model returns the given per-token log-probs (the reference ones precomputed, as
`precompute_ref_log_probs` does). SimPO, which TRL's DPOTrainer lacks, and robust DPO's flip correction against plain
torch written from their papers."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from lite_rlhf.kernels.dpo_loss import LOSS_TYPES, SMOOTHED, dpo_loss
from lite_rlhf.kernels.fused_dpo import LossSpec, loss_recipe, preference_loss
from torch.testing import assert_close

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


TRL_LOSSES = [t for t in LOSS_TYPES if t != "simpo"]  # TRL's DPOTrainer has the others (simpo: its CPO trainer)
IGNORE = -100


def trl_loss(logp, mask, ref, loss_types: list[str], beta: float, eps: float, weights: list[float] | None = None):
    from trl import DPOTrainer

    rows = logp.shape[0]
    zeros = torch.zeros_like(logp)
    outputs = SimpleNamespace(log_probs=logp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    fake = SimpleNamespace(
        model=lambda **kw: outputs, accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x,
                                                                gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=loss_types, loss_weights=weights or [1.0] * len(loss_types), beta=beta, label_smoothing=eps,
        use_weighting=False,
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


def ours(logp, mask, ref, loss_types: list[str], beta: float, eps: float, weights: list[float] | None = None):
    """preference_loss on the same per-token log-probs (targets: ignored where TRL's shifted mask is 0)."""
    targets = torch.where(mask[:, 1:].bool(), 1, IGNORE)
    spec = LossSpec(loss_recipe(loss_types, weights), beta, eps)
    return preference_loss(logp, targets, ref[:PAIRS], ref[PAIRS:], spec, IGNORE)


def compare(loss_types: list[str], seed: int, beta: float = 0.1, eps: float = 0.0, weights=None) -> None:
    logp, mask, ref = per_token(seed)
    mine, theirs = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    out = ours(mine, mask, ref, loss_types, beta, eps, weights)
    out.loss.backward()
    trl = trl_loss(theirs, mask, ref, loss_types, beta, eps, weights)
    trl.backward()
    assert_close(out.loss, trl, rtol=1e-5, atol=1e-6)
    assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7)
    assert mine.grad.abs().sum() > 0
    if len(loss_types) == 1:
        assert_close(out.terms[loss_types[0]], trl.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", TRL_LOSSES)
def test_every_loss_equals_trls(loss_type):
    compare([loss_type], seed=LOSS_TYPES.index(loss_type), eps=0.1 if loss_type in SMOOTHED[1:] else 0.0)


@pytest.mark.parametrize("loss_types, weights, eps", [
    (["sigmoid", "sft"], [1.0, 0.5], 0.0),  # RPO in TRL's spelling
    (["robust", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.1),
    (["ipo", "apo_zero"], None, 0.0),
])  # fmt: skip
def test_weighted_lists_equal_trls(loss_types, weights, eps):
    compare(loss_types, seed=len(loss_types), eps=eps, weights=weights)


def test_each_terms_value_is_logged_before_its_weight():
    logp, mask, ref = per_token(seed=3)
    out = ours(logp, mask, ref, ["sigmoid", "sft"], 0.1, 0.0, [1.0, 0.25])
    alone = {name: ours(logp, mask, ref, [name], 0.1, 0.0).loss for name in ("sigmoid", "sft")}
    assert_close(out.terms["sigmoid"], alone["sigmoid"]) and assert_close(out.terms["sft"], alone["sft"])
    assert_close(out.loss, alone["sigmoid"] + 0.25 * alone["sft"])


def test_simpo_equals_the_papers_formula():
    """SimPO (Meng et al. 2024, eq. 6): -log sigma(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma), no
    reference model; with label smoothing eps the flipped-label mix. The reference inputs must not matter."""
    logp, mask, ref = per_token(seed=11)
    beta, gamma, eps = 2.0, 1.2, 0.1
    n = mask[:, 1:].sum(1).clamp(min=1)
    plain_in = logp.clone().requires_grad_(True)
    avg = plain_in.sum(1) / n
    x = beta * (avg[:PAIRS] - avg[PAIRS:]) - gamma
    plain = (-(1 - eps) * torch.nn.functional.logsigmoid(x) - eps * torch.nn.functional.logsigmoid(-x)).mean()
    plain.backward()
    for refs in (ref, torch.randn_like(ref) * 50):
        mine = logp.clone().requires_grad_(True)
        targets = torch.where(mask[:, 1:].bool(), 1, IGNORE)
        spec = LossSpec(loss_recipe("simpo"), beta, eps, simpo_gamma=gamma)
        out = preference_loss(mine, targets, refs[:PAIRS], refs[PAIRS:], spec, IGNORE)
        out.loss.backward()
        assert_close(out.loss, plain.detach())
        assert_close(mine.grad, plain_in.grad)
        assert_close(out.chosen_rewards, beta * avg[:PAIRS].detach())  # SimPO's implicit reward


def test_robust_equals_the_papers_flip_corrected_loss():
    """Provably robust DPO (Chowdhury et al. 2024, eq. 8): with l(h) = -log sigma(beta h) the DPO loss of a pair and
    eps the flip rate, ((1 - eps) l(h) - eps l(-h)) / (1 - 2 eps); its expectation over flips is DPO's clean loss."""
    gen = torch.Generator().manual_seed(5)
    pc, pr, rc, rr = (torch.randn(6, generator=gen) * 4 for _ in range(4))
    beta, eps = 0.3, 0.2
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=eps)
    h = (pc - rc) - (pr - rr)
    clean, flipped = -torch.nn.functional.logsigmoid(beta * h), -torch.nn.functional.logsigmoid(-beta * h)
    assert_close(loss, (((1 - eps) * clean - eps * flipped) / (1 - 2 * eps)).mean())
    # unbiased: averaged over a label flipped with probability eps, the robust loss is the clean DPO loss
    expected = (1 - eps) * ((1 - eps) * clean - eps * flipped) + eps * ((1 - eps) * flipped - eps * clean)
    assert_close((expected / (1 - 2 * eps)).mean(), clean.mean())


def test_a_list_needs_a_weight_each_and_names_each_loss_once():
    with pytest.raises(ValueError, match="2 loss weight"):
        loss_recipe(["sigmoid"], [1.0, 2.0])
    with pytest.raises(ValueError, match="twice"):
        loss_recipe(["sigmoid", "sigmoid"])
    with pytest.raises(ValueError, match="once"):
        loss_recipe(["sigmoid", "sft"], rpo_alpha=1.0)
    assert loss_recipe("ipo", rpo_alpha=0.5) == (("ipo", 1.0), ("sft", 0.5))


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t not in ("sigmoid", "ipo", "hinge")] + ["sigmoid,sft"])
def test_every_loss_on_the_fused_path_equals_the_full_logit_path(loss_type):
    """The losses the Triton reduction does not cover reduce in torch on the fused kernel's log-probs. (sppo_hard at
    beta 1: at 0.1 its squared targets of ±5 scale a summation-order rounding past the gradient tolerance.)"""
    from kernel_checks import check_fused_dpo

    eps = 0.1 if loss_type in SMOOTHED else 0.0
    names = loss_type.split(",")
    check_fused_dpo(3, 29, 48, 700, names, 1.0 if loss_type == "sppo_hard" else 0.1, eps, torch.float32, True)


def test_the_config_offers_the_kernels_losses():
    """config.py repeats two lists of the kernel's (reading a config imports no torch): they must agree."""
    import typing

    from lite_rlhf.config import SMOOTHED_LOSSES, DPOConfig

    names = typing.get_args(typing.get_type_hints(DPOConfig)["loss_type"])[0]  # tuple[Literal[...], ...]
    assert typing.get_args(names) == LOSS_TYPES
    assert SMOOTHED_LOSSES == SMOOTHED
