"""The two tiers (tests/conftest.py): a plain run leaves the slow tests out, RUN_SLOW=1 or a marker expression
naming slow brings them in. Checked on test_loop.py, whose tests are all slow, by collection only."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def collected(*args, run_slow: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RUN_SLOW"} | ({"RUN_SLOW": "1"} if run_slow else {})
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_loop.py"]
    cmd += args
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return out.stdout.strip().splitlines()[-1]  # "16/20 tests collected (4 deselected) in 1.0s"


def count(line: str) -> int:
    return int(line.split()[0].split("/")[0])


def test_quick_tier_leaves_slow_tests_out_and_the_whole_suite_takes_them():
    quick, whole = collected(run_slow=False), collected(run_slow=True)
    assert quick.startswith("no tests collected") and "deselected" in quick, quick
    assert count(whole) >= 16 and "(4 deselected)" in whole, whole  # the kill-point sweep stays out
    assert count(collected("-m", "slow and not sweep", run_slow=False)) == count(whole)
