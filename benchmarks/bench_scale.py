"""From 135M to 8B: one short iteration of the loop per model size, phase by phase, with `lite-rlhf plan --cpu`'s
estimate beside each measured peak.

Every figure the project quotes was taken on the 135M embedded model, where the weights are a small share of the
process. Here the ladder is real architectures with random weights (quality is not the point: memory and compute
are those of the real model). Their hyperparameters are the published ones, written below with their source; the
tokenizer is the embedded model's, its vocabulary padded with unused tokens to the architecture's size (so the
embeddings, the LM head and the log-prob kernel work at the real vocabulary).

A rung is one fresh process (``MALLOC_MMAP_THRESHOLD_=65536``, benchmarks/_memory.py) that runs the loop's own
stages as `lite-rlhf run` runs them, on the demo's prompts:

- load: the shared base with its policy and reward adapters, and the vLLM engine (one copy of the weights where
  `generation.share_weights` allows it);
- generate: n answers per prompt from the policy, served by LoRA, with the loop's engine check;
- score: the reward adapter scores every answer;
- reference log-probs: best-vs-worst pairs, π0's log-probs of each;
- dpo train: DPO on those pairs (a couple of optimizer steps);
- grpo rollouts: the policy's and π0's per-token log-probs of every answer (the GRPO stage after the DPO one);
- grpo train: one GRPO update over every answer.

Per phase: wall time and the process's peak resident memory (VmHWM, reset at the phase's start), and the plan's
estimate of the process's resident memory in that phase for the same config (`lite_rlhf.plan.cpu_estimate`, what
`lite-rlhf plan --cpu` prints), with the error. Target (issue 45): within 20% in every phase of every rung.

A rung that cannot run here is said, with what the plan says about it: the plan is asked first, and a rung it
says does not fit this machine's memory is run anyway only when ``--try-unfit`` names it (by default the 8B in
float32, to show that the plan's "does not fit" holds), watched by the parent, which stops it before the machine
runs out (``--stop-at``). Variants of a rung: ``:nf4`` (the trainer's base in 4 bits), ``:fp32`` (weights in
float32, the CPU's default dtype) and ``:two-copies`` (``generation.share_weights=false``).

    .venv/bin/python benchmarks/bench_scale.py                          # the ladder (~1 h on 2 cores)
    .venv/bin/python benchmarks/bench_scale.py --rungs smollm2-360m qwen2.5-1.5b
    .venv/bin/python benchmarks/bench_scale.py --rungs llama3.1-8b:nf4 --try-unfit llama3.1-8b:nf4
    .venv/bin/python benchmarks/bench_scale.py --rungs tiny --no-save    # smoke: a tiny Llama 3 shape

Models are built once into ``--models`` (default ~/.cache/lite-rlhf/scale, 26 GB for the whole ladder). Appends to
benchmarks/results/scale.csv rung by rung; scale.md and scale.png show the newest run of every rung (``--report``
rewrites them from the csv).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _memory import append_csv, git_revision, machine_description, peak_mib, reset_peak, run_worker  # noqa: E402

RESULTS = HERE / "results"
TARGET = 0.20  # |estimate / measured - 1| per phase
GiB = 2**30

# Published architectures (config.json of each model on the Hugging Face Hub, read 2026-12; the keys that set
# memory and compute). Weights are random; rope scaling and context length are kept as published.
ARCHS: dict[str, tuple[str, dict]] = {
    "smollm2-360m": ("HuggingFaceTB/SmolLM2-360M-Instruct", dict(
        model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
        num_key_value_heads=5, head_dim=64, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5,
        max_position_embeddings=8192, rope_theta=100000.0)),
    "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B-Instruct", dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
        max_position_embeddings=32768, rope_theta=1000000.0)),
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B-Instruct", dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
        max_position_embeddings=32768, rope_theta=1000000.0)),
    "llama3.2-3b": ("meta-llama/Llama-3.2-3B-Instruct", dict(
        model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5,
        max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=dict(
            rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192))),
    "llama3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False, rms_norm_eps=1e-5,
        max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192))),
    # the smoke test's shape: Llama 3's vocabulary on a toy body
    "tiny": ("a toy Llama 3 (Llama 3's vocabulary and head size, 2 layers of 256)", dict(
        model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=128256, tie_word_embeddings=False, rms_norm_eps=1e-5,
        max_position_embeddings=2048, rope_theta=500000.0)),
}  # fmt: skip
LADDER = ("smollm2-360m", "qwen2.5-1.5b", "llama3.2-3b", "llama3.1-8b", "llama3.1-8b:nf4", "llama3.1-8b:fp32")
VARIANTS = {  # a rung's ':variant', as config overrides
    "nf4": ["model.quantization=nf4"],  # the trainer's base in 4 bits (QLoRA; bitsandbytes' CPU backend)
    "fp32": ["model.dtype=float32", "generation.dtype=float32"],  # the CPU's default dtype: 4 bytes a weight
    "two-copies": ["generation.share_weights=false"],  # the engine's weights apart from the trainer's
}
PHASES = ("load", "generate", "score", "reference log-probs", "dpo train", "grpo rollouts", "grpo train")

# The iteration: a handful of prompts, a few short answers each, a couple of DPO steps, one GRPO update.
WORK = [
    "model.dtype=bfloat16", "generation.dtype=bfloat16", "data.prompts=demo", "data.max_length=80",
    "generation.n=4", "generation.max_new_tokens=16", "generation.temperature=1.0", "loop.iterations=1",
    "loop.prompts_per_iteration=2", "dpo.micro_batch=1", "dpo.grad_accum=1", "dpo.epochs=1",
    "grpo.micro_batch=4", "grpo.grad_accum=2", "grpo.epochs=1", "lora.r=16", "lora.alpha=32", "run.quiet=true",
    "reward.score_batch=8", "eval.max_prompts=1", "pairs.allow_truncated=true",  # random weights never end an answer
]  # fmt: skip


def rung_overrides(rung: str) -> list[str]:
    return [*WORK, *(VARIANTS[rung.split(":")[1]] if ":" in rung else [])]


# --------------------------------------------------------------------------- the models


def build_model(arch: str, directory: Path) -> Path:
    """A random-weight model of `arch` in bf16, written tensor by tensor (never the whole model in memory), with
    the embedded model's tokenizer padded to the architecture's vocabulary. Built once; a finished directory has
    `config.json` written last."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from lite_rlhf.models import ensure_embedded_model

    if (directory / "config.json").is_file():
        return directory
    source, shape = ARCHS[arch]
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    embedded = ensure_embedded_model(progress=False)
    base_cfg = json.loads((embedded / "config.json").read_text())
    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (embedded / name).is_file():
            shutil.copy(embedded / name, tmp / name)
    tok = json.loads((embedded / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    taken = len(vocab) + len(tok.get("added_tokens", []))
    for i in range(max(0, shape["vocab_size"] - max(taken, max(vocab.values()) + 1))):
        vocab[f"Ġunused{i}"] = len(vocab)  # never made by a merge: decodes to " unusedN", never encoded
    (tmp / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))

    specials = {k: base_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = AutoConfig.for_model(**shape, **specials, dtype="bfloat16")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    shards: list[dict[str, torch.Tensor]] = [shard]
    size = 0
    for name, p in meta.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        elif name.endswith(".bias"):
            t = torch.zeros(p.shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(p.shape, dtype=torch.bfloat16).normal_(0.0, config.initializer_range, generator=gen)
        if size + t.numel() * 2 > 2 * GiB and shard:
            shard, size = {}, 0
            shards.append(shard)
        shard[name] = t
        size += t.numel() * 2
    index = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(tmp / fname), metadata={"format": "pt"})
        index.update({k: fname for k in part})
        part.clear()
    total = sum(p.numel() * 2 for n, p in meta.state_dict().items()
                if not (config.tie_word_embeddings and n == "lm_head.weight"))  # fmt: skip
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )
    config.architectures = [type(meta).__name__]
    config._name_or_path = f"random weights, {source}'s architecture"
    config.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def parameters(arch: str) -> int:
    from lite_rlhf.plan import Shape

    c = ARCHS[arch][1]
    s = Shape(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
              c["num_key_value_heads"], c["vocab_size"], c["tie_word_embeddings"], c["model_type"])  # fmt: skip
    return s.linear_params + s.embed_params


# --------------------------------------------------------------------------- one rung, in its own process


class Phases:
    """Times each phase and records the process's peak resident memory in it."""

    def __init__(self):
        self.rows: list[dict] = []

    def run(self, name: str, fn):
        if not reset_peak():
            raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs): this benchmark needs Linux >= 4.0")
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
        self.rows.append({"phase": name, "seconds": round(seconds, 2), "peak_mib": round(peak_mib(), 1)})
        print(f"  {name:<20} {seconds:8.1f} s  peak {peak_mib() / 1024:.2f} GiB", file=sys.stderr, flush=True)
        return out


