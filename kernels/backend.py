"""The engine's Triton backend: ``fill`` and ``vote`` of the backend protocol (CONTRACT.md).

Used by ``fastsmooth.sampler.make_backend("triton" | "auto" on CUDA, device)``. On a machine without
a GPU it runs through Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported), which
is slow and meant for tests.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .perturb import interpreting, perturb_packed, sampler_tv_bound
from .vote import vote as _vote


class TritonBackend:
    """fill: fused noise + perturbation (perturb.py); vote: argmax voting (vote.py).

    The noise of copy c of image i is a pure function of (seed, i, c, element) -- Philox keyed as in
    philox.py -- so counts do not depend on batch size, packing or sharding. Its law differs from the
    ideal one by at most ``tv_bound(noise, dim)`` in total variation (DESIGN §5).
    """

    name = "triton"

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else None
        if self.device is not None and self.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                "backend='triton' needs a CUDA device; on the CPU it runs only through Triton's "
                "interpreter (set TRITON_INTERPRET=1 before triton is imported; slow, for tests). "
                "Use backend='torch' for the fast CPU path.")

    def tv_bound(self, noise, dim: int) -> float:
        """tau: total-variation distance of one copy's noise from the ideal law."""
        return sampler_tv_bound(noise, dim)

    def fill(self, out: torch.Tensor, xs: torch.Tensor, segments: Sequence, noise, seed: int) -> None:
        """out[row + i] = cast(xs[slot] + eps(seed, image_index, first_copy + i, :)) per segment."""
        perturb_packed(out, xs, segments, noise, seed)

    def vote(self, logits: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor,
             nonfinite: torch.Tensor) -> None:
        """counts[slots[b], argmax(logits[b])] += 1 for finite rows; nonfinite += the other rows."""
        _vote(logits, slots, counts, nonfinite)
