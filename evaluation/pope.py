"""POPE-style object-hallucination probe from COCO-format instance annotations (Li et al., 2023).

For each sampled image: `num_positive` objects present in it ("yes" questions) and as many absent ones ("no"
questions), asked as "Is there a {object} in the image?". The absent objects are drawn three ways:

- `random`: uniformly among the categories absent from the image;
- `popular`: the absent categories found in the most images of the set;
- `adversarial`: the absent categories that co-occur most often with the image's objects (summed over them),
  ties broken by popularity, then name.

The sampled images and their positives are the same for the three strategies; only the negatives differ.
Everything is deterministic given the seed. Metrics: accuracy, precision, recall, F1 and yes-ratio with "yes" as
the positive class (`evaluation/metrics/pope`).

    python -m evaluation pope --annotations world/annotations/instances_eval.json --images world/images/eval \\
        --model ckpt --out results/pope
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from evaluation.jsonl import read_jsonl, write_jsonl
from evaluation.metrics.pope.pope import pope_metrics

POPE_TEMPLATE = "Is there a {object} in the image?"
STRATEGIES = ("random", "popular", "adversarial")


@dataclass
class CocoObjects:
    """Which categories each image holds."""

    files: dict[int, str]  # image id -> file name
    present: dict[int, set[str]]  # image id -> category names present
    categories: list[str]

    @cached_property
    def frequency(self) -> Counter:
        """Number of images holding each category."""
        return Counter(name for names in self.present.values() for name in names)

    @cached_property
    def cooccurrence(self) -> dict[str, Counter]:
        """`cooccurrence[a][b]`: number of images holding both a and b (a != b)."""
        counts: dict[str, Counter] = defaultdict(Counter)
        for names in self.present.values():
            for a in names:
                counts[a].update(b for b in names if b != a)
        return counts


def load_coco_objects(instances_path) -> CocoObjects:
    """Read a COCO instances file (`images`, `annotations`, `categories`); errors name the file and annotation."""
    try:
        with open(instances_path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{instances_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{instances_path}: missing top-level field {key!r} (is this an instances file?)")
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {image["id"]: image["file_name"] for image in data["images"]}
    present: dict[int, set[str]] = {image_id: set() for image_id in files}
    for ann in data["annotations"]:
        if ann.get("image_id") not in files:
            raise ValueError(f"{instances_path}: annotation {ann.get('id')!r}, field 'image_id': unknown image {ann.get('image_id')!r}")
        if ann.get("category_id") not in names:
            raise ValueError(f"{instances_path}: annotation {ann.get('id')!r}, field 'category_id': unknown category {ann.get('category_id')!r}")
        present[ann["image_id"]].add(names[ann["category_id"]])
    return CocoObjects(files, present, sorted(set(names.values())))


def negative_objects(strategy: str, objects: CocoObjects, image_id: int, k: int, rng: random.Random) -> list[str]:
    """Up to `k` categories absent from the image, chosen by `strategy` (see the module docstring)."""
    present = objects.present[image_id]
    absent = [c for c in objects.categories if c not in present]  # sorted: categories is sorted
    if strategy == "random":
        return rng.sample(absent, min(k, len(absent)))
    frequency = objects.frequency
    if strategy == "popular":
        return sorted(absent, key=lambda c: (-frequency[c], c))[:k]
    if strategy == "adversarial":
        co = objects.cooccurrence
        return sorted(absent, key=lambda c: (-sum(co[p][c] for p in present), -frequency[c], c))[:k]
    raise ValueError(f"Unknown negative strategy {strategy!r}: expected one of {STRATEGIES}")


def build_pope_questions(
    objects: CocoObjects,
    strategy: str,
    *,
    num_images: int = 500,
    num_positive: int = 3,
    seed: int = 0,
    min_objects: int = 1,
    template: str = POPE_TEMPLATE,
) -> list[dict]:
    """Balanced yes/no questions for up to `num_images` images holding at least `min_objects` categories.

    Each record: `question_id`, `image` (file name), `text`, `label` ("yes"/"no") as in POPE's published files,
    plus `object`, `image_id`, `strategy`.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown negative strategy {strategy!r}: expected one of {STRATEGIES}")
    eligible = sorted(i for i, names in objects.present.items() if len(names) >= max(1, min_objects))
    chosen = sorted(random.Random(f"pope/{seed}/images").sample(eligible, min(num_images, len(eligible))))
    questions = []
    for image_id in chosen:
        positives = random.Random(f"pope/{seed}/{image_id}/positives").sample(
            sorted(objects.present[image_id]), min(num_positive, len(objects.present[image_id]))
        )
        negatives = negative_objects(strategy, objects, image_id, len(positives), random.Random(f"pope/{seed}/{image_id}/random"))
        positives = positives[: len(negatives)]  # an image holding nearly every category: keep yes/no balanced
        for name, label in [(p, "yes") for p in positives] + [(n, "no") for n in negatives]:
            questions.append(
                {
                    "question_id": len(questions),
                    "image": objects.files[image_id],
                    "text": template.format(object=name),
                    "label": label,
                    "object": name,
                    "image_id": image_id,
                    "strategy": strategy,
                }
            )
    return questions


