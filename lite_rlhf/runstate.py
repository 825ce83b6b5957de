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

Nothing lite-rlhf did not write is replaced or cut: a directory that holds anything but a run is refused
at the start, and a commit replaces only paths this run committed (`state.json` `files`) or was writing
when it was cut off (`writing`), and a committed directory only while every file in it is one of those.
One process at a time: the writer holds an exclusive lock on `LOCK_NAME` for its whole life; the OS drops it
when the process dies, so a SIGKILLed run resumes with the same command.
Committed means intact: each committed file's size and SHA-256 are in `state.json`, and a stage whose files
no longer match is said in one line and runs again instead of being skipped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import yaml

from lite_rlhf import dist
from lite_rlhf.config import Config, ConfigError, identity, load_config, to_yaml


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


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _temp_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: the file is the user's, with their usual mode
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
    """Build a directory under a temporary name with `fill(tmp)`, then rename it into place. Whatever wrote the
    files (safetensors writes 0600, mkdtemp makes 0700), they get the user's usual modes, as every file of ours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    mask = _umask()
    try:
        fill(tmp)
        for f in [tmp, *tmp.rglob("*")]:
            if not f.is_symlink():
                f.chmod((0o777 if f.is_dir() else 0o666) & ~mask)
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


# --------------------------------------------------------------------------- what a commit leaves

LOCK_NAME = ".lite-rlhf.lock"  # in the run directory: the pid of the process that holds it
_HELD: dict[Path, int] = {}  # run directory -> this process's locked file descriptor (RunDir twice: one lock)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: Path, root: Path) -> dict[str, list]:
    """What was committed at `path`: every file under it (relative to `root`) as [bytes, sha256], a link as
    ["link", target]."""
    if path.is_symlink():
        return {str(path.relative_to(root)): ["link", os.readlink(path)]}
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return {str(f.relative_to(root)): [f.stat().st_size, _sha256(f)] for f in files}


def damaged(recorded: dict[str, list], root: Path) -> str | None:
    """The first committed file that is missing or differs from its record, said in a few words."""
    for rel, (size, digest) in recorded.items():
        path = root / rel
        if size == "link":
            if not path.is_symlink() or os.readlink(path) != digest:
                return f"'{path}' is not the link it was"
        elif not path.is_file():
            return f"'{path}' is missing"
        elif path.stat().st_size != size:
            return f"'{path}' has {path.stat().st_size} bytes, {size} when committed"
        elif _sha256(path) != digest:
            return f"'{path}' has changed since it was committed"
    return None


def _lock(root: Path) -> None:
    """Hold `root/LOCK_NAME` exclusively until this process ends (the OS releases it, also on SIGKILL)."""
    key = root.resolve()
    if key in _HELD:
        return
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunStateError(f"run.out_dir '{root}' is in use by another lite-rlhf process (pid {holder}); wait for "
                            "it to end, or use another run.out_dir") from None  # fmt: skip
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = fd


def _foreign(root: Path) -> list[str]:
    """Names in `root` that no run wrote. A run writes state.json as soon as it holds the lock, so a directory
    without one holds at most the lock and a temporary state.json of a process that died in between."""
    if not root.is_dir() or (root / "state.json").is_file():
        return []
    return sorted(p.name for p in root.iterdir() if p.name != LOCK_NAME and not p.name.startswith(".state.json."))


def _claim(root: Path) -> None:
    """Refuse a directory that is not a run's, or not writable (before any model loads), then lock it."""
    foreign = _foreign(root)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise RunStateError(f"run.out_dir '{root}' holds files that are not a lite-rlhf run ('{foreign[0]}'{more}); "
                            "nothing was changed: use a new or empty directory")  # fmt: skip
    try:
        root.mkdir(parents=True, exist_ok=True)
        _temp_path(root / "state.json").unlink()
    except OSError as err:
        raise RunStateError(f"run.out_dir '{root}' is not writable: {err.strerror}") from None
    _lock(root)  # before anything is read to be changed


# --------------------------------------------------------------------------- the run directory


def _stored_identity(saved: Path) -> dict[str, Any]:
    """A run's saved config.yaml read as this version reads a config (keys added since take their defaults, a
    value's form as today's: a run from an older version resumes); as written where today's loader refuses it."""
    try:
        return identity(load_config(saved))
    except ConfigError:
        return identity(yaml.safe_load(saved.read_text(encoding="utf-8")))


