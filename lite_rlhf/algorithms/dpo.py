"""DPO (loop.algorithm=dpo): each iteration's best-vs-worst pairs join every pair so far, and the policy is
trained on them from the previous one, with π0 as the reference (paper section 3.3); dpo.train_on=current trains
each iteration on its own pairs alone (online DPO).

The trainer: reference log-probs once per pair, then training through the fused kernels.

The reference π0 is the shared base with the policy adapter off (or the frozen sft adapter). Its
summed response log-probs are computed once, when a pair is made, and stored with the pair, so
training never runs the reference model. The policy loss goes from final hidden states to the DPO
loss through `lite_rlhf.kernels.fused_dpo_loss`, which never forms `[tokens, vocab]` logits.
DPO: Rafailov et al. 2023, https://arxiv.org/abs/2305.18290
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

from lite_rlhf import dist
from lite_rlhf.batching import IGNORE, Row, fits, make_batch
from lite_rlhf.config import ConfigError, DataConfig, DPOConfig
from lite_rlhf.context import Context, derive_seed, update_policy
from lite_rlhf.data import response_ids
from lite_rlhf.generate import Sample
from lite_rlhf.kernels import fused_dpo_loss, fused_dpo_loss_reference, kernel_path, needs_reference, reductions
from lite_rlhf.pairs import Pair, select_pairs, spin_pairs
from lite_rlhf.runstate import kill_point, read_jsonl
from lite_rlhf.task import Task
from lite_rlhf.train import group_by_length, longest_micro_batch, optimize, plan_steps


def pair_rows(pairs: list[Pair], prompt_ids: dict[str, list[int]]) -> list[Row]:
    """Chosen rows first, then rejected rows: a batch of `[2B, T]`."""
    return [(prompt_ids[p.prompt_id], p.chosen_ids) for p in pairs] + [
        (prompt_ids[p.prompt_id], p.rejected_ids) for p in pairs
    ]


def pair_fits(pair: Pair, prompt_ids: dict[str, list[int]], d: DataConfig) -> bool:
    return fits(pair_rows([pair], prompt_ids), d.max_length, d.truncation)


def add_reference_logps(
    model, pairs: list[Pair], prompt_ids: dict[str, list[int]], d: DataConfig, micro_batch: int, *, quiet: bool = True
) -> list[Pair]:
    """π0's summed log-probs of each pair's chosen and rejected response, computed once, in batches of
    pairs of similar length (less padding); returned in the order given. Under torchrun each rank computes
    its share."""
    return dist.map_sharded(pairs, lambda part: _reference_logps(model, part, prompt_ids, d, micro_batch, quiet))


def _reference_logps(model, pairs: list[Pair], prompt_ids, d: DataConfig, micro_batch: int, quiet: bool) -> list[Pair]:
    from tqdm.auto import tqdm

    order = sorted(range(len(pairs)), key=lambda i: -_longest_row(pairs[i], prompt_ids))
    out: list[Pair | None] = [None] * len(pairs)
    with model.role("reference"):
        for at in tqdm(range(0, len(pairs), micro_batch), desc="reference log-probs", unit="batch", disable=quiet):
            chunk = order[at : at + micro_batch]
            rows = pair_rows([pairs[i] for i in chunk], prompt_ids)
            logps = model.sequence_logps(make_batch(rows, model.pad_id, d.max_length, d.truncation))[0].float().cpu()
            b = len(chunk)
            for j, i in enumerate(chunk):
                out[i] = dataclasses.replace(
                    pairs[i], ref_chosen_logp=float(logps[j]), ref_rejected_logp=float(logps[b + j])
                )
    return out


def _longest_row(pair: Pair, prompt_ids: dict[str, list[int]]) -> int:
    return len(prompt_ids[pair.prompt_id]) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def dpo_loss_fn(dpo: DPOConfig, device: torch.device | str) -> Callable:
    """The loss `dpo.kernel` asks for on `device`: auto (Triton on CUDA or under TRITON_INTERPRET=1, the
    chunked torch path otherwise), triton, chunked, or reference (full logits: the specification, for checks)."""
    if dpo.kernel == "reference":
        return fused_dpo_loss_reference
    default = kernel_path(device)
    if dpo.kernel == "triton" and default == "chunked-torch":
        raise ConfigError(
            "config key 'dpo.kernel': triton runs on CUDA or under TRITON_INTERPRET=1 (Triton's CPU interpreter); "
            "here it would be the chunked torch path: set dpo.kernel=auto or chunked"
        )
    return functools.partial(fused_dpo_loss, path=dpo_path(dpo, device))


def dpo_path(dpo: DPOConfig, device: torch.device | str) -> str:
    """The log-prob path `dpo.kernel` runs on `device` (reference: torch, on the full logits)."""
    return kernel_path(device) if dpo.kernel in ("auto", "triton") else "chunked-torch"


def train_dpo(
    model,
    pairs: list[Pair],
    prompt_ids: dict[str, list[int]],
    dpo: DPOConfig,
    d: DataConfig,
    *,
    seed: int,
    quiet: bool,
    on_step: Callable[[dict], None],
) -> None:
    """DPO epochs over `pairs` on the policy adapter (in place); one record per optimizer step."""
    stats = _Accumulator()
    loss_fn = dpo_loss_fn(dpo, model.device)

    def micro_loss(indices: list[int]) -> torch.Tensor:
        chunk = [pairs[i] for i in indices]
        batch = make_batch(pair_rows(chunk, prompt_ids), model.pad_id, d.max_length, d.truncation)
        ref_c = torch.tensor([p.ref_chosen_logp or 0.0 for p in chunk], dtype=torch.float32, device=model.device)
        ref_r = torch.tensor([p.ref_rejected_logp or 0.0 for p in chunk], dtype=torch.float32, device=model.device)
        # (None, not computed, only when every loss is reference-free: then the loss never reads them)
        hidden, softcap = model.logit_inputs(model.hidden_states(batch.input_ids, batch.mask))  # [2B, T, H]
        out = loss_fn(
            hidden,
            model.lm_head_weight,
            batch.targets.to(model.device),
            ref_c,
            ref_r,
            beta=dpo.beta,
            loss_type=dpo.loss_type,
            loss_weights=dpo.loss_weights,
            label_smoothing=dpo.label_smoothing,
            ignore_index=IGNORE,
            rpo_alpha=dpo.rpo_alpha,
            discopop_tau=dpo.discopop_tau,
            simpo_gamma=dpo.simpo_gamma,
            softcap=softcap,
        )
        stats.add(out, len(chunk))
        return out.loss * len(chunk)  # the micro-batch's sum; the helper divides by the step's pairs

    lengths = [min(d.max_length, _longest_row(p, prompt_ids)) for p in pairs]
    steps = group_by_length(plan_steps(len(pairs), dpo, seed), lengths)
    model.fit_checkpointing("dpo", longest_micro_batch(steps, lengths, rows_per_example=2), quiet=quiet)
    model.train()
    with model.role("policy"):
        optimize(
            model.parameters("policy"), dpo, steps, micro_loss, stats.flush, name="dpo", quiet=quiet, on_step=on_step
        )
    model.eval()


class _Accumulator:
    """Means over the pairs of one optimizer step."""

    def __init__(self):
        self.losses, self.terms, self.nll, self.chosen, self.rejected = [], {}, [], [], []

    def add(self, out, pairs: int) -> None:
        self.losses.append((out.loss.item(), pairs))
        for name, value in out.terms.items():  # each loss's value before its weight, e.g. RPO's sft term
            self.terms.setdefault(name, []).append((value.item(), pairs))
        self.nll += out.chosen_nll.float().cpu().tolist()
        self.chosen += out.chosen_rewards.float().cpu().tolist()
        self.rejected += out.rejected_rewards.float().cpu().tolist()

    def flush(self) -> dict:
        n = sum(k for _, k in self.losses)
        out = {
            "loss": sum(v * k for v, k in self.losses) / n,
            **{f"loss_{name}": sum(v * k for v, k in values) / n for name, values in self.terms.items()},
            "chosen_nll": sum(self.nll) / n,  # each chosen answer's NLL per token, mean over pairs (RPO's term)
            "reward_accuracy": sum(c > r for c, r in zip(self.chosen, self.rejected, strict=True)) / n,
            "reward_margin": sum(c - r for c, r in zip(self.chosen, self.rejected, strict=True)) / n,
            "chosen_reward": sum(self.chosen) / n,
            "rejected_reward": sum(self.rejected) / n,
        }
        self.__init__()
        return out


# --------------------------------------------------------------------------- the algorithm's stages


def start(ctx: Context) -> list[Pair]:
    """Before the first iteration: the offline pairs (data.offline_pairs), the paper's hybrid setting."""
    return offline_pairs(ctx)


