"""The three backends draw one stream (fastsmooth/backends.py): the native C twin and the Triton kernels
(the interpreter without a GPU) against the torch reference, per noise, mode, dtype and layout. Grid
mode: equal bit for bit; float mode: within the rounding of the float32 log / sin / cos."""

import math
import os

import pytest
import torch
from torch import nn

from fastsmooth import Smooth
from fastsmooth.backends import draw_noise, make_backend
from fastsmooth.noises import make_noise

from _noise_cases import DTYPES, NOISES, assert_float_close

# float32 tolerance of float mode (the transcendental functions of C, numpy and torch differ by a few
# ulps); one ulp of the output dtype beyond it for half precision
F32_TOL = 4e-6


def assert_close(out: torch.Tensor, ref: torch.Tensor):
    assert_float_close(out, ref, F32_TOL)


def fill(backend, shape, dtype, layout, noise, grid, seed=42):
    g = torch.Generator().manual_seed(0)
    if grid:
        xs = torch.randint(0, 256, (2, *shape), generator=g, dtype=torch.int32)
    else:
        xs = torch.rand(2, *shape, generator=g)
    out = torch.zeros(57, *shape, dtype=dtype)
    if layout == "channels_last":
        out = out.to(memory_format=torch.channels_last)
    segs = [(1, 7, 0, 37, 0), (0, 2, 2 ** 32 - 20, 20, 37)]
    make_backend(backend, "cpu").fill(out, xs, segs, noise, seed, grid)
    return out


@pytest.mark.parametrize("grid", [None, 255], ids=["float", "grid"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("key", list(NOISES))
def test_native_equals_the_torch_reference(key, dtype, layout, grid):
    noise = make_noise(**NOISES[key])
    for shape in ((3, 7, 9), (3, 32, 32), (700,)):
        if layout == "channels_last" and len(shape) != 3:
            continue
        out = fill("native", shape, dtype, layout, noise, grid)
        ref = fill("torch", shape, dtype, layout, noise, grid)
        if grid:
            assert torch.equal(out, ref), shape
        else:
            assert_close(out, ref)


@pytest.mark.parametrize("grid", [None, 255], ids=["float", "grid"])
@pytest.mark.parametrize("key", ["gaussian", "laplace", "expinf2"])
def test_triton_equals_native(key, grid):
    noise = make_noise(**NOISES[key])
    out = fill("triton", (3, 7, 9), torch.bfloat16, "contiguous", noise, grid)
    ref = fill("native", (3, 7, 9), torch.bfloat16, "contiguous", noise, grid)
    if grid:
        assert torch.equal(out, ref)
    else:
        assert_close(out, ref)


def test_certificates_agree_across_backends_on_the_grid():
    """Grid mode end to end: the torch and native backends give the same counts, hence the same
    certificates (the model inputs are bit-identical)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 4))
    x = torch.randint(0, 256, (3, 4, 4)) / 255.0
    certs = [Smooth(model, 4, make_noise("laplace", sigma=0.5), backend=b, precision="fp32", input_grid=255)
             .certify(x, n0=50, n=600, image_index=3) for b in ("torch", "native")]
    assert torch.equal(certs[0].counts, certs[1].counts) and torch.equal(certs[0].counts0, certs[1].counts0)
    assert int((certs[0].counts > 0).sum()) >= 2
    assert certs[0].radius == certs[1].radius


def test_make_backend_choices(monkeypatch):
    assert make_backend("auto", "cpu").name == "native"
    assert make_backend("torch", "cpu").name == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("numpy", "cpu")
    with pytest.raises(RuntimeError, match="CPU"):
        make_backend("native", "meta")
    # without the extension, auto takes the torch backend and says so
    import fastsmooth.native_backend as nb

    monkeypatch.setattr(nb, "_library", lambda: None)
    nb._warn_missing.cache_clear()
    with pytest.warns(UserWarning, match="not built"):
        assert make_backend("auto", "cpu").name == "torch"


def test_draw_noise_is_what_fill_adds():
    noise = make_noise("gaussian", sigma=0.5)
    eps = draw_noise(noise, 5, (3, 4), seed=9, image_index=2, first_copy=7)
    x = torch.rand(1, 3, 4)
    out = torch.empty(5, 3, 4)
    make_backend("native", "cpu").fill(out, x, [(0, 2, 7, 5, 0)], noise, 9)
    assert torch.equal(out, x + eps)
    assert eps.dtype == torch.float32 and math.isfinite(float(eps.abs().max()))


def test_native_isa_paths_draw_the_same_words(tmp_path):
    """The AVX-512, AVX2 and scalar Philox paths of the native twin give the same batch, bit for bit
    (each in a fresh process: the path is chosen once per process)."""
    import subprocess
    import sys

    code = ("import sys, torch; from fastsmooth.backends import make_backend; from fastsmooth.noises import make_noise\n"
            "out = torch.empty(40, 3, 7, 9)\n"
            "k = torch.arange(189, dtype=torch.int32).reshape(1, 3, 7, 9)\n"
            "make_backend('native', 'cpu').fill(out[:20], k, [(0, 3, 0, 20, 0)], make_noise('laplace', sigma=0.5), 9, 255)\n"
            "make_backend('native', 'cpu').fill(out[20:], k.float() / 255, [(0, 3, 0, 20, 0)], make_noise('gaussian', sigma=0.5), 9)\n"
            "torch.save(out, sys.argv[1])\n")
    batches = []
    for isa in ("avx512", "avx2", "scalar"):
        path = tmp_path / f"{isa}.pt"
        proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "FASTSMOOTH_NATIVE_ISA": isa})
        assert proc.returncode == 0, proc.stderr[-2000:]
        batches.append(torch.load(path))
    assert torch.equal(batches[0], batches[1]) and torch.equal(batches[1], batches[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_votes_equal_the_reference(dtype):
    """The native vote (one C pass for float32 logits; the torch twin otherwise) against vote_reference:
    ties to the lowest class, NaN and +-inf rows counted apart and never voting."""
    from fastsmooth.kernels.vote import vote_reference

    g = torch.Generator().manual_seed(0)
    backend = make_backend("native", "cpu")
    for _ in range(10):
        logits = torch.randint(-3, 3, (257, 7), generator=g).float()
        logits[torch.rand(257, generator=g) < 0.05, 2] = math.nan
        logits[torch.rand(257, generator=g) < 0.05, 4] = -math.inf
        logits[torch.rand(257, generator=g) < 0.05, 0] = math.inf
        logits = logits.to(dtype)
        slots = torch.randint(0, 3, (257,), generator=g)
        counts, bad = torch.zeros(3, 7, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        ref_counts, ref_bad = torch.zeros(3, 7, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        backend.vote(logits, slots, counts, bad)
        vote_reference(logits, slots, ref_counts, ref_bad)
        assert torch.equal(counts, ref_counts) and torch.equal(bad, ref_bad) and int(bad) > 0
