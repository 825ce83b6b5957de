"""Fused kernels for the training math: per-token log-probs without the logits, and the DPO loss on top.

Installed as ``lite_rlhf.kernels`` (never as a top-level ``kernels``: Hugging Face's package owns that
name). Importing this package does not import Triton; see :mod:`lite_rlhf.kernels.backend`.

- :func:`linear_logprobs`: ``log softmax(hidden @ weight.T)[target]`` walking the vocabulary in blocks.
- :func:`sequence_logps`: per-sequence sums and token counts (reference log-probs, evaluation).
- :func:`linear_entropy`: per-token entropy of the same softmax, for the log (no gradient).
- :func:`dpo_loss`: one DPO-family loss (``LOSS_TYPES``) on sequence log-probs.
- :func:`fused_dpo_loss`: the DPO loss, or a weighted list of them, straight from final hidden states (what the
  trainer calls); :func:`reductions` says which ran in Triton.
- :func:`kernel_path`: ``"triton"``, ``"triton-interpreter"`` or ``"chunked-torch"`` for a device.
"""

from .backend import kernel_path, triton_available
from .dpo_loss import LOSS_TYPES, dpo_loss, needs_reference
from .fused_dpo import fused_dpo_loss, fused_dpo_loss_reference, reductions
from .linear_logprobs import linear_entropy, linear_logprobs, linear_logprobs_reference, sequence_logps

__all__ = [
    "LOSS_TYPES",
    "dpo_loss",
    "fused_dpo_loss",
    "fused_dpo_loss_reference",
    "kernel_path",
    "linear_entropy",
    "linear_logprobs",
    "linear_logprobs_reference",
    "needs_reference",
    "reductions",
    "sequence_logps",
    "triton_available",
]