def worker(spec: dict) -> dict:
    import dataclasses

    import torch  # noqa: F401  the post-import state: every library the loop uses, no model yet
    import transformers  # noqa: F401
    import vllm  # noqa: F401
    from _memory import current_rss_mib

    from lite_rlhf.algorithms import dpo, grpo
    from lite_rlhf.config import load_config
    from lite_rlhf.context import Context, Say, commit_policy
    from lite_rlhf.data import prompt_ids
    from lite_rlhf.generate import LazyEngine, check_context, make_engine, sized_for, start_engine
    from lite_rlhf.loop import generate, scores
    from lite_rlhf.roles import SharedModel
    from lite_rlhf.runstate import RunDir
    from lite_rlhf.scoring import Oracle
    from lite_rlhf.task import load_task

    baseline = current_rss_mib()
    cfg = load_config(None, [f"model.name={spec['model_dir']}", f"run.out_dir={spec['out_dir']}", *spec["set"]])
    task = load_task(cfg.data)
    prompts = task.slice(1, cfg.loop.iterations, cfg.loop.prompts_per_iteration)
    model_dir = Path(spec["model_dir"])
    ph = Phases()
    say = Say(quiet=True)

    def load():
        model = SharedModel(cfg, model_dir=model_dir)
        ids = {p.id: prompt_ids(model.tokenizer, p.messages) for p in task.all_prompts}
        length = check_context(ids, model_dir, cfg.generation, cfg.data.max_length)
        gen = sized_for(cfg.generation, model_dir, length, len(prompts) * cfg.generation.n)  # as the loop sizes it
        engine = LazyEngine(lambda: start_engine(model, cfg, lambda share: make_engine(
            model_dir, gen, lora_rank=cfg.lora.r, seed=cfg.run.seed, quantization=cfg.model.quantization,
            max_model_len=length, share=share), print))  # fmt: skip
        _ = engine.description  # the engine starts now, as the loop's first generation starts it
        ctx = Context(RunDir(cfg), cfg, task, model, engine, Oracle(cfg, model), ids, say)
        commit_policy(ctx, 0)
        return ctx

    ctx = ph.run("load", load)
    samples = ph.run("generate", lambda: generate(ctx, 1, prompts, None))
    rewards = ph.run("score", lambda: scores(ctx, 1, samples))
    pairs = ph.run("reference log-probs", lambda: dpo.pairs(ctx, 1, samples, rewards))
    ph.run("dpo train", lambda: dpo.dpo(ctx, 1, pairs))
    gcfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, algorithm="grpo"))
    gctx = dataclasses.replace(ctx, cfg=gcfg)  # the same run directory: GRPO as iteration 2, from DPO's policy
    batch = ph.run("grpo rollouts", lambda: grpo.rollouts(gctx, 2, samples, rewards))
    ph.run("grpo train", lambda: grpo.iteration(gctx, 2, samples, rewards, []))
    engine = ctx.engine
    records = [json.loads(line) for line in (Path(spec["out_dir"]) / "metrics.jsonl").read_text().splitlines()]
    result = {
        "pairs_record": next((r for r in records if r.get("stage") == "pairs"), {}),
        "rows": ph.rows,
        "baseline_mib": round(baseline, 1),
        "samples": len(samples),
        "generated_tokens": sum(s.n_tokens for s in samples),
        "pairs": len(pairs),
        "rollouts": len(batch),
        "checkpointed_layers": ctx.model.checkpointed_layers,
        "engine": engine.description,
        "one_copy": bool(engine.shared),
        "longest_prompt": max(len(ctx.ids[p.id]) for p in prompts),
        "engine_length": engine.max_model_len,
        "kv_blocks": engine.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,  # vLLM's own count
        "rss_file_mib_after": _status_kib("RssFile") / 1024,  # mapped files: the libraries' code and data
    }
    engine.close()
    return result


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def plan_for(rung: str, model_dir: Path, checkpointed: int | None, longest_prompt: int | None) -> dict:
    """`lite-rlhf plan --cpu`'s phases for the rung's config (bytes), mapped onto the benchmark's phases."""
    import dataclasses

    from lite_rlhf.config import load_config
    from lite_rlhf.plan import cpu_estimate

    cfg = load_config(None, [f"model.name={model_dir}", *rung_overrides(rung)])
    if checkpointed is not None:  # the layers the run checkpointed (auto decides at run time)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gradient_checkpointing=checkpointed))
    gcfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, algorithm="grpo"))
    length = longest_prompt + cfg.generation.max_new_tokens if longest_prompt else None
    est, gest = cpu_estimate(cfg, engine_length=length), cpu_estimate(gcfg, engine_length=length)
    p, g = est["phases"], gest["phases"]
    return {
        "load": p["load"], "generate": p["generate"], "score": p["score"],
        "reference log-probs": p["reference log-probs"], "dpo train": p["train"],
        "grpo rollouts": g["reference log-probs"], "grpo train": g["train"],
    }  # fmt: skip


