"""fastsmooth.compat.rs4a: the face of rs4a's src/noises and src/smooth (tonyduan/rs4a) on
fastsmooth's engine. rs4a's formulas are written out here (its sigma <-> lambd relations and its
radii); the proven l_inf radii against the quadratures of tests/_differential_reference.py; the
sampled functions against Monte Carlo expectations computed here.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from _differential_reference import expinf_linf_reference, laplace_linf_reference
from fastsmooth.compat import rs4a
from fastsmooth.kernels.samplers import NoisePlan, stream_tau
from fastsmooth.compat.rs4a import (ExpInf, Gaussian, Laplace, Uniform, certify_prob_lb, direct_train_log_lik,
                                    parse_noise_from_args, smooth_predict_hard, smooth_predict_soft)

D = 3 * 4 * 4
PROBS = torch.tensor([0.3, 0.5, 0.51, 0.6, 0.75, 0.9, 0.99, 0.9999])


# --------------------------------------------------------------------------------------------
# rs4a's formulas (src/noises/noises.py), written out
# --------------------------------------------------------------------------------------------
def rs4a_sigma_at_unit_lambd(name, d, k=1, j=0):
    if name == "Gaussian":
        return 1.0
    if name == "Laplace":
        return 2 ** 0.5
    if name == "Uniform":
        return 3 ** -0.5
    r2 = (d - 1) / 3 + 1
    return math.sqrt(r2 / d * math.exp(math.lgamma((d + 2 - j) / k) - math.lgamma((d - j) / k)))


def rs4a_radii(name, lambd, d, p, k=1):
    """{adv: radius} of rs4a's proven formulas (None where rs4a's own is not proven)."""
    p = p.double()
    if name == "Gaussian":
        l2 = lambd * torch.distributions.Normal(0.0, 1.0).icdf(p)
        return {1: l2, 2: l2, math.inf: l2 / d ** 0.5}
    if name == "Laplace":
        l1 = -lambd * torch.log(2 * (1 - p))
        return {1: l1, 2: None, math.inf: None}  # rs4a's l_inf ("approx") and hence l2: not proven
    if name == "Uniform":
        l1 = 2 * lambd * (p - 0.5)
        linf = 2 * lambd * (1 - (1.5 - p) ** (1 / d))
        return {1: l1, 2: torch.maximum(l1 / d ** 0.5, linf), math.inf: linf}
    gamma_factor = d / (d - 1) * math.exp(math.lgamma(d / k) - math.lgamma((d - 1) / k))
    l1 = 2 * lambd * gamma_factor * (p - 0.5)
    if k == 1:
        linf = lambd * torch.log(0.5 / (1 - p))
        return {1: l1, 2: torch.maximum(l1 / d ** 0.5, linf), math.inf: linf}
    return {1: l1, 2: None, math.inf: None}


NOISES = [("Gaussian", {}), ("Laplace", {}), ("Uniform", {}), ("ExpInf", {"k": 1}), ("ExpInf", {"k": 2}),
          ("ExpInf", {"k": 10})]
IDS = ["gaussian", "laplace", "uniform", "expinf1", "expinf2", "expinf10"]


@pytest.mark.parametrize("name,kw", NOISES, ids=IDS)
@pytest.mark.parametrize("d", [D, 3072])
def test_sigma_lambd_as_rs4a(name, kw, d):
    cls = getattr(rs4a, name)
    ratio = rs4a_sigma_at_unit_lambd(name, d, **kw)
    by_sigma = cls(d, sigma=0.5, **kw)
    assert (by_sigma.dim, by_sigma.sigma, by_sigma.device) == (d, 0.5, "cpu")
    assert by_sigma.lambd == pytest.approx(0.5 / ratio, rel=1e-12)
    assert by_sigma.get_sigma() == pytest.approx(0.5, rel=1e-12) and by_sigma.get_lambd(1.0) == pytest.approx(1 / ratio)
    by_lambd = cls(d, lambd=0.3, device="cpu", **kw)
    assert by_lambd.sigma == pytest.approx(0.3 * ratio, rel=1e-12) and by_lambd.lambd == 0.3
    for bad in ({}, {"sigma": 0.5, "lambd": 0.3}):
        with pytest.raises(ValueError, match="exactly one"):
            cls(d, **bad, **kw)


@pytest.mark.parametrize("name,kw", NOISES, ids=IDS)
@pytest.mark.parametrize("d", [D, 3072])
def test_radii_are_rs4a_where_proven_else_the_proven_ones(name, kw, d):
    noise = getattr(rs4a, name)(d, sigma=0.5, **kw)
    lam, k = noise.lambd, kw.get("k", 1)
    theirs = rs4a_radii(name, lam, d, PROBS, k)
    above = PROBS > 0.5
    for adv in (1, 2, np.inf):
        ours = noise.certify(PROBS, adv)
        assert ours.dtype == torch.float32 and ours.shape == PROBS.shape
        assert torch.equal(ours, getattr(noise, {1: "certify_l1", 2: "certify_l2", np.inf: "certify_linf"}[adv])(PROBS))
        assert (ours[~above] == 0).all()  # rs4a: negative numbers, no certificate
        if theirs[adv] is not None:
            assert torch.allclose(ours[above].double(), theirs[adv][above], rtol=1e-6, atol=0), (adv, ours, theirs[adv])
    if name in ("Laplace", "ExpInf") and k != 1:  # the proven l_inf radius, and l2 = max(l1 / sqrt(d), l_inf)
        exact = (lambda p: laplace_linf_reference(p, d)) if name == "Laplace" else (lambda p: expinf_linf_reference(p, d, k))
        linf = noise.certify_linf(PROBS).double()
        l1 = noise.certify_l1(PROBS).double()
        for i in torch.nonzero(above).flatten().tolist():
            ref = lam * exact(float(PROBS[i]))
            assert ref * (1 - 2e-5) <= float(linf[i]) <= ref
        assert torch.allclose(noise.certify_l2(PROBS).double(), torch.maximum(l1 / d ** 0.5, linf), rtol=1e-6)


def test_laplace_linf_is_proven_not_rs4a_approx():
    """rs4a's default certify_linf returns lambda Phi^-1(p) / sqrt(d): above the proven radius at
    small d (here d = 1, p near 1/2); every mode gives the differential method's value."""
    noise = Laplace(1, lambd=1.0)
    p = torch.tensor([0.55, 0.6])
    approx = torch.distributions.Normal(0.0, 1.0).icdf(p)
    exact = -torch.log(2 * (1 - p))  # d = 1: the radius is the Laplace quantile
    for mode in ("approx", "integrate"):
        got = noise.certify_linf(p, mode=mode, inc=0.01, upper=3)
        assert torch.allclose(got, exact, rtol=1e-6) and (got < approx).all()
    with pytest.raises(ValueError, match="mode"):
        noise.certify_linf(p, mode="guess")


