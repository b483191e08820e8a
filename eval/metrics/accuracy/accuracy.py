"""Classification accuracy: the fraction of predictions equal to their reference label."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy = (number of predictions equal to their reference) / (number of examples), optionally weighted per example.
Labels are integers (class ids) or strings (class names, compared exactly).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]` or `list[str]`): predicted labels.
    references (`list[int]` or `list[str]`): true labels.
    normalize (`bool`, defaults to `True`): return the fraction; `False` returns the number (or weight) correct.
    sample_weight (`list[float]`, optional): per-example weights.
Returns:
    `accuracy` (float).
Examples:
    >>> metric = evaluate.load("eval/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = np.array([p == r for p, r in zip(predictions, references)], dtype=np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if len(weights) != len(correct):
            raise ValueError(f"sample_weight has {len(weights)} entries for {len(correct)} examples")
        total = float(np.sum(correct * weights))
        return {"accuracy": total / float(np.sum(weights)) if normalize else total}
