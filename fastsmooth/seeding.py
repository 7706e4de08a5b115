"""The key of every noisy copy's noise (DESIGN §5): one counter-based stream, collision-free by construction.

Every random word fastsmooth draws -- certification noise on every backend (Triton kernels, native
CPU code, plain torch), training noise, data shuffles -- is a word of Philox4x32-10 (Salmon et al.,
"Parallel random numbers: as easy as 1, 2, 3", SC 2011), a bijection of a 128-bit counter under a
64-bit key:

    key      (k0, k1) = (seed mod 2^32, (seed >> 32) mod 2^32)          seed taken mod 2^64
    counter  (c0, c1, c2, c3) = (element group, copy index, image index, domain + tag)

Distinct counters give distinct blocks under one key, so the noise of (seed, image, copy, element)
is a pure function of those four numbers and no two copies share a word: nothing is ever seeded
through a 32-bit state (torch's CPU generator keeps only the low 32 bits of its seed, which made
896 of 16.7 M copies repeat another copy's noise when chunks were seeded through it).

Element e of a copy takes word ``lane`` of the block of its ``group``:

    chunk = e // 512,  lane = (e // 128) % 4,  group = chunk * 128 + e % 128

so one Philox call feeds four elements 128 apart, and a run of 128 calls fills 512 consecutive
elements. ``tag`` names what a block is for (TAG_* below); ``domain`` separates the uses of one
seed (certification, training, data order), so that a training run and a certification run with
the same seed never share a word either. Limits: image and copy indices below 2^32, d below 2^31.

This module is pure (integers in, integers out); the Philox function itself, in Triton and in
torch, is in kernels/philox.py, and the native CPU twin in fastsmooth/native/noise.c.
"""

from __future__ import annotations

import itertools
import math
import threading

MASK32 = 0xFFFFFFFF
INDEX_LIMIT = 2 ** 32           # image and copy indices are one counter word each
DIM_LIMIT = 2 ** 31

LANE_RUN = 128                  # elements of one lane inside a chunk
CHUNK = 4 * LANE_RUN            # elements fed by LANE_RUN Philox calls

# c3 = domain + tag. Tags: what a block's four words feed.
TAG_ELEMENT = 0                 # the per-element words (every noise, both modes)
TAG_GAMMA = 1                   # ExpInf's Marsaglia-Tsang iterations (c0 = iteration)
TAG_COPY = 2                    # ExpInf's face index, face sign and boost uniform (c0 = 0)
TAG_LAPLACE_TAIL = 3            # refinement of a Laplace magnitude's first cell (same c0 as the element)
TAG_GRID_LOW = 4                # grid mode: the low 32 bits of each element's 64-bit uniform
# Domains: the uses of one seed. Certification is 0, so its counters are the kernels' historical ones.
DOMAIN_CERTIFY = 0
DOMAIN_TRAIN = 1 << 16          # training noise: image = optimizer step, copy = row of the step's batch
DOMAIN_EVALUATE = 2 << 16       # one noisy pass over a data set (train.evaluate)
DOMAIN_DATA = 3 << 16           # data order and augmentation (image = epoch)


def philox_key(seed: int) -> tuple[int, int]:
    """(k0, k1): the Philox key of a seed, taken modulo 2^64 (as torch.manual_seed does)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed & MASK32, seed >> 32


def element_group_lane(element: int) -> tuple[int, int]:
    """(group, lane) of one element index under the layout above."""
    chunk, rest = divmod(int(element), CHUNK)
    return chunk * LANE_RUN + rest % LANE_RUN, rest // LANE_RUN


def groups_for(dim: int) -> int:
    """Philox groups (c0 values) that cover ``dim`` elements: whole chunks of LANE_RUN groups."""
    return math.ceil(int(dim) / CHUNK) * LANE_RUN


def check_copy_range(image_index: int, first_copy: int, count: int) -> None:
    """Indices must fit their counter words: otherwise two copies would share one."""
    if not 0 <= int(image_index) < INDEX_LIMIT:
        raise ValueError(f"image_index must lie in [0, 2^32), got {image_index}")
    if int(first_copy) < 0 or int(count) < 0 or int(first_copy) + int(count) > INDEX_LIMIT:
        raise ValueError(f"copies [{first_copy}, {int(first_copy) + int(count)}) must lie in [0, 2^32)")


def check_dim(dim: int) -> int:
    if not 0 < int(dim) < DIM_LIMIT:
        raise ValueError(f"inputs of {dim} elements: the noise stream takes 1 to 2^31 - 1")
    return int(dim)


# Calls without an image index take fresh indices from AUTO_INDEX_BASE up, one per call, shared by
# every Smooth (and compat face) of the process: two instances never repeat each other's noise.
# Data-set indices stay below the base. Another process with the same seed takes the same sequence
# (README: give each process its own seed, or pass image indices).
AUTO_INDEX_BASE = 2 ** 31
_auto_indices = itertools.count(AUTO_INDEX_BASE)
_auto_lock = threading.Lock()


def fresh_image_index() -> int:
    """An image index no earlier call of this process has taken (from 2^31 up)."""
    with _auto_lock:
        index = next(_auto_indices)
    if index >= INDEX_LIMIT:
        raise RuntimeError("this process has used all 2^31 automatic image indices; pass image_index")
    return index
