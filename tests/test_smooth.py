"""Smooth and its engine (DESIGN.md §4-§5) on the CPU (the native backend; the torch backend where named).

* soundness on linear base classifiers, whose smoothed boundary is the same hyperplane (the noises
  are symmetric) so the true distance is known in every norm;
* Cohen's CERTIFY / PREDICT bookkeeping; noise identity (copy c of image i is a pure function of
  (seed, i, c)): counts independent of batch size and of packing; the noise reaching the model has
  its law, per copy; precision casts only x + eps; non-finite logits are an error; argument checks.
"""

from __future__ import annotations

import math
import multiprocessing
import os

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import fastsmooth
from fastsmooth import (ExpInf, Gaussian, Laplace, NonFiniteLogitsError, Smooth, Uniform,
                        clopper_pearson_lower)
from fastsmooth.native_backend import NativeBackend
from fastsmooth.sampler import Job, Sampler, Segment
from fastsmooth.torch_backend import TorchBackend

NORMS = ("l1", "l2", "linf")
DUAL = {"l2": 2, "l1": math.inf, "linf": 1}  # distance to {w.x + b = 0} in norm q is |w.x+b| / ||w||_dual(q)


def noises(sigma):
    return [Gaussian(sigma=sigma), Laplace(sigma=sigma), Uniform(sigma=sigma), ExpInf(k=1, sigma=sigma),
            ExpInf(k=2, sigma=sigma)]


NOISE_IDS = ["gaussian", "laplace", "uniform", "expinf1", "expinf2"]


class LinearBinary(nn.Module):
    """f(x) = 1 if w.x + b > 0 else 0, as the logits [0, w.x + b]."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.register_buffer("w", w.flatten().double())
        self.b = float(b)

    def forward(self, x):
        z = (x.flatten(1).double() @ self.w + self.b).float()
        return torch.stack([torch.zeros_like(z), z], dim=1)

    def distances(self, x):
        margin = abs(float(x.flatten().double() @ self.w) + self.b)
        return {q: margin / float(torch.linalg.vector_norm(self.w, ord=DUAL[q])) for q in NORMS}

    def label(self, x):
        return int(float(x.flatten().double() @ self.w) + self.b > 0)

    def at_margin(self, x0, s):
        """x0 moved along w so that w.x + b = s."""
        w = self.w.float().reshape(x0.shape)
        return x0 + (s - float(x0.flatten().double() @ self.w) - self.b) * w / float(self.w @ self.w)


class Recorder(nn.Module):
    """Wraps a model and keeps every input batch it sees (as given: dtype and values). Engines
    around it take micro_batch=0: resolving "auto" on a CPU runs one probe forward (a zero input)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)

    def inputs(self):
        return torch.cat([s.contiguous() for s in self.seen])


def mlp(d, k, seed=0, gain=3.0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, k))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(gain)
    return net


