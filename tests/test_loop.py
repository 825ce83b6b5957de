"""The loop end to end on a tiny random Llama: killed with SIGKILL at every kill point (before each
stage's commit, after its files are written but before its mark, and inside the long stages), resumed
each time, and compared with an uninterrupted run: samples, scores, pairs, adapter tensors, eval.json,
noise.json, summary.json, report.md and every metrics.jsonl line, exactly.

CI runs the chained test (each restart dies at the next point); `pytest -m sweep` kills a fresh run
at each point in turn and resumes it once."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lite_rlhf.demo.task import split_prompts
from lite_rlhf.models import make_tiny_model

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent / "lite-rlhf"
TIMING = ("wall_seconds", "train_seconds")  # the only figures allowed to differ


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    model = make_tiny_model(root / "tiny", hidden_size=128, heads=2, kv_heads=1, layers=2)
    splits = split_prompts()
    files = {}
    for name, rows in (("prompts", splits["prompts"][:8]), ("val", splits["val_prompts"][:3]),
                       ("test", splits["test_prompts"][:3])):  # fmt: skip
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [
        {"prompt": r["prompt"], "chosen": f"the {r['topic']} is nice", "rejected": "no no no no"}
        for r in splits["rm_prompts"][:12]
    ]
    files["prefs"] = root / "prefs.jsonl"
    files["prefs"].write_text("".join(json.dumps(p) + "\n" for p in pairs))
    offline = [
        {"prompt": r["prompt"], "chosen": f"a {r['topic']}", "rejected": "no"} for r in splits["rm_prompts"][12:14]
    ]
    files["offline"] = root / "offline.jsonl"
    files["offline"].write_text("".join(json.dumps(p) + "\n" for p in offline))
    cfg = {
        "model": {"name": str(model), "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16},
        "data": {"prompts": str(files["prompts"]), "val_prompts": str(files["val"]),
                 "test_prompts": str(files["test"]), "preferences": str(files["prefs"]),
                 "offline_pairs": str(files["offline"]), "max_length": 256},
        "reward": {"lr": 1e-3, "micro_batch": 4, "grad_accum": 1},
        "generation": {"backend": "vllm", "n": 3, "temperature": 1.0, "max_new_tokens": 12, "kv_cache_gib": 0.25},
        "pairs": {"allow_truncated": True},  # a random model rarely stops by itself
        "dpo": {"lr": 1e-3, "micro_batch": 2, "grad_accum": 1, "epochs": 1.0},
        "loop": {"iterations": 2, "prompts_per_iteration": 4},
        "eval": {"samples_per_prompt": 2},
        "run": {"quiet": True},
    }  # fmt: skip
    path = root / "tiny.yaml"
    path.write_text("# tiny loop for the tests\n" + yaml.safe_dump(cfg))
    clean = root / "clean" / "run"  # run directories share their name: report.md starts with it
    log = root / "points.txt"
    out = run(path, clean, log=log)
    assert out.returncode == 0, out.stderr[-3000:]
    points = list(dict.fromkeys(log.read_text().split()))  # in order, each once
    return root, path, clean, points


def run(config: Path, out_dir: Path, kill_at: str | None = None, log: Path | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LITE_RLHF_KILL")}
    if kill_at:
        env["LITE_RLHF_KILL_AT"] = kill_at
    if log:
        env["LITE_RLHF_KILL_LOG"] = str(log)
    return subprocess.run(
        [str(BIN), "run", str(config), f"run.out_dir={out_dir}"], capture_output=True, text=True, env=env, timeout=900
    )


def artifacts(out: Path) -> dict:
    """Everything a run leaves, as comparable values: JSON/JSONL parsed (timings removed), text as is,
    adapter tensors as exact bit patterns."""
    found = {}
    for path in sorted(out.rglob("*")):
        rel = str(path.relative_to(out))
        if path.is_symlink():
            found[rel] = os.readlink(path)
        elif path.suffix in (".jsonl", ".json") and rel != "state.json":
            text = path.read_text()
            rows = [json.loads(x) for x in text.splitlines()] if path.suffix == ".jsonl" else [json.loads(text)]
            found[rel] = [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
        elif path.suffix in (".md", ".yaml"):
            skip = (*TIMING, "out_dir:")  # config.yaml names the directory
            found[rel] = "\n".join(x for x in path.read_text().splitlines() if not any(t in x for t in skip))
        elif path.suffix == ".safetensors":
            found[rel] = {k: v.view(torch.int32 if v.dtype == torch.float32 else v.dtype).tolist()
                          for k, v in load_file(path).items()}  # fmt: skip
    return found


def differences(a: dict, b: dict) -> list[str]:
    return sorted(set(a) ^ set(b)) + [k for k in sorted(set(a) & set(b)) if a[k] != b[k]]


def test_the_run_has_every_artifact(setup):
    root, _, clean, points = setup
    a = artifacts(clean)
    for must in ("reward/head.safetensors", "iter_000/eval.json", "iter_000/noise.json", "offline_pairs.jsonl",
                 "iter_001/samples.jsonl", "iter_001/scores.jsonl", "iter_002/pairs.jsonl",
                 "iter_002/policy/adapter_model.safetensors", "iter_002/eval.json", "best", "report.md",
                 "summary.json", "metrics.jsonl"):  # fmt: skip
        assert must in a, must
    assert [m["iteration"] for m in a["metrics.jsonl"] if m["stage"] == "eval"] == [0, 1, 2]
    assert [m["iteration"] for m in a["metrics.jsonl"] if m["stage"] == "pairs"] == [1, 2]
    rows = [x for x in a["report.md"].splitlines() if x.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2 and not any("| – |" in x for x in rows), rows  # pairs columns filled
    stages = {p.split(":")[0] for p in points}
    for name in ("reward", "iter_000/eval", "iter_000/noise", "offline_pairs", "iter_001/samples", "iter_001/scores",
                 "iter_001/pairs", "iter_001/policy", "iter_001/eval", "iter_001/best", "iter_001/report", "summary",
                 "report"):  # fmt: skip
        assert name in stages, name
    for inside in ("reward:step", "iter_001/pairs:reference", "iter_001/policy:step", "iter_002/policy:written"):
        assert inside in points, inside


def test_killed_at_every_point_in_turn_resumes_to_the_same_artifacts(setup):
    """One run killed at each point in turn (every restart resumes, then dies at the next point)."""
    root, config, clean, points = setup
    crashed = root / "chained" / "run"
    for point in points:
        out = run(config, crashed, kill_at=point)
        assert out.returncode == -9, f"not killed at {point}: {out.returncode} {out.stderr[-2000:]}"
    final = run(config, crashed)
    assert final.returncode == 0, final.stderr[-3000:]
    print(f"killed and resumed at {len(points)} kill points")
    assert differences(artifacts(clean), artifacts(crashed)) == []


def test_comparison_sees_a_one_ulp_change(setup, tmp_path):
    root, _, clean, _ = setup
    copy = tmp_path / "run"
    shutil.copytree(clean, copy, symlinks=True)
    path = copy / "iter_002" / "policy" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[0]
    flat = tensors[key].view(-1)
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))
    save_file(tensors, path, metadata={"format": "pt"})
    assert differences(artifacts(clean), artifacts(copy)) == ["iter_002/policy/adapter_model.safetensors"]


def test_a_different_config_is_refused_and_quiet_is_not_identity(setup):
    root, config, clean, _ = setup
    env = {k: v for k, v in os.environ.items() if not k.startswith("LITE_RLHF_KILL")}
    other = subprocess.run([str(BIN), "run", str(config), f"run.out_dir={clean}", "dpo.beta=0.3"],
                           capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert other.returncode == 2 and "dpo.beta" in other.stderr and "Traceback" not in other.stderr, other.stderr
    loud = subprocess.run([str(BIN), "run", str(config), f"run.out_dir={clean}", "run.quiet=false"],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert loud.returncode == 0, loud.stderr[-2000:]


@pytest.mark.sweep
def test_killed_once_at_each_point_resumes_to_the_same_artifacts(setup):
    root, config, clean, points = setup
    want = artifacts(clean)
    for point in points:
        out_dir = root / "sweep" / point.replace("/", "_").replace(":", "_") / "run"
        killed = run(config, out_dir, kill_at=point)
        assert killed.returncode == -9, f"not killed at {point}"
        resumed = run(config, out_dir)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert differences(want, artifacts(out_dir)) == [], point
    print(f"swept {len(points)} kill points")