def test_certify_dtypes_devices_and_bad_input():
    noise = Gaussian(D, sigma=0.25)
    p64 = torch.tensor([[0.9, 0.7]], dtype=torch.float64)
    out = noise.certify(p64, 2)
    assert out.dtype == torch.float64 and out.shape == (1, 2)
    assert out[0, 0].item() == pytest.approx(0.25 * stats.norm.ppf(0.9), rel=1e-9)
    p32 = noise.certify(torch.tensor([0.9]), 2)
    assert p32.dtype == torch.float32 and p32.item() <= 0.25 * stats.norm.ppf(0.9)  # rounded toward 0
    assert noise.certify(torch.tensor(0.8), float("inf")).shape == ()
    for adv in (3, "l2", None, 0.5):
        with pytest.raises(ValueError, match="adv"):
            noise.certify(p32, adv)
    with pytest.raises(ValueError, match="p_lower"):
        noise.certify(torch.tensor([1.5]), 2)


def test_other_rs4a_noises_say_so():
    for name in ("Clean", "Pareto", "UniformBall", "Exp1", "Exp2", "Expp", "PowInf", "Pow2", "CubicalDist",
                 "SphericalDist"):
        cls = getattr(rs4a, name)
        assert name in rs4a.__all__
        with pytest.raises(NotImplementedError, match=name):
            cls(D, sigma=0.5)
    with pytest.raises(NotImplementedError, match="j=1"):
        ExpInf(D, sigma=0.5, k=2, j=1)
    with pytest.raises(ValueError, match="k"):
        ExpInf(D, sigma=0.5, k=0)


