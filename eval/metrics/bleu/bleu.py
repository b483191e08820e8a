"""Corpus BLEU (Papineni et al., 2002): modified n-gram precisions up to 4 and the brevity penalty."""

import math
import re
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = """
Corpus-level BLEU-4 as defined by Papineni et al. (2002) and computed by sacrebleu: clipped n-gram counts
(n = 1..4) are summed over the whole corpus, BLEU = BP * exp(mean_n log p_n) with p_n = matches_n / total_n, and the
brevity penalty BP = exp(1 - r / c) if c < r else 1, where c is the total prediction length and r the sum over
sentences of the reference length closest to the prediction's (the shorter one on a tie). No smoothing: a corpus with
no matching n-gram of some order scores 0.

Tokenisation (`tokenize`): "13a" (default) is the mteval-v13a rule set that sacrebleu uses by default (punctuation
and symbols split off, periods and commas kept inside numbers); "whitespace" splits on spaces only; "none" is the same
as "whitespace". Case-sensitive unless `lowercase=True`. Scores are fractions in [0, 1] (sacrebleu prints 100x).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): system outputs, one per sentence.
    references (`list[str]` or `list[list[str]]`): per sentence, one reference or several (any number).
    max_order (`int`, defaults to 4): the largest n-gram order.
    tokenize (`str`, defaults to `"13a"`): `"13a"`, `"whitespace"` or `"none"`.
    lowercase (`bool`, defaults to `False`).
Returns:
    `bleu`, `precisions` (list of p_n), `brevity_penalty`, `length_ratio` (c / r), `translation_length` (c),
    `reference_length` (r).
Examples:
    >>> metric = evaluate.load("eval/metrics/bleu")
    >>> metric.compute(predictions=["the cat sat on the mat"], references=[["the cat sat on the mat"]])["bleu"]
    1.0
"""

_CITATION = """
@inproceedings{papineni2002bleu,
  title={BLEU: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle={ACL},
  year={2002}
}
"""

# mteval-v13a: symbols and most punctuation become tokens; '.' and ',' stay inside numbers; '-' after a digit splits
_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def tokenize_13a(line: str) -> list[str]:
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def ngram_counts(tokens, max_order):
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses, references, max_order=4):
    """hypotheses: list of token lists; references: list of lists of token lists."""
    matches, totals = [0] * max_order, [0] * max_order
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        hyp_len += len(hyp)
        # closest reference length, the shorter one on a tie
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
        max_ref = Counter()
        for ref in refs:
            max_ref |= ngram_counts(ref, max_order)  # | keeps the max count of each n-gram over the references
        for gram, count in ngram_counts(hyp, max_order).items():
            matches[len(gram) - 1] += min(count, max_ref[gram])
        for n in range(1, max_order + 1):
            totals[n - 1] += max(0, len(hyp) - n + 1)
    precisions = [m / t if t else 0.0 for m, t in zip(matches, totals)]
    if hyp_len == 0:
        brevity_penalty = 0.0
    else:
        brevity_penalty = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    bleu = brevity_penalty * math.exp(sum(math.log(p) for p in precisions) / max_order) if min(precisions) > 0 else 0.0
    return {"bleu": bleu, "precisions": precisions, "brevity_penalty": brevity_penalty,
            "length_ratio": hyp_len / ref_len if ref_len else 0.0, "translation_length": hyp_len,
            "reference_length": ref_len}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
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

    def _compute(self, predictions, references, max_order=4, tokenize="13a", lowercase=False):
        if tokenize not in ("13a", "whitespace", "none"):
            raise ValueError(f"tokenize must be '13a', 'whitespace' or 'none', not {tokenize!r}")
        split = tokenize_13a if tokenize == "13a" else str.split

        def tok(text):
            return split(text.lower() if lowercase else text)

        references = [[r] if isinstance(r, str) else r for r in references]
        return corpus_bleu([tok(p) for p in predictions], [[tok(r) for r in refs] for refs in references], max_order)
