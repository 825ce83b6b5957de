"""The Triton kernels under TRITON_INTERPRET=1, through the public functions, on the shared case table.

Not collected by default (the file name does not match test_*.py): TRITON_INTERPRET must be set before
Triton is imported, and the rest of the suite must not run under the interpreter (~100x slower).
test_triton_interpreter.py runs this file in a subprocess:

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/kernels/triton_cases.py
"""

import os
from unittest import mock

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with TRITON_INTERPRET=1 (see test_triton_interpreter.py)", allow_module_level=True)

from kernel_checks import (  # noqa: E402
    CASES,
    DPO_CASES,
    DPO_LOSS_SETTINGS,
    DTYPES,
    SOFTCAP_CASES,
    Case,
    check_fused_dpo,
    check_logprobs,
    check_mixed_dtypes,
    check_rpo_against_trl_formula,
    llp_module,
    make_inputs,
)
from lite_rlhf.kernels import fused_dpo_loss, kernel_path, linear_logprobs  # noqa: E402
from lite_rlhf.kernels.backend import load_triton_module  # noqa: E402

triton_llp = load_triton_module("linear_logprobs_triton")
triton_dpo = load_triton_module("fused_dpo_triton")

SMALL_BLOCK_CASES = [
    Case("2x13 H40 V200", (2, 13), 40, 200),  # 2 row blocks, 7 vocabulary blocks, 3 H blocks, all with tails
    Case("one-token rows", (5, 1), 48, 257),
    Case("ignored rows", (4, 9), 24, 100, ignore="rows"),
]


@pytest.fixture(autouse=True)
def _triton_path_only(monkeypatch):
    """Every test here must go through Triton: the torch implementations raise if reached."""
    assert kernel_path("cpu") == "triton-interpreter"
    assert triton_llp.INTERPRETED and triton_dpo.INTERPRETED

    class ChunkedReached(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            raise AssertionError("the chunked torch path ran under TRITON_INTERPRET=1")

    monkeypatch.setattr(llp_module, "_ChunkedLinearLogprobs", ChunkedReached)


def test_public_functions_take_the_triton_path():
    hidden, weight, targets = make_inputs(CASES[0], torch.float32)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with (
        mock.patch.object(triton_llp, "launch_forward", wraps=triton_llp.launch_forward) as fwd,
        mock.patch.object(triton_llp, "launch_weight_grad", wraps=triton_llp.launch_weight_grad) as bwd,
    ):
        linear_logprobs(hidden, weight, targets).sum().backward()
    assert fwd.call_count == 1 and bwd.call_count == 1
    ref_c = ref_r = torch.zeros(1)
    with mock.patch.object(triton_dpo, "TritonDpoLoss", wraps=triton_dpo.TritonDpoLoss) as dpo:
        fused_dpo_loss(hidden[:2], weight, targets[:2], ref_c, ref_r, beta=0.1)[0].backward()
    assert dpo.apply.call_count == 1


@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen-W", "trainable-W"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case, dtype, train_weight):
    check_logprobs(case, dtype, train_weight)


@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen-W", "trainable-W"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", SMALL_BLOCK_CASES, ids=str)
def test_matches_reference_with_small_blocks(case, dtype, train_weight, monkeypatch):
    # 16 rows x 32 vocabulary entries x 16 hidden units per block: several row blocks, vocabulary blocks
    # and loops over H, each with a tail, so the dot accumulation over H blocks and the H-blocked
    # gradient read-modify-writes run. Kept small: every block is a Python-level step in the interpreter.
    monkeypatch.setattr(triton_llp, "_block_sizes", lambda h_dim: (16, 32, 16, 1))
    check_logprobs(case, dtype, train_weight)


@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen-W", "trainable-W"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss_type, beta, eps", DPO_LOSS_SETTINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("case", DPO_CASES, ids=lambda c: c[0])
def test_fused_dpo_matches_logprobs_then_loss(case, loss_type, beta, eps, dtype, train_weight):
    _, n_pairs, seq, h_dim, vocab = case
    with mock.patch.object(triton_dpo, "TritonDpoLoss", wraps=triton_dpo.TritonDpoLoss) as spy:
        check_fused_dpo(n_pairs, seq, h_dim, vocab, loss_type, beta, eps, dtype, train_weight)
    assert spy.apply.call_count == 1, "fused_dpo_loss did not use the Triton loss kernel"


@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen-W", "trainable-W"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case, softcap", SOFTCAP_CASES, ids=lambda v: str(v))
def test_softcap_matches_reference(case, softcap, dtype, train_weight, monkeypatch):
    """Gemma 2's c tanh(z / c) in both kernels, forward and both gradients, with small blocks (tails in each)."""
    monkeypatch.setattr(triton_llp, "_block_sizes", lambda h_dim: (16, 32, 16, 1))
    check_logprobs(case, dtype, train_weight, softcap=softcap)


def test_mixed_dtypes():
    check_mixed_dtypes()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_softcap_on_the_triton_path(loss_type):
    """Soft-capped logits (cap 3 on logits of spread ~2) reach the DPO loss and its gradients."""
    check_fused_dpo(2, 37, 64, 1000, loss_type, 0.1, 0.0, torch.float32, True, softcap=3.0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_rpo_term_on_the_triton_path(loss_type):
    check_fused_dpo(2, 37, 64, 1000, loss_type, 0.1, 0.0, torch.float32, True, rpo_alpha=0.5)
    check_rpo_against_trl_formula()


def test_a_weighted_list_runs_its_triton_losses_there_and_the_others_in_torch():
    """sigmoid through the Triton reduction, robust in torch, sft on the log-probs: one Triton call, and the sum
    equals the full-logit specification."""
    with mock.patch.object(triton_dpo, "TritonDpoLoss", wraps=triton_dpo.TritonDpoLoss) as spy:
        check_fused_dpo(3, 29, 48, 700, ["sigmoid", "robust", "sft"], 0.1, 0.1, torch.float32, True)
    assert spy.apply.call_count == 1
