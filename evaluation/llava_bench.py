"""LLaVA-Bench: a judge compares the model's answers with reference answers; the relative score summarises it.

Files, as the benchmark publishes them (LLaVA-Bench COCO / In-the-Wild):

- `questions.jsonl`: `{"question_id", "image", "text", "category"}`, category `conv` | `detail` | `complex`;
- `context.jsonl`: per image `{"image", "caption": str | [str], "instances": [{"category", "bbox"}]}`
  (COCO's file names the captions `captions`; the boxes are optional);
- `answers_gpt4.jsonl`: the reference answers `{"question_id", "text"}`.

For every question the judge sees the image context, the question, the reference as Assistant 1 and the candidate
as Assistant 2 (the paper's prompt, below), and writes the two 1-10 scores on its first line, then an
explanation. Relative score = mean(candidate) / mean(reference) x 100, per category and overall
(`evaluation/metrics/relative_score`). Replies are cached (`evaluation.judges.CachedJudge`): a rerun costs nothing.

    python -m evaluation llava-bench --bench-dir llava-bench-coco --images coco/val2014 --model ckpt \\
        --judge openai --judge-base-url https://api.openai.com/v1 --judge-model gpt-4-0314 --out results/bench
    python -m evaluation make-llava-bench --annotations-dir world/annotations --split eval --out world/bench
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from evaluation.judges import CachedJudge, complete_all
from evaluation.jsonl import read_jsonl, write_jsonl
from evaluation.metrics.relative_score.relative_score import relative_scores

# Published category names -> the names reported (one name for one thing).
CATEGORY_NAMES = {"conv": "conversation", "conversation": "conversation", "detail": "detail", "complex": "complex"}
PUBLISHED_CATEGORY = {"conversation": "conv", "detail": "detail", "complex": "complex"}

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
# The rule of LLaVA's `rule.json` for llava_bench_{conv,detail,complex}: scores are comparable with the paper's.
JUDGE_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with a few sentences describing the image.\n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential "
    "bias and ensuring that the order in which the responses were presented does not affect your judgment."
)


@dataclass
class BenchQuestion:
    question_id: str
    image: str
    text: str
    category: str  # conversation | detail | complex
    context: str
    reference: str


# ---------------------------------------------------------------------------------------------------
# Reading the published files
# ---------------------------------------------------------------------------------------------------


def format_context(entry: dict) -> str:
    """Captions (one per line), then a blank line and `category: [x1, y1, x2, y2]` per box, as LLaVA renders them."""
    captions = entry.get("captions", entry.get("caption", ""))
    text = "\n".join(captions) if isinstance(captions, list) else str(captions)
    boxes = [f"{inst['category']}: {inst['bbox']}" for inst in entry.get("instances", [])]
    return f"{text}\n\n" + "\n".join(boxes) if boxes else text


def _require(record: dict, fields: tuple[str, ...], path, line: int) -> None:
    for name in fields:
        if name not in record:
            raise ValueError(f"{path}: record {line} ({record.get('question_id', record.get('image'))!r}): missing field {name!r}")


def load_bench(questions_path, context_path, answers_path) -> list[BenchQuestion]:
    """Join questions, image contexts (by `image`) and reference answers (by `question_id`)."""
    questions = read_jsonl(questions_path)
    contexts = {}
    for line, entry in enumerate(read_jsonl(context_path), start=1):
        _require(entry, ("image",), context_path, line)
        contexts[entry["image"]] = entry
    references = {}
    for line, answer in enumerate(read_jsonl(answers_path), start=1):
        _require(answer, ("question_id", "text"), answers_path, line)
        references[str(answer["question_id"])] = answer["text"]
    bench = []
    for line, q in enumerate(questions, start=1):
        _require(q, ("question_id", "image", "text", "category"), questions_path, line)
        qid = str(q["question_id"])
        if q["image"] not in contexts:
            raise ValueError(f"{questions_path}: question {qid!r}: image {q['image']!r} has no entry in {context_path}")
        if qid not in references:
            raise ValueError(f"{questions_path}: question {qid!r} has no reference answer in {answers_path}")
        category = CATEGORY_NAMES.get(q["category"], q["category"])
        bench.append(BenchQuestion(qid, q["image"], q["text"], category, format_context(contexts[q["image"]]), references[qid]))
    return bench


def load_bench_dir(bench_dir) -> list[BenchQuestion]:
    """`questions.jsonl`, `context.jsonl` and `answers_gpt4.jsonl` of one folder."""
    bench_dir = Path(bench_dir)
    return load_bench(bench_dir / "questions.jsonl", bench_dir / "context.jsonl", bench_dir / "answers_gpt4.jsonl")


# ---------------------------------------------------------------------------------------------------
# The judge's prompt and reply
# ---------------------------------------------------------------------------------------------------


def judge_messages(context: str, question: str, reference: str, candidate: str) -> list[dict]:
    """System + user messages of one judgement: Assistant 1 = the reference, Assistant 2 = the candidate."""
    content = (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{candidate}\n\n[End of Assistant 2]\n\n"
        f"[System]\n{JUDGE_RULE}\n\n"
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


_NUMBER = r"(\d+(?:\.\d+)?)"
_LABELLED = [re.compile(rf"assistant\s*{i}\s*(?:'s)?\s*(?:score)?\s*(?:[:=]|-\s)\s*\**\s*{_NUMBER}", re.I) for i in (1, 2)]
_OUT_OF_TEN = re.compile(r"\s*(?:/|out of)\s*10(?![\d.])", re.I)
_ASSISTANT_LABEL = re.compile(r"assistant\s*\d", re.I)


def parse_scores(reply: str) -> tuple[float, float] | None:
    """The (reference, candidate) scores of a judge reply, or None when they cannot be read.

    Accepts `8 7`, `8, 7`, `**8 7**`, `8/10 and 7/10`, `Scores: 8 7` on the first non-empty line, and the labelled
    `Assistant 1: 8` / `Assistant 2: 7` within the first two non-empty lines. Scores must lie in 0-10.
    """
    lines = [line for line in (reply or "").splitlines() if line.strip()]
    if not lines:
        return None
    head = "\n".join(lines[:2])
    labelled = [pattern.search(head) for pattern in _LABELLED]
    if all(labelled):
        scores = (float(labelled[0].group(1)), float(labelled[1].group(1)))
    else:
        first = _ASSISTANT_LABEL.sub(" ", _OUT_OF_TEN.sub("", lines[0]))
        numbers = re.findall(_NUMBER, first)
        if len(numbers) != 2:
            return None
        scores = (float(numbers[0]), float(numbers[1]))
    return scores if all(0 <= s <= 10 for s in scores) else None


# ---------------------------------------------------------------------------------------------------
# An offline judge for the synthetic scene world
# ---------------------------------------------------------------------------------------------------

_COLORS = ("red", "green", "blue", "yellow")
_SHAPES = ("circle", "square", "triangle")
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_POSITIONS = ("left", "right", "top", "bottom", "center")
_SYNONYMS = {"middle": "center", "centre": "center", "central": "center", **{str(i): w for i, w in enumerate(_NUMBERS)}}
_VOCABULARY = frozenset(_COLORS + _SHAPES + _NUMBERS + _POSITIONS + ("yes", "no"))
_SECTION = re.compile(r"\[Assistant (\d)\]\n(.*?)\n\n\[End of Assistant \1\]", re.S)


def scene_keywords(text: str) -> set[str]:
    """Colours, shapes (singular), numbers (as words), positions and yes/no mentioned in `text`."""
    words = re.findall(r"[a-z]+|\d+", text.lower())
    words = [_SYNONYMS.get(w, w[:-1] if w.endswith("s") and w[:-1] in _SHAPES else w) for w in words]
    return {w for w in words if w in _VOCABULARY}


def keyword_f1(candidate: set[str], reference: set[str]) -> float:
    if not candidate and not reference:
        return 1.0
    overlap = len(candidate & reference)
    if not overlap:
        return 0.0
    precision, recall = overlap / len(candidate), overlap / len(reference)
    return 2 * precision * recall / (precision + recall)


class RuleJudge:
    """Offline judge for the synthetic scene world, where the reference answers are exact.

    Reads Assistant 1 and 2 from the judge prompt and scores each as `round(1 + 9 * F1)`, F1 being the overlap of
    its scene keywords (colours, shapes, numbers, positions, yes/no) with the reference's. The reference thus
    scores 10 and a candidate that gets the facts right scores close to it. A stand-in for an LLM judge in tests
    and offline runs, replying in the same format; it judges facts, not helpfulness or style.
    """

    name = "rule-judge"

    def complete(self, messages: list[dict]) -> str:
        sections = dict(_SECTION.findall(messages[-1]["content"]))
        if "1" not in sections or "2" not in sections:
            return "I cannot find the two assistants' answers in this prompt."
        reference, candidate = scene_keywords(sections["1"]), scene_keywords(sections["2"])
        scores = [round(1 + 9 * keyword_f1(answer, reference)) for answer in (reference, candidate)]
        return (
            f"{scores[0]} {scores[1]}\n"
            f"Keywords of the reference: {sorted(reference)}; of Assistant 2: {sorted(candidate)}; "
            f"shared: {sorted(reference & candidate)}."
        )


# ---------------------------------------------------------------------------------------------------
# Judging and scoring
# ---------------------------------------------------------------------------------------------------


def judge_bench(
    bench: list[BenchQuestion],
    answers: dict[str, str],
    judge,
    *,
    cache_path: str | os.PathLike,
    reviews_path: str | os.PathLike | None = None,
    concurrency: int = 1,
    progress: bool = True,
) -> dict:
    """Judge the candidate `answers` (by question id) against the references; returns the relative scores.

    Result: `relative_score`, `candidate_mean`, `reference_mean`, `n` (judgements that parsed), `per_category`,
    `n_failed` + `failed_ids` (judge errors and unreadable score lines, left out of the means), `judge`,
    `judge_calls` and `cache_hits`. Each review is written to `reviews_path` (JSONL) when given.
    """
    missing = [q.question_id for q in bench if q.question_id not in answers]
    if missing:
        raise ValueError(f"no candidate answer for {len(missing)} question(s), e.g. {missing[:5]}")
    cached = judge if isinstance(judge, CachedJudge) else CachedJudge(judge, cache_path)
    prompts = [judge_messages(q.context, q.text, q.reference, answers[q.question_id]) for q in bench]
    replies = complete_all(cached, prompts, concurrency=concurrency, progress=progress, desc=f"judge ({cached.name})")

    reviews, failed = [], Counter()
    for question, reply in zip(bench, replies):
        error = reply if isinstance(reply, Exception) else None
        scores = None if error else parse_scores(reply)
        if error:
            failed["judge_error"] += 1
        elif scores is None:
            failed["unparsable"] += 1
        reviews.append(
            {
                "question_id": question.question_id,
                "category": question.category,
                "scores": list(scores) if scores else None,
                "judge": cached.name,
                "reply": f"{type(error).__name__}: {error}" if error else reply,
            }
        )
    if reviews_path is not None:
        write_jsonl(reviews, reviews_path)
    scored = [r for r in reviews if r["scores"]]
    if not scored:
        raise ValueError(f"no judgement could be read ({dict(failed)}); see {reviews_path or 'the judge replies'}")
    result = relative_scores(
        [r["scores"][1] for r in scored], [r["scores"][0] for r in scored], [r["category"] for r in scored]
    )
    result.update(
        n_failed=sum(failed.values()),
        failed_reasons=dict(failed),
        failed_ids=[r["question_id"] for r in reviews if not r["scores"]],
        judge=cached.name,
        judge_calls=cached.calls,
        cache_hits=cached.hits,
    )
    return result


def answer_bench(model, processor, bench: list[BenchQuestion], images_dir, predictions_path, **kwargs) -> dict[str, str]:
    """The model's answers to the bench questions (image first, then the question text), resumable."""
    from evaluation.generation import run_predictions

    requests = [{"question_id": q.question_id, "prompt": q.text, "image": q.image, "category": q.category} for q in bench]
    predictions = run_predictions(
        model, processor, requests, predictions_path, image_root=images_dir, keep_fields=("category",), desc="answer", **kwargs
    )
    return {qid: record["text"] for qid, record in predictions.items()}


