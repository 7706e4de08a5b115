"""pytest-benchmark suite of the Triton kernels: noise + perturbation per noise and output dtype, and
voting. On CUDA at real sizes (CIFAR-sized copies, batch 4096); without a GPU through Triton's
interpreter at a tiny size (which measures the interpreter, not the kernels).

    pytest bench/test_bench_kernels.py --benchmark-columns=mean,ops
Throughput is in extra_info: copies_per_s, GB_per_s (x read once + the copies written)."""

import pytest
import torch

from fastsmooth.kernels import perturb_packed, vote
from fastsmooth.noises import make_noise

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPE, BATCH = ((3, 32, 32), 4096) if CUDA else ((3, 8, 8), 64)
ROUNDS = 30 if CUDA else 3
NOISES = {"gaussian": dict(name="gaussian", sigma=0.5), "laplace": dict(name="laplace", sigma=0.5),
          "uniform": dict(name="uniform", sigma=0.5), "expinf": dict(name="expinf", k=1.0, sigma=0.5)}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _facts(benchmark):
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)"
    benchmark.extra_info["torch"] = torch.__version__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", list(NOISES))
def test_bench_perturb(benchmark, name, dtype):
    noise = make_noise(**NOISES[name])
    xs = torch.rand((1, *SHAPE), device=DEVICE)
    out = torch.empty((BATCH, *SHAPE), dtype=dtype, device=DEVICE)
    if CUDA:
        out = out.to(memory_format=torch.channels_last)          # the engine's layout on CUDA
    segs = [(0, 0, 0, BATCH, 0)]

    def run():
        perturb_packed(out, xs, segs, noise, 1)
        _sync()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    mean = benchmark.stats.stats.mean
    _facts(benchmark)
    benchmark.extra_info["copies_per_s"] = BATCH / mean
    benchmark.extra_info["GB_per_s"] = (xs.numel() * 4 + out.numel() * out.element_size()) / mean / 1e9


@pytest.mark.parametrize("k", [10, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_bench_vote(benchmark, dtype, k):
    b = (16384 if k == 10 else 4096) if CUDA else 256
    logits = torch.randn(b, k, device=DEVICE).to(dtype)
    slots = torch.randint(0, 4, (b,), device=DEVICE)
    counts = torch.zeros(4, k, dtype=torch.int64, device=DEVICE)
    bad = torch.zeros(1, dtype=torch.int64, device=DEVICE)

    def run():
        vote(logits, slots, counts, bad)
        _sync()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    _facts(benchmark)
    benchmark.extra_info["rows_per_s"] = b / benchmark.stats.stats.mean
