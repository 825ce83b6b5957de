"""report.md and PNG plots from a run directory, rewritten after every iteration."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lite_rlhf.data import HUB_NAME
from lite_rlhf.runstate import Content

# (column, header, format)
_COLUMNS = [
    ("iteration", "iter", "{:d}"),
    ("pairs_kept", "pairs", "{:d}"),
    ("pair_margin", "pair margin", "{:.2f}"),
    ("winners_kept", "winners", "{:d}"),
    ("winner_reward", "winner reward", "{:.2f}"),
    ("rollouts_kept", "answers trained", "{:d}"),
    ("rollout_reward", "sample reward", "{:.3f}"),
    ("rollout_tokens", "sample tokens", "{:.1f}"),
    ("rollout_entropy", "entropy/token", "{:.3f}"),
    ("signal_share", "groups with signal", "{:.2f}"),
    ("rollout_reward_normalized", "normalised reward", "{:.3f}"),
    ("clip_fraction", "clip fraction", "{:.3f}"),
    ("value_loss", "value loss", "{:.4f}"),
    ("explained_variance", "explained variance", "{:.3f}"),
    ("update_kl", "KL to π0 (update)", "{:.4f}"),
    ("forwards_per_prompt", "forwards/prompt", "{:.1f}"),
    ("engine_logprob_gap", "engine gap/token", "{:.2g}"),
    ("comparisons_per_prompt", "comparisons/prompt", "{:.1f}"),
    ("val_reward", "val reward", "{:.3f}"),
    ("val_win_rate", "val win vs π0", "{:.2f}"),
    ("test_reward", "test reward", "{:.3f}"),
    ("win_rate", "win vs π0", "{:.2f}"),
    ("kl", "KL(π‖π0)", "{:.2f}"),
    ("length_tokens", "tokens", "{:.1f}"),
    ("length_chars", "chars", "{:.0f}"),
    ("gold", "gold", "{:.3f}"),
    ("gold_max_words", "gold: word limit", "{:.3f}"),
    ("gold_keyword", "gold: keyword", "{:.3f}"),
    ("gold_instruction", "instruction ok", "{:.3f}"),
    ("gold_no_repetition", "no repetition", "{:.3f}"),
    ("gold_on_topic", "on topic", "{:.3f}"),
    ("tax_words", "tax: words", "{:.1f}"),
    ("tax_no_repetition", "tax: no rep.", "{:.2f}"),
    ("tax_on_topic", "tax: on topic", "{:.2f}"),
    ("diverged", "diverged (never best)", "{}"),
]

_PLOTS = [("val_reward", "test_reward"), ("gold",), ("length_tokens",), ("kl",), ("win_rate",)]


def eval_rows(root: Path) -> list[dict]:
    """One row per evaluated iteration, merged with that iteration's pair (or RAFT winner, or GRPO/RLOO rollout)
    counts, the engine's log-prob gap on its samples, and the means over its policy-gradient steps."""
    rows = []
    for it in sorted(root.glob("iter_*/eval.json")):
        rows.append(json.loads(it.read_text()))
    pairs: dict[int, dict] = {}
    steps: dict[int, list[dict]] = {}
    metrics = root / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("stage") in ("samples", "pairs", "winners", "scores", "rollouts"):
                pairs.setdefault(rec["iteration"], {}).update(rec)
            elif rec.get("stage") in ("grpo", "rloo", "ppo"):
                steps.setdefault(rec["iteration"], []).append(rec)
    for row in rows:
        found = pairs.get(row["iteration"], {})
        shown = ("pair", "winner", "rollout", "signal", "dropped", "forwards", "comparisons", "engine_logprob_gap")
        row.update({k: v for k, v in found.items() if k.startswith(shown)})
        taken = steps.get(row["iteration"], [])
        parts = {part: [r for r in taken if r.get("part", "policy") == part] for part in ("policy", "value")}
        if policy := parts["policy"]:
            row["clip_fraction"] = sum(r["clip_fraction"] for r in policy) / len(policy)
            row["update_kl"] = sum(r["kl"] for r in policy) / len(policy)
        if value := parts["value"]:  # PPO's value steps, and the explained variance of the values before them
            row["value_loss"] = sum(r["value_loss"] for r in value) / len(value)
            row["explained_variance"] = next(r["explained_variance"] for r in taken if r.get("part") == "advantages")
    return rows


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def table(rows: list[dict]) -> str:
    shown = lambda key, r: r.get(key) if key == "diverged" else key in r  # diverged: only when one did
    functions = sorted({k for r in rows for k in r if k.startswith("fn_")})  # eval.functions, in name order
    columns = _COLUMNS[:-1] + [(k, k.replace("fn_", "fn: ", 1), "{:.3f}") for k in functions] + _COLUMNS[-1:]
    cols = [c for c in columns if any(shown(c[0], r) for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, k, f) for k, _, f in cols) + " |")
    return "\n".join(lines)


