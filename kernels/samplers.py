"""The bit-level samplers of the noise stream: each Triton device function beside its torch twin.

Words w are 32-bit Philox words (seeding.py). On the Triton side a word is an int32 tensor holding
its bits (``ws``); on the torch side an int64 tensor holding the uint32 value. The twins compute the
same float32 (float64 where noted) operations; transcendental functions agree within rounding, integer
decisions (the grid samplers) exactly. fastsmooth/native/noise.c is the third twin, for the CPU.

Float mode (x + eps formed in float32, DESIGN §5):

    U31(w) = ((ws & 0x7FFFFFFF) + 0.5) 2^-31      in (0, 1], 31 bits, never 0
    S32(w) = (ws + 0.5) 2^-31                     in [-1, 1], 32 bits, symmetric
    U39(a, b) = ((as & 0x7FFFFFFF) + ((bs & 0xFF) + 0.5) 2^-8) 2^-31     in (0, 1], 39 bits
    S24(b) = ((bs >> 8) + 0.5) 2^-23              in [-1, 1], the 24 high bits of b

* Gaussian: Box-Muller on lanes (0, 1) and (2, 3) of one group -- two elements of the same copy:
  R = sqrt(-2 log U39(w_a, w_b)), theta = pi S24(w_b); eps = lambda (R cos theta, R sin theta).
* Laplace: eps = lambda sign (-log U31(w)), sign = the top bit of w; on U31's first cell (the 31 low
  bits all zero, probability 2^-31) U is refined to ((t & 0x7FFFFFFF) + 0.5) 2^-62 with t the
  element's TAG_LAPLACE_TAIL word: 62 bits in all.
* Uniform: eps = lambda S32(w).
* ExpInf(k): per copy s ~ Gamma(d/k, 1) by Marsaglia & Tsang (2000) in float64 (shape < 1 through
  the boost Gamma(a) = Gamma(a + 1) U^(1/a)), r = lambda s^(1/k); eps_i = r S32(w_i), except the face
  j = floor(W d / 2^64) (W a 64-bit word, exact) set to +-r with a fair sign.

Grid mode (inputs k / G, fastsmooth/grid.py): nu = round(G delta) is drawn exactly.

* Gaussian, Laplace, Uniform: an alias table per (noise, G): bucket i = w >> (32 - b), the other
  32 - b bits of w against the high bits of T_i, and on a tie (probability <= 2^-(32-b)) the
  element's TAG_GRID_LOW word against T_i's low 32 bits: a 64-bit uniform drawn lazily.
* ExpInf: nu_i = floor(a S53 + 1/2), a = G r in float64, S53 from the element's word and the high
  21 bits of its TAG_GRID_LOW word; the face nu_j = floor(+-a + 1/2).

tau (``stream_tau`` in perturb.py) is derived there from what these functions draw.
"""

from __future__ import annotations

import math

import torch

from .jit import jit, tl
from .philox import philox4x32, to_int32

TWO_M31 = 2.0 ** -31
_F32 = torch.float32
_F64 = torch.float64


# -- U31, S32 -----------------------------------------------------------------------------

@jit
def _u31(ws):
    """int32 word -> float32 uniform on (0, 1] (31 bits)."""
    return ((ws & 0x7FFFFFFF).to(tl.float32) + 0.5) * 4.656612873077393e-10


def u31_twin(w, dtype=_F32):
    return ((w & 0x7FFFFFFF).to(dtype) + 0.5) * TWO_M31


@jit
def _s32(ws):
    """int32 word -> float32 uniform on [-1, 1] (32 bits, symmetric)."""
    return (ws.to(tl.float32) + 0.5) * 4.656612873077393e-10


def s32_twin(w, dtype=_F32):
    return (to_int32(w).to(dtype) + 0.5) * TWO_M31


@jit
def _u31_f64(ws):
    return ((ws & 0x7FFFFFFF).to(tl.float64) + 0.5) * 4.656612873077393e-10


@jit
def _s32_f64(ws):
    return (ws.to(tl.float64) + 0.5) * 4.656612873077393e-10


# -- Gaussian: Box-Muller -------------------------------------------------------------------

@jit
def _box_muller(wa, wb):
    """(R cos theta, R sin theta): radius uniform U39(wa, wb), angle pi S24(wb)."""
    low = ((wb & 0xFF).to(tl.float32) + 0.5) * 0.00390625
    rad = tl.sqrt(-2.0 * tl.log(((wa & 0x7FFFFFFF).to(tl.float32) + low) * 4.656612873077393e-10))
    th = ((wb >> 8).to(tl.float32) + 0.5) * 1.1920928955078125e-07 * 3.141592653589793
    return rad * tl.cos(th), rad * tl.sin(th)