def test_parse_noise_from_args_as_rs4a():
    args = argparse.Namespace(noise="ExpInf", sigma=0.5, lambd=None, k=2, j=None, a=None)
    noise = parse_noise_from_args(args, device="cpu", dim=D)
    assert isinstance(noise, ExpInf) and noise.k == 2 and noise.sigma == 0.5 and noise.dim == D
    args.noise = "Pareto"
    with pytest.raises(NotImplementedError):
        parse_noise_from_args(args, device="cpu", dim=D)
    args.noise = "Cauchy"
    with pytest.raises(ValueError, match="unknown noise"):
        parse_noise_from_args(args, device="cpu", dim=D)


# --------------------------------------------------------------------------------------------
# sample(x)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", NOISES, ids=IDS)
def test_sample_adds_the_noise_to_each_row(name, kw):
    d = 48
    noise = getattr(rs4a, name)(d, sigma=0.5, **kw)
    torch.manual_seed(0)
    x = torch.rand(4000, d)
    out = noise.sample(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    eps = (out - x).double()
    assert eps.pow(2).mean().sqrt().item() == pytest.approx(0.5, rel=0.03)  # sigma is the RMS per coordinate
    lam = noise.lambd
    if name == "Laplace":
        assert stats.kstest(eps.flatten().numpy()[:50_000], stats.laplace(scale=lam).cdf).pvalue > 1e-3
    if name == "Uniform":
        assert eps.abs().max().item() <= lam * (1 + 1e-6)
    if name == "ExpInf":  # per row: (||eps||_inf / lambd)^k ~ Gamma(d/k)
        s = (eps.abs().max(dim=1).values / lam).pow(noise.k).numpy()
        assert stats.kstest(s, stats.gamma(d / noise.k).cdf).pvalue > 1e-3
    images = torch.rand(10, 3, 4, 4)
    assert Laplace(D, sigma=0.5).sample(images).shape == images.shape  # (B, C, H, W) rows of dim elements
    with pytest.raises(ValueError, match="dim"):
        noise.sample(torch.rand(5, d + 1))


def test_sample_keeps_the_gradient_and_draws_fresh_noise():
    noise = Gaussian(D, sigma=0.5)
    x = torch.rand(3, D, requires_grad=True)
    noise.sample(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    a, b = noise.sample(x.detach()), noise.sample(x.detach())
    assert not torch.equal(a, b)
    torch.manual_seed(5)
    c = noise.sample(x.detach())
    torch.manual_seed(5)
    assert torch.equal(c, noise.sample(x.detach()))  # torch's global generator, as rs4a's draws


# --------------------------------------------------------------------------------------------
# src/smooth on the engine
# --------------------------------------------------------------------------------------------
class TwoSided(torch.nn.Module):
    """Logits [s z, -s z, -50] with z = u.x - t: class 0 when u.x > t."""

    def __init__(self, u, t, scale=1.0):
        super().__init__()
        self.register_buffer("u", u.reshape(-1).float())
        self.t, self.scale = float(t), float(scale)
        self.bn = torch.nn.BatchNorm1d(1)  # a mode-dependent layer (identity at its initial statistics in eval)

    def forward(self, x):
        z = self.scale * (x.flatten(1) @ self.u - self.t)
        if self.training:
            z = z + 0.0 * self.bn(z[:, None])[:, 0]
        return torch.stack([z, -z, torch.full_like(z, -50.0)], dim=1)


def _setup():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(D, generator=g)
    u /= u.norm()
    margins = torch.tensor([-0.3, 0.0, 0.2, 0.6])
    x = torch.rand(len(margins), D, generator=g)
    x = x - (x @ u)[:, None] * u + (0.1 + margins)[:, None] * u  # u.x - 0.1 = margin
    return TwoSided(u, 0.1), x.reshape(-1, 3, 4, 4), margins


def test_smooth_predict_hard_against_the_vote_law():
    model, x, margins = _setup()
    noise = Gaussian(D, sigma=0.25)
    n = 4000
    torch.manual_seed(1)
    preds = smooth_predict_hard(model, x, noise, sample_size=n, noise_batch_size=300)
    assert isinstance(preds, torch.distributions.Categorical) and preds.probs.shape == (4, 3)
    p0 = torch.tensor(stats.norm.cdf(margins.numpy() / 0.25))  # P(u.(x + eps) > t), ||u|| = 1
    se = (p0 * (1 - p0) / n).sqrt()
    assert ((preds.probs[:, 0].double() - p0).abs() <= 5 * se + 1e-12).all(), (preds.probs, p0)
    assert (preds.probs[:, 2] == 0).all()
    assert torch.allclose(preds.probs.sum(dim=1), torch.ones(4))


def test_smooth_predict_soft_against_the_mean_softmax():
    model, x, margins = _setup()
    model.scale = 4.0
    noise = Laplace(D, sigma=0.25)
    n = 3000
    torch.manual_seed(2)
    preds = smooth_predict_soft(model, x, noise, sample_size=n, noise_batch_size=512)
    # E softmax_0 = E sigmoid(2 s z), z = margin + u.eps: u.eps by simulation in numpy (independent)
    rng = np.random.default_rng(0)
    lam = noise.lambd
    proj = rng.laplace(scale=lam, size=(200_000, D)) @ model.u.double().numpy()
    for i, m in enumerate(margins.tolist()):
        values = 1 / (1 + np.exp(-2 * 4.0 * (m + proj)))
        expected, sd = values.mean(), values.std()
        assert abs(preds.probs[i, 0].item() - expected) <= 5 * sd / math.sqrt(n) + 5 * sd / math.sqrt(len(values))


def test_engine_counts_do_not_depend_on_packing_and_restore_the_mode():
    model, x, _ = _setup()
    noise = ExpInf(D, sigma=0.25, k=2)
    model.train()
    results = []
    for batch in (7, 512):
        torch.manual_seed(3)
        results.append(smooth_predict_hard(model, x, noise, sample_size=500, noise_batch_size=batch).probs)
    assert torch.equal(results[0], results[1])  # the noise of a copy depends on (seed, image, copy) only
    assert model.training  # run in eval mode, handed back as it came
    torch.manual_seed(4)
    assert not torch.equal(smooth_predict_hard(model, x, noise, sample_size=500).probs, results[0])


def test_certify_prob_lb_two_sided_clopper_pearson():
    """A base classifier that ignores its input: every vote for class 0, so the bound is rs4a's
    proportion_confint(n, n, alpha, "beta")[0] = Beta.ppf(alpha/2, n, 1) = (alpha/2)^(1/n), minus tau."""
    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[3.0, 0.0]]).expand(len(x), 2)

    noise = Laplace(D, sigma=0.5)
    x = torch.rand(3, 3, 4, 4)
    n, alpha = 2000, 0.01
    lower = certify_prob_lb(Constant(), x, torch.tensor([0, 0, 1]), alpha, noise, sample_size=n, noise_batch_size=256)
    assert lower.dtype == torch.float32 and lower.shape == (3,)
    tau = stream_tau(NoisePlan(noise.fastsmooth_noise, D))  # the stream's total-variation distance
    expected = (alpha / 2) ** (1 / n) - tau
    assert lower[0].item() == lower[1].item() <= expected and lower[0].item() == pytest.approx(expected, abs=1e-7)
    assert lower[2].item() == 0.0  # no votes for class 1
    with pytest.raises(ValueError, match="top_cats"):
        certify_prob_lb(Constant(), x, torch.tensor([0, 2, 0]), alpha, noise, sample_size=10)


