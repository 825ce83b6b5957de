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
import threading
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
    timeout: float = 0.0  # seconds one call may take (reward.function_timeout); 0: no limit

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


def load_functions(
    specs: Sequence[str], weights: Sequence[float], key: str, timeout: float = 0.0
) -> list[RewardFunction]:
    weights = list(weights) or [1.0] * len(specs)
    return [RewardFunction(s, load_function(s, key), w, timeout) for s, w in zip(specs, weights, strict=True)]


class _TimedOut(Exception):
    """A reward function's call outlived its time limit."""


def _limited(f: RewardFunction, kwargs: dict):
    """`f.fn(**kwargs)`, given at most `f.timeout` seconds. The call runs in a daemon thread that this one waits
    for: that works in any thread (a signal alarm works in the main one only), leaves SIGALRM to the user's code and
    the CLI's SIGINT/SIGTERM handling as it is, and stops waiting even for a call blocked in C (a socket, a lock), which
    an alarm's exception cannot interrupt. A call that outlives its limit cannot be killed: its thread is left behind
    and ends with the process, which stops right after."""
    if not f.timeout:
        return f.fn(**kwargs)
    box: dict = {}

    def target():
        try:
            box["out"] = f.fn(**kwargs)
        except BaseException as err:  # handed to the caller's thread, raised there
            box["err"] = err

    thread = threading.Thread(target=target, name=f"reward function {f.name}", daemon=True)
    thread.start()
    thread.join(f.timeout)
    if thread.is_alive():
        raise _TimedOut()
    if "err" in box:
        raise box["err"]
    return box["out"]


def _prompts_named(prompts: list) -> str:
    ids = list(dict.fromkeys(p.id for p in prompts))
    if len(ids) == 1:
        return f"prompt '{ids[0]}'"
    more = f", ... ({len(ids)} prompts)" if len(ids) > 3 else ""
    return f"the {len(prompts)} samples of prompts {', '.join(repr(i) for i in ids[:3])}{more}"


def call(f: RewardFunction, prompts: list, texts: list[str], token_ids: list[list[int]]) -> list[float | None]:
    """One function on the samples of `prompts` (each a `data.Prompt`, one per sample); its scores checked."""
    where = f"reward function '{f.spec}'"
    try:
        out = _limited(f, _arguments(f.fn, prompts, texts, token_ids))
    except _TimedOut:
        raise RewardFunctionError(
            f"reward function '{f.name}' ({f.spec}) did not return within reward.function_timeout={f.timeout:g} s on "
            f"{_prompts_named(prompts)}; nothing committed was lost: fix it, or raise reward.function_timeout and "
            "repeat the command"
        ) from None
    except Exception as err:
        culprit = _culprit(f, prompts, texts, token_ids)
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


def _culprit(f: RewardFunction, prompts: list, texts: list[str], token_ids: list[list[int]]) -> str:
    """The first prompt whose sample alone makes `f` raise, or outlive its limit (the batch call names none)."""
    for i, p in enumerate(prompts):
        try:
            _limited(f, _arguments(f.fn, prompts[i : i + 1], texts[i : i + 1], token_ids[i : i + 1]))
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
