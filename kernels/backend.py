"""Which implementation of the kernels runs, and the one place that imports Triton.

Three paths compute the same numbers:

- ``"triton"``: the Triton kernels, for CUDA tensors.
- ``"triton-interpreter"``: the same Triton kernels run by Triton's interpreter on CPU tensors, when
  ``TRITON_INTERPRET=1`` is set. It is ~100x slower than torch and exists for the tests.
- ``"chunked-torch"``: a chunked pure-torch implementation with the same memory behaviour, for CPU
  (and any other device, or when Triton cannot be imported).

Triton is imported lazily, here and only here (the ``*_triton.py`` modules import it at their top
and are loaded through :func:`load_triton_module`), so ``import lite_rlhf.kernels`` works without
Triton and does not pay for importing it on CPU. ``TRITON_INTERPRET`` is read by ``triton.jit``
when a kernel module is first loaded, so it must be set before the first Triton-path call
(in practice: in the environment of the process).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Literal

import torch

KernelPath = Literal["triton", "triton-interpreter", "chunked-torch"]


@functools.cache
def _triton_error() -> str | None:
    """None when Triton imports, else why not (any exception: a broken install must not break us)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # noqa: BLE001 - ImportError, but also driver/compiler errors at import
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_available() -> bool:
    """Whether ``import triton`` works in this environment."""
    return _triton_error() is None


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (checked the way Triton checks it)."""
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("", "0", "false", "off", "no"):
        return False  # decided without importing triton
    if not triton_available():
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


def kernel_path(device: torch.device | str | None = None) -> KernelPath:
    """The implementation that :func:`linear_logprobs` and :func:`fused_dpo_loss` use for tensors on ``device``.

    ``device`` defaults to CUDA when it is available, else CPU (what ``lite-rlhf doctor`` prints).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cpu":
        return "triton-interpreter" if interpreter_requested() else "chunked-torch"
    if device.type == "cuda" and triton_available():
        return "triton-interpreter" if interpreter_requested() else "triton"
    return "chunked-torch"


def load_triton_module(name: str) -> ModuleType:
    """Import ``lite_rlhf.kernels.<name>`` (a module that needs Triton), with an error that says what to do."""
    error = _triton_error()
    if error is not None:
        raise RuntimeError(f"the Triton kernels need the `triton` package, which failed to import ({error})")
    module = importlib.import_module(f"{__package__}.{name}")
    jitted_for_interpreter = module.INTERPRETED
    if jitted_for_interpreter != interpreter_requested():
        raise RuntimeError(
            f"{module.__name__} was first loaded with TRITON_INTERPRET "
            f"{'set' if jitted_for_interpreter else 'unset'} and it is now "
            f"{'unset' if jitted_for_interpreter else 'set'}: set TRITON_INTERPRET in the environment "
            "before the process starts, not in the middle of it"
        )
    return module
