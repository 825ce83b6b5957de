"""Evaluation of a policy on held-out prompts (and π0 first, as iteration 0).

Decoding: `eval.samples_per_prompt` sampled answers per prompt at the generation temperature, with
a seed derived from (run seed, iteration), so every iteration is judged on the same prompts.
Figures (one `metrics.jsonl` line per evaluation):
- `val_reward` / `test_reward`: mean reward-model score; the best iteration is chosen by `val_reward`
  (with a preference model as the oracle there is no reward: None, and the choice is `val_win_rate`);
- `win_rate` (`val_win_rate`): on test (validation) prompts, the share of answers the oracle prefers
  to π0's answer with the same prompt and sample index (ties count half): a higher reward, or
  P(answer ≻ π0's) > 1/2 from the preference model (both orders averaged; π0 against itself is 1/2);
- `length_tokens`, `length_chars`: mean test answer length;
- `kl`: Monte-Carlo estimate of KL(π‖π0) = E_{y~π}[log π(y|x) - log π0(y|x)] over the test answers;
- `gold*`: where the prompts carry a gold check (the demo), the pass rate on test prompts, overall,
  per constraint and per check; the loop never sees these;
- `tax_*`: the alignment-tax panel: the test topics asked without their instruction, with mean
  length and simple quality rates (no repetition, on topic, a real answer).
"""

from __future__ import annotations

import dataclasses
import random
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from lite_rlhf import dist
from lite_rlhf.batching import make_batch
from lite_rlhf.config import DataConfig, EvalConfig
from lite_rlhf.data import Prompt
from lite_rlhf.ranking import win

KL_SAMPLES = 64  # KL costs two forward passes per answer: estimated on the first KL_SAMPLES test answers


@dataclass(frozen=True)
class Gold:
    """A task's gold checker, plugged in by the task (the demo's plays the paper's human annotators)."""

    applies: Callable[[dict], bool]  # prompt meta -> does this prompt carry a gold check?
    check: Callable[[dict, str], dict[str, bool]]  # (meta, answer) -> checks, `passed` their conjunction
    tax: Callable[[dict, str], dict]  # (meta, instruction-free answer) -> `words` and quality checks


@dataclass(frozen=True)
class EvalSets:
    val: list[Prompt]
    test: list[Prompt]
    tax: list[Prompt]  # test prompts without their instruction (alignment tax); may be empty

    def limit(self, max_prompts: int) -> EvalSets:
        cut = (lambda ps: ps[:max_prompts]) if max_prompts else (lambda ps: ps)
        return EvalSets(cut(self.val), cut(self.test), cut(self.tax))


def evaluate_policy(
    engine,
    model,
    oracle,
    sets: EvalSets,
    prompt_ids: dict[str, list[int]],
    ev: EvalConfig,
    d: DataConfig,
    *,
    iteration: int,
    adapter,
    seed: int,
    temperature: float,
    gold: Gold | None,
    base_rows: list[dict] | None,
    score_batch: int,
    quiet: bool = False,
) -> tuple[dict, list[dict]]:
    """Figures for the policy of `iteration` (π0 when 0) and its answers as `eval_samples.jsonl` rows.
    `base_rows`: π0's answers, for the win rate (None when this is π0)."""
    sets = sets.limit(ev.max_prompts)
    val, test, tax = sets.val, sets.test, sets.tax
    k = ev.samples_per_prompt
    # The KL estimate's policy side comes with the samples where the engine computes it while sampling (vLLM).
    logprobs = iteration > 0 and engine.logprobs_while_sampling
    samples = engine.generate(val + test + tax, n=k, adapter=adapter, seed=seed, logprobs=logprobs,
                              desc=None if quiet else f"iter {iteration} eval")  # fmt: skip
    prompts = {p.id: p for p in val + test + tax}
    val_ids, test_ids, tax_ids = ({p.id for p in ps} for ps in (val, test, tax))
    # The alignment-tax figures need no reward: only validation and test answers are scored.
    scored = [s for s in samples if s.prompt_id not in tax_ids]
    figures: dict = {"iteration": iteration}
    if oracle.judge is None:
        rewards = oracle.reward([prompts[s.prompt_id] for s in scored], scored)
        reward_of = {(s.prompt_id, s.index): r for s, r in zip(scored, rewards, strict=True)}
        rows = [dict(eval_row(s), reward=reward_of.get((s.prompt_id, s.index))) for s in samples]
        figures["val_reward"] = mean(r for (pid, _), r in reward_of.items() if pid in val_ids)
        figures["test_reward"] = mean(r for (pid, _), r in reward_of.items() if pid in test_ids)
        base_rows = base_rows if base_rows is not None else rows
        base = {(row["prompt_id"], row["index"]): row["reward"] for row in base_rows}
        figures["win_rate"] = win_rate({key: v for key, v in reward_of.items() if key[0] in test_ids}, base)
    else:
        rows = [dict(eval_row(s), reward=None) for s in samples]
        base = {(row["prompt_id"], row["index"]): row["text"] for row in (base_rows or rows)}
        figures["val_reward"] = figures["test_reward"] = None
        for key, ids in (("val_win_rate", val_ids), ("win_rate", test_ids)):
            mine = [s for s in scored if s.prompt_id in ids and (s.prompt_id, s.index) in base]
            items = [(prompts[s.prompt_id].messages, s.text, base[s.prompt_id, s.index]) for s in mine]
            probs = oracle.judge.probs(items)
            figures[key] = mean(map(win, probs)) if probs else None

    test_samples = [s for s in samples if s.prompt_id in test_ids]
    figures.update(oracle.eval_figures([prompts[s.prompt_id] for s in test_samples], test_samples))
    figures["length_tokens"] = mean(s.n_tokens for s in test_samples)
    figures["length_chars"] = mean(len(s.text) for s in test_samples)
    kl_samples = test_samples[:KL_SAMPLES]
    figures["kl"] = kl_estimate(model, prompt_ids, kl_samples, d, score_batch, quiet) if iteration > 0 else 0.0
    if gold is not None:
        figures.update(gold_figures(gold_rows(gold, test, test_samples)))
        figures.update(tax_figures(gold, tax, [s for s in samples if s.prompt_id in tax_ids]))
    figures["eval_decoding"] = f"{k} samples/prompt, temperature {temperature}, seed {seed}"
    return figures, rows


