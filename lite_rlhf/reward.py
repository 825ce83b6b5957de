"""Bradley-Terry reward model: a LoRA adapter plus a scalar head on the shared base (paper §2.1).

    L_RM(θ) = -E log σ(r_θ(x, a_w) - r_θ(x, a_l))        https://arxiv.org/abs/2405.07863, §2.1

r_θ(x, a) is the head applied to the reward role's final hidden state at the last token of
prompt + response, tokenized through `data.prompt_ids` / `data.response_ids` / `data.encode` like every
other stage. Paper defaults: 1 epoch, cosine schedule, 3% warm-up. Diagnostics, as in the paper:
held-out pair accuracy (beside the accuracy of "the longer answer wins", the baseline a length-biased
reward would reach) and the Pearson correlation between reward and response length in characters.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lite_rlhf import dist
from lite_rlhf.batching import pad
from lite_rlhf.config import Config, DataConfig, RewardConfig
from lite_rlhf.data import DataError, Messages, PreferencePair, encode, prompt_ids, response_ids
from lite_rlhf.loggers import attach_logger
from lite_rlhf.models import ModelNotFound, check_adapter
from lite_rlhf.roles import HEAD_FILE, SharedModel
from lite_rlhf.runstate import RunDir, kill_point, read_json, write_json
from lite_rlhf.task import reward_pairs
from lite_rlhf.train import group_by_length, longest_micro_batch, optimize, plan_steps


@dataclass(frozen=True)
class EncodedPairs:
    chosen: list[list[int]]
    rejected: list[list[int]]
    kept: list[int]  # index of each encoded pair in the input list
    n_truncated: int  # pairs with at least one side cut to data.max_length (rule keep_ends)
    n_dropped: int  # pairs that did not fit (rule drop, or no room left for the prompt)


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_length: int, truncation: str) -> EncodedPairs:
    """Token ids of prompt + chosen and prompt + rejected, under the data.max_length rule."""
    chosen, rejected, kept, truncated, dropped = [], [], [], 0, 0
    for i, pair in enumerate(pairs):
        prompt = prompt_ids(tokenizer, pair.prompt)
        sides = [response_ids(tokenizer, pair.chosen), response_ids(tokenizer, pair.rejected)]
        encoded = [encode(prompt, resp, max_length, truncation) for resp in sides]
        if any(e is None for e in encoded):
            dropped += 1
            continue
        truncated += any(len(prompt) + len(resp) > max_length for resp in sides)
        chosen.append(encoded[0][0])
        rejected.append(encoded[1][0])
        kept.append(i)
    return EncodedPairs(chosen, rejected, kept, truncated, dropped)


@torch.no_grad()
def score_ids(model: SharedModel, seqs: list[list[int]], batch_size: int, quiet: bool = False) -> list[float]:
    """Rewards of token sequences (prompt + response), in input order; batches of similar length. Under
    torchrun each rank scores its share."""
    return dist.map_sharded(seqs, lambda part: _score_ids(model, part, batch_size, quiet))


def _score_ids(model: SharedModel, seqs: list[list[int]], batch_size: int, quiet: bool) -> list[float]:
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    scores = [0.0] * len(seqs)
    was_training = model.peft.training
    model.train(False)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch", leave=False, disable=quiet):
            idx = order[start : start + batch_size]
            ids, mask = pad([seqs[i] for i in idx], model.tokenizer.pad_token_id)
            for i, r in zip(idx, model.score(ids, mask).tolist(), strict=True):
                scores[i] = r
    finally:
        model.train(was_training)
    return scores


def score_texts(
    model: SharedModel,
    prompts: list[Messages],
    responses: list[str] | list[list[int]],
    batch_size: int,
    max_length: int | None = None,
    quiet: bool = False,
) -> list[float]:
    """Rewards of (prompt, response) pairs; a response is text or its generated token ids (used as given).

    Sequences longer than `max_length` are cut by the keep_ends rule: scoring never drops a sample.
    """
    tok = model.tokenizer
    seqs = []
    for prompt, resp in zip(prompts, responses, strict=True):
        ids = response_ids(tok, resp) if isinstance(resp, str) else list(resp)
        p = prompt_ids(tok, prompt)
        seqs.append(encode(p, ids, max_length or len(p) + len(ids), "keep_ends")[0])
    return score_ids(model, seqs, batch_size, quiet)


def _pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) < 2:
        return None
    c = torch.corrcoef(torch.tensor([x, y], dtype=torch.float64))[0, 1].item()
    return None if math.isnan(c) else c


def length_figures(pairs: list[PreferencePair], right: list[float]) -> dict:
    """Held-out accuracy split by whether the chosen answer is the longer (a length-biased oracle fails
    one of the two), and the accuracy of "the longer answer wins" (a tie counts half, a coin flip's
    expectation). `right[i]`: how right the oracle was on pair i."""

    def accuracy_where(chosen_longer: bool) -> float | None:
        got = [r for r, p in zip(right, pairs, strict=True) if (len(p.chosen) > len(p.rejected)) == chosen_longer]
        return sum(got) / len(got) if got else None

    longer = [(len(p.chosen) > len(p.rejected)) + 0.5 * (len(p.chosen) == len(p.rejected)) for p in pairs]
    return {
        "eval_accuracy_chosen_longer": accuracy_where(True),
        "eval_accuracy_chosen_not_longer": accuracy_where(False),
        "length_baseline_accuracy": sum(longer) / len(pairs),
    }


def evaluate_reward(model: SharedModel, cfg: Config, pairs: list[PreferencePair]) -> dict:
    """Held-out accuracy, mean margin, length-only baseline, reward/length correlation."""
    if not pairs:
        return {"eval_pairs": 0, "eval_accuracy": None, "length_baseline_accuracy": None, "length_correlation": None}
    enc = encode_pairs(model.tokenizer, pairs, cfg.data.max_length, cfg.data.truncation)
    if not enc.kept:
        raise DataError(f"no held-out preference pair fits data.max_length={cfg.data.max_length}")
    n = len(enc.kept)
    scores = score_ids(model, enc.chosen + enc.rejected, cfg.reward.score_batch, cfg.run.quiet)
    margins = [c - r for c, r in zip(scores[:n], scores[n:], strict=True)]
    kept = [pairs[i] for i in enc.kept]
    lengths = [len(p.chosen) for p in kept] + [len(p.rejected) for p in kept]
    figures = length_figures(kept, [float(m > 0) for m in margins])
    return {
        "eval_pairs": n,
        "eval_accuracy": sum(m > 0 for m in margins) / n,
        "eval_accuracy_chosen_longer": figures["eval_accuracy_chosen_longer"],
        "eval_accuracy_chosen_not_longer": figures["eval_accuracy_chosen_not_longer"],
        "eval_loss": sum(-F.logsigmoid(torch.tensor(m)).item() for m in margins) / n,
        "eval_margin": sum(margins) / n,
        "length_baseline_accuracy": figures["length_baseline_accuracy"],
        "length_correlation": _pearson(scores, [float(x) for x in lengths]),
        "eval_truncated": enc.n_truncated,
        "eval_dropped": enc.n_dropped,
    }


def train_reward(
    model: SharedModel, rc: RewardConfig, d: DataConfig, pairs: list[PreferencePair], *, seed: int, quiet: bool
) -> tuple[dict, list[dict]]:
    """Train the reward adapter and head with the BT loss (in place). Returns the figures of
    `metrics.json` (training counts and held-out figures are added by `reward_stage`) and one record
    per optimizer step."""
    enc = encode_pairs(model.tokenizer, pairs, d.max_length, d.truncation)
    if not enc.kept:
        raise DataError(f"no preference pair fits data.max_length={d.max_length} (rule {d.truncation})")
    margins: list[torch.Tensor] = []

    def micro_loss(idx: list[int]) -> torch.Tensor:
        ids, mask = pad([enc.chosen[i] for i in idx] + [enc.rejected[i] for i in idx], model.tokenizer.pad_token_id)
        r = model.score(ids, mask)  # [2b]: chosen then rejected
        margin = r[: len(idx)] - r[len(idx) :]
        margins.append(margin.detach())
        return -F.logsigmoid(margin).sum()

    def step_stats() -> dict:
        m = torch.cat(margins).float()
        margins.clear()
        return {
            "loss": -F.logsigmoid(m).mean().item(),
            "accuracy": (m > 0).float().mean().item(),
            "margin": m.mean().item(),
        }

    records: list[dict] = []
    lengths = [max(len(c), len(r)) for c, r in zip(enc.chosen, enc.rejected, strict=True)]
    steps = group_by_length(plan_steps(len(enc.kept), rc, seed), lengths)
    model.fit_checkpointing("reward", longest_micro_batch(steps, lengths, rows_per_example=2), quiet=quiet)
    model.train(True)
    optimize(
        model.parameters("reward"),
        rc,
        steps,
        micro_loss,
        step_stats,
        name="reward",
        quiet=quiet,
        on_step=lambda rec: (records.append({"stage": "reward", **rec}), kill_point("reward:step")),
    )
    model.train(False)
    counts = {"train_pairs": len(enc.kept), "train_truncated": enc.n_truncated, "train_dropped": enc.n_dropped}
    return counts | {"steps": len(steps)}, records


def reward_stage(rd: RunDir, model: SharedModel, cfg: Config, pairs, eval_pairs, info: dict) -> dict:
    """Stage `reward`: train, evaluate on the held-out pairs, commit `reward/` (adapter, head,
    metrics.json) with the step lines; load it into the model. Returns metrics.json's figures."""
    path = rd.root / "reward"
    if not rd.done("reward"):
        start = time.time()
        counts, records = train_reward(model, cfg.reward, cfg.data, pairs, seed=cfg.run.seed, quiet=cfg.run.quiet)
        metrics = counts | {"train_seconds": round(time.time() - start, 1)}
        metrics |= evaluate_reward(model, cfg, eval_pairs) | info

        def fill(tmp):
            model.save_reward(tmp)
            write_json(tmp / "metrics.json", metrics)

        rd.commit("reward", {path: fill}, records + [{"stage": "reward_eval", **metrics}])
    model.load_reward(path)
    return read_json(path / "metrics.json")