# --------------------------------------------------------------------------- the parent


def mem_total() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))


def watch(stop_at: float, state: dict) -> None:
    """Stop the rung's process tree before the machine runs out: when the memory available falls under `stop_at`
    bytes, kill this process group's children and record it."""
    import signal

    while not state.get("done"):
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        if avail < stop_at:
            state["stopped"] = f"stopped with {avail / GiB:.1f} GiB of memory left on the machine"
            for pid in state.get("pids", []):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return
        time.sleep(0.5)


def run_rung(rung: str, models: Path, args) -> dict:
    from lite_rlhf.plan import cpu_fit

    arch = rung.split(":")[0]
    print(f"[{rung}] building or finding the model ...", file=sys.stderr, flush=True)
    model_dir = build_model(arch, models / arch)
    from lite_rlhf.config import load_config

    cfg = load_config(None, [f"model.name={model_dir}", *rung_overrides(rung)])
    plan_text, fits = cpu_fit(cfg, mem_total())  # what `lite-rlhf plan --cpu` prints for this config
    out = {"rung": rung, "arch": arch, "source": ARCHS[arch][0], "params": parameters(arch), "plan_text": plan_text,
           "plan_fits": fits}  # fmt: skip
    if not fits and rung not in args.try_unfit:
        out["status"] = "not run: the plan says it does not fit this machine (--try-unfit RUNG runs it, watched)"
        print(f"[{rung}] {out['status']}", file=sys.stderr, flush=True)
        return out
    print(f"[{rung}] running one iteration ...", file=sys.stderr, flush=True)
    state: dict = {}
    guard = threading.Thread(target=watch, args=(args.stop_at * GiB, state), daemon=True)
    guard.start()
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"model_dir": str(model_dir), "out_dir": tmp, "set": rung_overrides(rung)}
        start = time.perf_counter()
        try:
            res = run_worker(Path(__file__).resolve(), spec, timeout=5400, live_stderr=True,
                             on_start=lambda p: state.setdefault("pids", []).append(p.pid))  # fmt: skip
        except RuntimeError as err:
            state["done"] = True
            last = [line for line in str(err).splitlines() if line.strip()][-1:] or ["(no output)"]
            out["status"] = state.get("stopped") or f"failed: {last[0][:300]}"
            print(f"[{rung}] {out['status']}", file=sys.stderr, flush=True)
            return out
        state["done"] = True
        out["wall_s"] = round(time.perf_counter() - start, 1)
    out.update(res, status="ran")
    out["note"] = (f"{res['samples']} answers ({res['generated_tokens']} tokens), {res['pairs']} pairs, "
                   f"{res['rollouts']} rollouts; {res['engine']}; checkpointed layers {res['checkpointed_layers']}; "
                   f"KV cache {res['kv_blocks']} blocks of 128 tokens; post-import baseline "
                   f"{res['baseline_mib'] / 1024:.2f} GiB; process wall {out['wall_s']} s.")  # fmt: skip
    add_estimates(out, model_dir)
    return out


