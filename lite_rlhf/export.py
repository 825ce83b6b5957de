"""`lite-rlhf export`: merge a policy adapter into full weights for deployment.

The merge happens on an unquantized copy of the base (in `model.dtype`, bf16 on CUDA / fp32 on CPU)
even when training used a 4-bit base: merging into NF4 weights would round the adapter away.

The output directory is written whole under a temporary name and renamed into place. An existing one is
replaced only when it is empty or holds nothing but an earlier export's files (`MARKER` lists them): a file
the user added to it, or any directory of theirs, is named and refused, and nothing is changed.
"""

from __future__ import annotations

import json
from pathlib import Path

from lite_rlhf.config import Config
from lite_rlhf.models import ModelNotFound, check_adapter
from lite_rlhf.report import merged_card
from lite_rlhf.runstate import write_dir

MARKER = ".lite-rlhf-export.json"  # in every exported directory: which adapter, on which base


def _stamp(path: Path) -> list[int]:
    """What tells an export's file from one edited since: its size and modification time (no hash: the weights
    are gigabytes)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _written(out: Path) -> dict[str, list | None] | None:
    """The files an earlier export wrote in `out` (relative path -> its stamp, None where the marker has none), the
    marker included, as its marker lists them; None for a marker from before the list."""
    try:
        files = json.loads((out / MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    listed = files.items() if isinstance(files, dict) else ((f, None) for f in files)
    return {MARKER: None, **{f: stamp for f, stamp in listed if isinstance(f, str)}}


def _foreign(out: Path, written: dict[str, list | None]) -> list[str]:
    """What in `out` is not an export's file as it wrote it: files, links and empty directories it did not write
    (as relative paths), and its files changed since (said so)."""
    found = []
    for path in sorted(out.rglob("*")):
        rel = str(path.relative_to(out))
        if not (path.is_symlink() or not path.is_dir() or not any(path.iterdir())):
            continue
        if rel not in written:
            found.append(rel)
        elif written[rel] is not None and (path.is_symlink() or _stamp(path) != written[rel]):
            found.append(f"{rel}' (changed since the export wrote it)")
    return found


def check_out(out: Path, ours: set[str] = frozenset()) -> None:
    """`out` may be written: absent, an empty directory, or an earlier export and nothing else, its files as it wrote
    them. `ours`: the files this export writes, taken for an earlier one's where its marker lists none."""
    if out.is_symlink() or out.is_file():
        raise ModelNotFound(f"--out '{out}' is a file; nothing was changed: give a directory to create")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / MARKER).is_file():
        raise ModelNotFound(f"--out '{out}' holds files that lite-rlhf export did not write; nothing was changed: "
                            "give a new or empty directory")  # fmt: skip
    written = _written(out)
    if written is None and not ours:  # an export from before the list: checked once this one's files are known
        return
    foreign = _foreign(out, written if written is not None else dict.fromkeys({MARKER, *ours}))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        first = foreign[0] if foreign[0].endswith(")") else f"{foreign[0]}'"
        raise ModelNotFound(f"--out '{out}' holds '{first}{more}, which lite-rlhf export did not write; nothing "
                            "was changed: move it away, or give a new or empty directory")  # fmt: skip


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
        files = {str(f.relative_to(tmp)): _stamp(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        check_out(out, set(files))  # again, now that this export's files are known
        marker = {"adapter": str(adapter), "base": str(base_dir), "files": files}
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")

    write_dir(out, fill)
    return out


def main_export(cfg: Config, adapter: str | None = None, out: str | None = None) -> int:
    root = Path(cfg.run.out_dir)
    adapter_dir = Path(adapter) if adapter else root / "best"
    out_dir = Path(out) if out else root / "merged"
    if not adapter and not adapter_dir.exists():
        raise ModelNotFound(f"run '{root}' has no best/ yet (it is made when the run's first iteration ends): run "
                            "`lite-rlhf run` on it until it has one, or name an adapter with --adapter DIR (e.g. "
                            f"{root}/iter_001/policy)")  # fmt: skip
    export_merged(cfg, adapter_dir, out_dir)
    print(f"lite-rlhf: merged {adapter_dir} into {out_dir} (loads with AutoModelForCausalLM.from_pretrained)")
    return 0
