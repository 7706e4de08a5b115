"""pytest-benchmark of the glibc malloc thresholds (fastsmooth/allocator.py): ten CPU forwards of a conv
stack whose activations are 8 MiB each (the engine's CPU micro-batches), in a fresh process with and
without the thresholds; extra_info records the minor page faults around the forwards (seen here:
47,000-143,000 by default, 35-2,083 with the thresholds).

    pytest bench/test_bench_allocator.py --benchmark-only --benchmark-columns=mean"""

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")

PROBE = r"""
import json, resource, sys, time, torch
from fastsmooth import allocator
if sys.argv[1] == "tuned":
    allocator.tune_cpu_allocator()
torch.manual_seed(0)
net = torch.nn.Sequential(*[m for _ in range(6) for m in (torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU())])
x = torch.rand(128, 16, 32, 32)
with torch.inference_mode():
    net(x)
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(10):
        net(x)
    print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                      "seconds": time.perf_counter() - start}))
"""


@pytest.mark.parametrize("how", ["default", "tuned"])
def test_bench_allocator(benchmark, how):
    def run():
        proc = subprocess.run([sys.executable, "-c", PROBE, how], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "FASTSMOOTH_TUNE_MALLOC": "1"})
        return json.loads(proc.stdout.strip().splitlines()[-1])

    result = benchmark.pedantic(run, rounds=3, warmup_rounds=0)
    benchmark.extra_info.update(minor_page_faults=result["faults"], forward_seconds=result["seconds"])