def divergence(figures: dict, base: dict, ev: EvalConfig) -> str | None:
    """Why an iteration's policy left the envelope of a sane one (`eval.max_kl_per_token`,
    `eval.max_length_ratio`, against π0's figures `base`), or None. The oracle may still score such a
    policy high: a reward model rewards gibberish it never saw."""
    tokens = figures["length_tokens"]
    if tokens and figures["kl"] / tokens > ev.max_kl_per_token:
        return f"KL {figures['kl']:.1f} over {tokens:.1f} tokens is above eval.max_kl_per_token={ev.max_kl_per_token:g}"
    ratio = (tokens or 1e-9) / (base["length_tokens"] or 1e-9)
    if not 1 / ev.max_length_ratio <= ratio <= ev.max_length_ratio:
        return (f"answers of {tokens:.1f} tokens against π0's {base['length_tokens']:.1f} leave "
                f"eval.max_length_ratio={ev.max_length_ratio:g}")  # fmt: skip
    return None


def eval_row(sample) -> dict:
    """A sample as an `eval_samples.jsonl` row (its per-token log-probs are not kept)."""
    return dataclasses.asdict(sample) | {"logprobs": None}


@torch.no_grad()
def kl_estimate(
    model, prompt_ids: dict[str, list[int]], samples: list, d: DataConfig, batch_size: int, quiet: bool = False
) -> float:
    """Mean over policy samples of log π(y|x) - log π0(y|x), summed over the answer's tokens; batches of
    similar length (less padding). log π: the sampled tokens' log-probs the engine returned with a sample
    (the same adapter, temperature 1: within 5e-4 per token of the trainer's, tests/test_generate.py), or the
    trainer's policy role for a sample without them or cut to data.max_length; log π0: the reference role.
    Under torchrun each rank runs its share."""
    diffs = dist.map_sharded(samples, lambda part: _logp_differences(model, prompt_ids, part, d, batch_size, quiet))
    return sum(diffs) / len(diffs) if diffs else 0.0


@torch.no_grad()
def _logp_differences(model, prompt_ids, samples: list, d: DataConfig, batch_size: int, quiet: bool) -> list[float]:
    """log π(y|x) - log π0(y|x) of each sample, in the order given."""
    lengths = [len(prompt_ids[s.prompt_id]) + len(s.token_ids) for s in samples]
    policy = {
        i: sum(s.logprobs) for i, s in enumerate(samples) if s.logprobs is not None and lengths[i] <= d.max_length
    }
    reference: dict[int, float] = {}
    order = sorted(range(len(samples)), key=lambda i: -lengths[i])
    for at in tqdm(range(0, len(order), batch_size), desc="KL estimate", unit="batch", leave=False, disable=quiet):
        chunk = order[at : at + batch_size]
        with model.role("reference"):
            reference |= zip(chunk, _summed_logps(model, prompt_ids, [samples[i] for i in chunk], d), strict=True)
        missing = [i for i in chunk if i not in policy]
        if missing:
            with model.role("policy"):
                policy |= zip(missing, _summed_logps(model, prompt_ids, [samples[i] for i in missing], d), strict=True)
    return [policy[i] - reference[i] for i in range(len(samples))]


