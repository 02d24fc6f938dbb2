"""Text metrics the seq2seq and qa tasks share, computed with the reference packages directly.

* BLEU and chrF: sacreBLEU (corpus level, its default 13a tokenisation for BLEU; several
  references per example allowed, a varying number too). Its signature string says exactly
  how a score was computed and is saved with the score.
* ROUGE-1/2/L/Lsum: Google's ``rouge-score`` with the Porter stemmer on, F-measure; with
  several references, the best one per example (``score_multi``). ROUGE-Lsum treats each
  line as a sentence: outputs and references are split into sentences first. Note that
  rouge-score's tokenizer keeps only ASCII letters and digits, so ROUGE on text in other
  scripts (or with accents: German umlauts) is not meaningful; use BLEU/chrF there.
* SQuAD exact match and F1 with the official answer normalisation (lower case, no
  punctuation, no articles a/an/the, single spaces), max over the gold answers. An empty gold
  list (SQuAD v2 "no answer") counts as the single gold answer "".

All scores are on a 0-100 scale (as sacreBLEU and the SQuAD script print them). The
``evaluate`` library is not used: ``evaluate.load`` fetches code from the Hub at run time.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

from petune.errors import UserError

#: metrics the seq2seq task can compute, by group
SEQ2SEQ_METRICS = ("bleu", "chrf", "rouge")


def _missing(package: str, extra: str = "") -> UserError:
    return UserError(f"the {package} package is needed for these metrics{extra} and is not installed",
                     hint=f"pip install {package}")


# -- BLEU / chrF --------------------------------------------------------------------------------
def reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacreBLEU's layout: one stream per reference position, None where an example has fewer."""
    width = max((len(r) for r in references), default=0)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def bleu_chrf(outputs: Sequence[str], references: Sequence[Sequence[str]], *, which=("bleu", "chrf")) -> tuple[dict, dict]:
    """(scores, details): ``{"bleu": .., "chrf": ..}`` and per metric the sacreBLEU signature and
    the BLEU breakdown (n-gram precisions, brevity penalty, length ratio)."""
    try:
        from sacrebleu.metrics import BLEU, CHRF
    except ImportError:
        raise _missing("sacrebleu", " (BLEU, chrF)") from None
    if any(not refs for refs in references):
        raise ValueError("every example needs at least one reference")
    streams = reference_streams(references)
    scores, details = {}, {}
    if "bleu" in which:
        bleu = BLEU()
        result = bleu.corpus_score(list(outputs), streams)
        scores["bleu"] = float(result.score)
        details["bleu"] = {"signature": str(bleu.get_signature()), "text": str(result),
                           "precisions": [float(p) for p in result.precisions], "bp": float(result.bp),
                           "ratio": float(result.ratio), "hyp_len": int(result.sys_len), "ref_len": int(result.ref_len)}
    if "chrf" in which:
        chrf = CHRF()
        result = chrf.corpus_score(list(outputs), streams)
        scores["chrf"] = float(result.score)
        details["chrf"] = {"signature": str(chrf.get_signature()), "text": str(result)}
    return scores, details


# -- ROUGE --------------------------------------------------------------------------------------
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def sentences_per_line(text: str) -> str:
    """Text with one sentence per line, as ROUGE-Lsum expects (a simple split after . ! ?;
    existing line breaks are kept)."""
    return "\n".join(s.strip() for line in text.splitlines() for s in _SENTENCE_END.split(line) if s.strip())


def rouge(outputs: Sequence[str], references: Sequence[Sequence[str]], *, stemming: bool = True) -> tuple[dict, dict]:
    """Mean ROUGE F-measures (x100) over examples, best reference per example, and details."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise _missing("rouge-score", " (ROUGE)") from None
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stemming)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for output, refs in zip(outputs, references):
        if not refs:
            raise ValueError("every example needs at least one reference")
        scores = scorer.score_multi([sentences_per_line(r) for r in refs], sentences_per_line(output))
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    n = max(len(outputs), 1)
    result = {name: 100.0 * totals[name] / n for name in ROUGE_TYPES}
    return result, {"rouge": {"package": "rouge-score", "stemming": stemming, "measure": "F1, best reference",
                              "lsum_sentence_split": "after . ! ? and at line breaks"}}


# -- SQuAD ----------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower case, drop punctuation, drop articles, fix spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:  # SQuAD v2: "no answer" is right only against "no answer"
        return float(predicted == expected)
    common = collections.Counter(predicted) & collections.Counter(expected)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction in 0..1, max over the gold answers ([] = no answer)."""
    golds = list(golds) or [""]
    return max(exact_match(prediction, g) for g in golds), max(token_f1(prediction, g) for g in golds)


def squad_metrics(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict:
    """exact_match and f1 (x100) over questions; with unanswerable questions present, also
    has_answer_* and no_answer_* over each group (as the SQuAD v2 script reports them)."""
    em = f1 = 0.0
    groups = {"has_answer": [0.0, 0.0, 0], "no_answer": [0.0, 0.0, 0]}
    for prediction, gold in zip(predictions, golds):
        e, f = squad_scores(prediction, gold)
        em, f1 = em + e, f1 + f
        group = groups["has_answer" if gold else "no_answer"]
        group[0], group[1], group[2] = group[0] + e, group[1] + f, group[2] + 1
    n = max(len(predictions), 1)
    result = {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n, "questions": len(predictions)}
    if groups["no_answer"][2]:
        for name, (e, f, count) in groups.items():
            result[f"{name}_exact_match"] = 100.0 * e / count if count else 0.0
            result[f"{name}_f1"] = 100.0 * f / count if count else 0.0
            result[f"{name}_questions"] = count
    return result
