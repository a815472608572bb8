"""SQuAD v2 scoring by hand: accuracy and binary F1, the official exact/F1 metric, the
best-threshold search and the rules that turn span logits into answers."""

from __future__ import annotations

import numpy as np
import pytest

from loralab import metrics
from loralab.errors import LoralabError
from loralab.tasks.squad_v2 import postprocess_qa

# -- metrics --------------------------------------------------------------------------------


def test_accuracy_and_binary_f1():
    assert metrics.accuracy([1, 0, 1, 1], [1, 0, 0, 1]) == 0.75
    # tp=2, fp=1, fn=0 -> 2*2 / (2*2 + 1 + 0)
    assert metrics.f1_binary([1, 0, 1, 1], [1, 0, 0, 1]) == pytest.approx(0.8)
    # positive=0: tp=1, fp=0, fn=1 -> 2/3
    assert metrics.f1_binary([1, 0, 1, 1], [1, 0, 0, 1], positive=0) == pytest.approx(2 / 3)
    assert metrics.f1_binary([0, 0], [0, 0]) == 0.0  # nothing predicted, nothing true
    with pytest.raises(ValueError):
        metrics.accuracy([1, 0], [1])


def test_normalize_answer():
    assert metrics.normalize_answer("  The  Quick, brown-fox! an Apple ") == "quick brownfox apple"
    assert metrics.normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert metrics.normalize_answer("The") == ""


