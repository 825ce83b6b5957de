"""GRPO and RLOO (lite_rlhf/algorithms/policy_gradient.py): advantages on hand-computed groups and against a plain
Python reference; the losses and their gradients against plain torch written from the papers' formulas and against
TRL 1.16's own loss code (GRPOTrainer._compute_loss, RLOOTrainer._compute_loss) on the same tensors."""

import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from lite_rlhf.algorithms.policy_gradient import (
    clipped_policy_loss,
    group_advantages,
    kl_penalized,
    sequence_policy_loss,
)

NAN = float("nan")


def reference_advantages(groups: list[list[float]], estimator: str, scale: bool) -> list[list[float]]:
    """Plain Python, one group at a time: unscored (NaN) answers and groups without signal get 0."""
    out = []
    for group in groups:
        scored = [r for r in group if not math.isnan(r)]
        if len(scored) < 2 or len(set(scored)) == 1:
            out.append([0.0] * len(group))
            continue
        mean, std = statistics.fmean(scored), statistics.stdev(scored)
        row = []
        for r in group:
            if math.isnan(r):
                row.append(0.0)
            elif estimator == "grpo":
                row.append((r - mean) / (std + 1e-4) if scale else r - mean)
            else:
                row.append(r - (sum(scored) - r) / (len(scored) - 1))
        out.append(row)
    return out


def test_advantages_on_hand_computed_groups():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], [1.0, NAN, 3.0, NAN], [NAN, 7.0, NAN, NAN]])
    adv, signal = group_advantages(rewards, "rloo")
    assert adv[0].tolist() == pytest.approx([-2.0, -2 / 3, 2 / 3, 2.0], abs=1e-15)  # 1 - (2+3+4)/3, 2 - (1+3+4)/3
    assert adv[1].tolist() == [0.0] * 4 and adv[2].tolist() == [-2.0, 0.0, 2.0, 0.0] and adv[3].tolist() == [0.0] * 4
    assert signal.tolist() == [True, False, True, False]  # all equal; one scored answer: no signal
    adv, _ = group_advantages(rewards, "grpo")
    std = math.sqrt(5 / 3)  # of 1, 2, 3, 4 with Bessel's correction
    assert adv[0].tolist() == pytest.approx([x / (std + 1e-4) for x in (-1.5, -0.5, 0.5, 1.5)])
    assert adv[2].tolist() == pytest.approx([-1 / (math.sqrt(2) + 1e-4), 0.0, 1 / (math.sqrt(2) + 1e-4), 0.0])
    adv, _ = group_advantages(rewards, "grpo", scale=False)  # Dr. GRPO
    assert adv[0].tolist() == [-1.5, -0.5, 0.5, 1.5]


@pytest.mark.parametrize("estimator, scale", [("grpo", True), ("grpo", False), ("rloo", True)])
def test_advantages_match_a_plain_python_reference(estimator, scale):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(40, 6, generator=g, dtype=torch.float64)
    rewards[torch.rand(40, 6, generator=g) < 0.2] = NAN
    rewards[3] = 1.5  # no signal
    adv, _ = group_advantages(rewards, estimator, scale)
    expected = torch.tensor(reference_advantages(rewards.tolist(), estimator, scale), dtype=torch.float64)
    assert_close(adv, expected, rtol=1e-12, atol=1e-12)


def tensors(seed=0, rows=6, length=9):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, length, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(rows, length, generator=g, dtype=torch.float64)  # ratios well past the clip
    ref = logp + 0.5 * torch.randn(rows, length, generator=g, dtype=torch.float64)
    mask = torch.ones(rows, length, dtype=torch.float64)
    for i in range(rows):
        mask[i, length - i :] = 0  # answers of different lengths
    adv = torch.randn(rows, generator=g, dtype=torch.float64)
    return logp, old, ref, mask, adv


def plain_grpo(logp, old, ref, mask, adv, eps_low, eps_high, beta, aggregation, max_tokens):
    """The formulas, one answer and one token at a time."""
    per_answer, total, count = [], 0.0, 0
    for i in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            ratio = torch.exp(logp[i, t] - old[i, t])
            term = -torch.minimum(ratio * adv[i], torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv[i])
            term = term + beta * (torch.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1)
            terms.append(term)
        per_answer.append(sum(terms) / len(terms))
        total, count = total + sum(terms), count + len(terms)
    if aggregation == "sequence":
        return sum(per_answer) / len(per_answer)
    return total / count if aggregation == "token" else total / (logp.shape[0] * max_tokens)