def test_certify_prob_lb_covers_p_a():
    model, x, margins = _setup()
    noise = Gaussian(D, sigma=0.25)
    p0 = stats.norm.cdf(margins.numpy() / 0.25)
    n, alpha = 5000, 0.02
    torch.manual_seed(6)
    lower = certify_prob_lb(model, x, torch.zeros(4, dtype=torch.long), alpha, noise, sample_size=n).double().numpy()
    width = 6 * np.sqrt(p0 * (1 - p0) / n) + 4 / n  # the bound's 2.3 sigma below the estimate, and its noise
    assert (lower <= p0).all() and (lower >= p0 - width).all(), (lower, p0)


def test_rs4a_test_script_runs_unchanged():
    """rs4a's src/test.py loop, written against src.smooth / src.noises (only the import differs)."""
    model, x, margins = _setup()
    noise = parse_noise_from_args(argparse.Namespace(noise="Laplace", sigma=0.25, lambd=None, k=None, j=None, a=None),
                                  device="cpu", dim=D)
    y = (margins <= 0).long()
    torch.manual_seed(7)
    preds = smooth_predict_hard(model, x, noise, 64, noise_batch_size=512)
    top_cats = preds.probs.argmax(dim=1)
    prob_lb = certify_prob_lb(model, x, top_cats, 0.001, noise, 2000, noise_batch_size=512)
    radius_l1 = noise.certify_l1(prob_lb).cpu().numpy()
    radius_linf = noise.certify_linf(prob_lb).cpu().numpy()
    preds_nll = -preds.log_prob(y).cpu().numpy()
    assert radius_l1.shape == radius_linf.shape == (4,) and np.isfinite(preds_nll[margins.abs() > 0.1]).all()
    # the far images are certified on their side, within the true l1 / l_inf distance |margin| / ||u||_*
    u = model.u.numpy()
    assert top_cats[3] == 0 and radius_l1[3] > 0 and radius_l1[3] <= 0.6 / np.abs(u).max()
    assert radius_linf[3] <= 0.6 / np.abs(u).sum()


