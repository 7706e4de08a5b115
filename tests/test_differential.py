"""The differential method's l_inf radii (fastsmooth/differential.py, Yang et al. 2020) against
independent quadratures of their definition (tests/_differential_reference.py), closed forms where
the method is exact (d = 1), the sampled law of the noise, and the special functions against mpmath.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import special, stats

from _differential_reference import (expinf_linf_reference, expinf_phi_by_definition, expinf_phi_closed_form,
                                     laplace_linf_reference, laplace_phi)
from fastsmooth import ExpInf, Laplace, differential
from fastsmooth.backends import draw_noise

P_GRID = (0.5000001, 0.51, 0.6, 0.7, 0.8, 0.9, 0.99, 0.999, 0.9999, 1 - 1e-9)
ACCEPTANCE_P = (0.51, 0.6, 0.7, 0.8, 0.9, 0.99, 0.999, 0.9999)


# --------------------------------------------------------------------------------------------
# The special functions behind the tables, against mpmath (the basis of differential.MARGIN)
# --------------------------------------------------------------------------------------------
def _mp_lower_gamma(a, t):
    """Regularized lower incomplete gamma by its power series (positive terms), at 40 digits."""
    with mpmath.workdps(40):
        a, t = mpmath.mpf(a), mpmath.mpf(t)
        total = term = mpmath.mpf(1)
        n = 0
        while term > total * mpmath.mpf(10) ** -30:
            n += 1
            term *= t / (a + n)
            total += term
        return mpmath.exp(a * mpmath.log(t) - t - mpmath.loggamma(a + 1)) * total


def _mp_upper_gamma(a, t):
    """Regularized upper incomplete gamma at 40 digits: 1 - the series below the mean, above it a
    tanh-sinh quadrature of the density (mpmath's own gammainc stalls at shapes ~1e6)."""
    if t < a:
        return 1 - _mp_lower_gamma(a, t)
    with mpmath.workdps(40):
        a, t = mpmath.mpf(a), mpmath.mpf(t)
        log_norm, s = mpmath.loggamma(a), mpmath.sqrt(a)
        density = lambda x: mpmath.exp((a - 1) * mpmath.log(x) - x - log_norm)  # noqa: E731
        return mpmath.quad(density, [t, t + s, t + 3 * s, t + 10 * s, t + 40 * s, mpmath.inf])


@pytest.mark.parametrize("a", [0.1, 7.84, 392.0, 3072.0, 150528.0, 3.0e6])
def test_upper_incomplete_gamma_accuracy(a):
    # (tails near 1 matter in absolute terms only, where any rounding of a value near 1 is tiny)
    with mpmath.workdps(40):
        for tail in (1e-16, 1e-8, 1e-3, 0.2, 0.3):
            t = special.gammainccinv(a, tail)
            for b in (0.0, 0.5, 0.9):
                exact = float(_mp_upper_gamma(a + b, t))
                assert abs(special.gammaincc(a + b, t) - exact) <= differential.MARGIN / 100 * exact, (a, b, tail)


@pytest.mark.parametrize("a", [1.5, 78.4, 6144.0, differential.LOWER_TAIL_MAX_SHAPE])
def test_lower_incomplete_gamma_accuracy_up_to_the_trusted_shape(a):
    # used for k < 1: shapes a = d/k > 1 and a + b = a + 1 - 1/k > 0, b < 0
    for tail in (1e-16, 1e-8, 1e-3, 0.3):
        t = special.gammaincinv(a, tail)
        for b in (0.0, -0.5):
            exact = float(_mp_lower_gamma(a + b, t))
            assert abs(special.gammainc(a + b, t) - exact) <= differential.MARGIN / 100 * exact, (a, b, tail)


def test_pochhammer_and_binomial_accuracy():
    with mpmath.workdps(40):
        for a in (0.05, 78.4, 3072.0, 150528.0, 3.0e7):
            for b in (0.9, 0.1, -0.02):  # a + b > 0: (d + k - 1)/k
                exact = float(mpmath.gamma(mpmath.mpf(a) + b) / mpmath.gamma(mpmath.mpf(a)))
                assert abs(special.poch(a, b) - exact) <= differential.MARGIN / 100 * exact, (a, b)
        for d in (784, 150528):
            for z in (0.0, 2.0, 8.3):
                m = int(d / 2 + z * math.sqrt(d) / 2)
                pmf = mpmath.binomial(d, m) / mpmath.mpf(2) ** d
                tail, term, j = mpmath.mpf(0), pmf, m
                while term > tail * mpmath.mpf(10) ** -25 or j < m + 10:
                    tail, term, j = tail + term, term * (d - j) / (j + 1), j + 1
                assert abs(stats.binom.sf(m - 1, d, 0.5) - float(tail)) <= differential.MARGIN / 100 * float(tail)
                assert abs(stats.binom.pmf(m, d, 0.5) - float(pmf)) <= differential.MARGIN / 100 * float(pmf)


# --------------------------------------------------------------------------------------------
# Laplace
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2, 3, 10, 784, 3072])
def test_laplace_linf_against_quadrature(d):
    """Exact up to the 1e-9 margin: never above the quadrature, at most 1e-8 below it."""
    for p in P_GRID:
        got, ref = differential.laplace_linf(p, d), laplace_linf_reference(p, d)
        assert ref * (1 - 1e-8) <= got <= ref * (1 + 1e-10), (d, p, got, ref)


