"""PPO's math (lite_rlhf/algorithms/actor_critic.py and the per-token form of policy_gradient.clipped_policy_loss):
GAE against a sequence worked by hand and against a per-row loop, the clipped policy and value losses and their
gradients against plain torch written from the PPO paper, the per-token rewards, the running normaliser against
`statistics` over all the scores seen."""

import statistics

import torch
from torch.testing import assert_close

from lite_rlhf.algorithms.actor_critic import (
    RunningMoments,
    clipped_value_loss,
    explained_variance,
    gae,
    token_rewards,
    whiten,
)
from lite_rlhf.algorithms.policy_gradient import clipped_policy_loss


def test_gae_by_hand():
    """Row 0: two prompt positions, answer tokens at 2..4, one padding position; gamma 0.9, lambda 0.8.
    r = (0.1, -0.2, 1.0), V = (0.5, 0.4, 0.3), V after the last token 0:
      t=4: delta = 1.0 - 0.3 = 0.7;                        A = 0.7
      t=3: delta = -0.2 + 0.9 * 0.3 - 0.4 = -0.33;         A = -0.33 + 0.72 * 0.7 = 0.174
      t=2: delta = 0.1 + 0.9 * 0.4 - 0.5 = -0.04;          A = -0.04 + 0.72 * 0.174 = 0.08528
    returns A + V = (0.58528, 0.574, 1.0). Row 1: one answer token, A = r - V = 2 - 0.5."""
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]])
    rewards = torch.tensor([[9.0, 9.0, 0.1, -0.2, 1.0, 9.0], [9.0, 2.0, 9.0, 9.0, 9.0, 9.0]]) * mask
    values = torch.tensor([[7.0, 7.0, 0.5, 0.4, 0.3, 7.0], [7.0, 0.5, 7.0, 7.0, 7.0, 7.0]])
    adv, ret = gae(rewards.double(), values.double(), mask, gamma=0.9, lam=0.8)
    assert_close(adv[0], torch.tensor([0, 0, 0.08528, 0.174, 0.7, 0], dtype=torch.float64))
    assert_close(ret[0], torch.tensor([0, 0, 0.58528, 0.574, 1.0, 0], dtype=torch.float64))
    assert_close(adv[1], torch.tensor([0, 1.5, 0, 0, 0, 0], dtype=torch.float64))


def loop_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """One answer's advantages, the recursion written out over a Python list."""
    out, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(values) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        out[t] = running
    return out


def test_gae_equals_the_recursion_row_by_row():
    gen = torch.Generator().manual_seed(0)
    starts, lengths, width = [3, 1, 5, 2], [4, 7, 1, 5], 10
    mask = torch.zeros(4, width, dtype=torch.long)
    for i, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        mask[i, s : s + n] = 1
    rewards = torch.randn(4, width, generator=gen).double() * mask
    values = torch.randn(4, width, generator=gen).double()
    adv, ret = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    for i, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        expected = loop_gae(rewards[i, s : s + n].tolist(), values[i, s : s + n].tolist(), 0.95, 0.9)
        assert_close(adv[i, s : s + n], torch.tensor(expected, dtype=torch.float64))
        assert_close(ret[i, s : s + n], adv[i, s : s + n] + values[i, s : s + n])
        assert adv[i][mask[i] == 0].abs().sum() == 0


def test_token_rewards_put_the_score_on_the_last_token_and_the_kl_on_every_one():
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    old = torch.tensor([[0.0, -1.0, -2.0, -0.5, 0.0], [-0.3, -0.1, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -0.5, 0.0], [-0.2, -0.4, 0.0, 0.0, 0.0]])
    r = token_rewards(torch.tensor([2.0, -1.0]), old, ref, mask, kl_coef=0.1)
    assert_close(r, torch.tensor([[0, -0.05, 0.1, 2.0, 0], [0.01, -0.03 - 1.0, 0, 0, 0]]))


def test_the_clipped_policy_loss_with_per_token_advantages_equals_the_papers_objective():
    """PPO eq. 7: L = E_t[min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)], here the loss -L as a mean over
    the answer tokens; value and gradient."""
    gen = torch.Generator().manual_seed(1)
    mask = (torch.rand(3, 8, generator=gen) > 0.3).long()
    old = -torch.rand(3, 8, generator=gen) * 3
    logp = (old + torch.randn(3, 8, generator=gen) * 0.4).requires_grad_(True)
    adv = torch.randn(3, 8, generator=gen)
    ours, figures = clipped_policy_loss(logp, old, None, adv, mask, eps_low=0.2, eps_high=0.2, aggregation="token")
    ours.backward()
    plain_logp = logp.detach().clone().requires_grad_(True)
    rho = torch.exp(plain_logp - old)
    objective = torch.minimum(rho * adv, torch.clamp(rho, 0.8, 1.2) * adv)
    plain = -(objective * mask).sum() / mask.sum()
    plain.backward()
    assert_close(ours, plain)
    assert_close(logp.grad, plain_logp.grad)
    assert 0 < figures["clip_fraction"] < 1


def test_the_clipped_value_loss_equals_its_formula():
    gen = torch.Generator().manual_seed(2)
    mask = (torch.rand(4, 6, generator=gen) > 0.3).long()
    old, ret = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    values = (old + torch.randn(4, 6, generator=gen) * 0.3).requires_grad_(True)
    ours, figures = clipped_value_loss(values, old, ret, mask, clip=0.15)
    ours.backward()
    v = values.detach().clone().requires_grad_(True)
    v_clip = old + torch.clamp(v - old, -0.15, 0.15)
    plain = 0.5 * (torch.maximum((v - ret) ** 2, (v_clip - ret) ** 2) * mask).sum() / mask.sum()
    plain.backward()
    assert_close(ours, plain)
    assert_close(values.grad, v.grad)
    assert 0 < figures["value_clip_fraction"] < 1
    unclipped, _ = clipped_value_loss(v.detach(), old, ret, mask, clip=None)
    assert_close(unclipped, 0.5 * (((v.detach() - ret) ** 2) * mask).sum() / mask.sum())


def test_the_running_normaliser_equals_statistics_over_every_score_seen():
    batches = [[1.0, 2.0, 4.0], [10.0], [-3.0, 0.5, 0.5, 7.0]]
    moments, seen = RunningMoments(), []
    for batch in batches:
        moments.update(batch)
        seen += batch
        assert abs(moments.mean - statistics.fmean(seen)) < 1e-12
        assert abs(moments.std - statistics.pstdev(seen)) < 1e-12
    assert moments.normalize([1.0], scale=False) == [1.0 - statistics.fmean(seen)]
    scaled = (1.0 - statistics.fmean(seen)) / statistics.pstdev(seen)
    assert abs(moments.normalize([1.0], scale=True)[0] - scaled) < 1e-12


def test_whiten_and_explained_variance():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    x = torch.tensor([[1.0, 2.0, 3.0, 50.0], [60.0, 4.0, 5.0, 6.0]])
    w = whiten(x, mask)
    on = w[mask.bool()]
    assert abs(float(on.mean())) < 1e-6 and abs(float(on.var(unbiased=False)) - 1) < 1e-4 and w[0, 3] == 0
    assert explained_variance(x, x, mask) == 1.0
    assert abs(explained_variance(torch.zeros_like(x) + 3.5, x, mask)) < 1e-12  # the mean: no better than it
