"""The demo's gold gain over several seeds: the loop once per seed, each in a fresh process with its own run
directory, one CSV row per seed and a markdown table with the spread of the gain.

    .venv/bin/python benchmarks/demo_seeds.py --seeds 5                      # the embedded demo, seeds 0-4
    .venv/bin/python benchmarks/demo_seeds.py my.yaml dpo.beta=0.2 --seeds 3 --first 10
    PYTHONPATH=../before .venv/bin/python benchmarks/demo_seeds.py --seeds 5 --name before   # another checkout's code

Each seed runs `python -P -m lite_rlhf.cli run CONFIG [k=v ...] run.seed=S run.out_dir=ROOT/seed_S --quiet` in the
environment as given (output in ROOT/seed_S.log). Killed, the same command resumes: a seed with a CSV row is
skipped, one with summary.json read, a partial one run again (the loop resumes it). ROOT/study.json pins the code
revision, config and overrides; others are refused. Rows: RESULTS/demo_seeds.csv, table: RESULTS/demo_seeds_<name>.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _memory import append_csv, machine_description  # noqa: E402

PROBE = ("import os, lite_rlhf; from lite_rlhf.cli import packaged_config, DEMO_CONFIG; "
         "print(os.path.dirname(lite_rlhf.__file__)); print(packaged_config(DEMO_CONFIG))")  # fmt: skip
PAIRED = ("gold_max_words", "gold_keyword", "gold_on_topic", "gold_real_answer", "length_chars")  # π0 and best
INFO = ["study", "seed", "revision", "cpu", "date", "overrides"]
FIGURES = ["rm_accuracy", "rm_accuracy_chosen_longer", "best_iteration", "gold_pi0", "gold_best", "gold_gain",
           "gain_ci_lo", "gain_ci_hi", "gain_excludes_zero", *(f"{k}_{w}" for k in PAIRED for w in ("pi0", "best")),
           "kl_best", "gold_noise", "wall_seconds", "process_seconds", "peak_rss_mib"]  # fmt: skip
# The alignment-tax panel (the test topics asked without their instruction), π0 and best: added later, so last
TAX = ("tax_on_topic", "tax_no_repetition", "tax_real_answer", "tax_words")
FIGURES += [f"{k}_{w}" for k in TAX for w in ("pi0", "best")]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"demo_seeds: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def seed_row(run: Path) -> dict:
    """One finished seed's figures from its run directory (None where it has none, e.g. a brought reward adapter)."""
    s = read_json(run / "summary.json")
    best = s["best_iteration"]
    pi0, top = read_json(run / "iter_000/eval.json"), read_json(run / f"iter_{best:03d}/eval.json")
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    rm = ([r for r in map(json.loads, lines) if r.get("stage") in ("reward_eval", "preference_eval")] or [{}])[-1]
    lo, hi = s.get("gold_gain_ci95") or (None, None)
    row = {"rm_accuracy": rm.get("eval_accuracy"), "rm_accuracy_chosen_longer": rm.get("eval_accuracy_chosen_longer"),
           "best_iteration": best, "gain_ci_lo": lo, "gain_ci_hi": hi,
           "gain_excludes_zero": None if lo is None else int(lo > 0 or hi < 0), "kl_best": top.get("kl")}  # fmt: skip
    row |= {k: s.get(k) for k in ("gold_pi0", "gold_best", "gold_gain", "gold_noise", "wall_seconds")}
    return row | {f"{k}_{w}": e.get(k) for k in PAIRED + TAX for w, e in (("pi0", pi0), ("best", top))}


def run_seed(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS MiB) of the loop in a child process, its output into `log`.
    The peak is this child's own ru_maxrss from wait4 (RUSAGE_CHILDREN would be the high-water mark over every
    child so far): the highest of the child and of any process it waited for. It cannot be below this process's
    peak (exec keeps the high-water mark, see _memory.py), a few tens of MiB: nothing heavy is imported here."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait for it again
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024


def recorded_rows(path: Path, name: str, revision: str) -> list[dict]:
    """The CSV's rows of this study at this revision, one per seed (the last), in seed order."""
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        rows = {int(r["seed"]): r for r in csv.DictReader(fh) if r["study"] == name and r["revision"] == revision}
    return [rows[s] for s in sorted(rows)]


