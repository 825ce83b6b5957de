"""Bradley-Terry reward model: a LoRA adapter plus a scalar head on the shared base (paper §2.1).

    L_RM(θ) = -E log σ(r_θ(x, a_w) - r_θ(x, a_l))        https://arxiv.org/abs/2405.07863, §2.1

r_θ(x, a) is the head applied to the reward role's final hidden state at the last token of
prompt + response, tokenized through `data.prompt_ids` / `data.response_ids` / `data.encode` like every
other stage. Paper defaults: 1 epoch, cosine schedule, 3% warm-up. Diagnostics, as in the paper:
held-out pair accuracy (beside the accuracy of "the longer answer wins", the baseline a length-biased
reward would reach) and the Pearson correlation between reward and response length in characters.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import Config, ConfigError, to_yaml
from .data import DataError, Messages, PreferencePair, encode, load_preferences, prompt_ids, response_ids
from .roles import SharedModel, write_atomic

MAX_GRAD_NORM = 1.0  # the usual clip (HF Trainer, TRL); RewardConfig does not expose it
EVAL_SPLIT = 0.1  # share of the training pairs held out when data.eval_preferences is not given


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


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids [B, T], attention_mask [B, T])`, right-padded."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


@torch.no_grad()
def score_ids(model: SharedModel, seqs: list[list[int]], batch_size: int) -> list[float]:
    """Rewards of token sequences (prompt + response), in input order; batches of similar length."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    scores = [0.0] * len(seqs)
    was_training = model.peft.training
    model.train(False)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad_right([seqs[i] for i in idx], model.tokenizer.pad_token_id)
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
    return score_ids(model, seqs, batch_size)


def _pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) < 2:
        return None
    c = torch.corrcoef(torch.tensor([x, y], dtype=torch.float64))[0, 1].item()
    return None if math.isnan(c) else c


def evaluate_reward(model: SharedModel, cfg: Config, pairs: list[PreferencePair]) -> dict:
    """Held-out accuracy, mean margin, length-only baseline, reward/length correlation."""
    if not pairs:
        return {"eval_pairs": 0, "eval_accuracy": None, "length_baseline_accuracy": None, "length_correlation": None}
    enc = encode_pairs(model.tokenizer, pairs, cfg.data.max_length, cfg.data.truncation)
    if not enc.kept:
        raise DataError(f"no held-out preference pair fits data.max_length={cfg.data.max_length}")
    n = len(enc.kept)
    scores = score_ids(model, enc.chosen + enc.rejected, cfg.reward.score_batch)
    margins = [c - r for c, r in zip(scores[:n], scores[n:], strict=True)]
    kept = [pairs[i] for i in enc.kept]
    # "The longer answer wins": a tie counts half, the expected accuracy of a coin flip.
    longer = [(len(p.chosen) > len(p.rejected)) + 0.5 * (len(p.chosen) == len(p.rejected)) for p in kept]
    lengths = [len(p.chosen) for p in kept] + [len(p.rejected) for p in kept]

    def accuracy_where(chosen_longer: bool) -> float | None:  # a length-biased reward fails one of the two
        ms = [m for m, p in zip(margins, kept, strict=True) if (len(p.chosen) > len(p.rejected)) == chosen_longer]
        return sum(m > 0 for m in ms) / len(ms) if ms else None

    return {
        "eval_pairs": n,
        "eval_accuracy": sum(m > 0 for m in margins) / n,
        "eval_accuracy_chosen_longer": accuracy_where(True),
        "eval_accuracy_chosen_not_longer": accuracy_where(False),
        "eval_loss": sum(-F.logsigmoid(torch.tensor(m)).item() for m in margins) / n,
        "eval_margin": sum(margins) / n,
        "length_baseline_accuracy": sum(longer) / n,
        "length_correlation": _pearson(scores, [float(x) for x in lengths]),
        "eval_truncated": enc.n_truncated,
        "eval_dropped": enc.n_dropped,
    }


def _append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def _write_text(path: Path, text: str) -> None:
    write_atomic(path.parent, {path.name: lambda tmp: tmp.write_text(text, encoding="utf-8")})


