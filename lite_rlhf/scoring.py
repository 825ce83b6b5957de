"""Who scores the samples: our reward adapter on the shared base, or a separate reward model.

`reward.model` names a sequence-classification model with one output (as the paper uses, e.g. a
Bradley-Terry reward model trained elsewhere). It is loaded beside the base, with its own
tokenizer and chat template, and costs its own weights in memory (`separate_model_bytes`); our
adapter costs only its LoRA weights and a head, since it shares the base.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lite_rlhf.config import Config
from lite_rlhf.data import Messages
from lite_rlhf.reward import score_texts

Scorer = Callable[[list[Messages], list], list[float]]  # (prompts, samples) -> rewards


def make_scorer(cfg: Config, model) -> Scorer:
    if cfg.reward.model:
        external = SeparateRewardModel(cfg.reward.model, device=model.device, dtype=model.dtype)
        return lambda prompts, samples: external.score(prompts, [s.text for s in samples], cfg.reward.score_batch)
    return lambda prompts, samples: score_texts(
        model, prompts, [s.token_ids for s in samples], cfg.reward.score_batch, cfg.data.max_length, cfg.run.quiet
    )


class SeparateRewardModel:
    """A sequence-classification reward model with its own tokenizer (answers are re-tokenized as text)."""

    def __init__(self, name: str, *, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from lite_rlhf.models import resolve_model

        path = resolve_model(name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype, use_safetensors=True
        ).to(device)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval()
        self.device = device

    @property
    def separate_model_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.no_grad()
    def score(self, prompts: list[Messages], responses: list[str], batch_size: int) -> list[float]:
        texts = [
            self.tokenizer.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False)
            for p, r in zip(prompts, responses, strict=True)
        ]
        out: list[float] = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
            out += logits[:, 0].float().cpu().tolist()
        return out
