"""One loop iteration on the embedded model, phase by phase: wall time, peak memory, throughput, and
`lite-rlhf plan`'s estimate of each phase's memory beside the measured figure.

The demo configuration (configs/demo.yaml) on SmolLM2-135M-Instruct, CPU, float32, in one fresh process
(``MALLOC_MMAP_THRESHOLD_=65536``, see benchmarks/_memory.py). Set-up, not measured as a phase: load the
shared model (policy, reference, reward roles), start the vLLM engine, evaluate π0 (the win rate of the
iteration needs π0's answers). Then the phases of one iteration, as `lite_rlhf.loop` runs them:

- generate: n answers per prompt of the iteration's slice from the policy adapter (served by LoRA);
- score: the reward adapter scores every answer;
- select pairs: best vs worst per prompt;
- reference log-probs: π0's log-probs of each pair, computed once;
- train: DPO on the pairs (the fused kernels);
- evaluate: sample and score the held-out prompts, KL estimate, gold figures.

Memory: for each phase the peak resident memory (VmHWM, reset at the phase's start) above the
resident memory right after the imports (torch, transformers, peft, vllm): the "increase above the
post-import baseline". `lite_rlhf.plan.estimate(cuda=False)` gives its estimate of the same increase for
the same configuration, with ``data.max_length`` set to the longest sequence the phase actually saw
(the plan sizes for the configured maximum) and the checkpointed layers the DPO stage chose.
Target (issue 7): within 25% per phase.

The reward adapter is untrained unless ``--reward-adapter DIR`` names one (e.g. ``runs/demo/reward``):
its weights change which pairs are kept, not the cost of a phase. Timings from a machine where other
jobs run are not valid (2-5x slow on 2 cores).

    .venv/bin/python benchmarks/bench_iteration.py                 # ~6 min on a quiet 2-core machine
    .venv/bin/python benchmarks/bench_iteration.py --prompts 8 --no-save   # smoke
    .venv/bin/python benchmarks/bench_iteration.py --compare-sharing       # two copies, then one (~12 min)

Prints a markdown table; writes benchmarks/results/bench_iteration.{csv,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _memory import (  # noqa: E402
    append_csv,
    current_rss_mib,
    git_revision,
    machine_description,
    peak_mib,
    reset_peak,
    run_worker,
)

RESULTS = HERE / "results"
TARGET_RATIO = 0.25  # |estimate / measured - 1| per phase


class Phases:
    """Times each phase and records its peak RSS above the post-import baseline."""

    def __init__(self, baseline_mib: float):
        self.baseline = baseline_mib
        self.rows: list[dict] = []

    def run(self, name: str, fn):
        if not reset_peak():
            raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs): this benchmark needs Linux >= 4.0")
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
        row = {"phase": name, "seconds": round(seconds, 2), "peak_above_baseline_mib": peak_mib() - self.baseline}
        self.rows.append(row)
        print(f"  {name:<20} {seconds:7.1f} s  peak +{row['peak_above_baseline_mib']:.0f} MiB", flush=True)
        return out


def worker(spec: dict) -> dict:
    import dataclasses

    # The post-import baseline: every library the loop uses, no model yet.
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import vllm  # noqa: F401

    from lite_rlhf import data as D
    from lite_rlhf.algorithms.dpo import add_reference_logps, pair_fits, pair_rows, train_dpo
    from lite_rlhf.batching import make_batch
    from lite_rlhf.config import load_config
    from lite_rlhf.context import derive_seed
    from lite_rlhf.evaluate import evaluate_policy
    from lite_rlhf.generate import make_engine, start_engine
    from lite_rlhf.models import resolve_model
    from lite_rlhf.pairs import penalized_rewards, select_pairs
    from lite_rlhf.plan import estimate
    from lite_rlhf.roles import SharedModel
    from lite_rlhf.runstate import RunDir, write_dir
    from lite_rlhf.scoring import Oracle
    from lite_rlhf.task import load_task

    baseline = current_rss_mib()
    cfg = load_config(str(HERE.parent / "configs" / "demo.yaml"), [f"run.out_dir={spec['out_dir']}", *spec["set"]])
    rd = RunDir(cfg)
    task = load_task(cfg.data)
    prompts = task.slice(1, cfg.loop.iterations, cfg.loop.prompts_per_iteration)[: spec["prompts"]]

    t0 = time.perf_counter()
    model_dir = resolve_model(cfg.model.name)
    model = SharedModel(cfg, model_dir=model_dir)
    if spec["reward_adapter"]:
        model.load_reward(Path(spec["reward_adapter"]))
    oracle = Oracle(cfg, model)
    engine = start_engine(model, cfg, lambda share: make_engine(
        model_dir, cfg.generation, lora_rank=cfg.lora.r, seed=cfg.run.seed, share=share), print)  # fmt: skip
    write_dir(rd.iter_dir(0) / "policy", lambda tmp: model.save_adapter("policy", tmp))
    loaded = {"seconds": round(time.perf_counter() - t0, 2), "rss_above_baseline_mib": current_rss_mib() - baseline}
    print(
        f"  set-up (model, engine) {loaded['seconds']:.1f} s, +{loaded['rss_above_baseline_mib']:.0f} MiB", flush=True
    )
    prompt_ids = {p.id: D.prompt_ids(model.tokenizer, p.messages) for p in task.all_prompts}

    def evaluate(t, adapter, base_rows):
        return evaluate_policy(
            engine, model, oracle, task.eval_sets, prompt_ids, cfg.eval, cfg.data, iteration=t, adapter=adapter,
            seed=derive_seed(cfg, 0, "eval"), temperature=cfg.generation.temperature, gold=task.gold,
            base_rows=base_rows, score_batch=cfg.reward.score_batch,
        )  # fmt: skip

    t0 = time.perf_counter()
    _, base_rows = evaluate(0, None, None)
    pi0_eval_s = round(time.perf_counter() - t0, 2)

    policy = rd.iter_dir(0) / "policy"  # served as a LoRA, as every iteration after the first is
    by_id = {p.id: p for p in task.prompts}
    ph = Phases(baseline)

    samples = ph.run(
        "generate",
        lambda: engine.generate(prompts, n=cfg.generation.n, adapter=policy, seed=derive_seed(cfg, 1, "generate")),
    )
    gen_tokens = sum(s.n_tokens for s in samples)
    rewards = ph.run("score", lambda: oracle.reward([by_id[s.prompt_id] for s in samples], samples))
    pairs, dropped = ph.run(
        "select pairs", lambda: select_pairs(samples, penalized_rewards(samples, rewards, cfg.pairs), cfg.pairs)
    )
    pairs = [p for p in pairs if pair_fits(p, prompt_ids, cfg.data)]
    pairs = ph.run(
        "reference log-probs", lambda: add_reference_logps(model, pairs, prompt_ids, cfg.data, cfg.dpo.micro_batch)
    )
    d = cfg.data
    masks = [make_batch(pair_rows([p], prompt_ids), model.pad_id, d.max_length, d.truncation).mask for p in pairs]
    widths = [m.shape[1] for m in masks]
    train_tokens = sum(int(m.sum()) for m in masks) * cfg.dpo.epochs
    model.load_adapter("policy", policy)
    ph.run(
        "train",
        lambda: train_dpo(
            model,
            pairs,
            prompt_ids,
            cfg.dpo,
            cfg.data,
            seed=derive_seed(cfg, 1, "dpo"),
            quiet=True,
            on_step=lambda r: None,
        ),  # fmt: skip
    )
    out = rd.iter_dir(1) / "policy"
    write_dir(out, lambda tmp: model.save_adapter("policy", tmp))
    ph.run("evaluate", lambda: evaluate(1, out, base_rows))
    engine.close()

    # plan's estimate, for the longest sequence each phase saw
    longest_answer = max(s.n_tokens for s in samples)
    longest_prompt = max(len(ids) for ids in prompt_ids.values())
    seq = {"generate": longest_prompt + cfg.generation.max_new_tokens, "train": max(widths)}
    seq["reference log-probs"] = seq["train"]
    seq["score"] = seq["evaluate"] = longest_prompt + longest_answer
    for row in ph.rows:
        if row["phase"] == "select pairs":
            parts = estimate(cfg, cuda=False)["phases"]["score"]
            parts = {k: v for k, v in parts.items() if not k.startswith("activations")}
        else:
            length_cfg = dataclasses.replace(
                cfg,
                data=dataclasses.replace(cfg.data, max_length=seq[row["phase"]]),
                # the layers the DPO stage checkpointed (auto decides at run time, from the machine's memory)
                model=dataclasses.replace(cfg.model, gradient_checkpointing=model.checkpointed_layers),
            )
            parts = estimate(length_cfg, cuda=False)["phases"][row["phase"]]
        row["estimate_mib"] = sum(parts.values()) / 2**20
        row["estimate_parts"] = {k: round(v / 2**20, 1) for k, v in parts.items()}
        row["seq_len_for_estimate"] = seq.get(row["phase"])
    times = {r["phase"]: r["seconds"] for r in ph.rows}
    return {
        "rows": ph.rows,
        "baseline_mib": round(baseline, 1),
        "setup": loaded,
        "pi0_eval_seconds": pi0_eval_s,
        "prompts": len(prompts),
        "samples": len(samples),
        "generated_tokens": gen_tokens,
        "generate_tokens_per_s": round(gen_tokens / times["generate"], 1),
        "pairs": len(pairs),
        "dropped": dict(dropped),
        "train_tokens": train_tokens,
        "train_tokens_per_s": round(train_tokens / times["train"], 1),
        "engine": engine.description,
        "one_copy": engine.shared,
        "iteration_seconds": round(sum(times.values()), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=40, help="prompts in the iteration (the demo's slice: 40)")
    parser.add_argument("--reward-adapter", default="", help="a trained reward adapter directory (default: untrained)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, key=value")
    parser.add_argument("--compare-sharing", action="store_true",
                        help="run twice, generation.share_weights=false then true, and compare")  # fmt: skip
    parser.add_argument("--no-save", action="store_true", help="print only (smoke runs)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.compare_sharing:
        runs = {share: measure(args, [*args.set, f"generation.share_weights={share}"]) for share in ("false", "true")}
        text = "\n\n".join([compare_sharing(runs["false"][0], runs["true"][0]),
                             "## Two copies (generation.share_weights=false)", runs["false"][1],
                             "## One copy (generation.share_weights=true)", runs["true"][1]])  # fmt: skip
        print(text)
        if not args.no_save:
            save("bench_iteration_sharing", text, [{**r, "share_weights": share, **runs[share][2]}
                                                   for share in runs for r in runs[share][0]["rows"]])  # fmt: skip
        return
    res, text, common = measure(args, args.set)
    print(text)
    if not args.no_save:
        save("bench_iteration", text, [{**r, **common} for r in res["rows"]])


def measure(args, overrides: list[str]) -> tuple[dict, str, dict]:
    """One iteration in a fresh process: its results, the report's text, the load averages."""
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"out_dir": tmp, "prompts": args.prompts, "reward_adapter": args.reward_adapter, "set": overrides}
        start = time.perf_counter()
        res = run_worker(Path(__file__).resolve(), spec, timeout=7200)
        total = time.perf_counter() - start
    load_after = os.getloadavg()[0]

    lines = [
        f"One iteration of configs/demo.yaml{' ' + ' '.join(overrides) if overrides else ''} on the embedded model: "
        f"{res['prompts']} prompts, {res['samples']} answers ({res['generated_tokens']} tokens), "
        f"{res['pairs']} pairs; {res['engine']}.",
        f"Post-import baseline {res['baseline_mib']:.0f} MiB; set-up (model + engine) {res['setup']['seconds']} s, "
        f"+{res['setup']['rss_above_baseline_mib']:.0f} MiB; π0 evaluation (set-up) {res['pi0_eval_seconds']} s.",
        f"Generation {res['generate_tokens_per_s']} tokens/s; training {res['train_tokens_per_s']} tokens/s "
        f"(chosen + rejected, prompt included). Load average {load_before:.2f} before, {load_after:.2f} after; "
        f"whole benchmark {total:.0f} s.",
        "",
        "| phase | wall s | peak above baseline MiB (measured) | plan estimate MiB | estimate / measured |",
        "|---|---|---|---|---|",
    ]
    misses = []
    for r in res["rows"]:
        ratio = r["estimate_mib"] / r["peak_above_baseline_mib"] if r["peak_above_baseline_mib"] > 0 else float("nan")
        r["estimate_over_measured"] = round(ratio, 3)
        if not abs(ratio - 1) <= TARGET_RATIO:
            misses.append(f"{r['phase']} ({ratio:.2f}x)")
        lines.append(
            f"| {r['phase']} | {r['seconds']} | {r['peak_above_baseline_mib']:.0f} | {r['estimate_mib']:.0f} "
            f"| {ratio:.2f} |"
        )
    lines.append("")
    lines.append(
        f"target: estimate within {TARGET_RATIO:.0%} of the measured increase in every phase: "
        + ("met" if not misses else "NOT met for " + ", ".join(misses))
    )
    lines.append("")
    lines.append("Estimate terms per phase (MiB): ")
    for r in res["rows"]:
        terms = ", ".join(f"{k} {v:.0f}" for k, v in r["estimate_parts"].items())
        lines.append(f"- {r['phase']} (sequence {r['seq_len_for_estimate']}): {terms}")
    return res, "\n".join(lines), {"load_avg_before": load_before, "load_avg_after": load_after}


