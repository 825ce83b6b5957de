"""Ranking n answers with a pairwise oracle: best and worst of each prompt's answers from comparisons.

A scalar reward ranks n answers with n forwards; a preference model only says P(a ≻ b), so the best
and the worst come from a tournament (the cost the paper names in section 2.1):

- `round_robin`: every pair once, n(n-1)/2 comparisons. An answer's score is its wins (Copeland:
  P > 1/2 is a win, P = 1/2 half a win) or its summed win probability. With an intransitive oracle
  (a ≻ b ≻ c ≻ a) scores tie, and the tie goes to the lowest index, as with a scalar reward.
- `knockout`: a single-elimination bracket for the best and one for the worst, sharing their first
  round (answers 0-1, 2-3, ...: winners go to the best bracket, losers to the worst; with an odd n
  the last answer plays answer 0, whose bracket comes from its first match). Then each bracket pairs
  its members in index order each round (an odd one out waits a round), the best bracket keeping
  winners and the worst keeping losers, until one is left in each: about 3n/2 - 2 comparisons.
  Scores: +(1 + rounds survived) in the best bracket, -(1 + rounds survived) in the worst, the
  last one standing one further out, so the champion scores highest and the bottom lowest; the
  others' order is only used when the champion may not be chosen (a truncated answer).

The tournament runs every prompt's matches of a round in one call of `compare`, which batches them.
A tie (P = 1/2) is won by the lower index in the best bracket and lost by it in the worst (the
scalar path's ties also go to the lowest index). Round robin gives equal answers equal scores, and
the pair selection drops a pair without margin; a knockout always names a best and a worst, even
among answers the oracle cannot tell apart.
"""

from __future__ import annotations

from collections.abc import Callable

Match = tuple[str, int, int]  # (prompt id, i, j): how likely is answer i better than answer j?
Compare = Callable[[list[Match]], list[float]]  # P(i ≻ j) for each match, in order


def win(p: float) -> float:
    """The verdict of one comparison for the first answer: P > 1/2 wins (1), P = 1/2 is half, else 0."""
    return 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0


def rank(sizes: dict[str, int], compare: Compare, scheme: str, score: str = "wins") -> tuple[dict, dict]:
    """Scores of each prompt's answers (higher is better) and the comparisons made per prompt."""
    if scheme == "round_robin":
        return round_robin(sizes, compare, score)
    if scheme == "knockout":
        return knockout(sizes, compare)
    raise ValueError(f"unknown ranking '{scheme}'")


def round_robin(sizes: dict[str, int], compare: Compare, score: str = "wins") -> tuple[dict, dict]:
    matches = [(key, i, j) for key, n in sizes.items() for i in range(n) for j in range(i + 1, n)]
    probs = compare(matches) if matches else []
    scores = {key: [0.0] * n for key, n in sizes.items()}
    for (key, i, j), p in zip(matches, probs, strict=True):
        got = p if score == "probability" else win(p)
        scores[key][i] += got
        scores[key][j] += 1.0 - got
    return scores, {key: n * (n - 1) // 2 for key, n in sizes.items()}


def knockout(sizes: dict[str, int], compare: Compare) -> tuple[dict, dict]:
    scores = {key: [0.0] * n for key, n in sizes.items()}
    count = dict.fromkeys(sizes, 0)
    # the shared first round
    first = []
    for key, n in sizes.items():
        first += [(key, i, i + 1) for i in range(0, n - 1, 2)]
        if n % 2 and n > 1:
            first.append((key, n - 1, 0))
    brackets: dict[tuple[str, str], list[int]] = {(key, side): [] for key in sizes for side in ("best", "worst")}
    placed: set[tuple[str, int]] = set()
    for (key, i, j), p in zip(first, compare(first) if first else [], strict=True):
        count[key] += 1
        winner, loser = (i, j) if _first_wins(p, i, j) else (j, i)
        for side, who in (("best", winner), ("worst", loser)):
            if (key, who) not in placed:  # answer 0 of an odd n keeps the bracket of its first match
                brackets[key, side].append(who)
                placed.add((key, who))
    for key, n in sizes.items():
        if n == 1:
            brackets[key, "best"] = [0]
    # each bracket down to one
    while any(len(members) > 1 for members in brackets.values()):
        matches, where = [], []
        for (key, side), members in brackets.items():
            members.sort()
            for m in members:  # every member still in the bracket survived the previous round
                scores[key][m] += 1 if side == "best" else -1
            for a in range(0, len(members) - 1, 2):
                matches.append((key, members[a], members[a + 1]))
                where.append(side)
        for (key, i, j), side, p in zip(matches, where, compare(matches), strict=True):
            count[key] += 1
            i_stays = _first_wins(p, i, j) if side == "best" else _first_loses(p, i, j)
            brackets[key, side].remove(j if i_stays else i)
    for (key, side), members in brackets.items():
        for m in members:  # entered (or survived) the last round, and one further for the last one standing
            scores[key][m] += 2 if side == "best" else -2
    return scores, count


def _first_wins(p: float, i: int, j: int) -> bool:
    """Best bracket: does i beat j? A tie goes to the lower index."""
    return p > 0.5 or (p == 0.5 and i < j)


def _first_loses(p: float, i: int, j: int) -> bool:
    """Worst bracket: is i the worse of the two? A tie makes the lower index the worse."""
    return p < 0.5 or (p == 0.5 and i < j)
