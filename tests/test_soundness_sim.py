"""The guarantee by simulation (issue 7 part 5; DESIGN §4): at alpha = 0.05, over thousands of
certifications of base classifiers whose p_A is known exactly, the rate of wrong certificates (a
radius beyond the true distance to the decision boundary, or a class that is not the smoothed
classifier's) stays within alpha plus binomial slack (a one-sided binomial test at level 1e-3).

The base classifiers are linear, f(x) = [w.x > b]; the noises are symmetric, so the smoothed
classifier has the same boundary, its class at x is the side of x, and the certificates below are
tight (radius = true distance exactly when p_lower = p_A): a sound CERTIFY is wrong with probability
<= alpha, an unsound one (a bound at 2 alpha, selection votes reused in the estimate, a radius
formula too large) is caught. Complementary to tests/test_smooth.py's simulation (Gaussian l2,
Laplace l1 on the API): here Uniform l1 and Gaussian l_inf (through the l2 -> l_inf conversion) on
the API, and Gaussian l1 through the whole `fastsmooth certify` path on real 8x8 digits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import _cli_models
from fastsmooth import Gaussian, Smooth, Uniform, data
from fastsmooth.cli import main
from fastsmooth.results import read_results

pytestmark = pytest.mark.slow

ALPHA, N0, N = 0.05, 20, 300
SLACK = 1e-3  # level of the one-sided binomial test


class Linear(nn.Module):
    """Logits [0, w.x - b]: class 1 on the side w.x > b."""

    def __init__(self, w, b):
        super().__init__()
        self.register_buffer("w", torch.as_tensor(w, dtype=torch.float64).flatten())
        self.b = float(b)

    def forward(self, x):
        z = (x.flatten(1).double() @ self.w - self.b).float()
        return torch.stack([torch.zeros_like(z), z], dim=1)


def _check(wrong: int, certified: int, m: int, what: str) -> None:
    p_value = stats.binom.sf(wrong - 1, m, ALPHA)  # P(Binomial(m, alpha) >= wrong)
    assert p_value > SLACK, f"{what}: {wrong} wrong certificates of {m} (alpha = {ALPHA}); p = {p_value:.2e}"
    assert certified > 0.6 * m, f"{what}: only {certified} of {m} certified"
    # Tight certificates use the bound: about alpha * m are wrong, not a trivially small number.
    assert wrong >= 0.25 * ALPHA * m, f"{what}: only {wrong} wrong of {m}: the test has no power"


def _simulate(noise, norm, model, xs, truth, seed):
    """(wrong, certified) over the images xs; truth(i) -> (class, true distance in ``norm``)."""
    smooth = Smooth(model, 2, noise, backend="torch", precision="fp32", seed=seed)
    wrong = certified = 0
    for cert in smooth.certify_many(enumerate(xs), n0=N0, n=N, alpha=ALPHA, batch_size=4096, norm=norm):
        if cert.abstained:
            continue
        certified += 1
        label, distance = truth(cert.image_index)
        wrong += cert.prediction != label or cert.radius > distance
    return wrong, certified


def test_uniform_l1_axis_aligned():
    """Uniform on [-lambda, lambda]^d and the boundary x_1 = t at distance |m| < lambda (in every
    norm): p_A = 1/2 + |m| / (2 lambda) exactly, and the l1 radius 2 lambda (p - 1/2) equals |m| at p_A."""
    m, d, t = 1200, 4, 0.3
    noise = Uniform(sigma=0.5)
    lam = noise.scale_for(d)
    rng = np.random.default_rng(1)
    margins = rng.uniform(0.05, 0.95, size=m) * lam * rng.choice([-1.0, 1.0], size=m)
    xs = []
    for margin in margins:
        x = torch.full((1, 2, 2), 0.5)
        x.view(-1)[1] = t + margin
        xs.append(x)
    model = Linear(torch.eye(d)[1], t)
    wrong, certified = _simulate(noise, "l1", model, xs, lambda i: (int(margins[i] > 0), abs(margins[i])), seed=31)
    _check(wrong, certified, m, "Uniform l1")


def test_gaussian_linf_dense_boundary():
    """Gaussian and the boundary sum(x) = b: the l2 distance is |sum(x) - b| / sqrt(d), p_A =
    Phi(l2 distance / sigma) exactly; the l_inf distance is |sum(x) - b| / d, and the l_inf radius
    (the l2 one divided by sqrt(d)) equals it at p_A: the conversion is tight for this w."""
    m, d, b, sigma = 1200, 4, 1.0, 0.5
    rng = np.random.default_rng(2)
    l2 = rng.uniform(0.05, 2.0, size=m) * sigma * rng.choice([-1.0, 1.0], size=m)  # signed l2 distance
    xs = [torch.full((1, 2, 2), (b + s * math.sqrt(d)) / d) for s in l2]
    model = Linear(torch.ones(d), b)

    def truth(i):
        margin = float(xs[i].double().sum()) - b
        return int(margin > 0), abs(margin) / d

    wrong, certified = _simulate(Gaussian(sigma=sigma), "linf", model, xs, truth, seed=32)
    _check(wrong, certified, m, "Gaussian linf")


def test_gaussian_l1_through_the_cli(tmp_path):
    """`fastsmooth certify` end to end on the 1,438 real digits of the train split with an axis-aligned
    linear base classifier (`--model _cli_models:axis_classifier`): the distance to the boundary is
    |x_j - t| in every norm, p_A = Phi(|x_j - t| / sigma), and the Gaussian l1 radius (= the l2 one)
    equals it at p_A. The radius column is read back from the TSV."""
    sigma, out = 0.5, tmp_path / "sim.tsv"
    argv = ["certify", "--dataset", "digits", "--split", "train", "--model", "_cli_models:axis_classifier",
            "--noise", "gaussian", "--sigma", str(sigma), "--norm", "l1", "--n0", str(N0), "--samples", str(N),
            "--alpha", str(ALPHA), "--batch", "4096", "--seed", "33", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    dataset = data.get_dataset("digits", split="train")
    rows = read_results(str(out)).rows
    assert len(rows) == len(dataset) >= 1000
    wrong = certified = 0
    low, high = _cli_models.AXIS_CLASSES
    for row in rows:
        pixel = float(dataset[row.idx][0].flatten()[_cli_models.AXIS_PIXEL])
        margin = pixel - _cli_models.AXIS_THRESHOLD
        if row.abstained:
            assert row.radius == 0.0
            continue
        certified += 1
        wrong += row.predict != (high if margin > 0 else low) or row.radius > abs(margin)
    _check(wrong, certified, len(rows), "Gaussian l1 (CLI)")
