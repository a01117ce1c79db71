"""JSONL files that a killed run can resume: read back what is done, append one flushed line per result.

A run killed mid-write leaves at most one torn last line; `read_done` drops it (and truncates the file to the
last complete line) so that the resumed run appends cleanly instead of gluing a new record onto half an old one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL file. A line that is not a JSON object raises ValueError naming file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_number} is not valid JSON: {e.msg}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {line_number} is a {type(record).__name__}, expected a JSON object")
            records.append(record)
    return records


def read_done(path: str | os.PathLike, key: str) -> dict[str, dict]:
    """Records already in `path`, by `str(record[key])` (the last one wins); `{}` when the file does not exist.

    A torn last line (no trailing newline and not valid JSON) is cut off the file.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        last_newline = data.rfind(b"\n")
        tail = data[last_newline + 1 :]
        try:
            json.loads(tail)
            with open(path, "ab") as f:  # a complete record that only lacks its newline: keep it
                f.write(b"\n")
        except json.JSONDecodeError:
            with open(path, "r+b") as f:
                f.truncate(last_newline + 1)
    done = {}
    for line_number, record in enumerate(read_jsonl(path), start=1):
        if key not in record:
            raise ValueError(f"{path}: record {line_number} has no {key!r} field")
        done[str(record[key])] = record
    return done


class JsonlAppender:
    """Appends records to a JSONL file, one flushed (and fsynced) line each, so a crash loses at most one record."""

    def __init__(self, path: str | os.PathLike, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_jsonl(records, path: str | os.PathLike) -> Path:
    """Writes `records` to `path` (replacing it) atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
