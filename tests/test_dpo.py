"""DPO on the shared model: `dpo.kernel` is honoured (the fused chunked path and the full-logits
reference train the same), Triton is refused where it cannot run, reference-free losses skip π0."""

import os

import pytest
import torch

from lite_rlhf.algorithms.dpo import add_reference_logps, dpo_loss_fn, train_dpo
from lite_rlhf.config import ConfigError, load_config
from lite_rlhf.data import prompt_ids, response_ids
from lite_rlhf.models import make_tiny_model
from lite_rlhf.pairs import Pair
from lite_rlhf.roles import SharedModel


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def train(tiny, kernel: str, *overrides: str, reference: bool = True) -> list[dict]:
    cfg = load_config(None, [f"model.name={tiny}", "lora.r=4", f"dpo.kernel={kernel}", "dpo.micro_batch=2",
                             "dpo.grad_accum=1", "dpo.lr=1e-2", "dpo.epochs=2", *overrides])  # fmt: skip
    model = SharedModel(cfg)
    tok = model.tokenizer
    ids = {str(i): prompt_ids(tok, [{"role": "user", "content": f"describe the {w}."}])
           for i, w in enumerate(("sun", "sea", "fox", "dog"))}  # fmt: skip
    pairs = [Pair(pid, response_ids(tok, "the sun is a star."), response_ids(tok, "no no"), "", "", 1.0, 0.0)
             for pid in ids]  # fmt: skip
    if reference:
        pairs = add_reference_logps(model, pairs, ids, cfg.data, cfg.dpo.micro_batch)
    records = []
    train_dpo(model, pairs, ids, cfg.dpo, cfg.data, seed=0, quiet=True, on_step=records.append)
    return records


def test_chunked_kernel_trains_like_the_full_logits_reference(tiny):
    fused, reference = train(tiny, "chunked"), train(tiny, "reference")
    assert len(fused) == len(reference) == 4
    for a, b in zip(fused, reference, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    assert fused[-1]["loss"] < fused[0]["loss"], "DPO should lower the loss on a learnable preference"


def test_reference_free_losses_train_without_reference_logps_and_log_each_term(tiny):
    """SimPO plus the sft term: the pairs carry no π0 log-probs (the stage skips that pass), each step logs each term
    before its weight, and the loss is their weighted sum."""
    from types import SimpleNamespace

    from lite_rlhf.algorithms.dpo import with_reference

    records = train(tiny, "chunked", "dpo.loss_type=simpo,sft", "dpo.loss_weights=1,0.5", reference=False)
    assert len(records) == 4 and all(set(r) >= {"loss_simpo", "loss_sft"} for r in records)
    for r in records:
        assert abs(r["loss"] - (r["loss_simpo"] + 0.5 * r["loss_sft"])) < 1e-5, r
    assert records[-1]["loss"] < records[0]["loss"]
    cfg = load_config(None, ["dpo.loss_type=simpo"])
    no_model = SimpleNamespace(cfg=cfg, model=None)  # a reference pass would call the model
    made = [Pair("0", [1], [2], "", "", 1.0, 0.0)]
    assert with_reference(no_model, made) is made and made[0].ref_chosen_logp is None


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs Triton on CPU")
def test_triton_is_refused_without_cuda_or_the_interpreter():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ConfigError, match="dpo.kernel"):
        dpo_loss_fn(load_config(None, ["dpo.kernel=triton"]).dpo, "cpu")


def mixed_lengths(tiny):
    """A model and 4 pairs whose rows differ in length (2 short, 2 long, interleaved), with reference log-probs."""
    cfg = load_config(None, [f"model.name={tiny}", "lora.r=4", "dpo.micro_batch=2", "dpo.grad_accum=2",
                             "dpo.lr=1e-2", "dpo.epochs=1", "model.gradient_checkpointing=false"])  # fmt: skip
    model = SharedModel(cfg)
    tok = model.tokenizer
    ids = {str(i): prompt_ids(tok, [{"role": "user", "content": f"describe the {w}."}])
           for i, w in enumerate(("sun", "sea", "fox", "dog"))}  # fmt: skip
    long = "the sun is a star. " * 6
    pairs = [Pair(pid, response_ids(tok, long if i % 2 else "a star."), response_ids(tok, "no"), "", "", 1.0, 0.0)
             for i, pid in enumerate(ids)]  # fmt: skip
    return cfg, model, ids, pairs


