"""From scored samples to training data: best-versus-worst pairs for DPO (paper section 3.3), the
best answer per prompt for RAFT.

Per prompt, the sample with the highest penalized reward r~ = r - λ·|a| (paper eq. 9; |a| in
characters or tokens) is `chosen`, the lowest is `rejected`. Ties for best or worst go to the
lowest sample index. A sample cut off at the length limit is never chosen unless
`pairs.allow_truncated` (it may still be rejected). A pair is dropped when its two texts are equal
or when the rewards differ by no more than `pairs.min_margin`; the reasons are counted. RAFT's
winner is the same best sample (a truncated one never), kept when its reward reaches the
`raft.keep_quantile` quantile of the iteration's winners.

SPIN (self-play fine-tuning, Chen et al. 2024, arXiv:2401.01335; `pairs.source=spin`) ranks nothing: each
prompt's data answer is `chosen` and the policy's own answer `rejected`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from lite_rlhf.config import PairsConfig


@dataclass(frozen=True)
class Pair:
    prompt_id: str
    chosen_ids: list[int]  # response token ids (as generated, EOS included when it stopped)
    rejected_ids: list[int]
    chosen_text: str
    rejected_text: str
    chosen_reward: float  # penalized reward r~
    rejected_reward: float
    ref_chosen_logp: float | None = None  # π0 summed log-probs, computed once after selection
    ref_rejected_logp: float | None = None

    @property
    def margin(self) -> float:
        return self.chosen_reward - self.rejected_reward


def penalized_rewards(samples: list, rewards: list[float], cfg: PairsConfig) -> list[float]:
    """r - λ·|a|, with |a| the answer's characters or tokens (None stays None: a sample no reward term scored)."""
    if cfg.length_penalty == 0:
        return list(rewards)
    size = (lambda s: len(s.text)) if cfg.length_unit == "chars" else (lambda s: s.n_tokens)
    return [None if r is None else r - cfg.length_penalty * size(s) for s, r in zip(samples, rewards, strict=True)]


def _groups(samples: list, rewards: list[float | None], dropped: Counter) -> dict[str, list[tuple]]:
    """(index, sample, reward) per prompt, in sample order; unscored samples (None) left out, and a prompt
    without any scored sample counted in `dropped` as unscored."""
    groups: dict[str, list[tuple]] = {}
    for s, r in zip(samples, rewards, strict=True):
        group = groups.setdefault(s.prompt_id, [])
        if r is not None:
            group.append((s.index, s, r))
    if unscored := sum(not group for group in groups.values()):
        dropped["unscored"] += unscored
    return {pid: sorted(group, key=lambda t: t[0]) for pid, group in groups.items() if group}


def _best(group: list[tuple], allow_truncated: bool) -> tuple | None:
    """The highest reward among the samples that may be chosen; ties keep the lower index."""
    choosable = [t for t in group if allow_truncated or t[1].finish_reason != "length"]
    best = None
    for t in choosable:
        if best is None or t[2] > best[2]:  # strict: ties keep the lower index
            best = t
    return best


def select_pairs(samples: list, rewards: list[float | None], cfg: PairsConfig) -> tuple[list[Pair], Counter]:
    """One best-vs-worst pair per prompt from samples (`prompt_id`, `index`, `text`, `token_ids`,
    `finish_reason`) and their penalized rewards. Returns the pairs and the count of drops by reason."""
    pairs, dropped = [], Counter()
    for prompt_id, group in _groups(samples, rewards, dropped).items():
        best = _best(group, cfg.allow_truncated)
        if best is None:
            dropped["all_truncated"] += 1
            continue
        worst = group[0]
        for t in group[1:]:
            if t[2] < worst[2]:
                worst = t
        if best[0] != worst[0] and best[1].text == worst[1].text:
            dropped["identical"] += 1
        elif best[2] - worst[2] <= cfg.min_margin:  # also when best and worst are one sample
            dropped["margin"] += 1
        else:
            pairs.append(
                Pair(
                    prompt_id,
                    list(best[1].token_ids),
                    list(worst[1].token_ids),
                    best[1].text,
                    worst[1].text,
                    float(best[2]),
                    float(worst[2]),
                )
            )
    return pairs, dropped


def spin_pairs(samples: list, answers: dict[str, tuple[str, list[int]]]) -> tuple[list[Pair], Counter]:
    """SPIN: per prompt, its data answer (`answers[prompt_id]`: text and token ids) chosen against the policy's
    first sample; no reward is read (both 0). Dropped when the policy already answers as the data does
    (counted as identical)."""
    pairs, dropped = [], Counter()
    for s in samples:
        if s.index != 0:
            continue
        text, ids = answers[s.prompt_id]
        if s.text.strip() == text.strip():
            dropped["identical"] += 1
        else:
            pairs.append(Pair(s.prompt_id, list(ids), list(s.token_ids), text, s.text, 0.0, 0.0))
    return pairs, dropped


@dataclass(frozen=True)
class Winner:
    prompt_id: str
    index: int  # the sample's index within its prompt
    response_ids: list[int]  # as generated, EOS included
    text: str
    reward: float  # penalized reward r~


def select_winners(samples: list, rewards: list[float | None], keep_quantile: float) -> tuple[list[Winner], Counter]:
    """RAFT: the best sample per prompt (never a truncated one), kept when its reward is at least the
    `keep_quantile` quantile of all winners' rewards (0 keeps every winner). Returns the winners and
    the count of drops by reason."""
    winners, dropped = [], Counter()
    for prompt_id, group in _groups(samples, rewards, dropped).items():
        best = _best(group, allow_truncated=False)
        if best is None:
            dropped["all_truncated"] += 1
            continue
        winners.append(Winner(prompt_id, best[0], list(best[1].token_ids), best[1].text, float(best[2])))
    if keep_quantile > 0 and winners:
        rewards_ = torch.tensor([w.reward for w in winners], dtype=torch.float64)
        threshold = torch.quantile(rewards_, keep_quantile).item()
        kept = [w for w in winners if w.reward >= threshold]
        dropped["below_quantile"] += len(winners) - len(kept)
        winners = kept
    return winners, dropped
