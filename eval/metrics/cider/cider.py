"""CIDEr-D (Vedantam et al., 2015) as computed by the COCO caption evaluation."""

import math
import re
from collections import Counter, defaultdict

import datasets
import evaluate

_DESCRIPTION = """
CIDEr-D, the "CIDEr" of the COCO caption evaluation (coco-caption / pycocoevalcap): each caption becomes tf-idf
vectors of its n-grams (n = 1..4), with document frequencies counted over the reference sets of the evaluated corpus
(an n-gram counts once per image) and idf = log(#images) - log(max(1, df)). For each n, the similarity of a
prediction with a reference is sum_g min(v_pred[g], v_ref[g]) * v_ref[g] / (|v_pred| |v_ref|) (the clipping of
CIDEr-D), times the gaussian length penalty exp(-(l_pred - l_ref)^2 / (2 sigma^2)), sigma = 6, where l is the
caption's bigram count as in the reference code. The score of a prediction is 10 x the mean over n of the mean over its
references; the corpus score is the mean over predictions. Scores range over [0, 10] and are usually reported x100.

Tokenisation: COCO runs the Stanford PTB tokenizer (Java) first, then lower-cases and removes punctuation tokens.
Here, without Java (`tokenize=True`, default): lower-case, replace punctuation characters by spaces, split on
whitespace, an approximation that differs from PTB on clitics ("dog's" -> "dog s", PTB keeps "'s").
Pass `tokenize=False` for text that is already tokenised (then only whitespace splitting is done). Because idf comes
from the evaluated corpus, scores depend on the whole corpus: a single image gives 0 (log 1 = 0).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): one generated caption per image.
    references (`list[list[str]]`): per image, its reference captions (COCO: 5).
    sigma (`float`, defaults to 6.0): width of the length penalty.
    tokenize (`bool`, defaults to `True`): lower-case and strip punctuation before splitting on whitespace.
Returns:
    `cider` (corpus mean) and `cider_per_example` (list of scores).
Examples:
    >>> metric = evaluate.load("eval/metrics/cider")
    >>> metric.compute(predictions=["a cat", "a dog"], references=[["a cat"], ["a dog"]])["cider"]
    5.0
"""

_CITATION = """
@inproceedings{vedantam2015cider,
  title={CIDEr: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={CVPR},
  year={2015}
}
"""

# punctuation removed before splitting (approximates PTB tokenisation + COCO's punctuation-token removal)
_PUNCTUATION = re.compile(r"""''|'|``|`|-LRB-|-RRB-|-LCB-|-RCB-|[.?!,:;\-_/"()\[\]{}@#$%^&*+=|\\<>~]""")
_MAX_N = 4


def coco_tokenize(text: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def _counts(caption):
    words = caption.split()
    return Counter(tuple(words[i : i + n]) for n in range(1, _MAX_N + 1) for i in range(len(words) - n + 1))


def _vector(counts, document_frequency, log_images):
    """Per-order tf-idf dicts, their norms and the caption 'length' (its bigram count, as the COCO code uses)."""
    vec = [defaultdict(float) for _ in range(_MAX_N)]
    norm = [0.0] * _MAX_N
    length = 0
    for gram, tf in counts.items():
        n = len(gram) - 1
        vec[n][gram] = tf * (log_images - math.log(max(1.0, document_frequency[gram])))
        norm[n] += vec[n][gram] ** 2
        if n == 1:
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def _similarity(hyp, ref, sigma):
    (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
    penalty = math.exp(-((len_h - len_r) ** 2) / (2 * sigma**2))
    sims = []
    for n in range(_MAX_N):
        value = sum(min(w, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0) for g, w in vec_h[n].items())
        if norm_h[n] != 0 and norm_r[n] != 0:
            value /= norm_h[n] * norm_r[n]
        sims.append(value * penalty)
    return sims


def cider_d(predictions, references, sigma=6.0):
    """predictions: list of captions; references: list of lists of captions (all already tokenised)."""
    ref_counts = [[_counts(r) for r in refs] for refs in references]
    document_frequency = Counter(gram for refs in ref_counts for gram in set().union(*refs))
    log_images = math.log(float(len(references)))
    scores = []
    for prediction, refs in zip(predictions, ref_counts):
        hyp = _vector(_counts(prediction), document_frequency, log_images)
        per_order = [0.0] * _MAX_N
        for ref in refs:
            for n, s in enumerate(_similarity(hyp, _vector(ref, document_frequency, log_images), sigma)):
                per_order[n] += s
        scores.append(sum(per_order) / _MAX_N / len(refs) * 10.0)
    return scores


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Cider(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references, sigma=6.0, tokenize=True):
        if any(len(refs) == 0 for refs in references):
            raise ValueError("every prediction needs at least one reference caption")
        prep = coco_tokenize if tokenize else (lambda text: " ".join(text.split()))
        scores = cider_d([prep(p) for p in predictions], [[prep(r) for r in refs] for refs in references], sigma)
        return {"cider": sum(scores) / len(scores) if scores else 0.0, "cider_per_example": scores}
