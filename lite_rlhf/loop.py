"""`lite-rlhf run`: online iterative DPO (Algorithm 1 of the RLHF Workflow paper, section 3.3), or RAFT.

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

from lite_rlhf import dist
from lite_rlhf.batching import as_example, encode_rows, fits
from lite_rlhf.config import Config, ConfigError
from lite_rlhf.data import load_conversations, prompt_ids, response_ids
from lite_rlhf.dpo import add_reference_logps, dpo_loss_fn, pair_fits, train_dpo
from lite_rlhf.evaluate import divergence, evaluate_policy, noise_figures, summary
from lite_rlhf.generate import LazyEngine, Sample, check_context, make_engine, start_engine
from lite_rlhf.loggers import attach_logger
from lite_rlhf.models import resolve_model
from lite_rlhf.pairs import Pair, Winner, penalized_rewards, select_pairs, select_winners
from lite_rlhf.preference import check_format, preference_stage
from lite_rlhf.report import report_files
from lite_rlhf.reward import check_brought_oracle, check_oracle, reward_stage
from lite_rlhf.roles import SharedModel
from lite_rlhf.runstate import Link, RunDir, kill_point, read_json, read_jsonl
from lite_rlhf.scoring import Oracle
from lite_rlhf.sft import sft_stage, train_sft
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
    if dist.is_main():
        root = Path(cfg.run.out_dir)
        off = [t for t in range(1, cfg.loop.iterations + 1) if read_json(root / f"iter_{t:03d}/eval.json")["diverged"]]
        note = f"; iteration(s) {', '.join(map(str, off))} diverged, never chosen (report.md)" if off else ""
        print(f"lite-rlhf: done; best iteration {best} -> {root}/best, report {root}/report.md{note}")
    return 0


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
    ids = {p.id: prompt_ids(model.tokenizer, p.messages) for p in task.all_prompts}
    check_context(ids, model_dir, cfg.generation, cfg.data.max_length)  # before any model trains
    ids |= {Task.offline_id(i): prompt_ids(model.tokenizer, op.prompt) for i, op in enumerate(task.offline_pairs)}
    pi0 = sft_stage(rd, model, cfg, *conversations) if conversations else cfg.model.sft_adapter
    train_oracle(rd, model, cfg)
    oracle = Oracle(cfg, model)
    engine = LazyEngine(lambda: start_engine(model, cfg, lambda share: make_engine(
        model_dir, cfg.generation, lora_rank=cfg.lora.r, seed=cfg.run.seed, quantization=cfg.model.quantization,
        share=share), say))  # fmt: skip
    ctx = Context(rd, cfg, task, model, engine, oracle, ids, say)

    commit_policy(ctx, 0)  # the policy before any training: a fresh LoRA, or a copy of the sft adapter
    evaluate(ctx, 0, adapter=pi0)  # π0 is served as base (+ sft)
    noise(ctx, adapter=pi0)
    history = offline_pairs(ctx) if cfg.loop.algorithm == "dpo" else []
    for t in range(1, cfg.loop.iterations + 1):
        serve = rd.iter_dir(t - 1) / "policy" if t > 1 else pi0
        prompts_t = task.slice(t, cfg.loop.iterations, cfg.loop.prompts_per_iteration)
        samples = generate(ctx, t, prompts_t, serve)
        rewards = scores(ctx, t, samples)
        if cfg.loop.algorithm == "dpo":
            history += pairs(ctx, t, samples, rewards)
            dpo(ctx, t, history)
        else:
            won = winners(ctx, t, samples, rewards)
            history = history + won if cfg.raft.history == "all" else won
            raft(ctx, t, history)
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
    task = load_task(cfg.data)
    unused = task.check_slices(cfg.loop.iterations, cfg.loop.prompts_per_iteration)
    d = cfg.data
    conversations = load_conversations(data_path(d, "sft"), d.skip_invalid, data_fields(d)) if d.sft else None
    dpo_loss_fn(cfg.dpo, "cuda" if torch.cuda.is_available() else "cpu")  # dpo.kernel fits this machine
    if cfg.reward.kind == "preference":
        check_format(cfg)  # the labels are one token each
    if cfg.reward.adapter:
        check_brought_oracle(cfg)
    return task, conversations, unused


# --------------------------------------------------------------------------- what every stage sees


@dataclasses.dataclass
class Context:
    rd: RunDir
    cfg: Config
    task: Task
    model: SharedModel
    engine: LazyEngine
    oracle: Oracle
    ids: dict[str, list[int]]  # prompt id -> prompt token ids, under the one chat template
    say: Say


class Say:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, *args) -> None:
        if not self.quiet:
            print("[lite-rlhf]", *args, flush=True)


def derive_seed(cfg: Config, t: int, purpose: str) -> int:
    """A seed per (run seed, iteration, purpose), stable across runs and resumes."""
    code = {"generate": 1, "dpo": 2, "eval": 3, "noise": 4, "raft": 5}[purpose]
    return (cfg.run.seed * 1_000_003 + t * 101 + code) % (2**31 - 1)


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


def commit_policy(ctx: Context, t: int, records: list[dict] = ()) -> None:
    name = f"iter_{t:03d}/policy"
    if not ctx.rd.done(name):
        ctx.rd.commit(name, {ctx.rd.iter_dir(t) / "policy": lambda tmp: ctx.model.save_adapter("policy", tmp)}, records)


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


def offline_pairs(ctx: Context) -> list[Pair]:
    """Offline pairs as `Pair`s with their π0 log-probs (computed once)."""
    name, path = "offline_pairs", ctx.rd.root / "offline_pairs.jsonl"
    if ctx.rd.done(name):
        return [Pair(**row) for row in read_jsonl(path)]
    tok, d = ctx.model.tokenizer, ctx.cfg.data
    made = [
        Pair(Task.offline_id(i), response_ids(tok, op.chosen), response_ids(tok, op.rejected), op.chosen,
             op.rejected, 0.0, 0.0)
        for i, op in enumerate(ctx.task.offline_pairs)
    ]  # fmt: skip
    made = [p for p in made if pair_fits(p, ctx.ids, d)]
    made = add_reference_logps(ctx.model, made, ctx.ids, d, ctx.cfg.dpo.micro_batch, quiet=ctx.cfg.run.quiet)
    ctx.rd.commit(name, {path: [dataclasses.asdict(p) for p in made]})
    return made


def generate(ctx: Context, t: int, prompts, adapter) -> list[Sample]:
    name, path = f"iter_{t:03d}/samples", ctx.rd.iter_dir(t) / "samples.jsonl"
    if ctx.rd.done(name):
        return [Sample(**row) for row in read_jsonl(path)]
    samples = ctx.engine.generate(prompts, n=ctx.cfg.generation.n, adapter=adapter,
                                  seed=derive_seed(ctx.cfg, t, "generate"),
                                  desc=None if ctx.cfg.run.quiet else f"iter {t} generate")  # fmt: skip
    ctx.rd.commit(name, {path: [dataclasses.asdict(s) for s in samples]})
    ctx.say(f"iteration {t}: {len(samples)} samples for {len(prompts)} prompts")
    return samples


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


def pairs(ctx: Context, t: int, samples: list[Sample], rewards: list[float]) -> list[Pair]:
    """Best vs worst per prompt, with π0's log-probs of both answers."""
    name, path = f"iter_{t:03d}/pairs", ctx.rd.iter_dir(t) / "pairs.jsonl"
    if ctx.rd.done(name):
        return [Pair(**row) for row in read_jsonl(path)]
    made, dropped = select_pairs(samples, rewards, ctx.cfg.pairs)
    fit = [p for p in made if pair_fits(p, ctx.ids, ctx.cfg.data)]
    if len(fit) < len(made):
        dropped["too_long"] += len(made) - len(fit)
    kill_point(f"{name}:reference")
    made = add_reference_logps(ctx.model, fit, ctx.ids, ctx.cfg.data, ctx.cfg.dpo.micro_batch, quiet=ctx.cfg.run.quiet)
    record = {
        "stage": "pairs",
        "iteration": t,
        "pairs_kept": len(made),
        "pairs_dropped": len({s.prompt_id for s in samples}) - len(made),
        **{f"dropped_{k}": v for k, v in sorted(dropped.items())},
        "pair_margin": sum(p.margin for p in made) / len(made) if made else 0.0,
    }
    ctx.rd.commit(name, {path: [dataclasses.asdict(p) for p in made]}, [record])
    ctx.say(f"iteration {t}: {len(made)} pairs kept, dropped {dict(dropped)}")
    return made