def images(m, shape, seed=0):
    return torch.rand((m, *shape), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Soundness on linear base classifiers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", noises(0.5), ids=NOISE_IDS)
def test_no_certified_radius_exceeds_the_true_distance(noise):
    shape = (1, 2, 3)
    d = 6
    g = torch.Generator().manual_seed(3)
    ws = {"dense": torch.randn(d, generator=g), "axis": 2.0 * torch.eye(d)[4], "ones": torch.ones(d),
          "sparse": torch.tensor([0.0, -1.5, 0.0, 0.5, 0.0, 0.0])}
    certified = 0
    index = 0
    for wname, w in ws.items():
        model = LinearBinary(w, b=0.2)
        smooth = Smooth(model, 2, noise, precision="fp32", seed=11)
        for t2 in (-0.7, -0.15, 0.05, 0.3, 0.9):  # signed l2 distance to the boundary
            x = model.at_margin(images(1, shape, seed=index)[0], t2 * float(model.w.norm()))
            truth = model.distances(x)
            cert = smooth.certify(x, n0=100, n=10_000, alpha=0.001, image_index=index)
            index += 1
            if cert.abstained:
                assert cert.radius == 0.0
                continue
            certified += 1
            assert cert.prediction == model.label(x), (wname, t2)
            for norm in NORMS:
                r = noise.radius(cert.p_lower, norm, d)
                assert r <= truth[norm] * (1 + 1e-6), (wname, t2, norm, r, truth[norm])
    assert certified >= 8  # not vacuous


@pytest.mark.parametrize("noise,norm,w", [
    (Laplace(sigma=0.5), "l1", "axis"),
    (Uniform(sigma=0.5), "l1", "axis"),
    (Gaussian(sigma=0.5), "l2", "axis"),
    (Gaussian(sigma=0.5), "l2", "dense"),
], ids=["laplace-l1", "uniform-l1", "gaussian-l2-axis", "gaussian-l2-dense"])
def test_axis_aligned_certificates_are_nearly_tight(noise, norm, w):
    """Laplace / Uniform l1 are exact for a single-coordinate boundary, Gaussian l2 for any
    hyperplane: at n = 50,000 the certificate is between 0.8x and 1x the true distance."""
    d, shape = 4, (1, 2, 2)
    w = 3.0 * torch.eye(d)[2] if w == "axis" else torch.tensor([1.0, -2.0, 0.5, 1.5])
    model = LinearBinary(w, b=-0.1)
    smooth = Smooth(model, 2, noise, precision="fp32", seed=5)
    lam = noise.scale_for(d)
    # the l1 (= l2, axis-aligned) distance at which p_A is about 0.8
    target = {"laplace": lam, "uniform": 0.5 * lam, "gaussian": 0.85 * lam}[noise.name]
    for i, sign in enumerate((1, -1)):
        x = model.at_margin(images(1, shape, seed=40 + i)[0], sign * target * float(torch.linalg.vector_norm(model.w, ord=DUAL[norm])))
        truth = model.distances(x)[norm]
        assert truth == pytest.approx(target, rel=1e-5)
        cert = smooth.certify(x, n0=100, n=50_000, alpha=0.001, norm=norm, image_index=i)
        assert cert.prediction == model.label(x)
        assert 0.8 * truth <= cert.radius <= truth, (cert.radius, truth)


def test_largest_radius_through_certify():
    """A constant base classifier: all 100,000 votes for c_A, radius 3.8115 sigma (DESIGN §4)."""
    model = LinearBinary(torch.zeros(3), b=1.0)
    for sigma in (0.5, 1.0):
        smooth = Smooth(model, 2, Gaussian(sigma=sigma), precision="fp32")
        cert = smooth.certify(torch.zeros(1, 1, 3), n=100_000, batch_size=5000)
        assert cert.prediction == 1 and cert.counts.tolist() == [0, 100_000] and cert.counts0.tolist() == [0, 100]
        tau = smooth.sampler.tv_bound(3)  # the sampler's tail cut comes off the bound (DESIGN §5)
        assert 0 < tau < 1e-11
        assert cert.p_lower == pytest.approx(0.001 ** (1 / 100_000) - tau, abs=1e-15)
        assert round(cert.radius / sigma, 4) == 3.8115


# --------------------------------------------------------------------------------------------
# CERTIFY / PREDICT bookkeeping (Cohen et al.)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", noises(0.4), ids=NOISE_IDS)
def test_certificate_follows_cohen_certify(noise):
    shape, k = (3, 4, 4), 5
    smooth = Smooth(mlp(48, k), k, noise, precision="fp32", seed=1)
    for i, x in enumerate(images(3, shape, seed=1)):
        cert = smooth.certify(x, n0=64, n=1500, alpha=0.01, batch_size=256, image_index=i)
        assert isinstance(cert, fastsmooth.Certificate)
        assert cert.counts.dtype == torch.int64 and cert.counts.shape == (k,) and cert.counts0.shape == (k,)
        assert int(cert.counts.sum()) == 1500 and int(cert.counts0.sum()) == 64
        assert (cert.n, cert.n0, cert.alpha, cert.image_index) == (1500, 64, 0.01, i)
        assert cert.norm == noise.default_norm
        c_a = int(cert.counts0.argmax())
        # the bound uses the estimation votes only, less the sampler's tau (DESIGN §5)
        tau = smooth.sampler.tv_bound(48)
        assert 0 <= tau < 2e-9
        assert cert.p_lower == clopper_pearson_lower(int(cert.counts[c_a]), 1500, 0.01) - tau
        if cert.p_lower < 0.5:
            assert cert.prediction == Smooth.ABSTAIN and cert.radius == 0.0
        else:
            assert cert.prediction == c_a
            assert cert.radius == noise.radius(cert.p_lower, noise.default_norm, 48)
        for norm in NORMS:  # the norm only changes the radius, never the votes
            other = smooth.certify(x, n0=64, n=1500, alpha=0.01, batch_size=256, norm=norm, image_index=i)
            assert other.norm == norm and torch.equal(other.counts, cert.counts)
            assert other.radius == (0.0 if other.abstained else noise.radius(cert.p_lower, norm, 48))


def test_certify_abstains_below_half():
    # on the boundary itself p_A = 1/2: abstain
    model = LinearBinary(torch.tensor([1.0, -1.0, 2.0]), b=0.3)
    x = model.at_margin(torch.rand(1, 1, 3), 0.0)
    smooth = Smooth(model, 2, Laplace(sigma=0.5), precision="fp32")
    cert = smooth.certify(x, n0=100, n=4000, alpha=0.001)
    assert cert.abstained and cert.prediction == -1 and cert.radius == 0.0 and cert.p_lower < 0.5
    assert smooth.predict(x, n=4000, alpha=0.001) == Smooth.ABSTAIN

    # three classes with P = 0.31 / 0.38 / 0.31: a plurality c_A, yet p_lower < 1/2 -> abstain
    class Tertiles(nn.Module):
        def forward(self, x):
            return -(x.flatten(1)[:, :1] - torch.tensor([-1.0, 0.0, 1.0])).abs()

    smooth = Smooth(Tertiles(), 3, Gaussian(sigma=1.0), precision="fp32")
    cert = smooth.certify(torch.zeros(1, 2, 2), n0=200, n=5000, image_index=0)  # a selection that finds c_A
    assert int(cert.counts0.argmax()) == 1 and cert.abstained and cert.radius == 0.0
    assert 0.35 < cert.p_lower < 0.5


def test_predict_matches_counts_and_binomtest():
    k, shape = 4, (2, 3, 3)
    smooth = Smooth(mlp(18, k, seed=2, gain=1.5), k, Gaussian(sigma=0.5), precision="fp32")
    for i, x in enumerate(images(4, shape, seed=2)):
        preds = list(smooth.predict_many([(i, x)], n=800, alpha=0.01, batch_size=300))
        assert len(preds) == 1 and int(preds[0].counts.sum()) == 800
        counts = preds[0].counts.tolist()
        assert preds[0].prediction == fastsmooth.predict_from_counts(counts, 0.01)
        assert smooth.predict(x, n=800, alpha=0.01, batch_size=300, image_index=i) == preds[0].prediction
        # the same copies [0, n) as probabilities
        freq = smooth.probabilities(x, n=800, image_index=i)
        assert torch.equal((freq * 800).round().long(), preds[0].counts)


def test_predict_clear_cut_linear():
    model = LinearBinary(torch.tensor([1.0, 2.0, -1.0, 0.5]), b=0.0)
    smooth = Smooth(model, 2, Uniform(sigma=0.3), precision="fp32")
    for s, label in ((2.0, 1), (-2.0, 0)):
        x = model.at_margin(torch.zeros(1, 2, 2), s)
        assert smooth.predict(x, n=500) == label
        cert = smooth.certify(x, n0=50, n=500)
        assert cert.prediction == label and cert.radius > 0


# --------------------------------------------------------------------------------------------
# Noise identity: batch size, packing, copy ranges
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", noises(0.4), ids=NOISE_IDS)
def test_counts_independent_of_batch_size(noise):
    k, shape = 5, (3, 4, 4)
    smooth = Smooth(mlp(48, k), k, noise, precision="fp32", seed=7)
    x = images(1, shape, seed=3)[0]
    runs = {b: smooth.certify(x, n0=50, n=700, batch_size=b, image_index=2) for b in (64, 100, 37, 1000)}
    ref = runs[1000]
    assert (ref.counts > 0).sum() >= 2  # votes spread over classes: the comparison means something
    for b, cert in runs.items():
        assert torch.equal(cert.counts, ref.counts) and torch.equal(cert.counts0, ref.counts0), b
        assert cert.p_lower == ref.p_lower and cert.radius == ref.radius
    probs = {b: smooth.probabilities(x, n=500, batch_size=b, image_index=2) for b in (64, 100, 1000)}
    assert all(torch.equal(p, probs[1000]) for p in probs.values())


@pytest.mark.parametrize("noise", [Gaussian(sigma=0.4), ExpInf(k=1, sigma=0.4)], ids=["gaussian", "expinf1"])
def test_counts_independent_of_packing(noise):
    k, shape = 5, (3, 4, 4)
    smooth = Smooth(mlp(48, k), k, noise, precision="fp32", seed=9)
    xs = images(5, shape, seed=4)
    indices = [5, 0, 12, 3, 7]
    alone = {i: smooth.certify(x, n0=40, n=300, batch_size=128, image_index=i) for i, x in zip(indices, xs)}
    cases = ((128, None, False), (1000, None, False), (100, 2, False), (64, 5, False), (1000, 1, False),
             (1000, 1, True), (100, 2, True))  # overlap: the next group queued before this one is read
    for batch_size, per_group, smooth.overlap in cases:
        packed = list(smooth.certify_many(zip(indices, xs), n0=40, n=300, batch_size=batch_size,
                                          images_per_group=per_group))
        assert [c.image_index for c in packed] == indices
        for cert in packed:
            ref = alone[cert.image_index]
            assert torch.equal(cert.counts, ref.counts) and torch.equal(cert.counts0, ref.counts0)
            assert (cert.prediction, cert.radius, cert.p_lower) == (ref.prediction, ref.radius, ref.p_lower)
    for smooth.overlap in (False, True):
        preds = list(smooth.predict_many(zip(indices, xs), n=300, batch_size=1000, images_per_group=2))
        for i, (p, x) in enumerate(zip(preds, xs)):
            assert torch.equal(p.counts, list(smooth.predict_many([(indices[i], x)], n=300, batch_size=64))[0].counts)


@pytest.mark.parametrize("overlap", [False, True])
def test_results_before_a_failing_image_are_handed_out(overlap):
    """An image that fails to load ends the stream, but only after every image before it was
    certified and handed out, also when the next group is queued ahead (overlap)."""
    smooth = Smooth(mlp(48, 3), 3, Gaussian(sigma=0.5), precision="fp32")
    smooth.overlap = overlap

    def items():
        yield from enumerate(images(3, (3, 4, 4)))
        raise OSError("image 3: truncated file")

    got = []
    with pytest.raises(OSError, match="truncated"):
        for cert in smooth.certify_many(items(), n0=10, n=50, images_per_group=1):
            got.append(cert.image_index)
    assert got == [0, 1, 2]


@pytest.mark.parametrize("noise", noises(0.4), ids=NOISE_IDS)
def test_native_backend_fills_alike_on_one_thread_or_many(noise):
    """On a CPU with several intra-op threads the native backend fills copies on worker threads:
    the batch is the same, bit for bit, as filled on one thread (segments split across calls and
    batch edges included), in float32 NCHW and cast to bf16 channels_last; and it is x + the
    stream's noise for each copy."""
    from fastsmooth.kernels.perturb import stream_values
    from fastsmooth.kernels.samplers import NoisePlan

    xs = torch.rand(3, 3, 8, 8)
    segments = [Segment(0, 4, 10, 100, 0), Segment(2, 9, 0, 37, 100), Segment(1, 4, 500, 63, 137)]
    threads = torch.get_num_threads()
    for dtype, layout in ((torch.float32, torch.contiguous_format), (torch.bfloat16, torch.channels_last)):
        batches = []
        for n in (1, 3):
            torch.set_num_threads(n)
            try:
                out = torch.empty(200, 3, 8, 8, dtype=dtype).to(memory_format=layout)
                NativeBackend().fill(out, xs, segments, noise, seed=5)
            finally:
                torch.set_num_threads(threads)
            batches.append(out)
        assert torch.equal(batches[0], batches[1])
        eps = stream_values(NoisePlan(noise, 192), 5, 9, torch.arange(37)).reshape(37, 3, 8, 8)
        torch.testing.assert_close(batches[1][100:137].float(), (xs[2] + eps).to(dtype).float(),
                                   rtol=2e-6 if dtype == torch.float32 else 1e-2, atol=2e-6)


def test_certify_alike_on_one_thread_or_many():
    """End to end (the engine's batch buffer is an inference tensor, written by the noise workers,
    which must run in the caller's inference mode): certificates on 2 threads equal those on 1."""
    k, shape = 4, (3, 6, 6)
    xs = images(2, shape, seed=8)
    threads = torch.get_num_threads()
    runs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            for precision in ("fp32", "bf16"):
                smooth = Smooth(mlp(108, k, seed=4), k, Laplace(sigma=0.5), precision=precision, seed=2,
                                backend="native")
                runs.append([smooth.certify(x, n0=40, n=600, batch_size=256, image_index=i) for i, x in enumerate(xs)])
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(runs[:2], runs[2:]):
        for ca, cb in zip(a, b):
            assert torch.equal(ca.counts, cb.counts) and torch.equal(ca.counts0, cb.counts0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_native_backend_workers_in_a_forked_child():
    """A child forked after the noise workers started has none of their threads: the backend makes
    new workers there instead of queuing work that nothing would run."""
    backend = NativeBackend()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parent_pool = backend._workers()
        assert parent_pool.submit(os.getpid).result(timeout=10) == os.getpid()
        _FORKED["backend"] = backend  # the child inherits it: the pool cannot be pickled
        with multiprocessing.get_context("fork").Pool(1) as pool:
            child_pid, ran_in = pool.apply_async(_workers_in_child).get(timeout=60)
    finally:
        torch.set_num_threads(threads)
        _FORKED.clear()
    assert ran_in == child_pid != os.getpid()


_FORKED: dict = {}


def _workers_in_child():
    # No torch op here: multi-threaded torch ops can hang in a child forked after the parent used
    # OpenMP (seen here); the point is only that the backend's pool has live threads.
    return os.getpid(), _FORKED["backend"]._workers().submit(os.getpid).result(timeout=10)


def test_noise_depends_on_seed_and_image_index():
    k, shape = 5, (3, 4, 4)
    x = images(1, shape, seed=5)[0]
    model = mlp(48, k)
    a = Smooth(model, k, Laplace(sigma=0.5), precision="fp32", seed=0)
    b = Smooth(model, k, Laplace(sigma=0.5), precision="fp32", seed=1)
    c0 = a.certify(x, n0=50, n=1000, image_index=0).counts
    assert torch.equal(c0, a.certify(x, n0=50, n=1000, image_index=0).counts)  # reproducible
    assert not torch.equal(c0, a.certify(x, n0=50, n=1000, image_index=1).counts)
    assert not torch.equal(c0, b.certify(x, n0=50, n=1000, image_index=0).counts)


@pytest.mark.parametrize("noise", noises(0.5), ids=NOISE_IDS)
def test_certify_copy_ranges(noise):
    """Selection sees copies [0, n0), estimation [n0, n0 + n): exactly the inputs probabilities
    sees over [0, n0 + n), whatever the batch size; every copy distinct."""
    shape = (2, 3, 3)
    rec = Recorder(mlp(18, 3))
    smooth = Smooth(rec, 3, noise, precision="fp32", seed=3, micro_batch=0)
    x = images(1, shape, seed=6)[0]
    smooth.probabilities(x, n=350, batch_size=1000, image_index=4)
    reference = rec.inputs()
    rec.seen.clear()
    smooth.certify(x, n0=50, n=300, batch_size=64, image_index=4)
    assert torch.equal(rec.inputs(), reference)
    assert len(torch.unique(reference.flatten(1), dim=0)) == 350
    rec.seen.clear()
    smooth.predict(x, n=350, batch_size=29, image_index=4)
    assert torch.equal(rec.inputs(), reference)


@pytest.mark.parametrize("noise,k", [(ExpInf(k=1, sigma=0.3), 1.0), (ExpInf(k=2, sigma=0.3), 2.0),
                                     (Laplace(sigma=0.3), None), (Uniform(sigma=0.3), None),
                                     (Gaussian(sigma=0.3), None)], ids=["expinf1", "expinf2", "laplace", "uniform", "gaussian"])
def test_noise_reaching_the_model_has_its_law(noise, k):
    """Through the engine (chunked, batched, packed with another image): per-copy ExpInf radius
    ~ Gamma(d/k) by KS (a radius shared across copies fails this), per-coordinate RMS = sigma."""
    shape, d = (3, 4, 4), 48
    rec = Recorder(mlp(d, 2))
    smooth = Smooth(rec, 2, noise, precision="fp32", seed=2, micro_batch=0)
    x = images(2, shape, seed=7)
    smooth.probabilities(x[0], n=3000, batch_size=700, image_index=1)
    eps = (rec.inputs().double() - x[0].double()).flatten(1)
    assert eps.shape == (3000, d) and torch.isfinite(eps).all()
    assert math.sqrt((eps ** 2).mean().item()) == pytest.approx(0.3, rel=0.03)
    lam = noise.scale_for(d)
    if k is not None:
        r = eps.abs().max(dim=1).values
        s = (r / lam).pow(k).numpy()
        assert stats.kstest(s, stats.gamma(d / k).cdf).pvalue > 1e-3
        assert len(np.unique(np.round(s, 6))) > 2990
    else:
        law = {"laplace": stats.laplace(scale=lam), "uniform": stats.uniform(loc=-lam, scale=2 * lam),
               "gaussian": stats.norm(scale=lam)}[noise.name]
        # float32 rounding of x + eps: compare at a tolerance far below the KS resolution
        assert stats.kstest(eps.flatten().numpy(), law.cdf).pvalue > 1e-3


# --------------------------------------------------------------------------------------------
# Precision: only x + eps is cast (DESIGN §5)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_casts_only_the_perturbed_input(precision, dtype):
    shape = (3, 4, 4)
    x = images(1, shape, seed=8)[0]
    seen = {}
    for p in ("fp32", precision):
        rec = Recorder(mlp(48, 4))
        smooth = Smooth(rec, 4, ExpInf(k=1, sigma=0.25), precision=p, seed=4, micro_batch=0)
        cert = smooth.certify(x, n0=32, n=400, batch_size=150, image_index=3)
        assert int(cert.counts.sum()) == 400 and int(cert.counts0.sum()) == 32
        seen[p] = rec.inputs()
        assert smooth.metadata["precision"] == p
    assert seen["fp32"].dtype == torch.float32 and seen[precision].dtype == dtype
    assert torch.equal(seen[precision], seen["fp32"].to(dtype))


def test_bf16_and_fp32_agree_on_clear_cases():
    model = LinearBinary(torch.tensor([1.0, -1.0, 0.5, 2.0]), b=0.1)
    for s, label in ((1.5, 1), (-1.5, 0)):
        x = model.at_margin(torch.zeros(1, 2, 2), s)
        certs = [Smooth(model, 2, Gaussian(sigma=0.25), precision=p).certify(x, n0=50, n=2000, image_index=0)
                 for p in ("fp32", "bf16")]
        assert [c.prediction for c in certs] == [label, label]
        # distance 0.6, p_A = Phi(2.4): about 16 of 2000 votes lost, a radius near 0.53 (0.45 is 3 sd off)
        assert all(0.45 < c.radius < 0.6 for c in certs)
        assert abs(int(certs[0].counts[label]) - int(certs[1].counts[label])) <= 3   # bf16 flips only near-ties


# --------------------------------------------------------------------------------------------
# Micro-batches (copies per model call)
# --------------------------------------------------------------------------------------------
def test_micro_batches_vote_like_whole_batches():
    """micro_batch=N splits each batch into model calls of at most N copies; the votes are those of whole
    batches (the same copies, the same noise)."""
    k, shape = 4, (2, 3, 3)
    x = images(1, shape, seed=2)[0]
    runs = {}
    for micro in (0, 7, 64):
        rec = Recorder(mlp(18, k, seed=1))
        smooth = Smooth(rec, k, Gaussian(sigma=0.5), precision="fp32", seed=3, micro_batch=micro)
        runs[micro] = smooth.certify(x, n0=40, n=500, batch_size=128, image_index=2)
        assert max(len(b) for b in rec.seen) == (micro or 128)
        assert smooth.metadata["micro_batch"] == micro
    for micro in (7, 64):
        assert torch.equal(runs[micro].counts, runs[0].counts) and torch.equal(runs[micro].counts0, runs[0].counts0)


def test_auto_micro_batch_rule_worked_values():
    """"auto": on a CPU, models of >= 5 M multiply-adds per copy run in power-of-two micro-batches holding
    about 8 MB of their largest activation; small models and GPUs run whole batches."""
    from fastsmooth.models import get_architecture
    from fastsmooth.sampler import ModelProbe, probe_model, resolve_micro_batch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    probe = probe_model(get_architecture("cifar_resnet20", "cifar10").eval(), (3, 32, 32), cpu)
    assert probe.largest_activation == 16 * 32 * 32 and 40e6 < probe.macs < 42e6  # 41 M (He et al. 2016)
    assert resolve_micro_batch("auto", cpu, torch.bfloat16, probe) == 256   # 8 MB / (16384 x 2 B)
    assert resolve_micro_batch("auto", cpu, torch.float32, probe) == 128    # 8 MB / (16384 x 4 B)
    assert resolve_micro_batch("auto", cuda, torch.bfloat16, probe) == 0
    assert resolve_micro_batch("auto", cpu, torch.float32, ModelProbe(400_000, 25_088)) == 0  # small model
    assert resolve_micro_batch("auto", cpu, torch.bfloat16, ModelProbe(4_000_000_000, 802_816)) == 16  # floor
    assert resolve_micro_batch(100, cpu, torch.float32, None) == 100
    for bad in (-1, 2.5, True, "big"):
        with pytest.raises(ValueError, match="micro_batch must be"):
            resolve_micro_batch(bad, cpu, torch.float32, None)


# --------------------------------------------------------------------------------------------
# Probabilities
# --------------------------------------------------------------------------------------------
def test_probabilities_soft_and_hard():
    k, shape = 4, (2, 3, 3)
    rec = Recorder(mlp(18, k, seed=3, gain=2.0))
    smooth = Smooth(rec, k, Laplace(sigma=0.5), precision="fp32", seed=5, micro_batch=0)
    x = images(1, shape, seed=9)[0]
    soft = smooth.probabilities(x, n=600, batch_size=250, soft=True, image_index=0)
    inputs = rec.inputs()
    assert soft.shape == (k,) and soft.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (soft >= 0).all() and (soft <= 1).all()
    with torch.no_grad():
        expected = torch.softmax(rec.model(inputs).double(), dim=1).mean(dim=0)
    assert torch.allclose(soft, expected, atol=1e-6)
    hard = smooth.probabilities(x, n=600, batch_size=250, image_index=0)
    with torch.no_grad():
        votes = torch.bincount(rec.model(inputs).argmax(dim=1), minlength=k)
    assert hard.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.equal((hard * 600).round().long(), votes)


# --------------------------------------------------------------------------------------------
# Non-finite logits are an error, never a vote
# --------------------------------------------------------------------------------------------
class NaNAt(nn.Module):
    """Logits [x_0, x_1]; the row number ``bad`` (counted over all calls) gets ``value``."""

    def __init__(self, bad, value=math.nan, column=1):
        super().__init__()
        self.bad, self.value, self.column, self.rows = set(bad), value, column, 0

    def forward(self, x):
        out = x.flatten(1)[:, :2].float().clone()
        for r in range(x.shape[0]):
            if self.rows + r in self.bad:
                out[r, self.column] = self.value
        self.rows += x.shape[0]
        return out


@pytest.mark.parametrize("value,column", [(math.nan, 0), (math.nan, 1), (math.inf, 0), (-math.inf, 1)])
def test_nonfinite_logits_raise(value, column):
    x = torch.zeros(1, 2, 2)
    noise = Gaussian(sigma=0.5)
    # one bad copy in the estimation phase (rows 100 .. 1099) of one call
    smooth = Smooth(NaNAt({777}, value, column), 2, noise, precision="fp32")
    with pytest.raises(NonFiniteLogitsError, match="NaN or inf"):
        smooth.certify(x, n0=100, n=1000, batch_size=300)
    # ... in the selection phase
    with pytest.raises(NonFiniteLogitsError):
        Smooth(NaNAt({3}, value, column), 2, noise, precision="fp32").certify(x, n0=100, n=1000)
    with pytest.raises(NonFiniteLogitsError):
        Smooth(NaNAt({50}, value, column), 2, noise, precision="fp32").predict(x, n=100)
    for soft in (False, True):
        with pytest.raises(NonFiniteLogitsError):
            Smooth(NaNAt({99}, value, column), 2, noise, precision="fp32").probabilities(x, n=100, soft=soft)
    assert issubclass(NonFiniteLogitsError, RuntimeError)


def test_all_nan_model_is_never_class_zero():
    class AllNaN(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 3), math.nan)

    smooth = Smooth(AllNaN(), 3, Laplace(sigma=0.1), precision="fp32")
    for call in (lambda x: smooth.certify(x, n0=10, n=100), lambda x: smooth.predict(x, n=100),
                 lambda x: list(smooth.certify_many([(0, x), (1, x)], n0=10, n=100))):
        with pytest.raises(NonFiniteLogitsError):
            call(torch.zeros(3, 2, 2))


def test_torch_backend_vote():
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [math.nan, 0.0, 0.0], [0.0, 0.0, 5.0],
                           [0.0, math.inf, 0.0], [3.0, 0.0, 0.0]])
    slots = torch.tensor([0, 0, 0, 1, 1, 1])
    counts = torch.zeros(2, 3, dtype=torch.int64)
    nonfinite = torch.zeros(1, dtype=torch.int64)
    TorchBackend().vote(logits, slots, counts, nonfinite)
    assert counts.tolist() == [[1, 1, 0], [1, 0, 1]]  # ties to the lowest index; non-finite rows never vote
    assert nonfinite.item() == 2


