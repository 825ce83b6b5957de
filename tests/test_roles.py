"""SharedModel: one base, three roles. Tiny random Llama models; every comparison is against a model
loaded separately with plain transformers (and plain peft for saved adapters)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lite_rlhf.batching import make_batch
from lite_rlhf.config import load_config
from lite_rlhf.data import prompt_ids, response_ids
from lite_rlhf.models import make_tiny_model
from lite_rlhf.roles import SharedModel, keep_nf4_layout

QA = [
    ("describe the ocean in a few words.", "water is wet. the sun is a star."),
    ("hello world", "cats and dogs are friendly animals. have a nice day."),
    ("use the word banana.", "a banana is a yellow fruit."),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def make(tiny, *overrides):
    return SharedModel(load_config(None, [f"model.name={tiny}", "lora.r=4", *overrides]))


def batch(model):
    """Right-padded prompt + response batch: (input_ids, mask, prompt lengths, the `Batch`)."""
    rows = [
        (prompt_ids(model.tokenizer, [{"role": "user", "content": q}]), response_ids(model.tokenizer, a)) for q, a in QA
    ]
    b = make_batch(rows, model.tokenizer.pad_token_id, 512, "keep_ends")
    return b.input_ids, b.mask, torch.tensor([len(p) for p, _ in rows]), b


def perturb(model, name, seed=1):
    """Random non-zero LoRA weights, so that an adapter changes the outputs (B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.peft.named_parameters():
            if f".{name}." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def plain_logps(plain, ids, mask, lens):
    """Response log-probs from a plain model's full logits (the specification)."""
    logits = plain(input_ids=ids, attention_mask=mask).logits.float()  # [B, T, V]
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
    pos = torch.arange(1, ids.shape[1])
    scored = (pos[None] >= lens[:, None]) & mask[:, 1:].bool()
    return (logp * scored).sum(-1)


def load_plain(tiny, dtype, nf4=False):
    kw = {"dtype": dtype, "device_map": "cpu"}
    if nf4:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(tiny, **kw).eval()
    if nf4:  # the same 4-bit arithmetic as SharedModel, whose reference pass runs the training layout
        keep_nf4_layout(model)
    return model


# Tolerances: fp32 differs only by summation order (the kernel walks the vocabulary in blocks, and sums a
# row's token log-probs over padded positions): a few ulps of sums near 100, hence rtol 1e-6 beside atol. In bf16 the
# plain model rounds its logits to bf16 (relative 2^-8, |logit| < 2 here) before log-softmax; the kernel
# keeps them in fp32: ~1e-2 per token, summed over ~10 tokens.
CASES = [("float32", False, 1e-5), ("bfloat16", False, 1e-1), ("float32", True, 1e-5)]


@pytest.mark.parametrize("dtype,nf4,atol", CASES, ids=["fp32", "bf16", "nf4"])
def test_reference_is_the_untouched_base(tiny, dtype, nf4, atol):
    model = make(tiny, f"model.dtype={dtype}", *(["model.quantization=nf4"] if nf4 else []))
    perturb(model, "policy")
    perturb(model, "reward", seed=2)
    plain = load_plain(tiny, getattr(torch, dtype), nf4)
    ids, mask, lens, b = batch(model)
    with model.role("reference"):
        hidden = model.hidden_states(ids, mask)
        got, n_tokens = model.sequence_logps(b)
    with torch.no_grad():
        want_hidden = plain.model(input_ids=ids, attention_mask=mask).last_hidden_state
        want = plain_logps(plain, ids, mask, lens)
    diff = (hidden - want_hidden).abs().max().item()
    assert torch.equal(hidden, want_hidden), f"reference hidden states differ from the base by {diff}"
    assert_close(got, want, atol=atol, rtol=1e-6, msg=lambda m: f"reference log-probs vs plain base: {m}")
    assert n_tokens.tolist() == (mask.sum(-1) - lens).tolist()
    with model.role("policy"), torch.no_grad():
        policy, _ = model.sequence_logps(b)
    assert (policy - want).abs().max() > 1e-2, "the policy adapter should change the log-probs"


def test_token_logps_are_peft_forwards_logits_over_the_temperature(tiny):
    """GRPO's per-token path: log_softmax(logits / temperature) at each response token, from peft's own forward
    with full logits; 0 elsewhere; and a gradient that flows to the policy adapter."""
    model = make(tiny)
    perturb(model, "policy")
    ids, mask, lens, b = batch(model)
    for temperature in (1.0, 0.7):
        with model.role("policy"), torch.no_grad():
            got = model.token_logps(b, temperature)
            logits = model.peft(input_ids=ids, attention_mask=mask).logits.float()
        want = (logits[:, :-1] / temperature).log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        scored = (torch.arange(1, ids.shape[1])[None] >= lens[:, None]) & mask[:, 1:].bool()
        assert_close(got[:, :-1], want * scored, atol=1e-5, rtol=1e-6)
        assert (got[:, -1] == 0).all() and (got[:, :-1][~scored] == 0).all()
        with model.role("policy"), torch.no_grad():  # the entropy beside them: of the same softmax, peft's logits
            again, entropy = model.token_logps(b, temperature, entropy=True)
        logp = (logits[:, :-1] / temperature).log_softmax(-1)
        assert torch.equal(again, got)
        assert_close(entropy[:, :-1], -(logp.exp() * logp).sum(-1) * scored, atol=1e-5, rtol=1e-5)
        assert (entropy[:, -1] == 0).all() and entropy[:, :-1][scored].min() > 0
    with model.role("policy"):
        model.token_logps(b, 0.7).sum().backward()
    grads = [p.grad for n, p in model.peft.named_parameters() if ".policy." in n and "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def policy_step(model, b, lr=1e-2):
    opt = torch.optim.SGD(model.parameters("policy"), lr=lr)
    model.train(True)
    with model.role("policy"):
        logps, _ = model.sequence_logps(b)
        (-logps.sum()).backward()
    opt.step()
    model.train(False)


def reward_step(model, ids, mask, lr=1e-2):
    opt = torch.optim.SGD(model.parameters("reward"), lr=lr)
    (-model.score(ids, mask).sum()).backward()
    opt.step()


def test_policy_training_leaves_reference_and_reward_alone(tiny):
    model = make(tiny)
    perturb(model, "reward")
    ids, mask, lens, b = batch(model)
    with model.role("reference"):
        ref0, _ = model.sequence_logps(b)
    with torch.no_grad():
        pol0, _ = model.sequence_logps(b)
        rew0 = model.score(ids, mask)
    for _ in range(3):
        policy_step(model, b)
    with model.role("reference"):
        ref1, _ = model.sequence_logps(b)
    with torch.no_grad():
        pol1, _ = model.sequence_logps(b)
        rew1 = model.score(ids, mask)
    assert_close(ref1, ref0, atol=0, rtol=0, msg=lambda m: f"reference moved: {m}")
    assert_close(rew1, rew0, atol=0, rtol=0, msg=lambda m: f"reward moved: {m}")
    assert (pol1 - pol0).min() > 0, f"policy log-probs should rise: {pol0.tolist()} -> {pol1.tolist()}"


def policy_grads(model, b):
    model.train(True)
    logps, _ = model.sequence_logps(b)
    logps.sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters("policy")])
    model.peft.zero_grad(set_to_none=True)
    return grads


