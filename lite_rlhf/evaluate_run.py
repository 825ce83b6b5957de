"""Runs one evaluation of the loop: sample the held-out prompts, score, and compute the figures of
`lite_rlhf.evaluate` (which holds the definitions)."""

from __future__ import annotations

import dataclasses

import torch

from lite_rlhf import data as D
from lite_rlhf import evaluate as E
from lite_rlhf.config import Config

KL_SAMPLES = 64


def evaluate_policy(rd, t: int, engine, model, scorer, cfg: Config, sets: E.EvalSets, *, adapter) -> dict:
    """Figures for the policy of iteration t (π0 when t == 0); samples are kept in iter_t/eval_samples.jsonl."""
    from lite_rlhf.loop import derive_seed

    def limit(prompts):
        return prompts[: cfg.eval.max_prompts] if cfg.eval.max_prompts else prompts

    val, test, tax = limit(sets.val), limit(sets.test), limit(sets.tax)
    k = cfg.eval.samples_per_prompt
    seed = derive_seed(cfg, 0, "eval")  # the same seed every iteration: only the policy changes
    samples = engine.generate(val + test + tax, n=k, adapter=adapter, seed=seed, desc=f"iter {t} eval")
    prompts = {p.id: p for p in val + test + tax}
    val_ids, test_ids, tax_ids = ({p.id for p in ps} for ps in (val, test, tax))
    # The alignment-tax figures need no reward: only validation and test answers are scored.
    scored = [s for s in samples if s.prompt_id not in tax_ids]
    rewards = scorer([prompts[s.prompt_id].messages for s in scored], scored)
    reward_of = {(s.prompt_id, s.index): r for s, r in zip(scored, rewards, strict=True)}
    rows = [dict(dataclasses.asdict(s), reward=reward_of.get((s.prompt_id, s.index))) for s in samples]
    D.write_jsonl(rd.iter_dir(t) / "eval_samples.jsonl", rows)

    test_samples = [s for s in samples if s.prompt_id in test_ids]
    figures: dict = {"iteration": t}
    figures["val_reward"] = E._mean(r for (pid, _), r in reward_of.items() if pid in val_ids)
    figures["test_reward"] = E._mean(r for (pid, _), r in reward_of.items() if pid in test_ids)
    base = {(row["prompt_id"], row["index"]): row["reward"] for row in _base_rows(rd, t, rows)}
    figures["win_rate"] = E.win_rate({k_: v for k_, v in reward_of.items() if k_[0] in test_ids}, base)
    figures["length_tokens"] = E._mean(s.n_tokens for s in test_samples)
    figures["length_chars"] = E._mean(len(s.text) for s in test_samples)
    # KL costs two forward passes per answer: estimated on the first KL_SAMPLES test answers.
    figures["kl"] = kl_estimate(model, prompts, test_samples[:KL_SAMPLES], cfg) if t > 0 else 0.0
    figures.update(E.gold_figures(E.gold_rows(test, test_samples)))
    figures.update(E.tax_figures(tax, [s for s in samples if s.prompt_id in tax_ids]))
    figures["eval_decoding"] = f"{k} samples/prompt, temperature {cfg.generation.temperature}, seed {seed}"
    return figures


def _base_rows(rd, t: int, rows: list[dict]) -> list[dict]:
    return rows if t == 0 else D.read_jsonl(rd.iter_dir(0) / "eval_samples.jsonl")


@torch.no_grad()
def kl_estimate(model, prompts: dict, samples: list, cfg: Config) -> float:
    """Mean over policy samples of log π(y|x) - log π0(y|x), summed over the answer's tokens."""
    from lite_rlhf.dpo import _batch, sequence_logps

    ids = {pid: D.prompt_ids(model.tokenizer, p.messages) for pid, p in prompts.items()}
    diffs = []
    for i in range(0, len(samples), cfg.reward.score_batch):
        chunk = samples[i : i + cfg.reward.score_batch]
        batch = _batch([(ids[s.prompt_id], s.token_ids) for s in chunk], model.pad_id, cfg.data.max_length, "keep_ends")
        with model.role("policy"):
            pol = sequence_logps(model, *batch)
        with model.role("reference"):
            ref = sequence_logps(model, *batch)
        diffs += (pol - ref).tolist()
    return sum(diffs) / len(diffs) if diffs else 0.0


def noise_figures(engine, cfg: Config, sets: E.EvalSets, adapter) -> dict:
    """π0's gold on the test prompts under a second sampling seed: how much two runs of the same
    policy differ (the noise the demo's gain must beat)."""
    from lite_rlhf.loop import derive_seed

    test = sets.test[: cfg.eval.max_prompts] if cfg.eval.max_prompts else sets.test
    samples = engine.generate(
        test, n=cfg.eval.samples_per_prompt, adapter=adapter, seed=derive_seed(cfg, 0, "noise"), desc="noise"
    )
    return E.gold_figures(E.gold_rows(test, samples))
