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

class _OfficialVQAEval:  # GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py
    contractions = metrics.CONTRACTIONS
    manualMap = dict(metrics.NUMBER_MAP)
    articles = ["a", "an", "the"]
    periodStrip = re.compile(r"(?!<=\d)(\.)(?!\d)")
    commaStrip = re.compile(r"(\d)(\,)(\d)")
    punct = [';', r"/", '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
             '?', '!']

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
         "left", "left!", "(left)", "hot dog", "hot-dog", "the table", "table", "a lot", "it's", "whats"]


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