def winners(ctx: Context, t: int, samples: list[Sample], rewards: list[float]) -> list[Winner]:
    """RAFT: the best answer per prompt (above the reward quantile), if it fits data.max_length."""
    name, path = f"iter_{t:03d}/winners", ctx.rd.iter_dir(t) / "winners.jsonl"
    if ctx.rd.done(name):
        return [Winner(**row) for row in read_jsonl(path)]
    made, dropped = select_winners(samples, rewards, ctx.cfg.raft.keep_quantile)
    d = ctx.cfg.data
    fit = [w for w in made if fits([(ctx.ids[w.prompt_id], w.response_ids)], d.max_length, d.truncation)]
    if len(fit) < len(made):
        dropped["too_long"] += len(made) - len(fit)
    record = {
        "stage": "winners",
        "iteration": t,
        "winners_kept": len(fit),
        **{f"dropped_{k}": v for k, v in sorted(dropped.items())},
        "winner_reward": sum(w.reward for w in fit) / len(fit) if fit else 0.0,
    }
    ctx.rd.commit(name, {path: [dataclasses.asdict(w) for w in fit]}, [record])
    ctx.say(f"iteration {t}: {len(fit)} winners kept, dropped {dict(dropped)}")
    return fit


def dpo(ctx: Context, t: int, history: list[Pair]) -> None:
    """DPO on all pairs so far, from the previous policy, reference π0."""
    update_policy(ctx, t, "dpo", f"DPO on {len(history)} pairs", len(history), lambda on_step: train_dpo(
        ctx.model, history, ctx.ids, ctx.cfg.dpo, ctx.cfg.data, seed=derive_seed(ctx.cfg, t, "dpo"),
        quiet=ctx.cfg.run.quiet, on_step=on_step,
    ))  # fmt: skip


