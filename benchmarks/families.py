"""The whole tiny loop on each model family of `lite_rlhf.families`: does `lite-rlhf run` finish, does the engine
serve the adapter the trainer wrote, and does `lite-rlhf export` give the adapted model?

Per family, on the tiny random model the tests build (`make_tiny_model(dir, family=f, hidden_size=128, heads=2,
kv_heads=1, layers=2)`, the vLLM engine in float32), each step a fresh process through the command line:

1. `lite-rlhf run dpo.yaml`: the reward model trained on 12 pairs, then one DPO iteration (4 prompts, 3 answers);
2. `lite-rlhf run grpo.yaml`: one GRPO iteration judged by that reward model (`reward.adapter`), its π0 the DPO
   run's policy (`model.sft_adapter`), so that the engine's first adapter is a trained one, not a zero LoRA;
3. `lite-rlhf export --adapter <grpo run>/iter_001/policy`, then, in a fresh process, the merged model's logits
   against base + adapter (peft) on a few tokens, each loaded with the attention the trainer uses for the family.

Recorded per family: each command's exit code, wall seconds and peak memory (the child's ru_maxrss from wait4, as
benchmarks/demo_seeds.py reads it), the `engine_logprob_gap` of each iteration (metrics.jsonl: the engine's
log-probs of its sampled tokens against the trainer's for the adapter served), the layers LoRA adapted (the
adapter's config), whether `generation.share_weights` shared the base (the run's engine line), and the export's
largest logit difference. Timings beside other jobs are not a quiet machine's.

    .venv/bin/python benchmarks/families.py                   # every family, ~2-4 min each on 2 cores
    .venv/bin/python benchmarks/families.py --families gemma2 --no-save

Run directories and logs go under --root (default runs/families); the table to
benchmarks/results/families.md, rows appended to benchmarks/results/families.csv.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _memory import append_csv, git_revision, machine_description, run_worker  # noqa: E402

from lite_rlhf.families import TINY  # noqa: E402  (no torch: names and flags only)

FAMILIES = [f for f in TINY if f != "llama"]  # the plain Llama is every other test's model
RESULTS = HERE / "results"
LOG_TAIL = 4000
FIELDS = ["timestamp", "git_rev", "family", "dpo_exit", "dpo_seconds", "dpo_peak_mib", "dpo_gap", "grpo_exit",
          "grpo_seconds", "grpo_peak_mib", "grpo_gap", "lora_modules", "share", "export_exit", "export_seconds",
          "export_max_logit_diff", "error"]  # fmt: skip


def worker(spec: dict) -> dict:
    """In a fresh process: build the family's tiny model (`make`), or compare the merged export with base + adapter
    (`check`)."""
    if spec["job"] == "make":
        from lite_rlhf.models import make_tiny_model

        kw = {"family": spec["family"], "hidden_size": 128, "heads": 2, "kv_heads": 1, "layers": 2}
        return {"model": str(make_tiny_model(spec["dir"], **kw))}
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from lite_rlhf.families import attention_implementation

    def load(path: str):
        attn = attention_implementation(AutoConfig.from_pretrained(path), "auto")
        attn = {} if attn == "auto" else {"attn_implementation": attn}
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **attn).eval()

    ids = torch.tensor([[1, 17, 42, 99, 7, 256, 3, 64, 12, 200, 5, 31]])  # [1, 12]: a few tokens of the vocabulary
    with torch.no_grad():
        ours = PeftModel.from_pretrained(load(spec["base"]), spec["adapter"]).eval()(ids).logits
        theirs = load(spec["merged"])(ids).logits
        plain = load(spec["base"])(ids).logits
    # the adapter's own effect beside the merge's error: a merge that dropped the adapter would show diff == effect
    return {"max_diff": (ours - theirs).abs().max().item(), "adapter_effect": (ours - plain).abs().max().item()}


def command(root: Path, cmd: list[str], log: Path) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS MiB) of `python -P -m lite_rlhf.cli CMD` in a child process, its output
    into `log`. The peak is the child's own ru_maxrss from wait4 (benchmarks/demo_seeds.py's run_seed)."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "lite_rlhf.cli", *cmd], stdout=out,
                                stderr=subprocess.STDOUT, cwd=root)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait for it again
    return proc.returncode, round(time.perf_counter() - start, 1), round(usage.ru_maxrss / 1024)


def gaps(run: Path) -> str:
    """The engine_logprob_gap of each iteration, from metrics.jsonl ('' where there is none)."""
    path = run / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    found = [r.get("engine_logprob_gap") for r in rows if r.get("stage") == "samples"]
    return " ".join("–" if g is None else f"{g:.1e}" for g in found)


def engine_line(log: Path) -> str:
    """Whether the run shared its base with the engine: 'yes', or 'no (why)', from the run's engine line."""
    for line in log.read_text(errors="replace").splitlines():
        if "engine: one copy of the base weights" in line:
            return "yes"
        if "engine: its own copy of the base weights (" in line:
            return "no (" + line.split("weights (", 1)[1]
    return ""