def check_brought_oracle(cfg: Config) -> None:
    """`reward.adapter` is a directory of the kind the run asks for (before any model loads): reward/ (adapter and
    head.safetensors) for reward.kind=bt, preference/ (the adapter alone) for preference."""
    path = check_adapter(cfg.reward.adapter)
    has_head = (path / HEAD_FILE).is_file()
    if cfg.reward.kind == "bt" and not has_head:
        raise ModelNotFound(f"reward.adapter '{path}' has no {HEAD_FILE}: not a Bradley-Terry reward directory "
                            "(a preference/ one goes with reward.kind=preference)")  # fmt: skip
    if cfg.reward.kind == "preference" and has_head:
        raise ModelNotFound(f"reward.adapter '{path}' is a Bradley-Terry reward directory ({HEAD_FILE}): set "
                            "reward.kind=bt, or name a preference/ directory")  # fmt: skip


class WeakOracle(RuntimeError):
    """The trained oracle is no better than chance or than "the longer answer wins" on its held-out pairs."""


def check_oracle(figures: dict, cfg: Config, where: Path) -> None:
    """Stop a run whose oracle learned nothing (or diverged: a reward that ranks like a coin, or like length
    alone, only steers the policy astray), unless `reward.allow_weak`. A longer-answer baseline of 1 (every
    held-out chosen answer is the longer) cannot be beaten: only chance counts then."""
    acc, length = figures.get("eval_accuracy"), figures.get("length_baseline_accuracy")
    if acc is None or cfg.reward.allow_weak:
        return
    floor = max(0.5, length if length is not None and length < 1 else 0.0)
    if acc <= floor:
        base = "chance (0.5)" if floor == 0.5 else f"the longer-answer baseline ({length:.3f})"
        raise WeakOracle(f"the oracle's held-out accuracy {acc:.3f} is at or below {base} (see {where}/metrics.json): "
                         "train it with other reward settings in another run.out_dir, or set reward.allow_weak=true "
                         "to go on with it")  # fmt: skip