def test_torch_backend_fill_is_x_plus_noise_in_fp32():
    backend = TorchBackend()
    noise = Laplace(sigma=0.3)
    xs = torch.rand(2, 1, 2, 3)
    whole = torch.empty(200, 1, 2, 3)
    backend.fill(whole, xs, [Segment(1, 9, 0, 200, 0)], noise, seed=3)
    # the same copies through odd-sized segments and rows, packed with another image
    parts = torch.empty(250, 1, 2, 3)
    segs = [Segment(0, 2, 10, 50, 0), Segment(1, 9, 0, 70, 50), Segment(1, 9, 70, 130, 120)]
    TorchBackend().fill(parts, xs, segs, noise, seed=3)
    assert torch.equal(parts[50:], whole)
    eps = whole - xs[1]
    assert torch.allclose(eps.abs().mean(), torch.tensor(noise.scale_for(6)), rtol=0.15)
    # a half-precision buffer gets cast(x + eps) of the same fp32 values
    half = torch.empty(200, 1, 2, 3, dtype=torch.bfloat16)
    backend.fill(half, xs, [Segment(1, 9, 0, 200, 0)], noise, seed=3)
    assert torch.equal(half, whole.to(torch.bfloat16))


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------
def test_invalid_arguments():
    smooth = Smooth(mlp(4, 2), 2, Gaussian(sigma=0.5), precision="fp32")
    x = torch.zeros(1, 2, 2)
    bad_counts = (0, -5, 2.5, True, None)
    for bad in bad_counts:
        with pytest.raises((ValueError, TypeError)):
            smooth.certify(x, n=bad)
        with pytest.raises((ValueError, TypeError)):
            smooth.certify(x, n0=bad, n=10)
        with pytest.raises((ValueError, TypeError)):
            smooth.certify(x, n=10, batch_size=bad)
        with pytest.raises((ValueError, TypeError)):
            smooth.predict(x, n=bad)
        with pytest.raises((ValueError, TypeError)):
            smooth.predict(x, n=10, batch_size=bad)
        with pytest.raises((ValueError, TypeError)):
            smooth.probabilities(x, n=bad)
        with pytest.raises((ValueError, TypeError)):
            smooth.probabilities(x, n=10, batch_size=bad)
    for bad in (0, -5, 2.5):  # plain bad numbers: ValueError precisely
        with pytest.raises(ValueError, match="n"):
            smooth.certify(x, n=bad)
        with pytest.raises(ValueError, match="n0"):
            smooth.certify(x, n0=bad, n=10)
        with pytest.raises(ValueError, match="batch"):
            smooth.certify(x, n=10, batch_size=bad)
        with pytest.raises(ValueError, match="batch"):
            smooth.probabilities(x, n=10, batch_size=bad)
        with pytest.raises(ValueError):
            list(smooth.certify_many([(0, x)], n=bad))
        with pytest.raises(ValueError):
            list(smooth.predict_many([(0, x)], n=bad))
    for alpha in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            smooth.certify(x, n=10, alpha=alpha)
        with pytest.raises(ValueError, match="alpha"):
            smooth.predict(x, n=10, alpha=alpha)
        with pytest.raises(ValueError, match="alpha"):
            list(smooth.certify_many([(0, x)], n=10, alpha=alpha))
    with pytest.raises(ValueError, match="norm"):
        smooth.certify(x, n=10, norm="l3")
    with pytest.raises(ValueError, match="precision"):
        Smooth(mlp(4, 2), 2, Gaussian(sigma=0.5), precision="fp8")
    with pytest.raises(ValueError, match="backend"):
        Smooth(mlp(4, 2), 2, Gaussian(sigma=0.5), backend="numpy")
    for k in (0, -1, 2.5):
        with pytest.raises(ValueError, match="num_classes"):
            Smooth(mlp(4, 2), k, Gaussian(sigma=0.5))
    with pytest.raises(TypeError):
        Smooth(mlp(4, 2), 2, "gaussian")


