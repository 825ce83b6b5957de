"""The task a run learns and is judged on: the prompt splits, the offline and reward-model pairs, the
alignment-tax panel, and (for the demo) the gold checker that plays the paper's human annotators.

`data.prompts: demo` means the shipped demo files (`lite_rlhf/demo/*.jsonl`) for every data key left
unset. Prompt ids are the run's keys for samples, pairs and evaluation answers, so they are checked
here once: unique within a file (`data.load_prompts`), never shared by two splits, never equal to the
loop's own ids (`offline:<n>` for offline pairs, `<id>-plain` for the tax panel). A prompt text that
is both a training and a held-out prompt is reported as a warning with its count.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lite_rlhf.config import ConfigError, DataConfig
from lite_rlhf.data import FIELDS, DataError, PreferencePair, Prompt, load_preferences, load_prompts
from lite_rlhf.demo.task import GOLD
from lite_rlhf.evaluate import EvalSets, Gold

DEMO_FILES = {
    "prompts": "prompts.jsonl",
    "val_prompts": "val_prompts.jsonl",
    "test_prompts": "test_prompts.jsonl",
    "preferences": "preferences_train.jsonl",
    "eval_preferences": "preferences_eval.jsonl",
}
DEMO_SFT = "sft.jsonl"  # data.sft=demo: π0's gold-passing answers on the reward-model prompts (opt-in)


def demo_file(name: str) -> Path:
    return Path(str(resources.files("lite_rlhf.demo") / name))


def data_path(d: DataConfig, key: str) -> Path | None:
    """The file behind `data.<key>`: the user's, or the demo's when `data.prompts` is `demo`."""
    value = getattr(d, key)
    if key in ("prompts", "sft") and value == "demo":
        return demo_file(DEMO_SFT if key == "sft" else DEMO_FILES[key])
    if value is None and d.prompts == "demo" and key in DEMO_FILES:
        return demo_file(DEMO_FILES[key])
    return Path(value) if value is not None else None


def data_fields(d: DataConfig) -> dict[str, str]:
    """Our field name -> the sources' column name (data.prompt_field, ...)."""
    return {key: getattr(d, f"{key}_field") for key in FIELDS}


