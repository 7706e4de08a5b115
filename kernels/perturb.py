"""Fused noise + perturbation: out[row] = cast(model input of copy c of image i), in one pass.

Float mode: model input = x + eps(seed, image, copy, element), eps drawn and added in float32, then
cast to the output dtype (float32, bfloat16 or float16, round to nearest even), DESIGN §5.
Grid mode (inputs x = k / G, fastsmooth/grid.py): model input = fl32((k + nu) / G), nu = round(G delta)
drawn exactly; the division is IEEE (tl.div_rn: one float per integer).

Two kernels with the same stream: ``_perturb_kernel`` (copies contiguous or of any 3-d strided
layout) and ``_perturb_cl_kernel`` (channels_last copies with H*W a multiple of 512: a tile holds all
channels of a run of pixels, so that stores stay coalesced). The samplers are in samplers.py, each
beside its torch twin; the keying in fastsmooth/seeding.py: the noise of an element is a pure
function of (seed, image, copy, element), so copies do not depend on block sizes, on batch size, nor
on which images share a launch. ``perturb_packed_reference`` is the whole kernel in torch (the engine's
"torch" backend on any device); its tau is ``samplers.stream_tau``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..seeding import (CHUNK, DOMAIN_CERTIFY, LANE_RUN, TAG_COPY, TAG_ELEMENT, TAG_GAMMA, TAG_GRID_LOW,
                       TAG_LAPLACE_TAIL, check_copy_range, philox_key)
from .jit import jit, tl, triton
from .philox import element_counters, group_words, philox4x32, philox4x32_reference
from .samplers import (MAX_GAMMA_ITERATIONS, NoisePlan, _bf16_bits_rtne, _box_muller, _expinf_copy,
                       _expinf_grid, _grid_alias, _grid_alias_refine, _laplace, _refine_first_cell, _s32,
                       box_muller_twin, expinf_copy_twin, expinf_grid_twin, grid_alias_twin, laplace_twin,
                       s32_twin)

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Compiler options of every launch on CUDA: no fused multiply-add contraction, so that the noise is
# the same float32 arithmetic as the reference's.
CUDA_OPTIONS = {"enable_fp_fusion": False}
# The stream's tags (seeding.py) as compile-time constants of the kernels.
TAG_GAMMA_C = tl.constexpr(TAG_GAMMA) if tl is not None else TAG_GAMMA
TAG_COPY_C = tl.constexpr(TAG_COPY) if tl is not None else TAG_COPY
TAG_LAPLACE_TAIL_C = tl.constexpr(TAG_LAPLACE_TAIL) if tl is not None else TAG_LAPLACE_TAIL
TAG_GRID_LOW_C = tl.constexpr(TAG_GRID_LOW) if tl is not None else TAG_GRID_LOW

# ------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------


@jit
def _laplace_first_cell(w0, w1, w2, w3, eps0, eps1, eps2, eps3, lam, group, copy, image, tag, k0, k1):
    """Laplace noise of a tile with the first cells of U31 refined. The refinement words are drawn,
    and the four lanes recomputed, only in a tile where some word has its 31 low bits all zero
    (probability about 2^-21 for a tile of 1024 elements); elsewhere this costs one min-reduction."""
    low = tl.minimum(tl.minimum(w0 & 0x7FFFFFFF, w1 & 0x7FFFFFFF), tl.minimum(w2 & 0x7FFFFFFF, w3 & 0x7FFFFFFF))
    if tl.min(low) == 0:
        t0, t1, t2, t3 = philox4x32(group, copy, image, tag, k0, k1)
        eps0 = _refine_first_cell(w0, t0, eps0, lam)
        eps1 = _refine_first_cell(w1, t1, eps1, lam)
        eps2 = _refine_first_cell(w2, t2, eps2, lam)
        eps3 = _refine_first_cell(w3, t3, eps3, lam)
    return eps0, eps1, eps2, eps3


@jit
def _lanes(w0, w1, w2, w3, e0, group, copy, image, k0, k1, domain, lam, params_ptr, t_hi_ptr, t_lo_ptr,
           alias_ptr, grid_value, log_g, jj, sgn, NOISE: tl.constexpr, GRID: tl.constexpr,
           BITS: tl.constexpr):
    """The four lanes fed by one Philox call (elements e0 + 128 l, l = 0..3): float32 eps in float
    mode, int32 nu + offset (alias bucket) or nu (ExpInf) in grid mode. ExpInf's per-copy log s,
    face index jj and sign sgn are broadcastable against e0."""
    if GRID == 0:
        ws0 = w0.to(tl.int32, bitcast=True)
        ws1 = w1.to(tl.int32, bitcast=True)
        ws2 = w2.to(tl.int32, bitcast=True)
        ws3 = w3.to(tl.int32, bitcast=True)
        if NOISE == 0:
            n0, n1 = _box_muller(ws0, ws1)
            n2, n3 = _box_muller(ws2, ws3)
            v0 = lam * n0
            v1 = lam * n1
            v2 = lam * n2
            v3 = lam * n3
        elif NOISE == 1:
            v0 = lam * _laplace(ws0)
            v1 = lam * _laplace(ws1)
            v2 = lam * _laplace(ws2)
            v3 = lam * _laplace(ws3)
            v0, v1, v2, v3 = _laplace_first_cell(w0, w1, w2, w3, v0, v1, v2, v3, lam, group, copy, image,
                                                 domain + TAG_LAPLACE_TAIL_C, k0, k1)
        elif NOISE == 2:
            v0 = lam * _s32(ws0)
            v1 = lam * _s32(ws1)
            v2 = lam * _s32(ws2)
            v3 = lam * _s32(ws3)
        else:
            rr = (tl.load(params_ptr + 0) * tl.exp(log_g * tl.load(params_ptr + 4))).to(tl.float32)
            face = rr * sgn
            v0 = tl.where(e0 == jj, face, rr * _s32(ws0))
            v1 = tl.where(e0 + 128 == jj, face, rr * _s32(ws1))
            v2 = tl.where(e0 + 256 == jj, face, rr * _s32(ws2))
            v3 = tl.where(e0 + 384 == jj, face, rr * _s32(ws3))
    elif NOISE == 3:
        t0, t1, t2, t3 = philox4x32(group, copy, image, domain + TAG_GRID_LOW_C, k0, k1)
        a = tl.load(params_ptr + 5) * tl.exp(log_g * tl.load(params_ptr + 4))     # (G lambda) s^(1/k)
        fa = tl.floor(a * sgn + 0.5)
        v0 = tl.where(e0 == jj, fa, _expinf_grid(w0, t0, a)).to(tl.int32)
        v1 = tl.where(e0 + 128 == jj, fa, _expinf_grid(w1, t1, a)).to(tl.int32)
        v2 = tl.where(e0 + 256 == jj, fa, _expinf_grid(w2, t2, a)).to(tl.int32)
        v3 = tl.where(e0 + 384 == jj, fa, _expinf_grid(w3, t3, a)).to(tl.int32)
    else:
        i0, v0, tie0 = _grid_alias(w0, t_hi_ptr, alias_ptr, BITS)
        i1, v1, tie1 = _grid_alias(w1, t_hi_ptr, alias_ptr, BITS)
        i2, v2, tie2 = _grid_alias(w2, t_hi_ptr, alias_ptr, BITS)
        i3, v3, tie3 = _grid_alias(w3, t_hi_ptr, alias_ptr, BITS)
        # the low words only in a tile where a bucket's high bits tie (probability <= 2^-(32-BITS) each)
        ties = (tie0 | tie1) | (tie2 | tie3)
        if tl.max(ties.to(tl.int32)) > 0:
            t0, t1, t2, t3 = philox4x32(group, copy, image, domain + TAG_GRID_LOW_C, k0, k1)
            v0 = _grid_alias_refine(i0, v0, tie0, t0, t_lo_ptr, alias_ptr)
            v1 = _grid_alias_refine(i1, v1, tie1, t1, t_lo_ptr, alias_ptr)
            v2 = _grid_alias_refine(i2, v2, tie2, t2, t_lo_ptr, alias_ptr)
            v3 = _grid_alias_refine(i3, v3, tie3, t3, t_lo_ptr, alias_ptr)
    return v0, v1, v2, v3


@jit
def _store_lane(x_ptrs, out_ptrs, mask, v, grid_value, offset, GRID: tl.constexpr, BF16_BITS: tl.constexpr):
    """out = cast(model input): x + eps (float mode), or fl32((k + nu) / G) with k the int32 grid
    index read at x_ptrs and nu = v - offset (grid mode: the input formed from integers, Voracek &
    Hein, ICLR 2023, so that the votes are those of f o round under the exact noise); one rounding to
    the output dtype."""
    if GRID == 0:
        y = tl.load(x_ptrs, mask=mask, other=0.0) + v
    else:
        k = tl.load(x_ptrs, mask=mask, other=0)
        y = tl.div_rn((k + v - offset).to(tl.float32), grid_value)
    if BF16_BITS:
        tl.store(out_ptrs, _bf16_bits_rtne(y), mask=mask)
    else:
        tl.store(out_ptrs, y.to(out_ptrs.dtype.element_ty), mask=mask)


@jit
def _strided_offset(e, D2, D3, s1, s2, s3):
    i1 = e // (D2 * D3)
    rem = e % (D2 * D3)
    return i1.to(tl.int64) * s1 + (rem // D3).to(tl.int64) * s2 + (rem % D3).to(tl.int64) * s3


@jit(do_not_specialize=["k0", "k1", "domain", "slot", "image", "first_copy", "count", "row0", "offset"])
def _perturb_kernel(
    x_ptr,          # images (M, D): float32 pixels, or int32 grid indices k in grid mode
    out_ptr,        # batch buffer (B, ...) of the output dtype (int16 bits for bf16 in the interpreter)
    params_ptr,     # float64 [lambda, dd, c, 1/alpha, 1/k, G lambda]: ExpInf's constants
    t_hi_ptr,       # int32 alias thresholds, high bits (grid mode, i.i.d. noises)
    t_lo_ptr,       # int32 bits of the thresholds' low words
    alias_ptr,      # int32 alias buckets
    lam,            # float32 lambda of the noise
    k0, k1,         # the Philox key (seed low and high words)
    domain,         # added to every tag (seeding.DOMAIN_*)
    slot,           # row of x_ptr holding this image
    image,          # image index (counter word c2)
    first_copy,     # copy index of the first row (counter word c1)
    count,          # copies in this segment
    row0,           # first output row
    D, D2, D3,      # elements of a copy; the inner sizes of a strided copy layout (D1 = D / (D2 D3))
    s0, s1, s2, s3,  # element strides of out: between rows, and of the three inner dimensions
    grid_value,     # float32 G (grid mode)
    offset,         # alias bucket of nu = 0 (grid mode, i.i.d. noises)
    NOISE: tl.constexpr,       # samplers.NOISE_IDS
    ROWS: tl.constexpr,        # copies per program
    P: tl.constexpr,           # Philox groups per program (4 P elements)
    CONTIG: tl.constexpr,      # copies contiguous (else strided by s1, s2, s3)
    BOOST: tl.constexpr,       # ExpInf with d/k < 1: Gamma boost
    MAX_IT: tl.constexpr,      # cap of Marsaglia-Tsang iterations
    BF16_BITS: tl.constexpr,   # store bfloat16 as rounded int16 bits
    GRID: tl.constexpr,        # 0 float mode, 1 grid mode
    BITS: tl.constexpr,        # log2 of the alias table's buckets
):
    """Copies first_copy + [0, count) of image `image` (pixels xs[slot]) into out rows row0 + ...

    Tile: ROWS copies x P Philox groups (4 P elements: P / 128 chunks of 512; P < 128 only when
    d <= P, one tile per copy). Grid: (cdiv(count, ROWS), cdiv(chunks of d, max(1, P / 128))).
    """
    LANE: tl.constexpr = 128
    pid_r = tl.program_id(0)
    pid_e = tl.program_id(1)
    r = pid_r * ROWS + tl.arange(0, ROWS)
    rmask = r < count
    k0u = k0.to(tl.uint32)
    k1u = k1.to(tl.uint32)
    dom = domain.to(tl.uint32)
    copy = (first_copy + r).to(tl.uint32)
    image_u = tl.zeros([ROWS], dtype=tl.uint32) + image.to(tl.uint32)

    p = tl.arange(0, P)
    chunk = pid_e * (P // LANE) + p // LANE
    t = p % LANE
    group = (chunk * LANE + t).to(tl.uint32)[None, :]
    e0 = (chunk * (4 * LANE) + t)[None, :]                       # element of lane 0, (1, P)
    copy2 = copy[:, None]
    image2 = image_u[:, None]

    w0, w1, w2, w3 = philox4x32(group, copy2, image2, tl.zeros([1, 1], dtype=tl.uint32) + dom, k0u, k1u)
    log_g = 0.0
    jj = 0
    sgn = 1.0
    if NOISE == 3:
        lg, j, s = _expinf_copy(params_ptr, k0u, k1u, copy, image_u, dom + TAG_GAMMA_C, dom + TAG_COPY_C, rmask,
                                D, ROWS, BOOST, MAX_IT)
        log_g = lg[:, None]
        jj = j[:, None]
        sgn = s[:, None]
    v0, v1, v2, v3 = _lanes(w0, w1, w2, w3, e0, group, copy2, image2, k0u, k1u, dom, lam, params_ptr,
                            t_hi_ptr, t_lo_ptr, alias_ptr, grid_value, log_g, jj, sgn, NOISE, GRID, BITS)

    x_row = x_ptr + slot.to(tl.int64) * D                         # x is read once per tile: (1, P)
    out_rows = out_ptr + (row0 + r).to(tl.int64)[:, None] * s0
    m2 = rmask[:, None]
    e = e0
    if CONTIG:
        _store_lane(x_row + e, out_rows + e, m2 & (e < D), v0, grid_value, offset, GRID, BF16_BITS)
        e = e + LANE
        _store_lane(x_row + e, out_rows + e, m2 & (e < D), v1, grid_value, offset, GRID, BF16_BITS)
        e = e + LANE
        _store_lane(x_row + e, out_rows + e, m2 & (e < D), v2, grid_value, offset, GRID, BF16_BITS)
        e = e + LANE
        _store_lane(x_row + e, out_rows + e, m2 & (e < D), v3, grid_value, offset, GRID, BF16_BITS)
    else:
        _store_lane(x_row + e, out_rows + _strided_offset(e, D2, D3, s1, s2, s3), m2 & (e < D), v0, grid_value,
                    offset, GRID, BF16_BITS)
        e = e + LANE
        _store_lane(x_row + e, out_rows + _strided_offset(e, D2, D3, s1, s2, s3), m2 & (e < D), v1, grid_value,
                    offset, GRID, BF16_BITS)
        e = e + LANE
        _store_lane(x_row + e, out_rows + _strided_offset(e, D2, D3, s1, s2, s3), m2 & (e < D), v2, grid_value,
                    offset, GRID, BF16_BITS)
        e = e + LANE
        _store_lane(x_row + e, out_rows + _strided_offset(e, D2, D3, s1, s2, s3), m2 & (e < D), v3, grid_value,
                    offset, GRID, BF16_BITS)


@jit(do_not_specialize=["k0", "k1", "domain", "slot", "image", "first_copy", "row0", "offset"])
def _perturb_cl_kernel(
    x_ptr,          # images (M, C, HW): float32 pixels, or int32 grid indices k in grid mode
    out_ptr,        # channels_last batch buffer: element (c, hw) of a copy at hw * C + c
    params_ptr,     # float64 [lambda, dd, c, 1/alpha, 1/k, G lambda]
    t_hi_ptr,       # int32 alias thresholds, high bits (grid mode)
    t_lo_ptr,       # int32 bits of the thresholds' low words
    alias_ptr,      # int32 alias buckets
    lam,            # float32 lambda
    k0, k1,         # the Philox key
    domain,         # added to every tag
    slot,           # row of x_ptr holding this image
    image,          # image index
    first_copy,     # copy index of the first row
    row0,           # first output row
    D, C, HW,       # elements of a copy, channels, pixels (a multiple of 512)
    s0,             # element stride between rows of out
    grid_value,     # float32 G (grid mode)
    offset,         # alias bucket of nu = 0
    NOISE: tl.constexpr,       # samplers.NOISE_IDS
    CP: tl.constexpr,          # channels padded to a power of two
    PG: tl.constexpr,          # Philox groups per channel per program (4 PG pixels)
    BOOST: tl.constexpr,       # ExpInf Gamma boost
    MAX_IT: tl.constexpr,      # cap of Marsaglia-Tsang iterations
    BF16_BITS: tl.constexpr,   # store bfloat16 as rounded int16 bits
    GRID: tl.constexpr,        # 0 float mode, 1 grid mode
    BITS: tl.constexpr,        # log2 of the alias table's buckets
):
    """Channels-last copies, the same stream as _perturb_kernel (logical element e = c HW + hw); a tile
    is one copy x all C channels (padded to CP) x 4 PG consecutive pixels, so that the stores of a warp
    cover whole runs of pixels with all their channels. Grid: (count, cdiv(HW, 4 PG)).
    """
    LANE: tl.constexpr = 128
    row = tl.program_id(0)
    pid_e = tl.program_id(1)
    k0u = k0.to(tl.uint32)
    k1u = k1.to(tl.uint32)
    dom = domain.to(tl.uint32)
    copy = (tl.zeros([1], dtype=tl.int32) + first_copy + row).to(tl.uint32)
    image_u = tl.zeros([1], dtype=tl.uint32) + image.to(tl.uint32)

    c = tl.arange(0, CP)[:, None]
    p = tl.arange(0, PG)[None, :]
    t = p % LANE
    hw0 = pid_e * (4 * PG) + (p // LANE) * (4 * LANE) + t          # pixel of lane 0, (1, PG)
    e0 = c * HW + hw0                                              # element of lane 0, (CP, PG)
    group = ((e0 // (4 * LANE)) * LANE + t).to(tl.uint32)
    copy2 = copy[:, None]
    image2 = image_u[:, None]
    w0, w1, w2, w3 = philox4x32(group, copy2, image2, tl.zeros([1, 1], dtype=tl.uint32) + dom, k0u, k1u)
    log_g = 0.0
    jj = 0
    sgn = 1.0
    if NOISE == 3:
        lg, j, s = _expinf_copy(params_ptr, k0u, k1u, copy, image_u, dom + TAG_GAMMA_C, dom + TAG_COPY_C,
                                tl.full([1], 1, tl.int1),
                                D, 1, BOOST, MAX_IT)
        log_g = lg[:, None]
        jj = j[:, None]
        sgn = s[:, None]
    v0, v1, v2, v3 = _lanes(w0, w1, w2, w3, e0, group, copy2, image2, k0u, k1u, dom, lam, params_ptr,
                            t_hi_ptr, t_lo_ptr, alias_ptr, grid_value, log_g, jj, sgn, NOISE, GRID, BITS)

    x_img = x_ptr + slot.to(tl.int64) * D
    out_row = out_ptr + (row0 + row).to(tl.int64) * s0
    cmask = c < C
    hw = hw0
    _store_lane(x_img + c * HW + hw, out_row + hw * C + c, cmask & (hw < HW), v0, grid_value, offset, GRID, BF16_BITS)
    hw = hw + LANE
    _store_lane(x_img + c * HW + hw, out_row + hw * C + c, cmask & (hw < HW), v1, grid_value, offset, GRID, BF16_BITS)
    hw = hw + LANE
    _store_lane(x_img + c * HW + hw, out_row + hw * C + c, cmask & (hw < HW), v2, grid_value, offset, GRID, BF16_BITS)
    hw = hw + LANE
    _store_lane(x_img + c * HW + hw, out_row + hw * C + c, cmask & (hw < HW), v3, grid_value, offset, GRID, BF16_BITS)


# ------------------------------------------------------------------------------------------
# launch
# ------------------------------------------------------------------------------------------

def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (TRITON_INTERPRET=1 before triton's import)."""
    return triton is not None and (not hasattr(_perturb_kernel, "run")
                                   or type(_perturb_kernel).__name__ == "InterpretedFunction")


