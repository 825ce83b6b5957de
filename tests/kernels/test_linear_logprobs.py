"""linear_logprobs on the chunked torch path (the CPU path) against the naive fp32 reference.

The Triton path runs the same table in triton_cases.py, under TRITON_INTERPRET=1 (test_triton_interpreter.py).
"""

import pytest
import torch
from kernel_checks import (
    CASES,
    DTYPES,
    GRAD_TOL,
    IGNORE,
    LOGP_TOL,
    REAL_SIZE_LOGP_TOL,
    SOFTCAP_CASES,
    Case,
    check_logprobs,
    check_mixed_dtypes,
    llp_module,
    make_inputs,
)
from lite_rlhf.kernels import kernel_path, linear_entropy, linear_logprobs, linear_logprobs_reference, sequence_logps
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode


@pytest.fixture(autouse=True)
def _chunked_path():
    assert kernel_path("cpu") == "chunked-torch", "these tests are for the chunked path: unset TRITON_INTERPRET"


@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen-W", "trainable-W"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case, dtype, train_weight):
    check_logprobs(case, dtype, train_weight)


@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen-W", "trainable-W"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference_with_small_chunks(case, dtype, train_weight, monkeypatch):
    # 16 rows x 128 vocabulary entries per block: several row chunks and vocabulary blocks, with tails,
    # so the online log-sum-exp rescaling and the block-wise weight gradient are exercised.
    monkeypatch.setattr(llp_module, "_chunk_shape", lambda n_rows, weight: (16, 128))
    check_logprobs(case, dtype, train_weight)


@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen-W", "trainable-W"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case, softcap", SOFTCAP_CASES, ids=lambda v: str(v))
def test_softcap_matches_reference(case, softcap, dtype, train_weight, monkeypatch):
    """Gemma 2's c tanh(z / c) on the logits, forward and both gradients, in blocks of 16 rows x 128 entries."""
    monkeypatch.setattr(llp_module, "_chunk_shape", lambda n_rows, weight: (16, 128))
    check_logprobs(case, dtype, train_weight, softcap=softcap)


@pytest.mark.parametrize("case, softcap", SOFTCAP_CASES, ids=lambda v: str(v))
def test_softcap_entropy_matches_full_logits(case, softcap):
    hidden, weight, targets = make_inputs(case, torch.float32)
    mask = targets != IGNORE
    logits = softcap * torch.tanh(hidden @ weight.t() / softcap)
    ref = torch.where(mask, -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1), 0.0)
    assert_close(linear_entropy(hidden, weight, mask, softcap=softcap), ref, **LOGP_TOL)


def test_softcap_must_be_positive():
    hidden, weight, targets = make_inputs(CASES[0], torch.float32)
    with pytest.raises(ValueError, match="softcap"):
        linear_logprobs(hidden, weight, targets, softcap=0.0)


def test_mixed_dtypes():
    check_mixed_dtypes()


def test_bf16_and_fp16_inputs_give_fp32_output():
    for dtype in (torch.bfloat16, torch.float16):
        hidden, weight, targets = make_inputs(CASES[0], dtype)
        assert linear_logprobs(hidden, weight, targets).dtype == torch.float32
        sums, counts = sequence_logps(hidden, weight, targets)
        assert sums.dtype == torch.float32 and counts.dtype == torch.int64


def test_only_weight_trains():
    hidden, weight, targets = make_inputs(CASES[0], torch.float32)
    w1, w2 = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    linear_logprobs(hidden, w1, targets).sum().backward()
    linear_logprobs_reference(hidden, w2, targets).sum().backward()
    assert_close(w1.grad, w2.grad, **GRAD_TOL[torch.float32], msg=lambda m: f"weight grad, frozen hidden: {m}")


def test_non_contiguous_hidden_and_int32_targets():
    hidden, weight, targets = make_inputs(CASES[0], torch.float32)
    hidden_t = hidden.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strides of a [T, B, H] tensor
    assert not hidden_t.is_contiguous()
    out = linear_logprobs(hidden_t, weight, targets.int())
    ref = linear_logprobs_reference(hidden, weight, targets)
    assert_close(out, ref, **LOGP_TOL, msg=lambda m: f"non-contiguous hidden: {m}")


def test_sequence_logps_sums_and_counts():
    hidden, weight, targets = make_inputs(CASES[0], torch.float32)  # [3, 37] with prompts and padding
    sums, counts = sequence_logps(hidden, weight, targets)
    ref = linear_logprobs_reference(hidden, weight, targets)
    # a sum of <= 37 log-probs, each within LOGP_TOL: 37 * 2e-5 would be the worst case, observed ~1e-6
    assert_close(sums, ref.sum(dim=1), rtol=1e-5, atol=1e-4, msg=lambda m: f"sequence sums: {m}")
    assert counts.tolist() == (targets != -100).sum(dim=1).tolist()


def test_no_grad_forward_matches():
    hidden, weight, targets = make_inputs(CASES[0], torch.float32)
    with torch.no_grad():
        out = linear_logprobs(hidden.requires_grad_(), weight, targets)
    assert not out.requires_grad
    assert_close(out, linear_logprobs_reference(hidden, weight, targets), **LOGP_TOL)


def _saved_numels(fn, hidden, weight, targets):
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(hidden, weight, targets)
    return out, numels


