"""Runs the Triton-path cases (triton_cases.py) in a subprocess under TRITON_INTERPRET=1.

The variable has to be set before Triton is imported, and must not be set for the rest of the suite
(the interpreter is ~100x slower than torch), hence a separate process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
PROJECT = HERE.parent.parent


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "triton_cases.py")]
    proc = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout[-20000:] + proc.stderr[-5000:]
    assert proc.returncode == 0, f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{output}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], output
