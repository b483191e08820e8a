"""The evaluate metric modules in eval/metrics: hand-computed values, and reference implementations where installed."""

import importlib.util
import math
from functools import cache

import pytest

from multimodal_moe.eval.metrics import METRICS_DIR, available_metrics, load_metric

FLOAT = dict(rel=1e-9, abs=1e-12)


@cache
def metric(name):
    return load_metric(name)


def test_every_issue_metric_is_available():
    assert {"accuracy", "wer", "cer", "bleu", "rouge", "cider", "vqa_accuracy", "retrieval_recall"} <= set(
        available_metrics()
    )


# --- accuracy -------------------------------------------------------------------------------------------------------


def test_accuracy_by_hand():
    m = metric("accuracy")
    assert m.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1]) == {"accuracy": 0.75}
    assert m.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1], sample_weight=[1, 1, 2, 1])["accuracy"] == 0.6
    assert m.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1], normalize=False)["accuracy"] == 3
    assert m.compute(predictions=["cat", "dog"], references=["cat", "cow"])["accuracy"] == 0.5


# --- WER / CER ------------------------------------------------------------------------------------------------------

WER_REFS = ["a b c d", "hello world there"]
WER_HYPS = ["a x c d e", "world there"]


def test_wer_is_corpus_level_by_hand():
    out = metric("wer").compute(predictions=WER_HYPS, references=WER_REFS)
    # sentence 1: b->x (S) and e inserted (I); sentence 2: "hello" deleted (D): 3 edits over 7 reference words
    assert (out["substitutions"], out["deletions"], out["insertions"], out["hits"]) == (1, 1, 1, 5)
    assert out["wer"] == pytest.approx(3 / 7, **FLOAT)  # not the mean of sentence rates, (2/4 + 1/3) / 2
    assert metric("wer").compute(predictions=["x y z w"], references=["a"])["wer"] == 4.0  # can exceed 1


def test_cer_by_hand():
    out = metric("cer").compute(predictions=["kitten", " a b"], references=["sitting", "ab "])
    # kitten/sitting: k->s, e->i, +g = 3 edits over 7; "a b"/"ab" (stripped): the space inserted, 1 over 2
    assert out["cer"] == pytest.approx(4 / 9, **FLOAT)
    assert (out["substitutions"], out["deletions"], out["insertions"]) == (2, 1, 1)


def test_error_rates_match_jiwer():
    jiwer = pytest.importorskip("jiwer")
    refs = ["the quick brown fox jumps over the lazy dog", "speech recognition is hard", "one two three", "a"]
    hyps = ["the quick brown box jumped over lazy dog dog", "speech wreck a nition is hard", "x", "a b c"]
    assert metric("wer").compute(predictions=hyps, references=refs)["wer"] == pytest.approx(jiwer.wer(refs, hyps))
    assert metric("cer").compute(predictions=hyps, references=refs)["cer"] == pytest.approx(jiwer.cer(refs, hyps))
    words = jiwer.process_words(refs, hyps)
    out = metric("wer").compute(predictions=hyps, references=refs)
    assert out["substitutions"] + out["deletions"] + out["insertions"] == (
        words.substitutions + words.deletions + words.insertions
    )


# --- BLEU -----------------------------------------------------------------------------------------------------------


def test_bleu_by_hand():
    out = metric("bleu").compute(
        predictions=["the cat sat on the mat", "a dog runs in the park"],
        references=[["the cat is on the mat"], ["a dog runs in the park"]],
        tokenize="whitespace",
    )
    # clipped matches / totals per order, summed over both sentences (the second matches fully)
    expected = [(5 + 6) / (6 + 6), (3 + 5) / (5 + 5), (1 + 4) / (4 + 4), (0 + 3) / (3 + 3)]
    assert out["precisions"] == pytest.approx(expected, **FLOAT)
    assert out["brevity_penalty"] == 1.0
    assert out["bleu"] == pytest.approx(math.prod(expected) ** 0.25, **FLOAT)


