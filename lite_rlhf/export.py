"""`lite-rlhf export`: merge a policy adapter into full weights for deployment.

The merge happens on an unquantized copy of the base (in `model.dtype`, bf16 on CUDA / fp32 on CPU)
even when training used a 4-bit base: merging into NF4 weights would round the adapter away.

The output directory is written whole under a temporary name and renamed into place. An existing one is
replaced only when it is an earlier export (it holds `MARKER`) or empty: anything else is the user's and
is refused before the model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from lite_rlhf.config import Config
from lite_rlhf.models import ModelNotFound, check_adapter
from lite_rlhf.report import merged_card
from lite_rlhf.runstate import write_dir

MARKER = ".lite-rlhf-export.json"  # in every exported directory: which adapter, on which base


def check_out(out: Path) -> None:
    """`out` may be written: absent, an empty directory, or an earlier export."""
    if out.is_symlink() or out.is_file():
        raise ModelNotFound(f"--out '{out}' is a file; nothing was changed: give a directory to create")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ModelNotFound(f"--out '{out}' holds files that lite-rlhf export did not write; nothing was changed: "
                            "give a new or empty directory")  # fmt: skip


def export_merged(cfg: Config, adapter: Path, out: Path) -> Path:
    adapter = check_adapter(adapter)
    check_out(out)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lite_rlhf.models import resolve_dtype, resolve_model

    base_dir = resolve_model(cfg.model.name)
    dtype = resolve_dtype(cfg.model.dtype, "cuda" if torch.cuda.is_available() else "cpu")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, use_safetensors=True)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    tok = AutoTokenizer.from_pretrained(base_dir)

    def fill(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(merged_card(adapter, cfg.model.name), encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps({"adapter": str(adapter), "base": str(base_dir)}) + "\n")

    write_dir(out, fill)
    return out


def main_export(cfg: Config, adapter: str | None = None, out: str | None = None) -> int:
    root = Path(cfg.run.out_dir)
    adapter_dir = Path(adapter) if adapter else root / "best"
    out_dir = Path(out) if out else root / "merged"
    export_merged(cfg, adapter_dir, out_dir)
    print(f"lite-rlhf: merged {adapter_dir} into {out_dir} (loads with AutoModelForCausalLM.from_pretrained)")
    return 0
