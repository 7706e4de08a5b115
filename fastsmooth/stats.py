"""Confidence bounds and tests for the smoothed classifier (DESIGN.md §4). Pure: numbers in, numbers out.

SciPy only: no statsmodels and no ``scipy.stats.binom_test`` (removed in SciPy 1.12).
"""

from __future__ import annotations

import math

from scipy.stats import beta, binomtest

from .checks import check_alpha


def _check_counts(k: int, n: int) -> tuple[int, int]:
    if int(k) != k or int(n) != n:
        raise ValueError(f"counts must be integers, got k={k!r}, n={n!r}")
    k, n = int(k), int(n)
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    return k, n


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion.

    P(p >= bound) >= 1 - alpha for k ~ Binomial(n, p) (Clopper & Pearson 1934). Equals
    Beta.ppf(alpha, k, n - k + 1), and 0 when k = 0; the same as statsmodels'
    ``proportion_confint(k, n, alpha=2*alpha, method="beta")[0]`` used by Cohen et al.
    """
    k, n = _check_counts(k, n)
    alpha = check_alpha(alpha)
    if k == 0:
        return 0.0
    return float(beta.ppf(alpha, k, n - k + 1))


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound: Beta.ppf(1 - alpha, k + 1, n - k), 1 when k = n."""
    k, n = _check_counts(k, n)
    alpha = check_alpha(alpha)
    if k == n:
        return 1.0
    return float(beta.ppf(1.0 - alpha, k + 1, n - k))


def predict_pvalue(top: int, runner_up: int) -> float:
    """Two-sided binomial test p-value of ``top`` successes in ``top + runner_up`` trials at p = 1/2.

    Cohen et al.'s PREDICT: abstain unless this is <= alpha. 1.0 when there are no votes at all.
    """
    top, runner_up = int(top), int(runner_up)
    if top < 0 or runner_up < 0:
        raise ValueError("vote counts must be >= 0")
    if top + runner_up == 0:
        return 1.0
    return float(binomtest(top, top + runner_up, 0.5).pvalue)


def predict_from_counts(counts, alpha: float) -> int:
    """PREDICT's decision from per-class vote counts: the top class, or -1 (abstain).

    Cohen et al. 2019, Theorem 2: with probability >= 1 - alpha this returns g(x) or abstains.
    Ties for the top count give p-value 1, hence abstention.
    """
    alpha = check_alpha(alpha)
    values = [int(c) for c in counts]
    if len(values) == 0:
        raise ValueError("counts is empty")
    order = sorted(range(len(values)), key=lambda c: (-values[c], c))
    top = order[0]
    runner_up = values[order[1]] if len(values) > 1 else 0
    return top if predict_pvalue(values[top], runner_up) <= alpha else -1


def max_lower_bound(n: int, alpha: float) -> float:
    """The largest p_lower that n votes can give (all votes for c_A): alpha^(1/n)."""
    _check_counts(n, n)
    return math.exp(math.log(check_alpha(alpha)) / n)