@pytest.mark.parametrize("outputs", [3, 1])
def test_model_output_width_mismatch(outputs):
    smooth = Smooth(mlp(4, outputs), 2, Gaussian(sigma=0.5), precision="fp32")
    with pytest.raises(ValueError, match="num_classes=2"):
        smooth.certify(torch.zeros(1, 2, 2), n0=10, n=20)
    with pytest.raises(ValueError, match="num_classes=2"):
        smooth.probabilities(torch.zeros(1, 2, 2), n=20, soft=True)

    class Flat(nn.Module):
        def forward(self, x):
            return x.flatten()

    with pytest.raises(ValueError, match="logits of shape"):
        Smooth(Flat(), 2, Gaussian(sigma=0.5), precision="fp32").predict(torch.zeros(1, 1, 2), n=5)


def test_certify_leaves_the_image_alone():
    x = images(1, (3, 4, 4), seed=10)[0]
    before = x.clone()
    Smooth(mlp(48, 3), 3, Uniform(sigma=0.5), precision="bf16").certify(x, n0=20, n=100)
    assert torch.equal(x, before)


def test_sampler_run_jobs_directly():
    sampler = Sampler(mlp(6, 3), 3, Gaussian(sigma=0.5), backend="torch", precision="fp32", seed=1)
    xs = images(2, (1, 2, 3), seed=11)
    counts = sampler.run([Job(xs[0], 0, 0, 250), Job(xs[1], 1, 100, 130), Job(xs[0], 0, 0, 0)], batch_size=64)
    assert counts.dtype == torch.int64 and counts.shape == (3, 3)
    assert counts.sum(dim=1).tolist() == [250, 130, 0]
    # Job over copies [100, 230) of image 1 = the tail of copies [0, 230) minus its head [0, 100)
    whole = sampler.run([Job(xs[1], 1, 0, 230)], batch_size=1000)[0]
    head = sampler.run([Job(xs[1], 1, 0, 100)], batch_size=7)[0]
    assert torch.equal(whole - head, counts[1])
    with pytest.raises(ValueError, match="shape"):
        sampler.run([Job(xs[0], 0, 0, 5), Job(torch.zeros(1, 3, 2), 1, 0, 5)])


