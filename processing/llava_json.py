"""Read and write the LLaVA JSON instruction format.

A LLaVA record looks like::

    {"id": "000000033471", "image": "000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                       {"from": "gpt", "value": "A bus."}]}

`load_llava_json` turns a LLaVA JSON (or JSONL) file into a `datasets.Dataset` that TRL's `SFTTrainer`
takes directly:

- `id` (str)
- `messages`: `[{"role": "user"|"assistant", "content": [{"type": "image", "text": None},
  {"type": "text", "text": "..."}]}]`; the `<image>` placeholder becomes an image part standing exactly
  where it stood in the text (before or after the question). Image parts carry no `image` key so that
  TRL's `prepare_multimodal_messages` fills them from `images`.
- `images`: `List(Image())` holding the file path, decoded lazily; `[]` for text-only records
  (LLaVA-1.5 mix665k keeps text-only conversations without an `image` field).
- `image_file` (str or None): the `image` path exactly as written in the file. (Not called `image`: TRL
  reads an `image` column as a single image and would replace `images` with it.)
- `llava_meta` (str, JSON): whatever else is needed to write the record back byte-for-byte equivalent
  (extra top-level fields, key order, non-default whitespace around `<image>`). Usually `"{}"`.

`write_llava_json` is the inverse: JSON -> Dataset -> JSON gives back the input records.

Bad records raise `LlavaDataError` (file, record id and field in the message) under `policy="error"`;
under `policy="skip"` they are counted by reason and a summary is printed at the end. Call with
`return_report=True` to also get the `SkipReport`.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import datasets
from PIL import Image, UnidentifiedImageError

IMAGE_TOKEN = "<image>"
ROLE_TO_CHAT = {"human": "user", "gpt": "assistant"}
CHAT_TO_ROLE = {"user": "human", "assistant": "gpt"}
POLICIES = ("error", "skip")
PLACEMENTS = ("as_is", "random")

# Stable reason names: they key the skip counts and are part of every error message.
REASONS = (
    "invalid_json",
    "invalid_utf8",
    "not_an_object",
    "missing_field",
    "bad_role",
    "empty_value",
    "image_placeholder_count",
    "placeholder_without_image",
    "unsafe_image_path",
    "missing_image",
    "unreadable_image",
)

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "messages": datasets.List(
            {
                "role": datasets.Value("string"),
                "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
            }
        ),
        "images": datasets.List(datasets.Image()),
        "image_file": datasets.Value("string"),
        "llava_meta": datasets.Value("string"),
    }
)


class LlavaDataError(ValueError):
    """A LLaVA JSON record (or the file itself) is invalid. The message names file, record id and field."""

    def __init__(self, file: str | os.PathLike, record_id: str | None, field: str, reason: str, detail: str):
        self.file = str(file)
        self.record_id = record_id
        self.field = field
        self.reason = reason
        self.detail = detail
        where = f"record {record_id!r}" if record_id is not None else "file"
        super().__init__(f"{self.file}: {where}, field '{field}': {detail} [{reason}]")


@dataclass
class SkipReport:
    """What `load_llava_json(..., policy="skip")` kept and dropped, by reason."""

    file: str
    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def add(self, error: LlavaDataError, max_examples: int = 3) -> None:
        self.skipped[error.reason] += 1
        shown = self.examples.setdefault(error.reason, [])
        if len(shown) < max_examples:
            shown.append(str(error))

    def summary(self) -> str:
        lines = [f"{self.file}: kept {self.kept} of {self.total} records, skipped {self.num_skipped}"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  {reason}: {count}")
            lines.extend(f"    e.g. {example}" for example in self.examples.get(reason, []))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Reading the file
# ---------------------------------------------------------------------------------------------------


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson")


def _iter_raw_records(path: Path, report: SkipReport, policy: str) -> Iterator[tuple[int, Any]]:
    """Yield (index, parsed record). A broken JSONL line is a record-level error; a broken JSON file is fatal."""
    if _is_jsonl(path):
        index = 0
        # Bytes, decoded line by line: one line with invalid UTF-8 is one bad record, not a crash of the whole file.
        with open(path, "rb") as f:
            for line_number, raw_line in enumerate(f, start=1):
                if not raw_line.strip():
                    continue
                try:
                    record = json.loads(raw_line.decode("utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    if isinstance(e, UnicodeDecodeError):
                        reason, detail = "invalid_utf8", f"JSONL line {line_number} is not valid UTF-8 (byte {e.start})"
                    else:
                        reason, detail = "invalid_json", f"broken JSONL line {line_number}: {e.msg}"
                    report.total += 1
                    _handle(LlavaDataError(path, None, f"line {line_number}", reason, detail), report, policy)
                    continue
                yield index, record
                index += 1
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise LlavaDataError(path, None, f"line {line}", "invalid_utf8", f"not valid UTF-8 at line {line} (byte {e.start})") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise LlavaDataError(
            path, None, f"line {e.lineno}", "invalid_json", f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    if not isinstance(records, list):
        raise LlavaDataError(path, None, "<top level>", "not_an_object", "expected a JSON list of records")
    yield from enumerate(records)


def _handle(error: LlavaDataError, report: SkipReport, policy: str) -> None:
    if policy == "error":
        raise error
    report.add(error)


# ---------------------------------------------------------------------------------------------------
# Validation + conversion of one record
# ---------------------------------------------------------------------------------------------------


def _split_placeholder(value: str) -> tuple[list[dict], list[str] | None]:
    """'<image>\\nQ' -> ([image, text Q], whitespace around the placeholder or None when it is the default)."""
    if IMAGE_TOKEN not in value:
        return [{"type": "text", "text": value}], None
    before, after = value.split(IMAGE_TOKEN, 1)
    before_text, after_text = before.rstrip(), after.lstrip()
    ws = [before[len(before_text) :], after[: len(after) - len(after_text)]]
    parts: list[dict] = []
    if before_text:
        parts.append({"type": "text", "text": before_text})
    parts.append({"type": "image", "text": None})
    if after_text:
        parts.append({"type": "text", "text": after_text})
    default_ws = ["\n" if before_text else "", "\n" if after_text else ""]
    return parts, (None if ws == default_ws else ws)


def _check_image_file(
    path: Path, record_id: str, image: Any, image_folder: Path, check_images: bool
) -> tuple[str, LlavaDataError | None]:
    """Return (absolute path, error or None). Paths must stay inside the image folder."""

    def fail(reason: str, detail: str) -> tuple[str, LlavaDataError]:
        return "", LlavaDataError(path, record_id, "image", reason, detail)

    if not isinstance(image, str) or not image.strip():
        return fail("missing_field", f"expected a relative file path, got {image!r}")
    if os.path.isabs(image) or image.startswith(("/", "\\")):
        return fail("unsafe_image_path", f"absolute path {image!r} is not allowed; give it relative to the image folder")
    # Lexical check (not realpath) so that symlinked sub-folders inside the image folder keep working.
    full = os.path.normpath(os.path.join(image_folder, image))
    root = os.path.normpath(image_folder)
    if os.path.commonpath([full, root]) != root:
        return fail("unsafe_image_path", f"path {image!r} escapes the image folder {str(image_folder)!r}")
    if not os.path.isfile(full):
        return fail("missing_image", f"image file not found: {full}")
    if check_images:
        try:
            with Image.open(full) as im:
                im.verify()
        # DecompressionBombError: a header claiming more than 2x Image.MAX_IMAGE_PIXELS, refused before decoding.
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
            return fail("unreadable_image", f"cannot read image {full}: {type(e).__name__}: {e}")
    return os.path.abspath(full), None


def _convert_record(
    path: Path,
    index: int,
    record: Any,
    image_folder: Path,
    *,
    image_placement: str,
    seed: int,
    check_images: bool,
) -> dict:
    """Validate one LLaVA record and turn it into a dataset row. Raises LlavaDataError."""
    if not isinstance(record, dict):
        raise LlavaDataError(path, f"#{index}", "<record>", "not_an_object", f"expected an object, got {type(record).__name__}")
    meta: dict[str, Any] = {}
    raw_id = record.get("id")
    if raw_id is None:
        # Some user files lack ids; name the record by its position instead of refusing it.
        record_id = f"#{index}"
        meta["id_missing"] = True
    else:
        record_id = str(raw_id)
        if not isinstance(raw_id, str):
            meta["id"] = raw_id

    def fail(field_name: str, reason: str, detail: str) -> LlavaDataError:
        return LlavaDataError(path, record_id, field_name, reason, detail)

    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise fail("conversations", "missing_field", "expected a non-empty list of turns")

    has_image = record.get("image") is not None
    messages, placeholders, turn_extra, image_ws = [], [], {}, None
    for t, turn in enumerate(conversations):
        where = f"conversations[{t}]"
        if not isinstance(turn, dict):
            raise fail(where, "not_an_object", f"expected an object, got {type(turn).__name__}")
        speaker, value = turn.get("from"), turn.get("value")
        expected = "human" if t % 2 == 0 else "gpt"
        if speaker != expected:
            raise fail(f"{where}.from", "bad_role", f"expected {expected!r} (turns alternate human/gpt, human first), got {speaker!r}")
        if not isinstance(value, str):
            raise fail(f"{where}.value", "missing_field", f"expected a string, got {type(value).__name__}")
        if not value.replace(IMAGE_TOKEN, "").strip() and not (speaker == "human" and IMAGE_TOKEN in value):
            raise fail(f"{where}.value", "empty_value", "empty text")
        count = value.count(IMAGE_TOKEN)
        if count:
            placeholders.append((t, count))
        if count and not has_image:
            raise fail(f"{where}.value", "placeholder_without_image", f"'{IMAGE_TOKEN}' in a record without 'image'")
        if count and speaker == "gpt":
            raise fail(f"{where}.value", "image_placeholder_count", f"'{IMAGE_TOKEN}' may only appear in a human turn")
        parts, ws = _split_placeholder(value) if count == 1 else ([{"type": "text", "text": value}], None)
        if ws is not None:
            image_ws = ws
        extra_keys = {k: v for k, v in turn.items() if k not in ("from", "value")}
        if extra_keys:
            turn_extra[str(t)] = extra_keys
        messages.append({"role": ROLE_TO_CHAT[speaker], "content": parts})
    if len(conversations) % 2 == 1:
        raise fail(f"conversations[{len(conversations) - 1}].from", "bad_role", "the last human turn has no gpt answer")

    images: list[dict] = []
    if has_image:
        total = sum(count for _, count in placeholders)
        if total != 1:
            raise fail("conversations", "image_placeholder_count", f"expected exactly one '{IMAGE_TOKEN}' for the image, found {total}")
        image_path, error = _check_image_file(path, record_id, record["image"], image_folder, check_images)
        if error is not None:
            raise error
        images.append({"path": image_path, "bytes": None})
        if image_placement == "random":
            _place_at_random(messages, seed, record_id, index)
            image_ws = None  # the text was moved, so the original whitespace no longer applies

    known = ("id", "image", "conversations")
    extra = {k: v for k, v in record.items() if k not in known}
    if extra:
        meta["extra"] = extra
    default_order = [k for k in known if k in record] + list(extra)
    if list(record) != default_order:
        meta["keys"] = list(record)
    if "image" in record and record["image"] is None:
        meta["image_null"] = True
    if turn_extra:
        meta["turn_extra"] = turn_extra
    if image_ws is not None:
        meta["image_ws"] = image_ws
    return {
        "id": record_id,
        "messages": messages,
        "images": images,
        "image_file": record["image"] if has_image else None,
        "llava_meta": json.dumps(meta, ensure_ascii=False) if meta else "{}",
    }


def _place_at_random(messages: list[dict], seed: int, record_id: str, index: int) -> None:
    """The paper's first-turn rule: image before or after the first question, seeded per record."""
    first = messages[0]["content"]
    if not any(p["type"] == "image" for p in first):
        return
    texts = [p for p in first if p["type"] == "text"]
    if len(texts) != 1:
        return  # text on both sides of the image (or none): nothing to move
    rng = random.Random(f"{seed}/{index}/{record_id}")
    image = {"type": "image", "text": None}
    messages[0]["content"] = [image, texts[0]] if rng.random() < 0.5 else [texts[0], image]


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def load_llava_json(
    path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    *,
    policy: str = "error",
    image_placement: str = "as_is",
    seed: int = 0,
    check_images: bool = True,
    return_report: bool = False,
) -> datasets.Dataset | tuple[datasets.Dataset, SkipReport]:
    """Load a LLaVA JSON (`.json` list) or JSONL (`.jsonl`) file as a TRL-ready `datasets.Dataset`.

    Args:
        path: the LLaVA JSON/JSONL file.
        image_folder: folder the `image` paths are relative to (default: the file's folder).
        policy: `"error"` raises `LlavaDataError` on the first bad record; `"skip"` drops bad records,
            counts them by reason and prints a summary at the end.
        image_placement: `"as_is"` keeps `<image>` where it stood; `"random"` puts the image before or
            after the first question at random (deterministic by `seed` and record).
        seed: seed for `image_placement="random"`.
        check_images: open and verify every image with PIL (catches corrupt files up front).
        return_report: also return the `SkipReport` as `(dataset, report)`.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if image_placement not in PLACEMENTS:
        raise ValueError(f"image_placement must be one of {PLACEMENTS}, got {image_placement!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA JSON file not found: {path}")
    folder = Path(image_folder) if image_folder is not None else path.parent
    report = SkipReport(file=str(path))
    rows = []
    for index, record in _iter_raw_records(path, report, policy):
        report.total += 1
        try:
            row = _convert_record(
                path, index, record, folder, image_placement=image_placement, seed=seed, check_images=check_images
            )
        except LlavaDataError as error:
            _handle(error, report, policy)
            continue
        rows.append(row)
    report.kept = len(rows)
    columns = {name: [row[name] for row in rows] for name in FEATURES}
    dataset = datasets.Dataset.from_dict(columns, features=FEATURES)
    if policy == "skip":
        print(report.summary())
    return (dataset, report) if return_report else dataset


def _content_to_value(content: Any, image_ws: list[str] | None) -> str:
    """Typed parts back to a LLaVA string; the image part becomes `<image>` with its whitespace."""
    if isinstance(content, str):
        return content
    parts = list(content)
    pieces: list[str] = []
    for i, part in enumerate(parts):
        if part["type"] == "text":
            if pieces and i > 0 and parts[i - 1]["type"] == "text":
                pieces.append("\n")  # two adjacent text parts (not produced by the reader)
            pieces.append(part["text"])
        elif part["type"] == "image":
            text_before = any(p["type"] == "text" for p in parts[:i])
            text_after = any(p["type"] == "text" for p in parts[i + 1 :])
            before, after = image_ws or ["\n" if text_before else "", "\n" if text_after else ""]
            pieces.append(f"{before}{IMAGE_TOKEN}{after}")
        else:
            raise ValueError(f"unsupported content part type {part['type']!r}")
    return "".join(pieces)


def row_to_llava_record(row: dict) -> dict:
    """One dataset row (as produced by `load_llava_json`, or any `messages` row) back to a LLaVA record."""
    meta = json.loads(row.get("llava_meta") or "{}")
    conversations = []
    for t, message in enumerate(row["messages"]):
        if message["role"] not in CHAT_TO_ROLE:
            raise ValueError(f"record {row.get('id')!r}: role {message['role']!r} has no LLaVA equivalent")
        turn = {"from": CHAT_TO_ROLE[message["role"]], "value": _content_to_value(message["content"], meta.get("image_ws"))}
        turn.update(meta.get("turn_extra", {}).get(str(t), {}))
        conversations.append(turn)
    fields: dict[str, Any] = {}
    if not meta.get("id_missing"):
        fields["id"] = meta.get("id", row.get("id"))
    image = row.get("image_file")
    if image is None and isinstance(row.get("image"), str):
        image = row["image"]  # rows that carry the LLaVA field name
    if image is None and row.get("images"):
        # Rows from elsewhere (no `image` column): fall back to the stored file name.
        first = row["images"][0]
        image = os.path.basename(first.get("path") or "") if isinstance(first, dict) else None
    if image is not None:
        fields["image"] = image
    elif meta.get("image_null"):
        fields["image"] = None
    fields["conversations"] = conversations
    fields.update(meta.get("extra", {}))
    order = meta.get("keys") or list(fields)
    return {key: fields[key] for key in order if key in fields}


def _iter_rows(dataset_or_records: datasets.Dataset | Iterable[dict]) -> Iterator[dict]:
    if isinstance(dataset_or_records, datasets.Dataset):
        ds = dataset_or_records
        if "image_file" in ds.column_names and "images" in ds.column_names:
            ds = ds.remove_columns("images")  # never decode images just to write JSON
        elif "images" in ds.column_names:
            ds = ds.cast_column("images", datasets.List(datasets.Image(decode=False)))
        yield from ds
    else:
        yield from dataset_or_records


def write_llava_json(dataset_or_records: datasets.Dataset | Iterable[dict], path: str | os.PathLike, *, indent: int | None = None) -> int:
    """Write dataset rows back to LLaVA JSON (`.json`) or JSONL (`.jsonl`); returns the record count.

    Rows produced by `load_llava_json` come back exactly as they were read (extra fields, text-only
    records and `<image>` after the text included).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = (row_to_llava_record(row) for row in _iter_rows(dataset_or_records))
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        if _is_jsonl(path):
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        else:
            # Stream a JSON list so that large datasets need not be held as one string.
            f.write("[")
            for record in records:
                f.write(("," if count else "") + ("\n" if indent is not None else ""))
                f.write(json.dumps(record, ensure_ascii=False, indent=indent))
                count += 1
            f.write("\n]\n" if indent is not None else "]\n")
    return count