def last_line(log: Path) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


def shared_inputs(root: Path) -> dict:
    """The prompt splits and reward pairs every family's runs read (tests/test_loop.py's, smaller), and the two
    configs' common part (run.quiet stays false: the run's engine line, base shared or not, goes to its log)."""
    from lite_rlhf.demo.task import split_prompts

    splits = split_prompts()
    rm = splits["rm_prompts"]
    rows = {
        "prompts": splits["prompts"][:4],
        "val": splits["val_prompts"][:2],
        "test": splits["test_prompts"][:2],
        "prefs": [{"prompt": r["prompt"], "chosen": f"the {r['topic']} is nice", "rejected": "no no no no"}
                  for r in rm[:12]],
    }  # fmt: skip
    files = {}
    for name, items in rows.items():
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in items))
    return {
        "model": {"dtype": "float32"},
        "lora": {"r": 8, "alpha": 16},
        "data": {"prompts": str(files["prompts"]), "val_prompts": str(files["val"]),
                 "test_prompts": str(files["test"]), "preferences": str(files["prefs"]), "max_length": 256},
        "reward": {"lr": 1e-3, "micro_batch": 4, "grad_accum": 1},
        "generation": {"backend": "vllm", "n": 3, "temperature": 1.0, "max_new_tokens": 12, "kv_cache_gib": 0.25},
        "loop": {"iterations": 1, "prompts_per_iteration": 4},
        "eval": {"samples_per_prompt": 2},
        "pairs": {"allow_truncated": True},  # a random model rarely stops by itself
    }  # fmt: skip


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(f"# benchmarks/families.py: lite-rlhf run {path.name}\n" + yaml.safe_dump(cfg))
    return path


def family_row(root: Path, family: str, base: dict) -> dict:
    """Build, run DPO and GRPO, export and check one family; a failing step ends the family's row there."""
    d = root / family
    d.mkdir(parents=True, exist_ok=True)
    model = run_worker(Path(__file__), {"job": "make", "family": family, "dir": str(d / "model")})["model"]
    row = {"family": family}
    dpo, grpo = d / "dpo", d / "grpo"
    dpo_cfg = write_config(d / "dpo.yaml", {**base, "model": {**base["model"], "name": model},
                           "dpo": {"lr": 1e-3, "micro_batch": 2, "grad_accum": 1, "epochs": 1.0}})  # fmt: skip
    row["dpo_exit"], row["dpo_seconds"], row["dpo_peak_mib"] = command(
        d, ["run", str(dpo_cfg), f"run.out_dir={dpo}"], d / "dpo.log"
    )
    row["dpo_gap"], row["share"] = gaps(dpo), engine_line(d / "dpo.log")
    if row["dpo_exit"]:
        return row | {"error": f"dpo: {last_line(d / 'dpo.log')}"}
    grpo_cfg = write_config(d / "grpo.yaml", {
        **base, "model": {**base["model"], "name": model, "sft_adapter": str(dpo / "iter_001" / "policy")},
        "reward": {**base["reward"], "adapter": str(dpo / "reward")}, "loop": {**base["loop"], "algorithm": "grpo"},
        "grpo": {"lr": 1e-3, "micro_batch": 4, "grad_accum": 1}})  # fmt: skip
    row["grpo_exit"], row["grpo_seconds"], row["grpo_peak_mib"] = command(
        d, ["run", str(grpo_cfg), f"run.out_dir={grpo}"], d / "grpo.log"
    )
    row["grpo_gap"] = gaps(grpo)
    if row["grpo_exit"]:
        return row | {"error": f"grpo: {last_line(d / 'grpo.log')}"}
    adapter = grpo / "iter_001" / "policy"
    row["lora_modules"] = " ".join(sorted(json.loads((adapter / "adapter_config.json").read_text())["target_modules"]))
    row["export_exit"], row["export_seconds"], _ = command(
        d, ["export", str(grpo_cfg), f"run.out_dir={grpo}", "--quiet", "--adapter", str(adapter), "--out",
            str(d / "merged")], d / "export.log")  # fmt: skip
    if row["export_exit"]:
        return row | {"error": f"export: {last_line(d / 'export.log')}"}
    check = run_worker(Path(__file__), {"job": "check", "base": model, "adapter": str(adapter),
                                        "merged": str(d / "merged")})  # fmt: skip
    row["export_max_logit_diff"] = f"{check['max_diff']:.1e} (adapter moves them {check['adapter_effect']:.2g})"
    return row


