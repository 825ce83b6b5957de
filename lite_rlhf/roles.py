"""One base model, five roles: policy, reference π0, reward model, preference model and PPO's value model
(design.md, idea 1).

The base weights are loaded once (fp32/bf16, or 4-bit NF4 through bitsandbytes for QLoRA) and wrapped
in a single peft model that holds the LoRA adapters:

- policy:    LoRA adapter "policy" (trainable);
- reference: the base with every adapter disabled, or the frozen adapter "sft" when `model.sft_adapter`
             is set. Then the policy starts as a copy of the sft adapter (not stacked on it) and the
             reference is "sft active", not "adapters disabled", which would give the raw base;
- reward:    LoRA adapter "reward" plus a scalar head `nn.Linear(hidden, 1)` kept outside peft;
- preference: LoRA adapter "preference" (added on demand: `add_preference`), whose next-token logits of
             two label tokens say which of two answers is better (`lite_rlhf/preference.py`);
- value:     LoRA adapter "value" plus its own scalar head (added on demand: `add_value`), read at every
             position: PPO's critic (`lite_rlhf/algorithms/ppo.py`).

Roles are switched explicitly and scoped: `with model.role("reference"): ...` restores the previous
role on exit. Log-probs go through the fused LM-head kernel (`lite_rlhf.kernels.linear_logprobs`), so
the `[tokens, vocab]` logits are never built. Sequences are right-padded; masks come from the caller
(SmolLM2's pad token is its end-of-turn token, so padding cannot be told from the ids).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lite_rlhf.batching import IGNORE, Batch, length_groups
from lite_rlhf.config import ALL_LINEAR, Config, ConfigError, parse_size
from lite_rlhf.families import PLAIN_LOGITS, LogitTransform, logit_transform, refusal
from lite_rlhf.kernels import linear_entropy, linear_logprobs
from lite_rlhf.models import load_tokenizer, nf4_config, resolve_dtype, resolve_model
from lite_rlhf.plan import checkpoint_floor, checkpoint_setting, choose_checkpointing, model_shape

ROLES = ("policy", "reference", "reward", "preference", "value")
TRAINED = ("policy", "reward", "preference", "value")  # the roles with trainable parameters
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
HEAD_FILE = "head.safetensors"
GIB = 1024**3
# What one more forward pass costs on CPU, in tokens' worth of compute: DPO micro-batches of 4 demo pairs forward +
# backward on SmolLM2-135M, 2 threads, split into 1, 2 and 4 passes: one extra pass cost 88 tokens' worth
# (benchmarks/bench_length_groups.py, results/bench_length_groups.md); a first, ad-hoc measurement gave 77.
FORWARD_OVERHEAD_TOKENS = 80


def available_ram() -> float:
    """Bytes of RAM Linux reports available (MemAvailable), else the free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def keep_nf4_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference (bnb 0.50, AVX512-BF16 CPUs).

    On the first forward in eval mode without grad (our reference role), `Linear4bit` converts its weight
    in place to a CPU inference layout: the double-quantized scales are rounded to bf16 (the base changes)
    and every later forward, training included, runs `gemv_4bit`, which has no autograd: gradients no
    longer flow through the base layers (silently wrong LoRA gradients). Measured on a tiny Llama: policy
    log-probs moved by ~1e-3 and LoRA gradients by 1.7 (max 32) after one reference pass.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`[B, H]`: each row's hidden state at its last position whose mask is 1 (right padding)."""
    mask = attention_mask.to(hidden.device).bool()
    positions = torch.arange(mask.shape[1], device=hidden.device)
    last = (positions * mask).argmax(-1)
    return hidden[torch.arange(len(last), device=hidden.device), last]


