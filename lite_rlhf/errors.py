"""Which exceptions are the user's input going wrong (printed as one line, exit code 2)."""

from __future__ import annotations

import sys

from lite_rlhf.config import ConfigError
from lite_rlhf.data import DataError
from lite_rlhf.models import ModelNotFound


def user_errors() -> tuple[type[BaseException], ...]:
    """Config, data and model errors, plus those of modules already imported (no heavy imports here)."""
    found: list[type[BaseException]] = [ConfigError, DataError, ModelNotFound]
    for module, name in (("lite_rlhf.generate", "GenerationError"), ("lite_rlhf.runstate", "RunStateError"),
                         ("lite_rlhf.reward", "WeakOracle"),
                         ("lite_rlhf.functions", "RewardFunctionError")):  # fmt: skip
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)
