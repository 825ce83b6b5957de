"""How much memory and time does the fused log-prob kernel save on the DPO loss, at vocab 32k and 128k?

Every variant computes the same thing, the DPO loss (sigmoid, beta 0.1) of the pairs from final hidden
states, forward + backward, fp32, N = 2048 tokens, H = 1024:

- ``naive``: full logits, log-softmax, gather, sums, loss; plain autograd (``fused_dpo_loss_reference``).
- ``chunked``: ``fused_dpo_loss`` on the chunked torch path (what runs on CPU).
- ``liger``: Liger-Kernel's ``LigerFusedLinearDPOLoss(compiled=False, use_ref_model=False)`` (pure torch,
  chunked by pairs; reference log-probs are inputs for us, so Liger is not asked to compute them).
- ``triton``: ``fused_dpo_loss`` on the Triton path; only with a CUDA device (timed with
  ``triton.testing.do_bench``), not run on CPU machines.

Two batch shapes of the same 2048 tokens: one pair of 1024-token sequences (``1x1024``) and 8 pairs of
128-token sequences (``8x128``). The LM head is frozen (LoRA / 4-bit base), and separately trainable.

"Extra peak" is the peak resident memory above the inputs (hidden, weight, targets): it includes the
outputs and the hidden gradient. Each memory measurement runs in a fresh process with
``MALLOC_MMAP_THRESHOLD_=65536`` (see ``_memory.py``). Times are taken in one process where the variants
take turns on the same inputs (a warm-up round, then ``--repeat`` rounds; the table shows the best, the
CSV also the median). Timings taken beside another job are 2-5x slow: the load average is recorded.

    .venv/bin/python benchmarks/bench_logprobs.py                    # full run (~30 min on 2 busy cores)
    .venv/bin/python benchmarks/bench_logprobs.py --quick            # tiny smoke run, no CSV
    .venv/bin/python benchmarks/bench_logprobs.py --vocab 128256 --shape 8x128 --repeat 2

Prints a markdown table (ratios to naive beside absolute figures) and appends rows to
``benchmarks/results/bench_logprobs.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _memory import PeakMeter, git_revision, machine_description, run_worker  # noqa: E402

RESULTS = HERE / "results" / "bench_logprobs.csv"
SHAPES = {"1x1024": (1, 1024), "8x128": (8, 128)}  # pairs, tokens per sequence: 2 * pairs * tokens = 2048
VARIANTS = ("naive", "chunked", "liger")
BETA = 0.1
# Targets at V = 128,256 (frozen LM head, both shapes), from the issue.
MEM_TARGET = 1 / 8
TIME_TARGET = 1.2


def make_inputs(spec: dict, device: str = "cpu"):
    """hidden [2B, T, H], weight [V, H], targets [2B, T], reference log-probs [B] x 2; no temporaries."""
    import torch

    torch.manual_seed(0)
    pairs, seq = spec["pairs"], spec["seq"]
    h_dim, vocab = spec["hidden"], spec["vocab"]
    hidden = torch.randn(2 * pairs, seq, h_dim, device=device)
    weight = torch.randn(vocab, h_dim, device=device).mul_(1.0 / h_dim**0.5)
    targets = torch.randint(0, vocab, (2 * pairs, seq), device=device)
    targets[:, : seq // 8] = -100  # a prompt: not scored, but its logits are computed all the same
    ref_chosen = torch.full((pairs,), -10.0 * seq, device=device)
    ref_rejected = torch.full((pairs,), -10.0 * seq, device=device)
    hidden.requires_grad_(True)
    weight.requires_grad_(spec["trainable"])
    return hidden, weight, targets, ref_chosen, ref_rejected


def make_step(variant: str, hidden, weight, targets, ref_chosen, ref_rejected):
    """A function running one forward + backward of `variant` and dropping the gradients afterwards."""
    from lite_rlhf.kernels import fused_dpo_loss, fused_dpo_loss_reference

    if variant in ("chunked", "triton"):

        def loss_fn():
            return fused_dpo_loss(hidden, weight, targets, ref_chosen, ref_rejected, beta=BETA)[0]
    elif variant == "naive":

        def loss_fn():
            return fused_dpo_loss_reference(hidden, weight, targets, ref_chosen, ref_rejected, beta=BETA)[0]
    elif variant == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger = LigerFusedLinearDPOLoss(ignore_index=-100, beta=BETA, compiled=False, use_ref_model=False)

        def loss_fn():
            return liger(weight, hidden, targets)[0]
    else:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join((*VARIANTS, 'triton'))}")

    def step():
        loss_fn().backward()
        hidden.grad = None
        weight.grad = None

    return step


def worker(spec: dict) -> dict:
    """Runs in a fresh process: one forward + backward, its peak memory above the inputs and its time."""
    from lite_rlhf.kernels import kernel_path

    # One tiny step first, so one-time set-up (thread pools, lazy imports) is not counted as the kernel's.
    tiny = {**spec, "vocab": 256, "hidden": 64, "pairs": 1, "seq": 16}
    make_step(spec["variant"], *make_inputs(tiny))()
    inputs = make_inputs(spec)
    step = make_step(spec["variant"], *inputs)
    with PeakMeter() as meter:
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
    return {
        "extra_peak_mib": meter.extra_mib,
        "hidden_slack_mib": meter.hidden_slack_mib,
        "peak_reset": meter.reset_ok,
        "first_s": first,
        "path": kernel_path("cpu") if spec["variant"] == "chunked" else "",
    }


def time_interleaved(spec: dict, variants: list[str], repeat: int) -> dict[str, list[float]]:
    """Wall times of forward + backward, the variants taking turns in this one process on the same inputs.

    Taking turns spreads a change in the machine's load over all variants instead of one; the first
    round is a warm-up and is dropped.
    """
    inputs = make_inputs(spec)
    steps = {v: make_step(v, *inputs) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(repeat + 1):
        for variant, step in steps.items():
            t0 = time.perf_counter()
            step()
            if round_ > 0:
                times[variant].append(time.perf_counter() - t0)
    return times


def gpu_measure(spec: dict) -> dict:  # pragma: no cover - needs a CUDA device
    """The Triton path on CUDA: peak allocated above the inputs and do_bench time (not run on CPU hosts)."""
    import torch
    import triton.testing

    inputs = make_inputs(spec, device="cuda")
    step = make_step(spec["variant"], *inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(step, warmup=2, rep=max(1, spec["repeat"]) * 20)
    return {"extra_peak_mib": extra, "time_s": ms / 1000, "time_median_s": ms / 1000, "first_s": float("nan")}


def load_average() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256], help="vocabulary sizes")
    parser.add_argument("--shape", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="batch shapes")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds after a warm-up round")
    parser.add_argument("--no-trainable", action="store_true", help="skip the trainable-LM-head rows")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (H=64, V=1000, 256 tokens), no CSV")
    parser.add_argument("--csv", type=Path, default=None, help=f"CSV to append to (default {RESULTS})")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    hidden_size = 64 if args.quick else 1024
    vocabs = [1000] if args.quick else args.vocab
    scale = 8 if args.quick else 1  # --quick: 256 tokens instead of 2048
    csv_path = args.csv or (None if args.quick else RESULTS)
    cuda = torch.cuda.is_available()
    configs = [(v, s, False) for v in vocabs for s in args.shape]
    if not args.no_trainable:
        configs += [(v, args.shape[0], True) for v in vocabs]

    rows = []
    for vocab, shape, trainable in configs:
        pairs, seq = SHAPES[shape]
        label = shape if scale == 1 else f"{pairs}x{seq // scale}"
        spec = {"vocab": vocab, "hidden": hidden_size, "pairs": pairs, "seq": seq // scale, "trainable": trainable}
        what = f"V={vocab} shape={label} LM head {'trainable' if trainable else 'frozen'}"
        config_rows = {}
        for variant in args.variants:  # memory: one fresh process per variant
            print(f"memory {variant:8s} {what} (load {load_average():.1f}) ...", flush=True)
            result = run_worker(Path(__file__), {**spec, "variant": variant})
            config_rows[variant] = {**spec, "variant": variant, "shape": label, **result}
        load_start = load_average()
        print(f"timing {' / '.join(args.variants)} in turns, {what} (load {load_start:.1f}) ...", flush=True)
        times = time_interleaved(spec, list(args.variants), args.repeat)
        load = (load_start + load_average()) / 2
        for variant, ts in times.items():
            config_rows[variant].update(time_s=min(ts), time_median_s=statistics.median(ts), load=load)
        if cuda:
            result = gpu_measure({**spec, "variant": "triton", "repeat": args.repeat})
            config_rows["triton"] = {**spec, "variant": "triton", "shape": label, "load": float("nan"), **result}
        rows.extend(config_rows.values())

    # ratios to naive in the same configuration
    naive = {(r["vocab"], r["shape"], r["trainable"]): r for r in rows if r["variant"] == "naive"}
    for r in rows:
        ref = naive.get((r["vocab"], r["shape"], r["trainable"]))
        r["mem_ratio"] = r["extra_peak_mib"] / ref["extra_peak_mib"] if ref else float("nan")
        r["time_ratio"] = r["time_s"] / ref["time_s"] if ref else float("nan")

    tokens = 2 * SHAPES[args.shape[0]][0] * SHAPES[args.shape[0]][1] // scale
    print(
        f"\nDPO loss (sigmoid) forward + backward, fp32, {tokens} tokens, H={hidden_size}; {machine_description()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Time: best of {args.repeat} rounds "
        "(median in the CSV); load: 1-min load average while timing."
    )
    print("\n| V | shape (pairs x tokens) | LM head | variant | extra peak MiB | vs naive | time s | vs naive | load |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        head = "trainable" if r["trainable"] else "frozen"
        print(
            f"| {r['vocab']:,} | {r['shape']} | {head} | {r['variant']} | {r['extra_peak_mib']:,.0f} | "
            f"{r['mem_ratio']:.3f} | {r['time_s']:.2f} | {r['time_ratio']:.2f} | {r['load']:.1f} |"
        )
    if cuda:
        print("\n(triton rows: CUDA, torch.cuda.max_memory_allocated and triton.testing.do_bench)")
    else:
        print("\n(triton: not run, no CUDA device)")

    if not args.quick:
        print()
        for r in rows:
            if r["variant"] == "chunked" and r["vocab"] == 128256 and not r["trainable"]:
                mem_ok = r["mem_ratio"] <= MEM_TARGET
                time_ok = r["time_ratio"] <= TIME_TARGET
                print(
                    f"target V=128,256 {r['shape']}: memory {r['mem_ratio']:.3f} of naive (<= {MEM_TARGET:.3f}: "
                    f"{'met' if mem_ok else 'NOT met'}), time {r['time_ratio']:.2f}x naive (<= {TIME_TARGET}: "
                    f"{'met' if time_ok else 'NOT met'})"
                )

    if csv_path is not None:
        write_csv(csv_path, rows, tokens, hidden_size)
        print(f"\nappended {len(rows)} rows to {csv_path}")


def write_csv(path: Path, rows: list[dict], tokens: int, hidden_size: int) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [
        "timestamp", "git_rev", "torch", "machine", "variant", "vocab", "shape", "lm_head", "tokens", "hidden",
        "dtype", "extra_peak_mib", "mem_vs_naive", "time_s", "time_vs_naive", "time_median_s", "first_run_s",
        "load_avg_1min",
    ]  # fmt: skip
    new = not path.exists()
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    rev, machine = git_revision(HERE.parent), machine_description()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow(
                {
                    "timestamp": stamp,
                    "git_rev": rev,
                    "torch": torch.__version__,
                    "machine": machine if r["variant"] != "triton" else torch.cuda.get_device_name(),
                    "variant": r["variant"],
                    "vocab": r["vocab"],
                    "shape": r["shape"],
                    "lm_head": "trainable" if r["trainable"] else "frozen",
                    "tokens": tokens,
                    "hidden": hidden_size,
                    "dtype": "fp32",
                    "extra_peak_mib": round(r["extra_peak_mib"], 1),
                    "mem_vs_naive": round(r["mem_ratio"], 4),
                    "time_s": round(r["time_s"], 3),
                    "time_vs_naive": round(r["time_ratio"], 3),
                    "time_median_s": round(r["time_median_s"], 3),
                    "first_run_s": round(r["first_s"], 3),
                    "load_avg_1min": round(r["load"], 2),
                }
            )


if __name__ == "__main__":
    main()
