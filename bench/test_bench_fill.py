"""pytest-benchmark suite of the engine's CPU fill (the native backend): noise + perturbation + cast of
a batch of CIFAR-sized copies, per noise, mode (float arithmetic, the 1/255 grid) and output dtype, in
the engine's layouts (float32 contiguous for small models, bfloat16 channels_last for big ones). The
noise is drawn on the backend's worker threads as in certify.

    pytest bench/test_bench_fill.py --benchmark-only --benchmark-columns=mean,ops
Throughput is in extra_info: copies_per_s, GB_per_s (x read once + the copies written)."""

import pytest
import torch

from fastsmooth.noises import make_noise
from fastsmooth.backends import make_backend
from fastsmooth.sampler import Segment
from fastsmooth.telemetry import device_facts

DEVICE = "cpu"
SHAPE, BATCH = (3, 32, 32), 1000
NOISES = {"gaussian": dict(name="gaussian", sigma=0.5), "laplace": dict(name="laplace", sigma=0.5),
          "uniform": dict(name="uniform", sigma=0.5), "expinf": dict(name="expinf", k=1.0, sigma=0.5)}
LAYOUTS = {"float32": (torch.float32, torch.contiguous_format),
           "bfloat16-channels_last": (torch.bfloat16, torch.channels_last)}


@pytest.mark.parametrize("grid", [None, 255], ids=["float", "grid"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(NOISES))
def test_bench_native_fill(benchmark, name, layout, grid):
    dtype, memory_format = LAYOUTS[layout]
    noise = make_noise(**NOISES[name])
    backend = make_backend("native", DEVICE)
    k = torch.randint(0, 256, (1, *SHAPE), dtype=torch.int32)
    xs = k if grid else k / 255.0
    out = torch.empty((BATCH, *SHAPE), dtype=dtype, device=DEVICE).to(memory_format=memory_format)
    image = iter(range(10 ** 9))          # a new image each round: no chunk is served from the cache

    def run():
        with torch.inference_mode():
            backend.fill(out, xs, [Segment(0, next(image), 0, BATCH, 0)], noise, 1, grid)

    benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(device_facts(torch.device(DEVICE)))
    benchmark.extra_info["copies_per_s"] = BATCH / mean
    benchmark.extra_info["GB_per_s"] = (xs.numel() * 4 + out.numel() * out.element_size()) / mean / 1e9
