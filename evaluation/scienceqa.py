"""ScienceQA: LLaVA training data and evaluation prompts from the published files; accuracy and judge ensembling.

Published layout (Lu et al., 2022)::

    problems.json     {pid: {"question", "choices", "answer" (index), "hint", "image" (file name or null),
                             "subject", "grade" ("grade1".."grade12"), "lecture", "solution", ...}}
    pid_splits.json   {"train": [pid, ...], "val": [...], "test": [...], ...}
    images/{split}/{pid}/image.png

Prompt variants (options lettered A-E):

- `letter` (LLaVA-1.5): `Context: {hint}\\n{question}\\nA. ...\\nB. ...\\nAnswer with the option's letter from the
  given choices directly.` (no context line without a hint); answer `B`.
- `cqm` (the paper): `Context: {hint or N/A}\\nQuestion: {question}\\nOptions: (A) ... (B) ...`; answer
  `The answer is B.`, optionally after the lecture and solution (`explain=True`, reasoning first).

Scoring reads the letter with LLaVA's rules (`evaluation/metrics/scienceqa`), counts failures, and reports
accuracy overall and by context modality (image / text / none; a question with both a hint and an image counts
under image and text), subject and grade band (1-6, 7-12). The paper's ensembling: a text-only judge answers
too; where it and the model disagree, the judge is asked again with both answers and its choice is final.

    python -m evaluation scienceqa-to-llava --data-dir ScienceQA/data/scienceqa --split train --out sqa_train.json
    python -m evaluation scienceqa --data-dir ScienceQA/data/scienceqa --split test --model ckpt --out results/sqa
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evaluation.metrics.scienceqa.scienceqa import LETTERS, extract_answer, scienceqa_accuracy

LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
VARIANTS = ("letter", "cqm")
MODALITIES = ("image", "text", "none")


# ---------------------------------------------------------------------------------------------------
# Reading the published files
# ---------------------------------------------------------------------------------------------------


def _load_json(path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"ScienceQA file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def validate_problem(pid: str, problem: dict, source="problems.json") -> None:
    """Raises ValueError naming the file, problem id and field when a problem cannot be used."""

    def fail(field: str, detail: str):
        raise ValueError(f"{source}: problem {pid!r}, field {field!r}: {detail}")

    if not isinstance(problem, dict):
        fail("<problem>", f"expected an object, got {type(problem).__name__}")
    if not isinstance(problem.get("question"), str) or not problem["question"].strip():
        fail("question", "expected a non-empty string")
    choices = problem.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        fail("choices", f"expected a list of 2 to {len(LETTERS)} options, got {choices!r}")
    answer = problem.get("answer")
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        fail("answer", f"expected an option index in 0..{len(choices) - 1}, got {answer!r}")


def load_problems(data_dir=None, split: str = "test", *, problems_path=None, pid_splits_path=None) -> dict[str, dict]:
    """The problems of `split`, by pid, in `pid_splits.json` order (validated)."""
    problems_path = Path(problems_path or Path(data_dir) / "problems.json")
    pid_splits_path = Path(pid_splits_path or Path(data_dir) / "pid_splits.json")
    problems, splits = _load_json(problems_path), _load_json(pid_splits_path)
    if split not in splits:
        raise ValueError(f"{pid_splits_path}: no split {split!r}; it has {sorted(splits)}")
    selected = {}
    for pid in splits[split]:
        pid = str(pid)
        if pid not in problems:
            raise ValueError(f"{pid_splits_path}: split {split!r} lists problem {pid!r}, which {problems_path} lacks")
        validate_problem(pid, problems[pid], problems_path)
        selected[pid] = problems[pid]
    return selected


def image_file(problem: dict, pid: str, split: str) -> str | None:
    """The image path relative to the `images` folder (`{split}/{pid}/image.png`), or None for a text-only problem."""
    return f"{split}/{pid}/{problem['image']}" if problem.get("image") else None


def modalities(problem: dict) -> list[str]:
    """Context modalities of a problem: `image`, `text` (a non-empty hint), both, or `none`."""
    found = [m for m, present in (("image", bool(problem.get("image"))), ("text", bool((problem.get("hint") or "").strip()))) if present]
    return found or ["none"]


def grade_band(problem: dict) -> str:
    """`1-6` or `7-12` from ScienceQA's `grade` field (`grade1`..`grade12`); `unknown` otherwise."""
    digits = "".join(ch for ch in str(problem.get("grade", "")) if ch.isdigit())
    if not digits:
        return "unknown"
    return "1-6" if int(digits) <= 6 else "7-12"


