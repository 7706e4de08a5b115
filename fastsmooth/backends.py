"""The engine's backends: the protocol every backend keeps, and the choice among them.

    triton  Triton kernels (kernels/), CUDA; on a CPU only in Triton's interpreter (tests)
    native  the C twin of the kernels (fastsmooth/native/noise.c), CPU; the fast CPU path
    torch   the kernels' torch reference (kernels/perturb.py), any device; the reference

All three draw the same Philox words (fastsmooth/seeding.py) and apply the same samplers
(kernels/samplers.py), so a copy's noise is the same function of (seed, image, copy, element) on
each: in grid mode the model inputs are bit-identical across backends and devices, in float mode
they agree within the rounding of the float32 transcendental functions (a few ulps).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Protocol, Sequence

import torch

BACKENDS = ("auto", "torch", "native", "triton")


class NoiseBackend(Protocol):
    """What the engine (sampler.py) asks of a backend. Nothing in it may wait for the device."""

    name: str

    def tv_bound(self, noise, dim: int, grid: Optional[int] = None) -> float:
        """tau: total-variation distance of one copy's sampled noise (grid mode: of its nu) from the
        ideal law, derived from what ``fill`` draws (DESIGN §5); the certificate subtracts it."""

    def fill(self, out: torch.Tensor, xs: torch.Tensor, segments: Sequence, noise, seed: int,
             grid: Optional[int] = None, domain: int = 0) -> None:
        """For every segment (slot, image_index, first_copy, count, row): out[row + i] = the model
        input of copy first_copy + i of image image_index, cast to out's dtype: xs[slot] + eps in
        float32 (float mode, xs float32), or fl32((k + nu) / G) with k = xs[slot] (grid mode, xs int32).
        ``out`` is float32 / bfloat16 / float16, contiguous or channels_last; other rows untouched."""

    def vote(self, logits: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor,
             nonfinite: torch.Tensor) -> None:
        """counts[slots[b], argmax(logits[b])] += 1 for rows whose logits are all finite (ties to the
        lowest class); nonfinite += the number of other rows. int64, in place."""


def make_backend(backend: str, device: torch.device) -> NoiseBackend:
    """The backend named ``backend`` for ``device``; "auto" is triton on CUDA (where Triton is
    installed), native on a CPU (where its extension was built), torch otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda":
            backend = "triton" if triton_available() else "torch"
        else:
            from .native_backend import native_available

            backend = "native" if device.type == "cpu" and native_available() else "torch"
    if backend == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend()
    if backend == "native":
        from .native_backend import NativeBackend

        return NativeBackend(device)
    from .kernels.backend import TritonBackend  # imported lazily: triton is optional off Linux

    return TritonBackend(device)


@lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def draw_noise(noise, copies: int, shape, *, seed: int, image_index: int, first_copy: int = 0, domain: int = 0,
               device="cpu", backend: str = "auto") -> torch.Tensor:
    """Float32 noise (copies, *shape) of the stream: copies first_copy .. of ``image_index`` under
    ``seed`` and ``domain`` (seeding.DOMAIN_*), exactly what ``fill`` adds (filled onto zero images:
    0 + eps is eps). For training, attacks and tests; the engine fills its batches directly."""
    shape = tuple(int(s) for s in shape)
    device = torch.device(device)
    out = torch.empty((int(copies), *shape), dtype=torch.float32, device=device)
    zero = torch.zeros((1, *shape), dtype=torch.float32, device=device)
    make_backend(backend, device).fill(out, zero, [(0, int(image_index), int(first_copy), int(copies), 0)], noise,
                                       seed, None, domain)
    return out
