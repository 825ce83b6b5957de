"""`lite-rlhf export`: merge a policy adapter into full weights for deployment.

The merge happens on an unquantized copy of the base (in `model.dtype`, bf16 on CUDA / fp32 on CPU)
even when training used a 4-bit base: merging into NF4 weights would round the adapter away.
"""

from __future__ import annotations

from pathlib import Path

from lite_rlhf.config import Config
from lite_rlhf.runstate import write_dir


def export_merged(cfg: Config, adapter: Path, out: Path) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lite_rlhf.models import resolve_dtype, resolve_model

    missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (adapter / f).is_file()]
    if missing:  # safetensors only: never peft's fallback to a pickled .bin
        from lite_rlhf.data import DataError

        raise DataError(f"'{adapter}' is not an adapter directory (no {missing[0]})")
    base_dir = resolve_model(cfg.model.name)
    dtype = resolve_dtype(cfg.model.dtype, "cuda" if torch.cuda.is_available() else "cpu")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, use_safetensors=True)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    tok = AutoTokenizer.from_pretrained(base_dir)

    def fill(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    write_dir(out, fill)
    return out


def main_export(cfg: Config, adapter: str | None = None, out: str | None = None) -> int:
    root = Path(cfg.run.out_dir)
    adapter_dir = Path(adapter) if adapter else (root / "best").resolve()
    out_dir = Path(out) if out else root / "merged"
    export_merged(cfg, adapter_dir, out_dir)
    print(f"lite-rlhf: merged {adapter_dir} into {out_dir} (loads with AutoModelForCausalLM.from_pretrained)")
    return 0
