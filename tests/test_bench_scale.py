"""benchmarks/bench_scale.py on its smoke rung (a toy body with Llama 3's vocabulary): one iteration runs through
every phase, the plan's estimate sits beside each measured peak, and the engine's KV cache is the size
`generation.kv_cache_gib=auto` asks for, counted by vLLM itself."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_rung(tmp_path_factory):
    import bench_scale

    models = tmp_path_factory.mktemp("scale")
    args = type("Args", (), {"try_unfit": [], "stop_at": 1.0})()
    return bench_scale.run_rung("tiny", models, args), models


def test_every_phase_runs_with_its_estimate(tiny_rung):
    import bench_scale

    out, _ = tiny_rung
    assert out["status"] == "ran", out["status"]
    assert [r["phase"] for r in out["rows"]] == list(bench_scale.PHASES)
    for row in out["rows"]:
        assert row["peak_mib"] > 0 and row["estimate_mib"] > 0
        assert row["error"] == pytest.approx(row["estimate_mib"] / row["peak_mib"] - 1, abs=1e-3)
    assert out["pairs"] >= 1 and out["rollouts"] == out["samples"] == 8  # 2 prompts x 4 answers
    assert "peak:" in out["plan_text"] and out["plan_fits"]
    text = bench_scale.report([out], "bench_scale.py --rungs tiny")
    assert "| tiny |" in text and "target:" in text


def test_engine_kv_cache_is_the_iterations_answers(tiny_rung):
    """auto: every answer of the iteration in flight at once, each in whole blocks, plus the block vLLM keeps."""
    from lite_rlhf.generate import KV_BLOCK

    out, models = tiny_rung
    config = json.loads((models / "tiny" / "config.json").read_text())
    assert config["vocab_size"] == 128256
    blocks_per_answer = -(-out["engine_length"] // KV_BLOCK)
    assert out["kv_blocks"] == out["samples"] * blocks_per_answer + 1  # vLLM counts the block it holds back
