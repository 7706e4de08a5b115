"""Grid mode (DESIGN §5; Voracek & Hein, ICLR 2023): inputs k / G reach the model as fl32((k + nu) / G)
with nu = round(G delta) drawn exactly. The inputs snap to the grid or are refused; what reaches the model
depends only on k; nu has the law of the rounded continuous noise (chi-square against exact cell masses);
certificates on the grid agree with float arithmetic within Monte Carlo noise."""

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch import nn

from fastsmooth import ExpInf, Gaussian, Laplace, Smooth, Uniform
from fastsmooth.backends import make_backend
from fastsmooth.grid import SNAP_TOLERANCE, alias_table, grid_indices

P_MIN = 1e-3


class Recorder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)

    def inputs(self):
        return torch.cat(self.seen)


def linear(d, k=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, k))


# -- the input ----------------------------------------------------------------------------------

def test_grid_indices_snap_or_refuse():
    k = torch.randint(0, 256, (1, 4, 4), generator=torch.Generator().manual_seed(0))
    x = k / 255.0
    assert torch.equal(grid_indices(x, 255), k.to(torch.int32))
    assert torch.equal(grid_indices(x + 0.9 * SNAP_TOLERANCE, 255), k.to(torch.int32))
    assert torch.equal(grid_indices(k.to(torch.uint8), 255), k.to(torch.int32))      # uint8: k itself
    with pytest.raises(ValueError, match="not on the grid 1/255"):
        grid_indices(x + 1e-4, 255)
    with pytest.raises(ValueError, match="dtype"):
        grid_indices(k.to(torch.int64), 255)
    assert torch.equal(grid_indices(torch.tensor([0.25, -0.5, 1.5]), 16), torch.tensor([4, -8, 24], dtype=torch.int32))


@pytest.mark.parametrize("noise", [Gaussian(sigma=0.25), Laplace(sigma=0.25), ExpInf(k=2, sigma=0.25)],
                         ids=["gaussian", "laplace", "expinf2"])
def test_inputs_below_the_grid_resolution_reach_the_model_alike(noise):
    """x and x moved by less than the snap tolerance (float32 rounding of k/255, or of a normalization
    undone) are one input: the model sees the very same batches, bit for bit. In float arithmetic the
    low bits of x + eps reach the model and differ (what Voracek & Hein's attack reads)."""
    d = 48
    k = torch.randint(0, 256, (3, 4, 4), generator=torch.Generator().manual_seed(1))
    x = k / 255.0
    y = (x.double() + 3e-7 * torch.sign(torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(2)))).float()
    assert not torch.equal(x, y)
    seen = {}
    for grid in (255, None):
        for name, image in (("x", x), ("y", y)):
            rec = Recorder(linear(d))
            Smooth(rec, 3, noise, precision="fp32", micro_batch=0, input_grid=grid).probabilities(
                image, n=300, batch_size=128, image_index=5)
            seen[grid, name] = rec.inputs()
    assert torch.equal(seen[255, "x"], seen[255, "y"])
    assert not torch.equal(seen[None, "x"], seen[None, "y"])
    # uint8 pixels are the grid index itself
    rec = Recorder(linear(d))
    Smooth(rec, 3, noise, precision="fp32", micro_batch=0, input_grid=255).probabilities(
        k.to(torch.uint8), n=300, batch_size=128, image_index=5)
    assert torch.equal(rec.inputs(), seen[255, "x"])


