"""Recall@k, median rank and mean reciprocal rank for cross-modal retrieval (image<->text)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Ranking metrics for retrieval: each query comes with its ranked list of candidate ids (best first) and the id(s)
of its correct candidate(s). The rank of a query is the 1-based position of its best-ranked correct candidate;
a query whose correct candidates are all missing from its list gets rank len(list) + 1.
Recall@k is the fraction of queries with rank <= k; median_rank and mean_reciprocal_rank summarise the ranks.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[int]]`): per query, candidate ids ranked best first (ideally the full ranking,
        at least max(k_values) long).
    references (`list[int]` or `list[list[int]]`): per query, the id of the correct candidate, or a list of
        correct ids (e.g. 5 COCO captions per image: any of them is a hit).
    k_values (`tuple[int]`, defaults to `(1, 5, 10)`): the k of each recall@k.
Returns:
    `recall@k` for each k (fractions in [0, 1]), `median_rank` (1-based), `mean_reciprocal_rank`.
Examples:
    >>> metric = evaluate.load("eval/metrics/retrieval_recall")
    >>> metric.compute(predictions=[[3, 1, 2], [0, 2, 1]], references=[3, 1], k_values=(1, 2))
    {'recall@1': 0.5, 'recall@2': 0.5, 'median_rank': 2.0, 'mean_reciprocal_rank': 0.6666666666666666}
"""

_CITATION = ""

_RANKING = datasets.Sequence(datasets.Value("int64"))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # one correct id per query, or several (evaluate picks the format that fits the first example)
            features=[
                datasets.Features({"predictions": _RANKING, "references": datasets.Value("int64")}),
                datasets.Features({"predictions": _RANKING, "references": _RANKING}),
            ],
        )

    def _compute(self, predictions, references, k_values=(1, 5, 10)):
        ranks = []
        for ranking, correct in zip(predictions, references):
            correct = {correct} if isinstance(correct, int) else set(correct)
            # first hit in the ranking; len + 1 when none of the correct ids were retrieved
            ranks.append(next((i + 1 for i, c in enumerate(ranking) if c in correct), len(ranking) + 1))
        ranks = np.array(ranks, dtype=np.float64)
        out = {f"recall@{k}": float(np.mean(ranks <= k)) for k in k_values}
        out["median_rank"] = float(np.median(ranks))
        out["mean_reciprocal_rank"] = float(np.mean(1.0 / ranks))
        return out
