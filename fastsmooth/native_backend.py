"""The native backend: the kernels' C twin (fastsmooth/native/noise.c) on the CPU, the engine's fast CPU path.

Same words and samplers as the Triton and torch backends (backends.py). The extension is built by
``pip install -e .`` where a C compiler exists; without it ``native_available()`` is False and the
engine's "auto" takes the torch backend (with one warning). Copies are drawn on
``torch.get_num_threads()`` threads at once: ctypes releases the GIL during each call, and the
copies are independent, so the output does not depend on the number of threads.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Optional, Sequence

import torch

from .kernels.perturb import check_segments
from .kernels.samplers import MAX_GAMMA_ITERATIONS, NoisePlan, stream_tau
from .kernels.vote import vote_reference
from .seeding import DOMAIN_CERTIFY, philox_key

OUT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MIN_COPIES_PER_CALL = 8   # below it a thread's share is not worth the handoff


class _Piece(ctypes.Structure):
    """fs_piece of noise.c: one thread's share of a fill."""

    _fields_ = [("x", ctypes.c_void_p), ("out", ctypes.c_void_p), ("image", ctypes.c_uint32),
                ("first_copy", ctypes.c_uint32), ("count", ctypes.c_int64)]


class _Plan(ctypes.Structure):
    """fs_plan of noise.c, field for field."""

    _fields_ = [("noise", ctypes.c_int32), ("grid", ctypes.c_int32), ("dim", ctypes.c_int64),
                ("lam", ctypes.c_float), ("lam64", ctypes.c_double), ("dd", ctypes.c_double),
                ("cc", ctypes.c_double), ("inv_alpha", ctypes.c_double), ("inv_k", ctypes.c_double),
                ("boost", ctypes.c_int32), ("max_iterations", ctypes.c_int32), ("k0", ctypes.c_uint32),
                ("k1", ctypes.c_uint32), ("domain", ctypes.c_uint32), ("bits", ctypes.c_int32),
                ("offset", ctypes.c_int32), ("packed", ctypes.c_void_p), ("t_lo", ctypes.c_void_p),
                ("out_dtype", ctypes.c_int32), ("channels", ctypes.c_int32)]


@lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    spec = importlib.util.find_spec("fastsmooth._native_noise")
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    if lib.fs_abi_version() != 3:
        return None
    lib.fs_vote.restype = None
    lib.fs_vote.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                            ctypes.c_void_p, ctypes.c_void_p]
    lib.fs_fill.restype = ctypes.c_int
    lib.fs_fill.argtypes = [ctypes.POINTER(_Plan), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                            ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int64]
    lib.fs_fill_pieces.restype = ctypes.c_int
    lib.fs_fill_pieces.argtypes = [ctypes.POINTER(_Plan), ctypes.POINTER(_Piece), ctypes.c_int64, ctypes.c_int64,
                                   ctypes.c_int]
    return lib


@lru_cache(maxsize=None)
def _shares_torch_openmp() -> bool:
    """Whether the extension's OpenMP is torch's: built with it, and one libgomp in the process (the
    loader gives the extension the libgomp.so.1 torch loaded first). Two runtimes would run two teams
    of threads on the same cores; the fill then uses a thread pool of its own instead."""
    lib = _library()
    if lib is None or not lib.fs_openmp():
        return False
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line or "libomp" in line}
    except OSError:
        return False
    return len(paths) == 1


def native_available() -> bool:
    """True where the extension was built; warns once (the CPU path is then slow) otherwise."""
    if os.environ.get("FASTSMOOTH_NATIVE", "1") == "0":
        return False
    if _library() is None:
        _warn_missing()
        return False
    return True


@lru_cache(maxsize=None)
def _warn_missing() -> None:
    warnings.warn("fastsmooth's native noise sampler is not built (no C compiler at install time?): the CPU "
                  "uses the slow torch backend. Reinstall with a C compiler (pip install -e .).", stacklevel=3)