def add_estimates(out: dict, model_dir: Path) -> None:
    """The plan's estimate and its error beside each measured phase of a rung that ran."""
    est = plan_for(out["rung"], model_dir, out["checkpointed_layers"], out["longest_prompt"])
    for row in out["rows"]:
        parts = est[row["phase"]]
        row["estimate_mib"] = round(sum(parts.values()) / 2**20, 1)
        row["error"] = round(row["estimate_mib"] / row["peak_mib"] - 1, 3)


def report(results: list[dict], command: str) -> str:
    lines = [
        "Per rung, one iteration in one fresh process; peak = the process's resident memory at its highest in the "
        "phase (VmHWM), estimate = `lite-rlhf plan --cpu` for the same config (`lite_rlhf.plan.cpu_estimate`, with "
        "the checkpointed layers the run chose), error = estimate / peak - 1. Work per rung: "
        + " ".join(f"`{w}`" for w in WORK) + ".",
        "",
        "| rung | params | phase | wall s | peak GiB | plan GiB | error |",
        "|---|---|---|---|---|---|---|",
    ]
    misses, notes = [], []
    for r in results:
        if r["status"] != "ran":
            notes.append(f"- **{r['rung']}** ({r['params'] / 1e9:.2f}B): {r['status']}. The plan:\n\n```\n"
                         f"{r['plan_text']}\n```")  # fmt: skip
            continue
        for row in r["rows"]:
            peak, plan = row["peak_mib"] / 1024, row["estimate_mib"] / 1024
            lines.append(f"| {r['rung']} | {r['params'] / 1e9:.2f}B | {row['phase']} | {row['seconds']} "
                         f"| {peak:.2f} | {plan:.2f} | {row['error']:+.0%} |")  # fmt: skip
            if abs(row["error"]) > TARGET:
                misses.append(f"{r['rung']} {row['phase']} ({row['error']:+.0%})")
        notes.append(f"- **{r['rung']}** ({r['source']}): {r['note']}")
    lines += ["", f"target: the plan within {TARGET:.0%} of the peak in every phase that ran: "
              + ("met" if not misses else "NOT met for " + ", ".join(misses)), "", *notes]  # fmt: skip
    return "\n".join(lines)


