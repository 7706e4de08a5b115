"""TritonBackend keeps the engine's backend protocol, and the engine's counts through it do not depend
on batch size nor on which images share a batch (DESIGN §5)."""

import pytest
import torch
from torch import nn

from fastsmooth.kernels import NoisePlan, TritonBackend, perturb_packed_reference, stream_tau, vote_reference
from fastsmooth.noises import make_noise
from fastsmooth.sampler import Job, Sampler, Segment

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_model(d: int, k: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, k))


def test_protocol_fill_and_vote():
    backend = TritonBackend(DEVICE)
    assert backend.name == "triton"
    noise = make_noise("laplace", sigma=0.5)
    xs = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    segs = [Segment(1, 7, 0, 3, 0), Segment(0, 2, 10, 2, 3)]
    out = torch.empty(5, 1, 4, 4, dtype=torch.float32, device=DEVICE)
    backend.fill(out, xs, segs, noise, 42)
    ref = perturb_packed_reference(torch.empty(5, 1, 4, 4), xs.cpu(), segs, noise, 42)
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-6, atol=2e-6)

    logits = torch.tensor([[0.0, 1.0, 1.0], [float("nan"), 0.0, 0.0], [2.0, 0.0, 2.0], [0.0, 0.0, 0.0]],
                          device=DEVICE)
    slots = torch.tensor([0, 1, 1, 0], device=DEVICE)
    counts = torch.zeros(2, 3, dtype=torch.int64, device=DEVICE)
    bad = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    backend.vote(logits, slots, counts, bad)
    assert counts.tolist() == [[1, 1, 0], [1, 0, 0]] and bad.item() == 1
    c2, b2 = torch.zeros_like(counts).cpu(), torch.zeros_like(bad).cpu()
    vote_reference(logits.cpu(), slots.cpu(), c2, b2)
    assert torch.equal(counts.cpu(), c2) and torch.equal(bad.cpu(), b2)

    assert backend.tv_bound(noise, 16) == stream_tau(NoisePlan(noise, 16))
    assert backend.tv_bound(noise, 16, 255) == stream_tau(NoisePlan(noise, 16, 255))


@pytest.mark.parametrize("spec", [dict(name="gaussian", sigma=0.5), dict(name="expinf", k=1.0, sigma=0.5)],
                         ids=lambda s: s["name"])
def test_engine_counts_independent_of_batch_and_packing(spec):
    noise = make_noise(**spec)
    d, k = 36, 4
    model = tiny_model(d, k)
    sampler = Sampler(model, k, noise, backend="triton", precision="fp32", seed=3, device=DEVICE)
    assert sampler.backend.name == "triton"
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 6, 6, generator=g) for _ in range(3)]
    alone = sampler.run([Job(images[1], 11, 5, 250)], batch_size=1000)
    for batch in (64, 100, 1000):
        packed = sampler.run([Job(images[0], 10, 0, 70), Job(images[1], 11, 5, 250),
                              Job(images[2], 12, 0, 33)], batch_size=batch)
        assert torch.equal(packed[1], alone[0]), batch
    assert int(alone.sum()) == 250
    assert int((alone[0] > 0).sum()) >= 2      # the votes spread: a wrongly keyed copy would change them


def test_smooth_certify_through_triton():
    from fastsmooth.smooth import Smooth

    noise = make_noise("uniform", sigma=0.25)
    model = tiny_model(16, 3)
    x = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(1))
    smooth = Smooth(model, 3, noise, backend="triton", precision="fp32", seed=9, device=DEVICE)
    certs = [smooth.certify(x, n0=20, n=200, alpha=0.01, batch_size=b, image_index=4) for b in (64, 1000)]
    assert torch.equal(certs[0].counts, certs[1].counts)
    assert torch.equal(certs[0].counts0, certs[1].counts0)
    assert certs[0].radius == certs[1].radius
