"""VQA accuracy (VQAv2 rules): normalised answers, min(#matching annotators / 3, 1) averaged over annotator subsets."""

import re
from itertools import combinations

import datasets
import evaluate

_DESCRIPTION = """
The VQAv2 accuracy of Antol et al. (2015) / Goyal et al. (2017), with the answer normalisation of the official
evaluation: newlines and tabs become spaces; punctuation is removed (or becomes a space when it separates words;
commas inside numbers like 1,000 are dropped, periods are removed unless they precede a digit); text is lower-cased;
number words become digits ("two" -> "2", "none" -> "0"); the articles a, an, the are dropped; common contractions
written without the apostrophe are restored ("dont" -> "don't"). Predictions and every annotator answer go through the
same normalisation (the official script skips it for the annotator answers of questions where all 10 agree; that can
only matter for answers that normalisation changes).

A question has n annotator answers (10 in VQAv2). Its accuracy is the mean, over the n subsets of n - 1 annotators
(10 choose 9), of min(#annotators in the subset who gave the predicted answer / 3, 1): so 3 or more matching
annotators of 10 give 1.0, 2 give 0.6, 1 gives 0.3. With a single answer the accuracy is min(#matches / 3, 1).
The corpus score is the mean over questions, in [0, 1] (papers print x100).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the model's answer per question.
    references (`list[list[str]]`): per question, the annotators' answers (VQAv2: 10, duplicates included).
    normalize (`bool`, defaults to `True`): apply the VQA answer normalisation to both sides.
Returns:
    `vqa_accuracy` (mean over questions) and `vqa_accuracy_per_example`.
Examples:
    >>> metric = evaluate.load("eval/metrics/vqa_accuracy")
    >>> metric.compute(predictions=["Two"], references=[["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]])
    {'vqa_accuracy': 0.9, 'vqa_accuracy_per_example': [0.9]}
"""

_CITATION = """
@inproceedings{goyal2017making,
  title={Making the V in VQA Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle={CVPR},
  year={2017}
}
"""

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# contractions written without the apostrophe -> with it (the forms VQA annotators typed)
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldntve": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll",
    "lets": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "shant": "shan't",
    "shed": "she'd", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "somebodys": "somebody's",
    "someones": "someone's", "somethings": "something's", "thats": "that's", "thered": "there'd",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"(?<!\d)\.(?!\d)")


def normalize_answer(answer: str) -> str:
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    # punctuation: dropped when it touches a space or the text has a comma inside a number, else it becomes a space
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text)
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def vqa_score(prediction: str, answers: list[str]) -> float:
    if len(answers) == 1:
        return min(float(prediction == answers[0]) / 3, 1.0)
    subsets = list(combinations(range(len(answers)), len(answers) - 1))
    return sum(min(sum(answers[i] == prediction for i in subset) / 3, 1.0) for subset in subsets) / len(subsets)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references, normalize=True):
        prep = normalize_answer if normalize else (lambda a: a.strip())
        scores = []
        for prediction, answers in zip(predictions, references):
            if not answers:
                raise ValueError("every question needs at least one annotator answer")
            scores.append(vqa_score(prep(prediction), [prep(a) for a in answers]))
        return {"vqa_accuracy": sum(scores) / len(scores) if scores else 0.0, "vqa_accuracy_per_example": scores}
