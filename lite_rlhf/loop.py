"""`lite-rlhf run`: online iterative DPO (Algorithm 1 of the RLHF Workflow paper, section 3.3).

    π0 = base (+ sft adapter); reward adapter trained first (Bradley-Terry)
    evaluate π0 as iteration 0
    for t in 1..T:
        samples  = policy_{t-1} generates n answers per prompt of slice t
        rewards  = reward adapter scores every sample; r~ = r - λ|a|
        pairs_t  = best vs worst per prompt, with π0 log-probs computed once
        D        = D ∪ pairs_t
        policy_t = DPO on D from policy_{t-1}, reference π0
        evaluate policy_t; best/ = the iteration with the highest validation reward

Each stage writes its output atomically and skips itself when that output exists, so the same
command resumes a killed run and ends with the same artifacts (same seed, same pairs, same weights).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from lite_rlhf import data as D
from lite_rlhf.config import Config
from lite_rlhf.evaluate import EvalSets
from lite_rlhf.pairs import Pair, penalized_rewards, select_pairs
from lite_rlhf.runstate import RunDir, crash_point, write_dir, write_json
from lite_rlhf.scoring import make_scorer


def main_run(cfg: Config) -> int:
    from lite_rlhf.dpo import NonFiniteLoss

    try:
        best = run(cfg)
    except NonFiniteLoss as err:
        print(f"lite-rlhf: {err}; stopped, the last good policy is kept (see {cfg.run.out_dir}/best)")
        return 1
    print(f"lite-rlhf: done; best iteration {best} -> {cfg.run.out_dir}/best, report {cfg.run.out_dir}/report.md")
    return 0


def run(cfg: Config) -> int:
    """The whole loop; returns the best iteration."""
    from lite_rlhf.generate import make_engine
    from lite_rlhf.models import resolve_model
    from lite_rlhf.roles import SharedModel

    t_start = time.time()
    rd = RunDir(cfg)
    say = (lambda *a: None) if cfg.run.quiet else (lambda *a: print("[lite-rlhf]", *a, flush=True))
    task = load_task(cfg)
    say(f"run directory {rd.root}; {len(rd.state['done'])} stages already done")

    model_dir = resolve_model(cfg.model.name)
    model = SharedModel(cfg, model_dir=model_dir)
    ensure_reward(rd, model, cfg, say)
    scorer = make_scorer(cfg, model)
    prompt_ids = {p.id: D.prompt_ids(model.tokenizer, p.messages) for p in task.all_prompts}
    engine = make_engine(
        model_dir, cfg.generation, lora_rank=cfg.lora.r, seed=cfg.run.seed, quantization=cfg.model.quantization
    )
    initial_policy(rd, model, cfg)

    evaluate_stage(rd, 0, engine, model, scorer, cfg, task.eval_sets, adapter=cfg.model.sft_adapter, say=say)
    stage_noise(rd, engine, cfg, task.eval_sets, adapter=cfg.model.sft_adapter)
    history: list[Pair] = stage_offline(rd, model, task, prompt_ids, cfg)
    for t in range(1, cfg.loop.iterations + 1):
        it = rd.iter_dir(t)
        prev = rd.iter_dir(t - 1) / "policy" if t > 1 else None
        serve = prev if prev is not None else cfg.model.sft_adapter  # π0 is served as base (+ sft)
        prompts_t = task.slice(t, cfg.loop.iterations, cfg.loop.prompts_per_iteration)

        samples = stage_samples(rd, t, engine, prompts_t, serve, cfg, say)
        rewards = stage_scores(rd, t, scorer, task, samples, cfg)
        pairs_t = stage_pairs(rd, t, model, samples, rewards, prompt_ids, cfg, say)
        history += pairs_t
        if not rd.done(f"iter_{t:03d}/policy"):
            engine.sleep()
            stage_train(rd, t, model, history, prompt_ids, cfg, say)
            engine.wake()
        evaluate_stage(rd, t, engine, model, scorer, cfg, task.eval_sets, adapter=it / "policy", say=say)
        best = update_best(rd, t)
        from lite_rlhf.report import write_report

        write_report(rd.root)
        say(f"iteration {t} done; best so far: iteration {best}; {time.time() - t_start:.0f} s since start")
    engine.close()
    best = update_best(rd, cfg.loop.iterations)
    write_summary(rd, task, best, time.time() - t_start)
    from lite_rlhf.report import write_report

    write_report(rd.root)
    return best


# --------------------------------------------------------------------------- task


@dataclasses.dataclass
class Task:
    prompts: list[D.Prompt]  # the loop's prompt set, sliced over the iterations
    eval_sets: EvalSets
    offline_pairs: list[D.PreferencePair]  # the paper's hybrid setting: offline pairs join every iteration

    @property
    def all_prompts(self) -> list[D.Prompt]:
        return self.prompts + self.eval_sets.val + self.eval_sets.test + self.eval_sets.tax

    def slice(self, t: int, iterations: int, per_iteration: int) -> list[D.Prompt]:
        size = per_iteration or len(self.prompts) // iterations
        return self.prompts[(t - 1) * size : t * size]


def demo_file(name: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("lite_rlhf.demo") / name))


def load_task(cfg: Config) -> Task:
    d = cfg.data
    demo = d.prompts == "demo"
    path = lambda p, demo_name: demo_file(demo_name) if demo and p is None else p
    prompts, _ = D.load_prompts(demo_file("prompts.jsonl") if demo else d.prompts, d.skip_invalid)
    val_path, test_path = path(d.val_prompts, "val_prompts.jsonl"), path(d.test_prompts, "test_prompts.jsonl")
    if val_path is None or test_path is None:
        from lite_rlhf.config import ConfigError

        raise ConfigError("data.val_prompts and data.test_prompts are needed (held-out prompts for evaluation)")
    val, _ = D.load_prompts(val_path, d.skip_invalid)
    test, _ = D.load_prompts(test_path, d.skip_invalid)
    # The alignment-tax panel: test prompts that carry an instruction-free version ("plain").
    plain = {}  # one per distinct instruction-free text (the demo asks each topic three ways)
    for p in test:
        if "plain" in p.meta and p.meta["plain"] not in plain:
            plain[p.meta["plain"]] = D.Prompt(f"{p.id}-plain", [{"role": "user", "content": p.meta["plain"]}], p.meta)
    tax = list(plain.values())
    offline = D.load_preferences(d.offline_pairs, d.skip_invalid)[0] if d.offline_pairs else []
    return Task(prompts, EvalSets(val, test, tax), offline)


# --------------------------------------------------------------------------- stages


def ensure_reward(rd: RunDir, model, cfg: Config, say) -> None:
    """Stage 0: the reward adapter, trained here unless `reward.adapter` names one (or a separate
    `reward.model` scores instead)."""
    from lite_rlhf.reward import train_reward

    if cfg.reward.model:
        return

    source = Path(cfg.reward.adapter) if cfg.reward.adapter else rd.root / "reward"
    if not cfg.reward.adapter and not rd.done("reward"):
        demo = cfg.data.prompts == "demo"
        train_path = cfg.data.preferences or (demo_file("preferences_train.jsonl") if demo else None)
        eval_path = cfg.data.eval_preferences or (demo_file("preferences_eval.jsonl") if demo else None)
        if train_path is None:
            from lite_rlhf.config import ConfigError

            raise ConfigError("no reward model: set reward.adapter, or data.preferences to train one")
        pairs, _ = D.load_preferences(train_path, cfg.data.skip_invalid)
        eval_pairs = D.load_preferences(eval_path, cfg.data.skip_invalid)[0] if eval_path else []
        say(f"training the reward adapter on {len(pairs)} pairs ({len(eval_pairs)} held out)")
        train_reward(model, cfg, pairs, eval_pairs, out_dir=source, metrics_path=rd.metrics_path)
        rd.mark("reward")
    model.load_reward(source)


def initial_policy(rd: RunDir, model, cfg: Config) -> None:
    """iter_000/policy: the policy before any DPO (a fresh LoRA, or a copy of the sft adapter)."""
    path = rd.iter_dir(0) / "policy"
    if not path.exists():
        write_dir(path, lambda tmp: model.save_adapter("policy", tmp))


def stage_offline(rd: RunDir, model, task: Task, prompt_ids: dict, cfg: Config) -> list[Pair]:
    """Offline pairs as `Pair`s with their π0 log-probs (computed once; their prompts join `prompt_ids`)."""
    from lite_rlhf.dpo import add_reference_logps, fits

    for i, op in enumerate(task.offline_pairs):
        prompt_ids[f"offline-{i}"] = D.prompt_ids(model.tokenizer, op.prompt)
    path = rd.root / "offline_pairs.jsonl"
    if path.exists():
        return [Pair(**row) for row in D.read_jsonl(path)]
    tok = model.tokenizer
    pairs = [
        Pair(
            f"offline-{i}",
            D.response_ids(tok, op.chosen),
            D.response_ids(tok, op.rejected),
            op.chosen,
            op.rejected,
            0.0,
            0.0,
        )
        for i, op in enumerate(task.offline_pairs)
    ]
    pairs = add_reference_logps(model, [p for p in pairs if fits(p, prompt_ids, cfg)], prompt_ids, cfg)
    D.write_jsonl(path, [dataclasses.asdict(p) for p in pairs])
    return pairs


def stage_samples(rd: RunDir, t: int, engine, prompts, adapter, cfg: Config, say) -> list:
    from lite_rlhf.generate import Sample

    path = rd.iter_dir(t) / "samples.jsonl"
    if path.exists():
        return [Sample(**row) for row in D.read_jsonl(path)]
    samples = engine.generate(
        prompts, n=cfg.generation.n, adapter=adapter, seed=derive_seed(cfg, t, "generate"), desc=f"iter {t} generate"
    )
    crash_point(f"iter_{t:03d}/generate")
    D.write_jsonl(path, [dataclasses.asdict(s) for s in samples])
    rd.mark(f"iter_{t:03d}/samples")
    say(f"iteration {t}: {len(samples)} samples for {len(prompts)} prompts")
    return samples


def stage_scores(rd: RunDir, t: int, scorer, task: Task, samples, cfg: Config) -> list[float]:
    """Reward of every sample, and the length-penalized reward used for ranking."""
    path = rd.iter_dir(t) / "scores.jsonl"
    if path.exists():
        return [row["penalized"] for row in D.read_jsonl(path)]
    by_id = {p.id: p for p in task.prompts}
    rewards = scorer([by_id[s.prompt_id].messages for s in samples], samples)
    penalized = penalized_rewards(samples, rewards, cfg.pairs)
    rows = [
        {"prompt_id": s.prompt_id, "index": s.index, "reward": r, "penalized": p}
        for s, r, p in zip(samples, rewards, penalized, strict=True)
    ]
    D.write_jsonl(path, rows)
    rd.mark(f"iter_{t:03d}/scores")
    return penalized


def stage_pairs(rd: RunDir, t: int, model, samples, rewards, prompt_ids, cfg: Config, say) -> list[Pair]:
    from lite_rlhf.dpo import add_reference_logps, fits

    path = rd.iter_dir(t) / "pairs.jsonl"
    if path.exists():
        return [Pair(**row) for row in D.read_jsonl(path)]
    pairs, dropped = select_pairs(samples, rewards, cfg.pairs)
    too_long = [p for p in pairs if not fits(p, prompt_ids, cfg)]
    if too_long:
        dropped["too_long"] += len(too_long)
        pairs = [p for p in pairs if fits(p, prompt_ids, cfg)]
    pairs = add_reference_logps(model, pairs, prompt_ids, cfg)
    D.write_jsonl(path, [dataclasses.asdict(p) for p in pairs])
    kept = len(pairs)
    n_prompts = len({s.prompt_id for s in samples})
    rd.log(
        {
            "stage": "pairs",
            "iteration": t,
            "pairs_kept": kept,
            "pairs_dropped": n_prompts - kept,
            **{f"dropped_{k}": v for k, v in sorted(dropped.items())},
            "pair_margin": sum(p.margin for p in pairs) / kept if kept else 0.0,
        }
    )
    rd.mark(f"iter_{t:03d}/pairs")
    say(f"iteration {t}: {kept} pairs kept, dropped {dict(dropped)}")
    return pairs


def stage_train(rd: RunDir, t: int, model, history: list[Pair], prompt_ids, cfg: Config, say) -> None:
    """DPO on all pairs so far, from the previous policy. A crash inside restarts this stage from the
    previous policy with the same seed, so the result is identical."""
    from lite_rlhf.dpo import train_dpo

    model.load_adapter("policy", rd.iter_dir(t - 1) / "policy")
    if not history:
        say(f"iteration {t}: no pairs; the policy is unchanged")
    else:
        say(f"iteration {t}: DPO on {len(history)} pairs")
        train_dpo(
            model,
            history,
            prompt_ids,
            cfg,
            seed=derive_seed(cfg, t, "dpo"),
            log=lambda rec: (rd.log({"stage": "dpo", "iteration": t, **rec}), crash_point(f"iter_{t:03d}/dpo")),
            progress=None if cfg.run.quiet else _bar,
        )
    write_dir(rd.iter_dir(t) / "policy", lambda tmp: model.save_adapter("policy", tmp))
    rd.mark(f"iter_{t:03d}/policy")


def evaluate_stage(rd: RunDir, t: int, engine, model, scorer, cfg: Config, sets: EvalSets, adapter, say) -> dict:
    from lite_rlhf.evaluate_run import evaluate_policy

    path = rd.iter_dir(t) / "eval.json"
    if path.exists():
        import json

        return json.loads(path.read_text())
    figures = evaluate_policy(rd, t, engine, model, scorer, cfg, sets, adapter=adapter)
    write_json(path, figures)
    rd.log({"stage": "eval", **figures})
    rd.mark(f"iter_{t:03d}/eval")
    say("eval " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
    return figures


def stage_noise(rd: RunDir, engine, cfg: Config, sets: EvalSets, adapter) -> None:
    """π0's gold figures under a second sampling seed: the run-to-run noise a gain must beat."""
    from lite_rlhf.evaluate import has_gold
    from lite_rlhf.evaluate_run import noise_figures

    path = rd.iter_dir(0) / "noise.json"
    if not path.exists() and any(has_gold(p) for p in sets.test):
        write_json(path, noise_figures(engine, cfg, sets, adapter))