def check_device(t: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("fastsmooth.kernels need Triton, which is not installed here; use backend='torch'")
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "fastsmooth.kernels need a CUDA tensor, or Triton's interpreter for CPU tensors "
            "(set TRITON_INTERPRET=1 before triton is imported); got a tensor on " + str(t.device))


_PARAMS_CACHE: dict = {}


def _params_tensor(device, plan: NoisePlan) -> torch.Tensor:
    """float64 [lambda, dd, c, 1/alpha, 1/k, G lambda] on ``device``, cached (no host->device copy per
    call). G lambda is formed here once, as the twins form it: a = (G lambda) s^(1/k) bit for bit."""
    key = (str(device), plan.lam, plan.dim, plan.k, plan.grid)
    hit = _PARAMS_CACHE.get(key)
    if hit is None:
        if plan.k is None:
            vals = [plan.lam, 0.0, 0.0, 0.0, 0.0, 0.0]
        else:
            dd, c, inv_alpha, _ = plan.gamma
            vals = [plan.lam, dd, c, inv_alpha, 1.0 / plan.k, float(plan.grid or 0) * plan.lam]
        if len(_PARAMS_CACHE) > 256:
            _PARAMS_CACHE.clear()
        hit = _PARAMS_CACHE[key] = torch.tensor(vals, dtype=torch.float64, device=device)
    return hit


