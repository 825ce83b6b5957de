"""Who judges the samples (the loop's oracle): a scalar reward (our reward adapter on the shared base,
or a separate reward model), or a pairwise preference model (our preference adapter, or a separate
causal LM) whose best and worst of n come from a tournament (`lite_rlhf/ranking.py`).

`reward.model` names a sequence-classification model with one output (as the paper uses, e.g. a
Bradley-Terry reward model trained elsewhere). It is loaded beside the base, with its own
tokenizer and chat template, and costs its own weights in memory (`separate_model_bytes`); our
adapter costs only its LoRA weights and a head, since it shares the base.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lite_rlhf import dist
from lite_rlhf.config import Config
from lite_rlhf.data import Messages, Prompt
from lite_rlhf.functions import call, combine, load_functions
from lite_rlhf.preference import Judge, SeparatePreferenceModel, model_judge
from lite_rlhf.ranking import rank
from lite_rlhf.reward import score_texts

Scorer = Callable[[list[Prompt], list], list[float | None]]  # (prompt of each sample, samples) -> rewards
LEARNED = "reward_model"  # the learned reward's name among the terms


def make_terms(cfg: Config, model) -> list[tuple[str, float, Scorer]]:
    """The scalar reward's terms as (name, weight, scorer): the learned reward (our adapter, or reward.model;
    reward.kind bt) and each of reward.functions."""
    r = cfg.reward
    terms: list[tuple[str, float, Scorer]] = []
    if r.kind == "bt" and r.model:
        external = SeparateRewardModel(r.model, device=model.device, dtype=model.dtype)
        terms.append((LEARNED, r.oracle_weight, lambda prompts, samples: external.score(
            [p.messages for p in prompts], [s.text for s in samples], r.score_batch)))  # fmt: skip
    elif r.kind == "bt":
        terms.append((LEARNED, r.oracle_weight, lambda prompts, samples: score_texts(
            model, [p.messages for p in prompts], [s.token_ids for s in samples], r.score_batch, cfg.data.max_length,
            cfg.run.quiet)))  # fmt: skip
    for f in load_functions(r.functions, r.weights, "reward.functions", r.function_timeout):
        terms.append((f.name, f.weight, lambda prompts, samples, f=f: call(
            f, prompts, [s.text for s in samples], [s.token_ids for s in samples])))  # fmt: skip
    return terms


class Oracle:
    """The loop's judge: `rank` gives every sample a score to pick best and worst by (rewards, or
    tournament scores); `reward` (bt) or `judge` (preference) serves the evaluation."""

    def __init__(self, cfg: Config, model):
        self.cfg = cfg
        self.reward: Scorer | None = None
        self.judge: Judge | None = None
        self.eval_functions = load_functions(cfg.eval.functions, (), "eval.functions", cfg.reward.function_timeout)
        if cfg.reward.kind in ("bt", "functions"):
            self.terms = make_terms(cfg, model)
            self.reward = lambda prompts, samples: combine(list(self.scored_terms(prompts, samples).values()))
        elif cfg.reward.preference_model:
            self.judge = SeparatePreferenceModel(cfg.reward.preference_model, device=model.device,
                                                 dtype=model.dtype).judge(cfg)  # fmt: skip
        else:
            self.judge = model_judge(model, cfg)

    def eval_figures(self, prompts: list[Prompt], samples: list) -> dict:
        """eval.functions on held-out answers: the mean score of each (None where none was scored), never trained on."""
        texts, ids = [s.text for s in samples], [s.token_ids for s in samples]
        figures = {}
        for f in self.eval_functions:
            given = [v for v in call(f, prompts, texts, ids) if v is not None]
            figures[f"fn_{f.name}"] = sum(given) / len(given) if given else None
        return figures

    def scored_terms(self, prompts: list[Prompt], samples: list) -> dict[str, tuple[float, list[float | None]]]:
        """Each term of the scalar reward on the samples: name -> (weight, scores)."""
        return {name: (weight, scorer(prompts, samples)) for name, weight, scorer in self.terms}

    def rank(self, prompts: dict[str, Prompt], samples: list) -> tuple[list[float | None], dict, dict]:
        """A score per sample (higher is better; None: unscored), what it cost per prompt (forwards and
        comparisons), and, when the reward has several terms, each term's scores (name -> scores)."""
        n_prompts = max(1, len({s.prompt_id for s in samples}))
        if self.judge is None:
            terms = self.scored_terms([prompts[s.prompt_id] for s in samples], samples)
            forwards = len(samples) / n_prompts if LEARNED in terms else 0.0
            shown = {name: scores for name, (_, scores) in terms.items()} if len(terms) > 1 else {}
            return combine(list(terms.values())), {"forwards_per_prompt": forwards}, shown
        by_key = {(s.prompt_id, s.index): s for s in samples}
        sizes: dict[str, int] = {}
        for s in samples:
            sizes[s.prompt_id] = max(sizes.get(s.prompt_id, 0), s.index + 1)
        forwards = self.judge.forwards

        def compare(matches):
            return self.judge.probs(
                [(prompts[k].messages, by_key[k, i].text, by_key[k, j].text) for k, i, j in matches]
            )

        scores, count = rank(sizes, compare, self.cfg.pairs.ranking, self.cfg.pairs.round_robin_score)
        return (
            [scores[s.prompt_id][s.index] for s in samples],
            {
                "comparisons_per_prompt": sum(count.values()) / n_prompts,
                "forwards_per_prompt": (self.judge.forwards - forwards) / n_prompts,
            },
            {},
        )


class SeparateRewardModel:
    """A sequence-classification reward model with its own tokenizer (answers are re-tokenized as text)."""

    def __init__(self, name: str, *, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForSequenceClassification

        from lite_rlhf.models import load_tokenizer, resolve_model

        path = resolve_model(name)
        self.tokenizer = load_tokenizer(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype, use_safetensors=True
        ).to(device)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval()
        self.device = device

    @property
    def separate_model_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def score(self, prompts: list[Messages], responses: list[str], batch_size: int) -> list[float]:
        """Rewards of (prompt, response) texts, in order (under torchrun each rank scores its share)."""
        items = list(zip(prompts, responses, strict=True))
        return dist.map_sharded(items, lambda part: self._score([p for p, _ in part], [r for _, r in part], batch_size))

    @torch.no_grad()
    def _score(self, prompts: list[Messages], responses: list[str], batch_size: int) -> list[float]:
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
