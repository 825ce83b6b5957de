"""The run directory and its one stage mechanism; the only writer of files.

A stage is done when, and only when, `state.json` says so. A stage commits its outputs, its metrics
lines and its mark together (`RunDir.commit`): every file is written under a temporary name and
renamed, then the metrics lines are appended, then the stage is marked in `state.json`, which also
records the length of `metrics.jsonl` at that moment. On resume, metrics lines past that length are
cut off and a stage that is not marked runs again from its inputs, whatever files it left; a marked
stage is never redone. So a killed run restarted with the same command ends with the same artifacts.

`kill_point(name)` is where the resume tests cut the power: one before every commit (the stage's
work is lost), one after its files are written (written, not marked), and inside long stages.

What makes two runs the same run is `config.identity` and the number of ranks (`dist.world`): a directory
holding a run of another identity, or one run on another number of ranks, is refused; one that has not
committed its first stage pins nothing. Under torchrun rank 0 alone writes; every rank marks the stage
done after the barrier that ends the commit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import yaml

from lite_rlhf import dist
from lite_rlhf.config import Config, identity, to_yaml


class RunStateError(RuntimeError):
    """The run directory cannot be used as asked."""


@dataclass(frozen=True)
class Link:
    """A symbolic link to `target` (relative to the link's directory)."""

    target: str


# What `RunDir.commit` writes at a path: str -> text, dict -> JSON, list -> JSONL rows,
# a callable -> a directory it fills (adapters, plots), Link -> a symbolic link.
Content = str | dict | list | Callable[[Path], None] | Link


def kill_point(name: str) -> None:
    """Fault injection for the resume tests. `LITE_RLHF_KILL_AT=<name>` SIGKILLs the process here, as a
    power cut would; `LITE_RLHF_KILL_LOG=<file>` appends every point reached (the tests' list of
    points). Both unset (always, outside tests), it does nothing. Under torchrun, `LITE_RLHF_KILL_RANK=<r>`
    kills rank r only."""
    log = os.environ.get("LITE_RLHF_KILL_LOG")
    if log and dist.is_main():
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(name + "\n")
    ranks = os.environ.get("LITE_RLHF_KILL_RANK")
    if os.environ.get("LITE_RLHF_KILL_AT") == name and ranks in (None, str(dist.rank())):
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- atomic writes


def _temp_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_text(path: Path, text: str) -> None:
    tmp = _temp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_dir(path: Path, fill: Callable[[Path], None]) -> None:
    """Build a directory under a temporary name with `fill(tmp)`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(tmp)
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_link(path: Path, target: str) -> None:
    tmp = _temp_path(path)
    tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, path)


def write(path: Path, content: Content) -> None:
    if isinstance(content, str):
        write_text(path, content)
    elif isinstance(content, dict):
        write_json(path, content)
    elif isinstance(content, list):
        write_jsonl(path, content)
    elif isinstance(content, Link):
        write_link(path, content.target)
    else:
        write_dir(path, content)


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- the run directory


class RunDir:
    """`<run.out_dir>/`: config.yaml, state.json, metrics.jsonl and every stage's outputs."""

    def __init__(self, cfg: Config):
        self.root = Path(cfg.run.out_dir)
        self.config_text = to_yaml(cfg)
        self.identity = identity(cfg)
        if self.root.exists() and not self.root.is_dir():
            raise RunStateError(f"run.out_dir '{self.root}' is a file, not a directory")
        saved = self.root / "config.yaml"
        if saved.is_file():
            stored = identity(yaml.safe_load(saved.read_text(encoding="utf-8")))
            if stored != self.identity:
                changed = sorted(
                    k for k in stored.keys() | self.identity.keys() if stored.get(k) != self.identity.get(k)
                )
                raise RunStateError(
                    f"{self.root} holds a run with a different config ({', '.join(changed[:4])} differ; see {saved}); "
                    "use another run.out_dir, or delete the directory to start over"
                )
        self.state_path = self.root / "state.json"
        self.state = read_json(self.state_path) if self.state_path.exists() else {"done": [], "run_id": uuid4().hex}
        ranks = self.state.get("world_size", 1)  # a run from before torchrun support ran on one
        if self.state["done"] and ranks != dist.world():
            raise RunStateError(
                f"{self.root} holds a run on {ranks} rank(s) (state.json world_size); this start has {dist.world()}: "
                f"resume it on {ranks} (torchrun --nproc-per-node), or use another run.out_dir"
            )
        self.state["world_size"] = dist.world()
        self.writer = dist.is_main()  # under torchrun rank 0 writes, the others wait at each commit's barrier
        # Loggers: `send(line number of the first record, records)` for committed lines only.
        self.on_commit: list[Callable[[int, list[dict]], None]] = []
        self.lines = 0
        if self.writer:
            try:  # refuse before any model loads, not after the first stage's work
                self.root.mkdir(parents=True, exist_ok=True)
                _temp_path(self.root / "state.json").unlink()
            except OSError as err:
                raise RunStateError(f"run.out_dir '{self.root}' is not writable: {err.strerror}") from None
            # Drop metrics lines of a stage that was cut off: it runs again and writes them again.
            kept = self.state.get("metrics_bytes", 0)
            if self.metrics_path.exists() and self.metrics_path.stat().st_size > kept:
                with self.metrics_path.open("r+b") as fh:
                    fh.truncate(kept)
            self.lines = len(self.metrics())
        dist.barrier()  # every rank has read the state before any rank commits a stage
        self._since = time.monotonic()  # stage_seconds: wall time from the previous commit of this process

    def iter_dir(self, t: int) -> Path:
        return self.root / f"iter_{t:03d}"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def done(self, stage: str) -> bool:
        return stage in self.state["done"]

    def commit(self, stage: str, files: dict[Path, Content] | None = None, metrics: list[dict] = ()) -> None:
        """Write the stage's outputs, append its metrics lines, mark it done: in that order. Under torchrun
        rank 0 does so; every rank leaves at the barrier after it, with the stage marked done."""
        kill_point(stage)
        if not self.writer:
            dist.barrier()
            self.state["done"].append(stage)
            return
        files = dict(files or {})
        if not self.state["done"]:  # the first commit pins the run's identity
            files = {self.root / "config.yaml": self.config_text, **files}
        for path, content in files.items():
            try:
                write(path, content)
            except Exception as err:  # a full disk, a directory made read-only meanwhile, ...
                if not isinstance(err, OSError) and type(err).__name__ != "SafetensorError":
                    raise
                why = err.strerror if isinstance(err, OSError) else str(err)
                raise RunStateError(f"cannot write '{path}': {why}; stage '{stage}' runs again when you "
                                    "repeat the command") from None  # fmt: skip
        kill_point(f"{stage}:written")
        if metrics:
            with self.metrics_path.open("a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(m) + "\n" for m in metrics))
                fh.flush()
                os.fsync(fh.fileno())
        self.state["done"].append(stage)
        # Wall seconds since the previous commit (or since this process opened the run): the stage's own time,
        # the model loading included for the first stage after a start.
        self.state.setdefault("stage_seconds", {})[stage] = round(time.monotonic() - self._since, 1)
        if dist.active():  # of which rank 0 waited in collectives (for the slowest rank, or for the data)
            self.state.setdefault("collective_seconds", {})[stage] = round(dist.take_seconds(), 2)
        self.state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.state["metrics_bytes"] = self.metrics_path.stat().st_size if self.metrics_path.exists() else 0
        write_json(self.state_path, self.state)
        for send in self.on_commit:
            send(self.lines, list(metrics))
        self.lines += len(metrics)
        dist.barrier()
        self._since = time.monotonic()

    @property
    def run_id(self) -> str:
        """A stable id of this run (e.g. the wandb run's), kept in state.json."""
        return self.state.get("run_id") or self.root.resolve().name

    def metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path) if self.metrics_path.exists() else []
