"""Write the demo's SFT conversations, lite_rlhf/demo/sft.jsonl (shipped; this is how it was made).

    .venv/bin/python scripts/make_demo_sft.py [--per-prompt 2]

π0's own gold-passing answers on the reward-model prompts: the distinct `chosen` answers of
preferences_train.jsonl (π0 samples that passed the gold checker, made by make_demo_data.py), at most
`--per-prompt` per prompt, as {"prompt", "completion"} rows. Those prompts' topics are disjoint from
the loop's, validation and test topics (lite_rlhf.demo.task.SPLITS), so SFT on them cannot leak the
held-out prompts. Use it with `lite-rlhf run data.sft=demo` (SFT as stage 0, then the loop from it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "lite_rlhf" / "demo"


def sft_rows(per_prompt: int) -> list[dict]:
    rows, count = [], {}
    for line in (DEMO / "preferences_train.jsonl").read_text().splitlines():
        pair = json.loads(line)
        key = pair["prompt_id"]
        seen = {r["completion"] for r in rows if r["prompt_id"] == key}
        if count.get(key, 0) < per_prompt and pair["chosen"] not in seen:
            rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "prompt_id": key})
            count[key] = count.get(key, 0) + 1
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-prompt", type=int, default=2)
    args = ap.parse_args()
    rows = sft_rows(args.per_prompt)
    (DEMO / "sft.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} conversations for {len({r['prompt_id'] for r in rows})} prompts to {DEMO / 'sft.jsonl'}")


if __name__ == "__main__":
    main()