def fmt(v, spec: str = ".3f") -> str:
    return "–" if v in (None, "") else format(float(v), spec)


def table(name: str, rows: list[dict], head: str) -> str:
    """One line per seed (CSV rows: strings, '' for none) and the aggregate line."""
    out = [f"# demo_seeds: {name}\n", head, "",
           "| seed | RM acc | RM acc, chosen longer | gold π0 → best | best iter | gain [95% CI] | excludes 0 | word "
           "limit | keyword | on topic | real answer | chars | KL best | noise | wall s: process / loop | peak MiB |",
           "|" + "---|" * 16]  # fmt: skip
    pair = lambda r, k, spec=".3f": f"{fmt(r[k + '_pi0'], spec)} → {fmt(r[k + '_best'], spec)}"
    for row in rows:
        r = dict.fromkeys(FIGURES, "") | row  # a CSV written before a column was added
        gain = "{} [{}, {}]".format(*(fmt(r[k], "+.3f") for k in ("gold_gain", "gain_ci_lo", "gain_ci_hi")))
        cells = [r["seed"], fmt(r["rm_accuracy"]), fmt(r["rm_accuracy_chosen_longer"]), pair(r, "gold"),
                 r["best_iteration"], gain, {"1": "yes", "0": "no"}.get(r["gain_excludes_zero"], "–"),
                 *(pair(r, k) for k in PAIRED[:4]), pair(r, "length_chars", ".0f"), fmt(r["kl_best"], ".2f"),
                 fmt(r["gold_noise"]), f"{fmt(r['process_seconds'], '.0f')} / {fmt(r['wall_seconds'], '.0f')}",
                 fmt(r["peak_rss_mib"], ".0f")]  # fmt: skip
        out.append("| " + " | ".join(map(str, cells)) + " |")
    num = [{k: float(v) for k, v in r.items() if k in FIGURES and v not in (None, "")} for r in rows]
    gains = [v["gold_gain"] for v in num if "gold_gain" in v]
    above = sum(v.get("gain_ci_lo", 0) > 0 for v in num)
    need = {f"gold_{k}_{w}" for k in ("keyword", "on_topic") for w in ("pi0", "best")} | {"gold_noise"}
    held = [v for v in num if need <= v.keys()]
    kept = sum(all(v[f"gold_{k}_best"] >= v[f"gold_{k}_pi0"] - v["gold_noise"] for k in ("keyword", "on_topic"))
               for v in held)  # fmt: skip
    sd = fmt(statistics.stdev(gains) if len(gains) > 1 else None)
    spread = f"{statistics.fmean(gains):+.3f} ± {sd} (min {min(gains):+.3f}, max {max(gains):+.3f})" if gains else "–"
    out.append(f"| **all {len(rows)}** | | | | | **{spread}** | **{above} of {len(rows)} above 0** | | keyword and "
               f"on topic ≥ π0 − noise: **{kept} of {len(held)}** | | | | | | | |")  # fmt: skip
    taxed = [r for r in rows if r.get("tax_on_topic_pi0") not in (None, "")]
    if taxed:  # the alignment tax: what the training did to answers without an instruction (π0 → best)
        out += ["", "Alignment-tax panel (the test topics asked without their instruction), π0 → best:", "",
                "| seed | on topic | no repetition | real answer | words |", "|---|---|---|---|---|"]  # fmt: skip
        for r in taxed:
            cells = [pair(r, k) for k in TAX[:3]] + [pair(r, "tax_words", ".1f")]
            out.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def arguments(p: Parser) -> tuple[argparse.Namespace, str | None, list[str]]:
    p.add_argument("config", nargs="?", help="YAML config (default: the embedded demo config)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, passed to every run")
    p.add_argument("--seeds", type=int, required=True, help="how many seeds")
    p.add_argument("--first", type=int, default=0, help="the first seed (default 0)")
    p.add_argument("--root", type=Path, help="run directories go here (default: runs/demo_seeds/<name>)")
    p.add_argument("--name", help="the study's name (default: the config's stem and a hash of the overrides)")
    p.add_argument("--results", type=Path, default=HERE / "results", help="CSV and markdown go here")
    args = p.parse_intermixed_args()
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]  # the first override, not a config
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, not {args.seeds}")
    if config is not None and not Path(config).is_file():
        p.error(f"config file {config} does not exist")
    bad = [o for o in overrides if "=" not in o or o.startswith(("run.seed=", "run.out_dir="))]
    if bad:
        p.error(f"not a section.key=value override, or one set here per seed: {' '.join(bad)}")
    return args, config, overrides


