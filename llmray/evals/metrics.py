"""Scores of a task's answers against its references: BLEU and chrF (sacrebleu), CIDEr-D (captions), accuracy and
macro-F1, exact match and token F1 (SQuAD's normalisation).

A generated answer may have several references (a caption task's captions of one image): `references[i]` is a string
or a list of strings; BLEU, chrF and CIDEr-D score against all of them, exact match and token F1 take the best.
Accuracy and macro-F1 compare one label each.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

ARTICLES = re.compile(r"\b(a|an|the)\b")
CIDER_N, CIDER_SIGMA = 4, 6.0  # CIDEr-D's n-gram orders and length-penalty width (the COCO caption toolkit's)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(ARTICLES.sub(" ", text).split())


def reference_lists(references: list) -> list[list[str]]:
    """Each example's references as a list (one reference or several)."""
    return [r if isinstance(r, list) else [r] for r in references]


def exact_match(answers: list[str], references: list) -> float:
    hits = sum(any(normalize(a) == normalize(r) for r in refs) for a, refs in zip(answers, reference_lists(references)))
    return hits / max(len(references), 1)


def _f1(answer: str, reference: str) -> float:
    got, want = normalize(answer).split(), normalize(reference).split()
    common = sum((Counter(got) & Counter(want)).values())
    if not got or not want:
        return float(got == want)
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def token_f1(answers: list[str], references: list) -> float:
    """Mean over examples of the F1 of the answer's and the reference's normalised words (SQuAD: the best
    reference's)."""
    scores = [max(_f1(a, r) for r in refs) for a, refs in zip(answers, reference_lists(references))]
    return sum(scores) / max(len(scores), 1)


def _streams(references: list) -> list[list[str | None]]:
    """sacrebleu's reference streams: the k-th reference of every example (None where an example has fewer)."""
    refs = reference_lists(references)
    width = max((len(r) for r in refs), default=1)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(width)]


def bleu(answers: list[str], references: list) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(answers, _streams(references)).score


def chrf(answers: list[str], references: list) -> float:
    import sacrebleu

    return sacrebleu.corpus_chrf(answers, _streams(references)).score


def caption_words(text: str) -> list[str]:
    """A caption's words as CIDEr counts them: lower case, punctuation dropped (the COCO toolkit drops punctuation
    after its PTB tokenizer, which also splits contractions: "it's" is "it s" here, "it 's" there)."""
    return "".join(" " if c in string.punctuation else c for c in text.lower()).split()


def _ngrams(words: list[str]) -> Counter:
    return Counter(tuple(words[i:i + n]) for n in range(1, CIDER_N + 1) for i in range(len(words) - n + 1))


def cider(answers: list[str], references: list) -> float:
    """CIDEr-D of the answers: the mean of `cider_scores`."""
    scores = cider_scores(answers, references)
    return sum(scores) / max(len(scores), 1)


def cider_scores(answers: list[str], references: list) -> list[float]:
    """CIDEr-D (Vedantam et al. 2015, as the COCO caption toolkit computes it): per example, the cosine similarity
    of the answer's and each reference's TF-IDF vectors of n-grams (n = 1..4; IDF over the task's examples, an
    example's references counted as one document), the answer's weights clipped at the reference's, damped by a
    Gaussian of the length difference (sigma 6; lengths counted in bigrams, as the toolkit does), averaged over n
    and the references, times 10, one per example. A corpus measure: the IDF comes from the references
    of all the examples scored together."""
    refs = [[_ngrams(caption_words(r)) for r in rs] for rs in reference_lists(references)]
    hyps = [_ngrams(caption_words(a)) for a in answers]
    df = Counter(g for rs in refs for g in set().union(*rs))
    log_docs = math.log(len(refs)) if refs else 0.0

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(CIDER_N)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_docs - math.log(max(1.0, df[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        return vec, norms, sum(tf for gram, tf in counts.items() if len(gram) == 2)  # the toolkit's length: bigrams

    scores = []
    for hyp, rs in zip(hyps, refs):
        vh, nh, lh = vector(hyp)
        total = 0.0
        for r in rs:
            vr, nr, lr = vector(r)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * CIDER_SIGMA ** 2))
            for n in range(CIDER_N):
                dot = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vh[n].items())
                total += (dot / (nh[n] * nr[n]) if nh[n] and nr[n] else 0.0) * penalty
        scores.append(10.0 * total / CIDER_N / len(rs))
    return scores


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


ON_TEXT = {"bleu": bleu, "chrf": chrf, "cider": cider, "exact_match": exact_match, "token_f1": token_f1,
           "accuracy": accuracy, "f1": macro_f1}
MULTI_REFERENCE = ("bleu", "chrf", "cider", "exact_match", "token_f1")  # the metrics that take several references