# ---------------------------------------------------------------------------------------------------
# Prompts and targets
# ---------------------------------------------------------------------------------------------------


def build_prompt(problem: dict, variant: str = "letter") -> str:
    """The question text the model sees (without the image placeholder)."""
    hint = (problem.get("hint") or "").strip()
    if variant == "letter":
        lines = [f"Context: {hint}"] if hint else []
        lines.append(problem["question"].strip())
        lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(problem["choices"])]
        lines.append(LETTER_INSTRUCTION)
        return "\n".join(lines)
    if variant == "cqm":
        options = " ".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(problem["choices"]))
        return f"Context: {hint or 'N/A'}\nQuestion: {problem['question'].strip()}\nOptions: {options}"
    raise ValueError(f"Unknown prompt variant {variant!r}: expected one of {VARIANTS}")


def build_target(problem: dict, variant: str = "letter", explain: bool = False) -> str:
    """The answer the model is trained to give."""
    letter = LETTERS[problem["answer"]]
    if variant == "letter":
        return letter
    answer = f"The answer is {letter}."
    if explain:
        reasoning = "\n".join(p.strip() for p in (problem.get("lecture"), problem.get("solution")) if p and p.strip())
        return f"{reasoning}\n{answer}" if reasoning else answer
    return answer


def to_llava_records(
    problems: dict[str, dict], split: str, *, variant: str = "letter", explain: bool = False, images_dir=None
) -> list[dict]:
    """LLaVA JSON records (`id`, `image` relative to `images_dir`, `conversations`); text-only problems have no image.

    With `images_dir`, every referenced image must exist (the error names the pid).
    """
    records = []
    for pid, problem in problems.items():
        image = image_file(problem, pid, split)
        if image is not None and images_dir is not None and not (Path(images_dir) / image).is_file():
            raise FileNotFoundError(f"problem {pid!r}, field 'image': {Path(images_dir) / image} does not exist")
        prompt = build_prompt(problem, variant)
        record = {"id": pid}
        if image is not None:
            record["image"] = image
            prompt = f"<image>\n{prompt}"
        record["conversations"] = [
            {"from": "human", "value": prompt},
            {"from": "gpt", "value": build_target(problem, variant, explain)},
        ]
        records.append(record)
    return records


def eval_requests(problems: dict[str, dict], split: str, variant: str = "letter") -> list[dict]:
    """Requests for `evaluation.generation.run_predictions` (image paths relative to the `images` folder)."""
    return [
        {"question_id": pid, "prompt": build_prompt(problem, variant), "image": image_file(problem, pid, split)}
        for pid, problem in problems.items()
    ]


# ---------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------


def _group_accuracy(problems: dict[str, dict], replies: dict[str, str], pids: list[str]) -> dict:
    return scienceqa_accuracy(
        [replies[pid] for pid in pids],
        [LETTERS[problems[pid]["answer"]] for pid in pids],
        [len(problems[pid]["choices"]) for pid in pids],
    )


def score_scienceqa(problems: dict[str, dict], replies: dict[str, str]) -> dict:
    """Accuracy (fraction) overall and `by_modality`, `by_subject`, `by_grade`; each with `n`, `n_correct`, `n_failed`."""
    missing = [pid for pid in problems if pid not in replies]
    if missing:
        raise ValueError(f"no reply for {len(missing)} problem(s), e.g. {missing[:5]}")
    pids = list(problems)
    result = _group_accuracy(problems, replies, pids)
    groups = {
        "by_modality": {m: [p for p in pids if m in modalities(problems[p])] for m in MODALITIES},
        "by_subject": {},
        "by_grade": {},
    }
    for pid in pids:
        groups["by_subject"].setdefault(problems[pid].get("subject", "unknown"), []).append(pid)
        groups["by_grade"].setdefault(grade_band(problems[pid]), []).append(pid)
    for name, members in groups.items():
        result[name] = {key: _group_accuracy(problems, replies, group) for key, group in sorted(members.items()) if group}
    return result