def test_bleu_brevity_penalty_and_closest_reference_by_hand():
    bleu = metric("bleu")
    out = bleu.compute(predictions=["a dog runs in the park"], references=[["a dog runs in the big park", "a dog"]])
    # closest reference length to 6 is 7 (not 2); precisions 6/6, 4/5, 3/4, 2/3 (max counts over both references)
    assert out["reference_length"] == 7 and out["translation_length"] == 6
    assert out["brevity_penalty"] == pytest.approx(math.exp(1 - 7 / 6), **FLOAT)
    assert out["bleu"] == pytest.approx(math.exp(1 - 7 / 6) * (1 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25, **FLOAT)
    # a tie in |ref - hyp| takes the shorter reference
    tie = bleu.compute(predictions=["a b c d e"], references=[["a b c d", "a b c d e f"]])
    assert tie["reference_length"] == 4
    # clipping: Papineni's "the the the ..." gets 2/7 unigram precision, and 0 BLEU without smoothing
    clip = bleu.compute(predictions=["the the the the the the the"], references=[["the cat is on the mat"]])
    assert clip["precisions"][0] == pytest.approx(2 / 7) and clip["bleu"] == 0.0


def test_bleu_13a_tokenisation():
    spec = importlib.util.spec_from_file_location("bleu_module", METRICS_DIR / "bleu" / "bleu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenize_13a = module.tokenize_13a
    assert tokenize_13a("Hello, world! It costs $3.50-4.") == [
        "Hello", ",", "world", "!", "It", "costs", "$", "3.50", "-", "4", ".",
    ]
    assert tokenize_13a("1,000 people &amp; a dog's bone.") == ["1,000", "people", "&", "a", "dog's", "bone", "."]


def test_bleu_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = [
        "The cat sat on the mat, quietly.",
        "A man is riding a horse on the beach!",
        "It costs $3.50 -- or 4 euros.",
        "Two dogs play in the snow near a red fence",
    ]
    refs = [
        ["The cat is sitting on the mat.", "A cat sat quietly on a mat."],
        ["A man rides a horse along the beach.", "Someone is riding a brown horse on the sand!"],
        ["It costs $3.50, or 4 euros.", "The price is 3.50 dollars -- 4 euros."],
        ["Two dogs are playing in the snow by a red fence", "Dogs play in snow near the fence"],
    ]
    ours = metric("bleu").compute(predictions=hyps, references=refs)
    theirs = sacrebleu.corpus_bleu(hyps, [list(r) for r in zip(*refs)], smooth_method="none", tokenize="13a")
    assert ours["bleu"] * 100 == pytest.approx(theirs.score, rel=1e-9)
    assert [p * 100 for p in ours["precisions"]] == pytest.approx(theirs.precisions, rel=1e-9)
    assert ours["brevity_penalty"] == pytest.approx(theirs.bp, rel=1e-9)
    assert (ours["translation_length"], ours["reference_length"]) == (theirs.sys_len, theirs.ref_len)
    lower = sacrebleu.corpus_bleu(hyps, [list(r) for r in zip(*refs)], smooth_method="none", lowercase=True)
    ours_lower = metric("bleu").compute(predictions=hyps, references=refs, lowercase=True)
    assert ours_lower["bleu"] * 100 == pytest.approx(lower.score, rel=1e-9)


# --- ROUGE-L --------------------------------------------------------------------------------------------------------


def test_rouge_l_by_hand():
    rouge = metric("rouge")
    # LCS("a cat sat on the mat", "the cat is on the mat") = cat on the mat: P = R = 4/6
    assert rouge.compute(predictions=["a cat sat on the mat"], references=["the cat is on the mat"])["rougeL"] == (
        pytest.approx(2 / 3, **FLOAT)
    )
    # P = 2/2, R = 2/5 -> F = 2 * 0.4 / 1.4; the better of two references is taken; punctuation and case ignored
    out = rouge.compute(predictions=["Red, Apple!"], references=[["zzz", "a red shiny round apple"]])
    assert out["rougeL"] == pytest.approx(2 * 0.4 / 1.4, **FLOAT)
    assert (out["rougeL_precision"], out["rougeL_recall"]) == pytest.approx((1.0, 0.4))
    assert rouge.compute(predictions=["x", "a b"], references=["y", "a b"])["rougeL"] == 0.5  # mean over predictions


def test_rouge_l_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    preds = ["The cat sat on the mat.", "police killed the gunman", "a quick brown dog jumps",
             "Running fast, runners ran"]
    refs = [
        ["A cat was sitting on the mat", "the cat is on a mat"],
        ["the gunman was shot down by police", "police kill the gunman"],
        ["the quick brown fox jumps over the lazy dog", "quick dogs jump"],
        ["the runner runs fast", "runners running quickly"],
    ]
    for use_stemmer in (False, True):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
        expected = [scorer.score_multi(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
        ours = metric("rouge").compute(predictions=preds, references=refs, use_stemmer=use_stemmer)
        assert ours["rougeL"] == pytest.approx(sum(expected) / len(expected), rel=1e-9)


# --- CIDEr-D --------------------------------------------------------------------------------------------------------


def test_cider_d_by_hand():
    cider = metric("cider")
    # 2 images: idf(g) = log 2 - log df(g); "a" is in both reference sets -> weight 0. Each prediction equals its
    # reference: cosine 1 for unigrams and bigrams, nothing for 3-, 4-grams -> 10 * (1 + 1 + 0 + 0) / 4 = 5
    assert cider.compute(predictions=["a cat", "a dog"], references=[["a cat"], ["a dog"]])["cider_per_example"] == (
        pytest.approx([5.0, 5.0], **FLOAT)
    )
    # "cat" vs "a cat": unigram cosine 1, no bigrams; lengths (bigram counts) 0 vs 1 -> penalty exp(-1 / (2 * 36))
    out = cider.compute(predictions=["Cat.", "a dog"], references=[["a cat"], ["a dog"]])
    assert out["cider_per_example"][0] == pytest.approx(10 * math.exp(-1 / 72) / 4, **FLOAT)
    # the score of an image averages over its references; a caption sharing nothing with the corpus scores 0
    out = cider.compute(predictions=["a cat", "zebra"], references=[["a cat", "xx yy"], ["a dog"]])
    assert out["cider_per_example"][1] == 0.0
    # "xx yy": no overlap -> 0; "a cat" vs itself: unigram cosine 1 ("a" has idf 0), bigram cosine 1 -> (5 + 0) / 2
    assert out["cider_per_example"][0] == pytest.approx(2.5, **FLOAT)
    assert out["cider"] == pytest.approx(1.25, **FLOAT)


def test_cider_d_matches_pycocoevalcap():
    cider_module = pytest.importorskip("pycocoevalcap.cider.cider")
    preds = ["a man riding a horse on a beach", "two dogs playing in the snow", "a plate of food with broccoli",
             "a red bus driving down the street", "a cat sitting on a laptop"]
    refs = [
        ["a man rides a horse along the beach", "a person riding a horse on the sand", "man on horse at the beach",
         "a horse and rider on a sandy beach", "a man is riding his horse near the ocean"],
        ["two dogs play in the snow", "dogs running through snow", "a pair of dogs playing in snow",
         "two puppies in the snow", "two dogs are playing outside in the snow"],
        ["a plate with broccoli and rice", "food on a white plate", "a plate of broccoli and chicken",
         "a meal of vegetables and meat", "broccoli rice and chicken on a plate"],
        ["a red double decker bus on a street", "a bus drives down the road", "red bus in the city street",
         "a large red bus driving on a street", "a bus on the street"],
        ["a cat lying on a laptop keyboard", "a cat sits on a computer", "a kitten on a laptop",
         "a cat sitting on top of a laptop", "cat on a laptop computer"],
    ]
    score, scores = cider_module.Cider().compute_score(
        {i: r for i, r in enumerate(refs)}, {i: [p] for i, p in enumerate(preds)}
    )
    ours = metric("cider").compute(predictions=preds, references=refs)
    assert ours["cider"] == pytest.approx(score, rel=1e-9)
    assert ours["cider_per_example"] == pytest.approx(list(scores), rel=1e-9)


# --- VQA accuracy ---------------------------------------------------------------------------------------------------


def test_vqa_accuracy_by_hand():
    vqa = metric("vqa_accuracy")
    answers = ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]
    # "2" matches 3 annotators: leaving one of them out leaves 2 -> 2/3, leaving another out leaves 3 -> 1
    assert vqa.compute(predictions=["Two"], references=[answers])["vqa_accuracy"] == pytest.approx(
        (3 * 2 / 3 + 7 * 1) / 10, **FLOAT
    )
    one = ["yes"] + ["no"] * 9  # 1 match: 9 subsets keep it (1/3), one drops it (0) -> 0.3
    two = ["yes"] * 2 + ["no"] * 8  # 2 matches: 8 subsets keep both (2/3), 2 keep one (1/3) -> 0.6
    out = vqa.compute(predictions=["yes", "yes", "maybe"], references=[one, two, two])
    assert out["vqa_accuracy_per_example"] == pytest.approx([0.3, 0.6, 0.0], **FLOAT)
    assert out["vqa_accuracy"] == pytest.approx(0.3, **FLOAT)


def test_vqa_answer_normalisation():
    vqa = metric("vqa_accuracy")
    cases = [  # (prediction, annotators' answer): each pair must be equal after normalisation
        ("The Dog.", "dog"), ("two", "2"), ("none", "0"), ("dont know", "don't know"), ("1,000", "1000"),
        ("yes!", "yes"), ("an apple", "apple"), ("hot-dog", "hot dog"), ("3.5", "3.5"), ("Yes\n", "yes"),
    ]
    for prediction, answer in cases:
        out = vqa.compute(predictions=[prediction], references=[[answer] * 10])
        assert out["vqa_accuracy"] == 1.0, (prediction, answer)
    assert vqa.compute(predictions=["3.5"], references=[["35"] * 10])["vqa_accuracy"] == 0.0
    assert vqa.compute(predictions=["Dog"], references=[["dog"] * 10], normalize=False)["vqa_accuracy"] == 0.0
