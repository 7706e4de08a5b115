"""The kernels' noise follows its law (DESIGN §3): marginals by Kolmogorov-Smirnov and moments,
independence of the coordinates that share a Philox call, the exact samplers of fastsmooth.noises
by two-sample KS, and ExpInf's radius law, single face and uniform face index.

All draws use fixed seeds, so every test is deterministic; the thresholds (p > 1e-3, 5 standard
errors) would fail a correct sampler with small probability for other seeds."""

import importlib
import math

import pytest
import torch
from scipy import stats

from fastsmooth.kernels import perturb
from fastsmooth.noises import make_noise

pk = importlib.import_module("fastsmooth.kernels.perturb")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
P_MIN = 1e-3


def draw(noise, copies, shape, seed, image_index=0):
    """eps of ``copies`` copies (float32, CPU): the kernel applied to x = 0."""
    x = torch.zeros(shape, device=DEVICE)
    return perturb(x, copies, noise, seed, image_index=image_index).cpu().reshape(copies, -1).double()


def assert_mean(sample: torch.Tensor, mean: float, sd: float):
    se = sd / math.sqrt(sample.numel())
    assert abs(float(sample.mean()) - mean) < 5 * se, (float(sample.mean()), mean, se)


MARGINALS = {
    # name: (noise, scipy law of eps, variance)
    "gaussian": (make_noise("gaussian", sigma=0.7), stats.norm(scale=0.7), 0.49),
    "laplace": (make_noise("laplace", scale=0.4), stats.laplace(scale=0.4), 2 * 0.16),
    "uniform": (make_noise("uniform", scale=0.9), stats.uniform(loc=-0.9, scale=1.8), 0.81 / 3),
}


@pytest.mark.parametrize("name", list(MARGINALS))
def test_marginal_law(name):
    noise, law, var = MARGINALS[name]
    eps = draw(noise, 64, (512,), seed=2024)                         # 32768 values
    assert torch.isfinite(eps).all()
    assert stats.kstest(eps.reshape(-1).numpy(), law.cdf).pvalue > P_MIN
    assert_mean(eps, 0.0, math.sqrt(var))
    # variance: se of the sample variance ~ sqrt((m4 - var^2) / n)
    m4 = law.moment(4)
    assert_mean(eps ** 2, var, math.sqrt(m4 - var ** 2))


@pytest.mark.parametrize("name", list(MARGINALS))
def test_lanes_of_one_philox_call_are_independent(name):
    noise = MARGINALS[name][0]
    eps = draw(noise, 256, (512,), seed=77)
    lanes = eps.reshape(256, 4, 128).permute(1, 0, 2).reshape(4, -1)   # elements e, e+128, e+256, e+384
    corr = torch.corrcoef(lanes)
    off = corr[~torch.eye(4, dtype=torch.bool)]
    assert off.abs().max() < 5 / math.sqrt(lanes.shape[1])
    # the Box-Muller partners (lanes 0 and 1) are also independent in magnitude
    corr_abs = torch.corrcoef(lanes.abs())
    assert corr_abs[0, 1].abs() < 5 / math.sqrt(lanes.shape[1])


@pytest.mark.parametrize("spec", [dict(name="gaussian", sigma=0.5), dict(name="laplace", sigma=0.5),
                                  dict(name="uniform", sigma=0.5), dict(name="expinf", k=1.0, sigma=0.5),
                                  dict(name="expinf", k=3.0, sigma=0.5)],
                         ids=lambda s: f"{s['name']}{s.get('k', '')}")
def test_matches_exact_sampler(spec):
    """Two-sample KS against noise.sample (the exact torch sampler) on norms of whole copies."""
    noise = make_noise(**spec)
    copies, shape = 1500, (2, 3, 3)                                  # d = 18
    eps = draw(noise, copies, shape, seed=31)
    ref = noise.sample((copies, *shape), generator=torch.Generator().manual_seed(5)).reshape(copies, -1).double()
    for p in (1, 2, math.inf):
        a = torch.linalg.vector_norm(eps, ord=p, dim=1).numpy()
        b = torch.linalg.vector_norm(ref, ord=p, dim=1).numpy()
        assert stats.ks_2samp(a, b).pvalue > P_MIN, p
    assert stats.ks_2samp(eps[:, 0].numpy(), ref[:, 0].numpy()).pvalue > P_MIN


@pytest.mark.parametrize("k,dim", [(1.0, 12), (2.0, 12), (24.0, 12), (0.5, 7)])
def test_expinf_radius_face_and_direction(k, dim):
    lam = 0.3
    noise = make_noise("expinf", k=k, scale=lam)
    copies = 2000
    eps = draw(noise, copies, (dim,), seed=11, image_index=3)
    a = eps.abs()
    r = a.max(dim=1).values
    # radius law: (||eps||_inf / lambda)^k ~ Gamma(d/k, 1)
    assert stats.kstest(((r / lam) ** k).numpy(), stats.gamma(dim / k).cdf).pvalue > P_MIN
    # exactly one coordinate on a face of the cube, i.e. |eps_j| = r, per copy
    on_face = a == r[:, None]
    assert (on_face.sum(dim=1) == 1).all()
    j = on_face.to(torch.int64).argmax(dim=1)
    assert stats.chisquare(torch.bincount(j, minlength=dim).numpy()).pvalue > P_MIN
    face_sign = eps.gather(1, j[:, None]).squeeze(1) > 0
    assert stats.binomtest(int(face_sign.sum()), copies).pvalue > P_MIN
    # the other coordinates, divided by r, are uniform on (-1, 1)
    u = (eps / r[:, None])[~on_face]
    assert stats.kstest(u.numpy(), stats.uniform(loc=-1, scale=2).cdf).pvalue > P_MIN
    # E ||eps||_1 = E[r] (d + 1) / 2 with E[r] = lambda Gamma((d+1)/k) / Gamma(d/k)
    mean_r = lam * math.exp(math.lgamma((dim + 1) / k) - math.lgamma(dim / k))
    l1 = eps.abs().sum(dim=1)
    assert_mean(l1, mean_r * (dim + 1) / 2, float(l1.std()))


def test_expinf_radius_law_large_dim():
    """Large Gamma shapes (d/k in the thousands), where a float32 acceptance test would cancel."""
    lam, dim = 0.05, 3072
    noise = make_noise("expinf", k=1.0, scale=lam)
    eps = draw(noise, 200, (3, 32, 32), seed=8)
    r = eps.abs().max(dim=1).values
    assert stats.kstest((r / lam).numpy(), stats.gamma(dim).cdf).pvalue > P_MIN
    # the reference of the same per-copy radius at ImageNet size and many copies
    big = 150528
    rr, j, sign = pk.expinf_copy_reference(8, 0, torch.arange(20000), big, 1.0, 2.0)
    assert stats.kstest((rr.double() ** 2).numpy(), stats.gamma(big / 2).cdf).pvalue > P_MIN
    assert int(j.min()) >= 0 and int(j.max()) < big
    assert stats.binomtest(int((sign > 0).sum()), 20000).pvalue > P_MIN