@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen-W", "trainable-W"])
def test_no_vocab_sized_tensor_saved_for_backward(train_weight):
    case = Case("saved", (4, 16), 32, 4096)  # N = 64 rows, N * V = 262,144; N * H = 2,048
    hidden, weight, targets = make_inputs(case, torch.float32)
    hidden.requires_grad_(True)
    weight.requires_grad_(train_weight)
    n_rows, n_by_v = 64, 64 * 4096
    _, naive = _saved_numels(linear_logprobs_reference, hidden, weight, targets)
    assert max(naive) >= n_by_v, "the hook must see the naive version's [N, V] tensors"
    out, saved = _saved_numels(linear_logprobs, hidden, weight, targets)
    # What may be saved: d logp / d hidden [N, H], the inputs (weight [V, H] when it trains) and [N] vectors.
    allowed = max(n_rows * 32, weight.numel() if train_weight else 0)
    assert max(saved) <= allowed, f"largest saved tensor has {max(saved)} elements (allowed {allowed}): {saved}"
    assert max(saved) <= n_by_v // 8 or train_weight
    out.sum().backward()


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen-W", "trainable-W"])
def test_logits_never_materialized_with_default_chunks(train_weight):
    # N * V = 2048 * 8192 = 16.8M logits, four times the default block of 4M values: nothing that large
    # may exist at any time, in the forward or the backward.
    case = Case("big", (2, 1024), 16, 8192)
    hidden, weight, targets = make_inputs(case, torch.float32)
    hidden.requires_grad_(True)
    weight.requires_grad_(train_weight)
    mode = _LargestTensor()
    with mode:
        out = linear_logprobs(hidden, weight, targets)
        out.sum().backward()
    n_by_v = 2048 * 8192
    assert mode.largest <= llp_module._BLOCK_ELEMENTS, f"largest tensor {mode.largest} > one block"
    assert mode.largest <= n_by_v // 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16bit_head_is_read_in_fp32_one_bounded_block_at_a_time(dtype):
    """A few rows against a large vocabulary: the logits block alone allowed the whole vocabulary in one block, and
    a 16-bit head's fp32 copy of it (vocab x H) was the largest thing made (208 MiB at Qwen2.5-1.5B's shape). Every
    tensor made, forward and backward, stays within one block of values."""
    case = Case("few-rows", (1, 8), 256, 32768)  # 8 rows: the logits bound alone would take all 32,768 rows
    hidden, weight, targets = make_inputs(case, dtype)
    hidden.requires_grad_(True)
    mode = _LargestTensor()
    with mode:
        out = linear_logprobs(hidden, weight, targets)
        out.sum().backward()
    assert mode.largest <= llp_module._BLOCK_ELEMENTS, f"largest tensor {mode.largest} > one block"
    assert llp_module._chunk_shape(8, weight.float())[1] == 32768  # fp32: the head's rows are views, not copies
    ref = linear_logprobs_reference(hidden.detach().float(), weight.float(), targets)
    torch.testing.assert_close(out.detach(), ref, atol=2e-2, rtol=0)


def test_errors_name_the_problem():
    hidden, weight, targets = make_inputs(CASES[0], torch.float32)
    with pytest.raises(ValueError, match="hidden"):
        linear_logprobs(hidden, weight[:, :10], targets)
    with pytest.raises(ValueError, match="targets"):
        linear_logprobs(hidden, weight, targets[:, :5])
    with pytest.raises(TypeError, match="integer"):
        linear_logprobs(hidden, weight, targets.float())
    with pytest.raises(TypeError, match="float64"):
        linear_logprobs(hidden.double(), weight, targets)
    bad = targets.clone()
    bad[0, -1] = 1000  # == V
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_logprobs(hidden, weight, bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_real_sizes_on_gpu(dtype):
    assert kernel_path("cuda") == "triton"
    case = Case("real", (2, 1024), 1024, 32000)
    hidden, weight, targets = make_inputs(case, dtype)
    hidden, weight, targets = hidden.cuda().requires_grad_(), weight.cuda(), targets.cuda()
    out = linear_logprobs(hidden, weight, targets)
    ref = linear_logprobs_reference(hidden.detach(), weight, targets)
    assert_close(out, ref, **REAL_SIZE_LOGP_TOL, msg=lambda m: f"GPU log-probs {dtype}: {m}")


@pytest.mark.parametrize("chunks", ["default", "small"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_entropy_matches_the_full_softmax(case, dtype, chunks, monkeypatch):
    """linear_entropy against -sum p log p of the full logits in fp64 (plain torch), 0 where masked; with small
    chunks several row chunks and vocabulary blocks rescale the running sums (the peaked case moves the max)."""
    if chunks == "small":
        monkeypatch.setattr(llp_module, "_chunk_shape", lambda n_rows, weight: (16, 128))
    hidden, weight, targets = make_inputs(case, dtype)
    mask = targets != IGNORE
    logp = torch.log_softmax(hidden.double() @ weight.double().t(), dim=-1)
    want = torch.where(mask, -(logp.exp() * logp).sum(dim=-1), 0.0).float()
    got = linear_entropy(hidden, weight, mask)
    assert got.dtype == torch.float32 and got.shape == mask.shape
    assert_close(got, want, **LOGP_TOL)
    if mask.any():  # not trivially 0 (the peaked case's rows go near 0, the others near log V)
        assert got[mask].max() > 0.1


def test_entropy_never_holds_the_logits():
    case = Case("big", (2, 1024), 16, 8192)
    hidden, weight, targets = make_inputs(case, torch.float32)
    mode = _LargestTensor()
    with mode:
        linear_entropy(hidden, weight, targets != IGNORE)
    assert mode.largest <= llp_module._BLOCK_ELEMENTS, f"largest tensor {mode.largest} > one block"
