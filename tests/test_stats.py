"""Statistics (DESIGN.md §4): Clopper-Pearson bounds and the PREDICT test against SciPy and against
their defining properties (binomial tail equations, exact coverage, bounded seeded simulation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from fastsmooth import clopper_pearson_lower, clopper_pearson_upper, predict_from_counts, predict_pvalue
from fastsmooth.stats import CS_PRIOR_STRENGTH, anytime_lower, anytime_upper, max_lower_bound

GRID_N = [1, 2, 10, 100, 1000, 100_000]
ALPHAS = [0.5, 0.05, 0.001, 1e-6]


def ks_for(n):
    return sorted({0, 1, 2, n // 3, n // 2, n - 1, n} & set(range(n + 1)))


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n", GRID_N)
def test_lower_bound_is_beta_ppf(n, alpha):
    for k in ks_for(n):
        lo = clopper_pearson_lower(k, n, alpha)
        if k == 0:
            assert lo == 0.0
        else:
            assert lo == pytest.approx(stats.beta.ppf(alpha, k, n - k + 1), rel=1e-12, abs=1e-300)
        assert 0.0 <= lo <= k / n


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n", GRID_N)
def test_upper_bound_is_beta_ppf(n, alpha):
    for k in ks_for(n):
        hi = clopper_pearson_upper(k, n, alpha)
        if k == n:
            assert hi == 1.0
        else:
            assert hi == pytest.approx(stats.beta.ppf(1 - alpha, k + 1, n - k), rel=1e-12)
        assert k / n <= hi <= 1.0


@pytest.mark.parametrize("n,k,alpha", [(10, 7, 0.05), (100, 63, 0.001), (100_000, 99_000, 0.001),
                                       (100_000, 50_400, 0.001), (50, 1, 0.01), (1000, 1000, 0.001)])
def test_lower_bound_solves_the_binomial_tail(n, k, alpha):
    """Independent of the Beta identity: the lower bound p solves P(X >= k; n, p) = alpha."""
    ref = optimize.brentq(lambda p: stats.binom.sf(k - 1, n, p) - alpha, 1e-12, 1 - 1e-15, xtol=1e-15, rtol=1e-14)
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(ref, rel=1e-9)
    # and the upper bound of n - k failures mirrors it
    assert clopper_pearson_upper(n - k, n, alpha) == pytest.approx(1 - ref, rel=1e-9, abs=1e-12)


def test_all_votes_bound_and_cohen_radius():
    for n, alpha in [(100, 0.001), (100_000, 0.001), (10_000, 0.05)]:
        assert clopper_pearson_lower(n, n, alpha) == pytest.approx(alpha ** (1 / n), rel=1e-12)
        assert max_lower_bound(n, alpha) == pytest.approx(alpha ** (1 / n), rel=1e-12)
    # DESIGN §4: the largest l2 radius at n = 100,000, alpha = 0.001 is 3.8115 sigma
    assert round(float(stats.norm.ppf(max_lower_bound(100_000, 0.001))), 4) == 3.8115


def test_lower_bound_monotone():
    n, alpha = 500, 0.001
    los = [clopper_pearson_lower(k, n, alpha) for k in range(n + 1)]
    assert all(b > a for a, b in zip(los, los[1:]))
    # more confidence -> lower bound; more samples at the same rate -> tighter bound
    assert clopper_pearson_lower(400, 500, 0.001) < clopper_pearson_lower(400, 500, 0.01)
    assert clopper_pearson_lower(400, 500, 0.001) < clopper_pearson_lower(4000, 5000, 0.001)


@pytest.mark.parametrize("n,alpha", [(20, 0.05), (100, 0.01), (200, 0.001)])
def test_exact_coverage(n, alpha):
    """P_p(lower(X) > p) <= alpha for every p, computed exactly over X ~ Binomial(n, p)."""
    lows = np.array([clopper_pearson_lower(k, n, alpha) for k in range(n + 1)])
    highs = np.array([clopper_pearson_upper(k, n, alpha) for k in range(n + 1)])
    ks = np.arange(n + 1)
    worst_lo = worst_hi = 0.0
    for p in np.linspace(0.001, 0.999, 999):
        pmf = stats.binom.pmf(ks, n, p)
        miss_lo, miss_hi = pmf[lows > p].sum(), pmf[highs < p].sum()
        assert miss_lo <= alpha * (1 + 1e-9) and miss_hi <= alpha * (1 + 1e-9), p
        worst_lo, worst_hi = max(worst_lo, miss_lo), max(worst_hi, miss_hi)
    # exact, not needlessly conservative: the worst case comes close to alpha
    assert worst_lo > 0.5 * alpha and worst_hi > 0.5 * alpha


def test_coverage_by_simulation():
    """Seeded simulation: the lower bound exceeds the true p in at most ~alpha of the trials."""
    rng = np.random.default_rng(12345)
    alpha, n, trials = 0.05, 200, 4000
    for p in (0.3, 0.5, 0.8, 0.97):
        ks = rng.binomial(n, p, size=trials)
        lows = {k: clopper_pearson_lower(int(k), n, alpha) for k in np.unique(ks)}
        misses = sum(lows[k] > p for k in ks)
        assert misses / trials <= alpha + 4 * math.sqrt(alpha * (1 - alpha) / trials), p
        # and a 1 - alpha bound is not a trivial one: almost always above p - 0.15
        assert np.mean([lows[k] > p - 0.15 for k in ks]) > 0.95


@pytest.mark.parametrize("top,runner_up", [(0, 0), (1, 0), (5, 5), (10, 2), (60, 40), (530, 470), (9000, 1), (3, 7)])
def test_predict_pvalue_is_binomtest(top, runner_up):
    p = predict_pvalue(top, runner_up)
    if top + runner_up == 0:
        assert p == 1.0
    else:
        assert p == pytest.approx(stats.binomtest(top, top + runner_up, 0.5, alternative="two-sided").pvalue, rel=1e-12)


def test_predict_from_counts_decisions():
    alpha = 0.001
    rng = np.random.default_rng(0)
    for _ in range(300):
        counts = rng.multinomial(int(rng.integers(1, 400)), rng.dirichlet(np.full(4, 0.4)))
        order = sorted(range(4), key=lambda c: (-counts[c], c))
        c1, c2 = counts[order[0]], counts[order[1]]
        expected = order[0] if stats.binomtest(int(c1), int(c1 + c2), 0.5).pvalue <= alpha else -1
        assert predict_from_counts(counts.tolist(), alpha) == expected
    assert predict_from_counts([0, 100, 0], alpha) == 1
    assert predict_from_counts([50, 50, 0], 0.4) == -1       # a tie: p-value 1
    assert predict_from_counts([0, 0, 60, 40], 0.05) == -1   # 60 vs 40: two-sided p = 0.0569
    assert predict_from_counts([0, 0, 60, 40], 0.06) == 2
    assert predict_from_counts([40, 0, 60], 0.05) == -1
    assert predict_from_counts([30], 0.001) == 0             # one class: compared with 0 runner-up votes
    import torch

    assert predict_from_counts(torch.tensor([3, 900, 2]), alpha) == 1


def test_validation():
    for bad_alpha in (0.0, 1.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="alpha"):
            clopper_pearson_lower(5, 10, bad_alpha)
        with pytest.raises(ValueError, match="alpha"):
            clopper_pearson_upper(5, 10, bad_alpha)
        with pytest.raises(ValueError, match="alpha"):
            predict_from_counts([5, 1], bad_alpha)
    for k, n in [(11, 10), (-1, 10), (0, 0), (1, -5), (2.5, 10), (3, 10.5)]:
        with pytest.raises(ValueError):
            clopper_pearson_lower(k, n, 0.01)
        with pytest.raises(ValueError):
            clopper_pearson_upper(k, n, 0.01)
    with pytest.raises(ValueError):
        predict_pvalue(-1, 3)
    with pytest.raises(ValueError):
        predict_from_counts([], 0.01)
    # integral floats and numpy integers are fine
    assert clopper_pearson_lower(np.int64(7), 10.0, 0.05) == clopper_pearson_lower(7, 10, 0.05)


# --------------------------------------------------------------------------------------------
# The anytime-valid confidence sequence (sequential certification, DESIGN §4)
# --------------------------------------------------------------------------------------------
def _log_martingale_by_products(p: float, k: int, n: int, m: float) -> float:
    """Robbins' mixture with the Beta(m p, m (1 - p)) prior from its rising-factorial form, summed
    term by term (math.fsum): independent of the gammaln form the library evaluates."""
    terms = [math.log(m + i / p) for i in range(k)] + [math.log(m + j / (1 - p)) for j in range(n - k)]
    return math.fsum(terms) - math.fsum(math.log(m + l) for l in range(n))


@pytest.mark.parametrize("m", [CS_PRIOR_STRENGTH, 5.0])
def test_anytime_lower_is_a_verified_end_and_tight(m):
    """Against the product form: log M_n(L) >= log(1/alpha) at the returned L (it is outside the
    confidence sequence, and so is every smaller p: log M_n is convex), and L + 1e-8 is inside."""
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(150):
        n = int(rng.integers(1, 3000))
        k = int(rng.binomial(n, rng.choice([rng.random(), 0.999, 1.0])))
        alpha = float(rng.choice([0.3, 0.05, 0.001]))
        low = anytime_lower(k, n, alpha, prior_strength=m)
        assert 0.0 <= low <= k / n
        threshold = math.log(1 / alpha)
        if low > 0:
            assert _log_martingale_by_products(low, k, n, m) >= threshold
            checked += 1
        above = low + 1e-8
        if above < k / n:
            assert _log_martingale_by_products(above, k, n, m) < threshold
        high = anytime_upper(k, n, alpha, prior_strength=m)
        assert k / n <= high <= 1.0
        assert high == pytest.approx(1 - anytime_lower(n - k, n, alpha, prior_strength=m), abs=1e-15)
    assert checked > 50


def test_anytime_bounds_edges_and_arrays():
    assert anytime_lower(0, 0, 0.001) == 0.0 and anytime_upper(0, 0, 0.001) == 1.0
    assert anytime_lower(0, 50, 0.001) == 0.0 and anytime_upper(50, 50, 0.001) == 1.0
    ks, ns = np.array([10, 900, 100_000]), np.array([20, 1000, 100_000])
    lows = anytime_lower(ks, ns, 0.01)
    assert lows.shape == (3,) and all(lows[i] == anytime_lower(int(ks[i]), int(ns[i]), 0.01) for i in range(3))
    # more votes at the same rate: a tighter bound; more confidence: a lower one
    assert anytime_lower(900, 1000, 0.01) < anytime_lower(9000, 10_000, 0.01) < anytime_lower(90_000, 100_000, 0.01)
    assert anytime_lower(9000, 10_000, 0.001) < anytime_lower(9000, 10_000, 0.01)
    for bad in [(11, 10), (-1, 10), (2.5, 10), (1, -1)]:
        with pytest.raises(ValueError):
            anytime_lower(*bad, 0.01)
    with pytest.raises(ValueError, match="alpha"):
        anytime_upper(5, 10, 1.0)
    with pytest.raises(ValueError, match="prior_strength"):
        anytime_lower(5, 10, 0.01, prior_strength=0)


def test_anytime_price_against_clopper_pearson_at_1e5():
    """What anytime validity costs at n = 1e5, alpha = 0.001, in Gaussian radius (sigma Phi^-1(p_lower))
    against the fixed-n Clopper-Pearson bound: positive (the sequence is wider) and 0.2-2.2 % for
    p_hat in [0.6, 1] (DESIGN §4 expects 0.5-2 %; less where every vote goes to c_A)."""
    n, alpha = 100_000, 0.001
    prices = []
    for p_hat in (0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999, 1.0):
        k = round(p_hat * n)
        anytime, fixed = anytime_lower(k, n, alpha), clopper_pearson_lower(k, n, alpha)
        prices.append(1 - stats.norm.ppf(anytime) / stats.norm.ppf(fixed))
    assert all(0.0 < price < 0.025 for price in prices), prices
    assert 0.004 < float(np.median(prices)) < 0.02, prices


def _martingale_paths(p, m, alpha, streams, steps, looks, seed):
    """Simulate ``streams`` vote streams of ``steps`` Bernoulli(p) votes. Returns whether log M_t(p)
    reached log(1/alpha) at any t (the sequence left p), and at each look time (S_t, log M_t(p)).
    log M is updated by the product form's factors, independently of the library."""
    rng = np.random.default_rng(seed)
    log_m = np.zeros(streams)
    successes = np.zeros(streams)
    crossed = np.zeros(streams, dtype=bool)
    threshold, snapshots = math.log(1 / alpha), {}
    log_p, log_q = math.log(p), math.log1p(-p)
    for t in range(steps):
        vote = rng.random(streams) < p
        failures = t - successes
        log_m += np.where(vote, np.log(m * p + successes) - log_p, np.log(m * (1 - p) + failures) - log_q)
        log_m -= math.log(m + t)
        successes += vote
        crossed |= log_m >= threshold
        if t + 1 in looks:
            snapshots[t + 1] = (successes.astype(np.int64), log_m.copy())
    return crossed, snapshots


