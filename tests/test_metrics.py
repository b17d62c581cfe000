"""The metrics against known values and against literal transcriptions of the reference code."""
from __future__ import annotations

import doctest
import random
import re
import statistics
import string

import pytest

from diffopsearch import metrics
from diffopsearch.errors import UserError
from diffopsearch.metrics import gqa_match, vqa_accuracy


def test_doctests():
    result = doctest.testmod(metrics)
    assert result.attempted >= 8 and result.failed == 0


@pytest.mark.parametrize("pred, answer, expected", [
    ("yes", "yes", True),
    (" Yes. ", "yes", True),
    ("YES!", "yes", True),
    ("no", "yes", False),
    ("t-shirt", "tshirt", True),        # punctuation is deleted, not turned into a space
    ("t shirt", "tshirt", False),
    ("the table", "table", False),      # no article removal in lmms-eval's GQA rule
    ("2", "two", False),                # no number normalisation either
    ("left.", "left", True),
])
def test_gqa_match(pred, answer, expected):
    assert gqa_match(pred, answer) is expected


# ---- reference transcriptions -----------------------------------------------------------------
# Written to follow the originals line by line (dict answers with answer_id, in-place mutation,
# `item != gtAnsDatum`), so that the cleaner implementation in metrics.py is checked against them.
# The tables are copied here from the official script (GT-Vision-Lab/VQA, master, commit c4e6a0e,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py, VQAEval.__init__), in its order and layout, NOT
# imported from metrics.py: an error in metrics.py's tables must make these tests fail.

OFFICIAL_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've",
    "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've"}
OFFICIAL_MANUAL_MAP = {"none": "0",
                       "zero": "0",
                       "one": "1",
                       "two": "2",
                       "three": "3",
                       "four": "4",
                       "five": "5",
                       "six": "6",
                       "seven": "7",
                       "eight": "8",
                       "nine": "9",
                       "ten": "10"}
OFFICIAL_ARTICLES = ["a", "an", "the"]
OFFICIAL_PUNCT = [";", r"/", "[", "]", '"', "{", "}",
                  "(", ")", "=", "+", "\\", "_", "-",
                  ">", "<", "@", "`", ",", "?", "!"]


def test_tables_are_the_official_ones():
    """metrics.py's tables, entry by entry, against the transcription above (lmms-eval's
    EvalAIAnswerProcessor carries the same tables, so one comparison covers both modes)."""
    assert len(OFFICIAL_CONTRACTIONS) == 120 and len(OFFICIAL_MANUAL_MAP) == 12
    assert metrics.CONTRACTIONS == OFFICIAL_CONTRACTIONS
    assert list(metrics.CONTRACTIONS) == list(OFFICIAL_CONTRACTIONS)  # same order (nothing depends on it, yet)
    assert metrics.NUMBER_MAP == OFFICIAL_MANUAL_MAP
    assert list(metrics.ARTICLES) == OFFICIAL_ARTICLES and list(metrics.PUNCT) == OFFICIAL_PUNCT
    # the quirks kept on purpose: a reversed entry, and capitalised keys that never match after lower()
    assert metrics.CONTRACTIONS["somebody'd"] == "somebodyd" and "Im" in metrics.CONTRACTIONS


class _OfficialVQAEval:  # GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py
    contractions = OFFICIAL_CONTRACTIONS

    def __init__(self):
        self.manualMap = dict(OFFICIAL_MANUAL_MAP)  # per instance: processDigitArticle's setdefault grows it

    articles = OFFICIAL_ARTICLES
    periodStrip = re.compile(r"(?!<=\d)(\.)(?!\d)")
    commaStrip = re.compile(r"(\d)(\,)(\d)")
    punct = OFFICIAL_PUNCT

    def processPunctuation(self, inText):
        outText = inText
        for p in self.punct:
            if (p + ' ' in inText or ' ' + p in inText) or (re.search(self.commaStrip, inText) is not None):
                outText = outText.replace(p, '')
            else:
                outText = outText.replace(p, ' ')
        outText = self.periodStrip.sub("", outText, re.UNICODE)
        return outText

    def processDigitArticle(self, inText):
        outText = []
        tempText = inText.lower().split()
        for word in tempText:
            word = self.manualMap.setdefault(word, word)
            if word not in self.articles:
                outText.append(word)
        for wordId, word in enumerate(outText):
            if word in self.contractions:
                outText[wordId] = self.contractions[word]
        return ' '.join(outText)

    def accuracy(self, resAns, answers):
        gts = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]
        resAns = resAns.replace('\n', ' ').replace('\t', ' ').strip()
        resAns = self.processPunctuation(resAns)
        resAns = self.processDigitArticle(resAns)
        gtAcc = []
        gtAnswers = [ans['answer'] for ans in gts]
        if len(set(gtAnswers)) > 1:
            for ansDic in gts:
                ansDic['answer'] = self.processPunctuation(ansDic['answer'])
        for gtAnsDatum in gts:
            otherGTAns = [item for item in gts if item != gtAnsDatum]
            matchingAns = [item for item in otherGTAns if item['answer'] == resAns]
            gtAcc.append(min(1, float(len(matchingAns)) / 3))
        return float(sum(gtAcc)) / len(gtAcc)


class _EvalAIAnswerProcessor(_OfficialVQAEval):  # lmms_eval/tasks/_task_utils/vqa_eval_metric.py
    commaStrip = re.compile(r"(?<=\d)(\,)+(?=\d)")

    def __call__(self, item):
        item = item.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
        item = item.replace("\n", " ").replace("\t", " ").strip()
        item = self.processPunctuation(item)
        return self.processDigitArticle(item)


