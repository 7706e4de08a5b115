"""Noise distributions: parameters and certified radii.

Pure module: no device, no I/O, no model. How noise is drawn (one counter-based Philox stream on
every backend, float mode and grid mode) is kernels/samplers.py, with its tau. DESIGN.md §3 is the
specification; every formula below cites the row of its table. Conventions:

* ``sigma`` is the per-coordinate RMS, sqrt(E||eps||_2^2 / d) (the rs4a convention), so noises are
  comparable at equal variance; ``scale`` is lambda in the density. Exactly one of them is given.
* ``d`` is the number of input elements (C*H*W).
* Radii take ``p_lower``, the lower confidence bound on p_A, and return 0.0 when p_lower <= 1/2;
  ``p_for_radius`` is their inverse. The numerical certificates (l_inf of Laplace and ExpInf(k)) live
  in ``differential.py``.
"""

from __future__ import annotations

import math
from typing import Optional

from scipy.special import poch
from scipy.stats import norm as _std_normal

from . import differential
from .checks import NORMS, check_dim, check_norm, positive_float  # noqa: F401  (NORMS: noises.NORMS)

_NORM_EXPONENT = {"l1": 1.0, "l2": 2.0, "linf": math.inf}


def convert_radius(radius: float, src: str, dst: str, dim: int) -> float:
    """Sound conversion of a certified radius from norm ``src`` to norm ``dst`` in R^dim (§3).

    ||v||_b <= ||v||_a when b > a, so a ball in a lower-index norm b < a sits inside the a-ball of the
    same radius; and ||v||_a <= d^(1/a - 1/b) ||v||_b when b > a, so the b-radius is R_a / d^(1/a-1/b).
    """
    a, b = _NORM_EXPONENT[src], _NORM_EXPONENT[dst]
    if b <= a:
        return radius
    return radius / dim ** (1.0 / a - 1.0 / b)


def needed_radius(radius: float, src: str, dst: str, dim: int) -> float:
    """The radius in norm ``src`` that ``convert_radius`` turns into ``radius`` in norm ``dst``."""
    a, b = _NORM_EXPONENT[src], _NORM_EXPONENT[dst]
    if b <= a:
        return radius
    return radius * dim ** (1.0 / a - 1.0 / b)


def _smallest_p(certifies, start: Optional[float] = None, walk: bool = False) -> float:
    """The smallest double p in (1/2, 1] with certifies(p), for a predicate that is False, then True
    as p grows (radius(p) >= r is: radii are nondecreasing in p); math.inf when certifies(1.0) is False.

    Keeps certifies(hi) True and certifies(lo) False, and returns hi once lo and hi are adjacent
    doubles. ``start`` (a p near the answer) narrows the bracket; with ``walk`` (a closed form,
    right up to rounding) the doubles next to it are probed first, then it bisects.
    """
    if not certifies(1.0):
        return math.inf
    lo, hi = 0.5, 1.0  # certifies(0.5) is False: radius(1/2) = 0 < r
    if start is not None and lo < start < hi:
        if certifies(start):
            hi = start
        else:
            lo = start
        for _ in range(16 if walk else 0):
            if math.nextafter(lo, 2.0) >= hi:
                return hi
            probe = math.nextafter(hi, 0.0) if hi == start else math.nextafter(lo, 2.0)
            if certifies(probe):
                hi = probe
            else:
                lo = probe
            start = probe
    while True:
        mid = lo + (hi - lo) / 2.0
        if mid <= lo or mid >= hi:
            return hi
        if certifies(mid):
            hi = mid
        else:
            lo = mid


def _log_inv_2q(p: float) -> float:
    """log(1 / (2 (1 - p))), the Laplace-type radius factor; +inf at p = 1 (math.log(0) would raise)."""
    return math.inf if p >= 1.0 else -math.log(2.0 * (1.0 - p))