def test_laplace_linf_worked_values_and_the_clt_is_no_bound():
    # d = 1: every norm is |x|, and the radius is the Laplace quantile lambda log(1 / (2(1 - p))).
    for p in (0.6, 0.9, 0.99):
        assert differential.laplace_linf(p, 1) == pytest.approx(math.log(1 / (2 * (1 - p))), rel=2e-9)
    # d = 2 by hand: Y = 2B - 2 in {2, 0, -2} w.p. 1/4, 1/2, 1/4; Phi(q) = 2q on [0, 1/4], 1/2 above,
    # so R(0.9) = int_0.1^0.25 dq / (2q) + (0.5 - 0.25) / 0.5 = log(2.5) / 2 + 1/2.
    assert differential.laplace_linf(0.9, 2) == pytest.approx(math.log(2.5) / 2 + 0.5, rel=2e-9)
    # rs4a's "approx", lambda Phi^-1(p) / sqrt(d), exceeds the proven radius at small d: not a bound.
    assert stats.norm.ppf(0.6) > differential.laplace_linf(0.6, 1) * 1.1
    # ... and it is what the exact value approaches for large d (within 0.1 % at d = 3072, p = 0.9).
    assert differential.laplace_linf(0.9, 3072) == pytest.approx(stats.norm.ppf(0.9) / math.sqrt(3072), rel=1e-3)


# --------------------------------------------------------------------------------------------
# ExpInf(k)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d,k", [(1, 2.0), (3, 0.5), (16, 2.0), (784, 10.0), (3072, 0.5)])
def test_expinf_phi_closed_form_matches_its_definition(d, k):
    for q in (1e-6, 0.01, 0.1, 0.3, 0.49):
        assert expinf_phi_closed_form(q, d, k) == pytest.approx(expinf_phi_by_definition(q, d, k), rel=1e-8), q


@pytest.mark.parametrize("k", [2.0, 0.5])
def test_expinf_phi_against_the_sampled_noise(k):
    """Phi(q) is the mean of the top q of Y = <grad psi(eps), 1> = k r^(k-1) sign(eps_j), j the
    coordinate on the face: from fastsmooth's own sampler (a Monte Carlo within 5 standard errors)."""
    d, n = 16, 40_000
    noise = ExpInf(k=k, scale=1.0)
    eps = draw_noise(noise, n, (d,), seed=3, image_index=0).double()
    r, face = eps.abs().max(dim=1)
    y = (k * r ** (k - 1) * eps[torch.arange(n), face].sign()).numpy()
    y.sort()
    for q in (0.05, 0.2, 0.45):
        top = y[-int(q * n):]
        estimate = top.sum() / n
        se = top.std() * math.sqrt(q / n) + abs(top.mean()) * math.sqrt(q * (1 - q) / n)
        assert abs(estimate - expinf_phi_closed_form(q, d, k)) < 5 * se, (q, estimate)


@pytest.mark.parametrize("k", [0.5, 1.5, 2.0, 10.0])
@pytest.mark.parametrize("d", [1, 2, 3, 784, 3072, 150528])
def test_expinf_linf_against_quadrature(d, k):
    """A lower bound within 1e-5 of the quadrature, never above it."""
    for p in P_GRID:
        got, ref = differential.expinf_linf(p, d, k), expinf_linf_reference(p, d, k)
        assert ref * (1 - 1e-5) <= got <= ref * (1 + 1e-10), (d, k, p, got, ref)


@pytest.mark.parametrize("a", [1.0e6, 4.0e6])
def test_lower_gamma_beyond_scipys_shapes(a):
    """Past shape 3e5 SciPy's far lower tail is off (1e-3 at 4e6); differential.lower_gamma sums
    the series there itself: against mpmath's series at 40 digits, on both sides of the switch."""
    s = math.sqrt(a)
    t = np.array([a - 8.2 * s, a - 6 * s, a - 4.2 * s, a - 3.9 * s, a - 2 * s, a - 0.5 * s])
    got = differential.lower_gamma(a, t)
    for value, x in zip(got, t):
        exact = float(_mp_lower_gamma(a, x))
        assert abs(value - exact) <= differential.MARGIN / 100 * exact, (a, (a - x) / s)


