"""The equivalence rule: tolerances, the bound, verdicts and the overall status (pure)."""

from __future__ import annotations

import pytest

from loralab.errors import LoralabError
from loralab.merge.bounds import (
    DEFAULT_TOLERANCES,
    INFORMATIVE_FACTOR,
    equivalence_bound,
    overall_status,
    parse_tolerances,
    verdict,
)


def test_parse_tolerances_updates_the_defaults():
    assert parse_tolerances(None) == DEFAULT_TOLERANCES
    assert parse_tolerances(["bf16=0.1"]) == {"fp32": 1e-4, "bf16": 0.1}
    for bad in ("fp16=1e-3", "bf16=0", "bf16=x", "bf16"):
        with pytest.raises(LoralabError, match="Bad --tolerance"):
            parse_tolerances([bad])


def test_bound_is_relative_to_the_logits_and_floored_by_the_bf16_adapter():
    assert equivalence_bound("fp32", 1e-4, 0.2) == 1e-4  # scale at least 1
    assert equivalence_bound("fp32", 1e-4, 40.0) == pytest.approx(4e-3)
    assert equivalence_bound("bf16", 0.1, 40.0, adapter_error=0.625) == 4.0
    assert equivalence_bound("bf16", 0.01, 40.0, adapter_error=0.625) == 2.5
    assert equivalence_bound("fp32", 1e-4, 0.2, adapter_error=5.0) == 1e-4


def test_verdicts_need_an_informative_effect():
    row = {"max_abs_diff": 1e-6}
    assert verdict("bf16 adapter (unmerged)", row, 1e-4, 1.0) == "reference"
    assert verdict("fp32 merge", row, 1e-4, INFORMATIVE_FACTOR * 1e-4 * 0.99) == "uninformative"
    assert verdict("fp32 merge", row, 1e-4, 1.0) == "passed"
    assert verdict("fp32 merge", {"max_abs_diff": 2e-4}, 1e-4, 1.0) == "failed"
    # Over the bound fails even when the effect is too small to prove a pass (was uninformative,
    # exit 0 and exported), and a NaN difference or effect never passes.
    assert verdict("fp32 merge", {"max_abs_diff": 5e-4}, 1e-4, 9e-4) == "failed"
    assert verdict("fp32 merge", {"max_abs_diff": float("nan")}, 1e-4, 1.0) == "failed"
    assert verdict("fp32 merge", row, 1e-4, float("nan")) == "uninformative"


def test_overall_status():
    rows = lambda *s: {str(i): {"status": v} for i, v in enumerate(s)}  # noqa: E731
    assert overall_status(rows("passed", "uninformative", "reference")) == "passed"
    assert overall_status(rows("passed", "failed")) == "failed"
    assert overall_status(rows("uninformative", "reference")) == "uninformative"