def box_muller_twin(wa, wb):
    low = ((wb & 0xFF).to(_F32) + 0.5) * 2.0 ** -8
    rad = torch.sqrt(-2.0 * torch.log(((wa & 0x7FFFFFFF).to(_F32) + low) * TWO_M31))
    th = ((to_int32(wb) >> 8).to(_F32) + 0.5) * 2.0 ** -23 * torch.tensor(math.pi, dtype=_F32)
    return rad * torch.cos(th), rad * torch.sin(th)


# -- Laplace --------------------------------------------------------------------------------

@jit
def _signed_neglog(ws, u):
    """-log u with the sign of the word ws (its top bit)."""
    mag = -tl.log(u)
    return tl.where(ws < 0, -mag, mag)


@jit
def _laplace(ws):
    return _signed_neglog(ws, _u31(ws))


@jit
def _refine_first_cell(w, t, eps, lam):
    """A lane whose word w has its 31 low bits all zero (U31's first cell) takes
    U = ((t & 0x7FFFFFFF) + 0.5) 2^-62 from its refinement word t; other lanes keep eps."""
    u = ((t & 0x7FFFFFFF).to(tl.float32) + 0.5) * 2.168404344971009e-19
    return tl.where((w & 0x7FFFFFFF) == 0, lam * _signed_neglog(w.to(tl.int32, bitcast=True), u), eps)


def laplace_twin(w, tail_words):
    """Unit Laplace of words w; ``tail_words()`` gives the TAG_LAPLACE_TAIL words, asked for only
    when some word sits in U31's first cell."""
    first = (w & 0x7FFFFFFF) == 0
    u = u31_twin(w)
    if bool(first.any()):
        u = torch.where(first, ((tail_words() & 0x7FFFFFFF).to(_F32) + 0.5) * 2.0 ** -62, u)
    mag = -torch.log(u)
    return torch.where(w >= 2 ** 31, -mag, mag)


# -- ExpInf: per copy -----------------------------------------------------------------------

def gamma_constants(dim: int, k: float) -> tuple[float, float, float, bool]:
    """Marsaglia-Tsang constants for Gamma(d/k): (dd = shape - 1/3, c = 1/sqrt(9 dd), 1/alpha, boost)."""
    alpha = dim / k
    boost = alpha < 1.0
    shape = alpha + 1.0 if boost else alpha
    dd = shape - 1.0 / 3.0
    return dd, 1.0 / math.sqrt(9.0 * dd), 1.0 / alpha, boost


@jit
def _expinf_copy(params_ptr, k0, k1, copy, image, tag_gamma, tag_copy, rmask, D, ROWS: tl.constexpr,
                 BOOST: tl.constexpr, MAX_IT: tl.constexpr):
    """Per copy (ROWS,): log s (float64, s ~ Gamma(d/k)), face index j (int32), face sign (+-1)."""
    dd = tl.load(params_ptr + 1)          # shape - 1/3 (shape = d/k, or d/k + 1 when boosted)
    cc = tl.load(params_ptr + 2)          # 1 / sqrt(9 dd)
    inv_alpha = tl.load(params_ptr + 3)   # k / d (boost exponent)
    zero = tl.zeros([ROWS], dtype=tl.uint32)
    # Marsaglia-Tsang: iteration `it` of a copy reads Philox(it, copy, image, domain + TAG_GAMMA).
    log_g = tl.full([ROWS], float("-inf"), dtype=tl.float64)
    pending = rmask
    it = tl.full([], 0, dtype=tl.uint32)
    npend = tl.sum(pending.to(tl.int32), axis=0)
    while npend > 0:
        w0, w1, w2, _ = philox4x32(zero + it, copy, image, zero + tag_gamma, k0, k1)
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
    c0, c1, c2, c3 = philox4x32(zero, copy, image, zero + tag_copy, k0, k1)
    if BOOST:
        log_g = log_g + tl.log(_u31_f64(c3.to(tl.int32, bitcast=True))) * inv_alpha
    # j = floor(W d / 2^64) with W = c1 * 2^32 + c0: exact in 64-bit integers for d < 2^31.
    dl = (tl.zeros([ROWS], dtype=tl.int32) + D).to(tl.uint64)
    lo = c0.to(tl.uint64) * dl
    hi = c1.to(tl.uint64) * dl
    j = ((hi + (lo >> 32)) >> 32).to(tl.int32)
    sign = tl.where((c2 & 1) == 1, 1.0, -1.0)
    return log_g, j, sign