def table(rows: list[dict]) -> str:
    out = ["| family | DPO run: exit, s, peak MiB | gap/token, DPO iter 1 (π0 served) | GRPO run: exit, s, peak MiB "
           "| gap/token, GRPO iter 1 (DPO's adapter served) | LoRA on | share_weights | export: exit, s "
           "| merged − (base + adapter), max abs logit |",
           "|" + "---|" * 9]  # fmt: skip
    cell = lambda r, k: "–" if r.get(k) in (None, "") else str(r[k])  # noqa: E731
    for r in rows:
        runs = {a: ", ".join(cell(r, f"{a}_{k}") for k in ("exit", "seconds", "peak_mib")) for a in ("dpo", "grpo")}
        out.append("| " + " | ".join([r["family"], runs["dpo"], cell(r, "dpo_gap"), runs["grpo"], cell(r, "grpo_gap"),
                                      cell(r, "lora_modules"), cell(r, "share"),
                                      f"{cell(r, 'export_exit')}, {cell(r, 'export_seconds')}",
                                      cell(r, "export_max_logit_diff")]) + " |")  # fmt: skip
    errors = [f"- {r['family']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(out + (["", "Stopped:", "", *errors] if errors else []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=FAMILIES, help="default: every family")
    p.add_argument("--root", type=Path, default=Path("runs/families"), help="run directories and logs go here")
    p.add_argument("--no-save", action="store_true", help="print only (smoke runs)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    base = shared_inputs(root)
    stamp, rev = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), git_revision(HERE.parent)
    start, load_before, rows = time.perf_counter(), os.getloadavg()[0], []
    for family in args.families:
        rows.append(family_row(root, family, base))
        print(f"{family}: {rows[-1]}", flush=True)
    text = table(rows)
    print(text)
    if args.no_save:
        return
    cmd = "benchmarks/families.py " + " ".join(sys.argv[1:])
    header = (f"# families\n\n{stamp}, git {rev}, {machine_description()}\n\n`nice -n 19 .venv/bin/python {cmd}`\n\n"
              f"Whole benchmark {time.perf_counter() - start:.0f} s; load average {load_before:.2f} before, "
              f"{os.getloadavg()[0]:.2f} after (other jobs ran beside it: times are not a quiet machine's). "
              "Gap: the engine's log-prob of each sampled token against the trainer's for the same adapter, mean "
              "absolute per token (float32 on both sides: rounding). Peak: the process's ru_maxrss.\n\n")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "families.md").write_text(header + text + "\n")
    append_csv(RESULTS / "families.csv", FIELDS, [{**r, "timestamp": stamp, "git_rev": rev} for r in rows])
    print(f"wrote {RESULTS.relative_to(HERE.parent)}/families.md and appended to families.csv")


if __name__ == "__main__":
    main()
