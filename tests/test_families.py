"""The trainer side of every model family (lite_rlhf/families.py): a tiny random model of each, built from the
family's own transformers config class with its feature flags (models.make_tiny_model), and on it:

- the fused per-token log-probs and entropy with the policy adapter active equal peft's full-logit forward, which
  applies the family's own logit transform (Gemma 2's soft-cap, Granite's 1 / logits_scaling), at temperature 1
  and 0.7; the preference role's label-token logits likewise;
- LoRA covers every linear layer of the decoder (all-linear, packed qkv_proj / gate_up_proj included), and one
  DPO and one GRPO optimizer step move every policy LoRA matrix;
- `export` merges the adapter and the merged model's logits equal peft's base + adapter.

Each family's model is built once per module (SharedModel, a few hundred ms each).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lite_rlhf.algorithms.dpo import add_reference_logps, train_dpo
from lite_rlhf.algorithms.grpo import Rollout, token_logps, train_pg
from lite_rlhf.batching import IGNORE, make_batch
from lite_rlhf.config import ConfigError, load_config
from lite_rlhf.data import prompt_ids, response_ids
from lite_rlhf.export import export_merged
from lite_rlhf.families import TINY, logit_transform, refusal
from lite_rlhf.models import make_tiny_model
from lite_rlhf.pairs import Pair
from lite_rlhf.plan import lora_params, model_shape
from lite_rlhf.roles import SharedModel

FAMILIES = [f for f in TINY if f != "llama"]  # the plain Llama is every other test module's model
LLAMA_LIST = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # lora.target_modules before all-linear
# fp32 throughout: the fused kernel and the full-logit forward differ by summation order only (H = 128 terms,
# log-sum-exp over ~420 entries): ~1e-6 observed.
TOL = {"rtol": 1e-5, "atol": 2e-5}


def config(model_dir, *overrides: str):
    return load_config(None, [f"model.name={model_dir}", "model.dtype=float32", "lora.r=4", "run.quiet=true",
                              "model.gradient_checkpointing=false", *overrides])  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: conftest's one torch thread


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> the directory of its tiny model (hidden 128, 2 heads of 64, 1 KV head, 2 layers), built on demand."""
    root, made = tmp_path_factory.mktemp("families"), {}

    def get(family: str):
        if family not in made:
            made[family] = make_tiny_model(root / family, family=family, hidden_size=128, heads=2, kv_heads=1)
        return made[family]

    return get


@pytest.fixture(scope="module")
def model(tiny):
    """family -> its SharedModel, with non-zero B matrices in the policy adapter (LoRA starts with B = 0, which
    would hide an adapter the kernels' path did not see)."""
    models = {}

    def get(family: str) -> SharedModel:
        if family not in models:
            m = SharedModel(config(tiny(family)), device="cpu")
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, p in m.peft.named_parameters():
                    if "lora_B.policy" in name:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            models[family] = m
        return models[family]

    return get


def rows(tok) -> list:
    """Two prompt/answer rows of different lengths; the prompts (ChatML with its system line) run past the tiny
    models' sliding window of 64 tokens."""
    prompts = [[{"role": "user", "content": t}] for t in ("describe the ocean.", "the sun is a star. hello world.")]
    answers = ("water is wet.", "cats and dogs are friendly animals.")
    return [(prompt_ids(tok, p), response_ids(tok, a)) for p, a in zip(prompts, answers, strict=True)]


def peft_logits(m: SharedModel, ids: list[int]) -> torch.Tensor:
    """`[T, V]` logits of the active role from peft's own forward (the family's transform applied by
    transformers), for one unpadded row."""
    with torch.no_grad():
        return m.peft(input_ids=torch.tensor([ids])).logits[0].float()


