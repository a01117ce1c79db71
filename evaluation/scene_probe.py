"""Scene QA probe of the synthetic world: does the model see colours, counts and objects?

Probe records (from `processing.synthetic.make_probe_set`, or its LLaVA-JSON form from `write_probe_set`) ask
`What color is the {shape}?` -> colour, `How many shapes are in the image?` -> one..four and
`Is there a {color} {shape} in the image?` -> Yes/No. A reply is right when its first word equals the answer
(case and punctuation ignored; `evaluation/metrics/first_word_accuracy`). Generation is greedy, batched with left
padding and stops after a few tokens: only the first word counts.

    python -m evaluation scene-probe --model ckpt --annotations world/annotations/instances_eval.json --images world/images/eval
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from evaluation.metrics.first_word_accuracy.first_word_accuracy import first_word_accuracy


def probe_fields(record: dict) -> tuple[object, str, str, str]:
    """(image, question, answer, template) of a probe record, in either of its two forms."""
    if "question" in record:
        fields = (record.get("image"), record["question"], record.get("answer"), record.get("template", "all"))
    elif "conversations" in record:  # the LLaVA record written by processing.synthetic.write_probe_set
        turns = record["conversations"]
        question = turns[0]["value"].replace("<image>", "").strip()
        fields = (record.get("image"), question, turns[1]["value"] if len(turns) > 1 else None, record.get("template", "all"))
    else:
        raise ValueError(f"probe record {record.get('id', record.get('image_id'))!r}: needs 'question' or 'conversations'")
    if fields[0] is None or fields[2] is None:
        raise ValueError(f"probe record {record.get('id', record.get('image_id'))!r}: missing 'image' or 'answer'")
    return fields


def evaluate_scene_probe(
    model,
    processor,
    probe_records: list[dict],
    batch_size: int = 32,
    *,
    image_root=None,
    max_new_tokens: int = 5,
    progress: bool = False,
    return_predictions: bool = False,
) -> dict:
    """First-word accuracy of greedy answers to the probe.

    Args:
        probe_records: dicts with `image` (path, relative to `image_root` when given, or PIL image), `question`,
            `answer`, `template` (or the LLaVA-record form with `conversations`).
    Returns `{"overall": accuracy, "per_template": {template: accuracy}, "n": count, "n_per_template": {...}}`
    (+ `predictions`, the replies in record order, with `return_predictions=True`). The model's train/eval
    mode is restored afterwards, so this can run between training steps.
    """
    from tqdm.auto import tqdm

    from evaluation.generation import GenerationSettings, batched, generate_batch, load_image, user_message

    items = [probe_fields(r) for r in probe_records]
    if not items:
        raise ValueError("the probe is empty")
    images: dict[str, object] = {}  # a probe asks several questions per image: decode each file once

    def image_of(image):
        if not isinstance(image, (str, Path)):
            return load_image(image)
        key = str(image)
        if key not in images:
            images[key] = load_image(image, image_root)
        return images[key]

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    was_training = model.training
    model.eval()
    replies: list[str] = []
    try:
        for batch in tqdm(list(batched(items, batch_size)), desc="scene probe", disable=not progress):
            conversations = [[user_message(question, image_of(image))] for image, question, _, _ in batch]
            replies += generate_batch(model, processor, conversations, settings)
    finally:
        model.train(was_training)

    by_template: dict[str, list[int]] = defaultdict(list)
    for index, (_, _, _, template) in enumerate(items):
        by_template[template].append(index)
    answers = [answer for _, _, answer, _ in items]
    result = {
        "overall": first_word_accuracy(replies, answers)["accuracy"],
        "per_template": {
            t: first_word_accuracy([replies[i] for i in idx], [answers[i] for i in idx])["accuracy"]
            for t, idx in sorted(by_template.items())
        },
        "n": len(items),
        "n_per_template": {t: len(idx) for t, idx in sorted(by_template.items())},
    }
    if return_predictions:
        result["predictions"] = replies
    return result


def load_probe(path) -> list[dict]:
    """A probe file: a JSON list or JSONL of probe records."""
    from evaluation.jsonl import read_jsonl

    path = Path(path)
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from evaluation.generation import add_model_arguments

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--probe", help="probe file (JSON list or JSONL) from processing.synthetic.write_probe_set")
    source.add_argument("--annotations", help="a scene-world instances_{split}.json to build the probe from")
    parser.add_argument("--images", required=True, help="folder of the split's images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="probe sampling seed (with --annotations)")
    parser.add_argument("--out", help="write the scores (and replies) to this JSON file")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> dict:
    from evaluation.generation import load_model

    if args.probe:
        records = load_probe(args.probe)
    else:
        from processing.synthetic import make_probe_set

        records = make_probe_set(args.annotations, seed=args.seed)
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    result = evaluate_scene_probe(
        model, processor, records, args.batch_size, image_root=args.images, max_new_tokens=args.max_new_tokens,
        progress=True, return_predictions=bool(args.out),
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"scene probe: {100 * result['overall']:.1f}% of {result['n']}")
    for template, accuracy in result["per_template"].items():
        print(f"  {template:<8} {100 * accuracy:5.1f}%  n={result['n_per_template'][template]}")
    return result