def report_files(root: Path) -> dict[Path, Content]:
    """report.md and plots/ of a run directory, from what its stages committed (for `RunDir.commit`)."""
    root = Path(root)
    rows = eval_rows(root)
    best = (root / "best").resolve().parent.name if (root / "best").exists() else "–"
    by = "validation win rate against π0" if any("val_win_rate" in r for r in rows) else "validation reward"
    extra = root / "summary.json"
    summary = json.loads(extra.read_text()) if extra.exists() else {}
    parts = [
        f"# lite-rlhf run: {root.name}",
        "",
        f"Best iteration (by {by}): `{best}`. Iteration 0 is π0.",
        "",
        table(rows),
        "",
    ]
    if summary:
        parts += ["## Summary", "", "```json", json.dumps(summary, indent=2), "```", ""]
    plots = [keys for keys in _PLOTS if rows and any(k in r for r in rows for k in keys)]
    parts += [f"![{keys[0]}](plots/{keys[0]}.png)" for keys in plots]
    files: dict[Path, Content] = {root / "report.md": "\n".join(parts) + "\n"}
    if summary and (root / "best").exists():  # the run's end: the chosen adapter gets its card
        files[root / os.readlink(root / "best") / "README.md"] = model_card(root, rows, by)
    if plots:
        files[root / "plots"] = lambda tmp: _plots(tmp, rows, plots)
    return files


# the embedded model is SmolLM2-135M-Instruct, dequantized from a Q4_1 GGUF (lite_rlhf/models.py)
_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def model_card(root: Path, rows: list[dict], chosen_by: str) -> str:
    """The chosen adapter's README.md in the Hugging Face model-card format: base model, algorithm, data,
    iterations, the evaluation table and the command that made it, all read from the run directory."""
    import yaml

    cfg = yaml.safe_load((root / "config.yaml").read_text())
    base, algorithm = cfg["model"]["name"], cfg["loop"]["algorithm"]
    hub_base = _HUB_IDS.get(base, base if HUB_NAME.fullmatch(base) and not Path(base).exists() else None)
    sources = {k: v for k, v in cfg["data"].items() if k in _DATA_KEYS and v is not None}
    hub_sets = sorted({name for v in sources.values() if HUB_NAME.fullmatch(name := v.split(":")[0])
                       and not Path(name).exists()})  # fmt: skip
    meta = {"library_name": "peft", "pipeline_tag": "text-generation",
            "tags": ["lite-rlhf", algorithm, "lora", "rlhf"]}  # fmt: skip
    if hub_base:
        meta = {"base_model": hub_base} | meta
    if hub_sets:
        meta["datasets"] = hub_sets
    best = (root / "best").resolve().parent.name
    oracle = "a reward model" if cfg["reward"]["kind"] == "bt" else "a pairwise preference model"
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {root.name}: a LoRA policy trained by lite-rlhf", "",
        f"Online iterative {algorithm.upper()} on `{base}`"
        + (" (SmolLM2-135M-Instruct dequantized from a Q4_1 GGUF)" if base in _HUB_IDS else "")
        + f": {cfg['loop']['iterations']} iterations, {cfg['generation']['n']} answers per prompt ranked by {oracle}; "
        f"this adapter is `{best}`, chosen by {chosen_by}. LoRA rank {cfg['lora']['r']}, alpha {cfg['lora']['alpha']}, "
        f"on {adapted_modules(root / 'best')}.",
        "", "```python", "from peft import AutoPeftModelForCausalLM",
        'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/directory")', "```", "",
        "## Data", "", "| key | source |", "|---|---|",
        *(f"| data.{k} | `{v}` |" for k, v in sources.items()), "",
        "## Evaluation", "", "Iteration 0 is the starting policy π0.", "", table(rows), "",
        "## How it was made", "", "With the run directory's `config.yaml` (every setting, resolved):", "",
        "```bash", "lite-rlhf run config.yaml", "```", "",
    ]  # fmt: skip
    return "\n".join(lines)


def adapted_modules(adapter: Path) -> str:
    """The linear layers a saved adapter holds LoRA weights for, from its adapter_config.json."""
    targets = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))["target_modules"]
    return ", ".join(sorted(targets)) if isinstance(targets, list) else str(targets)


def merged_card(adapter: Path, base: str) -> str:
    """export's README.md: the adapter's card (or a short one) for the merged weights, which load without peft."""
    card = adapter / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else (
        "---\nlibrary_name: peft\npipeline_tag: text-generation\ntags:\n- lite-rlhf\n---\n\n"
        f"# {adapter.name}: a LoRA policy trained by lite-rlhf\n\nLoRA on {adapted_modules(adapter)}.\n\n"
        "```python\nfrom peft import AutoPeftModelForCausalLM\n"
        'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/directory")\n```\n'
    )  # fmt: skip
    text = text.replace("library_name: peft", "library_name: transformers", 1)
    text = text.replace("a LoRA policy trained by lite-rlhf", "a policy trained by lite-rlhf (LoRA, merged)", 1)
    text = text.replace("from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM",
                        "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM", 1)  # fmt: skip
    head, sep, rest = text.partition("\n# ")
    title, _, body = rest.partition("\n")
    merged = f"\nMerged: the adapter `{adapter}` added into the weights of `{base}` by `lite-rlhf export`.\n"
    return head + sep + title + "\n" + merged + body


_DATA_KEYS = ("prompts", "val_prompts", "test_prompts", "preferences", "eval_preferences", "offline_pairs", "sft")


def _plots(directory: Path, rows: list[dict], plots: list[tuple[str, ...]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for keys in plots:
        fig, ax = plt.subplots(figsize=(4, 3))
        for k in keys:
            pts = [(r["iteration"], r[k]) for r in rows if r.get(k) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
        ax.set_xlabel("iteration")
        ax.set_title(" / ".join(keys))
        if len(keys) > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(directory / f"{keys[0]}.png", dpi=80)
        plt.close(fig)