def load_pope_questions(path) -> list[dict]:
    """A POPE question file (JSONL of `question_id`, `image`, `text`, `label`), validated."""
    questions = read_jsonl(path)
    for line, q in enumerate(questions, start=1):
        for name in ("question_id", "image", "text", "label"):
            if name not in q:
                raise ValueError(f"{path}: record {line} ({q.get('question_id')!r}): missing field {name!r}")
        if str(q["label"]).lower() not in ("yes", "no"):
            raise ValueError(f"{path}: question {q['question_id']!r}, field 'label': expected yes or no, got {q['label']!r}")
    return questions


def score_pope(questions: list[dict], replies: dict[str, str]) -> dict:
    """POPE metrics of replies (by `str(question_id)`), plus the count of replies read as neither yes nor no."""
    missing = [q["question_id"] for q in questions if str(q["question_id"]) not in replies]
    if missing:
        raise ValueError(f"no reply for {len(missing)} question(s), e.g. {missing[:5]}")
    texts = [replies[str(q["question_id"])] for q in questions]
    result = pope_metrics(texts, [q["label"] for q in questions])
    # POPE reads anything without no/not as yes; say how often a reply held no yes/no at all.
    result["n_unclear"] = sum(not {"yes", "no", "not"} & set(re.findall(r"[a-z]+", t.lower())) for t in texts)
    return result


def run_pope(model, processor, questions: list[dict], images_dir, predictions_path, *, prompt_suffix: str = "", **kwargs) -> dict:
    """Answer (resumable) and score one question set."""
    from evaluation.generation import run_predictions

    requests = [
        {"question_id": q["question_id"], "prompt": q["text"] + prompt_suffix, "image": q["image"], "label": q["label"]}
        for q in questions
    ]
    predictions = run_predictions(model, processor, requests, predictions_path, image_root=images_dir, keep_fields=("label",), **kwargs)
    return score_pope(questions, {qid: p["text"] for qid, p in predictions.items()})


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from evaluation.generation import add_generation_arguments, add_model_arguments

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--annotations", help="COCO instances JSON to build the questions from")
    source.add_argument("--questions", nargs="+", help="published POPE question files (JSONL) instead")
    parser.add_argument("--images", help="folder the image file names are relative to (needed with --model)")
    parser.add_argument("--out", required=True, help="output folder: questions, predictions, scores.json")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--num-positive", type=int, default=3, help="yes questions per image (as many no questions)")
    parser.add_argument("--min-objects", type=int, default=1, help="only images with at least this many categories")
    parser.add_argument(
        "--prompt-suffix", default="",
        help="appended to each question, e.g. LLaVA-1.5's '\\nAnswer the question using a single word or phrase.'",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    add_model_arguments(parser, required=False)
    add_generation_arguments(parser, max_new_tokens=16)
    parser.add_argument("--build-only", action="store_true", help="write the question files and stop")


def run(args: argparse.Namespace) -> dict:
    from evaluation.generation import load_model, settings_from_args

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    question_sets = {}
    if args.annotations:
        objects = load_coco_objects(args.annotations)
        for strategy in args.strategies:
            questions = build_pope_questions(
                objects, strategy, num_images=args.num_images, num_positive=args.num_positive, seed=args.seed, min_objects=args.min_objects
            )
            write_jsonl(questions, out / f"questions_{strategy}.jsonl")
            question_sets[strategy] = questions
    else:
        question_sets = {Path(p).stem: load_pope_questions(p) for p in args.questions}
    if args.build_only:
        print(f"wrote {', '.join(f'{k}: {len(v)}' for k, v in question_sets.items())} questions to {out}")
        return {}
    if not args.model or not args.images:
        raise SystemExit("give --model and --images to answer the questions (or --build-only)")
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    settings = settings_from_args(args)
    results = {}
    for name, questions in question_sets.items():
        results[name] = run_pope(
            model, processor, questions, args.images, out / f"predictions_{name}.jsonl", prompt_suffix=args.prompt_suffix,
            settings=settings, batch_size=args.batch_size, model_id=str(args.model), desc=f"pope {name}",
        )
    (out / "scores.json").write_text(json.dumps(results, indent=2))
    for name, r in results.items():
        print(
            f"{name:<12} accuracy {100 * r['accuracy']:.2f}  precision {100 * r['precision']:.2f}  recall {100 * r['recall']:.2f}"
            f"  F1 {100 * r['f1']:.2f}  yes-ratio {100 * r['yes_ratio']:.2f}  n={r['n']}"
        )
    return results
