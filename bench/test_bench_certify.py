"""End-to-end certify throughput against the reference loop and the bare forward (issue 4, DESIGN §6).

    pytest bench/test_bench_certify.py --benchmark-only

For each model (CIFAR ResNet-20-shaped and ResNet-110-shaped with random weights, and the embedded
default model) pytest-benchmark times ``Smooth.certify_many``; in the same process and interleaved
round by round (pedantic ``setup``), the same number of copies goes through (a) Cohen et al.'s
reference sampling loop and (b) the bare model forward in the engine's configuration. Each record's
extra_info holds copies/s of all three, the ratios reference / fastsmooth and fastsmooth / bare, the
configurations and ``telemetry.device_facts``; the human table is printed as well. The measurement
code is ``fastsmooth.benchmark`` (shared with ``fastsmooth bench``). No timing is asserted.

Sizes: on CUDA the real ones (one image, n0 = 100, n = 100,000, batch 1000); on the CPU 500 to 10,000
copies per measurement, so that the suite takes a few minutes. Environment:
    FASTSMOOTH_BENCH_SIZE    full | cpu     (default: full on CUDA, cpu otherwise)
    FASTSMOOTH_BENCH_DEVICE  torch device  (default: cuda if available, else cpu)
    FASTSMOOTH_BENCH_ROUNDS  measured rounds after one warm-up (default: 3 full size; 7 to 15 on the CPU)
    FASTSMOOTH_BENCH_PRECISION / FASTSMOOTH_BENCH_BACKEND   engine settings (default auto)
"""

from __future__ import annotations

import os

import pytest
import torch

from fastsmooth.benchmark import Measurement, Runners, Workload, format_table, make_model
from fastsmooth.telemetry import device_facts

DEVICE = torch.device(os.environ.get("FASTSMOOTH_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
SIZE = os.environ.get("FASTSMOOTH_BENCH_SIZE") or ("full" if DEVICE.type == "cuda" else "cpu")
ROUNDS = int(os.environ["FASTSMOOTH_BENCH_ROUNDS"]) if os.environ.get("FASTSMOOTH_BENCH_ROUNDS") else None
PRECISION = os.environ.get("FASTSMOOTH_BENCH_PRECISION", "auto")
BACKEND = os.environ.get("FASTSMOOTH_BENCH_BACKEND", "auto")

# (n0, n, measured rounds) per model: one image per measurement, batch 1000 (Cohen's and fastsmooth's
# default). On a CPU shared with other processes short measurements and many rounds give the best
# rounds a fair chance to run undisturbed; each method's figure is its best round.
SIZES = {
    "full": {"cifar_resnet20": (100, 100_000, 3), "cifar_resnet110": (100, 100_000, 3), "embedded": (100, 100_000, 3)},
    "cpu": {"cifar_resnet20": (100, 900, 15), "cifar_resnet110": (100, 400, 7), "embedded": (100, 9_900, 15)},
}
if SIZE not in SIZES:
    raise pytest.UsageError(f"FASTSMOOTH_BENCH_SIZE must be one of {', '.join(SIZES)}, got {SIZE!r}")

_FACTS = {}


def _facts() -> dict:
    if "facts" not in _FACTS:
        _FACTS["facts"] = device_facts(DEVICE)
    return _FACTS["facts"]


@pytest.mark.parametrize("arch", ["cifar_resnet20", "cifar_resnet110", "embedded"])
def test_certify_throughput(benchmark, capsys, arch):
    n0, n, rounds = SIZES[SIZE][arch]
    rounds = ROUNDS or rounds
    model, num_classes, shape, name = make_model(arch, device=DEVICE)
    workload = Workload(name, model, num_classes, shape, n0=n0, n=n, images=1, batch=1000,
                        precision=PRECISION, backend=BACKEND, device=str(DEVICE))
    m = Measurement(Runners(workload))
    m.warmup()

    def reference_and_bare():  # untimed by pytest-benchmark; timed by m, interleaved with certify
        m.run("reference")
        m.run("bare")

    benchmark.group = f"certify {arch}"
    benchmark.name = f"fastsmooth certify {arch} ({workload.copies} copies)"
    benchmark.pedantic(lambda: m.run("fastsmooth"), setup=reference_and_bare, rounds=rounds, iterations=1)

    record = m.record(_facts())
    benchmark.extra_info.update(record)
    with capsys.disabled():
        print(f"\n\n[{benchmark.name}]\n{format_table(record)}\n")