def _uint32_bits(values: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 as a contiguous int32 tensor of the same bits."""
    return torch.where(values >= 2 ** 31, values - 2 ** 32, values).to(torch.int32).contiguous()


class NativeBackend:
    """``NoiseBackend`` (backends.py) of the C twin, on the CPU."""

    name = "native"

    def __init__(self, device=None):
        if device is not None and torch.device(device).type != "cpu":
            raise RuntimeError("backend='native' runs on the CPU; use 'triton' or 'torch' on " + str(device))
        self._lib = _library()
        if self._lib is None:
            raise RuntimeError("fastsmooth's native extension is not built; reinstall with a C compiler "
                               "(pip install -e .) or use backend='torch'")
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pool_owner = (0, 0)  # (process id, threads) the pool was made for
        self._plans: dict = {}

    def tv_bound(self, noise, dim: int, grid: Optional[int] = None) -> float:
        return stream_tau(NoisePlan(noise, dim, grid))

    def _plan(self, noise, dim, grid, seed, domain, dtype, channels):
        key = (noise, dim, grid, seed, domain, dtype, channels)
        hit = self._plans.get(key)
        if hit is None:
            plan = NoisePlan(noise, dim, grid)
            k0, k1 = philox_key(seed)
            st = _Plan(noise=plan.noise_id, grid=grid or 0, dim=dim, lam=plan.lam, lam64=plan.lam,
                       max_iterations=MAX_GAMMA_ITERATIONS, k0=k0, k1=k1, domain=domain,
                       out_dtype=OUT_DTYPES[dtype], channels=channels)
            tables = None
            if plan.k is not None:
                dd, cc, inv_alpha, boost = plan.gamma
                st.dd, st.cc, st.inv_alpha, st.inv_k, st.boost = dd, cc, inv_alpha, 1.0 / plan.k, int(boost)
            if plan.table is not None:
                table = plan.table
                # one word a bucket: T_i's high bits (< 2^(32 - bits), grid.py) above the alias
                packed = (table.threshold_hi << table.bits) | table.alias.to(torch.int64)
                tables = (_uint32_bits(packed), _uint32_bits(table.threshold_lo))   # kept alive with the struct
                st.bits, st.offset = table.bits, table.offset
                st.packed, st.t_lo = (t.data_ptr() for t in tables)
            if len(self._plans) > 64:
                self._plans.clear()
            hit = self._plans[key] = (st, tables)
        return hit[0]

    def fill(self, out: torch.Tensor, xs: torch.Tensor, segments: Sequence, noise, seed: int,
             grid: Optional[int] = None, domain: int = DOMAIN_CERTIFY) -> None:
        segs = check_segments(out, xs, segments, grid)
        if not segs:
            return
        if out.device.type != "cpu":
            raise RuntimeError(f"backend='native' fills CPU tensors, got one on {out.device}")
        shape = tuple(out.shape[1:])
        dim = math.prod(shape)
        if out[0].is_contiguous():
            channels = 0
        elif out.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last):
            channels = shape[0]
        else:  # another layout: fill contiguous rows, then copy them over
            tmp = torch.empty(out.shape, dtype=out.dtype)
            self.fill(tmp, xs, segments, noise, seed, grid, domain)
            for _, _, _, count, row in segs:
                out[row:row + count].copy_(tmp[row:row + count])
            return
        plan = self._plan(noise, dim, grid, int(seed) & 0xFFFFFFFFFFFFFFFF, int(domain), out.dtype, channels)
        xs = xs.contiguous()
        item, x_item = out.element_size(), xs.element_size()
        stride = out.stride(0)
        base, xbase = out.data_ptr(), xs.data_ptr()
        # One share of copies per thread (a handoff to a pool thread costs tens of microseconds, as
        # much as ~50 copies of MNIST noise): the batch's copies split evenly, segments cut where needed.
        threads = max(1, torch.get_num_threads())
        share = max(MIN_COPIES_PER_CALL, -(-sum(seg[3] for seg in segs) // threads))
        pieces = []  # (x pointer, out pointer, image, first copy, copies)
        for slot, image_index, first_copy, count, row in segs:
            for start in range(0, count, share):
                take = min(share, count - start)
                pieces.append((xbase + slot * dim * x_item, base + (row + start) * stride * item, image_index,
                               first_copy + start, take))
        fill = self._lib.fs_fill
        ref = ctypes.byref(plan)

        def run(piece):
            x_ptr, out_ptr, image, first, take = piece
            if fill(ref, x_ptr, out_ptr, stride, image, first, take) != 0:
                raise MemoryError("native noise fill failed")

        if threads > 1 and len(pieces) > 1 and _shares_torch_openmp():
            # on torch's own OpenMP team (noise.c, fs_fill_pieces): no handoff, no core to wait for
            array = (_Piece * len(pieces))(*(_Piece(*piece) for piece in pieces))
            if self._lib.fs_fill_pieces(ref, array, len(pieces), stride, threads) != 0:
                raise MemoryError("native noise fill failed")
        elif threads > 1 and len(pieces) > 1:
            # the other shares on the pool, the last one on the calling thread (rows disjoint per piece)
            futures = [self._workers().submit(run, piece) for piece in pieces[:-1]]
            run(pieces[-1])
            for future in futures:
                future.result()
        else:
            for piece in pieces:
                run(piece)

    def _workers(self) -> ThreadPoolExecutor:
        owner = (os.getpid(), torch.get_num_threads())
        if self._pool_owner != owner:  # first use, another thread count, or a forked child (no threads)
            if self._pool is not None and self._pool_owner[0] == owner[0]:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(owner[1], thread_name_prefix="fastsmooth-noise")
            self._pool_owner = owner
        return self._pool

    def vote(self, logits, slots, counts, nonfinite) -> None:
        """One pass in C for float32 logits on the CPU (a tenth of the four torch ops' time for a
        batch of 1000 x 10); vote_reference, its twin, otherwise."""
        if (logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() != 2
                or logits.stride(1) != 1 or not counts.is_contiguous() or counts.dtype != torch.int64):
            vote_reference(logits, slots, counts, nonfinite)
            return
        slots = slots.to(torch.int64).contiguous()
        self._lib.fs_vote(logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0), slots.data_ptr(),
                          counts.data_ptr(), nonfinite.data_ptr())
