"""ScienceQA: conversion of the published files, prompts, accuracy by group, and the judge ensembling."""

import json

import pytest
from PIL import Image

from evaluation.__main__ import main as evaluation_main
from evaluation.scienceqa import (
    LETTER_INSTRUCTION,
    build_prompt,
    ensemble_with_judge,
    eval_requests,
    load_problems,
    score_scienceqa,
    to_llava_records,
)


def problem(question, choices, answer, *, hint="", image=None, subject="natural science", grade="grade3", **extra):
    return {"question": question, "choices": choices, "answer": answer, "hint": hint, "image": image, "subject": subject,
            "grade": grade, "lecture": extra.get("lecture", ""), "solution": extra.get("solution", ""), "task": "closed choice"}


PROBLEMS = {
    # test split: replies and expected outcomes are in REPLIES below
    "1": problem("Which animal is a mammal?", ["whale", "shark"], 0, image="image.png", grade="grade3"),
    "2": problem("Which state is farthest north?", ["Texas", "Florida", "Ohio"], 2, hint="Look at the map.", image="image.png",
                 subject="social science", grade="grade8"),
    "3": problem("Which word is a noun?", ["run", "table", "blue", "quickly"], 1, hint="A noun names a thing.",
                 subject="language science", grade="grade5"),
    "4": problem("Is ice a solid?", ["no", "yes"], 1, grade="grade10"),
    "5": problem("Which is the largest?", ["ant", "cat", "dog", "horse", "whale"], 4, grade="grade12"),
    "6": problem("Which is a continent?", ["Asia", "Paris", "Nile"], 0, hint="Continents are large.", subject="social science",
                 grade="grade2"),
    # train split
    "10": problem("Which is magnetic?", ["iron nail", "wood"], 0, image="image.png", lecture="Magnets pull iron.",
                  solution="The nail is iron."),
    "11": problem("Which is a verb?", ["jump", "chair"], 0, hint="A verb is an action.", lecture="Verbs are actions.",
                  solution="Jump is an action."),
}
SPLITS = {"train": ["10", "11"], "test": ["1", "2", "3", "4", "5", "6"], "val": []}
REPLIES = {
    "1": "A",  # bare letter, right
    "2": "C. Ohio",  # "X." prefix, right
    "3": "The answer is B.",  # right
    "4": "I am not sure.",  # failed
    "5": "D",  # wrong
    "6": "E",  # failed: only three options
}


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "scienceqa"
    root.mkdir()
    (root / "problems.json").write_text(json.dumps(PROBLEMS))
    (root / "pid_splits.json").write_text(json.dumps(SPLITS))
    for split, pids in SPLITS.items():
        for pid in pids:
            if PROBLEMS[pid]["image"]:
                folder = root / "images" / split / pid
                folder.mkdir(parents=True)
                Image.new("RGB", (20, 20), (10, 200, 10)).save(folder / "image.png")
    return root


def test_prompts_letter_options_and_instruction(data_dir):
    problems = load_problems(data_dir, "test")
    assert list(problems) == SPLITS["test"]
    assert build_prompt(problems["2"]) == (
        "Context: Look at the map.\nWhich state is farthest north?\nA. Texas\nB. Florida\nC. Ohio\n" + LETTER_INSTRUCTION
    )
    assert build_prompt(problems["1"]) == "Which animal is a mammal?\nA. whale\nB. shark\n" + LETTER_INSTRUCTION
    assert build_prompt(problems["5"]).count("\n") == 6 and "E. whale" in build_prompt(problems["5"])
    assert build_prompt(problems["4"], "cqm") == "Context: N/A\nQuestion: Is ice a solid?\nOptions: (A) no (B) yes"
    requests = eval_requests(problems, "test")
    assert [r["image"] for r in requests] == ["test/1/image.png", "test/2/image.png", None, None, None, None]


