"""Pairwise preference model: a LoRA adapter on the shared base that says which of two answers is better
(paper section 2.1, the second preference oracle).

The model reads `preference.template` as the user turn of the model's chat template (the paper's
`[CONTEXT] {x} [RESPONSE A] {a1} [RESPONSE B] {a2}` by default) and answers with one label token:

    P(a ≻ b | x) = softmax(logit(label_a), logit(label_b))[0]

read at the position after the assistant header from two rows of the LM head (the full vocabulary is
never computed). Training: cross-entropy restricted to the two label tokens, the answers' order drawn
per pair from the run seed (against position bias), 1 epoch, cosine, 3% warm-up. In the loop P(a ≻ b)
is the mean of both orders, so P(a ≻ b) = 1 - P(b ≻ a) and an answer against itself is exactly 1/2.

Truncation to `data.max_length`: the template's own tokens stay; the two answers share what is left
(at least half of it) equally (one shorter than its share keeps all, the other gets the rest), each
keeping its start; the context keeps its end. Answers are compared as text.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lite_rlhf import dist
from lite_rlhf.batching import pad
from lite_rlhf.config import Config, ConfigError, PreferenceConfig
from lite_rlhf.data import DataError, Messages, PreferencePair
from lite_rlhf.families import logit_transform
from lite_rlhf.ranking import win
from lite_rlhf.reward import length_figures, train_oracle_command
from lite_rlhf.roles import SharedModel, label_logits, last_token
from lite_rlhf.runstate import RunDir, kill_point, read_json, write_json
from lite_rlhf.train import group_by_length, longest_micro_batch, optimize, plan_steps

FIELDS = ("context", "a", "b")


@dataclass(frozen=True)
class Format:
    """The template under a tokenizer's chat template: literal token runs around the three fields."""

    segments: tuple[list[int], ...]  # 4 runs: before the first field, between fields, after the last
    order: tuple[str, ...]  # the fields in template order, e.g. ("context", "a", "b")
    labels: list[int]  # token ids of label_a and label_b
    lead: dict[str, str]  # whitespace that ends the run before a field, tokenized with the field's text

    def field_ids(self, tokenizer, name: str, text: str) -> list[int]:
        return _text_ids(tokenizer, self.lead[name] + text)


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def make_format(tokenizer, pc: PreferenceConfig) -> Format:
    """Check the labels (one token each) and split the rendered template at its fields."""
    labels = []
    for key in ("label_a", "label_b"):
        ids = _text_ids(tokenizer, getattr(pc, key))
        if len(ids) != 1:
            raise ConfigError(f"config key 'preference.{key}': {getattr(pc, key)!r} is {len(ids)} tokens of "
                              f"the tokenizer; give a label that is exactly one token")  # fmt: skip
        labels += ids
    user = pc.template
    for name in FIELDS:
        user = user.replace("{" + name + "}", f"\ue000{name}\ue000")
    turn = [{"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    parts = re.split("\ue000(context|a|b)\ue000", text)
    if len(parts) != 7:
        raise ConfigError("config key 'preference.template': the chat template does not render its fields")
    runs, order = parts[0::2], tuple(parts[1::2])
    # "[CONTEXT] " + "x": the space joins the field's first word, as in one tokenization of the whole text
    lead = {name: run[len(run.rstrip(" ")) :] for name, run in zip(order, runs, strict=False)}
    runs = [run.rstrip(" ") for run in runs[:3]] + runs[3:]
    return Format(tuple(_text_ids(tokenizer, r) for r in runs), order, labels, lead)


def check_format(cfg: Config) -> Format:
    """The template and labels against the judge's tokenizer, before any model loads."""
    from lite_rlhf.models import load_tokenizer, resolve_model

    return make_format(load_tokenizer(resolve_model(cfg.reward.preference_model or cfg.model.name)), cfg.preference)


def context_text(messages: Messages) -> str:
    """The conversation so far as the template's {context}: a single user turn as it is, else one
    `role: content` line per message."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def encode_comparison(
    fmt: Format, field_ids, context: Messages, a: str, b: str, max_length: int, truncation: str = "keep_ends"
) -> tuple[list[int], bool] | None:
    """`comparison_ids` of a conversation and two answers given as text; `field_ids(name, text)` tokenizes
    a field (`Format.field_ids` with the tokenizer, or a cache of it)."""
    fields = field_ids("context", context_text(context)), field_ids("a", a), field_ids("b", b)
    return comparison_ids(fmt, *fields, max_length, truncation)


def comparison_ids(
    fmt: Format, context: list[int], a: list[int], b: list[int], max_length: int, truncation: str = "keep_ends"
) -> tuple[list[int], bool] | None:
    """The comparison's token ids within `max_length` (module docstring), and whether anything was cut;
    None when rule `drop` meets a comparison too long, or when the template alone is too long."""
    budget = max_length - sum(len(s) for s in fmt.segments)
    cut = len(context) + len(a) + len(b) > budget
    if cut:
        if truncation == "drop" or budget < 3:
            return None
        answers = min(len(a) + len(b), max(budget // 2, budget - len(context)))  # for the two answers
        half = answers // 2
        if len(a) <= half:
            ka, kb = len(a), answers - len(a)
        elif len(b) <= half:
            ka, kb = answers - len(b), len(b)
        else:
            ka = kb = half
        keep_context = min(len(context), budget - ka - kb)
        a, b = a[:ka], b[:kb]
        context = context[len(context) - keep_context :] if keep_context > 0 else []
    fields = {"context": context, "a": a, "b": b}
    ids = list(fmt.segments[0])
    for name, segment in zip(fmt.order, fmt.segments[1:], strict=True):
        ids += fields[name] + segment
    return ids, cut


class Judge:
    """P(a ≻ b) from a pairwise model, batched by length: `logits(ids, mask)` gives the two label logits."""

    def __init__(self, tokenizer, fmt: Format, logits, max_length: int, batch_size: int, quiet: bool = False):
        self.tokenizer, self.fmt, self.logits = tokenizer, fmt, logits
        self.max_length, self.batch_size, self.quiet = max_length, batch_size, quiet
        self.forwards = 0  # ordered comparisons run through the model
        self.truncated = 0  # of which cut to max_length
        self._ids: dict[tuple[str, str], list[int]] = {}  # a tournament meets each answer n - 1 times

    def _field_ids(self, name: str, text: str) -> list[int]:
        if (name, text) not in self._ids:
            self._ids[name, text] = self.fmt.field_ids(self.tokenizer, name, text)
        return self._ids[name, text]

    def encode(self, context: Messages, a: str, b: str) -> list[int]:
        enc = encode_comparison(self.fmt, self._field_ids, context, a, b, self.max_length)
        if enc is None:
            raise DataError(f"data.max_length={self.max_length} leaves no room beside the preference template")
        self.truncated += enc[1]
        return enc[0]

    @torch.no_grad()
    def first_probs(self, items: list[tuple[Messages, str, str]]) -> list[float]:
        """P(label_a) for each (context, a, b) in the order given (under torchrun each rank runs its share)."""
        seqs = [self.encode(*item) for item in items]  # on every rank: the counts stay the whole call's
        self.forwards += len(seqs)
        return dist.map_sharded(seqs, self._first_probs)

    def _first_probs(self, seqs: list[list[int]]) -> list[float]:
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out = [0.0] * len(seqs)
        for start in tqdm(range(0, len(order), self.batch_size), desc="comparing", unit="batch", leave=False,
                          disable=self.quiet):  # fmt: skip
            idx = order[start : start + self.batch_size]
            ids, mask = pad([seqs[i] for i in idx], self.tokenizer.pad_token_id)
            probs = self.logits(ids, mask).softmax(-1)[:, 0].tolist()
            for i, p in zip(idx, probs, strict=True):
                out[i] = p
        return out

    def probs(self, items: list[tuple[Messages, str, str]]) -> list[float]:
        """P(a ≻ b), the mean of both orders; exactly 1/2 for an answer against itself (no forward)."""
        todo = [i for i, (_, a, b) in enumerate(items) if a != b]
        both = self.first_probs([items[i] for i in todo] + [(c, b, a) for c, a, b in (items[i] for i in todo)])
        out = [0.5] * len(items)
        for k, i in enumerate(todo):
            out[i] = 0.5 * (both[k] + 1.0 - both[len(todo) + k])
        return out


def model_judge(model: SharedModel, cfg: Config) -> Judge:
    """The judge on our preference adapter (in eval mode while it judges)."""
    fmt = make_format(model.tokenizer, cfg.preference)

    def logits(ids, mask):
        was_training = model.peft.training
        model.train(False)
        try:
            return model.label_logits(ids, mask, fmt.labels)
        finally:
            model.train(was_training)

    return Judge(model.tokenizer, fmt, logits, cfg.data.max_length, cfg.reward.score_batch, cfg.run.quiet)


class SeparatePreferenceModel:
    """`reward.preference_model`: a causal LM trained elsewhere to answer label_a or label_b to the template,
    loaded beside the base with its own tokenizer and chat template (its own weights in memory)."""

    def __init__(self, name: str, *, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        from lite_rlhf.models import load_tokenizer, resolve_model

        path = resolve_model(name)
        self.tokenizer = load_tokenizer(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device)
        self.model.eval()
        self.device = device

    @property
    def separate_model_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def judge(self, cfg: Config) -> Judge:
        fmt = make_format(self.tokenizer, cfg.preference)

        def logits(ids, mask):
            mask = mask.to(self.device)
            hidden = self.model.get_decoder()(input_ids=ids.to(self.device), attention_mask=mask).last_hidden_state
            weight = self.model.get_output_embeddings().weight
            return label_logits(last_token(hidden, mask), weight, fmt.labels, logit_transform(self.model.config))

        return Judge(self.tokenizer, fmt, logits, cfg.data.max_length, cfg.reward.score_batch, cfg.run.quiet)


# --------------------------------------------------------------------------- training and evaluation


def train_preference(
    model: SharedModel, cfg: Config, pairs: list[PreferencePair], *, quiet: bool
) -> tuple[dict, list[dict]]:
    """Train the preference adapter (in place; added if missing). Returns the training counts and one
    record per optimizer step."""
    pc, d, seed = cfg.preference, cfg.data, cfg.run.seed
    model.add_preference(seed)
    tok, fmt = model.tokenizer, make_format(model.tokenizer, pc)
    rng = random.Random(seed)
    rows, targets, truncated, dropped = [], [], 0, 0
    for pair in pairs:
        swap = rng.random() < 0.5  # drawn for every pair, so a dropped pair does not shift the others
        a, b = (pair.rejected, pair.chosen) if swap else (pair.chosen, pair.rejected)
        enc = encode_comparison(fmt, partial(fmt.field_ids, tok), pair.prompt, a, b, d.max_length, d.truncation)
        if enc is None:
            dropped += 1
            continue
        rows.append(enc[0])
        targets.append(int(swap))  # 0: label_a (chosen is A), 1: label_b
        truncated += enc[1]
    if not rows:
        raise DataError(f"no preference pair fits data.max_length={d.max_length} (rule {d.truncation})")
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []

    def micro_loss(idx: list[int]) -> torch.Tensor:
        ids, mask = pad([rows[i] for i in idx], tok.pad_token_id)
        logits = model.label_logits(ids, mask, fmt.labels)
        target = torch.tensor([targets[i] for i in idx], device=logits.device)
        stats.append((logits.detach(), target))
        return F.cross_entropy(logits, target, reduction="sum")

    def step_stats() -> dict:
        logits, target = torch.cat([s[0] for s in stats]), torch.cat([s[1] for s in stats])
        stats.clear()
        return {
            "loss": F.cross_entropy(logits, target).item(),
            "accuracy": (logits.argmax(-1) == target).float().mean().item(),
        }

    records: list[dict] = []
    lengths = [len(r) for r in rows]
    steps = group_by_length(plan_steps(len(rows), pc, seed), lengths)
    model.fit_checkpointing("preference", longest_micro_batch(steps, lengths), quiet=quiet)
    model.train(True)

    def on_step(record: dict) -> None:
        records.append({"stage": "preference", **record})
        kill_point("preference:step")

    optimize(model.parameters("preference"), pc, steps, micro_loss, step_stats, name="preference", quiet=quiet,
             on_step=on_step)  # fmt: skip
    model.train(False)
    counts = {"train_pairs": len(rows), "train_truncated": truncated, "train_dropped": dropped}
    return counts | {"train_first_is_chosen": targets.count(0) / len(targets), "steps": len(steps)}, records


def evaluate_preference(judge: Judge, pairs: list[PreferencePair]) -> dict:
    """Held-out figures: accuracy of P(chosen ≻ rejected) > 1/2 (both orders averaged), position
    consistency (the same verdict in both orders), the accuracy of one order alone, the share of
    verdicts for the first position (1/2 without position bias), and the length-only baseline."""
    if not pairs:
        return {"eval_pairs": 0, "eval_accuracy": None, "position_consistency": None}
    n, before = len(pairs), judge.truncated
    p_cr = judge.first_probs([(p.prompt, p.chosen, p.rejected) for p in pairs])  # P(A) with A = chosen
    p_rc = judge.first_probs([(p.prompt, p.rejected, p.chosen) for p in pairs])  # P(A) with A = rejected
    right = [win(0.5 * (x + 1.0 - y)) for x, y in zip(p_cr, p_rc, strict=True)]  # both orders averaged
    figures = length_figures(pairs, right)
    nll = [-math.log(max(p, 1e-12)) for p in p_cr + [1.0 - y for y in p_rc]]  # the label's probability
    return {
        "eval_pairs": n,
        "eval_accuracy": sum(right) / n,
        "position_consistency": sum((x > 0.5) == (y < 0.5) for x, y in zip(p_cr, p_rc, strict=True)) / n,
        "eval_accuracy_one_order": (sum(map(win, p_cr)) + sum(win(1.0 - y) for y in p_rc)) / (2 * n),
        "first_position_rate": (sum(x > 0.5 for x in p_cr) + sum(y > 0.5 for y in p_rc)) / (2 * n),
        "eval_accuracy_chosen_longer": figures["eval_accuracy_chosen_longer"],
        "eval_accuracy_chosen_longer_pairs": sum(len(p.chosen) > len(p.rejected) for p in pairs),
        "eval_accuracy_chosen_not_longer": figures["eval_accuracy_chosen_not_longer"],
        "eval_loss": sum(nll) / (2 * n),
        "length_baseline_accuracy": figures["length_baseline_accuracy"],
        "eval_truncated": judge.truncated - before,
    }


def preference_stage(rd: RunDir, model: SharedModel, cfg: Config, pairs, eval_pairs, info: dict) -> dict:
    """Stage `preference`: train, evaluate on the held-out pairs, commit `preference/` (adapter,
    metrics.json) with the step lines; load it into the model. Returns metrics.json's figures."""
    path = rd.root / "preference"
    model.add_preference(cfg.run.seed)
    if not rd.done("preference"):
        start = time.time()
        counts, records = train_preference(model, cfg, pairs, quiet=cfg.run.quiet)
        metrics = counts | {"train_seconds": round(time.time() - start, 1)}
        metrics |= evaluate_preference(model_judge(model, cfg), eval_pairs) | info

        def fill(tmp):
            model.save_adapter("preference", tmp)
            write_json(tmp / "metrics.json", metrics)

        rd.commit("preference", {path: fill}, records + [{"stage": "preference_eval", **metrics}])
    model.load_adapter("preference", path)
    return read_json(path / "metrics.json")


def main_train_pm(cfg: Config) -> int:
    """`lite-rlhf train-pm`: train the preference model into <run.out_dir>/preference/."""
    check_format(cfg)
    m, rd = train_oracle_command(cfg, preference_stage)
    if not cfg.run.quiet:
        acc = "n/a" if m["eval_accuracy"] is None else f"{m['eval_accuracy']:.3f}"
        cons = "n/a" if m["position_consistency"] is None else f"{m['position_consistency']:.3f}"
        print(
            f"preference: held-out accuracy {acc} on {m['eval_pairs']} pairs (longer-answer baseline "
            f"{m.get('length_baseline_accuracy') or float('nan'):.3f}), position consistency {cons}, "
            f"{m['train_pairs']} train pairs ({m['train_truncated']} truncated, {m['train_dropped']} dropped, "
            f"{m['skipped_lines']} lines skipped) -> {rd.root / 'preference'}",
            flush=True,
        )
    return 0
