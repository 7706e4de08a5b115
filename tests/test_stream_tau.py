"""tau, the total-variation distance of one copy's sampled noise from the ideal law, derived here from
what the samplers draw (the keying layout, the bits of each uniform, the alias tables' realized masses)
and compared with what the backends subtract (DESIGN §5). Written independently of stream_tau."""

import math

import mpmath
import pytest
import torch

from fastsmooth import ExpInf, Gaussian, Laplace, Uniform
from fastsmooth.backends import make_backend
from fastsmooth.grid import alias_table, expinf_grid_tau, realized_masses
from fastsmooth.kernels import samplers
from fastsmooth.kernels.philox import element_counters

DIMS = [1, 100, 127, 128, 129, 300, 511, 512, 700, 784, 3072, 150528]
BACKENDS = ["torch", "native", "triton"]


def box_muller_pairs(dim: int) -> int:
    """Pairs (group, lane pair) that feed at least one element < dim, counted from the layout."""
    group, lane = element_counters(dim)
    return len(set(zip(group.tolist(), (lane // 2).tolist())))


def u39(wa: int, wb: int) -> float:
    """The Box-Muller radius uniform of samplers.py, exactly: 31 bits of wa, 8 low bits of wb."""
    return ((wa & 0x7FFFFFFF) + ((wb & 0xFF) + 0.5) / 256) * 2.0 ** -31


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", DIMS)
def test_float_mode_tau_from_the_layout(dim, backend):
    engine = make_backend(backend, "cpu")
    # Gaussian: one radius uniform per Box-Muller pair of one copy; U39's first cell is 2^-39 wide and
    # its smallest value 2^-40 stands for all of it (the twin's radius there is sqrt(-2 log 2^-40))
    assert u39(0, 1) - u39(0, 0) == 2.0 ** -39 and u39(0, 0) == 2.0 ** -40
    cos, _ = samplers.box_muller_twin(torch.tensor([0]), torch.tensor([0]))
    assert abs(float(cos[0])) == pytest.approx(math.sqrt(-2 * math.log(2.0 ** -40)), rel=1e-6)
    assert engine.tv_bound(Gaussian(sigma=1.0), dim) == box_muller_pairs(dim) * 2.0 ** -39
    # the pairing is within a copy: the old pairing across copies counted d radius uniforms per copy
    assert box_muller_pairs(dim) <= max(1, dim) and box_muller_pairs(dim) >= math.ceil(dim / 2)
    # Laplace: 31 bits, refined by 31 more on the first cell: cells of 2^-62 at the tail
    assert engine.tv_bound(Laplace(sigma=1.0), dim) == dim * 2.0 ** -62
    assert engine.tv_bound(Uniform(sigma=1.0), dim) == 0.0
    # ExpInf: the Gamma's uniforms (<= 1.06 iterations x 2 + the boost, 31 bits each) and the face index
    assert engine.tv_bound(ExpInf(k=1.0, sigma=1.0), dim) == 4 * 2.0 ** -31 + dim * 2.0 ** -64


def test_expinf_face_index_is_floor_w_d_over_2_64():
    """The face index j = floor(W d / 2^64) from a 64-bit W, computed in 64-bit integer pieces: equal
    to the exact product for every tested W and d, so each face gets floor or ceil(2^64 / d) words
    (bias <= d 2^-64 in total variation, not the 1.6e-7 of a 32-bit word taken mod d)."""
    ws = [0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 63, 2 ** 64 - 1, 0x123456789ABCDEF0, 0xFEDCBA9876543210]
    for d in (1, 7, 784, 3072, 150528, 2 ** 31 - 1):
        c0 = torch.tensor([w & 0xFFFFFFFF for w in ws])
        c1 = torch.tensor([w >> 32 for w in ws])
        j = (c1 * d + ((c0 * d) >> 32)) >> 32                      # the twin's formula
        assert j.tolist() == [w * d >> 64 for w in ws]
        # floor(W d / 2^64) = j takes ceil(2^64 j / d) <= W < ceil(2^64 (j + 1) / d): counts differ by <= 1
        counts = {-(-(2 ** 64) * (jj + 1) // d) - (-(-(2 ** 64) * jj // d)) for jj in (0, d // 2, d - 1)}
        assert max(counts) - min(counts) <= 1
    # a 32-bit word mod d, for comparison: its bias at CIFAR size (what the old sampler had)
    d = 3072
    tv_mod = 0.5 * sum(abs(((2 ** 32 // d) + (1 if j < 2 ** 32 % d else 0)) / 2 ** 32 - 1 / d) for j in range(d))
    assert tv_mod > 1e-7 and d * 2.0 ** -64 < 1e-15


def exact_cell_masses(name: str, lam: float, grid: int, offset: int):
    """P(round(G delta) = m) for m = -offset .. offset, and the mass beyond, by mpmath at 50 digits."""
    with mpmath.workdps(50):
        lam = mpmath.mpf(lam)
        if name == "gaussian":
            cdf = lambda t: (1 + mpmath.erf(t / (lam * mpmath.sqrt(2)))) / 2  # noqa: E731
        elif name == "laplace":
            cdf = lambda t: mpmath.exp(t / lam) / 2 if t < 0 else 1 - mpmath.exp(-t / lam) / 2  # noqa: E731
        else:
            cdf = lambda t: min(mpmath.mpf(1), max(mpmath.mpf(0), (t + lam) / (2 * lam)))  # noqa: E731
        half = mpmath.mpf(1) / 2
        masses = {m: cdf((m + half) / grid) - cdf((m - half) / grid) for m in range(-offset, offset + 1)}
        beyond = 1 - (cdf((offset + half) / grid) - cdf((-offset - half) / grid))
        return masses, beyond


@pytest.mark.parametrize("name,lam", [("gaussian", 0.25), ("gaussian", 1.0), ("laplace", 0.25 / math.sqrt(2)),
                                      ("uniform", 0.5 * math.sqrt(3))])
def test_alias_table_tau_from_its_realized_law(name, lam):
    """Decode the table (every bucket's threshold and alias) into the law it samples, and measure its
    total-variation distance from the exact cell masses: that is the tau per element."""
    table = alias_table(name, lam, 255)
    realized = realized_masses(table)
    assert sum(realized.values()) == 2 ** 64
    exact, beyond = exact_cell_masses(name, lam, 255, table.offset)
    with mpmath.workdps(50):
        tv = (sum(abs(mpmath.mpf(realized.get(m, 0)) / 2 ** 64 - q) for m, q in exact.items()) + beyond) / 2
    assert float(tv) <= table.tau <= float(tv) * (1 + 1e-6) + 1e-30
    assert table.tau < 1e-15                                    # 64-bit resolution: negligible per element
    for dim in (784, 3072):
        engine = make_backend("native", "cpu")
        noise = {"gaussian": Gaussian, "laplace": Laplace, "uniform": Uniform}[name](scale=lam)
        assert engine.tv_bound(noise, dim, 255) == dim * table.tau


@pytest.mark.parametrize("dim,k", [(784, 1.0), (3072, 2.0), (150528, 10.0)])
def test_expinf_grid_tau_is_added_to_its_float_tau(dim, k):
    noise = ExpInf(k=k, sigma=0.5)
    lam = noise.scale_for(dim)
    engine = make_backend("native", "cpu")
    grid_part = expinf_grid_tau(dim, k, lam, 255)
    assert engine.tv_bound(noise, dim, 255) == engine.tv_bound(noise, dim) + grid_part
    # per coordinate at least the 53-bit grid of S over its 2a + 1 boundaries, a = G E[r]
    a = 255 * lam * math.exp(math.lgamma((dim + 1) / k) - math.lgamma(dim / k))
    assert grid_part >= dim * (2 * a + 1) * 2.0 ** -53
    assert grid_part < 1e-6


def test_stream_tau_names_every_noise():
    for noise in (Gaussian(sigma=1), Laplace(sigma=1), Uniform(sigma=1), ExpInf(k=2, sigma=1)):
        for grid in (None, 255):
            tau = samplers.stream_tau(samplers.NoisePlan(noise, 3072, grid))
            assert 0.0 <= tau < 1e-6