# A temperature meets the family's transform where there is one: under a cap it is not a plain scale of h @ W.T.
@pytest.mark.parametrize(
    "family, temperature", [(f, 1.0) for f in FAMILIES] + [("gemma2", 0.7), ("granite", 0.7)], ids=str
)
def test_fused_logprobs_and_entropy_equal_peft_forward(model, family, temperature):
    m = model(family)
    data = rows(m.tokenizer)
    batch = make_batch(data, m.pad_id, 512, "keep_ends")
    with torch.no_grad(), m.role("policy"):
        logp, entropy = m.token_logps(batch, temperature, entropy=True)  # [B, T]
        for b, (prompt, answer) in enumerate(data):
            ids = prompt + answer
            logits = peft_logits(m, ids) / temperature  # [T, V]
            scored = batch.targets[b, : len(ids)] != IGNORE
            ref = logits.log_softmax(-1)[scored].gather(1, batch.targets[b, : len(ids)][scored][:, None])[:, 0]
            ref_entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)[scored]
            torch.testing.assert_close(logp[b, : len(ids)][scored], ref, **TOL)
            torch.testing.assert_close(entropy[b, : len(ids)][scored], ref_entropy, **TOL)
            assert int(scored.sum()) == len(answer)


def answer_logps(m: SharedModel, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """`[len(answer)]` log-probs of the answer's tokens after the prompt, from peft's full-logit forward."""
    logits = peft_logits(m, prompt + answer)[len(prompt) - 1 : -1]  # the positions that predict the answer
    return logits.log_softmax(-1).gather(1, torch.tensor(answer)[:, None])[:, 0]


@pytest.mark.parametrize("family", ["gemma2", "granite", "qwen2"])
def test_label_logits_equal_peft_forward(model, family):
    """The preference role's logits of its label tokens: the family's transform applied to those rows."""
    m = model(family)
    m.add_preference(seed=5)
    prompt, answer = rows(m.tokenizer)[0]
    ids = torch.tensor([prompt + answer])
    labels = [5, 17]
    with torch.no_grad(), m.role("preference"):
        got = m.label_logits(ids, torch.ones_like(ids), labels)[0]
        ref = peft_logits(m, ids[0].tolist())[-1, labels]
    torch.testing.assert_close(got, ref, **TOL)


def policy_state(m: SharedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.peft.named_parameters() if ".policy." in n}


def assert_every_matrix_moved(before, after, what):
    assert before.keys() == after.keys() and before
    still = [n for n in before if torch.equal(before[n], after[n])]
    assert not still, f"{what}: {len(still)} policy LoRA matrices unchanged, e.g. {still[:2]}"
    assert all(torch.isfinite(t).all() for t in after.values()), what


@pytest.mark.parametrize("family", FAMILIES)
def test_one_dpo_and_one_grpo_step_move_every_policy_matrix(model, family):
    m = model(family)
    tok = m.tokenizer
    cfg = config(m.base_dir, "dpo.micro_batch=2", "dpo.grad_accum=1", "dpo.epochs=1", "dpo.lr=1e-2",
                 "loop.algorithm=grpo", "generation.n=2", "grpo.micro_batch=2", "grpo.grad_accum=1",
                 "grpo.epochs=1", "grpo.lr=1e-2", "grpo.warmup_ratio=0")  # fmt: skip
    data = rows(tok)
    ids = {str(i): prompt for i, (prompt, _) in enumerate(data)}
    pairs = [Pair(pid, response_ids(tok, "the sun is a star."), response_ids(tok, "no no"), "", "", 1.0, 0.0)
             for pid in ids]  # fmt: skip
    pairs = add_reference_logps(m, pairs, ids, cfg.data, 2)
    with m.role("policy"):  # the chosen answers' NLL per token from peft's forward: what the DPO step must see
        nll = [-answer_logps(m, ids[p.prompt_id], p.chosen_ids).mean() for p in pairs]
    before, records = policy_state(m), []
    train_dpo(m, pairs, ids, cfg.dpo, cfg.data, seed=0, quiet=True, on_step=records.append)
    assert len(records) == 1 and torch.isfinite(torch.tensor(records[0]["loss"]))
    assert abs(records[0]["chosen_nll"] - float(sum(nll)) / len(nll)) < 1e-4, (records[0], nll)
    assert_every_matrix_moved(before, policy_state(m), f"{family} DPO step")

    old = token_logps(m, "policy", data, cfg.data, 2, 1.0, quiet=True)
    ref = token_logps(m, "reference", data, cfg.data, 2, 1.0, quiet=True)
    batch = [Rollout(str(i), 0, answer, 0.0, adv, o, r)
             for i, ((_, answer), adv, o, r) in enumerate(zip(data, (1.0, -1.0), old, ref, strict=True))]  # fmt: skip
    before, records = policy_state(m), []
    train_pg(m, batch, ids, cfg, seed=0, quiet=True, on_step=records.append)
    assert len(records) == 1
    assert_every_matrix_moved(before, policy_state(m), f"{family} GRPO step")


@pytest.mark.parametrize("family", FAMILIES)
def test_export_merges_to_base_plus_adapter(model, family, tmp_path):
    m = model(family)
    adapter = m.save_adapter("policy", tmp_path / "policy")
    out = export_merged(config(m.base_dir), adapter, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    attn = m.peft.get_base_model().config._attn_implementation  # Gemma 2: eager, as the trainer's (the sdpa
    # default leaves its attention soft-cap out)
    merged = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, use_safetensors=True, attn_implementation=attn
    )
    prompt, answer = rows(m.tokenizer)[1]
    with torch.no_grad(), m.role("policy"):
        expected = peft_logits(m, prompt + answer)
        got = merged(input_ids=torch.tensor([prompt + answer])).logits[0]
    # Merging adds 8 B @ A into each weight: one more fp32 rounding per weight, which the layers carry to the logits
    # (|z| up to ~50): up to ~1e-3 observed; in float64 the merged and the peft logits are equal.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-3)
    assert "LoRA on " in (out / "README.md").read_text()


# --------------------------------------------------------------------------- LoRA target modules


def adapter_tensors(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def test_all_linear_on_llama_is_the_former_list_exactly(tiny, tmp_path):
    """The default (all-linear) adapts a Llama's q/k/v/o/gate/up/down, as the former explicit list did, with the
    very same LoRA draws: a run's figures do not move."""
    default = SharedModel(config(tiny("llama")), device="cpu").save_adapter("policy", tmp_path / "default")
    listed = SharedModel(config(tiny("llama"), f"lora.target_modules={LLAMA_LIST}"), device="cpu")
    listed = listed.save_adapter("policy", tmp_path / "listed")
    a, b = adapter_tensors(default), adapter_tensors(listed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((default / "adapter_config.json").read_text())["target_modules"] == sorted(LLAMA_LIST.split(","))
    assert {k.split(".")[-3] for k in a} == set(LLAMA_LIST.split(","))


def test_phi3_adapter_holds_its_packed_layers_and_plan_counts_them(model, tmp_path):
    m = model("phi3")
    keys = adapter_tensors(m.save_adapter("policy", tmp_path / "phi3")).keys()
    assert {k.split(".")[-3] for k in keys} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    held = sum(p.numel() for n, p in m.peft.named_parameters() if ".policy." in n)
    assert lora_params(model_shape(str(m.base_dir)), config(m.base_dir)) == held


def test_a_list_that_leaves_layers_out_is_said_and_one_that_matches_none_is_refused(tiny, capsys):
    m = SharedModel(config(tiny("phi3"), f"lora.target_modules={LLAMA_LIST}"), device="cpu")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[lite-rlhf] warning: lora.target_modules: "), lines
    assert "LoRA on down_proj, o_proj; NOT on gate_up_proj, qkv_proj" in lines[0]
    assert "no such layer: gate_proj, k_proj, q_proj, up_proj, v_proj" in lines[0]
    assert {n.split(".")[-4] for n, _ in m.peft.named_parameters() if ".policy." in n} == {"down_proj", "o_proj"}
    with pytest.raises(ConfigError, match=r"lora.target_modules.*match no linear layer.*qkv_proj"):
        SharedModel(config(tiny("phi3"), "lora.target_modules=q_proj,v_proj"), device="cpu")
    with pytest.raises(ConfigError, match="all-linear alone"):
        config(tiny("phi3"), "lora.target_modules=all-linear,q_proj")


# --------------------------------------------------------------------------- logit transforms


def test_logit_transforms_and_refusals_from_the_config():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

    assert (logit_transform(GraniteConfig(logits_scaling=8.0)).scale, refusal(GraniteConfig(logits_scaling=8.0))) == (
        0.125, None)  # fmt: skip
    assert logit_transform(CohereConfig(logit_scale=0.0625)).scale == 0.0625
    assert logit_transform(Gemma2Config(final_logit_softcapping=30.0)).softcap == 30.0
    assert logit_transform(LlamaConfig()) == logit_transform(Gemma2Config(final_logit_softcapping=None))
    # the same key in a family that uses it otherwise (HyperCLOVA X multiplies by logits_scaling), or a key no
    # kernel applies: one line naming the family and the key
    assert refusal(LlamaConfig(logits_scaling=4.0)).startswith("model family 'llama' transforms its logits with "
                                                               "logits_scaling=4.0")  # fmt: skip
    assert "lm_head_multiplier" in refusal(LlamaConfig(lm_head_multiplier=2.0))


def test_a_refused_transform_stops_at_start(tiny, tmp_path):
    import shutil

    path = tmp_path / "odd"
    shutil.copytree(tiny("llama"), path)
    cfg_file = path / "config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"lm_head_multiplier": 2.0}))
    with pytest.raises(ConfigError, match=r"model.name.*model family 'llama'.*lm_head_multiplier=2.0"):
        SharedModel(config(path), device="cpu")


def test_attention_soft_capping_loads_eager_attention(model, tiny):
    """transformers' sdpa attention leaves Gemma 2's attn_logit_softcapping out: the trainer loads it eager."""
    assert model("gemma2").peft.get_base_model().config._attn_implementation == "eager"
    assert model("gemma3").peft.get_base_model().config._attn_implementation == "sdpa"  # no attention cap
    with pytest.raises(ConfigError, match=r"model.attn_implementation.*'gemma2'.*attn_logit_softcapping=50.0"):
        SharedModel(config(tiny("gemma2"), "model.attn_implementation=sdpa"), device="cpu")


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_the_hf_engine_samples_with_the_trainers_attention(model, tiny, family):
    """generation.backend=hf loads its own copy of the model: with the attention the trainer chose (eager for Gemma
    2's attention soft-cap), or its answers would come from a model the trainer does not compute log-probs of."""
    from lite_rlhf.generate import make_engine

    engine = make_engine(tiny(family), config(tiny(family), "generation.backend=hf").generation, lora_rank=4, seed=0)
    try:
        trainer = model(family).peft.get_base_model().config._attn_implementation
        assert engine.model.config._attn_implementation == trainer == ("eager" if family == "gemma2" else "sdpa")
    finally:
        engine.close()


def test_the_model_card_names_the_adapted_layers(model, tmp_path):
    """The run's card for its chosen adapter says which layers hold LoRA, read from the adapter it describes."""
    from lite_rlhf.config import to_yaml
    from lite_rlhf.report import model_card

    m = model("phi3")
    m.save_adapter("policy", tmp_path / "iter_001" / "policy")
    (tmp_path / "best").symlink_to("iter_001/policy")
    (tmp_path / "config.yaml").write_text(to_yaml(config(m.base_dir)))
    card = model_card(tmp_path, [], "validation reward")
    assert "LoRA rank 4, alpha 32.0, on down_proj, gate_up_proj, o_proj, qkv_proj." in card


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_on_cpu_logprobs_equal_peft_and_every_lora_a_gets_a_gradient(tiny, family):
    """model.quantization=nf4 (bitsandbytes' CPU backend): the fused log-probs on the 4-bit base equal peft's
    forward on it, and the gradient reaches every policy LoRA A matrix (B made non-zero)."""
    pytest.importorskip("bitsandbytes")
    m = SharedModel(config(tiny(family), "model.quantization=nf4"), device="cpu")
    with torch.no_grad():
        for name, p in m.peft.named_parameters():
            if "lora_B.policy" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    prompt, answer = rows(m.tokenizer)[0]
    batch = make_batch([(prompt, answer)], m.pad_id, 512, "keep_ends")
    with m.role("policy"):
        expected = answer_logps(m, prompt, answer)
        logp = m.token_logps(batch)[0]
        logp.sum().backward()
    torch.testing.assert_close(logp[batch.targets[0] != IGNORE], expected, **TOL)
    grads = {n: p.grad for n, p in m.peft.named_parameters() if "lora_A.policy" in n}
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads.values()), family


def test_the_family_benchmark_answers_help_with_every_family():
    """benchmarks/families.py (the whole loop per family: minutes each, so not run here) starts, and offers every
    family of the matrix."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "families.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    offered = out.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert offered == FAMILIES, out.stdout
