"""benchmarks/demo_seeds.py on a tiny random Llama: 2 seeds of the demo task (its test prompts carry the gold
check) into a temporary directory. The CSV has one row per seed holding that seed's own figures (read here from
its run directory), the markdown both seeds and the aggregate line, and the same command again reruns nothing."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lite_rlhf.demo.task import split_prompts
from lite_rlhf.models import make_tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_seeds.py"
SEEDS = ["3", "4"]
PAIRED = ("gold_max_words", "gold_keyword", "gold_on_topic", "gold_real_answer", "length_chars")
TAX = ("tax_on_topic", "tax_no_repetition", "tax_real_answer", "tax_words")  # the alignment-tax panel


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_seeds")
    cfg = {
        "model": {"name": str(make_tiny_model(root / "tiny")), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"prompts": "demo", "max_length": 128},  # the shipped splits and reward pairs
        "reward": {"lr": 1e-3, "epochs": 0.05, "micro_batch": 8, "grad_accum": 1, "allow_weak": True},
        "generation": {"backend": "hf", "n": 2, "temperature": 1.0, "max_new_tokens": 8},
        "pairs": {"allow_truncated": True},  # a random model rarely stops by itself
        "dpo": {"lr": 1e-2, "micro_batch": 2, "grad_accum": 1, "epochs": 2.0},  # moves the policy: best may be 1
        "loop": {"iterations": 1, "prompts_per_iteration": 4},
        "eval": {"samples_per_prompt": 1},
    }  # fmt: skip
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, str(SCRIPT), str(root / "tiny.yaml"), "--seeds", "2", "--first", SEEDS[0],
           "--root", str(root / "runs"), "--results", str(root / "results"), "eval.max_prompts=4"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("LITE_RLHF_KILL")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root, cmd, env, out


def rows_of(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def rows(results: Path) -> list[dict]:
    return rows_of(results / "demo_seeds.csv")


def same(cell: str, value) -> bool:
    return cell == "" if value is None else float(cell) == float(value)


@pytest.mark.slow
def test_one_row_per_seed_with_its_own_figures(study):
    root, _, _, out = study
    got = rows(root / "results")
    assert [r["seed"] for r in got] == SEEDS
    for r in got:
        run = root / "runs" / f"seed_{r['seed']}"
        assert yaml.safe_load((run / "config.yaml").read_text())["run"]["seed"] == int(r["seed"])
        summary = json.loads((run / "summary.json").read_text())
        best = summary["best_iteration"]
        pi0, top = (json.loads((run / f"iter_{t:03d}" / "eval.json").read_text()) for t in (0, best))
        oracle = json.loads((run / "reward" / "metrics.json").read_text())
        assert "gold_gain" in summary and "gold_keyword" in pi0  # the demo's gold check reached the tiny run
        want = {"best_iteration": best, "gold_pi0": summary["gold_pi0"], "gold_best": summary["gold_best"],
                "gold_gain": summary["gold_gain"], "gain_ci_lo": summary["gold_gain_ci95"][0],
                "gain_ci_hi": summary["gold_gain_ci95"][1], "gold_noise": summary["gold_noise"],
                "wall_seconds": summary["wall_seconds"], "kl_best": top["kl"], "rm_accuracy": oracle["eval_accuracy"],
                "rm_accuracy_chosen_longer": oracle["eval_accuracy_chosen_longer"],
                **{f"{k}_{w}": e[k] for k in PAIRED + TAX for w, e in (("pi0", pi0), ("best", top))}}  # fmt: skip
        assert {k: r[k] for k in want if not same(r[k], want[k])} == {}
        assert (
            r["study"] and r["revision"] not in ("", "unknown") and r["cpu"] and r["overrides"] == "eval.max_prompts=4"
        )
        assert float(r["process_seconds"]) >= float(r["wall_seconds"]) > 0 and float(r["peak_rss_mib"]) > 100
    assert out.stdout.count("running ->") == 2


@pytest.mark.slow
def test_markdown_has_every_seed_and_the_aggregate(study):
    root = study[0]
    (md,) = (root / "results").glob("demo_seeds_*.md")
    lines = md.read_text().splitlines()
    seeds = lambda part: [line.split("|")[1].strip() for line in part if line.startswith("| ") and line[2].isdigit()]
    aggregate = next(i for i, line in enumerate(lines) if line.startswith("| **all"))
    assert seeds(lines[:aggregate]) == SEEDS
    assert any(line.startswith("| **all 2** |") and "of 2 above 0" in line for line in lines)
    panel = lines[lines.index("| seed | on topic | no repetition | real answer | words |") + 2 :]
    assert seeds(panel) == SEEDS and all(line.count(" → ") == 4 for line in panel)


def test_a_csv_with_fewer_columns_is_widened_not_misaligned(tmp_path):
    """A study's CSV written before the script gained a figure: its rows keep their cells, blank in the new column."""
    sys.path.insert(0, str(SCRIPT.parent))
    from _memory import append_csv

    path = tmp_path / "rows.csv"
    append_csv(path, ["seed", "gain"], [{"seed": 0, "gain": 0.1}])
    append_csv(path, ["seed", "gain", "tax"], [{"seed": 1, "gain": 0.2, "tax": 0.9}])
    append_csv(path, ["seed", "gain"], [{"seed": 2, "gain": 0.3}])
    assert rows_of(path) == [{"seed": "0", "gain": "0.1", "tax": ""}, {"seed": "1", "gain": "0.2", "tax": "0.9"},
                             {"seed": "2", "gain": "0.3", "tax": ""}]  # fmt: skip


