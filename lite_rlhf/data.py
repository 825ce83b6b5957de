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
Files that are not JSONL (parquet, csv, json arrays) are read with `datasets`, and so are datasets: a local
directory in the hub's layout, or a hub name (`org/name`, `org/name:split`, `org/name:config:split`). Columns named
otherwise are read under our names through `fields` (data.prompt_field, ...).
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

Messages = list[dict[str, str]]


class DataError(ValueError):
    """Bad input data; the message names the file and the line."""


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: Messages  # the conversation to answer; the last turn is the user's
    meta: dict[str, Any] = field(default_factory=dict)
    chat: bool = False  # given as a message list (reward functions then get messages), not a string

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


FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".arrow")
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name
FIELDS = ("id", "prompt", "chosen", "rejected", "messages", "completion")  # the names this module reads


@dataclass(frozen=True)
class Rows:
    """The rows of one data source, each with its position: a file's line numbers, a dataset's row numbers."""

    source: str
    unit: str  # "line" (files) or "row" (datasets: a directory in the hub's layout, or a hub name)
    items: list[tuple[int, Any]]  # (position, parsed object or the exception)

    def at(self, n: int) -> str:
        return f"{self.source}:{n}" if self.unit == "line" else f"{self.source} row {n}"


def _rows(source: str | Path) -> Rows:
    """The rows of a data file, of a directory laid out as a hub dataset, or of a hub dataset: see `dataset_spec`."""
    path = Path(source)
    if path.is_file():
        return Rows(str(source), "line", _file_rows(path))
    name, config, split = dataset_spec(str(source))
    if Path(name).is_dir():
        if not any(f.suffix in FILE_SUFFIXES for f in Path(name).rglob("*")):
            raise DataError(f"data directory '{name}' holds no data file ({', '.join(FILE_SUFFIXES)}): give a file, "
                            "or a dataset laid out as on the hub (e.g. data/train-00000-of-00001.parquet)")  # fmt: skip
        return Rows(str(source), "row", _dataset_rows(str(source), name, config, split))
    if path.suffix in FILE_SUFFIXES or not HUB_NAME.fullmatch(name):
        raise DataError(f"data file '{source}' does not exist")
    _check_hub(str(source), name)
    return Rows(str(source), "row", _dataset_rows(str(source), name, config, split))


def dataset_spec(source: str) -> tuple[str, str | None, str]:
    """'NAME', 'NAME:SPLIT' or 'NAME:CONFIG:SPLIT' -> (name, config, split); NAME is a hub dataset (org/name)
    or a local directory in the hub's layout (data files, e.g. data/train-*.parquet); the split defaults to train."""
    name, *rest = source.split(":")
    if len(rest) > 2 or any(not part for part in rest):
        raise DataError(f"data source '{source}': expected NAME, NAME:SPLIT or NAME:CONFIG:SPLIT")
    config, split = rest if len(rest) == 2 else (None, rest[0] if rest else "train")
    return name, config, split


