"""The metrics on fixtures whose right numbers are worked out by hand, and their `evaluate` modules loaded by path."""

import evaluate
import pytest
from conftest import REPO

from evaluation.llava_bench import parse_scores
from evaluation.metrics import metric_path
from evaluation.metrics.first_word_accuracy.first_word_accuracy import first_word, first_word_accuracy
from evaluation.metrics.pope.pope import pope_metrics, yes_no
from evaluation.metrics.relative_score.relative_score import relative_scores
from evaluation.metrics.scienceqa.scienceqa import extract_answer, scienceqa_accuracy

# ---------------------------------------------------------------------------------------------------
# LLaVA-Bench relative score
# ---------------------------------------------------------------------------------------------------

# (category, reference score, candidate score)
PAIRS = [
    ("conversation", 8, 6),
    ("conversation", 10, 9),
    ("detail", 8, 8),
    ("complex", 9, 3),
    ("complex", 7, 5),
]


def test_relative_score_per_category_and_overall():
    result = relative_scores([c for _, _, c in PAIRS], [r for _, r, _ in PAIRS], [k for k, _, _ in PAIRS])
    # conversation: candidate mean 7.5, reference mean 9 -> 83.33 %
    assert result["per_category"]["conversation"]["relative_score"] == pytest.approx(7.5 / 9 * 100)
    assert result["per_category"]["conversation"]["n"] == 2
    assert result["per_category"]["detail"]["relative_score"] == pytest.approx(100.0)
    assert result["per_category"]["complex"]["relative_score"] == pytest.approx(50.0)  # 4 / 8
    # Overall: 31/5 over 42/5, over all pairs -- not the mean of the three category scores (77.8 %).
    assert result["relative_score"] == pytest.approx(31 / 42 * 100)
    assert result["candidate_mean"] == pytest.approx(6.2)
    assert result["reference_mean"] == pytest.approx(8.4)
    assert result["n"] == 5


def test_relative_score_evaluate_module_loads_by_path():
    metric = evaluate.load(str(REPO / "evaluation" / "metrics" / "relative_score"))
    result = metric.compute(
        predictions=[c for _, _, c in PAIRS], references=[r for _, r, _ in PAIRS], categories=[k for k, _, _ in PAIRS]
    )
    assert result["relative_score"] == pytest.approx(31 / 42 * 100)
    assert result["per_category"]["complex"]["relative_score"] == pytest.approx(50.0)


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("8 7\nAssistant 1 is more detailed.", (8, 7)),
        ("8, 7", (8, 7)),
        ("**9 6**\nexplanation", (9, 6)),
        ("Assistant 1: 8\nAssistant 2: 7\nBoth are fine.", (8, 7)),
        ("Assistant 1 score: 10\nAssistant 2 score: 4", (10, 4)),
        ("8/10 and 7/10", (8, 7)),
        ("Scores: 7.5 8", (7.5, 8)),
        ("\n\n6 9\n", (6, 9)),
        ("Assistant 1 gets 8 and Assistant 2 gets 3.", (8, 3)),
    ],
)
def test_parse_scores_reads_the_judges_formats(reply, expected):
    assert parse_scores(reply) == expected


@pytest.mark.parametrize(
    "reply",
    ["", "Both answers are good.", "8", "8 7 6", "11 3", "The first answer mentions 3 shapes, the second 2 and 4."],
)
def test_parse_scores_fails_on_unreadable_lines(reply):
    assert parse_scores(reply) is None


# ---------------------------------------------------------------------------------------------------
# ScienceQA extraction and accuracy
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, num_choices, expected",
    [
        ("B", 4, "B"),  # bare letter
        (" C \n", 4, "C"),
        ("A.", 2, "A"),  # "X." prefix
        ("D. Oklahoma", 4, "D"),
        ("The answer is B.", 3, "B"),  # "The answer is X."
        ("Looking at the map... The answer is (C).", 3, "C"),
        ("The answer is A. Indeed, the answer is A.", 2, "A"),  # several, agreeing
        ("The answer is A. No wait, the answer is B.", 2, None),  # several, disagreeing
        ("E", 4, None),  # a letter beyond the options
        ("The answer is D.", 3, None),
        ("b", 4, None),
        ("Because the map shows it.", 4, None),
        ("Answer: Blue", 4, None),
        ("The answer is Blue.", 4, None),  # "B" of a word is no letter
        ("A cat is a mammal.", 4, None),  # a sentence starting with "A" is not the "A." rule
    ],
)
def test_extract_answer_rules(reply, num_choices, expected):
    assert extract_answer(reply, num_choices) == expected


