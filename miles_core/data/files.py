"""Prompt files: JSONL and Parquet at any fsspec URL.

One row is one prompt. Recognised fields (anything else goes into `metadata`):

- `prompt` (string, or a list of chat messages), or `question`/`text` (string), or `messages`
  (a list of `{"role", "content"}`);
- `answer` (string or number; optional, the reference a verifier compares against);
- `id` or `prompt_id` (optional; otherwise the id is a hash of the prompt and answer);
- `metadata` (an object, or a JSON string of one); `source` (optional, overrides the file's
  source name for the per-source breakdown).

A row that breaks these rules is reported with its file and line (see `report.py`).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq

from miles_core.data.prompt import ROLES, Prompt, content_id
from miles_core.data.report import LoadReport, RowError
from miles_core.errors import MilesError
from miles_core.io import filesystem

__all__ = ["FILE_SUFFIXES", "read_prompt_file", "parse_row"]

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_TEXT_KEYS = ("prompt", "question", "text")
_KNOWN = {"id", "prompt_id", "prompt", "question", "text", "messages", "answer", "metadata", "source"}


class RowProblem(ValueError):
    """Why one row is malformed; turned into a `RowError` with file and line by the reader."""


def read_prompt_file(url: str, source: str | None = None, strict: bool = True) -> tuple[list[Prompt], LoadReport]:
    """Read one JSONL or Parquet prompt file.

    strict: raise a `MilesError` listing the malformed rows; otherwise skip them and return them
    in the report. `source` defaults to the file's name without its suffix.
    """
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise MilesError(f"prompt file {url} does not exist")
    name = source or posixpath.splitext(posixpath.basename(path))[0]
    report = LoadReport(source=name)
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for line, row in _rows(fs, path, url):
        report.n_rows += 1
        try:
            if isinstance(row, RowProblem):
                raise row
            prompt = parse_row(row, name)
            prompt = _dedupe_id(prompt, seen, explicit=_explicit_id(row) is not None)
        except RowProblem as e:
            report.malformed.append(RowError(url, line, str(e)))
            continue
        prompts.append(prompt)
    report.n_loaded = len(prompts)
    if strict:
        report.raise_if_malformed()
    return prompts, report


def _rows(fs, path: str, url: str) -> Iterator[tuple[int, Any]]:
    """(1-based line, row dict or RowProblem) for each non-blank row of the file."""
    if path.endswith(".parquet"):
        with fs.open(path, "rb") as f:
            try:
                table = pq.read_table(f)
            except Exception as e:
                raise MilesError(f"{url} is not a readable Parquet file: {e}") from e
        yield from enumerate(table.to_pylist(), start=1)
    elif path.endswith((".jsonl", ".json")):
        with fs.open(path, "rt", encoding="utf-8") as f:
            for line, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    yield line, json.loads(raw)
                except json.JSONDecodeError as e:
                    yield line, RowProblem(f"invalid JSON ({e.msg} at column {e.colno})")
    else:
        raise MilesError(f"{url}: unknown prompt file type; use one of {', '.join(FILE_SUFFIXES)}")


def parse_row(row: Any, source: str) -> Prompt:
    """Turn one decoded row into a `Prompt`, or raise `RowProblem` saying what is wrong."""
    if not isinstance(row, dict):
        raise RowProblem(f"row is a {type(row).__name__}, expected an object")
    text, messages = _prompt_fields(row)
    answer = _answer(row.get("answer"))
    metadata = _metadata(row)
    row_source = row.get("source") if row.get("source") is not None else source
    if not isinstance(row_source, str) or not row_source:
        raise RowProblem("`source` must be a non-empty string")
    pid = _explicit_id(row)
    if pid is None:
        pid = content_id(row_source, text if messages is None else list(messages), answer)
    return Prompt(pid, row_source, answer, text=text, messages=messages, metadata=metadata)


def _prompt_fields(row: dict) -> tuple[str | None, tuple[dict[str, str], ...] | None]:
    if row.get("messages") is not None:
        return None, _messages(row["messages"])
    for key in _TEXT_KEYS:
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, list):
            return None, _messages(value)
        if not isinstance(value, str) or not value.strip():
            raise RowProblem(f"`{key}` must be a non-empty string or a list of messages")
        return value, None
    raise RowProblem("no prompt: expected one of `prompt`, `question`, `text` or `messages`")


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise RowProblem("`messages` must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise RowProblem(f"message {i} must be an object with a string `content`")
        if m.get("role") not in ROLES:
            raise RowProblem(f"message {i} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _answer(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowProblem(f"`answer` must be a string or a number, got {type(value).__name__}")
    return str(value)


def _metadata(row: dict) -> dict[str, Any]:
    meta = row.get("metadata")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError as e:
            raise RowProblem(f"`metadata` is a string but not JSON ({e.msg})") from None
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise RowProblem(f"`metadata` must be an object, got {type(meta).__name__}")
    extra = {k: v for k, v in row.items() if k not in _KNOWN}
    return {**extra, **meta}


def _explicit_id(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    value = row.get("prompt_id", row.get("id"))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise RowProblem("`id`/`prompt_id` must be a non-empty string or an integer")
    return str(value)


def _dedupe_id(prompt: Prompt, seen: dict[str, int], explicit: bool) -> Prompt:
    """A given id used twice is an error; a repeated identical prompt gets a `#k` suffix."""
    count = seen.get(prompt.prompt_id, 0)
    seen[prompt.prompt_id] = count + 1
    if count == 0:
        return prompt
    if explicit:
        raise RowProblem(f"duplicate id {prompt.prompt_id!r}")
    return Prompt(
        f"{prompt.prompt_id}#{count}",
        prompt.source,
        prompt.answer,
        prompt.text,
        prompt.messages,
        prompt.metadata,
    )
