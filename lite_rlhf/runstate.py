"""The run directory: atomic writes, the stage cursor, resume.

Every file is written under a temporary name and renamed, so a file that exists is complete. A
stage that finds its output skips itself; `state.json` records which stages are done (for people
and for `lite-rlhf run` to say where it resumes). A run started again with the same command
continues where it stopped; a different config in the same directory is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lite_rlhf.config import Config, to_yaml


class RunStateError(RuntimeError):
    """The run directory cannot be used as asked."""


def crash_point(name: str) -> None:
    """Fault injection for the resume tests: `LITE_RLHF_KILL_AT=<name>` makes the process SIGKILL
    itself here, as a power cut would. Unset (always, outside tests) it does nothing."""
    if os.environ.get("LITE_RLHF_KILL_AT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_dir(path: Path, fill: Callable[[Path], None]) -> None:
    """Build a directory under a temporary name with `fill(tmp)`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class RunDir:
    """`<run.out_dir>/`: config.yaml, state.json, reward/, iter_NNN/, best/, metrics.jsonl, report.md."""

    def __init__(self, cfg: Config):
        self.root = Path(cfg.run.out_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        resolved = to_yaml(cfg)
        saved = self.root / "config.yaml"
        if saved.exists() and saved.read_text() != resolved:
            raise RunStateError(
                f"{self.root} holds a run with a different config (see {saved}); "
                "use another run.out_dir, or delete the directory to start over"
            )
        write_text(saved, resolved)
        self.state_path = self.root / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"done": []}
        # Drop metrics lines of a stage that was cut off: it runs again and writes them again.
        kept = self.state.get("metrics_bytes", 0)
        if self.metrics_path.exists() and self.metrics_path.stat().st_size > kept:
            with self.metrics_path.open("r+b") as fh:
                fh.truncate(kept)

    def iter_dir(self, t: int) -> Path:
        return self.root / f"iter_{t:03d}"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def done(self, stage: str) -> bool:
        return stage in self.state["done"]

    def mark(self, stage: str) -> None:
        if stage not in self.state["done"]:
            self.state["done"].append(stage)
            self.state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            self.state["metrics_bytes"] = self.metrics_path.stat().st_size if self.metrics_path.exists() else 0
            write_json(self.state_path, self.state)

    def log(self, record: dict) -> None:
        """Append one metrics line (lines after the last completed stage are dropped on resume)."""
        with self.metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
