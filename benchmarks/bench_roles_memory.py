"""Question: does SharedModel hold ONE copy of the base for its three roles?

Each variant runs in a fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536 (docs/cpu-stack.md, "Measuring
memory on CPU") and reports the resident set after the imports, after loading, and the peak
(`ru_maxrss`) after one no-grad forward of the same batch in every role it has:

- base:         the base model alone (plain transformers), one forward, log-probs through the kernel;
- shared:       SharedModel with policy + reward adapters + head, one forward as policy, reference, reward;
- three_copies: what SharedModel avoids: three plain base models (policy, reference, reward), one forward each;
                the second and third are copied out of the file mapping, as separate checkpoints would be;
- base_nf4 / shared_nf4: the same with the 4-bit NF4 base.

    .venv/bin/python benchmarks/bench_roles_memory.py [--model NAME] [--variants base shared ...]

Reading the figures: transformers maps an fp32 safetensors file into memory, so fp32 weights show up as
file-backed RSS (the "file" column, ~170 MiB of which are shared libraries), the adapters, the 4-bit weights
and the activations as anonymous RSS. On CPU the NF4 base does not shrink the process: the file mapping
stays resident (measured, cause not pinned down) and bitsandbytes adds its 4-bit copy.

Prints a markdown table and appends rows to benchmarks/results/bench_roles_memory.csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("base", "shared", "three_copies", "base_nf4", "shared_nf4")
BATCH, SEQ = 4, 256
RESULTS = Path(__file__).parent / "results" / "bench_roles_memory.csv"


def _mib_rss() -> dict[str, float]:
    """Resident MiB: anonymous (heap, tensors we own) and file-backed (mmapped safetensors pages)."""
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def _mib_peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _weight_mib(modules) -> float:
    """Bytes of parameters and buffers, counting tied tensors (SmolLM2's embedding and LM head) once."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for m in modules for t in m.state_dict().values()}
    return sum(seen.values()) / 2**20


def child(variant: str, model_name: str) -> dict:
    import peft  # noqa: F401  (imports count for every variant alike; peft pulls in bitsandbytes)
    import torch
    from lite_rlhf.kernels import linear_logprobs
    from transformers import AutoModelForCausalLM

    from lite_rlhf.batching import IGNORE, Batch
    from lite_rlhf.config import load_config
    from lite_rlhf.models import nf4_config, resolve_model
    from lite_rlhf.roles import SharedModel, keep_nf4_layout

    imports = _mib_peak()
    start = time.time()
    nf4 = variant.endswith("_nf4")
    model_dir = resolve_model(model_name)
    torch.manual_seed(0)
    if variant.startswith("shared"):
        cfg = load_config(None, [f"model.name={model_name}", f"model.quantization={'nf4' if nf4 else 'none'}"])
        model = SharedModel(cfg, model_dir=model_dir)
        vocab = model.lm_head_weight.shape[0]
        weights = _weight_mib([model.peft, model.head])
    else:
        kw = {"dtype": torch.float32, "device_map": "cpu"}
        if nf4:
            kw["quantization_config"] = nf4_config(torch.float32)
        copies = [
            AutoModelForCausalLM.from_pretrained(model_dir, **kw).eval() for _ in range(3 if "three" in variant else 1)
        ]
        for m in copies:
            keep_nf4_layout(m)
        for m in copies[1:]:  # the naive layout's other two models are other checkpoints, not the same file
            for t in [*m.parameters(), *m.buffers()]:
                t.data = t.data.clone()
        vocab = copies[0].config.vocab_size
        weights = _weight_mib(copies)
    loaded = _mib_rss()

    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    targets = torch.cat([ids[:, 1:], torch.full((BATCH, 1), IGNORE)], dim=1)
    targets[:, : SEQ // 4 - 1] = IGNORE  # the first quarter is the prompt: not scored
    with torch.no_grad():
        if variant.startswith("shared"):
            for role in ("policy", "reference"):
                with model.role(role):
                    model.sequence_logps(Batch(ids, mask, targets))
            model.score(ids, mask)
        else:
            for m in copies:  # the roles of the separate-models layout: log-probs (twice) and a reward read
                hidden = m.model(input_ids=ids, attention_mask=mask).last_hidden_state
                linear_logprobs(hidden[:, :-1], m.lm_head.weight, ids[:, 1:])
    end = _mib_rss()
    return {
        "imports_mib": round(imports),
        "load_rss_mib": round(loaded["VmRSS"]),
        "load_anon_mib": round(loaded["RssAnon"]),
        "end_rss_mib": round(end["VmRSS"]),
        "end_anon_mib": round(end["RssAnon"]),
        "end_file_mib": round(end["RssFile"]),
        "peak_mib": round(_mib_peak()),
        "weights_mib": round(weights),
        "seconds": round(time.time() - start, 1),
    }


def _git_rev() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model)))
        return

    import peft
    import torch
    import transformers

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--child", variant, "--model", args.model]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"variant {variant} failed:\n{out.stderr[-2000:]}")
        rows.append({"variant": variant, **json.loads(out.stdout.strip().splitlines()[-1])})

    base = {r["variant"]: r["peak_mib"] - r["imports_mib"] for r in rows}
    print(f"\nmodel {args.model}, batch {BATCH} x {SEQ} tokens, no-grad forward in every role, fp32 compute\n")
    print("RSS = anonymous + file-backed (pages of the mmapped safetensors file, which the kernel can drop); MiB\n")
    print("| variant | weights | imports | RSS loaded (anon) | RSS end = anon + file | peak | peak - imports | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['weights_mib']} | {r['imports_mib']} | {r['load_rss_mib']} ({r['load_anon_mib']}) "
            f"| {r['end_rss_mib']} = {r['end_anon_mib']} + {r['end_file_mib']} | {r['peak_mib']} "
            f"| {base[r['variant']]} | {r['seconds']} |"
        )
    for a, b in (("shared", "base"), ("three_copies", "shared"), ("shared_nf4", "base_nf4")):
        if a in base and b in base:
            print(f"\n{a} / {b} (peak above imports): {base[a] / base[b]:.2f}")

    meta = {
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_rev": _git_rev(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "model": args.model,
        "batch": BATCH,
        "seq": SEQ,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    new = not RESULTS.exists()
    with RESULTS.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*meta, *rows[0]])
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**meta, **r})
    print(f"\nappended {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
