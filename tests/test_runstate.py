"""`state.json`'s `stage_seconds`: each stage's wall time, from the previous commit of the same process."""

from lite_rlhf import runstate
from lite_rlhf.config import load_config
from lite_rlhf.runstate import RunDir, read_json


def test_stage_seconds_run_from_the_previous_commit(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(runstate.time, "monotonic", lambda: now[0])
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}"])
    rd = RunDir(cfg)  # opened at 100
    now[0] = 103.5
    rd.commit("a")
    now[0] = 110.0
    rd.commit("b")
    now[0] = 200.0
    resumed = RunDir(cfg)  # a new process opens the run at 200: its first stage counts from there
    now[0] = 207.25
    resumed.commit("c")
    assert read_json(rd.state_path)["stage_seconds"] == {"a": 3.5, "b": 6.5, "c": 7.2}
