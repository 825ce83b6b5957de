"""Answers of π0 and of the best policy side by side, on the demo's test prompts: what "better" means.

    .venv/bin/python benchmarks/demo_answers.py runs/demo                 # 3 word-limit and 3 keyword prompts
    .venv/bin/python benchmarks/demo_answers.py runs/demo --per-kind 5 --seed 1

Reads a finished demo run directory (iter_000/ and best/ eval_samples.jsonl, summary.json) and prints a markdown
table: the prompt, π0's answer and the best iteration's answer (the first sample of each, the same sampling
seed), each marked with the gold checker's verdict. The prompts are drawn with `--seed` among the test prompts,
the same number of each constraint kind, before the answers are read: they are not picked for looking good.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from lite_rlhf.demo.task import gold_check, split_prompts  # noqa: E402


def answers(run: Path, per_kind: int, seed: int) -> str:
    best = json.loads((run / "summary.json").read_text())["best_iteration"]
    first = {}
    for t in (0, best):
        for line in (run / f"iter_{t:03d}" / "eval_samples.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["index"] == 0:
                first[t, row["prompt_id"]] = row["text"]
    test = [p for p in split_prompts()["test_prompts"] if (0, p["id"]) in first]  # a run may use some of them
    rng = random.Random(seed)
    chosen = []
    for kind in ("max_words", "keyword"):
        of_kind = [p for p in test if p["constraint"] == kind]
        chosen += rng.sample(of_kind, min(per_kind, len(of_kind)))
    mark = lambda meta, text: ("✓ " if gold_check(meta, text)["passed"] else "✗ ") + text.replace("|", "\\|")  # noqa: E731
    lines = [f"| prompt | π0 | best (iteration {best}) |", "|---|---|---|"]
    for p in chosen:
        a, b = (first[t, p["id"]].replace("\n", " ") for t in (0, best))
        lines.append(f"| {p['prompt']} | {mark(p, a)} | {mark(p, b)} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished demo run directory")
    ap.add_argument("--per-kind", type=int, default=3, help="prompts of each constraint kind (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="which prompts are drawn (default 0)")
    args = ap.parse_args()
    if not (args.run / "summary.json").is_file():
        print(f"demo_answers: error: '{args.run}' is not a finished run (no summary.json)", file=sys.stderr)
        return 2
    print(answers(args.run, args.per_kind, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
