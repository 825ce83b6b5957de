"""DPO on the policy adapter: reference log-probs once per pair, then training through the fused kernels.

The reference π0 is the shared base with the policy adapter off (or the frozen sft adapter). Its
summed response log-probs are computed once, when a pair is made, and stored with the pair, so
training never runs the reference model. The policy loss goes from final hidden states to the DPO
loss through `lite_rlhf.kernels.fused_dpo_loss`, which never forms `[tokens, vocab]` logits.
DPO: Rafailov et al. 2023, https://arxiv.org/abs/2305.18290
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from lite_rlhf.config import Config
from lite_rlhf.data import encode
from lite_rlhf.pairs import Pair

IGNORE = -100


class NonFiniteLoss(RuntimeError):
    """The DPO loss became NaN or inf; the iteration stops and the last good policy is kept."""


def _batch(
    rows: list[tuple[list[int], list[int]]], pad_id: int, max_length: int, truncation: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt ids, response ids) rows -> input_ids, attention_mask, targets, right-padded.

    targets[b, t] is the token at t + 1 when it belongs to the response, else IGNORE: the hidden state
    at position t predicts token t + 1.
    """
    encoded = []
    for prompt, response in rows:
        enc = encode(prompt, response, max_length, truncation)
        if enc is None:  # only with truncation="drop"; pairs are filtered before they get here
            raise ValueError("a pair longer than data.max_length reached training with data.truncation=drop")
        encoded.append(enc)
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for b, (ids, n_prompt) in enumerate(encoded):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = 1
        targets[b, n_prompt - 1 : len(ids) - 1] = torch.tensor(ids[n_prompt:])
    return input_ids, mask, targets


def pair_batch(pairs: list[Pair], prompt_ids: dict[str, list[int]], pad_id: int, cfg: Config):
    """Chosen rows first, then rejected rows: `[2B, T]` tensors."""
    rows = [(prompt_ids[p.prompt_id], p.chosen_ids) for p in pairs]
    rows += [(prompt_ids[p.prompt_id], p.rejected_ids) for p in pairs]
    return _batch(rows, pad_id, cfg.data.max_length, cfg.data.truncation)


def fits(pair: Pair, prompt_ids: dict[str, list[int]], cfg: Config) -> bool:
    n = len(prompt_ids[pair.prompt_id])
    return (
        all(
            encode(prompt_ids[pair.prompt_id], r, cfg.data.max_length, cfg.data.truncation) is not None
            for r in (pair.chosen_ids, pair.rejected_ids)
        )
        and n < cfg.data.max_length
    )


@torch.no_grad()
def sequence_logps(model, input_ids, mask, targets) -> torch.Tensor:
    """Summed log-probs of the target tokens for the active role, `[B]` fp32, via the fused kernel."""
    from lite_rlhf.kernels import linear_logprobs

    hidden = model.hidden_states(input_ids.to(model.device), mask.to(model.device))
    logps = linear_logprobs(hidden, model.lm_head_weight, targets.to(model.device), ignore_index=IGNORE)
    return logps.sum(-1).float().cpu()


def add_reference_logps(model, pairs: list[Pair], prompt_ids: dict[str, list[int]], cfg: Config) -> list[Pair]:
    """π0's summed log-probs of each pair's chosen and rejected response, computed once."""
    out = []
    with model.role("reference"):
        for i in range(0, len(pairs), cfg.dpo.micro_batch):
            chunk = pairs[i : i + cfg.dpo.micro_batch]
            logps = sequence_logps(model, *pair_batch(chunk, prompt_ids, model.pad_id, cfg))
            b = len(chunk)
            for j, p in enumerate(chunk):
                out.append(
                    dataclasses.replace(p, ref_chosen_logp=float(logps[j]), ref_rejected_logp=float(logps[b + j]))
                )
    return out