# ---------------------------------------------------------------------------------------------------
# A bench from the synthetic scene world
# ---------------------------------------------------------------------------------------------------


def make_scene_bench(annotations_dir, split: str, out_dir, *, max_images: int | None = None, seed: int = 0, progress: bool = True) -> Path:
    """Write a LLaVA-Bench (the three published files) for a split of a COCO-format folder, e.g. the scene world.

    The symbolic teacher writes one conversation, detailed-description and complex-reasoning sample per image
    (`processing.generate`); the first question of each becomes a bench question and its answer the reference.
    Resumable: the teacher's samples are kept in `out_dir/instructions.jsonl`.
    """
    from processing.generate import generate_instructions, load_contexts
    from processing.teachers import SymbolicTeacher

    out_dir = Path(out_dir)
    contexts, _ = load_contexts(annotations_dir, split, max_images)
    samples_path = out_dir / "instructions.jsonl"
    generate_instructions(
        contexts, SymbolicTeacher(seed=seed), samples_path, seed=seed, image_placement="before", progress=progress
    )
    by_key = {(str(s["image_id"]), s["type"]): s for s in read_jsonl(samples_path)}
    questions, references = [], []
    for context in contexts:
        for kind in ("conversation", "detail", "complex"):
            sample = by_key.get((str(context.image_id), kind))
            if sample is None:  # the teacher's reply did not parse: the generation stats say why
                continue
            question = sample["conversations"][0]["value"].replace("<image>", "").strip()
            qid = len(questions)
            questions.append({"question_id": qid, "image": context.file_name, "text": question, "category": PUBLISHED_CATEGORY[kind]})
            references.append({"question_id": qid, "text": sample["conversations"][1]["value"], "model_id": "symbolic-teacher"})
    contexts_out = [
        {
            "id": c.image_id,
            "image": c.file_name,
            "captions": c.captions,
            "instances": [{"category": name, "bbox": box} for name, box in c.boxes],
        }
        for c in contexts
    ]
    write_jsonl(questions, out_dir / "questions.jsonl")
    write_jsonl(contexts_out, out_dir / "context.jsonl")
    write_jsonl(references, out_dir / "answers_gpt4.jsonl")
    return out_dir


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from evaluation.generation import add_generation_arguments, add_model_arguments
    from evaluation.judges import add_judge_arguments

    parser.add_argument("--bench-dir", required=True, help="folder with questions.jsonl, context.jsonl, answers_gpt4.jsonl")
    parser.add_argument("--images", help="folder the questions' image names are relative to (needed with --model)")
    parser.add_argument("--answers", help="candidate answers JSONL (question_id, text) instead of generating with --model")
    parser.add_argument("--out", required=True, help="output folder: predictions, judge cache, reviews, scores")
    parser.add_argument("--batch-size", type=int, default=8)
    add_model_arguments(parser, required=False)
    add_generation_arguments(parser, max_new_tokens=512)
    add_judge_arguments(parser, kinds=("rule", "openai", "transformers"), default="rule")


