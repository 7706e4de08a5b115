"""Noise distributions: parameters, exact reference samplers (torch, float32), certified radii.

Pure module: no device, no I/O, no model. DESIGN.md §3 is the specification; every formula below
cites the row of its table. Conventions:

* ``sigma`` is the per-coordinate RMS, sqrt(E||eps||_2^2 / d) (the rs4a convention), so noises are
  comparable at equal variance; ``scale`` is lambda in the density. Exactly one of them is given.
* ``d`` is the number of input elements (C*H*W).
* Radii take ``p_lower``, the lower confidence bound on p_A, and return 0.0 when p_lower <= 1/2.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from scipy.stats import norm as _std_normal

from .checks import NORMS, check_dim, check_norm, positive_float

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

    # -- sampling ---------------------------------------------------------------------------
    def sample(self, shape, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Exact reference sampler: float32 tensor of ``shape`` = (copies, *input_shape), on the
        generator's device (CPU without one). Each copy (row) is an independent draw."""
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or min(shape) < 0:
            raise ValueError(f"shape must be (copies, *input_shape), got {shape}")
        dim = math.prod(shape[1:])
        device = generator.device if generator is not None else torch.device("cpu")
        return self._sample(shape, self.scale_for(max(dim, 1)), generator, device)

    def _sample(self, shape, lam: float, generator, device) -> torch.Tensor:
        raise NotImplementedError

    def tv_bound(self, dim: int) -> float:
        """tau: total-variation distance of one copy drawn by ``sample`` from the ideal law (DESIGN §5).

        Counted as in kernels/perturb.py: the ideal mass the sampler cannot reach because a uniform
        feeding an unbounded transform lives on a grid (its first cell is the ideal tail); a value
        moved within its grid cell is float rounding and is not counted. The uniforms that feed
        unbounded transforms have 40 (Gaussian radius), 62 (Laplace) or 53 (ExpInf's Gamma) bits,
        so tau is at most d/2 2^-40: 1.4e-9 for CIFAR, 6.8e-8 for ImageNet inputs.
        """
        return 0.0

    # -- certificates -----------------------------------------------------------------------
    def _direct_radii(self, p_lower: float, lam: float, dim: int) -> dict:
        """{norm: radius} for the norms this noise certifies directly (p_lower > 1/2)."""
        raise NotImplementedError

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


class Gaussian(Noise):
    """p(x) ∝ exp(-||x||_2^2 / (2 lambda^2)); sigma = lambda (Cohen et al. 2019)."""

    name = "gaussian"
    default_norm = "l2"

    def _sigma_over_scale(self, dim):
        return 1.0

    # Bits of each pair's 63-bit word (see random_words): the radius uniform takes the high ones.
    RADIUS_BITS, ANGLE_BITS = 40, 23

    def _sample(self, shape, lam, generator, device):
        # Box-Muller (Box & Muller 1958): z = r (cos t, sin t), r = sqrt(-2 log w), w ~ U(0, 1],
        # t ~ U[0, 2 pi), from one 63-bit word per pair (as many random bits as torch.randn takes).
        # w has 40 bits, so |z| reaches sqrt(2 * 40 log 2) = 7.45; float32 randn's 24-bit radius
        # uniform stops at 5.77 (tau = d/2 * 2^-24, 4.5e-3 per ImageNet copy).
        count = math.prod(shape)
        pairs = (count + 1) // 2
        words = random_words(pairs, generator, device)
        w = unit_interval(words >> self.ANGLE_BITS, self.RADIUS_BITS)
        radius = w.log_().mul_(-2.0 * lam * lam).sqrt_()
        angle = (words & (2 ** self.ANGLE_BITS - 1)).to(torch.float32).mul_(2 * math.pi * 2.0 ** -self.ANGLE_BITS)
        out = torch.empty(2 * pairs, device=device, dtype=torch.float32)
        torch.cos(angle, out=out[:pairs]).mul_(radius)
        torch.sin(angle, out=out[pairs:]).mul_(radius)
        return out[:count].view(shape)

    def tv_bound(self, dim):
        # The first 2^-40 cell of each pair's radius uniform: its ideal image is the tail |z| > 7.45.
        return (dim + 1) // 2 * 2.0 ** -self.RADIUS_BITS

    def _direct_radii(self, p, lam, dim):
        # Cohen et al. 2019, Theorem 1: R_2 = sigma * Phi^-1(p_A).
        return {"l2": lam * float(_std_normal.ppf(p))}


class Laplace(Noise):
    """p(x) ∝ exp(-||x||_1 / lambda); sigma = sqrt(2) lambda."""

    name = "laplace"
    default_norm = "l1"

    def _sigma_over_scale(self, dim):
        return math.sqrt(2.0)

    MAGNITUDE_BITS = 62  # of each coordinate's 63-bit word; the remaining bit is the sign

    def _sample(self, shape, lam, generator, device):
        # |l| ~ Exp(1) as -log w, w ~ U(0, 1] (never infinite, DESIGN §5), times a fair sign; one
        # 63-bit word per coordinate. w has 62 bits, so |l| reaches 62 log 2 = 43.0 (float32 rand: 16.6).
        words = random_words(math.prod(shape), generator, device)
        magnitude = unit_interval(words >> 1, self.MAGNITUDE_BITS).log_().mul_(-lam)
        sign = (words & 1).to(torch.float32).mul_(2.0).sub_(1.0)
        return magnitude.mul_(sign).view(shape)

    def tv_bound(self, dim):
        # The first 2^-62 cell of every coordinate's uniform: its ideal image is the tail beyond 43.0.
        return dim * 2.0 ** -self.MAGNITUDE_BITS

    def _direct_radii(self, p, lam, dim):
        # Teng et al. 2020 / Yang et al. 2020 (rs4a): R_1 = -lambda log(2(1 - p_A)).
        return {"l1": lam * _log_inv_2q(p)}


