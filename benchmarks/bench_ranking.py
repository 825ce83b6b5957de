"""What ranking n answers costs: the Bradley-Terry reward (n forwards per prompt) against the preference
model's round robin and knockout (comparisons per prompt, both orders each), at n = 4 and n = 8, on
the same answers, in one process; and how often each scheme picks the same best and worst as another.

    .venv/bin/lite-rlhf generate configs/demo.yaml data.prompts=demo generation.n=8 \\
        generation.output=OUT/samples.jsonl --quiet                      # π0's answers, 8 per prompt
    .venv/bin/python benchmarks/bench_ranking.py OUT/samples.jsonl --reward R/reward \\
        --preference P/preference [--prompts 40] [--n 4,8] [--csv benchmarks/results/bench_ranking.csv]

R and P are trained directories (`lite-rlhf train-rm` / `train-pm`, e.g. from
benchmarks/oracles_on_demo_pairs.py). Times are wall seconds of `Oracle.rank` alone (tokenizing,
batching and the forwards), one warm-up call first; run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import append_csv  # noqa: E402

from lite_rlhf.config import load_config  # noqa: E402
from lite_rlhf.data import load_prompts  # noqa: E402
from lite_rlhf.models import resolve_model  # noqa: E402
from lite_rlhf.roles import SharedModel  # noqa: E402
from lite_rlhf.scoring import Oracle  # noqa: E402
from lite_rlhf.task import demo_file  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def best_worst(samples, scores) -> dict[str, tuple[int, int]]:
    groups: dict[str, list[tuple[int, float]]] = {}
    for s, r in zip(samples, scores, strict=True):
        groups.setdefault(s.prompt_id, []).append((s.index, r))
    out = {}
    for pid, g in groups.items():
        g.sort()
        vals = [r for _, r in g]
        out[pid] = (vals.index(max(vals)), vals.index(min(vals)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("samples", type=Path)
    ap.add_argument("--reward", required=True)
    ap.add_argument("--preference", required=True)
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--n", default="4,8", help="answers per prompt to rank, e.g. 4,8")
    ap.add_argument("--csv", type=Path)
    args = ap.parse_args()

    rows = [json.loads(x) for x in args.samples.read_text().splitlines()]
    prompts, _ = load_prompts(demo_file("prompts.jsonl"))
    prompts.sort(key=lambda p: p.id)
    by_id = {p.id: p for p in prompts}
    keep = sorted({r["prompt_id"] for r in rows})[: args.prompts]
    cfg = load_config(CONFIG, ["run.quiet=true"])
    model = SharedModel(cfg, model_dir=resolve_model(cfg.model.name))
    model.load_reward(args.reward)
    model.add_preference(cfg.run.seed)
    model.load_adapter("preference", args.preference)
    oracles = {"bt": Oracle(cfg, model)}
    for scheme in ("round_robin", "knockout"):
        c = load_config(CONFIG, ["run.quiet=true", "reward.kind=preference", f"pairs.ranking={scheme}"])
        oracles[scheme] = Oracle(c, model)

    results = []
    for n in [int(x) for x in args.n.split(",")]:
        samples = [SimpleNamespace(**r, token_ids=None) for r in rows if r["prompt_id"] in keep and r["index"] < n]
        # BT scores token ids; here the answers are re-tokenized text, as the preference model reads them
        tok = model.tokenizer
        for s in samples:
            s.token_ids = tok(s.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        picks = {}
        oracles["bt"].rank(by_id, samples[: 2 * n])  # warm-up
        for name, oracle in oracles.items():
            start = time.perf_counter()
            scores, cost, _ = oracle.rank(by_id, samples)
            seconds = time.perf_counter() - start
            picks[name] = best_worst(samples, scores)
            results.append({"n": n, "oracle": name, "prompts": len(keep), **cost, "seconds": round(seconds, 1),
                            "seconds_per_prompt": round(seconds / len(keep), 3)})  # fmt: skip
        base = results[-3]["seconds"]
        for r in results[-3:]:
            r["time_vs_bt"] = round(r["seconds"] / base, 2)
            p = picks[r["oracle"]]
            for other in ("bt", "round_robin"):
                q = picks[other]
                r[f"same_best_as_{other}"] = round(sum(p[k][0] == q[k][0] for k in p) / len(p), 3)
                r[f"same_worst_as_{other}"] = round(sum(p[k][1] == q[k][1] for k in p) / len(p), 3)
        print(json.dumps(results[-3:], indent=1), flush=True)
        if args.csv:  # as each n finishes
            append_csv(args.csv, list(dict.fromkeys(k for r in results[-3:] for k in r)), results[-3:])

    cols = list(results[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
