"""From scored samples to preference pairs: best versus worst per prompt (paper section 3.3).

Per prompt, the sample with the highest penalized reward r~ = r - λ·|a| (paper eq. 9; |a| in
characters or tokens) is `chosen`, the lowest is `rejected`. Ties for best or worst go to the
lowest sample index. A sample cut off at the length limit is never chosen unless
`pairs.allow_truncated` (it may still be rejected). A pair is dropped when its two texts are equal
or when the rewards differ by no more than `pairs.min_margin`; the reasons are counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

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
    """r - λ·|a|, with |a| the answer's characters or tokens."""
    if cfg.length_penalty == 0:
        return list(rewards)
    size = (lambda s: len(s.text)) if cfg.length_unit == "chars" else (lambda s: s.n_tokens)
    return [r - cfg.length_penalty * size(s) for s, r in zip(samples, rewards, strict=True)]


def select_pairs(samples: list, rewards: list[float], cfg: PairsConfig) -> tuple[list[Pair], Counter]:
    """One best-vs-worst pair per prompt from samples (`prompt_id`, `index`, `text`, `token_ids`,
    `finish_reason`) and their penalized rewards. Returns the pairs and the count of drops by reason."""
    groups: dict[str, list[tuple]] = {}
    for s, r in zip(samples, rewards, strict=True):
        groups.setdefault(s.prompt_id, []).append((s.index, s, r))
    pairs, dropped = [], Counter()
    for prompt_id, group in groups.items():
        group.sort(key=lambda t: t[0])
        choosable = [t for t in group if cfg.allow_truncated or t[1].finish_reason != "length"]
        if not choosable:
            dropped["all_truncated"] += 1
            continue
        best = choosable[0]
        for t in choosable[1:]:
            if t[2] > best[2]:  # strict: ties keep the lower index
                best = t
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
