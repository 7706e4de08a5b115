"""The CUDA paths of the engine: graph-captured, eager, packed and single-image runs give identical
counts for a fixed seed (issue 4). Skipped without a GPU; bench/gpu_check runs them."""

import pytest
import torch

import fastsmooth
from fastsmooth.models import get_architecture
from fastsmooth.sampler import Job

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("noise", [fastsmooth.Gaussian(sigma=0.25), fastsmooth.Laplace(sigma=0.25)])
def test_graph_eager_and_packing_agree(backend, noise):
    torch.manual_seed(0)
    model = get_architecture("cifar_resnet20", "cifar10").cuda().eval()
    images = [(i, torch.rand(3, 32, 32)) for i in range(3)]
    runs = {}
    for graph in (True, False):
        smooth = fastsmooth.Smooth(model, 10, noise, backend=backend, precision="fp32", cuda_graph=graph)
        packed = list(smooth.certify_many(images, n0=64, n=448, batch_size=128, images_per_group=3))
        alone = [smooth.certify(x, n0=64, n=448, batch_size=128, image_index=i) for i, x in images]
        for a, b in zip(packed, alone):
            assert torch.equal(a.counts, b.counts) and torch.equal(a.counts0, b.counts0)
        runs[graph] = packed
    for a, b in zip(runs[True], runs[False]):
        assert torch.equal(a.counts, b.counts)
        assert a.prediction == b.prediction and a.radius == b.radius


def test_metadata_records_precision_and_graph():
    model = get_architecture("cifar_resnet20", "cifar10").cuda()
    smooth = fastsmooth.Smooth(model, 10, fastsmooth.Gaussian(sigma=0.25))
    meta = smooth.metadata
    assert meta["precision"] == "bf16" and meta["cuda_graph"] is True and meta["backend"] == "triton"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_submit_queues_without_host_sync_and_overlap_agrees(backend):
    """Sampler.submit queues a whole call (upload, noise, graph replays, votes, download) without a
    synchronizing CUDA call; certify_many with the next group queued ahead gives the same results."""
    torch.manual_seed(0)
    model = get_architecture("cifar_resnet20", "cifar10").cuda().eval()
    smooth = fastsmooth.Smooth(model, 10, fastsmooth.Gaussian(sigma=0.25), backend=backend)
    assert smooth.overlap
    jobs = [Job(torch.rand(3, 32, 32), 7, 0, 1000)]
    first = smooth.sampler.submit(jobs, 256).result()  # compiles kernels, captures the graphs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = smooth.sampler.submit(jobs, 256)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(pending.result(), first)

    images = [(i, torch.rand(3, 32, 32)) for i in range(4)]
    runs = {}
    for smooth.overlap in (True, False):
        runs[smooth.overlap] = list(smooth.certify_many(images, n0=64, n=448, batch_size=256))
    for a, b in zip(runs[True], runs[False]):
        assert torch.equal(a.counts, b.counts) and torch.equal(a.counts0, b.counts0)
        assert (a.prediction, a.radius) == (b.prediction, b.radius)
