"""Philox4x32-10: the counter-based generator behind the noise kernels, in Triton and in pure torch.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) maps a
128-bit counter (c0, c1, c2, c3) and a 64-bit key (k0, k1) to four 32-bit words. It is the stream
of ``tl.randint4x`` / ``tl.rand`` / ``tl.randn`` (triton.language.random, unchanged from triton 3.0
to 3.9): ``tl.randint4x(seed, offset)`` is Philox with key (seed & 0xFFFFFFFF, seed >> 32) and
counter (offset & 0xFFFFFFFF, offset >> 32, 0, 0).

This module holds
* ``philox4x32`` -- the Triton device function (uint32 in, four uint32 words out), bit-identical
  to ``tl.philox`` for 32-bit counters; written here so that the kernels rely on no API newer
  than triton 3.0 and on nothing private;
* ``philox4x32_reference`` -- the same function in pure torch (int64 arithmetic emulating uint32,
  so it runs on any device and in any torch), and torch emulations of ``tl.randint4x``,
  ``tl.rand`` and ``tl.randn`` used by the tests to pin the stream to Triton's own;
* the noise keying scheme shared by the kernels and their torch references (``noise_counters``).

Keying scheme of fastsmooth's noise (DESIGN §5: the noise is a pure function of
(seed, image index, copy index, element index)):

    key     (k0, k1) = (seed mod 2^32, (seed >> 32) mod 2^32)       seed taken mod 2^64
    counter (c0, c1, c2, c3) = (group, copy index, image index, stream tag)

Element e of a copy belongs to the group and lane

    chunk = e // 512,  lane = (e // 128) % 4,  group = chunk * 128 + e % 128

and takes word ``lane`` of Philox(group, copy, image, TAG_ELEMENT). A chunk is 512 consecutive
elements, one Philox call feeds four elements 128 apart, so a program stores four contiguous runs
of 128 elements and every Philox word is used (no 64-bit offset arithmetic: copies * d exceeding
2^32, as for ImageNet, is no concern since copy and element sit in different counter words).
Per-copy draws (ExpInf's radius, face and sign) use the tags TAG_GAMMA (c0 = rejection iteration)
and TAG_COPY (c0 = 0). The rare Laplace element whose 31 magnitude bits are all zero takes word
``lane`` of Philox(group, copy, image, TAG_LAPLACE_TAIL) for 31 more bits.
Limits: copy index, image index < 2^32, d < 2^31.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10

# Keying scheme (see the module docstring); the kernels use the same numbers as constexprs.
LANE_RUN = 128              # elements of one lane inside a chunk
CHUNK = 4 * LANE_RUN        # elements fed by LANE_RUN Philox calls
TAG_ELEMENT = 0             # c3 of the per-element noise words
TAG_GAMMA = 1               # c3 of ExpInf's Marsaglia-Tsang iterations (c0 = iteration)
TAG_COPY = 2                # c3 of ExpInf's face index, sign and boost uniform (c0 = 0)
TAG_LAPLACE_TAIL = 3        # c3 of the Laplace magnitude's refinement words (same c0 as the element)


def split_seed(seed: int) -> tuple[int, int]:
    """(k0, k1): the Philox key of a seed, taken modulo 2^64 (as torch.manual_seed does)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed & MASK32, seed >> 32


# ------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------

@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (counter c0..c3, key k0, k1): four uint32 words."""
    for _ in tl.static_range(10):
        prev0 = c0
        prev2 = c2
        c0 = tl.umulhi(prev2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(prev0, 0xD2511F53) ^ c3 ^ k1
        c1 = prev2 * 0xCD9E8D57
        c3 = prev0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


# ------------------------------------------------------------------------------------------
# torch reference (int64 holding uint32 values)
# ------------------------------------------------------------------------------------------

def _mul_hilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for uint32 a (int64 tensor) and b, without 64-bit overflow."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_hi, p_lo = a_hi * b, a_lo * b               # each < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def philox4x32_reference(c0, c1, c2, c3, k0: int, k1: int, rounds: int = N_ROUNDS):
    """Philox4x32 in torch: counters are int64 tensors (or ints) holding uint32 values, broadcast
    together; returns four int64 tensors of uint32 words, equal to the Triton function's."""
    c0, c1, c2, c3 = torch.broadcast_tensors(*[torch.as_tensor(c, dtype=torch.int64) & MASK32
                                               for c in (c0, c1, c2, c3)])
    k0, k1 = int(k0) & MASK32, int(k1) & MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mul_hilo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hilo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def to_int32(w: torch.Tensor) -> torch.Tensor:
    """uint32 words held in int64 -> the same bits as int32 values (two's complement)."""
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w)


def randint4x_reference(seed: int, offset) -> tuple[torch.Tensor, ...]:
    """``tl.randint4x(seed, offset)`` for a 64-bit ``offset`` tensor: four int64 tensors holding the
    uint32 words (``to_int32`` gives the same bits as signed int32 values)."""
    offset = torch.as_tensor(offset, dtype=torch.int64)
    k0, k1 = split_seed(seed)
    words = philox4x32_reference(offset & MASK32, (offset >> 32) & MASK32, 0, 0, k0, k1)
    return words


def uint_to_uniform_float_reference(w: torch.Tensor) -> torch.Tensor:
    """``tl.uint_to_uniform_float`` of 32-bit words: 31-bit uniforms in [0, 1) as float32."""
    x = to_int32(w & MASK32)
    x = torch.where(x < 0, -x - 1, x)              # ~x on int32
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def rand_reference(seed: int, offset) -> torch.Tensor:
    """``tl.rand(seed, offset)`` (float32 in [0, 1), 31 bits of resolution)."""
    w0, _, _, _ = randint4x_reference(seed, offset)
    return uint_to_uniform_float_reference(w0)


def randn_reference(seed: int, offset) -> torch.Tensor:
    """``tl.randn(seed, offset)``: Box-Muller on the first two words, u1 floored at 1e-7 (so |z| is
    cut at sqrt(-2 log 1e-7) = 5.68; float32 transcendental functions, equal within rounding)."""
    w0, w1, _, _ = randint4x_reference(seed, offset)
    u1 = torch.clamp(uint_to_uniform_float_reference(w0), min=1.0e-7)
    u2 = uint_to_uniform_float_reference(w1)
    th = torch.tensor(6.283185307179586, dtype=torch.float32) * u2
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(th)


def noise_counters(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(group, lane) of elements 0..dim-1 under the keying scheme (int64 tensors of length dim)."""
    e = torch.arange(dim, dtype=torch.int64)
    group = (e // CHUNK) * LANE_RUN + e % LANE_RUN
    lane = (e // LANE_RUN) % 4
    return group, lane


def group_words(seed: int, image_index, copy_index, dim: int, tag: int = TAG_ELEMENT) -> torch.Tensor:
    """The Philox words (stream ``tag``) of every element group of copies: int64 (len(copy_index),
    groups, 4) of uint32 values. ``image_index`` and ``copy_index`` are ints or 1-D int64 tensors (broadcast
    together)."""
    copy_index = torch.as_tensor(copy_index, dtype=torch.int64).reshape(-1, 1)
    image_index = torch.as_tensor(image_index, dtype=torch.int64).reshape(-1, 1)
    k0, k1 = split_seed(seed)
    ngroups = math.ceil(dim / CHUNK) * LANE_RUN
    groups = torch.arange(ngroups, dtype=torch.int64).reshape(1, -1)
    return torch.stack(philox4x32_reference(groups, copy_index, image_index, tag, k0, k1), -1)
