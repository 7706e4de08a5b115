"""Inputs on a grid, formed from integers: sound randomized smoothing in floating point (DESIGN §5).

Voracek & Hein ("Sound Randomized Smoothing in Floating-Point Arithmetic", ICLR 2023) show that
x + eps formed in float32 is not the shifted distribution the smoothing theorem needs: the low bits
of the float sum carry information about x, and a base classifier that reads them can be certified
next to an adversarial example. For inputs on a known grid x = k / G (8-bit images: G = 255) the
cure is to form every noisy input from integers:

    nu = round(G * delta),  delta ~ the continuous noise,      model input = fl32((k + nu) / G)

Since round(G (x + delta)) = k + round(G delta) for grid x, the votes then have exactly the law of
the base classifier f o round_G (round_G(y) = fl32(round(G y) / G)) under the continuous noise at x,
for every noise; that composite is a fixed function of the input, so the smoothing theorem and every
radius formula hold for it unchanged. Its inputs reach the model as one float per integer (an IEEE
division is correctly rounded), so two inputs that differ below the grid resolution are the same.

This module is pure: the law of nu, and the exact tables that sample it.

* i.i.d. noises (Gaussian, Laplace, Uniform): nu's law is discrete on a few hundred to a few thousand
  cells, q_m = F((m + 1/2) / G) - F((m - 1/2) / G) with F the noise's 1-D CDF, computed here by
  mpmath at 40 digits. Its masses are quantized to integers Q_m / 2^64 (sum exactly 2^64) and laid
  out as a Walker alias table (Walker 1977; Vose 1991) in exact integer arithmetic: 2^b buckets, a
  64-bit uniform W picks bucket i = W >> (64 - b), and its low 64 - b bits V choose i (V < T_i) or
  alias A_i. The sampled law is Q / 2^64 exactly, so its total-variation distance from the exact law
  is computable: tau per element = 1/2 sum_m |Q_m / 2^64 - q_m| (the cut tails included).
  W is drawn lazily: its high word is the element's Philox word; only when the bucket's V ties
  with the high 32 - b bits of T_i (probability <= 2^-(32-b)) does the low word decide.
* ExpInf: nu_i = round(G r u_i) given the copy's radius r, decided in float64 (``expinf_grid_tau``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import mpmath
import torch

from .checks import check_positive_int

SNAP_TOLERANCE = 1e-6            # inputs this close to the grid (in input units) snap to it
TAIL_MASS = 2.0 ** -68           # the table's cells cover all but this mass on each side
MAX_TABLE_BITS = 22              # 4 M buckets, 48 MB: a noise wider than that is refused
_DIGITS = 40


def check_input_grid(grid) -> Optional[int]:
    """None (float arithmetic) or a positive integer G (inputs k / G)."""
    if grid is None:
        return None
    return check_positive_int("input_grid", grid)


def grid_indices(x: torch.Tensor, grid: int) -> torch.Tensor:
    """The integers k of an input on the grid x = k / G, as int32 on x's device.

    uint8 inputs are k itself. Float inputs within SNAP_TOLERANCE of the grid snap to it; further
    off is a ValueError (the input is not on the grid the certificate is stated for).
    """
    if x.dtype == torch.uint8:
        return x.to(torch.int32)
    if x.dtype.is_floating_point is False:
        raise ValueError(f"input of dtype {x.dtype}: expected floats in the model's units (or uint8 grid indices)")
    scaled = x.double() * grid
    k = torch.round(scaled)
    off = (scaled - k).abs() / grid
    worst = float(off.max()) if off.numel() else 0.0
    if not worst <= SNAP_TOLERANCE:
        at = int(off.flatten().argmax())
        raise ValueError(f"the input is not on the grid 1/{grid}: element {at} ({float(x.flatten()[at])!r}) lies "
                         f"{worst:.3g} from it (tolerance {SNAP_TOLERANCE:g}); pass input_grid=None for "
                         "inputs off the grid")
    if k.numel() and float(k.abs().max()) >= 2 ** 24:
        raise ValueError(f"grid indices beyond 2^24 (input_grid={grid}): not exact in float32")
    return k.to(torch.int32)


def on_grid(x: torch.Tensor, grid: int = 255) -> bool:
    """Whether x (uint8, or floats within SNAP_TOLERANCE) lies on the grid k / G: the compat faces
    certify such inputs in grid mode, as the 8-bit data sets of the original scripts are."""
    try:
        grid_indices(x, grid)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------
# i.i.d. noises: the law of one element's nu and its alias table
# ------------------------------------------------------------------------------------------

def _cdf(name: str, lam):
    """The 1-D marginal CDF F(t) of an i.i.d. noise of scale ``lam`` (DESIGN §3), in mpmath."""
    lam = mpmath.mpf(lam)
    if name == "gaussian":
        return lambda t: mpmath.ncdf(t / lam)
    if name == "laplace":
        return lambda t: mpmath.mpf(1) / 2 * mpmath.exp(t / lam) if t < 0 else 1 - mpmath.mpf(1) / 2 * mpmath.exp(-t / lam)
    if name == "uniform":
        return lambda t: min(mpmath.mpf(1), max(mpmath.mpf(0), (t + lam) / (2 * lam)))
    raise ValueError(f"no alias table for noise {name!r} (ExpInf is not i.i.d. over elements)")


def _tail(name: str, lam, t):
    """P(delta > t) for t >= 0 (the right tail; the noises are symmetric)."""
    lam = mpmath.mpf(lam)
    if name == "gaussian":
        return mpmath.ncdf(-t / lam)
    if name == "laplace":
        return mpmath.exp(-t / lam) / 2
    return max(mpmath.mpf(0), (lam - t) / (2 * lam))


@dataclass(frozen=True)
class AliasTable:
    """The exact sampler of nu = round(G delta) for one element (see the module docstring).

    Bucket i stands for nu = i - offset. ``threshold_hi``/``threshold_lo`` are the high and low 32
    bits of T_i in [0, 2^(64-bits)) (int64 tensors of uint32 values), ``alias`` the alias buckets.
    ``masses`` are the quantized Q_m (Python ints) of nu = -offset .. offset; ``tau`` the
    total-variation distance of one element's sampled nu from the exact law.
    """

    name: str
    scale: float
    grid: int
    bits: int
    offset: int
    threshold_hi: torch.Tensor
    threshold_lo: torch.Tensor
    alias: torch.Tensor
    masses: tuple
    tau: float

    def on(self, device) -> "AliasTable":
        """The same table with its tensors on ``device``: (threshold_hi int32, threshold_lo as int32
        bits, alias int32), the kernels' and the native code's form."""
        return _device_tables(self, str(torch.device(device)))


@lru_cache(maxsize=64)
def _device_tables(table: AliasTable, device: str):
    lo = table.threshold_lo
    lo_bits = torch.where(lo >= 2 ** 31, lo - 2 ** 32, lo).to(torch.int32)
    return (table.threshold_hi.to(torch.int32).to(device), lo_bits.to(device), table.alias.to(torch.int32).to(device))


@lru_cache(maxsize=32)
def alias_table(name: str, scale: float, grid: int) -> AliasTable:
    """The alias table of nu = round(grid * delta) for the i.i.d. noise ``name`` of scale lambda."""
    name, grid = str(name), check_positive_int("input_grid", grid)
    with mpmath.workdps(_DIGITS):
        lam = mpmath.mpf(scale)
        # offset M: the cells beyond |nu| = M hold at most TAIL_MASS on each side
        step = max(1, int(grid * scale))
        m = step
        while _tail(name, lam, (mpmath.mpf(m) + mpmath.mpf(1) / 2) / grid) > TAIL_MASS:
            m += step
        lo, hi = 0, m                       # the smallest such M, by bisection
        while lo < hi:
            mid = (lo + hi) // 2
            if _tail(name, lam, (mpmath.mpf(mid) + mpmath.mpf(1) / 2) / grid) > TAIL_MASS:
                lo = mid + 1
            else:
                hi = mid
        offset = lo
        cells = 2 * offset + 1
        bits = max(1, (cells - 1).bit_length())
        if bits > MAX_TABLE_BITS:
            raise ValueError(f"noise {name} of scale {scale:g} spans {cells} cells of the grid 1/{grid}: "
                             f"more than a 2^{MAX_TABLE_BITS}-bucket table; use input_grid=None")
        cdf = _cdf(name, lam)
        edges = [cdf((mpmath.mpf(v) - mpmath.mpf(1) / 2) / grid) for v in range(-offset, offset + 2)]
        exact = [edges[i + 1] - edges[i] for i in range(cells)]
        total = 2 ** 64
        scaled = [q * total for q in exact]
        masses = [int(mpmath.floor(s)) for s in scaled]
        # largest remainders take the units left over, so that the masses sum to exactly 2^64
        left = total - sum(masses)
        for i in sorted(range(cells), key=lambda i: scaled[i] - masses[i], reverse=True)[:left]:
            masses[i] += 1
        assert sum(masses) == total and min(masses) >= 0
        tv = (sum(abs(mpmath.mpf(q) / total - e) for q, e in zip(masses, exact))
              + 2 * _tail(name, lam, (mpmath.mpf(offset) + mpmath.mpf(1) / 2) / grid)) / 2
        tau = float(tv) * (1 + 1e-9)        # rounded up: a bound, not an estimate
    thresholds, alias = _vose(masses + [0] * ((1 << bits) - cells), bits)
    t = torch.tensor(thresholds, dtype=torch.int64)
    return AliasTable(name, float(scale), grid, bits, offset, t >> 32, t & 0xFFFFFFFF,
                      torch.tensor(alias, dtype=torch.int32), tuple(masses), tau)


def _vose(masses: list, bits: int) -> tuple[list, list]:
    """Walker's alias table of integer masses summing to 2^64 over 2^bits buckets, each of capacity
    2^(64 - bits), built exactly (Vose 1991's small/large lists in integer arithmetic): bucket i keeps
    T_i of its own mass and gives the rest of its capacity to alias A_i. A bucket that keeps all of its
    capacity is written (T_i = 0, A_i = i), which samples the same (every word goes to i) and keeps
    T_i below 2^(64 - bits): T_i's high bits and A_i then pack into one 32-bit word (native_backend)."""
    capacity = 1 << (64 - bits)
    left = list(masses)
    thresholds, alias = [capacity] * len(left), list(range(len(left)))
    small = [i for i, q in enumerate(left) if q < capacity]
    large = [i for i, q in enumerate(left) if q >= capacity]
    while small and large:
        s, g = small.pop(), large.pop()
        thresholds[s], alias[s] = left[s], g
        left[g] -= capacity - left[s]
        (small if left[g] < capacity else large).append(g)
    # what remains holds exactly its capacity (integer arithmetic leaves no rounding residue)
    for i in small + large:
        assert left[i] == capacity
    for i, t in enumerate(thresholds):
        if t == capacity:
            thresholds[i], alias[i] = 0, i
    return thresholds, alias


def realized_masses(table: AliasTable) -> dict:
    """{nu: probability numerator over 2^64} that the table's sampler realizes (for tests and tau)."""
    capacity = 1 << (64 - table.bits)
    t = (table.threshold_hi * 2 ** 32 + table.threshold_lo).tolist()
    out: dict = {}
    for i, (ti, ai) in enumerate(zip(t, table.alias.tolist())):
        out[i - table.offset] = out.get(i - table.offset, 0) + ti
        out[ai - table.offset] = out.get(ai - table.offset, 0) + capacity - ti
    return {k: v for k, v in out.items() if v}


# ------------------------------------------------------------------------------------------
# ExpInf: rounding decided in float64
# ------------------------------------------------------------------------------------------

def expinf_grid_tau(dim: int, k: float, scale: float, grid: int) -> float:
    """tau of ExpInf's grid sampler per copy, on top of its float-mode tau (the Gamma's uniforms and
    the face index; ``stream_tau`` adds both). The same for every backend: they draw the same words.

    Given the copy's radius r (float64; its law is the Gamma transform's, up to the float rounding
    that the float-mode tau does not count either, DESIGN §5) and a = G r, a coordinate is
    nu_i = floor(a S_i + 1/2) with S_i = (2K + 1 - 2^53) 2^-53 (exact in float64) from a 53-bit integer
    K (the element's word and the high 21 bits of its TAG_GRID_LOW word), and the face coordinate is
    floor(+-a + 1/2). Against the exact conditional law of round(a U), U ~ U(-1, 1):
      * the 2^-52 grid of S moves the probability of each of the <= 2a + 1 cell boundaries by at most
        2^-53: (2a + 1) 2^-53 per coordinate;
      * float64 rounding of a S + 1/2 (|error| <= eps = (a + 1) 2^-52) flips the floor only if the
        exact value lies within eps of an integer: probability <= (2a + 2) eps / a <= 6 eps when
        a >= 1/2 - eps (a density of 1/(2a) over at most 2a + 2 integers), and 0 for smaller a;
      * the face: floor(+-a + 1/2) errs when a lies within (a + 1) 2^-53 of a half-integer. Summed over
        the half-integers (a Riemann sum of step 1 of a unimodal density exceeds its integral by at
        most its maximum): 2^-52 (E[a] + sup(a f_a) + 1 + sup f_a), where with s = (r/lambda)^k ~
        Gamma(alpha = d/k), a f_a(a) = k s f_s(s) is largest at s = alpha (k alpha^alpha e^-alpha /
        Gamma(alpha)) and f_a = f_r / G at s = alpha - 1/k.
    Every term is linear in a, so the bound of the mixture over r is the bound at E[a] = G E[r]
    (total variation of a mixture <= the mean of the conditional ones), with
    E[r] = lambda Gamma((d + 1)/k) / Gamma(d/k).
    """
    d, k = int(dim), float(k)
    alpha = d / k
    a = grid * scale * math.exp(math.lgamma((d + 1) / k) - math.lgamma(d / k))     # G E[r]
    coordinate = (2 * a + 1) * 2.0 ** -53 + 6 * (a + 1) * 2.0 ** -52
    sup_g = k * math.exp(alpha * math.log(alpha) - alpha - math.lgamma(alpha))
    if alpha > 1 / k:
        mode = alpha - 1 / k
        sup_f = k / (scale * grid) * math.exp((alpha - 1 / k) * math.log(mode) - mode - math.lgamma(alpha))
    else:  # f_r unbounded at 0 (d/k <= 1/k, i.e. d = 1): the face term is then at most 1
        sup_f = 2.0 ** 52
    face = 2.0 ** -52 * (a + sup_g + 1 + sup_f)
    return min(1.0, (d * coordinate + face) * (1 + 1e-6))
