"""Rows of (prompt ids, response ids) to padded batches with targets: the one home of padding.

Every trainer and scorer (reward model, DPO, the reference pass, the KL estimate) builds its tensors
here, so the truncation rule (`data.encode`) and the target shift are written once:
targets[b, t] is the token at t + 1 when it belongs to the response, else IGNORE, because the hidden
state at position t predicts token t + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lite_rlhf.data import encode

IGNORE = -100
Row = tuple[list[int], list[int]]  # (prompt ids, response ids)


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


def from_encoded(encoded: list[tuple[list[int], int]], pad_id: int) -> Batch:
    input_ids, mask = pad([ids for ids, _ in encoded], pad_id)
    targets = torch.full_like(input_ids, IGNORE)
    for b, (ids, n_prompt) in enumerate(encoded):
        targets[b, n_prompt - 1 : len(ids) - 1] = torch.tensor(ids[n_prompt:])
    return Batch(input_ids, mask, targets)


def make_batch(rows: list[Row], pad_id: int, max_length: int, truncation: str) -> Batch:
    """Rows -> a right-padded `Batch` with response targets."""
    return from_encoded(encode_rows(rows, max_length, truncation), pad_id)


def fits(rows: list[Row], max_length: int, truncation: str) -> bool:
    """Can every row be encoded within `max_length` (with room for at least one response token)?"""
    return all(len(p) < max_length and encode(p, r, max_length, truncation) is not None for p, r in rows)