def raft(ctx: Context, t: int, won: list[Winner]) -> None:
    """SFT on the winners, from the previous policy (no reference model)."""
    d = ctx.cfg.data

    def train(on_step) -> None:  # encoded only when the stage runs, not on a resume that skips it
        rows = [(ctx.ids[w.prompt_id], w.response_ids) for w in won]
        examples = [as_example(*enc) for enc in encode_rows(rows, d.max_length, d.truncation)]
        train_sft(ctx.model, examples, ctx.cfg.raft, seed=derive_seed(ctx.cfg, t, "raft"), quiet=ctx.cfg.run.quiet,
                  on_step=on_step, name="raft")  # fmt: skip

    update_policy(ctx, t, "raft", f"SFT on {len(won)} winners", len(won), train)


def update_policy(ctx: Context, t: int, stage: str, what: str, n: int, train) -> None:
    """policy_t = `train(on_step)` from policy_{t-1}, with the engine asleep. Killed inside, it restarts
    from the previous policy with the same seed, so the result is identical."""
    name = f"iter_{t:03d}/policy"
    if ctx.rd.done(name):
        return
    ctx.model.load_adapter("policy", ctx.rd.iter_dir(t - 1) / "policy")
    records: list[dict] = []
    if not n:
        ctx.say(f"iteration {t}: nothing to train on; the policy is unchanged")
    else:
        ctx.say(f"iteration {t}: {what}")
        ctx.engine.sleep()
        train(lambda rec: (records.append({"stage": stage, "iteration": t, **rec}), kill_point(f"{name}:step")))
        ctx.engine.wake()
    commit_policy(ctx, t, records)


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
