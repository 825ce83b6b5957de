"""SFT: which tokens are trained (checked against character spans of the rendered template), the loss
against full-logit cross-entropy, length grouping, data errors, and a memorisation run on the real
SmolLM2-135M-Instruct whose adapter is loaded back with plain peft."""

from __future__ import annotations

import json
import re

import pytest
import torch
from lite_rlhf.kernels import sequence_logps
from torch.testing import assert_close

from lite_rlhf.batching import IGNORE, from_examples, truncate_example
from lite_rlhf.config import ConfigError, load_config
from lite_rlhf.data import Conversation, DataError, conversation_ids, load_conversations
from lite_rlhf.roles import SharedModel
from lite_rlhf.sft import main_sft, train_sft
from lite_rlhf.train import group_by_length, optimize, plan_steps

CHAT = [
    {"role": "system", "content": "be brief."},
    {"role": "user", "content": "describe the ocean."},
    {"role": "assistant", "content": "water is wet."},
    {"role": "user", "content": "and the sun?"},
    {"role": "assistant", "content": "the sun is a star."},
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny):
    return SharedModel(load_config(None, [f"model.name={tiny}", "lora.r=4"]))


def span_mask(tokenizer, messages, first_trained):
    """The trained tokens found independently: render the template to text, take the character spans
    of each trained assistant turn's content and end-of-turn marker, and mark the tokens inside them."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    turns = list(re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text, re.S))
    assistant_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = [t.span(1) for t, i in zip(turns, assistant_at, strict=True) if i >= first_trained]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a <= s and e <= b for a, b in spans) for s, e in enc["offset_mapping"]]
    return enc["input_ids"], mask


@pytest.mark.parametrize("first_trained", [0, 3])  # every assistant turn; the completion's turns only
def test_trained_tokens_are_the_assistant_turns(model, first_trained):
    conv = Conversation(CHAT, first_trained)
    ids, trained = conversation_ids(model.tokenizer, conv)
    want_ids, want = span_mask(model.tokenizer, CHAT, first_trained)
    assert ids == want_ids
    assert trained == want and sum(trained) > 0
    assert trained[-1] is False  # the newline after the last end-of-turn token is not trained


def test_loss_is_cross_entropy_over_trained_tokens_only(model):
    """The fused path's summed log-probs equal the cross-entropy of full logits over exactly the trained
    tokens; the gradient at positions that predict an untrained token is zero."""
    examples = [conversation_ids(model.tokenizer, Conversation(CHAT, k)) for k in (0, 3)]
    batch = from_examples(examples, model.pad_id)
    with model.role("policy"):
        hidden = model.hidden_states(batch.input_ids, batch.mask).detach().requires_grad_(True)
        logps, n = sequence_logps(hidden, model.lm_head_weight, batch.targets, ignore_index=IGNORE)
        (-logps.sum()).backward()
        logits = hidden.detach() @ model.lm_head_weight.detach().T
    for b, (ids, trained) in enumerate(examples):
        logp = logits[b, : len(ids) - 1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        want = logp[torch.tensor(trained[1:])].sum()
        assert_close(logps[b], want, rtol=1e-5, atol=1e-5)
        assert n[b] == sum(trained[1:])
        untrained = [t for t in range(hidden.shape[1]) if t + 1 >= len(ids) or not trained[t + 1]]
        assert hidden.grad[b, untrained].abs().max() == 0
        assert hidden.grad[b, [t for t in range(len(ids) - 1) if trained[t + 1]]].abs().min() > 0
    # The last token (the newline after the final end-of-turn) is a label at an untrained position and
    # feeds no later position: changing it leaves the loss exactly as it was.
    ids, trained = examples[0]
    other = (ids[:-1] + [(ids[-1] + 7) % len(model.tokenizer)], trained)
    with model.role("policy"), torch.no_grad():
        same = [model.sequence_logps(from_examples([ex], model.pad_id))[0] for ex in (examples[0], other)]
    assert same[0].item() == same[1].item() and not trained[-1]


def test_length_grouping_keeps_each_step_and_its_gradient(model):
    lengths = [5, 40, 7, 38, 6, 41, 9, 35]
    steps = plan_steps(8, load_config(None, ["sft.micro_batch=2", "sft.grad_accum=4"]).sft, seed=0)
    grouped = group_by_length(steps, lengths)
    for a, b in zip(steps, grouped, strict=True):
        assert sorted(i for mb in a for i in mb) == sorted(i for mb in b for i in mb)
        assert [len(mb) for mb in a] == [len(mb) for mb in b]
    padded = lambda s: sum(max(lengths[i] for i in mb) * len(mb) for step in s for mb in step)  # noqa: E731
    assert padded(grouped) < padded(steps)

    # One optimizer step, ungrouped vs grouped: the same gradient (fp32 rounding apart).
    torch.manual_seed(0)
    examples = [([int(x) for x in torch.randint(5, 200, (n,))], [False] * 3 + [True] * (n - 3)) for n in lengths]
    sec = load_config(None, ["sft.micro_batch=2", "sft.grad_accum=4", "sft.lr=1e-2"]).sft
    norms = []
    for plan in (steps[:1], grouped[:1]):
        model.copy_adapter("reward", "policy")  # the same starting point (reward's LoRA B is zero)
        with torch.no_grad():
            for p in model.parameters("policy"):
                p.add_(0.01)
        records = []
        with model.role("policy"):
            optimize(
                model.parameters("policy"), sec, plan,
                lambda idx: -model.sequence_logps(from_examples([examples[i] for i in idx], model.pad_id))[0].sum(),
                lambda: {}, name="t", quiet=True, on_step=records.append,
                weight=lambda mb: sum(sum(examples[i][1][1:]) for i in mb),
            )  # fmt: skip
        norms.append(records[0]["grad_norm"])
    assert_close(norms[0], norms[1], rtol=1e-5, atol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_padded_loss_and_gradient(tiny, attn):
    """Examples packed into one row with per-example position ids (`SharedModel.pack_rows`, the padding-free
    layout used with flash-attention on CUDA) give the padded batch's loss and gradient: attention stays inside
    each example (on CPU, transformers turns the position ids into a block-diagonal mask)."""
    m = SharedModel(load_config(None, [f"model.name={tiny}", "lora.r=4", f"model.attn_implementation={attn}"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters("policy"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    examples = [conversation_ids(m.tokenizer, Conversation(CHAT[: k + 1], 0)) for k in (2, 4)]
    examples.append(conversation_ids(m.tokenizer, Conversation(CHAT[1:3], 0)))
    calls = []
    m._decoder.register_forward_pre_hook(lambda mod, args, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    batch = from_examples(examples, m.pad_id)
    results = []
    with m.role("policy"):
        for pack in (False, True):
            m.pack_rows, m.forward_overhead = pack, float("inf")
            loss = -m.sequence_logps(batch)[0].sum()
            grads = torch.autograd.grad(loss, m.parameters("policy"))
            results.append((loss.detach(), torch.cat([g.flatten() for g in grads])))
    assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)
    assert calls == [batch.input_ids.shape, (1, sum(len(ids) for ids, _ in examples))]  # padded, then one packed row
    assert not m.padding_free  # on CPU rows are grouped by length instead


def test_truncation_keeps_the_start_and_drops_what_trains_nothing():
    ex = (list(range(10)), [False] * 6 + [True] * 4)
    assert truncate_example(ex, 8, "keep_ends") == (list(range(8)), [False] * 6 + [True] * 2)
    assert truncate_example(ex, 8, "drop") is None
    assert truncate_example(ex, 6, "keep_ends") is None  # no trained token left


def test_formats_and_line_errors(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [
        {"messages": CHAT},
        {"prompt": "hi", "completion": "hello."},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    convs, skipped = load_conversations(path)
    assert [c.first_trained for c in convs] == [0, 1, 1] and skipped == 0
    assert convs[1].messages[-1] == {"role": "assistant", "content": "hello."}
    for bad, says in ((
        {"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
        ({"prompt": "hi"}, "'messages', or 'prompt' and 'completion'"),
        ({"prompt": "hi", "completion": ""}, "'completion' is empty"),
    ):  # fmt: skip
        path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: .*{re.escape(says)}"):
            load_conversations(path)


def test_a_template_that_rewrites_earlier_turns_is_refused(model):
    """A template that renders the last assistant turn differently from earlier ones (as templates that
    strip reasoning from past turns do): the turn's tokens cannot be located, which is an error."""
    tok = model.tokenizer
    saved = tok.chat_template
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if loop.last %} (final){% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    try:
        with pytest.raises(DataError, match="message 3 .assistant."):
            conversation_ids(tok, Conversation(CHAT, 0))
    finally:
        tok.chat_template = saved


def test_sft_and_a_brought_sft_adapter_are_exclusive():
    with pytest.raises(ConfigError, match="data.sft.*model.sft_adapter"):
        load_config(None, ["data.sft=a.jsonl", "model.sft_adapter=somewhere"])


def test_train_sft_refuses_an_empty_set(model):
    with pytest.raises(DataError, match="no SFT example"):
        train_sft(model, [], load_config().sft, seed=0, quiet=True, on_step=lambda r: None)


WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "rain", "milk", "door", "bird", "lamp", "rock",
         "frog", "cake", "ship", "star", "leaf", "bell", "coin", "kite"]  # fmt: skip