def train_dpo(
    model,
    pairs: list[Pair],
    prompt_ids: dict[str, list[int]],
    cfg: Config,
    *,
    seed: int,
    log: Callable[[dict], None],
    progress: Callable | None = None,
) -> dict:
    """DPO epochs over `pairs` on the policy adapter (in place). Returns a summary of the last steps."""
    from transformers import get_cosine_schedule_with_warmup

    from lite_rlhf.kernels import fused_dpo_loss

    d = cfg.dpo
    micro_total = math.ceil(len(pairs) * d.epochs / d.micro_batch)
    steps_total = max(1, math.ceil(micro_total / d.grad_accum))
    params = [p for p in model.parameters("policy") if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=d.lr, weight_decay=d.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(d.warmup_ratio * steps_total), steps_total)
    gen = torch.Generator().manual_seed(seed)

    order: list[int] = []
    while len(order) < micro_total * d.micro_batch:
        order += torch.randperm(len(pairs), generator=gen).tolist()
    micro_batches = [order[i * d.micro_batch : (i + 1) * d.micro_batch] for i in range(micro_total)]
    # The last micro-batch may be partial when epochs is fractional: trim to the pairs asked for.
    want = math.ceil(len(pairs) * d.epochs)
    micro_batches = [mb[: max(0, want - i * d.micro_batch)] for i, mb in enumerate(micro_batches)]
    micro_batches = [mb for mb in micro_batches if mb]

    bar = progress(total=steps_total, desc="dpo") if progress else None
    acc, summary, step = _Accumulator(), {}, 0
    model.train()
    with model.role("policy"):
        for k in range(0, len(micro_batches), d.grad_accum):
            group = micro_batches[k : k + d.grad_accum]
            n_step = sum(len(mb) for mb in group)
            for mb in group:
                chunk = [pairs[i] for i in mb]
                input_ids, mask, targets = pair_batch(chunk, prompt_ids, model.pad_id, cfg)
                ref_c = torch.tensor([p.ref_chosen_logp for p in chunk], dtype=torch.float32, device=model.device)
                ref_r = torch.tensor([p.ref_rejected_logp for p in chunk], dtype=torch.float32, device=model.device)
                hidden = model.hidden_states(input_ids.to(model.device), mask.to(model.device))
                loss, chosen_r, rejected_r = fused_dpo_loss(
                    hidden,
                    model.lm_head_weight,
                    targets.to(model.device),
                    ref_c,
                    ref_r,
                    beta=d.beta,
                    loss_type=d.loss_type,
                    label_smoothing=d.label_smoothing,
                    ignore_index=IGNORE,
                )
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"DPO loss is {loss.item()} at step {step + 1}")
                (loss * len(chunk) / n_step).backward()
                acc.add(loss.item(), chosen_r, rejected_r)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, d.max_grad_norm if d.max_grad_norm > 0 else float("inf"))
            if not torch.isfinite(grad_norm):
                raise NonFiniteLoss(f"DPO gradient norm is {grad_norm.item()} at step {step + 1}")
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            summary = {"step": step, **acc.flush(), "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm)}
            log(summary)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{summary['loss']:.4f}", acc=f"{summary['reward_accuracy']:.2f}")
    model.eval()
    if bar:
        bar.close()
    return summary


class _Accumulator:
    """Means over the pairs of one optimizer step."""

    def __init__(self):
        self.losses, self.chosen, self.rejected = [], [], []

    def add(self, loss: float, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        self.losses.append((loss, len(chosen)))
        self.chosen += chosen.float().cpu().tolist()
        self.rejected += rejected.float().cpu().tolist()

    def flush(self) -> dict:
        n = sum(k for _, k in self.losses)
        out = {
            "loss": sum(v * k for v, k in self.losses) / n,
            "reward_accuracy": sum(c > r for c, r in zip(self.chosen, self.rejected, strict=True)) / n,
            "reward_margin": sum(c - r for c, r in zip(self.chosen, self.rejected, strict=True)) / n,
            "chosen_reward": sum(self.chosen) / n,
            "rejected_reward": sum(self.rejected) / n,
        }
        self.__init__()
        return out