def compare_sharing(two: dict, one: dict) -> str:
    """Per phase: wall time and peak memory with two copies of the base and with one."""
    lines = [
        f"Two copies: {two['engine']}; one copy: {one['engine']} (the trainer's base "
        f"{'is' if one['one_copy'] else 'is NOT'} views of the engine's weights).",
        "",
        "| phase | wall s, two copies | wall s, one copy | peak MiB, two copies | peak MiB, one copy | one − two MiB |",
        "|---|---|---|---|---|---|",
    ]
    for a, b in zip(two["rows"], one["rows"], strict=True):
        lines.append(f"| {a['phase']} | {a['seconds']} | {b['seconds']} | {a['peak_above_baseline_mib']:.0f} "
                     f"| {b['peak_above_baseline_mib']:.0f} "
                     f"| {b['peak_above_baseline_mib'] - a['peak_above_baseline_mib']:+.0f} |")  # fmt: skip
    gen = one["generate_tokens_per_s"] / two["generate_tokens_per_s"]
    lines += [
        f"| set-up (model + engine) | {two['setup']['seconds']} | {one['setup']['seconds']} "
        f"| {two['setup']['rss_above_baseline_mib']:.0f} (RSS after) | {one['setup']['rss_above_baseline_mib']:.0f} "
        f"(RSS after) | {one['setup']['rss_above_baseline_mib'] - two['setup']['rss_above_baseline_mib']:+.0f} |",
        "",
        f"Generation: {two['generate_tokens_per_s']} tokens/s with two copies, {one['generate_tokens_per_s']} with "
        f"one ({gen:.2f}x). The iteration (sum of its phases): {two['iteration_seconds']} s and "
        f"{one['iteration_seconds']} s ({one['iteration_seconds'] / two['iteration_seconds']:.2f}x); π0's evaluation "
        f"{two['pi0_eval_seconds']} s and {one['pi0_eval_seconds']} s.",
    ]
    return "\n".join(lines)


def save(name: str, text: str, rows: list[dict]) -> None:
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    rev = git_revision(HERE.parent)
    command = "benchmarks/bench_iteration.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    header = f"# {name}\n\n{stamp}, git {rev}, {machine_description()}\n\n`.venv/bin/python {command}`\n\n"
    (RESULTS / f"{name}.md").write_text(header + text + "\n")
    fields = ["timestamp", "git_rev", "phase", "seconds", "peak_above_baseline_mib", "estimate_mib",
              "estimate_over_measured", "load_avg_before", "load_avg_after"]  # fmt: skip
    if name != "bench_iteration":
        fields.append("share_weights")
    append_csv(RESULTS / f"{name}.csv", fields, [{**r, "timestamp": stamp, "git_rev": rev} for r in rows])
    print(f"wrote {RESULTS.relative_to(HERE.parent)}/{name}.md and appended to {name}.csv")


if __name__ == "__main__":
    main()
