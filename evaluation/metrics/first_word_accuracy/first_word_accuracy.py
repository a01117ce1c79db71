"""First-word accuracy: a reply is right when its first word equals the reference's (case and punctuation ignored).

The scoring rule of the synthetic scene world's probe, whose answers are one word ("red", "three", "Yes") and
whose training answers start with that word ("Red. The circle ...", "Yes, there is ...").

    metric = evaluate.load("evaluation/metrics/first_word_accuracy")
    metric.compute(predictions=["Red. The circle is red.", "two"], references=["red", "three"])  # accuracy 0.5
"""

import re

import datasets
import evaluate

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the model's replies.
    references (`list` of `str`): the expected answers.
Returns:
    accuracy (`float`): fraction of replies whose first word matches the reference's first word.
    n (`int`): number of replies.
"""

_WORD = re.compile(r"[^\W_]+")  # letters and digits, any script; punctuation and underscores separate words


def first_word(text):
    """The first word of `text`, lower-cased, without punctuation; "" when there is none."""
    match = _WORD.search((text or "").lower())
    return match.group(0) if match else ""


def first_word_accuracy(predictions, references):
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    hits = sum(first_word(p) == first_word(r) != "" for p, r in zip(predictions, references))
    n = len(predictions)
    return {"accuracy": hits / n if n else 0.0, "n": n}


class FirstWordAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        return first_word_accuracy(predictions, references)
