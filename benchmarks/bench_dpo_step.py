"""One DPO training step, lite-rlhf against TRL's DPOTrainer: peak memory and seconds per step on CPU.

Every variant trains SmolLM2-135M-Instruct (the embedded model, ``resolve_model("smollm2-135m-instruct")``)
in fp32 on the CPU, or the model and dtype of ``--model DIR --dtype bfloat16`` (benchmarks/_model.py: lite-rlhf by
config overrides, TRL's model loaded in that dtype with ``bf16=True``), on the same token sequences in the same order,
with the same pairs per step:

- ``a``:  lite-rlhf with its defaults (``model.gradient_checkpointing=auto`` with the default budget, 75% of the
  available RAM, and on CPU at least a quarter of the layers: the row says how many layers that checkpointed):
  ``SharedModel`` (LoRA adapter "policy"; also the "reward" adapter and
  head it always carries), reference log-probs stored with each pair by ``lite_rlhf.algorithms.dpo.add_reference_logps``
  (computed once, before training; a step never runs the reference), loss through the fused kernels by
  ``lite_rlhf.algorithms.dpo.train_dpo`` itself. The config is ``configs/demo.yaml`` (LoRA rank, alpha and targets from
  there unless ``--lora-r`` / ``--lora-alpha`` / ``--lora-targets`` say otherwise) with the pairs per step,
  one epoch and a ``data.max_length`` that truncates nothing set on top.
- ``a_budget``: ``a`` with ``model.memory_budget`` set to ``c2``'s measured peak in the same run (so ``c2`` runs
  first): auto then checkpoints the fewest layers whose estimated training peak fits it.
- ``a_none``: ``a`` with no layer checkpointed (``model.gradient_checkpointing=0``), what auto chose on CPU before
  its floor of a quarter of the layers (``lite_rlhf.plan.default_checkpointed``): the time that floor costs.
- ``a_gc`` (only when asked for with ``--variants``): ``a`` with ``model.gradient_checkpointing=true``, the
  library's own switch, for comparison with ``c2``.
- ``b``:  TRL 1.16 ``DPOTrainer``, full fine-tuning, a separate reference model, ``gradient_checkpointing=False``.
- ``b2``: ``b`` with ``precompute_ref_log_probs=True`` (reference log-probs in ``DPOTrainer.__init__``).
- ``c``:  TRL with a peft ``LoraConfig`` of the same rank, alpha, dropout and target modules as ``a``;
  reference = the adapter disabled; no gradient checkpointing.
- ``c2``: ``c`` with gradient checkpointing (TRL's default, with its default checkpointing arguments).
- ``c_pf``, ``c_liger``: ``c`` with ``padding_free=True`` / ``use_liger_kernel=True``; a variant TRL refuses here is
  listed under "did not run" with its error, and the others go on.

TRL settings beyond its defaults, all needed to make the runs comparable: ``use_cpu=True``, ``bf16=False``
(DPOConfig turns bf16 on by default), ``max_length=None`` (its default 1024 would cut the long shape),
``train_sampling_strategy="sequential"`` (same order as ``a``), the same learning rate as ``a``,
``report_to="none"``, ``save_strategy="no"``. Its optimizer is its default (``adamw_torch_fused``);
lite-rlhf uses ``torch.optim.AdamW``.

Shapes, built deterministically from ``lite_rlhf/demo/preferences_train.jsonl`` (rows in file order; pair i
starts at the first row of the i-th distinct prompt, cycling):

- prompt: the demo prompt in SmolLM2's chat template (~44 tokens with its system line); while it is shorter than
  65 tokens, the first sentence of the next distinct demo prompt ("Describe a cat.") is appended to the user
  message, giving 65-70 tokens;
- chosen answer: the chosen answers of that row and the rows after it, joined with spaces, cut to exactly
  ``answer_tokens - 1`` text tokens, plus the end-of-turn token; rejected answer: the same with the rejected
  answers. Cut text is decoded and re-encoded until the ids are stable, so text and ids agree.
- ``short``: answers 110 tokens, 4 pairs per step;  ``long``: answers 1,000 tokens, 1 pair per step;
  ``mixed``: 8 pairs per step in micro-batches of 2 (both stacks), answers from 20 to 400 tokens (pair i's chosen
  answer has the i-th of 8 lengths evenly spaced in 20..400, its rejected one the (i+3 mod 8)-th).
  Lite-rlhf groups a step's pairs by length into its micro-batches, TRL takes them in order: the check below
  compares what each optimizer step saw as a set of rows.

lite-rlhf gets the token ids (``Pair``); TRL gets the decoded text (prompt as plain text with its template
tokens, answers ending in ``<|im_end|>``, so TRL adds no second EOS). Each worker records what its training
step actually received (rows, padded width, scored tokens, a digest of the unpadded ids of every row), and the
parent checks that every variant saw the same sequences as ``a``; TRL workers also compare TRL's tokenization
with the ids. ``train_dpo`` shuffles the pairs with ``run.seed``; ``a`` hands it the pairs pre-permuted so that
the shuffle yields the canonical order (the recorded digests confirm it).

Measured, each variant in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` (``_memory.py``,
docs/cpu-stack.md "Measuring memory on CPU"):

- baseline: resident memory after the imports (torch, transformers, peft, lite_rlhf; trl and datasets for TRL)
  and after the tokenizer and the token ids are built;
- peak above baseline: ``VmHWM`` (reset to the current RSS at the baseline, ``5 > /proc/self/clear_refs``)
  minus the baseline, over everything after it: model load, reference log-probs, trainer set-up, k steps.
  Split into the set-up peak (up to the start of step 1) and the training peak (steps 1..k, VmHWM reset again);
- whole-process peak: the largest VmHWM of the process (imports included), comparable with the table in
  docs/cpu-stack.md "The standard stack, measured";
- seconds per step: wall time between the ends of consecutive optimizer steps (``train_dpo``'s per-step ``log``
  callback; TRL's ``on_step_end``), averaged over steps 2..k; step 1 is warm-up. pairs/s = pairs per step / that.
  ``train_dpo`` is called once for all k steps and timed per step through that callback: no library change needed;
- body forward s/step: time inside the transformer body's forward (``get_decoder()``, forward hooks), with grad
  (policy) and without (reference), averaged like s/step; the rest of a step is the LM head, loss, backward
  and optimizer.

The machine must be otherwise idle: on a shared 2-core machine another job makes every figure 2-5x slow,
and such figures are not valid. Run it under the shared lock; the 1-minute load average is recorded.

    .venv/bin/python benchmarks/bench_dpo_step.py                         # every shape, default variants, k=4
    .venv/bin/python benchmarks/bench_dpo_step.py --shape short --steps 2 --variants a c --out /tmp/x.csv
    .venv/bin/python benchmarks/bench_dpo_step.py --model ~/.cache/lite-rlhf/scale/qwen2.5-1.5b --dtype bfloat16 \
        --shape short --pairs-per-step 2 --answer-tokens 64 --steps 2 --variants a c c2
                                            # a 1.5B model, less work: results/bench_dpo_step_qwen2.5-1.5b_bfloat16.*

``--pairs-per-step`` and ``--answer-tokens`` shrink the chosen shape (its micro-batch at most that many pairs; every
answer that long), for a model where the demo's shapes take too long.

Prints a markdown table (ratios to ``a``) and the targets, appends rows to the CSV (default
``benchmarks/results/bench_dpo_step.csv``; with another model or dtype ``bench_dpo_step_<model>[_<dtype>].csv``) and
writes the same report as markdown beside it (``.md``).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _memory import (  # noqa: E402
    append_csv,
    current_rss_mib,
    git_revision,
    machine_description,
    peak_mib,
    reset_peak,
    run_worker,
)
from _model import (  # noqa: E402
    add_model_args,
    config_overrides,
    describe_model,
    model_dir,
    model_spec,
    parameters,
    results_stem,
    torch_dtype,
)

RESULTS = HERE / "results"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
DEMO_PAIRS = REPO / "lite_rlhf" / "demo" / "preferences_train.jsonl"
PROMPT_TOKENS = 65  # the prompt grows by demo topic sentences until it has at least this many tokens
SHAPES = {
    "short": {"pairs_per_step": 4, "answer_tokens": 110, "micro_batch": 4},
    "long": {"pairs_per_step": 1, "answer_tokens": 1000, "micro_batch": 1},
    # 8 pairs per step in micro-batches of 2: answers of 20, 74, ..., 400 tokens (chosen i, rejected i + 3 mod 8),
    # where padding costs most
    "mixed": {"pairs_per_step": 8, "answer_tokens": [20 + round(i * 380 / 7) for i in range(8)], "micro_batch": 2},
}
VARIANTS = {
    "a": "lite-rlhf defaults: SharedModel LoRA, stored ref log-probs, fused kernels, checkpointing auto",
    "a_budget": "a with model.memory_budget = (c2)'s measured peak",
    "a_gc": "a with model.gradient_checkpointing=true (every layer)",
    "a_none": "a with model.gradient_checkpointing=0 (no layer: the CPU default before the quarter floor)",
    "b": "TRL full fine-tuning, separate reference model",
    "b2": "TRL full fine-tuning, precompute_ref_log_probs=True",
    "c": "TRL + peft LoRA, reference = adapter disabled",
    "c2": "TRL + peft LoRA + gradient checkpointing",
    "c_pf": "c with padding_free=True",
    "c_liger": "c with use_liger_kernel=True",
}
AUTO = ["model.gradient_checkpointing=auto"]  # the library's default (configs/demo.yaml pins 0 for its figures)
LITE_VARIANTS = {"a": AUTO, "a_budget": AUTO, "a_gc": ["model.gradient_checkpointing=true"],
                 "a_none": ["model.gradient_checkpointing=0"]}  # extra overrides  # fmt: skip
# a_budget after c2: its budget is c2's peak
DEFAULT_VARIANTS = ["a", "a_none", "c", "c2", "a_budget", "c_pf", "c_liger"]
TRL_SETTINGS = {  # variant -> (LoRA, precompute_ref_log_probs, gradient_checkpointing, extra DPOConfig settings)
    "b": (False, False, False, {}),
    "b2": (False, True, False, {}),
    "c": (True, False, False, {}),
    "c2": (True, False, True, {}),
    "c_pf": (True, False, False, {"padding_free": True}),
    "c_liger": (True, False, False, {"use_liger_kernel": True}),
}


# --------------------------------------------------------------------------- the pairs


def _stable_ids(tokenizer, ids: list[int]) -> list[int]:
    """Decode and re-encode until the ids do not change, so that the text of the ids tokenizes to them."""
    for _ in range(8):
        again = tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"]
        if again == ids:
            return ids
        ids = again
    raise RuntimeError("token ids did not settle under decode/encode")


def build_pairs(
    tokenizer, shape: str, n_pairs: int, answer_tokens: int | None = None, prompt_tokens: int = PROMPT_TOKENS
) -> list[dict]:
    """`n_pairs` deterministic pairs of the shape from the demo preference file (see the module docstring).

    Each pair: id, prompt_ids, chosen_ids, rejected_ids (answers end with the end-of-turn token) and the
    text of each (prompt_text is the rendered chat template, as TRL gets it). `answer_tokens` (default: the
    shape's) and `prompt_tokens` set other sizes (benchmarks/gpu_proof.py).
    """
    from lite_rlhf.data import load_preferences, prompt_ids

    rows, _ = load_preferences(DEMO_PAIRS)
    keys = [json.dumps(r.prompt) for r in rows]
    firsts = [i for i, k in enumerate(keys) if k not in keys[:i]]  # first row of each distinct prompt
    eos = tokenizer.eos_token_id
    lengths = answer_tokens or SHAPES[shape]["answer_tokens"]
    lengths = lengths if isinstance(lengths, list) else [lengths]

    def answer(start: int, field: str, tokens: int) -> list[int]:
        target = tokens - 1  # text tokens; the end-of-turn token completes the answer
        texts: list[str] = []
        ids: list[int] = []
        while len(ids) < target + 8:  # a margin, so that the cut falls inside the text
            texts.append(getattr(rows[(start + len(texts)) % len(rows)], field))
            ids = tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"]
        return _stable_ids(tokenizer, ids[:target]) + [eos]

    pairs = []
    for i in range(n_pairs):
        start = firsts[i % len(firsts)]
        messages = [dict(m) for m in rows[start].prompt]
        k = 1
        while len(prompt_ids(tokenizer, messages)) < prompt_tokens:
            topic = rows[firsts[(i + k) % len(firsts)]].prompt[-1]["content"].split(". ")[0]  # "Describe a cat"
            messages[-1]["content"] += f" {topic}."
            k += 1
        p_ids = prompt_ids(tokenizer, messages)
        chosen = answer(start, "chosen", lengths[i % len(lengths)])
        rejected = answer(start, "rejected", lengths[(i + 3) % len(lengths)])
        pairs.append(
            {
                "id": f"{shape}-{i}",
                "prompt_ids": p_ids,
                "chosen_ids": chosen,
                "rejected_ids": rejected,
                "prompt_text": tokenizer.decode(p_ids),
                "chosen_text": tokenizer.decode(chosen),
                "rejected_text": tokenizer.decode(rejected),
            }
        )
    return pairs


class SeenBatches:
    """What the training step was fed: per micro-batch, rows, padded width, scored tokens, digest of the ids."""

    def __init__(self):
        self.batches: list[dict] = []

    def record(self, input_ids, attention_mask, scored) -> None:
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]
        digest = hashlib.sha1(json.dumps(rows).encode()).hexdigest()[:12]
        self.batches.append(
            {
                "row_digests": [hashlib.sha1(json.dumps(r).encode()).hexdigest()[:12] for r in rows],
                "rows": len(rows),
                "width": int(input_ids.shape[1]),
                "lengths": [len(r) for r in rows],
                "scored": [int(s) for s in scored],
                "digest": digest,
            }
        )


# --------------------------------------------------------------------------- measuring


class ForwardClock:
    """Wall time spent inside decoder forwards, split by grad mode: with grad (policy), without (reference).

    Only the transformer body is timed (the modules returned by ``get_decoder()``), not the LM head or the loss;
    what is left of a step is the LM head, the loss, the backward and the optimizer.
    """

    def __init__(self):
        import torch

        self._grad_enabled = torch.is_grad_enabled
        self._t0: dict[int, float] = {}
        self.grad_s = self.nograd_s = 0.0

    def attach(self, module) -> None:
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, module, args) -> None:
        self._t0[id(module)] = time.perf_counter()

    def _post(self, module, args, output) -> None:
        elapsed = time.perf_counter() - self._t0.pop(id(module))
        if self._grad_enabled():
            self.grad_s += elapsed
        else:
            self.nograd_s += elapsed

    def take(self) -> tuple[float, float]:
        out = (self.grad_s, self.nograd_s)
        self.grad_s = self.nograd_s = 0.0
        return out


class StepMeter:
    """Baseline RSS, the set-up peak, the training peak, the end time and forward times of every optimizer step."""

    def __init__(self):
        self.hwm_imports = peak_mib()  # whole-process peak so far (imports, tokenizer)
        self.baseline = current_rss_mib()
        self.reset_ok = reset_peak()
        self.t_start = time.perf_counter()
        self.step_ends: list[float] = []
        self.forwards: list[tuple[float, float]] = []
        self.clock = ForwardClock()

    def train_start(self) -> None:
        self.setup_s = time.perf_counter() - self.t_start
        self.setup_rss = current_rss_mib()
        self.setup_hwm = peak_mib()
        reset_peak()
        self.clock.take()  # forwards before step 1 (reference log-probs) are set-up
        self.t_train = time.perf_counter()

    def step_end(self) -> None:
        self.step_ends.append(time.perf_counter())
        self.forwards.append(self.clock.take())

    def result(self) -> dict:
        train_hwm = peak_mib()
        ends = [self.t_train, *self.step_ends]
        steps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
        timed = steps[1:]
        timed_forwards = self.forwards[1:] or [(float("nan"), float("nan"))]
        return {
            "baseline_mib": self.baseline,
            "setup_rss_mib": self.setup_rss - self.baseline,
            "setup_peak_mib": self.setup_hwm - self.baseline,
            "train_peak_mib": train_hwm - self.baseline,
            "peak_mib": max(self.setup_hwm, train_hwm) - self.baseline,
            "process_peak_mib": max(self.hwm_imports, self.setup_hwm, train_hwm),
            "peak_reset": self.reset_ok,
            "setup_s": self.setup_s,
            "step_s": steps,
            "first_step_s": steps[0] if steps else float("nan"),
            "s_per_step": statistics.mean(timed) if timed else float("nan"),
            "policy_fwd_s": statistics.mean(f[0] for f in timed_forwards),
            "ref_fwd_s": statistics.mean(f[1] for f in timed_forwards),
        }


# --------------------------------------------------------------------------- the variants


def run_lite(spec: dict, pairs: list[dict], meter: StepMeter, seen: SeenBatches) -> dict:
    """Variant a: SharedModel + add_reference_logps + train_dpo, as the loop runs them."""
    import torch

    from lite_rlhf.algorithms import dpo
    from lite_rlhf.config import load_config
    from lite_rlhf.pairs import Pair
    from lite_rlhf.roles import SharedModel

    budget = [f"model.memory_budget={spec['budget_mib']:.0f}MiB"] if spec.get("budget_mib") else []
    cfg = load_config(DEMO_CONFIG, [*spec["overrides"], *LITE_VARIANTS[spec["variant"]], *budget])
    model = SharedModel(cfg, device="cpu")
    prompt_map = {p["id"]: p["prompt_ids"] for p in pairs}
    canonical = [
        Pair(p["id"], p["chosen_ids"], p["rejected_ids"], p["chosen_text"], p["rejected_text"], 1.0, 0.0) for p in pairs
    ]
    t0 = time.perf_counter()
    canonical = dpo.add_reference_logps(model, canonical, prompt_map, cfg.data, cfg.dpo.micro_batch)
    ref_s = time.perf_counter() - t0

    # train_dpo visits pairs[order[0]], pairs[order[1]], ... with order = randperm(n) seeded by `seed` (one
    # epoch, n = steps x micro_batch): placing canonical[j] at order[j] makes it visit the canonical order.
    seed = cfg.run.seed
    order = torch.randperm(len(canonical), generator=torch.Generator().manual_seed(seed)).tolist()
    fed: list = [None] * len(canonical)
    for j, i in enumerate(order):
        fed[i] = canonical[j]

    original_make_batch = dpo.make_batch

    def recording_make_batch(*args):
        batch = original_make_batch(*args)
        seen.record(batch.input_ids, batch.mask, (batch.targets != dpo.IGNORE).sum(-1))
        return batch

    dpo.make_batch = recording_make_batch  # train_dpo looks it up in its module at each micro-batch
    meter.clock.attach(model.peft.get_base_model().get_decoder())
    meter.train_start()
    dpo.train_dpo(model, fed, prompt_map, cfg.dpo, cfg.data, seed=seed, quiet=True,
                  on_step=lambda summary: meter.step_end())  # fmt: skip
    from lite_rlhf.plan import model_shape, train_terms

    longest = max(b["rows"] * b["width"] for b in seen.batches)
    layers = model.checkpointed_layers
    plan = sum(train_terms(cfg, model_shape(str(model.base_dir)), longest, layers, cuda=False).values()) / 2**20
    budget_mib = model.memory_budget()[0] / 2**20
    return {
        "checkpointed_layers": layers,
        "budget_mib": budget_mib,
        "plan_train_mib": plan,
        "ref_logps_s": ref_s,
        "trainable_params": sum(p.numel() for p in model.parameters("policy")),
        "optimizer": "torch.optim.AdamW",
        "lora": f"r={cfg.lora.r} alpha={cfg.lora.alpha:g} dropout={cfg.lora.dropout:g} "
        f"targets={','.join(cfg.lora.target_modules)}",
        "gradient_checkpointing": f"{cfg.model.gradient_checkpointing}: {layers} layers",
        "attn_implementation": model.peft.get_base_model().config._attn_implementation,
    }


def run_trl(spec: dict, pairs: list[dict], tokenizer, meter: StepMeter, seen: SeenBatches) -> dict:
    """Variants b, b2, c, c2: DPOTrainer on the same text, one optimizer step per micro-batch."""
    import tempfile

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    use_lora, precompute, checkpointing, extra = TRL_SETTINGS[spec["variant"]]
    lora = spec["lora"]
    dataset = Dataset.from_list(
        [{"prompt": p["prompt_text"], "chosen": p["chosen_text"], "rejected": p["rejected_text"]} for p in pairs]
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir(spec), dtype=torch_dtype(spec))
    peft_config = (
        LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["targets"],
            task_type="CAUSAL_LM",
        )
        if use_lora
        else None
    )
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_dpo_step-"),
        use_cpu=True,
        bf16=spec["dtype"] == "bfloat16",  # DPOConfig's default is True: fp32 asked for explicitly
        fp16=False,
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["pairs_per_step"] // spec["micro_batch"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        beta=spec["beta"],
        max_length=None,
        gradient_checkpointing=checkpointing,
        precompute_ref_log_probs=precompute,
        train_sampling_strategy="sequential",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **extra,
    )

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            meter.train_start()

        def on_step_end(self, args, state, control, **kwargs):
            meter.step_end()

    t0 = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[StepTimes()],
    )
    init_s = time.perf_counter() - t0

    # Did TRL's own tokenization of the text give our ids?
    mismatched = []
    for j, (row, p) in enumerate(zip(trainer.train_dataset, pairs, strict=True)):
        if (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) != (
            p["prompt_ids"],
            p["chosen_ids"],
            p["rejected_ids"],
        ):
            mismatched.append(j)

    collate = trainer.data_collator

    def recording_collate(examples):
        batch = collate(examples)
        if "attention_mask" in batch:
            seen.record(batch["input_ids"], batch["attention_mask"], batch["completion_mask"].sum(-1))
        else:  # padding_free: one packed row, sequences start where position_ids restart at 0
            starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
            rows = [batch["input_ids"][0, a:b] for a, b in zip(starts, starts[1:], strict=False)]
            width = max(len(r) for r in rows)
            ids = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])
            mask = torch.stack([torch.arange(width) < len(r) for r in rows]).long()
            scored = [batch["completion_mask"][0, a:b].sum() for a, b in zip(starts, starts[1:], strict=False)]
            seen.record(ids, mask, scored)
        return batch

    trainer.data_collator = recording_collate
    policy = trainer.model.get_base_model() if use_lora else trainer.model
    meter.clock.attach(policy.get_decoder())
    if trainer.ref_model is not None:
        meter.clock.attach(trainer.ref_model.get_decoder())
    trainer.train()
    return {
        "trainer_init_s": init_s,
        "tokenization_mismatches": mismatched,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "optimizer": str(args.optim.value if hasattr(args.optim, "value") else args.optim),
        "lora": f"r={lora['r']} alpha={lora['alpha']:g} dropout={lora['dropout']:g} targets={','.join(lora['targets'])}"
        if use_lora
        else "none (full fine-tuning)",
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "gradient_checkpointing_kwargs": args.gradient_checkpointing_kwargs,
        "ref_model": "adapter disabled"
        if use_lora
        else ("precomputed, none kept" if trainer.ref_model is None else type(trainer.ref_model).__name__),
        "max_length": args.max_length,
        "attn_implementation": policy.config._attn_implementation,
    }


def worker(spec: dict) -> dict:
    """One variant and shape in this fresh process: build the pairs, then measure everything after the baseline."""
    load_start = os.getloadavg()[0]
    import torch
    import transformers  # noqa: F401 - imported before the baseline in every variant
    from peft import LoraConfig  # noqa: F401
    from transformers import AutoTokenizer

    import lite_rlhf.algorithms.dpo  # noqa: F401
    import lite_rlhf.roles  # noqa: F401

    lite = spec["variant"] in LITE_VARIANTS
    if not lite:
        import datasets  # noqa: F401
        import trl  # noqa: F401

    tokenizer = AutoTokenizer.from_pretrained(model_dir(spec))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    pairs = build_pairs(tokenizer, spec["shape"], spec["steps"] * spec["pairs_per_step"], spec["answer_tokens"])
    torch.manual_seed(0)

    seen = SeenBatches()
    meter = StepMeter()
    if lite:
        info = run_lite(spec, pairs, meter, seen)
    else:
        info = run_trl(spec, pairs, tokenizer, meter, seen)
    result = meter.result()
    return {
        **result,
        **info,
        "seen": seen.batches,
        "prompt_tokens": [len(p["prompt_ids"]) for p in pairs],
        "threads": torch.get_num_threads(),
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
    }


# --------------------------------------------------------------------------- the parent


def _versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "trl", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _fmt_ratio(x: float) -> str:
    return "" if x != x else f"{x:.2f}"


def check_sequences(rows: list[dict]) -> list[str]:
    """One line per variant: what it was fed, and whether that equals what `a` (or the first variant) was fed."""
    lines = []
    ref = next((r for r in rows if r["variant"] == "a"), rows[0])

    def per_step(r: dict) -> list[list[str]]:
        """The rows each optimizer step saw, in any order (lite-rlhf groups a step's pairs by length)."""
        k = r["pairs_per_step"] // r["micro_batch"]
        seen = r["seen"]
        return [sorted(d for b in seen[i : i + k] for d in b["row_digests"]) for i in range(0, len(seen), k)]

    ref_digests = per_step(ref)
    for r in rows:
        seen = r["seen"]
        lengths = [n for b in seen for n in b["lengths"]]
        scored = [n for b in seen for n in b["scored"]]
        same = per_step(r) == ref_digests
        r["same_tokens"] = same
        extra = ""
        if "tokenization_mismatches" in r:
            bad = r["tokenization_mismatches"]
            extra = "; TRL tokenization = our ids" if not bad else f"; TRL tokenized {len(bad)} pairs differently"
        lines.append(
            f"- {r['shape']} / {r['variant']}: {len(seen)} micro-batches of {seen[0]['rows'] if seen else 0} rows, "
            f"padded width {sorted({b['width'] for b in seen})}, row tokens {min(lengths, default=0)}-"
            f"{max(lengths, default=0)}, scored (answer) tokens {min(scored, default=0)}-{max(scored, default=0)}, "
            f"{sum(lengths)} tokens in all; prompts {min(r['prompt_tokens'])}-{max(r['prompt_tokens'])} tokens; "
            f"{'same token ids as ' + ref['variant'] if same else 'DIFFERENT token ids from ' + ref['variant']}"
            f"{extra}"
        )
    return lines


def targets(rows: list[dict]) -> list[str]:
    """Issue targets, MET or MISSED by how much: at the defaults, (a)'s peak <= TRL's leanest (c2) and its step
    <= 0.7 x TRL's fastest; with memory_budget = (c2)'s peak, (a_budget)'s peak <= (c2)'s and its step <= 0.8 x
    (c)'s (moonshot 0.7 x); the plan's training-phase estimate within 25% of each lite variant's measured training
    peak."""
    by = {(r["shape"], r["variant"]): r for r in rows}
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        a, trl = by.get((shape, "a")), [r for r in rows if r["shape"] == shape and r["variant"] in TRL_SETTINGS]
        if a and trl:
            lean, fast = min(trl, key=lambda r: r["peak_mib"]), min(trl, key=lambda r: r["s_per_step"])
            x, y = a["peak_mib"], lean["peak_mib"]
            out.append(f"- {'MET' if x <= y else 'MISSED'}: {shape}, (a) defaults' peak <= TRL's leanest "
                       f"({lean['variant']}): {x:,.0f} vs {y:,.0f} MiB ({x / y:.2f}x, {x - y:+,.0f} MiB); "
                       f"{a['checkpointed_layers']} layers checkpointed")  # fmt: skip
            x, y = a["s_per_step"], fast["s_per_step"]
            out.append(f"- {'MET' if x <= 0.7 * y else 'MISSED'}: {shape}, (a) defaults' s/step <= 0.7 x TRL's "
                       f"fastest ({fast['variant']}): {x:.2f} vs {y:.2f} s ({x / y:.2f}x; {0.7 * y:.2f} allowed, "
                       f"{x - 0.7 * y:+.2f})")  # fmt: skip
        mine, c, c2 = by.get((shape, "a_budget")), by.get((shape, "c")), by.get((shape, "c2"))
        if mine and c2:
            x, y = mine["peak_mib"], c2["peak_mib"]
            out.append(f"- {'MET' if x <= y else 'MISSED'}: {shape}, (a_budget) peak <= (c2) peak: {x:,.0f} vs "
                       f"{y:,.0f} MiB ({x / y:.2f}x, {x - y:+,.0f} MiB); {mine['checkpointed_layers']} layers "
                       f"checkpointed for a budget of {mine['budget_mib']:,.0f} MiB")  # fmt: skip
        if mine and c:
            x, y = mine["s_per_step"], c["s_per_step"]
            verdict = "MET (moonshot too)" if x <= 0.7 * y else "MET" if x <= 0.8 * y else "MISSED"
            out.append(f"- {verdict}: {shape}, (a_budget) s/step <= 0.8 x (c): {x:.2f} vs {y:.2f} s "
                       f"({x / y:.2f}x; {0.8 * y:.2f} allowed, {x - 0.8 * y:+.2f})")  # fmt: skip
        for variant in LITE_VARIANTS:
            r = by.get((shape, variant))
            if r and r.get("plan_train_mib"):
                ratio = r["plan_train_mib"] / r["train_peak_mib"]
                out.append(f"- {'MET' if abs(ratio - 1) <= 0.25 else 'MISSED'}: {shape}, ({variant}) plan's training "
                           f"estimate {r['plan_train_mib']:,.0f} MiB vs measured training peak "
                           f"{r['train_peak_mib']:,.0f} MiB ({ratio:.2f}x; within 25% asked)")  # fmt: skip
    return out


def _layers(r: dict) -> str:
    if "checkpointed_layers" not in r:
        return ""
    return f" ({r['checkpointed_layers']} layers checkpointed, budget {r['budget_mib']:,.0f} MiB)"


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| shape | variant | peak above baseline MiB | vs a | set-up / training peak MiB | whole-process peak MiB "
        "| vs a | s/step | vs a | pairs/s | vs a | body fwd s/step policy / ref | first step s | set-up s | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['variant']}: {VARIANTS[r['variant']]}{_layers(r)} | {r['peak_mib']:,.0f} | "
            f"{_fmt_ratio(r['peak_vs_a'])} | {r['setup_peak_mib']:,.0f} / {r['train_peak_mib']:,.0f} | "
            f"{r['process_peak_mib']:,.0f} | {_fmt_ratio(r['process_peak_vs_a'])} | {r['s_per_step']:.2f} | "
            f"{_fmt_ratio(r['time_vs_a'])} | {r['pairs_per_s']:.2f} | {_fmt_ratio(r['pairs_per_s_vs_a'])} | "
            f"{r['policy_fwd_s']:.2f} / {r['ref_fwd_s']:.2f} | {r['first_step_s']:.1f} | {r['setup_s']:.1f} | "
            f"{max(r['load_start'], r['load_end']):.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=(*SHAPES, "all"), default="all")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per variant; step 1 is warm-up")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="CSV to append to; the .md beside it is rewritten "
        "(default: benchmarks/results/bench_dpo_step[_<model>][_<dtype>].csv)",
    )
    add_model_args(parser)
    parser.add_argument("--pairs-per-step", type=int, default=None,
                        help="pairs per optimizer step instead of the shape's (less work on a large model)")
    parser.add_argument("--answer-tokens", type=int, default=None,
                        help="every answer this many tokens instead of the shape's lengths")
    parser.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: configs/demo.yaml)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: configs/demo.yaml)")
    parser.add_argument("--lora-targets", default=None, help="comma-separated target modules (default: the config's)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 1 is warm-up)")
    model = model_spec(args)
    out = args.out or RESULTS / f"{results_stem('bench_dpo_step', model)}.csv"

    from lite_rlhf.config import load_config

    lora_overrides = []
    if args.lora_r is not None:
        lora_overrides.append(f"lora.r={args.lora_r}")
    if args.lora_alpha is not None:
        lora_overrides.append(f"lora.alpha={args.lora_alpha}")
    if args.lora_targets is not None:
        lora_overrides.append(f"lora.target_modules={args.lora_targets}")

    shapes = list(SHAPES) if args.shape == "all" else [args.shape]
    sizes = {**SHAPES, **{shape: resized(SHAPES[shape], args.pairs_per_step, args.answer_tokens) for shape in shapes}}
    if bad := [k for k in shapes if sizes[k]["pairs_per_step"] % sizes[k]["micro_batch"]]:
        parser.error(f"--pairs-per-step {args.pairs_per_step} is no multiple of the micro-batch of {', '.join(bad)}")
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_dpo_step.py", *sys.argv[1:]])
    started = datetime.datetime.now(datetime.UTC)
    t_run = time.perf_counter()
    rows, failed = [], []
    for shape in shapes:
        per_step, micro = sizes[shape]["pairs_per_step"], sizes[shape]["micro_batch"]
        shape_overrides = [
            *config_overrides(model),
            *lora_overrides,
            f"dpo.micro_batch={micro}",
            f"dpo.grad_accum={per_step // micro}",
            "dpo.epochs=1",
            "data.max_length=4096",  # above every row: nothing is truncated
        ]
        cfg = load_config(DEMO_CONFIG, shape_overrides)
        lora = {
            "r": cfg.lora.r,
            "alpha": cfg.lora.alpha,
            "dropout": cfg.lora.dropout,
            "targets": cfg.lora.peft_target_modules,
        }
        base_spec = {
            **model,
            "shape": shape,
            "steps": args.steps,
            "pairs_per_step": per_step,
            "micro_batch": micro,
            "answer_tokens": sizes[shape]["answer_tokens"],
            "overrides": shape_overrides,
            "lora": lora,
            "lr": cfg.dpo.lr,
            "beta": cfg.dpo.beta,
        }
        for variant in args.variants:
            print(f"[{shape}] {variant}: {VARIANTS[variant]} (load {os.getloadavg()[0]:.1f}) ...", flush=True)
            t0 = time.perf_counter()
            spec = {**base_spec, "variant": variant}
            if variant == "a_budget":
                c2 = next((r for r in rows if r["shape"] == shape and r["variant"] == "c2"), None)
                if c2 is None:
                    parser.error("a_budget takes its budget from c2's peak: list c2 before it in --variants")
                spec["budget_mib"] = c2["peak_mib"]
            try:
                result = run_worker(
                    Path(__file__),
                    spec,
                    timeout=7200,
                    extra_env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
                )
            except RuntimeError as err:  # a TRL option that does not run here: said, and the others go on
                reason = [ln for ln in str(err).splitlines() if "Error" in ln][-1:] or [str(err).splitlines()[0]]
                print(f"    did not run: {reason[0][:300]}", flush=True)
                failed.append(f"- {shape} / {variant}: did not run: {reason[0][:300]}")
                continue
            row = {**spec, **result, "wall_s": time.perf_counter() - t0}
            row["pairs_per_s"] = per_step / row["s_per_step"]
            print(
                f"    peak {row['peak_mib']:,.0f} MiB above baseline {row['baseline_mib']:,.0f} "
                f"(process {row['process_peak_mib']:,.0f}), {row['s_per_step']:.2f} s/step "
                f"(steps {', '.join(f'{s:.2f}' for s in row['step_s'])}), {row['wall_s']:.0f} s in all",
                flush=True,
            )
            rows.append(row)
    run_s = time.perf_counter() - t_run

    for r in rows:
        a = next((x for x in rows if x["shape"] == r["shape"] and x["variant"] == "a"), None)
        nan = float("nan")
        r["peak_vs_a"] = r["peak_mib"] / a["peak_mib"] if a else nan
        r["process_peak_vs_a"] = r["process_peak_mib"] / a["process_peak_mib"] if a else nan
        r["time_vs_a"] = r["s_per_step"] / a["s_per_step"] if a else nan
        r["pairs_per_s_vs_a"] = r["pairs_per_s"] / a["pairs_per_s"] if a else nan

    seq_lines = []
    for shape in shapes:
        shape_rows = [r for r in rows if r["shape"] == shape]
        if shape_rows:
            seq_lines += check_sequences(shape_rows)
    versions = _versions()
    a_row = next((r for r in rows if r["variant"] == "a"), None)
    trl_row = next((r for r in rows if r["variant"] not in LITE_VARIANTS), None)
    header = [
        f"# DPO training step: lite-rlhf vs TRL DPOTrainer (CPU, {model['dtype']})",
        "",
        f"- date: {started.isoformat(timespec='seconds')}; run time {run_s / 60:.1f} min",
        f"- machine: {machine_description()}; torch threads {rows[0]['threads']}",
        f"- git revision: {git_revision(REPO)}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in versions.items())}",
        f"- command: `{command}`",
        f"- model: {describe_model(model)}, CPU; {args.steps} steps per variant, s/step = mean of steps "
        f"2..{args.steps}",
        "- shapes: " + "; ".join(f"{k} = {v['pairs_per_step']} pairs/step in micro-batches of {v['micro_batch']}, "
                                 f"answers {v['answer_tokens']} tokens" for k, v in sizes.items())
        + f"; prompts >= {PROMPT_TOKENS} tokens (see the docstring)",
    ]
    if a_row:
        header.append(f"- (a) LoRA: {a_row['lora']}; optimizer {a_row['optimizer']}")
    if trl_row:
        header.append(f"- TRL optimizer: {trl_row['optimizer']}; max_length {trl_row['max_length']}")
    header.append(
        "- peak above baseline = VmHWM - RSS after imports and tokenized inputs (model load, reference, set-up and "
        "steps included); whole-process peak = largest VmHWM of the worker process"
    )
    report = [
        *header,
        "",
        *table(rows),
        "",
        "Targets:",
        *targets(rows),
        *(["", "Variants that did not run:", *failed] if failed else []),
        "",
        "Token sequences each variant's training step received:",
        *seq_lines,
    ]
    print()
    print("\n".join(report))

    write_csv(out, rows, versions, started, model)
    md = out.with_suffix(".md")
    md.write_text("\n".join(report) + "\n")
    print(f"\nappended {len(rows)} rows to {out}; wrote {md}")