def train_oracle_command(cfg: Config, stage) -> tuple[dict, RunDir]:
    """`train-rm` / `train-pm`: the pairs, the run directory and its logger, then `stage` (reward_stage
    or preference_stage) on a fresh shared model. Returns metrics.json's figures and the run directory."""
    pairs, eval_pairs, info = reward_pairs(cfg.data, cfg.run.seed, cfg.reward.balance_length)
    rd = RunDir(cfg)
    close_logger = attach_logger(rd, cfg.run)
    m = stage(rd, SharedModel(cfg), cfg, pairs, eval_pairs, info)
    close_logger()
    return m, rd


def main_train_rm(cfg: Config) -> int:
    """`lite-rlhf train-rm`: train the reward model into <run.out_dir>/reward/."""
    m, rd = train_oracle_command(cfg, reward_stage)
    if not cfg.run.quiet:
        corr = "n/a" if m["length_correlation"] is None else f"{m['length_correlation']:+.2f}"
        print(
            f"reward: held-out accuracy {m['eval_accuracy']:.3f} on {m['eval_pairs']} pairs "
            f"(longer-answer baseline {m['length_baseline_accuracy']:.3f}), reward/length correlation {corr}, "
            f"{m['train_pairs']} train pairs ({m['train_truncated']} truncated, {m['train_dropped']} dropped, "
            f"{m['skipped_lines']} lines skipped) -> {rd.root / 'reward'}",
            flush=True,
        )
    return 0
