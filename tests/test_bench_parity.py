"""benchmarks/bench_parity.py: its pure helpers (the matched schedule, the spread over seeds, TRL's call of the
reward function), and the --tiny smoke on a prompts file and a reward function it has never seen (slow: GRPO on a
tiny random model, ours, TRL's and the shared evaluation, three processes; the three algorithms' smoke took
2.5 min beside other jobs)."""

import csv
import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_parity.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def settings(bench, algorithm, prompts=8, samples=4, updates=8):
    return bench.schedule(algorithm, prompts, samples, updates, lr=5e-4, beta=0.04, temperature=0.7,
                          max_new_tokens=48, seed=3)  # fmt: skip


def lite_keys(overrides: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
@pytest.mark.parametrize(("prompts", "samples"), [(8, 4), (3, 5), (2, 2)])
def test_policy_gradient_schedules_do_the_same_work(bench, algorithm, prompts, samples):
    s = settings(bench, algorithm, prompts, samples)
    lite, trl = lite_keys(s["lite"]), s["trl"]
    per_update = prompts * samples
    # ours: one iteration per update, its prompts, one optimizer step over all of its answers
    assert lite["loop.iterations"] == "8" and lite["loop.prompts_per_iteration"] == str(prompts)
    assert lite["generation.n"] == str(samples) and lite[f"{algorithm}.epochs"] == "1"
    assert int(lite[f"{algorithm}.micro_batch"]) * int(lite[f"{algorithm}.grad_accum"]) == per_update
    assert lite[f"{algorithm}.drop_no_signal"] == "false" and lite[f"{algorithm}.warmup_ratio"] == "0"
    # TRL: a generation batch of the same answers, one optimizer step on it, 8 steps, in order
    step = trl["per_device_train_batch_size"] * trl["gradient_accumulation_steps"]
    assert step == per_update == trl["per_device_train_batch_size"] * trl["steps_per_generation"]
    assert trl["num_generations"] == samples and trl["max_steps"] == 8 and trl["num_iterations"] == 1
    assert trl["shuffle_dataset"] is False and trl["lr_scheduler_type"] == "constant" and trl["warmup_steps"] == 0
    assert trl["per_device_train_batch_size"] == int(lite[f"{algorithm}.micro_batch"])  # the same forward passes
    assert s["total_samples"] == 8 * per_update
    assert (trl["learning_rate"], trl["beta"], trl["epsilon"]) == (5e-4, 0.04, 0.2)
    assert lite["loop.keep_optimizer"] == "true"  # one AdamW for the run, as TRL's
    assert [lite[f"{algorithm}.{k}"] for k in ("lr", "beta", "eps_low")] == ["0.0005", "0.04", "0.2"]


def test_grpo_aggregation_and_kl_match_ours(bench):
    s = settings(bench, "grpo")
    assert lite_keys(s["lite"])["grpo.aggregation"] == "token"
    assert s["trl"]["loss_type"] == "dapo" and s["trl"]["use_bias_correction_kl"] is False
    assert s["trl"]["scale_rewards"] == "group"


def test_online_dpo_samples_two_per_prompt(bench):
    s = settings(bench, "online_dpo", prompts=6, samples=4)
    lite, trl = lite_keys(s["lite"]), s["trl"]
    assert s["samples"] == 2 and lite["generation.n"] == "2" and lite["loop.algorithm"] == "dpo"
    assert int(lite["dpo.micro_batch"]) * int(lite["dpo.grad_accum"]) == 6 == trl["per_device_train_batch_size"]
    assert trl["train_sampling_strategy"] == "sequential" and trl["beta"] == [0.04]
    assert lite["dpo.rpo_alpha"] == "0" and trl["loss_type"] == "sigmoid"
    assert lite["dpo.train_on"] == "current" and lite["loop.keep_optimizer"] == "true"  # each pair once, one AdamW


def test_schedules_are_valid_configs(bench):
    from lite_rlhf.config import load_config

    for algorithm in bench.ALGORITHMS:
        cfg = load_config(None, settings(bench, algorithm)["lite"])
        assert cfg.loop.iterations == 8 and cfg.run.seed == 3


def test_bad_schedules_are_refused(bench):
    with pytest.raises(ValueError, match="unknown algorithm"):
        settings(bench, "ppo")
    with pytest.raises(ValueError, match="at least 2 samples"):
        settings(bench, "grpo", samples=1)


def test_spread_over_seeds(bench):
    s = bench.spread([1.0, 2.0, 3.0, 4.0, None, math.nan])
    assert s["n"] == 4 and s["mean"] == 2.5 and (s["min"], s["max"]) == (1.0, 4.0)
    assert s["sd"] == pytest.approx(math.sqrt(5 / 3))  # sum of squares 2.25+0.25+0.25+2.25 = 5, over n - 1 = 3
    assert bench.spread([0.7])["sd"] == 0.0 and bench.spread([])["n"] == 0
    curves = [[0.1, 0.2, 0.3], [0.3, 0.4], [0.2, 0.6, 0.9]]
    per_update = bench.curve_over_seeds(curves)
    assert len(per_update) == 2  # the updates every seed has
    assert per_update[1]["mean"] == pytest.approx(0.4) and per_update[1]["sd"] == pytest.approx(0.2)
    assert per_update[0]["sd"] == pytest.approx(statistics.stdev([0.1, 0.3, 0.2]))
    assert bench.pm(bench.spread([1.0, 3.0])) == "2.000 ± 1.414" and bench.pm(bench.spread([])) == "–"
    assert math.isnan(bench.ratio(1.0, 0.0)) and bench.ratio(3.0, 2.0) == 1.5


def test_split_rows(bench):
    rows = [{"id": str(i)} for i in range(7)]
    train, held = bench.split_rows(rows, 4, None, 0)
    assert [r["id"] for r in train] == ["0", "1", "2", "3"] and [r["id"] for r in held] == ["4", "5", "6"]
    assert bench.split_rows(rows, 4, None, 2)[1] == rows[4:6]
    assert bench.split_rows(rows, 7, rows[:3], 0)[1] == rows[:3]
    with pytest.raises(SystemExit, match="needs 8"):
        bench.split_rows(rows, 8, None, 0)
    with pytest.raises(SystemExit, match="no held-out prompts"):
        bench.split_rows(rows, 6, None, 0)


def write_task(tmp: Path) -> tuple[Path, Path]:
    """A prompts file and a reward function the benchmark has never seen: a column of its own, TRL's signature."""
    rows = [{"id": f"q{i}", "prompt": f"Name a colour number {i}.", "colour": ["red", "blue"][i % 2]} for i in range(8)]
    prompts = tmp / "made_up_prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward = tmp / "made_up_reward.py"
    reward.write_text(
        "def colour_reward(prompts, completions, colour, **kwargs):\n"
        "    assert all(isinstance(c, str) for c in completions), completions\n"
        "    return [float(c_ in text.lower()) + len(text) / 100 for text, c_ in zip(completions, colour)]\n"
    )
    return prompts, reward


def test_trl_call_of_the_reward_is_ours(bench, tmp_path):
    prompts, reward = write_task(tmp_path)
    spec = {"files": {"train": str(prompts)}, "reward": f"{reward}:colour_reward"}
    seen = []
    fn = bench.trl_reward(spec, seen)
    assert fn.__name__ == "colour_reward"
    completions = [[{"role": "assistant", "content": "Red it is"}], [{"role": "assistant", "content": "green"}]]
    got = fn(prompts=[[{"role": "user", "content": "x"}]] * 2, completions=completions, completion_ids=[[1], [2]],
             prompt_id=["q0", "q1"], trainer_state=None, log_extra=None, log_metric=None)  # fmt: skip
    assert got == pytest.approx([1.09, 0.05]) and seen == [pytest.approx(0.57)]  # q0 asks red, q1 blue


@pytest.mark.slow
def test_tiny_smoke_on_an_unseen_task(bench, tmp_path):
    prompts, reward = write_task(tmp_path)
    results = tmp_path / "results"
    table = bench.main(["--tiny", "--seeds", "1", "--algorithms", "grpo", "--prompts", str(prompts),
                        "--reward", f"{reward}:colour_reward", "--work", str(tmp_path / "work"),
                        "--results", str(results)])  # fmt: skip
    with (results / "bench_parity.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["algorithm"], r["library"]) for r in rows) == sorted(("grpo", lib) for lib in bench.LIBRARIES)
    for r in rows:
        curve = [float(v) for v in r["curve"].split()]
        assert len(curve) == 2 and all(math.isfinite(v) for v in curve), r
        assert math.isfinite(float(r["heldout_reward"])) and float(r["wall_s"]) > 0 and float(r["peak_mib"]) > 0, r
        assert r["heldout_gold"] == ""  # no demo checks on these prompts
    text = (results / "bench_parity.md").read_text()
    assert "| grpo | lite |" in text and "| grpo | trl |" in text and "## What is not matched" in text
    assert (results / "bench_parity.png").stat().st_size > 0
    assert set(table) == {"pi0", "grpo"}
