"""POPE: yes/no object-hallucination metrics (Li et al., 2023) with "yes" as the positive class.

A reply is read as POPE's evaluation script reads it: keep the first sentence, drop commas, split into words;
if a word is `no` or `not` (any case) the answer is "no", otherwise "yes".

    metric = evaluate.load("evaluation/metrics/pope")
    metric.compute(predictions=["Yes, there is.", "No."], references=["yes", "yes"])
"""

import datasets
import evaluate

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the model's replies (free text; read as yes/no by POPE's rule).
    references (`list` of `str`): the correct answers, "yes" or "no".
Returns:
    accuracy, precision, recall, f1 (`float`): with "yes" as the positive class; precision is 0 when the model
        never says yes.
    yes_ratio (`float`): fraction of replies read as "yes" (0.5 on POPE's balanced sets for an unbiased model).
    n (`int`): number of questions.
"""


def yes_no(text):
    """POPE's reading of a reply: "no" if its first sentence holds the word no/not, else "yes"."""
    first_sentence = (text or "").split(".")[0]
    words = first_sentence.replace(",", " ").lower().split()
    return "no" if "no" in words or "not" in words else "yes"


def pope_metrics(predictions, references):
    """Accuracy, precision, recall, F1 and yes-ratio of replies against "yes"/"no" labels."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    labels = [str(r).strip().lower() for r in references]
    bad = sorted({r for r in labels if r not in ("yes", "no")})
    if bad:
        raise ValueError(f"references must be 'yes' or 'no', got {bad[:5]}")
    answers = [yes_no(p) for p in predictions]
    tp = sum(a == "yes" and r == "yes" for a, r in zip(answers, labels))
    fp = sum(a == "yes" and r == "no" for a, r in zip(answers, labels))
    tn = sum(a == "no" and r == "no" for a, r in zip(answers, labels))
    fn = sum(a == "no" and r == "yes" for a, r in zip(answers, labels))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "n": n,
    }


class Pope(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="@inproceedings{li2023pope, title={Evaluating Object Hallucination in Large Vision-Language "
            "Models}, author={Li, Yifan and others}, booktitle={EMNLP}, year={2023}}",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        return pope_metrics(predictions, references)
