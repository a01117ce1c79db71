"""GPT-assisted instruction generation (the LLaVA paper's pipeline), runnable and resumable.

For each image of a COCO-format annotation set and each instruction type (conversation, detail,
complex) a teacher gets the type's system message, its few-shot examples and the image's symbolic
context (captions + normalised boxes), and its reply is parsed into LLaVA turns:

- conversation -> the teacher's alternating Question/Answer pairs;
- detail -> a question sampled from `prompts/detail_questions.txt` + the teacher's description;
- complex -> the teacher's one reasoning question and its answer (as in the paper, the teacher writes
  the question too: a generic sampled instruction would not call for reasoning).

Replies that do not parse are counted and not written; a grounding filter drops samples whose answers
mention object categories that are not in the image's annotations (the paper names ungrounded
generation as a limitation). Samples are appended to a JSONL file keyed by (image id, type), each
flushed as it is written (fsync every `fsync_interval` s): a killed run resumes with no duplicate and
no lost sample.

    python -m processing.generate --annotations-dir world/annotations --split train \\
        --types conversation detail complex --teacher symbolic --output data/instruct.jsonl \\
        --llava-json data/instruct.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from processing.coco import ImageContext, find_annotation_files, load_coco_contexts, load_json
from processing.prompts import INSTRUCTION_TYPES, build_messages, load_instructions, load_prompts
from processing.teachers import Teacher, TeacherError

# ---------------------------------------------------------------------------------------------------
# Parsing teacher replies
# ---------------------------------------------------------------------------------------------------


class ReplyParseError(ValueError):
    """A teacher reply does not follow the requested format."""


# A label at the start of a line, tolerating markdown decoration such as "**Question:**" or "- Q:".
_LABEL = re.compile(
    r"^[ \t]*(?:[-*>#]+[ \t]*)?\**[ \t]*(question|answer|description|q|a)[ \t]*\**[ \t]*[:：][ \t]*\**[ \t]*",
    re.IGNORECASE | re.MULTILINE,
)
_LABEL_NAMES = {"q": "question", "a": "answer"}


def _blocks(text: str) -> list[tuple[str, str]]:
    matches = list(_LABEL.finditer(text))
    blocks = []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        label = match.group(1).lower()
        blocks.append((_LABEL_NAMES.get(label, label), text[match.end() : end].strip()))
    return blocks  # a preamble before the first label ("Sure! Here it is:") is ignored


def parse_reply(kind: str, text: str) -> list[tuple[str | None, str]]:
    """Parse a teacher reply into (question, answer) pairs; the detail question is None (sampled later).

    Formats: conversation = alternating `Question:` / `Answer:` (an unanswered trailing question, e.g.
    cut by max_tokens, is dropped); detail = `Description: ...`; complex = `Question:` then `Answer:`.
    Raises `ReplyParseError` otherwise.
    """
    if not isinstance(text, str) or not text.strip():
        raise ReplyParseError("empty reply")
    if "<image>" in text:
        raise ReplyParseError("reply contains the <image> placeholder")
    blocks = _blocks(text)
    if not blocks:
        raise ReplyParseError("no Question:/Answer:/Description: labels found")
    if any(not body for _, body in blocks):
        raise ReplyParseError("a labelled block is empty")
    labels = [label for label, _ in blocks]
    if kind == "detail":
        if len(blocks) != 1 or labels[0] not in ("description", "answer"):
            raise ReplyParseError(f"expected one 'Description:' block, got labels {labels}")
        return [(None, blocks[0][1])]
    if "description" in labels:
        raise ReplyParseError(f"unexpected 'Description:' in a {kind} reply")
    if labels and labels[-1] == "question" and len(labels) > 1:
        blocks = blocks[:-1]  # truncated reply: drop the unanswered question
        labels = labels[:-1]
    if len(blocks) % 2 or any(label != ("question" if i % 2 == 0 else "answer") for i, label in enumerate(labels)):
        raise ReplyParseError(f"expected alternating Question/Answer blocks, got labels {labels}")
    pairs = [(blocks[i][1], blocks[i + 1][1]) for i in range(0, len(blocks), 2)]
    if kind == "complex":
        return pairs[:1]
    return pairs


# ---------------------------------------------------------------------------------------------------
# Grounding filter
# ---------------------------------------------------------------------------------------------------

_NEGATION = re.compile(r"\b(no|not|none|never|without|neither|nor|nothing|cannot)\b|n't\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_IRREGULAR_PLURALS = {"person": "people", "mouse": "mice", "knife": "knives", "wine glass": "wine glasses"}


class GroundingFilter:
    """Finds mentions of known object categories that the image's annotations do not contain.

    Only answers are checked (questions may legitimately ask about absent things), and sentences with a
    negation ("No, there is no green square.") are not claims of presence. With `split_words=True`
    (the synthetic scene world, categories "<color> <shape>") the single words of a category count too,
    so "a triangle" or "something red" is caught when no triangle or nothing red is annotated.
    """

    def __init__(self, vocabulary: Iterable[str], split_words: bool = False):
        self.split_words = split_words
        terms = {t.lower() for t in vocabulary}
        if split_words:
            terms |= {w for t in terms for w in t.split()}
        self.terms = terms
        forms: dict[str, str] = {}
        for term in terms:
            forms[term] = term
            forms[term + "s"] = term
            forms[term + "es"] = term
            if term in _IRREGULAR_PLURALS:
                forms[_IRREGULAR_PLURALS[term]] = term
        self._form_to_term = forms
        # Longest first, so that "red circle" wins over "red" at the same position.
        alternatives = sorted(forms, key=len, reverse=True)
        pattern = "|".join(r"\s+".join(map(re.escape, form.split())) for form in alternatives)
        self._pattern = re.compile(rf"\b(?:{pattern})\b", re.IGNORECASE) if alternatives else None

    def present_terms(self, categories: Iterable[str]) -> set[str]:
        present = {c.lower() for c in categories}
        if self.split_words:
            present |= {w for c in present for w in c.split()}
        return present

    def ungrounded(self, texts: Iterable[str], categories: Iterable[str]) -> list[str]:
        """Category terms claimed in `texts` but absent from `categories` (sorted, unique)."""
        if self._pattern is None:
            return []
        present = self.present_terms(categories)
        found = set()
        for text in texts:
            for sentence in _SENTENCE_END.split(text):
                if _NEGATION.search(sentence):
                    continue
                for match in self._pattern.finditer(sentence):
                    term = self._form_to_term[" ".join(match.group(0).lower().split())]
                    if term not in present:
                        found.add(term)
        return sorted(found)


def grounding_filter_for(instances_path: str | os.PathLike) -> GroundingFilter:
    """The filter for an annotation set: its category names (the 80 COCO names for real COCO)."""
    from processing.synthetic import SCENE_WORLD_DESCRIPTION

    data = load_json(instances_path)
    names = [c["name"] for c in data.get("categories", [])]
    scene_world = (data.get("info") or {}).get("description") == SCENE_WORLD_DESCRIPTION
    return GroundingFilter(names, split_words=scene_world)


# ---------------------------------------------------------------------------------------------------
# Output file: append-only JSONL keyed by (image id, type)
# ---------------------------------------------------------------------------------------------------


def record_key(record: dict) -> tuple[str, str]:
    return str(record["image_id"]), record["type"]


def read_done_keys(path: str | os.PathLike, repair: bool = True) -> tuple[set[tuple[str, str]], int]:
    """Keys already in the output and the number of bytes of a torn last line that were cut off.

    A run killed mid-write can leave a last line without its newline; it is truncated away (when
    `repair`) and the sample is generated again. A broken line anywhere else is not ours to guess
    about, so it is an error naming the line.
    """
    path = Path(path)
    if not path.exists():
        return set(), 0
    keys: set[tuple[str, str]] = set()
    good_end = 0
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    # After split, the last element is b"" when the file ends with a newline, else the torn tail.
    for number, line in enumerate(lines[:-1], start=1):
        if line.strip():
            try:
                keys.add(record_key(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: line {number} is not a generated record ({e}); fix or remove it") from None
        good_end += len(line) + 1
    torn = len(data) - good_end
    if torn and repair:
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return keys, torn


class _JsonlAppender:
    """Appends one record per line.

    Every record is flushed to the OS at once, so a killed process loses at most the line being written
    (a torn line that the next run cuts off). fsync runs at most every `fsync_interval` seconds and on
    close (0: after every record): it only matters for an OS crash or power loss, which then loses at
    most that window of records, and a resume regenerates them. Per-record fsync costs milliseconds
    per record on ordinary disks, longer than the symbolic teacher needs to write a sample.
    """

    def __init__(self, path: Path, fsync_interval: float | None = 0.5):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync_interval = fsync_interval
        self.last_sync = time.monotonic()
        self.file = open(path, "a", encoding="utf-8")
        try:  # one writer per output file; a second concurrent run would interleave lines
            import fcntl

            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except OSError:
            self.file.close()
            raise RuntimeError(f"{path} is being written by another generation run") from None

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        if self.fsync_interval is not None and time.monotonic() - self.last_sync >= self.fsync_interval:
            os.fsync(self.file.fileno())
            self.last_sync = time.monotonic()

    def close(self) -> None:
        self.file.flush()
        if self.fsync_interval is not None:
            os.fsync(self.file.fileno())
        self.file.close()


# ---------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------


@dataclass
class GenerationStats:
    """Counts of one run. `requested == already_done + written + unparsable + ungrounded + teacher_errors`."""

    teacher: str = ""
    requested: int = 0
    already_done: int = 0
    written: int = 0
    unparsable: int = 0
    ungrounded: int = 0
    teacher_errors: int = 0
    torn_bytes_dropped: int = 0
    written_per_type: Counter = field(default_factory=Counter)
    ungrounded_terms: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, reason: str, message: str, keep: int = 3) -> None:
        shown = self.examples.setdefault(reason, [])
        if len(shown) < keep:
            shown.append(message[:300])

    def to_dict(self) -> dict:
        data = asdict(self)
        data["written_per_type"] = dict(self.written_per_type)
        data["ungrounded_terms"] = dict(self.ungrounded_terms.most_common(50))
        return data

    def summary(self) -> str:
        lines = [
            f"teacher {self.teacher}: {self.requested} (image, type) pairs requested, {self.already_done} already done",
            f"  written {self.written} {dict(sorted(self.written_per_type.items()))}",
            f"  unparsable replies {self.unparsable}, ungrounded samples {self.ungrounded}, teacher errors {self.teacher_errors}",
        ]
        if self.ungrounded_terms:
            lines.append(f"  most frequent ungrounded terms: {dict(self.ungrounded_terms.most_common(10))}")
        if self.torn_bytes_dropped:
            lines.append(f"  resumed after a torn last line ({self.torn_bytes_dropped} bytes dropped and regenerated)")
        for reason, shown in self.examples.items():
            lines.extend(f"  {reason} e.g.: {message}" for message in shown)
        return "\n".join(lines)


def build_record(context: ImageContext, kind: str, pairs: list[tuple[str, str]], rng: random.Random, image_placement: str) -> dict:
    """LLaVA record of one sample; `<image>` goes before or after the first question (paper's rule)."""
    conversations = []
    for i, (question, answer) in enumerate(pairs):
        if i == 0:
            before = image_placement == "before" or (image_placement == "random" and rng.random() < 0.5)
            question = f"<image>\n{question}" if before else f"{question}\n<image>"
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {
        "id": f"{context.image_id}_{kind}",
        "image": context.file_name,
        "conversations": conversations,
        "type": kind,
        "image_id": context.image_id,
    }


class _Job:
    def __init__(self, context: ImageContext, kind: str):
        self.context, self.kind = context, kind


def generate_instructions(
    contexts: list[ImageContext],
    teacher: Teacher,
    output: str | os.PathLike,
    *,
    types: Iterable[str] = INSTRUCTION_TYPES,
    concurrency: int = 8,
    grounding: GroundingFilter | None = None,
    prompts_dir: str | os.PathLike | None = None,
    seed: int = 0,
    image_placement: str = "random",
    progress: bool = True,
    fsync_interval: float | None = 0.5,
    max_consecutive_errors: int = 20,
) -> GenerationStats:
    """Generate samples for every (context, type) not yet in `output` and append them to it.

    Args:
        contexts: images to generate for (see `processing.coco.load_coco_contexts`).
        teacher: any `Teacher`; called from up to `concurrency` threads at once.
        output: JSONL file; existing records are kept and their (image id, type) skipped.
        types: instruction types among "conversation", "detail", "complex".
        grounding: drop samples whose answers mention absent categories (None: no filter).
        prompts_dir: alternative prompts folder (default: `processing/prompts`).
        seed: seeds the sampled detail instruction and the image placement per (image, type).
        image_placement: "random" (paper), "before" or "after" the first question.
        fsync_interval: every record is flushed at once; fsync at most this often in seconds
            (0: after every record, None: never).
        max_consecutive_errors: abort (records kept, resumable) after this many teacher errors in a row,
            e.g. a wrong key or a server that is down.
    Returns the run's `GenerationStats` (also printed).
    """
    from tqdm.auto import tqdm

    types = list(types)
    unknown = [t for t in types if t not in INSTRUCTION_TYPES]
    if unknown:
        raise ValueError(f"unknown instruction types {unknown}; choose from {INSTRUCTION_TYPES}")
    if image_placement not in ("random", "before", "after"):
        raise ValueError(f"image_placement must be random, before or after, got {image_placement!r}")
    output = Path(output)
    prompts = {kind: load_prompts(kind, prompts_dir) for kind in types}
    detail_questions = load_instructions("detail", prompts_dir) if "detail" in types else []

    done, torn = read_done_keys(output)
    stats = GenerationStats(teacher=getattr(teacher, "name", type(teacher).__name__), torn_bytes_dropped=torn)
    jobs = [_Job(c, kind) for c in contexts for kind in types]
    stats.requested = len(jobs)
    pending = [job for job in jobs if (str(job.context.image_id), job.kind) not in done]
    stats.already_done = len(jobs) - len(pending)

    def work(job: _Job) -> tuple[str, object]:
        messages = build_messages(prompts[job.kind], job.context.to_prompt())
        try:
            reply = teacher.complete(messages)
        except Exception as e:  # noqa: BLE001 - any teacher failure is counted, the run goes on
            return "teacher_error", f"{type(e).__name__}: {e}"
        try:
            pairs = parse_reply(job.kind, reply)
        except ReplyParseError as e:
            return "unparsable", f"{e}: {reply!r}"
        rng = random.Random(f"generate/{seed}/{job.context.image_id}/{job.kind}")
        if job.kind == "detail":
            pairs = [(rng.choice(detail_questions), pairs[0][1])]
        if grounding is not None:
            missing = grounding.ungrounded([answer for _, answer in pairs], job.context.categories)
            if missing:
                return "ungrounded", missing
        return "ok", build_record(job.context, job.kind, pairs, rng, image_placement)

    writer = _JsonlAppender(output, fsync_interval=fsync_interval)
    bar = tqdm(total=len(pending), desc=f"generate ({stats.teacher})", unit="sample", disable=not progress)
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    queue = iter(pending)
    in_flight: set = set()
    consecutive_errors = 0

    def submit_next() -> None:
        job = next(queue, None)
        if job is not None:
            future = pool.submit(work, job)
            future.job = job  # type: ignore[attr-defined]
            in_flight.add(future)

    try:
        # A bounded window of submitted jobs keeps memory flat for hundreds of thousands of images.
        for _ in range(2 * max(1, concurrency)):
            submit_next()
        while in_flight:
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                in_flight.discard(future)
                status, payload = future.result()
                job = future.job  # type: ignore[attr-defined]
                where = f"image {job.context.image_id} ({job.kind})"
                if status == "ok":
                    writer.write(payload)  # type: ignore[arg-type]
                    stats.written += 1
                    stats.written_per_type[job.kind] += 1
                    consecutive_errors = 0
                elif status == "teacher_error":
                    stats.teacher_errors += 1
                    stats.note(status, f"{where}: {payload}")
                    consecutive_errors += 1
                    if consecutive_errors >= max_consecutive_errors:
                        raise TeacherError(f"aborting after {consecutive_errors} teacher errors in a row; last: {payload}")
                else:
                    consecutive_errors = 0
                    if status == "unparsable":
                        stats.unparsable += 1
                    else:
                        stats.ungrounded += 1
                        stats.ungrounded_terms.update(payload)  # type: ignore[arg-type]
                    stats.note(status, f"{where}: {payload}")
                bar.update(1)
                submit_next()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        writer.close()
    print(stats.summary())
    return stats


def load_contexts(annotations_dir: str | os.PathLike, split: str, max_images: int | None = None) -> tuple[list[ImageContext], Path | None]:
    """Contexts of a split (first `max_images` by image id) and the instances file, if any."""
    captions_path, instances_path = find_annotation_files(annotations_dir, split)
    contexts = load_coco_contexts(captions_path, instances_path)
    return (contexts[:max_images] if max_images is not None else contexts), instances_path


def generate_from_annotations(
    annotations_dir: str | os.PathLike,
    split: str,
    teacher: Teacher,
    output: str | os.PathLike,
    *,
    max_images: int | None = None,
    grounding_filter: bool = True,
    **kwargs,
) -> GenerationStats:
    """`generate_instructions` on a COCO-format folder (`captions_{split}*.json` + `instances_{split}*.json`).

    Also writes cumulative counts (over resumed runs) to `{output}.stats.json`, which
    `processing.push_dataset` puts into the dataset card.
    """
    contexts, instances_path = load_contexts(annotations_dir, split, max_images)
    grounding = None
    if grounding_filter:
        if instances_path is None:
            print(f"no instances_{split}*.json in {annotations_dir}: grounding filter disabled", file=sys.stderr)
        else:
            grounding = grounding_filter_for(instances_path)
    stats = generate_instructions(contexts, teacher, output, grounding=grounding, **kwargs)
    _update_stats_file(Path(f"{output}.stats.json"), stats, source=str(annotations_dir), split=split)
    return stats


def _update_stats_file(path: Path, stats: GenerationStats, **info) -> dict:
    previous = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    totals = previous.get("totals", {})
    for name in ("written", "unparsable", "ungrounded", "teacher_errors"):
        totals[name] = totals.get(name, 0) + getattr(stats, name)
    per_type = Counter(totals.get("written_per_type", {}))
    per_type.update(stats.written_per_type)
    totals["written_per_type"] = dict(per_type)
    terms = Counter(totals.get("ungrounded_terms", {}))
    terms.update(stats.ungrounded_terms)
    totals["ungrounded_terms"] = dict(terms.most_common(50))
    teachers = sorted(set(previous.get("teachers", [])) | {stats.teacher})
    data = {**info, "teachers": teachers, "totals": totals, "runs": previous.get("runs", []) + [stats.to_dict()]}
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return data


def jsonl_to_llava_json(
    jsonl_path: str | os.PathLike, json_path: str | os.PathLike, *, fields: tuple[str, ...] = ("id", "image", "conversations", "type")
) -> int:
    """Convert the generation JSONL to a LLaVA JSON list (records `id`, `image`, `conversations`, `type`).

    Sorted by image id and type so that the result does not depend on completion order.
    """
    order = {kind: i for i, kind in enumerate(INSTRUCTION_TYPES)}
    records = []
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
    records.sort(key=lambda r: (str(r["image_id"]).zfill(20), order.get(r["type"], 99)))
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump([{k: r[k] for k in fields if k in r} for r in records], f, ensure_ascii=False)
    return len(records)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def make_teacher(args: argparse.Namespace) -> Teacher:
    from processing.teachers import OpenAICompatibleTeacher, SymbolicTeacher, TransformersTeacher

    if args.teacher == "symbolic":
        return SymbolicTeacher(seed=args.seed)
    if args.teacher == "openai":
        if not args.base_url or not args.model:
            raise SystemExit("--teacher openai needs --base-url and --model")
        return OpenAICompatibleTeacher(
            args.base_url, args.model, api_key_env=args.api_key_env, temperature=args.temperature,
            max_tokens=args.max_tokens, timeout=args.timeout,
        )
    if not args.model:
        raise SystemExit("--teacher transformers needs --model (a local path or model id)")
    return TransformersTeacher(args.model, max_new_tokens=args.max_tokens)


def main(argv: list[str] | None = None) -> GenerationStats:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations-dir", required=True, help="folder with captions_{split}*.json and instances_{split}*.json")
    parser.add_argument("--split", default="train", help="e.g. train (scene world) or train2017 (COCO)")
    parser.add_argument("--types", nargs="+", default=list(INSTRUCTION_TYPES), choices=INSTRUCTION_TYPES)
    parser.add_argument("--teacher", default="symbolic", choices=("symbolic", "openai", "transformers"))
    parser.add_argument("--output", required=True, help="JSONL output, appended to and resumed")
    parser.add_argument("--llava-json", help="also convert the JSONL to this LLaVA JSON file at the end")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-images", type=int)
    parser.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    parser.add_argument("--model", help="model name for --teacher openai, model path/id for --teacher transformers")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-placement", default="random", choices=("random", "before", "after"))
    parser.add_argument("--prompts-dir", help="edited copy of processing/prompts")
    parser.add_argument("--no-grounding-filter", action="store_true")
    parser.add_argument("--fsync-interval", type=float, default=0.5, help="seconds between fsyncs (0: every record); every record is flushed at once either way")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    stats = generate_from_annotations(
        args.annotations_dir,
        args.split,
        make_teacher(args),
        args.output,
        max_images=args.max_images,
        grounding_filter=not args.no_grounding_filter,
        types=args.types,
        concurrency=args.concurrency,
        prompts_dir=args.prompts_dir,
        seed=args.seed,
        image_placement=args.image_placement,
        progress=not args.no_progress,
        fsync_interval=args.fsync_interval,
    )
    if args.llava_json:
        count = jsonl_to_llava_json(args.output, args.llava_json)
        print(f"wrote {count} records to {args.llava_json}")
    return stats


if __name__ == "__main__":
    main()
