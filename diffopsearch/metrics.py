"""Answer metrics, reproduced exactly from their reference implementations.

- ``gqa_match``: lmms-eval's GQA metric (``exact_match`` with ``ignore_case`` and
  ``ignore_punctuation``, on the model's stripped output).
- ``vqa_accuracy``: the VQAv2 accuracy. ``mode="official"`` follows the official evaluation script
  (GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``); ``mode="lmms"`` follows
  lmms-eval's ``vqav2_process_results`` with its ``EvalAIAnswerProcessor``. Both average, over the
  10 annotators, ``min(1, (number of the *other* 9 answers equal to the prediction) / 3)``; they
  differ only in how strings are normalised before the comparison:

  ======================  ==========================================  ===========================================
  step                    official                                    lmms
  ======================  ==========================================  ===========================================
  prediction              newline/tab -> space, strip, punctuation,   lower-case, drop ``,`` and ``?``, ``'s`` ->
                          digits/articles/contractions                `` 's``, strip, then the official steps
  ground truth answers    as given; if the 10 disagree: punctuation   newline/tab -> space, strip; if they
                          only                                        disagree: punctuation *and*
                                                                      digits/articles/contractions
  punctuation rule        ``(\\d)(,)(\\d)`` decides deletion          ``(?<=\\d)(,)+(?=\\d)`` (same decisions)
  ======================  ==========================================  ===========================================

  So, e.g., with annotators saying "two" and "2", ``lmms`` counts a prediction "2" as matching both
  (ground truths go through the number map too), ``official`` only the literal "2"s; and
  ``lmms`` never matches a possessive ("man's" becomes "man 's"). The quirks of the originals are
  kept on purpose: the period regex ``(?!<=\\d)(\\.)(?!\\d)`` (a typo for a look-behind, so "2.5"
  keeps its dot only because of the look-ahead) and ``re.UNICODE`` passed as the *count* of that
  substitution (at most 32 periods removed).
"""
from __future__ import annotations

import re
import string
from typing import Iterable

__all__ = ["gqa_match", "vqa_accuracy", "normalize_vqa_official", "normalize_vqa_lmms"]


# ---------------------------------------------------------------- GQA (lmms-eval)

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def _gqa_norm(text: str) -> str:
    return text.strip().lower().translate(_PUNCT_TABLE)


def gqa_match(prediction: str, answer: str) -> bool:
    """lmms-eval's GQA rule: exact match after strip, lower-case and deleting ASCII punctuation.

    >>> gqa_match(" Yes.", "yes")
    True
    >>> gqa_match("the table", "table")
    False
    >>> gqa_match("T-shirt", "tshirt")
    True
    """
    return _gqa_norm(prediction) == _gqa_norm(answer)


# ---------------------------------------------------------------- VQA normalisation tables

# The contraction table of the official vqaEval.py (ASCII apostrophes, as in its current version
# and in lmms-eval's copy; the two tables are identical).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
         "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP_OFFICIAL = re.compile(r"(\d)(\,)(\d)")
_COMMA_STRIP_LMMS = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _punctuation(text: str, comma_strip: re.Pattern) -> str:
    out = text
    has_number_comma = comma_strip.search(text) is not None
    for p in PUNCT:
        # Delete the mark where it touches a space (or the text has a 1,000-style number), else it
        # separates words and becomes a space. Decided on the *input* text, as the original does.
        if (p + " " in text or " " + p in text) or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The original passes re.UNICODE (== 32) as the positional *count* argument.
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def _digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_official(answer: str) -> str:
    """The official script's processing of a *prediction* (ground truths get less, see module doc).

    >>> normalize_vqa_official("Two dogs!")
    '2 dogs'
    >>> normalize_vqa_official("the 1,000 cats.")
    '1000 cats'
    """
    return _digit_article(_punctuation(_clean(answer), _COMMA_STRIP_OFFICIAL))


def normalize_vqa_lmms(answer: str) -> str:
    """lmms-eval's ``EvalAIAnswerProcessor.__call__`` (applied to every prediction).

    >>> normalize_vqa_lmms("Man's hat?")
    "man 's hat"
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _clean(text)
    return _digit_article(_punctuation(text, _COMMA_STRIP_LMMS))


# ---------------------------------------------------------------- VQA accuracy

def _answer_strings(answers: Iterable) -> list[str]:
    out = []
    for a in answers:
        if isinstance(a, dict):
            a = a["answer"]
        if not isinstance(a, str):
            raise TypeError(f"VQA answers must be strings or dicts with an 'answer' key, got {a!r}")
        out.append(a)
    return out


def _leave_one_out(prediction: str, gts: list[str]) -> float:
    # Leave-one-out over annotator *positions* (the originals drop the one answer dict, which is
    # unique through its answer_id, so equal strings from other annotators still count).
    if not gts:
        return 0.0
    total = 0.0
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == prediction)
        total += min(1.0, matches / 3)
    return total / len(gts)


def vqa_accuracy(prediction: str, answers: Iterable, mode: str = "official") -> float:
    """VQAv2 accuracy of one prediction against the annotators' answers (usually 10).

    ``answers``: strings, or lmms-eval's dicts ``{"answer", "answer_confidence", "answer_id"}``.
    For each annotator, ``min(1, matches among the other answers / 3)``; the mean over annotators.
    ``mode``: ``"official"`` (the VQA challenge's vqaEval.py) or ``"lmms"`` (lmms-eval's variant);
    the module docstring lists the differences.

    >>> vqa_accuracy("yes", ["yes"] * 10)
    1.0
    >>> vqa_accuracy("Two", ["2"] * 2 + ["3"] * 8)   # each "2" annotator sees 1 match, the others 2
    0.6
    >>> vqa_accuracy("2", ["two"] * 3 + ["2"] + ["three"] * 6)
    0.3
    >>> vqa_accuracy("2", ["two"] * 3 + ["2"] + ["three"] * 6, mode="lmms")
    1.0
    """
    gts = _answer_strings(answers)
    if mode == "lmms":  # the official script takes the annotations as they are (already clean)
        gts = [_clean(a) for a in gts]
    disagree = len(set(gts)) > 1
    if mode == "official":
        pred = normalize_vqa_official(prediction)
        if disagree:
            gts = [_punctuation(g, _COMMA_STRIP_OFFICIAL) for g in gts]
    elif mode == "lmms":
        pred = normalize_vqa_lmms(prediction)
        if disagree:
            gts = [_digit_article(_punctuation(g, _COMMA_STRIP_LMMS)) for g in gts]
            pred = _digit_article(_punctuation(pred, _COMMA_STRIP_LMMS))
    else:
        from .errors import UserError

        raise UserError(f"vqa_mode {mode!r} is not valid: use 'official' (the VQA challenge's "
                        "vqaEval.py) or 'lmms' (lmms-eval's vqav2 variant).")
    return _leave_one_out(pred, gts)