@pytest.mark.slow
@pytest.mark.parametrize("m,steps", [(CS_PRIOR_STRENGTH, 1000), (5.0, 1000)])
def test_anytime_coverage_by_simulation(m, steps):
    """10^5 seeded streams at each of several p: the confidence sequence leaves p at some t <= steps
    in at most alpha of them (Ville's inequality; a one-sided binomial test at level 1e-3), and the
    library's bounds at the look times exclude p exactly where log M_t(p) says so. With the small
    prior (m = 5) the rate comes close to alpha: the check has power."""
    alpha, streams, looks = 0.05, 100_000, (10, 100, 1000, steps)
    for p in (0.5, 0.9, 0.99):
        crossed, snapshots = _martingale_paths(p, m, alpha, streams, steps, looks, seed=int(p * 1000))
        count = int(crossed.sum())
        assert stats.binom.sf(count - 1, streams, alpha) > 1e-3, (p, count / streams)
        if m < 10:
            assert count > 0.6 * alpha * streams, (p, count / streams)
        threshold = math.log(1 / alpha)
        for t, (successes, log_m) in snapshots.items():
            low = anytime_lower(successes, np.full(streams, t), alpha, prior_strength=m)
            high = anytime_upper(successes, np.full(streams, t), alpha, prior_strength=m)
            out = (low > p) | (high < p)
            clear = np.abs(log_m - threshold) > 1e-6  # away from ties that rounding may decide
            assert np.array_equal(out[clear], (log_m >= threshold)[clear]), (p, t)
            assert not np.any(out & ~crossed)  # a bound that leaves p was counted above
