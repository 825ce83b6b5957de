"""Reward functions: plain Python callables with TRL's signature, so that one written for TRL works unchanged.

    def my_reward(prompts, completions, **kwargs) -> list[float | None]

`prompts` and `completions` hold one entry per sample: strings, or message lists when the prompt was given as a
conversation (`[{"role": "assistant", "content": ...}]` for a completion, as TRL passes them). Every other field
of the prompt's data row comes as a keyword argument, a list aligned with the samples (a math set's `answer`,
the demo's `constraint`), and `completion_ids` holds the answers' token ids. `None` means "no score for this
sample": it adds nothing to the combined reward, and a sample that no term scores is left out of the ranking.

`reward.functions` names them as `module:function` or `path/to/file.py:function` (loading a file runs its
code, as importing a module does), `reward.weights` weighs them (1 each by default); the learned oracle, when
there is one (`reward.kind` bt), is one more term with weight `reward.oracle_weight`. `eval.functions` are
scored on the held-out answers and reported, never trained on.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lite_rlhf.config import ConfigError


class RewardFunctionError(ValueError):
    """A reward function raised, or returned what is not one score (or None) per sample: one line."""


@dataclass(frozen=True)
class RewardFunction:
    spec: str  # as the config wrote it
    fn: Callable
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.spec.rsplit(":", 1)[1]


def load_function(spec: str, key: str) -> Callable:
    """`module:function` or `path/to/file.py:function` -> the callable; ConfigError naming `key` otherwise."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ConfigError(f"config key '{key}': '{spec}' is not module:function or path/to/file.py:function")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser()
            if not path.is_file():
                raise ConfigError(f"config key '{key}': '{path}' does not exist")
            unique = f"lite_rlhf_user_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[unique] = module  # dataclasses and pickling inside the user's file look it up
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as err:  # the user's module failed to import: its own error, in one line
        raise ConfigError(
            f"config key '{key}': loading '{where}' failed: {type(err).__name__}: {_first_line(err)}"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"config key '{key}': '{where}' has no function '{name}'")
    return fn


def load_functions(specs: Sequence[str], weights: Sequence[float], key: str) -> list[RewardFunction]:
    weights = list(weights) or [1.0] * len(specs)
    return [RewardFunction(s, load_function(s, key), w) for s, w in zip(specs, weights, strict=True)]


def call(f: RewardFunction, prompts: list, texts: list[str], token_ids: list[list[int]]) -> list[float | None]:
    """One function on the samples of `prompts` (each a `data.Prompt`, one per sample); its scores checked."""
    where = f"reward function '{f.spec}'"
    try:
        out = f.fn(**_arguments(f.fn, prompts, texts, token_ids))
    except Exception as err:
        culprit = _culprit(f.fn, prompts, texts, token_ids)
        raise RewardFunctionError(
            f"{where} raised {type(err).__name__}: {_first_line(err)} ({culprit}; nothing committed was lost)"
        ) from None
    try:
        out = list(out)
    except TypeError:
        raise RewardFunctionError(f"{where} returned {type(out).__name__}, not a list of scores") from None
    if len(out) != len(texts):
        raise RewardFunctionError(f"{where} returned {len(out)} score(s) for {len(texts)} completion(s)")
    for value, p in zip(out, prompts, strict=True):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
            raise RewardFunctionError(f"{where} returned {type(value).__name__} {value!r:.40} for prompt '{p.id}', "
                                      "not a number or None")  # fmt: skip
        if not math.isfinite(float(value)):
            raise RewardFunctionError(f"{where} returned {float(value)} for prompt '{p.id}' (None means no score)")
    return [None if v is None else float(v) for v in out]


def _arguments(fn: Callable, prompts: list, texts: list[str], token_ids: list[list[int]]) -> dict:
    """TRL's arguments: prompts and completions (strings, or messages for conversations), completion_ids, and
    every other column of the prompts' rows; all of them when `fn` takes **kwargs, else the ones it names."""
    chat = [p.chat for p in prompts]
    args = {
        "prompts": [p.messages if c else p.text for p, c in zip(prompts, chat, strict=True)],
        "completions": [[{"role": "assistant", "content": t}] if c else t for t, c in zip(texts, chat, strict=True)],
        "completion_ids": [list(ids) for ids in token_ids],
    }
    for column in sorted({k for p in prompts for k in p.meta} - set(args)):
        args[column] = [p.meta.get(column) for p in prompts]
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return args
    names = {p.name for p in params}
    return {k: v for k, v in args.items() if k in names}


def _culprit(fn: Callable, prompts: list, texts: list[str], token_ids: list[list[int]]) -> str:
    """The first prompt whose sample alone makes `fn` raise (the batch call names none)."""
    for i, p in enumerate(prompts):
        try:
            fn(**_arguments(fn, prompts[i : i + 1], texts[i : i + 1], token_ids[i : i + 1]))
        except Exception:
            return f"on prompt '{p.id}'"
    return f"on the batch of {len(texts)} samples, none alone"


def combine(terms: list[tuple[float, list[float | None]]]) -> list[float | None]:
    """Σ weight × score over the terms that scored each sample; None where none did."""
    out: list[float | None] = []
    for scores in zip(*(s for _, s in terms), strict=True):
        given = [(w, s) for (w, _), s in zip(terms, scores, strict=True) if s is not None]
        out.append(sum(w * s for w, s in given) if given else None)
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else "(no message)"
