"""Tournaments over a pairwise oracle: round robin and knockout find the true best and worst on a
transitive oracle, round robin ties (and falls back to the lowest index) on an intransitive one, and
the comparison counts are those the module documents."""

from __future__ import annotations

import itertools
import random

import pytest

from lite_rlhf.ranking import knockout, rank, round_robin


def transitive(values: dict[str, list[float]], noise: float = 0.0, seed: int = 0):
    """P(i ≻ j) from hidden qualities (a logistic of the difference), optionally with noise that never
    flips a verdict; records every match asked for."""
    rng = random.Random(seed)
    asked = []

    def compare(matches):
        asked.append(list(matches))
        out = []
        for key, i, j in matches:
            d = values[key][i] - values[key][j]
            p = 1 / (1 + 2.718281828 ** (-d))
            noisy = p + (rng.uniform(-noise, noise) if d else 0)  # clipped so that it never flips the verdict
            out.append(min(max(noisy, 0.5001 if d > 0 else 0), 0.4999 if d < 0 else 1))
        return out

    return compare, asked


def best_worst(scores: list[float]) -> tuple[int, int]:
    """As the pair selection picks them: the first maximum and the first minimum."""
    return scores.index(max(scores)), scores.index(min(scores))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 9, 16])
@pytest.mark.parametrize("scheme", ["round_robin", "knockout"])
def test_true_best_and_worst_on_a_transitive_oracle(n, scheme):
    rng = random.Random(n)
    values = {f"p{k}": rng.sample(range(100), n) for k in range(20)}  # distinct qualities, shuffled positions
    compare, asked = transitive({k: [v / 10 for v in vs] for k, vs in values.items()}, noise=0.3, seed=n)
    scores, count = rank({k: n for k in values}, compare, scheme)
    for key, vs in values.items():
        best, worst = best_worst(scores[key])
        assert vs[best] == max(vs) and (n == 1 or vs[worst] == min(vs)), (key, vs, scores[key])
        if n > 1:
            assert best != worst
    made = sum(len(m) for m in asked)
    assert made == sum(count.values())
    if scheme == "round_robin":
        assert set(count.values()) == {n * (n - 1) // 2}
        assert len(asked) == (1 if n > 1 else 0)  # one batched call
    else:
        first_round = n // 2 + n % 2 if n > 1 else 0
        brackets = [n // 2 + (n % 2 if n % 2 and n > 1 else 0), n // 2]  # best bracket gets the odd match's winner
        expected = first_round + sum(max(0, b - 1) for b in brackets)
        assert set(count.values()) == {expected}, (n, count)


def test_knockout_counts_are_the_documented_ones():
    compare, _ = transitive({"p": [float(i) for i in range(8)]})
    _, count = knockout({"p": 8}, compare)
    assert count["p"] == 10  # 4 shared + 3 for the best + 3 for the worst = 3n/2 - 2
    compare, _ = transitive({"p": [float(i) for i in range(4)]})
    _, count = knockout({"p": 4}, compare)
    assert count["p"] == 4


def test_knockout_rounds_are_batched_across_prompts():
    values = {f"p{k}": [float(v) for v in random.Random(k).sample(range(8), 8)] for k in range(5)}
    compare, asked = transitive(values)
    knockout({k: 8 for k in values}, compare)
    assert len(asked) == 3  # the shared round, then two more (both brackets in each), for all prompts at once
    assert len(asked[0]) == 5 * 4


def test_round_robin_on_an_intransitive_oracle():
    """Rock-paper-scissors: every answer wins once, all scores tie; best and worst go to the lowest index
    (a pair of one answer, which the selection drops). A fourth answer that loses to all is the worst."""
    beats = {(0, 1), (1, 2), (2, 0)}

    def compare(matches):
        return [1.0 if (i, j) in beats else 0.0 if (j, i) in beats else 0.5 for _, i, j in matches]

    scores, _ = round_robin({"p": 3}, compare)
    assert scores["p"] == [1.0, 1.0, 1.0]
    assert best_worst(scores["p"]) == (0, 0)
    beats |= {(0, 3), (1, 3), (2, 3)}
    scores, _ = round_robin({"p": 4}, compare)
    assert scores["p"] == [2.0, 2.0, 2.0, 0.0]
    assert best_worst(scores["p"]) == (0, 3)


def test_round_robin_scores_wins_or_probability():
    probs = {(0, 1): 0.6, (0, 2): 0.9, (1, 2): 0.5}

    def compare(matches):
        return [probs[i, j] for _, i, j in matches]

    wins, _ = round_robin({"p": 3}, compare, "wins")
    assert wins["p"] == [2.0, 0.5, 0.5]
    prob, _ = round_robin({"p": 3}, compare, "probability")
    assert prob["p"] == pytest.approx([1.5, 0.9, 0.6])


def test_ties_go_to_the_lowest_index():
    """An oracle that cannot tell answers apart: round robin ties everything (answer 0 is best and worst:
    no pair); a knockout names answer 0 best and the lowest index of its worst bracket, answer 1, worst."""
    for scheme, n in itertools.product(["round_robin", "knockout"], [2, 4, 5, 8]):
        scores, _ = rank({"p": n}, lambda matches: [0.5] * len(matches), scheme)
        best, worst = best_worst(scores["p"])
        assert best == 0, (scheme, n, scores)
        assert worst == (0 if scheme == "round_robin" else 1), (scheme, n, scores)