def write_summary(rd: RunDir, task: Task, best: int, seconds: float) -> None:
    """summary.json: the best iteration's gold on the test prompts against π0's, beside the noise
    (π0 under a second seed) and a 95% bootstrap interval of the gain over prompts."""
    import json

    from lite_rlhf.evaluate import bootstrap_diff, gold_rows, per_prompt_gold

    def load(path: Path) -> dict:
        return json.loads(path.read_text()) if path.exists() else {}

    def gold_per_prompt(t: int) -> dict[str, float]:
        from lite_rlhf.generate import Sample

        rows = D.read_jsonl(rd.iter_dir(t) / "eval_samples.jsonl")
        samples = [Sample(**{k: v for k, v in r.items() if k != "reward"}) for r in rows]
        return per_prompt_gold(gold_rows(task.eval_sets.test, [s for s in samples if s.prompt_id in test_ids]))

    test_ids = {p.id for p in task.eval_sets.test}
    base, top = load(rd.iter_dir(0) / "eval.json"), load(rd.iter_dir(best) / "eval.json")
    noise = load(rd.iter_dir(0) / "noise.json")
    summary = {"best_iteration": best, "wall_seconds": round(seconds, 1)}
    if "gold" in base:
        lo, hi = bootstrap_diff(gold_per_prompt(best), gold_per_prompt(0))
        summary |= {
            "gold_pi0": base["gold"],
            "gold_pi0_second_seed": noise.get("gold"),
            "gold_noise": abs(base["gold"] - noise["gold"]) if "gold" in noise else None,
            "gold_best": top["gold"],
            "gold_gain": top["gold"] - base["gold"],
            "gold_gain_ci95": [lo, hi],
        }
    write_json(rd.root / "summary.json", summary)


def update_best(rd: RunDir, last: int) -> int:
    """best/ -> the policy of the iteration with the highest validation reward (π0 included)."""
    import json

    scores = {}
    for t in range(0, last + 1):
        path = rd.iter_dir(t) / "eval.json"
        if path.exists():
            scores[t] = json.loads(path.read_text())["val_reward"]
    best = max(scores, key=lambda t: (scores[t], -t))
    link = rd.root / "best"
    tmp = rd.root / ".best.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(f"iter_{best:03d}/policy", tmp)
    os.replace(tmp, link)
    return best


def derive_seed(cfg: Config, t: int, purpose: str) -> int:
    """A seed per (run seed, iteration, purpose), stable across runs and resumes."""
    code = {"generate": 1, "dpo": 2, "eval": 3, "noise": 4}[purpose]
    return (cfg.run.seed * 1_000_003 + t * 101 + code) % (2**31 - 1)


def _bar(**kwargs):
    from tqdm.auto import tqdm

    return tqdm(**kwargs)
