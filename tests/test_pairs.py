"""Pair selection: best versus worst, ties, identical texts, truncation, the length penalty; RAFT's winners."""

import random
from dataclasses import dataclass

from lite_rlhf.config import PairsConfig
from lite_rlhf.pairs import penalized_rewards, select_pairs, select_winners


@dataclass
class S:
    prompt_id: str
    index: int
    text: str
    finish_reason: str = "stop"

    @property
    def token_ids(self):
        return [ord(c) for c in self.text]

    @property
    def n_tokens(self):
        return len(self.text.split())


def test_best_versus_worst_per_prompt():
    samples = [S("a", 0, "x"), S("a", 1, "yy"), S("a", 2, "zzz"), S("b", 0, "p"), S("b", 1, "q")]
    pairs, dropped = select_pairs(samples, [0.1, 0.9, -0.5, 2.0, 1.0], PairsConfig())
    assert [(p.prompt_id, p.chosen_text, p.rejected_text) for p in pairs] == [("a", "yy", "zzz"), ("b", "p", "q")]
    assert pairs[0].margin == 0.9 - -0.5 and not dropped


def test_ties_go_to_the_lowest_index():
    samples = [S("a", 0, "first"), S("a", 1, "second"), S("a", 2, "third"), S("a", 3, "fourth")]
    pairs, _ = select_pairs(samples, [1.0, 1.0, 0.0, 0.0], PairsConfig())
    assert (pairs[0].chosen_text, pairs[0].rejected_text) == ("first", "third")


def test_equal_rewards_and_identical_texts_are_dropped():
    samples = [S("a", 0, "same"), S("a", 1, "same"), S("b", 0, "u"), S("b", 1, "v"), S("c", 0, "m"), S("c", 1, "n")]
    pairs, dropped = select_pairs(samples, [1.0, 0.0, 0.5, 0.5, 1.0, 0.95], PairsConfig(min_margin=0.1))
    assert pairs == []
    assert dropped == {"identical": 1, "margin": 2}


def test_truncated_samples_are_never_chosen_unless_allowed():
    samples = [S("a", 0, "cut off", "length"), S("a", 1, "ok"), S("a", 2, "bad")]
    pairs, _ = select_pairs(samples, [5.0, 1.0, 0.0], PairsConfig())
    assert (pairs[0].chosen_text, pairs[0].rejected_text) == ("ok", "bad")
    pairs, _ = select_pairs(samples, [5.0, 1.0, 0.0], PairsConfig(allow_truncated=True))
    assert pairs[0].chosen_text == "cut off"
    # A truncated sample may still be the rejected one.
    pairs, _ = select_pairs(samples, [-5.0, 1.0, 0.0], PairsConfig())
    assert pairs[0].rejected_text == "cut off"
    _, dropped = select_pairs([S("z", 0, "a", "length"), S("z", 1, "b", "length")], [1.0, 0.0], PairsConfig())
    assert dropped == {"all_truncated": 1}


def test_length_penalty_changes_the_winner():
    samples = [S("a", 0, "a long answer that rambles on"), S("a", 1, "short"), S("a", 2, "meh")]
    rewards = [1.0, 0.8, 0.0]
    assert select_pairs(samples, rewards, PairsConfig())[0][0].chosen_text.startswith("a long")
    cfg = PairsConfig(length_penalty=0.02)  # chars: 1.0 - 0.58 = 0.42 < 0.8 - 0.10 = 0.70
    pen = penalized_rewards(samples, rewards, cfg)
    assert pen == [1.0 - 0.02 * 29, 0.8 - 0.02 * 5, 0.0 - 0.02 * 3]
    assert select_pairs(samples, pen, cfg)[0][0].chosen_text == "short"
    tok = PairsConfig(length_penalty=0.1, length_unit="tokens")
    assert penalized_rewards(samples, rewards, tok) == [1.0 - 0.1 * 6, 0.8 - 0.1, 0.0 - 0.1]


def test_raft_keeps_the_argmax_reward_sample_never_a_truncated_one():
    rng = random.Random(0)
    reasons = ["stop", "stop", "length"]
    samples = [S(f"p{k}", i, f"p{k} answer {i}", rng.choice(reasons)) for k in range(30) for i in range(4)]
    rewards = [rng.gauss(0, 1) for _ in samples]
    winners, dropped = select_winners(samples, rewards, keep_quantile=0.0)
    by_prompt = {}
    for s, r in zip(samples, rewards, strict=True):
        if s.finish_reason == "stop" and (s.prompt_id not in by_prompt or r > by_prompt[s.prompt_id][1]):
            by_prompt[s.prompt_id] = (s.index, r)
    assert {w.prompt_id: (w.index, w.reward) for w in winners} == by_prompt
    assert dropped["all_truncated"] == 30 - len(by_prompt)
    assert all(w.text == f"{w.prompt_id} answer {w.index}" and w.response_ids == [ord(c) for c in w.text]
               for w in winners)  # fmt: skip


def test_raft_ties_quantile_and_all_truncated():
    samples = [S("a", 0, "x"), S("a", 1, "y"), S("b", 0, "p", "length"), S("c", 0, "q"), S("d", 0, "r")]
    winners, dropped = select_winners(samples, [1.0, 1.0, 9.0, 0.0, 2.0], keep_quantile=0.0)
    assert [(w.prompt_id, w.index) for w in winners] == [("a", 0), ("c", 0), ("d", 0)]
    assert dropped == {"all_truncated": 1}
    kept, dropped = select_winners(samples, [1.0, 1.0, 9.0, 0.0, 2.0], keep_quantile=0.5)  # median of 1, 0, 2: 1
    assert [w.prompt_id for w in kept] == ["a", "d"] and dropped["below_quantile"] == 1
