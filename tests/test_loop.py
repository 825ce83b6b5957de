"""The loop end to end on a tiny random Llama, DPO (with offline pairs) and RAFT (from an SFT stage):
killed with SIGKILL at every kill point (before each stage's commit, after its files are written but
before its mark, and inside the long stages), resumed each time, and compared with an uninterrupted
run: samples, scores, pairs or winners, adapter tensors, eval.json, noise.json, summary.json,
report.md and every metrics.jsonl line, exactly.

CI runs the chained test (each restart dies at the next point); `pytest -m sweep` kills a fresh run
at each point in turn and resumes it once."""

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lite_rlhf.demo.task import split_prompts
from lite_rlhf.models import make_tiny_model

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent / "lite-rlhf"
TIMING = ("wall_seconds", "train_seconds", "scoring_seconds")  # the only figures allowed to differ


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny model, the prompt splits, reward pairs, offline pairs and SFT conversations, and the config
    both algorithms share."""
    root = tmp_path_factory.mktemp("loop")
    model = make_tiny_model(root / "tiny", hidden_size=128, heads=2, kv_heads=1, layers=2)
    splits = split_prompts()
    rm = splits["rm_prompts"]
    rows = {
        "prompts": splits["prompts"][:8],
        "val": splits["val_prompts"][:3],
        "test": splits["test_prompts"][:3],
        "prefs": [{"prompt": r["prompt"], "chosen": f"the {r['topic']} is nice", "rejected": "no no no no"}
                  for r in rm[:12]],
        "offline": [{"prompt": r["prompt"], "chosen": f"a {r['topic']}", "rejected": "no"} for r in rm[12:14]],
        "sft": [{"prompt": r["prompt"], "completion": "it is nice."} for r in rm[14:30]],
    }  # fmt: skip
    files = {}
    for name, items in rows.items():
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in items))
    # the reward pairs again, as a hub repository lays them out, under other column names (the RAFT run reads them)
    theirs = [{"instruction": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows["prefs"]]
    files["prefs_hub"] = root / "prefs_hub"
    (files["prefs_hub"] / "data").mkdir(parents=True)
    for split, part in (("train", theirs[:9]), ("test", theirs[9:])):
        parquet = files["prefs_hub"] / "data" / f"{split}-00000-of-00001.parquet"
        datasets.Dataset.from_list(part).to_parquet(str(parquet))
    cfg = {
        "model": {"name": str(model), "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16},
        "data": {"prompts": str(files["prompts"]), "val_prompts": str(files["val"]),
                 "test_prompts": str(files["test"]), "preferences": str(files["prefs"]), "max_length": 256},
        "reward": {"lr": 1e-3, "micro_batch": 4, "grad_accum": 1},
        "generation": {"backend": "vllm", "n": 3, "temperature": 1.0, "max_new_tokens": 12, "kv_cache_gib": 0.25},
        "loop": {"iterations": 2, "prompts_per_iteration": 4},
        "eval": {"samples_per_prompt": 2},
        "run": {"quiet": True},
    }  # fmt: skip
    return root, files, cfg


def clean_run(root: Path, name: str, cfg: dict):
    """Write the config, run it uninterrupted, and return (config path, run directory, kill points)."""
    path = root / f"{name}.yaml"
    path.write_text(f"# tiny {name} loop for the tests\n" + yaml.safe_dump(cfg))
    clean = root / name / "clean" / "run"  # run directories share their name: report.md starts with it
    log = root / f"{name}-points.txt"
    out = run(path, clean, log=log)
    assert out.returncode == 0, out.stderr[-3000:]
    bars = re.findall(
        r"(scoring|comparing|KL estimate|generate|eval|noise|reference log-probs|policy log-probs|dpo|raft|grpo|rloo"
        r"|ppo policy|ppo value|value warm-up|values"
        r"|sft|reward|preference)"
        r": +\d+%",
        out.stderr,
    )
    assert not bars, f"run.quiet=true still drew progress bars: {sorted(set(bars))}"
    points = list(dict.fromkeys(log.read_text().split()))  # in order, each once
    return path, clean, points


@pytest.fixture(scope="module")
def setup(data):
    """DPO with offline pairs."""
    root, files, base = data
    cfg = {**base, "data": {**base["data"], "offline_pairs": str(files["offline"])},
           "pairs": {"allow_truncated": True},  # a random model rarely stops by itself
           "dpo": {"lr": 1e-3, "micro_batch": 2, "grad_accum": 1, "epochs": 1.0}}  # fmt: skip
    path, clean, points = clean_run(root, "dpo", cfg)
    return root / "dpo", path, clean, points


@pytest.fixture(scope="module")
def raft_setup(data):
    """RAFT from a π0 trained here on SFT conversations, winners of every iteration kept. A tiny random
    model rarely stops; SFT on one short answer puts a few percent on the end-of-turn token and 64 new
    tokens let some samples finish, so that RAFT (which never takes a truncated answer) has winners."""
    root, files, base = data
    rewards = root / "my_rewards.py"  # a reward function beside the learned reward: TRL's signature, None allowed
    rewards.write_text("def brevity(prompts, completions, topic_keys, **kwargs):\n"
                       "    return [None if not c.strip() else -len(c) / 100 for c in completions]\n")  # fmt: skip
    hub = {"preferences": str(files["prefs_hub"]), "eval_preferences": f"{files['prefs_hub']}:test",
           "prompt_field": "instruction", "chosen_field": "good", "rejected_field": "bad"}  # the prompt files: ours
    cfg = {**base, "data": {**base["data"], "sft": str(files["sft"]), **hub},
           "sft": {"lr": 1e-2, "epochs": 4.0, "micro_batch": 4, "grad_accum": 1},
           "generation": {**base["generation"], "max_new_tokens": 64},
           "reward": {**base["reward"], "functions": [f"{rewards}:brevity"], "weights": [0.5]},
           "loop": {**base["loop"], "algorithm": "raft"},
           "raft": {"lr": 1e-3, "micro_batch": 2, "grad_accum": 1, "history": "all"}}  # fmt: skip
    path, clean, points = clean_run(root, "raft", cfg)
    return root / "raft", path, clean, points


@pytest.fixture(scope="module")
def preference_setup(data):
    """DPO judged by a pairwise preference model trained here, n = 4 answers ranked by knockout."""
    root, files, base = data
    cfg = {**base, "reward": {**base["reward"], "kind": "preference"},
           "preference": {"lr": 1e-3, "micro_batch": 4, "grad_accum": 1},
           "generation": {**base["generation"], "n": 4},
           "pairs": {"allow_truncated": True, "ranking": "knockout"},
           "dpo": {"lr": 1e-3, "micro_batch": 2, "grad_accum": 1, "epochs": 1.0}}  # fmt: skip
    path, clean, points = clean_run(root, "preference", cfg)
    return root / "preference", path, clean, points


PG_REWARD = ("def brevity(prompts, completions, **kwargs):  # TRL's signature; None: no score for this one\n"
             "    return [None if len(c) % 5 == 0 else -len(c) / 10 for c in completions]\n")


def pg_config(root: Path, base: dict, algorithm: str, section: dict) -> dict:
    """GRPO or RLOO ranked by a reward function alone (reward.kind=functions: no reward model is trained)."""
    rewards = root / "pg_rewards.py"
    rewards.write_text(PG_REWARD)
    return {**base, "reward": {"kind": "functions", "functions": [f"{rewards}:brevity"]},
            "loop": {**base["loop"], "algorithm": algorithm}, algorithm: section}  # fmt: skip


@pytest.fixture(scope="module")
def grpo_setup(data):
    """GRPO, μ = 2 passes over each iteration's answers (the second is off-policy: the ratio moves and clips),
    π0's log-probs for the k3 KL, DAPO's upper clip."""
    root, _, base = data
    section = {"lr": 2e-2, "micro_batch": 4, "grad_accum": 2, "epochs": 2.0, "eps_high": 0.28}
    path, clean, points = clean_run(root, "grpo", pg_config(root, base, "grpo", section))
    return root / "grpo", path, clean, points


@pytest.fixture(scope="module")
def rloo_setup(data):
    """RLOO, on-policy (μ = 1), the KL to π0 in the reward."""
    root, _, base = data
    section = {"lr": 2e-2, "micro_batch": 4, "grad_accum": 2}
    path, clean, points = clean_run(root, "rloo", pg_config(root, base, "rloo", section))
    return root / "rloo", path, clean, points


@pytest.fixture(scope="module")
def ppo_setup(data):
    """PPO judged by the reward model trained here (so the value starts as its copy), n = 2 answers, μ = 2 passes,
    two warm-up steps of the value, the reward normalised by the running mean and std."""
    root, _, base = data
    section = {"lr": 2e-2, "value_lr": 1e-2, "micro_batch": 4, "grad_accum": 1, "epochs": 2.0,
               "value_warmup_steps": 2, "reward_norm": "mean_std"}  # fmt: skip
    cfg = {**base, "generation": {**base["generation"], "n": 2}, "loop": {**base["loop"], "algorithm": "ppo"},
           "ppo": section}  # fmt: skip
    path, clean, points = clean_run(root, "ppo", cfg)
    return root / "ppo", path, clean, points


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
    gaps = [m for m in a["metrics.jsonl"] if m["stage"] == "samples"]  # the engine served each adapter (fp32)
    assert [m["iteration"] for m in gaps] == [1, 2] and all(m["engine_logprob_gap"] < 1e-3 for m in gaps), gaps
    rows = [x for x in a["report.md"].splitlines() if x.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2 and not any("| – |" in x for x in rows), rows  # pairs columns filled
    stages = {p.split(":")[0] for p in points}
    for name in ("reward", "iter_000/eval", "iter_000/noise", "offline_pairs", "iter_001/samples", "iter_001/scores",
                 "iter_001/pairs", "iter_001/policy", "iter_001/eval", "iter_001/best", "iter_001/report", "summary",
                 "report"):  # fmt: skip
        assert name in stages, name
    for inside in ("reward:step", "iter_001/pairs:reference", "iter_001/policy:step", "iter_002/policy:written"):
        assert inside in points, inside
    # the chosen adapter's model card, and export's for the merged weights
    chosen = os.readlink(clean / "best")
    assert [k for k in a if k.endswith("README.md")] == [f"{chosen}/README.md"]
    card = (clean / "best" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "- dpo\n" in card, card[:300]
    assert f"this adapter is `{chosen.split('/')[0]}`" in card and "lite-rlhf run config.yaml" in card
    assert [x for x in card.splitlines() if x.startswith(("| 1 |", "| 2 |"))] == rows  # report.md's table
    merged = root / "merged"
    out = subprocess.run([str(BIN), "export", str(setup[1]), f"run.out_dir={clean}", "--out", str(merged)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    exported = (merged / "README.md").read_text()
    assert exported.startswith("---\nlibrary_name: transformers\n") and "from transformers import" in exported
    assert f"Merged: the adapter `{(clean / 'best').resolve()}`" in exported and rows[-1] in exported


def chained(setup):
    """One run killed at each point in turn (every restart resumes, then dies at the next point)."""
    root, config, clean, points = setup
    crashed = root / "chained" / "run"
    for point in points:
        out = run(config, crashed, kill_at=point)
        assert out.returncode == -9, f"not killed at {point}: {out.returncode} {out.stderr[-2000:]}"
        assert (crashed / ".lite-rlhf.lock").is_file()  # left by the dead process; the next start takes it
    final = run(config, crashed)
    assert final.returncode == 0, final.stderr[-3000:]
    print(f"killed and resumed at {len(points)} kill points")
    assert differences(artifacts(clean), artifacts(crashed)) == []


def test_killed_at_every_point_in_turn_resumes_to_the_same_artifacts(setup):
    chained(setup)


def test_raft_run_trains_sft_then_winners(raft_setup):
    root, _, clean, points = raft_setup
    a = artifacts(clean)
    for must in ("sft/adapter_model.safetensors", "sft/metrics.json", "iter_001/winners.jsonl",
                 "iter_002/winners.jsonl", "iter_002/policy/adapter_model.safetensors", "summary.json"):  # fmt: skip
        assert must in a, must
    assert not any(k.endswith("pairs.jsonl") for k in a)
    reward = a["reward/metrics.json"][0]  # read from the hub-layout directory under its own column names
    assert reward["train_file"].endswith("prefs_hub") and reward["eval_file"].endswith("prefs_hub:test")
    assert (reward["train_pairs"], reward["eval_pairs"]) == (9, 3)
    stages = [m["stage"] for m in a["metrics.jsonl"]]
    assert stages.index("sft") < stages.index("sft_done") < stages.index("reward")
    for t in (1, 2):
        won = a[f"iter_{t:03d}/winners.jsonl"]
        assert won, f"iteration {t} kept no winner"
        samples = {(s["prompt_id"], s["index"]): s for s in a[f"iter_{t:03d}/samples.jsonl"]}
        best: dict[str, tuple] = {}
        for row in a[f"iter_{t:03d}/scores.jsonl"]:  # the argmax of the penalized reward, never truncated
            if samples[(row["prompt_id"], row["index"])]["finish_reason"] == "length":
                continue
            if row["prompt_id"] not in best or row["penalized"] > best[row["prompt_id"]][1]:
                best[row["prompt_id"]] = (row["index"], row["penalized"])
        assert {w["prompt_id"]: (w["index"], w["reward"]) for w in won} == best
        assert [m["iteration"] for m in a["metrics.jsonl"] if m["stage"] == "raft"].count(t) > 0
    # the scores are the learned reward plus 0.5 x the reward function (reward.functions, reward.weights)
    for row in a["iter_001/scores.jsonl"]:
        text = next(s["text"] for s in a["iter_001/samples.jsonl"] if (s["prompt_id"], s["index"]) == (
            row["prompt_id"], row["index"]))  # fmt: skip
        terms = row["terms"]
        assert terms["brevity"] == (-len(text) / 100 if text.strip() else None)
        assert row["reward"] == pytest.approx(terms["reward_model"] + 0.5 * (terms["brevity"] or 0.0))
    # π0 is the SFT adapter: the policy of iteration 0 is its copy
    assert a["iter_000/policy/adapter_model.safetensors"] == a["sft/adapter_model.safetensors"]
    for inside in ("sft:step", "sft", "iter_001/winners", "iter_002/policy:step"):
        assert inside in points, inside


def test_raft_killed_at_every_point_in_turn_resumes_to_the_same_artifacts(raft_setup):
    chained(raft_setup)


def test_preference_run_ranks_by_knockout_and_chooses_by_win_rate(preference_setup):
    root, _, clean, points = preference_setup
    a = artifacts(clean)
    assert "preference/adapter_model.safetensors" in a and not any(k.startswith("reward/") for k in a)
    for t in (1, 2):
        scores = a[f"iter_{t:03d}/scores.jsonl"]
        by_prompt: dict[str, dict[int, float]] = {}
        for row in scores:
            by_prompt.setdefault(row["prompt_id"], {})[row["index"]] = row["reward"]
        for pid, got in by_prompt.items():  # champion, final loser, the worst bracket's two
            assert sorted(got.values()) == [-3, -1, 1, 3], (pid, got)
        for pair in a[f"iter_{t:03d}/pairs.jsonl"]:
            got = by_prompt[pair["prompt_id"]]
            assert (pair["chosen_reward"], pair["rejected_reward"]) == (3, -3)
        cost = [m for m in a["metrics.jsonl"] if m["stage"] == "scores" and m["iteration"] == t][0]
        assert cost["comparisons_per_prompt"] == 4  # 2 shared, 1 per bracket
        assert cost["forwards_per_prompt"] <= 8  # both orders of each (none for identical answers)
    evals = [m for m in a["metrics.jsonl"] if m["stage"] == "eval"]
    assert evals[0]["val_win_rate"] == 0.5 and evals[0]["win_rate"] == 0.5  # π0 against itself
    assert all(e["val_reward"] is None and e["test_reward"] is None for e in evals)
    best = max(range(3), key=lambda i: (evals[i]["val_win_rate"], -i))
    assert os.readlink(clean / "best") == f"iter_{best:03d}/policy"
    assert "by validation win rate against π0" in a["report.md"]
    assert "preference:step" in points and "preference" in {p.split(":")[0] for p in points}


def test_preference_run_killed_at_its_own_points_resumes_to_the_same_artifacts(preference_setup):
    """The preference model's points, the ranking and the win-rate choice: killed at each in turn."""
    root, config, clean, points = preference_setup
    mine = [p for p in points if p.startswith(("preference", "iter_000/eval", "iter_001/scores", "iter_002/scores",
                                               "iter_002/eval", "iter_002/best"))]  # fmt: skip
    chained((root, config, clean, mine))


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


