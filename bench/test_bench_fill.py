"""pytest-benchmark suite of the engine's torch backend fill (the CPU path): noise + perturbation +
cast of a batch of CIFAR-sized copies, per noise and output dtype, in the engine's layouts (float32
contiguous for small models, bfloat16 channels_last for big ones). Real sizes on any device; the
noise is drawn on the backend's worker threads as in certify.

    pytest bench/test_bench_fill.py --benchmark-only --benchmark-columns=mean,ops
Throughput is in extra_info: copies_per_s, GB_per_s (x read once + the copies written)."""

import pytest
import torch

from fastsmooth.noises import make_noise
from fastsmooth.sampler import Segment, TorchBackend
from fastsmooth.telemetry import device_facts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE, BATCH = (3, 32, 32), 1000
NOISES = {"gaussian": dict(name="gaussian", sigma=0.5), "laplace": dict(name="laplace", sigma=0.5),
          "uniform": dict(name="uniform", sigma=0.5), "expinf": dict(name="expinf", k=1.0, sigma=0.5)}
LAYOUTS = {"float32": (torch.float32, torch.contiguous_format),
           "bfloat16-channels_last": (torch.bfloat16, torch.channels_last)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(NOISES))
def test_bench_torch_fill(benchmark, name, layout):
    dtype, memory_format = LAYOUTS[layout]
    noise = make_noise(**NOISES[name])
    backend = TorchBackend()
    xs = torch.rand((1, *SHAPE), device=DEVICE)
    out = torch.empty((BATCH, *SHAPE), dtype=dtype, device=DEVICE).to(memory_format=memory_format)
    image = iter(range(10 ** 9))          # a new image each round: no chunk is served from the cache

    def run():
        with torch.inference_mode():
            backend.fill(out, xs, [Segment(0, next(image), 0, BATCH, 0)], noise, 1)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(device_facts(torch.device(DEVICE)))
    benchmark.extra_info["copies_per_s"] = BATCH / mean
    benchmark.extra_info["GB_per_s"] = (xs.numel() * 4 + out.numel() * out.element_size()) / mean / 1e9