@dataclass(frozen=True)
class Task:
    prompts: list[Prompt]  # the loop's prompt set, sliced over the iterations
    val: list[Prompt]  # choose the best iteration
    test: list[Prompt]  # the reported figures
    tax: list[Prompt]  # test topics without their instruction (alignment tax); may be empty
    offline_pairs: list[PreferencePair]  # the paper's hybrid setting: they join every iteration
    gold: Gold | None = None  # the demo's gold checker; the loop never ranks with it
    warnings: list[str] = field(default_factory=list)

    @property
    def eval_sets(self) -> EvalSets:
        return EvalSets(self.val, self.test, self.tax)

    @property
    def all_prompts(self) -> list[Prompt]:
        return self.prompts + self.val + self.test + self.tax

    def slice(self, t: int, iterations: int, per_iteration: int) -> list[Prompt]:
        """Iteration t's prompts: `per_iteration` of them, or (0) the set split over the iterations as evenly
        as it divides, every prompt used."""
        if per_iteration:
            return self.prompts[(t - 1) * per_iteration : t * per_iteration]
        n = len(self.prompts)
        return self.prompts[(t - 1) * n // iterations : t * n // iterations]

    def check_slices(self, iterations: int, per_iteration: int) -> str | None:
        """An error when an iteration would get no prompt; a warning when prompts go unused."""
        n, asked = len(self.prompts), per_iteration * iterations
        if n < iterations or (per_iteration and (iterations - 1) * per_iteration >= n):
            raise ConfigError(f"data.prompts holds {n} prompt(s): too few for loop.iterations={iterations}"
                              + (f" of loop.prompts_per_iteration={per_iteration}" if per_iteration else "")
                              + "; every iteration needs at least one")  # fmt: skip
        if per_iteration and asked < n:
            return f"loop.prompts_per_iteration={per_iteration} over {iterations} iteration(s) uses {asked} of the " \
                   f"{n} prompts in data.prompts"  # fmt: skip
        return None

    @staticmethod
    def offline_id(i: int) -> str:
        return f"offline:{i}"


def load_task(d: DataConfig, answers: bool = False) -> Task:
    """Read and check every prompt file of a run (before any model loads). `answers`: each training prompt must
    carry its data answer (pairs.source=spin)."""
    split_of = {"prompts": "prompts", "val_prompts": "val", "test_prompts": "test"}
    loaded: dict[str, list[Prompt]] = {}
    for key, split in split_of.items():
        path = data_path(d, key)
        if path is None:
            raise ConfigError(f"config key 'data.{key}' is not set (held-out prompts for evaluation are needed)")
        loaded[key] = load_prompts(path, d.skip_invalid, split, data_fields(d), answers and key == "prompts")[0]
    test = loaded["test_prompts"]
    # The alignment-tax panel: test prompts that carry an instruction-free version ("plain").
    plain: dict[str, Prompt] = {}  # one per distinct instruction-free text (the demo asks each topic three ways)
    for p in test:
        if "plain" in p.meta and p.meta["plain"] not in plain:
            plain[p.meta["plain"]] = Prompt(f"{p.id}-plain", [{"role": "user", "content": p.meta["plain"]}], p.meta)
    offline = load_preferences(d.offline_pairs, d.skip_invalid, data_fields(d))[0] if d.offline_pairs else []

    splits = {f"data.{k}": v for k, v in loaded.items()} | {"the alignment-tax panel": list(plain.values())}
    splits["data.offline_pairs"] = [Prompt(Task.offline_id(i), op.prompt) for i, op in enumerate(offline)]
    _check_ids(splits, d)
    gold = GOLD if any(GOLD.applies(p.meta) for p in test) else None
    warnings = _contamination(loaded["prompts"] + splits["data.offline_pairs"], loaded["val_prompts"] + test)
    return Task(loaded["prompts"], loaded["val_prompts"], test, list(plain.values()), offline, gold, warnings)


def _check_ids(splits: dict[str, list[Prompt]], d: DataConfig) -> None:
    owner: dict[str, str] = {}
    for where, prompts in splits.items():
        for p in prompts:
            if p.id in owner and owner[p.id] != where:
                files = " and ".join(_where(w, d) for w in (owner[p.id], where))
                raise DataError(f"prompt id '{p.id}' is used in {files}; ids must be unique across the run's files")
            owner[p.id] = where


def _where(split: str, d: DataConfig) -> str:
    key = split.removeprefix("data.")
    path = data_path(d, key) if key in DEMO_FILES or key == "offline_pairs" else None
    return f"{split} ({path})" if path is not None else split


def _contamination(train: list[Prompt], held_out: list[Prompt]) -> list[str]:
    key = lambda p: json.dumps(p.messages, sort_keys=True)
    held = {key(p) for p in held_out}
    shared = {key(p) for p in train} & held
    if not shared:
        return []
    return [f"{len(shared)} prompt text(s) appear both in training (data.prompts / data.offline_pairs) and in "
            "the held-out prompts (data.val_prompts / data.test_prompts): the evaluation is contaminated"]  # fmt: skip


EVAL_SPLIT = 0.1  # share of the reward model's training pairs held out when data.eval_preferences is unset


def balance_by_length(pairs: list[PreferencePair], seed: int) -> list[PreferencePair]:
    """As many pairs whose chosen answer is the longer (in characters) as pairs whose chosen is the shorter:
    a seeded subsample of the larger side, the rest (equal lengths) kept, the order of `pairs` kept. Trained
    on these, a reward model cannot win by preferring one length."""
    longer = [i for i, p in enumerate(pairs) if len(p.chosen) > len(p.rejected)]
    shorter = [i for i, p in enumerate(pairs) if len(p.chosen) < len(p.rejected)]
    small, large = sorted((longer, shorter), key=len)
    dropped = set(large) - set(random.Random(seed).sample(large, len(small)))
    return [p for i, p in enumerate(pairs) if i not in dropped]


def reward_pairs(
    d: DataConfig, seed: int, balance: bool = False
) -> tuple[list[PreferencePair], list[PreferencePair], dict]:
    """The reward model's training and held-out pairs (the demo's when `data.prompts` is `demo`), and
    what metrics.json says of them. Without held-out pairs a seeded share of the training pairs is held out.
    `balance`: the training pairs balanced by length (`balance_by_length`; reward.balance_length)."""
    train_path, eval_path = data_path(d, "preferences"), data_path(d, "eval_preferences")
    if train_path is None:
        raise ConfigError("config key 'data.preferences' is not set: give a JSONL of {prompt, chosen, rejected} "
                          "to train the reward model, or set reward.adapter")  # fmt: skip
    pairs, skipped = load_preferences(train_path, d.skip_invalid, data_fields(d))
    info = {"train_file": str(train_path), "skipped_lines": skipped}
    if eval_path is not None:
        eval_pairs, eval_skipped = load_preferences(eval_path, d.skip_invalid, data_fields(d))
        info |= {"eval_file": str(eval_path), "eval_skipped_lines": eval_skipped}
    else:
        if len(pairs) < 2:
            raise DataError(f"{train_path}: one pair cannot be split; set data.eval_preferences")
        shuffled = random.Random(seed).sample(pairs, len(pairs))
        k = max(1, round(EVAL_SPLIT * len(pairs)))
        pairs, eval_pairs = shuffled[k:], shuffled[:k]
        info |= {"eval_file": f"{EVAL_SPLIT:.0%} of the training file"}
    if balance:
        kept = balance_by_length(pairs, seed)
        info |= {"balanced_by_length": f"{len(kept)} of {len(pairs)} training pairs"}
        pairs = kept
    return pairs, eval_pairs, info
