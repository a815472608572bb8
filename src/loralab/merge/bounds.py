"""The equivalence rule of a merge, shared by `loralab merge` and `loralab validate`: tolerances,
the bound on max |Δlogit|, the informative gate and the verdicts. Pure: no torch."""

from __future__ import annotations

from ..errors import LoralabError

# Merge equivalence, one rule for `merge` and `validate` (see `equivalence_bound`): max |Δlogit|
# vs the fp32 adapter model, bounded relative to the logit scale (max |logit|, at least 1),
# since rounding grows with the logits (a classifier's are a few units, a causal LM's reach ±40).
# fp32: merging only reorders sums (W·x + s·B·(A·x) vs (W + s·B·A)·x): float32 rounding.
# bf16: every weight (and, natively, activation) carries a relative error of up to 2^-9; on
# SmolLM2-135M SST-2 bf16 weights alone drift 0.03-0.04 on logits of a few units.
DEFAULT_TOLERANCES = {"fp32": 1e-4, "bf16": 0.05}
# A bf16 merge is also judged against the unmerged adapter in bf16: it may be off by up to this
# many times the adapter's own bf16 error (its precision floor, which no merge can beat). A merge
# in bf16 rounds W, A and B as the adapter does, then the product s·B·A and the sum W + s·B·A
# again: 3.4× the adapter's error on tiny-llama (all-linear, B ~ N(0, 0.3), bf16 weights).
BF16_ADAPTER_FACTOR = 4.0
# The check is evidence only if removing the LoRA update moves the outputs by at least this
# many tolerances: otherwise a merge that lost the adapter would pass as well.
INFORMATIVE_FACTOR = 10.0


def equivalence_bound(
    dtype: str, tolerance: float, logit_scale: float, adapter_error: float | None = None
) -> float:
    """The bound on max |Δlogit| of a merged model: `tolerance` × max(1, max |logit|); for bf16
    at least BF16_ADAPTER_FACTOR × the unmerged bf16 adapter's own error vs fp32, when known."""
    bound = tolerance * max(1.0, logit_scale)
    if dtype == "bf16" and adapter_error is not None:
        bound = max(bound, BF16_ADAPTER_FACTOR * adapter_error)
    return bound


def parse_tolerances(items: list[str] | None) -> dict[str, float]:
    """["bf16=0.1"] -> defaults updated; each item is DTYPE=RELATIVE_TOLERANCE."""
    tolerances = dict(DEFAULT_TOLERANCES)
    for item in items or []:
        name, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if name not in DEFAULT_TOLERANCES or not number > 0:
            raise LoralabError(
                f"Bad --tolerance '{item}': expected DTYPE=VALUE with DTYPE one of "
                f"{', '.join(DEFAULT_TOLERANCES)} and VALUE > 0 (a bound on max |Δlogit| per unit of max |logit|), "
                "e.g. bf16=0.1."
            )
        tolerances[name] = number
    return tolerances


def verdict(name: str, row: dict, bound: float, effect: float) -> str:
    """One variant's status: reference (the unmerged bf16 adapter), failed (over its bound,
    or NaN), uninformative (within it, but the LoRA effect is below INFORMATIVE_FACTOR
    bounds, so dropping the adapter would pass too) or passed."""
    if "unmerged" in name:
        return "reference"  # the bf16 noise floor: no merge involved
    if not row["max_abs_diff"] <= bound:  # first: a merge over its bound fails whatever the effect
        return "failed"
    return "passed" if effect >= INFORMATIVE_FACTOR * bound else "uninformative"


def overall_status(rows: dict) -> str:
    """failed if any merge failed; passed if one passed with evidence; else uninformative.

    A bf16 row can be uninformative (its tolerance too coarse to see the update) while the fp32
    row, through the same merge code, proves the merge: that run passed.
    """
    verdicts = {r["status"] for r in rows.values()}
    if "failed" in verdicts:
        return "failed"
    return "passed" if "passed" in verdicts else "uninformative"
