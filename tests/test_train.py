"""The optimizer-step helper every trainer uses: the plan of steps, accumulation over uneven
micro-batches, the schedule, the stop on a non-finite loss."""

import contextlib
import math
from dataclasses import dataclass

import pytest
import torch
from torch.testing import assert_close

from lite_rlhf.train import NonFiniteLoss, carrying, optimize, plan_steps


@dataclass(frozen=True)
class Section:
    lr: float = 0.1
    epochs: float = 1.0
    micro_batch: int = 3
    grad_accum: int = 2
    warmup_ratio: float = 0.0
    max_grad_norm: float = 0.0
    weight_decay: float = 0.0


def test_plan_covers_every_example_once_per_epoch():
    steps = plan_steps(10, Section(epochs=2.0), seed=0)
    flat = [i for step in steps for mb in step for i in mb]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert [[len(mb) for mb in step] for step in steps] == [[3, 3], [3, 3], [3, 3], [2]]
    half = [i for step in plan_steps(10, Section(epochs=0.5), seed=0) for mb in step for i in mb]
    assert len(half) == 5 and len(set(half)) == 5
    assert plan_steps(10, Section(), seed=1) != plan_steps(10, Section(), seed=2)


def test_accumulated_gradient_is_the_step_mean_over_uneven_micro_batches():
    """Micro-batches of 3, 3 and 1 examples in one step: the gradient must be the mean over all 7."""
    torch.manual_seed(0)
    x, y = torch.randn(7, 4), torch.randn(7)
    w = torch.nn.Parameter(torch.randn(4))
    want = torch.autograd.grad(((x @ w - y) ** 2).mean(), w)[0].norm().item()
    records = []
    optimize(
        [w], Section(micro_batch=3, grad_accum=3), [[[0, 1, 2], [3, 4, 5], [6]]],
        lambda idx: ((x[idx] @ w - y[idx]) ** 2).sum(), lambda: {}, name="t", quiet=True, on_step=records.append,
    )  # fmt: skip
    assert_close(records[0]["grad_norm"], want, rtol=1e-6, atol=0)


def test_a_loss_yielded_in_parts_is_their_sum_each_part_backpropagated_before_the_next_is_computed():
    """PPO-ptx yields the policy's loss, then the pretraining windows' in parts: the step's gradient is the sum's,
    and when a part is computed the one before it has already left its gradient (its graph is gone)."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randn(6)
    w = torch.nn.Parameter(torch.randn(4))
    want = torch.autograd.grad(((x @ w - y) ** 2).sum() / 6 + (x @ w).abs().sum() / 6, w)[0].norm().item()
    grads_seen = []

    def parts(idx):
        grads_seen.append(w.grad is not None)
        yield ((x[idx] @ w - y[idx]) ** 2).sum()
        for i in idx:
            grads_seen.append(w.grad is not None)
            yield (x[i] @ w).abs()

    records = []
    optimize([w], Section(micro_batch=3, grad_accum=2), [[[0, 1, 2], [3, 4, 5]]], parts, lambda: {}, name="t",
             quiet=True, on_step=records.append)  # fmt: skip
    assert_close(records[0]["grad_norm"], want, rtol=1e-6, atol=0)
    assert grads_seen == [False] + [True] * 7


def test_non_finite_loss_stops_training():
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(NonFiniteLoss, match="at step 1"):
        optimize([w], Section(), [[[0]]], lambda idx: w.sum() * float("nan"), lambda: {}, name="t", quiet=True,
                 on_step=lambda r: None)  # fmt: skip


def test_schedule_peaks_after_warm_up_and_decays():
    w = torch.nn.Parameter(torch.zeros(1))
    records = []
    optimize([w], Section(lr=1.0, warmup_ratio=0.3), [[[0]]] * 10, lambda idx: (w - 1).pow(2).sum(), lambda: {},
             name="t", quiet=True, on_step=records.append)  # fmt: skip
    lrs = [r["lr"] for r in records]
    assert max(lrs) == pytest.approx(1.0) and lrs[-1] < 0.1
    assert all(a <= b for a, b in zip(lrs[:3], lrs[1:3], strict=False))


@pytest.mark.parametrize("warmup_ratio,total", [(0.03, 18), (0.03, 100), (0.0, 5), (0.5, 4)])
def test_no_step_runs_at_lr_zero(warmup_ratio, total):
    """Warm-up rounds up to whole steps (3% of 18 steps is one): that step must still move the adapter,
    and the schedule must reach the full rate right after the warm-up."""
    w = torch.nn.Parameter(torch.zeros(1))
    records = []
    optimize([w], Section(lr=1.0, warmup_ratio=warmup_ratio), [[[0]]] * total, lambda idx: (w - 1).pow(2).sum(),
             lambda: {}, name="t", quiet=True, on_step=records.append)  # fmt: skip
    lrs = [r["lr"] for r in records]
    warmup = math.ceil(warmup_ratio * total)
    assert min(lrs) > 0, lrs
    assert lrs[warmup] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1 : warmup + 1], strict=True))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :], strict=False))


def test_carried_state_makes_two_calls_one_adamw_and_a_fresh_one_does_not():
    """loop.keep_optimizer: two `optimize` calls of one step each inside `carrying` are plain torch AdamW's two
    steps (moments and step count carried); without it the second call is a first step again."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3), torch.randn(4)
    ref = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.0)
    for _ in range(2):
        opt.zero_grad()
        ((x @ ref - y) ** 2).mean().backward()
        opt.step()

    def two_calls(states):
        w = torch.nn.Parameter(torch.ones(3))
        with carrying(states) if states is not None else contextlib.nullcontext():
            for _ in range(2):
                optimize([w], Section(micro_batch=4, grad_accum=1), [[[0, 1, 2, 3]]],
                         lambda idx: ((x[idx] @ w - y[idx]) ** 2).sum(), dict, name="t", quiet=True,
                         on_step=lambda rec: None)  # fmt: skip
        return w.detach()

    states = {}
    assert_close(two_calls(states), ref.detach())
    assert int(states["t"][0]["step"]) == 2  # what the loop saves beside the policy
    assert not torch.allclose(two_calls(None), ref.detach(), atol=1e-4)
