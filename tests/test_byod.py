"""Bring your own data, end to end: `lite-rlhf run` on a tiny model directory with files as a user
writes them (prompts, val and test prompts without ids, reward pairs as chat-message lists in a
.parquet file, offline pairs as strings). Every sample, pair and evaluation answer must belong to the
prompt it claims, checked by text: π0's log-probs stored with each pair are recomputed by a plain
transformers model from the prompt text of the file line the pair's id names."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from lite_rlhf.models import make_tiny_model

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent / "lite-rlhf"


def lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("byod")
    model = make_tiny_model(root / "my-model")
    # Each split's prompts start at line 1 without ids: before the fix their ids collided ("1", "2", ...).
    texts = {
        "prompts": [f"Tell me about the {w} in a few words." for w in ("sun", "sea", "fox", "dog", "cat", "sky")],
        "val": ["Say hello to the river.", "Name a yellow fruit."],
        "test": ["Describe the mountains.", "What is water?", "Describe a star."],
    }
    files = {k: lines(root / f"{k}.jsonl", [{"prompt": t} for t in v]) for k, v in texts.items()}
    chat = [
        {"prompt": [{"role": "user", "content": f"Describe thing number {i}."}],
         "chosen": [{"role": "assistant", "content": f"thing {i} is a fine thing."}],
         "rejected": [{"role": "assistant", "content": "no"}]}
        for i in range(8)
    ]  # fmt: skip
    Dataset.from_list(chat).to_parquet(root / "rm_pairs.parquet")
    offline = lines(root / "offline.jsonl", [{"prompt": "Describe the moon.", "chosen": "the moon is bright.",
                                              "rejected": "moon moon"}])  # fmt: skip
    cfg = {
        "model": {"name": str(model), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"prompts": str(files["prompts"]), "val_prompts": str(files["val"]),
                 "test_prompts": str(files["test"]), "preferences": str(root / "rm_pairs.parquet"),
                 "offline_pairs": str(offline), "max_length": 128},
        "reward": {"lr": 1e-3, "micro_batch": 4, "grad_accum": 1},
        "generation": {"backend": "hf", "n": 3, "temperature": 1.0, "max_new_tokens": 8},
        "pairs": {"allow_truncated": True},
        "dpo": {"lr": 1e-3, "micro_batch": 2, "grad_accum": 1, "epochs": 1.0},
        "loop": {"iterations": 2},
        "run": {"out_dir": str(root / "run"), "quiet": True},
    }  # fmt: skip
    (root / "my.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LITE_RLHF_KILL")}
    out = subprocess.run([str(BIN), "run", str(root / "my.yaml")], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "run", texts, model


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def claimed_text(pid: str, texts: dict) -> str:
    """The prompt text of the file line an id names (`val:2` is line 2 of val.jsonl)."""
    if pid == "offline:0":
        return "Describe the moon."
    split, line = pid.split(":")
    return texts[split][int(line) - 1]


def test_samples_and_answers_carry_their_own_split_ids(run_dir):
    out, texts, _ = run_dir
    for t, want in ((1, [f"prompts:{i}" for i in (1, 2, 3)]), (2, [f"prompts:{i}" for i in (4, 5, 6)])):
        assert sorted({s["prompt_id"] for s in read(out / f"iter_{t:03d}" / "samples.jsonl")}) == want
    held_out = {f"val:{i}" for i in (1, 2)} | {f"test:{i}" for i in (1, 2, 3)}
    for t in (0, 1, 2):
        assert {s["prompt_id"] for s in read(out / f"iter_{t:03d}" / "eval_samples.jsonl")} == held_out


def test_no_held_out_prompt_reaches_training(run_dir):
    out, texts, _ = run_dir
    trained = {p["prompt_id"] for t in (1, 2) for p in read(out / f"iter_{t:03d}" / "pairs.jsonl")}
    trained |= {p["prompt_id"] for p in read(out / "offline_pairs.jsonl")}
    assert trained and all(pid.startswith(("prompts:", "offline:")) for pid in trained), trained


@torch.no_grad()
def test_pairs_belong_to_the_prompt_they_claim(run_dir):
    """π0's stored log-probs of every pair, recomputed from the claimed prompt's text by plain transformers."""
    out, texts, model_dir = run_dir
    tok = AutoTokenizer.from_pretrained(model_dir)
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pairs = read(out / "offline_pairs.jsonl") + [p for t in (1, 2) for p in read(out / f"iter_{t:03d}" / "pairs.jsonl")]
    assert len(pairs) >= 3
    for p in pairs:
        messages = [{"role": "user", "content": claimed_text(p["prompt_id"], texts)}]
        prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        for side in ("chosen", "rejected"):
            ids = torch.tensor([prompt + p[f"{side}_ids"]])
            logp = plain(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            want = logp[len(prompt) - 1 :].gather(-1, ids[0, len(prompt) :, None]).sum().item()
            got = p[f"ref_{side}_logp"]
            assert abs(got - want) < 1e-3 * max(1.0, abs(want)), (p["prompt_id"], side, got, want)


def test_report_lists_the_right_counts(run_dir):
    out, _, _ = run_dir
    metrics = read(out / "metrics.jsonl")
    for t in (1, 2):
        rec = next(m for m in metrics if m["stage"] == "pairs" and m["iteration"] == t)
        kept = len(read(out / f"iter_{t:03d}" / "pairs.jsonl"))
        assert rec["pairs_kept"] == kept and rec["pairs_kept"] + rec["pairs_dropped"] == 3
        row = next(x for x in (out / "report.md").read_text().splitlines() if x.startswith(f"| {t} |"))
        assert row.split("|")[2].strip() == str(kept), row
    reward = json.loads((out / "reward" / "metrics.json").read_text())
    assert reward["train_pairs"] + reward["eval_pairs"] == 8  # 10% held out: no eval file was given
