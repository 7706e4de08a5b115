"""The engine's Triton backend: the ``NoiseBackend`` protocol (fastsmooth/backends.py) on CUDA.

Used by ``fastsmooth.backends.make_backend("triton" | "auto" on CUDA, device)``. On a machine without
a GPU it runs through Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported), which
is slow and meant for tests.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..seeding import DOMAIN_CERTIFY
from .perturb import interpreting, perturb_packed
from .samplers import NoisePlan, stream_tau
from .vote import vote as vote_kernel


class TritonBackend:
    """fill: fused noise + perturbation (perturb.py); vote: argmax voting (vote.py).

    The words are those of the torch and native backends (one stream, seeding.py); the float
    operations agree within rounding, the grid mode's integers exactly.
    """

    name = "triton"

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else None
        if self.device is not None and self.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                "backend='triton' needs a CUDA device; on the CPU it runs only through Triton's "
                "interpreter (set TRITON_INTERPRET=1 before triton is imported; slow, for tests). "
                "Use backend='native' or 'torch' on the CPU.")

    def tv_bound(self, noise, dim: int, grid=None) -> float:
        return stream_tau(NoisePlan(noise, dim, grid))

    def fill(self, out: torch.Tensor, xs: torch.Tensor, segments: Sequence, noise, seed: int, grid=None,
             domain: int = DOMAIN_CERTIFY) -> None:
        perturb_packed(out, xs, segments, noise, seed, grid, domain)

    def vote(self, logits: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor,
             nonfinite: torch.Tensor) -> None:
        vote_kernel(logits, slots, counts, nonfinite)
