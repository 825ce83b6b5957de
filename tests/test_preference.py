"""The pairwise preference model on a tiny random Llama: the label probability against a plain
transformers + peft forward, the template and truncation rules, training that learns a preference and
answers the swapped order the other way, a separate saved model, bad labels, resume after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_reward import TOPICS, pairs_rows, write_rows

from lite_rlhf.config import ConfigError, load_config
from lite_rlhf.data import PreferencePair
from lite_rlhf.preference import (
    Judge,
    SeparatePreferenceModel,
    comparison_ids,
    context_text,
    evaluate_preference,
    main_train_pm,
    make_format,
    model_judge,
)
from lite_rlhf.roles import SharedModel

pytestmark = pytest.mark.usefixtures("one_thread")
BIN = Path(sys.executable).parent / "lite-rlhf"
# Chosen says banana, rejected yellow: same length, so only the words (and where they sit) decide.
rows, write = pairs_rows, write_rows


def config(tiny, *overrides):
    return load_config(None, [f"model.name={tiny}", "lora.r=4", "run.quiet=true", *overrides])


def perturbed(tiny) -> SharedModel:
    """A model whose preference adapter is not the identity (LoRA B starts at zero)."""
    model = SharedModel(config(tiny))
    model.add_preference(seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.peft.named_parameters():
            if ".preference." in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def test_label_probability_is_the_plain_forward(tiny, tmp_path):
    """P(label_a) against a plain transformers forward of the saved adapter (full logits, softmax over
    the two label tokens), rows of different lengths in one padded batch."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = perturbed(tiny)
    model.save_adapter("preference", tmp_path / "pm")
    judge = model_judge(model, config(tiny))
    items = [
        ([{"role": "user", "content": "describe the sun."}], "it is hot.", "a yellow ball in the sky, far away."),
        ([{"role": "user", "content": "describe water."}], "wet.", "it is wet."),
        ([{"role": "system", "content": "be brief."}, {"role": "user", "content": "cats?"}], "soft.", "no."),
    ]
    ours = judge.first_probs(items)

    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(tmp_path / "pm")).eval()
    fmt = judge.fmt
    for (context, a, b), p in zip(items, ours, strict=True):
        text = config(tiny).preference.template.format(context=context_text(context), a=a, b=b)
        ids = model.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]  # fmt: skip
        assert list(ids) == judge.encode(context, a, b)  # the piecewise tokens are those of the whole text
        with torch.no_grad():
            logits = plain(input_ids=torch.tensor([ids])).logits[0, -1]
        expected = logits[fmt.labels].softmax(-1)[0].item()
        assert abs(p - expected) < 1e-5, (p, expected)
    assert max(ours) - min(ours) > 1e-3  # the perturbed adapter gives different answers different verdicts


def test_both_orders_and_an_answer_against_itself(tiny):
    model = perturbed(tiny)
    judge = model_judge(model, config(tiny))
    ctx = [{"role": "user", "content": "describe the sun."}]
    p_ab, p_ba, p_aa = judge.probs([(ctx, "hot.", "cold and dark."), (ctx, "cold and dark.", "hot."), (ctx, "x", "x")])
    assert abs(p_ab + p_ba - 1) < 1e-6
    assert p_aa == 0.5
    assert judge.forwards == 4  # both orders of the two pairs; the identical one ran nothing
    first = judge.first_probs([(ctx, "hot.", "cold and dark."), (ctx, "cold and dark.", "hot.")])
    assert abs(p_ab - 0.5 * (first[0] + 1 - first[1])) < 1e-9


def test_truncation_keeps_answer_starts_equal_shares_and_the_context_end(tiny):
    tok = SharedModel(config(tiny)).tokenizer
    fmt = make_format(tok, config(tiny).preference)
    fixed = sum(len(s) for s in fmt.segments)
    ctx, a, b = list(range(1000, 1040)), list(range(2000, 2100)), list(range(3000, 3100))
    ids, cut = comparison_ids(fmt, ctx, a, b, fixed + 60)
    assert cut and len(ids) == fixed + 60
    kept_a = [t for t in ids if 2000 <= t < 2100]
    kept_b = [t for t in ids if 3000 <= t < 3100]
    kept_c = [t for t in ids if 1000 <= t < 1040]
    assert kept_a == a[:15] and kept_b == b[:15]  # equal shares of half the budget, starts kept
    assert kept_c == ctx[-30:]  # the context keeps its end
    short_a = list(range(2000, 2005))  # an answer under its share keeps everything; the other gets the rest
    ids, _ = comparison_ids(fmt, ctx[:10], short_a, b, fixed + 60)
    assert [t for t in ids if 2000 <= t < 2100] == short_a and len([t for t in ids if t >= 3000]) == 45
    assert comparison_ids(fmt, ctx, a, b, fixed + 60, "drop") is None
    whole = fmt.segments[0] + [1] + fmt.segments[1] + [2] + fmt.segments[2] + [3] + fmt.segments[3]
    assert comparison_ids(fmt, [1], [2], [3], fixed + 3) == (whole, False)


