"""`run.logger`: the same records as `metrics.jsonl`, sent to TensorBoard or Weights & Biases.

A logger receives a stage's records when the stage commits (`RunDir.on_commit`), never before, so a
resumed run sends nothing twice. Each record goes out as `<stage>/<key>` scalars at its line number in
`metrics.jsonl`, a step that is the same in an uninterrupted and a resumed run. Both write under the
run directory (`tensorboard/`, `wandb/`); both packages are optional extras, imported only here.
"""

from __future__ import annotations

import importlib.util
import numbers
import os
from collections.abc import Callable

from lite_rlhf.config import ConfigError, RunConfig
from lite_rlhf.runstate import RunDir

Send = Callable[[int, list[dict]], None]  # (line number of the first record, records)


def _require(package: str, extra: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"config key 'run.logger': {extra} needs the `{package}` package; "
            f"pip install 'lite-rlhf[{extra}]' (or set run.logger=none)"
        )


def check_logger(run: RunConfig) -> None:
    """Fail before any work when the logger's package is missing."""
    if run.logger == "tensorboard":
        _require("tensorboard", "tensorboard")
    elif run.logger == "wandb":
        _require("wandb", "wandb")
        offline = os.environ.get("WANDB_MODE", "") in ("offline", "disabled", "dryrun")
        if not offline and not os.environ.get("WANDB_API_KEY") and not _netrc_has("api.wandb.ai"):
            raise ConfigError("config key 'run.logger': wandb has no credentials (WANDB_API_KEY or `wandb login`); "
                              "set them, or WANDB_MODE=offline to keep its logs in the run directory")  # fmt: skip


def _netrc_has(host: str) -> bool:
    import netrc

    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def scalars(record: dict) -> dict[str, float]:
    stage = record.get("stage", "run")
    return {
        f"{stage}/{k}": float(v)
        for k, v in record.items()
        if k != "stage" and isinstance(v, numbers.Real) and not isinstance(v, bool)
    }


def attach_logger(rd: RunDir, run: RunConfig) -> Callable[[], None]:
    """Send every committed record from now on to `run.logger`; returns the function that closes it."""
    check_logger(run)
    if run.logger == "none":
        return lambda: None
    if run.logger == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(rd.root / "tensorboard"))

        def send(first: int, records: list[dict]) -> None:
            for i, rec in enumerate(records):
                for tag, value in scalars(rec).items():
                    writer.add_scalar(tag, value, global_step=first + i)
            writer.flush()

        rd.on_commit.append(send)
        return writer.close
    import wandb

    (rd.root / "wandb").mkdir(parents=True, exist_ok=True)
    # One wandb run per run directory: the same id when a killed run resumes.
    try:  # before any model loads: a server out of reach is said in 30 s (wandb's own wait is 90 s), not after it
        session = wandb.init(project="lite-rlhf", name=rd.root.name, id=rd.run_id, resume="allow", dir=str(rd.root),
                             settings=wandb.Settings(init_timeout=30))  # fmt: skip
    except Exception as err:  # wandb's errors for no network, a refused key, a server down: all mean the same here
        raise ConfigError(f"config key 'run.logger': wandb did not start ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); set WANDB_MODE=offline to keep its logs "
                          "in the run directory, or run.logger=none") from None  # fmt: skip

    def send(first: int, records: list[dict]) -> None:
        for i, rec in enumerate(records):
            session.log(scalars(rec), step=first + i)

    rd.on_commit.append(send)
    return session.finish