def expinf_copy_twin(words_of, copy_index, dim: int, k: float, max_iterations: int):
    """``_expinf_copy`` in torch: (log s float64, j int64, sign float32) for the 1-D int64
    ``copy_index``. ``words_of(c0, tag)`` gives the four words of Philox(c0, copy, image, tag)."""
    from ..seeding import TAG_COPY, TAG_GAMMA

    dd, c, inv_alpha, boost = gamma_constants(dim, k)
    n = copy_index.numel()
    log_g = torch.full((n,), -math.inf, dtype=_F64, device=copy_index.device)
    pending = torch.ones(n, dtype=torch.bool, device=copy_index.device)
    it = 0
    while bool(pending.any()) and it < max_iterations:
        w0, w1, w2, _ = words_of(it, TAG_GAMMA)
        z = torch.sqrt(-2.0 * torch.log(u31_twin(w0, _F64))) * torch.cos(s32_twin(w1, _F64) * math.pi)
        y = 1.0 + c * z
        v = y * y * y
        pos = v > 0.0
        vs = torch.where(pos, v, torch.ones_like(v))
        ua = u31_twin(w2, _F64)
        accept = pos & (torch.log(ua) < 0.5 * z * z + dd - dd * vs + dd * torch.log(vs))
        log_g = torch.where(pending & accept, torch.log(dd * vs), log_g)
        pending = pending & ~accept
        it += 1
    c0, c1, c2, c3 = words_of(0, TAG_COPY)
    if boost:
        log_g = log_g + torch.log(u31_twin(c3, _F64)) * inv_alpha
    j = (c1 * dim + ((c0 * dim) >> 32)) >> 32
    sign = torch.where((c2 & 1) == 1, 1.0, -1.0).to(_F32)
    return log_g, j, sign


# -- Grid mode: i.i.d. noises through an alias table -------------------------------------

@jit
def _grid_alias(w, t_hi_ptr, alias_ptr, BITS: tl.constexpr):
    """(bucket, nu bucket, tie) of uint32 words w: bucket i = w >> (32 - BITS); the low 32 - BITS
    bits v keep i below T_i's high bits, take the alias above, and tie on equality."""
    i = (w >> (32 - BITS)).to(tl.int32)
    v = (w & ((1 << (32 - BITS)) - 1)).to(tl.int32)
    th = tl.load(t_hi_ptr + i)
    nu = tl.where(v < th, i, tl.load(alias_ptr + i))
    return i, nu, v == th


@jit
def _grid_alias_refine(i, nu, tie, t, t_lo_ptr, alias_ptr):
    """Ties decided by the low word t (uint32) against T_i's low 32 bits (int32 bits in memory)."""
    tl_lo = tl.load(t_lo_ptr + i, mask=tie, other=0).to(tl.uint32, bitcast=True)
    low_keeps = t < tl_lo
    return tl.where(tie, tl.where(low_keeps, i, tl.load(alias_ptr + i, mask=tie, other=0)), nu)


def grid_alias_twin(w, low_words, table):
    """Bucket indices (nu + offset, int64) of uint32 words w (int64 tensor) under ``table``
    (grid.AliasTable on w's device); ``low_words()`` gives the TAG_GRID_LOW words, asked for only on a tie."""
    shift = 32 - table.bits
    t_hi = table.threshold_hi.to(w.device)
    alias = table.alias.to(device=w.device, dtype=torch.int64)
    i = w >> shift
    v = w & ((1 << shift) - 1)
    th = t_hi[i]
    nu = torch.where(v < th, i, alias[i])
    tie = v == th
    if bool(tie.any()):
        keep = low_words() < table.threshold_lo.to(w.device)[i]
        nu = torch.where(tie, torch.where(keep, i, alias[i]), nu)
    return nu


# -- Grid mode: ExpInf in float64 ----------------------------------------------------------

@jit
def _expinf_grid(w, t, a):
    """floor(a S53 + 1/2): S53 = (2K + 1 - 2^53) 2^-53, K = (w << 21) | (t >> 11) (uint32 words)."""
    kk = (w.to(tl.uint64) << 21) | (t >> 11).to(tl.uint64)
    s = ((2 * kk + 1).to(tl.int64) - 9007199254740992).to(tl.float64) * 1.1102230246251565e-16
    return tl.floor(a * s + 0.5)