def test_labels_must_be_one_token_and_the_template_whole(tiny):
    tok = SharedModel(config(tiny)).tokenizer
    with pytest.raises(ConfigError, match=r"preference.label_a.*tokens of the tokenizer"):
        make_format(tok, config(tiny, "preference.label_a=definitely not one token").preference)
    with pytest.raises(ConfigError, match=r"preference.template"):
        config(tiny, "preference.template=[CONTEXT] {context} [RESPONSE A] {a}")
    with pytest.raises(ConfigError, match=r"label_a.*label_b"):
        config(tiny, "preference.label_b=A")
    with pytest.raises(ConfigError, match=r"reward.preference_model.*reward.kind=preference"):
        config(tiny, "reward.preference_model=x")
    with pytest.raises(ConfigError, match=r"pairs.length_penalty"):
        config(tiny, "reward.kind=preference", "pairs.length_penalty=0.01")


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """`lite-rlhf train-pm` on banana-vs-yellow pairs."""
    tmp = tmp_path_factory.mktemp("pm")
    train = write(tmp / "train.jsonl", rows(TOPICS[:8]))
    held = write(tmp / "eval.jsonl", rows(TOPICS[8:]))
    args = [f"data.preferences={train}", f"data.eval_preferences={held}", f"run.out_dir={tmp / 'run'}",
            "preference.lr=3e-3", "preference.epochs=4", "preference.micro_batch=4",
            "preference.grad_accum=2"]  # fmt: skip
    cfg = config(tiny, *args)
    assert main_train_pm(cfg) == 0
    return cfg, tmp, args


def test_train_pm_writes_the_preference_dir(trained):
    """Files, figures and step records; the tiny random model only learns a position bias, so the
    learning itself is checked on SmolLM2 (next test)."""
    cfg, tmp, _ = trained
    out = tmp / "run" / "preference"
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "metrics.json"}
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_pairs"] == 8 and m["train_pairs"] == 32 and m["steps"] == 16
    for key in ("eval_accuracy", "position_consistency", "first_position_rate", "eval_accuracy_chosen_longer"):
        assert key in m
    assert 0.25 <= m["train_first_is_chosen"] <= 0.75  # the order was drawn per pair
    steps = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r.get("stage") == "preference"] == list(range(1, 17))
    assert steps[-1]["stage"] == "preference_eval" and steps[-1]["eval_accuracy"] == m["eval_accuracy"]


