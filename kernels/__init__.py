"""Triton kernels of fastsmooth: fused noise + perturbation, argmax voting (see each module).

    perturb(x, copies, noise, seed, *, image_index=0, first_copy=0, out_dtype=torch.float32, grid=None)
    perturb_packed(out, xs, segments, noise, seed, grid=None)   several images into one batch buffer
    vote(logits, slots, counts, nonfinite)                      argmax votes into int64 counts
    stream_tau(NoisePlan(noise, dim, grid))                     tau of the samplers (DESIGN §5)
    TritonBackend                                               the engine's backend (fill, vote, tv_bound)

Each kernel has a torch reference beside it (perturb_reference, perturb_packed_reference,
vote_reference), and each bit-level sampler its torch twin (samplers.py; philox4x32_reference for
the stream itself). On a machine without a GPU, set TRITON_INTERPRET=1 before triton is imported to
run them, and `python -m fastsmooth.kernels.cross_compile` to check that every launch variant
compiles for a GPU.
"""

from .backend import TritonBackend
from .perturb import interpreting, perturb, perturb_packed, perturb_packed_reference, perturb_reference
from .philox import philox4x32_reference
from .samplers import NoisePlan, stream_tau
from .vote import vote, vote_reference

__all__ = [
    "NoisePlan", "TritonBackend", "interpreting", "perturb", "perturb_packed", "perturb_packed_reference",
    "perturb_reference", "philox4x32_reference", "stream_tau", "vote", "vote_reference",
]