class RunDir:
    """`<run.out_dir>/`: config.yaml, state.json, metrics.jsonl and every stage's outputs."""

    def __init__(self, cfg: Config):
        self.root = Path(cfg.run.out_dir)
        self.config_text = to_yaml(cfg)
        self.identity = identity(cfg)
        self.writer = dist.is_main()  # under torchrun rank 0 writes, the others wait at each commit's barrier
        if self.root.exists() and not self.root.is_dir():
            raise RunStateError(f"run.out_dir '{self.root}' is a file, not a directory")
        if self.writer:
            _claim(self.root)
        saved = self.root / "config.yaml"
        if saved.is_file():
            stored = _stored_identity(saved)
            if stored != self.identity:
                changed = sorted(
                    k for k in stored.keys() | self.identity.keys() if stored.get(k) != self.identity.get(k)
                )
                raise RunStateError(
                    f"{self.root} holds a run with a different config ({', '.join(changed[:4])} differ; see {saved}); "
                    "use another run.out_dir, or delete the directory to start over"
                )
        self.state_path = self.root / "state.json"
        try:
            self.state = read_json(self.state_path) if self.state_path.exists() else {"done": [], "run_id": uuid4().hex}
            if not isinstance(self.state.get("done"), list):
                raise ValueError("no list of done stages")
        except (ValueError, AttributeError) as err:
            raise RunStateError(f"'{self.state_path}' is damaged ({err}); nothing was changed: move the run "
                                "directory away to start over") from None  # fmt: skip
        self.state.setdefault("files", {} if not self.state["done"] else None)  # None: a run from before the records
        if self.writer and not self.state_path.exists():  # the directory is a run's from now on (what a logger adds)
            write_json(self.state_path, self.state)
        ranks = self.state.get("world_size", 1)  # a run from before torchrun support ran on one
        if self.state["done"] and ranks != dist.world():
            raise RunStateError(
                f"{self.root} holds a run on {ranks} rank(s) (state.json world_size); this start has {dist.world()}: "
                f"resume it on {ranks} (torchrun --nproc-per-node), or use another run.out_dir"
            )
        self.state["world_size"] = dist.world()
        self._checked: set[str] = set()  # stages whose committed files this process has verified
        self._again: set[str] = set()  # stages found damaged: they run again, their metrics lines already stand
        # Loggers: `send(line number of the first record, records)` for committed lines only.
        self.on_commit: list[Callable[[int, list[dict]], None]] = []
        self.lines = 0
        if self.writer:
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
        """Marked done, with its committed files intact (checked once per process); a stage whose files were
        damaged since is said in one line and is not done: it runs again."""
        if stage not in self.state["done"]:
            return False
        if stage not in self._checked:
            self._checked.add(stage)
            recorded = (self.state["files"] or {}).get(stage, {})
            why = damaged(recorded, self.root) if self.writer else None
            if why := dist.all_gather(why)[0] if dist.active() else why:  # rank 0 looked: every rank agrees
                print(f"lite-rlhf: stage '{stage}' runs again: {why}", file=sys.stderr, flush=True)
                self.state["done"].remove(stage)
                self._again.add(stage)
                return False
        return True

    def _owned(self, path: Path) -> bool:
        """Did this run commit `path` (or a file under it), or was it writing it when it was cut off?"""
        if self.state["files"] is None:  # a run directory from before the records: all of it is the run's
            return True
        rel = str(path.relative_to(self.root))
        if rel == "config.yaml":  # the identity, written by the first commit and checked at every start
            return True
        written = [r for files in self.state["files"].values() for r in files] + self.state.get("writing", [])
        return any(r == rel or r.startswith(rel + "/") for r in written)

    def _check_in_the_way(self, stage: str, files: dict[Path, Content]) -> None:
        """Refuse, before anything is written, a commit that would replace a path this run did not write, or a
        committed directory that now holds a file of the user's."""
        for path in files:
            if (path.exists() or path.is_symlink()) and not self._owned(path):
                raise RunStateError(f"'{path}' was not written by this run and is left as it is: move it away and "
                                    "repeat the command")  # fmt: skip
            if foreign := self._foreign_inside(path):
                more = f", nor {len(foreign) - 1} more there," if len(foreign) > 1 else ""
                raise RunStateError(f"'{foreign[0]}'{more} was not written by this run and is left as it is: "
                                    f"stage '{stage}' replaces '{path}' whole; move it away and repeat the "
                                    "command")  # fmt: skip

    def _foreign_inside(self, path: Path) -> list[Path]:
        """What inside the directory `path` (files, links, empty directories) this run did not commit and was not
        writing: a user's file put into a committed directory."""
        if self.state["files"] is None or path.is_symlink() or not path.is_dir():
            return []
        recorded = {r for files in self.state["files"].values() for r in files}
        writing = self.state.get("writing", [])
        found = []
        for f in sorted(path.rglob("*")):
            if f.is_dir() and not f.is_symlink() and any(f.iterdir()):
                continue
            rel = str(f.relative_to(self.root))
            if rel not in recorded and not any(rel.startswith(w + "/") for w in writing):
                found.append(f)
        return found

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
        self._check_in_the_way(stage, files)
        rels = [str(p.relative_to(self.root)) for p in files]
        if files:  # said before any is written: a stage cut off in between may replace them when it runs again
            self.state["writing"] = sorted(set(self.state.get("writing", [])) | set(rels))
            write_json(self.state_path, self.state)
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
        if self.state["files"] is not None:  # each path recorded under the stage that wrote it last
            self._move_records(stage, rels)
            kept = [p for p in files if p != self.root / "config.yaml"]  # the identity check guards that one
            self.state["files"][stage] = {k: v for p in kept for k, v in fingerprint(p, self.root).items()}
        if writing := [r for r in self.state.pop("writing", []) if r not in rels]:
            self.state["writing"] = writing  # written by a stage cut off before its mark, that has not run again
        if stage in self._again:  # its metrics lines were committed the first time
            metrics = []
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

    def _move_records(self, stage: str, rels: list[str]) -> None:
        """Drop other stages' records of the paths `stage` just wrote; a stage whose file went with a directory
        replaced here (a card in a policy trained again) is no longer done: it runs again, without new metrics."""
        for other, recorded in self.state["files"].items():
            for old in [k for k in recorded if any(k == r or k.startswith(r + "/") for r in rels)]:
                del recorded[old]
                if other != stage and other in self.state["done"] and not (self.root / old).exists():
                    self.state["done"].remove(other)
                    self._again.add(other)

    @property
    def run_id(self) -> str:
        """A stable id of this run (e.g. the wandb run's), kept in state.json."""
        return self.state.get("run_id") or self.root.resolve().name

    def metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path) if self.metrics_path.exists() else []