def test_convert_to_llava_json_loads_with_the_llava_reader(data_dir, tmp_path):
    from processing.llava_json import load_llava_json

    out = tmp_path / "sqa_train.json"
    evaluation_main(["scienceqa-to-llava", "--data-dir", str(data_dir), "--split", "train", "--variant", "cqm", "--explain", "--out", str(out)])
    records = json.loads(out.read_text())
    assert records[0] == {
        "id": "10",
        "image": "train/10/image.png",
        "conversations": [
            {"from": "human", "value": "<image>\nContext: N/A\nQuestion: Which is magnetic?\nOptions: (A) iron nail (B) wood"},
            {"from": "gpt", "value": "Magnets pull iron.\nThe nail is iron.\nThe answer is A."},
        ],
    }
    assert "image" not in records[1]  # text-only problem
    dataset = load_llava_json(out, image_folder=data_dir / "images")
    assert dataset.num_rows == 2 and dataset[0]["messages"][0]["content"][0]["type"] == "image"

    letter = to_llava_records(load_problems(data_dir, "train"), "train")
    assert letter[1]["conversations"][1]["value"] == "A"
    assert letter[1]["conversations"][0]["value"].endswith(LETTER_INSTRUCTION)
    (data_dir / "images" / "train" / "10" / "image.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"problem '10', field 'image'"):
        to_llava_records(load_problems(data_dir, "train"), "train", images_dir=data_dir / "images")


def test_bad_problems_are_named(data_dir):
    broken = dict(PROBLEMS, **{"3": {**PROBLEMS["3"], "answer": 7}})
    (data_dir / "problems.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"problems\.json: problem '3', field 'answer'"):
        load_problems(data_dir, "test")
    with pytest.raises(ValueError, match=r"no split 'dev'"):
        load_problems(data_dir, "dev")


def test_accuracy_overall_and_by_group(data_dir):
    result = score_scienceqa(load_problems(data_dir, "test"), REPLIES)
    assert (result["accuracy"], result["n"], result["n_correct"], result["n_failed"]) == (0.5, 6, 3, 2)

    def acc(group, key):
        r = result[group][key]
        return r["n_correct"], r["n"], r["n_failed"]

    # modality: image {1, 2}; text (hint) {2, 3, 6}; none {4, 5}
    assert acc("by_modality", "image") == (2, 2, 0)
    assert acc("by_modality", "text") == (2, 3, 1)
    assert acc("by_modality", "none") == (0, 2, 1)
    assert acc("by_subject", "natural science") == (1, 3, 1)  # 1 right, 4 failed, 5 wrong
    assert acc("by_subject", "social science") == (1, 2, 1)
    assert acc("by_subject", "language science") == (1, 1, 0)
    assert acc("by_grade", "1-6") == (2, 3, 1)  # grades 3, 5, 2
    assert acc("by_grade", "7-12") == (1, 3, 1)  # grades 8, 10, 12
    assert result["by_modality"]["text"]["accuracy"] == pytest.approx(2 / 3)


class TextOnlyJudge:
    """A local judge that reads only the question text; FIRST answers, ARBITRATION decides disputes."""

    name = "text-judge"
    FIRST = {
        "Which animal is a mammal?": "Sharks are fish... The answer is B.",  # disagrees (model right)
        "Which state is farthest north?": "The answer is C.",  # agrees
        "Which word is a noun?": "The answer is A.",  # disagrees (model right, judge wrong)
        "Is ice a solid?": "The answer is B.",  # model failed: the judge's answer is used
        "Which is the largest?": "I cannot tell without a picture.",  # judge fails: the model's answer stays
        "Which is a continent?": "The answer is A.",  # model failed
    }
    ARBITRATION = {"Which animal is a mammal?": "The answer is A.", "Which word is a noun?": "On reflection, the answer is A."}

    def __init__(self):
        self.calls = 0

    def complete(self, messages):
        self.calls += 1
        content = messages[-1]["content"]
        question = content.split("Question: ", 1)[1].split("\n", 1)[0]
        table = self.ARBITRATION if "Two answers were proposed" in content else self.FIRST
        return table[question]


def test_judge_ensembling_reported_apart(data_dir, tmp_path):
    problems = load_problems(data_dir, "test")
    judge = TextOnlyJudge()
    result = ensemble_with_judge(problems, REPLIES, judge, cache_path=tmp_path / "cache.jsonl", progress=False)
    assert result["model"]["accuracy"] == 0.5
    assert result["judge_alone"] == {"accuracy": 0.5, "n": 6, "n_correct": 3, "n_failed": 1}  # 2, 4, 6 right; 5 none
    assert result["complement"]["accuracy"] == 0.5  # judge, else model (5 -> D): 2, 4, 6
    assert result["arbitrated"]["accuracy"] == pytest.approx(4 / 6)  # 1 won back, 3 lost to the judge: 1, 2, 4, 6
    assert result["answers"] == {"1": "A", "2": "C", "3": "A", "4": "B", "5": "D", "6": "A"}
    assert result["n_disagreements"] == 2 and judge.calls == 8  # 6 questions + 2 arbitrations

    rerun_judge = TextOnlyJudge()
    again = ensemble_with_judge(problems, REPLIES, rerun_judge, cache_path=tmp_path / "cache.jsonl", progress=False)
    assert rerun_judge.calls == 0 and again["cache_hits"] == 8 and again["arbitrated"] == result["arbitrated"]


def test_scienceqa_command_with_a_model(data_dir, tmp_path, tiny_llava):
    model, processor = tiny_llava
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    out = tmp_path / "results"
    args = ["scienceqa", "--data-dir", str(data_dir), "--split", "test", "--model", str(checkpoint), "--out", str(out), "--max-new-tokens", "3"]
    result = evaluation_main(args)
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["question_id"] for p in predictions] == SPLITS["test"]
    assert result == score_scienceqa(load_problems(data_dir, "test"), {p["question_id"]: p["text"] for p in predictions})
    assert json.loads((out / "scores.json").read_text()) == result