def test_expinf_linf_at_shapes_beyond_scipy():
    """k < 1 at d/k > 3e5 (the series' domain): a bracketed table, and l_inf above the l1 conversion
    by the differential method's usual factor (about 2 at p = 0.9); beyond d/k = 1e8, none."""
    for d, k in ((150528, 0.1), (3 * 1024 * 1024, 0.5)):
        table = differential._expinf_table(d, k)
        for p in (0.51, 0.9, 0.9999, 1 - 1e-12):
            assert table.lower(1 - p) <= table.upper(1 - p) <= table.lower(1 - p) * (1 + 1e-5)
        noise = ExpInf(k=k, scale=1.0)
        assert 1.9 < noise.radius(0.9, "linf", d) / (noise.radius(0.9, "l1", d) / d) < 2.1
    assert differential.expinf_linf(0.9, 150528, 0.0015) is None


@pytest.mark.parametrize("k", [1.5, 2.0, 10.0])
def test_expinf_linf_in_one_dimension_is_the_quantile(k):
    """d = 1, k >= 1: the density exp(-|x|^k) is log-concave, the worst sets are half-lines and the
    differential method is exact: R = the generalized normal's quantile (scipy.stats.gennorm)."""
    for p in (0.6, 0.9, 0.999):
        exact = stats.gennorm(k).ppf(p)
        got = differential.expinf_linf(p, 1, k)
        assert exact * (1 - 1e-5) <= got <= exact, (p, got, exact)


def test_expinf_table_brackets_and_is_continuous():
    table = differential._expinf_table(784, 2.0)
    for j in (1, 10, 100, 500, 3000):  # across a grid point: no jump, lower <= upper
        q = float(table.q[j])
        step = 1e-6 * float(table.q[j - 1] - table.q[j])
        a, b = table.lower(q + step), table.lower(q - step)
        assert a <= b <= a + 2 * step * float(table.f[j + 1]) / table.unit
        assert table.lower(q) <= table.upper(q) <= table.lower(q) * (1 + 1e-5)


# --------------------------------------------------------------------------------------------
# Acceptance: >= 98 % of the differential method's exact value on the grid, never above
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise_kind", ["laplace", "expinf1", "expinf2", "expinf10"])
@pytest.mark.parametrize("d", [784, 3072, 150528])
def test_acceptance_grid(noise_kind, d):
    for sigma in (0.25, 0.5, 1.0):
        if noise_kind == "laplace":
            noise, exact = Laplace(sigma=sigma), laplace_linf_reference
        else:
            k = float(noise_kind[len("expinf"):])
            noise = ExpInf(k=k, sigma=sigma)
            exact = ((lambda p, d: math.log(1 / (2 * (1 - p)))) if k == 1
                     else (lambda p, d, k=k: expinf_linf_reference(p, d, k)))
        lam = noise.scale_for(d)
        for p in ACCEPTANCE_P:
            ratio = noise.radius(p, "linf", d) / (lam * exact(p, d))
            assert 0.98 <= ratio <= 1 + 1e-10, (noise, d, p, ratio)


@pytest.mark.parametrize("noise", [Laplace(sigma=0.5), ExpInf(k=2, sigma=0.5), ExpInf(k=0.5, sigma=0.5),
                                   ExpInf(k=10, sigma=0.5)], ids=repr)
@pytest.mark.parametrize("d", [3, 784])
def test_linf_monotone_in_p_and_sigma(noise, d):
    ps = np.concatenate([np.linspace(0.5, 0.9999, 400)[1:], 1 - np.geomspace(0.9e-4, 1e-12, 50)])
    radii = [noise.radius(float(p), "linf", d) for p in ps]
    assert all(b > a for a, b in zip(radii, radii[1:]))
    fine = 0.9 + np.arange(2000) * 1e-7  # many points within one grid cell and across cells
    radii = [noise.radius(float(p), "linf", d) for p in fine]
    assert all(b >= a for a, b in zip(radii, radii[1:]))
    bigger = type(noise)(**{**{k: v for k, v in noise.spec().items() if k != "name"}, "sigma": 0.7})
    for p in (0.51, 0.9, 0.999):
        assert bigger.radius(p, "linf", d) == pytest.approx(noise.radius(p, "linf", d) * 0.7 / 0.5, rel=1e-12)
        assert bigger.radius(p, "linf", d) > noise.radius(p, "linf", d)


def test_laplace_phi_reference_is_the_top_q_mean():
    """The reference's Phi by brute force over atoms, against one more way: d = 3, Y in {3, 1, -1, -3}
    w.p. 1/8, 3/8, 3/8, 1/8."""
    assert laplace_phi(0.1, 3) == pytest.approx(0.3)
    assert laplace_phi(0.125, 3) == pytest.approx(0.375)
    assert laplace_phi(0.5, 3) == pytest.approx(3 / 8 + 3 / 8)
