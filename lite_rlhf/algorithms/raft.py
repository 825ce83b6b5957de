"""RAFT (loop.algorithm=raft): reward-ranked fine-tuning, the paper's rejection-sampling baseline. Each
iteration keeps the best answer per prompt (above a reward quantile) and trains the policy on the winners (of
this iteration, or of every iteration so far: raft.history) with the SFT loss; no reference model.
"""

from __future__ import annotations

import dataclasses

from lite_rlhf.batching import as_example, encode_rows, fits
from lite_rlhf.context import Context, derive_seed, update_policy
from lite_rlhf.generate import Sample
from lite_rlhf.pairs import Winner, select_winners
from lite_rlhf.runstate import read_jsonl
from lite_rlhf.sft import train_sft


def start(ctx: Context) -> list[Winner]:
    return []


def iteration(ctx: Context, t: int, samples: list[Sample], rewards: list[float | None], kept: list[Winner]) -> list:
    """This iteration's winners (with the earlier ones when raft.history is all); policy_t = SFT on them."""
    won = winners(ctx, t, samples, rewards)
    history = kept + won if ctx.cfg.raft.history == "all" else won
    raft(ctx, t, history)
    return history


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


def raft(ctx: Context, t: int, won: list[Winner]) -> None:
    """SFT on the winners, from the previous policy (no reference model)."""
    d = ctx.cfg.data

    def train(on_step) -> None:  # encoded only when the stage runs, not on a resume that skips it
        rows = [(ctx.ids[w.prompt_id], w.response_ids) for w in won]
        examples = [as_example(*enc) for enc in encode_rows(rows, d.max_length, d.truncation)]
        train_sft(ctx.model, examples, ctx.cfg.raft, seed=derive_seed(ctx.cfg, t, "raft"), quiet=ctx.cfg.run.quiet,
                  on_step=on_step, name="raft")  # fmt: skip

    update_policy(ctx, t, "raft", f"SFT on {len(won)} winners", len(won), train)
