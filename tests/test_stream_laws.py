"""The stream's float-mode noise follows its law (DESIGN §3), on the Triton kernels (the interpreter
without a GPU) and on the native CPU twin: marginals by Kolmogorov-Smirnov and moments, independence of
the coordinates that share a Philox call, the exact laws of whole-copy norms, and ExpInf's radius law,
single face and uniform face index. (The torch backend draws what these draw: test_backends.py.)

All draws use fixed seeds, so every test is deterministic; the thresholds (p > 1e-3, 5 standard
errors) would fail a correct sampler with small probability for other seeds."""

import math

import pytest
import torch
from scipy import stats

from fastsmooth.backends import draw_noise
from fastsmooth.kernels.philox import philox4x32_reference
from fastsmooth.kernels.samplers import MAX_GAMMA_ITERATIONS, expinf_copy_twin
from fastsmooth.noises import make_noise
from fastsmooth.seeding import philox_key

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
P_MIN = 1e-3
BACKENDS = ["triton", "native"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def draw(noise, copies, shape, seed, image_index=0, backend="native"):
    """eps of ``copies`` copies (float64 on the CPU, (copies, d)): the backend's fill of x = 0."""
    device = DEVICE if backend == "triton" else "cpu"
    eps = draw_noise(noise, copies, shape, seed=seed, image_index=image_index, device=device, backend=backend)
    return eps.cpu().reshape(copies, -1).double()


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
def test_marginal_law(name, backend):
    noise, law, var = MARGINALS[name]
    eps = draw(noise, 64, (512,), seed=2024, backend=backend)        # 32768 values
    assert torch.isfinite(eps).all()
    assert stats.kstest(eps.reshape(-1).numpy(), law.cdf).pvalue > P_MIN
    assert_mean(eps, 0.0, math.sqrt(var))
    # variance: se of the sample variance ~ sqrt((m4 - var^2) / n)
    m4 = law.moment(4)
    assert_mean(eps ** 2, var, math.sqrt(m4 - var ** 2))


@pytest.mark.parametrize("name", list(MARGINALS))
def test_lanes_of_one_philox_call_are_independent(name, backend):
    noise = MARGINALS[name][0]
    eps = draw(noise, 256, (512,), seed=77, backend=backend)
    lanes = eps.reshape(256, 4, 128).permute(1, 0, 2).reshape(4, -1)   # elements e, e+128, e+256, e+384
    corr = torch.corrcoef(lanes)
    off = corr[~torch.eye(4, dtype=torch.bool)]
    assert off.abs().max() < 5 / math.sqrt(lanes.shape[1])
    # the Box-Muller partners (lanes 0 and 1) are also independent in magnitude
    corr_abs = torch.corrcoef(lanes.abs())
    assert corr_abs[0, 1].abs() < 5 / math.sqrt(lanes.shape[1])


NORM_LAWS = {
    # noise, the statistic of a whole copy (d = 18, lambda = 0.5) and its exact law
    "gaussian": (make_noise("gaussian", scale=0.5), lambda e: (e ** 2).sum(1) / 0.25, stats.chi2(18)),
    "laplace": (make_noise("laplace", scale=0.5), lambda e: e.abs().sum(1) / 0.5, stats.gamma(18)),
    "uniform": (make_noise("uniform", scale=0.5), lambda e: e.abs().max(1).values / 0.5, stats.beta(18, 1)),
    "expinf1": (make_noise("expinf", k=1.0, scale=0.5), lambda e: e.abs().max(1).values / 0.5, stats.gamma(18)),
    "expinf3": (make_noise("expinf", k=3.0, scale=0.5), lambda e: (e.abs().max(1).values / 0.5) ** 3,
                stats.gamma(6)),
}


@pytest.mark.parametrize("name", list(NORM_LAWS))
def test_whole_copy_norm_law(name, backend):
    """Norms of whole copies against their exact laws: ||eps||_2^2 / lambda^2 ~ chi2(d) (Gaussian),
    ||eps||_1 / lambda ~ Gamma(d) (Laplace), ||eps||_inf / lambda ~ Beta(d, 1) (Uniform: the maximum
    of d uniforms on (0, 1)), (||eps||_inf / lambda)^k ~ Gamma(d / k) (ExpInf)."""
    noise, statistic, law = NORM_LAWS[name]
    eps = draw(noise, 1500, (2, 3, 3), seed=31, backend=backend)
    assert stats.kstest(statistic(eps).numpy(), law.cdf).pvalue > P_MIN


@pytest.mark.parametrize("k,dim", [(1.0, 12), (2.0, 12), (24.0, 12), (0.5, 7)])
def test_expinf_radius_face_and_direction(k, dim, backend):
    lam = 0.3
    noise = make_noise("expinf", k=k, scale=lam)
    copies = 2000
    eps = draw(noise, copies, (dim,), seed=11, image_index=3, backend=backend)
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


def test_expinf_radius_law_large_dim(backend):
    """Large Gamma shapes (d/k in the thousands), where a float32 acceptance test would cancel."""
    lam, dim = 0.05, 3072
    noise = make_noise("expinf", k=1.0, scale=lam)
    eps = draw(noise, 200, (3, 32, 32), seed=8, backend=backend)
    r = eps.abs().max(dim=1).values
    assert stats.kstest((r / lam).numpy(), stats.gamma(dim).cdf).pvalue > P_MIN
    # the torch twin of the same per-copy draw at ImageNet size and many copies: s ~ Gamma(d / k)
    big, copies = 150528, torch.arange(20000)
    k0, k1 = philox_key(8)
    log_s, j, sign = expinf_copy_twin(lambda c0, tag: philox4x32_reference(c0, copies, 0, tag, k0, k1),
                                      copies, big, 2.0, MAX_GAMMA_ITERATIONS)
    assert stats.kstest(torch.exp(log_s).numpy(), stats.gamma(big / 2).cdf).pvalue > P_MIN
    assert int(j.min()) >= 0 and int(j.max()) < big
    assert stats.binomtest(int((sign > 0).sum()), 20000).pvalue > P_MIN
