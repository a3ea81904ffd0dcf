"""Statistics of a study over seeds: mean and spread per arm, the paired difference and its t-interval.

No SciPy here: the Student t quantile comes from the closed-form CDF for an integer number of
degrees of freedom, solved by bisection.
"""

from __future__ import annotations

import math
import statistics
from typing import Dict, List, Sequence


def _t_central_probability(t: float, dof: int) -> float:
    """P(|T| < t) for Student's t with ``dof`` (integer >= 1) degrees of freedom, t >= 0.

    The finite series in theta = atan(t / sqrt(dof)) (Abramowitz and Stegun 26.7.3 and 26.7.4).
    """
    theta = math.atan(t / math.sqrt(dof))
    cos2 = math.cos(theta) ** 2
    if dof % 2 == 1:
        series, term = 0.0, 1.0
        if dof > 1:
            series = 1.0
            for k in range(1, (dof - 1) // 2):  # terms 2/3 cos^2, (2*4)/(3*5) cos^4, ...
                term *= (2 * k) / (2 * k + 1) * cos2
                series += term
        return (2 / math.pi) * (theta + math.sin(theta) * math.cos(theta) * series)
    series, term = 1.0, 1.0
    for k in range(1, dof // 2):  # terms 1/2 cos^2, (1*3)/(2*4) cos^4, ...
        term *= (2 * k - 1) / (2 * k) * cos2
        series += term
    return math.sin(theta) * series


def t_quantile(dof: int, confidence: float = 0.95) -> float:
    """The two-sided quantile t with P(|T| < t) = ``confidence`` (4.303 for 2 degrees of freedom)."""
    if dof < 1:
        raise ValueError(f"a t-interval needs at least 1 degree of freedom (2 seeds), got {dof}")
    low, high = 0.0, 1.0
    while _t_central_probability(high, dof) < confidence:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        if _t_central_probability(middle, dof) < confidence:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; NaN for one value, where
    statistics.stdev would raise: a one-seed study still prints its mean)."""
    n = len(values)
    std = statistics.stdev(values) if n > 1 else math.nan
    return {"n": n, "mean": statistics.mean(values), "std": std}


def paired_difference(treated: Sequence[float], control: Sequence[float],
                      confidence: float = 0.95) -> Dict[str, float]:
    """The mean of ``treated[i] - control[i]`` over seeds, with a t-interval on n - 1 dof."""
    if len(treated) != len(control):
        raise ValueError("a paired difference needs the same seeds in both arms")
    differences: List[float] = [a - b for a, b in zip(treated, control)]
    summary = mean_std(differences)
    n = summary["n"]
    if n < 2:
        return {**summary, "t": math.nan, "low": math.nan, "high": math.nan}
    t = t_quantile(n - 1, confidence)
    half = t * summary["std"] / math.sqrt(n)
    return {**summary, "t": t, "low": summary["mean"] - half, "high": summary["mean"] + half}
