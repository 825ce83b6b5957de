"""Prompts and preference pairs: loading with line-level validation, and the one chat template.

Every stage (generation, reward scoring, DPO) turns a prompt into tokens through `prompt_ids`, and a
prompt plus a response through `encode`. A template mismatch between the reward model and the
policy is a known cause of a DPO loss stuck at log 2 = 0.69; a test pins that all stages agree.

Formats (TRL's standard format):
- prompts: JSONL, one object per line: {"prompt": str | [messages]} with optional "id" and any
  extra fields (kept in `Prompt.meta`, e.g. the demo's gold-check fields);
- preference pairs: {"prompt", "chosen", "rejected"}, each a string, or lists of chat messages
  (prompt: the conversation so far; chosen/rejected: the assistant turn(s));
- conversations for SFT: {"messages": [...]} (every assistant turn is trained) or
  {"prompt", "completion"}, each a string or a list of messages (the completion's turns are trained).
Files that are not JSONL (parquet, csv, json arrays) are read with `datasets`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Messages = list[dict[str, str]]


class DataError(ValueError):
    """Bad input data; the message names the file and the line."""


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: Messages  # the conversation to answer; the last turn is the user's
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class PreferencePair:
    prompt: Messages
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Conversation:
    messages: Messages
    first_trained: int  # assistant turns from this message on are trained (the completion's first turn)


# --------------------------------------------------------------------------- reading


def _rows(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, parsed object or the exception) for each non-empty row of a file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file '{path}' is a directory; give a file (.jsonl, .json, .csv or .parquet)")
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist")
    if path.suffix in (".jsonl", ".ndjson") or path.suffix == "":
        rows = []
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    rows.append((lineno, DataError(f"not valid UTF-8 (byte {err.start + 1} of the line)")))
                    continue
                if not line.strip():
                    continue
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as err:
                    rows.append((lineno, DataError(f"not valid JSON ({err.msg})")))
        return rows
    kind = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix)
    if kind is None:
        raise DataError(f"data file '{path}': unknown format '{path.suffix}' (use .jsonl, .json, .csv or .parquet)")
    import datasets

    datasets.disable_progress_bars()  # a data file of a few MB loads in a blink; the bars only add noise
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps the parser's error in its own types, several levels deep
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        raise DataError(f"data file '{path}' cannot be read as {kind}: {str(cause).splitlines()[0][:200]}") from None
    first = 2 if kind == "csv" else 1  # a CSV file's first line is its header
    return [(i + first, dict(row)) for i, row in enumerate(ds)]


def _messages(value: Any, what: str, roles: tuple[str, ...] = ("system", "user", "assistant")) -> Messages:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"'{what}' is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        for m in value:
            if not (isinstance(m, dict) and m.get("role") in roles and isinstance(m.get("content"), str)):
                raise DataError(f"'{what}' must be a string or a list of {{'role', 'content'}} messages")
        if not any(m["content"].strip() for m in value):
            raise DataError(f"'{what}' is empty")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"'{what}' must be a non-empty string or list of messages, got {type(value).__name__}")


def _prompt(value: Any) -> Messages:
    msgs = _messages(value, "prompt")
    if msgs[-1]["role"] == "assistant":
        raise DataError("the last turn of 'prompt' is the assistant's: there is nothing left to answer")
    return msgs


def _response(value: Any, what: str, prompt: Messages) -> str:
    """The answer: a string, or a message list whose last turn is the assistant's; the turns before it (if
    any) must be `prompt`'s conversation, so that the pair answers the prompt it is filed under."""
    if isinstance(value, list):
        msgs = _messages(value, what)
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"the last turn of '{what}' is not the assistant's")
        if msgs[:-1] and msgs[:-1] != prompt:
            raise DataError(f"'{what}' answers another conversation than 'prompt' (its earlier turns differ)")
        value = msgs[-1]["content"]
    if not isinstance(value, str):
        raise DataError(f"'{what}' must be a string or a list of messages, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"'{what}' is empty")
    return value


def _load(path: str | Path, parse, skip_invalid: bool) -> tuple[list, int]:
    out, skipped = [], 0
    for lineno, row in _rows(path):
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise DataError(f"expected a JSON object, got {type(row).__name__}")
            out.append(parse(row, lineno))
        except DataError as err:
            if not skip_invalid:
                raise DataError(f"{path}:{lineno}: {err} (set data.skip_invalid=true to skip such lines)") from None
            skipped += 1
    if not out:
        raise DataError(f"data file '{path}' holds no valid rows")
    return out, skipped


def load_prompts(path: str | Path, skip_invalid: bool = False, split: str = "prompts") -> tuple[list[Prompt], int]:
    """Prompts from a file; returns (prompts, number of skipped lines).

    A prompt without "id" gets `<split>:<line>` (e.g. `val:3`), so files of different splits never
    share an id; an id used twice in one file is an error naming both lines.
    """
    seen: dict[str, int] = {}

    def parse(row: dict, lineno: int) -> Prompt:
        if "prompt" not in row:
            raise DataError("missing field 'prompt'")
        pid = str(row["id"]) if "id" in row else f"{split}:{lineno}"
        if pid in seen:
            raise DataError(f"prompt id '{pid}' is already used on line {seen[pid]}")
        prompt = Prompt(pid, _prompt(row["prompt"]), {k: v for k, v in row.items() if k not in ("prompt", "id")})
        seen[pid] = lineno
        return prompt

    return _load(path, parse, skip_invalid)


def load_preferences(path: str | Path, skip_invalid: bool = False) -> tuple[list[PreferencePair], int]:
    """Preference pairs from a file; returns (pairs, number of skipped lines)."""

    def parse(row: dict, lineno: int) -> PreferencePair:
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise DataError(f"missing field '{key}'")
        prompt = _prompt(row["prompt"])
        pair = PreferencePair(
            prompt, _response(row["chosen"], "chosen", prompt), _response(row["rejected"], "rejected", prompt)
        )
        if pair.chosen == pair.rejected:
            raise DataError("'chosen' and 'rejected' are the same answer: the pair teaches nothing")
        return pair

    return _load(path, parse, skip_invalid)


def load_conversations(path: str | Path, skip_invalid: bool = False) -> tuple[list[Conversation], int]:
    """SFT conversations from a file; returns (conversations, number of skipped lines)."""

    def parse(row: dict, lineno: int) -> Conversation:
        if "messages" in row:
            messages = _messages(row["messages"], "messages")
            first = 0
        elif "prompt" in row and "completion" in row:
            prompt = _messages(row["prompt"], "prompt")
            completion = row["completion"]
            if isinstance(completion, str):
                if not completion.strip():
                    raise DataError("'completion' is empty")
                completion = [{"role": "assistant", "content": completion}]
            messages, first = prompt + _messages(completion, "completion"), len(prompt)
        else:
            raise DataError("expected 'messages', or 'prompt' and 'completion'")
        if not any(m["role"] == "assistant" for m in messages[first:]):
            raise DataError("no assistant turn to train on")
        return Conversation(messages, first)

    return _load(path, parse, skip_invalid)


# --------------------------------------------------------------------------- the one chat template


def _template_ids(tokenizer, messages: Messages, add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def prompt_ids(tokenizer, messages: Messages) -> list[int]:
    """Token ids of a prompt under the model's chat template, ending with the assistant header."""
    return _template_ids(tokenizer, messages, add_generation_prompt=True)


def conversation_ids(tokenizer, conv: Conversation) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation under the chat template, and which of them are trained: the
    tokens of each trained assistant turn, up to and including its end-of-turn token.

    A turn's tokens are found by rendering the conversation's prefixes (up to the turn's header, and
    through the turn) with the same template; templates without generation markers (SmolLM2's) work.
    If a prefix's tokens are not the start of the whole conversation's tokens (a template that renders
    earlier turns differently, or a merge across a turn boundary), the turn cannot be located: error.
    """
    full = _template_ids(tokenizer, conv.messages, add_generation_prompt=False)
    trained = [False] * len(full)
    for i, m in enumerate(conv.messages):
        if m["role"] != "assistant" or i < conv.first_trained:
            continue
        head = prompt_ids(tokenizer, conv.messages[:i])
        through = _template_ids(tokenizer, conv.messages[: i + 1], add_generation_prompt=False)
        start = len(head)
        if full[: len(through)] != through or through[:start] != head:
            raise DataError(
                f"the chat template does not render message {i + 1} (assistant) as a continuation of the "
                "messages before it, so its tokens cannot be located for the loss"
            )
        end = len(through)
        if tokenizer.eos_token_id in through[start:]:  # the end-of-turn token is trained, what follows it is not
            end = start + through[start:].index(tokenizer.eos_token_id) + 1
        trained[start:end] = [True] * (end - start)
    return full, trained


def response_ids(tokenizer, text: str) -> list[int]:
    """Token ids of an assistant answer given as text, closed by the end-of-turn token, as generated."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode(
    prompt: list[int], response: list[int], max_length: int, truncation: str = "keep_ends"
) -> tuple[list[int], int] | None:
    """Concatenate prompt and response ids within `max_length`.

    Rule `keep_ends`: when too long, first cut the response's end (keeping at least half the budget
    for it), then the prompt's start (keeping its end, where the question and the assistant header
    are). Rule `drop`: return None. Returns (ids, number of prompt tokens).
    """
    if len(prompt) + len(response) <= max_length:
        return prompt + response, len(prompt)
    if truncation == "drop":
        return None
    keep_response = min(len(response), max(max_length // 2, max_length - len(prompt)))
    keep_prompt = max_length - keep_response
    if keep_prompt <= 0:
        return None
    prompt = prompt[-keep_prompt:]
    return prompt + response[:keep_response], len(prompt)
