"""The policy update of each iteration, one module per algorithm; `loop.algorithm` names it.

Every algorithm module has the same two functions, which the loop calls and nothing else:

    start(ctx) -> kept                                     before the first iteration (DPO: the offline pairs)
    iteration(ctx, t, samples, rewards, kept) -> kept      this iteration's training data made and committed, then
                                                           policy_t trained from policy_{t-1} and committed
                                                           (`context.update_policy`); `kept` goes to the next one

`samples` are the n answers per prompt of iteration t, `rewards` the oracle's score of each (None: unscored).
Every stage goes through `RunDir.commit`, so a killed run resumes to the same artifacts.
"""

from __future__ import annotations

import importlib
from types import ModuleType

NAMES = ("dpo", "raft", "grpo", "rloo", "ppo")  # config.LoopConfig.algorithm's values


def get(name: str) -> ModuleType:
    if name not in NAMES:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")