def test_nf4_reference_pass_keeps_policy_gradients(tiny):
    """bitsandbytes repacks 4-bit weights on an eval forward without grad, after which no gradient flows
    through the base layers; SharedModel turns that off (see roles.keep_nf4_layout)."""
    model = make(tiny, "model.quantization=nf4")
    perturb(model, "policy")
    ids, mask, lens, b = batch(model)
    before = policy_grads(model, b)
    with model.role("reference"):
        model.sequence_logps(b)
    after = policy_grads(model, b)
    assert_close(after, before, atol=0, rtol=0, msg=lambda m: f"a reference pass changed the policy grads: {m}")


def test_nf4_step_changes_only_lora_and_head(tiny):
    model = make(tiny, "model.quantization=nf4")
    ids, mask, lens, b = batch(model)
    before = {k: v.clone() for k, v in model.peft.state_dict().items()}
    with model.role("reference"):  # an eval pass must not touch the 4-bit weights either
        model.sequence_logps(b)
    head = model.head.weight.detach().clone()
    policy_step(model, b)
    reward_step(model, ids, mask)
    changed = {k for k, v in model.peft.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "nothing trained"
    bad = sorted(k for k in changed if not (".lora_" in k and (".policy." in k or ".reward." in k)))
    assert not bad, bad[:8]
    assert any(".policy." in k for k in changed) and any(".reward." in k for k in changed)
    assert not torch.equal(model.head.weight, head), "the head did not train"


def test_reward_save_load_roundtrip(tiny, tmp_path):
    model = make(tiny)
    ids, mask, _, _ = batch(model)
    for _ in range(2):
        reward_step(model, ids, mask)
    with torch.no_grad():
        want = model.score(ids, mask)
    model.save_reward(tmp_path / "reward")
    assert {p.name for p in (tmp_path / "reward").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "head.safetensors",
    }
    fresh = make(tiny, "run.seed=7")  # another seed: another random head and adapter init
    fresh.load_reward(tmp_path / "reward")
    with torch.no_grad():
        got = fresh.score(ids, mask)
    assert_close(got, want, atol=0, rtol=0, msg=lambda m: f"reward after save/load: {m}")


def test_score_reads_last_token_under_right_padding(tiny):
    model = make(tiny)
    perturb(model, "reward")
    ids, mask, _, _ = batch(model)
    with torch.no_grad():
        batched = model.score(ids, mask)
        alone = torch.cat(
            [model.score(ids[i : i + 1, : mask[i].sum()], mask[i : i + 1, : mask[i].sum()]) for i in range(3)]
        )
    assert_close(batched, alone, atol=1e-5, rtol=0, msg=lambda m: f"padding changed the reward: {m}")


def peft_logps(tiny, adapter_dir, ids, mask, lens):
    from peft import PeftModel

    plain = PeftModel.from_pretrained(load_plain(tiny, torch.float32), str(adapter_dir)).eval()
    with torch.no_grad():
        return plain_logps(plain, ids, mask, lens)


def test_saved_adapter_loads_in_plain_peft(tiny, tmp_path):
    model = make(tiny)
    perturb(model, "policy")
    ids, mask, lens, b = batch(model)
    with torch.no_grad():
        want, _ = model.sequence_logps(b)
    model.save_adapter("policy", tmp_path / "policy")
    config = json.loads((tmp_path / "policy" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny)
    keys = list(load_file(tmp_path / "policy" / "adapter_model.safetensors"))
    assert keys and not any("policy" in k for k in keys), keys[:3]
    got = peft_logps(tiny, tmp_path / "policy", ids, mask, lens)
    assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m: f"plain peft vs SharedModel policy: {m}")


def test_sft_adapter_is_the_reference_and_the_policy_start(tiny, tmp_path):
    source = make(tiny)
    perturb(source, "policy")
    source.save_adapter("policy", tmp_path / "sft")
    model = make(tiny, f"model.sft_adapter={tmp_path / 'sft'}")
    ids, mask, lens, b = batch(model)
    want = peft_logps(tiny, tmp_path / "sft", ids, mask, lens)  # base + sft through plain peft
    with model.role("reference"):
        ref, _ = model.sequence_logps(b)
    with torch.no_grad():
        pol, _ = model.sequence_logps(b)
    raw = plain_logps(load_plain(tiny, torch.float32), ids, mask, lens).detach()
    assert_close(ref, want, atol=1e-5, rtol=0, msg=lambda m: f"reference vs base + sft: {m}")
    assert (ref - raw).abs().max() > 1e-2, "reference is the raw base, not base + sft"
    assert_close(pol, ref, atol=0, rtol=0, msg=lambda m: f"policy does not start as the sft copy: {m}")
    policy_step(model, b)
    with model.role("reference"):
        ref1, _ = model.sequence_logps(b)
    assert_close(ref1, ref, atol=0, rtol=0, msg=lambda m: f"training the policy moved the sft reference: {m}")
    assert not any(p.requires_grad for n, p in model.peft.named_parameters() if ".sft." in n)


def test_role_scope_and_grad(tiny):
    model = make(tiny)
    ids, mask, lens, b = batch(model)
    with model.role("reward"):
        with pytest.raises(RuntimeError):
            with model.role("reference"):
                assert not torch.is_grad_enabled()
                raise RuntimeError("boom")
        assert model.active_role == "reward"
    assert model.active_role == "policy" and torch.is_grad_enabled()
    with pytest.raises(ValueError, match="unknown role"):
        with model.role("critic"):
            pass
    logps, _ = model.sequence_logps(b)
    assert logps.requires_grad, "the policy role must keep autograd"


def layer_calls(model, b) -> list[int]:
    """How many times each decoder layer's attention runs in one training forward + backward (a hook on
    the layer itself sees the recomputation only from inside)."""
    calls = [0] * len(model._decoder.layers)
    hooks = [layer.self_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(model._decoder.layers)]  # fmt: skip
    policy_grads(model, b)
    for h in hooks:
        h.remove()
    return calls


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    """false, true and a number of layers: the checkpointed layers (the first k) run twice, the others once,
    and the gradients are the same, to the bit on this tiny model (on SmolLM2 the recomputed layers round
    differently: configs/demo.yaml pins 0 to reproduce its figures)."""
    grads = []
    for flag, calls in (("false", [1, 1]), ("true", [2, 2]), ("1", [2, 1])):
        model = make(tiny, f"model.gradient_checkpointing={flag}")
        perturb(model, "policy")
        assert layer_calls(model, batch(model)[3]) == calls, flag
        grads.append(policy_grads(model, batch(model)[3]))
    for g in grads[1:]:
        assert torch.equal(g, grads[0]), f"checkpointing changed grads: {(g - grads[0]).abs().max()}"


def test_auto_checkpointing_fits_the_budget_and_says_so(tiny, capsys, tmp_path):
    """auto: no layer under a budget that holds everything, every layer (and a warning) under one that holds
    nothing; the choice is printed unless quiet, and it can change from stage to stage."""
    model = make(tiny, "model.memory_budget=4GiB")  # the default is auto
    assert model.fit_checkpointing("dpo", 4 * 300, quiet=False) == 0
    assert layer_calls(model, batch(model)[3]) == [1, 1]
    out = capsys.readouterr().out
    assert "[lite-rlhf] dpo: gradient checkpointing on 0 of 2 layers; estimated peak" in out
    assert "within the budget of 4.00 GiB (model.memory_budget) for the longest micro-batch, 1,200 tokens" in out

    model = make(tiny, "model.memory_budget=1MiB")
    assert model.fit_checkpointing("reward", 1200, quiet=False) == 2 and model.checkpointed_layers == 2
    assert "OVER the budget of 0.00 GiB" in capsys.readouterr().out
    assert layer_calls(model, batch(model)[3]) == [2, 2]
    model.fit_checkpointing("quiet", 1200, quiet=True)
    assert capsys.readouterr().out == ""

    default = make(tiny)  # no budget given: 75% of the available RAM, plenty for a tiny model
    assert default.memory_budget()[1] == "75% of available RAM"
    assert default.fit_checkpointing("dpo", 1200, quiet=True) == 0  # a quarter of 2 layers: none
    four = make(make_tiny_model(tmp_path / "four", layers=4))  # on CPU without a budget: a quarter of the layers
    assert four.fit_checkpointing("dpo", 1200, quiet=False) == 1 and layer_calls(four, batch(four)[3]) == [2, 1, 1, 1]
    out = capsys.readouterr().out
    assert "within the budget" in out and "(at least 1 on CPU without model.memory_budget)" in out
    fixed = make(tiny, "model.gradient_checkpointing=1", "model.memory_budget=1MiB")
    assert fixed.checkpointed_layers == 1 and fixed.fit_checkpointing("dpo", 1200, quiet=False) == 1
    assert capsys.readouterr().out == ""  # a fixed setting is not a choice: nothing to say


def test_missing_sft_adapter_names_the_key(tiny, tmp_path):
    from lite_rlhf.config import ConfigError

    with pytest.raises(ConfigError, match="model.sft_adapter"):
        make(tiny, f"model.sft_adapter={tmp_path / 'nowhere'}")


def test_length_groups_minimise_padded_tokens_plus_a_cost_per_pass():
    from lite_rlhf.batching import length_groups

    lengths = [100, 10, 95, 12, 11, 98]
    # one pass: 6 x 100 = 600 + 80; two passes (100, 98, 95 | 12, 11, 10): 300 + 36 + 160 = 496
    assert length_groups(lengths, 80) == [[0, 5, 2], [3, 4, 1]]
    assert length_groups(lengths, 1000) == [[0, 5, 2, 3, 4, 1]]  # a pass costs more than the padding saved
    assert length_groups(lengths, 0) == [[0], [5], [2], [3], [4], [1]]  # free passes: no padding at all
    assert length_groups([], 80) == []


@pytest.mark.parametrize("how", ["grouped", "packed"])
def test_no_compute_on_padding_gives_the_padded_results(tiny, how):
    """Rows in length groups (CPU) or packed into one row with per-row positions (the CUDA flash-attention
    path, here through transformers' block-diagonal mask) give the hidden states, log-probs and LoRA
    gradients of the plain padded batch."""
    model = make(tiny)
    perturb(model, "policy")
    qa = QA + [("hi", "ok."), ("tell me a long story about the sea and the sun.", "once upon a time " * 8)]
    rows = [(prompt_ids(model.tokenizer, [{"role": "user", "content": q}]), response_ids(model.tokenizer, a))
            for q, a in qa]  # fmt: skip
    b = make_batch(rows, model.tokenizer.pad_token_id, 512, "keep_ends")
    out = {}
    for mode in ("padded", how):
        model.forward_overhead = {"padded": float("inf"), "grouped": 0.0}.get(mode, float("inf"))
        model.pack_rows = mode == "packed"
        model.peft.zero_grad()
        with model.role("policy"):
            hidden = model.hidden_states(b.input_ids, b.mask)
            logps, _ = model.sequence_logps(b)
        logps.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters("policy")])
        out[mode] = (hidden * b.mask[..., None], logps.detach(), grads)
    assert_close(out[how][0], out["padded"][0].detach(), atol=1e-5, rtol=1e-5)
    assert_close(out[how][1], out["padded"][1], atol=1e-4, rtol=1e-5)
    scale = out["padded"][2].abs().max().item()  # ~80 here: sums of ~600 tokens' log-prob gradients
    assert scale > 0
    assert_close(out[how][2], out["padded"][2], atol=1e-4 * scale, rtol=1e-4)  # fp32 sums in another order