class Noise:
    """A zero-mean noise with density exp(-phi(x / lambda)); subclasses give the §3 formulas."""

    name: str = ""
    default_norm: str = "l1"

    def __init__(self, *, sigma: Optional[float] = None, scale: Optional[float] = None):
        if (sigma is None) == (scale is None):
            raise ValueError(f"{type(self).__name__}: give exactly one of sigma= or scale=")
        which = "sigma" if sigma is not None else "scale"
        value = positive_float(sigma if sigma is not None else scale, f"{type(self).__name__}: {which}")
        self.sigma = value if sigma is not None else None
        self.scale = value if scale is not None else None

    # -- parameters -------------------------------------------------------------------------
    def _sigma_over_scale(self, dim: int) -> float:
        """sigma / lambda for inputs of ``dim`` elements (the §3 'sigma in terms of lambda' column)."""
        raise NotImplementedError

    def scale_for(self, dim: int) -> float:
        """lambda for inputs of ``dim`` elements."""
        dim = check_dim(dim)
        return self.scale if self.scale is not None else self.sigma / self._sigma_over_scale(dim)

    def sigma_for(self, dim: int) -> float:
        """Per-coordinate RMS for inputs of ``dim`` elements."""
        dim = check_dim(dim)
        return self.sigma if self.sigma is not None else self.scale * self._sigma_over_scale(dim)

    def spec(self) -> dict:
        """A JSON-able description; ``make_noise(**spec)`` rebuilds the same noise."""
        spec = {"name": self.name}
        if self.sigma is not None:
            spec["sigma"] = self.sigma
        else:
            spec["scale"] = self.scale
        return spec

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.spec().items() if k != "name")
        return f"{type(self).__name__}({params})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Noise) and self.spec() == other.spec()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.spec().items())))

    # -- certificates -----------------------------------------------------------------------
    def _direct_radii(self, p_lower: float, lam: float, dim: int) -> dict:
        """{norm: radius} for the norms this noise certifies directly (p_lower > 1/2)."""
        raise NotImplementedError

    def _direct_p(self, norm: str, radius: float, lam: float, dim: int) -> Optional[float]:
        """The p at which the direct certificate in ``norm`` reaches ``radius``, in closed form
        (> 1 when it never does), or None where there is no closed form (``p_for_radius`` bisects)."""
        return None

    def radius(self, p_lower: float, norm: Optional[str], dim: int) -> float:
        """Certified radius in ``norm`` (None: the noise's own) for inputs of ``dim`` elements.

        ``dim`` has no default on purpose: the l2 and l_inf conversions depend on it.

        The largest over this noise's direct certificates, each moved to ``norm`` by the sound
        conversion of ``convert_radius``. 0.0 when p_lower <= 1/2 (no certificate).
        """
        norm = check_norm(norm or self.default_norm)
        dim = check_dim(dim)
        p = float(p_lower)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p_lower must lie in [0, 1], got {p_lower!r}")
        if p <= 0.5:
            return 0.0
        direct = self._direct_radii(p, self.scale_for(dim), dim)
        return max(convert_radius(r, src, norm, dim) for src, r in direct.items())

    def p_for_radius(self, radius: float, norm: Optional[str], dim: int) -> float:
        """The smallest p_lower that certifies ``radius`` in ``norm`` (None: the noise's own) for
        inputs of ``dim`` elements: the inverse of ``radius``, which a sequential test aims at (§3).

        Through the same conversions as ``radius`` (the largest over the direct certificates), so
        radius(p, norm, dim) >= ``radius`` exactly when p >= the answer: the answer p is the smallest
        double with radius(p) >= ``radius``, checked on ``radius`` itself (closed forms only guess
        it; a bisection between doubles does the rest), never one below it: erring high is safe.
        ``radius`` 0 gives 0.5 (CERTIFY certifies radius 0 at any p_lower > 1/2); a radius that no
        p_lower <= 1 certifies gives math.inf.
        """
        norm = check_norm(norm or self.default_norm)
        dim = check_dim(dim)
        try:
            r = float(radius)
        except (TypeError, ValueError):
            raise ValueError(f"radius must be a number >= 0, got {radius!r}") from None
        if not r >= 0.0:  # also NaN
            raise ValueError(f"radius must be a number >= 0, got {radius!r}")
        if r == 0.0:
            return 0.5
        lam = self.scale_for(dim)
        guesses = [self._direct_p(src, needed_radius(r, src, norm, dim), lam, dim)
                   for src in self._direct_radii(0.75, lam, dim)]
        closed = [g for g in guesses if g is not None]
        # With a closed form for every direct certificate their minimum is the answer up to
        # rounding; otherwise it is only an upper end for the bisection.
        start = min(closed) if closed else None
        return _smallest_p(lambda p: self.radius(p, norm, dim) >= r, start, walk=len(closed) == len(guesses))


class Gaussian(Noise):
    """p(x) ∝ exp(-||x||_2^2 / (2 lambda^2)); sigma = lambda (Cohen et al. 2019)."""

    name = "gaussian"
    default_norm = "l2"

    def _sigma_over_scale(self, dim):
        return 1.0

    def _direct_radii(self, p, lam, dim):
        # Cohen et al. 2019, Theorem 1: R_2 = sigma * Phi^-1(p_A). Exact for l_inf too: the
        # differential method's worst direction (1, ..., 1) / sqrt(d) gives l2 / sqrt(d).
        return {"l2": lam * float(_std_normal.ppf(p))}

    def _direct_p(self, norm, radius, lam, dim):
        return float(_std_normal.cdf(radius / lam))


class Laplace(Noise):
    """p(x) ∝ exp(-||x||_1 / lambda); sigma = sqrt(2) lambda."""

    name = "laplace"
    default_norm = "l1"

    def _sigma_over_scale(self, dim):
        return math.sqrt(2.0)

    def _direct_radii(self, p, lam, dim):
        # l1: Teng et al. 2020 / Yang et al. 2020 (rs4a): R_1 = -lambda log(2(1 - p_A)), exact.
        # l_inf: Yang et al. 2020's differential method, evaluated exactly (differential.py).
        return {"l1": lam * _log_inv_2q(p), "linf": lam * differential.laplace_linf(p, dim)}

    def _direct_p(self, norm, radius, lam, dim):
        if norm == "l1":
            return 1.0 - 0.5 * math.exp(-radius / lam)
        return None


