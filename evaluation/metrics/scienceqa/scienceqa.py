"""ScienceQA accuracy with LLaVA's answer extraction; replies whose letter cannot be read are counted as failed.

The letter of a reply is read by the first rule that applies (LLaVA's `eval_science_qa.py`):

1. the whole reply is a bare option letter: `"B"`;
2. the reply starts with the letter and a period: `"B."`, `"B. Louisiana"`;
3. the reply says `"The answer is B."` (also `"the answer is (B)"`); several such sentences must agree.

Anything else (or a letter beyond the question's options) is a failure: it counts as wrong, and `n_failed`
says how often it happened (LLaVA picks a random option instead; a count is more honest).

    metric = evaluate.load("evaluation/metrics/scienceqa")
    metric.compute(predictions=["B", "The answer is A."], references=["B", "C"])  # accuracy 0.5
"""

import re

import datasets
import evaluate

LETTERS = "ABCDE"
_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the model's replies.
    references (`list` of `str`): the correct option letters.
    num_choices (`list` of `int`, *optional*): options per question (letters beyond them are failures); default 5.
Returns:
    accuracy (`float`): fraction of replies whose extracted letter is correct (failures count as wrong).
    n, n_correct, n_failed (`int`): questions, correct replies, replies whose letter could not be read.
"""

_THE_ANSWER_IS = re.compile(r"\b[Tt]he answer is:?\s*\(?([A-Z])\)?(?![A-Za-z])")


def extract_answer(text, num_choices=len(LETTERS)):
    """The option letter a reply gives, or None when no rule applies. See the module docstring for the rules."""
    options = LETTERS[:num_choices]
    text = (text or "").strip()
    if len(text) == 1:
        return text if text in options else None
    if len(text) >= 2 and text[0] in options and text[1] == "." and (len(text) == 2 or text[2].isspace()):
        return text[0]
    letters = set(_THE_ANSWER_IS.findall(text))
    if len(letters) == 1:
        letter = letters.pop()
        return letter if letter in options else None
    return None


def scienceqa_accuracy(predictions, references, num_choices=None):
    """Accuracy, counts and failures of replies against gold letters."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    if num_choices is None:
        num_choices = [len(LETTERS)] * len(predictions)
    correct = failed = 0
    for reply, gold, k in zip(predictions, references, num_choices):
        letter = extract_answer(reply, k)
        failed += letter is None
        correct += letter is not None and letter == gold
    n = len(predictions)
    return {"accuracy": correct / n if n else 0.0, "n": n, "n_correct": correct, "n_failed": failed}


class ScienceQA(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="@inproceedings{lu2022learn, title={Learn to Explain: Multimodal Reasoning via Thought Chains for "
            "Science Question Answering}, author={Lu, Pan and others}, booktitle={NeurIPS}, year={2022}}",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, num_choices=None):
        return scienceqa_accuracy(predictions, references, num_choices)
