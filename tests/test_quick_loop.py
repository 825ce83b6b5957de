"""The loop end to end in the quick tier: one small DPO run on a tiny random Llama with the HF engine, in this
process, from the reward model to the report; two iterations, online (dpo.train_on=current) with one optimizer
for the run (loop.keep_optimizer). The loop's engine (vLLM), its kill points and its other
algorithms are the whole suite's (tests/test_loop.py, RUN_SLOW=1)."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from test_probes import cli_in_process, jsonl

from lite_rlhf.models import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_small_dpo_run_goes_from_reward_model_to_report(tmp_path):
    model = make_tiny_model(tmp_path / "tiny")
    topics = ["sea", "cat", "dog", "sun", "fox", "tree", "rain", "moon"]
    prefs = [{"prompt": f"Describe the {t}.", "chosen": f"The {t} is nice.", "rejected": "no no"} for t in topics]
    prompts = jsonl(tmp_path / "p.jsonl", [{"prompt": f"Describe a {t}."} for t in topics])
    held = jsonl(tmp_path / "v.jsonl", [{"prompt": f"Describe my {t}."} for t in topics[4:6]])
    run, prefs = tmp_path / "run", jsonl(tmp_path / "r.jsonl", prefs)
    out = cli_in_process(
        "run", f"model.name={model}", "model.dtype=float32", "lora.r=4", f"data.preferences={prefs}",
        f"data.prompts={prompts}", f"data.val_prompts={held}", f"data.test_prompts={held}", "generation.backend=hf",
        "generation.n=2", "generation.max_new_tokens=6", "pairs.allow_truncated=true", "loop.iterations=2",
        "loop.keep_optimizer=true", "dpo.train_on=current",
        "reward.micro_batch=4", "reward.grad_accum=1", "dpo.micro_batch=2", "dpo.grad_accum=1", "dpo.lr=1e-2",
        "dpo.epochs=1",
        "eval.samples_per_prompt=1", f"run.out_dir={run}", "--quiet",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "lite-rlhf: done; best iteration" in out.stdout
    samples = [json.loads(x) for x in (run / "iter_001" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 2  # n answers per prompt (8 prompts over 2 iterations)
    scores = (run / "iter_001" / "scores.jsonl").read_text().splitlines()
    assert len(scores) == len(samples)
    assert (run / "iter_001" / "pairs.jsonl").read_text().strip(), "no pairs: DPO trained on nothing"
    lora_b = [
        t for k, t in load_file(run / "iter_001" / "policy" / "adapter_model.safetensors").items() if "lora_B" in k
    ]
    assert lora_b and any(t.abs().max() > 0 for t in lora_b), "the policy adapter is still its zero initialisation"
    assert os.readlink(run / "best") in ("iter_000/policy", "iter_001/policy", "iter_002/policy")
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if m["stage"] == "eval"] == [0, 1, 2]
    pairs = {t: len((run / f"iter_{t:03d}" / "pairs.jsonl").read_text().splitlines()) for t in (1, 2)}
    steps = {t: sum(m["stage"] == "dpo" and m["iteration"] == t for m in metrics) for t in (1, 2)}
    assert pairs[1] and steps[2] == math.ceil(pairs[2] / 2)  # this iteration's pairs alone, 2 per step
    # one AdamW for the run: after update 2 its step count is both updates' steps
    state = torch.load(run / "iter_002" / "optimizer" / "state.pt", weights_only=True)
    assert {int(s["step"]) for s in state["dpo"].values()} == {steps[1] + steps[2]}
    assert (run / "report.md").read_text().startswith("#") and (run / "summary.json").is_file()
