"""The model a comparison benchmark trains: ``--model`` and ``--dtype``, the same in bench_dpo_step.py,
bench_ppo_step.py and bench_pipeline.py.

By default they run the embedded SmolLM2-135M-Instruct in float32, as their committed 135M tables were made. To rerun
them where the weights dominate the process, point ``--model`` at a model directory (config.json, safetensors,
tokenizer; e.g. the random-weight Qwen2.5-1.5B that ``benchmarks/bench_scale.py`` builds) and give ``--dtype
bfloat16``. Every variant gets both, ours as config overrides (`config_overrides`), the anchors as the ``dtype`` of
their ``from_pretrained`` (`torch_dtype`) and TRL's ``bf16`` switch. The results of another model or dtype go to files
of their own (`results_stem`), so the 135M tables stay as they are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_DTYPE = "float32"
DTYPES = ("float32", "bfloat16")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a model directory (config.json, safetensors, tokenizer), or the embedded model's name "
                             f"(default: {DEFAULT_MODEL})")  # fmt: skip
    parser.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE,
                        help="weights and compute, for every variant (default: float32)")  # fmt: skip


def model_spec(args: argparse.Namespace) -> dict:
    """What the workers need: the model (a directory made absolute, since workers may run elsewhere) and the dtype."""
    from lite_rlhf.models import resolve_model

    model = args.model
    if model != DEFAULT_MODEL:
        model = str(Path(model).expanduser().resolve())
        resolve_model(model)  # a directory a model loads from: said now, before any worker starts
    return {"model": model, "dtype": args.dtype}


def config_overrides(spec: dict) -> list[str]:
    """Our config overrides for the model and dtype (engine included)."""
    return [f"model.name={spec['model']}", f"model.dtype={spec['dtype']}", f"generation.dtype={spec['dtype']}"]


def torch_dtype(spec: dict):
    import torch

    return getattr(torch, spec["dtype"])


def model_dir(spec: dict) -> Path:
    from lite_rlhf.models import resolve_model

    return resolve_model(spec["model"])


def parameters(spec: dict) -> int:
    """The base's parameters (linear layers and embeddings, a tied LM head once), from its config.json."""
    from lite_rlhf.plan import model_shape

    shape = model_shape(str(model_dir(spec)))
    return shape.linear_params + shape.embed_params


def describe_model(spec: dict) -> str:
    """'<model> (<params>, <dtype>)' for a report's header."""
    name = spec["model"] if spec["model"] == DEFAULT_MODEL else Path(spec["model"]).name
    return f"{name} ({parameters(spec) / 1e9:.2f}B parameters, {spec['dtype']})"


def results_stem(stem: str, spec: dict) -> str:
    """`stem` for the embedded model in float32; `<stem>_<model dir name>[_<dtype>]` otherwise (the dtype named where
    it is not float32), so that other models' figures never overwrite the 135M tables."""
    if spec["model"] == DEFAULT_MODEL and spec["dtype"] == DEFAULT_DTYPE:
        return stem
    parts = [stem] + ([Path(spec["model"]).name] if spec["model"] != DEFAULT_MODEL else [])
    return "_".join(parts + ([spec["dtype"]] if spec["dtype"] != DEFAULT_DTYPE else []))