def test_squad_v2_scores_by_hand():
    refs = {
        "q1": ["The Cat!"],  # HasAns; "cat" matches after normalisation
        "q2": ["big red fox"],  # HasAns; partial overlap
        "q3": [""],  # NoAns, predicted no answer
        "q4": [],  # NoAns, predicted an answer
        "q5": ["Paris", "the city of Paris"],  # HasAns, predicted no answer
        "q6": ["Paris", "city of Paris"],  # HasAns, best of two golds counts
    }
    preds = {
        "q1": "cat",
        "q2": "red fox jumps",
        "q3": "",
        "q4": "foo",
        "q5": "",
        "q6": "Paris city",
    }
    preds["extra"] = "ignored"
    # q2: gold {big, red, fox}, pred {red, fox, jumps}: P = R = 2/3 -> F1 = 2/3.
    # q6: vs "paris": P=1/2, R=1 -> 2/3; vs "city of paris" -> {city, paris}: P=1, R=2/3 -> 0.8.
    f1 = {"q1": 1.0, "q2": 2 / 3, "q3": 1.0, "q4": 0.0, "q5": 0.0, "q6": 0.8}
    em = {"q1": 1, "q2": 0, "q3": 1, "q4": 0, "q5": 0, "q6": 0}
    out = metrics.squad_v2_scores(preds, refs)
    has = ["q1", "q2", "q5", "q6"]
    assert out["total"] == 6 and out["HasAns_total"] == 4 and out["NoAns_total"] == 2
    assert out["exact"] == pytest.approx(100 * 2 / 6)
    assert out["f1"] == pytest.approx(100 * sum(f1.values()) / 6)
    assert out["HasAns_exact"] == pytest.approx(100 * sum(em[q] for q in has) / 4)  # 25
    assert out["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3 + 0 + 0.8) / 4)
    assert out["NoAns_exact"] == pytest.approx(50.0)
    assert out["NoAns_f1"] == pytest.approx(50.0)
    assert set(out) == {
        "exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total",
        "NoAns_exact", "NoAns_f1", "NoAns_total",
    }  # fmt: skip


def test_squad_v2_scores_edge_cases():
    # Only answerable questions: no NoAns_* keys (as the official script).
    out = metrics.squad_v2_scores({"a": "x"}, {"a": ["x"]})
    assert out == {
        "exact": 100.0, "f1": 100.0, "total": 1,
        "HasAns_exact": 100.0, "HasAns_f1": 100.0, "HasAns_total": 1,
    }  # fmt: skip
    # A gold answer that normalises to nothing is dropped, leaving [""]; the question still
    # counts as answerable because it has an answer.
    out = metrics.squad_v2_scores({"a": ""}, {"a": ["The"]})
    assert out["exact"] == 100.0 and out["HasAns_total"] == 1 and "NoAns_total" not in out
    # Predicting only punctuation is predicting nothing.
    assert metrics.squad_v2_scores({"a": "?!"}, {"a": []})["NoAns_exact"] == 100.0
    with pytest.raises(LoralabError, match="no prediction"):
        metrics.squad_v2_scores({}, {"a": ["x"]})


def test_best_threshold_search_by_hand():
    """Three questions, answered in order of margin: b (-1), c (0.5), a (1)."""
    refs = {"a": ["x"], "b": ["y z"], "c": []}
    spans = {"a": "x", "b": "y", "c": "w"}
    margins = {"a": 1.0, "b": -1.0, "c": 0.5}
    out = metrics.squad_v2_best_threshold(spans, margins, refs)
    # F1: none answered 1 (c right); +b 1 + 2/3 (best, at b's margin); +c 2/3; +a 1 + 2/3.
    assert out["best_f1"] == pytest.approx(100 * (5 / 3) / 3)
    assert out["best_f1_thresh"] == -1.0
    # Exact: 1; +b 1 (no gain); +c 0; +a 1: never above the start, threshold stays 0.
    assert out["best_exact"] == pytest.approx(100 / 3) and out["best_exact_thresh"] == 0.0
    with pytest.raises(LoralabError, match="threshold search"):
        metrics.squad_v2_best_threshold({"a": "x"}, {"a": 0.0}, refs)


# -- post-processing --------------------------------------------------------------------


def _hand_features(rows):
    import datasets

    return datasets.Dataset.from_dict(
        {
            "example_id": [r[0] for r in rows],
            "offset_mapping": [r[1] for r in rows],
            "null_index": [0] * len(rows),
            "length": [len(r[1]) for r in rows],
        }
    )


def test_postprocess_rules():
    import datasets

    raw = datasets.Dataset.from_dict(
        {"id": ["x", "y"], "context": ["alpha beta gamma", "one two"], "question": ["?", "?"]}
    )
    q = [-1, -1]
    x_offsets = [q, q, [0, 5], [6, 10], [11, 16], q]  # [CLS] question [SEP]-ish, 3 context tokens
    feats = _hand_features([("x", x_offsets), ("x", x_offsets), ("y", [q, [0, 3], [4, 7], q])])
    width = 8
    start = np.full((3, width), -100.0)
    end = np.full((3, width), -100.0)
    start[:, :6] = end[:, :6] = 0.0
    # Feature 0: best span "beta gamma" (score 3+3), null 10 (5+5).
    start[0, 3], end[0, 4], start[0, 0], end[0, 0] = 3, 3, 5, 5
    # Feature 1: null only 1; the example's null is the minimum over features -> span wins.
    start[1, 0], end[1, 0] = 0.5, 0.5
    # Question tokens (offset -1) and positions past the length never make a span.
    start[1, 1] = end[1, 1] = 40.0
    start[2, 5] = end[2, 6] = 80.0  # beyond y's length (4): ignored like Trainer's -100 fill
    # Feature 2 (y): start "two" + end "one" (50) is invalid (end before start); the valid
    # spans score -10 ("one", "two") and -70 ("one two"), so the null (0) wins.
    start[2, :4] = [0, -40, 20, 0]
    end[2, :4] = [0, 30, -30, 0]
    out = postprocess_qa(raw, feats, start, end)
    assert out == {"x": "beta gamma", "y": ""}
    # max_answer_len counts tokens: a 2-token span is too long for max_answer_len=1.
    start[0, 3], end[0, 4] = 3, 3
    # One-token spans: "beta" (3+0) and "gamma" (0+3) tie above "alpha" (0); the first best
    # in order of start logit wins (argmax over the start-major score grid): "beta".
    out = postprocess_qa(raw, feats, start, end, max_answer_len=1)
    assert out == {"x": "beta", "y": ""}
    with pytest.raises(ValueError, match="rows of logits"):
        postprocess_qa(raw, feats, start[:2], end[:2])
