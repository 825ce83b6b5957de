"""The grouped LoRA ops give vLLM's torch LoRA ops' results (the reference), without the per-token copy."""

import pytest
import torch

pytest.importorskip("vllm")

from vllm.lora.ops import torch_ops  # noqa: E402

from lite_rlhf import cpu_lora_ops  # noqa: E402

SLOTS, IN, OUT, RANK = 3, 24, 40, 8


def _weights(out, inn, seed, four_dim=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(SLOTS, out, inn, generator=g)
    return w.unsqueeze(1) if four_dim else w


def _x(tokens, width, seed):
    return torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed))


INDICES = {
    "one slot": [1] * 7,
    "mixed slots": [0, 2, 2, 1, 0, 2, 1],
    "single token": [2],
}


@pytest.mark.parametrize("case", INDICES)
@pytest.mark.parametrize("four_dim", [True, False])
def test_shrink_matches_vllm(case, four_dim):
    idx = torch.tensor(INDICES[case])
    x, w = _x(len(idx), IN, 1), _weights(RANK, IN, 2, four_dim)
    ours, ref = torch.full((len(idx), RANK + 2), 7.0), torch.full((len(idx), RANK + 2), 7.0)
    cpu_lora_ops.bgmv_shrink(x, w, ours, idx, 0.5)
    torch_ops.bgmv_shrink(x, w, ref, idx, 0.5)
    torch.testing.assert_close(ours, ref)
    assert not torch.equal(ours[:, :RANK], torch.full_like(ours[:, :RANK], 7.0))


@pytest.mark.parametrize("case", INDICES)
@pytest.mark.parametrize("add", [True, False])
def test_expand_and_slice_match_vllm(case, add):
    idx = torch.tensor(INDICES[case])
    x, w = _x(len(idx), RANK, 3), _weights(OUT, RANK, 4)
    base = _x(len(idx), OUT + 5, 5)  # the model pads its width differently from the adapter
    ours, ref = base.clone(), base.clone()
    cpu_lora_ops.bgmv_expand(x, w, ours, idx, add)
    torch_ops.bgmv_expand(x, w, ref, idx, add)
    torch.testing.assert_close(ours, ref)

    wide = _x(len(idx), 3 * OUT, 6)
    ours, ref = wide.clone(), wide.clone()
    cpu_lora_ops.bgmv_expand_slice(x, w, ours, idx, OUT, OUT, add)
    torch_ops.bgmv_expand_slice(x, w, ref, idx, OUT, OUT, add)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours[:, :OUT], wide[:, :OUT])  # outside the slice: untouched


def test_sequence_ops_match_vllm():
    seq_lens, slots = torch.tensor([3, 1, 4]), torch.tensor([2, 0, 2])
    tokens = int(seq_lens.sum())
    args = (torch.tensor([0, 3, 4]), seq_lens, slots, 3, 4, tokens)
    x, a, b = _x(tokens, IN, 7), _weights(RANK, IN, 8), _weights(OUT, RANK, 9)
    ours, ref = torch.zeros(tokens, RANK), torch.zeros(tokens, RANK)
    cpu_lora_ops.sgmv_shrink(x, a, ours, *args, 2.0)
    torch_ops.sgmv_shrink(x, a, ref, *args, 2.0)
    torch.testing.assert_close(ours, ref)
    y0 = _x(tokens, 2 * OUT, 10)
    ours_y, ref_y = y0.clone(), y0.clone()
    cpu_lora_ops.sgmv_expand(ours, b, ours_y, *args, True)
    torch_ops.sgmv_expand(ref, b, ref_y, *args, True)
    torch.testing.assert_close(ours_y, ref_y)
    ours_y, ref_y = y0.clone(), y0.clone()
    cpu_lora_ops.sgmv_expand_slice(ours, b, ours_y, *args, OUT, OUT, True)
    torch_ops.sgmv_expand_slice(ref, b, ref_y, *args, OUT, OUT, True)
    torch.testing.assert_close(ours_y, ref_y)


def test_no_adapter_rows_get_no_lora():
    """Index -1 (a request without an adapter): zero contribution, as on vLLM's GPU kernels. vLLM's
    torch ops index weights[-1] there, i.e. apply the last slot's adapter."""
    idx = torch.tensor([1, -1, 1, -1])
    x, w = _x(4, RANK, 11), _weights(OUT, RANK, 12)
    y0 = _x(4, OUT, 13)
    y = y0.clone()
    cpu_lora_ops.bgmv_expand(x, w, y, idx, True)
    torch.testing.assert_close(y[[1, 3]], y0[[1, 3]])
    torch.testing.assert_close(y[[0, 2]], y0[[0, 2]] + x[[0, 2]] @ w[1, 0].T)
    only_base = torch.tensor([-1, -1, -1, -1])
    y = y0.clone()
    cpu_lora_ops.bgmv_expand(x, w, y, only_base, True)
    torch.testing.assert_close(y, y0)


def test_mismatched_indices_raise():
    with pytest.raises(ValueError, match="indices for 3 tokens, inputs for 4"):
        cpu_lora_ops.lora_matmul(_x(4, IN, 1), _weights(RANK, IN, 2), torch.tensor([0, 0, 0]), torch.float32)


def test_install_and_restore():
    from vllm.lora.punica_wrapper import punica_cpu

    before = {name: getattr(punica_cpu, name) for name in cpu_lora_ops.OPS}
    try:
        cpu_lora_ops.install()
        assert all(getattr(punica_cpu, name) is getattr(cpu_lora_ops, name) for name in cpu_lora_ops.OPS)
        cpu_lora_ops.install(grouped=False)
        assert all(getattr(punica_cpu, name) is getattr(torch_ops, name) for name in cpu_lora_ops.OPS)
    finally:  # leave the process as found: the engine test checks that the engine installs them itself
        for name, op in before.items():
            setattr(punica_cpu, name, op)
