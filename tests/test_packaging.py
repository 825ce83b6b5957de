"""A non-editable install: the wheel holds lite_rlhf.kernels (never a top-level `kernels`), the demo
config and its data, and `lite-rlhf run --dry-run` works from it."""

import subprocess
import sys
import zipfile
from pathlib import Path

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
