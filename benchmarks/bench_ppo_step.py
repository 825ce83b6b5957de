"""One PPO update (policy and value) on one base, against the four-model layout other tools use: memory and time, CPU.

    .venv/bin/python benchmarks/bench_ppo_step.py                        # 8 answers of 128 tokens, 3 steps
    .venv/bin/python benchmarks/bench_ppo_step.py --answers 16 --length 256
    .venv/bin/python benchmarks/bench_ppo_step.py --model ~/.cache/lite-rlhf/scale/qwen2.5-1.5b --dtype bfloat16

Both train SmolLM2-135M-Instruct (the embedded model) in fp32 on the CPU, or the model and dtype of ``--model``
and ``--dtype`` (benchmarks/_model.py; every copy of ``four`` loaded in that dtype), LoRA with the rank, alpha and
target modules of configs/demo.yaml, on the same rollouts: two demo prompts, `--answers` answers split between them
(each `--length` tokens of the demo's preference texts, ending with the end-of-turn token). Before the steps each
variant computes what PPO needs once per answer: the old policy's and π0's per-token log-probs, the old values and
the reward model's score; then `--steps` optimizer steps of the policy (clipped objective, per-token advantages from
GAE) and of the value (clipped value loss), one micro-batch holding every answer, the same math
(`lite_rlhf.algorithms.actor_critic`, `policy_gradient.clipped_policy_loss`) and the same learning rates. Each
variant runs in a fresh process:

- ``lite``: ``SharedModel`` with the value role: ONE copy of the base weights; the policy, value and reward are
  LoRA adapters (the value and reward with their heads), π0 is the base with adapters off; log-probs through the
  fused kernel (no ``[tokens, vocab]`` logits); ``ppo.train_policy`` and ``ppo.train_value``, the loop's own.
- ``four``: the layout of the tools that place PPO's models apart (TRL's former PPOTrainer, OpenRLHF, verl on one
  device): FOUR copies of the base, each a transformers model: the policy (peft LoRA), the reference (frozen), the
  value (a ``AutoModelForSequenceClassification`` with peft LoRA, its score head read at every position) and the
  reward (a sequence-classification model with the reward LoRA merged, read at the last token); log-probs from
  the full logits (``log_softmax`` then gather), as those tools compute them.

``four`` starts from the adapters and heads ``lite`` drew (saved by it: run ``lite`` first, as the default order
does), so its policy and value losses of step 2 check that both made the same update. Figures per variant: the
passes before the steps (seconds), seconds per step (policy and value; the mean over steps 2..k), peak resident
memory above the baseline taken after the imports (``VmHWM``, reset there) for the set-up (loading and the passes)
and the steps, and the copies of the base weights held. Raw rows go to ``benchmarks/results/bench_ppo_step.csv``,
the table with the ratios lite / four to ``bench_ppo_step.md`` (another model or dtype:
``bench_ppo_step_<model>[_<dtype>].{csv,md}``). Run it on an idle machine.
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
from _model import config_overrides, describe_model, parameters, torch_dtype  # noqa: E402
from bench_grpo_step import build_samples  # noqa: E402

ROOT = HERE.parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
RESULTS = HERE / "results"
VARIANTS = ("lite", "four")
COPIES = {"lite": 1, "four": 4}
LR, VALUE_LR = 1e-4, 5e-4
FIELDS = ["revision", "machine", "model", "dtype", "params", "variant", "answers", "length", "steps", "copies",
          "before_s", "s_per_step", "peak_mib", "setup_peak_mib", "train_peak_mib", "baseline_mib", "policy_loss_step2",
          "value_loss_step2"]  # fmt: skip


def config(spec: dict):
    from lite_rlhf.config import load_config

    n = spec["answers"]
    return load_config(DEMO_CONFIG, [*config_overrides(spec), "loop.algorithm=ppo", f"ppo.lr={LR}",
                                     f"ppo.value_lr={VALUE_LR}", f"ppo.micro_batch={n}", "ppo.grad_accum=1",
                                     f"ppo.epochs={spec['steps']}", "ppo.warmup_ratio=0", "generation.temperature=1.0",
                                     "run.quiet=true",
                                     f"data.max_length={spec['length'] + 128}"])  # fmt: skip


def targets(cfg, samples, old, ref, values, scores):
    """Per answer: (advantages, returns) by GAE on the per-token rewards, the score normalised by the batch mean."""
    from lite_rlhf.algorithms.ppo import Rollout, returns

    mean = statistics.fmean(scores)
    rollouts = [Rollout(s["prompt_id"], 0, s["answer_ids"], sc, sc - mean, o, r)
                for s, sc, o, r in zip(samples, scores, old, ref, strict=True)]  # fmt: skip
    return rollouts, *returns(cfg, rollouts, values, lam=cfg.ppo.lam)


def padded(samples: list[dict], pad: int):
    """Prompt + answer rows, right-padded (as our batches): (ids [B, T], attention mask [B, T])."""
    import torch

    width = max(len(s["prompt_ids"]) + len(s["answer_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad)
    attn = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        row = s["prompt_ids"] + s["answer_ids"]
        ids[i, : len(row)], attn[i, : len(row)] = torch.tensor(row), 1
    return ids, attn


def run_lite(spec: dict) -> dict:
    from types import SimpleNamespace

    import torch

    from lite_rlhf.algorithms.grpo import per_token, token_logps
    from lite_rlhf.algorithms.ppo import train_policy, train_value
    from lite_rlhf.models import load_tokenizer, resolve_model
    from lite_rlhf.roles import SharedModel
    from lite_rlhf.train import plan_steps

    cfg = config(spec)
    n, tmp = spec["answers"], Path(spec["tmp"])
    samples = build_samples(load_tokenizer(resolve_model(cfg.model.name)), n, spec["length"])
    model = SharedModel(cfg, device="cpu")
    model.add_value(seed=1)
    with torch.no_grad():  # a reward adapter that is not zero, so that the reward model scores
        for name, p in model.peft.named_parameters():
            if ".reward." in name and "lora_B" in name:
                p.normal_(0, 0.01)
    model.copy_reward_to_value()
    for name, save in (("lora_init", lambda d: model.save_adapter("policy", d)), ("value", model.save_value),
                       ("reward", model.save_reward)):  # fmt: skip
        save(tmp / name)
    ids = {s["prompt_id"]: s["prompt_ids"] for s in samples}
    rows = [(s["prompt_ids"], s["answer_ids"]) for s in samples]
    start = time.perf_counter()
    old = token_logps(model, "policy", rows, cfg.data, n, 1.0, quiet=True)
    ref = token_logps(model, "reference", rows, cfg.data, n, 1.0, quiet=True)
    values = per_token(model, rows, cfg.data, n, model.values, "values", quiet=True)
    with torch.no_grad():  # the reward model reads prompt and answer, at the last token
        scores = model.score(*padded(samples, model.pad_id)).tolist()
    before_s = time.perf_counter() - start
    batch, advantages, returns = targets(cfg, samples, old, ref, values, scores)
    ctx = SimpleNamespace(cfg=cfg, model=model, ids=ids)
    steps = plan_steps(n, cfg.ppo, 0)
    setup_hwm = peak_mib()
    reset_peak()
    ends, records = [time.perf_counter()], []
    on_step = lambda rec: (records.append(rec), ends.append(time.perf_counter()))  # noqa: E731
    train_policy(ctx, batch, advantages, steps, on_step)
    policy_ends = ends[:]
    ends.clear()
    ends.append(time.perf_counter())
    train_value(ctx, batch, values, returns, steps, clip=cfg.ppo.value_clip, name="value", on_step=on_step)
    return {"before_s": before_s, "ends": (policy_ends, ends), "setup_hwm": setup_hwm,
            "losses": ([r["loss"] for r in records if r["part"] == "policy"],
                       [r["value_loss"] for r in records if r["part"] == "value"])}  # fmt: skip


def run_four(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lite_rlhf.algorithms.actor_critic import clipped_value_loss
    from lite_rlhf.algorithms.policy_gradient import clipped_policy_loss
    from lite_rlhf.models import load_tokenizer, resolve_model

    cfg = config(spec)
    n, tmp = spec["answers"], Path(spec["tmp"])
    model_dir = resolve_model(cfg.model.name)
    tok = load_tokenizer(model_dir)
    samples = build_samples(tok, n, spec["length"])
    layers = json.loads((tmp / "reward" / "adapter_config.json").read_text())["target_modules"]  # our adapters' layers
    lora = dict(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0, target_modules=layers)
    load = dict(dtype=torch_dtype(spec), use_safetensors=True)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, **load), LoraConfig(**lora,
                                                                                              task_type="CAUSAL_LM"))
    reference = AutoModelForCausalLM.from_pretrained(model_dir, **load).eval().requires_grad_(False)
    value = get_peft_model(AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **load),
                           LoraConfig(**lora, task_type="SEQ_CLS"))  # fmt: skip (its score head trains too)
    reward = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **load)
    reward = get_peft_model(reward, LoraConfig(**lora))  # our reward adapter, merged into this copy
    set_peft_model_state_dict(reward, load_file(tmp / "reward" / "adapter_model.safetensors"))
    reward = reward.merge_and_unload().eval().requires_grad_(False)
    set_peft_model_state_dict(policy, load_file(tmp / "lora_init" / "adapter_model.safetensors"))
    value_head = load_file(tmp / "value" / "head.safetensors")
    reward_head = load_file(tmp / "reward" / "head.safetensors")
    # our heads are `weight` [1, H] and a bias; transformers' score head has no bias: one more parameter for the
    # value's (it trains, as ours does), a constant for the reward's
    state = load_file(tmp / "value" / "adapter_model.safetensors")
    state["base_model.model.score.weight"] = value_head["weight"]
    set_peft_model_state_dict(value, state)
    with torch.no_grad():
        reward.score.weight.copy_(reward_head["weight"])
    value_bias = torch.nn.Parameter(value_head["bias"].clone())
    reward_bias = float(reward_head["bias"])
    prompt_len = [len(s["prompt_ids"]) for s in samples]
    ids, attn = padded(samples, tok.pad_token_id)
    width = ids.shape[1]
    mask = torch.zeros(n, width - 1, dtype=torch.bool)  # the positions that predict an answer token
    for i, s in enumerate(samples):
        mask[i, prompt_len[i] - 1 : prompt_len[i] - 1 + len(s["answer_ids"])] = True

    def logps(model):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # [B, T, V]: the full logits
        return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask

    def values_of(model):
        hidden = model.base_model.model.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
        return (model.base_model.model.score(hidden).squeeze(-1) + value_bias) * mask  # the wrapper: the trained copy

    rows = lambda t: [t[i][mask[i]].tolist() for i in range(n)]  # noqa: E731
    start = time.perf_counter()
    with torch.no_grad():
        old, ref, values = rows(logps(policy)), rows(logps(reference)), rows(values_of(value))
        last = attn.sum(1) - 1
        hidden = reward.model(input_ids=ids, attention_mask=attn).last_hidden_state[torch.arange(n), last]
        scores = (reward.score(hidden).squeeze(-1) + reward_bias).tolist()
    before_s = time.perf_counter() - start
    _, advantages, returns = targets(cfg, samples, old, ref, values, scores)
    dense = lambda lists: torch.zeros(n, width - 1).masked_scatter(mask, torch.tensor([x for xs in lists for x in xs]))  # noqa: E731
    old_t, adv_t, ret_t, val_t = dense(old), dense(advantages), dense(returns), dense(values)
    trained = {"policy": [p for p in policy.parameters() if p.requires_grad],
               "value": [p for p in value.parameters() if p.requires_grad] + [value_bias]}
    opts = {part: torch.optim.AdamW(params, lr=LR if part == "policy" else VALUE_LR, weight_decay=0)
            for part, params in trained.items()}  # fmt: skip
    setup_hwm = peak_mib()
    reset_peak()
    ends, losses = ([time.perf_counter()], [time.perf_counter()]), ([], [])
    for part, model, k in (("policy", policy, 0), ("value", value, 1)):
        model.train()
        for _ in range(spec["steps"]):
            if part == "policy":
                loss, _ = clipped_policy_loss(logps(model), old_t, None, adv_t, mask, aggregation="token")
            else:
                loss, _ = clipped_value_loss(values_of(model), val_t, ret_t, mask, cfg.ppo.value_clip)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained[part], 1.0)
            opts[part].step()
            opts[part].zero_grad(set_to_none=True)
            losses[k].append(loss.item())
            ends[k].append(time.perf_counter())
    return {"before_s": before_s, "ends": ends, "setup_hwm": setup_hwm, "losses": losses}


def worker(spec: dict) -> None:
    import torch

    torch.manual_seed(0)
    baseline = current_rss_mib()
    reset_peak()
    got = (run_lite if spec["variant"] == "lite" else run_four)(spec)
    train_hwm = peak_mib()
    per_step = []
    for ends in got["ends"]:  # policy, then value: a PPO step is one of each
        gaps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
        per_step.append(statistics.mean(gaps[1:] or gaps))
    print(json.dumps({
        "model": spec["model"], "dtype": spec["dtype"], "params": parameters(spec),
        "variant": spec["variant"], "answers": spec["answers"], "length": spec["length"], "steps": spec["steps"],
        "copies": COPIES[spec["variant"]], "before_s": round(got["before_s"], 3), "s_per_step": round(sum(per_step), 3),
        "setup_peak_mib": round(got["setup_hwm"] - baseline), "train_peak_mib": round(train_hwm - baseline),
        "peak_mib": round(max(got["setup_hwm"], train_hwm) - baseline), "baseline_mib": round(baseline),
        "policy_loss_step2": got["losses"][0][1], "value_loss_step2": got["losses"][1][1],
    }))  # fmt: skip


def report(rows: list[dict], args) -> str:
    by = {r["variant"]: r for r in rows}
    lines = ["# One PPO update (policy and value): one base against four models, CPU", "",
             f"`{' '.join(sys.argv)}`; revision {rows[0]['revision']}; {rows[0]['machine']}; model "
             f"{describe_model(rows[0])}; {args.answers} answers "
             f"of {args.length} tokens in one micro-batch, {args.steps} steps of each (the mean of steps "
             f"2..{args.steps})", "",
             "| variant | copies of the base | passes before the steps, s | s / step (policy + value) | peak above "
             "baseline, MiB | set-up peak | training peak | policy loss, step 2 | value loss, step 2 |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['variant']} | {r['copies']} | {r['before_s']:.2f} | {r['s_per_step']:.2f} | "
                     f"{r['peak_mib']} | {r['setup_peak_mib']} | {r['train_peak_mib']} | {r['policy_loss_step2']:.6f} "
                     f"| {r['value_loss_step2']:.6f} |")  # fmt: skip
    if {"lite", "four"} <= set(by):
        a, b = by["lite"], by["four"]
        lines += ["", f"- lite / four: time per step {a['s_per_step'] / b['s_per_step']:.2f}×, passes before the "
                      f"steps {a['before_s'] / b['before_s']:.2f}×, peak memory {a['peak_mib'] / b['peak_mib']:.2f}×, "
                      f"set-up peak {a['setup_peak_mib'] / max(1, b['setup_peak_mib']):.2f}×"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    step_bench_main(Path(__file__).resolve(), "bench_ppo_step", VARIANTS, FIELDS, worker, report, models=True)


if __name__ == "__main__":
    main()
