"""glibc malloc thresholds for CPU runs (fastsmooth/allocator.py): the setting is taken (by a call, by
an engine built for a CPU), the environment turns it off, and a forward computes the same numbers
with it. Each case runs in a fresh process, since the setting is process-wide and taken once. What it
saves (page faults, time) is a measurement: bench/test_bench_allocator.py."""

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")

# Ten forwards of a conv stack whose activations are 8 MiB each (batch 128, 16 x 32 x 32, float32),
# as the engine's CPU micro-batches are: minor page faults counted around them, and a checksum.
PROBE = r"""
import json, resource, sys, torch
from fastsmooth import allocator
how = sys.argv[1]
if how == "call":
    allocator.tune_cpu_allocator()
elif how == "engine":
    import fastsmooth
    fastsmooth.Smooth(torch.nn.Flatten(), 10, fastsmooth.Gaussian(sigma=0.5), device="cpu")
torch.manual_seed(0)
net = torch.nn.Sequential(*[m for _ in range(6) for m in (torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU())])
x = torch.rand(128, 16, 32, 32)
with torch.inference_mode():
    net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    total = sum(float(net(x).double().sum()) for _ in range(10))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tuned": allocator.cpu_allocator_tuned(), "faults": faults, "checksum": total}))
"""


def probe(how: str, **env) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, how], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_setting_is_taken_and_computes_the_same():
    default = probe("none")
    tuned = probe("call")
    assert not default["tuned"] and tuned["tuned"]
    assert tuned["checksum"] == default["checksum"]


def test_the_engine_applies_it_on_a_cpu_and_the_environment_turns_it_off():
    assert probe("engine")["tuned"]
    assert not probe("engine", FASTSMOOTH_TUNE_MALLOC="0")["tuned"]