def iteration(ctx: Context, t: int, samples: list[Sample], rewards: list[float | None], kept: list[Pair]) -> list:
    """This iteration's pairs join the ones kept; policy_t = DPO on all of them (dpo.train_on=current: on this
    iteration's alone) from policy_{t-1}."""
    new = pairs(ctx, t, samples, rewards)
    history = kept + new
    dpo(ctx, t, history if ctx.cfg.dpo.train_on == "all" else new)
    return history


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
    made = with_reference(ctx, made)
    ctx.rd.commit(name, {path: [dataclasses.asdict(p) for p in made]})
    return made


def made_pairs(ctx: Context, samples: list[Sample], rewards: list[float]):
    """Best vs worst by reward (pairs.source=reward), or SPIN's data answer vs the policy's own (spin)."""
    if ctx.cfg.pairs.source == "reward":
        return select_pairs(samples, rewards, ctx.cfg.pairs)
    asked = {s.prompt_id for s in samples}
    answers = {p.id: p.meta["completion"] for p in ctx.task.prompts if p.id in asked}
    return spin_pairs(samples, {pid: (a, response_ids(ctx.model.tokenizer, a)) for pid, a in answers.items()})


def with_reference(ctx: Context, made: list[Pair]) -> list[Pair]:
    """The pairs with π0's log-probs; as they are (None) when every loss is reference-free (sft, simpo)."""
    if not needs_reference(ctx.cfg.dpo.loss_type):
        return made
    return add_reference_logps(ctx.model, made, ctx.ids, ctx.cfg.data, ctx.cfg.dpo.micro_batch, quiet=ctx.cfg.run.quiet)


