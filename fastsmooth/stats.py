"""Confidence bounds and tests for the smoothed classifier (DESIGN.md §4). Pure: numbers in, numbers out.

Fixed n: Clopper-Pearson bounds and PREDICT's binomial test. Any n chosen while sampling (sequential
certification): the anytime-valid confidence sequence ``anytime_lower`` / ``anytime_upper``.
SciPy only: no statsmodels and no ``scipy.stats.binom_test`` (removed in SciPy 1.12).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import digamma, gammaln
from scipy.stats import beta, binomtest

from .checks import check_alpha, positive_float


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


# -- anytime-valid bounds: a confidence sequence (sequential certification, DESIGN §4) ---------------
#
# Robbins (1970, "Statistical methods related to the law of the iterated logarithm", Ann. Math.
# Statist. 41) mixture of likelihood ratios. For votes X_1, X_2, ... i.i.d. Bernoulli(p), k successes
# in n, and a mixing law pi_p on the alternatives p':
#
#     M_n(p) = integral (p'/p)^k ((1-p')/(1-p))^(n-k) dpi_p(p')
#
# is, under p, a nonnegative martingale with M_0 = 1 (each likelihood ratio is one; Fubini), so by
# Ville's inequality P_p(exists n: M_n(p) >= 1/alpha) <= alpha. The confidence sequence
# C_n = {p : M_n(p) < 1/alpha} therefore holds p at every n at once with probability >= 1 - alpha,
# and its ends may be read at any stopping time, however the stopping depends on the votes.
#
# The mixing law may depend on the tested p (one martingale per p); here pi_p = Beta(m p, m (1 - p)),
# centred on p with m pseudo-votes, which gives the closed form (rising factorials)
#
#     M_n(p) = prod_{i<k} (m + i/p) prod_{j<n-k} (m + j/(1-p)) / prod_{l<n} (m + l).
#
# Each factor's logarithm is convex in p, so log M_n is convex; and M_n(k/n) <= 1 < 1/alpha (k/n
# maximizes the likelihood). Hence C_n is an interval around k/n, and a point p < k/n with
# log M_n(p) >= log(1/alpha) proves that every smaller p is outside it too. The bounds below return
# only such verified points (with a margin for rounding), so they are never above the exact ends.
#
# The prior strength m sets where the bound is tight. In the normal approximation the boundary of
# (k - n p) is sqrt(p (1-p) (n + m) (2 log(1/alpha) + log(1 + n/m))) (Robbins' normal mixture), which
# is smallest at n / m = 2 log(1/alpha) + log(1 + n/m): n = 17 m at alpha = 0.001. m = 500 is that
# optimum at n = 8,400, and within 5 % of the optimal width for every n in [2e3, 1e5], where
# certificates are read (target radii stop near 1e4; full radii run to the cap 1e5). Where all votes
# go to one class the bound needs m log(1 + n/m) votes more than Clopper-Pearson does, so a smaller
# m is better there at every n: 500 costs 0.17 % of the Gaussian radius at n = 1e5 and 26 % more
# votes (6,450 instead of 5,115) to certify 3 sigma. Against Clopper-Pearson at n = 1e5 the price is
# 0.2-2.2 % of radius for p_hat in [0.6, 1] (tests/test_stats.py).

CS_PRIOR_STRENGTH = 500.0
_ROUNDING = 1e-12      # relative margin on log M: scipy's gammaln is accurate to a few ulps
_NEWTON_STEPS = 60     # a cap; from a verified start Newton needs 4-8 steps to reach the end


def _sequential_counts(k, n):
    """k, n as broadcast int64 arrays (0 <= k <= n), or ValueError."""
    k_arr, n_arr = np.asarray(k), np.asarray(n)
    try:
        ki, ni = k_arr.astype(np.int64), n_arr.astype(np.int64)
    except (TypeError, ValueError):
        raise ValueError(f"counts must be integers, got k={k!r}, n={n!r}") from None
    if not (np.array_equal(ki, k_arr) and np.array_equal(ni, n_arr)):
        raise ValueError(f"counts must be integers, got k={k!r}, n={n!r}")
    if np.any(ni < 0) or np.any(ki < 0) or np.any(ki > ni):
        raise ValueError(f"need 0 <= k <= n, got k={k!r}, n={n!r}")
    return np.broadcast_arrays(ki, ni)


def log_mixture_martingale(p, k, n, prior_strength: float = CS_PRIOR_STRENGTH):
    """(log M_n(p), its derivative in p, the size of the terms summed): k successes in n, 0 < p < 1.

    Arrays broadcast. The size bounds the rounding error: each term is accurate to a few ulps of
    its magnitude (gammaln, log)."""
    m = float(prior_strength)
    p = np.asarray(p, dtype=np.float64)
    q = 1.0 - p
    k = np.asarray(k, dtype=np.float64)
    f = np.asarray(n, dtype=np.float64) - k
    with np.errstate(divide="ignore", invalid="ignore"):
        f_log_q = np.where(f > 0, f * np.log(q), 0.0)
        terms = (gammaln(m * p + k), -gammaln(m * p), -k * np.log(p),
                 gammaln(m * q + f), -gammaln(m * q), -f_log_q, -gammaln(m + k + f), gammaln(m) + 0 * p)
        slope = (m * (digamma(m * p + k) - digamma(m * p)) - k / p
                 - m * (digamma(m * q + f) - digamma(m * q)) + np.where(f > 0, f / q, 0.0))
    return sum(terms), slope, sum(np.abs(t) for t in terms)


def _lower_end(k, n, threshold: float, m: float):
    """The largest verified point below the lower end of {p : log M_n(p) < threshold} (arrays).

    Newton's method from the left: log M_n is convex, so from a point where it is above the
    threshold the tangent's zero is still at or left of the end (the iterates rise to it and never
    pass it in exact arithmetic). Every accepted iterate is verified, log M_n >= threshold plus the
    rounding margin, so rounding can stop the iteration early but never make it pass the end."""
    k, n = k.astype(np.float64), n.astype(np.float64)
    phat = np.where(k > 0, k / np.maximum(n, 1.0), 0.0)

    def excess(p):  # log M_n(p) - threshold - margin, the slope, the margin
        log_m, slope, size = log_mixture_martingale(p, k, n, m)
        margin = _ROUNDING * (1.0 + size)
        return log_m - threshold - margin, slope, margin

    # A verified start: the normal approximation's end, moved left (doubling its distance to
    # p_hat) until verified. A start that reaches p_hat 2^-60 unverified leaves the bound at 0.
    width = np.sqrt((phat * (1.0 - phat) + 1.0 / np.maximum(n, 1.0)) / np.maximum(n, 1.0)
                    * (1.0 + m / np.maximum(n, 1.0)) * (2.0 * threshold + np.log1p(n / m)))
    lo = np.zeros(phat.shape)
    searching = k > 0
    for j in range(64):
        if not searching.any():
            break
        point = np.maximum(phat - width * 2.0 ** j, phat * 2.0 ** -60)
        value, _, _ = excess(np.where(searching, point, 0.5))
        found = searching & (value >= 0)
        lo = np.where(found, point, lo)
        searching &= ~found & (point > phat * 2.0 ** -60)
    # Newton from the verified start (lo = 0 where none was found: the bound is 0 there).
    # Each step aims one margin short of the end, so that rounding does not reject it there.
    active = lo > 0
    value, slope, margin = excess(np.where(active, lo, 0.5))
    for _ in range(_NEWTON_STEPS):
        if not active.any():
            break
        step = np.where(active & (slope < 0), (value - margin) / -np.where(slope < 0, slope, -1.0), 0.0)
        point = np.minimum(lo + step, phat)
        new_value, new_slope, new_margin = excess(np.where(active, point, 0.5))
        accept = active & (point > lo) & (new_value >= 0)
        lo = np.where(accept, point, lo)
        value, slope = np.where(accept, new_value, value), np.where(accept, new_slope, slope)
        margin = np.where(accept, new_margin, margin)
        active = accept & (step > 1e-15 * lo)  # a rejected step (rounding at the end) or a tiny one ends it
    return lo


def anytime_lower(k, n, alpha: float, prior_strength: float = CS_PRIOR_STRENGTH):
    """Lower end of the (1 - alpha) confidence sequence for a binomial proportion: k successes in n.

    P_p(exists n: anytime_lower(S_n, n) > p) <= alpha over the whole stream of votes (Robbins' Beta
    mixture and Ville's inequality; see the comment above), so it may be read at a data-dependent n
    (a stopping time), which a Clopper-Pearson bound may not. 0 when k = 0 or n = 0; arrays
    broadcast. The value is a point where log M_n >= log(1/alpha) was verified: never above the end.
    """
    alpha = check_alpha(alpha)
    m = positive_float(prior_strength, "prior_strength")
    k, n = _sequential_counts(k, n)
    lo = _lower_end(k, n, math.log(1.0 / alpha), m)
    return float(lo) if lo.ndim == 0 else lo


def anytime_upper(k, n, alpha: float, prior_strength: float = CS_PRIOR_STRENGTH):
    """Upper end of the same confidence sequence: 1 - anytime_lower(n - k, n) (the prior is
    symmetric under p <-> 1 - p). Both ends hold together with probability >= 1 - alpha."""
    k, n = _sequential_counts(k, n)
    return 1.0 - anytime_lower(n - k, n, alpha, prior_strength)