# ---------------------------------------------------------------------------------------------------
# Ensembling with a text-only judge (the paper's "GPT-4 as the judge")
# ---------------------------------------------------------------------------------------------------

_END_WITH_LETTER = 'End your reply with "The answer is X." where X is the letter of the correct option.'


def judge_question_messages(problem: dict) -> list[dict]:
    """The judge answers the question itself, from the text alone (it does not see the image)."""
    return [{"role": "user", "content": f"{build_prompt(problem, 'cqm')}\n\n{_END_WITH_LETTER}"}]


def arbitration_messages(problem: dict, model_letter: str, judge_letter: str) -> list[dict]:
    """Asked when the model and the judge disagree: both answers shown, the judge decides."""
    content = (
        f"{build_prompt(problem, 'cqm')}\n\n"
        "Two answers were proposed for this question.\n"
        f"Answer 1 (from an assistant that could see the image, if there is one): The answer is {model_letter}.\n"
        f"Answer 2: The answer is {judge_letter}.\n"
        f"Weigh both and give your own final answer. {_END_WITH_LETTER}"
    )
    return [{"role": "user", "content": content}]


def ensemble_with_judge(
    problems: dict[str, dict],
    replies: dict[str, str],
    judge,
    *,
    cache_path,
    concurrency: int = 1,
    progress: bool = True,
) -> dict:
    """The paper's two ways of combining the model with a text-only judge, reported apart from the model's score.

    - `judge_alone`: the judge's own answers;
    - `complement`: the judge's answer, the model's where the judge gives none;
    - `arbitrated`: where model and judge disagree, the judge sees both answers and decides (its second reply;
      the model's answer if that reply has no letter). Agreement or a missing letter on either side keeps the
      other's answer.
    Each is `{"accuracy", "n", "n_correct", "n_failed"}`; `n_disagreements` says how many arbitrations were asked.
    """
    from evaluation.judges import CachedJudge, complete_all

    cached = judge if isinstance(judge, CachedJudge) else CachedJudge(judge, cache_path)
    pids = list(problems)
    gold = {pid: LETTERS[problems[pid]["answer"]] for pid in pids}
    num_choices = {pid: len(problems[pid]["choices"]) for pid in pids}
    model = {pid: extract_answer(replies[pid], num_choices[pid]) for pid in pids}

    first = complete_all(cached, [judge_question_messages(problems[p]) for p in pids], concurrency=concurrency, progress=progress, desc="judge")
    judge_letters = {pid: None if isinstance(r, Exception) else extract_answer(r, num_choices[pid]) for pid, r in zip(pids, first)}

    disputed = [pid for pid in pids if model[pid] and judge_letters[pid] and model[pid] != judge_letters[pid]]
    second = complete_all(
        cached,
        [arbitration_messages(problems[p], model[p], judge_letters[p]) for p in disputed],
        concurrency=concurrency,
        progress=progress,
        desc="arbitrate",
    )
    verdicts = {pid: None if isinstance(r, Exception) else extract_answer(r, num_choices[pid]) for pid, r in zip(disputed, second)}

    complement = {pid: judge_letters[pid] or model[pid] for pid in pids}

    def final(pid: str) -> str | None:
        if pid in verdicts:
            return verdicts[pid] or model[pid]
        return model[pid] or judge_letters[pid]  # agreement, or only one of the two gave a letter

    arbitrated = {pid: final(pid) for pid in pids}

    def accuracy(letters: dict) -> dict:
        n = len(pids)
        correct = sum(letters[pid] == gold[pid] for pid in pids)
        return {"accuracy": correct / n if n else 0.0, "n": n, "n_correct": correct, "n_failed": sum(letters[p] is None for p in pids)}

    return {
        "model": accuracy(model),
        "judge_alone": accuracy(judge_letters),
        "complement": accuracy(complement),
        "arbitrated": accuracy(arbitrated),
        "n_disagreements": len(disputed),
        "judge": cached.name,
        "judge_calls": cached.calls,
        "cache_hits": cached.hits,
        "answers": arbitrated,
    }


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="folder with problems.json, pid_splits.json and images/")
    parser.add_argument("--problems", help="problems.json (default: DATA_DIR/problems.json)")
    parser.add_argument("--pid-splits", help="pid_splits.json (default: DATA_DIR/pid_splits.json)")
    parser.add_argument("--images", help="the images/ folder (default: DATA_DIR/images)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--variant", choices=VARIANTS, default="letter", help="prompt variant (see the module docstring)")