def _summed_logps(model, prompt_ids, samples: list, d: DataConfig) -> list[float]:
    rows = [(prompt_ids[s.prompt_id], s.token_ids) for s in samples]
    return model.sequence_logps(make_batch(rows, model.pad_id, d.max_length, "keep_ends"))[0].float().cpu().tolist()


def noise_figures(engine, test: list[Prompt], k: int, adapter, seed: int, gold: Gold, quiet: bool = False) -> dict:
    """π0's gold on the test prompts under a second sampling seed: how much two runs of the same
    policy differ (the noise a gain must beat)."""
    samples = engine.generate(test, n=k, adapter=adapter, seed=seed, desc=None if quiet else "noise")
    return gold_figures(gold_rows(gold, test, samples))


def summary(
    gold: Gold | None, test: list[Prompt], best: int, evals: dict[int, dict], rows: dict[int, list[dict]], noise: dict
) -> dict:
    """The best iteration's gold on the test prompts against π0's (`evals[0]`), beside the noise (π0
    under a second seed) and a 95% bootstrap interval of the gain over prompts."""
    out: dict = {"best_iteration": best}
    if gold is None or "gold" not in evals[0]:
        return out

    def per_prompt(t: int) -> dict[str, float]:
        answers = [SimpleNamespace(**r) for r in rows[t] if r["prompt_id"] in test_ids]
        return per_prompt_gold(gold_rows(gold, test, answers))

    test_ids = {p.id for p in test}
    base, top = evals[0], evals[best]
    lo, hi = bootstrap_diff(per_prompt(best), per_prompt(0))
    return out | {
        "gold_pi0": base["gold"],
        "gold_pi0_second_seed": noise.get("gold"),
        "gold_noise": abs(base["gold"] - noise["gold"]) if "gold" in noise else None,
        "gold_best": top["gold"],
        "gold_gain": top["gold"] - base["gold"],
        "gold_gain_ci95": [lo, hi],
    }


def gold_rows(gold: Gold, prompts: list[Prompt], samples: list) -> list[dict]:
    """Gold checks of each sample whose prompt defines them."""
    by_id = {p.id: p for p in prompts}
    rows = []
    for s in samples:
        p = by_id[s.prompt_id]
        if gold.applies(p.meta):
            rows.append(
                {"prompt_id": s.prompt_id, "constraint": p.meta.get("constraint"), **gold.check(p.meta, s.text)}
            )
    return rows


def gold_figures(rows: list[dict], prefix: str = "gold") -> dict[str, float]:
    if not rows:
        return {}
    out = {prefix: mean(r["passed"] for r in rows)}
    for check in ("instruction", "real_answer", "no_repetition", "on_topic"):
        vals = [r[check] for r in rows if check in r]
        if vals:
            out[f"{prefix}_{check}"] = mean(vals)
    by_kind = defaultdict(list)
    for r in rows:
        if r.get("constraint"):
            by_kind[r["constraint"]].append(r["passed"])
    for kind, vals in sorted(by_kind.items()):
        out[f"{prefix}_{kind}"] = mean(vals)
    return out


def tax_figures(gold: Gold, prompts: list[Prompt], samples: list) -> dict[str, float]:
    """Instruction-free answers: do they stay answers?"""
    if not samples:
        return {}
    by_id = {p.id: p for p in prompts}
    checks = [gold.tax(by_id[s.prompt_id].meta, s.text) for s in samples]
    out = {"tax_words": mean(c["words"] for c in checks)}
    for key in ("no_repetition", "on_topic", "real_answer"):
        out[f"tax_{key}"] = mean(c[key] for c in checks)
    return out


def win_rate(rewards: dict[tuple[str, int], float], base: dict[tuple[str, int], float]) -> float | None:
    common = [k for k in rewards if base.get(k) is not None and rewards[k] is not None]  # None: not scored
    if not common:
        return None
    return mean(1.0 if rewards[k] > base[k] else 0.5 if rewards[k] == base[k] else 0.0 for k in common)


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
    return {k: mean(v) for k, v in groups.items()}


def mean(values) -> float:
    values = [float(v) for v in values if v is not None]  # None: a sample no reward term scored
    return sum(values) / len(values) if values else float("nan")
