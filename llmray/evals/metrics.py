"""Scores of a task's answers against its references: BLEU and chrF (sacrebleu), accuracy and
macro-F1, exact match and token F1 (SQuAD's normalisation)."""

from __future__ import annotations

import re
import string
from collections import Counter

ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(answers: list[str], references: list[str]) -> float:
    return sum(normalize(a) == normalize(r) for a, r in zip(answers, references)) / max(len(references), 1)


def token_f1(answers: list[str], references: list[str]) -> float:
    """Mean over examples of the F1 of the answer's and the reference's normalised words (SQuAD)."""
    scores = []
    for a, r in zip(answers, references):
        got, want = normalize(a).split(), normalize(r).split()
        common = sum((Counter(got) & Counter(want)).values())
        if not got or not want:
            scores.append(float(got == want))
        elif common == 0:
            scores.append(0.0)
        else:
            precision, recall = common / len(got), common / len(want)
            scores.append(2 * precision * recall / (precision + recall))
    return sum(scores) / max(len(scores), 1)


def bleu(answers: list[str], references: list[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(answers, [references]).score


def chrf(answers: list[str], references: list[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_chrf(answers, [references]).score


def accuracy(predicted: list[str], gold: list[str]) -> float:
    return sum(normalize(p) == normalize(g) for p, g in zip(predicted, gold)) / max(len(gold), 1)


def macro_f1(predicted: list[str], gold: list[str]) -> float:
    """F1 of each gold label, averaged with equal weight (a prediction outside the labels counts as wrong)."""
    predicted, gold = [normalize(p) for p in predicted], [normalize(g) for g in gold]
    scores = []
    for label in sorted(set(gold)):
        tp = sum(p == label and g == label for p, g in zip(predicted, gold))
        fp = sum(p == label and g != label for p, g in zip(predicted, gold))
        fn = sum(p != label and g == label for p, g in zip(predicted, gold))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / max(len(scores), 1)


ON_TEXT = {"bleu": bleu, "chrf": chrf, "exact_match": exact_match, "token_f1": token_f1, "accuracy": accuracy,
           "f1": macro_f1}
