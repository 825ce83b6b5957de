"""What a model family means to this code: the one home of family quirks.

transformers gives each family its own config class and modeling file; the quirk is a config flag
(`final_logit_softcapping`, `logits_scaling`, `tie_word_embeddings`). Everything here is read from a model's
config, never from a `model_type` branch elsewhere:

- `logit_transform(config)`: what the model does to `h @ W.T` before the softmax. The fused log-prob kernels
  compute `h @ W.T` from the final hidden states, so they must apply the same transform: a scale (Granite
  divides by `logits_scaling`, Cohere multiplies by `logit_scale`), then soft-capping `c * tanh(z / c)`
  (Gemma 2's `final_logit_softcapping`).
- `refusal(config)`: what the code cannot do for a model, one line naming the family and the config key.
- `TINY`: the families the tests build tiny random models of (`models.make_tiny_model(family=...)`), each
  with the feature flags that make it that family.

Adding a family: a row in `TINY` (its config class and flags), a key in `logit_transform` if it transforms its
logits in a new way, and it runs through tests/test_families.py.
"""

from __future__ import annotations

from dataclasses import dataclass

# Linear layers a family packs into one (what cannot be read from its config): model_type -> packed layer -> the
# layers it holds, in row order. vLLM packs q/k/v and gate/up of every family this way; these are packed on disk.
PACKED: dict[str, dict[str, tuple[str, ...]]] = {
    "phi3": {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
}

# Logit scales by config key: the families (model_type prefixes) whose modeling file applies it as written here,
# and the power of the value that multiplies the logits (Granite divides by logits_scaling, Cohere multiplies by
# logit_scale). The same key in another family may mean something else (HyperCLOVA X multiplies by
# logits_scaling): refused there, as is every key of `REFUSED_LOGIT_KEYS`.
LOGIT_SCALES = {"logits_scaling": (("granite",), -1), "logit_scale": (("cohere",), 1)}
REFUSED_LOGIT_KEYS = ("lm_head_multiplier", "output_multiplier")  # Falcon-H1's, MuseGlimmer's: not applied here


@dataclass(frozen=True)
class LogitTransform:
    """`logits = softcap(scale * (h @ W.T))`, with `softcap(z) = c * tanh(z / c)` when `softcap` is set."""

    scale: float = 1.0
    softcap: float | None = None

    def with_temperature(self, temperature: float) -> tuple[float, float | None]:
        """`(hidden multiplier, softcap)` such that the kernel's `softcap(h' @ W.T)` with `h' = h * multiplier`
        equals these logits divided by `temperature` (as vLLM's sampler divides the model's final logits).
        The scale and the temperature are linear, so they fold into the hidden states; under a cap,
        `c * tanh(z / c) / T = (c / T) * tanh((z / T) / (c / T))`: the cap becomes `c / T`."""
        return self.scale / temperature, (None if self.softcap is None else self.softcap / temperature)

    def apply(self, logits):
        """The transform on plain logits `h @ W.T` (any shape): the reference and the label-token path."""
        import torch

        logits = logits * self.scale if self.scale != 1.0 else logits
        return self.softcap * torch.tanh(logits / self.softcap) if self.softcap is not None else logits


PLAIN_LOGITS = LogitTransform()  # h @ W.T as it is (Llama, Qwen, Mistral, Phi-3, Gemma 3)


def family_name(config) -> str:
    return getattr(config, "model_type", None) or type(config).__name__


def _set(config, key: str):
    """`config.key` when it changes the logits (present, not None, not 1), else None."""
    value = getattr(config, key, None)
    return None if value is None or value == 1 else value


def logit_transform(config) -> LogitTransform:
    """The transform `config`'s model applies to its LM head's output (transformers' modeling files:
    Granite `logits / logits_scaling`, Cohere `logits * logit_scale`, Gemma 2 `c * tanh(logits / c)` with
    `c = final_logit_softcapping`). A model `refusal` turns away may get a wrong one: call that first."""
    config = config.get_text_config()
    scale = 1.0
    for key, (_, power) in LOGIT_SCALES.items():
        if _set(config, key) is not None:
            scale *= float(getattr(config, key)) ** power
    cap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(scale=scale, softcap=float(cap) if cap else None)


def refusal(config) -> str | None:
    """Why this code cannot train a model of `config`'s family, as one line naming the family and the config key,
    or None when it can."""
    text = config.get_text_config()
    family = family_name(text)
    for key in (*LOGIT_SCALES, *REFUSED_LOGIT_KEYS):
        value = _set(text, key)
        if value is not None and not (key in LOGIT_SCALES and family.startswith(LOGIT_SCALES[key][0])):
            return (
                f"model family '{family}' transforms its logits with {key}={value}, which the log-prob kernels "
                "do not apply (lite_rlhf/families.py lists the transforms they do)"
            )
    return None


# --------------------------------------------------------------------------- tiny models of each family

# Sliding window of the tiny models that have one: shorter than a prompt with its chat template, so it acts.
TINY_WINDOW = 64

# The tiny models' LM head (the embeddings, when tied) times this: logits of std ~4 instead of ~0.25 (random
# weights of std 0.02 over 128 dimensions), so that Gemma 2's cap at 30 bends them (by ~1% at 5) and a test that
# leaves the cap out fails.
TINY_LOGIT_GAIN = 16.0

# family -> (transformers config class, the flags that make it that family). Sizes (hidden, heads, layers,
# vocab, special ids) come from `models.make_tiny_model`; `head_dim` is always hidden // heads.
TINY: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "llama3": (
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            "tie_word_embeddings": False,
        },
    ),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),  # q/k/v biases: always, in the modeling file
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True}),  # q/k RMSNorm: always, in the modeling file
    "mistral": ("MistralConfig", {"sliding_window": TINY_WINDOW}),
    "gemma2": (
        "Gemma2Config",
        {
            "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0,
            "sliding_window": TINY_WINDOW,
            "tie_word_embeddings": True,
        },  # embeddings scaled by sqrt(hidden): in the modeling file
    ),
    "gemma3": ("Gemma3TextConfig", {"sliding_window": TINY_WINDOW, "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", {}),  # packed qkv_proj and gate_up_proj: in the modeling file
    "granite": (
        "GraniteConfig",
        {
            "logits_scaling": 8.0,
            "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22,
            "attention_multiplier": 1 / 64,
        },
    ),
}


def tiny_config(family: str, **sizes):
    """The config of a tiny random `family` model: `TINY`'s flags on the given sizes (keyword arguments of every
    config class: vocab_size, hidden_size, ...); `head_dim = hidden_size // num_attention_heads`."""
    import transformers

    if family not in TINY:
        raise ValueError(f"unknown model family '{family}'; one of {', '.join(TINY)}")
    class_name, flags = TINY[family]
    head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    extra = {"head_dim": head_dim}
    if "Gemma" in class_name:  # Gemma scales queries by query_pre_attn_scalar**-0.5, not head_dim**-0.5
        extra["query_pre_attn_scalar"] = head_dim
    return getattr(transformers, class_name)(**sizes, **extra, **flags)