@pytest.mark.slow
def test_the_same_command_again_reruns_nothing(study):
    root, cmd, env, _ = study
    before = rows(root / "results")
    stamps = [(root / "runs" / f"seed_{s}" / "summary.json").stat().st_mtime_ns for s in SEEDS]
    start = time.perf_counter()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert time.perf_counter() - start < 20 and "running" not in again.stdout
    assert rows(root / "results") == before
    assert [(root / "runs" / f"seed_{s}" / "summary.json").stat().st_mtime_ns for s in SEEDS] == stamps
    # Another results folder: the finished seeds are read from their run directories, not run again.
    fresh = [*cmd[: cmd.index("--results") + 1], str(root / "fresh"), *cmd[cmd.index("--results") + 2 :]]
    read = subprocess.run(fresh, capture_output=True, text=True, env=env, timeout=120)
    assert read.returncode == 0 and "running" not in read.stdout, read.stderr[-3000:]
    got = rows(root / "fresh")
    assert [r["seed"] for r in got] == SEEDS and [r["gold_gain"] for r in got] == [r["gold_gain"] for r in before]
    assert [r["process_seconds"] for r in got] == ["", ""]  # not measured: they ran before


def test_bad_arguments_are_one_line_and_exit_2(tmp_path):
    for args in (["--seeds", "0"], [str(tmp_path / "missing.yaml"), "--seeds", "1"]):
        out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_the_aggregate_line_counts_what_it_says():
    """Two made-up seeds: gains +0.1 and +0.3 (one interval above zero); the first loses on-topic gold by less
    than the noise (0.05), the second keyword gold by more."""
    spec = importlib.util.spec_from_file_location("demo_seeds", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    FIGURES, table = module.FIGURES, module.table

    base = dict.fromkeys(FIGURES, "0.5") | {"gold_noise": "0.05"}
    rows = [base | {"seed": "0", "gold_gain": "0.1", "gain_ci_lo": "0.02", "gain_ci_hi": "0.2",
                    "gold_on_topic_best": "0.47"},
            base | {"seed": "1", "gold_gain": "0.3", "gain_ci_lo": "-0.01", "gain_ci_hi": "0.5",
                    "gold_keyword_best": "0.4"}]  # fmt: skip
    (last,) = [line for line in table("made-up", rows, "head").splitlines() if line.startswith("| **all")]
    assert "+0.200 ± 0.141 (min +0.100, max +0.300)" in last and "1 of 2 above 0" in last and "**1 of 2**" in last


@pytest.mark.slow
def test_answers_side_by_side_are_the_runs_own(study):
    root = study[0]
    run = root / "runs" / f"seed_{SEEDS[0]}"
    script = SCRIPT.parent / "demo_answers.py"
    out = subprocess.run([sys.executable, str(script), str(run), "--per-kind", "1"], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    best = json.loads((run / "summary.json").read_text())["best_iteration"]
    first = {t: {r["prompt_id"]: r["text"] for r in map(json.loads, (run / f"iter_{t:03d}/eval_samples.jsonl")
                 .read_text().splitlines()) if r["index"] == 0} for t in (0, best)}  # fmt: skip
    table = out.stdout.strip().splitlines()
    assert table[0] == f"| prompt | π0 | best (iteration {best}) |" and len(table) == 4  # one prompt of each kind
    ids = {p["prompt"]: p["id"] for p in split_prompts()["test_prompts"]}
    cell = lambda text: text.replace("\n", " ").replace("|", "\\|")  # noqa: E731
    for line in table[2:]:
        prompt, a, b = (c.strip() for c in line.strip().strip("|").split(" | "))
        pid = ids[prompt]
        assert a[:2] in ("✓ ", "✗ ") and b[:2] in ("✓ ", "✗ ")
        assert (a[2:].strip(), b[2:].strip()) == (cell(first[0][pid]).strip(), cell(first[best][pid]).strip())
    missing = subprocess.run([sys.executable, str(script), str(root)], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "not a finished run" in missing.stderr
