"""benchmarks/gpu_proof.py: the prepared proof for a lent GPU, rehearsed here with --smoke (every job at tiny
sizes on the CPU, the packages the GPU image lacks hidden from imports), so that the script is known to run
top to bottom before a GPU's scarce minutes are spent on it."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_proof.py"


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_hidden_packages_cannot_be_imported():
    code = (
        f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import gpu_proof, importlib.util\n"
        "gpu_proof.hide({'vllm', 'datasets'})\n"
        "assert importlib.util.find_spec('vllm') is None and importlib.util.find_spec('datasets') is None\n"
        "import torch, transformers  # everything else still imports\n"
        "try:\n    import datasets\nexcept ImportError:\n    print('hidden')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "hidden", out.stderr[-2000:]


def test_without_a_gpu_it_says_to_use_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "x")], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "gpu_proof: no CUDA device here; --smoke runs the same steps at tiny sizes on the CPU"
    ]


@pytest.mark.slow
def test_smoke_runs_every_job_and_reports_each_figure(tmp_path):
    out = tmp_path / "proof"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--smoke"], capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + log[-4000:]
    report = (out / "report.md").read_text()
    assert "| kernels | ok |" in report and "| loop | ok |" in report

    kernels = rows(out / "kernels.csv")
    assert len(kernels) == 17 and all(r["passed"] == "True" for r in kernels)
    assert {r["path"] for r in kernels} == {"triton-interpreter"}  # the Triton kernels, not the torch twin
    assert all(r["max_diff"].startswith("{") for r in kernels)

    loss = rows(out / "dpo_loss.csv")
    methods = {"naive", "ours (triton-interpreter)", "ours (chunked-torch)", "liger fused linear DPO"}
    for shape in {r["shape"] for r in loss}:
        assert {r["method"] for r in loss if r["shape"] == shape} == methods
    assert len({r["shape"] for r in loss}) == 2
    assert all(float(r["ms"]) > 0 and r["extra_peak_mib"] for r in loss)
    ours = [r for r in loss if r["method"].startswith("ours")]
    naive = {r["shape"]: float(r["loss"]) for r in loss if r["method"] == "naive"}
    assert all(abs(float(r["loss"]) - naive[r["shape"]]) < 1e-2 for r in ours)  # the same loss, bf16 logits aside

    steps = rows(out / "dpo_step.csv")
    assert sorted((r["variant"], r["pairs_per_step"]) for r in steps) == [
        ("lite-rlhf", "1"), ("lite-rlhf", "4"), ("trl", "1"), ("trl", "4")]  # fmt: skip
    assert all(float(r["s_per_step"]) > 0 and float(r["train_peak_mib"]) > 0 for r in steps)
    assert all(float(r["plan_train_mib"]) > 0 for r in steps if r["variant"] == "lite-rlhf")
    assert all(" 0 of " in r["note"] for r in steps if r["variant"] == "trl"), "TRL saw other token ids"

    loop = {r["phase"]: r for r in rows(out / "loop.csv")}
    assert loop["whole run"]["note"].startswith("exit 0")
    for phase in ("reward model", "evaluation", "generation", "scoring", "reference log-probs", "DPO"):
        assert int(loop[phase]["calls"]) >= 1 and float(loop[phase]["peak_mib"]) > 0, phase

    # every job but TRL's ran with datasets hidden too, as on the GPU image without the carried wheels
    hidden = [line for line in log.splitlines() if "hidden from imports" in line]
    assert len(hidden) == 7
    assert sum("datasets" in line for line in hidden) == 5
    assert all("vllm" in line and "bitsandbytes" in line for line in hidden)