@pytest.mark.parametrize("aggregation", ["sequence", "token", "constant"])
@pytest.mark.parametrize("beta, eps_high", [(0.0, 0.2), (0.04, 0.28)])
def test_grpo_loss_and_gradient_match_the_formulas(aggregation, beta, eps_high):
    logp, old, ref, mask, adv = tensors()
    grads = []
    for fn in ("ours", "plain"):
        x = logp.clone().requires_grad_(True)
        if fn == "ours":
            loss, figures = clipped_policy_loss(x, old, ref, adv, mask, eps_low=0.2, eps_high=eps_high, beta=beta,
                                                aggregation=aggregation, max_tokens=12)  # fmt: skip
        else:
            loss = plain_grpo(x, old, ref, mask, adv, 0.2, eps_high, beta, aggregation, 12)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
    assert_close(grads[0][1], grads[1][1], rtol=1e-12, atol=1e-12)
    assert 0 < figures["clip_fraction"] < 1


def trl_self(trainer_cls, loss_type, beta, eps_high, logp, max_tokens=12):
    """The attributes TRL's _compute_loss reads, on one process without accumulation; the model's per-token
    log-probs are the given tensor."""
    identity = lambda x, **_: x  # noqa: E731
    return SimpleNamespace(
        loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=eps_high, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", use_vllm=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, max_completion_length=max_tokens,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), model=SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list)},
        accelerator=SimpleNamespace(gather=identity, reduce=identity, gather_for_metrics=identity, num_processes=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
    )  # fmt: skip


def trl_inputs(logp, old, ref, mask, adv):
    rows, length = logp.shape
    return {"prompt_ids": torch.ones(rows, 2, dtype=torch.long), "prompt_mask": torch.ones(rows, 2),
            "completion_ids": torch.ones(rows, length, dtype=torch.long), "completion_mask": mask,
            "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
            "old_logps": (old * mask).sum(1)}  # fmt: skip


@pytest.mark.parametrize("aggregation, loss_type", [("sequence", "grpo"), ("token", "bnpo"), ("constant", "dr_grpo")])
@pytest.mark.parametrize("beta, eps_high", [(0.0, 0.2), (0.04, 0.28)])
def test_grpo_loss_equals_trl_grpo_trainer(aggregation, loss_type, beta, eps_high):
    from trl import GRPOTrainer

    logp, old, ref, mask, adv = (t.float() for t in tensors(seed=1))
    mine = logp.clone().requires_grad_(True)
    loss, _ = clipped_policy_loss(mine, old, ref, adv, mask, eps_low=0.2, eps_high=eps_high, beta=beta,
                                  aggregation=aggregation, max_tokens=12)  # fmt: skip
    loss.backward()
    theirs = logp.clone().requires_grad_(True)
    trl_loss = GRPOTrainer._compute_loss(trl_self(GRPOTrainer, loss_type, beta, eps_high, theirs), None,
                                         trl_inputs(theirs, old, ref, mask, adv))  # fmt: skip
    trl_loss.backward()
    assert_close(loss, trl_loss, rtol=1e-6, atol=1e-7)
    assert_close(mine.grad, theirs.grad, rtol=1e-6, atol=1e-7)


def test_rloo_loss_and_reward_equal_trl_rloo_trainer():
    from trl import RLOOTrainer

    logp, old, ref, mask, adv = (t.float() for t in tensors(seed=2))
    old = logp + 0.05 * (old - logp)  # sequence ratios on both sides of the clip
    mine = logp.clone().requires_grad_(True)
    loss, _ = sequence_policy_loss(mine, old, adv, mask, eps_low=0.2, eps_high=0.2)
    loss.backward()
    theirs = logp.clone().requires_grad_(True)
    trl_loss = RLOOTrainer._compute_loss(trl_self(RLOOTrainer, "rloo", 0.0, 0.2, theirs), None,
                                         trl_inputs(theirs, old, ref, mask, adv))  # fmt: skip
    trl_loss.backward()
    assert_close(loss, trl_loss, rtol=1e-6, atol=1e-7)
    assert_close(mine.grad, theirs.grad, rtol=1e-6, atol=1e-7)
    # TRL's RLOO puts the KL into the reward: r - beta * sum_t (old_t - ref_t) over the answer
    rewards = torch.tensor([1.0, NAN, 0.5, 2.0, 0.0, 1.0])
    penalized = kl_penalized(rewards, old, ref, mask, 0.1)
    expected = rewards - 0.1 * ((old - ref) * mask).sum(1)
    assert_close(penalized, expected, equal_nan=True)
