"""Peak-memory measurement on CPU for the benchmarks: one variant per fresh process.

Why a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536`` (docs/cpu-stack.md, "Measuring memory on
CPU"): glibc keeps freed chunks in its heap, so in a long-lived process a chunked run looks as big as
a naive one, and ``ru_maxrss`` never goes down. With the threshold at 64 KiB every tensor buffer is its
own mmap, returned to the OS when freed, and a new process starts from a clean high-water mark.

Usage, from a benchmark script::

    # parent: run `python <script> --worker '<json spec>'` and read the JSON it prints last
    result = run_worker(Path(__file__), {"variant": "naive", ...})

    # worker: build the inputs, then
    with PeakMeter() as meter:
        run_forward_backward()
    print(json.dumps({"extra_peak_mib": meter.extra_mib, ...}))

``PeakMeter.extra_mib`` is the peak resident memory reached inside the ``with`` block above the
resident memory at its start (the inputs, the imports): it counts every temporary, the outputs and the
gradients the block creates.

Which peak counter. ``ru_maxrss`` of a process started by ``subprocess`` begins at the *parent's* peak
(Python spawns with vfork/exec, and exec folds the old address space's high-water mark into the
process's ``maxrss``): a parent that once held 300 MiB gives every child ``ru_maxrss >= 300 MiB``
(measured). So the peak is read from ``VmHWM`` in ``/proc/self/status``, the high-water mark of this
process's own address space, first reset to the current RSS (``5 > /proc/self/clear_refs``, Linux >= 4.0)
so that temporaries made while building the inputs do not hide part of the block's peak. Where that
reset or ``VmHWM`` is unavailable, ``ru_maxrss`` before/after is used and ``hidden_slack_mib`` says how
much of the block's peak it could hide.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

MMAP_THRESHOLD = "65536"


def _status_mib(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in MiB, or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mib() -> float:
    """Resident memory now (VmRSS), in MiB."""
    rss = _status_mib("VmRSS")
    if rss is None:
        raise RuntimeError("no VmRSS in /proc/self/status: these measurements need Linux")
    return rss


def peak_mib() -> float:
    """VmHWM of this process (peak resident memory since the last `reset_peak`), in MiB."""
    hwm = _status_mib("VmHWM")
    if hwm is None:
        raise RuntimeError("no VmHWM in /proc/self/status: these measurements need Linux")
    return hwm


def append_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Append `rows` to the CSV at `path` (keys outside `fields` are dropped); a header when it is new. When `fields`
    names columns the file's header lacks (a script that gained a figure), the file is first rewritten under the
    wider header, its earlier rows blank in the new columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = list(fields)
    if path.exists():
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            old, kept = reader.fieldnames or [], list(reader)
        header = old + [f for f in fields if f not in old]
        if header != old:
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("w", newline="") as fh:
                out = csv.DictWriter(fh, fieldnames=header, restval="")
                out.writeheader()
                out.writerows(kept)
            os.replace(tmp, path)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        out = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore", restval="")
        if new:
            out.writeheader()
        out.writerows(rows)


def maxrss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Reset the kernel's high-water mark to the current RSS (Linux >= 4.0: ``5 > /proc/self/clear_refs``).

    Without it, a temporary made while building the inputs would hide up to its size of the
    measured block's peak. Returns False where the kernel refuses.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class PeakMeter:
    """``with PeakMeter() as m: ...`` then ``m.extra_mib``: peak RSS in the block above RSS at its start."""

    def __enter__(self) -> PeakMeter:
        self.reset_ok = reset_peak()
        self.rss_before = current_rss_mib()
        self.maxrss_before = maxrss_mib()
        self.use_hwm = self.reset_ok and _status_mib("VmHWM") is not None
        # With ru_maxrss, a high-water mark above the current RSS hides that much of the block's peak.
        self.hidden_slack_mib = 0.0 if self.use_hwm else max(0.0, self.maxrss_before - self.rss_before)
        return self

    def __exit__(self, *exc) -> None:
        self.maxrss_after = maxrss_mib()
        peak = _status_mib("VmHWM") if self.use_hwm else self.maxrss_after
        self.extra_mib = peak - self.rss_before


def run_worker(
    script: Path,
    spec: dict,
    *,
    timeout: float = 3600.0,
    extra_env: dict | None = None,
    on_start=None,
    live_stderr: bool = False,
) -> dict:
    """Run ``python script --worker <json spec>`` in a fresh process with the mmap threshold set.

    The worker must print one JSON object as the last line of its stdout; it is returned as a dict.
    Raises RuntimeError with the worker's output when it fails. `on_start(process)` is called once it runs (a
    watcher may kill it); `live_stderr` passes its stderr through (progress of long workers) instead of keeping it
    for the error.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, **(extra_env or {}))
    env.pop("TRITON_INTERPRET", None)  # a CPU benchmark of the interpreter would measure nothing useful
    cmd = [sys.executable, str(script), "--worker", json.dumps(spec)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=None if live_stderr else subprocess.PIPE,
                            text=True)  # fmt: skip
    if on_start is not None:
        on_start(proc)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise RuntimeError(f"benchmark worker ran past {timeout:.0f} s: {' '.join(cmd)}") from None
    lines = stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"benchmark worker failed (exit {proc.returncode}): {' '.join(cmd)}\n{stdout[-4000:]}\n"
            f"{(stderr or '')[-4000:]}"
        )
    return json.loads(lines[-1])


