"""Task metrics as pure functions (numpy and the standard library only).

- `accuracy`, `f1_binary`: classification (F1 follows scikit-learn's `zero_division=0`).
- `squad_v2_scores`: what the official SQuAD v2.0 evaluation script prints when it is run
  without a no-answer probability file (no threshold search), as percentages 0-100.
- `squad_v2_best_threshold`: its `best_exact` / `best_f1`, the threshold search it runs when
  given one.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable, Mapping

import numpy as np

from .errors import LoralabError

__all__ = [
    "accuracy",
    "f1_binary",
    "f1_macro",
    "matthews",
    "normalize_answer",
    "answer_tokens",
    "exact_match",
    "token_f1",
    "squad_v2_scores",
    "squad_v2_best_threshold",
]


def _pair(preds, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(preds).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions but {y.size} labels; they must pair up one to one.")
    return p, y


def accuracy(preds, labels) -> float:
    """Fraction of predictions equal to their label (0.0 for no examples)."""
    p, y = _pair(preds, labels)
    if p.size == 0:
        return 0.0
    return float(np.mean(p == y))


def f1_binary(preds, labels, positive=1) -> float:
    """F1 of the `positive` class: 2·TP / (2·TP + FP + FN); 0.0 when that is 0/0."""
    p, y = _pair(preds, labels)
    pred_pos = p == positive
    true_pos = y == positive
    tp = int(np.sum(pred_pos & true_pos))
    fp = int(np.sum(pred_pos & ~true_pos))
    fn = int(np.sum(~pred_pos & true_pos))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2.0 * tp / denom


def f1_macro(preds, labels, num_labels: int | None = None) -> float:
    """Unweighted mean of the per-class F1 over classes 0..num_labels-1 (default: every class
    seen in preds or labels); a class never predicted nor present scores 0, as in scikit-learn."""
    p, y = _pair(preds, labels)
    if p.size == 0:
        return 0.0
    n = num_labels if num_labels is not None else int(max(p.max(), y.max())) + 1
    return float(np.mean([f1_binary(p, y, positive=c) for c in range(n)]))


def matthews(preds, labels, num_labels: int | None = None) -> float:
    """Matthews correlation coefficient, multi-class (Gorodkin's R_K, as scikit-learn's
    matthews_corrcoef); in [-1, 1], 0.0 when undefined (one class only on either side).

    With confusion matrix C (rows true, columns predicted), t_k = row sums, p_k = column sums,
    c = trace, s = total: MCC = (c·s − Σ p_k·t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²)).
    """
    p, y = _pair(preds, labels)
    if p.size == 0:
        return 0.0
    n = num_labels if num_labels is not None else int(max(p.max(), y.max())) + 1
    conf = np.zeros((n, n), dtype=np.float64)
    np.add.at(conf, (y.astype(int), p.astype(int)), 1.0)
    t, q = conf.sum(axis=1), conf.sum(axis=0)
    c, s = np.trace(conf), conf.sum()
    denom = np.sqrt((s * s - q @ q) * (s * s - t @ t))
    return 0.0 if denom == 0 else float((c * s - q @ t) / denom)


# -- SQuAD v2.0 -----------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    """Whitespace tokens of the normalised answer."""
    if not text:
        return []
    return normalize_answer(text).split()


def exact_match(gold: str, pred: str) -> int:
    """1 if the normalised strings are equal, else 0."""
    return int(normalize_answer(gold) == normalize_answer(pred))


def token_f1(gold: str, pred: str) -> float:
    """Bag-of-tokens F1 between normalised answers; 1/0 by equality when either side is empty."""
    gold_toks = answer_tokens(gold)
    pred_toks = answer_tokens(pred)
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_toks)
    recall = same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def _summary(exact: dict, f1: dict, ids: list) -> dict[str, float]:
    total = len(ids)
    return {
        "exact": 100.0 * sum(exact[i] for i in ids) / total,
        "f1": 100.0 * sum(f1[i] for i in ids) / total,
        "total": total,
    }


def _golds(golds) -> tuple[bool, list[str]]:
    """(answerable, the gold texts to score against) as the official script reads them: a
    question is answerable when any gold text is non-empty; texts that normalise to nothing are
    dropped, leaving [""] when none remain."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    return any(g for g in golds), [g for g in golds if normalize_answer(g)] or [""]


def squad_v2_scores(
    predictions: Mapping[str, str], references: Mapping[str, Iterable[str]]
) -> dict[str, float]:
    """The official SQuAD v2.0 metrics for `predictions` (id -> answer, "" = no answer).

    `references` maps every question id to its gold answer texts; an unanswerable question has
    `[]` or `[""]`. As in the official script, gold answers whose normalised text is empty are
    dropped (leaving `[""]` when none remain), a question counts as answerable when it has any
    non-empty gold text, per-question scores are the maximum over gold answers, and the result
    holds `exact`, `f1`, `total` plus `HasAns_*` / `NoAns_*` for the kinds that occur. Extra
    predictions are ignored; a question without a prediction is an error.
    """
    if not references:
        raise LoralabError("Cannot compute SQuAD v2 scores: there are no reference questions.")
    missing = [qid for qid in references if qid not in predictions]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        raise LoralabError(
            f"{len(missing)} of {len(references)} questions have no prediction (e.g. {shown}). "
            "Every question needs a prediction; use the empty string to predict 'no answer'."
        )
    exact: dict = {}
    f1: dict = {}
    has_ans: list = []
    no_ans: list = []
    for qid, golds in references.items():
        answerable, kept = _golds(golds)
        (has_ans if answerable else no_ans).append(qid)
        pred = predictions[qid]
        exact[qid] = max(exact_match(g, pred) for g in kept)
        f1[qid] = max(token_f1(g, pred) for g in kept)
    out = _summary(exact, f1, list(references))
    for prefix, ids in (("HasAns", has_ans), ("NoAns", no_ans)):
        if ids:
            out.update({f"{prefix}_{k}": v for k, v in _summary(exact, f1, ids).items()})
    return out


def squad_v2_best_threshold(
    spans: Mapping[str, str],
    margins: Mapping[str, float],
    references: Mapping[str, Iterable[str]],
) -> dict[str, float]:
    """The official SQuAD v2.0 script's search for the best no-answer threshold (`best_exact`,
    `best_f1` in 0-100, and the thresholds reaching them).

    `spans`: each question's best non-empty answer; `margins`: its no-answer score (higher =
    surer there is no answer; here the null score minus the span's). Questions are answered in
    order of increasing margin, starting from none answered; the best score over every cut is
    kept, as the script does with its `na_prob` file.
    """
    missing = [q for q in references if q not in spans or q not in margins]
    if missing:
        raise LoralabError(
            f"{len(missing)} of {len(references)} questions have no span or no-answer margin "
            f"(e.g. {missing[0]!r}); the threshold search needs both for every question."
        )
    out = {}
    for name, score in (("exact", exact_match), ("f1", token_f1)):
        has_ans, gain = {}, {}
        for qid, golds in references.items():
            has_ans[qid], kept = _golds(golds)
            gain[qid] = max(score(g, spans[qid]) for g in kept) if has_ans[qid] else (
                -1.0 if spans[qid] else 0.0)  # fmt: skip
        current = best = float(sum(not h for h in has_ans.values()))  # answer nothing
        threshold = 0.0
        for qid in sorted(references, key=lambda q: margins[q]):
            current += gain[qid]
            if current > best:
                best, threshold = current, float(margins[qid])
        out[f"best_{name}"] = 100.0 * best / len(references)
        out[f"best_{name}_thresh"] = threshold
    return out