def pairs(ctx: Context, t: int, samples: list[Sample], rewards: list[float]) -> list[Pair]:
    """Best vs worst per prompt (or SPIN's pairs), with π0's log-probs of both answers."""
    name, path = f"iter_{t:03d}/pairs", ctx.rd.iter_dir(t) / "pairs.jsonl"
    if ctx.rd.done(name):
        return [Pair(**row) for row in read_jsonl(path)]
    made, dropped = made_pairs(ctx, samples, rewards)
    fit = [p for p in made if pair_fits(p, ctx.ids, ctx.cfg.data)]
    if len(fit) < len(made):
        dropped["too_long"] += len(made) - len(fit)
    kill_point(f"{name}:reference")
    made = with_reference(ctx, fit)
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


def dpo(ctx: Context, t: int, history: list[Pair]) -> None:
    """DPO on `history` (all pairs so far, or this iteration's), from the previous policy, reference π0."""
    loss = reductions(ctx.cfg.dpo.loss_type, dpo_path(ctx.cfg.dpo, ctx.model.device))  # Triton or torch, per loss
    update_policy(ctx, t, "dpo", f"DPO on {len(history)} pairs (loss {loss})", len(history), lambda on_step: train_dpo(
        ctx.model, history, ctx.ids, ctx.cfg.dpo, ctx.cfg.data, seed=derive_seed(ctx.cfg, t, "dpo"),
        quiet=ctx.cfg.run.quiet, on_step=on_step,
    ))  # fmt: skip