def _pow2_at_most(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def choose_config(dim: int, count: int, device_type: str, noise: str = "gaussian") -> dict:
    """Tile sizes without autotuning (autotune does not run in the interpreter).

    P Philox groups (4 P elements) per copy and ROWS copies per program; P < 128 only when d < 128
    (then lanes 1-3 are all masked). On a GPU: P = 256 or 128, whichever wastes fewer groups on a
    copy's last tile; one copy per program and 2 warps for the transcendental samplers (Gaussian,
    Laplace), 4 copies and 4 warps for Uniform and ExpInf (which then shares the latency of the
    per-copy Gamma draw) -- from an H200 sweep, bench/RESULTS.md.
    In the interpreter: P up to 1024 and ROWS up to 32768 / (4 P) (fewer, larger numpy operations).
    """
    chunks = max(1, math.ceil(dim / CHUNK))
    choices = (2, 1) if device_type == "cuda" else (8, 4, 2, 1)     # chunks per tile
    best = None
    for per in choices:
        waste = math.ceil(chunks / per) * per - chunks
        if best is None or waste < best[0]:
            best = (waste, per)
    P = best[1] * LANE_RUN
    if dim < LANE_RUN:      # one partial lane run: the first `dim` groups of chunk 0 are enough
        P = max(16, _next_pow2(dim))
    if device_type == "cuda":
        cheap = noise in ("uniform", "expinf")
        rows = max(1, min((4 if cheap else 1) * max(1, 2 * LANE_RUN // P), _next_pow2(max(1, count))))
        return {"P": P, "ROWS": rows, "num_warps": 4 if cheap else 2}
    rows = max(1, min(_pow2_at_most(max(1, 32768 // (4 * P))), _next_pow2(max(1, count))))
    return {"P": P, "ROWS": rows, "num_warps": 4}


def channels_last_config(channels: int, device_type: str, noise: str = "gaussian") -> dict:
    """Tile of the channels-last kernel: all channels (padded to CP) x 4 PG pixels (H200 sweep:
    PG = 128 and 4 warps, 256 for ExpInf)."""
    CP = _next_pow2(channels)
    if device_type == "cuda":
        PG = 2 * LANE_RUN if noise == "expinf" else LANE_RUN
    else:
        PG = max(LANE_RUN, 8192 // CP)
    return {"CP": CP, "PG": PG, "num_warps": 4}


def _inner_layout(out: torch.Tensor, shape: tuple) -> tuple[bool, tuple, tuple]:
    """(contiguous, (D1, D2, D3), (s1, s2, s3)): the element strides of a copy of ``out``."""
    if out[0].is_contiguous():
        return True, (1, 1, 1), (0, 0, 0)
    sizes, strides = list(shape), list(out.stride()[1:])
    # merge adjacent dims that are contiguous with each other, drop size-1 dims
    dims = [(s, st) for s, st in zip(sizes, strides) if s != 1]
    merged = []
    for s, st in dims:
        if merged and merged[-1][1] == s * st:
            merged[-1] = (merged[-1][0] * s, st)
        else:
            merged.append((s, st))
    if len(merged) > 3:
        raise ValueError(f"unsupported output layout: shape {tuple(out.shape)}, strides {out.stride()}")
    while len(merged) < 3:
        merged.insert(0, (1, 0))
    return False, tuple(m[0] for m in merged), tuple(m[1] for m in merged)


def segment_fields(seg) -> tuple[int, int, int, int, int]:
    """(slot, image_index, first_copy, count, row) of a ``sampler.Segment`` or a 5-tuple in that order."""
    if isinstance(seg, (tuple, list)):
        slot, image_index, first_copy, count, row = seg
    else:
        slot, image_index, first_copy, count, row = (seg.slot, seg.image_index, seg.first_copy,
                                                     seg.count, seg.row)
    return int(slot), int(image_index), int(first_copy), int(count), int(row)


def check_segments(out: torch.Tensor, xs: torch.Tensor, segments: Sequence, grid) -> list:
    """The non-empty segments of a fill as 5-tuples, with every index checked (shared by the backends)."""
    if out.dtype not in OUT_DTYPES:
        raise TypeError(f"out must be float32, bfloat16 or float16, got {out.dtype}")
    shape = tuple(out.shape[1:])
    if tuple(xs.shape[1:]) != shape:
        raise ValueError(f"xs has copies of shape {tuple(xs.shape[1:])}, out rows have shape {shape}")
    want = torch.int32 if grid is not None else torch.float32
    if xs.dtype != want:
        raise TypeError(f"xs must be {want} in {'grid' if grid is not None else 'float'} mode, got {xs.dtype}")
    segs = [f for f in map(segment_fields, segments) if f[3] > 0]
    for slot, image_index, first_copy, count, row in segs:
        if not (0 <= slot < xs.shape[0]) or row < 0 or row + count > out.shape[0]:
            raise IndexError(f"segment {(slot, image_index, first_copy, count, row)} is outside "
                             f"xs ({xs.shape[0]} images) or out ({out.shape[0]} rows)")
        check_copy_range(image_index, first_copy, count)
    return segs


def perturb_packed(out: torch.Tensor, xs: torch.Tensor, segments: Sequence, noise, seed: int, grid=None,
                   domain: int = DOMAIN_CERTIFY) -> torch.Tensor:
    """Fill rows of ``out`` (B, *shape) with noisy copies of the images ``xs`` (M, *shape).

    Each segment (slot, image_index, first_copy, count, row) -- a ``fastsmooth.sampler.Segment`` or
    a 5-tuple in that order -- sets out[row + i] = cast(model input of copy first_copy + i of image
    image_index, from xs[slot]) for i < count. ``xs`` is float32 pixels (float mode) or int32 grid
    indices k (``grid`` = G). Rows outside every segment are left untouched. ``out`` is float32,
    bfloat16 or float16, contiguous or channels_last. One launch per segment. Returns ``out``.
    """
    segs = check_segments(out, xs, segments, grid)
    check_device(out)
    shape = tuple(out.shape[1:])
    dim = math.prod(shape)
    if not segs or out.shape[0] == 0:
        return out
    plan = NoisePlan(noise, dim, grid)
    xs = xs.to(device=out.device).contiguous()
    params = _params_tensor(out.device, plan)
    if plan.table is not None:
        t_hi, t_lo, alias = plan.table.on(out.device)
        bits, offset = plan.table.bits, plan.table.offset
    else:
        t_hi = t_lo = alias = torch.zeros(1, dtype=torch.int32, device=out.device)
        bits, offset = 1, 0
    gridded = int(grid is not None)
    grid_value = float(grid) if grid is not None else 1.0
    boost = bool(plan.k is not None and plan.gamma[3])
    k0, k1 = philox_key(seed)
    contig, (D1, D2, D3), (s1, s2, s3) = _inner_layout(out, shape)
    # channels last (C, HW) with HW a multiple of a chunk: the transposing kernel
    chlast = (not contig and D1 == 1 and s2 == 1 and s3 == D2 and D2 <= 16 and D3 % CHUNK == 0)
    extra = CUDA_OPTIONS if out.device.type == "cuda" else {}
    # bfloat16 rounding done in integer arithmetic where the interpreter runs (its cast truncates)
    bf16_bits = out.dtype == torch.bfloat16 and interpreting()
    target = out.view(torch.int16) if bf16_bits else out
    common = dict(NOISE=plan.noise_id, BOOST=boost, MAX_IT=MAX_GAMMA_ITERATIONS, BF16_BITS=bf16_bits,
                  GRID=gridded, BITS=bits, **extra)
    for slot, image_index, first_copy, count, row in segs:
        if chlast:
            cfg = channels_last_config(D2, out.device.type, plan.name)
            grid_shape = (count, triton.cdiv(D3, 4 * cfg["PG"]))
            _perturb_cl_kernel[grid_shape](
                xs, target, params, t_hi, t_lo, alias, plan.lam, k0, k1, domain, slot, image_index, first_copy,
                row, dim, D2, D3, out.stride(0), grid_value, offset,
                CP=cfg["CP"], PG=cfg["PG"], num_warps=cfg["num_warps"], **common)
            continue
        cfg = choose_config(dim, count, out.device.type, plan.name)
        per_tile = max(1, cfg["P"] // LANE_RUN)           # chunks per tile
        grid_shape = (triton.cdiv(count, cfg["ROWS"]), triton.cdiv(math.ceil(dim / CHUNK), per_tile))
        _perturb_kernel[grid_shape](
            xs, target, params, t_hi, t_lo, alias, plan.lam, k0, k1, domain, slot, image_index, first_copy,
            count, row, dim, D2, D3, out.stride(0), s1, s2, s3, grid_value, offset,
            ROWS=cfg["ROWS"], P=cfg["P"], CONTIG=contig, num_warps=cfg["num_warps"], **common)
    return out


def perturb(x: torch.Tensor, copies: int, noise, seed: int, *, image_index: int = 0, first_copy: int = 0,
            out_dtype: torch.dtype = torch.float32, grid=None, domain: int = DOMAIN_CERTIFY) -> torch.Tensor:
    """``copies`` noisy copies of one image x (float32, or int32 grid indices with ``grid``): Tensor
    (copies, *x.shape) of ``out_dtype`` on x's device, row i = copy first_copy + i of image_index."""
    out = torch.empty((int(copies), *x.shape), dtype=out_dtype, device=x.device)
    return perturb_packed(out, x.unsqueeze(0), [(0, image_index, first_copy, int(copies), 0)], noise, seed,
                          grid, domain)


# ------------------------------------------------------------------------------------------
# torch reference: the whole kernel in torch, on any device (the engine's "torch" backend)
# ------------------------------------------------------------------------------------------

def stream_values(plan: NoisePlan, seed: int, image_index: int, copy_index: torch.Tensor,
                  domain: int = DOMAIN_CERTIFY) -> torch.Tensor:
    """The kernels' draw for copies ``copy_index`` (1-D int64) of one image, on copy_index's device:
    float32 eps (copies, d) in float mode, int64 nu (copies, d) in grid mode."""
    device = copy_index.device
    d = plan.dim
    k0, k1 = philox_key(seed)
    words = group_words(seed, image_index, copy_index, d, domain + TAG_ELEMENT, device)     # (copies, groups, 4)
    group, lane = element_counters(d, device)
    w = words[:, group, lane]

    def words_of_tag(tag):
        return lambda: group_words(seed, image_index, copy_index, d, domain + tag, device)[:, group, lane]

    if plan.name == "expinf":
        def block(c0, tag):
            return philox4x32_reference(c0, copy_index, image_index, domain + tag, k0, k1)
        log_g, j, sign = expinf_copy_twin(block, copy_index, d, plan.k, MAX_GAMMA_ITERATIONS)
        face = torch.arange(d, device=device).reshape(1, -1) == j[:, None]
        if plan.grid is None:
            r = (plan.lam * torch.exp(log_g * (1.0 / plan.k))).to(torch.float32)
            return torch.where(face, (r * sign)[:, None], r[:, None] * s32_twin(w))
        a = ((float(plan.grid) * plan.lam) * torch.exp(log_g * (1.0 / plan.k)))[:, None]
        nu = expinf_grid_twin(w, words_of_tag(TAG_GRID_LOW)(), a)
        return torch.where(face, torch.floor(a * sign[:, None].double() + 0.5), nu).to(torch.int64)
    if plan.grid is not None:
        return grid_alias_twin(w, words_of_tag(TAG_GRID_LOW), plan.table) - plan.table.offset
    lam = torch.tensor(plan.lam, dtype=torch.float32)
    if plan.name == "gaussian":
        # the partner word of each element: lanes (0, 1) and (2, 3) of the same group
        first = lane - lane % 2
        cos, sin = box_muller_twin(words[:, group, first], words[:, group, first + 1])
        return lam * torch.where(lane % 2 == 0, cos, sin)
    if plan.name == "laplace":
        return lam * laplace_twin(w, words_of_tag(TAG_LAPLACE_TAIL))
    return lam * s32_twin(w)


def model_inputs_reference(plan: NoisePlan, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """float32 model inputs of one image from ``stream_values``: x + eps, or fl32((k + nu) / G)."""
    if plan.grid is None:
        return x.reshape(1, -1).to(torch.float32) + values
    return (x.reshape(1, -1).to(torch.int64) + values).to(torch.float32) / float(plan.grid)


def perturb_packed_reference(out: torch.Tensor, xs: torch.Tensor, segments: Sequence, noise, seed: int,
                             grid=None, domain: int = DOMAIN_CERTIFY) -> torch.Tensor:
    """``perturb_packed`` in torch, on out's device: fills ``out`` in place and returns it."""
    segs = check_segments(out, xs, segments, grid)
    if not segs:
        return out
    shape = tuple(out.shape[1:])
    plan = NoisePlan(noise, math.prod(shape), grid)
    xs = xs.to(out.device)
    for slot, image_index, first_copy, count, row in segs:
        copies = torch.arange(first_copy, first_copy + count, dtype=torch.int64, device=out.device)
        inputs = model_inputs_reference(plan, xs[slot], stream_values(plan, seed, image_index, copies, domain))
        out[row:row + count].copy_(inputs.reshape(count, *shape))
    return out


def perturb_reference(x: torch.Tensor, copies: int, noise, seed: int, *, image_index: int = 0,
                      first_copy: int = 0, out_dtype: torch.dtype = torch.float32, grid=None,
                      domain: int = DOMAIN_CERTIFY) -> torch.Tensor:
    """``perturb`` in torch."""
    out = torch.empty((int(copies), *x.shape), dtype=out_dtype, device=x.device)
    return perturb_packed_reference(out, x.unsqueeze(0), [(0, image_index, first_copy, int(copies), 0)], noise,
                                    seed, grid, domain)
