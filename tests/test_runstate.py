"""The run directory: `state.json`'s `stage_seconds`; nothing replaced that the run did not write; one process
per run; committed files verified on resume; the user's umask."""

import os
import stat
import subprocess
import sys

import pytest

from lite_rlhf import runstate
from lite_rlhf.config import load_config
from lite_rlhf.runstate import Link, RunDir, RunStateError, read_json, write_dir, write_json, write_text


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


def test_a_commit_replaces_only_what_the_run_wrote(tmp_path, capsys):
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}"])
    rd = RunDir(cfg)
    out = rd.root / "out.txt"
    rd.commit("a", {out: "first"}, [{"stage": "a"}])
    rd.commit("a2", {out: "second"})  # the run's own file: replaced
    assert out.read_text() == "second"
    mine = rd.root / "mine.txt"
    mine.write_text("the user's")
    with pytest.raises(RunStateError, match="mine.txt' was not written by this run"):
        rd.commit("b", {mine: "ours"})
    assert mine.read_text() == "the user's" and not rd.done("b")
    # a stage cut off after its files were written (not marked) writes them again when it runs again
    late = rd.root / "late" / "x.json"
    rd.state["writing"] = ["late"]
    write_json(rd.state_path, rd.state)
    late.parent.mkdir()
    late.write_text("{}")
    resumed = RunDir(cfg)
    resumed.commit("b2", {rd.root / "other.txt": "a stage that runs first leaves the cut-off one its paths"})
    resumed.commit("c", {late.parent: lambda d: (d / "x.json").write_text('{"a": 1}')})
    assert late.read_text() == '{"a": 1}' and "writing" not in read_json(rd.state_path)


def test_a_damaged_committed_file_runs_its_stage_again(tmp_path, capsys):
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}"])
    rd = RunDir(cfg)
    adapter = rd.root / "iter_001" / "policy"
    rd.commit("p", {adapter: lambda d: (d / "w.bin").write_bytes(b"12345678")}, [{"stage": "p"}])
    rd.commit("q", {rd.root / "best": Link("iter_001/policy")}, [{"stage": "q"}])
    assert RunDir(cfg).done("p") and RunDir(cfg).done("q")
    rd.commit("q2", {rd.root / "best": Link("iter_001")})  # a later stage replaces it: its record moves there
    assert RunDir(cfg).done("q") and RunDir(cfg).done("q2")
    rd.commit("q3", {rd.root / "best": Link("iter_001/policy")})
    (adapter / "w.bin").write_bytes(b"")  # a disk error, a sync tool
    resumed = RunDir(cfg)
    assert not resumed.done("p") and resumed.done("q")
    assert "stage 'p' runs again: '" in capsys.readouterr().err
    resumed.commit("p", {adapter: lambda d: (d / "w.bin").write_bytes(b"12345678")}, [{"stage": "p"}])
    assert [m["stage"] for m in resumed.metrics()] == ["p", "q"]  # its metrics line is not written twice
    assert RunDir(cfg).done("p")
    (rd.root / "best").unlink()
    (rd.root / "best").symlink_to("elsewhere")
    assert not RunDir(cfg).done("q3") and RunDir(cfg).done("q")


def test_a_directory_that_holds_no_run_is_refused_untouched(tmp_path):
    root = tmp_path / "mine"
    (root / "reward").mkdir(parents=True)
    (root / "metrics.jsonl").write_text("my own notes\n")
    (root / "reward" / "notes.txt").write_text("keep me")
    cfg = load_config(None, [f"run.out_dir={root}"])
    with pytest.raises(RunStateError, match="holds files that are not a lite-rlhf run \\('metrics.jsonl' and 1 more"):
        RunDir(cfg)
    assert (root / "metrics.jsonl").read_text() == "my own notes\n"
    assert sorted(p.name for p in root.iterdir()) == ["metrics.jsonl", "reward"]


def test_a_second_process_is_refused_while_the_first_holds_the_run(tmp_path):
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}"])
    RunDir(cfg).commit("a")
    code = (f"from lite_rlhf.config import load_config; from lite_rlhf.runstate import RunDir; "
            f"RunDir(load_config(None, ['run.out_dir={tmp_path / 'run'}']))")  # fmt: skip
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert f"in use by another lite-rlhf process (pid {os.getpid()})" in other.stderr, other.stderr[-2000:]


def test_files_keep_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_text(tmp_path / "a.txt", "x")
        write_dir(tmp_path / "d", lambda d: (d / "f").write_text("y"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750


def test_a_run_cut_off_before_its_first_commit_is_still_a_run(tmp_path):
    """The directory is the run's from the moment it is opened: what a logger adds before the first commit
    (tensorboard/, wandb/) does not make it foreign on resume."""
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}"])
    rd = RunDir(cfg)
    (rd.root / "tensorboard").mkdir()
    assert not RunDir(cfg).state["done"]


def test_a_run_from_an_older_version_resumes_and_another_config_is_refused(tmp_path):
    """config.yaml as an older version wrote it: a key added since (dpo.simpo_gamma) absent, dpo.loss_type one name
    where it is a list today. It is the same run; a changed value is not."""
    import yaml

    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}"])
    rd = RunDir(cfg)
    rd.commit("a")
    saved = yaml.safe_load((rd.root / "config.yaml").read_text())
    del saved["dpo"]["simpo_gamma"]
    saved["dpo"]["loss_type"] = "sigmoid"
    (rd.root / "config.yaml").write_text(yaml.safe_dump(saved))
    assert RunDir(cfg).done("a")
    with pytest.raises(RunStateError, match="different config.*dpo.beta"):
        RunDir(load_config(None, [f"run.out_dir={tmp_path / 'run'}", "dpo.beta=0.2"]))


def test_files_written_0600_by_a_library_get_the_users_umask(tmp_path):
    """safetensors creates its files 0600: inside a directory the run writes they get the one rule, 0666 less the
    umask, as every other file."""

    def fill(d):
        os.close(os.open(d / "w.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))
        (d / "sub").mkdir(mode=0o700)
        os.close(os.open(d / "sub" / "head.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))

    old = os.umask(0o027)
    try:
        write_dir(tmp_path / "d", fill)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "d", *(tmp_path / "d").rglob("*")]}
    assert modes == {"d": 0o750, "w.safetensors": 0o640, "sub": 0o750, "head.safetensors": 0o640}, modes


def test_a_stage_run_again_leaves_a_users_file_inside_its_directory(tmp_path):
    """A committed directory is replaced whole when its stage runs again: a file the user put inside it stops the
    commit, named, byte for byte as it was; without it the stage commits."""
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}"])
    rd = RunDir(cfg)
    policy = rd.root / "iter_001" / "policy"
    rd.commit("iter_001/policy", {policy: lambda d: (d / "adapter.bin").write_text("one")})
    notes = policy / "NOTES.md"
    notes.write_bytes(b"mine\n")
    (policy / "adapter.bin").write_text("changed")  # a committed file changed: the stage runs again
    resumed = RunDir(cfg)
    assert not resumed.done("iter_001/policy")
    with pytest.raises(RunStateError, match="NOTES.md' was not written by this run and is left as it is"):
        resumed.commit("iter_001/policy", {policy: lambda d: (d / "adapter.bin").write_text("two")})
    assert notes.read_bytes() == b"mine\n" and (policy / "adapter.bin").read_text() == "changed"
    notes.unlink()
    resumed.commit("iter_001/policy", {policy: lambda d: (d / "adapter.bin").write_text("two")})
    assert (policy / "adapter.bin").read_text() == "two"