def test_length_grouping_pads_less_and_trains_the_same(tiny, monkeypatch):
    """train_dpo groups similar lengths into a micro-batch within each optimizer step: fewer padded tokens,
    the same pairs per step, and the same adapter as the plan's own order within fp32 rounding."""
    import lite_rlhf.algorithms.dpo as dpo_module

    make_batch, padded = dpo_module.make_batch, []

    def counting_make_batch(*args):
        batch = make_batch(*args)
        padded.append(batch.input_ids.numel())
        return batch

    results = {}
    for grouped in (True, False):
        if not grouped:
            monkeypatch.setattr(dpo_module, "group_by_length", lambda steps, lengths: steps)
        cfg, model, ids, pairs = mixed_lengths(tiny)
        pairs = add_reference_logps(model, pairs, ids, cfg.data, cfg.dpo.micro_batch)
        start = torch.cat([p.detach().flatten() for p in model.parameters("policy")])
        padded.clear()
        monkeypatch.setattr(dpo_module, "make_batch", counting_make_batch)
        train_dpo(model, pairs, ids, cfg.dpo, cfg.data, seed=0, quiet=True, on_step=lambda r: None)
        monkeypatch.setattr(dpo_module, "make_batch", make_batch)
        results[grouped] = (sum(padded), torch.cat([p.detach().flatten() for p in model.parameters("policy")]))
    assert results[True][0] < results[False][0], f"padded tokens grouped {results[True][0]} vs {results[False][0]}"
    assert not torch.equal(results[True][1], start), "the step must move the adapter"
    torch.testing.assert_close(results[True][1], results[False][1], atol=1e-6, rtol=1e-5)


def test_reference_logps_in_length_order_keep_the_pairs_order(tiny):
    cfg, model, ids, pairs = mixed_lengths(tiny)
    batched = add_reference_logps(model, pairs, ids, cfg.data, micro_batch=2)  # batches of similar length
    alone = add_reference_logps(model, pairs, ids, cfg.data, micro_batch=1)  # no padding at all
    assert [p.prompt_id for p in batched] == [p.prompt_id for p in pairs]
    for a, b in zip(batched, alone, strict=True):
        assert abs(a.ref_chosen_logp - b.ref_chosen_logp) < 1e-4, (a, b)
        assert abs(a.ref_rejected_logp - b.ref_rejected_logp) < 1e-4, (a, b)


def test_a_spin_iteration_pairs_each_data_answer_with_the_policys_own(tiny, tmp_path):
    """pairs.source=spin: the stage's pairs are exactly (the prompt row's completion, the policy's sample) for the
    iteration's prompts, a sample equal to the data answer is dropped, π0's log-probs are those of both answers,
    and the committed stage is read back as it was written (resume)."""
    import json

    from lite_rlhf.algorithms import dpo as dpo_module
    from lite_rlhf.context import Context, Say
    from lite_rlhf.generate import Sample
    from lite_rlhf.runstate import RunDir, read_jsonl
    from lite_rlhf.task import load_task

    rows = [{"id": w, "prompt": f"describe the {w}.", "completion": f"the {w} is here."} for w in ("sun", "sea", "fox")]
    data, held = tmp_path / "spin.jsonl", tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held.write_text('{"prompt": "describe the moon."}\n')
    cfg = load_config(None, [f"model.name={tiny}", "lora.r=4", "pairs.source=spin", "generation.n=1",
                             f"run.out_dir={tmp_path / 'run'}", f"data.prompts={data}", f"data.val_prompts={held}",
                             f"data.test_prompts={held}"])  # fmt: skip
    task = load_task(cfg.data, answers=True)
    model = SharedModel(cfg)
    ids = {p.id: prompt_ids(model.tokenizer, p.messages) for p in task.prompts}
    ctx = Context(RunDir(cfg), cfg, task, model, None, None, ids, Say(True))
    own = {"sun": "a star.", "sea": "the sea is here.", "fox": "no idea"}  # the sea's equals its data answer
    samples = [Sample(pid, 0, text, response_ids(model.tokenizer, text), 4, "stop") for pid, text in own.items()]
    made = dpo_module.pairs(ctx, 1, samples, [None] * 3)  # no reward is read
    assert [(p.prompt_id, p.chosen_text, p.rejected_text) for p in made] == [
        ("sun", "the sun is here.", "a star."), ("fox", "the fox is here.", "no idea")]  # fmt: skip
    assert all(p.chosen_ids == response_ids(model.tokenizer, p.chosen_text) for p in made)
    expected = add_reference_logps(model, made, ids, cfg.data, 4)
    assert [p.ref_chosen_logp for p in made] == [p.ref_chosen_logp for p in expected] != [None, None]
    record = read_jsonl(ctx.rd.metrics_path)[-1]
    assert (record["pairs_kept"], record["dropped_identical"]) == (2, 1)
    assert dpo_module.pairs(ctx, 1, [], []) == made  # committed: read back, not made again


def test_spin_needs_each_training_prompt_to_carry_its_answer(tmp_path):
    from lite_rlhf.data import DataError
    from lite_rlhf.task import load_task

    data, held = tmp_path / "p.jsonl", tmp_path / "held.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    held.write_text('{"prompt": "d"}\n')
    cfg = load_config(None, [f"data.prompts={data}", f"data.val_prompts={held}", f"data.test_prompts={held}"])
    load_task(cfg.data)  # without SPIN a completion is just another field
    with pytest.raises(DataError, match=r"p.jsonl:2: missing field 'completion'"):
        load_task(cfg.data, answers=True)
    with pytest.raises(ConfigError, match="generation.n=1"):
        load_config(None, ["pairs.source=spin"])