def lora_targets(decoder: nn.Module, wanted: tuple[str, ...]) -> tuple[list[str], str | None]:
    """The kinds of linear layer (module names' last part) of `decoder` that get LoRA under
    `lora.target_modules`, and a line saying which kinds are not adapted or which names match nothing (None when
    every kind is adapted). `all-linear` (peft's shorthand) is every one of them: on a Llama q/k/v/o and
    gate/up/down, on a packed family (Phi-3) qkv_proj and gate_up_proj. A list that matches none is an error."""
    kinds = sorted({name.rsplit(".", 1)[-1] for name, m in decoder.named_modules() if isinstance(m, nn.Linear)})
    if tuple(wanted) == (ALL_LINEAR,):
        return kinds, None
    names = {w.rsplit(".", 1)[-1] for w in wanted}
    adapted, missed = [k for k in kinds if k in names], sorted(names - set(kinds))
    if not adapted:
        raise ConfigError(f"config key 'lora.target_modules': {', '.join(wanted)} match no linear layer of this "
                          f"model (it has {', '.join(kinds)}); use {ALL_LINEAR}")  # fmt: skip
    left = [k for k in kinds if k not in names]
    if not left and not missed:
        return adapted, None
    return adapted, (f"lora.target_modules: LoRA on {', '.join(adapted)}; NOT on {', '.join(left) or '-'}"
                     + (f"; no such layer: {', '.join(missed)}" if missed else "")
                     + f" ({ALL_LINEAR} adapts every one)")  # fmt: skip


def label_logits(
    last: torch.Tensor, lm_head: torch.Tensor, labels: list[int], transform: LogitTransform = PLAIN_LOGITS
) -> torch.Tensor:
    """`[B, len(labels)]` fp32 logits of the label tokens from final hidden states `[B, H]`, with the model's
    logit transform (scale, soft-cap: elementwise, so the label rows alone give the model's values)."""
    return transform.apply(last.float() @ lm_head[labels].float().T)