def _lmms_vqav2_process_results(pred, answers):  # lmms_eval/tasks/vqav2/utils.py
    proc = _EvalAIAnswerProcessor()
    resAns = proc(pred)
    doc = {"answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}
    for ansDic in doc["answers"]:
        ansDic["answer"] = ansDic["answer"].replace("\n", " ").replace("\t", " ").strip()
    gtAcc = []
    gtAnswers = [ans["answer"] for ans in doc["answers"]]
    if len(set(gtAnswers)) > 1:
        for ansDic in doc["answers"]:
            ansDic["answer"] = proc.processPunctuation(ansDic["answer"])
            ansDic["answer"] = proc.processDigitArticle(ansDic["answer"])
        resAns = proc.processPunctuation(resAns)
        resAns = proc.processDigitArticle(resAns)
    for gtAnsDatum in doc["answers"]:
        otherGTAns = [item for item in doc["answers"] if item != gtAnsDatum]
        matchingAns = [item for item in otherGTAns if item["answer"] == resAns]
        gtAcc.append(min(1, float(len(matchingAns)) / 3))
    return statistics.mean(gtAcc)


VOCAB = ["2", "two", "Two", "the", "a", "an", "dog", "dogs", "man's", "isnt", "dont", "red", "dark red",
         "1,000", "1000", "3.5", "none", "zero", "0", "yes", "no", "Yes.", "t-shirt", "t shirt", "ten", "10",
         "left", "left!", "(left)", "hot dog", "hot-dog", "the table", "table", "a lot", "it's", "whats",
         # contraction-table keys (the quirky ones too), so the tables also act through the accuracy
         "somebody'd", "wheres", "whove", "yall", "shouldnt've", "Ive", "hes", "nine", "y'allll",
         # ... and what they map to, so a prediction can match an annotator only through the table
         "somebodyd", "where's", "who've", "y'all", "shouldn't've", "he's", "9", "y'all'll", "isn't", "what's"]


def _random_text(rng):
    words = rng.sample(VOCAB, rng.randint(1, 2))
    text = " ".join(words)
    if rng.random() < 0.3:
        text += rng.choice([".", "?", "!", ",", " .", "\n", "\t"])
    if rng.random() < 0.2:
        text = " " + text
    return text


def test_official_and_lmms_match_their_references_on_random_cases():
    rng = random.Random(0)
    off, differ = _OfficialVQAEval(), 0
    for _ in range(3000):
        pool = [_random_text(rng) for _ in range(rng.randint(1, 3))]
        answers = [rng.choice(pool) for _ in range(10)]
        pred = rng.choice(pool + [_random_text(rng)])
        a = vqa_accuracy(pred, answers, mode="official")
        b = vqa_accuracy(pred, answers, mode="lmms")
        assert a == pytest.approx(off.accuracy(pred, answers)), (pred, answers)
        assert b == pytest.approx(_lmms_vqav2_process_results(pred, answers)), (pred, answers)
        differ += a != b
    assert differ > 50  # the two modes really are different rules


@pytest.mark.parametrize("pred, answers, expected", [
    ("yes", ["yes"] * 10, 1.0),
    ("no", ["yes"] * 10, 0.0),
    ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),      # 3 annotators see 2 others (2/3), 7 see 3 (1): (2 + 7) / 10
    ("yes", ["yes"] * 4 + ["no"] * 6, 1.0),
    ("yes", ["yes"] + ["no"] * 9, 0.3),          # only the 9 "no" annotators see one "yes": 9 * 1/3 / 10
    ("Yes.", ["yes"] * 2 + ["no"] * 8, 0.6),     # punctuation and case of the prediction normalised
    ("two", ["2"] * 10, 1.0),                    # digits
    ("the dog", ["dog"] * 10, 1.0),              # articles dropped from the prediction...
    ("dog", ["the dog"] * 10, 0.0),              # ...but unanimous ground truths are compared raw
    ("isnt", ["isn't"] * 5 + ["no"] * 5, 1.0),   # contractions
])
def test_vqa_official_known_values(pred, answers, expected):
    assert vqa_accuracy(pred, answers) == pytest.approx(expected)


def test_vqa_accepts_lmms_eval_answer_dicts():
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i} for i, a in enumerate(["2"] * 2 + ["3"] * 8)]
    assert vqa_accuracy("2", answers) == pytest.approx(0.6)
    assert vqa_accuracy("2", answers, mode="lmms") == pytest.approx(0.6)


def test_vqa_modes_differ_where_documented():
    # lmms maps ground truths through the number table when annotators disagree; official does not.
    answers = ["two"] * 3 + ["2"] + ["three"] * 6
    assert vqa_accuracy("2", answers, mode="official") == pytest.approx(0.3)
    assert vqa_accuracy("2", answers, mode="lmms") == pytest.approx(1.0)
    # lmms splits possessives ("man's" -> "man 's"), so it never matches one.
    assert vqa_accuracy("man's", ["man's"] * 10, mode="official") == 1.0
    assert vqa_accuracy("man's", ["man's"] * 10, mode="lmms") == 0.0


def test_vqa_bad_mode_is_a_user_error():
    with pytest.raises(UserError, match="official"):
        vqa_accuracy("yes", ["yes"] * 10, mode="strict")


def test_gqa_uses_all_ascii_punctuation():
    for p in string.punctuation:
        assert gqa_match(f"ye{p}s", "yes")