FIELDS = ["timestamp", "git_rev", "rung", "params", "phase", "seconds", "peak_mib", "estimate_mib", "error",
          "status", "load_avg_before", "checkpointed_layers", "longest_prompt", "note"]  # fmt: skip


def from_csv(csv_path: Path, models: Path) -> tuple[list[dict], list[str]]:
    """The newest run of every rung in the csv, as `run_rung` returns it, with the current plan's estimates (a
    function of the config, the checkpointed layers and the longest prompt, all in the csv; the plan's revision
    is the report's), and the runs' stamps and revisions."""
    import csv

    from lite_rlhf.config import load_config
    from lite_rlhf.plan import cpu_fit

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    newest: dict[str, str] = {}
    for row in rows:
        newest[row["rung"]] = max(newest.get(row["rung"], ""), row["timestamp"])
    order = [r for r in LADDER if r in newest] + [r for r in newest if r not in LADDER and r != "tiny"]
    results, stamps = [], []
    for rung in order:
        mine = [row for row in rows if row["rung"] == rung and row["timestamp"] == newest[rung]]
        arch = rung.split(":")[0]
        model_dir = models / arch
        first = mine[0]
        stamps.append(f"{rung}: {first['timestamp']}, git {first['git_rev']}")
        cfg = load_config(None, [f"model.name={model_dir}", *rung_overrides(rung)])
        plan_text, fits = cpu_fit(cfg, mem_total())
        out = {"rung": rung, "arch": arch, "source": ARCHS[arch][0], "params": int(first["params"]),
               "status": first["status"], "plan_text": plan_text, "plan_fits": fits,
               "note": first.get("note") or "(this run predates the notes)"}  # fmt: skip
        if out["status"] == "ran":
            out["rows"] = [{"phase": row["phase"], "seconds": float(row["seconds"]), "peak_mib": float(row["peak_mib"])}
                           for row in mine]  # fmt: skip
            out["checkpointed_layers"] = int(first["checkpointed_layers"])
            out["longest_prompt"] = int(first["longest_prompt"])
            add_estimates(out, model_dir)
        results.append(out)
    return results, stamps


