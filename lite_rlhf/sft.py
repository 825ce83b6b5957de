"""Supervised fine-tuning of the policy adapter: `lite-rlhf sft` (π0, paper §3.1) and RAFT's step.

    L_SFT(θ) = -(1 / |trained tokens of the step|) Σ log π_θ(y_t | x, y_<t)

over the trained tokens only: the assistant turns of a conversation (`data.conversation_ids`, through
the one chat template), or the response of a (prompt, response) row. The log-probs go through the
fused LM-head kernel like DPO's, so the `[tokens, vocab]` logits are never built. The optimizer step
is the shared helper (`train.optimize`): cosine with warm-up, accumulation weighted by tokens,
clipping, one metrics record per step. With `packing`, the examples of each optimizer step are grouped
by length into micro-batches (`train.group_by_length`); within a micro-batch the model computes nothing on
padding where that pays (`SharedModel.hidden_states`: one packed row on CUDA with flash-attention, written
for GPUs and not run here; rows of similar length together on CPU): the same gradient up to rounding.

RAFT (Dong et al. 2023, https://arxiv.org/abs/2304.06767) is this trainer run on the best answer per
prompt (`select_winners`), from the previous policy, without a reference model.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from lite_rlhf.batching import Example, from_examples, truncate_example
from lite_rlhf.config import Config, ConfigError, DataConfig, RaftConfig, SFTConfig
from lite_rlhf.data import Conversation, DataError, conversation_ids, load_conversations
from lite_rlhf.loggers import attach_logger
from lite_rlhf.roles import SharedModel
from lite_rlhf.runstate import RunDir, kill_point, read_json, write_json
from lite_rlhf.task import data_fields, data_path
from lite_rlhf.train import group_by_length, longest_micro_batch, optimize, plan_steps


def sft_examples(tokenizer, conversations, d: DataConfig) -> tuple[list[Example], dict]:
    """Conversations -> examples within `data.max_length` (the start kept), and what was cut or dropped."""
    examples, counts = [], Counter(truncated=0, dropped=0)
    for conv in conversations:
        ids, trained = conversation_ids(tokenizer, conv)
        ex = truncate_example((ids, trained), d.max_length, d.truncation)
        if ex is None:
            counts["dropped"] += 1
            continue
        counts["truncated"] += len(ex[0]) < len(ids)
        examples.append(ex)
    return examples, dict(counts)


def train_sft(
    model,
    examples: list[Example],
    sec: SFTConfig | RaftConfig,
    *,
    seed: int,
    quiet: bool,
    on_step: Callable[[dict], None],
    name: str = "sft",
) -> int:
    """SFT of the policy adapter (in place) on `examples`; one record per optimizer step. Returns the
    number of steps."""
    if not examples:
        raise DataError("no SFT example fits data.max_length with a trained token left")
    n_trained = [sum(trained[1:]) for _, trained in examples]  # the first token is never a target
    losses: list[tuple[float, int]] = []

    def micro_loss(indices: list[int]) -> torch.Tensor:
        chosen = [examples[i] for i in indices]
        batch = from_examples(chosen, model.pad_id)
        logps, n_tokens = model.sequence_logps(batch)
        losses.append((-logps.sum().item(), int(n_tokens.sum())))
        return -logps.sum()  # the micro-batch's summed NLL; the helper divides by the step's trained tokens

    def step_stats() -> dict:
        nll, tokens = sum(v for v, _ in losses), sum(k for _, k in losses)
        losses.clear()
        return {"loss": nll / tokens, "tokens": tokens}

    lengths = [len(ids) for ids, _ in examples]
    steps = plan_steps(len(examples), sec, seed)
    if sec.packing:
        steps = group_by_length(steps, lengths)
    model.fit_checkpointing(name, longest_micro_batch(steps, lengths), quiet=quiet)
    model.train()
    with model.role("policy"):
        optimize(
            model.parameters("policy"), sec, steps, micro_loss, step_stats, name=name, quiet=quiet, on_step=on_step,
            weight=lambda mb: sum(n_trained[i] for i in mb),
        )  # fmt: skip
    model.eval()
    return len(steps)


def sft_stage(rd: RunDir, model: SharedModel, cfg: Config, conversations: list[Conversation], skipped: int) -> Path:
    """Stage `sft`: train the policy adapter on the conversations of `data.sft`, commit `sft/` (peft
    adapter + metrics.json) with the step lines, and make it π0 (`model.sft_adapter` semantics)."""
    path = rd.root / "sft"
    if not rd.done("sft"):
        examples, counts = sft_examples(model.tokenizer, conversations, cfg.data)
        start, records = time.time(), []
        n_steps = train_sft(
            model, examples, cfg.sft, seed=cfg.run.seed, quiet=cfg.run.quiet,
            on_step=lambda rec: (records.append({"stage": "sft", **rec}), kill_point("sft:step")),
        )  # fmt: skip
        metrics = {
            "train_file": str(data_path(cfg.data, "sft")),
            "train_examples": len(examples),
            "train_tokens": sum(sum(tr[1:]) for _, tr in examples),
            "train_truncated": counts["truncated"],
            "train_dropped": counts["dropped"],
            "skipped_lines": skipped,
            "steps": n_steps,
            "final_loss": records[-1]["loss"],
            "train_seconds": round(time.time() - start, 1),
        }

        def fill(tmp):
            model.save_adapter("policy", tmp)
            write_json(tmp / "metrics.json", metrics)

        rd.commit("sft", {path: fill}, records + [{"stage": "sft_done", **metrics}])
    model.use_sft(path)
    return path


def main_sft(cfg: Config) -> int:
    """`lite-rlhf sft`: train a LoRA adapter on conversations into <run.out_dir>/sft/."""
    if not cfg.data.sft:
        raise ConfigError("config key 'data.sft' is not set: give a JSONL of {messages} or {prompt, completion}")
    d = cfg.data
    conversations, skipped = load_conversations(data_path(d, "sft"), d.skip_invalid, data_fields(d))  # before the model
    rd = RunDir(cfg)
    close_logger = attach_logger(rd, cfg.run)
    path = sft_stage(rd, SharedModel(cfg), cfg, conversations, skipped)
    close_logger()
    m = read_json(path / "metrics.json")
    if not cfg.run.quiet:
        print(
            f"sft: {m['train_examples']} conversations ({m['train_tokens']} trained tokens, {m['train_truncated']} "
            f"truncated, {m['train_dropped']} dropped, {m['skipped_lines']} lines skipped), {m['steps']} steps, "
            f"final loss {m['final_loss']:.3f} -> {path}",
            flush=True,
        )
    return 0
