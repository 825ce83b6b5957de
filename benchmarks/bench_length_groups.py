"""What one more forward pass costs on CPU: the figure behind `lite_rlhf.roles.FORWARD_OVERHEAD_TOKENS`.

DPO micro-batches of 4 pairs (8 rows: chosen and rejected of real demo pairs with their prompts) through the
policy's forward + backward (log-probs through the fused kernel), on the embedded model, fp32, in one process:
each micro-batch as one padded pass, and split into 2 and 4 passes over rows of similar length (rows sorted by
length, cut into equal counts). From the times and the tokens computed, the cost of one extra pass in tokens'
worth: (time(4) - time(2)) / (extra passes) against the seconds per token of the 2-pass run.

    .venv/bin/python benchmarks/bench_length_groups.py runs/demo/iter_002/pairs.jsonl   # ~3 min, idle machine

The pairs file is any run's `iter_00k/pairs.jsonl` of the demo config. Prints a table and writes
benchmarks/results/bench_length_groups.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _memory import git_revision, machine_description  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", help="a demo run's iter_00k/pairs.jsonl")
    parser.add_argument("--micro-batches", type=int, default=8, help="micro-batches of 4 pairs (default 8)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from lite_rlhf.kernels import sequence_logps

    from lite_rlhf.batching import IGNORE, make_batch
    from lite_rlhf.config import load_config
    from lite_rlhf.data import prompt_ids
    from lite_rlhf.roles import SharedModel
    from lite_rlhf.task import load_task

    cfg = load_config(str(HERE.parent / "configs" / "demo.yaml"), [])
    model = SharedModel(cfg)
    ids = {p.id: prompt_ids(model.tokenizer, p.messages) for p in load_task(cfg.data).all_prompts}
    pairs = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(pairs)
    micro = [pairs[i : i + 4] for i in range(0, 4 * args.micro_batches, 4)]
    model.train()

    def step(rows) -> int:
        """One forward + backward over `rows` as a single padded pass; returns the tokens computed."""
        batch = make_batch(rows, model.pad_id, cfg.data.max_length, cfg.data.truncation)
        with model.role("policy"):
            hidden = model._decoder(input_ids=batch.input_ids, attention_mask=batch.mask, use_cache=False)
            logps = sequence_logps(hidden.last_hidden_state, model.lm_head_weight, batch.targets, ignore_index=IGNORE)
        logps[0].sum().backward()
        return batch.input_ids.numel()

    results = []
    for _ in range(args.repeats):
        for passes in (1, 2, 4):
            start, tokens = time.perf_counter(), 0
            for mb in micro:
                rows = [(ids[p["prompt_id"]], p["chosen_ids"]) for p in mb]
                rows += [(ids[p["prompt_id"]], p["rejected_ids"]) for p in mb]
                rows.sort(key=lambda r: len(r[0]) + len(r[1]))
                for g in range(passes):
                    tokens += step(rows[g * len(rows) // passes : (g + 1) * len(rows) // passes])
            results.append({"passes": passes, "seconds": time.perf_counter() - start, "tokens": tokens})
            print(f"  {passes} pass(es) per micro-batch: {results[-1]['seconds']:.2f} s, {tokens} tokens", flush=True)

    def mean(p, key):
        vals = [r[key] for r in results if r["passes"] == p]
        return sum(vals) / len(vals)

    lines = [f"{len(micro)} micro-batches of 4 demo pairs (8 rows), forward + backward, {args.repeats} repeats "
             f"(mean); pairs from `{args.pairs}`", "", "| passes per micro-batch | s | tokens computed |",
             "|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {p} | {mean(p, 'seconds'):.2f} | {mean(p, 'tokens'):,.0f} |" for p in (1, 2, 4)]
    per_token = mean(2, "seconds") / mean(2, "tokens")
    extra = 2 * len(micro)  # passes added going from 2 to 4 per micro-batch
    overhead = (mean(4, "seconds") - mean(2, "seconds") - (mean(4, "tokens") - mean(2, "tokens")) * per_token) / extra
    lines += ["", f"one extra pass costs {overhead:.3f} s = {overhead / per_token:.0f} tokens' worth "
              f"({per_token * 1e3:.2f} ms per token at 2 passes)"]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    header = (f"# bench_length_groups\n\n{stamp}, git {git_revision(HERE.parent)}, {machine_description()}\n\n"
              f"`.venv/bin/python benchmarks/bench_length_groups.py {' '.join(sys.argv[1:])}`\n\n")  # fmt: skip
    (HERE / "results" / "bench_length_groups.md").write_text(header + text + "\n")


if __name__ == "__main__":
    main()
