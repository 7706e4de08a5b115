"""The CUDA paths of the engine: graph-captured, eager, packed and single-image runs give identical
counts for a fixed seed, with votes spread over several classes (a model voting one class would pass
with broken keying); the grid mode's model inputs on the GPU equal the CPU's bit for bit. Skipped
without a GPU; bench/gpu_check runs them."""

import pytest
import torch
from torch import nn

import fastsmooth
from fastsmooth.backends import make_backend
from fastsmooth.models import get_architecture
from fastsmooth.sampler import Job

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Spreading(nn.Module):
    """A ResNet-20 (BatchNorm, residual adds: what CUDA graphs capture) whose votes the noise decides:
    a bias-free linear map of x - 1/2 dominates, so near-gray images vote over every class."""

    def __init__(self):
        super().__init__()
        self.net = get_architecture("cifar_resnet20", "cifar10")
        self.linear = nn.Linear(3 * 32 * 32, 10, bias=False)

    def forward(self, x):
        return self.linear((x - 0.5).flatten(1)) + 1e-3 * self.net(x)


def spreading_model() -> nn.Module:
    torch.manual_seed(0)
    return Spreading().cuda().eval()


def gray_images(count):
    return [(i, 0.5 + 0.05 * torch.rand(3, 32, 32)) for i in range(count)]


def assert_spread(certs):
    assert all(int((c.counts > 0).sum()) >= 2 for c in certs), [c.counts.tolist() for c in certs]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("noise", [fastsmooth.Gaussian(sigma=0.25), fastsmooth.Laplace(sigma=0.25)])
def test_graph_eager_and_packing_agree(backend, noise):
    model = spreading_model()
    images = gray_images(3)
    runs = {}
    for graph in (True, False):
        smooth = fastsmooth.Smooth(model, 10, noise, backend=backend, precision="fp32", cuda_graph=graph)
        packed = list(smooth.certify_many(images, n0=64, n=448, batch_size=128, images_per_group=3))
        alone = [smooth.certify(x, n0=64, n=448, batch_size=128, image_index=i) for i, x in images]
        for a, b in zip(packed, alone):
            assert torch.equal(a.counts, b.counts) and torch.equal(a.counts0, b.counts0)
        assert_spread(packed)
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
    model = spreading_model()
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

    images = gray_images(4)
    runs = {}
    for smooth.overlap in (True, False):
        runs[smooth.overlap] = list(smooth.certify_many(images, n0=64, n=448, batch_size=256))
    for a, b in zip(runs[True], runs[False]):
        assert torch.equal(a.counts, b.counts) and torch.equal(a.counts0, b.counts0)
        assert (a.prediction, a.radius) == (b.prediction, b.radius)
    assert_spread(runs[True])


@pytest.mark.parametrize("name", ["gaussian", "laplace", "uniform", "expinf"])
def test_grid_inputs_on_the_gpu_equal_the_cpu(name):
    """Grid mode: the Triton kernels on the GPU and the native twin on the CPU form the same model
    inputs bit for bit (one stream, exact integer decisions, IEEE division)."""
    noise = fastsmooth.make_noise(name, sigma=0.25)
    k = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.int32)
    segs = [(0, 5, 0, 300, 0), (1, 6, 2 ** 20, 200, 300)]
    for dtype in (torch.float32, torch.bfloat16):
        gpu = torch.empty(500, 3, 32, 32, dtype=dtype, device="cuda").to(memory_format=torch.channels_last)
        make_backend("triton", "cuda").fill(gpu, k.cuda(), segs, noise, 11, 255)
        cpu = torch.empty(500, 3, 32, 32, dtype=dtype)
        make_backend("native", "cpu").fill(cpu, k, segs, noise, 11, 255)
        assert torch.equal(gpu.cpu(), cpu)


def test_compiled_forward_in_the_cuda_graph_votes_like_eager(compiled_calls):
    """torch.compile on CUDA (issue 15): the compiled model, captured in the engine's CUDA graph at
    one static call size (the last short batch padded), votes as the eager one does up to near ties
    of bf16 rounding, and every forward of certify went through it."""
    calls = compiled_calls
    torch.manual_seed(0)
    model = get_architecture("cnn", "digits").cuda().eval()
    x = torch.rand(1, 8, 8)
    noise = fastsmooth.Gaussian(sigma=0.5)
    eager = fastsmooth.Smooth(model, 10, noise, compile="off").certify(x, n0=64, n=1000, batch_size=256, image_index=1)
    assert calls == []
    smooth = fastsmooth.Smooth(model, 10, noise, compile="on")
    compiled = smooth.certify(x, n0=64, n=1000, batch_size=256, image_index=1)  # batches 256 x 4 + 40
    assert smooth.metadata["compile"] is True and smooth.metadata["cuda_graph"] is True
    assert set(calls) == {256} and smooth.sampler.compile_seconds > 0
    assert (compiled.counts - eager.counts).abs().sum() <= 10 and compiled.prediction == eager.prediction


@pytest.mark.parametrize("mode", [dict(radii=[0.02, 0.05]), dict(sequential=True, tolerance=0.02)])
def test_sequential_modes_agree_with_and_without_overlap(mode):
    """Sequential CERTIFY on the GPU: rounds of many images in flight, the next submission queued
    before this one's counts are read (overlap) or not, any number of images in flight: the same rows."""
    model = spreading_model()
    smooth = fastsmooth.Smooth(model, 10, fastsmooth.Gaussian(sigma=0.25), backend="triton", precision="fp32")
    images = gray_images(6)
    runs = []
    for smooth.overlap, in_flight in ((True, None), (False, None), (True, 2)):
        certs = list(smooth.certify_many(images, n0=64, n=4000, alpha=0.01, batch_size=256,
                                         images_per_group=in_flight, **mode))
        runs.append([(c.prediction, c.radius, c.p_lower, c.n, c.counts.tolist(), c.counts0.tolist()) for c in certs])
        assert_spread(certs)
    assert runs[0] == runs[1] == runs[2]
