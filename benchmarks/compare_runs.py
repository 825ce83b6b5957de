"""Two finished runs of the same task side by side: each one's best iteration (chosen by validation
reward), its gold gain over π0 with the run's own 95% interval, a paired bootstrap interval of
A − B over the test prompts, KL, the alignment-tax panel and wall time.

    .venv/bin/python benchmarks/compare_runs.py runs/demo-raft runs/demo [--csv benchmarks/results/compare_runs.csv]

Both runs must share the test prompts (the comparison is per prompt) and should share seeds, so
that π0's answers, and the evaluation's sampling seed, are the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import append_csv  # noqa: E402

from lite_rlhf.config import load_config  # noqa: E402
from lite_rlhf.evaluate import bootstrap_diff, gold_rows, per_prompt_gold  # noqa: E402
from lite_rlhf.task import load_task  # noqa: E402

SHOWN = ("gold", "gold_instruction", "gold_max_words", "gold_keyword", "gold_on_topic", "gold_no_repetition", "kl",
         "length_chars", "tax_words", "tax_no_repetition", "tax_on_topic", "val_reward")  # fmt: skip


def best_of(run: Path) -> tuple[dict, dict, dict[str, float]]:
    """(summary.json, the best iteration's eval.json, its per-test-prompt gold)."""
    summary = json.loads((run / "summary.json").read_text())
    best = summary["best_iteration"]
    task = load_task(load_config(run / "config.yaml").data)
    rows = [json.loads(x) for x in (run / f"iter_{best:03d}" / "eval_samples.jsonl").read_text().splitlines()]
    test_ids = {p.id for p in task.test}
    answers = [SimpleNamespace(**r) for r in rows if r["prompt_id"] in test_ids]
    figures = json.loads((run / f"iter_{best:03d}" / "eval.json").read_text())
    return summary, figures, per_prompt_gold(gold_rows(task.gold, task.test, answers))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--csv", type=Path, help="append one row per run here")
    args = ap.parse_args()
    (sa, fa, ga), (sb, fb, gb) = best_of(args.a), best_of(args.b)
    if set(ga) != set(gb):
        raise SystemExit(f"the runs do not share their test prompts ({len(ga)} vs {len(gb)})")
    lo, hi = bootstrap_diff(ga, gb)
    print(f"| figure | {args.a.name} | {args.b.name} |\n|---|---|---|")
    print(f"| best iteration | {sa['best_iteration']} | {sb['best_iteration']} |")
    for s in (sa, sb):
        s["gain"] = f"{s['gold_gain']:+.3f} [{s['gold_gain_ci95'][0]:+.3f}, {s['gold_gain_ci95'][1]:+.3f}]"
    print(f"| gold gain over π0 [95% CI] | {sa['gain']} | {sb['gain']} |")
    for key in SHOWN:
        print(f"| {key} | {fa.get(key, float('nan')):.3f} | {fb.get(key, float('nan')):.3f} |")
    print(f"| wall seconds | {sa.get('wall_seconds')} | {sb.get('wall_seconds')} |")
    print(f"\ngold {args.a.name} − {args.b.name}: {fa['gold'] - fb['gold']:+.3f}, paired 95% bootstrap interval over "
          f"{len(ga)} test prompts [{lo:+.3f}, {hi:+.3f}]")  # fmt: skip
    if args.csv:
        rows = [
            {"run": str(run), "vs": str(other), "best_iteration": s["best_iteration"], "gold_gain": s["gold_gain"],
             "gold_gain_ci_lo": s["gold_gain_ci95"][0], "gold_gain_ci_hi": s["gold_gain_ci95"][1],
             **{k: f.get(k) for k in SHOWN}, "wall_seconds": s.get("wall_seconds"), "a_minus_b_ci_lo": lo,
             "a_minus_b_ci_hi": hi}
            for run, other, s, f in ((args.a, args.b, sa, fa), (args.b, args.a, sb, fb))
        ]  # fmt: skip
        append_csv(args.csv, list(rows[0]), rows)


if __name__ == "__main__":
    main()
