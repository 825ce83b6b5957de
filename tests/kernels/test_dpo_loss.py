"""dpo_loss: hand-derived values, TRL 1.16's inline formula, Liger's preference_loss_fn."""

import math

import pytest
import torch
import torch.nn.functional as F
from lite_rlhf.kernels import LOSS_TYPES, dpo_loss
from torch.testing import assert_close

# One pair: policy chosen -10, reference chosen -12, policy rejected -15, reference rejected -13, so
# the chosen log-ratio is +2, the rejected one -2, and the margin h = 2 - (-2) = 4.
PAIR = (torch.tensor([-10.0]), torch.tensor([-15.0]), torch.tensor([-12.0]), torch.tensor([-13.0]))

# (loss_type, beta, label_smoothing, loss, dL/d policy_chosen) derived by hand:
HAND_DERIVED = [
    # sigmoid, beta 0.5: beta h = 2, L = -log sigma(2) = log(1 + e^-2) = log(1.1353352832) = 0.1269280110;
    # dL/dh = -beta sigma(-2) = -0.5 * 0.1192029220 = -0.0596014610.
    ("sigmoid", 0.5, 0.0, 0.1269280110, -0.0596014610),
    # cDPO, eps 0.25: L = 0.75 log(1 + e^-2) + 0.25 log(1 + e^2) = 0.75 * 0.1269280110 + 0.25 * 2.1269280110
    #   = 0.0951960083 + 0.5317320028 = 0.6269280110;
    # dL/dh = beta (-0.75 sigma(-2) + 0.25 sigma(2)) = 0.5 (-0.0894021915 + 0.2201992695) = 0.0653985390.
    ("sigmoid", 0.5, 0.25, 0.6269280110, 0.0653985390),
    # ipo, beta 0.25: 1/(2 beta) = 2, L = (4 - 2)^2 = 4, dL/dh = 2 (4 - 2) = 4.
    ("ipo", 0.25, 0.0, 4.0, 4.0),
    # hinge, beta 0.1: L = max(0, 1 - 0.4) = 0.6, dL/dh = -beta = -0.1.
    ("hinge", 0.1, 0.0, 0.6, -0.1),
    # hinge, beta 0.5: 1 - beta h = -1 < 0, L = 0, no gradient.
    ("hinge", 0.5, 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize("loss_type, beta, eps, expected, expected_grad", HAND_DERIVED)
def test_hand_derived_values(loss_type, beta, eps, expected, expected_grad):
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = (t.clone() for t in PAIR)
    policy_chosen.requires_grad_(True)
    policy_rejected.requires_grad_(True)
    loss, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type, label_smoothing=eps
    )
    loss.backward()
    # fp32 evaluation of exp/log near 1: ~1e-7 relative; the hand values have 10 digits.
    assert_close(loss, torch.tensor(expected), rtol=1e-6, atol=1e-7, msg=lambda m: f"{loss_type} loss: {m}")
    assert_close(policy_chosen.grad, torch.tensor([expected_grad]), rtol=1e-6, atol=1e-7)
    assert_close(policy_rejected.grad, torch.tensor([-expected_grad]), rtol=1e-6, atol=1e-7)  # dh/d pr = -1
    # rewards beta (policy - reference): beta * 2 and beta * -2, exactly representable products
    assert_close(chosen_rewards, torch.tensor([2.0 * beta]))
    assert_close(rejected_rewards, torch.tensor([-2.0 * beta]))
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_mean_over_pairs():
    # Pair 1 as above (h = 4), pair 2 with h = 0: sigmoid beta 0.5 gives log(1 + e^-2) and log 2;
    # the mean is (0.1269280110 + 0.6931471806) / 2 = 0.4100375958.
    loss, _, _ = dpo_loss(
        torch.tensor([-10.0, -5.0]),
        torch.tensor([-15.0, -5.0]),
        torch.tensor([-12.0, -5.0]),
        torch.tensor([-13.0, -5.0]),
        beta=0.5,
    )
    assert_close(loss, torch.tensor(0.4100375958), rtol=1e-6, atol=1e-7)
    assert math.isclose((0.1269280110 + math.log(2)) / 2, 0.4100375958, rel_tol=1e-9)


def _random_logps(n_pairs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-50.0 + 10.0 * torch.randn(n_pairs, generator=g, dtype=torch.float32) for _ in range(4)]


def test_matches_trl_formula():
    # TRL 1.16 has no importable DPO loss: it is inline in DPOTrainer._compute_loss. Its formulas:
    #   sigmoid: -F.logsigmoid(beta * delta_score); hinge: torch.relu(1 - beta * delta_score), mean over the batch,
    #   with delta_score = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps).
    pc, pr, rc, rr = _random_logps()
    beta = 0.1
    delta_score = (pc - rc) - (pr - rr)
    trl = {"sigmoid": (-F.logsigmoid(beta * delta_score)).mean(), "hinge": torch.relu(1 - beta * delta_score).mean()}
    for loss_type, expected in trl.items():
        loss, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type)
        # the same fp32 operations in the same order: equal to rounding
        assert_close(loss, expected, rtol=1e-6, atol=1e-7, msg=lambda m, t=loss_type: f"TRL {t}: {m}")
        assert_close(chosen_rewards, beta * (pc - rc))  # TRL: chosen_rewards = beta * chosen_logratios
        assert_close(rejected_rewards, beta * (pr - rr))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_matches_liger_preference_loss_fn(loss_type):
    # Liger 0.8.5: LigerFusedLinearDPOFunction.preference_loss_fn(chosen_logps, rejected_logps, full_target,
    # ref_chosen_logps, ref_rejected_logps, beta, loss_type, label_smoothing, discopop_tau) -> (loss, chosen
    # rewards, rejected rewards); it divides the summed loss by full_target.shape[0] // 2. Liger has no ipo,
    # and its label smoothing belongs to its "robust" loss (a different formula), so only these two compare.
    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction

    pc, pr, rc, rr = _random_logps(seed=1)
    ours_in = [pc.clone().requires_grad_(), pr.clone().requires_grad_()]
    liger_in = [pc.clone().requires_grad_(), pr.clone().requires_grad_()]
    ours = dpo_loss(*ours_in, rc, rr, beta=0.1, loss_type=loss_type)
    full_target = torch.zeros(2 * pc.shape[0], 1, dtype=torch.long)
    liger = LigerFusedLinearDPOFunction.preference_loss_fn(
        *liger_in, full_target, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.1, loss_type=loss_type
    )
    ours[0].backward()
    liger[0].backward()
    # Liger sums then divides, we take the mean: fp32 reassociation, ~1e-7 relative.
    for name, a, b in zip(("loss", "chosen rewards", "rejected rewards"), ours, liger, strict=True):
        assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"Liger {loss_type} {n}: {m}")
    assert_close(ours_in[0].grad, liger_in[0].grad, rtol=1e-6, atol=1e-9)
    assert_close(ours_in[1].grad, liger_in[1].grad, rtol=1e-6, atol=1e-9)


def test_low_precision_inputs_give_fp32():
    pc, pr, rc, rr = _random_logps()
    for dtype in (torch.bfloat16, torch.float16):
        outs = dpo_loss(pc.to(dtype), pr.to(dtype), rc.to(dtype), rr.to(dtype))
        assert all(t.dtype == torch.float32 for t in outs)


def test_bad_arguments():
    pc, pr, rc, rr = _random_logps()
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge"):
        dpo_loss(pc, pr, rc, rr, loss_type="dpo")
    for loss_type in ("ipo", "hinge"):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(pc, pr, rc, rr, loss_type=loss_type, label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="exo_pair"):
        dpo_loss(pc, pr, rc, rr, loss_type="exo_pair")
    assert LOSS_TYPES[:3] == ("sigmoid", "ipo", "hinge")  # the Triton reduction's LOSS_TYPE indices
