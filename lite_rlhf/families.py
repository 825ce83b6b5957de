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

# Config keys a family may use to transform its logits that no code here applies: refused at start.
UNSUPPORTED_LOGIT_KEYS = ("output_multiplier_scale", "logit_multiplier")


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


def family_name(config) -> str:
    return getattr(config, "model_type", None) or type(config).__name__


def logit_transform(config) -> LogitTransform:
    """The transform `config`'s model applies to its LM head's output (transformers' modeling files:
    Granite `logits / logits_scaling`, Cohere `logits * logit_scale`, Gemma 2 `final_logit_softcapping`)."""
    config = config.get_text_config()
    scale = 1.0
    if getattr(config, "logits_scaling", None) not in (None, 1.0, 1):
        scale /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None) not in (None, 1.0, 1):
        scale *= float(config.logit_scale)
    cap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(scale=scale, softcap=float(cap) if cap else None)


def refusal(config) -> str | None:
    """Why this code cannot train a model of `config`'s family, as one line naming the family and the config key,
    or None when it can."""
    text = config.get_text_config()
    for key in UNSUPPORTED_LOGIT_KEYS:
        if getattr(text, key, None) not in (None, 1.0, 1):
            return (
                f"model family '{family_name(text)}' transforms its logits ({key}={getattr(text, key)}), "
                "which the log-prob kernels do not apply"
            )
    return None


# --------------------------------------------------------------------------- tiny models of each family

# Sliding window of the tiny models that have one: shorter than a prompt with its chat template, so it acts.
TINY_WINDOW = 64

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
