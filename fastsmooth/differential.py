"""l_inf radii of Laplace and ExpInf(k) noise by the differential method (Yang et al. 2020), as
guaranteed lower bounds. Pure: numbers in, numbers out; tables are built on first use and cached.

The differential method (Yang, Duan, Hu, Salman, Razenshteyn & Li, "Randomized Smoothing of All
Shapes and Sizes", ICML 2020, §4 and Appendix): for a noise with density exp(-psi(x)) and a unit
vector v of the norm, shifting any set U by t v changes its measure at rate
int_U <grad psi, v> q, at most Phi_v(q(U)) = the mean of Y_v = <grad psi(eps), v> over its top
q(U) fraction (Neyman-Pearson). With Phi(q) = sup_v Phi_v(q), the probability of the other classes
climbs from 1 - p_A to 1/2 along any path no faster than Phi allows, so

    R = lambda * int_{1 - p_A}^{1/2} dq / Phi(q)                       (lambda = 1 inside Phi)

is a certified radius. For l_inf, Phi_v is convex in v, so the sup over the cube is at a vertex,
and by the symmetry of both noises every vertex gives the same value: v = (1, ..., 1).

* Laplace, psi = ||x||_1: Y = sum_i sign(eps_i) = 2B - d with B ~ Binomial(d, 1/2). Phi is
  piecewise linear (a top-q mean of a lattice variable), so the integral is a finite sum of
  logarithms: evaluated exactly, no quadrature.
* ExpInf(k), psi = ||x||_inf^k: Y = k r^(k-1) s, r = ||eps||_inf with r^k ~ Gamma(a = d/k), s a
  fair sign. With b = (k - 1)/k and t the Gamma(a) quantile that cuts the top 2q of r^(k-1):
      Phi(q) = (k/2) Gamma(a+b)/Gamma(a) Q(a+b, t),  q = Q(a, t)/2     (k > 1: upper tails Q)
      Phi(q) = (k/2) Gamma(a+b)/Gamma(a) P(a+b, t),  q = P(a, t)/2     (k < 1: lower tails P)
  and Phi'(q) = k t^b (the quantile of Y at 1 - q). k = 1 gives Phi(q) = q: the closed form
  lambda log(1 / (2(1 - p_A))), which noises.py keeps.

Their level-set method (Neyman-Pearson for one fixed perturbation) is exact along that perturbation,
so it certifies a ball only where the worst perturbation of the ball is known: for the Gaussian
(l2), Uniform (l1, l_inf) and Laplace (l1), whose closed forms in noises.py are those exact values.
For Laplace and ExpInf in l_inf no worst perturbation is proven (the cube's vertex (R, ..., R) is
the differential method's direction, not a proven minimizer of the Neyman-Pearson bound), so the
differential method is the certificate there.

Soundness of the numbers. Phi is concave on (0, 1/2] (its derivative, a quantile of Y, decreases), so
f = 1/Phi is convex and decreasing there. On a grid of points (q_j, f_j, f'_j) every tangent of f
lies below f, so the integral of the upper envelope of the two tangents at an interval's ends is a
lower bound of the integral of f over it (the error is O(h^2) where the grid's ratio is e^-h); the
chord above f gives the matching upper bound, which ``ExpInfTable`` keeps to state the accuracy:
with h = 0.005 (and a finer grid in 1/2 - q near 1/2) the lower bound is within 1e-5 of the exact
integral (relative; 6e-6 the worst measured over d = 1 ... 150528, k = 0.5 ... 100).
The grid points are computed from the forward functions at a chosen t (the inverse only places
them), so each is a point of the true curve up to the special functions' rounding: SciPy's upper
incomplete gamma (shapes up to 3e7), its lower one (up to 3.1e5; this module's series beyond),
the Pochhammer ratio and the binomial tails (d up to 3e6) were measured against mpmath at 40
digits to <= 5e-12 relative over the tails used here (tests/test_differential.py repeats the
check). Every radius is multiplied by 1 - MARGIN to cover that rounding with a factor of 200 to
spare. SciPy's lower incomplete gamma loses accuracy in the far tail beyond shape 3e5 (8e-11
relative error at 4e5, 1e-6 at 1e6, 1e-3 at 4e6, measured), so ``lower_gamma`` sums the power
series there itself (1e-12). Only ExpInf with k < 1 and d/k > 1e8 has no l_inf table (None):
noises.py then converts the l1 radius.
"""