class SharedModel:
    """The base model loaded once, with the policy / reference / reward roles on top of it."""

    def __init__(self, cfg: Config, device: str | torch.device | None = None, model_dir: str | Path | None = None):
        """Load `model_dir` (default: `resolve_model(cfg.model.name)`) on `device` (default: cuda if available)."""
        from peft import LoraConfig, PeftConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        mcfg = cfg.model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(mcfg.dtype, self.device)
        self.base_dir = Path(model_dir) if model_dir is not None else resolve_model(mcfg.name)
        self.has_sft = mcfg.sft_adapter is not None
        torch.manual_seed(cfg.run.seed)  # LoRA A matrices and the head are drawn at random

        self.tokenizer = load_tokenizer(self.base_dir)

        kwargs = {
            "dtype": self.dtype,
            "device_map": {"": self.device.index or 0} if self.device.type == "cuda" else "cpu",
        }
        if mcfg.quantization == "nf4":
            kwargs["quantization_config"] = nf4_config(self.dtype)
        if mcfg.attn_implementation != "auto":
            kwargs["attn_implementation"] = mcfg.attn_implementation
        base = AutoModelForCausalLM.from_pretrained(self.base_dir, use_safetensors=True, **kwargs)
        if mcfg.quantization == "nf4":
            keep_nf4_layout(base)
        why = refusal(base.config)
        if why:
            raise ConfigError(f"config key 'model.name': '{mcfg.name}': {why}")
        self.logit_transform = logit_transform(base.config)  # what the model does to h @ W.T; the kernels do it too
        base.config.use_cache = False

        # the adapted layer kinds (the run's log names them); a list that leaves some out is said here, once
        self.lora_modules, left_out = lora_targets(base.get_decoder(), cfg.lora.target_modules)
        if left_out:
            print(f"[lite-rlhf] warning: {left_out}", flush=True)
        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=self.lora_modules,
            task_type="CAUSAL_LM",
        )
        if self.has_sft:  # the policy must have the sft adapter's shape to start as its copy
            sft_dir = Path(mcfg.sft_adapter).expanduser()
            missing = [f for f in ADAPTER_FILES if not (sft_dir / f).is_file()]  # safetensors only, never .bin
            if missing:
                raise ConfigError(f"config key 'model.sft_adapter': '{sft_dir}' has no {missing[0]} (a peft adapter)")
            policy_cfg = copy.deepcopy(PeftConfig.from_pretrained(str(sft_dir)))
            policy_cfg.inference_mode = False
        else:
            policy_cfg = lora
        self.peft = get_peft_model(base, policy_cfg, adapter_name="policy")
        self.peft.add_adapter("reward", copy.deepcopy(lora))
        self._lora = lora  # the shape of every adapter trained here

        hidden = base.config.get_text_config().hidden_size
        self.head = nn.Linear(hidden, 1, dtype=torch.float32, device=self.device)
        self._head_std = getattr(base.config, "initializer_range", 0.02)
        nn.init.normal_(self.head.weight, std=self._head_std)
        nn.init.zeros_(self.head.bias)
        self.value_head: nn.Linear | None = None  # PPO's, with the value adapter (add_value)

        self._decoder = self.peft.get_base_model().get_decoder()
        self._cfg = cfg
        self.checkpointed_layers, self._checkpointing_on = 0, False
        fixed = checkpoint_setting(cfg, len(self._decoder.layers))
        if fixed:  # a number or every layer; auto is decided per stage (fit_checkpointing)
            self.set_checkpointing(fixed)
        # No compute on padding (`hidden_states`): packed rows where padding_free; on CPU, forward passes over
        # rows of similar length, a pass costing FORWARD_OVERHEAD_TOKENS besides its tokens. On CUDA without
        # flash-attention rows are not split (not measured on a GPU).
        self.pack_rows = self.padding_free
        self.forward_overhead = FORWARD_OVERHEAD_TOKENS if self.device.type == "cpu" else math.inf
        self._role = "policy"
        self._activate("policy")
        self.train(False)
        if self.has_sft:
            self.use_sft(sft_dir)

    # ------------------------------------------------------------------ roles

    def _activate(self, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role '{role}'; one of {ROLES}")
        tuner = self.peft.base_model
        if role == "reference" and not self.has_sft:
            tuner.disable_adapter_layers()
        else:
            tuner.enable_adapter_layers()
            self.peft.set_adapter("sft" if role == "reference" else role)
        # peft's switches also flip requires_grad; our rule does not depend on the active role:
        # policy, reward and preference adapters and the head train, the base and the sft adapter never do.
        for name, p in self.peft.named_parameters():
            p.requires_grad_(any(f".{r}." in name for r in TRAINED))
        self.head.requires_grad_(True)
        if self.value_head is not None:
            self.value_head.requires_grad_(True)
        self._role = role

    @contextlib.contextmanager
    def role(self, role: str) -> Iterator[SharedModel]:
        """Make `role` active inside the block; the reference role runs without grad and in eval mode."""
        previous, was_training = self._role, self.peft.training
        with contextlib.ExitStack() as stack:
            self._activate(role)
            stack.callback(self._activate, previous)
            if role == "reference":
                stack.enter_context(torch.no_grad())
                self.train(False)
                stack.callback(self.train, was_training)
            yield self

    @property
    def active_role(self) -> str:
        return self._role

    def train(self, mode: bool = True) -> None:
        self.peft.train(mode)
        self.head.train(mode)
        if self.value_head is not None:
            self.value_head.train(mode)

    def eval(self) -> None:
        self.train(False)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def parameters(self, role: str) -> list[nn.Parameter]:
        """The trainable parameters of `role` ('policy', 'preference' or 'reward', which includes the head)."""
        if role not in TRAINED:
            raise ValueError(f"role '{role}' has no trainable parameters; use one of {TRAINED}")
        params = [p for n, p in self.peft.named_parameters() if f".{role}." in n]
        head = {"reward": self.head, "value": self.value_head}.get(role)
        return params + list(head.parameters()) if head is not None else params

    # ------------------------------------------------------------------ memory

    def set_checkpointing(self, layers: int) -> None:
        """Recompute the activations of the first `layers` decoder layers in backward (0: none). Only a
        layer's input is kept for backward; numerics are unchanged (same operations, RNG state replayed)."""
        if layers and not self._checkpointing_on:  # once: the checkpoint function on every layer, then flags
            base = self.peft.get_base_model()
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self._checkpointing_on = True
        for i, block in enumerate(self._decoder.layers):
            block.gradient_checkpointing = i < layers
        self.checkpointed_layers = layers

    def memory_budget(self) -> tuple[float, str]:
        """Bytes a training stage may hold in all (weights included), and where that figure comes from:
        `model.memory_budget`, else what is held now plus free CUDA memory less a margin (5%, at least
        1 GiB), or plus 75% of the RAM Linux reports available."""
        if self._cfg.model.memory_budget:
            return parse_size(self._cfg.model.memory_budget), "model.memory_budget"
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            held = torch.cuda.memory_allocated(self.device)
            return held + free - max(GIB, 0.05 * total), "free GPU memory less a margin"
        held = sum(p.numel() * p.element_size() for p in self.peft.parameters()) + 4 * self.head.weight.numel()
        return held + 0.75 * available_ram(), "75% of available RAM"

    def fit_checkpointing(self, stage: str, tokens: int, *, quiet: bool) -> int:
        """Checkpoint the layers `model.gradient_checkpointing` asks for, for a stage whose longest
        micro-batch holds `tokens` tokens (rows x padded width); auto: the fewest layers whose estimated
        training peak (`lite_rlhf.plan.train_terms`) fits `memory_budget()`, at least
        `plan.checkpoint_floor` of them. Says the choice (unless
        quiet) and returns it."""
        shape = model_shape(str(self.base_dir))
        layers = checkpoint_setting(self._cfg, shape.layers)
        if layers is None:
            budget, source = self.memory_budget()
            cuda = self.device.type == "cuda"
            floor = checkpoint_floor(self._cfg, shape.layers, cuda=cuda)
            layers, peak = choose_checkpointing(self._cfg, shape, tokens, budget, cuda=cuda, at_least=floor)
            if not quiet:
                verdict = "within" if peak <= budget else "OVER"
                print(f"[lite-rlhf] {stage}: gradient checkpointing on {layers} of {shape.layers} layers; estimated "
                      f"peak {peak / GIB:.2f} GiB {verdict} the budget of {budget / GIB:.2f} GiB ({source}) for the "
                      f"longest micro-batch, {tokens:,} tokens"
                      + (f" (at least {floor} on CPU without model.memory_budget)" if floor else ""),
                      flush=True)  # fmt: skip
        self.set_checkpointing(layers)
        return layers

    # ------------------------------------------------------------------ forward passes

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.peft.get_base_model().get_output_embeddings().weight  # [V, H]

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states `[B, T, H]` of the active role (after the final norm; no logits) for right-padded
        rows, computed without work on padding where that pays: as one packed row where `pack_rows` (CUDA with
        flash-attention: variable-length attention; transformers reads the restarts of the position ids), else
        in forward passes over rows of similar length, each trimmed to its longest row (`batching.length_groups`;
        on CPU only). Rows come back in their order and width; positions past a row's length hold no meaningful
        values. The one forward of every trainer and scorer: DPO, the reference pass, KL, reward and preference
        scoring and training, SFT."""
        ids = input_ids.to(self.device)
        lengths = attention_mask.sum(1).tolist()
        if self.pack_rows:
            return self._packed_hidden(ids, lengths)
        mask, width = attention_mask.to(self.device), ids.shape[1]
        groups = length_groups(lengths, self.forward_overhead)  # one group when a pass costs more than padding
        if len(groups) == 1:
            groups = [list(range(len(lengths)))]  # one pass: the rows in their own order, nothing to put back
        parts = []
        for group in groups:
            rows, w = torch.tensor(group, device=self.device), max(lengths[i] for i in group)
            out = self._decoder(input_ids=ids[rows, :w], attention_mask=mask[rows, :w], use_cache=False)
            parts.append(nn.functional.pad(out.last_hidden_state, (0, 0, 0, width - w)))
        if len(parts) == 1:
            return parts[0]
        order = torch.tensor([i for group in groups for i in group], device=self.device)
        return torch.cat(parts)[torch.argsort(order)]

    def _packed_hidden(self, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """The rows' real tokens as one row with per-row position ids, the hidden states put back `[B, T, H]`."""
        packed = torch.cat([ids[b, :n] for b, n in enumerate(lengths)])[None]
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])[None]
        hidden = self._decoder(input_ids=packed, position_ids=positions, use_cache=False).last_hidden_state[0]
        width = ids.shape[1]
        return torch.stack(
            [nn.functional.pad(h, (0, 0, 0, width - n)) for h, n in zip(hidden.split(lengths), lengths, strict=True)]
        )

    @property
    def padding_free(self) -> bool:
        """Does packing save compute here? Flash-attention on CUDA runs packed rows as variable-length
        sequences; elsewhere a packed row gets a block-diagonal mask, which costs more attention than
        the padding it saves, so rows are grouped by length instead."""
        attn = self.peft.get_base_model().config._attn_implementation
        return self.device.type == "cuda" and attn == "flash_attention_2"

    def sequence_logps(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs of the response tokens under the active role, through the fused LM-head kernel:
        `(sum_logps [B] fp32, n_tokens [B])`. The one summed-log-prob path (DPO's reference pass, KL, tests);
        differentiable when grad is on (the reference role turns it off)."""
        return self.token_logps(batch).sum(dim=-1), (batch.targets != IGNORE).sum(dim=-1).to(self.device)

    def logit_inputs(self, hidden: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, float | None]:
        """`(hidden states, soft-cap)` for the fused kernels such that their `softcap(h @ W.T)` is the model's logits
        (its `logit_transform`) divided by `temperature`: the linear part (Granite's 1 / logits_scaling, the
        temperature) folded into the hidden states, as the LM head is linear; the soft-cap to the kernel."""
        multiplier, softcap = self.logit_transform.with_temperature(temperature)
        return (hidden * multiplier if multiplier != 1.0 else hidden), softcap

    def token_logps(self, batch: Batch, temperature: float = 1.0, *, entropy: bool = False):
        """Per-token log-probs `[B, T]` (fp32; 0 off the response tokens) of the active role with its logits
        (the model's own: scaled or soft-capped as its family does) divided by `temperature`, through the fused
        kernel: the policy-gradient path (GRPO, RLOO, PPO). Differentiable when grad is on. With `entropy`,
        (log-probs, the per-token entropy `[B, T]` of the same distribution, without gradient) from the same
        hidden states."""
        hidden, softcap = self.logit_inputs(self.hidden_states(batch.input_ids, batch.mask), temperature)  # [B, T, H]
        targets = batch.targets.to(self.device)
        logp = linear_logprobs(hidden, self.lm_head_weight, targets, ignore_index=IGNORE, softcap=softcap)
        if not entropy:
            return logp
        return logp, linear_entropy(hidden, self.lm_head_weight, targets != IGNORE, softcap=softcap)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards `[B]` (fp32): the head on the reward role's hidden state at the last non-padding token."""
        with self.role("reward"):
            hidden = self.hidden_states(input_ids, attention_mask)  # [B, T, H]
        return self.head(last_token(hidden, attention_mask).float()).squeeze(-1)

    def label_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: list[int]) -> torch.Tensor:
        """Next-token logits `[B, len(labels)]` (fp32) of the preference role after the last non-padding
        token, for the label tokens only (rows of the LM head: the full vocabulary is never computed)."""
        with self.role("preference"):
            hidden = self.hidden_states(input_ids, attention_mask)
        return label_logits(last_token(hidden, attention_mask), self.lm_head_weight, labels, self.logit_transform)

    def add_preference(self, seed: int) -> None:
        """Add the preference adapter (fresh LoRA drawn from `seed`, the global random state untouched,
        so a run with it draws the other roles exactly as one without)."""
        if "preference" in self.peft.peft_config:
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            self.peft.add_adapter("preference", copy.deepcopy(self._lora))
        self._activate(self._role)

    def add_value(self, seed: int) -> None:
        """Add the value adapter and its head (fresh: LoRA drawn from `seed`, the head as the reward head is drawn,
        the global random state untouched); `copy_reward_to_value` starts them from the reward model instead."""
        if self.value_head is not None:
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            self.peft.add_adapter("value", copy.deepcopy(self._lora))
            self.value_head = nn.Linear(self.head.in_features, 1, dtype=torch.float32, device=self.device)
            nn.init.normal_(self.value_head.weight, std=self._head_std)
            nn.init.zeros_(self.value_head.bias)
        self.train(self.peft.training)
        self._activate(self._role)

    def copy_reward_to_value(self) -> None:
        """The value adapter and head as copies of the reward model's (PPO's common start for the critic)."""
        self.copy_adapter("reward", "value")
        with torch.no_grad():
            self.value_head.load_state_dict(self.head.state_dict())

    def values(self, batch: Batch) -> torch.Tensor:
        """Per-position values `[B, T]` (fp32; 0 off the response tokens) of the value role: the value head on the
        hidden state that predicts each response token, V(s_t) before token t is sampled. Differentiable when
        grad is on."""
        with self.role("value"):
            hidden = self.hidden_states(batch.input_ids, batch.mask)  # [B, T, H]
        scored = (batch.targets != IGNORE).to(self.device)
        return self.value_head(hidden.float()).squeeze(-1) * scored

    # ------------------------------------------------------------------ adapters on disk

    def copy_adapter(self, src: str, dst: str) -> None:
        """Copy the LoRA weights of adapter `src` into adapter `dst` (same shapes)."""
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        state = get_peft_model_state_dict(self.peft, adapter_name=src)
        result = set_peft_model_state_dict(self.peft, state, adapter_name=dst)
        if result.unexpected_keys:
            raise ValueError(f"adapter '{src}' does not fit '{dst}': unexpected {result.unexpected_keys[:3]}")

    def save_adapter(self, name: str, directory: str | Path) -> Path:
        """Save adapter `name` in peft's format (loadable by `PeftModel.from_pretrained` and vLLM) into
        `directory`, a fresh directory the run state renames into place (`runstate.write_dir`)."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.peft.peft_config[name])
        config.base_model_name_or_path = str(self.base_dir)
        config.inference_mode = True
        if isinstance(config.target_modules, set | frozenset):  # a set's order changes from process to process
            config.target_modules = sorted(config.target_modules)
        state = get_peft_model_state_dict(self.peft, adapter_name=name)
        config.save_pretrained(str(directory))  # adapter_config.json
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in state.items()},
            str(directory / ADAPTER_FILES[1]),
            metadata={"format": "pt"},
        )
        return directory

    def load_adapter(self, name: str, directory: str | Path) -> None:
        """Load a peft adapter directory as adapter `name` (replacing its weights when it exists)."""
        from peft import PeftConfig
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / ADAPTER_FILES[1]).is_file():
            raise ConfigError(f"adapter directory '{directory}' has no {ADAPTER_FILES[1]} (a peft adapter)")
        new = PeftConfig.from_pretrained(str(directory))
        old = self.peft.peft_config.get(name)
        same_shape = old is not None and (new.r, set(new.target_modules)) == (old.r, set(old.target_modules))
        if same_shape and new.lora_alpha == old.lora_alpha:
            # In place: the parameters (and an optimizer holding them) stay the same objects.
            result = set_peft_model_state_dict(
                self.peft, load_file(str(directory / ADAPTER_FILES[1])), adapter_name=name
            )
            missing = [k for k in result.missing_keys if f".{name}." in k]
            if result.unexpected_keys or missing:
                raise ValueError(
                    f"adapter '{directory}' does not fit '{name}': {(result.unexpected_keys + missing)[:3]}"
                )
        else:
            if old is not None:
                self.peft.delete_adapter(name)
            was_training = self.peft.training
            self.peft.load_adapter(str(directory), adapter_name=name, is_trainable=name != "sft")
            self.train(was_training)
        self._activate(self._role)

    def use_sft(self, directory: str | Path) -> None:
        """Make a saved adapter π0: loaded frozen as "sft" (the reference role from now on) and copied into
        the policy, which starts from it (`model.sft_adapter`, or the run's own SFT stage)."""
        self.has_sft = True
        self.load_adapter("sft", directory)
        self.copy_adapter("sft", "policy")

    def save_reward(self, directory: str | Path) -> Path:
        """The reward adapter (peft format) plus the score head in `head.safetensors`, into a fresh `directory`."""
        return self._save_with_head("reward", self.head, directory)

    def _save_with_head(self, name: str, head: nn.Linear, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = self.save_adapter(name, directory)
        state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        save_file(state, str(directory / HEAD_FILE), metadata={"format": "pt"})
        return directory

    def _load_head(self, head: nn.Linear, directory: Path) -> None:
        from safetensors.torch import load_file

        with torch.no_grad():
            head.load_state_dict(load_file(str(directory / HEAD_FILE), device=str(self.device)))

    def save_value(self, directory: str | Path) -> Path:
        """The value adapter (peft format) plus its head in `head.safetensors`, into a fresh `directory`."""
        return self._save_with_head("value", self.value_head, directory)

    def load_value(self, directory: str | Path) -> None:
        self.load_adapter("value", directory)
        self._load_head(self.value_head, Path(directory))

    def load_reward(self, directory: str | Path) -> None:
        directory = Path(directory)
        if not (directory / HEAD_FILE).is_file():
            raise ConfigError(f"reward directory '{directory}' has no {HEAD_FILE} (train it with `lite-rlhf train-rm`)")
        self.load_adapter("reward", directory)
        self._load_head(self.head, directory)