def expinf_grid_twin(w, t, a):
    """``_expinf_grid`` for int64 tensors of uint32 words w, t and float64 a (broadcast)."""
    kk = (w << 21) | (t >> 11)
    s = (2 * kk + 1 - 2 ** 53).to(_F64) * 2.0 ** -53
    return torch.floor(a * s + 0.5)


# -- Output ---------------------------------------------------------------------------------

@jit
def _bf16_bits_rtne(y):
    """float32 -> the int16 bits of bfloat16, rounded to nearest even, NaN kept NaN (the
    interpreter's own float32 -> bfloat16 cast truncates; torch's .to(bfloat16) is the twin)."""
    bits = y.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(y != y, 0x7FC0, rounded).to(tl.int16)



# -- What a copy of one noise draws, and its tau -------------------------------------------

MAX_GAMMA_ITERATIONS = 64
NOISE_IDS = {"gaussian": 0, "laplace": 1, "uniform": 2, "expinf": 3}


class NoisePlan:
    """One noise on inputs of ``dim`` elements, in float mode (grid None) or on the grid 1/G: what
    every backend needs to draw it (lambda, ExpInf's Gamma constants, the alias table)."""

    def __init__(self, noise, dim: int, grid=None):
        from ..grid import alias_table, check_input_grid
        from ..seeding import check_dim

        self.name = str(noise.name).lower()
        if self.name not in NOISE_IDS:
            raise ValueError(f"no sampler for noise {noise.name!r}; expected one of {', '.join(NOISE_IDS)}")
        self.noise_id = NOISE_IDS[self.name]
        self.dim = check_dim(dim)
        self.lam = float(noise.scale_for(self.dim))
        self.k = float(noise.k) if self.name == "expinf" else None
        self.grid = check_input_grid(grid)
        self.table = None
        if self.grid is not None and self.name != "expinf":
            self.table = alias_table(self.name, self.lam, self.grid)
        if self.k is not None:
            self.gamma = gamma_constants(self.dim, self.k)

    def key(self) -> tuple:
        return (self.name, self.lam, self.k, self.dim, self.grid)


def gaussian_pairs(dim: int) -> int:
    """Box-Muller pairs whose outputs land on elements < dim: lanes (0, 1) and (2, 3) of a group
    pair up, so a chunk of 512 elements holds 256 pairs and a partial chunk the pairs it touches."""
    from ..seeding import CHUNK, LANE_RUN

    full, rest = divmod(int(dim), CHUNK)
    return full * 2 * LANE_RUN + min(rest, LANE_RUN) + max(0, min(rest - 2 * LANE_RUN, LANE_RUN))


def stream_tau(plan: NoisePlan) -> float:
    """tau: a bound on the total-variation distance of one copy's sampled noise (or, on the grid, of
    its nu) from the ideal law, from what the samplers above draw (DESIGN §5); p_lower loses it.

    Float mode counts the ideal mass that a sampler cannot reach -- the whole first grid cell of
    every uniform that feeds an unbounded transform -- and every bias of a discrete choice; a value
    moved within its grid cell is float rounding, as in any float sampler, and is not counted:
      * Gaussian: one U39 radius uniform per Box-Muller pair, first cell 2^-39: pairs(d) 2^-39.
      * Laplace: one 62-bit magnitude per element (31 bits, refined on the first cell): d 2^-62.
      * Uniform: 0 (a bounded transform whose support is reached).
      * ExpInf: per Marsaglia-Tsang iteration 2^-31 for the normal's radius uniform and 2^-31 for the
        acceptance uniform, at most 1.06 iterations on average for shape >= 1 (acceptance >= 0.95);
        2^-31 for the boost uniform; the face index floor(W d / 2^64) puts floor or ceil(2^64/d) words
        on each face (d 2^-64); 0.05^64 for the cap of MAX_GAMMA_ITERATIONS: 4 2^-31 + d 2^-64 in all.
    Grid mode: every element's nu is exact up to its table's quantization (d tau_table, the tables'
    tau computed exactly in grid.py), ExpInf's up to expinf_grid_tau, on top of its float-mode tau.
    """
    from ..grid import expinf_grid_tau

    d = plan.dim
    if plan.name == "expinf":
        float_tau = 4 * TWO_M31 + d * 2.0 ** -64
        return float_tau if plan.grid is None else float_tau + expinf_grid_tau(d, plan.k, plan.lam, plan.grid)
    if plan.grid is not None:
        return d * plan.table.tau
    if plan.name == "gaussian":
        return gaussian_pairs(d) * 2.0 ** -39
    if plan.name == "laplace":
        return d * 2.0 ** -62
    return 0.0