from __future__ import annotations

import bisect
import math
from functools import lru_cache
from typing import Optional

import numpy as np
from scipy import special, stats

MARGIN = 1e-9          # relative; covers the rounding of the special functions (<= 5e-12 measured)
GRID_RATIO_LOG = 0.005  # ExpInf grid: q_j = 1/2 e^(-j h), h = GRID_RATIO_LOG
NEAR_HALF_RATIO_LOG, NEAR_HALF_POINTS = 0.25, 80  # 1/2 - q from h/2 down to h/2 e^-20
Q_MIN = 2.0 ** -54      # the grids reach below 1 - p for every double p < 1 (the gap is 2^-53)
LOWER_TAIL_MAX_SHAPE = 3.1e5  # largest Gamma shape at which SciPy's lower incomplete gamma is trusted
SERIES_Z = 4.0          # beyond it, tails more than 4 standard deviations below the mean use the series
SERIES_MAX_SHAPE = 1e8  # the series' cost grows as sqrt(shape): above this, no ExpInf(k < 1) table
CACHE_SIZE = 16         # tables kept per kind: (d) for Laplace, (d, k) for ExpInf (~1.3 MB each)


def laplace_linf(p_lower: float, dim: int) -> float:
    """l_inf radius of Laplace noise of scale lambda = 1, for p_lower in [1/2, 1] (multiply by lambda).

    Exact differential-method value (a finite sum of closed-form pieces) times 1 - MARGIN. About
    lambda Phi^-1(p) / sqrt(d) for large d; that CLT value is no certificate (it exceeds this one at
    small d), and rs4a's default "approx" mode returns it.
    """
    return _laplace_table(int(dim)).radius(1.0 - p_lower) * (1.0 - MARGIN)


def expinf_linf(p_lower: float, dim: int, k: float) -> Optional[float]:
    """l_inf radius of ExpInf(k) noise of scale lambda = 1 (multiply by lambda), k != 1.

    A lower bound within 1e-5 (relative) of the differential method's exact value, times
    1 - MARGIN; None where this module does not certify (k < 1 with d/k > 1e8, see the module
    docstring).
    """
    table = _expinf_table(int(dim), float(k))
    if table is None:
        return None
    return table.lower(1.0 - p_lower) * (1.0 - MARGIN)


# ----------------------------------------------------------------------------------------------
# Laplace: Phi is the top-q mean of Y = 2B - d, piecewise linear in q.
# ----------------------------------------------------------------------------------------------
class LaplaceTable:
    """Pieces of Phi on (0, 1/2] for Binomial(d, 1/2), from the median atom outwards.

    Piece i belongs to the atom B = m_i: on q in [lo_i, hi_i] = [S(m+1), min(S(m), 1/2)], with
    S(m) = P(B >= m), the top-q set holds every atom above m and part of atom m, so
    Phi(q) = g_i + s_i (q - lo_i) with slope s_i = 2 m - d and g_i = Phi(S(m+1)) = (d/2) P(B' = m),
    B' ~ Binomial(d - 1, 1/2) (from E[B; B >= m+1] = (d/2) P(B' >= m)). Each piece integrates in
    closed form: int dq / (g + s (q - lo)) = log1p(s (hi - q) / (g + s (q - lo))) / s.
    """

    def __init__(self, dim: int):
        d = dim
        m0 = (d + 1) // 2  # the atom whose piece holds q = 1/2 (slope 0 for even d, 1 for odd d)
        reach = int(d / 2 + 8.5 * math.sqrt(d) / 2) + 2  # S(m) < 2^-54 past 8.3 standard deviations
        m = np.arange(m0, min(d, reach) + 1, dtype=np.float64)
        self.lo = stats.binom.sf(m, d, 0.5)                    # S(m + 1)
        self.hi = np.minimum(stats.binom.sf(m - 1, d, 0.5), 0.5)  # S(m), the first one cut at 1/2
        self.g = d / 2.0 * (stats.binom.pmf(m, d - 1, 0.5) if d > 1 else (m == 0).astype(np.float64))
        self.s = 2.0 * m - d
        full = np.array([self._piece(i, self.lo[i]) for i in range(len(m))])
        self.cumulative = np.concatenate([[0.0], np.cumsum(full)])  # radius at q = hi_i
        self._neg_lo = (-self.lo).tolist()  # increasing: bisect finds the piece of a q

    def _piece(self, i: int, q: float) -> float:
        """int_q^{hi_i} dq' / Phi(q') for q in piece i."""
        g, s, lo, hi = self.g[i], self.s[i], self.lo[i], self.hi[i]
        base = g + s * (q - lo)
        if base <= 0.0:  # the last atom (B = d) with q = 0: Phi(q) = d q, the integral diverges
            return math.inf
        if s == 0.0:
            return float((hi - q) / g)
        return float(math.log1p(s * (hi - q) / base) / s)

    def radius(self, q0: float) -> float:
        """int_{q0}^{1/2} dq / Phi(q) for q0 in [0, 1/2]; below the table, its last value (a lower bound)."""
        if q0 >= 0.5:
            return 0.0
        i = bisect.bisect_left(self._neg_lo, -q0)  # the first piece with lo_i <= q0
        if i == len(self._neg_lo):
            return float(self.cumulative[-1])
        return float(self.cumulative[i]) + self._piece(i, q0)


