"""LLaVA-Bench relative score: mean(candidate score) / mean(reference score) x 100, per category and overall.

A judge scores the reference answer (Assistant 1) and the candidate's answer (Assistant 2) from 1 to 10 for each
question. The relative score is the ratio of the two means, in percent: 100 means "as good as the reference".

    metric = evaluate.load("evaluation/metrics/relative_score")
    metric.compute(predictions=[7, 8], references=[8, 8], categories=["conversation", "detail"])

Self-contained (standard library + `evaluate`/`datasets`): `evaluate.load` copies this file alone.
"""

import datasets
import evaluate

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): the judge's scores (1-10) of the candidate answers (Assistant 2).
    references (`list` of `float`): the judge's scores (1-10) of the reference answers (Assistant 1).
    categories (`list` of `str`, *optional*): the question category of each pair (e.g. conversation, detail,
        complex); each gets its own entry in `per_category`.
Returns:
    relative_score (`float`): mean(predictions) / mean(references) x 100 over all pairs.
    candidate_mean, reference_mean (`float`): the two means, on the judge's 1-10 scale.
    n (`int`): number of pairs.
    per_category (`dict`): the same four numbers for each category.
"""

_CITATION = """@inproceedings{liu2023llava, title={Visual Instruction Tuning}, author={Liu, Haotian and Li, Chunyuan
and Wu, Qingyang and Lee, Yong Jae}, booktitle={NeurIPS}, year={2023}}"""


def summarize(candidate_scores, reference_scores):
    """The four numbers of one group of score pairs. Raises ValueError on an empty group or a zero reference mean."""
    n = len(candidate_scores)
    if n == 0 or n != len(reference_scores):
        raise ValueError(f"need as many candidate as reference scores, at least one; got {n} and {len(reference_scores)}")
    candidate_mean = sum(candidate_scores) / n
    reference_mean = sum(reference_scores) / n
    if reference_mean == 0:
        raise ValueError("the reference answers' mean score is 0; a relative score is undefined")
    return {
        "relative_score": candidate_mean / reference_mean * 100,
        "candidate_mean": candidate_mean,
        "reference_mean": reference_mean,
        "n": n,
    }


def relative_scores(candidate_scores, reference_scores, categories=None):
    """Overall numbers (`relative_score`, `candidate_mean`, `reference_mean`, `n`) plus `per_category`.

    The overall ratio is over all pairs (as LLaVA's summary script computes it), not the mean of the categories'.
    """
    candidate_scores, reference_scores = list(candidate_scores), list(reference_scores)
    result = summarize(candidate_scores, reference_scores)
    per_category = {}
    if categories is not None:
        categories = list(categories)
        if len(categories) != len(candidate_scores):
            raise ValueError(f"got {len(categories)} categories for {len(candidate_scores)} score pairs")
        for category in sorted(set(categories)):
            index = [i for i, c in enumerate(categories) if c == category]
            per_category[category] = summarize([candidate_scores[i] for i in index], [reference_scores[i] for i in index])
    result["per_category"] = per_category
    return result


class RelativeScore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references, categories=None):
        return relative_scores(predictions, references, categories)