def train_reward(
    model: SharedModel,
    cfg: Config,
    pairs: list[PreferencePair],
    eval_pairs: list[PreferencePair],
    out_dir: Path,
    metrics_path: Path,
    info: dict | None = None,
) -> dict:
    """Train the reward adapter and head with the BT loss; save them and `metrics.json` in `out_dir`.

    One JSON line per optimizer step goes to `metrics_path`. `info` is merged into metrics.json.
    """
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    rc, start = cfg.reward, time.time()
    enc = encode_pairs(model.tokenizer, pairs, cfg.data.max_length, cfg.data.truncation)
    if not enc.kept:
        raise DataError(f"no preference pair fits data.max_length={cfg.data.max_length} (rule {cfg.data.truncation})")
    n = len(enc.kept)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(rc.epochs))])
    order = order[: max(1, round(rc.epochs * n))].tolist()
    per_step = rc.micro_batch * rc.grad_accum
    n_steps = math.ceil(len(order) / per_step)

    params = model.parameters("reward")
    opt = torch.optim.AdamW(params, lr=rc.lr, weight_decay=rc.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(rc.warmup_ratio * n_steps), n_steps)
    pad = model.tokenizer.pad_token_id
    model.train(True)
    bar = tqdm(total=n_steps, desc="reward", unit="step", disable=cfg.run.quiet)
    for step in range(n_steps):
        batch = order[step * per_step : (step + 1) * per_step]
        margins = []
        for mb in range(0, len(batch), rc.micro_batch):
            idx = batch[mb : mb + rc.micro_batch]
            ids, mask = pad_right([enc.chosen[i] for i in idx] + [enc.rejected[i] for i in idx], pad)
            r = model.score(ids, mask)  # [2b]: chosen then rejected
            margin = r[: len(idx)] - r[len(idx) :]
            (-F.logsigmoid(margin).sum() / len(batch)).backward()  # mean over the optimizer step's pairs
            margins.append(margin.detach())
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        m = torch.cat(margins).float()
        row = {
            "stage": "reward",
            "step": step + 1,
            "loss": -F.logsigmoid(m).mean().item(),
            "accuracy": (m > 0).float().mean().item(),
            "margin": m.mean().item(),
            "lr": lr,
        }
        _append_jsonl(metrics_path, row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}")
        bar.update()
    bar.close()
    model.train(False)
    train_seconds = time.time() - start

    metrics = {
        "train_pairs": n,
        "train_truncated": enc.n_truncated,
        "train_dropped": enc.n_dropped,
        "steps": n_steps,
        "train_seconds": round(train_seconds, 1),
        **evaluate_reward(model, cfg, eval_pairs),
        **(info or {}),
    }
    model.save_reward(out_dir)
    _write_text(Path(out_dir) / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    _append_jsonl(metrics_path, {"stage": "reward_eval", **metrics})
    return metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def main_train_rm(cfg: Config) -> int:
    """`lite-rlhf train-rm`: train the reward model into <run.out_dir>/reward/."""
    if cfg.data.preferences is None:
        raise ConfigError("config key 'data.preferences' is not set: give a JSONL of {prompt, chosen, rejected}")
    seed_everything(cfg.run.seed)
    pairs, skipped = load_preferences(cfg.data.preferences, cfg.data.skip_invalid)
    info = {"train_file": str(cfg.data.preferences), "skipped_lines": skipped}
    if cfg.data.eval_preferences is not None:
        eval_pairs, eval_skipped = load_preferences(cfg.data.eval_preferences, cfg.data.skip_invalid)
        info.update(eval_file=str(cfg.data.eval_preferences), eval_skipped_lines=eval_skipped)
    else:  # hold out a seeded share of the training pairs
        if len(pairs) < 2:
            raise DataError(f"{cfg.data.preferences}: one pair cannot be split; set data.eval_preferences")
        shuffled = random.Random(cfg.run.seed).sample(pairs, len(pairs))
        k = max(1, round(EVAL_SPLIT * len(pairs)))
        eval_pairs, pairs = shuffled[:k], shuffled[k:]
        info["eval_file"] = f"{EVAL_SPLIT:.0%} of the training file"

    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_text(run_dir / "config.yaml", to_yaml(cfg))
    model = SharedModel(cfg)
    m = train_reward(model, cfg, pairs, eval_pairs, run_dir / "reward", run_dir / "metrics.jsonl", info)
    if not cfg.run.quiet:
        corr = "n/a" if m["length_correlation"] is None else f"{m['length_correlation']:+.2f}"
        print(
            f"reward: held-out accuracy {m['eval_accuracy']:.3f} on {m['eval_pairs']} pairs "
            f"(longer-answer baseline {m['length_baseline_accuracy']:.3f}), reward/length correlation {corr}, "
            f"{m['train_pairs']} train pairs ({m['train_truncated']} truncated, {m['train_dropped']} dropped, "
            f"{skipped} lines skipped) -> {run_dir / 'reward'}",
            flush=True,
        )
    return 0


if __name__ == "__main__":  # pragma: no cover - until the CLI is wired: python -m lite_rlhf.reward [cfg] k=v ...
    import sys

    from .config import load_config

    args = sys.argv[1:]
    path = args.pop(0) if args and "=" not in args[0] else None
    raise SystemExit(main_train_rm(load_config(path, args)))
