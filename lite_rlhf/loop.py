"""`lite-rlhf run`: online iterative DPO (Algorithm 1 of the RLHF Workflow paper, section 3.3), RAFT, GRPO or RLOO.

    π0 = base (+ sft adapter, brought or trained here on data.sft); oracle trained: a Bradley-Terry reward
         adapter, or a pairwise preference adapter (reward.kind=preference)
    evaluate π0 as iteration 0 (and under a second seed: the noise)
    D = offline pairs, with their π0 log-probs
    for t in 1..T:
        samples  = policy_{t-1} generates n answers per prompt of slice t
        rewards  = reward adapter scores every sample; r~ = r - λ|a|
                   (preference: a tournament among each prompt's n answers gives the scores)
        dpo:  pairs_t  = best vs worst per prompt, with π0 log-probs computed once
              D        = D ∪ pairs_t
              policy_t = DPO on D from policy_{t-1}, reference π0
        raft: W_t      = the best answer per prompt (above a reward quantile)
              policy_t = SFT on W_t (or W_1 ∪ ... ∪ W_t) from policy_{t-1}
        grpo, rloo: advantages from each prompt's group of n (against the group's mean over its std, or the
              leave-one-out mean), with per-token log-probs of policy_{t-1} and of π0 computed once
              policy_t = μ passes of the clipped objective (KL to π0) over them from policy_{t-1}
        evaluate policy_t; best/ = the iteration with the highest validation reward
                                  (preference: validation win rate against π0)

Under torchrun (`torchrun --nproc-per-node=N -m lite_rlhf run ...`) every rank runs this same loop on its own
device and engine: the batched calls inside the stages are split across ranks and gathered (`lite_rlhf/dist.py`),
and rank 0 writes the run directory.

Every stage goes through `RunDir.commit` (outputs, metrics lines and mark together) and is skipped
when the run state says it is done, so the same command resumes a killed run and ends with the same
artifacts (same seed, same pairs, same weights).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

from lite_rlhf import algorithms, dist, engine_gap
from lite_rlhf.algorithms.dpo import dpo_loss_fn
from lite_rlhf.config import Config, ConfigError
from lite_rlhf.context import Context, Say, commit_policy, derive_seed
from lite_rlhf.data import load_conversations, prompt_ids
from lite_rlhf.evaluate import divergence, evaluate_policy, noise_figures, summary
from lite_rlhf.generate import LazyEngine, Sample, check_context, make_engine, sized_for, start_engine
from lite_rlhf.loggers import attach_logger
from lite_rlhf.models import resolve_model
from lite_rlhf.pairs import penalized_rewards
from lite_rlhf.preference import check_format, preference_stage
from lite_rlhf.report import report_files
from lite_rlhf.reward import check_brought_oracle, check_oracle, reward_stage
from lite_rlhf.roles import SharedModel, check_sft_adapter
from lite_rlhf.runstate import Link, RunDir, read_json, read_jsonl
from lite_rlhf.scoring import Oracle
from lite_rlhf.sft import sft_stage
from lite_rlhf.task import Task, data_fields, data_path, load_task, reward_pairs
from lite_rlhf.train import NonFiniteLoss


def main_run(cfg: Config) -> int:
    try:
        best = run(cfg)
    except NonFiniteLoss as err:
        best = Path(cfg.run.out_dir) / "best"
        kept = f"the best policy so far is {best}" if best.exists() else "no policy was chosen yet"
        print(f"lite-rlhf: {err}; stopped: {kept}", file=sys.stderr)
        return 1
    untrained = nothing_trained(cfg)
    if untrained:
        if dist.is_main():
            print(f"lite-rlhf: error: {untrained}", file=sys.stderr)
        return 2
    if dist.is_main():
        root = Path(cfg.run.out_dir)
        off = [t for t in range(1, cfg.loop.iterations + 1) if read_json(root / f"iter_{t:03d}/eval.json")["diverged"]]
        note = f"; iteration(s) {', '.join(map(str, off))} diverged, never chosen (report.md)" if off else ""
        print(f"lite-rlhf: done; best iteration {best} -> {root}/best, report {root}/report.md{note}")
    return 0


def nothing_trained(cfg: Config) -> str | None:
    """Why no iteration of the run trained (each one's update had no data: its metrics hold no training step), and
    what to change; None when one did."""
    root = Path(cfg.run.out_dir)
    steps = {m.get("iteration") for m in read_jsonl(root / "metrics.jsonl") if m.get("stage") == cfg.loop.algorithm}
    if steps & set(range(1, cfg.loop.iterations + 1)):
        return None
    rows = [r for t in range(1, cfg.loop.iterations + 1) for r in read_jsonl(root / f"iter_{t:03d}" / "scores.jsonl")]
    if all(r["reward"] is None for r in rows):
        why = (f"the oracle scored none of the {len(rows)} samples (every reward term returned None): check what "
               "reward.functions return for these answers")  # fmt: skip
    else:
        why = ("no prompt's answers differed enough to learn from (ties, pairs.min_margin, or too few answers scored): "
               "raise generation.n or generation.temperature, or check the oracle")  # fmt: skip
    return f"no iteration trained (every policy is π0's): {why} (scores in {root}/iter_001/scores.jsonl)"


def run(cfg: Config) -> int:
    """The whole loop; returns the best iteration."""
    t_start = time.time()
    if dist.active():
        if cfg.generation.device or cfg.generation.tensor_parallel_size > 1:
            key = "generation.device" if cfg.generation.device else "generation.tensor_parallel_size"
            raise ConfigError(f"config key '{key}': under torchrun each rank trains and generates on its own device "
                              "(cuda:LOCAL_RANK): leave generation.device unset, tensor_parallel_size 1")  # fmt: skip
        cfg = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, device=dist.device()))
    if not dist.is_main():  # logging and progress from rank 0 only
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, quiet=True))
    task, conversations, unused = check_inputs(cfg)
    rd = RunDir(cfg)
    close_logger = attach_logger(rd, cfg.run) if dist.is_main() else (lambda: None)
    say = Say(cfg.run.quiet)
    for warning in [*task.warnings, *([unused] if unused else [])]:
        say(f"warning: {warning}")
    say(f"run directory {rd.root}; {len(rd.state['done'])} stages already done")
    model_dir = resolve_model(cfg.model.name)
    model = SharedModel(cfg, model_dir=model_dir, device=dist.device())
    say(f"LoRA (rank {cfg.lora.r}) on {', '.join(model.lora_modules)}")
    ids = {p.id: prompt_ids(model.tokenizer, p.messages) for p in task.all_prompts}
    length = check_context(ids, model_dir, cfg.generation, cfg.data.max_length)  # before any model trains
    ids |= {Task.offline_id(i): prompt_ids(model.tokenizer, op.prompt) for i, op in enumerate(task.offline_pairs)}
    pi0 = sft_stage(rd, model, cfg, *conversations) if conversations else cfg.model.sft_adapter
    train_oracle(rd, model, cfg)
    oracle = Oracle(cfg, model)
    largest = max(len(task.slice(t, cfg.loop.iterations, cfg.loop.prompts_per_iteration))
                  for t in range(1, cfg.loop.iterations + 1))  # fmt: skip
    gen = sized_for(cfg.generation, model_dir, length, largest * cfg.generation.n)  # an iteration's answers at once
    engine = LazyEngine(lambda: start_engine(model, cfg, lambda share: make_engine(
        model_dir, gen, lora_rank=cfg.lora.r, seed=cfg.run.seed, quantization=cfg.model.quantization,
        max_model_len=length, share=share), say))  # fmt: skip
    ctx = Context(rd, cfg, task, model, engine, oracle, ids, say)

    commit_policy(ctx, 0)  # the policy before any training: a fresh LoRA, or a copy of the sft adapter
    evaluate(ctx, 0, adapter=pi0)  # π0 is served as base (+ sft)
    noise(ctx, adapter=pi0)
    algorithm = algorithms.get(cfg.loop.algorithm)
    kept = algorithm.start(ctx)
    for t in range(1, cfg.loop.iterations + 1):
        serve = rd.iter_dir(t - 1) / "policy" if t > 1 else pi0
        prompts_t = task.slice(t, cfg.loop.iterations, cfg.loop.prompts_per_iteration)
        samples = generate(ctx, t, prompts_t, serve)
        rewards = scores(ctx, t, samples)
        kept = algorithm.iteration(ctx, t, samples, rewards, kept)
        evaluate(ctx, t, adapter=rd.iter_dir(t) / "policy")
        best = choose_best(ctx, t)
        commit_report(ctx, f"iter_{t:03d}/report")
        say(f"iteration {t} done; best so far: iteration {best}; {time.time() - t_start:.0f} s since start")
    commit_summary(ctx, best, time.time() - t_start)
    commit_report(ctx, "report")
    close_logger()
    engine.close()  # last: an in-process vLLM engine ends torch.distributed with it (the ranks' group under torchrun)
    return best


def check_inputs(cfg: Config):
    """Every data file read and checked, and what can be known of the oracle and the loss, before a model loads."""
    task = load_task(cfg.data, answers=cfg.pairs.source == "spin")
    unused = task.check_slices(cfg.loop.iterations, cfg.loop.prompts_per_iteration)
    d = cfg.data
    conversations = load_conversations(data_path(d, "sft"), d.skip_invalid, data_fields(d)) if d.sft else None
    dpo_loss_fn(cfg.dpo, "cuda" if torch.cuda.is_available() else "cpu")  # dpo.kernel fits this machine
    if d.ptx:
        try:
            text = Path(d.ptx).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config key 'data.ptx': '{d.ptx}' is not a readable UTF-8 text file "
                              f"({type(err).__name__})") from None  # fmt: skip
        if not text.strip():
            raise ConfigError(f"config key 'data.ptx': '{d.ptx}' is empty (plain text for ppo.ptx_coef)")
    if cfg.reward.kind == "preference":
        check_format(cfg)  # the labels are one token each
    if cfg.reward.adapter:
        check_brought_oracle(cfg)
    if cfg.model.sft_adapter:
        check_sft_adapter(cfg.model.sft_adapter)
    if cfg.generation.temperature == 0 and cfg.eval.samples_per_prompt > 1:  # vLLM refuses n > 1 when greedy
        raise ConfigError(f"config key 'eval.samples_per_prompt': generation.temperature=0 is greedy, so the "
                          f"{cfg.eval.samples_per_prompt} answers per held-out prompt would all be the same: set "
                          "eval.samples_per_prompt=1")  # fmt: skip
    return task, conversations, unused


# --------------------------------------------------------------------------- the stages


def train_oracle(rd: RunDir, model: SharedModel, cfg: Config) -> None:
    """The reward (or preference) adapter: brought (reward.adapter), trained here, or not needed (a
    separate model judges)."""
    kind = cfg.reward.kind
    if cfg.reward.adapter and kind == "bt":
        model.load_reward(cfg.reward.adapter)
    elif cfg.reward.adapter:
        model.add_preference(cfg.run.seed)
        model.load_adapter("preference", cfg.reward.adapter)
    elif kind == "bt" and not cfg.reward.model:
        figures = reward_stage(rd, model, cfg, *reward_pairs(cfg.data, cfg.run.seed, cfg.reward.balance_length))
        check_oracle(figures, cfg, rd.root / "reward")
    elif kind == "preference" and not cfg.reward.preference_model:
        figures = preference_stage(rd, model, cfg, *reward_pairs(cfg.data, cfg.run.seed, cfg.reward.balance_length))
        check_oracle(figures, cfg, rd.root / "preference")


def evaluate(ctx: Context, t: int, adapter) -> dict:
    name, out = f"iter_{t:03d}/eval", ctx.rd.iter_dir(t)
    if ctx.rd.done(name):
        return read_json(out / "eval.json")
    base_rows = read_jsonl(ctx.rd.iter_dir(0) / "eval_samples.jsonl") if t > 0 else None
    if t > 0:  # the KL estimate runs the policy on the trainer's side: the one evaluated, also after a resume
        ctx.model.load_adapter("policy", ctx.rd.iter_dir(t) / "policy")
    figures, rows = evaluate_policy(
        ctx.engine, ctx.model, ctx.oracle, ctx.task.eval_sets, ctx.ids, ctx.cfg.eval, ctx.cfg.data,
        iteration=t, adapter=adapter, seed=derive_seed(ctx.cfg, 0, "eval"),  # the same seed every iteration
        temperature=ctx.cfg.generation.temperature, gold=ctx.task.gold, base_rows=base_rows,
        score_batch=ctx.cfg.reward.score_batch, quiet=ctx.cfg.run.quiet,
    )  # fmt: skip
    if t > 0:
        figures["diverged"] = divergence(figures, read_json(ctx.rd.iter_dir(0) / "eval.json"), ctx.cfg.eval)
    ctx.rd.commit(name, {out / "eval_samples.jsonl": rows, out / "eval.json": figures}, [{"stage": "eval", **figures}])
    ctx.say("eval " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
    return figures


def noise(ctx: Context, adapter) -> None:
    """π0's gold figures under a second sampling seed: the run-to-run noise a gain must beat."""
    name = "iter_000/noise"
    if ctx.task.gold is None or ctx.rd.done(name):
        return
    test = ctx.task.eval_sets.limit(ctx.cfg.eval.max_prompts).test
    k, seed = ctx.cfg.eval.samples_per_prompt, derive_seed(ctx.cfg, 0, "noise")
    figures = noise_figures(ctx.engine, test, k, adapter, seed, ctx.task.gold, ctx.cfg.run.quiet)
    ctx.rd.commit(name, {ctx.rd.iter_dir(0) / "noise.json": figures})


def generate(ctx: Context, t: int, prompts, adapter) -> list[Sample]:
    name, path = f"iter_{t:03d}/samples", ctx.rd.iter_dir(t) / "samples.jsonl"
    if ctx.rd.done(name):
        return [Sample(**row) for row in read_jsonl(path)]
    samples = ctx.engine.generate(prompts, n=ctx.cfg.generation.n, adapter=adapter,
                                  seed=derive_seed(ctx.cfg, t, "generate"), logprobs=ctx.engine.logprobs_while_sampling,
                                  desc=None if ctx.cfg.run.quiet else f"iter {t} generate")  # fmt: skip
    samples, gap = served_check(ctx, t, samples, adapter)
    ctx.rd.commit(name, {path: [dataclasses.asdict(s) for s in samples]}, [{"stage": "samples", "iteration": t, **gap}])
    g = gap["engine_logprob_gap"]
    seen = f"engine_logprob_gap {g:.2g}/token" if g is not None else "no engine log-probs: gap not checked"
    ctx.say(f"iteration {t}: {len(samples)} samples for {len(prompts)} prompts; {seen}")
    return samples


def served_check(ctx: Context, t: int, samples: list[Sample], adapter) -> tuple[list[Sample], dict]:
    """Does the engine serve policy_{t-1}? Its log-probs of a few of its answers against the trainer's for the
    same adapter (`lite_rlhf/engine_gap.py`); a stale engine stops the run before the samples are committed. The
    samples come back with the engine's log-probs on the checked answers only (committed with them)."""
    checked = engine_gap.check_answers(samples)
    mine = [s for s in samples if (s.prompt_id, s.index) in checked]
    with_lps = {(s.prompt_id, s.index): s for s in ctx.engine.sampled_logprobs(mine, ctx.ids, adapter)}
    samples = [with_lps.get((s.prompt_id, s.index), dataclasses.replace(s, logprobs=None)) for s in samples]
    ctx.model.load_adapter("policy", ctx.rd.iter_dir(t - 1) / "policy")  # the adapter served (π0's copy at t=1)
    gap = engine_gap.logprob_gap(ctx.model, ctx.ids, list(with_lps.values()), ctx.cfg.data.max_length)
    reason = engine_gap.stale_reason(gap, engine_gap.tolerance(ctx.cfg))
    if reason:
        served = adapter if adapter is not None else "π0 (the base)"
        raise engine_gap.StaleEngine(f"iteration {t}: the engine does not serve the adapter {served}: {reason}; "
                                     "nothing of this iteration was committed")  # fmt: skip
    return samples, gap


def scores(ctx: Context, t: int, samples: list[Sample]) -> list[float]:
    """Reward of every sample (or its tournament score), and the length-penalized score used for ranking."""
    name, path = f"iter_{t:03d}/scores", ctx.rd.iter_dir(t) / "scores.jsonl"
    if ctx.rd.done(name):
        return [row["penalized"] for row in read_jsonl(path)]
    start = time.time()
    rewards, cost, terms = ctx.oracle.rank({p.id: p for p in ctx.task.prompts}, samples)
    penalized = penalized_rewards(samples, rewards, ctx.cfg.pairs)
    rows = [
        {"prompt_id": s.prompt_id, "index": s.index, "reward": r, "penalized": p}
        | ({"terms": {name: scores[i] for name, scores in terms.items()}} if terms else {})
        for i, (s, r, p) in enumerate(zip(samples, rewards, penalized, strict=True))
    ]
    record = {"stage": "scores", "iteration": t, **cost, "scoring_seconds": round(time.time() - start, 1)}
    ctx.rd.commit(name, {path: rows}, [record])
    ctx.say(f"iteration {t}: ranked in {record['scoring_seconds']} s, "
            + ", ".join(f"{v:g} {k.replace('_', ' ')}" for k, v in cost.items()))  # fmt: skip
    return penalized


def choose_best(ctx: Context, t: int) -> int:
    """best/ -> the policy of the iteration with the highest validation reward (π0 included), or with a
    preference model the highest validation win rate against π0 (π0's own is 1/2)."""
    key = "val_win_rate" if ctx.cfg.reward.kind == "preference" else "val_reward"
    evals = {i: read_json(ctx.rd.iter_dir(i) / "eval.json") for i in range(t + 1)}
    val = {i: e[key] for i, e in evals.items() if not e.get("diverged")}  # π0 never diverges
    best = max(val, key=lambda i: (val[i], -i))
    name = f"iter_{t:03d}/best"
    if not ctx.rd.done(name):
        ctx.rd.commit(name, {ctx.rd.root / "best": Link(f"iter_{best:03d}/policy")})
    return best


def commit_report(ctx: Context, name: str) -> None:
    if not ctx.rd.done(name):  # read and drawn by the rank that writes it
        ctx.rd.commit(name, report_files(ctx.rd.root) if ctx.rd.writer else {})


def commit_summary(ctx: Context, best: int, seconds: float) -> None:
    """summary.json: the best iteration's gold against π0's, the noise, and the gain's bootstrap interval."""
    if ctx.rd.done("summary"):
        return
    its = (0, best)
    evals = {t: read_json(ctx.rd.iter_dir(t) / "eval.json") for t in its}
    rows = {t: read_jsonl(ctx.rd.iter_dir(t) / "eval_samples.jsonl") for t in its}
    noise_path = ctx.rd.iter_dir(0) / "noise.json"
    noise_figs = read_json(noise_path) if noise_path.exists() else {}
    out = summary(ctx.task.gold, ctx.task.test, best, evals, rows, noise_figs) | {"wall_seconds": round(seconds, 1)}
    ctx.rd.commit("summary", {ctx.rd.root / "summary.json": out})