def test_scienceqa_accuracy_counts_failures_as_wrong():
    replies = ["B", "The answer is A.", "C. Ohio", "E", "no idea"]
    gold = ["B", "C", "C", "E", "A"]
    result = scienceqa_accuracy(replies, gold, num_choices=[2, 3, 3, 4, 2])
    # right: 1st (bare), 3rd (prefix); wrong: 2nd; failed: 4th (E beyond 4 options), 5th
    assert result == {"accuracy": 2 / 5, "n": 5, "n_correct": 2, "n_failed": 2}
    metric = evaluate.load(str(REPO / "evaluation" / "metrics" / "scienceqa"))
    assert metric.compute(predictions=replies, references=gold, num_choices=[2, 3, 3, 4, 2]) == result


# ---------------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------------

POPE_CASES = [  # (reply, label, read as)
    ("Yes, there is a dog in the image.", "yes", "yes"),  # TP
    ("yes", "yes", "yes"),  # TP
    ("No, I do not see one.", "yes", "no"),  # FN
    ("There is a car. No doubt.", "no", "yes"),  # FP: only the first sentence counts
    ("No", "no", "no"),  # TN
    ("There is not a bus in the image.", "no", "no"),  # TN
    ("I can see a boat", "no", "yes"),  # FP: no no/not -> yes
    ("no, there isn't.", "no", "no"),  # TN
]


def test_pope_reads_replies_with_popes_rule():
    assert [yes_no(reply) for reply, _, _ in POPE_CASES] == [read for _, _, read in POPE_CASES]


def test_pope_metrics_by_hand():
    replies, labels = [c[0] for c in POPE_CASES], [c[1] for c in POPE_CASES]
    result = pope_metrics(replies, labels)
    # TP 2, FN 1, FP 2, TN 3
    assert result["accuracy"] == pytest.approx(5 / 8)
    assert result["precision"] == pytest.approx(2 / 4)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(4 / 7)  # 2PR/(P+R) = (2/3)/(7/6)
    assert result["yes_ratio"] == pytest.approx(4 / 8)
    assert result["n"] == 8
    metric = evaluate.load(str(REPO / "evaluation" / "metrics" / "pope"))
    assert metric.compute(predictions=replies, references=labels) == pytest.approx(result)


def test_pope_metrics_edge_cases():
    never_yes = pope_metrics(["No.", "No."], ["yes", "no"])
    assert never_yes["precision"] == 0.0 and never_yes["recall"] == 0.0 and never_yes["f1"] == 0.0
    assert never_yes["yes_ratio"] == 0.0 and never_yes["accuracy"] == 0.5
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"])


# ---------------------------------------------------------------------------------------------------
# First-word accuracy (the scene probe's rule)
# ---------------------------------------------------------------------------------------------------


def test_first_word_rule():
    assert first_word("Red. The circle is red.") == "red"
    assert first_word("  \"Yes\", there is") == "yes"
    assert first_word("...three!") == "three"
    assert first_word("") == ""
    result = first_word_accuracy(["Red. The circle", "two", "Yes, there is", "", "blue-ish"], ["red", "three", "Yes", "", "blue"])
    assert result == {"accuracy": 3 / 5, "n": 5}  # the empty pair does not count as right
    metric = evaluate.load(metric_path("first_word_accuracy"))  # the same folder, found from the installed package
    assert metric_path("first_word_accuracy") == str(REPO / "evaluation" / "metrics" / "first_word_accuracy")
    assert metric.compute(predictions=["Red.", "four"], references=["red", "three"]) == {"accuracy": 0.5, "n": 2}