def test_the_value_role_starts_as_the_reward_model_and_reads_every_response_position(tiny):
    """PPO's critic: after `copy_reward_to_value` the value adapter and head hold the reward model's weights, and
    `values` is that head on the reward role's hidden states at each position that predicts a response token (0
    elsewhere); a fresh value differs, and its gradient reaches the value adapter and head only."""
    model = make(tiny)
    perturb(model, "reward")
    model.add_value(seed=3)
    _, mask, _, b = batch(model)
    scored = b.targets != -100
    with torch.no_grad():
        fresh = model.values(b)
        model.copy_reward_to_value()
        copied = model.values(b)
        with model.role("reward"):
            hidden = model.hidden_states(b.input_ids, b.mask)
        want = model.head(hidden.float()).squeeze(-1) * scored
    assert_close(copied, want, atol=1e-6, rtol=1e-6)
    assert (copied[~scored] == 0).all() and (fresh - copied).abs().max() > 1e-3
    model.train(True)
    model.values(b).sum().backward()
    trained = {n for n, p in model.peft.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(".value." in n for n in trained)
    assert model.value_head.weight.grad.abs().sum() > 0 and model.head.weight.grad is None


def test_the_values_warm_up_leaves_the_policy_bit_identical(tiny):
    """ppo.train_value (the warm-up's trainer) moves the value adapter and head and nothing of the policy."""
    from types import SimpleNamespace

    from lite_rlhf.algorithms.ppo import Rollout, train_value

    model = make(tiny, "ppo.value_lr=1e-2", "ppo.micro_batch=2", "ppo.grad_accum=1", "run.quiet=true")
    model.add_value(seed=3)
    perturb(model, "policy")
    rows = [(prompt_ids(model.tokenizer, [{"role": "user", "content": q}]), response_ids(model.tokenizer, a))
            for q, a in QA]  # fmt: skip
    ids = {str(i): p for i, (p, _) in enumerate(rows)}
    batch_ = [Rollout(str(i), 0, r, 1.0, 1.0, [0.0] * len(r), [0.0] * len(r)) for i, (_, r) in enumerate(rows)]
    ctx = SimpleNamespace(cfg=model._cfg, model=model, ids=ids)
    policy = {n: p.detach().clone() for n, p in model.peft.named_parameters() if ".policy." in n}
    value = {n: p.detach().clone() for n, p in model.peft.named_parameters() if ".value." in n}
    head = model.value_head.weight.detach().clone()
    returns = [[1.0] * len(r) for _, r in rows]
    records = []
    train_value(ctx, batch_, None, returns, [[[0, 1]], [[1, 0]]], clip=None, name="warm-up", on_step=records.append)
    assert len(records) == 2 and records[1]["value_loss"] < records[0]["value_loss"]
    for n, p in model.peft.named_parameters():
        if n in policy:
            assert torch.equal(p, policy[n]), n
    assert any(not torch.equal(p, value[n]) for n, p in model.peft.named_parameters() if n in value)
    assert not torch.equal(model.value_head.weight, head)


def test_ppo_ptx_adds_the_policys_nll_on_windows_of_the_text(tiny, tmp_path):
    """PPO-ptx: data.ptx cut into data.max_length windows; the first step logs the policy's mean NLL per token of
    the windows its micro-batches read (from peft's own full logits here), and the term moves the policy."""
    from types import SimpleNamespace

    from lite_rlhf.algorithms.ppo import Rollout, ptx_windows, train_policy

    text = tmp_path / "ptx.txt"
    text.write_text("the sun is a star and the sea is wide. " * 40)
    common = ["ppo.lr=1e-2", "ppo.micro_batch=2", "ppo.grad_accum=1", "run.quiet=true", "data.max_length=160",
              "loop.algorithm=ppo"]  # fmt: skip
    adapters = {}
    for coef in (0.0, 1.0):
        model = make(tiny, *common, *([f"ppo.ptx_coef={coef}", f"data.ptx={text}"] if coef else []))
        rows = [(prompt_ids(model.tokenizer, [{"role": "user", "content": q}]), response_ids(model.tokenizer, a))
                for q, a in QA]  # fmt: skip
        assert all(len(p) + len(r) <= 160 for p, r in rows)
        ids = {str(i): p for i, (p, _) in enumerate(rows)}
        batch_ = [Rollout(str(i), 0, r, 1.0, 1.0, [-1.0] * len(r), [-1.0] * len(r)) for i, (_, r) in enumerate(rows)]
        ctx = SimpleNamespace(cfg=model._cfg, model=model, ids=ids)
        records = []
        train_policy(ctx, batch_, [[1.0] * len(r) for _, r in rows], [[[0, 1]]], records.append)
        adapters[coef] = torch.cat([p.detach().flatten() for p in model.parameters("policy")])
        if coef:
            windows = ptx_windows(ctx)
            every = model.tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]
            joined = [x for w in windows for x in w]
            assert len(windows) > 2 and all(len(w) == 160 for w in windows[:-1])
            assert joined == every[: len(joined)] and len(every) - len(joined) < 2  # a last window of 1 is no target
            fresh = make(tiny, *common)  # the policy before the step: LoRA B is zero, the base's own forward
            seq = torch.tensor(windows[:2])
            with torch.no_grad():
                logits = fresh.peft(input_ids=seq).logits.float()
            nll = -logits[:, :-1].log_softmax(-1).gather(-1, seq[:, 1:, None]).mean()
            assert records[0]["ptx_nll"] == pytest.approx(float(nll), rel=1e-5)
    assert not torch.equal(adapters[0.0], adapters[1.0])
    # advantages 0: the step's whole gradient is the ptx term's, summed over its parts, against the mean NLL's
    # gradient from peft's full logits; the long text: each window one part (a window is wider than the policy
    # micro-batch); a short one: its one window read twice, both in one part
    short = tmp_path / "short.txt"
    short.write_text("the sun is a star.")
    fresh = make(tiny, *common)
    for path in (text, short):
        records = []
        model = make(tiny, *common, "ppo.ptx_coef=0.5", f"data.ptx={path}")
        ctx = SimpleNamespace(cfg=model._cfg, model=model, ids=ids)
        train_policy(ctx, batch_, [[0.0] * len(r) for _, r in rows], [[[0, 1]]], records.append)
        windows = ptx_windows(ctx)
        seq = torch.tensor([windows[0], windows[1 % len(windows)]])
        assert (len(windows) == 1) == (path == short)
        with fresh.role("policy"):
            logits = fresh.peft(input_ids=seq).logits.float()
            nll = -logits[:, :-1].log_softmax(-1).gather(-1, seq[:, 1:, None]).mean()
            grads = torch.autograd.grad(0.5 * nll, fresh.parameters("policy"))
        norm = float(torch.cat([g.flatten() for g in grads]).norm())
        assert records[0]["grad_norm"] == pytest.approx(norm, rel=1e-4), path


def test_a_ptx_file_that_is_missing_empty_or_not_text_stops_before_any_model_loads(tmp_path):
    from lite_rlhf.config import ConfigError
    from lite_rlhf.loop import check_inputs

    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"
    empty.write_text("  \n")
    binary.write_bytes(b"\xff\xfe\x00\x81")
    for path, why in ((tmp_path / "missing.txt", "not a readable UTF-8"), (empty, "is empty"),
                      (binary, "not a readable UTF-8")):  # fmt: skip
        cfg = load_config(None, ["loop.algorithm=ppo", "ppo.ptx_coef=0.1", f"data.ptx={path}"])
        with pytest.raises(ConfigError, match=f"config key 'data.ptx': '{path}' .*{why}"):
            check_inputs(cfg)
