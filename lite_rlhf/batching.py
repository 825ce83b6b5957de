"""Rows of (prompt ids, response ids), or token ids with a trained mask, to padded batches with
targets: the one home of padding.

Every trainer and scorer (reward model, DPO, SFT, the reference pass, the KL estimate) builds its
tensors here, so the truncation rule (`data.encode`) and the target shift are written once:
targets[b, t] is the token at t + 1 when it is trained (a response token), else IGNORE, because the
hidden state at position t predicts token t + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lite_rlhf.data import encode

IGNORE = -100
Row = tuple[list[int], list[int]]  # (prompt ids, response ids)
Example = tuple[list[int], list[bool]]  # (token ids, which tokens are trained)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T] long, right-padded
    mask: torch.Tensor  # [B, T] long, 1 on real tokens
    targets: torch.Tensor  # [B, T] long, the next response token or IGNORE


def encode_rows(rows: list[Row], max_length: int, truncation: str) -> list[tuple[list[int], int]]:
    """(ids, number of prompt tokens) per row, under the data.max_length rule."""
    encoded = []
    for prompt, response in rows:
        enc = encode(prompt, response, max_length, truncation)
        if enc is None:  # only with truncation="drop"; callers filter such rows first (`fits`)
            raise ValueError("a row longer than data.max_length reached a batch with data.truncation=drop")
        encoded.append(enc)
    return encoded


def pad(seqs: list[list[int]], pad_id: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids [B, T], attention_mask [B, T])`, right-padded (left-padded for generation)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[b, cols] = torch.tensor(seq, dtype=torch.long)
        mask[b, cols] = 1
    return ids, mask


def as_example(ids: list[int], n_prompt: int) -> Example:
    """An encoded row as an example: its response tokens are the trained ones."""
    return ids, [False] * n_prompt + [True] * (len(ids) - n_prompt)


def from_examples(examples: list[Example], pad_id: int) -> Batch:
    """Examples -> a right-padded `Batch` whose targets are the trained tokens."""
    input_ids, mask = pad([ids for ids, _ in examples], pad_id)
    trained = pad([[int(x) for x in tr] for _, tr in examples], 0)[0].bool()
    targets = torch.full_like(input_ids, IGNORE)
    targets[:, :-1] = torch.where(trained[:, 1:], input_ids[:, 1:], IGNORE)
    return Batch(input_ids, mask, targets)


def length_groups(lengths: list[int], overhead: float) -> list[list[int]]:
    """The rows of a padded batch split into forward passes that cost the least: each pass computes
    rows x its longest row tokens, plus `overhead` tokens' worth for running a pass at all. Rows sorted
    longest first, cut into contiguous runs by dynamic programming (exact for this cost); indices into
    `lengths`, longest group first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    ls = [lengths[i] for i in order]
    best, cut = [0.0] + [float("inf")] * len(ls), [0] * (len(ls) + 1)
    for j in range(1, len(ls) + 1):
        for i in range(j):  # the group order[i:j], whose longest row is ls[i]
            cost = best[i] + (j - i) * ls[i] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(ls)
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def make_batch(rows: list[Row], pad_id: int, max_length: int, truncation: str) -> Batch:
    """Rows -> a right-padded `Batch` with response targets."""
    return from_examples([as_example(*enc) for enc in encode_rows(rows, max_length, truncation)], pad_id)


def truncate_example(example: Example, max_length: int, truncation: str) -> Example | None:
    """An example within `max_length` tokens: its start is kept (rule keep_ends cuts the end; rule drop
    returns None); None too when no trained token is left."""
    ids, trained = example
    if len(ids) > max_length:
        if truncation == "drop":
            return None
        ids, trained = ids[:max_length], trained[:max_length]
    return (ids, trained) if any(trained[1:]) else None


def fits(rows: list[Row], max_length: int, truncation: str) -> bool:
    """Can every row be encoded within `max_length` (with room for at least one response token)?"""
    return all(len(p) < max_length and encode(p, r, max_length, truncation) is not None for p, r in rows)