def run(args: argparse.Namespace) -> dict:
    from evaluation.generation import load_model, settings_from_args
    from evaluation.judges import make_judge

    bench = load_bench_dir(args.bench_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.answers:
        answers = {str(r["question_id"]): r["text"] for r in read_jsonl(args.answers)}
    elif args.model:
        if not args.images:
            raise SystemExit("--model needs --images (the folder of the bench images)")
        model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
        settings = settings_from_args(args)
        answers = answer_bench(
            model, processor, bench, args.images, out / "predictions.jsonl",
            settings=settings, batch_size=args.batch_size, model_id=str(args.model),
        )
    else:
        raise SystemExit("give --model (to answer the questions) or --answers (a file of answers)")
    judge = make_judge(args, offline_judges={"rule": RuleJudge})
    result = judge_bench(
        bench, answers, judge, cache_path=out / "judge_cache.jsonl", reviews_path=out / "reviews.jsonl",
        concurrency=args.judge_concurrency,
    )
    (out / "scores.json").write_text(json.dumps(result, indent=2))
    print(format_result(result))
    return result


def format_result(result: dict) -> str:
    lines = [f"judge {result['judge']}: {result['judge_calls']} calls, {result['cache_hits']} cached"]
    rows = [("overall", result), *sorted(result["per_category"].items())]
    for name, row in rows:
        lines.append(
            f"  {name:<13} relative {row['relative_score']:6.1f}%   candidate {row['candidate_mean']:.2f}"
            f"   reference {row['reference_mean']:.2f}   n={row['n']}"
        )
    if result["n_failed"]:
        lines.append(f"  {result['n_failed']} judgement(s) unreadable or failed: {result['failed_reasons']}")
    return "\n".join(lines)


def add_make_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations-dir", required=True, help="COCO-format folder (captions_{split}.json, instances_{split}.json)")
    parser.add_argument("--split", default="eval")
    parser.add_argument("--out", required=True, help="output folder for questions.jsonl, context.jsonl, answers_gpt4.jsonl")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)


def run_make(args: argparse.Namespace) -> Path:
    out = make_scene_bench(args.annotations_dir, args.split, args.out, max_images=args.max_images, seed=args.seed)
    print(f"wrote {out}/questions.jsonl, context.jsonl, answers_gpt4.jsonl")
    return out