@lru_cache(maxsize=CACHE_SIZE)
def _laplace_table(dim: int) -> LaplaceTable:
    return LaplaceTable(dim)


# ----------------------------------------------------------------------------------------------
# ExpInf(k): f = 1/Phi on a geometric grid, integrated under the envelope of its tangents.
# ----------------------------------------------------------------------------------------------
class ExpInfTable:
    """Points (q_j, f_j = 1/phi(q_j), f'_j) for q_j from 1/2 down to Q_MIN, and for each interval
    [q_{j+1}, q_j] the integral of max(T_j, T_{j+1}) (T the tangents: a lower bound, f convex) and
    of the chord (an upper bound), accumulated from q = 1/2. In units of ``unit`` = k c / 2
    (c = Gamma(a + b) / Gamma(a)): phi = Phi / unit is a tail probability, which keeps the numbers
    far from overflow for any k (c spans a^b)."""

    def __init__(self, dim: int, k: float):
        a, b = dim / k, (k - 1.0) / k
        c = float(special.poch(a, b))  # Gamma(a + b) / Gamma(a), accurate for large a (unlike lgamma)
        if not 1e-300 < c < 1e300:
            raise OverflowError(f"ExpInf(k={k}) at d={dim}: Gamma(a + b) / Gamma(a) = {c} is out of range")
        self.unit = k * c / 2.0
        target = _expinf_grid()
        if b > 0:  # Y grows with r: its top 2q are the largest r, t an upper quantile of Gamma(a)
            t = special.gammainccinv(a, 2.0 * target)
            q, phi = special.gammaincc(a, t) / 2.0, special.gammaincc(a + b, t)
        else:      # k < 1: Y shrinks with r: the smallest r, t a lower quantile
            t = special.gammaincinv(a, 2.0 * target)
            q, phi = lower_gamma(a, t) / 2.0, lower_gamma(a + b, t)
        with np.errstate(over="ignore", divide="ignore"):
            dphi = 2.0 * t ** b / c  # Phi'(q) = k t^b, over unit
        # q = 1/2: Phi = E[Y; Y > 0] = unit, and Phi'(1/2-) = k t^b -> 0 (t -> 0 or t -> inf).
        q = np.concatenate([[0.5], q])
        phi = np.concatenate([[1.0], phi])
        dphi = np.concatenate([[0.0], dphi])
        # Points the floats cannot place (t underflows near q = 1/2 for tiny shapes) are dropped:
        # any subset of points of the curve gives a valid envelope, only a coarser one.
        keep = np.isfinite(phi) & np.isfinite(dphi) & (phi > 0) & (q > 0) & (q <= 0.5)
        q, phi, dphi = q[keep], phi[keep], dphi[keep]
        below_all_before = q < np.minimum.accumulate(np.concatenate([[np.inf], q[:-1]]))
        q, phi, dphi = q[below_all_before], phi[below_all_before], dphi[below_all_before]
        self.q = q
        self.f = 1.0 / phi
        self.df = -dphi / phi ** 2
        self._check_convex()
        ql, qr = q[1:], q[:-1]
        lower = self._envelope(ql, qr, np.arange(len(ql)))
        upper = (qr - ql) * (self.f[1:] + self.f[:-1]) / 2.0
        self.lower_cumulative = np.concatenate([[0.0], np.cumsum(lower)])
        self.upper_cumulative = np.concatenate([[0.0], np.cumsum(upper)])
        self._neg_q = (-q).tolist()
        # Python floats for the one-point queries (numpy scalars cost ~1 us an operation)
        self._q, self._f, self._df = q.tolist(), self.f.tolist(), self.df.tolist()
        self._lower_cum = self.lower_cumulative.tolist()

    def _check_convex(self) -> None:
        """Each tangent below its neighbour's point: f convex on the data, else the bound is void."""
        f, df, q = self.f, self.df, self.q
        right = f[:-1] + df[:-1] * (q[1:] - q[:-1])   # tangent at q_j, at q_{j+1}
        left = f[1:] + df[1:] * (q[:-1] - q[1:])      # tangent at q_{j+1}, at q_j
        slack = 1e-10 * np.maximum(f[1:], f[:-1])
        if np.any(right > f[1:] + slack) or np.any(left > f[:-1] + slack):
            raise ArithmeticError("ExpInf l_inf table: 1/Phi is not convex on the computed points")

    def _envelope(self, q_from, q_to, j):
        """int_{q_from}^{q_to} max(T_j, T_{j+1}) over [q_{j+1}, q_j] for q_{j+1} <= q_from <= q_to = q_j."""
        q_hi, f_hi, d_hi = self.q[j], self.f[j], self.df[j]
        q_lo, f_lo, d_lo = self.q[j + 1], self.f[j + 1], self.df[j + 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            cross = (f_hi - f_lo + d_lo * q_lo - d_hi * q_hi) / (d_lo - d_hi)  # where the tangents meet
        cross = np.where(np.isfinite(cross), np.clip(cross, q_lo, q_hi), q_lo)
        split = np.maximum(cross, q_from)

        def tangent_integral(q_anchor, f_anchor, d_anchor, x0, x1):  # int_{x0}^{x1} of the tangent
            return (x1 - x0) * (f_anchor + d_anchor * ((x0 + x1) / 2.0 - q_anchor))

        left = np.where(split > q_from, tangent_integral(q_lo, f_lo, d_lo, q_from, split), 0.0)
        return left + tangent_integral(q_hi, f_hi, d_hi, split, q_to)

    def _locate(self, q0: float) -> int:
        """The last j with q_j >= q0 (len(q) - 1 when q0 is at or below the table's end)."""
        return bisect.bisect_right(self._neg_q, -q0) - 1

    def lower(self, q0: float) -> float:
        """A lower bound on int_{q0}^{1/2} dq / Phi(q); below the table, the table's total."""
        if q0 >= 0.5:
            return 0.0
        j = self._locate(q0)
        if j >= len(self._q) - 1:
            return self._lower_cum[-1] / self.unit
        # _envelope for one point, in Python floats: T_{j+1} left of where the tangents cross, T_j right.
        q_hi, f_hi, d_hi = self._q[j], self._f[j], self._df[j]
        q_lo, f_lo, d_lo = self._q[j + 1], self._f[j + 1], self._df[j + 1]
        cross = q_lo
        if d_lo != d_hi:
            cross = min(max((f_hi - f_lo + d_lo * q_lo - d_hi * q_hi) / (d_lo - d_hi), q_lo), q_hi)
        split = max(cross, q0)
        part = (q_hi - split) * (f_hi + d_hi * ((split + q_hi) / 2.0 - q_hi))
        if split > q0:
            part += (split - q0) * (f_lo + d_lo * ((q0 + split) / 2.0 - q_lo))
        return (self._lower_cum[j] + part) / self.unit

    def upper(self, q0: float) -> float:
        """The chord bound on the same integral from above (for q0 >= the table's end): its accuracy."""
        if q0 >= 0.5:
            return 0.0
        j = self._locate(q0)
        if j >= len(self.q) - 1:
            return math.inf
        q_hi, q_lo = self.q[j], self.q[j + 1]
        f_q0 = self.f[j + 1] + (self.f[j] - self.f[j + 1]) * (q0 - q_lo) / (q_hi - q_lo)  # chord at q0
        return float(self.upper_cumulative[j] + (q_hi - q0) * (self.f[j] + f_q0) / 2.0) / self.unit


def _expinf_grid() -> np.ndarray:
    """q from 1/2 (excluded) down to Q_MIN: geometric with ratio e^-h towards 0, and geometric in
    1/2 - q towards 1/2, where Phi' rises from 0 to its bulk value (Phi is steepest in its shape)."""
    count = int(math.ceil(math.log(0.5 / Q_MIN) / GRID_RATIO_LOG))
    towards_zero = 0.5 * np.exp(-GRID_RATIO_LOG * np.arange(1, count + 1))
    towards_half = 0.5 - 0.5 * GRID_RATIO_LOG * np.exp(-NEAR_HALF_RATIO_LOG * np.arange(1, NEAR_HALF_POINTS + 1))
    return np.unique(np.concatenate([towards_zero, towards_half]))[::-1]


@lru_cache(maxsize=CACHE_SIZE)
def _expinf_table(dim: int, k: float) -> Optional[ExpInfTable]:
    if k < 1.0 and dim / k > SERIES_MAX_SHAPE:
        return None
    try:
        return ExpInfTable(dim, k)
    except OverflowError:  # extreme k: Gamma(a + b) / Gamma(a) is not a double
        return None


def lower_gamma(a: float, t: np.ndarray) -> np.ndarray:
    """The regularized lower incomplete gamma P(a, t), accurate in relative terms at every shape.

    SciPy's ``gammainc`` up to shape LOWER_TAIL_MAX_SHAPE, and beyond it within SERIES_Z standard
    deviations below the mean (its asymptotic branch there: <= 5e-15 measured up to shape 4e6).
    Further out SciPy stops its power series after 2000 terms (1e-6 relative error at shape 1e6,
    1e-3 at 4e6, measured), so the series is summed here to convergence (``_lower_gamma_series``).
    """
    t = np.asarray(t, dtype=np.float64)
    out = np.asarray(special.gammainc(a, t), dtype=np.float64)
    if a > LOWER_TAIL_MAX_SHAPE:
        far = t < a - SERIES_Z * math.sqrt(a)
        if far.any():
            out = out.copy()
            out[far] = _lower_gamma_series(a, t[far])
    return out


def _lower_gamma_series(a: float, t: np.ndarray) -> np.ndarray:
    """P(a, t) for 0 < t < a by P = t^a e^-t / Gamma(a+1) * sum_n t^n / ((a+1) ... (a+n)) (Abramowitz
    & Stegun 6.5.29; positive terms, summed until they fall below 1e-17 of the sum), with the log of
    the prefactor written as a (log(1+u) - u) - log(2 pi a)/2 - (1/(12a) - 1/(360a^3)), u = t/a - 1
    (Stirling's series for lgamma(a+1), its next term below 1e-19 at a > 3e5): the direct
    a log t - t - lgamma(a+1) cancels ~1e7-sized terms. 1e-12 relative error measured at 4e6."""
    u = t / a - 1.0
    log_prefactor = a * _log1p_minus(u) - 0.5 * math.log(2.0 * math.pi * a) - (1.0 / (12.0 * a) - 1.0 / (360.0 * a ** 3))
    total, term = np.ones_like(t), np.ones_like(t)
    live, tl = np.arange(t.size), t.copy()
    n = 0
    while live.size:
        n += 1
        term[live] *= tl / (a + n)
        total[live] += term[live]
        going = term[live] > 1e-17 * total[live]
        live, tl = live[going], tl[going]
    return np.exp(log_prefactor) * total


def _log1p_minus(u: np.ndarray) -> np.ndarray:
    """log(1 + u) - u without cancellation: its Taylor series -u^2/2 + u^3/3 - ... for |u| < 1/4."""
    out = np.log1p(u) - u
    small = np.abs(u) < 0.25
    if small.any():
        v = u[small]
        power, acc = v * v, np.zeros_like(v)
        for n in range(2, 40):  # |u|^40 / 40 < 1e-25
            acc += power / n if n % 2 else -power / n
            power = power * v
        out[small] = acc
    return out