def main() -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args, config, overrides = arguments(p)
    # -P: the current directory does not shadow the package that PYTHONPATH (or the install) gives the children
    probe = subprocess.run([sys.executable, "-P", "-c", PROBE], capture_output=True, text=True)
    if probe.returncode:
        sys.exit(f"demo_seeds: lite_rlhf does not import here: {probe.stderr.strip().splitlines()[-1]}")
    package, demo = probe.stdout.splitlines()[:2]
    config = str(Path(config).resolve()) if config else demo
    git = lambda *a: subprocess.run(["git", "-C", package, *a], capture_output=True, text=True).stdout.strip()
    dirty = "+dirty" if git("status", "-s", "-uno", ".") else ""  # the package's tracked files differ from HEAD
    revision = (git("rev-parse", "--short", "HEAD") or "unknown") + dirty
    digest = hashlib.sha1(" ".join(overrides).encode()).hexdigest()[:6]
    name = args.name or Path(config).stem + (f"-{digest}" if overrides else "")
    root = (args.root or HERE.parent / "runs" / "demo_seeds" / name).resolve()
    study = {"revision": revision, "config": config, "overrides": overrides}
    if read_json(root / "study.json") not in ({}, study):
        p.error(f"{root} holds a study of {read_json(root / 'study.json')}, not {study}: give another --name or --root")
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps(study, indent=1))
    args.results.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = args.results / "demo_seeds.csv", args.results / f"demo_seeds_{name}.md"
    head = f"`{' '.join([config, *overrides])}`; revision {revision}; {machine_description()}"
    for i, seed in enumerate(range(args.first, args.first + args.seeds), 1):
        run, at = root / f"seed_{seed}", f"[demo_seeds] seed {seed} ({i}/{args.seeds})"
        if any(int(r["seed"]) == seed for r in recorded_rows(csv_path, name, revision)):
            print(f"{at}: done before, its row is in {csv_path}", flush=True)
            continue
        measured = {}
        if (run / "summary.json").exists():
            print(f"{at}: finished before, reading {run}", flush=True)
        else:
            print(f"{at}: running -> {run}", flush=True)
            cmd = [sys.executable, "-P", "-m", "lite_rlhf.cli", "run", config, *overrides, f"run.seed={seed}",
                   f"run.out_dir={run}", "--quiet"]  # fmt: skip
            code, seconds, peak = run_seed(cmd, root / f"seed_{seed}.log")
            if code:
                tail = (root / f"seed_{seed}.log").read_text()[-3000:]
                print(f"{at}: failed (exit {code}): {' '.join(cmd)}\n{tail}", file=sys.stderr)
                md_path.write_text(table(name, recorded_rows(csv_path, name, revision), head))
                raise SystemExit(1)
            measured = {"process_seconds": round(seconds, 1), "peak_rss_mib": round(peak)}
        row = {"study": name, "seed": seed, "revision": revision, "cpu": machine_description(),
               "date": datetime.datetime.now().isoformat(timespec="seconds"), "overrides": " ".join(overrides),
               **seed_row(run), **measured}  # fmt: skip
        append_csv(csv_path, INFO + FIGURES, [row])
        gain = "{} [{}, {}]".format(*(fmt(row[k], "+.3f") for k in ("gold_gain", "gain_ci_lo", "gain_ci_hi")))
        took = f"{fmt(measured.get('process_seconds'), '.0f')} s (loop {fmt(row['wall_seconds'], '.0f')} s)"
        print(f"{at}: gain {gain}, {took}, peak {fmt(measured.get('peak_rss_mib'), '.0f')} MiB", flush=True)
    md = table(name, recorded_rows(csv_path, name, revision), head)
    md_path.write_text(md)
    print("\n" + md, end="")


if __name__ == "__main__":
    main()
