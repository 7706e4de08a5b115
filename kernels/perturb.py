"""Fused noise + perturbation: out[row] = cast(x[slot] + eps(seed, image, copy, element)).

Two kernels for the four noises of DESIGN §3, with the same noise: ``_perturb_kernel`` (copies
contiguous or of any 3-d strided layout) and ``_perturb_cl_kernel`` (channels_last copies with H*W a
multiple of 512: a tile holds all channels of a run of pixels, so that stores stay coalesced).
The noise is generated inside the kernel in float32
(ExpInf's per-copy radius in float64) from Philox4x32-10 keyed as described in ``philox.py``:
key = seed, counter = (element group, copy index, image index, stream tag). It is added to x in
float32 and only x + eps is cast to the output dtype (float32, bfloat16 or float16, round to nearest
even), DESIGN §5. Because the noise of an element is a pure function of those four numbers, the
copies do not depend on block sizes, on batch size, nor on which images share a launch.

Samplers (w: one 32-bit Philox word, read as int32 bits ws; 2^-31 = 4.656612873077393e-10):

    U31(w) = ((ws & 0x7FFFFFFF) + 0.5) * 2^-31      in (0, 1], 31 bits, never 0
    S32(w) = (ws + 0.5) * 2^-31                     in [-1, 1], 32 bits, symmetric
    U39(a, b) = ((as & 0x7FFFFFFF) + ((bs & 0xFF) + 0.5) * 2^-8) * 2^-31    in (0, 1], 39 bits
    S24(b) = ((bs >> 8) + 0.5) * 2^-23              in [-1, 1], the 24 high bits of b

* Gaussian: Box-Muller on the word pairs (0, 1) and (2, 3) of a group: R = sqrt(-2 log U39(w_a, w_b)),
  theta = pi S24(w_b); eps = lambda (R cos theta, R sin theta). The radius takes 8 bits of the
  angle's word: its tail reaches 7.45, and the unreached first cell costs tau 2^-39 per pair, not 2^-31.
* Laplace: eps = lambda * sign * (-log U), sign = the top bit of w, U = U31(w) -- except on the
  first cell of U31 (the 31 low bits of w all zero, probability 2^-31), where U is refined to
  ((t & 0x7FFFFFFF) + 0.5) * 2^-62 with t the element's word of Philox(..., TAG_LAPLACE_TAIL), i.e.
  62 bits in all. A tile draws those words only when one of its words needs them (probability
  about 2^-21 for a tile of 1024 elements), so the refinement costs one reduction per tile.
  Written as -log of a uniform on (0, 1] so that no value is infinite (DESIGN §5); the magnitude
  bits and the sign bit are independent.
* Uniform: eps = lambda S32(w).
* ExpInf(k): per copy, s ~ Gamma(d/k, 1) by Marsaglia & Tsang (2000) in float64 (shape < 1 through
  the boost Gamma(a) = Gamma(a + 1) U^(1/a)), r = lambda s^(1/k) computed as lambda exp(log(s)/k);
  eps_i = r S32(w_i), except the face coordinate j = floor(W d / 2^64) (W a 64-bit word) which is
  set to +-r with a fair sign. Every program touching a copy recomputes the same r, j and sign from
  the same counters (tags TAG_GAMMA and TAG_COPY).

Total-variation distance tau from the ideal law (``sampler_tv_bound``): the uniforms are on a grid
of 2^-31 (2^-39 for the Gaussian radius, 2^-62 on the Laplace magnitude's first cell); we count as
a defect the ideal mass that the sampler cannot reach except by rounding, i.e. the whole first grid
cell of every uniform that feeds an unbounded transform (its ideal image is an unbounded tail), and
every bias of a discrete choice. The remaining difference -- each value
moved within its grid cell -- is rounding of the order of float32 resolution, as in any float
sampler (torch.randn included), and is not counted.

* Gaussian: tau = (number of Box-Muller pairs feeding the d elements) * 2^-39  (<= d * 2^-39;
  the radius is cut at sqrt(-2 log 2^-40) = 7.45 instead of tl.randn's 5.68).
* Laplace: tau = d * 2^-62 (each |eps_i| / lambda is cut at 63 log 2 = 43.7).
* Uniform: tau = 0 (bounded transform, support [-lambda, lambda] reached).
* ExpInf: tau = 4 * 2^-31 + d * 2^-64: per rejection iteration 2^-31 for the normal's tail and
  2^-31 for the 31-bit acceptance uniform, at most 1.06 iterations on average for shape >= 1
  (acceptance >= 0.95), 2^-31 for the boost uniform's first cell, d 2^-64 for the face index,
  0.05^64 for the cap of 64 iterations, and float64 rounding of the acceptance test (< 1e-12).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from .philox import (CHUNK, LANE_RUN, TAG_COPY, TAG_GAMMA, TAG_LAPLACE_TAIL, group_words, noise_counters,
                     philox4x32, philox4x32_reference, split_seed, to_int32)

NOISE_IDS = {"gaussian": 0, "laplace": 1, "uniform": 2, "expinf": 3}
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_GAMMA_ITERATIONS = 64
# Compiler options of every launch on CUDA: no fused multiply-add contraction, so that the noise is
# the same float32 arithmetic as the reference's.
CUDA_OPTIONS = {"enable_fp_fusion": False}
TWO_M31 = 2.0 ** -31

# ------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------


@triton.jit
def _u31(ws):
    """int32 word -> float32 uniform on (0, 1] (31 bits)."""
    return ((ws & 0x7FFFFFFF).to(tl.float32) + 0.5) * 4.656612873077393e-10


@triton.jit
def _s32(ws):
    """int32 word -> float32 uniform on [-1, 1] (32 bits, symmetric)."""
    return (ws.to(tl.float32) + 0.5) * 4.656612873077393e-10


@triton.jit
def _u31_f64(ws):
    return ((ws & 0x7FFFFFFF).to(tl.float64) + 0.5) * 4.656612873077393e-10


@triton.jit
def _s32_f64(ws):
    return (ws.to(tl.float64) + 0.5) * 4.656612873077393e-10


@triton.jit
def _box_muller(wa, wb):
    # radius uniform U39(wa, wb): 31 bits of wa below the 8 low bits of wb; angle: wb's 24 high bits
    low = ((wb & 0xFF).to(tl.float32) + 0.5) * 0.00390625
    rad = tl.sqrt(-2.0 * tl.log(((wa & 0x7FFFFFFF).to(tl.float32) + low) * 4.656612873077393e-10))
    th = ((wb >> 8).to(tl.float32) + 0.5) * 1.1920928955078125e-07 * 3.141592653589793
    return rad * tl.cos(th), rad * tl.sin(th)


@triton.jit
def _signed_neglog(ws, u):
    """-log u with the sign of the word ws (its top bit)."""
    mag = -tl.log(u)
    return tl.where(ws < 0, -mag, mag)


@triton.jit
def _signed_exp(ws):
    return _signed_neglog(ws, _u31(ws))


@triton.jit
def _refine_first_cell(w, t, eps, lam):
    """A Laplace lane whose word w has its 31 low bits all zero (U31's first cell) takes
    U = ((t & 0x7FFFFFFF) + 0.5) 2^-62 from its refinement word t; other lanes keep eps."""
    u = ((t & 0x7FFFFFFF).to(tl.float32) + 0.5) * 2.168404344971009e-19
    return tl.where((w & 0x7FFFFFFF) == 0, lam * _signed_neglog(w.to(tl.int32, bitcast=True), u), eps)


@triton.jit
def _laplace_first_cell(w0, w1, w2, w3, eps0, eps1, eps2, eps3, lam, group, copy, image, k0, k1):
    """Laplace noise of a tile with the first cells of U31 refined. The refinement words are drawn,
    and the four lanes recomputed, only in a tile where some word has its 31 low bits all zero
    (probability about 2^-21 for a tile of 1024 elements); elsewhere this costs one min-reduction."""
    low = tl.minimum(tl.minimum(w0 & 0x7FFFFFFF, w1 & 0x7FFFFFFF), tl.minimum(w2 & 0x7FFFFFFF, w3 & 0x7FFFFFFF))
    if tl.min(low) == 0:
        tag = tl.zeros([1, 1], dtype=tl.uint32) + 3                     # TAG_LAPLACE_TAIL
        t0, t1, t2, t3 = philox4x32(group, copy, image, tag, k0, k1)
        eps0 = _refine_first_cell(w0, t0, eps0, lam)
        eps1 = _refine_first_cell(w1, t1, eps1, lam)
        eps2 = _refine_first_cell(w2, t2, eps2, lam)
        eps3 = _refine_first_cell(w3, t3, eps3, lam)
    return eps0, eps1, eps2, eps3


@triton.jit
def _expinf_copy(params_ptr, k0, k1, copy, image, rmask, D, ROWS: tl.constexpr, BOOST: tl.constexpr,
                 MAX_IT: tl.constexpr):
    """Per copy (ROWS,): radius r (float32), face index j (int32), face sign (+-1 float32)."""
    lam = tl.load(params_ptr + 0)
    dd = tl.load(params_ptr + 1)          # shape - 1/3 (shape = d/k, or d/k + 1 when boosted)
    cc = tl.load(params_ptr + 2)          # 1 / sqrt(9 dd)
    inv_alpha = tl.load(params_ptr + 3)   # k / d (boost exponent)
    inv_k = tl.load(params_ptr + 4)
    zero = tl.zeros([ROWS], dtype=tl.uint32)
    # Marsaglia-Tsang: iteration `it` of a copy reads Philox(it, copy, image, TAG_GAMMA).
    log_g = tl.full([ROWS], float("-inf"), dtype=tl.float64)
    pending = rmask
    it = tl.full([], 0, dtype=tl.uint32)
    npend = tl.sum(pending.to(tl.int32), axis=0)
    while npend > 0:
        w0, w1, w2, _ = philox4x32(zero + it, copy, image, zero + 1, k0, k1)
        z = tl.sqrt(-2.0 * tl.log(_u31_f64(w0.to(tl.int32, bitcast=True)))) * tl.cos(
            _s32_f64(w1.to(tl.int32, bitcast=True)) * 3.141592653589793)
        y = 1.0 + cc * z
        v = y * y * y
        pos = v > 0.0
        vs = tl.where(pos, v, 1.0)
        ua = _u31_f64(w2.to(tl.int32, bitcast=True))
        accept = pos & (tl.log(ua) < 0.5 * z * z + dd - dd * vs + dd * tl.log(vs))
        log_g = tl.where(pending & accept, tl.log(dd * vs), log_g)
        pending = pending & (accept == 0)
        it += 1
        npend = tl.where(it < MAX_IT, tl.sum(pending.to(tl.int32), axis=0), 0)
    c0, c1, c2, c3 = philox4x32(zero, copy, image, zero + 2, k0, k1)
    if BOOST:
        log_g = log_g + tl.log(_u31_f64(c3.to(tl.int32, bitcast=True))) * inv_alpha
    r = (lam * tl.exp(log_g * inv_k)).to(tl.float32)
    # j = floor(W d / 2^64) with W = c1 * 2^32 + c0: exact in 64-bit integers for d < 2^31.
    dl = (tl.zeros([ROWS], dtype=tl.int32) + D).to(tl.uint64)
    lo = c0.to(tl.uint64) * dl
    hi = c1.to(tl.uint64) * dl
    j = ((hi + (lo >> 32)) >> 32).to(tl.int32)
    sign = tl.where((c2 & 1) == 1, 1.0, -1.0)
    return r, j, sign


@triton.jit
def _bf16_bits_rtne(y):
    """float32 -> the int16 bits of bfloat16, rounded to nearest even, NaN kept NaN (the
    interpreter's own float32 -> bfloat16 cast truncates)."""
    bits = y.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(y != y, 0x7FC0, rounded).to(tl.int16)


@triton.jit
def _eps4(w0, w1, w2, w3, e0, lam, rr, face, jj, NOISE: tl.constexpr):
    """float32 noise of the four lanes fed by one Philox call: elements e0 + 128 l, l = 0..3
    (Laplace before _laplace_first_cell). ExpInf: rr = radius, face = +-radius, jj = face index
    (broadcastable against e0)."""
    w0 = w0.to(tl.int32, bitcast=True)
    w1 = w1.to(tl.int32, bitcast=True)
    w2 = w2.to(tl.int32, bitcast=True)
    w3 = w3.to(tl.int32, bitcast=True)
    if NOISE == 0:
        n0, n1 = _box_muller(w0, w1)
        n2, n3 = _box_muller(w2, w3)
        eps0 = lam * n0
        eps1 = lam * n1
        eps2 = lam * n2
        eps3 = lam * n3
    elif NOISE == 1:
        eps0 = lam * _signed_exp(w0)
        eps1 = lam * _signed_exp(w1)
        eps2 = lam * _signed_exp(w2)
        eps3 = lam * _signed_exp(w3)
    elif NOISE == 2:
        eps0 = lam * _s32(w0)
        eps1 = lam * _s32(w1)
        eps2 = lam * _s32(w2)
        eps3 = lam * _s32(w3)
    else:
        eps0 = tl.where(e0 == jj, face, rr * _s32(w0))
        eps1 = tl.where(e0 + 128 == jj, face, rr * _s32(w1))
        eps2 = tl.where(e0 + 256 == jj, face, rr * _s32(w2))
        eps3 = tl.where(e0 + 384 == jj, face, rr * _s32(w3))
    return eps0, eps1, eps2, eps3


@triton.jit
def _finish(x_ptrs, out_ptrs, mask, eps, BF16_BITS: tl.constexpr):
    """out = cast(x + eps): noise added in float32, one rounding to the output dtype."""
    y = tl.load(x_ptrs, mask=mask, other=0.0) + eps
    if BF16_BITS:
        tl.store(out_ptrs, _bf16_bits_rtne(y), mask=mask)
    else:
        tl.store(out_ptrs, y.to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _strided_offset(e, D2, D3, s1, s2, s3):
    i1 = e // (D2 * D3)
    rem = e % (D2 * D3)
    return i1.to(tl.int64) * s1 + (rem // D3).to(tl.int64) * s2 + (rem % D3).to(tl.int64) * s3


@triton.jit(do_not_specialize=["k0", "k1", "slot", "image", "first_copy", "count", "row0"])
def _perturb_kernel(x_ptr, out_ptr, params_ptr, lam, k0, k1, slot, image, first_copy, count, row0,
                    D, D2, D3, s0, s1, s2, s3,
                    NOISE: tl.constexpr, ROWS: tl.constexpr, P: tl.constexpr, CONTIG: tl.constexpr,
                    BOOST: tl.constexpr, MAX_IT: tl.constexpr, BF16_BITS: tl.constexpr):
    """Copies first_copy + [0, count) of image `image` (pixels xs[slot]) into out rows row0 + ...

    Tile: ROWS copies x P Philox groups (4 P elements: P / 128 chunks of 512; P < 128 only when
    d <= P, one tile per copy). Grid: (cdiv(count, ROWS), cdiv(chunks of d, max(1, P / 128))).
    Output: contiguous copies (CONTIG) or any 3-d strided copy layout (D1, D2, D3; s1, s2, s3).
    """
    LANE: tl.constexpr = 128
    pid_r = tl.program_id(0)
    pid_e = tl.program_id(1)
    r = pid_r * ROWS + tl.arange(0, ROWS)
    rmask = r < count
    k0u = k0.to(tl.uint32)
    k1u = k1.to(tl.uint32)
    copy = (first_copy + r).to(tl.uint32)
    image_u = tl.zeros([ROWS], dtype=tl.uint32) + image.to(tl.uint32)

    p = tl.arange(0, P)
    chunk = pid_e * (P // LANE) + p // LANE
    t = p % LANE
    group = (chunk * LANE + t).to(tl.uint32)
    e0 = (chunk * (4 * LANE) + t)[None, :]                       # element of lane 0, (1, P)

    w0, w1, w2, w3 = philox4x32(group[None, :], copy[:, None], image_u[:, None],
                                tl.zeros([1, 1], dtype=tl.uint32), k0u, k1u)
    rr = 0.0
    face = 0.0
    jj = 0
    if NOISE == 3:
        rad, j, sgn = _expinf_copy(params_ptr, k0u, k1u, copy, image_u, rmask, D, ROWS, BOOST, MAX_IT)
        rr = rad[:, None]
        face = rr * sgn[:, None]
        jj = j[:, None]
    eps0, eps1, eps2, eps3 = _eps4(w0, w1, w2, w3, e0, lam, rr, face, jj, NOISE)
    if NOISE == 1:
        eps0, eps1, eps2, eps3 = _laplace_first_cell(w0, w1, w2, w3, eps0, eps1, eps2, eps3, lam, group[None, :],
                                                     copy[:, None], image_u[:, None], k0u, k1u)

    x_row = x_ptr + slot.to(tl.int64) * D                         # x is read once per tile: (1, P)
    out_rows = out_ptr + (row0 + r).to(tl.int64)[:, None] * s0
    m2 = rmask[:, None]
    e = e0
    if CONTIG:
        _finish(x_row + e, out_rows + e, m2 & (e < D), eps0, BF16_BITS)
        e = e + LANE
        _finish(x_row + e, out_rows + e, m2 & (e < D), eps1, BF16_BITS)
        e = e + LANE
        _finish(x_row + e, out_rows + e, m2 & (e < D), eps2, BF16_BITS)
        e = e + LANE
        _finish(x_row + e, out_rows + e, m2 & (e < D), eps3, BF16_BITS)
    else:
        _finish(x_row + e, out_rows + _strided_offset(e, D2, D3, s1, s2, s3), m2 & (e < D), eps0, BF16_BITS)
        e = e + LANE
        _finish(x_row + e, out_rows + _strided_offset(e, D2, D3, s1, s2, s3), m2 & (e < D), eps1, BF16_BITS)
        e = e + LANE
        _finish(x_row + e, out_rows + _strided_offset(e, D2, D3, s1, s2, s3), m2 & (e < D), eps2, BF16_BITS)
        e = e + LANE
        _finish(x_row + e, out_rows + _strided_offset(e, D2, D3, s1, s2, s3), m2 & (e < D), eps3, BF16_BITS)


@triton.jit(do_not_specialize=["k0", "k1", "slot", "image", "first_copy", "row0"])
def _perturb_cl_kernel(x_ptr, out_ptr, params_ptr, lam, k0, k1, slot, image, first_copy, row0,
                       D, C, HW, s0,
                       NOISE: tl.constexpr, CP: tl.constexpr, PG: tl.constexpr, BOOST: tl.constexpr,
                       MAX_IT: tl.constexpr, BF16_BITS: tl.constexpr):
    """Channels-last copies (element (c, hw) of a copy at hw * C + c), HW a multiple of 512.

    Same noise as _perturb_kernel (logical element e = c HW + hw); a tile is one copy x all C
    channels (padded to CP) x 4 PG consecutive pixels, so that the stores of a warp cover whole
    runs of pixels with all their channels. Grid: (count, cdiv(HW, 4 PG)).
    """
    LANE: tl.constexpr = 128
    row = tl.program_id(0)
    pid_e = tl.program_id(1)
    k0u = k0.to(tl.uint32)
    k1u = k1.to(tl.uint32)
    copy = (tl.zeros([1], dtype=tl.int32) + first_copy + row).to(tl.uint32)
    image_u = tl.zeros([1], dtype=tl.uint32) + image.to(tl.uint32)

    c = tl.arange(0, CP)[:, None]
    p = tl.arange(0, PG)[None, :]
    t = p % LANE
    hw0 = pid_e * (4 * PG) + (p // LANE) * (4 * LANE) + t          # pixel of lane 0, (1, PG)
    e0 = c * HW + hw0                                              # element of lane 0, (CP, PG)
    group = ((e0 // (4 * LANE)) * LANE + t).to(tl.uint32)
    w0, w1, w2, w3 = philox4x32(group, copy[:, None], image_u[:, None],
                                tl.zeros([1, 1], dtype=tl.uint32), k0u, k1u)
    rr = 0.0
    face = 0.0
    jj = 0
    if NOISE == 3:
        rad, j, sgn = _expinf_copy(params_ptr, k0u, k1u, copy, image_u, tl.full([1], 1, tl.int1), D, 1,
                                   BOOST, MAX_IT)
        rr = rad[:, None]
        face = rr * sgn[:, None]
        jj = j[:, None]
    eps0, eps1, eps2, eps3 = _eps4(w0, w1, w2, w3, e0, lam, rr, face, jj, NOISE)
    if NOISE == 1:
        eps0, eps1, eps2, eps3 = _laplace_first_cell(w0, w1, w2, w3, eps0, eps1, eps2, eps3, lam, group,
                                                     copy[:, None], image_u[:, None], k0u, k1u)

    x_img = x_ptr + slot.to(tl.int64) * D
    out_row = out_ptr + (row0 + row).to(tl.int64) * s0
    cmask = c < C
    hw = hw0
    _finish(x_img + c * HW + hw, out_row + hw * C + c, cmask & (hw < HW), eps0, BF16_BITS)
    hw = hw + LANE
    _finish(x_img + c * HW + hw, out_row + hw * C + c, cmask & (hw < HW), eps1, BF16_BITS)
    hw = hw + LANE
    _finish(x_img + c * HW + hw, out_row + hw * C + c, cmask & (hw < HW), eps2, BF16_BITS)
    hw = hw + LANE
    _finish(x_img + c * HW + hw, out_row + hw * C + c, cmask & (hw < HW), eps3, BF16_BITS)


# ------------------------------------------------------------------------------------------
# launch
# ------------------------------------------------------------------------------------------

def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (TRITON_INTERPRET=1 before triton's import)."""
    return not hasattr(_perturb_kernel, "run") or type(_perturb_kernel).__name__ == "InterpretedFunction"


def check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "fastsmooth.kernels need a CUDA tensor, or Triton's interpreter for CPU tensors "
            "(set TRITON_INTERPRET=1 before triton is imported); got a tensor on " + str(t.device))


def noise_spec(noise, dim: int) -> tuple[str, float, float | None]:
    """(name, lambda, k) of a fastsmooth noise for inputs of ``dim`` elements."""
    name = str(noise.name).lower()
    if name not in NOISE_IDS:
        raise ValueError(f"no kernel for noise {noise.name!r}; expected one of {', '.join(NOISE_IDS)}")
    lam = float(noise.scale_for(dim))
    k = float(noise.k) if name == "expinf" else None
    return name, lam, k


def gamma_params(dim: int, k: float) -> tuple[float, float, float, bool]:
    """Marsaglia-Tsang constants for Gamma(d/k): (dd, c, 1/alpha, boost)."""
    alpha = dim / k
    boost = alpha < 1.0
    shape = alpha + 1.0 if boost else alpha
    dd = shape - 1.0 / 3.0
    return dd, 1.0 / math.sqrt(9.0 * dd), 1.0 / alpha, boost


_PARAMS_CACHE: dict = {}


def _params_tensor(device, lam: float, dim: int, k: float | None) -> tuple[torch.Tensor, bool]:
    """float64 [lambda, dd, c, 1/alpha, 1/k] on ``device``, cached (no host->device copy per call)."""
    key = (str(device), lam, dim, k)
    hit = _PARAMS_CACHE.get(key)
    if hit is None:
        if k is None:
            vals, boost = [lam, 0.0, 0.0, 0.0, 0.0], False
        else:
            dd, c, inv_alpha, boost = gamma_params(dim, k)
            vals = [lam, dd, c, inv_alpha, 1.0 / k]
        if len(_PARAMS_CACHE) > 256:
            _PARAMS_CACHE.clear()
        hit = (torch.tensor(vals, dtype=torch.float64, device=device), boost)
        _PARAMS_CACHE[key] = hit
    return hit


def _pow2_at_most(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


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
        P = max(16, triton.next_power_of_2(dim))
    if device_type == "cuda":
        cheap = noise in ("uniform", "expinf")
        rows = max(1, min((4 if cheap else 1) * max(1, 2 * LANE_RUN // P), triton.next_power_of_2(max(1, count))))
        return {"P": P, "ROWS": rows, "num_warps": 4 if cheap else 2}
    rows = max(1, min(_pow2_at_most(max(1, 32768 // (4 * P))), triton.next_power_of_2(max(1, count))))
    return {"P": P, "ROWS": rows, "num_warps": 4}


def channels_last_config(channels: int, device_type: str, noise: str = "gaussian") -> dict:
    """Tile of the channels-last kernel: all channels (padded to CP) x 4 PG pixels (H200 sweep:
    PG = 128 and 4 warps, 256 for ExpInf)."""
    CP = triton.next_power_of_2(channels)
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


def _segment_fields(seg) -> tuple[int, int, int, int, int]:
    if isinstance(seg, (tuple, list)):
        slot, image_index, first_copy, count, row = seg
    else:
        slot, image_index, first_copy, count, row = (seg.slot, seg.image_index, seg.first_copy,
                                                     seg.count, seg.row)
    return int(slot), int(image_index), int(first_copy), int(count), int(row)


def perturb_packed(out: torch.Tensor, xs: torch.Tensor, segments: Sequence, noise, seed: int) -> torch.Tensor:
    """Fill rows of ``out`` (B, *shape) with noisy copies of the images ``xs`` (M, *shape).

    Each segment (slot, image_index, first_copy, count, row) -- a ``fastsmooth.sampler.Segment`` or
    a 5-tuple in that order -- sets out[row + i] = cast(xs[slot] + eps(seed, image_index,
    first_copy + i, :)) for i < count. Rows outside every segment are left untouched. ``out`` is
    float32, bfloat16 or float16, contiguous or channels_last; ``xs`` is converted to contiguous
    float32 on out's device. One launch per segment. Returns ``out``.
    """
    if out.dtype not in OUT_DTYPES:
        raise TypeError(f"out must be float32, bfloat16 or float16, got {out.dtype}")
    shape = tuple(out.shape[1:])
    if tuple(xs.shape[1:]) != shape:
        raise ValueError(f"xs has copies of shape {tuple(xs.shape[1:])}, out rows have shape {shape}")
    check_device(out)
    dim = math.prod(shape)
    if dim >= 2 ** 31:
        raise ValueError(f"inputs of {dim} elements: the kernels take fewer than 2^31")
    segs = [f for f in map(_segment_fields, segments) if f[3] > 0]
    if not segs or out.shape[0] == 0:
        return out
    xs = xs.to(device=out.device, dtype=torch.float32).contiguous()
    name, lam, k = noise_spec(noise, dim)
    params, boost = _params_tensor(out.device, lam, dim, k)
    k0, k1 = split_seed(seed)
    contig, (D1, D2, D3), (s1, s2, s3) = _inner_layout(out, shape)
    # channels last (C, HW) with HW a multiple of a chunk: the transposing kernel
    chlast = (not contig and D1 == 1 and s2 == 1 and s3 == D2 and D2 <= 16 and D3 % CHUNK == 0)
    extra = CUDA_OPTIONS if out.device.type == "cuda" else {}
    # bfloat16 rounding done in integer arithmetic where the interpreter runs (its cast truncates)
    bf16_bits = out.dtype == torch.bfloat16 and interpreting()
    target = out.view(torch.int16) if bf16_bits else out
    cfg_cl = channels_last_config(D2, out.device.type, name) if chlast else None
    for slot, image_index, first_copy, count, row in segs:
        if not (0 <= slot < xs.shape[0]) or row < 0 or row + count > out.shape[0]:
            raise IndexError(f"segment {(slot, image_index, first_copy, count, row)} is outside "
                             f"xs ({xs.shape[0]} images) or out ({out.shape[0]} rows)")
        if not (0 <= image_index < 2 ** 32) or first_copy < 0 or first_copy + count > 2 ** 32:
            raise ValueError("image and copy indices must lie in [0, 2^32)")
        if chlast:
            cfg = cfg_cl
            grid = (count, triton.cdiv(D3, 4 * cfg["PG"]))
            _perturb_cl_kernel[grid](
                xs, target, params, lam, k0, k1, slot, image_index, first_copy, row,
                dim, D2, D3, out.stride(0),
                NOISE=NOISE_IDS[name], CP=cfg["CP"], PG=cfg["PG"], BOOST=boost,
                MAX_IT=MAX_GAMMA_ITERATIONS, BF16_BITS=bf16_bits, num_warps=cfg["num_warps"], **extra)
            continue
        cfg = choose_config(dim, count, out.device.type, name)
        per_tile = max(1, cfg["P"] // LANE_RUN)           # chunks per tile
        grid = (triton.cdiv(count, cfg["ROWS"]), triton.cdiv(math.ceil(dim / CHUNK), per_tile))
        _perturb_kernel[grid](
            xs, target, params, lam, k0, k1, slot, image_index, first_copy, count, row,
            dim, D2, D3, out.stride(0), s1, s2, s3,
            NOISE=NOISE_IDS[name], ROWS=cfg["ROWS"], P=cfg["P"], CONTIG=contig, BOOST=boost,
            MAX_IT=MAX_GAMMA_ITERATIONS, BF16_BITS=bf16_bits, num_warps=cfg["num_warps"], **extra)
    return out


def perturb(x: torch.Tensor, copies: int, noise, seed: int, *, image_index: int = 0, first_copy: int = 0,
            out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``copies`` noisy copies of one image x: Tensor (copies, *x.shape) of ``out_dtype`` on x's
    device, row i = cast(x + eps(seed, image_index, first_copy + i, :))."""
    out = torch.empty((int(copies), *x.shape), dtype=out_dtype, device=x.device)
    return perturb_packed(out, x.unsqueeze(0), [(0, image_index, first_copy, int(copies), 0)], noise, seed)


# ------------------------------------------------------------------------------------------
# torch reference (same stream, same float32 operations; transcendental functions within rounding)
# ------------------------------------------------------------------------------------------

_F32 = torch.float32


def _u31_ref(w, dtype=_F32):
    return (((w & 0x7FFFFFFF).to(dtype) + 0.5) * TWO_M31)


def _s32_ref(w, dtype=_F32):
    return (to_int32(w).to(dtype) + 0.5) * TWO_M31


def _box_muller_ref(wa, wb):
    """(R, theta) of ``_box_muller`` for words held in int64: R = sqrt(-2 log U39), theta = pi S24."""
    low = ((wb & 0xFF).to(_F32) + 0.5) * 2.0 ** -8
    rad = torch.sqrt(-2.0 * torch.log(((wa & 0x7FFFFFFF).to(_F32) + low) * TWO_M31))
    th = ((to_int32(wb) >> 8).to(_F32) + 0.5) * 2.0 ** -23 * torch.tensor(math.pi, dtype=_F32)
    return rad, th


def expinf_copy_reference(seed: int, image_index, copy_index: torch.Tensor, dim: int, lam: float, k: float):
    """ExpInf's per-copy (r float32, j int64, sign float32) for 1-D int64 ``copy_index``."""
    k0, k1 = split_seed(seed)
    dd, c, inv_alpha, boost = gamma_params(dim, k)
    copy_index = torch.as_tensor(copy_index, dtype=torch.int64)
    n = copy_index.numel()
    log_g = torch.full((n,), -math.inf, dtype=torch.float64)
    pending = torch.ones(n, dtype=torch.bool)
    it = 0
    while bool(pending.any()) and it < MAX_GAMMA_ITERATIONS:
        w0, w1, w2, _ = philox4x32_reference(it, copy_index, image_index, TAG_GAMMA, k0, k1)
        z = torch.sqrt(-2.0 * torch.log(_u31_ref(w0, torch.float64))) * torch.cos(
            _s32_ref(w1, torch.float64) * math.pi)
        y = 1.0 + c * z
        v = y * y * y
        pos = v > 0.0
        vs = torch.where(pos, v, torch.ones_like(v))
        ua = _u31_ref(w2, torch.float64)
        accept = pos & (torch.log(ua) < 0.5 * z * z + dd - dd * vs + dd * torch.log(vs))
        log_g = torch.where(pending & accept, torch.log(dd * vs), log_g)
        pending = pending & ~accept
        it += 1
    c0, c1, c2, c3 = philox4x32_reference(0, copy_index, image_index, TAG_COPY, k0, k1)
    if boost:
        log_g = log_g + torch.log(_u31_ref(c3, torch.float64)) * inv_alpha
    r = (lam * torch.exp(log_g * (1.0 / k))).to(_F32)
    j = (c1 * dim + ((c0 * dim) >> 32)) >> 32
    sign = torch.where((c2 & 1) == 1, 1.0, -1.0).to(_F32)
    return r, j, sign


def noise_reference(noise, shape: tuple, seed: int, image_index: int = 0, first_copy: int = 0,
                    copies: int = 1) -> torch.Tensor:
    """eps of the kernels in torch on the CPU: float32 (copies, *shape)."""
    shape = tuple(shape)
    dim = math.prod(shape)
    name, lam, k = noise_spec(noise, dim)
    copy_index = torch.arange(first_copy, first_copy + copies, dtype=torch.int64)
    words = group_words(seed, image_index, copy_index, dim)         # (copies, groups, 4), uint32 values
    group, lane = noise_counters(dim)
    w = words[:, group, lane]                                          # (copies, dim): each element's word
    lam32 = torch.tensor(lam, dtype=_F32)
    if name == "gaussian":
        # partner word of each element: lanes (0, 1) and (2, 3) of the same group
        wa = words[:, group, lane - lane % 2]
        wb = words[:, group, lane - lane % 2 + 1]
        rad, th = _box_muller_ref(wa, wb)
        n = torch.where(lane % 2 == 0, rad * torch.cos(th), rad * torch.sin(th))
        eps = lam32 * n
    elif name == "laplace":
        m = w & 0x7FFFFFFF
        u = _u31_ref(w)
        if bool((m == 0).any()):            # U31's first cell, refined by the TAG_LAPLACE_TAIL words
            tail = group_words(seed, image_index, copy_index, dim, TAG_LAPLACE_TAIL)[:, group, lane]
            u = torch.where(m == 0, ((tail & 0x7FFFFFFF).to(_F32) + 0.5) * 2.0 ** -62, u)
        mag = -torch.log(u)
        eps = lam32 * torch.where(w >= 2 ** 31, -mag, mag)
    elif name == "uniform":
        eps = lam32 * _s32_ref(w)
    else:
        r, j, sign = expinf_copy_reference(seed, image_index, copy_index, dim, lam, k)
        eps = r[:, None] * _s32_ref(w)
        face = torch.arange(dim).reshape(1, -1) == j[:, None]
        eps = torch.where(face, (r * sign)[:, None], eps)
    return eps.reshape(copies, *shape)


def perturb_reference(x: torch.Tensor, copies: int, noise, seed: int, *, image_index: int = 0,
                      first_copy: int = 0, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``perturb`` in pure torch (CPU): cast(x + eps) with eps from ``noise_reference``."""
    eps = noise_reference(noise, tuple(x.shape), seed, image_index, first_copy, int(copies))
    return (x.detach().to("cpu", _F32).unsqueeze(0) + eps).to(out_dtype)


def perturb_packed_reference(out: torch.Tensor, xs: torch.Tensor, segments: Sequence, noise, seed: int):
    """``perturb_packed`` in pure torch: fills ``out`` in place (any device) and returns it."""
    for slot, image_index, first_copy, count, row in (_segment_fields(s) for s in segments):
        if count > 0:
            ref = perturb_reference(xs[slot], count, noise, seed, image_index=image_index,
                                    first_copy=first_copy, out_dtype=out.dtype)
            out[row:row + count].copy_(ref)
    return out


def gaussian_pairs(dim: int) -> int:
    """Box-Muller pairs whose outputs land on elements < dim (lanes (0,1) and (2,3) of a group)."""
    full, rest = divmod(dim, CHUNK)
    return full * 2 * LANE_RUN + min(rest, LANE_RUN) + max(0, min(rest - 2 * LANE_RUN, LANE_RUN))


def sampler_tv_bound(noise, dim: int) -> float:
    """tau: bound on the total-variation distance between one copy's kernel noise and the ideal
    law (see the module docstring for each noise); subtract it from p_lower (DESIGN §5)."""
    name = str(noise.name).lower()
    dim = int(dim)
    if name == "gaussian":
        return gaussian_pairs(dim) * 2.0 ** -39
    if name == "laplace":
        return dim * 2.0 ** -62
    if name == "uniform":
        return 0.0
    if name == "expinf":
        return 4 * TWO_M31 + dim * 2.0 ** -64
    raise ValueError(f"no kernel for noise {noise.name!r}")