def test_direct_train_log_lik_is_rs4a_formula_and_differentiable():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(D, 5))
    noise = Uniform(D, sigma=0.3)
    x, y = torch.rand(4, 3, 4, 4), torch.tensor([0, 1, 4, 2])
    torch.manual_seed(8)
    ours = direct_train_log_lik(model, x, y, noise, sample_size=6)
    torch.manual_seed(8)  # rs4a's formula on the same draws
    samples = noise.sample(x.unsqueeze(1).expand(4, 6, 3, 4, 4).reshape(-1, 3, 4, 4))
    thetas = model(samples).view(4, 6, -1)
    theirs = torch.logsumexp(thetas[torch.arange(4), :, y] - torch.logsumexp(thetas, dim=2), dim=1) - math.log(6)
    assert torch.allclose(ours, theirs, atol=1e-6)
    # log of the mean softmax: below 0, and equal to log softmax for a model that ignores noise
    assert (ours < 0).all()
    (-ours.mean()).backward()
    assert model[1].weight.grad is not None and torch.isfinite(model[1].weight.grad).all()


def test_soft_mean_matches_direct_integration_for_gaussian():
    """Gaussian: E softmax_0 = E sigmoid(2 s (m + sigma Z)), a 1-D integral."""
    model, x, margins = _setup()
    model.scale = 3.0
    noise = Gaussian(D, sigma=0.25)
    n = 3000
    torch.manual_seed(9)
    probs = smooth_predict_soft(model, x, noise, sample_size=n, noise_batch_size=1000).probs[:, 0].double()
    for i, m in enumerate(margins.tolist()):
        f = lambda z: stats.norm.pdf(z) / (1 + math.exp(-2 * 3.0 * (m + 0.25 * z)))  # noqa: E731
        mean = integrate.quad(f, -12, 12)[0]
        second = integrate.quad(lambda z: f(z) / (1 + math.exp(-2 * 3.0 * (m + 0.25 * z))), -12, 12)[0]
        sd = math.sqrt(max(second - mean ** 2, 0.0))
        assert abs(probs[i].item() - mean) <= 5 * sd / math.sqrt(n) + 1e-6


def test_batches_on_the_8_bit_grid_are_sampled_on_it():
    """The engine runs in grid mode for a batch on the grid k / 255 and in float mode otherwise."""
    from fastsmooth.compat import rs4a

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    noise = rs4a.Gaussian(12, sigma=0.25)
    k = torch.randint(0, 256, (4, 12))
    rs4a.smooth_predict_hard(model, k / 255.0, noise, sample_size=32)
    assert rs4a._engine_slot["sampler"].input_grid == 255
    rs4a.smooth_predict_hard(model, k / 255.0 + 1e-3, noise, sample_size=32)
    assert rs4a._engine_slot["sampler"].input_grid is None
