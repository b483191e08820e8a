"""Character error rate (CER) for speech recognition: Levenshtein character edits, corpus-level."""

import datasets
import evaluate

_DESCRIPTION = """
Character error rate: align each prediction with its reference by Levenshtein distance over characters
(substitutions, deletions and insertions cost 1 each), then CER = (S + D + I) / N summed over the corpus, N being the
total number of reference characters. Corpus-level, as jiwer computes it. Each string is stripped of leading and
trailing whitespace; inner spaces count as characters (as in jiwer's default). No case folding or punctuation removal.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): transcriptions to score.
    references (`list[str]`): reference transcriptions (at least one character in total over the corpus).
Returns:
    `cer` (float, >= 0: can exceed 1 with many insertions), and the totals `substitutions`, `deletions`,
    `insertions`, `hits`, `reference_characters`.
Examples:
    >>> metric = evaluate.load("eval/metrics/cer")
    >>> metric.compute(predictions=["kitten"], references=["sitting"])["cer"]
    0.42857142857142855
"""

_CITATION = ""


def align_counts(reference, hypothesis):
    """(substitutions, deletions, insertions, hits) of a minimum-edit alignment of two token sequences.

    Dynamic programming over (edits, -hits): among alignments with the fewest edits, the one with the most hits,
    so the S/D/I split is deterministic.
    """
    # row[j] = (cost, s, d, i, h) for reference[:r] vs hypothesis[:j]
    row = [(j, 0, 0, j, 0) for j in range(len(hypothesis) + 1)]
    for r in range(1, len(reference) + 1):
        new = [(r, 0, r, 0, 0)]
        for j in range(1, len(hypothesis) + 1):
            c, s, d, i, h = row[j - 1]
            if reference[r - 1] == hypothesis[j - 1]:
                diag = (c, s, d, i, h + 1)
            else:
                diag = (c + 1, s + 1, d, i, h)
            c, s, d, i, h = row[j]
            delete = (c + 1, s, d + 1, i, h)
            c, s, d, i, h = new[j - 1]
            insert = (c + 1, s, d, i + 1, h)
            new.append(min(diag, delete, insert, key=lambda t: (t[0], -t[4])))
        row = new
    _, s, d, i, h = row[-1]
    return s, d, i, h


def error_rate(pairs):
    s = d = i = h = n = 0
    for reference, hypothesis in pairs:
        counts = align_counts(reference, hypothesis)
        s, d, i, h = s + counts[0], d + counts[1], i + counts[2], h + counts[3]
        n += len(reference)
    if n == 0:
        raise ValueError("the references contain no tokens: the error rate is undefined")
    return {"rate": (s + d + i) / n, "substitutions": s, "deletions": d, "insertions": i, "hits": h, "total": n}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CER(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        out = error_rate((list(r.strip()), list(p.strip())) for p, r in zip(predictions, references))
        return {"cer": out["rate"], "substitutions": out["substitutions"], "deletions": out["deletions"],
                "insertions": out["insertions"], "hits": out["hits"], "reference_characters": out["total"]}