# --------------------------------------------------------------------------------------------
# The guarantee, end to end, by simulation (DESIGN §4)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("noise,norm", [(Gaussian(sigma=0.5), "l2"), (Laplace(sigma=0.5), "l1")],
                         ids=["gaussian-l2", "laplace-l1"])
def test_certify_coverage_by_simulation(noise, norm):
    """Gaussian l2 and axis-aligned Laplace l1 are exact on a linear classifier: the certificate
    exceeds the true distance exactly when p_lower > p_A, which CERTIFY allows with probability
    <= alpha. Over 4,000 images at alpha = 0.1 the violation rate stays below alpha (plus 3 standard
    errors); a bound at 2 alpha, or votes reused between selection and estimation, would not."""
    d, shape, alpha, m = 4, (1, 2, 2), 0.1, 4000
    model = LinearBinary(2.0 * torch.eye(d)[1], b=0.3)
    smooth = Smooth(model, 2, noise, precision="fp32", seed=21)
    rng = np.random.default_rng(0)
    lam = noise.scale_for(d)
    xs = [model.at_margin(torch.zeros(shape), float(s) * 2.0) for s in rng.uniform(0.1, 1.2, size=m) * lam * rng.choice([-1, 1], size=m)]
    violations = certified = 0
    for cert, x in zip(smooth.certify_many(enumerate(xs), n0=20, n=300, alpha=alpha, batch_size=4000, norm=norm), xs):
        if not cert.abstained:
            certified += 1
            violations += cert.radius > model.distances(x)[norm] or cert.prediction != model.label(x)
    assert certified > 0.8 * m
    assert violations / m <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / m)
    assert violations > 0.02 * m  # exact certificates: the bound is used, not a trivially small radius


