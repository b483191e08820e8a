"""Word error rate (WER) for speech recognition: Levenshtein word edits over reference words, corpus-level."""

import datasets
import evaluate

_DESCRIPTION = """
Word error rate: align each prediction with its reference by Levenshtein distance over words (substitutions,
deletions and insertions cost 1 each), then WER = (S + D + I) / N summed over the corpus, N being the total number of
reference words. Corpus-level, not a mean of per-sentence rates (as jiwer and the HF `wer` metric compute it).
Words are the whitespace-separated tokens of each string; no case folding or punctuation removal is done, so
normalise the text first (e.g. Whisper's English normaliser) when the systems you compare write differently.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): transcriptions to score.
    references (`list[str]`): reference transcriptions (at least one word in total over the corpus).
Returns:
    `wer` (float, >= 0: can exceed 1 with many insertions), and the totals `substitutions`, `deletions`,
    `insertions`, `hits`, `reference_words`.
Examples:
    >>> metric = evaluate.load("eval/metrics/wer")
    >>> metric.compute(predictions=["the cat sat on mat"], references=["the cat sat on the mat"])["wer"]
    0.16666666666666666
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
class WER(evaluate.Metric):
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
        out = error_rate((r.split(), p.split()) for p, r in zip(predictions, references))
        return {"wer": out["rate"], "substitutions": out["substitutions"], "deletions": out["deletions"],
                "insertions": out["insertions"], "hits": out["hits"], "reference_words": out["total"]}