def plot(results: list[dict], png: Path) -> None:
    """Peak memory and wall time per phase against parameters, the plan's estimate beside each peak (the rungs
    that ran; a 4-bit rung as its own marker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in results if r["status"] == "ran"]
    fig, (mem, wall) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, phase in enumerate(PHASES):
        rungs = sorted((r for r in ran if ":" not in r["rung"]), key=lambda r: r["params"])
        x = [r["params"] / 1e9 for r in rungs]
        rows = [next(row for row in r["rows"] if row["phase"] == phase) for r in rungs]
        if not rows:
            continue
        mem.plot(x, [row["peak_mib"] / 1024 for row in rows], "o-", color=f"C{i}", label=phase)
        mem.plot(x, [row["estimate_mib"] / 1024 for row in rows], "x--", color=f"C{i}", alpha=0.7)
        wall.plot(x, [row["seconds"] for row in rows], "o-", color=f"C{i}", label=phase)
    for r in ran:
        if ":" in r["rung"]:
            mem.plot([r["params"] / 1e9], [max(row["peak_mib"] for row in r["rows"]) / 1024], "k^",
                     label=f"{r['rung']}, highest phase")  # fmt: skip
    mem.axhline(mem_total() / GiB, color="grey", lw=0.8, ls=":")
    mem.text(0.3, mem_total() / GiB * 0.97, "this machine's RAM", fontsize=7, va="top", color="grey")
    mem.set(xscale="log", xlabel="parameters (billions)", ylabel="peak resident memory (GiB)",
            title="memory per phase: measured (o) and plan --cpu (x)")  # fmt: skip
    wall.set(xscale="log", yscale="log", xlabel="parameters (billions)", ylabel="wall time (s)",
             title="time per phase (2 CPU cores)")  # fmt: skip
    for ax in (mem, wall):
        ticks = sorted({r["params"] / 1e9 for r in ran})
        ax.set_xticks(ticks, [f"{t:.2g}B" for t in ticks])
        ax.minorticks_off()
    mem.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rungs", nargs="*", default=list(LADDER),
                        help=f"architectures, ':nf4' for a 4-bit base (default: {' '.join(LADDER)})")  # fmt: skip
    parser.add_argument("--models", default=str(Path.home() / ".cache" / "lite-rlhf" / "scale"))
    parser.add_argument("--try-unfit", nargs="*", default=["llama3.1-8b:fp32"],
                        help="rungs to run even where the plan says they do not fit, watched (default: the 8B in "
                             "float32, to show that the plan's 'does not fit' holds)")  # fmt: skip
    parser.add_argument("--stop-at", type=float, default=1.5, help="GiB of free memory at which a rung is stopped")
    parser.add_argument("--no-save", action="store_true", help="print only (smoke runs)")
    parser.add_argument("--report", action="store_true",
                        help="rewrite results/scale.md and scale.png from results/scale.csv (the newest run of each "
                             "rung, the plan's estimates by this revision) and stop")  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.report:
        write_report(Path(args.models))
        return
    for rung in args.rungs:
        arch, *variant = rung.split(":")
        if arch not in ARCHS or (variant and variant[0] not in VARIANTS) or len(variant) > 1:
            parser.error(f"unknown rung '{rung}'; one of {', '.join(ARCHS)}, optionally with "
                         f"{' or '.join(':' + v for v in VARIANTS)}")  # fmt: skip
    command = "benchmarks/bench_scale.py " + " ".join(sys.argv[1:])
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    rev = git_revision(REPO)
    results, rows = [], []
    for rung in args.rungs:
        load = os.getloadavg()[0]
        r = run_rung(rung, Path(args.models), args)
        results.append(r)
        for row in r.get("rows", [{"phase": "-"}]):
            rows.append({**row, "timestamp": stamp, "git_rev": rev, "rung": rung, "params": r["params"],
                         "status": r["status"], "load_avg_before": load,
                         "checkpointed_layers": r.get("checkpointed_layers"),
                         "longest_prompt": r.get("longest_prompt"), "note": r.get("note", "")})  # fmt: skip
        if not args.no_save:  # each rung as it ends: a ladder stopped half-way keeps what it measured
            append_csv(RESULTS / "scale.csv", FIELDS, rows[-len(r.get("rows", [0])) :])
    print(report(results, command))
    if not args.no_save:
        write_report(Path(args.models))


def write_report(models: Path) -> None:
    """results/scale.md from the newest run of every rung in results/scale.csv (the plan's estimates by this
    revision), and scale.png."""
    results, stamps = from_csv(RESULTS / "scale.csv", models)
    rev = git_revision(REPO)
    header = (f"# scale\n\n{machine_description()}; the rungs' runs: " + "; ".join(stamps) + f". Plan estimates and "
              f"this report: git {rev} (`.venv/bin/python benchmarks/bench_scale.py --report`). Each rung ran as "
              "`.venv/bin/python benchmarks/bench_scale.py --rungs RUNG`.\n\n")  # fmt: skip
    (RESULTS / "scale.md").write_text(header + report(results, "") + "\n")
    plot(results, RESULTS / "scale.png")
    print(f"wrote {RESULTS / 'scale.md'}")


if __name__ == "__main__":
    main()
