"""Bradley-Terry reward training on a tiny random Llama: the loss falls on a task a reward can learn
("banana" is preferred to "yellow", lengths equal), files and metrics are written, bad data is named."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from lite_rlhf.batching import pad
from lite_rlhf.config import load_config
from lite_rlhf.data import DataError, PreferencePair, encode, prompt_ids, response_ids
from lite_rlhf.reward import encode_pairs, main_train_rm, score_texts
from lite_rlhf.roles import SharedModel

TOPICS = ["the ocean", "the sun", "cats", "dogs", "mountains", "rivers", "water", "the fox", "a star", "the world"]
SUBJECTS = ["the fox is", "the dog is", "the sun is", "water is"]


pytestmark = pytest.mark.usefixtures("one_thread")


def pairs_rows(topics):
    """Chosen uses the word banana, rejected the word yellow: same length, so length cannot decide."""
    return [
        {"prompt": f"describe {t}. use the word banana.", "chosen": f"{s} a banana.", "rejected": f"{s} a yellow."}
        for t in topics
        for s in SUBJECTS
    ]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_rm_learns_and_writes_the_run_dir(tiny, tmp_path):
    train = write_rows(tmp_path / "train.jsonl", pairs_rows(TOPICS[:8]))
    held = write_rows(tmp_path / "eval.jsonl", pairs_rows(TOPICS[8:]))
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"model.name={tiny}",
            "lora.r=4",
            f"data.preferences={train}",
            f"data.eval_preferences={held}",
            f"run.out_dir={out}",
            "run.quiet=true",
            "reward.lr=3e-3",
            "reward.epochs=4",
            "reward.micro_batch=4",
            "reward.grad_accum=2",
        ],
    )
    assert main_train_rm(cfg) == 0
    assert {p.name for p in (out / "reward").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "head.safetensors",
        "metrics.json",
    }
    assert load_config(out / "config.yaml") == cfg
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["stage"] == "reward"]
    assert len(steps) == 16 and set(steps[0]) == {"stage", "step", "loss", "accuracy", "margin", "lr", "grad_norm"}
    first, last = steps[0]["loss"], sum(s["loss"] for s in steps[-4:]) / 4
    assert last < 0.75 * first, f"BT loss did not fall: first step {first:.3f}, last four {last:.3f}"
    metrics = json.loads((out / "reward" / "metrics.json").read_text())
    assert metrics["train_pairs"] == 32 and metrics["eval_pairs"] == 8 and metrics["skipped_lines"] == 0
    assert metrics["length_baseline_accuracy"] == 0.5  # every pair is a length tie
    assert metrics["eval_accuracy"] == 1.0 and metrics["eval_loss"] < 0.5, metrics
    assert metrics["length_correlation"] is None or -1 <= metrics["length_correlation"] <= 1


def test_bad_preference_line_names_file_and_line(tiny, tmp_path):
    rows = pairs_rows(TOPICS[:1])
    del rows[1]["rejected"]
    path = write_rows(tmp_path / "prefs.jsonl", rows)
    cfg = load_config(None, [f"model.name={tiny}", f"data.preferences={path}", f"run.out_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match=r"prefs\.jsonl:2: missing field 'rejected'"):
        main_train_rm(cfg)


def test_truncation_rule_is_counted(tiny):
    model = SharedModel(load_config(None, [f"model.name={tiny}", "lora.r=4"]))
    long = "the quick brown fox jumps over the lazy dog. " * 4
    pairs = [
        PreferencePair([{"role": "user", "content": "hello world"}], "water is wet.", "the sun is a star."),
        PreferencePair([{"role": "user", "content": "hello world"}], long, "water is wet."),
    ]
    short = len(prompt_ids(model.tokenizer, pairs[0].prompt)) + 12
    kept = encode_pairs(model.tokenizer, pairs, short, "keep_ends")
    assert (kept.n_truncated, kept.n_dropped, kept.kept) == (1, 0, [0, 1])
    assert max(len(s) for s in kept.chosen + kept.rejected) <= short
    dropped = encode_pairs(model.tokenizer, pairs, short, "drop")
    assert (dropped.n_truncated, dropped.n_dropped, dropped.kept) == (0, 1, [0])


def test_score_texts_takes_text_or_token_ids_in_order(tiny):
    model = SharedModel(load_config(None, [f"model.name={tiny}", "lora.r=4"]))
    prompts = [[{"role": "user", "content": f"describe {t}."}] for t in TOPICS[:5]]
    answers = ["water is wet.", "a banana is a yellow fruit. " * 3, "hello.", "the sun is a star.", "cats"]
    tok = model.tokenizer
    from_text = score_texts(model, prompts, answers, batch_size=2)
    from_ids = score_texts(model, prompts, [response_ids(tok, a) for a in answers], batch_size=3)
    one_by_one = []
    for p, a in zip(prompts, answers, strict=True):
        ids, mask = pad([encode(prompt_ids(tok, p), response_ids(tok, a), 512)[0]], tok.pad_token_id)
        with torch.no_grad():
            one_by_one.append(model.score(ids, mask).item())
    assert_close(torch.tensor(from_text), torch.tensor(one_by_one), atol=1e-5, rtol=0, msg=lambda m: f"text: {m}")
    assert_close(torch.tensor(from_ids), torch.tensor(one_by_one), atol=1e-5, rtol=0, msg=lambda m: f"ids: {m}")