class Uniform(Noise):
    """Uniform on [-lambda, lambda]^d; sigma = lambda / sqrt(3)."""

    name = "uniform"
    default_norm = "l1"

    def _sigma_over_scale(self, dim):
        return 1.0 / math.sqrt(3.0)

    def _direct_radii(self, p, lam, dim):
        # Yang et al. 2020 (rs4a), uniform noise: R_1 = 2 lambda (p - 1/2);
        # R_inf = 2 lambda (1 - (3/2 - p)^(1/d)), written with expm1/log1p for large d.
        return {
            "l1": 2.0 * lam * (p - 0.5),
            "linf": -2.0 * lam * math.expm1(math.log1p(0.5 - p) / dim),
        }

    def _direct_p(self, norm, radius, lam, dim):
        x = radius / (2.0 * lam)
        if norm == "l1":
            return 0.5 + x
        return 1.5 - math.exp(dim * math.log1p(-x)) if x < 1.0 else math.inf


class ExpInf(Noise):
    """p(x) ∝ exp(-(||x||_inf / lambda)^k), k > 0 (Yang et al. 2020, rs4a).

    sigma = lambda sqrt((d+2)/(3d) * Gamma((d+2)/k) / Gamma(d/k)), from E[x_i^2] = E[r^2](d+2)/(3d)
    with (r/lambda)^k ~ Gamma(d/k, 1).
    """

    name = "expinf"
    default_norm = "l1"

    def __init__(self, k: float = 1.0, *, sigma: Optional[float] = None, scale: Optional[float] = None):
        k = positive_float(k, "ExpInf: k")
        super().__init__(sigma=sigma, scale=scale)
        self.k = k

    def spec(self):
        return {**super().spec(), "k": self.k}

    def _sigma_over_scale(self, dim):
        k = self.k
        log_ratio = math.lgamma((dim + 2) / k) - math.lgamma(dim / k)
        return math.sqrt((dim + 2) / (3.0 * dim) * math.exp(log_ratio))

    def _l1_slope(self, lam: float, dim: int) -> float:
        """R_1 / (p - 1/2) = 2 lambda d/(d-1) Gamma(d/k)/Gamma((d-1)/k), d >= 2; the Gamma ratio as a
        Pochhammer symbol, accurate at large d/k where a difference of lgammas loses digits."""
        k = self.k
        slope = 2.0 * lam * dim / (dim - 1) * float(poch((dim - 1) / k, 1.0 / k))
        if not math.isfinite(slope):  # a radius of inf would claim every distance
            raise OverflowError(f"ExpInf(k={k}) at d={dim}: the l1 radius overflows a double")
        return slope

    def _direct_radii(self, p, lam, dim):
        k = self.k
        radii = {}
        if dim >= 2:
            # rs4a, Theorem (l_inf-ball-exponential noise, l1 radius): R_1 = slope (p - 1/2).
            radii["l1"] = self._l1_slope(lam, dim) * (p - 0.5)
        if k == 1.0:
            # k = 1 is an l_inf-norm Laplace-type density: R_inf = lambda log(1 / (2(1 - p))) (the
            # differential method's value too: there Phi(q) = q).
            radii["linf"] = lam * _log_inv_2q(p)
        else:
            # Yang et al. 2020's differential method, a guaranteed lower bound (differential.py);
            # None where it does not certify (k < 1 at d/k > 1e8): the l1 radius converts.
            linf = differential.expinf_linf(p, dim, k)
            if linf is not None:
                radii["linf"] = lam * linf
        if not radii:  # d = 1 without an l_inf table: no certificate here.
            radii["l1"] = 0.0
        return radii

    def _direct_p(self, norm, radius, lam, dim):
        if norm == "l1":
            return 0.5 + radius / self._l1_slope(lam, dim) if dim >= 2 else math.inf
        if self.k == 1.0:
            return 1.0 - 0.5 * math.exp(-radius / lam)
        return None


NOISES = {cls.name: cls for cls in (Gaussian, Laplace, Uniform, ExpInf)}


def make_noise(name: str, **params) -> Noise:
    """Build a noise by name: make_noise("laplace", sigma=0.5), make_noise("expinf", k=2, scale=1).

    ``params`` holds exactly one of sigma / scale (None values are ignored), and k for ExpInf only.
    """
    key = str(name).lower()
    if key not in NOISES:
        raise ValueError(f"unknown noise {name!r}; expected one of {', '.join(NOISES)}")
    params = {k: v for k, v in params.items() if v is not None}
    allowed = {"sigma", "scale"} | ({"k"} if key == "expinf" else set())
    extra = set(params) - allowed
    if extra:
        raise ValueError(f"noise {key!r} takes {sorted(allowed)}, not {sorted(extra)}")
    return NOISES[key](**params)