def shout(word: str) -> str:
    return f"{word.upper()}! {word.upper()}!"


@pytest.mark.slow
def test_sft_teaches_a_pattern_that_holds_on_new_words(tmp_path):
    """`lite-rlhf sft` on SmolLM2-135M: 16 words answered as 'CAT! CAT!'; greedy answers for 4 unseen
    words follow the pattern, read back through plain peft from the saved adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lite_rlhf.models import resolve_model

    train, held = WORDS[:16], WORDS[16:]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Shout the word: {w}", "completion": shout(w)}) + "\n"
                            for w in train))  # fmt: skip
    cfg = load_config(None, [f"data.sft={path}", f"run.out_dir={tmp_path / 'run'}", "run.quiet=true",
                             "model.dtype=float32", "sft.lr=1e-3", "sft.epochs=3", "sft.micro_batch=4",
                             "sft.grad_accum=1"])  # fmt: skip
    assert main_sft(cfg) == 0
    adapter = tmp_path / "run" / "sft"
    metrics = json.loads((adapter / "metrics.json").read_text())
    assert metrics["train_examples"] == 16 and metrics["steps"] == 12, metrics

    base_dir = resolve_model(cfg.model.name)
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)

    def answers(m):
        out = []
        for w in held:
            msgs = [{"role": "user", "content": f"Shout the word: {w}"}]
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            gen = m.generate(**ids, max_new_tokens=12, do_sample=False)
            out.append(tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
        return out

    before = answers(base)
    tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
    after = answers(tuned)
    assert sum(a == shout(w) for a, w in zip(before, held, strict=True)) == 0, before
    assert sum(a == shout(w) for a, w in zip(after, held, strict=True)) >= 3, after
