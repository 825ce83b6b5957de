"""The two preference oracles on the demo's pairs: the Bradley-Terry reward model (`train-rm`) and the
pairwise preference model (`train-pm`), each with its learning rate chosen on a split of the 283
training pairs (never on the 47 held out), then trained on all 283 and judged on the 47.

    .venv/bin/python benchmarks/oracles_on_demo_pairs.py OUT_DIR \
        [--bt-lrs 2e-4,1e-3,2e-3,5e-3] [--pm-lrs 1e-3,2e-3,5e-3]

Every run is `lite-rlhf train-rm|train-pm configs/demo.yaml data.preferences=... data.eval_preferences=...
<reward|preference>.lr=LR run.out_dir=...`: the same command line apart from the subcommand and the
section of the rate. Writes OUT_DIR/oracles.csv and prints a markdown table. A finished run is reused.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "lite_rlhf" / "demo"
BIN = Path(sys.executable).parent / "lite-rlhf"
FIGURES = (
    "eval_accuracy", "position_consistency", "first_position_rate", "eval_accuracy_chosen_longer",
    "eval_accuracy_chosen_not_longer", "length_baseline_accuracy", "length_correlation", "eval_pairs",
)  # fmt: skip


def train(kind: str, train_file: Path, eval_file: Path, lr: str, out: Path) -> dict:
    command, section = {"bt": ("train-rm", "reward"), "preference": ("train-pm", "preference")}[kind]
    metrics = out / section / "metrics.json"
    if not metrics.exists():
        args = [str(BIN), command, str(ROOT / "configs" / "demo.yaml"), f"data.preferences={train_file}",
                f"data.eval_preferences={eval_file}", f"{section}.lr={lr}", f"run.out_dir={out}",
                "--quiet"]  # fmt: skip
        print("$", " ".join(args[1:]), flush=True)
        subprocess.run(args, check=True)
    return json.loads(metrics.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--bt-lrs", default="2e-4,1e-3,2e-3,5e-3")
    ap.add_argument("--pm-lrs", default="1e-3,2e-3,5e-3")
    ap.add_argument("--split-seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = (DEMO / "preferences_train.jsonl").read_text().splitlines()
    shuffled = random.Random(args.split_seed).sample(lines, len(lines))
    k = round(0.2 * len(lines))
    split_train, split_val = args.out / "split_train.jsonl", args.out / "split_val.jsonl"
    split_train.write_text("\n".join(shuffled[k:]) + "\n")
    split_val.write_text("\n".join(shuffled[:k]) + "\n")
    print(f"split: {len(lines) - k} pairs to train, {k} to choose the rate; the 47 held-out pairs are not read")

    rows = []
    for kind, lrs in (("preference", args.pm_lrs), ("bt", args.bt_lrs)):
        tried = {}
        for lr in lrs.split(","):
            m = train(kind, split_train, split_val, lr, args.out / f"{kind}-split-{lr}")
            tried[lr] = m
            split = f"split {len(lines) - k}/{k}"
            rows.append({"oracle": kind, "pairs": split, "lr": lr, **{f: m.get(f) for f in FIGURES}})
        # the highest split accuracy; ties to the more position-consistent, then the lower rate
        chosen = max(tried, key=lambda lr: (tried[lr]["eval_accuracy"], tried[lr].get("position_consistency") or 0,
                                            -float(lr)))  # fmt: skip
        m = train(kind, DEMO / "preferences_train.jsonl", DEMO / "preferences_eval.jsonl", chosen,
                  args.out / f"{kind}-final")  # fmt: skip
        rows.append({"oracle": kind, "pairs": "283/47 held out", "lr": chosen, **{f: m.get(f) for f in FIGURES}})

    with (args.out / "oracles.csv").open("w") as fh:
        fh.write(",".join(rows[0]) + "\n")
        fh.writelines(",".join("" if v is None else str(v) for v in r.values()) + "\n" for r in rows)
    cols = ["oracle", "pairs", "lr", *FIGURES]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
