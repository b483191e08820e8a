"""ROUGE-L: longest-common-subsequence F-measure between a prediction and its reference(s)."""

import re

import datasets
import evaluate

_DESCRIPTION = """
ROUGE-L (Lin, 2004) as computed by Google's `rouge-score` package: both texts are lower-cased, every character other
than a-z and 0-9 becomes a space, and the tokens are the remaining words (no stemming unless `use_stemmer`; the
Porter stemmer then comes from nltk). With LCS the length of their longest common subsequence,
P = LCS / len(prediction), R = LCS / len(reference), F = 2PR / (P + R). With several references a prediction takes
the best F over them (rouge-score's `score_multi`). The corpus score is the mean F over predictions (no bootstrap).
Note: the COCO caption evaluation's ROUGE-L differs (beta = 1.2 and max P and R over references taken separately).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated texts.
    references (`list[str]` or `list[list[str]]`): per prediction, one reference or several.
    use_stemmer (`bool`, defaults to `False`): Porter-stem tokens of 4+ characters (needs nltk).
Returns:
    `rougeL` (mean F-measure), `rougeL_precision`, `rougeL_recall` (means of the P and R of each prediction's best
    reference).
Examples:
    >>> metric = evaluate.load("eval/metrics/rouge")
    >>> metric.compute(predictions=["a cat sat on the mat"], references=["the cat is on the mat"])["rougeL"]
    0.6666666666666666
"""

_CITATION = """
@inproceedings{lin2004rouge,
  title={ROUGE: A Package for Automatic Evaluation of Summaries},
  author={Lin, Chin-Yew},
  booktitle={Text Summarization Branches Out},
  year={2004}
}
"""


def tokenize(text, stemmer=None):
    tokens = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    if stemmer is not None:
        tokens = [stemmer.stem(t) if len(t) > 3 else t for t in tokens]
    return tokens


def lcs_length(a, b):
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction, reference):
    """(precision, recall, f) of two token lists."""
    lcs = lcs_length(prediction, reference)
    if lcs == 0:
        return 0.0, 0.0, 0.0
    p, r = lcs / len(prediction), lcs / len(reference)
    return p, r, 2 * p * r / (p + r)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, use_stemmer=False):
        stemmer = None
        if use_stemmer:
            from nltk.stem import porter

            stemmer = porter.PorterStemmer()
        scores = []
        for prediction, refs in zip(predictions, references):
            refs = [refs] if isinstance(refs, str) else refs
            hyp = tokenize(prediction, stemmer)
            scores.append(max((rouge_l(hyp, tokenize(r, stemmer)) for r in refs), key=lambda prf: prf[2]))
        n = max(len(scores), 1)
        return {"rougeL": sum(s[2] for s in scores) / n, "rougeL_precision": sum(s[0] for s in scores) / n,
                "rougeL_recall": sum(s[1] for s in scores) / n}
