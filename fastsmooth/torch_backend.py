"""The torch backend: the kernels' torch reference (kernels/perturb.py) as an engine backend, on any
device. The same words and samplers as the Triton and native backends (fastsmooth/backends.py); slow
on a CPU (Philox in int64 tensor arithmetic), where the native backend is the fast path."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .kernels.perturb import perturb_packed_reference
from .kernels.samplers import NoisePlan, stream_tau
from .kernels.vote import vote_reference
from .seeding import DOMAIN_CERTIFY


class TorchBackend:
    """``NoiseBackend`` in plain torch (backends.py states the protocol)."""

    name = "torch"

    def tv_bound(self, noise, dim: int, grid: Optional[int] = None) -> float:
        return stream_tau(NoisePlan(noise, dim, grid))

    def fill(self, out: torch.Tensor, xs: torch.Tensor, segments: Sequence, noise, seed: int,
             grid: Optional[int] = None, domain: int = DOMAIN_CERTIFY) -> None:
        perturb_packed_reference(out, xs, segments, noise, seed, grid, domain)

    def vote(self, logits, slots, counts, nonfinite) -> None:
        vote_reference(logits, slots, counts, nonfinite)
