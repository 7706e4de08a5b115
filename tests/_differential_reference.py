"""Independent references for the l_inf radii of Laplace and ExpInf(k) (Yang et al. 2020's
differential method), written without fastsmooth: Phi from its definition (the mean of the top q of
Y = <grad psi(eps), (1, ..., 1)>), and R = int_{1-p}^{1/2} dq / Phi(q) by scipy.integrate.quad.

fastsmooth.differential evaluates Laplace's integral piece by piece in closed form and bounds
ExpInf's by tangents; here Laplace's is a quadrature of 1/Phi between the atoms of Y, and ExpInf's a
quadrature in the Gamma variable t (dq = -g_a(t) dt / 2), whose closed-form Phi is itself checked
against a quadrature of its definition (``expinf_phi_by_definition``).
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import numpy as np
from scipy import integrate, special, stats


def _quad(*args, **kwargs) -> float:
    """scipy.integrate.quad's value. Its roundoff notices at epsrel = 1e-12 are expected here: the
    tests bracket fastsmooth's values with tolerances far above the integration error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        return integrate.quad(*args, **kwargs)[0]


# -- Laplace: Y = 2B - d, B ~ Binomial(d, 1/2) -------------------------------------------------
@lru_cache(maxsize=None)
def _laplace_atoms(d: int):
    """Atoms of Y from the largest down (enough of them: below 12 standard deviations nothing
    matters), with cumulative probability from the top and cumulative sum of y * P(y)."""
    sd = math.sqrt(d) / 2
    top = min(d, int(d / 2 + 12 * sd) + 1)
    b = np.arange(top, -1, -1)
    prob = stats.binom.pmf(b, d, 0.5)
    y = 2.0 * b - d
    return y, np.cumsum(prob), np.cumsum(y * prob)


def laplace_phi(q: float, d: int) -> float:
    """The mean of the top q of Y (its atoms taken whole from the top, the last one in part)."""
    y, cum, cum_y = _laplace_atoms(d)
    j = int(np.searchsorted(cum, q))  # atoms 0 .. j-1 fully inside
    inside = cum[j - 1] if j else 0.0
    return (cum_y[j - 1] if j else 0.0) + (q - inside) * y[j]


@lru_cache(maxsize=None)
def laplace_linf_reference(p: float, d: int) -> float:
    """R / lambda by quadrature of 1/Phi over each piece between consecutive atoms' tails."""
    q0 = 1.0 - p
    _, cum, _ = _laplace_atoms(d)
    cuts = [q0] + [c for c in cum if q0 < c < 0.5] + [0.5]
    return sum(_quad(lambda q: 1.0 / laplace_phi(q, d), lo, hi, epsabs=0, epsrel=1e-12, limit=200)
               for lo, hi in zip(cuts, cuts[1:]))


# -- ExpInf(k): Y = k r^(k-1) s, r^k ~ Gamma(d/k), s a fair sign --------------------------------
def expinf_phi_closed_form(q: float, d: int, k: float) -> float:
    a, b = d / k, (k - 1) / k
    c = math.exp(math.lgamma(a + b) - math.lgamma(a))
    if b > 0:
        return k / 2 * c * special.gammaincc(a + b, special.gammainccinv(a, 2 * q))
    return k / 2 * c * special.gammainc(a + b, special.gammaincinv(a, 2 * q))


def expinf_phi_by_definition(q: float, d: int, k: float) -> float:
    """(1/2) E[k r^(k-1); r in the part of its law that makes Y largest, of probability 2q]: a
    quadrature of k s^((k-1)/k) against the Gamma(d/k) density of s = r^k."""
    a, b = d / k, (k - 1) / k
    law = stats.gamma(a)
    integrand = lambda s: k * s ** b * law.pdf(s)  # noqa: E731
    if b > 0:
        lo, hi = law.isf(2 * q), np.inf
    else:
        lo, hi = 0.0, law.ppf(2 * q)
    mid = min(max(a, lo), hi)
    pieces = [(lo, mid), (mid, hi)] if lo < mid < hi else [(lo, hi)]
    return 0.5 * sum(_quad(integrand, x, y, epsabs=0, epsrel=1e-12, limit=400) for x, y in pieces)


@lru_cache(maxsize=None)
def expinf_linf_reference(p: float, d: int, k: float) -> float:
    """R / lambda = int dq / Phi(q), in the Gamma variable t: int g_a(t) / (k c tail(a + b, t)) dt."""
    a, b = d / k, (k - 1) / k
    c = math.exp(math.lgamma(a + b) - math.lgamma(a))
    q0 = 1.0 - p
    if a < 1:  # the Gamma density is singular at 0: integrate in q instead
        return _quad(lambda q: 1.0 / expinf_phi_closed_form(q, d, k), q0, 0.5, epsabs=0, epsrel=1e-12,
                              limit=2000, points=[min(0.4, 2 * q0), min(0.45, 10 * q0)])
    pdf = stats.gamma(a).pdf
    if b > 0:
        lo, hi = 0.0, special.gammainccinv(a, 2 * q0)
        integrand = lambda t: pdf(t) / (k * c * special.gammaincc(a + b, t))  # noqa: E731
    else:
        lo, hi = special.gammaincinv(a, 2 * q0), np.inf
        integrand = lambda t: pdf(t) / (k * c * special.gammainc(a + b, t))  # noqa: E731
    s = math.sqrt(a)
    cuts = [lo] + sorted(x for x in (a - 10 * s, a - 3 * s, a, a + 3 * s, a + 10 * s) if lo < x < hi) + [hi]
    return sum(_quad(integrand, x, y, epsabs=0, epsrel=1e-12, limit=500) for x, y in zip(cuts, cuts[1:]))