class Uniform(Noise):
    """Uniform on [-lambda, lambda]^d; sigma = lambda / sqrt(3)."""

    name = "uniform"
    default_norm = "l1"

    def _sigma_over_scale(self, dim):
        return 1.0 / math.sqrt(3.0)

    def _sample(self, shape, lam, generator, device):
        u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
        return (2.0 * u - 1.0) * lam

    def _direct_radii(self, p, lam, dim):
        # Yang et al. 2020 (rs4a), uniform noise: R_1 = 2 lambda (p - 1/2);
        # R_inf = 2 lambda (1 - (3/2 - p)^(1/d)), written with expm1/log1p for large d.
        return {
            "l1": 2.0 * lam * (p - 0.5),
            "linf": -2.0 * lam * math.expm1(math.log1p(0.5 - p) / dim),
        }


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

    def _sample(self, shape, lam, generator, device):
        copies, dim = shape[0], math.prod(shape[1:])
        # Per copy (never shared across copies, DESIGN §3): radius r = lambda s^(1/k), s ~ Gamma(d/k, 1),
        s = sample_gamma(dim / self.k, copies, generator, device)
        radius = (lam * s.pow(1.0 / self.k)).to(torch.float32)
        # and a direction uniform on the l_inf unit sphere: u_i ~ U(-1, 1), one face j set to +-1.
        u = 2.0 * torch.rand((copies, dim), generator=generator, device=device, dtype=torch.float32) - 1.0
        face = torch.randint(0, dim, (copies, 1), generator=generator, device=device)
        sign = torch.randint(0, 2, (copies, 1), generator=generator, device=device).to(torch.float32) * 2 - 1
        u.scatter_(1, face, sign)
        return (u * radius[:, None]).reshape(shape)

    def tv_bound(self, dim):
        # Marsaglia-Tsang in float64: per rejection round (<= 1.06 on average for shape >= 1) one
        # Box-Muller normal and one acceptance uniform on 2^-53 grids, and the boost uniform; the
        # direction's uniforms are bounded and its face index is exact.
        return 4 * 2.0 ** -53

    def _direct_radii(self, p, lam, dim):
        k = self.k
        # rs4a, Theorem (l_inf-ball-exponential noise, l1 radius):
        # R_1 = 2 lambda d/(d-1) Gamma(d/k)/Gamma((d-1)/k) (p - 1/2), d >= 2.
        radii = {}
        if dim >= 2:
            log_ratio = math.lgamma(dim / k) - math.lgamma((dim - 1) / k)
            radii["l1"] = 2.0 * lam * dim / (dim - 1) * math.exp(log_ratio) * (p - 0.5)
        if k == 1.0:
            # k = 1 is an l_inf-norm Laplace-type density: R_inf = lambda log(1 / (2(1 - p))).
            radii["linf"] = lam * _log_inv_2q(p)
        if not radii:  # d = 1: ||x||_inf = |x|, the density is generalized-normal; no certificate here.
            radii["l1"] = 0.0
        return radii


def sample_gamma(alpha: float, count: int, generator=None, device="cpu") -> torch.Tensor:
    """Gamma(alpha, 1) draws in float64 by Marsaglia & Tsang (2000), exact (rejection sampling).

    alpha < 1 uses the boost Gamma(alpha) = Gamma(alpha + 1) * U^(1/alpha) (Marsaglia & Tsang §6).
    """
    boost = alpha < 1.0
    a = alpha + 1.0 if boost else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(count, dtype=torch.float64, device=device)
    todo = torch.arange(count, device=device)
    while todo.numel():
        m = todo.numel()
        z = torch.randn(m, generator=generator, device=device, dtype=torch.float64)
        u = torch.rand(m, generator=generator, device=device, dtype=torch.float64)
        v = (1.0 + c * z) ** 3
        positive = v > 0
        log_v = torch.log(torch.where(positive, v, torch.ones_like(v)))
        accept = positive & (torch.log(u) < 0.5 * z * z + d - d * v + d * log_v)
        out[todo[accept]] = d * v[accept]
        todo = todo[~accept]
    if boost:
        u = torch.rand(count, generator=generator, device=device, dtype=torch.float64)
        out = out * u.pow(1.0 / alpha)
    return out


def random_words(count: int, generator, device) -> torch.Tensor:
    """``count`` independent integers uniform on [0, 2^63): torch's ``random_`` on int64 with no
    bounds returns a 64-bit draw (two 32-bit words) modulo 2^63 (tests/test_noises.py checks the bits)."""
    return torch.empty(count, dtype=torch.int64, device=device).random_(generator=generator)


def unit_interval(k: torch.Tensor, bits: int) -> torch.Tensor:
    """w = (k + 1) 2^-bits in float32 for integers k uniform on [0, 2^bits): uniform on (0, 1] up to
    its grid, never 0, so log(w) is finite. Its smallest value 2^-bits stands for the whole first cell
    (0, 2^-bits]: that cell's ideal image under an unbounded transform is the sampler's tau. Rounding
    k + 1 to float32 moves w within 2^-24 of itself, a rounding of the value, not a lost tail."""
    return (k + 1).to(torch.float32).mul_(2.0 ** -bits)


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