def _check_hub(source: str, name: str) -> None:
    """One line, at once, when the hub cannot be reached (datasets would retry for half a minute, then raise)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return  # the local cache only: datasets answers at once
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as err:
        raise DataError(
            f"data source '{source}' is neither a local file or directory nor reachable: the Hugging Face hub "
            f"({url.hostname}) cannot be reached ({err.strerror or err}). Where there is a network, "
            f"`hf download {name} --repo-type dataset --local-dir DIR`, then give DIR instead of '{name}'; "
            "if the set is in the local cache, set HF_HUB_OFFLINE=1"
        ) from None


def _cause(err: BaseException) -> str:
    """The first line of the innermost error (datasets wraps the parser's error in its own, several levels deep)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


def _dataset_rows(source: str, name: str, config: str | None, split: str) -> list[tuple[int, Any]]:
    import datasets

    datasets.disable_progress_bars()  # a data file of a few MB loads in a blink; the bars only add noise
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE and not Path(name).is_dir():  # datasets says "not cached in None"
            raise DataError(
                f"data source '{source}' is not in the local dataset cache, and HF_HUB_OFFLINE=1 keeps the hub out "
                f"of reach: where there is a network, `hf download {name} --repo-type dataset --local-dir DIR`, then "
                f"give DIR instead of '{name}'; or unset HF_HUB_OFFLINE"
            ) from None
        raise DataError(f"data source '{source}' cannot be loaded as a dataset: {_cause(err)}") from None
    return [(i + 1, dict(row)) for i, row in enumerate(ds)]


def _file_rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed object or the exception) for each non-empty row of a file."""
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

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:
        raise DataError(f"data file '{path}' cannot be read as {kind}: {_cause(err)}") from None
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


def _label(key: str, fields: Mapping[str, str]) -> str:
    theirs = fields.get(key, key)
    return f"'{theirs}'" if theirs == key else f"'{theirs}' (data.{key}_field)"


def _columns_hint(key: str, row: dict, fields: Mapping[str, str]) -> str:
    """Where a row misses one of our fields under its default name: the row's columns, and the key that reads
    another one as it (data.prompt_field=question)."""
    if fields.get(key, key) != key or not row:
        return ""
    shown = ", ".join(f"'{c}'" for c in list(row)[:6]) + (", ..." if len(row) > 6 else "")
    return f"; the row's columns are {shown}: name the one to read with data.{key}_field"


def _renamed(row: dict, fields: Mapping[str, str]) -> dict:
    """The row under this module's field names: a column named as `fields` says is read as ours (it wins over a
    column that already has our name); a row without it keeps our name, so one mapping serves several files."""
    out = dict(row)
    for ours, theirs in fields.items():
        if theirs != ours and theirs in out:
            out[ours] = out.pop(theirs)
    return out


def _load(
    source: str | Path, parse, skip_invalid: bool, fields: Mapping[str, str] | None, required: tuple[str, ...]
) -> tuple[list, int]:
    rows, fields = _rows(source), fields or {}
    out, skipped = [], 0
    for n, row in rows.items:
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise DataError(f"expected a JSON object, got {type(row).__name__}")
            row = _renamed(row, fields)
            for key in required:
                if key not in row:
                    raise DataError(f"missing field {_label(key, fields)}{_columns_hint(key, row, fields)}")
            out.append(parse(row, n, rows.unit))
        except DataError as err:
            if not skip_invalid:
                raise DataError(f"{rows.at(n)}: {err} (set data.skip_invalid=true to skip such {rows.unit}s)") from None
            skipped += 1
    if not out:
        raise DataError(f"data source '{source}' holds no valid rows")
    return out, skipped


def load_prompts(
    source: str | Path,
    skip_invalid: bool = False,
    split: str = "prompts",
    fields: Mapping[str, str] | None = None,
    answers: bool = False,
) -> tuple[list[Prompt], int]:
    """Prompts from a file or dataset; returns (prompts, number of skipped rows). `fields`: our field name ->
    the source's column name (data.prompt_field, ...). `answers`: every row must carry its data answer, a
    "completion" as in SFT rows (a string, or messages whose last turn is the assistant's), kept as
    `meta["completion"]`, a string (SPIN's chosen answers).

    A prompt without "id" gets `<split>:<line>` (e.g. `val:3`), so files of different splits never
    share an id; an id used twice in one file is an error naming both lines.
    """
    seen: dict[str, int] = {}

    def parse(row: dict, n: int, unit: str) -> Prompt:
        pid = str(row["id"]) if "id" in row else f"{split}:{n}"
        if pid in seen:
            raise DataError(f"prompt id '{pid}' is already used on {unit} {seen[pid]}")
        meta = {k: v for k, v in row.items() if k not in ("prompt", "id")}
        messages = _prompt(row["prompt"])
        if answers:
            meta["completion"] = _response(row["completion"], "completion", messages)
        prompt = Prompt(pid, messages, meta, isinstance(row["prompt"], list))
        seen[pid] = n
        return prompt

    return _load(source, parse, skip_invalid, fields, ("prompt", "completion") if answers else ("prompt",))


def load_preferences(
    source: str | Path, skip_invalid: bool = False, fields: Mapping[str, str] | None = None
) -> tuple[list[PreferencePair], int]:
    """Preference pairs from a file or dataset; returns (pairs, number of skipped rows)."""

    def parse(row: dict, n: int, unit: str) -> PreferencePair:
        prompt = _prompt(row["prompt"])
        pair = PreferencePair(
            prompt, _response(row["chosen"], "chosen", prompt), _response(row["rejected"], "rejected", prompt)
        )
        if pair.chosen == pair.rejected:
            raise DataError("'chosen' and 'rejected' are the same answer: the pair teaches nothing")
        return pair

    return _load(source, parse, skip_invalid, fields, ("prompt", "chosen", "rejected"))


def load_conversations(
    source: str | Path, skip_invalid: bool = False, fields: Mapping[str, str] | None = None
) -> tuple[list[Conversation], int]:
    """SFT conversations from a file or dataset; returns (conversations, number of skipped rows)."""
    messages_, prompt_, completion_ = (_label(k, fields or {}) for k in ("messages", "prompt", "completion"))
    expected = f"expected {messages_}, or {prompt_} and {completion_}"

    def parse(row: dict, n: int, unit: str) -> Conversation:
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
            raise DataError(expected)
        if not any(m["role"] == "assistant" for m in messages[first:]):
            raise DataError("no assistant turn to train on")
        return Conversation(messages, first)

    return _load(source, parse, skip_invalid, fields, ())


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