def test_calls_without_an_index_draw_fresh_noise():
    """A loop of certify(x) without image_index must not reuse one noise for every image: the
    failures of its certificates would be dependent (analyze --high-prob assumes independence)."""
    smooth = Smooth(mlp(12, 3), 3, Gaussian(sigma=1.0), precision="fp32")
    x = torch.zeros(3, 2, 2)
    a, b = smooth.certify(x, n0=20, n=400), smooth.certify(x, n0=20, n=400)
    assert a.image_index != b.image_index >= Smooth.AUTO_INDEX_BASE
    assert not torch.equal(a.counts, b.counts)
    assert torch.equal(smooth.certify(x, n0=20, n=400, image_index=a.image_index).counts, a.counts)
    # ... across instances too: `for x in data: Smooth(model, ...).certify(x)` draws fresh noise
    rec = Recorder(mlp(12, 3))
    seen = []
    for _ in range(3):
        other = Smooth(rec, 3, Gaussian(sigma=1.0), precision="fp32", micro_batch=0)
        other.probabilities(x, n=50)
        seen.append(rec.inputs())
        rec.seen.clear()
    assert len(torch.unique(torch.cat(seen).flatten(1), dim=0)) == 150


def test_images_of_different_shapes_in_one_stream():
    """An image folder at native size gives images of several shapes: groups never mix them."""
    class Pool(torch.nn.Module):
        def forward(self, z):
            return torch.stack([z.mean(dim=(1, 2, 3)), -z.mean(dim=(1, 2, 3))], dim=1)

    smooth = Smooth(Pool(), 2, Gaussian(sigma=0.5), precision="fp32")
    items = [(0, torch.ones(3, 4, 4)), (1, torch.ones(3, 5, 4)), (2, -torch.ones(3, 5, 4))]
    certs = list(smooth.certify_many(items, n0=10, n=50, batch_size=1000))
    assert [c.image_index for c in certs] == [0, 1, 2]
    assert [c.prediction for c in certs] == [0, 0, 1]
