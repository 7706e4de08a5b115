"""Noises (DESIGN.md §3): parameters and certified radii, against independent references (mpmath /
scipy formulas written out here, numerical integration). The samplers' laws: test_stream_laws.py.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from scipy import integrate, stats

import fastsmooth
from _differential_reference import expinf_linf_reference, laplace_linf_reference
from fastsmooth import ExpInf, Gaussian, Laplace, Uniform, make_noise

mpmath.mp.dps = 40
D_CIFAR = 3072
NORMS = ("l1", "l2", "linf")
EXPONENT = {"l1": 1, "l2": 2, "linf": math.inf}


def all_noises(sigma=1.0):
    return [Gaussian(sigma=sigma), Laplace(sigma=sigma), Uniform(sigma=sigma),
            ExpInf(k=1, sigma=sigma), ExpInf(k=2, sigma=sigma), ExpInf(k=0.5, sigma=sigma)]


NOISE_IDS = ["gaussian", "laplace", "uniform", "expinf1", "expinf2", "expinf0.5"]


# --------------------------------------------------------------------------------------------
# Independent reference: the §3 tables, written out again with mpmath.
# --------------------------------------------------------------------------------------------
def ref_sigma_over_scale(name, d, k=None):
    if name == "gaussian":
        return mpmath.mpf(1)
    if name == "laplace":
        return mpmath.sqrt(2)
    if name == "uniform":
        return 1 / mpmath.sqrt(3)
    d, k = mpmath.mpf(d), mpmath.mpf(k)
    return mpmath.sqrt((d + 2) / (3 * d) * mpmath.gamma((d + 2) / k) / mpmath.gamma(d / k))


# The differential method's l_inf radii (Laplace; ExpInf k != 1) are numerical: fastsmooth returns
# a lower bound within NUMERIC_REL of the quadrature reference (tests/_differential_reference.py).
NUMERIC_REL = 2e-5


def ref_direct(name, k, lam, p, d):
    """{norm: (radius, numerical?)} for the direct certificates of DESIGN §3."""
    fp, lam, p = float(p), mpmath.mpf(lam), mpmath.mpf(p)
    if name == "gaussian":
        return {"l2": (lam * mpmath.sqrt(2) * mpmath.erfinv(2 * p - 1), False)}
    if name == "laplace":
        return {"l1": (lam * mpmath.log(1 / (2 * (1 - p))), False),
                "linf": (lam * laplace_linf_reference(fp, d), True)}
    if name == "uniform":
        return {"l1": (2 * lam * (p - mpmath.mpf(1) / 2), False),
                "linf": (2 * lam * (1 - (mpmath.mpf(3) / 2 - p) ** (mpmath.mpf(1) / d)), False)}
    k = mpmath.mpf(k)
    out = {"l1": (2 * lam * d / (d - 1) * mpmath.gamma(d / k) / mpmath.gamma((d - 1) / k) * (p - mpmath.mpf(1) / 2), False)}
    if k == 1:
        out["linf"] = (lam * mpmath.log(1 / (2 * (1 - p))), False)
    else:
        out["linf"] = (lam * expinf_linf_reference(fp, d, float(k)), True)
    return out


def ref_convert(r, a, b, d):
    ea, eb = EXPONENT[a], EXPONENT[b]
    if eb <= ea:
        return r
    inv = lambda e: 0 if e == math.inf else mpmath.mpf(1) / e  # noqa: E731
    return r / mpmath.mpf(d) ** (inv(ea) - inv(eb))


def ref_radius_and_kind(noise, p, norm, d):
    """(the largest converted direct radius, whether a numerical certificate gives it)."""
    if p <= 0.5:
        return 0.0, False
    k = getattr(noise, "k", None)
    lam = noise.scale if noise.scale is not None else noise.sigma / ref_sigma_over_scale(noise.name, d, k)
    direct = ref_direct(noise.name, k, lam, p, d)
    value, numerical = max((ref_convert(r, a, norm, d), num) for a, (r, num) in direct.items())
    return float(value), numerical


def ref_radius(noise, p, norm, d):
    return ref_radius_and_kind(noise, p, norm, d)[0]


def assert_radius_matches(got, noise, p, norm, d):
    expected, numerical = ref_radius_and_kind(noise, p, norm, d)
    if numerical:  # a guaranteed lower bound: never above the exact value, at most NUMERIC_REL below
        assert expected * (1 - NUMERIC_REL) <= got <= expected * (1 + 1e-10), (noise, p, norm, d, got, expected)
    else:
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-15), (noise, p, norm, d)


# --------------------------------------------------------------------------------------------
# Radii
# --------------------------------------------------------------------------------------------
WORKED = {  # DESIGN.md §3, d = 3072, sigma = 1, rho = 0.6 / 0.9 / 0.99
    ("uniform", "l1"): (0.346410, 1.385641, 1.697410),
    ("laplace", "l1"): (0.157786, 1.138044, 2.766218),
    ("gaussian", "l2"): (0.253347, 1.281552, 2.326348),
}


@pytest.mark.parametrize("name,norm", list(WORKED))
def test_worked_values(name, norm):
    noise = make_noise(name, sigma=1.0)
    assert noise.default_norm == norm
    for rho, expected in zip((0.6, 0.9, 0.99), WORKED[name, norm]):
        assert round(noise.radius(rho, norm, D_CIFAR), 6) == pytest.approx(expected, abs=1.5e-6)
        assert noise.radius(rho, None, D_CIFAR) == noise.radius(rho, norm, D_CIFAR)


@pytest.mark.parametrize("noise", all_noises(0.7) + [Laplace(scale=0.3), Uniform(scale=2.0), ExpInf(k=1, scale=0.01),
                                                     ExpInf(k=3, scale=0.02)], ids=lambda n: repr(n))
@pytest.mark.parametrize("d", [2, 3, 784, D_CIFAR])
def test_radius_every_norm_matches_reference(noise, d):
    for p in (0.5000001, 0.51, 0.6, 0.75, 0.9, 0.99, 0.999999):
        for norm in NORMS:
            assert_radius_matches(noise.radius(p, norm, d), noise, p, norm, d)


def test_conversion_table_cells():
    d = D_CIFAR
    g, lap, uni, e1, e2 = Gaussian(sigma=0.5), Laplace(sigma=0.5), Uniform(sigma=0.5), ExpInf(k=1, sigma=0.5), ExpInf(k=2, sigma=0.5)
    for p in (0.55, 0.8, 0.999):
        r = {n: {m: n.radius(p, m, d) for m in NORMS} for n in (g, lap, uni, e1, e2)}
        # Gaussian: l1 = l2, linf = l2 / sqrt(d)
        assert r[g]["l1"] == pytest.approx(r[g]["l2"]) and r[g]["linf"] == pytest.approx(r[g]["l2"] / math.sqrt(d))
        # Laplace: l_inf direct (the differential method, far above l1 / d); l2 = max(l1 / sqrt(d), l_inf)
        lap_inf = lap.scale_for(d) * laplace_linf_reference(p, d)
        assert lap_inf * (1 - 1e-8) <= r[lap]["linf"] <= lap_inf and r[lap]["linf"] > 10 * r[lap]["l1"] / d
        assert r[lap]["l2"] == pytest.approx(max(r[lap]["l1"] / math.sqrt(d), r[lap]["linf"]), rel=1e-12)
        # Uniform: direct l_inf = 2 lam (1 - (3/2 - p)^(1/d)); l2 = max(l1 / sqrt(d), l_inf)
        lam = uni.scale_for(d)
        rinf = 2 * lam * (1 - (1.5 - p) ** (1 / d))
        assert r[uni]["linf"] == pytest.approx(max(rinf, r[uni]["l1"] / d), rel=1e-6)
        assert r[uni]["l2"] == pytest.approx(max(r[uni]["l1"] / math.sqrt(d), r[uni]["linf"]), rel=1e-9)
        # ExpInf k=1: l_inf = lam log(1 / (2(1-p))); k=2: l_inf direct (differential method) >= l1 / d
        assert r[e1]["linf"] == pytest.approx(e1.scale_for(d) * math.log(1 / (2 * (1 - p))))
        assert r[e1]["l2"] == pytest.approx(max(r[e1]["l1"] / math.sqrt(d), r[e1]["linf"]))
        e2_inf = e2.scale_for(d) * expinf_linf_reference(p, d, 2.0)
        assert e2_inf * (1 - NUMERIC_REL) <= r[e2]["linf"] <= e2_inf and r[e2]["linf"] >= r[e2]["l1"] / d
        assert r[e2]["l2"] == pytest.approx(max(r[e2]["l1"] / math.sqrt(d), r[e2]["linf"]), rel=1e-12)
        # A certified radius never grows under a sound move to a bigger-index norm.
        for n in r:
            assert r[n]["l1"] >= r[n]["l2"] * (1 - 1e-12) >= 0 and r[n]["l2"] >= r[n]["linf"] * (1 - 1e-12)


@pytest.mark.parametrize("k", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("d", [2, 3, 10])
def test_expinf_l1_radius_from_marginal_density(k, d):
    """R_1 = (p - 1/2) / f_1(0), f_1 the marginal density of one coordinate (its Lipschitz constant
    in l1 for a density that is unimodal in each coordinate); f_1(0) by numerical integration."""
    lam = 0.8
    if d == 2:  # a genuine 2-D integral of the density
        dens = lambda y, x: math.exp(-(max(x, y) / lam) ** k)  # noqa: E731  (on the quadrant x, y >= 0)
        z = 4 * integrate.dblquad(dens, 0, np.inf, 0, np.inf, epsabs=1e-12)[0]
        f0 = 2 * integrate.quad(lambda y: dens(y, 0.0), 0, np.inf, epsabs=1e-12)[0] / z
    else:  # shells of the l_inf ball: vol{||x||_inf <= r} = (2r)^d
        shell = lambda dd: integrate.quad(lambda r: math.exp(-(r / lam) ** k) * dd * 2 ** dd * r ** (dd - 1),  # noqa: E731
                                          0, np.inf, epsabs=1e-13)[0]
        f0 = shell(d - 1) / shell(d)
    noise = ExpInf(k=k, scale=lam)
    for p in (0.6, 0.9):
        expected = (p - 0.5) / f0
        # the direct l_inf certificate (lam log(1/(2(1-p))) at k = 1) is an l1 certificate too
        linf = lam * (math.log(1 / (2 * (1 - p))) if k == 1.0 else expinf_linf_reference(p, d, k))
        assert noise.radius(p, "l1", d) == pytest.approx(max(expected, linf), rel=2e-5)


@pytest.mark.parametrize("noise", all_noises(0.25), ids=NOISE_IDS)
def test_radius_zero_at_or_below_half_and_monotone(noise):
    d = 3072
    for norm in NORMS:
        for p in (0.0, 0.1, 0.4999999, 0.5):
            assert noise.radius(p, norm, d) == 0.0
        ps = np.linspace(0.5, 0.9999, 200)[1:]
        radii = [noise.radius(float(p), norm, d) for p in ps]
        assert all(r > 0 and math.isfinite(r) for r in radii)
        assert all(b > a for a, b in zip(radii, radii[1:])), norm
        r1 = noise.radius(1.0, norm, d)  # p_lower = 1 is valid input: never a math domain error
        assert r1 >= radii[-1]


@pytest.mark.parametrize("noise", all_noises(0.5), ids=NOISE_IDS)
def test_radius_scales_linearly_with_sigma(noise):
    twice = make_noise(**{**noise.spec(), "sigma": 2 * noise.sigma})
    for norm in NORMS:
        assert twice.radius(0.8, norm, 100) == pytest.approx(2 * noise.radius(0.8, norm, 100))


def test_largest_l2_radius_at_100k():
    """All n = 100,000 votes for c_A at alpha = 0.001: rho = alpha^(1/n), radius 3.8115 sigma (§4)."""
    rho = fastsmooth.clopper_pearson_lower(100_000, 100_000, 0.001)
    assert rho == pytest.approx(0.001 ** (1 / 100_000), rel=1e-12)
    for sigma in (1.0, 0.25):
        assert round(Gaussian(sigma=sigma).radius(rho, "l2", D_CIFAR) / sigma, 4) == 3.8115


# --------------------------------------------------------------------------------------------
# sigma <-> scale
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,k", [("gaussian", None), ("laplace", None), ("uniform", None),
                                    ("expinf", 1.0), ("expinf", 2.0), ("expinf", 0.5), ("expinf", 4.0)])
@pytest.mark.parametrize("d", [1, 2, 5, 784, D_CIFAR])
def test_sigma_scale_relation(name, k, d):
    kw = {"k": k} if k else {}
    ratio = float(ref_sigma_over_scale(name, d, k))
    by_sigma = make_noise(name, sigma=0.37, **kw)
    assert by_sigma.scale_for(d) == pytest.approx(0.37 / ratio, rel=1e-12)
    assert by_sigma.sigma_for(d) == 0.37
    by_scale = make_noise(name, scale=by_sigma.scale_for(d), **kw)
    assert by_scale.sigma_for(d) == pytest.approx(0.37, rel=1e-12)  # round trip
    assert by_scale.scale_for(d) == by_sigma.scale_for(d)
    # the same certificate whichever way the noise was given
    for norm in NORMS:
        assert by_scale.radius(0.9, norm, d) == pytest.approx(by_sigma.radius(0.9, norm, d), rel=1e-12)


def test_expinf_sigma_gamma_ratio_formula():
    # sigma = lambda sqrt((d+2)/(3d) Gamma((d+2)/k) / Gamma(d/k)); k = 1: Gamma(d+2)/Gamma(d) = d(d+1)
    d = 3072
    assert ExpInf(k=1, scale=1.0).sigma_for(d) == pytest.approx(math.sqrt((d + 2) / (3 * d) * d * (d + 1)), rel=1e-12)
    # k = 2: Gamma(d/2 + 1) / Gamma(d/2) = d/2
    assert ExpInf(k=2, scale=1.0).sigma_for(d) == pytest.approx(math.sqrt((d + 2) / (3 * d) * d / 2), rel=1e-12)


# --------------------------------------------------------------------------------------------
# Construction, validation, spec
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Gaussian, Laplace, Uniform, ExpInf])
def test_invalid_parameters(cls):
    for bad in (0, 0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="sigma"):
            cls(sigma=bad)
        with pytest.raises(ValueError, match="scale"):
            cls(scale=bad)
    with pytest.raises(ValueError, match="exactly one"):
        cls()
    with pytest.raises(ValueError, match="exactly one"):
        cls(sigma=1.0, scale=1.0)


def test_invalid_k_name_norm_p():
    for k in (0, -1, -0.5, math.nan):
        with pytest.raises(ValueError, match="k"):
            ExpInf(k=k, sigma=1.0)
        with pytest.raises(ValueError):
            make_noise("expinf", k=k, sigma=1.0)
    with pytest.raises(ValueError, match="unknown noise"):
        make_noise("cauchy", sigma=1.0)
    with pytest.raises(ValueError):
        make_noise("gaussian", sigma=1.0, k=2)  # k only for expinf
    with pytest.raises(ValueError):
        make_noise("gaussian")
    for noise in all_noises():
        with pytest.raises(ValueError, match="norm"):
            noise.radius(0.9, "l3", 10)
        with pytest.raises(ValueError, match="norm"):
            noise.radius(0.9, "L2", 10)
        for p in (-0.1, 1.0000001, 2.0, math.nan):
            with pytest.raises(ValueError, match="p_lower"):
                noise.radius(p, "l2", 10)
        for d in (0, -3):
            with pytest.raises(ValueError):
                noise.radius(0.9, "l2", d)


@pytest.mark.parametrize("noise", all_noises(0.3) + [Laplace(scale=0.2), ExpInf(k=3.0, scale=0.01)], ids=repr)
def test_spec_round_trip(noise):
    import json

    spec = json.loads(json.dumps(noise.spec()))
    again = make_noise(**spec)
    assert type(again) is type(noise) and again == noise and hash(again) == hash(noise)
    assert again.spec() == noise.spec()
    assert ("sigma" in spec) != ("scale" in spec)
    assert ("k" in spec) == (noise.name == "expinf")
    for norm in NORMS:
        assert again.radius(0.77, norm, 50) == noise.radius(0.77, norm, 50)
    assert make_noise(noise.name.upper(), **{k: v for k, v in spec.items() if k != "name"}) == noise


def test_default_norms_and_names():
    assert Gaussian(sigma=1).default_norm == "l2"
    for n in (Laplace(sigma=1), Uniform(sigma=1), ExpInf(sigma=1)):
        assert n.default_norm == "l1"
    assert [n.name for n in all_noises()] == ["gaussian", "laplace", "uniform", "expinf", "expinf", "expinf"]
    assert Gaussian(sigma=0.5) != Laplace(sigma=0.5) and ExpInf(k=1, sigma=1) != ExpInf(k=2, sigma=1)


# --------------------------------------------------------------------------------------------
# Radii are sound at the exact p_A of linear classifiers (no sampling)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.05, 0.3, 0.9, 2.0])
def test_radius_at_exact_pA_axis_aligned(t):
    """f(x) = sign(x_1 + t): the boundary is at distance t in every norm. p_A = P(eps_1 > -t) from
    the marginal. Laplace and Uniform l1 radii are then exactly t; nothing may exceed t."""
    d, sigma = 3072, 1.0
    lap, uni, gau = Laplace(sigma=sigma), Uniform(sigma=sigma), Gaussian(sigma=sigma)
    lam_l, lam_u = lap.scale_for(d), uni.scale_for(d)
    p_lap = float(stats.laplace(scale=lam_l).sf(-t))
    assert lap.radius(p_lap, "l1", d) == pytest.approx(t, rel=1e-9)
    if t < lam_u:
        p_uni = float(stats.uniform(loc=-lam_u, scale=2 * lam_u).sf(-t))
        assert uni.radius(p_uni, "l1", d) == pytest.approx(t, rel=1e-9)
        for norm in NORMS:
            assert uni.radius(p_uni, norm, d) <= t * (1 + 1e-9)
    p_gau = float(stats.norm.sf(-t / sigma))
    assert gau.radius(p_gau, "l2", d) == pytest.approx(t, rel=1e-9)
    for norm in NORMS:
        assert lap.radius(p_lap, norm, d) <= t * (1 + 1e-9)
        assert gau.radius(p_gau, norm, d) <= t * (1 + 1e-9)


def test_uniform_linf_radius_sound_on_diagonal():
    """d = 2, f(x) = sign(x_1 + x_2 + s): l_inf distance s/2; eps_1 + eps_2 is triangular."""
    lam = 1.0
    noise = Uniform(scale=lam)
    for s in (0.1, 0.5, 1.0, 1.5, 1.9):
        p = 1 - (2 * lam - s) ** 2 / (8 * lam ** 2)
        r = noise.radius(p, "linf", 2)
        assert 0 < r <= s / 2
        assert noise.radius(p, "l2", 2) <= s / math.sqrt(2)


# --------------------------------------------------------------------------------------------
# p_for_radius: the inverse of radius
# --------------------------------------------------------------------------------------------
INVERSE_NOISES = all_noises(0.5) + [ExpInf(k=10, sigma=0.5), Laplace(scale=0.2)]


@pytest.mark.parametrize("noise", INVERSE_NOISES, ids=repr)
@pytest.mark.parametrize("d", [1, 2, 784, D_CIFAR])
def test_p_for_radius_inverts_radius(noise, d):
    for norm in NORMS:
        for p in (0.5000001, 0.51, 0.7, 0.9, 0.999, 0.999999):
            r = noise.radius(p, norm, d)
            q = noise.p_for_radius(r, norm, d)
            assert 0.5 < q <= p
            assert noise.radius(q, norm, d) >= r  # erring high is safe; this is exact
            assert noise.radius(math.nextafter(q, 0.0), norm, d) < r  # the smallest double that certifies
            assert noise.radius(q - 1e-9, norm, d) < r
        # radii no p certifies (above the one at p = 1): inf; radius 0: any p above 1/2
        top = noise.radius(1.0, norm, d)
        assert noise.p_for_radius(0.0, norm, d) == 0.5
        if math.isfinite(top):
            assert noise.p_for_radius(top * 1.001 + 1e-12, norm, d) == math.inf
            assert noise.p_for_radius(top, norm, d) <= 1.0
        else:  # unbounded radii: p = 1 certifies any radius, and a large one is reached below it
            large = 1.5 * noise.radius(0.999999, norm, d)
            q = noise.p_for_radius(large, norm, d)
            assert 0.999999 < q <= 1.0 and noise.radius(q, norm, d) >= large
            assert noise.p_for_radius(math.inf, norm, d) == 1.0


def test_p_for_radius_closed_forms():
    d = D_CIFAR
    g, lap, uni = Gaussian(sigma=0.5), Laplace(sigma=0.5), Uniform(sigma=0.5)
    for r in (0.1, 0.5, 1.2):
        assert g.p_for_radius(r, "l2", d) == pytest.approx(stats.norm.cdf(r / 0.5), rel=1e-14)
        assert g.p_for_radius(r / math.sqrt(d), "linf", d) == pytest.approx(stats.norm.cdf(r / 0.5), rel=1e-12)
        assert lap.p_for_radius(r, "l1", d) == pytest.approx(1 - 0.5 * math.exp(-r / lap.scale_for(d)), rel=1e-14)
        assert uni.p_for_radius(r / 2, "l1", d) == pytest.approx(0.5 + r / 4 / uni.scale_for(d), rel=1e-14)
    # Laplace in l2 through max(l1 / sqrt(d), l_inf): the l_inf certificate needs a smaller p here
    r2 = 0.0005
    assert lap.p_for_radius(r2, "l2", d) == lap.p_for_radius(r2, "linf", d) < lap.p_for_radius(r2 * math.sqrt(d), "l1", d)


def test_p_for_radius_rejects_bad_radii():
    for bad in (-0.1, math.nan, "x", None):
        with pytest.raises(ValueError, match="radius"):
            Laplace(sigma=0.5).p_for_radius(bad, "l1", 10)
    with pytest.raises(ValueError, match="norm"):
        Laplace(sigma=0.5).p_for_radius(0.1, "l3", 10)