@pytest.mark.slow
def test_a_trained_preference_model_answers_the_swapped_order_the_other_way(tmp_path):
    """`lite-rlhf train-pm` on SmolLM2-135M, banana preferred to yellow: on held-out topics P(A) is above
    1/2 with the chosen answer as A and below with it as B (before training it is not), read back from
    the saved adapter."""
    train = write(tmp_path / "train.jsonl", rows(TOPICS[:8]))
    held_rows = rows(TOPICS[8:])
    held = write(tmp_path / "eval.jsonl", held_rows)
    cfg = load_config(None, [f"data.preferences={train}", f"data.eval_preferences={held}", "run.quiet=true",
                             f"run.out_dir={tmp_path / 'run'}", "model.dtype=float32", "preference.lr=1e-3",
                             "preference.epochs=4", "preference.micro_batch=4", "preference.grad_accum=2"])  # fmt: skip
    assert main_train_pm(cfg) == 0
    model = SharedModel(cfg)
    model.add_preference(cfg.run.seed)
    judge = model_judge(model, cfg)
    pairs = [PreferencePair([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"]) for r in held_rows]

    def both_orders():
        forward = judge.first_probs([(p.prompt, p.chosen, p.rejected) for p in pairs])  # chosen as A
        swapped = judge.first_probs([(p.prompt, p.rejected, p.chosen) for p in pairs])  # chosen as B
        return forward, swapped

    before = both_orders()
    assert not all(f > 0.5 > s for f, s in zip(*before, strict=True)), before
    model.load_adapter("preference", tmp_path / "run" / "preference")
    forward, swapped = both_orders()
    assert all(f > 0.5 > s for f, s in zip(forward, swapped, strict=True)), (forward, swapped)
    m = json.loads((tmp_path / "run" / "preference" / "metrics.json").read_text())
    assert m["eval_accuracy"] == 1.0 and m["position_consistency"] == 1.0, m
    again = evaluate_preference(judge, pairs)  # the figures come back from the loaded adapter
    assert abs(again["eval_loss"] - m["eval_loss"]) < 1e-5


def test_a_separate_saved_preference_model_judges_the_same(trained, tiny, tmp_path):
    """reward.preference_model: our trained adapter merged into a full causal-LM directory, loaded
    beside the base with its own tokenizer, gives our judge's probabilities."""
    cfg, tmp, _ = trained
    model = SharedModel(cfg)
    model.add_preference(cfg.run.seed)
    model.load_adapter("preference", tmp / "run" / "preference")
    ours = model_judge(model, cfg)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), str(tmp / "run" / "preference"))
    merged.merge_and_unload().save_pretrained(tmp_path / "pm-full")
    model.tokenizer.save_pretrained(tmp_path / "pm-full")
    separate = SeparatePreferenceModel(str(tmp_path / "pm-full"), device=torch.device("cpu"), dtype=torch.float32)
    assert separate.separate_model_bytes > 0
    theirs = separate.judge(load_config(None, [f"model.name={tiny}", "reward.kind=preference",
                                               f"reward.preference_model={tmp_path / 'pm-full'}"]))  # fmt: skip
    assert isinstance(theirs, Judge)
    items = [([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"]) for r in rows(TOPICS[8:])]
    a, b = ours.first_probs(items), theirs.first_probs(items)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4


def test_train_pm_resumes_after_a_kill(trained, tiny, tmp_path):
    """Killed at its third optimizer step, the same command trains from the start and ends with the
    uninterrupted run's adapter, bit for bit."""
    cfg, tmp, args = trained
    args = [a for a in args if not a.startswith("run.out_dir")] + [f"run.out_dir={tmp_path / 'run'}"]
    command = [str(BIN), "train-pm", f"model.name={tiny}", "lora.r=4", "run.quiet=true", *args]
    env = {**os.environ, "LITE_RLHF_KILL_AT": "preference:step", "LITE_RLHF_KILL_LOG": str(tmp_path / "log")}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9 and not (tmp_path / "run" / "preference").exists()
    env.pop("LITE_RLHF_KILL_AT")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    from safetensors.torch import load_file

    name = "preference/adapter_model.safetensors"
    mine, clean = load_file(tmp_path / "run" / name), load_file(tmp / "run" / name)
    assert mine.keys() == clean.keys() and all(torch.equal(mine[k], clean[k]) for k in mine)


def test_adding_the_preference_adapter_leaves_the_other_roles_as_drawn(tiny):
    """add_preference draws from its own seed: the policy, reward adapter and head of a run with it are
    those of a run without it, and so is the global random state afterwards."""
    a = SharedModel(config(tiny))
    state = torch.random.get_rng_state()
    a.add_preference(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = SharedModel(config(tiny))
    theirs = dict(b.peft.named_parameters())
    for name, p in a.peft.named_parameters():
        if ".preference." not in name:
            assert torch.equal(p, theirs[name]), name
    assert torch.equal(a.head.weight, b.head.weight)


def test_a_bad_label_is_one_line_and_exit_2(tiny, tmp_path):
    train = write(tmp_path / "train.jsonl", rows(TOPICS[:2]))
    out = subprocess.run([str(BIN), "train-pm", f"model.name={tiny}", f"data.preferences={train}",
                          f"run.out_dir={tmp_path / 'run'}", "preference.label_a=Response A is better"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [x for x in out.stderr.splitlines() if x.startswith("lite-rlhf:") and "error" in x]
    assert len(errors) == 1 and "preference.label_a" in errors[0] and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "run" / "preference").exists()


def test_the_loop_brings_a_trained_preference_adapter(trained, tiny):
    """reward.kind=preference with reward.adapter=<preference dir>: loaded, not trained again; the judge
    then gives the trained adapter's probabilities."""
    from lite_rlhf.loop import train_oracle

    cfg, tmp, _ = trained
    out = tmp / "run" / "preference"
    brought = config(tiny, "reward.kind=preference", f"reward.adapter={out}")
    model = SharedModel(brought)
    train_oracle(None, model, brought)  # no run directory is touched on this path
    reference = SharedModel(cfg)
    reference.add_preference(cfg.run.seed)
    reference.load_adapter("preference", out)
    items = [([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"]) for r in rows(TOPICS[8:])]
    assert model_judge(model, brought).first_probs(items) == model_judge(reference, cfg).first_probs(items)
    fresh = SharedModel(cfg)
    fresh.add_preference(cfg.run.seed)
    assert model_judge(model, brought).first_probs(items) != model_judge(fresh, cfg).first_probs(items)
