"""Triton kernels of fastsmooth: fused noise + perturbation, argmax voting (see each module).

    perturb(x, copies, noise, seed, *, image_index=0, first_copy=0, out_dtype=torch.float32)
    perturb_packed(out, xs, segments, noise, seed)        several images into one batch buffer
    vote(logits, slots, counts, nonfinite)                argmax votes into int64 counts
    sampler_tv_bound(noise, dim)                          tau of the kernels' samplers (DESIGN §5)
    TritonBackend                                          the engine's backend (fill, vote, tv_bound)

Each kernel has a pure-torch reference beside it: perturb_reference, perturb_packed_reference,
noise_reference, vote_reference, and philox4x32_reference for the random stream itself.
On a machine without a GPU, set TRITON_INTERPRET=1 before triton is imported to run them, and
`python -m fastsmooth.kernels.cross_compile` to check that every launch variant compiles for a GPU.
"""

from .backend import TritonBackend
from .perturb import (interpreting, noise_reference, perturb, perturb_packed, perturb_packed_reference,
                      perturb_reference, sampler_tv_bound)
from .philox import philox4x32_reference
from .vote import vote, vote_reference

__all__ = [
    "TritonBackend", "interpreting", "noise_reference", "perturb", "perturb_packed",
    "perturb_packed_reference", "perturb_reference", "philox4x32_reference", "sampler_tv_bound",
    "vote", "vote_reference",
]
