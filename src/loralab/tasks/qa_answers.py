"""Answers from an extractive QA model's per-window start/end logits (SQuAD v2): the best span
per question over all its windows, the null ("no answer") score, and the margin between them."""

from __future__ import annotations

import numpy as np


def postprocess_qa(*args, **kwargs) -> dict[str, str]:
    """Answer text per raw example id ("" = no answer): `qa_candidates`' first part."""
    return qa_candidates(*args, **kwargs)[0]


def qa_candidates(
    raw,
    features,
    start_logits,
    end_logits,
    n_best: int = 20,
    max_answer_len: int = 30,
) -> tuple[dict[str, str], dict[str, str], dict[str, float]]:
    """(answers, spans, null margins) per raw example id from per-feature start/end logits.

    answers: the answer text ("" = no answer). spans: the best span's text whatever the null
    score ("" when no valid span exists). null margins: the example's null score minus its best
    span's score (+inf without a span, -inf without a null position): an answer is given when
    the margin is not above 0, the threshold the official script's search moves.

    `start_logits`/`end_logits` are [num_features, padded_len] in the order of `features`
    (positions past a feature's `length` are ignored, e.g. the -100 fill of Trainer.predict).
    For every example: the best span over all its features among the top `n_best` start and
    end positions (both in the context, end >= start, at most `max_answer_len` tokens), scored
    start+end logit, and its text is the context between the span's character offsets
    (whitespace-stripped); "" when the smallest null score (start+end logit at `null_index`) over
    the example's features beats it, or when no valid span exists.
    """
    import pyarrow.compute as pc

    starts = np.asarray(start_logits)
    ends = np.asarray(end_logits)
    if starts.ndim != 2 or starts.shape != ends.shape:
        raise ValueError(
            f"start and end logits must both be [num_features, length]; got {starts.shape} and "
            f"{ends.shape}."
        )
    if starts.shape[0] != len(features):
        raise ValueError(
            f"{starts.shape[0]} rows of logits for {len(features)} features; predict on exactly "
            f"the features being scored, in their order."
        )
    ids = list(raw["id"])
    contexts = list(raw["context"])
    position = {qid: i for i, qid in enumerate(ids)}
    best: dict[str, tuple[float, int, int]] = {}  # id -> (score, start char, end char)
    null: dict[str, float] = {}
    width = starts.shape[1]
    cols = features.select_columns(["example_id", "offset_mapping", "null_index"])
    cols = cols.with_format("arrow")  # nested offsets as flat numpy, not Python lists
    chunk = 1000
    for lo in range(0, len(features), chunk):
        table = cols[lo : lo + chunk]
        batch_ids = table.column("example_id").to_pylist()
        batch_null = table.column("null_index").to_pylist()
        om = table.column("offset_mapping")
        flat = pc.list_flatten(pc.list_flatten(om)).to_numpy(zero_copy_only=False)
        flat = flat.astype(np.int64).reshape(-1, 2)
        bounds = np.concatenate([[0], np.cumsum(pc.list_value_length(om).to_numpy())])
        for j, (qid, null_index) in enumerate(zip(batch_ids, batch_null, strict=True)):
            if qid not in position:
                raise ValueError(
                    f"Feature {lo + j} belongs to example {qid!r}, which is not in raw."
                )
            n = min(int(bounds[j + 1] - bounds[j]), width)
            s = starts[lo + j, :n].astype(np.float64)
            e = ends[lo + j, :n].astype(np.float64)
            if null_index < n:
                score = s[null_index] + e[null_index]
                null[qid] = min(null.get(qid, np.inf), score)
            offs = flat[bounds[j] : bounds[j] + n]
            in_ctx = offs[:, 0] >= 0
            k = min(n_best, n)
            top_s = np.argsort(s, kind="stable")[::-1][:k]
            top_e = np.argsort(e, kind="stable")[::-1][:k]
            span_len = top_e[None, :] - top_s[:, None] + 1
            ok = (
                in_ctx[top_s][:, None]
                & in_ctx[top_e][None, :]
                & (span_len >= 1)
                & (span_len <= max_answer_len)
            )
            if not ok.any():
                continue
            scores = np.where(ok, s[top_s][:, None] + e[top_e][None, :], -np.inf)
            a, b = np.unravel_index(int(np.argmax(scores)), scores.shape)
            score = float(scores[a, b])
            if qid not in best or score > best[qid][0]:
                best[qid] = (score, int(offs[top_s[a], 0]), int(offs[top_e[b], 1]))
    unseen = [qid for qid in ids if qid not in null and qid not in best]
    if unseen:
        raise ValueError(
            f"{len(unseen)} raw examples (e.g. {unseen[0]!r}) have no features; featurize and "
            f"predict on the same examples that are scored."
        )
    answers: dict[str, str] = {}
    spans: dict[str, str] = {}
    margins: dict[str, float] = {}
    for qid, context in zip(ids, contexts, strict=True):
        span = best.get(qid)
        spans[qid] = "" if span is None else context[span[1] : span[2]].strip()
        margins[qid] = np.inf if span is None else float(null.get(qid, -np.inf) - span[0])
        answers[qid] = "" if margins[qid] > 0 else spans[qid]
    return answers, spans, margins


# -- the task ----------------------------------------------------------------------------------