@pytest.mark.parametrize("noise", [Gaussian(sigma=0.5), Uniform(sigma=0.5), ExpInf(k=1, sigma=0.5)],
                         ids=["gaussian", "uniform", "expinf1"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_grid_index_reaches_the_model_as_one_float(noise, precision):
    """Every value the model sees is fl32(v / 255) for an integer v, then the model's precision: the map
    from integers to model inputs is a function (the IEEE division is correctly rounded)."""
    rec = Recorder(linear(27))
    k = torch.randint(0, 256, (3, 3, 3), generator=torch.Generator().manual_seed(3))
    Smooth(rec, 3, noise, precision=precision, micro_batch=0, input_grid=255).probabilities(
        k / 255.0, n=500, image_index=1)
    seen = rec.inputs()
    v = torch.round(seen.double() * 255)
    expected = (v.to(torch.float32) / 255).to(seen.dtype)
    if precision == "fp32":
        assert torch.equal(seen, expected)
    else:  # the bf16 cast of fl32(v / 255): integers may share a bf16 value, one integer never has two
        values = {}
        for f32, b in zip((v.flatten().to(torch.float32) / 255).tolist(), seen.flatten().float().tolist()):
            assert values.setdefault(f32, b) == b


# -- the law of nu ------------------------------------------------------------------------------

def _chi_square(counts: dict, probs: dict, total: int) -> float:
    """Pearson's test of observed counts against cell probabilities, cells with fewer than 5 expected
    draws pooled into their neighbours from each tail inwards."""
    cells = sorted(probs)
    obs, exp, acc_o, acc_e = [], [], 0, 0.0
    for m in cells:
        acc_o += counts.get(m, 0)
        acc_e += probs[m] * total
        if acc_e >= 5:
            obs.append(acc_o)
            exp.append(acc_e)
            acc_o, acc_e = 0, 0.0
    obs[-1] += acc_o + sum(c for m, c in counts.items() if m not in probs)
    exp[-1] += acc_e
    obs, exp = np.array(obs, float), np.array(exp, float)
    exp *= obs.sum() / exp.sum()
    return float(stats.chisquare(obs, exp).pvalue)


def _draw_nu(noise, copies, dim, seed=0, backend="native"):
    """nu of ``copies`` copies of the zero image (k = 0) on the grid 1/255, as integers."""
    out = torch.empty(copies, dim)
    make_backend(backend, "cpu").fill(out, torch.zeros(1, dim, dtype=torch.int32),
                                      [(0, 3, 0, copies, 0)], noise, seed, 255)
    return torch.round(out.double() * 255).to(torch.int64)


@pytest.mark.parametrize("noise,cdf", [
    (Gaussian(scale=0.02), lambda t: stats.norm.cdf(t, scale=0.02)),
    (Laplace(scale=0.015), lambda t: stats.laplace.cdf(t, scale=0.015)),
    (Uniform(scale=0.05), lambda t: stats.uniform.cdf(t, loc=-0.05, scale=0.1)),
], ids=["gaussian", "laplace", "uniform"])
def test_nu_frequencies_match_the_cell_masses(noise, cdf):
    """i.i.d. noises: nu of 200 copies x 784 elements against the exact masses of the cells
    [(m - 1/2) / 255, (m + 1/2) / 255) of the continuous noise (scipy's CDF, independent of the tables)."""
    nu = _draw_nu(noise, 200, 784).flatten()
    counts = dict(zip(*np.unique(nu.numpy(), return_counts=True)))
    span = int(nu.abs().max()) + 3
    probs = {m: cdf((m + 0.5) / 255) - cdf((m - 0.5) / 255) for m in range(-span, span + 1)}
    assert _chi_square(counts, probs, nu.numel()) > P_MIN
    assert float(nu.double().mean()) == pytest.approx(0.0, abs=5 * float(nu.double().std()) / math.sqrt(nu.numel()))


def test_expinf_nu_frequencies_match_the_rounded_law():
    """ExpInf(k = 1) on d = 8 coordinates: P(nu = m) integrates, over the radius law r = lambda s with
    s ~ Gamma(8), the rounded uniform on [-G r, G r] of the 7 non-face coordinates and the rounded
    face value +-G r (probability 1/8 each coordinate), by quadrature."""
    d, lam, grid = 8, 0.004, 255
    noise = ExpInf(k=1.0, scale=lam)
    nu = _draw_nu(noise, 20000, d).flatten()
    counts = dict(zip(*np.unique(nu.numpy(), return_counts=True)))
    gamma = stats.gamma(d)

    def mass(m):
        lo, hi = m - 0.5, m + 0.5                       # the cell, in units of 1/G

        def inner(s):                                    # non-face coordinate given a = G lambda s
            a = grid * lam * s
            return max(0.0, min(hi, a) - max(lo, -a)) / (2 * a) * gamma.pdf(s)
        a_edges = sorted({abs(lo), abs(hi)})
        breaks = [e / (grid * lam) for e in a_edges if e > 0]
        uniform_part = integrate.quad(inner, 0, np.inf, points=None, limit=200)[0] if not breaks else sum(
            integrate.quad(inner, a, b, limit=200)[0] for a, b in zip([0] + breaks, breaks + [np.inf]))
        # face: round(+-a) = m  <=>  |m| - 1/2 <= a < |m| + 1/2 with the matching sign (half each)
        if m == 0:
            face = gamma.cdf(0.5 / (grid * lam))
        else:
            face = 0.5 * (gamma.cdf((abs(m) + 0.5) / (grid * lam)) - gamma.cdf((abs(m) - 0.5) / (grid * lam)))
        return (d - 1) / d * uniform_part + face / d

    span = int(nu.abs().max()) + 2
    probs = {m: mass(m) for m in range(-span, span + 1)}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    assert _chi_square(counts, probs, nu.numel()) > P_MIN


def test_alias_tables_hold_the_exact_masses():
    """The quantized masses Q_m / 2^64 are within 2^-64 of the exact cell masses (mpmath), sum to 1,
    and the tails beyond the table hold less than 2^-67."""
    table = alias_table("laplace", 0.1, 255)
    with mpmath.workdps(40):
        lam = mpmath.mpf(0.1)
        cdf = lambda t: mpmath.exp(t / lam) / 2 if t < 0 else 1 - mpmath.exp(-t / lam) / 2  # noqa: E731
        for m, q in zip(range(-table.offset, table.offset + 1), table.masses):
            exact = cdf((m + mpmath.mpf(0.5)) / 255) - cdf((m - mpmath.mpf(0.5)) / 255)
            assert abs(mpmath.mpf(q) / 2 ** 64 - exact) <= mpmath.mpf(2) ** -64
        assert cdf(-(table.offset + mpmath.mpf(0.5)) / 255) < mpmath.mpf(2) ** -67
    assert sum(table.masses) == 2 ** 64


# -- certificates on the grid -----------------------------------------------------------------------

@pytest.mark.slow
def test_embedded_certified_accuracy_with_and_without_the_grid(tmp_path, monkeypatch):
    """The embedded default (its 8-bit MNIST test images), 40 images at n = 2,000: certified accuracy
    at l2 radii 0 / 0.25 / 0.5 on the grid and in float arithmetic agree within Monte Carlo noise."""
    from fastsmooth.data import get_dataset
    from fastsmooth.embedded import default_model

    monkeypatch.setenv("FASTSMOOTH_CACHE", str(tmp_path))
    noise = Gaussian(sigma=0.25)
    model = default_model(noise, progress=False, epochs=2, train_size=1000)
    data = get_dataset("mnist", "test")
    items = [(i, data[i][0]) for i in range(0, 400, 10)]
    labels = [data[i][1] for i, _ in items]
    table = {}
    for grid in (255, None):
        smooth = Smooth(model, 10, noise, input_grid=grid)
        certs = list(smooth.certify_many(items, n0=100, n=2000, alpha=0.001))
        table[grid] = [sum(c.prediction == y and c.radius >= r for c, y in zip(certs, labels)) for r in (0, 0.25, 0.5)]
        table[grid, "p"] = np.array([c.p_lower for c in certs])
    for a, b in zip(table[255], table[None]):
        assert abs(a - b) <= 3, table
    assert table[255][0] >= 30
    # per image, p_lower differs by the Monte Carlo noise of two independent runs of 2,000 votes
    assert float(np.abs(table[255, "p"] - table[None, "p"]).mean()) < 0.02
