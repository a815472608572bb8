"""Small statistics for the report: mean, sample std, Student-t intervals (no scipy needed).

The t quantile is exact for integer degrees of freedom: Student's closed-form CDF (a finite
series in cos θ, θ = atan(t/√ν)) inverted by bisection to float precision.
"""

from __future__ import annotations

import math

UNINFORMATIVE_POINTS = 1.0  # no more than this above the majority baseline: nothing learned


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1); std is NaN for a single value."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def at_baseline(score: float, baseline: float, points_per_unit: float) -> float:
    """`score` for choosing a learning rate: `baseline` (the majority baseline's value, NaN when
    unknown) where it lies within `UNINFORMATIVE_POINTS` of it, either side. Such scores show
    nothing learned yet: F1 43.10 and 43.20 against SQuAD v2's 43.20 differ by a few first
    answers, mostly wrong, of a model starting to answer. So they tie, and the dev loss decides
    (`best_rate`). A score further below stays below: F1 7 on SQuAD v2 (answering nearly
    everything, wrongly) is worse than abstaining. A diverged score (-inf) stays worst."""
    if math.isfinite(score) and not math.isnan(baseline):
        if abs(exact(points_per_unit * (score - baseline))) <= UNINFORMATIVE_POINTS:
            return baseline
    return score


def effective_scores(
    scores: list[tuple[float, float, float | None]], baseline: float, points_per_unit: float
) -> list[tuple[float, float, float | None]]:
    """`scores` (score, lr, dev loss or None) as the choice compares them: those near the
    baseline lifted to it (`at_baseline`) where every one of them recorded a dev loss to decide
    between them; else as they are (a tie the loss cannot break would only move an arbitrary
    choice to the smallest rate)."""
    lifted = [(at_baseline(x[0], baseline, points_per_unit), *x[1:]) for x in scores]
    near = [x for x, y in zip(scores, lifted, strict=True) if y[0] == baseline]
    return lifted if all(x[2] is not None for x in near) else list(scores)


def best_rate(
    scores: list[tuple[float, float, float | None]],
    baseline: float = math.nan,
    points_per_unit: float = 100.0,
) -> tuple[float, bool]:
    """The learning rate of the best (score, lr, mean dev loss or None) and whether the dev
    loss alone chose it. The highest score wins, scores near the majority `baseline` counting
    as tied (`effective_scores`); among tied rates, the lowest dev loss where every tied rate
    recorded one (the dev set's own objective still tells rates apart when all of them end at
    the majority baseline, as SQuAD v2 does on a small budget), then the smallest rate."""
    scores = effective_scores(scores, baseline, points_per_unit)
    top = max(x[0] for x in scores)
    tied = sorted((x for x in scores if x[0] == top), key=lambda x: x[1])
    if len(tied) > 1 and all(x[2] is not None for x in tied):
        best = min(tied, key=lambda x: (x[2], x[1]))
        return best[1], sum(x[2] == best[2] for x in tied) == 1
    return tied[0][1], False


def t_central_probability(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with `df` (integer ≥ 1) degrees of freedom."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 0:  # sin θ · (1 + ½c² + (1·3)/(2·4)c⁴ + …), (df − 2)/2 terms after the first
        term = total = 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        return math.sin(theta) * total
    # odd: (2/π)·(θ + sin θ cos θ · (1 + (2/3)c² + (2·4)/(3·5)c⁴ + …)), (df − 3)/2 terms after
    total = 0.0
    if df > 1:
        term = total = 1.0
        for k in range(1, (df - 1) // 2):
            term *= (2 * k) / (2 * k + 1) * c2
            total += term
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def t_quantile(p: float, df: int) -> float:
    """The t with P(T ≤ t) = p (p in (0.5, 1)): e.g. 0.975 for a two-sided 95% interval."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df ≥ 1, got p={p}, df={df}")
    target = 2 * p - 1
    lo, hi = 0.0, 1.0
    while t_central_probability(hi, df) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_central_probability(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t confidence interval of the mean; NaN bounds for n < 2."""
    mean, std = mean_std(values)
    n = len(values)
    if n < 2:
        return mean, math.nan, math.nan
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return mean, mean - half, mean + half


def seeds_to_settle(values: list[float], target: float, level: float = 0.95, most: int = 50) -> int | None:  # fmt: skip
    """The fewest values whose `level` interval would clear `target` if their mean and sample
    std stayed those of `values` (a plug-in projection, not a guarantee); None when even
    max(`most`, len(values)) would not, or when the values do not spread (std 0 or NaN) or
    their mean sits on `target`."""
    mean, std = mean_std(values)
    margin = abs(mean - target)
    if not (std > 0 and margin > 0):
        return None
    for n in range(max(2, len(values)), max(most, len(values)) + 1):
        if t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n) < margin:
            return n
    return None


def exact(points: float) -> float:
    """A figure in points without float noise, for comparing with a target: 100·(0.85 − 0.88)
    is −3.0000000000000027, which read as a FAIL of the 3-point target."""
    return round(points, 9)