def _data(args) -> tuple[dict[str, dict], Path | None]:
    if not args.data_dir and not (args.problems and args.pid_splits):
        raise SystemExit("give --data-dir, or --problems and --pid-splits")
    problems = load_problems(args.data_dir, args.split, problems_path=args.problems, pid_splits_path=args.pid_splits)
    images = Path(args.images) if args.images else (Path(args.data_dir) / "images" if args.data_dir else None)
    return problems, images


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    _add_data_arguments(parser)
    parser.add_argument("--explain", action="store_true", help="cqm: lecture and solution before 'The answer is X.'")
    parser.add_argument("--out", required=True, help="LLaVA JSON file to write (.json list or .jsonl)")


def run_convert(args: argparse.Namespace) -> int:
    problems, images = _data(args)
    records = to_llava_records(problems, args.split, variant=args.variant, explain=args.explain, images_dir=images)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        if out.suffix == ".jsonl":
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            json.dump(records, f, ensure_ascii=False)
    print(f"wrote {len(records)} records to {out} (images relative to {images})")
    return len(records)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from evaluation.generation import add_generation_arguments, add_model_arguments
    from evaluation.judges import add_judge_arguments

    _add_data_arguments(parser)
    parser.add_argument("--answers", help="replies JSONL (question_id = pid, text) instead of generating with --model")
    parser.add_argument("--out", required=True, help="output folder: predictions, scores, judge cache")
    parser.add_argument("--batch-size", type=int, default=8)
    add_model_arguments(parser, required=False)
    add_generation_arguments(parser, max_new_tokens=16)
    add_judge_arguments(parser, kinds=("openai", "transformers"), default=None)


def run(args: argparse.Namespace) -> dict:
    from evaluation.generation import load_model, run_predictions, settings_from_args
    from evaluation.jsonl import read_jsonl

    problems, images = _data(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.answers:
        replies = {str(r["question_id"]): r["text"] for r in read_jsonl(args.answers)}
    elif args.model:
        model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
        predictions = run_predictions(
            model, processor, eval_requests(problems, args.split, args.variant), out / "predictions.jsonl",
            settings=settings_from_args(args), batch_size=args.batch_size, image_root=images, model_id=str(args.model),
        )
        replies = {pid: record["text"] for pid, record in predictions.items()}
    else:
        raise SystemExit("give --model (to answer the questions) or --answers (a file of replies)")
    result = score_scienceqa(problems, replies)
    if args.judge:
        from evaluation.judges import make_judge

        ensemble = ensemble_with_judge(
            problems, replies, make_judge(args), cache_path=out / "judge_cache.jsonl", concurrency=args.judge_concurrency
        )
        result["ensemble"] = {k: v for k, v in ensemble.items() if k != "answers"}
    (out / "scores.json").write_text(json.dumps(result, indent=2))
    print(format_result(result))
    return result


def format_result(result: dict) -> str:
    def row(name, r):
        return f"  {name:<18} {100 * r['accuracy']:6.2f}%   n={r['n']:<6} failed={r['n_failed']}"

    lines = [row("overall", result)]
    for group in ("by_modality", "by_subject", "by_grade"):
        lines += [row(f"{group[3:]}:{key}", r) for key, r in result[group].items()]
    if "ensemble" in result:
        e = result["ensemble"]
        lines.append(f"judge {e['judge']} ({e['judge_calls']} calls, {e['cache_hits']} cached), {e['n_disagreements']} disagreements")
        lines += [row(name, e[name]) for name in ("judge_alone", "complement", "arbitrated")]
    return "\n".join(lines)
