"""`run.logger`: TensorBoard and W&B (offline) receive the records of `metrics.jsonl` when a stage
commits, at their line numbers, so a resumed run sends nothing twice; a missing package is named."""

import importlib.util

import pytest

from lite_rlhf import loggers
from lite_rlhf.config import ConfigError, load_config
from lite_rlhf.runstate import RunDir


def commit_two_runs(tmp_path, logger: str) -> RunDir:
    """A stage committed, a stage cut off before its commit, then a resume that commits a second stage."""
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}", f"run.logger={logger}"])
    rd = RunDir(cfg)
    close = loggers.attach_logger(rd, cfg.run)
    rd.commit("a", metrics=[{"stage": "a", "loss": 1.0}, {"stage": "a", "loss": 0.5}])
    with rd.metrics_path.open("a") as fh:  # what a stage killed between its metrics and its mark leaves
        fh.write('{"stage": "b", "loss": 9.0}\n')
    close()
    rd = RunDir(cfg)  # the resumed run
    close = loggers.attach_logger(rd, cfg.run)
    rd.commit("b", metrics=[{"stage": "b", "loss": 0.25, "note": "text is not a scalar"}])
    close()
    return rd


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_gets_each_committed_record_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rd = commit_two_runs(tmp_path, "tensorboard")
    events = EventAccumulator(str(rd.root / "tensorboard"))
    events.Reload()
    seen = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert seen == {"a/loss": [(0, 1.0), (1, 0.5)], "b/loss": [(2, 0.25)]}
    assert [r["loss"] for r in rd.metrics()] == [1.0, 0.5, 0.25]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_writes_under_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rd = commit_two_runs(tmp_path, "wandb")
    runs = list((rd.root / "wandb").glob("offline-run-*"))
    assert runs and all(rd.run_id in r.name for r in runs), runs
    assert any(f.suffix == ".wandb" for r in runs for f in r.iterdir())


def test_missing_package_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    cfg = load_config(None, [f"run.out_dir={tmp_path}", "run.logger=wandb"])
    with pytest.raises(ConfigError, match=r"`wandb` package; pip install 'lite-rlhf\[wandb\]'"):
        loggers.check_logger(cfg.run)


def test_scalars_keep_numbers_only():
    assert loggers.scalars({"stage": "dpo", "loss": 0.5, "step": 3, "ok": True, "txt": "x"}) == {
        "dpo/loss": 0.5,
        "dpo/step": 3.0,
    }