def test_two_runs_on_one_directory_leave_one_runs_artifacts(setup):
    """The second start is refused while the first runs (it names the first's pid), and touches nothing."""
    root, config, clean, _ = setup
    both = root / "both" / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LITE_RLHF_KILL")}
    first = subprocess.Popen([str(BIN), "run", str(config), f"run.out_dir={both}"], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    lock = both / ".lite-rlhf.lock"
    while first.poll() is None and not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
        time.sleep(0.05)
    second = run(config, both)
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2 and f"in use by another lite-rlhf process (pid {first.pid})" in second.stderr
    assert differences(artifacts(clean), artifacts(both)) == []


def test_eval_functions_are_reported_and_never_trained_on(setup):
    """eval.functions: a figure per iteration in eval.json and the report; every sample, pair and trained tensor
    bit-identical to the run without it."""
    root, config, clean, _ = setup
    fns = root / "eval_fns.py"
    fns.write_text("def words(completions, **kwargs):\n    return [len(c.split()) for c in completions]\n")
    cfg = yaml.safe_load(config.read_text())
    cfg["eval"] = {**cfg["eval"], "functions": [f"{fns}:words"]}
    path = root / "dpo-eval-functions.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out_dir = root / "eval-functions" / "run"
    out = run(path, out_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = artifacts(clean), artifacts(out_dir)
    same = [k for k in a if k.endswith((".safetensors", "samples.jsonl", "scores.jsonl", "pairs.jsonl"))]
    assert len(same) > 10 and [k for k in same if a[k] != b[k]] == []
    for t in (0, 1, 2):
        figures, answers = b[f"iter_{t:03d}/eval.json"][0], b[f"iter_{t:03d}/eval_samples.jsonl"]
        test_ids = {p["id"] for p in map(json.loads, Path(cfg["data"]["test_prompts"]).read_text().splitlines())}
        words = [len(r["text"].split()) for r in answers if r["prompt_id"] in test_ids]
        assert figures["fn_words"] == pytest.approx(sum(words) / len(words))
        assert {k: v for k, v in figures.items() if k != "fn_words"} == a[f"iter_{t:03d}/eval.json"][0]
    assert "fn: words" in b["report.md"]


def test_a_damaged_committed_adapter_is_trained_again(setup):
    """A committed adapter made 0 bytes after the run: export refuses it in one line, and the same command runs
    its stage again (said in one line) and ends with the uninterrupted run's artifacts."""
    root, config, clean, _ = setup
    copy = root / "damaged" / "run"
    shutil.copytree(clean, copy, symlinks=True)
    (copy / "iter_002" / "policy" / "adapter_model.safetensors").write_bytes(b"")
    refused = subprocess.run([str(BIN), "export", str(config), f"run.out_dir={copy}", "--adapter",
                              str(copy / "iter_002" / "policy")], capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 2 and "is damaged (0 bytes" in refused.stderr, refused.stderr[-2000:]
    again = run(config, copy)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage 'iter_002/policy' runs again: '" in again.stderr, again.stderr[-2000:]
    assert differences(artifacts(clean), artifacts(copy)) == []


def pg_rollouts(a: dict, t: int) -> dict:
    return {(r["prompt_id"], r["index"]): r for r in a[f"iter_{t:03d}/rollouts.jsonl"]}


def test_grpo_trains_on_every_scored_answer_with_group_advantages(grpo_setup):
    root, _, clean, points = grpo_setup
    a = artifacts(clean)
    assert not any(k.startswith("reward/") for k in a), "reward.kind=functions trains no reward model"
    steps = [m for m in a["metrics.jsonl"] if m["stage"] == "grpo"]
    for t in (1, 2):
        scores = {(r["prompt_id"], r["index"]): r["penalized"] for r in a[f"iter_{t:03d}/scores.jsonl"]}
        samples = {(s["prompt_id"], s["index"]): s for s in a[f"iter_{t:03d}/samples.jsonl"]}
        rolled = pg_rollouts(a, t)
        groups: dict[str, list] = {}
        for key, r in scores.items():
            if r is not None:
                groups.setdefault(key[0], []).append((key, r))
        expected = {}
        for members in groups.values():  # DeepSeekMath's advantage, from the plain formula
            rs = [r for _, r in members]
            if len(rs) >= 2 and len(set(rs)) > 1:
                mean, sd = statistics.mean(rs), statistics.stdev(rs)
                expected |= {key: (r - mean) / (sd + 1e-4) for key, r in members}
        assert set(rolled) == set(expected), "unscored answers and groups without signal are dropped"
        for key, row in rolled.items():
            assert row["reward"] == scores[key] and row["advantage"] == pytest.approx(expected[key], abs=1e-9)
            assert row["response_ids"] == samples[key]["token_ids"]
            assert len(row["old_logps"]) == len(row["ref_logps"]) == len(row["response_ids"])
            assert all(x <= 0 for x in row["old_logps"])
            if t == 1:  # policy_0 is a fresh LoRA: the policy that sampled is π0
                assert row["old_logps"] == pytest.approx(row["ref_logps"], abs=1e-5)
        record = next(m for m in a["metrics.jsonl"] if m["stage"] == "rollouts" and m["iteration"] == t)
        assert record["rollouts_kept"] == len(rolled) and record["signal_share"] == len(
            {k[0] for k in rolled}) / len(groups)  # fmt: skip
        assert 0 < record["rollout_entropy"] <= math.log(512)  # per token, at most log V (the tiny vocabulary)
        n_steps = math.ceil(math.ceil(2 * len(rolled) / 4) / 2)  # μ = 2 passes, 4 answers x 2 per step
        assert [m["step"] for m in steps if m["iteration"] == t] == list(range(1, n_steps + 1))
    drift = [(k, r) for k, r in pg_rollouts(a, 2).items() if r["old_logps"] != pytest.approx(r["ref_logps"], abs=1e-5)]
    assert drift, "policy_1 samples iteration 2: its log-probs are not π0's"
    assert any(m["clip_fraction"] > 0 for m in steps), "the second pass is off-policy: some ratio clips"
    assert all(m["kl"] >= 0 for m in steps) and any(m["kl"] > 0 for m in steps)
    assert a["iter_001/policy/adapter_model.safetensors"] != a["iter_000/policy/adapter_model.safetensors"]
    report = a["report.md"]
    for column in ("answers trained", "groups with signal", "clip fraction", "KL to π0 (update)", "sample reward",
                   "entropy/token"):  # fmt: skip
        assert column in report, column
    for inside in ("iter_001/rollouts:logps", "iter_001/rollouts", "iter_002/policy:step"):
        assert inside in points, inside


def test_grpo_killed_at_its_own_points_resumes_to_the_same_artifacts(grpo_setup):
    """The rollouts (old and π0 log-probs, advantages) and the update's steps, then the stages after it: killed at
    each in turn (the stages GRPO shares with DPO are killed in DPO's chained test; all: the sweep below)."""
    root, config, clean, points = grpo_setup
    mine = [p for p in points if "/rollouts" in p or "/policy" in p or p.startswith(("iter_002/eval", "summary"))]
    assert any(p.endswith("rollouts:logps") for p in mine) and any(p.endswith("policy:step") for p in mine)
    chained((root, config, clean, mine))


@pytest.mark.sweep
def test_grpo_killed_at_every_point_in_turn_resumes_to_the_same_artifacts(grpo_setup):
    chained(grpo_setup)


def test_ppo_runs_with_the_value_as_a_copy_of_the_reward_model_and_a_running_normaliser(ppo_setup):
    root, _, clean, points = ppo_setup
    a = artifacts(clean)
    for must in ("iter_000/value/head.safetensors", "iter_001/value_warmup/adapter_model.safetensors",
                 "iter_001/reward_norm.json", "iter_002/value/adapter_model.safetensors", "summary.json"):  # fmt: skip
        assert must in a, must
    for name in ("adapter_model.safetensors", "head.safetensors"):  # the critic starts as the reward model
        assert a[f"iter_000/value/{name}"] == a[f"reward/{name}"], name
    assert a["iter_001/value_warmup/adapter_model.safetensors"] != a["iter_000/value/adapter_model.safetensors"]
    assert a["iter_002/value/head.safetensors"] != a["iter_001/value/head.safetensors"]
    seen = []
    for t in (1, 2):  # the running moments of every score so far, carried from one iteration to the next
        scores = [r["penalized"] for r in a[f"iter_{t:03d}/scores.jsonl"]]
        seen += scores
        moments = a[f"iter_{t:03d}/reward_norm.json"][0]
        assert moments["count"] == len(seen) and moments["mean"] == pytest.approx(statistics.fmean(seen))
        sd = statistics.pstdev(seen)
        for row in a[f"iter_{t:03d}/rollouts.jsonl"]:
            assert row["reward"] == pytest.approx((row["score"] - statistics.fmean(seen)) / sd)
            assert len(row["old_logps"]) == len(row["ref_logps"]) == len(row["response_ids"])
    metrics = a["metrics.jsonl"]
    warm = [m for m in metrics if m["stage"] == "value_warmup"]
    assert [m["step"] for m in warm] == [1, 2] and all(m["part"] == "value" for m in warm)
    for t in (1, 2):
        parts = [m["part"] for m in metrics if m["stage"] == "ppo" and m["iteration"] == t]
        n_steps = math.ceil(2 * len(a[f"iter_{t:03d}/rollouts.jsonl"]) / 4)
        assert parts == ["advantages"] + ["policy"] * n_steps + ["value"] * n_steps, parts
    assert any(m.get("value_clip_fraction", 0) > 0 for m in metrics if m["stage"] == "ppo")
    for column in ("normalised reward", "value loss", "explained variance", "clip fraction", "KL to π0 (update)",
                   "entropy/token"):  # fmt: skip
        assert column in a["report.md"], column
    for inside in ("iter_000/value", "iter_001/rollouts:logps", "iter_001/value_warmup:step", "iter_001/policy:step"):
        assert inside in points, inside


def test_ppo_killed_at_its_own_points_resumes_to_the_same_artifacts(ppo_setup):
    """The value's start and warm-up, the rollouts, the update's steps (policy and value), then the stages after
    it: killed at each in turn (all points: the sweep below)."""
    root, config, clean, points = ppo_setup
    mine = [p for p in points if p.startswith(("iter_000/value", "iter_002/eval", "summary"))
            or any(k in p for k in ("/rollouts", "/value_warmup", "/policy"))]  # fmt: skip
    assert any(p.endswith("value_warmup:step") for p in mine) and any(p.endswith("policy:step") for p in mine)
    chained((root, config, clean, mine))


@pytest.mark.sweep
def test_ppo_killed_at_every_point_in_turn_resumes_to_the_same_artifacts(ppo_setup):
    chained(ppo_setup)


def test_rloo_advantages_are_leave_one_out_on_the_kl_penalized_reward(rloo_setup):
    root, _, clean, _ = rloo_setup
    a = artifacts(clean)
    beta = 0.05  # rloo.beta's default
    for t in (1, 2):
        rolled = pg_rollouts(a, t)
        assert rolled
        groups: dict[str, list] = {}
        for key, row in rolled.items():
            groups.setdefault(key[0], []).append((key, row["reward"] - beta * (sum(row["old_logps"]) - sum(
                row["ref_logps"]))))  # fmt: skip
        for members in groups.values():
            for key, r in members:
                others = [x for k, x in members if k != key]
                assert rolled[key]["advantage"] == pytest.approx(r - sum(others) / len(others), abs=1e-6)
    steps = [m for m in a["metrics.jsonl"] if m["stage"] == "rloo"]
    assert steps and all(0 <= m["clip_fraction"] <= 1 for m in steps)
    assert a["iter_002/policy/adapter_model.safetensors"] != a["iter_001/policy/adapter_model.safetensors"]


@pytest.mark.sweep
def test_rloo_killed_at_every_point_in_turn_resumes_to_the_same_artifacts(rloo_setup):
    chained(rloo_setup)
