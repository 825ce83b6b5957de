"""Evaluation of a policy on held-out prompts (and π0 first, as iteration 0).

Decoding: `eval.samples_per_prompt` sampled answers per prompt at the generation temperature, with
a seed derived from (run seed, iteration), so every iteration is judged on the same prompts.
Figures (one `metrics.jsonl` line per evaluation):
- `val_reward` / `test_reward`: mean reward-model score; the best iteration is chosen by `val_reward`;
- `win_rate`: on test prompts, the share of answers the reward model scores above π0's answer with
  the same prompt and sample index (ties count half);
- `length_tokens`, `length_chars`: mean test answer length;
- `kl`: Monte-Carlo estimate of KL(π‖π0) = E_{y~π}[log π(y|x) - log π0(y|x)] over the test answers;
- `gold*`: where the prompts carry a gold check (the demo), the pass rate on test prompts, overall,
  per constraint and per check; the loop never sees these;
- `tax_*`: the alignment-tax panel: the test topics asked without their instruction, with mean
  length and simple quality rates (no repetition, on topic, a real answer).
"""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from dataclasses import dataclass

from lite_rlhf.data import Prompt


@dataclass(frozen=True)
class EvalSets:
    val: list[Prompt]
    test: list[Prompt]
    tax: list[Prompt]  # test prompts without their instruction (alignment tax); may be empty


def has_gold(prompt: Prompt) -> bool:
    return "topic_keys" in prompt.meta


def gold_rows(prompts: list[Prompt], samples: list) -> list[dict]:
    """Gold checks of each sample whose prompt defines them."""
    from lite_rlhf.demo.task import gold_check

    by_id = {p.id: p for p in prompts}
    rows = []
    for s in samples:
        p = by_id[s.prompt_id]
        if has_gold(p):
            rows.append(
                {"prompt_id": s.prompt_id, "constraint": p.meta.get("constraint"), **gold_check(p.meta, s.text)}
            )
    return rows


def gold_figures(rows: list[dict], prefix: str = "gold") -> dict[str, float]:
    if not rows:
        return {}
    out = {prefix: _mean(r["passed"] for r in rows)}
    for check in ("instruction", "real_answer", "no_repetition", "on_topic"):
        vals = [r[check] for r in rows if check in r]
        if vals:
            out[f"{prefix}_{check}"] = _mean(vals)
    by_kind = defaultdict(list)
    for r in rows:
        if r.get("constraint"):
            by_kind[r["constraint"]].append(r["passed"])
    for kind, vals in sorted(by_kind.items()):
        out[f"{prefix}_{kind}"] = _mean(vals)
    return out


def tax_figures(prompts: list[Prompt], samples: list) -> dict[str, float]:
    """Instruction-free answers: do they stay answers?"""
    from lite_rlhf.demo.task import quality_checks, words

    if not samples:
        return {}
    by_id = {p.id: p for p in prompts}
    checks = [quality_checks(s.text, tuple(by_id[s.prompt_id].meta.get("topic_keys", ())), "") for s in samples]
    out = {"tax_words": _mean(len(words(s.text)) for s in samples)}
    for key in ("no_repetition", "on_topic", "real_answer"):
        out[f"tax_{key}"] = _mean(c[key] for c in checks)
    return out


def win_rate(rewards: dict[tuple[str, int], float], base: dict[tuple[str, int], float]) -> float | None:
    common = [k for k in rewards if k in base]
    if not common:
        return None
    return _mean(1.0 if rewards[k] > base[k] else 0.5 if rewards[k] == base[k] else 0.0 for k in common)


def bootstrap_diff(
    a: dict[str, float], b: dict[str, float], *, rounds: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% interval of mean(a - b) over prompts, resampling prompts (paired)."""
    keys = sorted(set(a) & set(b))
    if not keys:
        return (float("nan"), float("nan"))
    diffs = [a[k] - b[k] for k in keys]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def per_prompt_gold(rows: list[dict]) -> dict[str, float]:
    groups = defaultdict(list)
    for r in rows:
        groups[r["prompt_id"]].append(r["passed"])
    return {k: _mean(v) for k, v in groups.items()}


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")
