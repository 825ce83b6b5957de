"""The command line: help on every command, one-line config errors with exit code 2, --dry-run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent / "lite-rlhf"
COMMANDS = ["run", "train-rm", "generate", "export", "plan", "doctor"]


def cli(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_every_command(command):
    out = cli(command, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: lite-rlhf " + command in out.stdout


def test_dry_run_prints_the_resolved_demo_config():
    out = cli("run", "--dry-run", "dpo.beta=0.2")
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["dpo"]["beta"] == 0.2
    assert resolved["model"]["name"] == "smollm2-135m-instruct"  # the embedded demo config


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--dry-run", "dpo.bta=0.2"], "did you mean 'dpo.beta'"),
        (["train-rm", "--dry-run", "reward.lr=fast"], "'reward.lr' must be float"),
        (["generate", "--dry-run", "generation.n=-1"], "'generation.n' must be in [1, 16384]"),
        (["run", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    ],
)
def test_config_errors_are_one_line_exit_2(args, message, tmp_path):
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_missing_data_file_is_one_line_exit_2(tmp_path):
    out = cli("train-rm", f"data.preferences={tmp_path / 'nope.jsonl'}", f"run.out_dir={tmp_path / 'r'}")
    assert out.returncode == 2, out.stderr
    assert "nope.jsonl' does not exist" in out.stderr and "Traceback" not in out.stderr


def test_doctor_reports_the_stack(tmp_path):
    out = cli("doctor", cwd=tmp_path)  # outside the checkout, as a user runs it
    assert out.returncode == 0, out.stdout + out.stderr
    assert "kernels-community" not in out.stdout + out.stderr  # bitsandbytes' optional-package chatter
    for word in (
        "torch",
        "triton",
        "transformers",
        "peft",
        "bitsandbytes",
        "engine",
        "device",
        "kernel path",
        "dpo.loss_type",
        "generation",
        "demo model",
    ):
        assert word in out.stdout, word


def test_the_nan_stop_names_what_exists(tmp_path, monkeypatch, capsys):
    from lite_rlhf import loop
    from lite_rlhf.config import load_config
    from lite_rlhf.train import NonFiniteLoss

    def diverge(cfg):
        raise NonFiniteLoss("the DPO loss is nan at step 3")

    monkeypatch.setattr(loop, "run", diverge)
    cfg = load_config(None, [f"run.out_dir={tmp_path}"])
    assert loop.main_run(cfg) == 1
    assert capsys.readouterr().err.strip().endswith("stopped: no policy was chosen yet")
    (tmp_path / "iter_000" / "policy").mkdir(parents=True)
    (tmp_path / "best").symlink_to("iter_000/policy")
    assert loop.main_run(cfg) == 1
    assert f"stopped: the best policy so far is {tmp_path / 'best'}" in capsys.readouterr().err
