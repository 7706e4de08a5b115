"""Philox4x32-10, the counter-based generator behind all of fastsmooth's noise: in Triton and in torch.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) maps a
128-bit counter (c0, c1, c2, c3) and a 64-bit key (k0, k1) to four 32-bit words; it is the stream of
``tl.randint4x`` (triton.language.random: key (seed & 0xFFFFFFFF, seed >> 32), counter (offset low,
offset high, 0, 0)), which tests/test_kernels_philox.py checks.

* ``philox4x32`` -- the Triton device function (uint32 in, four uint32 words out), written here so
  that the kernels rely on no API newer than triton 3.0 and on nothing private;
* ``philox4x32_reference`` -- its torch twin (int64 arithmetic emulating uint32, on any device);
* ``group_words`` / ``element_words`` -- the words of whole copies under the keying scheme of
  fastsmooth/seeding.py (key = seed; counter = (element group, copy, image, domain + tag)).

The native CPU twin is fastsmooth/native/noise.c.
"""

from __future__ import annotations

import torch

from ..seeding import CHUNK, LANE_RUN, MASK32, TAG_ELEMENT, groups_for, philox_key
from .jit import jit, tl

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10


# ------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------

@jit
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
    device = next((c.device for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor)), None)
    c0, c1, c2, c3 = torch.broadcast_tensors(*[torch.as_tensor(c, dtype=torch.int64, device=device) & MASK32
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


def element_counters(dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(group, lane) of elements 0..dim-1 under the keying scheme (int64 tensors of length dim)."""
    e = torch.arange(int(dim), dtype=torch.int64, device=device)
    return (e // CHUNK) * LANE_RUN + e % LANE_RUN, (e // LANE_RUN) % 4


def group_words(seed: int, image_index, copy_index, dim: int, tag: int = TAG_ELEMENT, device=None) -> torch.Tensor:
    """The Philox words (counter word c3 = ``tag``, domain included) of every element group of copies:
    int64 (copies, groups, 4) of uint32 values. ``image_index`` and ``copy_index`` are ints or 1-D
    int64 tensors (broadcast together)."""
    copy_index = torch.as_tensor(copy_index, dtype=torch.int64, device=device).reshape(-1, 1)
    image_index = torch.as_tensor(image_index, dtype=torch.int64, device=copy_index.device).reshape(-1, 1)
    k0, k1 = philox_key(seed)
    groups = torch.arange(groups_for(dim), dtype=torch.int64, device=copy_index.device).reshape(1, -1)
    return torch.stack(philox4x32_reference(groups, copy_index, image_index, tag, k0, k1), -1)


def element_words(seed: int, image_index, copy_index, dim: int, tag: int = TAG_ELEMENT, device=None) -> torch.Tensor:
    """Each element's own word: int64 (copies, dim) of uint32 values (word ``lane`` of its group)."""
    words = group_words(seed, image_index, copy_index, dim, tag, device)
    group, lane = element_counters(dim, words.device)
    return words[:, group, lane]


def counter_words(seed: int, tag: int, index: int, first: int, count: int) -> torch.Tensor:
    """Words first .. first + count - 1 of the run (c0 + 2^32 c1 = word // 4, c2 = index, c3 = tag):
    int64 (count,) of uint32 values, on the CPU. For data order and augmentation (seeding.DOMAIN_DATA)."""
    k0, k1 = philox_key(seed)
    words = torch.arange(int(first), int(first) + int(count), dtype=torch.int64)
    block = words // 4
    out = torch.stack(philox4x32_reference(block & MASK32, block >> 32, index, tag, k0, k1), -1)
    return out.gather(1, (words % 4)[:, None])[:, 0]


def stream_permutation(seed: int, tag: int, index: int, n: int) -> torch.Tensor:
    """A uniformly random permutation of range(n) (int64): the order of 62-bit keys from two words each."""
    w = counter_words(seed, tag, index, 0, 2 * int(n)).reshape(-1, 2)
    return torch.argsort((w[:, 0] << 30) ^ w[:, 1], stable=True)
