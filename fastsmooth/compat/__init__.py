"""Faces of other smoothing code bases on fastsmooth's engine: ``cohen`` (Cohen et al.'s and Salman et
al.'s ``core.Smooth``) and ``rs4a`` (Yang et al.'s ``src.noises`` / ``src.smooth``)."""

import torch

_SEED_BOUND = 2 ** 63 - 1


def call_seed(generator=None) -> int:
    """A fresh 63-bit noise seed for one call of a face, from ``generator`` (default: torch's global
    CPU generator, as the originals draw their noise from torch's global generators, so that
    torch.manual_seed makes a run reproducible). Two calls share a seed with probability 2^-63."""
    return int(torch.randint(0, _SEED_BOUND, (), dtype=torch.int64, generator=generator))
