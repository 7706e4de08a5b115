"""Sequential CERTIFY (issue 13; DESIGN §4): target radii and the anytime full radius on the API.

* bookkeeping: the bound is the anytime confidence sequence at the votes used, minus tau; the
  radius is the target certified (radii) or that of the bound (sequential); selection as Cohen's;
* every row depends only on (seed, image index): the same under any batch size, images in flight,
  overlap, and alone or in a stream; Cohen's fixed-n CERTIFY is unchanged;
* soundness by simulation (slow): a one-pixel linear classifier under Gaussian noise, whose true l2
  radius is its margin, at margins just below each target radius: the rate of false certificates
  of each mode is at most alpha (a one-sided binomial test at level 1e-3), while a bound without
  confidence (the point estimate at the stopping time) is caught by the same check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from fastsmooth import Gaussian, Laplace, Smooth
from fastsmooth.sampler import Job
from fastsmooth.smooth import AnytimeRadius, TargetRadii
from fastsmooth.stats import anytime_lower, clopper_pearson_lower

RADII = [0.25, 0.5, 0.75]


class OnePixel(nn.Module):
    """Logits [0, x_j - t]: class 1 where pixel j is above t. Under Gaussian noise of sigma the
    smoothed classifier has the same boundary, p_A = Phi(|x_j - t| / sigma), and its true l2 radius
    is |x_j - t|: the certified radius sigma Phi^-1(p_A) equals it exactly at p_A."""

    def __init__(self, pixel: int = 1, threshold: float = 0.3):
        super().__init__()
        self.pixel, self.threshold = pixel, threshold

    def forward(self, x):
        z = x.flatten(1)[:, self.pixel].double() - self.threshold
        return torch.stack([torch.zeros_like(z), z], dim=1).float()

    def image(self, margin: float) -> torch.Tensor:
        x = torch.full((1, 2, 2), 0.5)
        x.view(-1)[self.pixel] = self.threshold + margin
        return x


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def _images(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand((3, 2, 2), generator=g) for _ in range(count)]


def _key(c):
    return (c.image_index, c.prediction, c.radius, c.p_lower, c.n, c.n_a, tuple(c.counts.tolist()),
            tuple(c.counts0.tolist()))


# --------------------------------------------------------------------------------------------
# Bookkeeping
# --------------------------------------------------------------------------------------------
def test_target_radii_bookkeeping():
    model = OnePixel()
    smooth = Smooth(model, 2, Gaussian(sigma=0.25), precision="fp32", seed=1)
    tau = smooth.sampler.tv_bound(4)
    for margin, index in ((1.0, 0), (0.6, 1), (0.3, 2), (0.05, 3), (-0.6, 4)):
        cert = smooth.certify(model.image(margin), n0=100, n=20_000, alpha=0.001, radii=RADII, image_index=index)
        assert int(cert.counts.sum()) == cert.n <= 20_000 and int(cert.counts0.sum()) == 100
        c_a = int(cert.counts0.argmax())
        assert cert.n_a == int(cert.counts[c_a])
        assert cert.p_lower == pytest.approx(max(0.0, anytime_lower(cert.n_a, cert.n, 0.001) - tau), abs=1e-15)
        assert cert.radius in [0.0] + RADII
        if cert.abstained:
            assert cert.radius == 0.0 and cert.p_lower <= 0.5
        else:
            assert cert.prediction == c_a and cert.p_lower > 0.5
            assert smooth.noise.radius(cert.p_lower, "l2", 4) >= cert.radius  # the target is supported
        true_class, distance = int(margin > 0), abs(margin)
        if distance >= 0.9:  # far beyond the last target: certified there, early
            assert (cert.prediction, cert.radius) == (true_class, 0.75) and cert.n < 20_000
        if distance < 0.2:  # below the first target: no target certified
            assert cert.radius == 0.0
    # the clear-cut image stops as soon as the bound passes 3 sigma: 6,000-8,000 votes, not 20,000
    clear = smooth.certify(model.image(1.5), n0=100, n=100_000, alpha=0.001, radii=RADII, image_index=9)
    assert clear.radius == 0.75 and 5_000 < clear.n < 9_000


def test_sequential_bookkeeping_and_tolerance():
    model = OnePixel()
    smooth = Smooth(model, 2, Gaussian(sigma=0.25), precision="fp32", seed=2)
    tau = smooth.sampler.tv_bound(4)
    for margin, index in ((0.3, 0), (0.1, 1), (2.0, 2), (-0.02, 3)):
        cert = smooth.certify(model.image(margin), n0=100, n=40_000, alpha=0.001, sequential=True, image_index=index)
        assert int(cert.counts.sum()) == cert.n <= 40_000
        assert cert.p_lower == pytest.approx(max(0.0, anytime_lower(cert.n_a, cert.n, 0.001) - tau), abs=1e-15)
        if cert.abstained:
            assert cert.radius == 0.0
        else:
            assert cert.radius == smooth.noise.radius(cert.p_lower, "l2", 4)
        if cert.n < 40_000:  # stopped early: the cap at this vote rate would not give 1 % more
            rule = AnytimeRadius(0.01, smooth.noise, "l2", 4, 0.001, 40_000, tau)
            assert rule.stops(cert.n_a, cert.n)
    # a looser tolerance stops no later
    x = model.image(0.3)
    tight = smooth.certify(x, n=40_000, sequential=True, tolerance=0.005, image_index=5)
    loose = smooth.certify(x, n=40_000, sequential=True, tolerance=0.05, image_index=5)
    assert loose.n <= tight.n and loose.counts0.equal(tight.counts0)


def test_sequential_rows_do_not_depend_on_batching_or_streaming():
    """Each image's rounds depend only on its own counts: the certificates are the same for any
    batch size, number of images in flight and overlap, and alone (certify) or in a stream."""
    model = OnePixel()
    smooth = Smooth(model, 2, Gaussian(sigma=0.4), precision="fp32", seed=5)
    xs, indices = [model.image(m) for m in (0.05, 0.15, 0.3, 0.6, -0.2, 1.0)], [4, 0, 11, 2, 7, 5]
    for mode in (dict(radii=[0.1, 0.3]), dict(sequential=True, tolerance=0.02)):
        alone = {i: _key(smooth.certify(x, n0=30, n=3000, alpha=0.01, batch_size=128, image_index=i, **mode))
                 for i, x in zip(indices, xs)}
        assert len({k[4] for k in alone.values()}) > 1  # images stopped at different times
        for batch_size, in_flight, smooth.overlap in ((1000, None, False), (97, 2, True), (64, 1, False), (4096, 3, True)):
            stream = list(smooth.certify_many(zip(indices, xs), n0=30, n=3000, alpha=0.01, batch_size=batch_size,
                                              images_per_group=in_flight, **mode))
            assert [c.image_index for c in stream] == indices
            assert {c.image_index: _key(c) for c in stream} == alone, (mode, batch_size, in_flight)
    smooth.overlap = False


def test_fixed_n_certify_is_cohen_on_the_engine_counts():
    """The default mode: counts of copies [0, n0) and [n0, n0 + n) drawn by the sampler directly,
    Clopper-Pearson at n, as before the sequential modes (rows bit-identical)."""
    smooth = Smooth(_mlp(1), 4, Gaussian(sigma=0.4), precision="fp32", seed=8)
    for i, x in enumerate(_images(3, seed=1)):
        cert = smooth.certify(x, n0=50, n=700, alpha=0.01, image_index=i)
        counts0, counts = smooth.sampler.run([Job(x, i, 0, 50), Job(x, i, 50, 700)], batch_size=64)
        c_a = int(counts0.argmax())
        p_lower = max(0.0, clopper_pearson_lower(int(counts[c_a]), 700, 0.01) - smooth.sampler.tv_bound(12))
        assert torch.equal(cert.counts0, counts0) and torch.equal(cert.counts, counts)
        assert cert.p_lower == p_lower and cert.n == 700
        assert cert.radius == (smooth.noise.radius(p_lower, "l2", 12) if p_lower > 0.5 else 0.0)


def test_target_thresholds_other_noise_and_norm():
    """Targets in another noise and norm (Laplace, l1): the reported radius is supported by p_lower."""
    model = OnePixel(threshold=0.2)
    smooth = Smooth(model, 2, Laplace(sigma=0.3), precision="fp32", seed=3)
    for i, margin in enumerate((0.05, 0.2, 0.5, 1.5)):
        cert = smooth.certify(model.image(margin), n0=50, n=20_000, alpha=0.01, radii=[0.1, 0.3, 0.6], image_index=i)
        if not cert.abstained:
            assert smooth.noise.radius(cert.p_lower, "l1", 4) >= cert.radius
            assert cert.radius in (0.0, 0.1, 0.3, 0.6)


def test_argument_checks():
    smooth = Smooth(_mlp(), 4, Gaussian(sigma=0.4), precision="fp32")
    x = _images(1)[0]
    with pytest.raises(ValueError, match="exclude"):
        smooth.certify(x, n=100, radii=[0.1], sequential=True)
    for bad in ([], [-0.1], [math.nan], ["a"], 0.5):
        with pytest.raises(ValueError, match="radii"):
            smooth.certify(x, n=100, radii=bad)
    for bad in (0, -0.01, math.inf):
        with pytest.raises(ValueError, match="tolerance"):
            smooth.certify(x, n=100, sequential=True, tolerance=bad)
    with pytest.raises(ValueError, match="images_per_group"):
        list(smooth.certify_many([(0, x)], n=100, images_per_group=0))


def test_rules_stop_only_when_the_answer_is_known():
    """TargetRadii: certified at the top target as soon as the bound passes its threshold; the
    upper bound below a threshold ends the search there; below 1/2 it abstains."""
    noise, alpha, cap = Gaussian(sigma=0.25), 0.001, 100_000
    rule = TargetRadii(RADII, noise, "l2", 784, alpha, cap, 0.0)
    assert rule.stops(100_000, 100_000)                      # the cap
    assert not rule.stops(500, 500) and rule.stops(8000, 8000)  # all votes: 3 sigma needs ~6,500
    assert rule.answer(3, float(rule.p_lower(8000, 8000))) == (3, 0.75)
    assert rule.stops(4500, 5000)                            # p_hat 0.9: above Phi(1), clearly below Phi(2)
    assert rule.answer(3, float(rule.p_lower(4500, 5000))) == (3, 0.25)
    assert rule.stops(2000, 5000) and rule.answer(3, float(rule.p_lower(2000, 5000))) == (Smooth.ABSTAIN, 0.0)
    assert not rule.stops(2480, 5000)                        # p_hat 0.496: 1/2 not yet excluded
    # rounds aim at the stopping point: all votes after 500 -> the round that reaches 3 sigma
    more = rule.next_round(500, 500)
    assert rule.stops(500 + more, 500 + more) and not rule.stops(500 + more - 200, 500 + more - 200)


# --------------------------------------------------------------------------------------------
# Soundness by simulation
# --------------------------------------------------------------------------------------------
ALPHA, SIGMA, CAP, TRIALS = 0.05, 0.5, 2000, 400


def _false_certificates(mode: dict, margin: float, seed: int):
    """(false certificates, certified) over TRIALS images at ``margin`` (true class 1, true radius
    = margin), each with its own noise (image indices 0 .. TRIALS - 1)."""
    model = OnePixel()
    smooth = Smooth(model, 2, Gaussian(sigma=SIGMA), backend="torch", precision="fp32", seed=seed)
    x = model.image(margin)
    false = certified = 0
    for cert in smooth.certify_many(((i, x) for i in range(TRIALS)), n0=20, n=CAP, alpha=ALPHA,
                                    batch_size=4096, **mode):
        if cert.abstained:
            continue
        certified += 1
        false += cert.prediction != 1 or cert.radius > margin
    return false, certified


def _assert_at_most_alpha(false: int, what: str) -> None:
    p_value = stats.binom.sf(false - 1, TRIALS, ALPHA)  # P(Binomial(TRIALS, alpha) >= false)
    assert p_value > 1e-3, f"{what}: {false} false certificates of {TRIALS} (alpha {ALPHA}); p = {p_value:.1e}"


@pytest.mark.slow
@pytest.mark.parametrize("target", RADII)
def test_target_radii_false_certification_rate(target):
    margin = target - 0.01  # just below: the target is false, and the votes come close to it
    false, certified = _false_certificates(dict(radii=RADII), margin, seed=int(100 * target))
    _assert_at_most_alpha(false, f"--radii at margin {margin}")
    assert certified > 0.75 * TRIALS  # most images are certified at the target below (or at 0)


@pytest.mark.slow
@pytest.mark.parametrize("target", RADII)
def test_sequential_false_certification_rate(target):
    margin = target - 0.01
    false, certified = _false_certificates(dict(sequential=True), margin, seed=int(200 * target))
    _assert_at_most_alpha(false, f"--sequential at margin {margin}")
    assert certified > 0.75 * TRIALS


@pytest.mark.slow
def test_the_check_catches_a_bound_without_confidence(monkeypatch):
    """The same trials with the point estimate k/t as 'bound' at the stopping time: the check fails,
    so the margins are where a sequential test is tempted and the check has teeth."""
    monkeypatch.setattr(TargetRadii, "p_lower", lambda self, k, t: np.asarray(k) / np.asarray(t))
    false, _ = _false_certificates(dict(radii=RADII), 0.5 - 0.01, seed=7)
    with pytest.raises(AssertionError):
        _assert_at_most_alpha(false, "point estimate")


def test_the_engine_queues_the_next_submission_before_reading_counts(monkeypatch):
    """With overlap (the CUDA setting) a submission of other images' rounds is queued before the
    counts of the previous one are read back: the device never waits for the host's statistics."""
    from fastsmooth import sampler as sampler_module

    events = []
    submit, result = sampler_module.Sampler.submit, sampler_module.PendingTotals.result
    monkeypatch.setattr(sampler_module.Sampler, "submit",
                        lambda self, *a, **k: events.append("submit") or submit(self, *a, **k))
    monkeypatch.setattr(sampler_module.PendingTotals, "result",
                        lambda self: events.append("result") or result(self))
    model = OnePixel()
    smooth = Smooth(model, 2, Gaussian(sigma=0.4), precision="fp32", seed=4)
    xs = [(i, model.image(m)) for i, m in enumerate((0.05, 0.15, 0.3, 0.6, -0.2, 1.0) * 3)]
    smooth.overlap = True
    overlapped = [_key(c) for c in smooth.certify_many(xs, n0=30, n=3000, alpha=0.01, batch_size=100, radii=[0.1, 0.3])]
    in_flight, most = 0, 0
    for event in events:
        in_flight += 1 if event == "submit" else -1
        most = max(most, in_flight)
    assert most == 2 and events[:2] == ["submit", "submit"]
    events.clear()
    smooth.overlap = False
    alone = [_key(c) for c in smooth.certify_many(xs, n0=30, n=3000, alpha=0.01, batch_size=100, radii=[0.1, 0.3])]
    assert events[:4] == ["submit", "result", "submit", "result"] and alone == overlapped