def machine_description() -> str:
    """'<cpu model>, <n> cores' from /proc/cpuinfo."""
    model = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


BENCHMARKED = ("kernels", "benchmarks", ":(exclude)benchmarks/results")  # the code a benchmark's figures depend on


def git_revision(cwd: Path) -> str:
    """Short git revision of the working tree, '+dirty' when benchmarked files differ from it (the results they
    write do not count)."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *BENCHMARKED],
            cwd=cwd,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def step_bench_main(
    script: Path, name: str, variants: tuple[str, ...], fields: list[str], worker, report, models: bool = False
) -> None:
    """``main()`` of the one-update benchmarks (bench_grpo_step.py, bench_ppo_step.py): the same arguments, each
    variant in a fresh worker process (`run_worker`), the rows appended to RESULTS/<name>.csv and `report(rows,
    args)` written to RESULTS/<name>.md and printed. ``--worker`` runs `worker(spec)` in the child. `models`: the
    script takes ``--model`` and ``--dtype`` (benchmarks/_model.py), passed in every worker's spec as "model" and
    "dtype"; another model or dtype than the default writes RESULTS/<name>_<model>[_<dtype>].{csv,md}."""
    ap = argparse.ArgumentParser(description=(sys.modules["__main__"].__doc__ or name).split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--answers", type=int, default=8, help="answers per step (two prompts, half each)")
    ap.add_argument("--length", type=int, default=128, help="tokens per answer")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per variant (at least 2)")
    ap.add_argument("--variants", default=",".join(variants), help=f"comma-separated, of {', '.join(variants)}")
    ap.add_argument("--results", type=Path, default=script.parent / "results", help="CSV and markdown go here")
    if models:
        from _model import add_model_args

        add_model_args(ap)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if unknown := [v for v in args.variants.split(",") if v not in variants]:
        ap.error(f"unknown variant {', '.join(unknown)}; valid: {', '.join(variants)}")
    import tempfile

    model = {}
    if models:
        from _model import model_spec, results_stem

        model = model_spec(args)
        name = results_stem(name, model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            spec = {"variant": variant, "answers": args.answers, "length": args.length, "steps": args.steps, "tmp": tmp,
                    **model}  # fmt: skip
            row = run_worker(script, spec) | {"revision": git_revision(script.parent.parent),
                                              "machine": machine_description()}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.results.mkdir(parents=True, exist_ok=True)
    append_csv(args.results / f"{name}.csv", fields, rows)
    text = report(rows, args)
    (args.results / f"{name}.md").write_text(text)
    print(text)
