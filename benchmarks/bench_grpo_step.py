"""One GRPO update, lite-rlhf against TRL's GRPOTrainer with peft LoRA: peak memory and seconds per step on CPU.

    .venv/bin/python benchmarks/bench_grpo_step.py                        # 8 answers of 128 tokens, 3 steps
    .venv/bin/python benchmarks/bench_grpo_step.py --answers 16 --length 256 --variants lite,trl

Both train SmolLM2-135M-Instruct (the embedded model) in fp32 on the CPU, LoRA with the rank, alpha and target
modules of configs/demo.yaml, on the same samples: two demo prompts, `--answers` answers split between them (each
answer `--length` tokens of the demo's preference texts, ending with the end-of-turn token), fixed advantages,
beta 0.04 (a π0 pass per answer), token-mean aggregation (TRL: loss_type "bnpo"), ε 0.2, μ = 1, one micro-batch
per optimizer step holding every answer, the same learning rate. Each variant runs in a fresh process:

- ``lite``: ``SharedModel`` and the loop's own functions: ``grpo.token_logps`` for the old policy's and π0's
  per-token log-probs (once per answer, before the steps: the rollouts stage, the old policy's pass with its
  entropy per token as the loop computes it; TRL's variants compute theirs in each step's forward, not in
  this pass), then ``grpo.train_pg``, whose forward goes through the fused
  log-prob kernel (no ``[tokens, vocab]`` logits). The entropy's price: the old policy's pass again without it and
  with it, warm, three times each alternated, the difference of the medians.
- ``trl``: TRL 1.16 ``GRPOTrainer`` built with a peft ``LoraConfig`` (no gradient checkpointing); the old policy's
  and π0's (adapter disabled) per-token log-probs through TRL's own ``_get_per_token_logps_and_entropies``, as its
  generation phase computes them when it reuses a batch (``num_iterations`` > 1; with 1 it takes the detached
  current ones and would need no first pass), then per step ``compute_loss`` (TRL's loss code and forward, which
  also computes the entropy), backward, clipping at 1.0 and its optimizer's step.
- ``trl_gc``: ``trl`` with gradient checkpointing (``GRPOConfig.gradient_checkpointing=True``).

The TRL variants start from the LoRA weights ``lite`` drew (saved by it: run ``lite`` first, as the default order
does), so the loss of step 2 (after one update at the same learning rate; the first loss is 0 with group-centred
advantages of equal-length answers) checks that both made the same update. Figures per variant: the log-prob
passes before the steps (seconds), seconds per step (the mean over steps 2..k), and peak resident memory above
the baseline taken after the imports (``VmHWM``, reset there; set-up and steps), with ``MALLOC_MMAP_THRESHOLD_``
set as every benchmark here does (``_memory.py``). Raw rows go to ``benchmarks/results/bench_grpo_step.csv``, the
table with the ratios lite / TRL to ``bench_grpo_step.md``.
Run it on an idle machine: on 2 cores a figure taken beside another job comes out several times slower.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _memory import (  # noqa: E402
    current_rss_mib,
    peak_mib,
    reset_peak,
    step_bench_main,
)

ROOT = HERE.parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
RESULTS = HERE / "results"
VARIANTS = ("lite", "trl", "trl_gc")
LR, BETA = 1e-4, 0.04
FIELDS = ["revision", "machine", "variant", "answers", "length", "steps", "logps_s", "s_per_step", "peak_mib",
          "setup_peak_mib", "train_peak_mib", "baseline_mib", "loss_step2", "old_pass_s", "entropy_s"]  # fmt: skip


def build_samples(tokenizer, answers: int, length: int) -> list[dict]:
    """Two demo prompts, `answers` answers alternating between them, each `length` tokens (the last the
    end-of-turn token), and fixed advantages summing to zero within each prompt."""
    from lite_rlhf.data import prompt_ids, response_ids
    from lite_rlhf.demo.task import split_prompts

    prompts = split_prompts()["prompts"][:2]
    text = " ".join(json.loads(line)["chosen"] for line in (ROOT / "lite_rlhf/demo/preferences_train.jsonl")
                    .read_text().splitlines()[:200])  # fmt: skip
    words, eos = text.split(), response_ids(tokenizer, "")[-1:]
    out = []
    for i in range(answers):
        body = response_ids(tokenizer, " ".join(words[i * 7 : i * 7 + length]))[: length - 1]
        sign = 1.0 if (i // 2) % 2 == 0 else -1.0
        asked = [{"role": "user", "content": prompts[i % 2]["prompt"]}]
        out.append({"prompt_id": f"p{i % 2}", "prompt_ids": prompt_ids(tokenizer, asked), "answer_ids": body + eos,
                    "advantage": sign * (0.5 + 0.1 * (i % 3))})  # fmt: skip
    by_prompt = {}
    for s in out:  # centre each group: advantages from a group sum to zero
        by_prompt.setdefault(s["prompt_id"], []).append(s)
    for group in by_prompt.values():
        mean = sum(s["advantage"] for s in group) / len(group)
        for s in group:
            s["advantage"] -= mean
    return out


def lora_overrides() -> list[str]:
    return ["loop.algorithm=grpo", f"grpo.lr={LR}", f"grpo.beta={BETA}", "grpo.aggregation=token",
            "grpo.warmup_ratio=0", "grpo.grad_accum=1", "generation.temperature=1.0"]  # fmt: skip


def run_lite(spec: dict, t0: float) -> dict:
    from lite_rlhf.algorithms.grpo import Rollout, token_logps, train_pg
    from lite_rlhf.config import load_config
    from lite_rlhf.models import load_tokenizer, resolve_model
    from lite_rlhf.roles import SharedModel

    n = spec["answers"]
    cfg = load_config(DEMO_CONFIG, [*lora_overrides(), f"grpo.micro_batch={n}", f"grpo.epochs={spec['steps']}",
                                    f"data.max_length={spec['length'] + 128}"])  # fmt: skip
    samples = build_samples(load_tokenizer(resolve_model(cfg.model.name)), n, spec["length"])
    model = SharedModel(cfg, device="cpu")
    ids = {s["prompt_id"]: s["prompt_ids"] for s in samples}
    rows = [(s["prompt_ids"], s["answer_ids"]) for s in samples]
    start = time.perf_counter()
    old, _ = token_logps(model, "policy", rows, cfg.data, n, 1.0, quiet=True, entropy=True)  # as the rollouts stage
    ref = token_logps(model, "reference", rows, cfg.data, n, 1.0, quiet=True)
    logps_s = time.perf_counter() - start
    plain, with_entropy = [], []  # the old policy's pass without and with the entropy, warm, alternated
    for _ in range(3):
        for flag, times in ((False, plain), (True, with_entropy)):
            start = time.perf_counter()
            token_logps(model, "policy", rows, cfg.data, n, 1.0, quiet=True, entropy=flag)
            times.append(time.perf_counter() - start)
    plain_s = statistics.median(plain)
    entropy_s = statistics.median(with_entropy) - plain_s  # what the entropy adds to that pass
    batch = [Rollout(s["prompt_id"], 0, s["answer_ids"], 0.0, s["advantage"], o, r)
             for s, o, r in zip(samples, old, ref, strict=True)]  # fmt: skip
    model.save_adapter("policy", Path(spec["tmp"]) / "lora_init")  # TRL's variants start from the same LoRA
    setup_hwm = peak_mib()
    reset_peak()
    ends, records = [time.perf_counter()], []
    train_pg(model, batch, ids, cfg, seed=0, quiet=True,
             on_step=lambda rec: (records.append(rec), ends.append(time.perf_counter())))  # fmt: skip
    return {"logps_s": logps_s, "plain_s": plain_s, "entropy_s": entropy_s, "ends": ends, "setup_hwm": setup_hwm,
            "loss_step2": records[1]["loss"]}  # fmt: skip


def run_trl(spec: dict, t0: float) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from lite_rlhf.config import load_config
    from lite_rlhf.models import load_tokenizer, resolve_model

    cfg = load_config(DEMO_CONFIG, lora_overrides())
    model_dir = resolve_model(cfg.model.name)
    tok = load_tokenizer(model_dir)
    n, length = spec["answers"], spec["length"]
    samples = build_samples(tok, n, length)
    args = GRPOConfig(output_dir=str(Path(spec["tmp"]) / "trl"), use_cpu=True, bf16=False, learning_rate=LR,
                      beta=BETA, loss_type="bnpo", epsilon=0.2, per_device_train_batch_size=n, num_generations=n // 2,
                      max_completion_length=length, gradient_checkpointing=spec["variant"] == "trl_gc",
                      report_to="none", save_strategy="no", warmup_steps=0, lr_scheduler_type="constant")  # fmt: skip
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                      target_modules=cfg.lora.peft_target_modules, task_type="CAUSAL_LM")  # fmt: skip
    data = datasets.Dataset.from_list([{"prompt": "hello"}] * n)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=args, train_dataset=data, peft_config=lora)  # fmt: skip
    model = trainer.model
    init = Path(spec["tmp"]) / "lora_init" / "adapter_model.safetensors"
    if init.exists():  # the same LoRA A (B is 0) as lite's: the same first update, so the losses of step 2 agree
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        missing = set_peft_model_state_dict(model, load_file(init)).unexpected_keys
        assert not missing, f"lite's adapter does not fit TRL's model: {missing[:3]}"
    width = max(len(s["prompt_ids"]) for s in samples)
    pad = tok.pad_token_id
    prompt_ids = torch.tensor([[pad] * (width - len(s["prompt_ids"])) + s["prompt_ids"] for s in samples])  # left pad
    prompt_mask = torch.arange(width)[None] >= torch.tensor([width - len(s["prompt_ids"]) for s in samples])[:, None]
    completion_ids = torch.tensor([s["answer_ids"] for s in samples])
    completion_mask = torch.ones_like(completion_ids)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask.long(), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.tensor([s["advantage"] for s in samples]),
              "num_items_in_batch": completion_mask.sum()}  # fmt: skip
    start = time.perf_counter()
    full = (model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([inputs["prompt_mask"], completion_mask], 1))
    with torch.no_grad():  # the old policy's log-probs (TRL computes them when num_iterations > 1), then π0's
        inputs["old_per_token_logps"] = trainer._get_per_token_logps_and_entropies(*full, length, batch_size=n)[0]
        with model.disable_adapter():  # TRL's reference with peft: the adapter off
            inputs["ref_per_token_logps"] = trainer._get_per_token_logps_and_entropies(*full, length, batch_size=n)[0]
    logps_s = time.perf_counter() - start
    trainer.current_gradient_accumulation_steps = 1
    trainer.create_optimizer()
    opt = trainer.optimizer
    setup_hwm = peak_mib()
    reset_peak()
    ends, losses = [time.perf_counter()], []
    model.train()
    for _ in range(spec["steps"]):
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        ends.append(time.perf_counter())
    return {"logps_s": logps_s, "ends": ends, "setup_hwm": setup_hwm, "loss_step2": losses[1]}


def worker(spec: dict) -> None:
    import torch

    torch.manual_seed(0)
    baseline = current_rss_mib()
    reset_peak()
    t0 = time.perf_counter()
    got = (run_lite if spec["variant"] == "lite" else run_trl)(spec, t0)
    train_hwm = peak_mib()
    steps = [b - a for a, b in zip(got["ends"], got["ends"][1:], strict=False)]
    print(json.dumps({
        "variant": spec["variant"], "answers": spec["answers"], "length": spec["length"], "steps": spec["steps"],
        "logps_s": round(got["logps_s"], 3), "s_per_step": round(statistics.mean(steps[1:] or steps), 3),
        "setup_peak_mib": round(got["setup_hwm"] - baseline), "train_peak_mib": round(train_hwm - baseline),
        "peak_mib": round(max(got["setup_hwm"], train_hwm) - baseline), "baseline_mib": round(baseline),
        "loss_step2": got["loss_step2"], "old_pass_s": round(got["plain_s"], 3) if "plain_s" in got else "",
        "entropy_s": round(got["entropy_s"], 3) if "entropy_s" in got else "",
    }))  # fmt: skip


def report(rows: list[dict], args) -> str:
    by = {r["variant"]: r for r in rows}
    lines = ["# One GRPO update: lite-rlhf against TRL's GRPOTrainer (peft LoRA), CPU", "",
             f"`{' '.join(sys.argv)}`; revision {rows[0]['revision']}; {rows[0]['machine']}; {args.answers} answers "
             f"of {args.length} tokens in one micro-batch, {args.steps} steps (the mean of steps 2..{args.steps})", "",
             "| variant | log-prob passes before the steps, s | s / step | peak above baseline, MiB | set-up peak | "
             "training peak | loss of step 2 |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['variant']} | {r['logps_s']:.2f} | {r['s_per_step']:.2f} | {r['peak_mib']} | "
                     f"{r['setup_peak_mib']} | {r['train_peak_mib']} | {r['loss_step2']:.6f} |")  # fmt: skip
    if "lite" in by:
        a = by["lite"]
        lines += ["", "- lite's rollouts pass computes the sampling policy's entropy per token with its log-probs "
                  f"(TRL computes it in each step's forward instead): +{a['entropy_s']:.2f} s over the same pass "
                  f"without it ({a['old_pass_s']:.2f} s, +{100 * a['entropy_s'] / a['old_pass_s']:.0f}%; medians of 3 "
                  "warm passes each)"]  # fmt: skip
        for other in ("trl", "trl_gc"):
            if other in by:
                a, b = by["lite"], by[other]
                lines.append(f"- lite / {other}: time per step {a['s_per_step'] / b['s_per_step']:.2f}×, peak memory "
                             f"{a['peak_mib'] / b['peak_mib']:.2f}×, training peak "
                             f"{a['train_peak_mib'] / max(1, b['train_peak_mib']):.2f}×")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    step_bench_main(Path(__file__).resolve(), "bench_grpo_step", VARIANTS, FIELDS, worker, report)


if __name__ == "__main__":
    main()
