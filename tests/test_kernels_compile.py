"""The kernels build for a GPU: every launch variant compiles to a cubin for sm_90 (H100, H200) and
sm_80 (A100) through Triton's whole pipeline, on this machine without a GPU (kernels/cross_compile.py).
The interpreter tests check what the kernels compute; this checks that they lower, which the
interpreter does not (it accepts, for example, a branch whose two sides have different types)."""

import os
import subprocess
import sys

import pytest

from fastsmooth.kernels import cross_compile


@pytest.mark.slow  # about 20 s per architecture on 2 cores
@pytest.mark.parametrize("arch", [90, 80])
def test_every_launch_variant_compiles_for_the_gpu(arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cold compile, written where the test may write
    proc = subprocess.run([sys.executable, "-m", "fastsmooth.kernels.cross_compile", "--arch", str(arch)],
                          env=env, capture_output=True, text=True, timeout=900)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    labels = [label for label, *_ in cross_compile.variants()]
    assert len(lines) == len(labels) and all(line.startswith(f"ok    sm_{arch}") for line in lines)
    assert all(label in line for label, line in zip(labels, lines))
    for part in ("gaussian", "laplace", "uniform", "expinf boost", "grid", "channels_last", "strided", "bfloat16",
                 "vote"):
        assert any(part in label for label in labels), part


def test_refuses_to_run_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "fastsmooth.kernels.cross_compile"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unset TRITON_INTERPRET" in proc.stderr