def resized(shape: dict, pairs_per_step: int | None, answer_tokens: int | None) -> dict:
    """`shape` with fewer pairs per step (its micro-batch at most that) and answers of one length, where given."""
    out = dict(shape)
    if pairs_per_step:
        out.update(pairs_per_step=pairs_per_step, micro_batch=min(shape["micro_batch"], pairs_per_step))
    if answer_tokens:
        out["answer_tokens"] = answer_tokens
    return out


def write_csv(path: Path, rows: list[dict], versions: dict, started: datetime.datetime, model: dict) -> None:
    fields = [
        "timestamp", "git_rev", "machine", "torch", "transformers", "trl", "peft", "model", "dtype", "params",
        "shape", "variant", "pairs_per_step", "answer_tokens", "steps", "baseline_mib", "peak_mib", "peak_vs_a",
        "setup_peak_mib", "train_peak_mib",
        "process_peak_mib", "process_peak_vs_a", "s_per_step", "time_vs_a", "pairs_per_s", "pairs_per_s_vs_a",
        "first_step_s", "step_s", "policy_fwd_s", "ref_fwd_s", "setup_s", "attn_implementation", "tokens_seen",
        "same_tokens_as_a", "lora", "gradient_checkpointing", "checkpointed_layers", "budget_mib", "plan_train_mib",
        "optimizer", "threads", "load_start", "load_end", "peak_reset",
    ]  # fmt: skip
    # figures rounded to these many digits; the other fields are written as they are
    digits = {
        "baseline_mib": 1, "peak_mib": 1, "peak_vs_a": 3, "setup_peak_mib": 1, "train_peak_mib": 1,
        "process_peak_mib": 1, "process_peak_vs_a": 3, "s_per_step": 3, "time_vs_a": 3, "pairs_per_s": 3,
        "pairs_per_s_vs_a": 3, "first_step_s": 3, "policy_fwd_s": 3, "ref_fwd_s": 3, "setup_s": 2,
        "load_start": 2, "load_end": 2,
    }  # fmt: skip
    plain = ["shape", "variant", "pairs_per_step", "answer_tokens", "steps", "attn_implementation", "lora",
             "gradient_checkpointing", "optimizer", "threads", "peak_reset"]  # fmt: skip
    common = {
        "timestamp": started.isoformat(timespec="seconds"),
        "git_rev": git_revision(REPO),
        "machine": machine_description(),
        **{k: versions[k] for k in ("torch", "transformers", "trl", "peft")},
        "model": model["model"],
        "dtype": model["dtype"],
        "params": parameters(model),
    }
    out = [
        {
            **common,
            **{k: r[k] for k in plain},
            **{k: round(r[k], n) for k, n in digits.items()},
            "step_s": " ".join(f"{s:.3f}" for s in r["step_s"]),
            "tokens_seen": sum(n for b in r["seen"] for n in b["lengths"]),
            "same_tokens_as_a": r.get("same_tokens", ""),
            **{k: round(r[k], 1) if isinstance(r.get(k), float) else r.get(k, "")
               for k in ("checkpointed_layers", "budget_mib", "plan_train_mib")},
        }
        for r in rows
    ]
    append_csv(path, fields, out)


if __name__ == "__main__":
    main()
